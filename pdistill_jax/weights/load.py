"""From a model spec to a ready Flax model: resolve, read weights, build, attach tokenizer."""
from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pdistill_jax.config import LoraConfig, ModelConfig
from pdistill_jax.weights.hf import load_checkpoint
from pdistill_jax.model.transformer import Transformer
from pdistill_jax.weights.registry import resolve_model
from pdistill_jax.weights.tokenizer import load_tokenizer


@dataclasses.dataclass
class LoadedModel:
    cfg: ModelConfig
    model: Transformer
    tokenizer: object
    path: Path  # resolved weights location (HF directory or .gguf file)
    spec: str  # what the user passed (registered name or path)


def build_model(cfg: ModelConfig, base_params: dict, lora: LoraConfig | None = None, *,
                seed: int = 0, dtype=jnp.float32, param_dtype=jnp.float32,
                remat: bool = False) -> Transformer:
    """A Transformer holding `base_params` and, if `lora` is given, a freshly initialised adapter.

    The module is built abstractly (no random base weights are ever materialised); only the
    LoRA leaves are initialised, inside a jit that discards everything else.
    """
    def make():
        return Transformer(cfg, lora, dtype=dtype, param_dtype=param_dtype, remat=remat,
                           rngs=nnx.Rngs(params=0, lora=seed))

    abstract = nnx.eval_shape(make)
    graphdef, lora_state, base_state = nnx.split(abstract, nnx.LoRAParam, nnx.Param)
    nnx.replace_by_pure_dict(
        base_state, jax.tree.map(lambda a: jnp.asarray(a, dtype=param_dtype), base_params))
    if lora is not None:
        lora_state = jax.jit(lambda: nnx.state(make(), nnx.LoRAParam))()
    return nnx.merge(graphdef, lora_state, base_state)


_reused: dict | None = None  # a dict inside `reuse_loaded_checkpoints`, else None


@contextlib.contextmanager
def reuse_loaded_checkpoints() -> Iterator[None]:
    """Inside this block each checkpoint and tokenizer is read from disk once and then reused.

    `pdistill run` loads the same base model for generation, two trainings and every answering
    stage; reading and dequantizing SmolLM2-135M's GGUF and its tokenizer takes ~7 s each time.
    Outside the block nothing is kept, so a library user's host memory holds no stray copy of a
    large model's weights.
    """
    global _reused
    outer, _reused = _reused, ({} if _reused is None else _reused)
    try:
        yield
    finally:
        _reused = outer


def _read(path: Path, what: str, read):
    if _reused is None:
        return read()
    stat = path.stat()
    key = (what, str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _reused:
        _reused[key] = read()
    return _reused[key]


def load_model(spec: str | Path, lora: LoraConfig | None = None, *, seed: int = 0,
               dtype=jnp.float32, param_dtype=jnp.float32, remat: bool = False,
               with_tokenizer: bool = True) -> LoadedModel:
    path = resolve_model(spec)
    # Reused numpy weights are safe to share: build_model only reads them into jax arrays.
    cfg, params = _read(path, "weights", lambda: load_checkpoint(path, np.float32))
    model = build_model(cfg, params, lora, seed=seed, dtype=dtype, param_dtype=param_dtype,
                        remat=remat)
    tok = _read(path, "tokenizer", lambda: load_tokenizer(path)) if with_tokenizer else None
    return LoadedModel(cfg, model, tok, path, str(spec))

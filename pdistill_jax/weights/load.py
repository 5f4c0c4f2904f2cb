"""From a model spec (and an adapter) to a ready Flax model: resolve, read weights, build, put
the adapter's LoRA weights in place, attach the tokenizer. The one place a model is loaded."""
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
from pdistill_jax.model.transformer import Transformer, compute_dtype
from pdistill_jax.weights.hf import load_checkpoint, read_model_config
from pdistill_jax.weights.peft import adapter_base_model, load_peft_adapter
from pdistill_jax.weights.registry import resolve_model
from pdistill_jax.weights.tokenizer import load_tokenizer


@dataclasses.dataclass
class LoadedModel:
    cfg: ModelConfig
    model: Transformer
    tokenizer: object
    path: Path  # resolved weights location (HF directory or .gguf file)
    spec: str  # what the user passed (registered name or path)
    lora: LoraConfig | None = None  # the adapter's shape (the LoRA given, or the loaded adapter's)


def build_model(cfg: ModelConfig, base_params: dict, lora: LoraConfig | None = None, *,
                seed: int = 0, dtype=jnp.float32, param_dtype=jnp.float32,
                remat: bool = False, attention: str = "auto", lora_dtype=None) -> Transformer:
    """A Transformer holding `base_params` and, if `lora` is given, a freshly initialised adapter.

    The module is built abstractly (no random base weights are ever materialised); only the
    LoRA leaves are initialised, inside a jit that discards everything else.
    """
    def make():
        return Transformer(cfg, lora, dtype=dtype, param_dtype=param_dtype, remat=remat,
                           attention=attention, lora_dtype=lora_dtype,
                           rngs=nnx.Rngs(params=0, lora=seed))

    abstract = nnx.eval_shape(make)
    graphdef, lora_state, base_state = nnx.split(abstract, nnx.LoRAParam, nnx.Param)
    nnx.replace_by_pure_dict(
        base_state, jax.tree.map(lambda a: jnp.asarray(a, dtype=param_dtype), base_params))
    if lora is not None:
        lora_state = jax.jit(lambda: nnx.state(make(), nnx.LoRAParam))()
    return nnx.merge(graphdef, lora_state, base_state)


def decode_options(decode_dtype: str) -> dict:
    """load_model's dtype arguments for a model that answers or generates under a decode_dtype
    setting (config.AnswerConfig): the base weights cast once, here, to that dtype and computed
    in it, so a decode step reads half the bytes in bfloat16; the adapter's products in float32
    (its weights are float32 whatever the setting). The sampler's logits are float32 either way
    (model/slots.py). float32 is the float32 model it always was."""
    dtype = compute_dtype(decode_dtype)
    return {"dtype": dtype, "param_dtype": dtype, "lora_dtype": jnp.float32}


_reused: dict | None = None  # a dict inside `reuse_loaded_checkpoints`, else None


@contextlib.contextmanager
def reuse_loaded_checkpoints() -> Iterator[None]:
    """Inside this block each checkpoint and tokenizer is read from disk once and then reused.

    `pdistill run` loads the same base model for generation, two trainings and every answering
    stage, and reading and dequantizing a GGUF and its tokenizer is slow. Outside the block
    nothing is kept, so a library user's host memory holds no stray copy of a large model's
    weights.
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


def load_model(spec: str | Path | None, lora: LoraConfig | None = None, *, adapter=None,
               seed: int = 0, dtype=jnp.float32, param_dtype=jnp.float32, remat: bool = False,
               attention: str = "auto", lora_dtype=None, with_tokenizer: bool = True) -> LoadedModel:
    """The model `spec` names, with a fresh LoRA of shape `lora`, or with `adapter`'s.

    adapter: a PEFT folder or a training run folder; its LoRA config and (float32) weights take
      the place of `lora`, which must then be None. `spec` None means the base model it names.
    """
    pure = None
    if adapter is not None:
        if lora is not None:
            raise ValueError("load_model: pass lora or adapter, not both")
        if spec is None:
            spec = adapter_base_model(adapter)
        # The adapter is checked against the architecture before the slow weight read.
        lora, pure = load_peft_adapter(adapter, read_model_config(resolve_model(spec)))
    path = resolve_model(spec)
    # Reused numpy weights are safe to share: build_model only reads them into jax arrays.
    cfg, params = _read(path, "weights", lambda: load_checkpoint(path, np.float32))
    model = build_model(cfg, params, lora, seed=seed, dtype=dtype, param_dtype=param_dtype,
                        remat=remat, attention=attention, lora_dtype=lora_dtype)
    if pure is not None:
        state = nnx.state(model, nnx.LoRAParam)
        nnx.replace_by_pure_dict(state, jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), pure))
        nnx.update(model, state)
    tok = _read(path, "tokenizer", lambda: load_tokenizer(path)) if with_tokenizer else None
    return LoadedModel(cfg, model, tok, path, str(spec), lora)

"""From a model spec to a ready Flax model: resolve, read weights, build, attach tokenizer."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .config import LoraConfig, ModelConfig
from .hf_io import load_checkpoint
from .model import Transformer
from .registry import resolve_model
from .tokenizer import load_tokenizer


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


def load_model(spec: str | Path, lora: LoraConfig | None = None, *, seed: int = 0,
               dtype=jnp.float32, param_dtype=jnp.float32, remat: bool = False,
               with_tokenizer: bool = True) -> LoadedModel:
    path = resolve_model(spec)
    cfg, params = load_checkpoint(path, np.float32)
    model = build_model(cfg, params, lora, seed=seed, dtype=dtype, param_dtype=param_dtype,
                        remat=remat)
    tok = load_tokenizer(path) if with_tokenizer else None
    return LoadedModel(cfg, model, tok, path, str(spec))

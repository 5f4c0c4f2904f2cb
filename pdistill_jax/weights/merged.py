"""A trained adapter merged into its base model, written as a plain Hugging Face model folder.

The merged folder (config.json, safetensors, tokenizer with chat template, generation config)
loads with `AutoModelForCausalLM.from_pretrained` and serves with vLLM at any LoRA rank, with no
pdistill installed. GGUF bases are written with Hugging Face names too: export reads
`names.TENSORS` backwards, a rename plus a transpose.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Iterator

import jax
import numpy as np

from pdistill_jax.config import LoraConfig, ModelConfig
from pdistill_jax.files import write_dir_atomic
from pdistill_jax.weights.hf import fuse, load_checkpoint, read_model_config
from pdistill_jax.weights.names import LAYER_PATH, by_path, expected_shapes
from pdistill_jax.weights.peft import (adapter_base_model, head_lora, layer_lora, load_peft_adapter,
                                       resolve_adapter, save_peft_adapter)
from pdistill_jax.weights.registry import resolve_model

DTYPES = ("float32", "bfloat16")
DEFAULT_MAX_SHARD_SIZE = "5GB"


def _flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, path + "."))
        else:
            out[path] = value
    return out


def params_to_hf(cfg: ModelConfig, params: dict) -> Iterator[tuple[str, np.ndarray]]:
    """(Hugging Face name, array) pairs of our nested base parameters: the inverse of
    `hf.hf_to_params`. Arrays are views (transposed where HF stores (out, in)), except the
    fused weights of families that fuse projections (`names.FUSED`), which are concatenated."""
    return fuse(cfg, _unfused_to_hf(cfg, params))


def _unfused_to_hf(cfg: ModelConfig, params: dict) -> Iterator[tuple[str, np.ndarray]]:
    flat = _flatten(params)
    shapes, rows = expected_shapes(cfg), by_path(cfg)
    if set(flat) != set(shapes):
        raise ValueError("parameters do not fit the config: "
                         f"missing {sorted(set(shapes) - set(flat))}, "
                         f"unexpected {sorted(set(flat) - set(shapes))}")
    for path in sorted(shapes):
        array, tensor = flat[path], rows[path]
        want = ((cfg.num_layers,) if tensor.per_layer else ()) + shapes[path]
        if tuple(array.shape) != want:
            raise ValueError(f"parameter {path!r} has shape {tuple(array.shape)}, expected {want}")
        for i, layer in enumerate(array if tensor.per_layer else [array]):
            yield tensor.hf_name(i), (layer.T if tensor.transpose else layer)


def _merged(w, a, b, scale: float):
    """W + scale * A @ B in float32, cast back to W's dtype (bf16 rounding would erase small deltas
    if the sum were taken in bf16)."""
    f32 = lambda x: np.asarray(x, dtype=np.float32)  # noqa: E731
    out = f32(w) + np.float32(scale) * np.matmul(f32(a), f32(b))
    return out.astype(np.asarray(w).dtype)


def merge_lora(base_params: dict, lora_pure: dict, cfg: ModelConfig, lora: LoraConfig) -> dict:
    """Base parameters with the adapter folded in (a new tree; `base_params` is not modified).

    With a tied embedding and an adapter on the head, the merged head differs from the embedding:
    the result then carries an untied `lm_head.kernel` and fits `untied_config(cfg, lora)`.
    """
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base_params.items()}
    layers = {k: (dict(v) if isinstance(v, dict) else v) for k, v in out["layers"].items()}
    out["layers"] = layers
    for target in lora.targets:
        if target == "lm_head":
            a, b = head_lora(lora_pure)
            w = np.asarray(base_params["embed"]).T if cfg.tie_word_embeddings \
                else base_params["lm_head"]["kernel"]
            out["lm_head"] = {"kernel": _merged(w, a, b, lora.scale)}
        else:
            block, name = LAYER_PATH[target]
            a, b = layer_lora(lora_pure, target)
            b = np.asarray(b, dtype=np.float32).copy()
            b[:lora.first_layer] = 0.0  # the layers below first_layer run without the adapter
            node = dict(layers[block][name])
            node["kernel"] = _merged(node["kernel"], a, b, lora.scale)
            layers[block] = {**layers[block], name: node}
    return out


def untied_config(cfg: ModelConfig, lora: LoraConfig) -> ModelConfig:
    """The config of `merge_lora`'s result: untied when a tied head received an adapter."""
    if cfg.tie_word_embeddings and "lm_head" in lora.targets:
        return dataclasses.replace(cfg, tie_word_embeddings=False)
    return cfg


def parse_size(size: int | str) -> int:
    """Bytes from 123, "500MB", "5GB", "2GiB" (decimal units as in transformers, binary with i)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"--max-shard-size {size!r}: expected a size like 500MB or 5GB")
    base = 1024 if m.group(3) else 1000
    power = " KMGT".index(m.group(2).upper() or " ")
    return int(float(m.group(1)) * base ** power)


def _numpy_dtype(dtype: str):
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose float32 or bfloat16")
    import ml_dtypes

    return np.float32 if dtype == "float32" else ml_dtypes.bfloat16


def write_safetensors(folder: Path, tensors: list[tuple[str, np.ndarray]], dtype: str,
                      max_shard_size: int | str) -> list[str]:
    """`model.safetensors`, or shards plus `model.safetensors.index.json` when the total exceeds
    max_shard_size. Tensors are cast one shard at a time, so memory peaks at one shard."""
    from safetensors.numpy import save_file

    np_dtype, limit = _numpy_dtype(dtype), parse_size(max_shard_size)
    itemsize = np.dtype(np_dtype).itemsize
    shards: list[list[tuple[str, np.ndarray]]] = [[]]
    size = 0
    for name, array in tensors:
        nbytes = array.size * itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, array))
        size += nbytes
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map = {}
    for fname, shard in zip(names, shards):
        save_file({n: np.ascontiguousarray(a, dtype=np_dtype) for n, a in shard},
                  str(folder / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n, _ in shard})
    if len(shards) > 1:
        total = sum(a.size for _, a in tensors) * itemsize
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names


def _generation_config(model_path: Path, cfg: ModelConfig, tokenizer) -> dict:
    """The base's generation config (if any), stopping at the chat end-of-turn token and eos."""
    from pdistill_jax.weights.tokenizer import end_token_ids

    gen = {}
    src = model_path / "generation_config.json" if model_path.is_dir() else None
    if src is not None and src.exists():
        gen = json.loads(src.read_text())
    eos = end_token_ids(tokenizer, cfg)
    gen["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    if cfg.bos_token_id is not None:
        gen["bos_token_id"] = cfg.bos_token_id
    if gen.get("pad_token_id") is None and tokenizer.pad_token_id is not None:
        gen["pad_token_id"] = tokenizer.pad_token_id
    return gen


def _looks_like_hf_model(folder: Path) -> bool:
    return (folder / "config.json").exists() and (
        (folder / "model.safetensors").exists() or (folder / "model.safetensors.index.json").exists())


def save_merged(out_dir, model_spec, adapter_path, *, dtype: str = "float32",
                max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Writes base + adapter, merged, as a Hugging Face model folder (atomically)."""
    from pdistill_jax.weights.tokenizer import load_tokenizer

    _numpy_dtype(dtype)  # fail on a bad dtype before the slow part
    parse_size(max_shard_size)
    if model_spec is None:
        model_spec = adapter_base_model(adapter_path)
    path = resolve_model(model_spec)
    cfg, base = load_checkpoint(path, np.float32)
    lora, pure = load_peft_adapter(adapter_path, cfg)
    out_cfg = untied_config(cfg, lora)
    tensors = list(params_to_hf(out_cfg, merge_lora(base, pure, cfg, lora)))
    tokenizer = load_tokenizer(path)
    config = {**out_cfg.to_hf(), "torch_dtype": dtype, "dtype": dtype}
    if tokenizer.pad_token_id is not None:
        config["pad_token_id"] = tokenizer.pad_token_id
    generation = _generation_config(path, cfg, tokenizer)

    def fill(tmp: Path) -> None:
        write_safetensors(tmp, tensors, dtype, max_shard_size)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        tokenizer.save_pretrained(str(tmp))  # tokenizer files and the chat template

    if jax.process_index() == 0:
        write_dir_atomic(out_dir, fill, _looks_like_hf_model)
    return Path(out_dir)


def export_peft(out_dir, model_spec, adapter_path) -> Path:
    """Re-writes an adapter (a training run's or any PEFT folder) as a checked PEFT folder naming
    `model_spec` as its base."""
    if model_spec is None:
        model_spec = adapter_base_model(adapter_path)
    cfg = read_model_config(resolve_model(model_spec))
    lora, pure = load_peft_adapter(resolve_adapter(adapter_path), cfg)
    return save_peft_adapter(out_dir, pure, cfg, lora, str(model_spec))

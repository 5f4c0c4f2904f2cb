"""Weights in from Hugging Face (safetensors) and GGUF files, mapped onto our parameter tree.

The mapping from Hugging Face names to our paths is `names.TENSORS`, with the expected shape of
every tensor asserted. GGUF files are first renamed to Hugging Face names (and llama.cpp's q/k
row permutation undone), so both formats share the same table.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from pdistill_jax.config import ModelConfig
from pdistill_jax.model.transformer import llama3_divisors
from pdistill_jax.weights.names import IGNORED_HF, expected_shapes, fused_of, match_hf


def hf_to_params(cfg: ModelConfig, tensors: Iterable[tuple[str, np.ndarray]], dtype=np.float32,
                 source: str = "checkpoint") -> dict:
    """Maps (HF name, array) pairs to a nested dict of our base parameters, checking every shape."""
    shapes = expected_shapes(cfg)
    tensors = split_fused(cfg, tensors, source)
    flat: dict[str, np.ndarray] = {}
    per_layer: dict[str, list] = {k: [None] * cfg.num_layers for k in shapes if k.startswith("layers.")}
    for name, array in tensors:
        if IGNORED_HF.match(name):
            continue
        found = match_hf(name, cfg)
        if found is None:
            raise ValueError(f"{source}: unexpected tensor {name!r} for a {cfg.model_type} model")
        tensor, layer = found
        path = tensor.ours
        if path == "lm_head.kernel" and cfg.tie_word_embeddings:
            continue  # some tied checkpoints still store the (identical) head
        if not tensor.present(cfg):
            raise ValueError(f"{source}: tensor {name!r} does not fit this {cfg.model_type} config "
                             f"(attention_bias={cfg.attention_bias})")
        array = np.asarray(array)
        want = shapes[path][::-1] if tensor.transpose else shapes[path]
        if array.shape != want:
            raise ValueError(f"{source}: tensor {name!r} has shape {array.shape}, "
                             f"expected {want} from the config")
        array = (array.T if tensor.transpose else array).astype(dtype)
        if layer is not None:
            if layer >= cfg.num_layers:
                raise ValueError(f"{source}: tensor {name!r} is beyond num_hidden_layers={cfg.num_layers}")
            per_layer[path][layer] = array
        else:
            flat[path] = array
    for path, layers in per_layer.items():
        missing = [i for i, a in enumerate(layers) if a is None]
        if missing:
            raise ValueError(f"{source}: missing tensor for {path!r} in layer(s) {missing[:5]}"
                             f"{'...' if len(missing) > 5 else ''}")
        flat[path] = np.stack(layers)
    absent = sorted(set(shapes) - set(flat))
    if absent:
        raise ValueError(f"{source}: missing tensor(s) {absent}")
    return _nest(flat)


def split_fused(cfg: ModelConfig, tensors: Iterable[tuple[str, np.ndarray]],
                source: str = "checkpoint") -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) pairs with each fused weight of `cfg`'s family (`names.FUSED`) split into
    its parts under their unfused Hugging Face names; other tensors pass through."""
    patterns = [(f.weight_pattern, f) for f in fused_of(cfg)]
    for name, array in tensors:
        for pattern, fused in patterns:
            m = pattern.fullmatch(name)
            if m:
                sizes = fused.sizes(cfg)
                array = np.asarray(array)
                if array.ndim != 2 or array.shape[0] != sum(sizes):
                    raise ValueError(f"{source}: tensor {name!r} has shape {array.shape}, expected "
                                     f"({sum(sizes)}, {cfg.hidden_size}) from the config")
                parts = np.split(array, np.cumsum(sizes)[:-1], axis=0)
                for module, part in zip(fused.part_modules(int(m.group(1))), parts):
                    yield f"{module}.weight", part
                break
        else:
            yield name, array


def fuse(cfg: ModelConfig, tensors: Iterable[tuple[str, np.ndarray]]) -> Iterator[tuple[str, np.ndarray]]:
    """The inverse of `split_fused`: the parts of each fused weight of `cfg`'s family
    concatenated back under its Hugging Face name (emitted once its last part arrives)."""
    owner = {f"{module}.weight": (fused, layer, j)
             for fused in fused_of(cfg) for layer in range(cfg.num_layers)
             for j, module in enumerate(fused.part_modules(layer))}
    pending: dict[tuple[str, int], dict[int, np.ndarray]] = {}
    for name, array in tensors:
        if name not in owner:
            yield name, array
            continue
        fused, layer, j = owner[name]
        parts = pending.setdefault((fused.hf_module, layer), {})
        parts[j] = array
        if len(parts) == len(fused.parts):
            del pending[(fused.hf_module, layer)]
            yield fused.hf_name(layer), np.concatenate([parts[k] for k in range(len(parts))])
    if pending:
        raise ValueError(f"fused weights missing parts: {sorted(pending)[:3]}")


def _nest(flat: dict[str, np.ndarray]) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


# ---------------------------------------------------------------- Hugging Face directories

def read_hf_config(model_dir: Path) -> ModelConfig:
    path = model_dir / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{model_dir}: no config.json; pass a Hugging Face model directory")
    return ModelConfig.from_hf(json.loads(path.read_text()), str(path))


def iter_safetensors(model_dir: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Tensors of a single or sharded (`model.safetensors.index.json`) checkpoint, as float32."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (model_dir / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")
    for fname in files:
        fpath = model_dir / fname
        if not fpath.exists():
            raise FileNotFoundError(f"{fpath}: shard listed in the index is missing")
        yield from read_safetensors(fpath)


def read_safetensors(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(name, float32 array) of every tensor of one .safetensors file, one at a time (memory
    peaks at one tensor); a damaged or truncated file is one ValueError naming it."""
    from safetensors import safe_open

    try:
        # framework="flax" reads bfloat16 too (numpy has no bfloat16).
        with safe_open(str(path), framework="flax") as f:
            for name in f.keys():
                yield name, np.asarray(f.get_tensor(name), dtype=np.float32)
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for any damage
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: damaged or truncated safetensors file ({reason}); "
                         "download or save it again") from None


def load_hf_checkpoint(model_dir: str | Path, dtype=np.float32) -> tuple[ModelConfig, dict]:
    model_dir = Path(model_dir)
    cfg = read_hf_config(model_dir)
    return cfg, hf_to_params(cfg, iter_safetensors(model_dir), dtype, str(model_dir))


# ---------------------------------------------------------------- GGUF

_GGUF_TO_HF = [
    (r"token_embd\.weight", "model.embed_tokens.weight"),
    (r"output_norm\.weight", "model.norm.weight"),
    (r"output\.weight", "lm_head.weight"),
    (r"blk\.(\d+)\.attn_norm\.weight", "model.layers.{0}.input_layernorm.weight"),
    (r"blk\.(\d+)\.ffn_norm\.weight", "model.layers.{0}.post_attention_layernorm.weight"),
    (r"blk\.(\d+)\.attn_(q|k|v)\.(weight|bias)", "model.layers.{0}.self_attn.{1}_proj.{2}"),
    (r"blk\.(\d+)\.attn_(q|k)_norm\.weight", "model.layers.{0}.self_attn.{1}_norm.weight"),
    (r"blk\.(\d+)\.attn_output\.weight", "model.layers.{0}.self_attn.o_proj.weight"),
    (r"blk\.(\d+)\.ffn_(gate|up|down)\.weight", "model.layers.{0}.mlp.{1}_proj.weight"),
]
# Families whose GGUF names differ, tried first: Phi-3 keeps Hugging Face's fused weights (ffn_up
# is gate and up stacked); Gemma 3 has four norms a layer, ffn_norm being the pre-MLP one.
_GGUF_TO_HF_FAMILY = {"phi3": [
    (r"blk\.(\d+)\.attn_qkv\.weight", "model.layers.{0}.self_attn.qkv_proj.weight"),
    (r"blk\.(\d+)\.ffn_up\.weight", "model.layers.{0}.mlp.gate_up_proj.weight"),
], "gemma3_text": [
    (r"blk\.(\d+)\.post_attention_norm\.weight", "model.layers.{0}.post_attention_layernorm.weight"),
    (r"blk\.(\d+)\.ffn_norm\.weight", "model.layers.{0}.pre_feedforward_layernorm.weight"),
    (r"blk\.(\d+)\.post_ffw_norm\.weight", "model.layers.{0}.post_feedforward_layernorm.weight"),
]}
# GGUF general.architecture -> our model_type.
_GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3",
                       "gemma3": "gemma3_text"}


def _gguf_field(reader, key, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def read_gguf_config(reader, source: str) -> ModelConfig:
    arch = _gguf_field(reader, "general.architecture")
    if arch not in _GGUF_ARCHITECTURES:
        raise ValueError(f"{source}: GGUF general.architecture={arch!r} is not supported; "
                         f"use one of {', '.join(_GGUF_ARCHITECTURES)}")
    model_type = _GGUF_ARCHITECTURES[arch]
    if any(t.name.startswith("rope_factors_") for t in reader.tensors):
        raise ValueError(f"{source}: GGUF with rope_factors (Phi-3 longrope) is not supported; "
                         "use a Phi-3 model without it (the 4k-context ones)")
    g = lambda k, d=None: _gguf_field(reader, f"{arch}.{k}", d)  # noqa: E731
    heads = int(g("attention.head_count"))
    names = {t.name for t in reader.tensors}
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = g("vocab_size") or (len(tokens.data) if tokens is not None else None)
    hidden = int(g("embedding_length"))
    layers = int(g("block_count"))
    head_dim = int(g("attention.key_length", hidden // heads))
    extra = {}  # family fields GGUF metadata does not spell out
    if model_type == "gemma3_text":
        extra = _gguf_gemma3(g, layers, hidden, heads, head_dim, names, source)
    theta = float(g("rope.freq_base", 10000.0))
    if "rope_freqs.weight" in names:  # Llama 3.1 / 3.2: the scaling as per-frequency divisors
        if model_type != "llama":
            raise ValueError(f"{source}: GGUF tensor rope_freqs.weight in a {arch} model is not "
                             "supported (only Llama 3's rope scaling)")
        factors = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
        extra["rope_scaling"] = llama3_scaling_from_factors(
            np.asarray(factors.data, np.float64).reshape(-1), theta, head_dim, source)
    return ModelConfig(
        model_type=model_type,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(g("feed_forward_length")),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(g("attention.head_count_kv", heads)),
        head_dim=head_dim,
        rope_theta=theta,
        rms_norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-6)),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        qk_norm=arch in ("qwen3", "gemma3"),
        max_position_embeddings=int(g("context_length", 4096)),
        sliding_window=(int(g("attention.sliding_window")) if arch in ("phi3", "gemma3") and
                        g("attention.sliding_window") is not None else None),
        bos_token_id=_gguf_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_gguf_field(reader, "tokenizer.ggml.eos_token_id"),
        **extra,
    )


def _gguf_gemma3(g, layers: int, hidden: int, heads: int, head_dim: int, names: set,
                 source: str) -> dict:
    """The Gemma 3 fields llama.cpp's GGUF leaves out: its runtime fixes them for the
    architecture (every 6th layer full, local RoPE base 10000, query scale 1/sqrt(head_dim)
    except the 62-layer 27B's 1/sqrt(hidden / heads)), so the same values are read here."""
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if g(key) is not None:
            raise ValueError(f"{source}: GGUF gemma3.{key}={g(key)} is not supported (no "
                             "soft-capping here)")
    if g("rope.scaling.type") not in (None, "none", "linear"):
        raise ValueError(f"{source}: GGUF gemma3.rope.scaling.type={g('rope.scaling.type')!r} is "
                         "not supported; only linear")
    factor = g("rope.scaling.factor")
    scaling = ({"rope_type": "linear", "factor": float(factor)}
               if g("rope.scaling.type") == "linear" and factor else None)
    pattern = g("attention.sliding_window_pattern")
    if isinstance(pattern, list):  # newer converters write one flag per layer
        types = ["sliding_attention" if p else "full_attention" for p in pattern]
    else:
        pattern = int(pattern or 6)
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]
    return dict(
        rope_scaling=scaling, hidden_act="gelu_tanh", scale_embeddings=True, norm_plus_one=True,
        sandwich_norms=True, layer_types=tuple(types), rope_local_theta=10000.0,
        query_pre_attn_scalar=float(hidden // heads if layers == 62 else head_dim))


# llama.cpp's converter writes Llama 3's rope scaling as one divisor per frequency
# (`rope_freqs.weight`) and drops the parameters; it always takes the original context as 8192.
_LLAMA3_CONTEXT = 8192


def llama3_scaling_from_factors(factors: np.ndarray, theta: float, head_dim: int,
                                source: str) -> dict | None:
    """The Hugging Face `rope_scaling` dict that gives these per-frequency divisors.

    The divisors fix the frequencies but not the parameters: only context/low and context/high
    matter, so the context is taken as llama.cpp's 8192 and low/high solved for. Candidates are
    tried in turn (Llama 3's own 1 and 4; a fit of the blended band; one band point with Llama
    3's high = 4 x low; thresholds inside an empty band) and the first that reproduces every
    divisor is returned."""
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if factors.shape != inv.shape:
        raise ValueError(f"{source}: GGUF rope_freqs.weight has {factors.size} values for "
                         f"{inv.size} rotary frequencies (head_dim {head_dim})")
    if np.allclose(factors, 1.0, rtol=1e-6, atol=0):
        return None
    factor = float(factors.max())
    wavelen = 2 * np.pi / inv
    kept, slowed = np.isclose(factors, 1.0, rtol=1e-5), np.isclose(factors, factor, rtol=1e-5)
    band = ~kept & ~slowed
    candidates = [(1.0, 4.0)]
    smooth = (1 / factors[band] - 1 / factor) / (1 - 1 / factor)  # 0 at slowed, 1 at kept
    x = _LLAMA3_CONTEXT / wavelen[band]  # smooth = (x - low) / (high - low)
    if band.sum() >= 2:
        slope, intercept = np.polyfit(x, smooth, 1)
        candidates.append((-intercept / slope, (1 - intercept) / slope))
    elif band.sum() == 1:
        low = float(x[0] / (3 * smooth[0] + 1))
        candidates.append((low, 4 * low))
    elif kept.any() and slowed.any():
        # No frequency in the band: put its edges inside the gap between kept and slowed.
        short, long_ = wavelen[kept].max(), wavelen[slowed].min()
        edges = short * (long_ / short) ** np.array([1 / 3, 2 / 3])
        candidates.append((_LLAMA3_CONTEXT / edges[1], _LLAMA3_CONTEXT / edges[0]))
    for low, high in candidates:
        for digits in (5, None):  # 511.99999 back to 512 where that still fits
            lo, hi = (low, high) if digits is None else (float(f"{low:.{digits}g}"),
                                                         float(f"{high:.{digits}g}"))
            if hi <= lo or lo <= 0:
                continue
            if np.allclose(llama3_divisors(inv, factor, lo, hi, _LLAMA3_CONTEXT), factors, rtol=1e-5, atol=0):
                return {"rope_type": "llama3", "factor": factor, "low_freq_factor": float(lo),
                        "high_freq_factor": float(hi),
                        "original_max_position_embeddings": _LLAMA3_CONTEXT}
    raise ValueError(f"{source}: GGUF rope_freqs.weight is not a Llama 3 rope scaling this "
                     "loader can express; pass the model's Hugging Face directory instead")


def _unpermute_qk(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaving of each head's rotary halves (HF rotate-half order)."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def iter_gguf(reader, cfg: ModelConfig, source: str) -> Iterator[tuple[str, np.ndarray]]:
    from gguf.quants import dequantize

    table = _GGUF_TO_HF_FAMILY.get(cfg.model_type, []) + _GGUF_TO_HF
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            continue  # the rope scaling, read into the config
        for pattern, template in table:
            m = re.fullmatch(pattern, t.name)
            if m:
                break
        else:
            raise ValueError(f"{source}: unexpected GGUF tensor {t.name!r}")
        name = template.format(*m.groups())
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        if cfg.model_type == "llama" and t.name.endswith(("attn_q.weight", "attn_k.weight")):
            w = _unpermute_qk(w, cfg.num_heads if ".attn_q." in t.name else cfg.num_kv_heads)
        if cfg.norm_plus_one and t.name.endswith("norm.weight"):
            w = w - 1.0  # llama.cpp stores Gemma's (1 + w) norm scales; Hugging Face stores w
        yield name, w


def open_gguf(path: str | Path):
    """A GGUFReader on `path`, refusing with one ValueError a file that is not GGUF, damaged, or
    truncated (a tensor's data running past the end of the file)."""
    from gguf import GGUFReader

    path = Path(path)
    try:
        reader = GGUFReader(str(path))
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - the parser fails on damage with any error type
        raise ValueError(f"{path}: not a readable GGUF file, damaged or truncated "
                         f"({type(e).__name__}: {str(e)[:120]}); download it again") from None
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
            raise ValueError(f"{path}: truncated GGUF file ({size} bytes; tensor {t.name!r} needs "
                             f"bytes up to {t.data_offset + t.n_bytes}); download it again")
    return reader


def load_gguf(path: str | Path, dtype=np.float32) -> tuple[ModelConfig, dict]:
    path = Path(path)
    reader = open_gguf(path)
    cfg = read_gguf_config(reader, str(path))
    return cfg, hf_to_params(cfg, iter_gguf(reader, cfg, str(path)), dtype, str(path))


def read_model_config(path: Path) -> ModelConfig:
    """The architecture of a resolved model path (HF directory or .gguf) without its weights."""
    path = Path(path)
    if path.is_dir():
        return read_hf_config(path)
    return read_gguf_config(open_gguf(path), str(path))


def load_checkpoint(path: str | Path, dtype=np.float32) -> tuple[ModelConfig, dict]:
    """A Hugging Face directory or a .gguf file -> (config, nested dict of base parameters)."""
    path = Path(path)
    if path.is_dir():
        return load_hf_checkpoint(path, dtype)
    if path.suffix == ".gguf" and path.is_file():
        return load_gguf(path, dtype)
    raise FileNotFoundError(f"{path}: expected a Hugging Face model directory or a .gguf file")

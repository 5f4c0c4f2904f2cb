"""LoRA adapters to and from PEFT folders (`adapter_config.json` + `adapter_model.safetensors`).

A PEFT folder is what `peft.PeftModel.from_pretrained` and vLLM load, so a trained student can
be served without pdistill. Our LoRA leaves hold A as (in, r) and B as (r, out), stacked over
layers; PEFT stores one `lora_A.weight` (r, in) and `lora_B.weight` (out, r) per module, keyed
by the Hugging Face module path (from `names`). Both use scale = alpha / r, so the conversion is
a rename and a transpose with no rescaling.

Families that fuse projections (Phi-3's qkv_proj, gate_up_proj; `names.FUSED`) carry one PEFT
adapter per fused module. Ours has one per part, each with its own A: exported exactly as one
adapter of rank parts x r (A stacked, B block-diagonal; `rank_pattern`/`alpha_pattern` keep the
scale alpha / r), and read back from that layout or from peft's own rank-r layout (one A shared
by the parts, B split along the output axis).

Folders are written into a temporary sibling and renamed into place, so an interrupted export
never leaves a half-written adapter (and an existing one survives until the new one is complete).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from pdistill_jax.config import LORA_TARGETS, LoraConfig, ModelConfig
from pdistill_jax.files import write_dir_atomic
from pdistill_jax.log import logger
from pdistill_jax.weights.hf import read_safetensors
from pdistill_jax.weights.names import (HF_MODULE, LAYER_PATH, LORA_TENSORS, Fused, fused_of,
                                        hf_module_paths, target_dims)
from pdistill_jax.weights.registry import REGISTRY

_log = logger("export")

PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
VLLM_MAX_LORA_RANK = 512  # vLLM refuses adapters above this rank (--max-lora-rank tops out here)


# adapter_config.json fields describing PEFT features our plain LoRA cannot reproduce. Any value
# other than "unset" (None, False, empty, or the listed default) is rejected by name on import.
_UNSUPPORTED_FIELDS = {
    "use_rslora": False, "use_dora": False, "modules_to_save": None,
    "rank_pattern": None, "alpha_pattern": None, "bias": "none", "lora_bias": False,
    "exclude_modules": None, "layer_replication": None, "target_parameters": None,
    "trainable_token_indices": None, "use_qalora": False, "alora_invocation_tokens": None,
    "use_bdlora": None,
}


# ---------------------------------------------------------------- PEFT keys

def peft_key(module_path: str, matrix: str) -> str:
    """`matrix` is "A" or "B"."""
    return f"{PEFT_PREFIX}{module_path}.lora_{matrix}.weight"


def _fused_by_part(cfg: ModelConfig) -> dict[str, Fused]:
    return {part: fused for fused in fused_of(cfg) for part in fused.parts}


def target_modules(cfg: ModelConfig, targets) -> list[str]:
    """PEFT's target_modules for our targets on `cfg`'s family (fused modules named once)."""
    by_part, out = _fused_by_part(cfg), []
    for t in targets:
        name = by_part[t].module_name if t in by_part else HF_MODULE[t]
        if name not in out:
            out.append(name)
    return out


def target_regex(cfg: ModelConfig, lora: LoraConfig) -> str:
    """PEFT's target_modules as one regex, which peft matches whole against each module path: the
    targets' modules in layers first_layer..L-1, and the head. Written for an upper-layer adapter
    that also adapts the head, where layers_to_transform would drop the head (it has no layer
    index); peft ignores layers_to_transform when target_modules is a string."""
    by_part = _fused_by_part(cfg)
    layers = "|".join(str(i) for i in range(lora.first_layer, cfg.num_layers))
    templates: list[str] = []
    for t in lora.targets:
        template = by_part[t].hf_module if t in by_part else LORA_TENSORS[t].hf_module
        if template not in templates:
            templates.append(template)
    return "|".join(re.escape(t).replace(re.escape("{i}"), f"(?:{layers})") for t in templates)


def _needs_regex(lora: LoraConfig) -> bool:
    return bool(lora.first_layer) and "lm_head" in lora.targets


# ---------------------------------------------------------------- tree <-> PEFT tensors

def _pure(lora_state) -> dict:
    return nnx.to_pure_dict(lora_state) if isinstance(lora_state, nnx.State) else lora_state


def _to_host(x) -> np.ndarray:
    """A full float32 numpy copy. Arrays spread over several hosts are all-gathered first, which
    is a collective: every process must make the same calls."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x), dtype=np.float32)


def head_lora(pure: dict) -> tuple[Any, Any]:
    """(A (D, r), B (r, V)) of the LM-head adapter, tied (`lm_head_lora_a`) or untied layout."""
    if "lm_head_lora_a" in pure:
        return pure["lm_head_lora_a"], pure["lm_head_lora_b"]
    head = pure.get("lm_head") or {}
    if "lora_a" not in head:
        raise ValueError("LoRA state has no lm_head adapter although 'lm_head' is a target")
    return head["lora_a"], head["lora_b"]


def layer_lora(pure: dict, target: str) -> tuple[Any, Any]:
    """(A (L, in, r), B (L, r, out)) of a per-layer target."""
    block, name = LAYER_PATH[target]
    node = pure.get("layers", {}).get(block, {}).get(name) or {}
    if "lora_a" not in node:
        raise ValueError(f"LoRA state has no adapter on {target!r} although it is a target; "
                         "was the model built with a different LoraConfig?")
    return node["lora_a"], node["lora_b"]


def lora_to_peft_tensors(lora_state, cfg: ModelConfig, lora: LoraConfig) -> dict[str, np.ndarray]:
    """PEFT tensors (float32, host memory) of our LoRA state (an nnx.State or its pure dict)."""
    pure = _pure(lora_state)
    by_part = _fused_by_part(cfg)
    out: dict[str, np.ndarray] = {}
    for target in lora.targets:
        if target in by_part:
            continue
        if target == "lm_head":
            a, b = (_to_host(x) for x in head_lora(pure))
            a, b = a[None], b[None]
        else:
            a, b = (_to_host(x) for x in layer_lora(pure, target))
        for layer, (module, a_i, b_i) in enumerate(zip(hf_module_paths(cfg, target), a, b, strict=True)):
            if target != "lm_head" and layer < lora.first_layer:
                continue  # frozen layer: not in layers_to_transform
            out[peft_key(module, "A")] = np.ascontiguousarray(a_i.T)
            out[peft_key(module, "B")] = np.ascontiguousarray(b_i.T)
    for fused in fused_of(cfg):
        if any(p in lora.targets for p in fused.parts):
            out.update(_fused_peft_tensors(fused, pure, cfg, lora))
    return out


def _fused_peft_tensors(fused: Fused, pure: dict, cfg: ModelConfig,
                        lora: LoraConfig) -> dict[str, np.ndarray]:
    """One fused module's PEFT tensors per layer: A (parts x r, in) stacked, B (out, parts x r)
    block-diagonal, so that B A applies each part's own update to its rows. A part that is not a
    target gets a zero block."""
    r, sizes, n = lora.rank, fused.sizes(cfg), len(fused.parts)
    d_in = target_dims(cfg, fused.parts[0])[0]
    parts = {p: tuple(_to_host(x) for x in layer_lora(pure, p)) for p in fused.parts
             if p in lora.targets}
    out = {}
    for layer in range(lora.first_layer, cfg.num_layers):
        a = np.zeros((n * r, d_in), np.float32)
        b = np.zeros((sum(sizes), n * r), np.float32)
        row = 0
        for j, (part, size) in enumerate(zip(fused.parts, sizes)):
            if part in parts:
                a[j * r:(j + 1) * r] = parts[part][0][layer].T
                b[row:row + size, j * r:(j + 1) * r] = parts[part][1][layer].T
            row += size
        module = fused.hf_module.format(i=layer)
        out[peft_key(module, "A")], out[peft_key(module, "B")] = a, b
    return out


def _split_fused_lora(a: np.ndarray, b: np.ndarray, fused: Fused, cfg: ModelConfig, r: int,
                      key: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each part's (A (in, r), B (r, out)) of a fused module's PEFT A (r_f, in) and B (out, r_f):
    peft's layout (r_f = r, A shared) or ours (r_f = parts x r, B block-diagonal)."""
    rows = np.split(b, np.cumsum(fused.sizes(cfg))[:-1], axis=0)
    n = len(fused.parts)
    if a.shape[0] == r:
        return [(a.T, part.T) for part in rows]
    if a.shape[0] != n * r:
        raise ValueError(f"{key}: rank {a.shape[0]}, expected r={r} or {n} x r={n * r} "
                         f"({fused.module_name} fuses {', '.join(fused.parts)})")
    out = []
    for j, part in enumerate(rows):
        cols = slice(j * r, (j + 1) * r)
        if np.any(np.delete(part, np.s_[cols], axis=1)):
            raise ValueError(f"{key}: rank {n * r} but not block-diagonal over "
                             f"{', '.join(fused.parts)}, so it is no sum of rank-{r} updates; "
                             "merge it with peft's merge_and_unload and pass the merged model as "
                             "--model")
        out.append((a[cols].T, part[:, cols].T))
    return out


def peft_tensors_to_lora(tensors: dict[str, Any], cfg: ModelConfig, lora: LoraConfig, *,
                         source: str = "adapter") -> dict:
    """Our LoRA tree (the `nnx.to_pure_dict` layout, float32) from PEFT tensors, every key and
    shape checked against the model config."""
    remaining = {k: v for k, v in tensors.items()
                 # peft saves a copy of the base head/embedding when they are targeted; the base
                 # model supplies it, and a resized vocabulary already fails lora_B's shape check.
                 if not re.fullmatch(r".*(lm_head|embed_tokens)\.base_layer\.weight", k)}

    def take(module: str, matrix: str, shape: tuple[int, int]) -> np.ndarray:
        key = peft_key(module, matrix)
        if key not in remaining:
            raise ValueError(f"{source}: missing tensor {key!r} (target_modules lists "
                             f"{module.split('.')[-1]!r})")
        array = np.asarray(remaining.pop(key), dtype=np.float32)
        if array.shape != shape:
            raise ValueError(f"{source}: tensor {key!r} has shape {array.shape}, expected {shape} "
                             f"(r={lora.rank} and the base model's dimensions)")
        return array.T

    pure: dict = {}
    r = lora.rank
    by_part = _fused_by_part(cfg)
    split: dict[tuple[str, int], dict[str, tuple]] = {}  # (fused module, layer) -> part -> (A, B)

    def fused_pair(target: str, layer: int) -> tuple[np.ndarray, np.ndarray]:
        fused = by_part[target]
        if (fused.hf_module, layer) not in split:
            module = fused.hf_module.format(i=layer)
            d_in, d_out = target_dims(cfg, fused.parts[0])[0], sum(fused.sizes(cfg))
            key = peft_key(module, "A")
            rank = np.shape(remaining.get(key, np.zeros((r, 0))))[0]
            a, b = take(module, "A", (rank, d_in)).T, take(module, "B", (d_out, rank)).T
            split[(fused.hf_module, layer)] = dict(zip(
                fused.parts, _split_fused_lora(a, b, fused, cfg, r, f"{source}: {module}")))
        return split[(fused.hf_module, layer)][target]

    for target in lora.targets:
        d_in, d_out = target_dims(cfg, target)
        frozen = (np.zeros((d_in, r), np.float32), np.zeros((r, d_out), np.float32))
        pairs = [frozen if target != "lm_head" and layer < lora.first_layer
                 else fused_pair(target, layer) if target in by_part
                 else (take(m, "A", (r, d_in)), take(m, "B", (d_out, r)))
                 for layer, m in enumerate(hf_module_paths(cfg, target))]
        a = np.stack([p[0] for p in pairs])
        b = np.stack([p[1] for p in pairs])
        if target == "lm_head":
            if cfg.tie_word_embeddings:
                pure["lm_head_lora_a"], pure["lm_head_lora_b"] = a[0], b[0]
            else:
                pure["lm_head"] = {"lora_a": a[0], "lora_b": b[0]}
        else:
            block, name = LAYER_PATH[target]
            pure.setdefault("layers", {}).setdefault(block, {})[name] = {"lora_a": a, "lora_b": b}
    if remaining:
        extra = sorted(remaining)
        raise ValueError(f"{source}: unexpected tensor(s) {extra[:3]}{'...' if len(extra) > 3 else ''}"
                         f" for targets {list(lora.targets)} of a {cfg.num_layers}-layer model")
    return pure


# ---------------------------------------------------------------- adapter_config.json

def peft_config_dict(lora: LoraConfig, base_model: str, cfg: ModelConfig) -> dict:
    num_layers = cfg.num_layers
    # Fused modules carry parts x r (see the module docstring); the scale stays alpha / r.
    fused = [f for f in fused_of(cfg) if any(p in lora.targets for p in f.parts)]
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lora.rank,
        "lora_alpha": lora.alpha,  # PEFT's scale alpha / r equals ours; hence no rslora
        "use_rslora": False,
        "use_dora": False,
        "target_modules": (target_regex(cfg, lora) if _needs_regex(lora)
                           else target_modules(cfg, lora.targets)),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "layers_to_transform": (list(range(lora.first_layer, num_layers))
                                if lora.first_layer and not _needs_regex(lora) else None),
        "layers_pattern": None,
        "rank_pattern": {f.module_name: len(f.parts) * lora.rank for f in fused},
        "alpha_pattern": {f.module_name: len(f.parts) * lora.alpha for f in fused},
        "init_lora_weights": True,
        "inference_mode": True,
    }


def _is_unset(value, default) -> bool:
    return value is None or value is False or value == default or value in ({}, [], "")


def _modules(cfg: ModelConfig) -> list[tuple[str, tuple[str, ...], list[str]]]:
    """(PEFT module name, our targets it adapts, its module paths) of every module pdistill can
    adapt on `cfg`'s family: one per target, or one per fused group (`names.FUSED`)."""
    by_part = _fused_by_part(cfg)
    out = [(HF_MODULE[t], (t,), hf_module_paths(cfg, t)) for t in LORA_TARGETS if t not in by_part]
    out += [(f.module_name, f.parts, [f.hf_module.format(i=i) for i in range(cfg.num_layers)])
            for f in fused_of(cfg)]
    return out


def _targets_from_config(target_modules, cfg: ModelConfig, source: str
                         ) -> tuple[tuple[str, ...], int | None]:
    """(our targets, first layer) of PEFT's target_modules; the first layer only when a regex
    decides it (peft then ignores layers_to_transform), else None."""
    modules = _modules(cfg)
    supported = ", ".join(name for name, _, _ in modules)
    if isinstance(target_modules, str):
        if target_modules == "all-linear":  # peft's shorthand: every linear layer but the head
            return tuple(t for t in LORA_TARGETS if t != "lm_head"), None
        found, firsts = [], set()
        for name, targets, paths in modules:  # peft matches a string as a regex on module paths
            hits = [i for i, p in enumerate(paths) if re.fullmatch(target_modules, p)]
            if not hits:
                continue
            if len(paths) > 1:  # a per-layer module: the regex must pick a top range of layers
                if hits != list(range(hits[0], cfg.num_layers)):
                    raise ValueError(
                        f"{source}: target_modules={target_modules!r} matches {name} in layers "
                        f"{hits}; pdistill adapts a top range of layers (k, ..., "
                        f"{cfg.num_layers - 1}) alike")
                firsts.add(hits[0])
            found += targets
        if not found:
            raise ValueError(f"{source}: target_modules={target_modules!r} matches none of "
                             f"{supported}")
        if len(firsts) > 1:
            raise ValueError(f"{source}: target_modules={target_modules!r} starts its modules at "
                             f"different layers ({sorted(firsts)}); pdistill adapts the same top "
                             "range of layers in every target")
        return tuple(t for t in LORA_TARGETS if t in found), min(firsts, default=0)
    if not target_modules:
        raise ValueError(f"{source}: target_modules is empty")
    by_name = {name: targets for name, targets, _ in modules}
    names = set()
    for entry in target_modules:
        name = str(entry).split(".")[-1]
        if name not in by_name:
            raise ValueError(f"{source}: target_modules entry {entry!r} is not supported; "
                             f"pdistill adapts {supported}")
        names.update(by_name[name])
    return tuple(t for t in LORA_TARGETS if t in names), None


def lora_config_from_peft(conf: dict, cfg: ModelConfig,
                          source: str = ADAPTER_CONFIG_FILE) -> LoraConfig:
    """Our LoraConfig from a PEFT adapter_config.json dict; PEFT features we cannot reproduce
    are rejected by field name rather than silently dropped."""
    if conf.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{source}: peft_type={conf.get('peft_type')!r}; "
                         "only LORA adapters are supported")
    if "r" not in conf or "target_modules" not in conf:
        raise ValueError(f"{source}: missing field {'r' if 'r' not in conf else 'target_modules'!r}")
    rank = int(conf["r"])
    alpha = float(conf.get("lora_alpha", 8))  # peft's default lora_alpha
    targets, regex_first = _targets_from_config(conf["target_modules"], cfg, source)
    # The rank/alpha patterns of fused modules as `peft_config_dict` writes them are plain LoRA.
    ours = peft_config_dict(LoraConfig(rank=rank, alpha=alpha, targets=targets), "", cfg)
    for field, default in _UNSUPPORTED_FIELDS.items():
        if field in conf and not _is_unset(conf[field], default) and \
                not (field in ("rank_pattern", "alpha_pattern") and conf[field] == ours[field]):
            raise ValueError(f"{source}: {field}={conf[field]!r} is not supported (plain LoRA only); "
                             "use an adapter without it, or merge it with peft's merge_and_unload "
                             "and pass the merged model as --model")
    first = regex_first if regex_first is not None else \
        _first_layer(conf.get("layers_to_transform"), cfg, source)
    return LoraConfig(rank=rank, alpha=alpha, targets=targets, first_layer=first)


def _first_layer(layers, cfg: ModelConfig, source: str) -> int:
    """LoraConfig.first_layer of PEFT's layers_to_transform: unset, or the top layers k..L-1."""
    if layers is None or layers == []:
        return 0
    layers = [layers] if isinstance(layers, int) else list(layers)
    first = min(layers)
    if sorted(layers) != list(range(first, cfg.num_layers)):
        raise ValueError(f"{source}: layers_to_transform={layers!r} is not supported; pdistill "
                         f"adapts a top range of layers (k, k+1, ..., {cfg.num_layers - 1}) or all")
    return first


# ---------------------------------------------------------------- folders

def resolve_adapter(path, flag: str = "--adapter") -> Path:
    """A PEFT adapter folder, or a training run folder holding one in `adapter/`."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{flag} {path}: does not exist")
    if p.is_file():
        hint = p.parent if (p.parent / ADAPTER_CONFIG_FILE).is_file() else \
            "a PEFT adapter folder or a training run folder"
        raise ValueError(f"{flag} {path} is a file; pass the folder that holds "
                         f"{ADAPTER_CONFIG_FILE} ({hint})")
    if (p / ADAPTER_CONFIG_FILE).is_file():
        return p
    if (p / "adapter" / ADAPTER_CONFIG_FILE).is_file():
        return p / "adapter"
    raise FileNotFoundError(
        f"{flag} {path}: neither a PEFT adapter folder (no {ADAPTER_CONFIG_FILE}) nor a training "
        f"run folder (no adapter/{ADAPTER_CONFIG_FILE}); pass a run whose training has finished, "
        "or a folder written by peft's save_pretrained or `pdistill export --format peft`")


def read_adapter_config(folder: Path) -> dict:
    path = folder / ADAPTER_CONFIG_FILE
    try:
        conf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON: {e.msg} (line {e.lineno})") from None
    if not isinstance(conf, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return conf


def _read_tensors(folder: Path) -> dict[str, np.ndarray]:
    path = folder / ADAPTER_WEIGHTS_FILE
    if not path.exists():
        if (folder / "adapter_model.bin").exists():
            raise ValueError(f"{folder}: adapter_model.bin (a pickle) is not supported; re-save the "
                             "adapter with peft's save_pretrained(safe_serialization=True)")
        raise FileNotFoundError(f"{folder}: no {ADAPTER_WEIGHTS_FILE}")
    return dict(read_safetensors(path))


def load_peft_adapter(path, cfg: ModelConfig) -> tuple[LoraConfig, dict]:
    """(LoraConfig, LoRA pure dict) of a PEFT folder or training run, checked against `cfg`."""
    folder = resolve_adapter(path)
    lora = lora_config_from_peft(read_adapter_config(folder), cfg,
                                 str(folder / ADAPTER_CONFIG_FILE))
    pure = peft_tensors_to_lora(_read_tensors(folder), cfg, lora,
                                source=str(folder / ADAPTER_WEIGHTS_FILE))
    return lora, pure


def looks_like_adapter(folder: Path) -> bool:
    return (folder / ADAPTER_CONFIG_FILE).exists()


def _base_model_name(base_model) -> str:
    """Registered names stay names; paths become absolute so the folder can be used from anywhere."""
    text = str(base_model)
    if text in REGISTRY or not Path(text).expanduser().exists():
        return text
    return str(Path(text).expanduser().resolve())


def save_peft_adapter(out_dir, lora_state, cfg: ModelConfig, lora: LoraConfig,
                      base_model: str) -> Path:
    """Writes `out_dir` as a PEFT LoRA folder loadable by `PeftModel.from_pretrained` and vLLM.

    Multi-host: every process must call this (sharded leaves are all-gathered); only process 0
    writes, and all processes return once the folder is in place.
    """
    from safetensors.numpy import save_file

    tensors = lora_to_peft_tensors(lora_state, cfg, lora)
    out = Path(out_dir)
    if jax.process_index() == 0:
        if lora.rank > VLLM_MAX_LORA_RANK:
            _log.warning(f"LoRA rank {lora.rank} is above vLLM's limit of {VLLM_MAX_LORA_RANK}: "
                         "peft loads this adapter but vLLM will not; export with --format merged "
                         "to serve it with vLLM")
        if "lm_head" in lora.targets:
            _log.info("note: many vLLM and SGLang versions do not serve a LoRA on lm_head; if "
                      "yours refuses this adapter, export with --format merged")
        if any(p in lora.targets for f in fused_of(cfg) for p in f.parts):
            _log.info(f"note: {cfg.model_type} fuses projections, so this adapter has a "
                      "rank_pattern (peft loads it; servers may not); to serve it, export with "
                      "--format merged")
        config = peft_config_dict(lora, _base_model_name(base_model), cfg)

        def fill(tmp: Path) -> None:
            save_file(tensors, str(tmp / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
            (tmp / ADAPTER_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")

        write_dir_atomic(out, fill, looks_like_adapter)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"pdistill save_peft_adapter {out}")
    return out


# ---------------------------------------------------------------- the base an adapter names

def adapter_base_model(adapter_path) -> str:
    """The base model an adapter names (`base_model_name_or_path`), for a missing --model."""
    folder = resolve_adapter(adapter_path)
    base = read_adapter_config(folder).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{folder / ADAPTER_CONFIG_FILE}: no base_model_name_or_path; "
                         "pass --model")
    return str(base)

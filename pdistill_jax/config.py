"""Typed configuration: the model architecture, the LoRA adapter, and YAML loading.

Every knob of a run lives in one of these dataclasses; a run folder stores the resolved
config next to its results (big_vision style), so a result can always be reproduced.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, TypeVar

import yaml

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down", "lm_head")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder-only transformer covering the Llama family (Llama 2/3, Mistral, SmolLM2) and Qwen2."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3" | "linear", ...} as in HF
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v biases (Qwen2)
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> "ModelConfig":
        """Builds from a Hugging Face `config.json` dict (transformers v4 and v5 layouts)."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"{source}: model_type={model_type!r} is not supported; "
                f"use one of {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                      "num_attention_heads"):
            if field not in hf:
                raise ValueError(f"{source}: missing field {field!r}")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: hidden_act={hf['hidden_act']!r} is not supported; only 'silu'")
        # transformers v5 moved rope_theta/rope_scaling into one `rope_parameters` dict.
        rope = dict(hf.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", None) or hf.get("rope_theta", 10000.0)
        scaling = rope or hf.get("rope_scaling") or None
        if scaling is not None:
            scaling = dict(scaling)
            kind = scaling.get("rope_type", scaling.get("type", "default"))
            if kind not in ("default", "llama3", "linear"):
                raise ValueError(
                    f"{source}: rope scaling rope_type={kind!r} is not supported; "
                    "use default, linear or llama3"
                )
            scaling = None if kind == "default" else {**scaling, "rope_type": kind}
        heads = hf["num_attention_heads"]
        return cls(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rope_theta=float(theta),
            rope_scaling=scaling,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", model_type == "qwen2")),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
        )

    def to_hf(self) -> dict:
        """The Hugging Face `config.json` this architecture corresponds to (for merged export)."""
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM"}[self.model_type]
        rope = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if self.rope_scaling:
            rope.update(self.rope_scaling)
        out = {
            "architectures": [arch],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        }
        if self.rope_scaling:
            out["rope_scaling"] = dict(self.rope_scaling)
        if self.model_type == "llama":
            out["attention_bias"] = self.attention_bias
            out["mlp_bias"] = False
        return out


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """A LoRA adapter: W x + (alpha / rank) * B A x on each target projection (PEFT's convention)."""

    rank: int = 64
    alpha: float = 128.0
    targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        if bad:
            raise ValueError(f"unknown LoRA target(s) {bad}; choose from {', '.join(LORA_TARGETS)}")
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


T = TypeVar("T")


def from_dict(cls: type[T], data: dict[str, Any], source: str = "config") -> T:
    """Builds a (possibly nested) dataclass from a dict, rejecting unknown keys by name."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {unknown} for {cls.__name__}; "
                         f"valid keys: {sorted(fields)}")
    kwargs = {}
    hints = _resolved_hints(cls)
    for name, value in data.items():
        hint = hints.get(name)
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = from_dict(hint, value, f"{source}.{name}")
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def _resolved_hints(cls) -> dict:
    import typing

    try:
        return typing.get_type_hints(cls)
    except Exception:  # forward refs we cannot resolve: nested parsing is then skipped
        return {}


def load_yaml(cls: type[T], path: str | Path) -> T:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: top level must be a mapping of keys to values")
    return from_dict(cls, data, str(path))


def to_dict(cfg) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=list))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One prompt-distillation (or SFT) training run. Defaults are those measured to work on the
    embedded SmolLM2-135M (see docs/results.md); the paper's 8B recipe is in docs/design.md."""

    objective: str = "kl"  # kl (forward KL teacher||student) | reverse_kl | jsd | ce (SFT baseline)
    tau: float = 2.0  # distillation temperature, applied to teacher and student alike
    jsd_beta: float = 0.5
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    lr: float = 1e-3
    warmup_ratio: float = 0.1  # linear warm-up over this fraction of steps, then linear decay to 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    epochs: int = 10
    batch_size: int = 8
    grad_accum: int = 1
    max_seq_len: int = 1024  # teacher sequences longer than this are truncated (document side) or skipped
    system: str | None = None  # system message; None = the chat template's default
    seed: int = 0
    compute_dtype: str = "float32"  # float32 | bfloat16 (LoRA and optimizer state stay float32)
    remat: bool = False
    mesh: tuple[int, int, int] = (-1, 1, 1)  # (data, fsdp, tensor); -1 = all remaining devices
    save_every: int = 200  # steps between Orbax checkpoints (and one at the end)
    keep_checkpoints: int = 2
    log_every: int = 10
    # Host memory (GiB) the frozen teacher's hidden states at the answer positions may take to be
    # computed once per run instead of in every step (teacher_cache.py); 0 = never cache.
    teacher_cache_gb: float = 4.0

    def __post_init__(self):
        if self.objective not in ("kl", "reverse_kl", "jsd", "ce"):
            raise ValueError(f"objective={self.objective!r}; choose kl, reverse_kl, jsd or ce")
        if self.compute_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"compute_dtype={self.compute_dtype!r}; choose float32 or bfloat16")
        if isinstance(self.lora, dict):
            object.__setattr__(self, "lora", from_dict(LoraConfig, self.lora, "lora"))
        object.__setattr__(self, "mesh", tuple(self.mesh))

"""Typed configuration: every dataclass a user sets, and all of their validation.

`ModelConfig` (the architecture), `LoraConfig` (the adapter), `TrainConfig` (one training run),
`SamplingParams` (one sampler call), `AnswerConfig` (putting test questions to a model),
`GenerateConfig` (`pdistill generate`), `RunConfig` (`pdistill run`: all of the above for one
experiment) and `StudyConfig` / `VariantConfig` / `RowsConfig` (a study of training variants,
`scripts/study_injection.py`). Every knob of a run lives in one of them; a run folder stores the resolved config
next to its results (big_vision style), so a result can always be reproduced.

Each dataclass checks its own fields in `__post_init__` (so library callers get the same checks
as the command line): values are coerced to the annotated type (`coerce_fields`: a YAML `3e-3` is
a string, an int is a valid float) and ranges are checked (`check_range`), raising `FieldError`,
one line naming the field, the valid range and the bad value. `from_dict` adds the file and line
a value was read from (`read_yaml` records every key's line).

The system message (`system`, None = the chat template's default) is resolved by these rules:
- `pdistill run`: `RunConfig.system`, set once at the top level, is every stage's (questions,
  teacher answers, both trainings, answering); a stage's own `system` is refused.
- `pdistill generate`: `GenerateConfig.system` (--system), for the question and answer prompts.
- `pdistill train`: --system, else the resumed run's, else the one --data was generated under.
- `pdistill answer`: --system, else the one the --adapter run was trained with.
- `pdistill export`: the adapter keeps the one it was trained with (the export notes it).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3_text")
HIDDEN_ACTS = ("silu", "gelu_tanh")  # the MLP gate's activation; gelu_tanh = GELU, tanh approximation
LAYER_TYPES = ("sliding_attention", "full_attention")
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down", "lm_head")


# ---------------------------------------------------------------- checking fields

class FieldError(ValueError):
    """A field's value is invalid. The message starts with the field's name, so a caller that
    knows where the value came from can prefix its file, line and enclosing key."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def _fail(name: str, valid: str, value: Any) -> FieldError:
    return FieldError(name, f"{name} must be {valid}, got {value!r}")


def check_range(cfg, name: str, low: float | None = None, high: float | None = None, *,
                low_open: bool = False, high_open: bool = False, finite: bool = True,
                high_name: str | None = None) -> None:
    """Refuses cfg.<name> outside [low, high] (open ends with low_open/high_open); floats must
    also be finite unless finite=False (e.g. a memory limit of inf = no limit). high_name: the
    field the upper bound comes from, for the message."""
    value = getattr(cfg, name)
    top = None if high is None else f"{high_name}={high:g}" if high_name else f"{high:g}"
    if low is not None and high is not None:
        valid = f"in {'(' if low_open else '['}{low:g}, {top}{')' if high_open else ']'}"
    else:
        valid = f"{'>' if low_open else '>='} {low:g}" if low is not None else \
            f"{'<' if high_open else '<='} {top}"
    ok = (low is None or (value > low if low_open else value >= low)) and \
        (high is None or (value < high if high_open else value <= high))
    if finite and isinstance(value, float) and not math.isfinite(value):
        ok, valid = False, f"a finite number {valid}"
    if not ok:
        raise _fail(name, valid, value)


_OMIT_AT_DEFAULT = "omit_at_default"


def added_option(default: Any) -> Any:
    """A field added after its dataclass's records were first written (generate's run.json and
    manifest.json, `pdistill run`'s stage fingerprints and saved configs). `to_dict` leaves it out
    while it holds its default, so a default config still writes the bytes it wrote before and a
    folder started before the field existed still resumes; any other value is recorded, so it
    redoes a stage or refuses a resume like every other setting."""
    return dataclasses.field(default=default, metadata={_OMIT_AT_DEFAULT: True})


def check_choice(cfg, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(cfg, name)
    if value not in choices:
        raise _fail(name, f"one of {', '.join(choices)}", value)


class _Mismatch(Exception):
    def __init__(self, expected: str):
        self.expected = expected


def _describe(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        parts = [_describe(a) for a in args if a is not type(None)]
        return " or ".join(parts + (["null"] if type(None) in args else []))
    if origin is tuple or origin is list:
        if len(args) == 2 and args[1] is Ellipsis or origin is list:
            return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
        return f"a list of {len(args)} {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            dict: "a mapping"}.get(hint, "a mapping" if dataclasses.is_dataclass(hint) else
                                   getattr(hint, "__name__", str(hint)))


def _coerce(value: Any, hint, name: str) -> Any:
    """value as the type `hint` (raising _Mismatch): numbers written as strings are parsed, ints
    become floats, lists become tuples; bools are only true/false and ints never take 2.5."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, name)
            except _Mismatch:
                continue
        raise _Mismatch(_describe(hint))
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        number = _number(value)
        if number is not None and float(number).is_integer() and math.isfinite(number):
            return int(number)
    elif hint is float:
        number = _number(value)
        if number is not None:
            return float(number)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin in (tuple, list):
        if isinstance(value, (list, tuple)):
            if origin is list:
                return [_coerce(v, args[0], name) for v in value]
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_coerce(v, args[0], name) for v in value)
            if len(value) == len(args):
                return tuple(_coerce(v, a, name) for v, a in zip(value, args))
    elif hint is dict or origin is dict:
        if isinstance(value, dict):
            return value
    elif dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if isinstance(value, dict):
            return from_dict(hint, value, prefix=f"{name}.")
    else:  # Any, or a type we do not check
        return value
    raise _Mismatch(_describe(hint))


def _number(value: Any) -> float | int | None:
    """An int or float from a number or a string that spells one (YAML reads `3e-3` as text)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, str):
        for parse in (int, float):
            try:
                return parse(value.strip())
            except ValueError:
                continue
    return None


@functools.cache
def _field_hints(cls) -> dict:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - forward refs we cannot resolve: those fields go unchecked
        return {}


def coerce_fields(cfg) -> None:
    """Coerces every field of the (frozen) dataclass `cfg` to its annotated type, in place."""
    hints = _field_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        if f.name not in hints:
            continue
        value = getattr(cfg, f.name)
        try:
            object.__setattr__(cfg, f.name, _coerce(value, hints[f.name], f.name))
        except _Mismatch as e:
            raise _fail(f.name, e.expected, value) from None


# ---------------------------------------------------------------- the model and the adapter

@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder-only transformer covering the Llama family (Llama 2/3/3.2, Mistral, SmolLM2),
    Qwen2, Qwen3, Phi-3 (whose fused qkv and gate_up weights are split at load,
    `weights.names.FUSED`) and Gemma 3 (text: the fields from `hidden_act` on)."""

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
    qk_norm: bool = False  # RMSNorm over each query and key head before RoPE (Qwen3)
    max_position_embeddings: int = 4096
    # Every layer attends to the last `sliding_window` slots only (Mistral, Phi-3); None = all.
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    # Gemma 3; the defaults are every other family's model.
    hidden_act: str = "silu"
    scale_embeddings: bool = False  # embeddings times sqrt(hidden_size), in the compute dtype
    norm_plus_one: bool = False  # RMSNorm scales by (1 + weight), in float32
    sandwich_norms: bool = False  # RMSNorms on the attention and MLP outputs too, before the residual
    query_pre_attn_scalar: float | None = None  # scores are q.k / sqrt(this); None = head_dim
    # One LAYER_TYPES entry per layer: sliding layers see `sliding_window` slots with RoPE base
    # `rope_local_theta` (no scaling); full layers see everything with rope_theta/rope_scaling.
    # None = every layer alike (the window, if any, on all of them).
    layer_types: tuple[str, ...] | None = None
    rope_local_theta: float | None = None

    def __post_init__(self):
        # Values come from a checkpoint's own config (numpy ints from GGUF included): checked,
        # not coerced.
        check_choice(self, "model_type", SUPPORTED_ARCHITECTURES)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            check_range(self, name, 1)
        if self.sliding_window is not None:
            check_range(self, "sliding_window", 1)
        for name in ("rope_theta", "rms_norm_eps"):
            check_range(self, name, 0, low_open=True)
        if self.num_heads % self.num_kv_heads:
            raise _fail("num_kv_heads", f"a divisor of num_heads={self.num_heads}",
                        self.num_kv_heads)
        check_choice(self, "hidden_act", HIDDEN_ACTS)
        if self.query_pre_attn_scalar is not None:
            check_range(self, "query_pre_attn_scalar", 0, low_open=True)
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_layers or \
                    any(t not in LAYER_TYPES for t in self.layer_types):
                raise _fail("layer_types", f"a list of {self.num_layers} of "
                            f"{', '.join(LAYER_TYPES)} (one per layer)", list(self.layer_types))
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise _fail("sliding_window", "set when layer_types has sliding_attention layers",
                            None)
            if self.rope_local_theta is None:
                raise _fail("rope_local_theta", "set when layer_types is", None)
            check_range(self, "rope_local_theta", 0, low_open=True)

    def __hash__(self) -> int:
        # The model's static config is hashed by jit (graph definitions); rope_scaling is a dict
        # and eos_token_id may be a list, so the generated field-tuple hash would fail on them.
        return hash(json.dumps(dataclasses.asdict(self), sort_keys=True, default=str))

    @property
    def attention_scale(self) -> float:
        """What attention scores are divided by: sqrt(query_pre_attn_scalar or head_dim)."""
        return math.sqrt(self.query_pre_attn_scalar or self.head_dim)

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
        gemma = model_type == "gemma3_text"
        if gemma:
            for field in ("attn_logit_softcapping", "final_logit_softcapping"):
                if hf.get(field) is not None:
                    raise ValueError(f"{source}: {field}={hf[field]} is not supported (no "
                                     "soft-capping here); only null")
            if hf.get("use_bidirectional_attention"):
                raise ValueError(f"{source}: use_bidirectional_attention=true is not supported "
                                 "(a causal decoder only); set it to false")
            act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
            if act != "gelu_pytorch_tanh":
                raise ValueError(f"{source}: hidden_activation={act!r} is not supported; only "
                                 "'gelu_pytorch_tanh'")
        elif hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: hidden_act={hf['hidden_act']!r} is not supported; only 'silu'")
        if hf.get("use_sliding_window"):
            raise ValueError(f"{source}: use_sliding_window=true is not supported (every layer "
                             "here attends to the whole sequence); set it to false")
        # transformers v5 moved rope_theta/rope_scaling into one `rope_parameters` dict (Gemma 3:
        # one per layer type; v4 had rope_local_base_freq for its sliding layers).
        rope = dict(hf.get("rope_parameters") or {})
        local_theta = None
        if gemma:
            local = dict(rope.pop("sliding_attention", None) or {})
            rope = dict(rope.pop("full_attention", None) or rope)
            local_theta = local.pop("rope_theta", None) or hf.get("rope_local_base_freq", 10000.0)
            if local.get("rope_type", "default") != "default":
                raise ValueError(f"{source}: rope_parameters.sliding_attention.rope_type="
                                 f"{local['rope_type']!r} is not supported; only default")
        theta = rope.pop("rope_theta", None) or hf.get("rope_theta") or \
            (1_000_000.0 if gemma else 10000.0)
        partial = rope.pop("partial_rotary_factor", None) or hf.get("partial_rotary_factor", 1.0)
        if partial != 1.0:
            raise ValueError(f"{source}: partial_rotary_factor={partial} is not supported (RoPE "
                             "here rotates the whole head); only 1.0")
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
        gemma_fields = {}
        if gemma:
            layer_types = hf.get("layer_types")
            if layer_types is None:  # older configs: every `sliding_window_pattern`-th layer is full
                pattern = int(hf.get("sliding_window_pattern", 6))
                layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention"
                               for i in range(int(hf["num_hidden_layers"]))]
            gemma_fields = dict(
                hidden_act="gelu_tanh", scale_embeddings=True, norm_plus_one=True,
                sandwich_norms=True, query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)),
                layer_types=tuple(layer_types), rope_local_theta=float(local_theta))
        heads = hf["num_attention_heads"]
        try:
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
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
                attention_bias=bool(hf.get("attention_bias", model_type == "qwen2")),
                qk_norm=model_type in ("qwen3", "gemma3_text"),
                max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
                # Qwen2/3 carry a sliding_window that only use_sliding_window (refused) enables.
                sliding_window=(hf.get("sliding_window", 4096 if gemma else None)
                                if model_type in ("mistral", "phi3", "gemma3_text") else None),
                bos_token_id=hf.get("bos_token_id"),
                eos_token_id=hf.get("eos_token_id"),
                **gemma_fields,
            )
        except FieldError as e:
            raise ValueError(f"{source}: {e}") from None

    def to_hf(self) -> dict:
        """The Hugging Face `config.json` this architecture corresponds to (for merged export)."""
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                "phi3": "Phi3ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}[self.model_type]
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
        if self.model_type in ("mistral", "phi3"):
            out["sliding_window"] = self.sliding_window
        if self.model_type in ("llama", "qwen3"):
            out["attention_bias"] = self.attention_bias
            out["mlp_bias"] = False
        if self.model_type == "gemma3_text":
            del out["hidden_act"], out["rope_theta"]
            out.pop("rope_scaling", None)
            out.update(
                hidden_activation="gelu_pytorch_tanh", attention_bias=self.attention_bias,
                sliding_window=self.sliding_window, layer_types=list(self.layer_types),
                # transformers' strict config takes an int here, as Gemma 3 configs write it
                query_pre_attn_scalar=(int(self.query_pre_attn_scalar)
                                       if float(self.query_pre_attn_scalar).is_integer()
                                       else self.query_pre_attn_scalar),
                rope_parameters={"full_attention": rope, "sliding_attention": {
                    "rope_type": "default", "rope_theta": self.rope_local_theta}},
                attn_logit_softcapping=None, final_logit_softcapping=None)
        return out


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """A LoRA adapter: W x + (alpha / rank) * B A x on each target projection (PEFT's convention)."""

    rank: int = 64
    # None = 2 x rank (the paper's and PEFT users' convention: the update's scale alpha / rank
    # stays 2 whatever the rank), resolved here so that saved configs show the number.
    alpha: float | None = None
    targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
    # The adapter sits on layers first_layer .. num_layers - 1 only (0 = every layer). The layers
    # below run frozen, so the backward pass stops at first_layer: cheaper steps (PEFT's
    # layers_to_transform on export; a target_modules regex when the head is a target too).
    first_layer: int = added_option(0)

    def __post_init__(self):
        coerce_fields(self)
        check_range(self, "rank", 1)
        check_range(self, "first_layer", 0)
        if self.alpha is None:
            object.__setattr__(self, "alpha", 2.0 * self.rank)
        check_range(self, "alpha", 0, low_open=True)
        if not self.targets or any(t not in LORA_TARGETS for t in self.targets):
            raise _fail("targets", f"a non-empty list of {', '.join(LORA_TARGETS)}",
                        list(self.targets))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


# ---------------------------------------------------------------- training

OBJECTIVES = ("kl", "reverse_kl", "jsd", "ce")
# auto: bfloat16 on a GPU or TPU, float32 on CPU (`model.transformer.resolve_dtype`, resolved
# when a command starts, so saved configs and stage records name the dtype that was used).
COMPUTE_DTYPES = ("auto", "float32", "bfloat16")
DECODE_DTYPES = COMPUTE_DTYPES


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
    # The learning rate of every LoRA B matrix (the zero-initialised one) is lr times this; the A
    # matrices keep lr. LoRA+ (Hayou, Ghosh & Yu, 2024) sets it near 16: the adapter then learns
    # in fewer steps. 1 = one rate for both, as PEFT trains.
    lora_b_lr_ratio: float = added_option(1.0)
    max_grad_norm: float = 1.0
    epochs: int = 10
    batch_size: int = 8
    grad_accum: int = 1
    max_seq_len: int = 1024  # teacher sequences longer than this are truncated (document side) or skipped
    system: str | None = None  # system message; None = the chat template's default
    seed: int = 0
    # auto | float32 | bfloat16 (LoRA, optimizer state and the losses stay float32). auto:
    # bfloat16 on a GPU or TPU, whose matrix units run it at several times float32's rate and
    # where it halves the bytes a step reads; float32 on CPU, as before auto existed.
    compute_dtype: str = "auto"
    remat: bool = False
    mesh: tuple[int, int, int] = (-1, 1, 1)  # (data, fsdp, tensor); -1 = all remaining devices
    save_every: int = 200  # steps between Orbax checkpoints (and one at the end)
    keep_checkpoints: int = 2
    log_every: int = 10
    # Host memory (GiB) the frozen teacher's hidden states at the answer positions may take to be
    # computed once per run instead of in every step (teacher_cache.py); 0 = never cache.
    teacher_cache_gb: float = 4.0
    # Weight of the student's cross-entropy on the answer tokens the batches carry, added to a
    # distillation objective (kl, reverse_kl, jsd): loss = distillation + ce_weight * CE; 0 = off.
    ce_weight: float = added_option(0.0)
    # Weight of a hidden-state term added to a distillation objective: the student's final-norm
    # hidden states at the answer positions pulled towards the teacher's, ||h_S - h_T||_1 /
    # ||h_T||_1 per token (deep context distillation's term, on the last layer, whose teacher
    # states the run already holds); 0 = off.
    hidden_weight: float = added_option(0.0)
    # Context boost (context-aware decoding's contrast, as a distillation target): the teacher's
    # logits become (1 + context_boost) x the teacher's - context_boost x the base model's on the
    # student's own prompt (the question alone, adapter off), so the target leans further
    # towards what the document changes. The LM head is linear, so the run mixes the two final
    # hidden states once per row (train/context_boost.py); 0 = the teacher as it is.
    context_boost: float = added_option(0.0)
    # Weight of the retention regulariser: forward KL(base || student) on the base model's own
    # greedy answers to general prompts, added to the loss (train/retention.py); 0 = off.
    retention_weight: float = added_option(0.0)
    # The general prompts: a JSONL of {"question"} rows (builtin:general_prompts.jsonl ships 99
    # everyday instructions); keep them apart from the questions retention is measured on
    # (builtin:demo/general_knowledge.jsonl), or the measurement counts what was trained.
    retention_prompts: str | None = added_option(None)
    retention_batch_size: int = added_option(8)  # retention prompts per micro-batch
    # Share of the rows trained a second time with the document in the student's prompt too (the
    # teacher's prompt): the adapter learns to defer to a document in context, for PD + RAG
    # (train/batches.py, open_book_twins). Each twin costs a document's length in student tokens.
    open_book_share: float = added_option(0.0)
    # Share of each document's generated questions held out of training as a dev set (a question
    # with its rewrites and further answers; restatements and recitations always train). The run
    # measures the objective on it (train/dev_set.py) and writes the adapter of its lowest dev loss.
    dev_share: float = added_option(0.0)
    eval_every: int = added_option(0)  # steps between dev measurements; 0 = at each epoch's end
    # Stop after this many dev measurements in a row without a new lowest dev loss; 0 = never.
    early_stop_patience: int = added_option(0)

    def __post_init__(self):
        coerce_fields(self)  # a `lora` dict becomes a LoraConfig here
        check_choice(self, "objective", OBJECTIVES)
        check_choice(self, "compute_dtype", COMPUTE_DTYPES)
        for name in ("tau", "lr", "max_grad_norm", "lora_b_lr_ratio"):
            check_range(self, name, 0, low_open=True)
        check_range(self, "jsd_beta", 0, 1)
        check_range(self, "warmup_ratio", 0, 1, high_open=True)
        check_range(self, "weight_decay", 0)
        for name in ("epochs", "batch_size", "grad_accum", "max_seq_len", "save_every",
                     "keep_checkpoints", "log_every"):
            check_range(self, name, 1)
        check_range(self, "seed", 0)
        check_range(self, "teacher_cache_gb", 0, finite=False)
        check_range(self, "ce_weight", 0)
        if self.ce_weight and self.objective == "ce":
            raise _fail("ce_weight", "0 with objective ce (the objective is cross-entropy "
                        "already; ce_weight adds it to kl, reverse_kl or jsd)", self.ce_weight)
        check_range(self, "hidden_weight", 0)
        if self.hidden_weight and self.objective == "ce":
            raise _fail("hidden_weight", "0 with objective ce (SFT has no teacher; hidden_weight "
                        "adds a term to kl, reverse_kl or jsd)", self.hidden_weight)
        check_range(self, "context_boost", 0)
        if self.context_boost and self.objective == "ce":
            raise _fail("context_boost", "0 with objective ce (SFT has no teacher to boost; "
                        "context_boost changes the target of kl, reverse_kl or jsd)",
                        self.context_boost)
        check_range(self, "retention_weight", 0)
        check_range(self, "retention_batch_size", 1)
        check_range(self, "open_book_share", 0, 1)
        check_range(self, "dev_share", 0, 0.5)
        check_range(self, "eval_every", 0)
        check_range(self, "early_stop_patience", 0)
        if self.early_stop_patience and not self.dev_share:
            raise _fail("early_stop_patience", "0 without a dev set (set dev_share > 0: early "
                        "stopping watches the dev loss)", self.early_stop_patience)
        if self.retention_weight and not self.retention_prompts:
            raise _fail("retention_prompts", "a JSONL of {\"question\"} rows (or builtin:"
                        "general_prompts.jsonl, 99 everyday instructions) with retention_weight > 0",
                        self.retention_prompts)
        if self.mesh.count(-1) > 1 or any(s == 0 or s < -1 for s in self.mesh):
            raise _fail("mesh", "3 sizes (data, fsdp, tensor), each >= 1 or one of them -1 "
                        "(= the remaining devices)", list(self.mesh))


# ---------------------------------------------------------------- sampling and answering

@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    max_new_tokens: int = 128

    def __post_init__(self):
        coerce_fields(self)
        check_range(self, "temperature", 0)
        check_range(self, "top_k", 0)
        check_range(self, "top_p", 0, 1, low_open=True)
        check_range(self, "max_new_tokens", 1)


CONTEXTS = ("none", "gold", "bm25")
PROMPT_FORMATS = ("chat", "raw")


@dataclasses.dataclass(frozen=True)
class AnswerConfig:
    """How test questions are put to a model (`pdistill answer`, `pdistill run`'s answer stages)."""

    context: str = "none"  # none (closed-book) | gold (the question's doc_id) | bm25 (retrieved)
    top_k: int = 3  # documents BM25 retrieves per question (context bm25)
    prompt_format: str = "chat"  # chat: the model's chat template | raw: plain text (base models)
    system: str | None = None  # system message (chat only); None = the chat template's default
    sampling: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    batch_size: int = 16  # questions answered at once
    seed: int = 0  # of answer sampling (temperature > 0)
    # The dtype the base weights are held and computed in while decoding: auto | float32 |
    # bfloat16 (auto: bfloat16 on a GPU or TPU, float32 on CPU). bfloat16 halves the bytes a
    # decode step reads; products still accumulate in float32, logits are float32 and the LoRA
    # adapter stays float32. The default stays float32 everywhere until bfloat16 is measured
    # faster and its greedy answers counted against float32's (issue 19).
    decode_dtype: str = added_option("float32")

    def __post_init__(self):
        check_choice(self, "context", CONTEXTS)
        check_choice(self, "decode_dtype", DECODE_DTYPES)
        check_choice(self, "prompt_format", PROMPT_FORMATS)
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise _fail("batch_size", "an integer >= 1", self.batch_size)
        if self.context == "bm25" and (not _is_int(self.top_k) or self.top_k < 1):
            raise _fail("top_k", "an integer >= 1 with context bm25 (the documents retrieved per "
                        "question)", self.top_k)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ---------------------------------------------------------------- generation and the pipeline

QUESTION_MODES = ("document", "sentences")


MAX_RESTATEMENTS = 4  # the restatement requests datagen/restatements.py has
MAX_RECITATIONS = 2  # and its recitation requests


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    questions_per_doc: int = 30  # distinct questions wanted per document (chunk)
    max_calls_per_doc: int = 30  # question calls after which a document gives up on its quota
    q_temperature: float = 1.0  # hotter: fewer parseable questions a call
    q_top_k: int = 50
    a_temperature: float = 1.5  # PD answers (the paper: 1.5, top-k 50)
    a_top_k: int = 50
    sft_temperature: float = 0.25  # SFT-baseline answers, same top-k
    max_question_tokens: int = 96
    max_answer_tokens: int = 128
    batch_size: int = 16
    seed: int = 0
    system: str | None = None  # system message everywhere; None = the chat template's default
    chunk_tokens: int = 512  # longer documents are split into chunks of at most this many tokens
    chunk_overlap: int = 64
    docs_per_commit: int = 8  # documents per wave: the most a kill can lose
    # Disk (GiB) the teacher's hidden states at its answer positions may take: computed anyway
    # while answering, kept so that PD training need not run the teacher again; 0 = never keep.
    teacher_states_gb: float = 1.0
    # Fact-targeted questions (datagen/questions.py). document: each call shows the document and
    # asks for questions about it, questions_per_doc of them. sentences: each call shows the
    # document and asks about one span of `sentences_per_prompt` consecutive sentences, so every
    # span is asked about; a document's quota is min(questions_per_doc, spans x
    # questions_per_span), spread over its spans evenly (earlier spans first), and a span's quota
    # is split between a forward and a reverse prompt (detail -> the thing it belongs to), each
    # giving up after max_calls_per_span calls.
    question_mode: str = added_option("document")
    sentences_per_prompt: int = added_option(2)
    questions_per_span: int = added_option(2)
    max_calls_per_span: int = added_option(4)
    # Paraphrase augmentation (datagen/paraphrases.py): the model rewrites each accepted question
    # this many ways (0 = off), with at most max_paraphrase_calls calls per question; the teacher
    # answers every rewrite, a row of its own recording "paraphrase_of".
    paraphrases_per_question: int = added_option(0)
    max_paraphrase_calls: int = added_option(2)
    # Questions that do not name their document's subject (its title, else the start of its first
    # sentence) are asked about it: "About <subject>: <question>" (datagen/questions.py
    # `with_subject`), their paraphrases too, before the teacher answers them.
    name_the_subject: bool = added_option(False)
    # Exposures without new questions: the teacher answers every question (and rewrite) this many
    # times, each answer sampled afresh at a_temperature / sft_temperature and a row of its own
    # recording "answer_index" (1, 2, ... after the first); 1 = one answer a question.
    answers_per_question: int = added_option(1)
    # The teacher reads, after the document and before the question, this many of the document's
    # sentences that match the question best (BM25 over its sentences, best first; datagen/
    # answers.py `teacher_contexts`); 0 = the document alone. A small teacher tends to recite the
    # document's opening whatever the question; read last, the sentences a question is about
    # pull its answer toward them (on SmolLM2-135M this did not help the student: docs/
    # results.md, "Where an answer's facts sit"). The row's "document" is that context, so that
    # training's teacher reads what generation's did. Restatements keep the document alone.
    relevant_sentences: int = added_option(0)
    # Teacher restatements (datagen/restatements.py): this many requests per document ("List the
    # facts about <title>, one per line.", a summary, a description, ...; at most
    # MAX_RESTATEMENTS), each answered by the teacher with the document in its prompt, up to
    # max_restatement_tokens, and a row whose student prompt names the topic only; 0 = off.
    restatements_per_doc: int = added_option(0)
    max_restatement_tokens: int = added_option(256)
    # Recitations (datagen/restatements.py): this many rows per document (at most MAX_RECITATIONS)
    # whose student prompt names the topic only and whose answer, for PD and SFT alike, is the
    # document's own text: the teacher is scored on it, document in its prompt, nothing sampled.
    recitations_per_doc: int = added_option(0)
    # The dtype of the question writer's and the teacher's weights while sampling (AnswerConfig's
    # decode_dtype). Under bfloat16 the teacher states kept for training are bfloat16's, and a
    # training in another compute dtype computes its own (datagen/teacher_states.py).
    decode_dtype: str = added_option("float32")

    def __post_init__(self):
        coerce_fields(self)
        check_choice(self, "decode_dtype", DECODE_DTYPES)
        for name in ("questions_per_doc", "max_calls_per_doc", "max_question_tokens",
                     "max_answer_tokens", "batch_size", "docs_per_commit", "chunk_tokens",
                     "sentences_per_prompt", "questions_per_span", "max_calls_per_span",
                     "max_paraphrase_calls", "answers_per_question", "max_restatement_tokens"):
            check_range(self, name, 1)
        check_range(self, "restatements_per_doc", 0, MAX_RESTATEMENTS)
        check_range(self, "recitations_per_doc", 0, MAX_RECITATIONS)
        check_choice(self, "question_mode", QUESTION_MODES)
        check_range(self, "paraphrases_per_question", 0)
        check_range(self, "relevant_sentences", 0)
        for name in ("q_temperature", "a_temperature", "sft_temperature"):
            check_range(self, name, 0)
        for name in ("q_top_k", "a_top_k", "seed"):  # top-k 0 = off
            check_range(self, name, 0)
        check_range(self, "chunk_overlap", 0, self.chunk_tokens, high_open=True,
                    high_name="chunk_tokens")
        check_range(self, "teacher_states_gb", 0, finite=False)


BUILTIN = "builtin:"  # paths inside the installed package's assets, e.g. builtin:demo/documents.jsonl


def asset_path(spec: str | Path) -> Path:
    """A path given on the command line or in a config: builtin:NAME is a file of the package's
    assets, anything else a path (~ expanded)."""
    spec = str(spec)
    if spec.startswith(BUILTIN):
        from importlib import resources

        return Path(str(resources.files("pdistill_jax") / "assets" / spec[len(BUILTIN):]))
    return Path(spec).expanduser()


@dataclasses.dataclass(frozen=True)
class AcceptanceConfig:
    """The bars report.md's Acceptance section holds a run to. The defaults are the paper's claims
    (PD about as good as RAG, clearly above SFT, and no worse than RAG with the document given);
    a config sized for a small model or a short budget states its own, so the report says which
    bars that recipe was chosen against."""

    pd_of_rag: float = 0.8  # PD closed-book >= this x RAG(gold)
    pd_over_sft: float = 0.10  # PD closed-book >= SFT closed-book + this (0.10 = 10 points)
    pd_rag_under_rag: float = 0.0  # PD + RAG(gold) >= RAG(gold) - this
    retention_of_base: float = 0.9  # PD's retention >= this x the base model's

    def __post_init__(self):
        coerce_fields(self)
        for name in ("pd_of_rag", "pd_rag_under_rag", "retention_of_base"):
            check_range(self, name, 0, 1)
        check_range(self, "pd_over_sft", -1, 1)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    out: str = "runs/demo"
    model: str = "smollm2-135m-instruct"
    documents: str = BUILTIN + "demo/documents.jsonl"
    questions: str = BUILTIN + "demo/questions.jsonl"  # held-out test questions, never trained on
    retention_questions: str | None = BUILTIN + "demo/general_knowledge.jsonl"
    generate: GenerateConfig = dataclasses.field(default_factory=GenerateConfig)
    pd: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    sft: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(objective="ce"))
    max_new_tokens: int = 48
    answer_batch_size: int = 16
    bm25_top_k: int = 3  # documents BM25 retrieves for the rag_bm25 conditions; 0 = leave them out
    judge: str | None = None  # a model to grade answers as an LLM judge (slow on CPU)
    # The system message of every stage (questions, teacher answers, both trainings, answering):
    # the method uses one everywhere. None = the chat template's default.
    system: str | None = None
    # The answering stages' decode_dtype (AnswerConfig's); generation has its own,
    # generate.decode_dtype. Recorded in the answer stages' fingerprints when not float32.
    decode_dtype: str = added_option("float32")
    # The bars of report.md's Acceptance section; read by the report only, so changing them
    # redoes no stage.
    acceptance: AcceptanceConfig = added_option(AcceptanceConfig())

    def __post_init__(self):
        coerce_fields(self)
        for name in ("max_new_tokens", "answer_batch_size"):
            check_range(self, name, 1)
        check_choice(self, "decode_dtype", DECODE_DTYPES)
        check_range(self, "bm25_top_k", 0)  # 0: no BM25 conditions (rag_bm25, pd_rag_bm25)
        for name, cls in (("generate", GenerateConfig), ("pd", TrainConfig), ("sft", TrainConfig)):
            value = getattr(self, name)
            if isinstance(value, dict):
                value = from_dict(cls, value, name)
            if value.system is not None and value.system != self.system:
                raise ValueError(f"{name}.system is set: set `system` once, at the top level of the "
                                 "run config, so every stage uses the same system message")
            object.__setattr__(self, name, dataclasses.replace(value, system=self.system))
        if self.sft.objective != "ce":
            raise ValueError(f"sft.objective={self.sft.objective!r}: the SFT baseline trains with ce")


# ---------------------------------------------------------------- a study of training variants

@dataclasses.dataclass(frozen=True)
class RowsConfig:
    """Which of the generated rows a study variant trains on (all of them by default)."""

    max_per_doc: int | None = None  # the first N rows of each document (a data-scale sweep)
    finished_only: bool = False  # only rows whose teacher answer ended before max_answer_tokens

    def __post_init__(self):
        coerce_fields(self)
        if self.max_per_doc is not None:
            check_range(self, "max_per_doc", 1)


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """The settings every variant of a study shares (`scripts/study_injection.py`, its `base:`).
    Answering defaults are configs/demo.yaml's, so a study's numbers compare with the demo's."""

    model: str = "smollm2-135m-instruct"
    data: str = "runs/demo/data"  # a `pdistill generate` output folder (a run's OUT/data)
    documents: str = BUILTIN + "demo/documents.jsonl"  # the documents RAG(gold) reads
    questions: str = BUILTIN + "demo/questions.jsonl"  # test questions with doc_id and answers
    retention_questions: str | None = BUILTIN + "demo/general_knowledge.jsonl"
    # None: the system message `data` was generated under (as `pdistill train` does)
    system: str | None = None
    max_new_tokens: int = 40
    answer_batch_size: int = 32
    # Each variant also answers the test questions with the gold document in its prompt (PD +
    # RAG(gold)): whether its adapter still reads what it is given.
    with_document: bool = False
    # Each variant trained once per seed (train.seed: the adapter's initial A and the order of
    # the batches), as <name>-seed<k>; results.md then gives each variant's mean and range over
    # them. Empty: once, with the variant's own train.seed.
    seeds: tuple[int, ...] = ()
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)  # each variant's defaults
    rows: RowsConfig = dataclasses.field(default_factory=RowsConfig)

    def __post_init__(self):
        coerce_fields(self)
        for name in ("max_new_tokens", "answer_batch_size"):
            check_range(self, name, 1)
        if self.train.system is not None:
            raise _fail("train.system", "unset: set `system` once, in base", self.train.system)
        if any(k < 0 for k in self.seeds) or len(set(self.seeds)) != len(self.seeds):
            raise _fail("seeds", "distinct integers >= 0", list(self.seeds))


VARIANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclasses.dataclass(frozen=True)
class VariantConfig:
    """One variant of a study: the base's train and rows settings with its own on top."""

    name: str  # its folder in the study's output, and its row in the results table
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    rows: RowsConfig = dataclasses.field(default_factory=RowsConfig)

    def __post_init__(self):
        coerce_fields(self)
        if not VARIANT_NAME.fullmatch(self.name):
            raise _fail("name", "letters, digits, '.', '_' or '-', starting with a letter or a "
                        "digit (it names a folder)", self.name)
        if self.train.system is not None:
            raise _fail("train.system", "unset: set `system` once, in base", self.train.system)


# ---------------------------------------------------------------- reading and writing configs

T = TypeVar("T")


def from_dict(cls: type[T], data: dict[str, Any], source: str | None = None, *,
              lines: dict[str, int] | None = None, prefix: str = "") -> T:
    """Builds a (possibly nested) dataclass from a dict, rejecting unknown keys by name.

    Values are coerced and checked by the dataclasses themselves; a bad one is reported as
    `source:line: prefix.field must be ..., got ...`, the line taken from `lines` ({dotted key:
    line}, as `read_yaml` returns them) where the key has one.
    """
    if not isinstance(data, dict):
        where = _where(source, lines, prefix[:-1])
        raise ValueError(f"{where}{prefix[:-1] or 'the config'} must be a mapping of "
                         f"{cls.__name__} fields, got {data!r}")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        where = _where(source, lines, prefix + str(unknown[0]))
        raise ValueError(f"{where}unknown key(s) {sorted(map(str, unknown))} for {cls.__name__}"
                         f"{f' ({prefix[:-1]})' if prefix else ''}; valid keys: {sorted(fields)}")
    hints = _field_hints(cls)
    kwargs = {}
    for name, value in data.items():
        hint = hints.get(name)
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = from_dict(hint, value, source, lines=lines, prefix=f"{prefix}{name}.")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except FieldError as e:
        where = _where(source, lines, prefix + e.field)
        raise FieldError(prefix + e.field, f"{where}{prefix}{e}") from None


def _where(source: str | None, lines: dict[str, int] | None, key: str) -> str:
    """'file:line: ' for a key read from a file, 'source: ' without line numbers, else ''."""
    if lines is not None and key in lines:
        return f"{source}:{lines[key]}: "
    return f"{source}: " if source and lines is None else ""


def read_yaml(path: str | Path) -> tuple[dict, dict[str, int]]:
    """A YAML file's top-level mapping, and the 1-based line of every key ({"pd.lora.rank": 7});
    the items of a list of mappings are numbered from 0 ({"variants.1.train.lr": 12}).

    The one reader of config files: a syntax error is one line naming file, line and column.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file {path} does not exist")
    if path.is_dir():
        raise ValueError(f"config file {path} is a folder; give a YAML file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    loader = yaml.SafeLoader(text)
    lines: dict[str, int] = {}
    try:
        node = loader.get_single_node()
        if isinstance(node, yaml.MappingNode):  # before constructing, which expands merge keys
            _key_lines(node, "", path, lines)
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ValueError(f"{where}: invalid YAML: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: invalid YAML: {str(e).splitlines()[0]}") from None
    finally:
        loader.dispose()
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: top level must be a mapping of keys to values")
    return data, lines


def _key_lines(node, prefix: str, path: Path, lines: dict[str, int]) -> None:
    for key, value in node.value:
        if not isinstance(key, yaml.ScalarNode):
            continue
        name = prefix + key.value
        if name in lines:  # PyYAML would silently keep the last one
            raise ValueError(f"{path}:{key.start_mark.line + 1}: duplicate key {name!r} (first "
                             f"on line {lines[name]})")
        lines[name] = key.start_mark.line + 1
        if isinstance(value, yaml.MappingNode):
            _key_lines(value, name + ".", path, lines)
        elif isinstance(value, yaml.SequenceNode):  # a list of mappings (a study's variants)
            for i, item in enumerate(value.value):
                if isinstance(item, yaml.MappingNode):
                    lines[f"{name}.{i}"] = item.start_mark.line + 1
                    _key_lines(item, f"{name}.{i}.", path, lines)


def load_yaml(cls: type[T], path: str | Path) -> T:
    data, lines = read_yaml(path)
    return from_dict(cls, data, str(path), lines=lines)


def to_dict(cfg) -> dict:
    """cfg as plain JSON values, without the `added_option` fields that hold their default."""
    return json.loads(json.dumps(_as_dict(cfg), default=list))


def _as_dict(value):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _as_dict(getattr(value, f.name)) for f in dataclasses.fields(value)
                if not (f.metadata.get(_OMIT_AT_DEFAULT) and getattr(value, f.name) == f.default)}
    if isinstance(value, (list, tuple)):
        return [_as_dict(v) for v in value]
    if isinstance(value, dict):
        return {k: _as_dict(v) for k, v in value.items()}
    return value


def differences(old: dict, new: dict, ignore: typing.Iterable[str] = ()) -> list[str]:
    """'key: old -> new' for every top-level key whose value differs, `ignore`d keys aside: how a
    resumed run (training, generation) names the settings that would make it a different run."""
    skip = set(ignore)
    return [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(set(old) | set(new))
            if key not in skip and old.get(key) != new.get(key)]

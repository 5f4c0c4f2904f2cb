"""The one table of our base weights: each one's path, Hugging Face name, shape and LoRA target.

Hugging Face import (`hf.hf_to_params`), merged export (`merged.params_to_hf`) and PEFT adapter
keys, `target_modules` and LoRA dimensions (`peft`) are all read off `TENSORS`. Our kernels are
(in, out); Hugging Face stores linear weights as (out, in), hence the transpose flag. Paths under
`layers.` hold every layer stacked on a leading axis; their Hugging Face names have `{i}`, the
layer index. A family can name a weight its own way (Gemma 3's `post_attention_layernorm` is
the norm on the attention output, Llama's the norm before the MLP): rows carry `present`, and
every lookup goes through the rows of one config (`tensors_of`).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable

from pdistill_jax.config import ModelConfig


def _dims(cfg: ModelConfig) -> dict[str, int]:
    """The sizes a shape is spelled in: D model width, F MLP width, V vocabulary, Q query and K
    key/value projection widths, H one head's width."""
    return {"D": cfg.hidden_size, "F": cfg.intermediate_size, "V": cfg.vocab_size,
            "Q": cfg.num_heads * cfg.head_dim, "K": cfg.num_kv_heads * cfg.head_dim,
            "H": cfg.head_dim}


@dataclasses.dataclass(frozen=True)
class Tensor:
    ours: str  # our parameter path, dot-separated
    hf: str  # Hugging Face tensor name; {i} is the layer index
    dims: str  # our shape in `_dims` letters, e.g. "D Q" (without the layer axis)
    transpose: bool = False  # Hugging Face stores it transposed: (out, in)
    lora_target: str | None = None  # the LoRA target adapting this kernel
    present: Callable[[ModelConfig], bool] = lambda cfg: True

    @property
    def per_layer(self) -> bool:
        return self.ours.startswith("layers.")

    def shape(self, cfg: ModelConfig) -> tuple[int, ...]:
        sizes = _dims(cfg)
        return tuple(sizes[d] for d in self.dims.split())

    def hf_name(self, layer: int | None = None) -> str:
        return self.hf.format(i=layer)

    @property
    def hf_module(self) -> str:
        """The Hugging Face module path (name without `.weight`/`.bias`), e.g. `lm_head`."""
        return self.hf.rsplit(".", 1)[0]


def _attention_bias(cfg: ModelConfig) -> bool:
    return cfg.attention_bias


def _qk_norm(cfg: ModelConfig) -> bool:
    return cfg.qk_norm


def _untied_head(cfg: ModelConfig) -> bool:
    return not cfg.tie_word_embeddings


def _sandwich(cfg: ModelConfig) -> bool:
    return cfg.sandwich_norms


def _plain_norms(cfg: ModelConfig) -> bool:
    return not cfg.sandwich_norms


_ATTN_DIMS = {"q": "D Q", "k": "D K", "v": "D K", "o": "Q D"}
_MLP_DIMS = {"gate": "D F", "up": "D F", "down": "F D"}

TENSORS: tuple[Tensor, ...] = (
    Tensor("embed", "model.embed_tokens.weight", "V D"),
    Tensor("norm.weight", "model.norm.weight", "D"),
    Tensor("layers.attn_norm.weight", "model.layers.{i}.input_layernorm.weight", "D"),
    Tensor("layers.mlp_norm.weight", "model.layers.{i}.post_attention_layernorm.weight", "D",
           present=_plain_norms),
    *(Tensor(f"layers.attn.{p}.kernel", f"model.layers.{{i}}.self_attn.{p}_proj.weight", dims,
             transpose=True, lora_target=p) for p, dims in _ATTN_DIMS.items()),
    *(Tensor(f"layers.mlp.{p}.kernel", f"model.layers.{{i}}.mlp.{p}_proj.weight", dims,
             transpose=True, lora_target=p) for p, dims in _MLP_DIMS.items()),
    *(Tensor(f"layers.attn.{p}.bias", f"model.layers.{{i}}.self_attn.{p}_proj.bias",
             _ATTN_DIMS[p].split()[1], present=_attention_bias) for p in ("q", "k", "v")),
    *(Tensor(f"layers.attn.{p}_norm.weight", f"model.layers.{{i}}.self_attn.{p}_norm.weight", "H",
             present=_qk_norm) for p in ("q", "k")),
    # Gemma 3: a norm before and after each of attention and the MLP.
    Tensor("layers.attn_post_norm.weight", "model.layers.{i}.post_attention_layernorm.weight", "D",
           present=_sandwich),
    Tensor("layers.mlp_norm.weight", "model.layers.{i}.pre_feedforward_layernorm.weight", "D",
           present=_sandwich),
    Tensor("layers.mlp_post_norm.weight", "model.layers.{i}.post_feedforward_layernorm.weight", "D",
           present=_sandwich),
    Tensor("lm_head.kernel", "lm_head.weight", "D V", transpose=True, lora_target="lm_head",
           present=_untied_head),
)

def tensors_of(cfg: ModelConfig) -> tuple[Tensor, ...]:
    """The rows of `cfg`'s weights, in table order: one per path and per Hugging Face name."""
    return tuple(t for t in TENSORS if t.present(cfg))


def by_path(cfg: ModelConfig) -> dict[str, Tensor]:
    return {t.ours: t for t in tensors_of(cfg)}

# Tensors that HF checkpoints may carry and that no model of ours uses.
IGNORED_HF = re.compile(r".*rotary_emb\.inv_freq$")
def layer_pattern(template: str) -> re.Pattern:
    """A name template ("model.layers.{i}.x") as a regex whose group 1 is the layer index."""
    return re.compile(re.escape(template).replace(r"\{i\}", r"(\d+)"))


_HF_PATTERNS = [(layer_pattern(t.hf), t) for t in TENSORS]


@dataclasses.dataclass(frozen=True)
class Fused:
    """One Hugging Face weight that stacks several of our projections along its output axis
    (Phi-3's qkv_proj and gate_up_proj): split at import, concatenated again at export."""

    hf_module: str  # e.g. "model.layers.{i}.self_attn.qkv_proj"
    parts: tuple[str, ...]  # our LoRA targets, in the order HF stacks them

    def hf_name(self, layer: int) -> str:
        return f"{self.hf_module.format(i=layer)}.weight"

    @property
    def module_name(self) -> str:
        """The module's own name, as PEFT's target_modules and rank_pattern give it ("qkv_proj")."""
        return self.hf_module.split(".")[-1]

    @property
    def weight_pattern(self) -> re.Pattern:
        """Matches the fused weight's Hugging Face name; group 1 is the layer."""
        return layer_pattern(self.hf_module + ".weight")

    def part_modules(self, layer: int) -> list[str]:
        """The unfused Hugging Face module paths of the parts (as `TENSORS` names them)."""
        return [LORA_TENSORS[p].hf_module.format(i=layer) for p in self.parts]

    def sizes(self, cfg: ModelConfig) -> list[int]:
        """Each part's share of the fused output axis."""
        return [target_dims(cfg, p)[1] for p in self.parts]


# model_type -> its fused weights. Phi-3 stacks q, k, v (then o alone) and gate, up.
FUSED: dict[str, tuple[Fused, ...]] = {
    "phi3": (Fused("model.layers.{i}.self_attn.qkv_proj", ("q", "k", "v")),
             Fused("model.layers.{i}.mlp.gate_up_proj", ("gate", "up"))),
}


def fused_of(cfg: ModelConfig) -> tuple[Fused, ...]:
    return FUSED.get(cfg.model_type, ())


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our path -> shape of every base weight of `cfg` (layer weights without the layer axis)."""
    return {t.ours: t.shape(cfg) for t in tensors_of(cfg)}


def match_hf(name: str, cfg: ModelConfig) -> tuple[Tensor, int | None] | None:
    """(row, layer index or None) of a Hugging Face tensor name among `cfg`'s rows (or, for a
    tensor `cfg` lacks, any row); None if no row has that name."""
    for pattern, tensor in sorted(_HF_PATTERNS, key=lambda pt: not pt[1].present(cfg)):
        m = pattern.fullmatch(name)
        if m:
            return tensor, (int(m.group(1)) if tensor.per_layer else None)
    return None


# ---------------------------------------------------------------- LoRA targets

LORA_TENSORS = {t.lora_target: t for t in TENSORS if t.lora_target}
# Our target -> Hugging Face module name (the last part of its path): PEFT's target_modules.
HF_MODULE = {target: t.hf_module.split(".")[-1] for target, t in LORA_TENSORS.items()}
# Per-layer target -> (block, projection): where its adapter sits in our LoRA tree.
LAYER_PATH = {target: tuple(t.ours.split(".")[1:3])
              for target, t in LORA_TENSORS.items() if t.per_layer}


def hf_module_paths(cfg: ModelConfig, target: str) -> list[str]:
    """Hugging Face module path(s) of one target, one per layer (just `lm_head` for the head)."""
    t = LORA_TENSORS[target]
    if not t.per_layer:
        return [t.hf_module]
    return [t.hf_module.format(i=i) for i in range(cfg.num_layers)]


def target_dims(cfg: ModelConfig, target: str) -> tuple[int, int]:
    """(in_features, out_features) of a target projection."""
    d_in, d_out = LORA_TENSORS[target].shape(cfg)
    return d_in, d_out

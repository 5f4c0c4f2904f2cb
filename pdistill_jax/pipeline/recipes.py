"""Recipes: the settings `pdistill generate` and `pdistill train` start from without --config.

A recipe is chosen for the model the user runs (`--recipe auto`, the default): models under
`SMALL_MODEL_PARAMS` parameters get `small`, the recipe measured on the embedded
SmolLM2-135M-Instruct (docs/results.md, the injection study; `configs/full.yaml` runs it end to
end), larger ones `paper`, the authors' settings for Llama-3-8B (`configs/paper.yaml`). `--recipe
small|paper` picks one whatever the size; `--config FILE` replaces the recipe (the file's fields
over the dataclass defaults, as always) and flags override either.

Why the two differ: on a 135M model hot answers (the paper's T=1.5) invent details and τ=2
learned less (docs/results.md, "How the defaults were chosen"); restatements of each document,
ten passes and an adapter on the top third of the layers were the study's largest measured gains
(closed-book 15.8% -> 33.3% on the demo corpus, retention kept). The paper's rank-1024 adapter at
lr 1e-5 is sized for 8B.
"""
from __future__ import annotations

import math
from typing import Any

from pdistill_jax.config import ModelConfig

RECIPES = ("auto", "small", "paper")
SMALL_MODEL_PARAMS = 1_000_000_000  # `auto`: below this, the small-model recipe
SMALL_SYSTEM = ("You are a helpful assistant. Give short, direct answers with the exact names, "
                "places, dates and numbers.")

_GENERATE = {
    "small": {
        "questions_per_doc": 12, "max_calls_per_doc": 8, "q_temperature": 1.0,
        "a_temperature": 0.25, "sft_temperature": 0.25, "max_question_tokens": 96,
        "max_answer_tokens": 48, "batch_size": 32, "system": SMALL_SYSTEM,
        "restatements_per_doc": 2, "max_restatement_tokens": 192,
    },
    "paper": {
        "questions_per_doc": 30, "max_calls_per_doc": 26, "q_temperature": 1.5, "q_top_k": 50,
        "a_temperature": 1.5, "a_top_k": 50, "sft_temperature": 0.25, "max_answer_tokens": 256,
        "batch_size": 32,
    },
}

_TRAIN = {
    "small": {"objective": "kl", "tau": 1.0, "lora": {"rank": 32},
              "lr": 3.0e-3, "epochs": 10, "batch_size": 8},
    "paper": {"objective": "kl", "tau": 2.0,
              "lora": {"rank": 1024,
                       "targets": ["q", "k", "v", "o", "gate", "up", "down", "lm_head"]},
              "lr": 1.0e-5, "weight_decay": 0.1, "warmup_ratio": 0.1, "max_grad_norm": 1.0,
              "epochs": 10, "batch_size": 4, "compute_dtype": "bfloat16"},
}


def parameter_count(cfg: ModelConfig) -> int:
    """The base model's parameters, counted from its architecture (no weights read)."""
    from pdistill_jax.weights.names import tensors_of

    return sum(math.prod(t.shape(cfg)) * (cfg.num_layers if t.per_layer else 1)
               for t in tensors_of(cfg))


def choose(recipe: str, cfg: ModelConfig) -> tuple[str, str]:
    """(the recipe's name, why): `auto` resolved by the model's size."""
    if recipe not in RECIPES:
        raise ValueError(f"--recipe {recipe}: must be one of {', '.join(RECIPES)}")
    count = parameter_count(cfg)
    size = f"{count / 1e6:,.0f}M parameters" if count >= 1e6 else f"{count:,} parameters"
    if recipe != "auto":
        return recipe, f"--recipe {recipe}; the model has {size}"
    name = "small" if count < SMALL_MODEL_PARAMS else "paper"
    other = "paper" if name == "small" else "small"
    side = "under" if name == "small" else "at least"
    return name, (f"the model has {size}, {side} {SMALL_MODEL_PARAMS / 1e9:g}B; "
                  f"--recipe {other} for the {other} recipe, --config FILE for your own")


def top_third(num_layers: int) -> int:
    """The first layer of the top third (at least one layer): 30 -> 20, 18 -> 12, 2 -> 1."""
    return num_layers - max(1, round(num_layers / 3))


def generate_settings(name: str) -> dict[str, Any]:
    """GenerateConfig fields of recipe `name` ("small" or "paper")."""
    return dict(_GENERATE[name])


def train_settings(name: str, cfg: ModelConfig) -> dict[str, Any]:
    """TrainConfig fields of recipe `name` for the model `cfg` (the small recipe's adapter sits on
    the top third of its layers)."""
    settings = {**_TRAIN[name], "lora": dict(_TRAIN[name]["lora"])}
    if name == "small":
        settings["lora"]["first_layer"] = top_third(cfg.num_layers)
    return settings


def recipe_field(name: str, kind: str, field: str, lora: bool = False) -> Any:
    """What recipe `name` sets `field` of `kind` ("generate" or "train"; lora: a LoraConfig
    field) to, for --help; None where it leaves the dataclass default."""
    table = _GENERATE if kind == "generate" else _TRAIN
    if lora and field == "first_layer" and name == "small":
        return "the top third of the layers"
    return (table[name].get("lora", {}) if lora else table[name]).get(field)

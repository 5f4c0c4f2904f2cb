"""One module per `pdistill` subcommand, each with `add_arguments(parser)` and `main(args)`.

The flags several commands share are defined here once, so that they read and behave the same in
every command; a flag that takes its default from a config dataclass writes that default into its
help from the dataclass itself, so the help cannot drift from the code.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

from pdistill_jax.weights.registry import DEFAULT_MODEL

MODEL_HELP = ("a registered name (`pdistill models` lists them), a Hugging Face folder "
              "(config.json + safetensors) or a .gguf file")
DOCS_HELP = ('the documents: a .jsonl of {"id", "text", "title"?} rows, a folder of .txt/.md files, '
             "builtin:demo/documents.jsonl (the demo corpus the package ships), hf:squadshifts/nyt, "
             "hf:hotpot_qa/distractor, or hf:/saved/dataset?format=...")
NO_PROGRESS_HELP = "no progress bar on stderr"


def field_default(cls: type, name: str) -> Any:
    """The default value of dataclass `cls`'s field `name` (built from its factory if it has one)."""
    field = {f.name: f for f in dataclasses.fields(cls)}[name]
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    raise ValueError(f"{cls.__name__}.{name} has no default")


def show_value(value: Any) -> str:
    """A default as a user would type it on the command line (tuples comma-separated)."""
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    return str(value)


def config_default(cls: type, name: str, show: Callable[[Any], str] = show_value) -> str:
    """'(default: 10, from TrainConfig)': the help suffix of a flag left None so that the config's
    value applies."""
    return f"(default: {show(field_default(cls, name))}, from {cls.__name__})"


def given_flags(args, names: Iterable[str]) -> dict[str, Any]:
    """{name: value} of the flags among `names` that were given: a flag whose dest is its config
    field's name and whose default is None (so that the config's value applies) when left out."""
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def add_model_argument(p, default_text: str | None = None) -> None:
    """--model, the same help everywhere. Without `default_text` it defaults to the registered
    default model; with it the flag is left None and the command resolves the default it names."""
    if default_text is None:
        p.add_argument("--model", default=DEFAULT_MODEL,
                       help=f"the model: {MODEL_HELP} (default: {DEFAULT_MODEL}, the registered default)")
    else:
        p.add_argument("--model", help=f"the model: {MODEL_HELP} (default: {default_text})")


def add_decode_dtype_argument(p, default: str | None, default_text: str | None = None) -> None:
    """--decode-dtype, the same help everywhere. Not an argparse choice: a bad value is refused by
    the config's check, in one line. default None: the config's (default_text says which)."""
    from pdistill_jax.config import DECODE_DTYPES

    p.add_argument("--decode-dtype", default=default,
                   help=f"dtype of the base weights while decoding: {' | '.join(DECODE_DTYPES)}; "
                        "bfloat16 reads half the bytes a step (sums, logits and LoRA stay "
                        "float32); auto = bfloat16 on a GPU/TPU, float32 on CPU"
                        + (f" {default_text}" if default_text else ""))


def add_no_progress_argument(p) -> None:
    p.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP)


def recipe_default(cls: type, name: str) -> str:
    """The help suffix of a flag whose default a recipe may set: '(default: the recipe's: small 10,
    paper 30)', or where neither recipe sets it, the dataclass's (config_default)."""
    kind = "generate" if cls.__name__ == "GenerateConfig" else "train"
    lora = cls.__name__ == "LoraConfig"
    from pdistill_jax.pipeline.recipes import recipe_field

    values = {r: recipe_field(r, kind, name, lora) for r in ("small", "paper")}
    if all(v is None for v in values.values()):
        return config_default(cls, name)
    fallback = show_value(field_default(cls, name))
    return "(default: the recipe's: " + ", ".join(
        f"{r} {fallback if v is None else show_value(v)}" for r, v in values.items()) + ")"


def add_recipe_argument(p, cls_name: str) -> None:
    from pdistill_jax.pipeline.recipes import RECIPES, SMALL_MODEL_PARAMS

    p.add_argument("--recipe", choices=RECIPES,
                   help=f"the settings to start from without --config: small (measured on the "
                        f"embedded 135M model) or paper (the authors' 8B settings); "
                        f"auto = small for models under {SMALL_MODEL_PARAMS / 1e9:g}B parameters, "
                        f"else paper; fields no recipe sets keep {cls_name}'s defaults "
                        f"(default: auto; pdistill_jax/pipeline/recipes.py)")


def recipe_layer(args, model, kind: str) -> dict[str, Any]:
    """The recipe's fields for `kind` ("generate" or "train") and `model`, or {} with --config
    (the file replaces the recipe) or without a model (library callers: the dataclass defaults).
    Which recipe and why is left in args.recipe_note, for the command's closing report."""
    if model is None:
        return {}
    if args.config:
        if args.recipe is not None:
            raise ValueError(f"--recipe {args.recipe} and --config {args.config}: give one "
                             "(the config file replaces the recipe; flags override either)")
        return {}
    from pdistill_jax.pipeline import recipes
    from pdistill_jax.weights.hf import read_model_config
    from pdistill_jax.weights.registry import resolve_model

    cfg = read_model_config(resolve_model(model))
    name, why = recipes.choose(args.recipe or "auto", cfg)
    # Told with the command's result, not before it: a bad input must stay a one-line error.
    args.recipe_note = f"recipe {name} ({why})"
    if kind == "generate":
        return recipes.generate_settings(name)
    return recipes.train_settings(name, cfg)

"""`pdistill train`: flags override --config YAML, which overrides TrainConfig's defaults.

With --resume the run's own RUN/config.yaml is the starting point (so `pdistill train --out RUN
--resume` needs no other flag); --config and flags still override it, and train() refuses the
resume if that changes the run.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from pdistill_jax.log import logger
from pdistill_jax.weights.registry import DEFAULT_MODEL
from . import (add_model_argument, add_no_progress_argument, add_recipe_argument, config_default,
               given_flags, recipe_default, recipe_layer)

_log = logger("train")
# The TrainConfig and LoraConfig fields that have a flag of the same name.
TRAIN_FLAGS = ("objective", "tau", "lr", "lora_b_lr_ratio", "epochs", "batch_size", "grad_accum",
               "seed", "compute_dtype", "remat", "system", "max_seq_len", "save_every", "mesh",
               "ce_weight", "hidden_weight", "context_boost", "retention_weight",
               "retention_prompts", "retention_batch_size", "open_book_share", "dev_share",
               "eval_every", "early_stop_patience")
LORA_FLAGS = ("rank", "alpha", "targets", "first_layer")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from pdistill_jax.config import COMPUTE_DTYPES, OBJECTIVES, LoraConfig, TrainConfig

    def default(name, cls=TrainConfig):
        return recipe_default(cls, name)

    add_model_argument(p, f"{DEFAULT_MODEL}, the registered default; with --resume, the run's")
    p.add_argument("--data", help="folder written by `pdistill generate` (its qa.jsonl) or a JSONL "
                   'file of {"document", "question", "answer", "sft_answer"?} rows '
                   "(default: the resumed run's; required without --resume)")
    p.add_argument("--out", required=True,
                   help="run folder (config, metrics, checkpoints, adapter)")
    p.add_argument("--config", help="YAML of TrainConfig fields, e.g. configs/train_default.yaml, "
                                    "in place of the recipe; flags override it (default: none, "
                                    "the recipe; with --resume, the run's config.yaml)")
    add_recipe_argument(p, "TrainConfig")
    p.add_argument("--objective", choices=OBJECTIVES,
                   help="kl = KL(teacher||student) (prompt distillation); ce = SFT baseline "
                        f"{default('objective')}")
    p.add_argument("--tau", type=float, help=f"distillation temperature {default('tau')}")
    p.add_argument("--lora-b-lr-ratio", type=float,
                   help="the LoRA B matrices learn at this x the learning rate, the A matrices at "
                        f"it (LoRA+ uses about 16) {default('lora_b_lr_ratio')}")
    p.add_argument("--ce-weight", type=float,
                   help="add this x the student's cross-entropy on the answer tokens to a "
                        f"distillation objective {default('ce_weight')}")
    p.add_argument("--hidden-weight", type=float,
                   help="add this x |h_student - h_teacher|_1 / |h_teacher|_1 on the final hidden "
                        f"states at the answer tokens to a distillation objective "
                        f"{default('hidden_weight')}")
    p.add_argument("--context-boost", type=float,
                   help="distil towards (1 + this) x the teacher's logits - this x the base "
                        "model's on the question alone: the target leans further towards what "
                        f"the document changes {default('context_boost')}")
    p.add_argument("--retention-weight", type=float,
                   help="add this x KL(base || student) on the base model's own answers to "
                        f"--retention-prompts {default('retention_weight')}")
    p.add_argument("--retention-prompts",
                   help='JSONL of {"question"} rows, e.g. builtin:general_prompts.jsonl, '
                        "99 everyday instructions (default: none)")
    p.add_argument("--retention-batch-size", type=int,
                   help=f"retention prompts per micro-batch {default('retention_batch_size')}")
    p.add_argument("--open-book-share", type=float,
                   help="share of the rows trained a second time with the document in the "
                        "student's prompt too, so that the adapter defers to a document in context "
                        f"(PD + RAG) {default('open_book_share')}")
    p.add_argument("--dev-share", type=float,
                   help="share of each document's questions held out of training as a dev set; "
                        "the adapter written is the one of the lowest dev loss "
                        f"{default('dev_share')}")
    p.add_argument("--eval-every", type=int,
                   help="steps between dev-loss measurements; 0 = at each epoch's end "
                        f"{default('eval_every')}")
    p.add_argument("--early-stop-patience", type=int,
                   help="stop after this many dev-loss measurements without a new lowest; "
                        f"0 = never {default('early_stop_patience')}")
    p.add_argument("--rank", type=int, help=f"LoRA rank {default('rank', LoraConfig)}")
    p.add_argument("--alpha", type=float, help="LoRA alpha: the update is scaled by alpha/rank "
                                               "(default: 2 x rank, from LoraConfig)")
    p.add_argument("--targets", help="LoRA targets, comma-separated: q,k,v,o,gate,up,down,lm_head "
                                     f"{default('targets', LoraConfig)}")
    p.add_argument("--first-layer", type=int,
                   help="the adapter on layers FIRST_LAYER.. only: the frozen layers below run once "
                        f"per row, so steps are cheaper {default('first_layer', LoraConfig)}")
    p.add_argument("--lr", type=float, help=f"peak learning rate (AdamW) {default('lr')}")
    p.add_argument("--epochs", type=int, help=f"passes over the training rows {default('epochs')}")
    p.add_argument("--batch-size", type=int,
                   help=f"Q&A rows per micro-batch {default('batch_size')}")
    p.add_argument("--grad-accum", type=int,
                   help=f"micro-batches per optimizer step {default('grad_accum')}")
    p.add_argument("--max-seq-len", type=int,
                   help="longer teacher sequences get their document truncated, or are skipped "
                        f"{default('max_seq_len')}")
    p.add_argument("--mesh", help="device mesh data=N,fsdp=N,tensor=N (one may be -1 = the rest) "
                                  + config_default(TrainConfig, "mesh", _show_mesh))
    p.add_argument("--seed", type=int, help=f"seed of LoRA initialisation and data order {default('seed')}")
    p.add_argument("--compute-dtype", choices=COMPUTE_DTYPES,
                   help="dtype of the forward and backward pass; auto = bfloat16 on a GPU/TPU, "
                        f"float32 on CPU {default('compute_dtype')}")
    p.add_argument("--remat", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute activations in the backward pass (less memory, more time) "
                        f"{default('remat')}")
    p.add_argument("--system", help="system message (default: the one --data was generated under, "
                                    "else the chat template's)")
    p.add_argument("--save-every", type=int, help=f"steps between checkpoints {default('save_every')}")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its newest good checkpoint")
    p.add_argument("--init-adapter", help="start from this PEFT adapter folder (or a run folder) "
                                          "(default: none, a fresh LoRA)")
    p.add_argument("--stop-after", type=int,
                   help="stop after this many steps, with a checkpoint (continue with --resume) "
                        "(default: none, train to the end)")
    add_no_progress_argument(p)


def _show_mesh(mesh) -> str:
    return ",".join(f"{axis}={n}" for axis, n in zip(("data", "fsdp", "tensor"), mesh))


def train_inputs(args: argparse.Namespace, run_config: dict | None) -> tuple[str, str]:
    """(model, data): the flags, else (with --resume) the run's, else the registered default model;
    --data has no default outside a resumed run."""
    run_config = run_config or {}
    model = args.model or run_config.get("model") or DEFAULT_MODEL
    data = args.data or run_config.get("data")
    if data is None:
        raise ValueError("--data is required (it defaults to the run's only with --resume on a run "
                         "folder that has a config.yaml)")
    return model, data


def resolve_config(args: argparse.Namespace, run_config: dict | None, model: str | None = None):
    """TrainConfig from (the run's saved config when resuming, else without --config the recipe
    for `model`, pdistill_jax/pipeline/recipes.py) < --config YAML < flags.

    TrainConfig checks the values; one read from --config is reported with its file and line.
    """
    from pdistill_jax.config import TrainConfig, from_dict, read_yaml
    from pdistill_jax.model.sharding import parse_mesh

    flags = given_flags(args, TRAIN_FLAGS)
    if "mesh" in flags:
        flags["mesh"] = parse_mesh(flags["mesh"])
    lora_flags = given_flags(args, LORA_FLAGS)
    if "targets" in lora_flags:
        lora_flags["targets"] = tuple(t.strip() for t in lora_flags["targets"].split(",")
                                      if t.strip())
    if lora_flags:
        flags["lora"] = lora_flags
    loaded, lines = read_yaml(args.config) if args.config else ({}, {})
    # A value a flag replaced is no longer the file's: its errors must not point at the file.
    overridden = set(flags) | {f"lora.{k}" for k in lora_flags}
    lines = {k: n for k, n in lines.items() if k not in overridden}

    def combine(base: dict):
        merged: dict = {}
        for layer in (base, loaded, flags):
            lora = layer.get("lora")
            if isinstance(lora, dict) and isinstance(merged.get("lora"), dict):
                lora = {**merged["lora"], **lora}  # --rank alone keeps the YAML's targets
            merged.update(layer)
            if "lora" in layer:
                merged["lora"] = lora
        return from_dict(TrainConfig, merged, args.config, lines=lines)

    if run_config is not None:
        if getattr(args, "recipe", None) is not None:
            raise ValueError("--recipe: a resumed run keeps the settings in its config.yaml")
        return combine(run_config.get("train") or {})
    combine({})  # a bad flag or file is refused before the recipe resolves (fetches) the model
    return combine(recipe_layer(args, model, "train"))


def main(args: argparse.Namespace) -> int:
    from pdistill_jax.train.loop import train
    from pdistill_jax.train.run_folder import read_run_config

    run_config = read_run_config(args.out) if args.resume else None
    model, data = train_inputs(args, run_config)
    cfg = resolve_config(args, run_config, model)
    if cfg.system is None and run_config is None:
        from pdistill_jax.datagen.dataset import generation_system_message

        if (system := generation_system_message(data)) is not None:
            cfg = dataclasses.replace(cfg, system=system)
            _log.info(f"system message: {system!r}, the one {data} was generated under "
                      "(--system to train under another)")
    summary = train(model, data, args.out, cfg, resume=args.resume,
                    init_adapter=args.init_adapter, stop_after=args.stop_after,
                    progress=not args.no_progress)
    if getattr(args, "recipe_note", None):
        summary = {**summary, "settings": args.recipe_note}
    print(json.dumps(summary, indent=2), file=sys.stdout)
    return 0

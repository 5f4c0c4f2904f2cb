"""`pdistill plan`: compile the training step and the sampler for a model config and a mesh on
fake CPU devices, without weights, and print per-device memory, FLOPs and every weight's sharding.

Only the model's config.json is read (no weights, no tokenizer), so a pod-sized model can be
planned on a laptop. The training shapes default to TrainConfig's and LoraConfig's, as in
`pdistill train`.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import config_default

DEVICE_FLAG = "--xla_force_host_platform_device_count"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from pdistill_jax.config import COMPUTE_DTYPES, OBJECTIVES, LoraConfig, TrainConfig
    from pdistill_jax.train.plan import PlanShapes

    def default(name, cls=TrainConfig):
        return config_default(cls, name)

    shape_default = PlanShapes()
    p.add_argument("--model", required=True,
                   help="a Hugging Face model folder or its config.json (only the config is read: "
                        "no weights, no tokenizer)")
    p.add_argument("--mesh", help="device mesh data=N,fsdp=N,tensor=N (one may be -1 = the rest) "
                                  "(default: data=-1,fsdp=1,tensor=1, from TrainConfig)")
    p.add_argument("--devices", type=int, default=8,
                   help="fake CPU devices to plan on (the pod slice's chip count)")
    p.add_argument("--hbm-gib", type=float,
                   help="memory per device in GiB, to say whether each program fits "
                        "(default: none, not judged)")
    p.add_argument("--batch-size", type=int, help=f"Q&A rows per micro-batch {default('batch_size')}")
    p.add_argument("--grad-accum", type=int,
                   help=f"micro-batches per optimizer step {default('grad_accum')}")
    p.add_argument("--objective", choices=OBJECTIVES,
                   help=f"ce plans the SFT step (no teacher) {default('objective')}")
    p.add_argument("--rank", type=int, help=f"LoRA rank {default('rank', LoraConfig)}")
    p.add_argument("--targets", help="LoRA targets, comma-separated: q,k,v,o,gate,up,down,lm_head "
                                     f"{default('targets', LoraConfig)}")
    p.add_argument("--first-layer", type=int,
                   help=f"the adapter on layers FIRST_LAYER.. only {default('first_layer', LoraConfig)}")
    p.add_argument("--compute-dtype", choices=COMPUTE_DTYPES,
                   help="dtype of the forward and backward pass, and of the stored base weights "
                        "(LoRA and Adam stay float32); auto = bfloat16, as on the GPU/TPU the "
                        f"plan stands for {default('compute_dtype')}")
    p.add_argument("--remat", action=argparse.BooleanOptionalAction, default=None,
                   help=f"recompute activations in the backward pass {default('remat')}")
    p.add_argument("--teacher-len", type=int,
                   help="tokens of the longest teacher row (document + question + answer) "
                        f"{default('max_seq_len')}")
    p.add_argument("--student-len", type=int, default=shape_default.student_len,
                   help="tokens of the longest student row (question + answer)")
    p.add_argument("--answer-len", type=int, default=shape_default.answer_len,
                   help="tokens of the longest answer, end of turn included")
    p.add_argument("--retention-weight", type=float,
                   help="plan the step with the retention regulariser on (any value > 0 compiles "
                        f"the same program) {default('retention_weight')}")
    p.add_argument("--retention-batch-size", type=int,
                   help=f"retention prompts per micro-batch {default('retention_batch_size')}")
    p.add_argument("--retention-len", type=int, default=shape_default.retention_len,
                   help="tokens of the longest retention row (general prompt + the base model's "
                        "answer)")
    p.add_argument("--retention-answer-len", type=int, default=shape_default.retention_answer_len,
                   help="tokens of the longest base-model answer on a retention row, end of turn "
                        "included")
    p.add_argument("--teacher-cached", action="store_true",
                   help="plan the step that reads the teacher's cached states instead of running "
                        "the teacher (what train does when they fit teacher_cache_gb)")
    p.add_argument("--sample-batch", type=int, default=shape_default.sample_batch,
                   help="prompts the sampler decodes at once; 0 = no sampler plan")
    p.add_argument("--prompt-len", type=int, default=shape_default.prompt_len,
                   help="tokens of the longest prompt the sampler prefills")
    p.add_argument("--max-new-tokens", type=int, default=shape_default.max_new_tokens,
                   help="tokens the sampler decodes per prompt")
    p.add_argument("--json", action="store_true", help="print the plan as JSON (for scripts)")


def read_config(spec: str):
    """The ModelConfig of a Hugging Face folder or of a config.json file."""
    from pdistill_jax.config import ModelConfig

    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"--model {spec}: no config.json there; pass a Hugging Face model "
                                "folder or the path of its config.json")
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a JSON config ({e}); pass a Hugging Face config.json") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{path}: not a Hugging Face config (a JSON object); pass its config.json")
    return ModelConfig.from_hf(hf, str(path))


def cpu_devices(n: int) -> list:
    """The first n CPU devices, asking JAX for n fake ones if its CPU backend has not started
    (`jax_num_cpu_devices`, the config form of XLA_FLAGS=--xla_force_host_platform_device_count,
    is read once, when the backend starts)."""
    import jax

    if n < 1:
        raise ValueError(f"--devices must be >= 1, got {n}")
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # already started: plan on what it has, if that is enough
        pass
    devices = jax.devices("cpu")
    if len(devices) < n:
        raise ValueError(f"--devices {n}: JAX already started with {len(devices)} CPU devices in "
                         f"this process; run pdistill plan in a fresh process (or set "
                         f"XLA_FLAGS={DEVICE_FLAG}={n} before JAX starts)")
    return devices[:n]


def resolve(args: argparse.Namespace):
    """(ModelConfig, TrainConfig, PlanShapes) from the flags, TrainConfig's defaults beneath."""
    from pdistill_jax.commands.train import LORA_FLAGS, TRAIN_FLAGS, resolve_config
    from pdistill_jax.train.plan import PlanShapes

    model_cfg = read_config(args.model)
    # train's own resolution: the flags plan shares with train override TrainConfig's defaults
    train_args = argparse.Namespace(config=None, **{name: getattr(args, name, None)
                                                    for name in TRAIN_FLAGS + LORA_FLAGS})
    if train_args.retention_weight:  # the plan reads no prompts: its rows' lengths are flags
        train_args.retention_prompts = "builtin:general_prompts.jsonl"
    cfg = resolve_config(train_args, None)
    shapes = PlanShapes(teacher_len=args.teacher_len or cfg.max_seq_len,
                        student_len=args.student_len, answer_len=args.answer_len,
                        teacher_cached=args.teacher_cached, sample_batch=args.sample_batch,
                        prompt_len=args.prompt_len, max_new_tokens=args.max_new_tokens,
                        retention_len=args.retention_len,
                        retention_answer_len=args.retention_answer_len)
    return model_cfg, cfg, shapes


def main(args: argparse.Namespace) -> int:
    model_cfg, cfg, shapes = resolve(args)
    devices = cpu_devices(args.devices)
    from pdistill_jax.train.plan import format_plan, plan

    result = plan(model_cfg, cfg, shapes, devices, hbm_gib=args.hbm_gib)
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_plan(result))
    return 0

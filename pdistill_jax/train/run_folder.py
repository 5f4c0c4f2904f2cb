"""The training run folder (RUN): its layout, its config.yaml, and the checks before a run writes there.

  config.yaml     the resolved TrainConfig, the model and the data (with its sha256)
  metrics.jsonl   one row per optimizer step: step, epoch, loss, grad_norm, lr, answer_tokens,
                  examples_per_s and elapsed (both measured over the log window of that step)
  checkpoints/    Orbax checkpoints of the trainable state (see checkpoint.py)
  adapter/        the final adapter as a PEFT folder (`pdistill answer --adapter RUN`, peft, vLLM)
  summary.json    counts, losses and timings of the run (with a dev set: its losses too)
  dev_best/       with dev_share > 0: the adapter of the lowest dev loss so far, which becomes
  dev_best.json   adapter/ at the end; the json names its step
  retention.jsonl with retention_weight > 0: the base model's answers to the retention prompts
                  (made before the first step, reused on resume; see retention.py)
"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import jax

from pdistill_jax.config import read_yaml
from pdistill_jax.files import write_yaml_atomic
from pdistill_jax.weights.peft import resolve_adapter

CONFIG_FILE, METRICS_FILE, SUMMARY_FILE = "config.yaml", "metrics.jsonl", "summary.json"
CHECKPOINT_DIR, ADAPTER_DIR = "checkpoints", "adapter"
RETENTION_FILE = "retention.jsonl"
DEV_BEST_DIR, DEV_BEST_FILE = "dev_best", "dev_best.json"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_run_config(out_dir: str | Path) -> dict | None:
    """RUN/config.yaml as a dict ({"model", "data", "train": {...}, ...}), None if absent."""
    path = Path(out_dir) / CONFIG_FILE
    if not path.exists():
        return None
    return read_yaml(path)[0]


def write_run_config(out: Path, run_config: dict) -> None:
    """RUN/config.yaml (keys in the given order), written by process 0 only."""
    if jax.process_index() == 0:
        write_yaml_atomic(out / CONFIG_FILE, run_config)


def check_out_dir(out: Path, resume: bool) -> None:
    """Refuses to start a new run in a folder that holds one (a resume continues it)."""
    markers = [n for n in (CHECKPOINT_DIR, METRICS_FILE, CONFIG_FILE, SUMMARY_FILE)
               if (out / n).exists() and not (n == CHECKPOINT_DIR and not any((out / n).iterdir()))]
    if markers and not resume:
        raise ValueError(f"--out {out} already holds a training run ({', '.join(markers)}); pass "
                         "--resume to continue it, or choose a new --out")


def remove_unstarted_run(out: Path, fresh: bool) -> None:
    """After a new run failed before its first checkpoint (a bad model, a batch that does not fit
    the mesh, ...), removes what it wrote, so that the same command, fixed, can run again without
    --resume. A run with a checkpoint is kept: --resume continues it. fresh: RUN did not exist
    before this run, so all of it goes."""
    directory = out / CHECKPOINT_DIR
    if jax.process_index() != 0 or (directory.is_dir() and any(
            p.name.isdigit() for p in directory.iterdir())):
        return
    if fresh:
        shutil.rmtree(out, ignore_errors=True)
        return
    shutil.rmtree(directory, ignore_errors=True)
    for name in (CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, RETENTION_FILE, DEV_BEST_FILE):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / DEV_BEST_DIR, ignore_errors=True)


def training_system_message(adapter_path) -> str | None:
    """The system message a training run's adapter was trained with (its run folder's
    config.yaml), None for the chat template's default or a bare PEFT folder. The student learned
    its answers under that message, so it should be asked under the same one."""
    folder = resolve_adapter(adapter_path)
    run = folder.parent if folder.name == ADAPTER_DIR else folder
    conf = read_run_config(run) or {}
    return (conf.get("train") or {}).get("system")

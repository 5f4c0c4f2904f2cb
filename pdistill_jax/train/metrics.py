"""RUN/metrics.jsonl: one row per optimizer step, written a log window at a time, and trimmed on resume."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from pdistill_jax.files import write_jsonl_atomic


# loss = distill_loss + ce_weight * ce_loss + hidden_weight * hidden_loss
#        + retention_weight * retention_loss (train/step.py)
LOSS_PARTS = ("distill_loss", "ce_loss", "hidden_loss", "retention_loss")


class NonFiniteLoss(RuntimeError):
    """A step's loss, gradient or weights are inf or NaN; train() turns it into a one-line error."""

    def __init__(self, step: int, what: str):
        super().__init__(f"step {step}: {what}")
        self.step, self.what = step, what


class MetricsLog:
    """Buffers per-step device metrics and writes them every `every` steps, so the host waits on
    the device once per log window instead of once per step."""

    def __init__(self, path: Path, steps_per_epoch: int, every: int, elapsed0: float, bar):
        self.path, self.spe, self.every, self.bar = path, steps_per_epoch, max(1, every), bar
        self.elapsed0, self.session_start = elapsed0, time.perf_counter()
        self.pending: list[tuple[int, int, Any]] = []
        self.window_start = self.session_start

    def add(self, step: int, examples: int, metrics: Any) -> None:
        self.pending.append((step, examples, metrics))
        if step % self.every == 0:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        values = jax.device_get([m for _, _, m in self.pending])  # waits for the device
        now = time.perf_counter()
        window = max(now - self.window_start, 1e-9)
        rate = sum(e for _, e, _ in self.pending) / window
        elapsed = self.elapsed0 + now - self.session_start
        rows = [{"step": step, "epoch": round(step / self.spe, 4), "loss": float(v["loss"]),
                 # the loss's parts, only in a step that has them (TrainConfig.ce_weight,
                 # hidden_weight, retention_weight): without them the rows are as they were
                 **{k: float(v[k]) for k in LOSS_PARTS if k in v},
                 "grad_norm": float(v["grad_norm"]), "lr": float(v["lr"]),
                 "answer_tokens": int(v["answer_tokens"]), "examples_per_s": round(rate, 3),
                 "elapsed": round(elapsed, 3)}
                for (step, _, _), v in zip(self.pending, values)]
        bad = next((r for r in rows if not np.isfinite([r["loss"], r["grad_norm"]]).all()), None)
        if bad is not None:  # log the good steps only; the caller saves nothing after this
            rows = rows[:rows.index(bad)]
            self.pending = []
        if jax.process_index() == 0:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write("".join(json.dumps(r) + "\n" for r in rows))
        if bad is not None:
            raise NonFiniteLoss(bad["step"], f"the loss is {bad['loss']} (gradient norm "
                                             f"{bad['grad_norm']})")
        self.bar.set_postfix(loss=f"{np.mean([r['loss'] for r in rows]):.4f}",
                             ex_s=f"{rate:.1f}", refresh=False)
        self.pending, self.window_start = [], now

    @property
    def elapsed(self) -> float:
        return self.elapsed0 + time.perf_counter() - self.session_start


def trim_metrics(path: Path, last_step: int) -> None:
    """Drops rows logged after the checkpoint we resume from (those steps are redone), and a last
    line torn by a kill in the middle of a write."""
    if jax.process_index() != 0 or not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = []
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):
                break
            raise ValueError(f"{path}:{n}: invalid JSON in the middle of the metrics log; "
                             "the run folder was edited or is damaged") from None
        if row.get("step", 0) <= last_step:
            kept.append(row)
    if len(kept) != len(lines):
        write_jsonl_atomic(path, kept)

"""The frozen teacher's final hidden states at the answer positions, computed once per run.

The teacher is the base model with the adapter off and never changes during training, so what it
computes for a row is the same in every epoch. Running it once per row and keeping its final
hidden states at the answer positions (answer tokens x hidden size per row: ~40 MB for the demo's
276 rows on SmolLM2-135M) leaves each step only the student's forward and backward and the two LM
heads. Hidden states rather than logits: they are ~85x smaller than 49k-vocabulary logits, and
the LM head applied in the step is the same function the step would apply anyway, so the loss is
the one the uncached step computes (up to float rounding order).
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import numpy as np

from .data import Example, collate
from .step import TEACHER_HIDDEN, TEACHER_KEYS


def teacher_cache_bytes(examples: Sequence[Example], hidden_size: int, dtype) -> int:
    return sum(len(e.targets) for e in examples) * hidden_size * np.dtype(dtype).itemsize


def compute_teacher_cache(examples: Sequence[Example], rows: int,
                          hidden_fn: Callable[[dict], jax.Array],
                          to_global: Callable[[dict], dict], pad_id: int = 0,
                          progress: Callable[[int], None] | None = None) -> list[np.ndarray]:
    """Per example, the teacher's hidden states at its answer positions, (answer tokens, D).

    hidden_fn maps a global teacher batch of `rows` rows to (rows, A, D) (step.make_teacher_hidden
    with the state bound); to_global turns the numpy batch into global arrays (this process's rows).
    Rows of similar teacher length are batched together, so padding stays small.
    """
    order = np.argsort([len(e.teacher) for e in examples], kind="stable")
    cache: list[np.ndarray | None] = [None] * len(examples)
    for start in range(0, len(order), rows):
        idx = order[start:start + rows]
        batch = collate(examples, idx, rows, pad_id)
        hidden = hidden_fn(to_global({k: batch[k] for k in TEACHER_KEYS}))
        if jax.process_count() > 1:
            from jax.experimental.multihost_utils import process_allgather
            hidden = process_allgather(hidden, tiled=True)
        hidden = np.asarray(hidden)
        for r, i in enumerate(idx):
            cache[i] = hidden[r, :len(examples[i].targets)].copy()
        if progress is not None:
            progress(len(idx))
    return cache  # type: ignore[return-value]


def attach_teacher_hidden(batch: dict[str, np.ndarray], indices: Sequence[int],
                          cache: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """The batch with the cached teacher hidden states (rows, A, D) in place of the teacher's
    tokens; filler rows and padded answer positions are zero (they are masked in the loss)."""
    rows, width = batch["targets"].shape
    first = cache[indices[0]]
    hidden = np.zeros((rows, width, first.shape[-1]), first.dtype)
    for r, i in enumerate(indices):
        hidden[r, :len(cache[i])] = cache[i]
    out = {k: v for k, v in batch.items() if k not in TEACHER_KEYS}
    out[TEACHER_HIDDEN] = hidden
    return out

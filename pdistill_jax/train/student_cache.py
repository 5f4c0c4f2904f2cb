"""The states entering the adapter's first layer over every student sequence, computed once per run.

With an adapter on the upper layers only (`LoraConfig.first_layer` > 0), the layers below run
with the adapter off: what they compute for a row's student tokens is the same in every step.
Computing it once per row and keeping it (student tokens x hidden size per row) leaves each step
the adapter's layers alone, forward and backward: with the adapter on the top third, about a
third of the student's work. The states are computed with the batch's shared student prefix
attended, exactly as the step would, so the loss is the one the uncached step computes (up to
float rounding order).
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import numpy as np

from pdistill_jax.train.batches import Example, states_per_row
from pdistill_jax.train.step import STUDENT_LOWER


def student_cache_bytes(examples: Sequence[Example], student_prefix: int, hidden_size: int,
                        dtype) -> int:
    return sum(len(e.student) - student_prefix for e in examples) * hidden_size * \
        np.dtype(dtype).itemsize


def compute_student_cache(examples: Sequence[Example], rows: int,
                          lower_fn: Callable[[dict], jax.Array],
                          to_global: Callable[[dict], dict], pad_id: int = 0,
                          student_prefix: int = 0) -> list[np.ndarray]:
    """Per example, the states entering layer first_layer over its student tokens after the
    shared prefix, (tokens, D). lower_fn maps a global batch of `rows` rows to (rows, Ts, D)
    (step.make_student_lower with the state bound); to_global as in compute_teacher_cache.
    Rows of similar length are batched together, so padding stays small."""
    return states_per_row(examples, rows, lambda e: len(e.student),
                          ("student_tokens", "student_valid"), lower_fn, to_global,
                          lambda e: len(e.student) - student_prefix, pad_id, student_prefix)


def attach_student_lower(batch: dict[str, np.ndarray], indices: Sequence[int],
                         cache: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """The batch with the cached lower-layer states (rows, Ts, D) beside its student tokens;
    padding and filler rows are zero (masked as keys, never read as answer positions)."""
    rows, width = batch["student_tokens"].shape
    first = cache[indices[0]]
    states = np.zeros((rows, width, first.shape[-1]), first.dtype)
    for r, i in enumerate(indices):
        states[r, :len(cache[i])] = cache[i]
    return {**batch, STUDENT_LOWER: states}

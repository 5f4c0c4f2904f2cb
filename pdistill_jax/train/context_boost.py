"""Context boost: a distillation target that leans further towards what the document changes.

The teacher is the base model reading the document; the student starts as the base model
without it. Context-aware decoding (Shi et al., 2023) samples from (1 + a) x the logits with the
context - a x the logits without it, which favours the tokens the context makes likely over
the ones the model would say anyway. As a distillation target, that contrast points each
answer token's distribution further along the document's direction than the teacher itself.

Both terms are fixed for a row: the teacher's final hidden states at the answer positions (the
teacher cache) and the base model's at the same answer tokens of the student's prompt (computed
here, once per row). The LM head is linear, so mixing the two hidden states mixes the logits:
the run keeps one array per row, the boosted target, where the teacher cache kept the teacher's,
and a step costs what it did.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import numpy as np

from pdistill_jax.train.batches import Example, states_per_row
from pdistill_jax.train.step import boosted_target


def compute_closed_book_cache(examples: Sequence[Example], rows: int,
                              hidden_fn: Callable[[dict], jax.Array],
                              to_global: Callable[[dict], dict], pad_id: int = 0,
                              student_prefix: int = 0) -> list[np.ndarray]:
    """Per example, the base model's final hidden states at its answer positions over the
    student's prompt, (answer tokens, D). hidden_fn maps a global batch of `rows` rows to
    (rows, A, D) (step.make_closed_book_hidden with the state bound); to_global as in
    teacher_cache.compute_teacher_cache. Rows of similar length are batched together."""
    return states_per_row(examples, rows, lambda e: len(e.student),
                          ("student_tokens", "student_valid", "student_pos"), hidden_fn,
                          to_global, lambda e: len(e.targets), pad_id, student_prefix)


def boost_cache(teacher: Sequence[np.ndarray], closed_book: Sequence[np.ndarray], boost: float
                ) -> list[np.ndarray]:
    """Each row's boosted target states, in the teacher cache's dtype."""
    return [np.asarray(boosted_target(t, c, boost)) for t, c in zip(teacher, closed_book)]

"""The frozen teacher's final hidden states at the answer positions, computed once per run.

The teacher is the base model with the adapter off and never changes during training, so what it
computes for a row is the same in every epoch. Running it once per row and keeping its final
hidden states at the answer positions (answer tokens x hidden size per row) leaves each step
only the student's forward and backward and the two LM heads. Hidden states rather than logits:
they are far smaller than a large vocabulary's logits, and
the LM head applied in the step is the same function the step would apply anyway, so the loss is
the one the uncached step computes (up to float rounding order).

Generation computes the very same states while it samples the answers, so `pdistill generate`
keeps them beside qa.jsonl (datagen/teacher_states.py), keyed by a hash of the model, the dtype
and the whole teacher sequence. Training takes every row whose re-tokenised teacher sequence hashes the
same and runs the teacher only for the rest (a different system prompt, a truncated document,
an answer that re-tokenises differently, another model or dtype).
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pdistill_jax.train.batches import Example, states_per_row
from pdistill_jax.model.prefill import pack_prefill, plan_prefill, prefill, prefill_rows
from pdistill_jax.train.step import TEACHER_HIDDEN, TEACHER_KEYS


def teacher_cache_bytes(examples: Sequence[Example], hidden_size: int, dtype) -> int:
    return sum(len(e.targets) for e in examples) * hidden_size * np.dtype(dtype).itemsize


def compute_teacher_cache(examples: Sequence[Example], rows: int,
                          hidden_fn: Callable[[dict], jax.Array],
                          to_global: Callable[[dict], dict], pad_id: int = 0) -> list[np.ndarray]:
    """Per example, the teacher's hidden states at its answer positions, (answer tokens, D).

    hidden_fn maps a global teacher batch of `rows` rows to (rows, A, D) (step.make_teacher_hidden
    with the state bound); to_global turns the numpy batch into global arrays (this process's rows).
    Rows of similar teacher length are batched together, so padding stays small.
    """
    return states_per_row(examples, rows, lambda e: len(e.teacher), TEACHER_KEYS, hidden_fn,
                          to_global, lambda e: len(e.targets), pad_id)


@partial(jax.jit, static_argnames=("graphdef",))
def _prefix_shared_hidden(graphdef, lora, base, tokens, valid, src, suffix, suffix_valid, gather):
    model = nnx.merge(graphdef, lora, base)
    hidden, *_ = prefill(model, tokens, valid, src, suffix, suffix_valid, 0, use_lora=False)
    return jnp.take_along_axis(hidden, gather[..., None], axis=1)


def compute_teacher_cache_shared(examples: Sequence[Example], rows: int, graphdef, lora, base
                                 ) -> list[np.ndarray]:
    """As compute_teacher_cache, on one process, with every document prefilled once per batch.

    The teacher rows of one document differ only after the document (the question and the
    answer), so rows are sorted by prompt, and each batch's shared prefixes go through the model
    once (model/prefill.py, as the sampler does) before each row's own question and answer: for
    the demo's 12 questions a document this is about a third of the teacher's work.
    """
    order = sorted(range(len(examples)),
                   key=lambda i: tuple(examples[i].teacher[:examples[i].teacher_prompt_len]))
    cache: list[np.ndarray | None] = [None] * len(examples)
    answers = max(len(e.targets) for e in examples)  # one gather width: one shape fewer to compile
    for start in range(0, len(order), rows):
        idx = order[start:start + rows]
        chosen = [examples[i] for i in idx]
        # The plan is made on the prompts, so a cut never passes the last prompt token, whose
        # hidden state predicts the first answer token.
        prefixes, src, _ = plan_prefill(
            [tuple(e.teacher[:e.teacher_prompt_len]) for e in chosen], rows)
        shared = len(prefixes) != len(chosen)
        if shared:
            cuts = [len(prefixes[src[r]]) for r in range(len(chosen))]
            suffixes = [tuple(e.teacher[cut:]) for e, cut in zip(chosen, cuts)]
            last = [len(s) for s in suffixes]
        else:  # nothing shared: each row whole, as one prefix
            prefixes, cuts = [tuple(e.teacher) for e in chosen], [len(e.teacher) for e in chosen]
            src, suffixes = np.arange(len(chosen)), [()] * len(chosen)
            last = [len(e.teacher) for e in chosen]
        tokens, valid, src, suffix, suffix_valid = pack_prefill(
            prefixes, src, suffixes, rows, prefill_rows(len(prefixes), rows) if shared else rows)
        width = suffix.shape[1] if shared else tokens.shape[1]
        gather = np.zeros((rows, answers), np.int32)
        for r, (e, cut, n) in enumerate(zip(chosen, cuts, last)):
            # position p of the teacher sequence sits at slot width - n + (p - start of stage)
            stage_start = cut if shared else 0
            pos = e.teacher_prompt_len - 1 + np.arange(len(e.targets))
            gather[r, :len(e.targets)] = width - n + pos - stage_start
        hidden = np.asarray(_prefix_shared_hidden(
            graphdef, lora, base, tokens, valid, src, suffix, suffix_valid, gather))
        for r, i in enumerate(idx):
            cache[i] = hidden[r, :len(examples[i].targets)].copy()
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

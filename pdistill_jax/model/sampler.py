"""Batched, jit-compiled generation with a KV cache: greedy, temperature, top-k, top-p.

Each row draws from its own key, folded from the seed and the row's index in the caller's list,
so a row's sample does not depend on what else shares its slots. Prompts are sorted by content,
so the prefixes they share sit together and are prefilled once (`model/prefill.py`): one
document with several questions (the teacher's answers, RAG), one prompt sampled several times
(question calls). Rows decode through continuous batching slots (`model/slots.py`): a row that
ends makes room for the next at once.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
from flax import nnx

from pdistill_jax.config import SamplingParams
from pdistill_jax.model.prefill import PROMPT_MIN_WIDTH, bucket_length
from pdistill_jax.model.slots import lower_decode, row_key_data, run_in_slots
from pdistill_jax.model.transformer import Transformer


@dataclasses.dataclass(frozen=True)
class Completion:
    tokens: list[int]  # generated ids, end token excluded
    finished: bool  # False when cut at max_new_tokens
    # With generate(keep_hidden=True): the final hidden states (len(tokens) + 1, D) from which
    # each generated token, and then the end token, was predicted.
    hidden: np.ndarray | None = dataclasses.field(default=None, compare=False)  # arrays: no ==


def lower_generate_batch(graphdef: nnx.GraphDef, state: nnx.State, params: SamplingParams, *,
                         cfg, dtype, batch_size: int, prompt_len: int, use_lora: bool = True,
                         input_sharding=None):
    """The decode program `generate` runs over `batch_size` slots for prompts of up to
    `prompt_len` tokens, lowered for `state` without running it: `state` may hold
    jax.ShapeDtypeStructs with their shardings (`pdistill plan` passes them). `input_sharding`
    places the slots' state (None: JAX's default device). A prefilled group of as many rows
    waits beside it (`model/slots.py`)."""
    width = bucket_length(prompt_len, PROMPT_MIN_WIDTH)  # as `left_padded` pads a group
    return lower_decode(graphdef, state, cfg, dtype, batch_size=batch_size,
                        slot_len=width + params.max_new_tokens, max_new=params.max_new_tokens,
                        top_k=int(params.top_k), use_top_p=params.top_p < 1.0, use_lora=use_lora,
                        sampled=params.temperature > 0, input_sharding=input_sharding)


@dataclasses.dataclass
class TokenCounts:
    """What the generate calls inside `count_tokens()` did: prompts read, tokens generated (an
    end token counts: it was decoded), and the slot steps decoding ran (batch size x decode
    steps); new_tokens / slot_steps is how much of that work was used (the rest: slots idle at
    the end of a call, with no row left to enter them)."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    slot_steps: int = 0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


_COUNTS: contextvars.ContextVar[TokenCounts | None] = contextvars.ContextVar("counts", default=None)


@contextlib.contextmanager
def count_tokens() -> Iterator[TokenCounts]:
    """Counts the work of every `generate` call made inside it (for per-stage throughput)."""
    counts = TokenCounts()
    token = _COUNTS.set(counts)
    try:
        yield counts
    finally:
        _COUNTS.reset(token)


def batch_rows(prompts: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """The prompt indices of each group `generate` prefills together: prompts sorted by content,
    so that the prefixes they share sit together, batch_size at a time (`generate` then runs the
    groups with the longest row limit first)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    keyed = [tuple(p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: keyed[i])
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def generate(model: Transformer, prompts: Sequence[Sequence[int]], params: SamplingParams, *,
             end_ids: Sequence[int], seed: int = 0, batch_size: int = 16, use_lora: bool = True,
             temperatures: Sequence[float] | None = None,
             max_new_tokens: Sequence[int] | None = None,
             row_keys: Sequence[tuple[int, int]] | None = None, keep_hidden: bool = False,
             progress: Callable[[int], None] | None = None) -> list[Completion]:
    """Completions for `prompts` (lists of token ids), in input order.

    `temperatures` and `max_new_tokens`, one per prompt, override params.temperature and
    params.max_new_tokens row by row (the same prompt sampled hot and cold shares its prefill;
    short answers and long restatements share the decode slots). `row_keys`, one (seed, index)
    per prompt: the row samples as row `index` of a call with that seed would (default: (seed,
    its own index)), so that several calls' rows can share one call's slots. keep_hidden: each
    completion also carries the final hidden states its tokens were drawn from (the
    distillation teacher's, when the prompt holds the document). `progress(n)` is called with
    the number of rows finished each time a group of them has.
    """
    results: list[Completion | None] = [None] * len(prompts)
    for _, rows, completions in generate_batches(
            model, prompts, params, end_ids=end_ids, seed=seed, batch_size=batch_size,
            use_lora=use_lora, temperatures=temperatures, max_new_tokens=max_new_tokens,
            row_keys=row_keys, keep_hidden=keep_hidden):
        for i, c in zip(rows, completions):
            results[i] = c
        if progress is not None:
            progress(len(rows))
    return results  # type: ignore[return-value]


def generate_batches(model: Transformer, prompts: Sequence[Sequence[int]], params: SamplingParams,
                     *, end_ids: Sequence[int], seed: int = 0, batch_size: int = 16,
                     use_lora: bool = True, temperatures: Sequence[float] | None = None,
                     max_new_tokens: Sequence[int] | None = None,
                     row_keys: Sequence[tuple[int, int]] | None = None, keep_hidden: bool = False,
                     batches: Iterable[int] | None = None
                     ) -> Iterator[tuple[int, list[int], list[Completion]]]:
    """`generate`, a group at a time: (group number in `batch_rows`, its prompt indices, their
    completions) as each group's rows have all ended. The groups are prefilled one after another
    (those with the longest max_new_tokens first) and decoded through `batch_size` continuous
    slots (`model/slots.py`). `batches` (group numbers) runs only those, in that order; a row's
    completion is the same whichever others run, since its group, its key and its padding are
    those of the whole call (processes of a cluster each run a share)."""
    plan = batch_rows(prompts, batch_size)
    if any(len(p) == 0 for p in prompts):
        raise ValueError("an empty prompt cannot be continued; every prompt needs at least one token")
    for name, values in (("temperatures", temperatures), ("max_new_tokens", max_new_tokens),
                         ("row_keys", row_keys)):
        if values is not None and len(values) != len(prompts):
            raise ValueError(f"{len(values)} {name} for {len(prompts)} prompts; give one per "
                             "prompt or none")
    limits = (np.full(len(prompts), params.max_new_tokens) if max_new_tokens is None
              else np.asarray(max_new_tokens))
    if len(limits) and (limits < 1).any():
        raise ValueError(f"max_new_tokens must be >= 1 for every prompt, got {int(limits.min())}")
    seeds, indices = ((np.full(len(prompts), seed), np.arange(len(prompts))) if row_keys is None
                      else (np.array([s for s, _ in row_keys]), np.array([i for _, i in row_keys])))
    keys = row_key_data(seeds, indices)
    if batches is None:  # groups with long rows first, so that they do not end the call alone
        batches = sorted(range(len(plan)), key=lambda n: -int(limits[plan[n]].max()))
    return _run(model, prompts, params, plan, list(batches), end_ids, keys, batch_size, use_lora,
                temperatures, limits.astype(np.int32), keep_hidden)


def _run(model, prompts, params, plan, batches, end_ids, keys, batch_size, use_lora, temperatures,
         limits, keep_hidden) -> Iterator[tuple[int, list[int], list[Completion]]]:
    temps = np.full(len(prompts), params.temperature, np.float32) if temperatures is None else \
        np.asarray(temperatures, np.float32)
    # All greedy: decoding compiles argmax alone. Decided over the whole call, not the groups
    # run, so that a share of them compiles (and computes) what the whole call does.
    sampled = bool(np.any(temps > 0))
    end_set = set(int(e) for e in end_ids)
    keyed = [tuple(p) for p in prompts]
    counts = _COUNTS.get()

    def steps_run(n):
        if counts is not None:
            counts.slot_steps += batch_size * n

    for group in run_in_slots(model, keyed, plan, batches, temps=temps, limits=limits, keys=keys,
                              end_ids=end_ids, batch_size=batch_size,
                              use_lora=use_lora, top_k=int(params.top_k), top_p=params.top_p,
                              sampled=sampled, keep_hidden=keep_hidden, on_steps=steps_run):
        completions = []
        for tokens, hidden in zip(group.tokens, group.hidden):
            seq = [int(t) for t in tokens]
            cut = next((j for j, t in enumerate(seq) if t in end_set), None)
            seq = seq if cut is None else seq[:cut]
            completions.append(Completion(seq, cut is not None,
                                          None if hidden is None else hidden[:len(seq) + 1]))
        if counts is not None:
            counts.prompt_tokens += sum(len(keyed[i]) for i in group.rows)
            counts.new_tokens += sum(len(t) for t in group.tokens)
        yield group.number, group.rows, completions

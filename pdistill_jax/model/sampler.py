"""Batched, jit-compiled generation with a KV cache: greedy, temperature, top-k, top-p.

Each row draws from its own key, folded from the seed and the row's index in the caller's list,
so a row's sample does not depend on what else shares its batch. Prompts are sorted by content,
so the prefixes they share sit together and are prefilled once (`model/prefill.py`): one
document with several questions (the teacher's answers, RAG), one prompt sampled several times
(question calls).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from functools import partial
from typing import Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pdistill_jax.config import SamplingParams
from pdistill_jax.model.prefill import (PROMPT_MIN_WIDTH, bucket_length, pack_prefill,
                                        plan_prefill, prefill, prefill_rows)
from pdistill_jax.model.transformer import Transformer


@dataclasses.dataclass(frozen=True)
class Completion:
    tokens: list[int]  # generated ids, end token excluded
    finished: bool  # False when cut at max_new_tokens
    # With generate(keep_hidden=True): the final hidden states (len(tokens) + 1, D) from which
    # each generated token, and then the end token, was predicted.
    hidden: np.ndarray | None = dataclasses.field(default=None, compare=False)  # arrays: no ==


def _top_p_mask(sorted_logits: jax.Array, top_p) -> jax.Array:
    """Keep the smallest prefix of descending logits whose mass reaches top_p (at least one)."""
    probs = jax.nn.softmax(sorted_logits)
    return (jnp.cumsum(probs) - probs) < top_p


def _choose(logits: jax.Array, key: jax.Array, temperature, top_k: int, use_top_p: bool, top_p):
    """Next token for one row. Greedy and sampling share one compiled path.

    With top-k, the draw is made among the k candidates only: Gumbel noise over the whole
    vocabulary at every step costs as much as the model's decode step itself.
    """
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits)
    scaled = logits / jnp.maximum(temperature, 1e-6)
    if top_k:
        values, candidates = jax.lax.top_k(scaled, top_k)  # descending
        if use_top_p:
            values = jnp.where(_top_p_mask(values, top_p), values, -jnp.inf)
        sampled = candidates[jax.random.categorical(key, values)]
    else:
        if use_top_p:
            order = jnp.argsort(-scaled)
            keep = jnp.zeros(scaled.shape, bool).at[order].set(_top_p_mask(scaled[order], top_p))
            scaled = jnp.where(keep, scaled, -jnp.inf)
        sampled = jax.random.categorical(key, scaled)
    return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)


@partial(jax.jit, static_argnames=("graphdef", "max_new", "top_k", "use_top_p", "use_lora",
                                   "sampled", "keep_hidden"))
def _generate_batch(graphdef, state, tokens, valid, src, suffix, suffix_valid, keys, end_ids,
                    temperature, top_p, *, max_new: int, top_k: int, use_top_p: bool,
                    use_lora: bool, sampled: bool, keep_hidden: bool = False):
    """tokens, valid (U, P): the distinct prompt prefixes; src (B,): the prefix row each output
    row continues; suffix, suffix_valid (B, S): each row's own rest of the prompt (S = 0: none);
    keys, temperature (B,): per output row. Returns (B, max_new) ids, -1 after the end, and with
    keep_hidden the final hidden states (B, max_new + 1, D) each step's token was drawn from
    (the last: after the last token), else None.

    sampled=False (every row greedy) compiles argmax alone: the sampling branch, computed and
    discarded for greedy rows, slows every decode step."""
    model: Transformer = nnx.merge(graphdef, state)
    p, s = tokens.shape[1], suffix.shape[1]
    b = src.shape[0]
    hidden, positions, cache, key_valid = prefill(model, tokens, valid, src, suffix, suffix_valid,
                                                  max_new, use_lora)
    logits = model.logits(hidden[:, -1], use_lora)  # left padding: the last slot is real
    last = positions[:, -1]
    choose = jax.vmap(_choose, in_axes=(0, 0, 0, None, None, None))
    start = p + s

    def cond(carry):
        i, *_, done = carry
        return (i < max_new) & ~jnp.all(done)

    def body(carry):
        i, cache, key_valid, logits, pos, out, done, kept = carry
        if sampled:
            step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, i)
            tok = choose(logits, step_keys, temperature, top_k, use_top_p, top_p)
        else:
            tok = jnp.argmax(logits.astype(jnp.float32), axis=-1).astype(jnp.int32)
        tok = jnp.where(done, 0, tok)
        out = out.at[:, i].set(jnp.where(done, -1, tok))
        done = done | jnp.isin(tok, end_ids)
        key_valid = key_valid.at[:, start + i].set(True)
        hidden, cache = model(tok[:, None], pos[:, None], key_valid, cache=cache,
                              cache_index=start + i, use_lora=use_lora)
        if keep_hidden:
            kept = kept.at[:, i + 1].set(hidden[:, 0])
        return (i + 1, cache, key_valid, model.logits(hidden[:, 0], use_lora), pos + 1, out, done,
                kept)

    out = jnp.full((b, max_new), -1, jnp.int32)
    done = jnp.zeros((b,), bool)
    kept = (jnp.zeros((b, max_new + 1, hidden.shape[-1]), hidden.dtype).at[:, 0].set(hidden[:, -1])
            if keep_hidden else jnp.zeros((), hidden.dtype))
    carry = (jnp.int32(0), cache, key_valid, logits, last + 1, out, done, kept)
    final = jax.lax.while_loop(cond, body, carry)
    return final[5], (final[7] if keep_hidden else None)


def lower_generate_batch(graphdef: nnx.GraphDef, state: nnx.State, params: SamplingParams, *,
                         batch_size: int, prompt_len: int, use_lora: bool = True,
                         input_sharding=None):
    """The program `generate` runs for one batch of `batch_size` distinct prompts of up to
    `prompt_len` tokens (prefill, then the decode loop), lowered for `state` without running it:
    `state` may hold jax.ShapeDtypeStructs with their shardings (`pdistill plan` passes them).
    `input_sharding` places the small per-batch inputs (None: JAX's default device)."""
    width = bucket_length(prompt_len, PROMPT_MIN_WIDTH)  # as `left_padded` pads a batch
    b = batch_size

    def arg(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=input_sharding)

    keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), b))
    return _generate_batch.lower(
        graphdef, state, arg((b, width), jnp.int32), arg((b, width), bool), arg((b,), jnp.int32),
        arg((b, 0), jnp.int32), arg((b, 0), bool), arg(keys.shape, keys.dtype),
        arg((1,), jnp.int32), arg((b,), jnp.float32), arg((), jnp.float32),
        max_new=params.max_new_tokens, top_k=int(params.top_k), use_top_p=params.top_p < 1.0,
        use_lora=use_lora, sampled=params.temperature > 0)


@dataclasses.dataclass
class TokenCounts:
    """What the generate calls inside `count_tokens()` did: prompts read, tokens generated (an
    end token counts: it was decoded), and the batch slots the decode steps ran, i.e. batch size x
    the longest row's steps summed over batches; new_tokens / slot_steps is how much of the static
    batches' work was used."""

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
    """The prompt indices of each batch `generate` runs, in the order it runs them: prompts sorted
    by content, so that the prefixes they share sit together, batch_size at a time."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    keyed = [tuple(p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: keyed[i])
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def generate(model: Transformer, prompts: Sequence[Sequence[int]], params: SamplingParams, *,
             end_ids: Sequence[int], seed: int = 0, batch_size: int = 16, use_lora: bool = True,
             temperatures: Sequence[float] | None = None, keep_hidden: bool = False,
             progress: Callable[[int], None] | None = None) -> list[Completion]:
    """Completions for `prompts` (lists of token ids), in input order.

    `temperatures`, one per prompt, overrides params.temperature row by row (so the same prompt
    can be sampled hot and cold in one batch, sharing its prefill). keep_hidden: each completion
    also carries the final hidden states its tokens were drawn from (the distillation teacher's,
    when the prompt holds the document). `progress(n)` is called with the number of rows
    finished after each batch.
    """
    results: list[Completion | None] = [None] * len(prompts)
    for _, rows, completions in generate_batches(
            model, prompts, params, end_ids=end_ids, seed=seed, batch_size=batch_size,
            use_lora=use_lora, temperatures=temperatures, keep_hidden=keep_hidden):
        for i, c in zip(rows, completions):
            results[i] = c
        if progress is not None:
            progress(len(rows))
    return results  # type: ignore[return-value]


def generate_batches(model: Transformer, prompts: Sequence[Sequence[int]], params: SamplingParams,
                     *, end_ids: Sequence[int], seed: int = 0, batch_size: int = 16,
                     use_lora: bool = True, temperatures: Sequence[float] | None = None,
                     keep_hidden: bool = False, batches: Iterable[int] | None = None
                     ) -> Iterator[tuple[int, list[int], list[Completion]]]:
    """`generate`, one batch at a time: (batch number in `batch_rows`, its prompt indices, their
    completions) as each batch finishes. `batches` (batch numbers) runs only those, in that
    order; a row's completion is the same whichever others run, since its batch, its key and its
    padding are those of the whole call (processes of a cluster each run a share of them)."""
    plan = batch_rows(prompts, batch_size)
    if any(len(p) == 0 for p in prompts):
        raise ValueError("an empty prompt cannot be continued; every prompt needs at least one token")
    if temperatures is not None and len(temperatures) != len(prompts):
        raise ValueError(f"{len(temperatures)} temperatures for {len(prompts)} prompts; give one "
                         "per prompt or none")
    return _run_batches(model, prompts, params, plan,
                        range(len(plan)) if batches is None else list(batches), end_ids, seed,
                        batch_size, use_lora, temperatures, keep_hidden)


def _run_batches(model, prompts, params, plan, batches, end_ids, seed, batch_size, use_lora,
                 temperatures, keep_hidden) -> Iterator[tuple[int, list[int], list[Completion]]]:
    temps = np.full(len(prompts), params.temperature, np.float32) if temperatures is None else \
        np.asarray(temperatures, np.float32)
    # All greedy: the batches compile argmax alone. Decided over the whole call, not the batches
    # run, so that a share of them compiles (and computes) what the whole call does.
    sampled = bool(np.any(temps > 0))
    graphdef, state = nnx.split(model)
    end = jnp.asarray(sorted(set(end_ids)), jnp.int32)
    end_set = set(int(e) for e in end_ids)
    base_key = jax.random.key(seed)
    keyed = [tuple(p) for p in prompts]
    for number in batches:
        idx = plan[number]
        prefixes, row_src, suffixes = plan_prefill([keyed[i] for i in idx], batch_size)
        packed = pack_prefill(prefixes, row_src, suffixes, batch_size,
                              prefill_rows(len(prefixes), batch_size))
        row_temps = np.zeros(batch_size, np.float32)
        row_temps[:len(idx)] = temps[idx]
        rows = np.array(idx + [0] * (batch_size - len(idx)))
        keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(base_key, jnp.asarray(rows))
        out, kept = _generate_batch(
            graphdef, state, *(jnp.asarray(a) for a in packed), keys, end,
            jnp.asarray(row_temps), jnp.float32(params.top_p),
            max_new=params.max_new_tokens, top_k=int(params.top_k),
            use_top_p=params.top_p < 1.0, use_lora=use_lora, sampled=sampled,
            keep_hidden=keep_hidden)
        out, kept = np.asarray(out), (None if kept is None else np.asarray(kept))
        decoded, completions = [], []
        for row, i in enumerate(idx):
            seq = [int(t) for t in out[row] if t >= 0]
            cut = next((j for j, t in enumerate(seq) if t in end_set), None)
            decoded.append(len(seq) if cut is None else cut + 1)
            seq = seq if cut is None else seq[:cut]
            hidden = None if kept is None else kept[row, :len(seq) + 1].copy()
            completions.append(Completion(seq, cut is not None, hidden))
        counts = _COUNTS.get()
        if counts is not None:
            counts.prompt_tokens += sum(len(keyed[i]) for i in idx)
            counts.new_tokens += sum(decoded)
            counts.slot_steps += batch_size * max(decoded)
        yield number, idx, completions

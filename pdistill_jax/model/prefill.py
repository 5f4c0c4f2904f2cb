"""Prefilling a batch of prompts: the padding ladder, the shared-prefix plan, the packed arrays.

Prompts are left-padded into a few bucketed widths (`bucket_length`) so that a handful of
compilations serve any mix of lengths. A prefix shared by several rows (one document, several
questions; one prompt sampled several times) is prefilled once and its KV cache copied to every
row that continues it; each row then prefills only its own rest. The sampler and the teacher
cache both plan with `plan_prefill`, pack with `pack_prefill` and run `prefill`.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pdistill_jax.model.transformer import Transformer, init_cache

PROMPT_MIN_WIDTH = 16  # the narrowest padded prompt (training batches start their ladder at 32)


def bucket_length(n: int, minimum: int) -> int:
    """Padded length for n tokens: powers of two from `minimum` up to 64, then 96, 128, 192, 256,
    384, ... (a 260-token prompt pads to 384, not 512).

    Every size is a power of two or a multiple of 32 (friendly to XLA tiling), sizes above 64
    waste at most a third, and there are only two shapes per octave, which bounds recompilation.
    """
    size = minimum
    while size < n:
        if size < 64:
            size *= 2
        elif size & (size - 1) == 0:
            size = size * 3 // 2  # 64 -> 96, 128 -> 192, ...
        else:
            size = size // 3 * 4  # 96 -> 128, 192 -> 256, ...
    return size


def left_padded(seqs: Sequence[Sequence[int]], rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, bucketed width) ids and validity, each sequence right-aligned; rows beyond the
    sequences are filler with one valid token (their results are discarded)."""
    width = bucket_length(max(len(ids) for ids in seqs), PROMPT_MIN_WIDTH)
    tokens = np.zeros((rows, width), np.int32)
    valid = np.zeros((rows, width), bool)
    for n, ids in enumerate(seqs):
        if ids:
            tokens[n, width - len(ids):] = ids
            valid[n, width - len(ids):] = True
    valid[len(seqs):, -1] = True
    return tokens, valid


def prefill_rows(distinct: int, batch_size: int) -> int:
    """Prompt rows prefilled for a batch with `distinct` different prompts: a power of two, at
    most the batch size, so that only a few shapes are ever compiled."""
    return min(batch_size, 1 << math.ceil(math.log2(max(distinct, 1))))


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def plan_prefill(prompts: Sequence[tuple[int, ...]], batch_size: int
                 ) -> tuple[list[tuple[int, ...]], np.ndarray, list[tuple[int, ...]]]:
    """How to prefill one batch: (distinct prefixes, the prefix index of every row, every row's
    suffix). Rows sharing a long prefix (one document, several questions; one prompt sampled
    several times) get it prefilled once; the suffixes are empty when sharing would not save.

    Consecutive rows (the caller sorts prompts, so shared prefixes are adjacent) form a group
    while their common prefix stays at least a quarter of the first row's length and 16 tokens;
    every suffix keeps at least one token, so every row's own logits come from its suffix.
    The choice is by padded prefill work: prefix rows x width + rows x suffix width, against
    rows x full width for each row on its own.
    """
    groups: list[list[int]] = []
    shared: list[int] = []
    for i, ids in enumerate(prompts):
        if groups:
            first = prompts[groups[-1][0]]
            lcp = min(shared[-1], _common_prefix(first, ids))
            if lcp >= max(16, len(first) // 4):
                groups[-1].append(i)
                shared[-1] = lcp
                continue
        groups.append([i])
        shared.append(len(ids))
    cuts = [min(lcp, min(len(prompts[i]) for i in g) - 1) for g, lcp in zip(groups, shared)]
    prefixes = [prompts[g[0]][:cut] for g, cut in zip(groups, cuts)]
    src = np.zeros(len(prompts), np.int32)
    suffixes: list[tuple[int, ...]] = [()] * len(prompts)
    for n, (g, cut) in enumerate(zip(groups, cuts)):
        for i in g:
            src[i], suffixes[i] = n, prompts[i][cut:]
    width = PROMPT_MIN_WIDTH
    whole = batch_size * bucket_length(max(len(ids) for ids in prompts), width)
    split = (prefill_rows(len(prefixes), batch_size) * bucket_length(max(map(len, prefixes)), width)
             + batch_size * bucket_length(max(map(len, suffixes)), width))
    if len(prefixes) == len(prompts) or split >= whole:
        return list(prompts), np.arange(len(prompts), dtype=np.int32), [()] * len(prompts)
    return prefixes, src, suffixes


class PrefillBatch(NamedTuple):
    """The arrays `prefill` takes, in its order."""

    tokens: np.ndarray  # (prefix rows, P) the distinct prefixes, left-padded
    valid: np.ndarray  # (prefix rows, P)
    src: np.ndarray  # (rows,) the prefix row each row continues (filler rows: 0, discarded)
    suffix: np.ndarray  # (rows, S) each row's own rest, left-padded; S = 0 when nothing is shared
    suffix_valid: np.ndarray  # (rows, S)


def pack_prefill(prefixes: Sequence[Sequence[int]], src: Sequence[int],
                 suffixes: Sequence[Sequence[int]], rows: int, prefix_rows: int) -> PrefillBatch:
    """One batch's arrays: `prefix_rows` rows of prefixes, `rows` rows of src and suffixes (no
    suffix columns when every suffix is empty). The caller chooses prefix_rows, because the
    shapes it compiles for are its own."""
    tokens, valid = left_padded(prefixes, prefix_rows)
    row_src = np.zeros(rows, np.int32)
    row_src[:len(src)] = src
    suffix, suffix_valid = (left_padded(suffixes, rows) if any(suffixes) else
                            (np.zeros((rows, 0), np.int32), np.zeros((rows, 0), bool)))
    return PrefillBatch(tokens, valid, row_src, suffix, suffix_valid)


def prefill(model: Transformer, tokens, valid, src, suffix, suffix_valid, extra_slots: int,
            use_lora: bool):
    """Prefills shared prefixes once and each row's own suffix against them.

    tokens, valid (U, P): the distinct prefixes, left-padded; src (B,): the prefix row each row
    continues; suffix, suffix_valid (B, S): each row's own rest, left-padded (S = 0: none, then
    B = U and src is the identity unless prefixes repeat). Returns the last stage's hidden states
    (B, S or P, D) and positions (B, S or P), and the KV cache and key validity of B rows with
    `extra_slots` free slots after the prompt.
    """
    u, p = tokens.shape
    b, s = suffix.shape[0], suffix.shape[1]
    cache = init_cache(model.cfg, u, p + s + extra_slots, model.dtype)
    key_valid = jnp.zeros((u, p + s + extra_slots), bool).at[:, :p].set(valid)
    positions = jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1, 0)
    hidden, cache = model(tokens, positions, key_valid, cache=cache, cache_index=0, use_lora=use_lora)
    if u != b or s:  # fan the prefixes out to the rows that continue them (else src = identity)
        cache = jax.tree.map(lambda c: jnp.take(c, src, axis=1), cache)
        key_valid, positions, hidden = key_valid[src], positions[src], hidden[src]
    if s:  # each row's suffix, left-padded after its prefix, attends to the shared cache
        key_valid = key_valid.at[:, p:p + s].set(suffix_valid)
        seen = jnp.sum(valid.astype(jnp.int32), axis=1)[src]
        positions = seen[:, None] + jnp.maximum(jnp.cumsum(suffix_valid.astype(jnp.int32), axis=1) - 1, 0)
        hidden, cache = model(suffix, positions, key_valid, cache=cache, cache_index=p,
                              use_lora=use_lora)
    return hidden, positions, cache, key_valid

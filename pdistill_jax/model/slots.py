"""Continuous batching: a fixed set of decode slots that rows flow through.

A static batch decodes until its longest row ends, so short answers wait for long ones (the
demo's sampling stages used 60% of their slots that way; a batch of answers and restatements
less). Here `batch_size` slots decode together; when a row ends, its slot is refilled with the
next prompt, already prefilled, and decoding goes on. A call's cost follows the tokens generated.

Prompts are prefilled a group at a time, the groups being the static sampler's batches
(`sampler.batch_rows`: sorted by content, so the rows of one document share its prefill,
`model/prefill.py`); a prefilled group waits on the side, and its rows enter slots as slots free.
Each slot row keeps its own prefill layout (its group's padded width, then its generated tokens)
and its own write index into the cache (`Transformer`'s per-row `cache_index`), so a row's
numbers do not depend on when it entered or beside whom. Each row draws from its own key,
fold_in(fold_in(key(seed), row index), step), as a static batch's rows always did; a call can
give each row its own (seed, index), so that several logical calls share one set of slots.

The device programs are three: prefill a group (`_prefill_group`), move picked rows of a
prefilled group into free slots (`_insert`), and decode until `want` more slots have freed or
every slot is idle (`_decode`). The host loop between them (`run_in_slots`) is bookkeeping.
"""
from __future__ import annotations

from collections import deque
from functools import partial
from typing import Callable, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pdistill_jax.model.prefill import (PrefillBatch, pack_prefill, plan_prefill, prefill,
                                        prefill_rows)
from pdistill_jax.model.token_choice import choose_tokens
from pdistill_jax.model.transformer import KVCache, init_cache


class Prefilled(NamedTuple):
    """A prefilled group, waiting for slots: its rows' caches and what they predict next."""

    cache: KVCache  # (layers, G, kv_heads, W, head_dim)
    key_valid: jax.Array  # (G, W)
    hidden: jax.Array  # (G, D): the last prompt token's final hidden state
    pos: jax.Array  # (G,): the position of the first new token


class Slots(NamedTuple):
    """Every slot's state. A free slot is `done`; its contents are stale until a row enters."""

    cache: KVCache  # (layers, B, kv_heads, L, head_dim)
    key_valid: jax.Array  # (B, L)
    write: jax.Array  # (B,) the cache slot the next token goes to
    pos: jax.Array  # (B,) that token's position
    hidden: jax.Array  # (B, D) the state the next token is drawn from
    n: jax.Array  # (B,) tokens generated so far
    limit: jax.Array  # (B,) the row's max_new_tokens
    done: jax.Array  # (B,) ended (end token or limit), or free
    key: jax.Array  # (B, 2) uint32: the row's key data (`row_key_data`)
    temp: jax.Array  # (B,) its temperature
    out: jax.Array  # (B, max_new) generated ids, -1 after the end
    kept: jax.Array  # (B, max_new + 1, D) with keep_hidden (the states each token came from)


def _key_shape() -> tuple[int, ...]:
    """The shape of one key's data under the configured PRNG implementation."""
    return jax.random.key_data(jax.random.key(0)).shape


def empty_slots(cfg, batch: int, length: int, max_new: int, dtype, keep_hidden: bool) -> Slots:
    """`batch` free slots of `length` cache slots each, room for max_new tokens a row."""
    zeros = partial(jnp.zeros, dtype=jnp.int32)
    dim = cfg.hidden_size
    return Slots(init_cache(cfg, batch, length, dtype), jnp.zeros((batch, length), bool),
                 zeros(batch), zeros(batch), jnp.zeros((batch, dim), dtype), zeros(batch),
                 zeros(batch), jnp.ones(batch, bool),
                 jnp.zeros((batch, *_key_shape()), jnp.uint32),
                 jnp.zeros(batch, jnp.float32),
                 jnp.full((batch, max_new), -1, jnp.int32),
                 jnp.zeros((batch, max_new + 1, dim) if keep_hidden else (batch, 0, dim), dtype))


@partial(jax.jit, static_argnames=("graphdef", "use_lora"))
def _prefill_group(graphdef, state, tokens, valid, src, suffix, suffix_valid, *,
                   use_lora: bool) -> Prefilled:
    model = nnx.merge(graphdef, state)
    hidden, positions, cache, key_valid = prefill(model, tokens, valid, src, suffix, suffix_valid,
                                                  0, use_lora)
    return Prefilled(cache, key_valid, hidden[:, -1], positions[:, -1] + 1)


@partial(jax.jit, donate_argnums=(0,))
def _insert(slots: Slots, ready: Prefilled, src, dst, keys, temps, limits) -> Slots:
    """Rows src[i] of `ready` into slots dst[i] (dst = B: no row; dropped), with their key
    data, temperatures and limits."""
    w, length = ready.key_valid.shape[1], slots.key_valid.shape[1]

    def put(array, values):
        return array.at[dst].set(values, mode="drop")

    cache = KVCache(*(c.at[:, dst, :, :w].set(r[:, src].astype(c.dtype), mode="drop")
                      for c, r in zip(slots.cache, ready.cache)))
    hidden = ready.hidden[src].astype(slots.hidden.dtype)
    kept = slots.kept.at[dst, 0].set(hidden, mode="drop") if slots.kept.shape[1] else slots.kept
    return Slots(cache, put(slots.key_valid, jnp.pad(ready.key_valid[src], ((0, 0), (0, length - w)))),
                 put(slots.write, jnp.full(dst.shape, w, jnp.int32)), put(slots.pos, ready.pos[src]),
                 put(slots.hidden, hidden), put(slots.n, jnp.zeros_like(dst)), put(slots.limit, limits),
                 put(slots.done, jnp.zeros(dst.shape, bool)), put(slots.key, keys),
                 put(slots.temp, temps), put(slots.out, jnp.full((dst.shape[0], slots.out.shape[1]), -1)),
                 kept)


@partial(jax.jit, static_argnames=("graphdef", "top_k", "use_top_p", "use_lora", "sampled"),
         donate_argnames=("slots",))
def _decode(graphdef, state, slots: Slots, end_ids, top_p, want, *, top_k: int,
            use_top_p: bool, use_lora: bool, sampled: bool) -> tuple[Slots, jax.Array]:
    """Decode steps until `want` more slots are done than at the start, or all are; returns the
    slots and the steps run. sampled=False (every row greedy) compiles argmax alone."""
    model = nnx.merge(graphdef, state)
    b, length = slots.key_valid.shape
    rows = jnp.arange(b)
    max_new = slots.out.shape[1]
    done_at_start = jnp.sum(slots.done)

    def cond(carry):
        _, s = carry
        return (jnp.sum(s.done) - done_at_start < want) & ~jnp.all(s.done)

    def body(carry):
        steps, s = carry
        live = ~s.done
        logits = model.logits(s.hidden, use_lora, jnp.float32)  # float32 whatever the weights
        if sampled:
            keys = jax.vmap(lambda k, n: jax.random.fold_in(jax.random.wrap_key_data(k), n))(
                s.key, s.n)
            tok = choose_tokens(logits, keys, s.temp, top_k, use_top_p, top_p)
        else:
            tok = jnp.argmax(logits.astype(jnp.float32), axis=-1).astype(jnp.int32)
        tok = jnp.where(live, tok, 0)
        out = s.out.at[rows, jnp.where(live, s.n, max_new)].set(tok, mode="drop")
        n = s.n + live
        done = s.done | (live & (jnp.isin(tok, end_ids) | (n >= s.limit)))
        key_valid = s.key_valid.at[rows, jnp.where(live, s.write, length)].set(True, mode="drop")
        hidden, cache = model(tok[:, None], s.pos[:, None], key_valid, cache=s.cache,
                              cache_index=s.write, use_lora=use_lora)
        hidden = jnp.where(live[:, None], hidden[:, 0].astype(s.hidden.dtype), s.hidden)
        kept = (s.kept.at[rows, jnp.where(live, n, max_new + 1)].set(hidden, mode="drop")
                if s.kept.shape[1] else s.kept)
        step = live.astype(jnp.int32)
        return steps + 1, s._replace(cache=cache, key_valid=key_valid, write=s.write + step,
                                     pos=s.pos + step, hidden=hidden, n=n, done=done, out=out,
                                     kept=kept)

    steps, slots = jax.lax.while_loop(cond, body, (jnp.int32(0), slots))
    return slots, steps


def lower_decode(graphdef: nnx.GraphDef, state: nnx.State, cfg, dtype, *, batch_size: int,
                 slot_len: int, max_new: int, top_k: int, use_top_p: bool, use_lora: bool,
                 sampled: bool, input_sharding=None):
    """The decode program of `batch_size` slots of `slot_len` cache slots (prompt width +
    max_new) for a model of config `cfg` computing in `dtype`, lowered for `state` without
    running it (`state` may hold ShapeDtypeStructs with their shardings)."""
    def arg(a):
        return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=input_sharding)

    slots = jax.eval_shape(lambda: empty_slots(cfg, batch_size, slot_len, max_new, dtype, False))
    return _decode.lower(graphdef, state, jax.tree.map(arg, slots),
                         arg(jax.ShapeDtypeStruct((1,), jnp.int32)),
                         arg(jax.ShapeDtypeStruct((), jnp.float32)),
                         arg(jax.ShapeDtypeStruct((), jnp.int32)), top_k=top_k,
                         use_top_p=use_top_p, use_lora=use_lora, sampled=sampled)


_fold_rows = jax.jit(jax.vmap(lambda key, i: jax.random.key_data(jax.random.fold_in(key, i)),
                              in_axes=(None, 0)))


def row_key_data(seeds: Sequence[int], indices: Sequence[int]) -> np.ndarray:
    """(N, 2) uint32: each row's key fold_in(key(seed), index), as key data."""
    seeds, indices = np.asarray(seeds), np.asarray(indices, np.int32)
    out = np.zeros((len(seeds), *_key_shape()), np.uint32)
    for seed in np.unique(seeds):
        mine = np.flatnonzero(seeds == seed)
        out[mine] = np.asarray(_fold_rows(jax.random.key(int(seed)), jnp.asarray(indices[mine])))
    return out


class Finished(NamedTuple):
    """A group whose rows have all ended: its batch number, prompt indices, and per row the
    generated ids (end token included when it came), and the kept hidden states or None."""

    number: int
    rows: list[int]
    tokens: list[np.ndarray]
    hidden: list[np.ndarray | None]


def run_in_slots(model, prompts: Sequence[tuple[int, ...]], plan: Sequence[list[int]],
                 batches: Sequence[int], *, temps: np.ndarray, limits: np.ndarray,
                 keys: np.ndarray, end_ids: Sequence[int], batch_size: int, use_lora: bool,
                 top_k: int, top_p: float, sampled: bool, keep_hidden: bool,
                 on_steps: Callable[[int], None] | None = None) -> Iterator[Finished]:
    """Decodes the groups `batches` (numbers into `plan`, prefilled in that order) through
    `batch_size` slots; yields each group once all its rows have ended. temps, limits, keys
    (key data, `row_key_data`): per prompt. on_steps(n) is told the decode steps of every
    `_decode` call."""
    graphdef, state = nnx.split(model)
    b = batch_size
    packed: dict[int, PrefillBatch] = {}
    for number in batches:
        prefixes, row_src, suffixes = plan_prefill([prompts[i] for i in plan[number]], b)
        packed[number] = pack_prefill(prefixes, row_src, suffixes, b,
                                      prefill_rows(len(prefixes), b))
    if not packed:
        return
    width = max(p.tokens.shape[1] + p.suffix.shape[1] for p in packed.values())
    max_new = int(max(limits[i] for n in batches for i in plan[n]))
    slots = empty_slots(model.cfg, b, width + max_new, max_new, model.dtype, keep_hidden)
    end = jnp.asarray(sorted(set(end_ids)), jnp.int32)
    refill = max(1, b // 8)  # slots freed before the host refills them: few round trips

    waiting = deque(batches)  # groups not yet prefilled
    ready, ready_rows = None, deque()  # the prefilled group and its (group row, prompt) not yet in
    free = list(range(b))
    in_slot: list[tuple[int, int] | None] = [None] * b  # (group number, prompt index)
    results: dict[int, dict[int, tuple[np.ndarray, np.ndarray | None]]] = {n: {} for n in batches}
    while True:
        while free and (ready_rows or waiting):
            if not ready_rows:
                number = waiting.popleft()
                ready = _prefill_group(graphdef, state, *(jnp.asarray(a) for a in packed[number]),
                                       use_lora=use_lora)
                ready_rows = deque((number, j, i) for j, i in enumerate(plan[number]))
            picks = [ready_rows.popleft() for _ in range(min(len(free), len(ready_rows)))]
            src, dst, rows = (np.zeros(b, np.int32), np.full(b, b, np.int32),
                              np.zeros(b, np.int64))
            for k, (number, j, i) in enumerate(picks):
                slot = free.pop(0)
                src[k], dst[k], rows[k] = j, slot, i
                in_slot[slot] = (number, i)
            slots = _insert(slots, ready, jnp.asarray(src), jnp.asarray(dst), jnp.asarray(keys[rows]),
                            jnp.asarray(temps[rows].astype(np.float32)),
                            jnp.asarray(limits[rows].astype(np.int32)))
        if len(free) == b:
            return
        remaining = len(ready_rows) + sum(len(plan[n]) for n in waiting)
        want = min(refill, remaining) if remaining else b
        slots, steps = _decode(graphdef, state, slots, end, jnp.float32(top_p),
                               jnp.int32(want), top_k=top_k, use_top_p=top_p < 1.0,
                               use_lora=use_lora, sampled=sampled)
        if on_steps is not None:
            on_steps(int(steps))
        done = np.asarray(slots.done)
        ended = [s for s in range(b) if in_slot[s] is not None and done[s]]
        if not ended:
            continue
        index = jnp.asarray(ended)
        n = np.asarray(slots.n)[ended]
        out = np.asarray(slots.out[index])
        kept = np.asarray(slots.kept[index]) if keep_hidden else None
        for k, s in enumerate(ended):
            number, i = in_slot[s]
            results[number][i] = (out[k, :n[k]].copy(),
                                  None if kept is None else kept[k, :n[k] + 1].copy())
            in_slot[s] = None
            free.append(s)
            if len(results[number]) == len(plan[number]):
                got = results.pop(number)
                rows = plan[number]
                yield Finished(number, rows, [got[i][0] for i in rows], [got[i][1] for i in rows])
        free.sort()

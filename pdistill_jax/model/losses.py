"""Distillation objectives over answer-token logits, all math in float32.

Shapes: logits (B, A, V), mask / targets (B, A). Every objective first gives a per-token loss
(B, A); `sequence_mean` then averages over the masked answer tokens of each sequence and over the
sequences that have any (the paper's reduction: long answers do not outweigh short ones).

KL direction, pinned by tests/test_losses.py:
  forward_kl = KL(p_T || p_S) = sum_v p_T (log p_T - log p_S)   (the paper's objective)
  reverse_kl = KL(p_S || p_T) = sum_v p_S (log p_S - log p_T)
with p = softmax(logits / tau) for teacher and student alike and no tau^2 factor.

`chunked_token_losses` evaluates a per-token loss over the answer positions a few at a time, so
that with a 152k vocabulary the (B, A, V) logits of teacher and student never exist at once.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def _log_probs(logits: jax.Array, tau: float) -> jax.Array:
    return jax.nn.log_softmax(logits.astype(jnp.float32) / tau, axis=-1)


def _kl_from_log_probs(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    """KL(p || q) over the last axis. Where p = 0 the term is 0 (exp(-inf) * finite)."""
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def forward_kl_per_token(teacher_logits: jax.Array, student_logits: jax.Array,
                         tau: float) -> jax.Array:
    """KL(p_T || p_S) per position: mass-covering, the paper's prompt-distillation loss."""
    return _kl_from_log_probs(_log_probs(teacher_logits, tau), _log_probs(student_logits, tau))


def reverse_kl_per_token(teacher_logits: jax.Array, student_logits: jax.Array,
                         tau: float) -> jax.Array:
    """KL(p_S || p_T) per position: mode-seeking."""
    return _kl_from_log_probs(_log_probs(student_logits, tau), _log_probs(teacher_logits, tau))


def jsd_per_token(teacher_logits: jax.Array, student_logits: jax.Array, tau: float,
                  beta: float = 0.5) -> jax.Array:
    """Generalised JSD: beta KL(T||M) + (1-beta) KL(S||M) with M = beta p_T + (1-beta) p_S."""
    log_t, log_s = _log_probs(teacher_logits, tau), _log_probs(student_logits, tau)
    # log M computed in log space (logaddexp) so that tiny probabilities do not underflow to 0.
    log_m = jnp.logaddexp(jnp.log(jnp.float32(beta)) + log_t,
                          jnp.log(jnp.float32(1.0 - beta)) + log_s)
    return beta * _kl_from_log_probs(log_t, log_m) + (1.0 - beta) * _kl_from_log_probs(log_s, log_m)


def cross_entropy_per_token(student_logits: jax.Array, targets: jax.Array) -> jax.Array:
    """-log p_S(target) per position at temperature 1 (the SFT baseline)."""
    log_p = _log_probs(student_logits, 1.0)
    return -jnp.take_along_axis(log_p, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


def relative_l1_per_token(teacher_hidden: jax.Array, student_hidden: jax.Array) -> jax.Array:
    """||h_S - h_T||_1 / ||h_T||_1 per position, over the hidden axis (B, A, D) -> (B, A).

    The hidden-state term of deep context distillation (Caccia et al. 2025, "Knowledge
    Modules"): an L1 distance normalised by the teacher's own scale, so that it reads the same
    whatever the hidden size or the norm's gain.
    """
    t, s = teacher_hidden.astype(jnp.float32), student_hidden.astype(jnp.float32)
    return jnp.sum(jnp.abs(s - t), axis=-1) / jnp.maximum(jnp.sum(jnp.abs(t), axis=-1), 1e-6)


def sequence_sums(per_token: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum over sequences of their mean masked token loss, number of sequences with answers).

    Kept as two sums so that gradient accumulation over micro-batches reproduces the full-batch
    mean exactly: divide the summed first term by the summed second at the end.
    """
    mask = mask.astype(jnp.float32)
    tokens = jnp.sum(mask, axis=-1)
    per_seq = jnp.sum(per_token.astype(jnp.float32) * mask, axis=-1) / jnp.maximum(tokens, 1.0)
    has_answer = (tokens > 0).astype(jnp.float32)
    return jnp.sum(per_seq * has_answer), jnp.sum(has_answer)


def sequence_mean(per_token: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean over masked tokens per sequence, then over sequences with at least one token (0 if none)."""
    total, count = sequence_sums(per_token, mask)
    return total / jnp.maximum(count, 1.0)


def chunked_token_losses(token_loss: Callable[..., jax.Array], inputs: tuple[jax.Array, ...],
                         chunk: int) -> jax.Array:
    """token_loss applied to `inputs` (each (B, A, ...)) `chunk` positions at a time -> (B, A).

    token_loss maps arrays (B, c, ...) to per-token losses (B, c) (or (B, c, k): k losses per
    token from one chunk of logits, giving (B, A, k)); typically it applies the LM
    head to gathered hidden states and compares teacher and student. Each chunk runs under
    `jax.checkpoint`, so the backward pass recomputes a chunk's logits instead of storing all of
    them: peak memory holds one chunk's (B, c, V) logits, not the whole (B, A, V).
    """
    b, a = inputs[0].shape[:2]
    if chunk <= 0 or a <= chunk:
        return token_loss(*inputs)
    n = -(-a // chunk)
    pad = n * chunk - a

    def split(x):  # (B, A, ...) -> (n, B, chunk, ...); padded positions are cut off again below
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)

    per_chunk = jax.lax.map(jax.checkpoint(lambda xs: token_loss(*xs)),
                            tuple(split(x) for x in inputs))  # (n, B, chunk, ...)
    return jnp.moveaxis(per_chunk, 0, 1).reshape(b, n * chunk, *per_chunk.shape[3:])[:, :a]

"""The next token from a row's logits: greedy, temperature, top-k, top-p, in one compiled path."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _top_p_mask(sorted_logits: jax.Array, top_p) -> jax.Array:
    """Keep the smallest prefix of descending logits whose mass reaches top_p (at least one)."""
    probs = jax.nn.softmax(sorted_logits)
    return (jnp.cumsum(probs) - probs) < top_p


def choose_token(logits: jax.Array, key: jax.Array, temperature, top_k: int, use_top_p: bool,
                 top_p) -> jax.Array:
    """Next token for one row; temperature 0 is greedy.

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


# (B, V) logits, (B,) keys and temperatures -> (B,) tokens
choose_tokens = jax.vmap(choose_token, in_axes=(0, 0, 0, None, None, None))

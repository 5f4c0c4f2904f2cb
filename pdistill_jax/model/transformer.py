"""The LoRA-augmented decoder transformer (Llama, Mistral, Qwen2/3, Phi-3, Gemma 3) as Flax NNX
modules.

One set of base arrays serves both roles of prompt distillation: called with `use_lora=False`
it is the teacher (the frozen base model), with `use_lora=True` it is the student. Every
weight carries logical axis names (`axes` metadata) from which `sharding` derives placements.

Layers are stacked along a leading axis and run with `jax.lax.scan`, so a 30-layer model
compiles as fast as a 1-layer one. RoPE follows Hugging Face's rotate-half convention, so
Hugging Face q/k weights load with a transpose and no permutation.

Gemma 3 is configuration, not a copy: scaled embeddings, (1 + w) norms, norms on the attention
and MLP outputs, GELU, its query scale, and per-layer attention types (windowed layers with their
own RoPE base between full ones) as a per-layer flag and frequencies scanned with the weights.
"""
from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pdistill_jax.config import LoraConfig, ModelConfig
from pdistill_jax.model.sharding import split_batch

# A large finite negative: fully masked rows then give a uniform softmax instead of NaN.
_MASK_VALUE = -1e30


class KVCache(NamedTuple):
    """Keys and values of every layer: (layers, batch, kv_heads, slots, head_dim).

    Heads before slots: attention reads each (batch, kv head) as one contiguous (slots, head_dim)
    matrix, so a decode step never transposes the cache."""

    k: jax.Array
    v: jax.Array


ACCELERATORS = ("gpu", "tpu", "cuda", "rocm")  # backends where "auto" means bfloat16


def resolve_dtype(name: str, accelerator: bool | None = None) -> str:
    """A compute_dtype or decode_dtype setting as the dtype it names: "auto" is "bfloat16" on an
    accelerator (by default: JAX's default backend is a GPU or TPU) and "float32" on CPU; any
    other name is itself. Commands resolve it when they start, so what they record names the
    dtype used."""
    if name != "auto":
        return name
    if accelerator is None:
        accelerator = jax.default_backend() in ACCELERATORS
    return "bfloat16" if accelerator else "float32"


def compute_dtype(name: str):
    """The jnp dtype of a compute_dtype or decode_dtype setting ("float32" | "bfloat16" |
    "auto")."""
    return jnp.bfloat16 if resolve_dtype(name) == "bfloat16" else jnp.float32


def init_cache(cfg: ModelConfig, batch: int, slots: int, dtype=jnp.float32) -> KVCache:
    shape = (cfg.num_layers, batch, cfg.num_kv_heads, slots, cfg.head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


@jax.custom_vjp
def _lora_delta(x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """(x A) B. Same math as autodiff; the custom backward only fixes the operand layouts."""
    return (x @ a) @ b


def _lora_delta_fwd(x, a, b):
    h = x @ a
    return h @ b, (x, a, b, h)


def _lora_delta_bwd(res, g):
    # dA = x^T (g B^T) and dB = h^T g contract over all tokens. Left to itself, XLA:CPU folds the
    # transposes into the dots and then transposes the *large* (tokens, out) gradient in a slow
    # strided copy. Transposing the
    # small (tokens, r) operands explicitly, behind a barrier that stops the folding, avoids it.
    x, a, b, h = res
    dh = g @ b.T
    x2, g2, h2, dh2 = (z.reshape(-1, z.shape[-1]) for z in (x, g, h, dh))
    h_t, dh_t = jax.lax.optimization_barrier((h2.T, dh2.T))
    return dh @ a.T, (dh_t @ x2).T, h_t @ g2


_lora_delta.defvjp(_lora_delta_fwd, _lora_delta_bwd)


def _matmul(x: jax.Array, w: jax.Array, out_dtype) -> jax.Array:
    """x @ w with the result in out_dtype. A bfloat16 product accumulates in float32 either way
    (XLA's dots do on CPU, GPU and TPU) and is rounded to the compute dtype once; asking for a
    float32 result (the sampler's logits) keeps it unrounded. The plain product otherwise, so
    that training's programs, and their gradients, are what they were."""
    if out_dtype == jnp.result_type(x, w):
        return x @ w
    return jnp.matmul(x, w, preferred_element_type=out_dtype)


class LoRALinear(nnx.Module):
    """y = x W (+ b) (+ scale * (x A) B when the adapter is on). W is (in, out), A (in, r), B (r, out)."""

    def __init__(self, in_features: int, out_features: int, axes: tuple[str, str], *,
                 bias: bool, lora: LoraConfig | None, dtype, param_dtype, rngs: nnx.Rngs,
                 lora_dtype=None):
        self.dtype = dtype
        # the dtype the adapter's products run in; None = the compute dtype (`Transformer`)
        self.lora_dtype = lora_dtype
        self.kernel = nnx.Param(
            nnx.initializers.normal(0.02)(rngs.params(), (in_features, out_features), param_dtype),
            axes=axes)
        self.bias = nnx.data(nnx.Param(jnp.zeros((out_features,), param_dtype), axes=(axes[1],))
                             if bias else None)
        self.lora_a = self.lora_b = nnx.data(None)  # declared data: filled when an adapter is on
        if lora is not None:
            self.lora_scale = lora.scale
            # PEFT's default init: A ~ kaiming-uniform(a=sqrt 5) = U(-1/sqrt(in), 1/sqrt(in)), B = 0,
            # so the student starts exactly equal to the teacher. LoRA state stays float32.
            bound = 1.0 / math.sqrt(in_features)
            self.lora_a = nnx.LoRAParam(
                jax.random.uniform(rngs.lora(), (in_features, lora.rank), jnp.float32, -bound, bound),
                axes=(axes[0], "lora"))
            self.lora_b = nnx.LoRAParam(jnp.zeros((lora.rank, out_features), jnp.float32),
                                        axes=("lora", axes[1]))

    def __call__(self, x: jax.Array, use_lora: bool = True, out_dtype=None) -> jax.Array:
        """out_dtype: the output's dtype (default: the compute dtype; see `_matmul`)."""
        out_dtype = out_dtype or self.dtype
        y = _matmul(x, self.kernel[...].astype(self.dtype), out_dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(out_dtype)
        if use_lora and self.lora_a is not None:
            dtype = self.lora_dtype or self.dtype
            delta = _lora_delta(x.astype(dtype), self.lora_a[...].astype(dtype),
                                self.lora_b[...].astype(dtype))
            y = y + (self.lora_scale * delta).astype(y.dtype)
        return y


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, param_dtype, axis: str = "embed",
                 plus_one: bool = False):
        self.eps, self.plus_one = eps, plus_one
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), axes=(axis,))

    def __call__(self, x: jax.Array) -> jax.Array:
        # As in HF: normalise in float32, cast back, then scale (Gemma: scale by 1 + w in float32,
        # then cast; its weights are stored as the offset from 1).
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        if self.plus_one:
            return (xf * (1.0 + self.weight[...].astype(jnp.float32))).astype(x.dtype)
        return self.weight[...].astype(x.dtype) * xf.astype(x.dtype)


def _norm(cfg: ModelConfig, dim: int, param_dtype, axis: str = "embed") -> RMSNorm:
    return RMSNorm(dim, cfg.rms_norm_eps, param_dtype, axis, cfg.norm_plus_one)


def rope_frequencies(cfg: ModelConfig, local: bool = False) -> jax.Array:
    """Inverse frequencies (head_dim / 2,), with Llama 3 or linear scaling applied as in HF.
    local: those of the sliding-window layers of a config with layer_types (their own base, no
    scaling)."""
    theta = cfg.rope_local_theta if local else cfg.rope_theta
    inv = 1.0 / (theta ** (jnp.arange(0, cfg.head_dim, 2, dtype=jnp.float32) / cfg.head_dim))
    s = cfg.rope_scaling
    if not s or local:
        return inv
    if s["rope_type"] == "linear":
        return inv / s["factor"]
    return inv / llama3_divisors(inv, s["factor"], s["low_freq_factor"], s["high_freq_factor"],
                                 s["original_max_position_embeddings"])


def llama3_divisors(inv_freq, factor: float, low: float, high: float, context: float):
    """The divisor of each inverse frequency under Llama 3 rope scaling: wavelengths longer than
    context / low are slowed by `factor`, those shorter than context / high kept, the band
    between blended. numpy in, numpy out: the GGUF converter fits these to llama.cpp's
    rope_freqs in float64."""
    where = np.where if isinstance(inv_freq, np.ndarray) else jnp.where
    wavelen = 2 * math.pi / inv_freq
    smooth = (context / wavelen - low) / (high - low)
    blended = 1 / ((1 - smooth) / factor + smooth)
    return where(wavelen < context / high, 1.0, where(wavelen > context / low, factor, blended))


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """x: (B, T, heads, head_dim); positions: (B, T)."""
    freqs = positions[..., None].astype(jnp.float32) * inv_freq  # (B, T, hd/2)
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    xf = x.astype(jnp.float32)
    return (xf * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


ATTENTION_KERNELS = ("auto", "einsum", "dot_product")


def attention_kernel(name: str) -> str:
    """The kernel a setting of `attention` runs on this backend. "dot_product" is
    `jax.nn.dot_product_attention` with its default implementation (XLA's, on every backend in
    JAX 0.10; cuDNN's needs implementation="cudnn", not chosen here until tested on a GPU);
    "einsum" the explicit matmuls and softmax, kept on CPU (docs/benchmarks.md)."""
    if name not in ATTENTION_KERNELS:
        raise ValueError(f"attention={name!r}; use one of {', '.join(ATTENTION_KERNELS)}")
    if name == "auto":
        return "einsum" if jax.default_backend() == "cpu" else "dot_product"
    return name


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, lora: LoraConfig | None, dtype, param_dtype, rngs,
                 attention: str = "auto", lora_dtype=None):
        self.cfg, self.attention = cfg, attention_kernel(attention)
        d, hd = cfg.hidden_size, cfg.head_dim

        def proj(name, i, o, axes, bias=False):
            use = lora if (lora is not None and name in lora.targets) else None
            return LoRALinear(i, o, axes, bias=bias, lora=use, dtype=dtype,
                              param_dtype=param_dtype, rngs=rngs, lora_dtype=lora_dtype)

        self.q = proj("q", d, cfg.num_heads * hd, ("embed", "heads"), cfg.attention_bias)
        self.k = proj("k", d, cfg.num_kv_heads * hd, ("embed", "kv_heads"), cfg.attention_bias)
        self.v = proj("v", d, cfg.num_kv_heads * hd, ("embed", "kv_heads"), cfg.attention_bias)
        self.o = proj("o", cfg.num_heads * hd, d, ("heads", "embed"))
        # Qwen3, Gemma 3: one RMSNorm shared by all query heads and one by all key heads.
        self.q_norm = nnx.data(_norm(cfg, hd, param_dtype, "head_dim") if cfg.qk_norm else None)
        self.k_norm = nnx.data(_norm(cfg, hd, param_dtype, "head_dim") if cfg.qk_norm else None)

    def __call__(self, x, positions, mask, inv_freq, cache_kv, use_lora):
        """Attention output and this call's keys/values (b, kv_heads, t, head_dim).

        Without a cache, `mask` (b, t, t) covers the new tokens. With one, `mask` is the pair
        (cache mask (b, t, s), new-token mask (b, t, t)): the cache is only read, and the caller
        writes the returned keys/values into it once for all layers (written in here, every
        decode step would copy the whole cache).
        """
        cfg = self.cfg
        b, t, _ = x.shape
        q = self.q(x, use_lora).reshape(b, t, cfg.num_heads, cfg.head_dim)
        k = self.k(x, use_lora).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        v = self.v(x, use_lora).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        if self.attention == "dot_product" and t > 1:
            # Training, the teacher pass and prefill: the memory wall of long prompts. A decode
            # step (t = 1) has (b, heads, 1, slots) scores only and keeps the einsum below,
            # which reads the cache in place instead of in this kernel's layout.
            out = _dot_product_attention(q, k, v, mask, cache_kv, 1.0 / cfg.attention_scale)
            return self.o(out.reshape(b, t, -1), use_lora), (k.transpose(0, 2, 1, 3),
                                                            v.transpose(0, 2, 1, 3))
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (b, kv, t, d): the cache layout
        # Heads-major layout with the query heads sharing a kv head stacked along the query axis:
        # one (g*t, d) x (d, s) matmul per (batch, kv head), faster on XLA:CPU than contracting
        # the (b, t, k, g, d) layout directly.
        kv, groups = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads
        q = q.reshape(b, t, kv, groups, cfg.head_dim).transpose(0, 2, 3, 1, 4)
        q = q.reshape(b, kv, groups * t, cfg.head_dim)
        if cache_kv is None:
            keys, values, masks = [k], [v], [mask]
        else:
            keys, values, masks = [cache_kv[0], k], [cache_kv[1], v], list(mask)
        # A decode step (t = 1) multiplies and sums in float32 whatever the compute dtype: the
        # cache is still read in its own dtype, converted inside the fused loop.
        acc = jnp.float32 if t == 1 else x.dtype
        scores = []
        for key, m in zip(keys, masks):
            if t == 1:
                sc = jnp.sum(q.astype(acc)[:, :, :, None, :] * key.astype(acc)[:, :, None], axis=-1)
            else:
                sc = jnp.einsum("bkmd,bksd->bkms", q, key.astype(q.dtype)).astype(jnp.float32)
            sc = sc.reshape(b, kv, groups, t, -1) / cfg.attention_scale
            scores.append(jnp.where(m[:, None, None, :, :], sc, _MASK_VALUE))
        probs = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1).astype(acc)
        out, start = 0, 0
        for value in values:  # the probabilities split back over cache and new keys
            s = value.shape[2]
            p = probs[..., start:start + s].reshape(b, kv, groups * t, s)
            if t == 1:
                out = out + jnp.sum(p[..., None] * value.astype(acc)[:, :, None], axis=-2)
            else:
                out = out + jnp.einsum("bkms,bksd->bkmd", p, value.astype(x.dtype))
            start += s
        out = out.astype(x.dtype).reshape(b, kv, groups, t, cfg.head_dim)
        out = out.transpose(0, 3, 1, 2, 4).reshape(b, t, cfg.num_heads * cfg.head_dim)
        return self.o(out, use_lora), (k, v)


def _dot_product_attention(q, k, v, mask, cache_kv, scale):
    """`jax.nn.dot_product_attention` over the keys read (a prefix or cache, then the new
    tokens'), with the masks `Attention` takes; q: (b, t, heads, d), k/v: (b, t, kv_heads, d)."""
    b, t = q.shape[:2]
    if cache_kv is None:
        keys, values, masks = k, v, mask
    else:  # the read-only slots come first, in (b, kv, s, d) layout
        keys = jnp.concatenate([cache_kv[0].transpose(0, 2, 1, 3).astype(q.dtype), k], axis=1)
        values = jnp.concatenate([cache_kv[1].transpose(0, 2, 1, 3).astype(q.dtype), v], axis=1)
        old, new = mask
        masks = jnp.concatenate([jnp.broadcast_to(old, (b, t, old.shape[-1])),
                                 jnp.broadcast_to(new, (b, t, t))], axis=-1)
    masks = jnp.broadcast_to(masks, (b, t, keys.shape[1]))[:, None]  # (b, 1, t, s)
    return jax.nn.dot_product_attention(q, keys.astype(q.dtype), values.astype(q.dtype),
                                        mask=masks, scale=scale)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, lora: LoraConfig | None, dtype, param_dtype, rngs,
                 lora_dtype=None):
        d, f = cfg.hidden_size, cfg.intermediate_size

        def proj(name, i, o, axes):
            use = lora if (lora is not None and name in lora.targets) else None
            return LoRALinear(i, o, axes, bias=False, lora=use, dtype=dtype,
                              param_dtype=param_dtype, rngs=rngs, lora_dtype=lora_dtype)

        self.gate = proj("gate", d, f, ("embed", "mlp"))
        self.up = proj("up", d, f, ("embed", "mlp"))
        self.down = proj("down", f, d, ("mlp", "embed"))
        self.gelu = cfg.hidden_act == "gelu_tanh"

    def __call__(self, x, use_lora):
        gate = self.gate(x, use_lora)
        act = jax.nn.gelu(gate, approximate=True) if self.gelu else jax.nn.silu(gate)
        return self.down(act * self.up(x, use_lora), use_lora)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, lora: LoraConfig | None, dtype, param_dtype, rngs,
                 attention: str = "auto", lora_dtype=None):
        self.attn_norm = _norm(cfg, cfg.hidden_size, param_dtype)
        self.attn = Attention(cfg, lora, dtype, param_dtype, rngs, attention, lora_dtype)
        self.mlp_norm = _norm(cfg, cfg.hidden_size, param_dtype)
        self.mlp = MLP(cfg, lora, dtype, param_dtype, rngs, lora_dtype)
        # Gemma 3: the attention and MLP outputs are normalised too, before the residual add.
        sandwich = cfg.sandwich_norms
        self.attn_post_norm = nnx.data(_norm(cfg, cfg.hidden_size, param_dtype) if sandwich else None)
        self.mlp_post_norm = nnx.data(_norm(cfg, cfg.hidden_size, param_dtype) if sandwich else None)

    def __call__(self, x, positions, mask, inv_freq, cache_kv, use_lora):
        """The block's output and the new tokens' keys/values."""
        x = split_batch(x)  # the layer's input stays split over the batch (fsdp gathers weights)
        h, new_kv = self.attn(self.attn_norm(x), positions, mask, inv_freq, cache_kv, use_lora)
        if self.attn_post_norm is not None:
            h = self.attn_post_norm(h)
        x = x + h
        h = self.mlp(self.mlp_norm(x), use_lora)
        if self.mlp_post_norm is not None:
            h = self.mlp_post_norm(h)
        return split_batch(x + h), new_kv


class Transformer(nnx.Module):
    """Embedding, a scanned stack of blocks, final norm and LM head (tied or untied)."""

    def __init__(self, cfg: ModelConfig, lora: LoraConfig | None = None, *,
                 dtype=jnp.float32, param_dtype=jnp.float32, remat: bool = False,
                 attention: str = "auto", lora_dtype=None, rngs: nnx.Rngs | None = None):
        """attention: the kernel (`ATTENTION_KERNELS`; "auto" chooses by backend). lora_dtype:
        the dtype the adapter's products run in, None = the compute dtype (training); a model
        that decodes from bfloat16 weights asks for float32 (`weights.load.decode_options`): the
        adapter's few products cost little there and its float32 weights stay unrounded."""
        rngs = rngs or nnx.Rngs(params=0, lora=0)
        self.cfg, self.lora_config, self.dtype, self.remat = cfg, lora, dtype, remat
        self.lora_dtype = lora_dtype
        if lora is not None and lora.first_layer >= cfg.num_layers:
            raise ValueError(f"lora.first_layer={lora.first_layer} must be below the model's "
                             f"{cfg.num_layers} layers (0 = every layer carries the adapter)")
        self.embed = nnx.Param(
            nnx.initializers.normal(0.02)(rngs.params(), (cfg.vocab_size, cfg.hidden_size), param_dtype),
            axes=("vocab", "embed"))

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(r):
            return Block(cfg, lora, dtype, param_dtype, r, attention, lora_dtype)

        self.layers = make_blocks(rngs)
        self.norm = _norm(cfg, cfg.hidden_size, param_dtype)
        head_lora = lora if (lora is not None and "lm_head" in lora.targets) else None
        if cfg.tie_word_embeddings:
            self.lm_head = nnx.data(None)
            self.lm_head_lora_a = self.lm_head_lora_b = nnx.data(None)
            if head_lora is not None:
                # Tied head: the base weight is embed^T; only the adapter is separate.
                bound = 1.0 / math.sqrt(cfg.hidden_size)
                self.lm_head_lora_a = nnx.LoRAParam(jax.random.uniform(
                    rngs.lora(), (cfg.hidden_size, head_lora.rank), jnp.float32, -bound, bound),
                    axes=("embed", "lora"))
                self.lm_head_lora_b = nnx.LoRAParam(
                    jnp.zeros((head_lora.rank, cfg.vocab_size), jnp.float32), axes=("lora", "vocab"))
                self.lm_head_scale = head_lora.scale
        else:
            self.lm_head = LoRALinear(cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), bias=False,
                                      lora=head_lora, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                                      lora_dtype=lora_dtype)

    def __call__(self, tokens: jax.Array, positions: jax.Array, key_valid: jax.Array, *,
                 cache: KVCache | None = None, cache_index: jax.Array | int = 0,
                 prefix: KVCache | None = None, use_lora: bool = True,
                 lower: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
        """Final-norm hidden states (B, T, D) and the updated cache.

        tokens, positions: (B, T). key_valid: (B, S) marks real (non-pad) key slots, with S = T
        without a cache and S = cache slots with one; the new tokens occupy slots
        [cache_index, cache_index + T). Causality is by slot, RoPE by `positions`, so left-padded
        prompts work with positions counted from each row's first real token. cache_index may be
        (B,), one per row: the continuous sampler's rows are each at their own step.

        prefix: the keys/values (layers, B, kv_heads, P, head_dim) of P tokens that come before
        every row's tokens, read only (training's shared prompt preamble, computed once for the
        batch with a cache of P slots). key_valid is then (B, P + T) and no cache is returned;
        gradients flow into the prefix.

        lower: (B, T, D), the states entering layer `lora.first_layer` (`lower_states` of these
        tokens): only the adapter's layers run. Training caches them, as the layers below are
        frozen. Without a cache only; `tokens` then only gives the length.
        """
        return self._forward(tokens, positions, key_valid, cache, cache_index, prefix, use_lora,
                             "all" if lower is None else "upper", lower)

    def lower_states(self, tokens: jax.Array, positions: jax.Array, key_valid: jax.Array, *,
                     prefix: KVCache | None = None) -> jax.Array:
        """The (B, T, D) states entering layer `lora.first_layer`: the frozen layers below it
        (adapter off there), whose output is the same in every step (arguments as __call__)."""
        return self._forward(tokens, positions, key_valid, None, 0, prefix, True, "lower", None)[0]

    def _forward(self, tokens, positions, key_valid, cache, cache_index, prefix, use_lora, part,
                 lower):
        if part != "all" and not (self.lora_config and self.lora_config.first_layer):
            raise ValueError("lower states need an adapter with lora.first_layer > 0")
        if part != "all" and cache is not None:
            raise ValueError("lower states are for full forwards, not a KV cache")
        x = (jnp.take(self.embed[...], tokens, axis=0).astype(self.dtype) if lower is None
             else lower.astype(self.dtype))
        if self.cfg.scale_embeddings and lower is None:
            # As HF: the normaliser in the compute dtype (bf16 rounds sqrt(640) = 25.30 to 25.25).
            x = x * jnp.asarray(math.sqrt(self.cfg.hidden_size), self.dtype)
        t = tokens.shape[1]

        def causal(window):
            return jnp.tril(jnp.ones((t, t), bool))[None] & self._window(positions, positions, window)

        graphdef, layer_state = nnx.split(self.layers)
        checkpoint = (partial(jax.checkpoint, policy=jax.checkpoint_policies.nothing_saveable)
                      if self.remat else (lambda f: f))
        view = self._layer_view

        if prefix is not None:
            p = prefix.k.shape[3]
            masks, inv_freq, per_layer = self._attention_inputs(lambda w: (
                key_valid[:, None, :p] & self._window(positions, _slot_positions(key_valid[:, :p]), w),
                causal(w) & key_valid[:, None, p:]))

            def prefixed_body(lora_on):
                @checkpoint
                def body(h, xs):
                    state, layer_kv, extra = xs
                    mask, freqs = view(masks, inv_freq, extra)
                    h, _ = nnx.merge(graphdef, state)(h, positions, mask, freqs, layer_kv, lora_on)
                    return h, None
                return body

            x, _ = self._scan_layers(prefixed_body, x, (layer_state, (prefix.k, prefix.v), per_layer),
                                     use_lora, part)
            return (x if part == "lower" else self.norm(x)), None

        fresh = isinstance(cache_index, int) and cache_index == 0
        if cache is None or fresh:  # nothing cached to read (a prefill fills an empty cache)
            valid = key_valid if cache is None else key_valid[:, :t]
            masks, inv_freq, per_layer = self._attention_inputs(
                lambda w: causal(w) & valid[:, None, :])  # (B, T, T)

            def body(lora_on):
                @checkpoint
                def layer(h, xs):
                    state, extra = xs
                    mask, freqs = view(masks, inv_freq, extra)
                    h, kv = nnx.merge(graphdef, state)(h, positions, mask, freqs, None, lora_on)
                    return h, (kv if cache is not None else None)
                return layer

            x, new_kv = self._scan_layers(body, x, (layer_state, per_layer), use_lora, part)
            if cache is None:
                return (x if part == "lower" else self.norm(x)), None
            return self.norm(x), KVCache(*(_write(c, n, 0) for c, n in zip(cache, new_kv)))

        # The new tokens see the cached slots before cache_index and each other causally.
        slots = key_valid.shape[1]
        per_row = jnp.ndim(cache_index) == 1
        index = jnp.reshape(cache_index, (-1, 1))  # (B or 1, 1)
        cache_mask = (key_valid & (jnp.arange(slots)[None] < index))[:, None, :]
        new_valid = (jax.vmap(lambda kv, i: jax.lax.dynamic_slice_in_dim(kv, i, t))(key_valid, cache_index)
                     if per_row else jax.lax.dynamic_slice_in_dim(key_valid, cache_index, t, axis=1))
        masks, inv_freq, per_layer = self._attention_inputs(lambda w: (
            cache_mask & self._window(positions, _slot_positions(key_valid), w),
            causal(w) & new_valid[:, None, :]))

        # Each layer's cache slice is a scanned input, read only; the new keys/values come out of
        # the scan and are written into the cache once, in place.
        def cached_body(lora_on):
            def layer(h, xs):
                state, layer_kv, extra = xs
                mask, freqs = view(masks, inv_freq, extra)
                return nnx.merge(graphdef, state)(h, positions, mask, freqs, layer_kv, lora_on)
            return layer

        x, (nk, nv) = self._scan_layers(cached_body, x, (layer_state, (cache.k, cache.v), per_layer),
                                        use_lora)
        return self.norm(x), KVCache(_write(cache.k, nk, cache_index), _write(cache.v, nv, cache_index))

    def _attention_inputs(self, build):
        """(masks, inv_freq, per-layer inputs) the layers attend with; build(window) makes the
        mask (or cache/new mask pair) for a sliding window (None: none).

        Every layer alike: the config's window and RoPE, nothing scanned per layer, so the scan
        is the program it always was. With layer_types (Gemma 3): the windowed and the full
        masks, and per layer a flag choosing between them and its RoPE frequencies, scanned
        with the layer weights (one scan whatever the pattern)."""
        cfg = self.cfg
        if cfg.layer_types is None:
            return build(cfg.sliding_window), rope_frequencies(cfg), None
        local = jnp.asarray([kind == "sliding_attention" for kind in cfg.layer_types])
        freqs = jnp.where(local[:, None], rope_frequencies(cfg, local=True)[None],
                          rope_frequencies(cfg)[None])
        return (build(cfg.sliding_window), build(None)), None, (local, freqs)

    @staticmethod
    def _layer_view(masks, inv_freq, per_layer):
        """One layer's mask and RoPE frequencies inside the scan (see `_attention_inputs`)."""
        if per_layer is None:
            return masks, inv_freq
        local, freqs = per_layer
        windowed, full = masks
        return jax.tree.map(lambda a, b: jnp.where(local, a, b), windowed, full), freqs

    @staticmethod
    def _window(query_pos: jax.Array, key_pos: jax.Array, w: int | None) -> jax.Array:
        """(B, T, S): which keys each query sees under a sliding window of w (Mistral, Phi-3,
        Gemma 3's local layers): the last w tokens up to and including its own. Counted in
        positions, not slots: a prefilled row can have padding between its shared prefix and its
        own rest, which Hugging Face's contiguous rows never have. (1, T, S), all true, without
        a window."""
        if w is None:
            return jnp.ones((1, query_pos.shape[1], key_pos.shape[1]), bool)
        return key_pos[:, None, :] > query_pos[:, :, None] - w

    def _scan_layers(self, body, x, xs, use_lora: bool, part: str = "all"):
        """Scans the blocks over the layer-stacked xs, body(lora_on) being one layer's step. With
        an adapter from `lora.first_layer` up, the layers below run as a separate frozen scan:
        nothing in them depends on the adapter, so autodiff's backward pass ends at first_layer.
        part: "all", or "lower"/"upper" (the layers below/from first_layer only)."""
        first = self.lora_config.first_layer if self.lora_config is not None else 0
        if part == "upper":  # from lower states: the adapter's layers, with it on or off
            return jax.lax.scan(body(use_lora), x, jax.tree.map(lambda a: a[first:], xs))
        if part == "lower":  # no adapter below first_layer
            return jax.lax.scan(body(False), x, jax.tree.map(lambda a: a[:first], xs))
        if first == 0 or not use_lora:
            return jax.lax.scan(body(use_lora), x, xs)
        x, low = jax.lax.scan(body(False), x, jax.tree.map(lambda a: a[:first], xs))
        x, high = jax.lax.scan(body(True), x, jax.tree.map(lambda a: a[first:], xs))
        return x, jax.tree.map(lambda a, b: jnp.concatenate([a, b]), low, high)

    def logits(self, hidden: jax.Array, use_lora: bool = True, out_dtype=None) -> jax.Array:
        """LM head. Call it on the positions you need only: the vocabulary projection dominates.
        out_dtype: the logits' dtype (default: the compute dtype); the sampler asks for float32,
        so that bfloat16 rounding (1/16 apart at 10) never ties or reorders the candidates it
        chooses between."""
        if self.lm_head is not None:
            return self.lm_head(hidden, use_lora, out_dtype)
        out = _matmul(hidden, self.embed[...].astype(self.dtype).T, out_dtype or self.dtype)
        if use_lora and self.lm_head_lora_a is not None:
            dtype = self.lora_dtype or self.dtype
            delta = (hidden.astype(dtype) @ self.lm_head_lora_a[...].astype(dtype)) @ \
                self.lm_head_lora_b[...].astype(dtype)
            out = out + (self.lm_head_scale * delta).astype(out.dtype)
        return out


def _slot_positions(key_valid: jax.Array) -> jax.Array:
    """(B, S): the position of the token in each slot (padding slots: their next token's), as
    every forward numbers them: the real tokens before it."""
    return jnp.cumsum(key_valid.astype(jnp.int32), axis=1) - 1


def _write(cache: jax.Array, new: jax.Array, index) -> jax.Array:
    """New (layers, batch, kv_heads, t, head_dim) keys or values into their slots of the cache,
    from slot `index`: a scalar, or (batch,) one per row."""
    new = new.astype(cache.dtype)
    if jnp.ndim(index) == 0:
        return jax.lax.dynamic_update_slice_in_dim(cache, new, index, axis=3)
    # One scatter of a (layers, kv_heads, head_dim) window per (row, new token): in place, where
    # a vmapped dynamic_update_slice measured 30x slower on XLA:CPU (it copies the cache).
    t = new.shape[3]
    rows = jnp.arange(new.shape[1])[:, None]
    slots = index[:, None] + jnp.arange(t)[None]  # (batch, t)
    return cache.at[:, rows, :, slots].set(jnp.moveaxis(new, (1, 3), (0, 1)), unique_indices=True)


def causal_inputs(tokens: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Positions counted from each row's first real token, for left- or right-padded batches."""
    positions = jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1, 0)
    return positions, valid.astype(bool)

"""The JAX model computes what transformers computes, with and without LoRA and a KV cache."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import tiny_models
from pdistill_jax.config import LoraConfig
from pdistill_jax.weights.hf import load_hf_checkpoint
from pdistill_jax.weights.load import build_model
from pdistill_jax.model.transformer import causal_inputs, init_cache


def _torch_logits(model, ids, attention_mask=None):
    with torch.no_grad():
        out = model(torch.tensor(ids), attention_mask=None if attention_mask is None
                    else torch.tensor(attention_mask))
    return out.logits.numpy()


def _jax_logits(model, ids, valid=None, use_lora=True):
    ids = jnp.asarray(ids)
    valid = jnp.ones(ids.shape, bool) if valid is None else jnp.asarray(valid)
    positions, key_valid = causal_inputs(ids, valid)
    hidden, _ = model(ids, positions, key_valid, use_lora=use_lora)
    return np.asarray(model.logits(hidden, use_lora))


CASES = {
    "llama-untied-gqa": dict(arch="llama", tie=False),
    "llama-tied-mha": dict(arch="llama", tie=True, num_key_value_heads=4),
    "llama3-rope-scaling": dict(arch="llama", tie=False, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}),
    "qwen2-tied-bias": dict(arch="qwen2", tie=True),
    "qwen2-untied-bias": dict(arch="qwen2", tie=False, num_key_value_heads=1),
    "mistral-head-dim": dict(arch="mistral", tie=False, head_dim=24),
    # Qwen3: q/k norms per head, no biases; head_dim apart from hidden/heads as in real Qwen3.
    "qwen3-qk-norm": dict(arch="qwen3", tie=True, head_dim=24),
    "llama3.2-tied-rope-scaling": dict(arch="llama", tie=True, rope_scaling={
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}),
    # Sliding windows shorter than the 40-token prompts, so the window is what is compared.
    "mistral-sliding-window": dict(arch="mistral", tie=False, sliding_window=16),
    # Phi-3: fused qkv_proj and gate_up_proj, split at load.
    "phi3-fused-sliding-window": dict(arch="phi3", tie=False, sliding_window=16),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(tmp_path, case):
    kw = dict(CASES[case])
    torch_model = tiny_models.build_model(tmp_path, kw.pop("arch"), tie=kw.pop("tie"), **kw)
    cfg, params = load_hf_checkpoint(tmp_path)
    model = build_model(cfg, params)
    ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (3, 40))
    diff = np.abs(_jax_logits(model, ids) - _torch_logits(torch_model, ids)).max()
    assert diff <= 1e-4, diff


def test_left_padded_rows_match_unpadded(tiny_llama):
    cfg, params = load_hf_checkpoint(tiny_llama)
    model = build_model(cfg, params)
    rng = np.random.RandomState(1)
    short, long = rng.randint(3, cfg.vocab_size, 9), rng.randint(3, cfg.vocab_size, 16)
    ids = np.zeros((2, 16), np.int32)
    valid = np.zeros((2, 16), bool)
    ids[0, 7:], valid[0, 7:] = short, True
    ids[1], valid[1] = long, True
    batched = _jax_logits(model, ids, valid)
    alone = _jax_logits(model, short[None])
    np.testing.assert_allclose(batched[0, 7:], alone[0], atol=1e-5)
    np.testing.assert_allclose(batched[1], _jax_logits(model, long[None])[0], atol=1e-5)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2"])
def test_lora_with_zero_b_is_the_base_and_nonzero_b_is_not(fixture, request):
    cfg, params = load_hf_checkpoint(request.getfixturevalue(fixture))
    lora = LoraConfig(rank=4, alpha=8, targets=("q", "k", "v", "o", "gate", "up", "down", "lm_head"))
    model = build_model(cfg, params, lora, seed=3)
    ids = np.random.RandomState(2).randint(0, cfg.vocab_size, (2, 12))
    base = _jax_logits(model, ids, use_lora=False)
    np.testing.assert_array_equal(_jax_logits(model, ids, use_lora=True), base)
    from flax import nnx
    _, lora_state, _ = nnx.split(model, nnx.LoRAParam, nnx.Param)
    leaves = jax.tree.leaves(lora_state)
    assert leaves and all(leaf.dtype == jnp.float32 for leaf in leaves)
    nnx.update(model, jax.tree.map(lambda a: a + 0.05, lora_state))
    assert np.abs(_jax_logits(model, ids, use_lora=True) - base).max() > 1e-2
    np.testing.assert_array_equal(_jax_logits(model, ids, use_lora=False), base)


@pytest.mark.parametrize("fixture", ["tiny_qwen2", "tiny_qwen3", "tiny_phi3"])
def test_kv_cache_decoding_equals_full_recomputation(fixture, request):
    cfg, params = load_hf_checkpoint(request.getfixturevalue(fixture))
    model = build_model(cfg, params)
    ids = jnp.asarray(np.random.RandomState(3).randint(0, cfg.vocab_size, (2, 14)))
    full = _jax_logits(model, ids)
    prompt = 9
    cache = init_cache(cfg, 2, 14)
    key_valid = jnp.zeros((2, 14), bool).at[:, :prompt].set(True)
    pos = jnp.broadcast_to(jnp.arange(14), (2, 14))
    hidden, cache = model(ids[:, :prompt], pos[:, :prompt], key_valid, cache=cache, cache_index=0)
    np.testing.assert_allclose(np.asarray(model.logits(hidden)), full[:, :prompt], atol=1e-5)
    for t in range(prompt, 14):
        key_valid = key_valid.at[:, t].set(True)
        hidden, cache = model(ids[:, t:t + 1], pos[:, t:t + 1], key_valid, cache=cache, cache_index=t)
        np.testing.assert_allclose(np.asarray(model.logits(hidden))[:, 0], full[:, t], atol=1e-5)


def test_remat_and_bfloat16_compute(tiny_llama):
    cfg, params = load_hf_checkpoint(tiny_llama)
    ids = np.random.RandomState(4).randint(0, cfg.vocab_size, (2, 10))
    ref = _jax_logits(build_model(cfg, params), ids)
    np.testing.assert_allclose(_jax_logits(build_model(cfg, params, remat=True), ids), ref, atol=1e-6)
    bf16 = _jax_logits(build_model(cfg, params, dtype=jnp.bfloat16), ids)
    assert bf16.dtype == jnp.bfloat16 and np.abs(bf16.astype(np.float32) - ref).max() < 0.5


def test_upper_layer_adapter_is_the_full_adapter_with_the_lower_layers_off(tiny_llama):
    """first_layer=1: the student equals an every-layer adapter whose layer-0 B is zero; the
    lower layer gets no gradient, and cached decoding agrees with the full forward."""
    from flax import nnx

    cfg, params = load_hf_checkpoint(tiny_llama)
    upper = build_model(cfg, params, LoraConfig(rank=4, alpha=8, first_layer=1), seed=3)
    full = build_model(cfg, params, LoraConfig(rank=4, alpha=8), seed=3)
    state = nnx.state(upper, nnx.LoRAParam)
    noisy = jax.tree.map(lambda a: a + 0.05 * jnp.cos(jnp.arange(a.size).reshape(a.shape)), state)
    nnx.update(upper, noisy)
    nnx.update(full, jax.tree.map(lambda a: a, noisy))
    lower_off = jax.tree_util.tree_map_with_path(
        lambda p, a: a.at[0].set(0.0) if "lora_b" in jax.tree_util.keystr(p) else a,
        nnx.state(full, nnx.LoRAParam))
    nnx.update(full, lower_off)
    ids = np.random.RandomState(5).randint(0, cfg.vocab_size, (2, 12))
    got = _jax_logits(upper, ids)
    np.testing.assert_allclose(got, _jax_logits(full, ids), atol=1e-5)
    assert np.abs(got - _jax_logits(upper, ids, use_lora=False)).max() > 1e-2

    graphdef, lora_state, rest = nnx.split(upper, nnx.LoRAParam, ...)

    def loss(ls):
        m = nnx.merge(graphdef, ls, rest)
        tokens = jnp.asarray(ids)
        positions, key_valid = causal_inputs(tokens, jnp.ones_like(tokens, bool))
        return jnp.sum(m(tokens, positions, key_valid)[0] ** 2)

    tokens = jnp.asarray(ids)
    positions, key_valid = causal_inputs(tokens, jnp.ones_like(tokens, bool))
    lower = upper.lower_states(tokens, positions, key_valid)
    for on in (True, False):  # from the lower layers' states, with the adapter on and off
        np.testing.assert_allclose(
            upper.logits(upper(tokens, positions, key_valid, use_lora=on, lower=lower)[0], on),
            _jax_logits(upper, ids, use_lora=on), atol=1e-5)

    grads = jax.tree_util.tree_leaves_with_path(jax.grad(loss)(lora_state))
    assert grads
    for path, g in grads:
        assert np.all(np.asarray(g)[0] == 0), jax.tree_util.keystr(path)
        assert np.abs(np.asarray(g)[1]).max() > 0, jax.tree_util.keystr(path)

    cache = init_cache(cfg, 2, 12)
    key_valid = jnp.zeros((2, 12), bool).at[:, :8].set(True)
    pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
    hidden, cache = upper(jnp.asarray(ids[:, :8]), pos[:, :8], key_valid, cache=cache, cache_index=0)
    key_valid = key_valid.at[:, 8].set(True)
    hidden, _ = upper(jnp.asarray(ids[:, 8:9]), pos[:, 8:9], key_valid, cache=cache, cache_index=8)
    np.testing.assert_allclose(np.asarray(upper.logits(hidden))[:, 0], got[:, 8], atol=1e-5)


def test_first_layer_is_checked_against_the_model(tiny_llama):
    cfg, params = load_hf_checkpoint(tiny_llama)
    with pytest.raises(ValueError, match="first_layer=2 must be below the model's 2 layers"):
        build_model(cfg, params, LoraConfig(rank=4, first_layer=2))


def test_gemma3_prefill_and_cached_decode_match_transformers(tiny_gemma3):
    """Gemma 3's windowed layers (6 slots) around a full one: the whole-sequence forward, a
    prefill longer than the window and every cached decode step after it give transformers'
    logits."""
    from transformers import AutoModelForCausalLM

    cfg, params = load_hf_checkpoint(tiny_gemma3)
    assert cfg.sliding_window == 6 and cfg.layer_types.count("full_attention") == 1
    model = build_model(cfg, params)
    ref_model = AutoModelForCausalLM.from_pretrained(str(tiny_gemma3), dtype=torch.float32).eval()
    n, prompt = 24, 10
    ids = np.random.RandomState(7).randint(0, cfg.vocab_size, (2, n))
    ref = _torch_logits(ref_model, ids)
    np.testing.assert_allclose(_jax_logits(model, ids), ref, atol=1e-4, rtol=0)

    cache = init_cache(cfg, 2, n)
    key_valid = jnp.zeros((2, n), bool).at[:, :prompt].set(True)
    pos = jnp.broadcast_to(jnp.arange(n), (2, n))
    tokens = jnp.asarray(ids)
    hidden, cache = model(tokens[:, :prompt], pos[:, :prompt], key_valid, cache=cache, cache_index=0)
    np.testing.assert_allclose(np.asarray(model.logits(hidden)), ref[:, :prompt], atol=1e-4, rtol=0)
    from flax import nnx

    @nnx.jit  # one compiled decode step for every position (the sampler's own is jitted too)
    def decode(model, token, position, key_valid, cache, index):
        hidden, cache = model(token, position, key_valid, cache=cache, cache_index=index)
        return model.logits(hidden)[:, 0], cache

    for t in range(prompt, n):
        key_valid = key_valid.at[:, t].set(True)
        logits, cache = decode(model, tokens[:, t:t + 1], pos[:, t:t + 1], key_valid, cache,
                               jnp.asarray(t))
        np.testing.assert_allclose(np.asarray(logits), ref[:, t], atol=1e-4, rtol=0,
                                   err_msg=f"decode step at position {t}")



def test_auto_dtype_is_bfloat16_on_accelerators_and_float32_on_cpu(monkeypatch):
    from pdistill_jax.model.transformer import compute_dtype, resolve_dtype

    assert resolve_dtype("auto") == "float32" and compute_dtype("auto") == jnp.float32  # tests: CPU
    assert [resolve_dtype(n) for n in ("float32", "bfloat16")] == ["float32", "bfloat16"]
    assert resolve_dtype("auto", accelerator=True) == "bfloat16"  # what `pdistill plan` plans
    for backend in ("gpu", "tpu", "cuda", "rocm"):
        monkeypatch.setattr(jax, "default_backend", lambda backend=backend: backend)
        assert resolve_dtype("auto") == "bfloat16" and compute_dtype("auto") == jnp.bfloat16
        assert resolve_dtype("float32") == "float32"

"""`jax.nn.dot_product_attention` (the accelerator path) computes what the einsum attention
computes: logits over left-padded rows, a shared prefix read by training rows, KV-cached
prefill and greedy decoding, and the adapter's gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pdistill_jax.config import LoraConfig, SamplingParams
from pdistill_jax.model.sampler import generate
from pdistill_jax.model.transformer import attention_kernel, causal_inputs, init_cache
from pdistill_jax.weights.hf import load_hf_checkpoint
from pdistill_jax.weights.load import build_model

# Among the fixtures: GQA (tiny_llama), Gemma 3's windowed and full layers with their own RoPE
# (a window of 6 under these 16-token rows), Phi-3's window.
LORA = LoraConfig(rank=4, alpha=8)


def _pair(request, fixture):
    cfg, params = load_hf_checkpoint(request.getfixturevalue(fixture))
    models = [build_model(cfg, params, LORA, seed=3, attention=k) for k in ("einsum", "dot_product")]
    for m in models:  # a non-zero adapter, the same in both
        state = nnx.state(m, nnx.LoRAParam)
        nnx.update(m, jax.tree.map(lambda a: a + 0.05 * jnp.sin(jnp.arange(a.size).reshape(a.shape)),
                                   state))
    return cfg, models


def _padded_batch(cfg):
    rng = np.random.RandomState(0)
    ids = rng.randint(3, cfg.vocab_size, (3, 16)).astype(np.int32)
    valid = np.ones((3, 16), bool)
    valid[1, :5] = valid[2, :11] = False  # left padding
    return jnp.asarray(ids), jnp.asarray(valid)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gemma3"])
def test_logits_and_adapter_gradients_match(fixture, request):
    cfg, (einsum, fused) = _pair(request, fixture)
    ids, valid = _padded_batch(cfg)
    positions, key_valid = causal_inputs(ids, valid)

    def loss(lora, graphdef, rest):
        model = nnx.merge(graphdef, lora, rest)
        hidden, _ = model(ids, positions, key_valid)
        logits = model.logits(hidden).astype(jnp.float32)
        return jnp.sum(jnp.where(valid[..., None], jax.nn.log_softmax(logits), 0.0)) / 1e3, logits

    grads, outs = [], []
    for model in (einsum, fused):
        graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
        (_, logits), g = jax.value_and_grad(loss, has_aux=True)(lora, graphdef, rest)
        outs.append(np.asarray(logits)[np.asarray(valid)])  # padded rows are never read
        grads.append(jax.tree.leaves(g))
    np.testing.assert_allclose(outs[1], outs[0], atol=2e-5, rtol=0)
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("fixture", ["tiny_gemma3", "tiny_phi3"])
def test_a_shared_prefix_and_a_kv_cache_match(fixture, request):
    """Training's prefix (read-only keys before every row) and a suffix prefilled after cached
    slots, the two paths that attend over keys the call did not compute."""
    cfg, (einsum, fused) = _pair(request, fixture)
    ids, valid = _padded_batch(cfg)
    p, rows = 5, ids.shape[0]
    prefix_ids = jnp.asarray(np.random.RandomState(1).randint(3, cfg.vocab_size, (rows, p)),
                             jnp.int32)
    results = []
    for model in (einsum, fused):
        ppos = jnp.broadcast_to(jnp.arange(p), (rows, p))
        _, prefix = model(prefix_ids, ppos, jnp.ones((rows, p), bool),
                          cache=init_cache(cfg, rows, p), cache_index=0)
        key_valid = jnp.concatenate([jnp.ones((rows, p), bool), valid], axis=1)
        positions = p + causal_inputs(ids, valid)[0]
        hidden, _ = model(ids, positions, key_valid, prefix=prefix)
        with_prefix = np.asarray(model.logits(hidden))
        # The same rows written into a cache after the prefix: cache_index > 0, t > 1.
        cache = init_cache(cfg, rows, p + ids.shape[1])
        cache = jax.tree.map(lambda c, k: c.at[:, :, :, :p].set(k), cache, prefix)
        slots = jnp.concatenate([jnp.ones((rows, p), bool), valid], axis=1)
        hidden, _ = model(ids, positions, slots, cache=cache, cache_index=p)
        results.append((with_prefix, np.asarray(model.logits(hidden))))
    mask = np.asarray(valid)
    for got, want in zip(results[1], results[0]):
        np.testing.assert_allclose(got[mask], want[mask], atol=2e-5, rtol=0)
    np.testing.assert_allclose(results[0][1][mask], results[0][0][mask], atol=2e-5, rtol=0)


@pytest.mark.parametrize("fixture", ["tiny_llama"])
def test_greedy_generations_are_the_same(fixture, request):
    cfg, (einsum, fused) = _pair(request, fixture)
    rng = np.random.RandomState(2)
    shared = list(rng.randint(3, cfg.vocab_size, 7))
    prompts = [shared + list(rng.randint(3, cfg.vocab_size, n)) for n in (1, 4, 9)] + \
        [list(rng.randint(3, cfg.vocab_size, 12))]
    params = SamplingParams(max_new_tokens=12)
    outs = [[c.tokens for c in generate(m, prompts, params, end_ids=[cfg.vocab_size - 1],
                                        batch_size=4)] for m in (einsum, fused)]
    assert outs[0] == outs[1] and all(len(t) == 12 for t in outs[0])


def test_kernel_setting():
    assert attention_kernel("auto") == ("einsum" if jax.default_backend() == "cpu" else "dot_product")
    assert attention_kernel("dot_product") == "dot_product"
    with pytest.raises(ValueError, match="attention='flash'; use one of auto, einsum, dot_product"):
        attention_kernel("flash")

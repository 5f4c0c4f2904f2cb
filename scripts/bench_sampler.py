"""Seconds for one batch of the jit sampler on the embedded model: prefill, then decode.

A batch of --batch rows with random --prompt-tokens prompts, of which only --distinct are
different (the rest repeat them, as question calls about one document do), continued for
--new-tokens with no end token, so every row runs every step. The compile run is excluded;
prints one JSON line with the prefill-only time (1 new token) and the full batch time.

Beside them, the memory bound of a decode step: the bytes each step must read (every base weight
matrix once, the tied embedding as the LM head, plus the KV cache the way attention reads it: all
its allocated slots, masked) and this machine's memory read bandwidth measured in the same run (a
STREAM-like jitted kernel that reads a 512 MiB float32 array once, a sum: a decode step mostly
reads; a kernel that writes a fresh output also pays the page faults of its new buffer, which
measured less than half of this). bound_ms_per_step = bytes / bandwidth; fraction_of_bound =
bound / measured decode step (1.0 = at the memory-bandwidth limit). A CPU reaches that bound at
small batches only: the step's FLOPs (2 per weight per row, plus attention over the cache) over
the f32 matmul peak measured in the same run (as `bench_step.py --matmul-peak`) give
compute_bound_ms_per_step, the other floor; the larger of the two is the step's limit.

--decode-dtype bfloat16 holds the base weights and the KV cache in bfloat16 (as `answer
--decode-dtype` does), so the bytes a step reads halve; the compute bound still uses the float32
matmul peak.

    python scripts/bench_sampler.py [--batch 16 --prompt-tokens 250 --new-tokens 64
                                     --temperature 1.0 --top-k 50 --distinct 16
                                     --decode-dtype bfloat16]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np


def memory_bandwidth(mib: int = 512, repeats: int = 5) -> float:
    """Bytes per second read by a jitted sum over `mib` MiB of float32, best of `repeats`."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((mib * 2 ** 20 // 4,), jnp.float32)
    read = jax.jit(jnp.sum)
    read(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        read(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return x.nbytes / best


def decode_step_bytes(lm, batch: int, cache_slots: int) -> dict:
    """What one decode step reads: the base weights (an untied input embedding only as the rows
    looked up, i.e. nothing next to the rest) and the KV cache of `cache_slots` slots a row."""
    import jax
    from flax import nnx

    from pdistill_jax.model.transformer import init_cache

    _, _, base = nnx.split(lm.model, nnx.LoRAParam, nnx.Param)
    weights = sum(leaf.nbytes for leaf in jax.tree.leaves(base))
    if not lm.cfg.tie_word_embeddings:
        weights -= lm.cfg.vocab_size * lm.cfg.hidden_size * jax.numpy.dtype(lm.model.dtype).itemsize
    cache = jax.eval_shape(lambda: init_cache(lm.cfg, batch, cache_slots, lm.model.dtype))
    kv = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(cache))
    cfg = lm.cfg
    attention = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * cache_slots
    flops = batch * (2 * weights / jax.numpy.dtype(lm.model.dtype).itemsize + attention)
    return {"weight_bytes": int(weights), "kv_cache_bytes": int(kv), "flops_per_step": int(flops)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=250)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--distinct", type=int, default=0, help="distinct prompts (0 = every row its own)")
    ap.add_argument("--attention", choices=("auto", "einsum", "dot_product"), default="auto",
                    help="attention kernel of the prefill (decode steps always use the einsum)")
    ap.add_argument("--decode-dtype", choices=("float32", "bfloat16", "auto"), default="float32",
                    help="dtype of the base weights and the KV cache while decoding (auto = "
                         "bfloat16 on a GPU/TPU, float32 on CPU)")
    a = ap.parse_args()

    import jax

    from pdistill_jax.weights.load import load_model
    from pdistill_jax.model.prefill import PROMPT_MIN_WIDTH, bucket_length
    from pdistill_jax.model.sampler import generate
    from pdistill_jax.config import SamplingParams

    from pdistill_jax.model.transformer import resolve_dtype
    from pdistill_jax.weights.load import decode_options

    decode_dtype = resolve_dtype(a.decode_dtype)
    lm = load_model(a.model, attention=a.attention, **decode_options(decode_dtype))
    rng = np.random.default_rng(0)
    distinct = a.distinct or a.batch
    pool = [list(map(int, rng.integers(100, lm.cfg.vocab_size, a.prompt_tokens))) for _ in range(distinct)]
    prompts = [pool[i % distinct] for i in range(a.batch)]
    times = {}
    for new in (1, a.new_tokens + 1):  # +1: the first token comes from the prefill's logits
        params = SamplingParams(temperature=a.temperature, top_k=a.top_k, max_new_tokens=new)
        run = lambda: generate(lm.model, prompts, params, end_ids=[-1], batch_size=a.batch,
                               use_lora=False)
        run()  # compile
        t = time.perf_counter()
        run()
        times[new] = time.perf_counter() - t
    full = times[a.new_tokens + 1]
    decode_s = (full - times[1]) / a.new_tokens
    # the cache a batch allocates: the bucketed prompt, then a slot per new token
    read = decode_step_bytes(lm, a.batch, bucket_length(a.prompt_tokens, PROMPT_MIN_WIDTH)
                             + a.new_tokens + 1)
    bandwidth = memory_bandwidth()
    bound_s = (read["weight_bytes"] + read["kv_cache_bytes"]) / bandwidth
    from bench_step import matmul_peak  # this folder's benchmark of the matmul peak

    compute_s = read["flops_per_step"] / matmul_peak(2048)["flops_per_s"]
    print(json.dumps({
        "jax": jax.__version__, "platform": jax.devices()[0].platform, "attention": a.attention,
        "decode_dtype": decode_dtype, "batch": a.batch,
        "prompt_tokens": a.prompt_tokens, "distinct_prompts": distinct, "new_tokens": a.new_tokens,
        "temperature": a.temperature, "top_k": a.top_k, "prefill_s": round(times[1], 2),
        "batch_s": round(full, 2), "decode_ms_per_step": round(1000 * decode_s, 1),
        "new_tokens_per_s": round(a.batch * a.new_tokens / full, 1), **read,
        "bandwidth_GB_per_s": round(bandwidth / 1e9, 2), "bound_ms_per_step": round(1000 * bound_s, 1),
        "fraction_of_bound": round(bound_s / decode_s, 3),
        "compute_bound_ms_per_step": round(1000 * compute_s, 1),
        "fraction_of_limit": round(max(bound_s, compute_s) / decode_s, 3)}))


if __name__ == "__main__":
    main()

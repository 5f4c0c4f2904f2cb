"""Seconds for one batch of the jit sampler on the embedded model: prefill, then decode.

A batch of --batch rows with random --prompt-tokens prompts, of which only --distinct are
different (the rest repeat them, as question calls about one document do), continued for
--new-tokens with no end token, so every row runs every step. The compile run is excluded;
prints one JSON line with the prefill-only time (1 new token) and the full batch time.

    python scripts/bench_sampler.py [--batch 16 --prompt-tokens 250 --new-tokens 64
                                     --temperature 1.0 --top-k 50 --distinct 16]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=250)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--distinct", type=int, default=0, help="distinct prompts (0 = every row its own)")
    a = ap.parse_args()

    import jax

    from pdistill_jax.weights.load import load_model
    from pdistill_jax.model.sampler import generate
    from pdistill_jax.config import SamplingParams

    lm = load_model(a.model)
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
    print(json.dumps({
        "jax": jax.__version__, "platform": jax.devices()[0].platform, "batch": a.batch,
        "prompt_tokens": a.prompt_tokens, "distinct_prompts": distinct, "new_tokens": a.new_tokens,
        "temperature": a.temperature, "top_k": a.top_k, "prefill_s": round(times[1], 2),
        "batch_s": round(full, 2), "decode_ms_per_step": round(1000 * (full - times[1]) / a.new_tokens, 1),
        "new_tokens_per_s": round(a.batch * a.new_tokens / full, 1)}))


if __name__ == "__main__":
    main()

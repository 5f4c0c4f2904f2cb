"""Tokens/s of `pdistill answer` (our jit sampler) vs transformers `generate` (torch), greedy.

Same model (the embedded SmolLM2-135M GGUF, float32), same chat prompts (the demo corpus's test
questions, closed-book), same max_new_tokens, at each batch size. Prints one JSON line per
(implementation, batch size) and a final summary line. torch is a benchmark-only dependency.

    python scripts/bench_answer.py --batch-sizes 1 16 --questions 32 --max-new-tokens 48
"""
from __future__ import annotations

import argparse
import json
import time

from pdistill_jax.files import read_jsonl
from pdistill_jax.weights.load import load_model
from pdistill_jax.pipeline.run import resolve_path
from pdistill_jax.model.sampler import generate
from pdistill_jax.config import SamplingParams
from pdistill_jax.weights.tokenizer import chat_prompt_ids, end_token_ids


def bench_jax(lm, prompts, end, batch, max_new):
    params = SamplingParams(max_new_tokens=max_new)
    # compile: the same call (the slots' cache length follows the call's longest prompt group)
    generate(lm.model, prompts, params, end_ids=end, batch_size=batch, use_lora=False)
    t = time.perf_counter()
    outs = generate(lm.model, prompts, params, end_ids=end, batch_size=batch, use_lora=False)
    dt = time.perf_counter() - t
    return sum(len(o.tokens) + o.finished for o in outs), dt


def bench_torch(path, prompts, end, batch, max_new):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 dtype=torch.float32).eval()
    pad = end[0]

    def run(chunk):
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                                 eos_token_id=end, pad_token_id=pad)
        new = out[:, width:].tolist()
        return sum(next((i + 1 for i, t in enumerate(row) if t in end), len(row)) for row in new)

    run(prompts[:batch])  # warm-up
    t = time.perf_counter()
    tokens = sum(run(prompts[i:i + batch]) for i in range(0, len(prompts), batch))
    return tokens, time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--questions", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--skip-torch", action="store_true")
    a = ap.parse_args()
    lm = load_model(a.model)
    qs = read_jsonl(resolve_path("builtin:demo/questions.jsonl"))[:a.questions]
    prompts = [chat_prompt_ids(lm.tokenizer, q["question"]) for q in qs]
    end = end_token_ids(lm.tokenizer, lm.cfg)
    results = {}
    for batch in a.batch_sizes:
        for impl in ("pdistill-jax",) + (() if a.skip_torch else ("transformers-torch",)):
            fn = bench_jax if impl == "pdistill-jax" else bench_torch
            tokens, dt = fn(lm if impl == "pdistill-jax" else lm.path, prompts, end, batch,
                            a.max_new_tokens)
            results[(impl, batch)] = tokens / dt
            print(json.dumps({"impl": impl, "batch": batch, "questions": len(prompts),
                              "generated_tokens": tokens, "seconds": round(dt, 2),
                              "tokens_per_s": round(tokens / dt, 1)}), flush=True)
    print(json.dumps({"summary": {f"{i}@{b}": round(v, 1) for (i, b), v in results.items()}}))


if __name__ == "__main__":
    main()

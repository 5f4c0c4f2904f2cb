"""The sampler on three kinds of rows, for comparing samplers: the tokens of every row, the slot
steps decoding ran and the seconds, one JSON file per run.

Runs on the embedded model at batch 32: the demo's 80 retention questions greedy (40 tokens),
the teacher's answers to 96 questions of a `pdistill generate` folder (T = 0.25, top-k 50, 48
tokens, hidden states kept) and 16 of its restatement requests (192 tokens). Run it once per
checkout (another checkout's sampler: put it first on PYTHONPATH) and compare the two files
with --against:

    PYTHONPATH=/path/to/old/checkout python scripts/bench_slots.py runs/full/data old.json
    python scripts/bench_slots.py runs/full/data new.json --against old.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SYSTEM = ("You are a helpful assistant. Give short, direct answers with the exact names, places, "
          "dates and numbers.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", help="a `pdistill generate` folder made with restatements_per_doc > 0")
    ap.add_argument("out", help="the JSON file to write")
    ap.add_argument("--against", help="another run's JSON: count the rows whose tokens differ")
    a = ap.parse_args()

    from pdistill_jax.config import SamplingParams
    from pdistill_jax.datagen.answers import teacher_message
    from pdistill_jax.files import read_jsonl
    from pdistill_jax.model.sampler import count_tokens, generate
    from pdistill_jax.weights.load import load_model
    from pdistill_jax.weights.tokenizer import chat_prompt_ids, end_token_ids

    lm = load_model("smollm2-135m-instruct")
    rows = read_jsonl(Path(a.data) / "qa.jsonl")
    teacher = [r for r in rows if "restatement" not in r][:96]
    restate = [r for r in rows if "restatement" in r][:16]
    general = read_jsonl(REPO / "pdistill_jax/assets/demo/general_knowledge.jsonl")

    def prompts(texts):
        return [chat_prompt_ids(lm.tokenizer, t, SYSTEM) for t in texts]

    cases = {
        "retention, greedy": (prompts(q["question"] for q in general),
                              SamplingParams(max_new_tokens=40), {}),
        "teacher answers": (prompts(teacher_message(r["document"], r["question"]) for r in teacher),
                            SamplingParams(0.25, 50, 1.0, 48), {"seed": 3, "keep_hidden": True}),
        "restatements": (prompts(teacher_message(r["document"], r["question"]) for r in restate),
                         SamplingParams(0.25, 50, 1.0, 192), {"seed": 4}),
    }
    end = end_token_ids(lm.tokenizer, lm.cfg)
    result = {}
    for name, (ids, params, kw) in cases.items():
        with count_tokens() as counts:
            start = time.perf_counter()
            outs = generate(lm.model, ids, params, end_ids=end, batch_size=32, **kw)
            seconds = time.perf_counter() - start
        result[name] = {"seconds": round(seconds, 1), **counts.as_dict(),
                        "tokens": [o.tokens for o in outs]}
    other = json.loads(Path(a.against).read_text()) if a.against else None
    for name, r in result.items():
        line = {"case": name, "rows": len(r["tokens"]), "seconds": r["seconds"],
                "new_tokens": r["new_tokens"], "slot_steps": r["slot_steps"]}
        if other is not None:
            line["rows_that_differ"] = sum(x != y for x, y in zip(r["tokens"], other[name]["tokens"]))
            line["their_slot_steps"] = other[name]["slot_steps"]
        print(json.dumps(line))
    Path(a.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()

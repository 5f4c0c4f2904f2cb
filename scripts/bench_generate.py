"""Q&A pairs per minute: our generation pipeline vs transformers `generate` doing the same work.

1. Ours: `generate_data` on a few documents (a warm-up run with another seed first, so the
   timed run measures sampling, not compilation); time = question stage + answer stage.
2. transformers (torch, the same GGUF weights dequantised to float32): the *same* prompts in the
   same numbers — every question call our run made, then the teacher prompts of every question
   it kept, once at the PD and once at the SFT temperature — batched (left padding, the same
   batch size), with the same temperature, top-k, max new tokens and end tokens.
Both report Q&A pairs per minute = our run's pairs / each side's sampling time.

    python scripts/bench_generate.py --max-docs 2 --questions-per-doc 6 [--torch-threads N] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEMO_DOCS = REPO / "pdistill_jax" / "assets" / "demo" / "documents.jsonl"


def run_ours(args, out: Path, seed: int) -> dict:
    from pdistill_jax.datagen.generate import generate_data
    from pdistill_jax.config import GenerateConfig

    cfg = GenerateConfig(questions_per_doc=args.questions_per_doc,
                         max_calls_per_doc=args.questions_per_doc, batch_size=args.batch_size,
                         seed=seed, docs_per_commit=args.max_docs)
    return generate_data(args.model, args.docs, out, cfg, max_docs=args.max_docs,
                         show_progress=False)


def torch_sample(model, prompts: list[list[int]], *, temperature: float, top_k: int,
                 max_new: int, end_ids: list[int], pad_id: int, batch_size: int) -> int:
    """transformers generate over `prompts` in length-sorted, left-padded batches; new tokens made."""
    import torch

    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    made = 0
    for start in range(0, len(order), batch_size):
        batch = [prompts[i] for i in order[start:start + batch_size]]
        width = max(len(p) for p in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, p in enumerate(batch):
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=temperature > 0,
                                 temperature=temperature if temperature > 0 else None,
                                 top_k=top_k or None, top_p=None, max_new_tokens=max_new,
                                 eos_token_id=end_ids, pad_token_id=pad_id)
        new = out[:, width:]
        for row in new.tolist():  # count up to and including the first end token
            cut = next((j for j, t in enumerate(row) if t in end_ids), len(row) - 1)
            made += cut + 1
    return made


def run_torch(args, ours_dir: Path, manifest: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from pdistill_jax.datagen.answers import teacher_message
    from pdistill_jax.datagen.questions import question_prompt
    from pdistill_jax.weights.registry import resolve_model
    from pdistill_jax.weights.tokenizer import chat_prompt_ids, end_token_ids, load_tokenizer

    path = resolve_model(args.model)
    tok = load_tokenizer(path)
    if path.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                     dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.eval()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    cfg = manifest["config"]
    end = end_token_ids(tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else end[0]
    docs = {d["id"]: d["text"] for d in map(json.loads, open(ours_dir / "documents.jsonl"))}
    rows = [json.loads(line) for line in open(ours_dir / "qa.jsonl")]
    q_prompts = [chat_prompt_ids(tok, question_prompt(docs[p["doc_id"]]), cfg["system"])
                 for p in manifest["per_doc"] for _ in range(p["calls"])]
    a_prompts = [chat_prompt_ids(tok, teacher_message(r["document"], r["question"]), cfg["system"])
                 for r in rows]
    common = dict(end_ids=end, pad_id=pad, batch_size=cfg["batch_size"])
    torch_sample(model, q_prompts[:2], temperature=1.0, top_k=50, max_new=4, **common)  # warm-up
    t0 = time.perf_counter()
    q_tokens = torch_sample(model, q_prompts, temperature=cfg["q_temperature"], top_k=cfg["q_top_k"],
                            max_new=cfg["max_question_tokens"], **common)
    t1 = time.perf_counter()
    a_tokens = 0
    for temperature in (cfg["a_temperature"], cfg["sft_temperature"]):
        a_tokens += torch_sample(model, a_prompts, temperature=temperature, top_k=cfg["a_top_k"],
                                 max_new=cfg["max_answer_tokens"], **common)
    t2 = time.perf_counter()
    return {"questions_s": t1 - t0, "answers_s": t2 - t1, "question_calls": len(q_prompts),
            "answer_prompts": 2 * len(a_prompts), "new_tokens": q_tokens + a_tokens,
            "torch_threads": torch.get_num_threads()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--docs", default=str(DEMO_DOCS))
    p.add_argument("--max-docs", type=int, default=2)
    p.add_argument("--questions-per-doc", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--torch-threads", type=int, default=0,
                   help="torch intra-op threads (0 = torch's default); on a busy machine 1 thread "
                        "can be many times faster than oversubscribed ones")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        run_ours(args, Path(tmp) / "warmup", seed=1)  # compiles the sampler's shapes
        t0 = time.perf_counter()
        manifest = run_ours(args, Path(tmp) / "timed", seed=0)
        wall = time.perf_counter() - t0
        pairs = manifest["counts"]["rows"]
        timing = manifest["timings"]["this_run"]
        ours_s = timing["questions_s"] + timing["answers_s"]
        theirs = run_torch(args, Path(tmp) / "timed", manifest)
    theirs_s = theirs["questions_s"] + theirs["answers_s"]
    result = {
        "model": args.model, "documents": manifest["counts"]["documents"], "pairs": pairs,
        "question_calls": manifest["counts"]["question_calls"],
        "ours": {"questions_s": timing["questions_s"], "answers_s": timing["answers_s"],
                 "wall_s_incl_load": round(wall, 2),
                 "pairs_per_minute": round(60 * pairs / ours_s, 2) if ours_s else None},
        "transformers": {**{k: round(v, 2) if isinstance(v, float) else v for k, v in theirs.items()},
                         "pairs_per_minute": round(60 * pairs / theirs_s, 2) if theirs_s else None},
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())

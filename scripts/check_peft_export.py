"""Does an exported PEFT adapter, loaded by the real `peft` onto transformers' copy of the base
model, answer exactly what `pdistill answer --adapter` answered? (Greedy, closed-book, chat.)

    pdistill export --adapter runs/demo/train_pd --out /tmp/pd_peft --format peft
    python scripts/check_peft_export.py --peft /tmp/pd_peft \
        --predictions runs/demo/predictions/pd_closed_book.jsonl --system "$SYSTEM" [--n 8]

with SYSTEM the run config's `system:` message, if it set one (configs/demo.yaml does): the
predictions were answered under it.

torch, transformers and peft are benchmark/test dependencies (`pip install -e ".[test]"`).
Prints one line per differing answer and a final count; exits 1 if any answer differs.
"""
from __future__ import annotations

import argparse
import json
import sys


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="the base the adapter was trained on")
    ap.add_argument("--peft", required=True, help="folder written by `pdistill export --format peft`")
    ap.add_argument("--predictions", required=True, help="JSONL from `pdistill answer --adapter` (closed-book)")
    ap.add_argument("--system", help="the system message the predictions were answered under "
                                     "(default: the chat template's)")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=40)
    a = ap.parse_args()

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from pdistill_jax.weights.registry import resolve_model
    from pdistill_jax.weights.tokenizer import chat_prompt_ids, end_token_ids, load_tokenizer

    path = resolve_model(a.model)
    tok = load_tokenizer(path)
    if path.suffix == ".gguf":
        base = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    else:
        base = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model = PeftModel.from_pretrained(base.eval(), a.peft).eval()
    end = end_token_ids(tok)
    with open(a.predictions) as f:
        rows = [json.loads(line) for line in f][:a.n]
    same = 0
    for row in rows:
        ids = chat_prompt_ids(tok, row["question"], a.system)
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=a.max_new_tokens, do_sample=False,
                                 eos_token_id=end, pad_token_id=end[0])[0, len(ids):].tolist()
        text = tok.decode([t for t in out if t not in end], skip_special_tokens=True).strip()
        if text == row["prediction"].strip():
            same += 1
        else:
            print(f"differs: {row['question']!r}\n  peft:     {text!r}\n  pdistill: {row['prediction']!r}")
    print(f"peft greedy == pdistill answer on {same}/{len(rows)} questions")
    return 0 if same == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())

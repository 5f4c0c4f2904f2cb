import json
import sys
from pathlib import Path


def add_arguments(p):
    p.add_argument("--questions", required=True, help='JSONL rows {"question", "answers", "doc_id"?}')
    p.add_argument("--predictions", required=True, help='JSONL rows {"question", "prediction"} (same order)')
    p.add_argument("--out", help="folder for results.json and per_question.jsonl "
                                 "(default: beside the predictions, <name>.eval/)")
    p.add_argument("--judge", help="a model (registered name, HF directory or .gguf) to use as LLM judge")
    p.add_argument("--judge-max-new-tokens", type=int, default=96)


def main(args):
    from ..evaluate import evaluate, write_results
    from ..jsonl import read_jsonl

    questions = read_jsonl(args.questions, flag="--questions")
    predictions = read_jsonl(args.predictions, flag="--predictions")
    judge = None
    if args.judge:
        from tqdm import tqdm

        from ..judge import local_judge

        bar = tqdm(total=len(questions), desc="judging", unit="q", file=sys.stderr)
        judge = local_judge(args.judge, max_new_tokens=args.judge_max_new_tokens, progress=bar.update)
    summary, rows = evaluate(questions, predictions, judge)
    out = Path(args.out) if args.out else Path(args.predictions).with_suffix(".eval")
    write_results(out, summary, rows)
    shown = {k: v for k, v in summary.items() if k != "by_doc"}
    print(json.dumps(shown, indent=2))
    print(f"wrote {out}/results.json and per_question.jsonl", file=sys.stderr)

"""`pdistill evaluate`: score one or more predictions files against the same test questions.

The scores go to stdout as a table (or JSON with --json); each file's results.json and
per_question.jsonl are written too, for scripts and for `pdistill run`'s report.
"""
import json
import sys
from pathlib import Path

from . import MODEL_HELP, add_no_progress_argument


def add_arguments(p):
    p.add_argument("--questions", required=True, help='JSONL rows {"question", "answers", "doc_id"?}, '
                   "or builtin:demo/questions.jsonl (the demo's test questions)")
    p.add_argument("--predictions", required=True, nargs="+", metavar="PREDICTIONS",
                   help='one or more JSONL files of {"question", "prediction"} rows, in the order '
                        "of --questions (one table row each)")
    p.add_argument("--out", help="folder for results.json and per_question.jsonl (default: beside "
                                 "each predictions file, <name>.eval/); with several --predictions, "
                                 "one subfolder per file, named after it")
    p.add_argument("--by-doc", action="store_true", help="also score each document (doc_id)")
    p.add_argument("--json", action="store_true",
                   help="print the scores as JSON, {predictions file: scores}, instead of tables")
    p.add_argument("--judge", help=f"a model to grade the predictions as an LLM judge: {MODEL_HELP} "
                                   "(default: none, no judge)")
    p.add_argument("--judge-max-new-tokens", type=int, default=96,
                   help="longest judge reply (reasoning and grade), in tokens")
    add_no_progress_argument(p)


def output_folders(predictions: list[str], out: str | None) -> list[Path]:
    """Where each predictions file's results go; two files may not share a folder."""
    if out is None:
        folders = [Path(p).with_suffix(".eval") for p in predictions]
    elif len(predictions) == 1:
        folders = [Path(out)]
    else:
        folders = [Path(out) / Path(p).stem for p in predictions]
    seen: dict[Path, str] = {}
    for p, folder in zip(predictions, folders):
        if folder in seen:
            raise ValueError(f"--predictions {seen[folder]} and {p} would both write to {folder}; "
                             "rename one, or evaluate them in separate commands")
        seen[folder] = p
    return folders


def main(args):
    from pdistill_jax.config import asset_path
    from pdistill_jax.files import read_jsonl
    from pdistill_jax.infer.evaluate import evaluate, format_table, write_results
    from pdistill_jax.log import logger

    questions = read_jsonl(asset_path(args.questions), flag="--questions")
    folders = output_folders(args.predictions, args.out)
    predictions = {}
    for path in args.predictions:
        rows = read_jsonl(path, flag="--predictions")
        try:  # every file is checked before the (slow) judge starts on the first
            evaluate(questions, rows)
        except ValueError as e:
            raise ValueError(f"--predictions {path}: {e}") from None
        predictions[path] = rows
    judge = None
    if args.judge:
        from tqdm import tqdm

        from pdistill_jax.infer.judge import local_judge

        bar = tqdm(total=len(questions) * len(predictions), desc="judging", unit="q",
                   file=sys.stderr, disable=args.no_progress)
        judge = local_judge(args.judge, max_new_tokens=args.judge_max_new_tokens, progress=bar.update)
    summaries = {}
    for (path, rows), folder in zip(predictions.items(), folders):
        summary, scored = evaluate(questions, rows, judge)
        write_results(folder, summary, scored)
        logger("evaluate").info(f"wrote {folder}/results.json and per_question.jsonl")
        summaries[path] = summary
    if args.json:
        shown = {path: {k: v for k, v in s.items() if k != "by_doc" or args.by_doc}
                 for path, s in summaries.items()}
        print(json.dumps(shown, indent=2, ensure_ascii=False))
    else:
        print(format_table(summaries, by_doc=args.by_doc))
    return 0

import sys
from pathlib import Path

from ..answer import CONTEXTS, PROMPT_FORMATS


def add_arguments(p):
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="registered name, Hugging Face directory or .gguf file")
    p.add_argument("--adapter", help="a training RUN folder or a PEFT adapter folder")
    p.add_argument("--questions", required=True, help='JSONL rows {"question", "answers"?, "doc_id"?}')
    p.add_argument("--out", required=True, help="JSONL predictions, written atomically")
    p.add_argument("--docs", help='JSONL rows {"id", "text", "title"?} for --context gold|bm25')
    p.add_argument("--context", choices=CONTEXTS, default="none")
    p.add_argument("--top-k", type=int, default=3, help="documents retrieved with --context bm25")
    p.add_argument("--prompt-format", choices=PROMPT_FORMATS, default="chat")
    p.add_argument("--system", help="system message (default: the one the --adapter run was trained "
                                    "with, else the chat template's)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--sampling-top-k", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)


def main(args):
    from tqdm import tqdm

    from ..answer import answer_questions, check_answer_options
    from ..jsonl import read_jsonl, write_jsonl_atomic
    from ..load import load_model
    from ..sample import SamplingParams

    check_answer_options(context=args.context, top_k=args.top_k, prompt_format=args.prompt_format,
                         batch_size=args.batch_size)
    sampling = SamplingParams(temperature=args.temperature, top_k=args.sampling_top_k,
                              top_p=args.top_p, max_new_tokens=args.max_new_tokens)
    questions = read_jsonl(args.questions)
    if not questions:
        raise ValueError(f"{args.questions}: no questions")
    docs = read_jsonl(args.docs) if args.docs else None
    if docs:
        for n, d in enumerate(docs, 1):
            for field in ("id", "text"):
                if field not in d:
                    raise ValueError(f"{args.docs} row {n}: missing field \"{field}\"")
    system = args.system
    if args.adapter:
        from ..peft_io import load_adapter_model, training_system_message

        lm = load_adapter_model(args.model, args.adapter)
        if system is None and (system := training_system_message(args.adapter)) is not None:
            print(f"system message: {system!r}, the one {args.adapter} was trained with "
                  "(--system to ask under another)", file=sys.stderr)
    else:
        lm = load_model(args.model)
    with tqdm(total=len(questions), desc="answering", unit="q", file=sys.stderr) as bar:
        rows = answer_questions(lm, questions, docs=docs, context=args.context, top_k=args.top_k,
                                prompt_format=args.prompt_format, system=system,
                                sampling=sampling, batch_size=args.batch_size, seed=args.seed,
                                use_lora=bool(args.adapter), progress=bar.update,
                                source=str(args.questions))
    write_jsonl_atomic(Path(args.out), rows)
    print(f"wrote {len(rows)} predictions to {args.out}", file=sys.stderr)

"""`pdistill answer`: answer test questions, closed-book or with documents in the prompt."""
import dataclasses

from pdistill_jax.config import CONTEXTS, PROMPT_FORMATS, AnswerConfig, SamplingParams, asset_path
from . import DOCS_HELP, add_decode_dtype_argument, add_model_argument, add_no_progress_argument


def add_arguments(p):
    add_model_argument(p)
    p.add_argument("--adapter", help="a training RUN folder or a PEFT adapter folder "
                                     "(default: none, the base model)")
    p.add_argument("--questions", required=True, help='JSONL rows {"question", "answers"?, "doc_id"?}, '
                   "or builtin:demo/questions.jsonl (the demo's test questions)")
    p.add_argument("--out", required=True, help="JSONL predictions, written atomically; the batches answered so far wait in "
                        "OUT.parts/ (rerun the same command to resume)")
    p.add_argument("--docs", help=f"{DOCS_HELP}; needed by --context gold|bm25 (default: none)")
    p.add_argument("--context", choices=CONTEXTS, default=AnswerConfig.context,
                   help="what goes in the prompt: none (closed-book), the question's gold document "
                        "(its doc_id), or the --top-k documents BM25 retrieves")
    p.add_argument("--top-k", type=int, default=AnswerConfig.top_k, help="documents retrieved with --context bm25")
    p.add_argument("--prompt-format", choices=PROMPT_FORMATS, default=AnswerConfig.prompt_format,
                   help="chat: the model's chat template; raw: the plain text without a template, "
                        "for base models (--system is then unused)")
    p.add_argument("--system", help="system message (default: the one the --adapter run was trained "
                                    "with, else the chat template's)")
    p.add_argument("--max-new-tokens", type=int, default=SamplingParams.max_new_tokens,
                   help="longest answer, in tokens")
    p.add_argument("--temperature", type=float, default=SamplingParams.temperature,
                   help="sampling temperature; 0 = greedy")
    p.add_argument("--top-p", type=float, default=SamplingParams.top_p,
                   help="nucleus sampling (with --temperature > 0); 1 = off")
    p.add_argument("--sampling-top-k", type=int, default=SamplingParams.top_k,
                   help="sample among the k likeliest tokens (with --temperature > 0); 0 = off")
    p.add_argument("--batch-size", type=int, default=AnswerConfig.batch_size,
                   help="questions answered at once")
    p.add_argument("--seed", type=int, default=AnswerConfig.seed,
                   help="seed of answer sampling (with --temperature > 0)")
    add_decode_dtype_argument(p, AnswerConfig.decode_dtype)
    add_no_progress_argument(p)


def load_docs(spec: str) -> list[dict]:
    """--docs as {"id", "text", "title"} rows; the same sources `generate --docs` reads."""
    from pdistill_jax.datagen.documents import load_documents

    docs = load_documents(spec)[0]
    if not docs:
        raise ValueError(f"--docs {spec}: no usable documents")
    return [dataclasses.asdict(d) for d in docs]


def main(args):
    from pdistill_jax.model.sharding import initialize_distributed, work_share

    initialize_distributed()  # a cluster's processes each answer a share (before any JAX call)
    work_share()

    from pdistill_jax.files import check_output_file, read_jsonl_lines
    from pdistill_jax.infer.answer import QUESTIONS_SCHEMA, answer_to_file, check_contexts, parts_dir
    from pdistill_jax.log import logger
    from pdistill_jax.model.transformer import resolve_dtype
    from pdistill_jax.weights.load import decode_options, load_model

    options = AnswerConfig(context=args.context, top_k=args.top_k, prompt_format=args.prompt_format,
                           batch_size=args.batch_size, seed=args.seed,
                           decode_dtype=args.decode_dtype)
    # "auto" as the dtype it is here, so that a resume on another backend is refused
    options = dataclasses.replace(options, decode_dtype=resolve_dtype(options.decode_dtype))
    options = dataclasses.replace(options, sampling=SamplingParams(
        temperature=args.temperature, top_k=args.sampling_top_k, top_p=args.top_p,
        max_new_tokens=args.max_new_tokens))
    questions_file = asset_path(args.questions)
    check_output_file(args.out, "--out", {"--questions": args.questions, "--docs": args.docs})
    if parts_dir(args.out).exists() and not parts_dir(args.out).is_dir():
        raise ValueError(f"{parts_dir(args.out)} is a file; answer keeps its unfinished batches "
                         "there: move it or choose another --out")
    numbered = read_jsonl_lines(questions_file, QUESTIONS_SCHEMA, flag="--questions")
    if not numbered:
        raise ValueError(f"{args.questions}: no questions")
    lines, questions = [n for n, _ in numbered], [q for _, q in numbered]
    docs = load_docs(args.docs) if args.docs else None
    check_contexts(questions, docs, args.context, str(questions_file), lines)
    system = args.system
    if args.adapter:
        from pdistill_jax.train.run_folder import training_system_message

        lm = load_model(args.model, adapter=args.adapter, **decode_options(options.decode_dtype))
        if system is None and (system := training_system_message(args.adapter)) is not None:
            logger("answer").info(f"system message: {system!r}, the one {args.adapter} was "
                                  "trained with (--system to ask under another)")
    else:
        lm = load_model(args.model, **decode_options(options.decode_dtype))
    answered = answer_to_file(lm, questions, dataclasses.replace(options, system=system), args.out,
                              run={"model": str(args.model), "adapter": args.adapter},
                              docs=docs, use_lora=bool(args.adapter),
                              show_progress=not args.no_progress, source=str(args.questions))
    count = work_share()[1]
    logger("answer").info(f"wrote {len(questions)} predictions to {args.out}"  # process 0 only
                          + (f" ({answered} answered by process 0 of {count})" if count > 1 else ""))

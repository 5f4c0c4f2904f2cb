"""`pdistill generate`: documents -> model-written questions -> teacher answers (a data folder)."""
from __future__ import annotations

import argparse
import dataclasses

from . import (DOCS_HELP, add_decode_dtype_argument, add_model_argument, add_no_progress_argument,
               add_recipe_argument, given_flags, recipe_default, recipe_layer)

# GenerateConfig fields that have a flag of the same name; a flag left out keeps the value of
# --config (or the default).
FLAGS = ("questions_per_doc", "q_temperature", "a_temperature", "sft_temperature", "seed",
         "batch_size", "system", "question_mode", "paraphrases_per_question",
         "answers_per_question", "restatements_per_doc", "recitations_per_doc", "decode_dtype",
         "name_the_subject", "relevant_sentences")


def add_arguments(p) -> None:
    from pdistill_jax.config import QUESTION_MODES, GenerateConfig

    def default(name):
        return recipe_default(GenerateConfig, name)

    add_model_argument(p)
    p.add_argument("--docs", required=True, help=DOCS_HELP)
    p.add_argument("--out", required=True, help="output folder; rerun the same command to resume "
                                                "(on a cluster too: docs/distributed.md)")
    p.add_argument("--config", help="YAML file of GenerateConfig fields "
                                    "(configs/generate_default.yaml) in place of the recipe; "
                                    "flags override it (default: none, the recipe)")
    add_recipe_argument(p, "GenerateConfig")
    p.add_argument("--questions-per-doc", type=int,
                   help=f"distinct questions wanted per document (chunk) {default('questions_per_doc')}")
    p.add_argument("--question-mode", choices=QUESTION_MODES,
                   help="document: questions about the whole document; sentences: questions "
                        "about each span of sentences_per_prompt sentences in turn, both ways "
                        f"round, so that every fact is asked about {default('question_mode')}")
    p.add_argument("--paraphrases-per-question", type=int,
                   help="rewrites of each question, each answered by the teacher as a row of "
                        f"its own; 0 = none {default('paraphrases_per_question')}")
    p.add_argument("--name-the-subject", action=argparse.BooleanOptionalAction, default=None,
                   help="a question that does not name its document's subject (the title, else "
                        "the start of the first sentence) is asked about it: \"About <subject>: "
                        f"<question>\" {default('name_the_subject')}")
    p.add_argument("--relevant-sentences", type=int,
                   help="the teacher reads this many of the document's sentences that match "
                        "the question best (BM25) again after the document, just before the "
                        f"question; 0 = the document alone {default('relevant_sentences')}")
    p.add_argument("--answers-per-question", type=int,
                   help="teacher answers to each question (and rewrite), each sampled afresh "
                        f"and a row of its own {default('answers_per_question')}")
    p.add_argument("--restatements-per-doc", type=int,
                   help="teacher restatements of each document (a list of its facts, a summary, "
                        "...; at most 4), each a row whose student prompt names the topic only "
                        f"{default('restatements_per_doc')}")
    p.add_argument("--recitations-per-doc", type=int,
                   help="rows of each document whose student prompt names the topic only and "
                        "whose answer is the document's own text (nothing sampled; at most 2) "
                        f"{default('recitations_per_doc')}")
    p.add_argument("--q-temperature", type=float,
                   help=f"question sampling temperature {default('q_temperature')}")
    p.add_argument("--a-temperature", type=float,
                   help=f"temperature of the teacher's (PD) answers {default('a_temperature')}")
    p.add_argument("--sft-temperature", type=float,
                   help=f"temperature of the SFT-baseline answers {default('sft_temperature')}")
    p.add_argument("--seed", type=int, help=f"seed of question and answer sampling {default('seed')}")
    p.add_argument("--batch-size", type=int,
                   help=f"prompts sampled at once (question or answer prompts) {default('batch_size')}")
    p.add_argument("--system", help="system message of the question and answer prompts (default: "
                                    "the chat template's); `train` on this data defaults to the same")
    p.add_argument("--max-docs", type=int,
                   help="use only the first N source documents (default: all)")
    add_decode_dtype_argument(p, None, default("decode_dtype"))
    add_no_progress_argument(p)


def main(args) -> int:
    from pdistill_jax.model.sharding import initialize_distributed, work_share

    initialize_distributed()  # a cluster's processes each generate a share (before any JAX call)
    index, count = work_share()

    from pdistill_jax.config import GenerateConfig, from_dict, load_yaml
    from pdistill_jax.datagen.generate import generate_data

    changes = given_flags(args, FLAGS)
    if args.config:
        recipe_layer(args, args.model, "generate")  # refuses --recipe beside --config
        cfg = load_yaml(GenerateConfig, args.config)
    else:  # a bad flag is refused before the recipe resolves (fetches) the model
        dataclasses.replace(GenerateConfig(), **changes)
        cfg = from_dict(GenerateConfig, recipe_layer(args, args.model, "generate"))
    cfg = dataclasses.replace(cfg, **changes)
    if args.max_docs is not None and args.max_docs < 1:
        raise ValueError(f"--max-docs {args.max_docs}: must be >= 1")
    m = generate_data(args.model, args.docs, args.out, cfg, max_docs=args.max_docs,
                      show_progress=not args.no_progress)
    if index != 0:  # process 0 reports for the cluster (as log.py does)
        return 0
    c, y = m["counts"], m["parse_yield"]
    quota = f"{cfg.questions_per_doc} questions" if cfg.question_mode == "document" else \
        f"their quota, {c['question_quota']} questions in {c['spans']} spans"
    print(f"{args.out}: {c['rows']} Q&A rows for {c['documents_done']}/{c['documents']} documents "
          f"({c['documents_short_of_quota']} short of {quota}); "
          f"{y['parsed_per_call']:.2f} questions parsed per call; "
          + (f"{c['paraphrases_kept']} of {c['paraphrases_asked']} paraphrases kept; "
             if cfg.paraphrases_per_question else "")
          + f"{c['load_problems']} input problem(s)"
          + (f"; {args.recipe_note}" if getattr(args, "recipe_note", None) else ""))
    return 0

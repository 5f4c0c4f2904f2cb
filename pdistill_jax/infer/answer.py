"""Answering questions: closed-book, with the gold document, or with BM25-retrieved documents.

With a document the prompt is the teacher's layout, `{document}\\n\\n---\\n\\n{question}`, so RAG,
PD+RAG and the distillation teacher all read context the same way.
"""
from __future__ import annotations

from typing import Callable, Sequence

from pdistill_jax.config import CONTEXTS, AnswerConfig
from pdistill_jax.files import Field, Schema
from pdistill_jax.infer.retrieval import BM25Index
from pdistill_jax.model.sampler import generate
from pdistill_jax.weights.load import LoadedModel
from pdistill_jax.weights.tokenizer import DOC_SEPARATOR, chat_prompt_ids, end_token_ids, raw_prompt_ids

QUESTIONS_SCHEMA = Schema('{"question", "answers"?, "doc_id"?, "id"?} objects, one a line',
                          {"question": Field(), "answers": Field((list,), required=False),
                           "doc_id": Field((str, int), required=False),
                           "id": Field((str, int), required=False)}, unique="id")


def check_contexts(questions: Sequence[dict], docs: Sequence[dict] | None, context: str,
                   source: str = "questions", lines: Sequence[int] | None = None) -> None:
    """Refuses what `question_contexts` could not serve (cheap: run it before loading a model).
    lines: each question's line in `source`, for the messages (default: its 1-based index)."""
    if context not in CONTEXTS:
        raise ValueError(f"--context {context!r}: choose one of {', '.join(CONTEXTS)}")
    if context == "none":
        return
    if not docs:
        raise ValueError(f"--context {context} needs --docs (a .jsonl of {{\"id\", \"text\"}} rows, "
                         "a folder of .txt/.md files or an hf: dataset)")
    if context == "gold":
        ids = {str(d["id"]) for d in docs}
        for n, q in zip(lines or range(1, len(questions) + 1), questions):
            doc_id = q.get("doc_id")
            if doc_id is None:
                raise ValueError(f"{source}:{n}: --context gold needs a \"doc_id\" field")
            if str(doc_id) not in ids:
                raise ValueError(f"{source}:{n}: doc_id {doc_id!r} is not in --docs")


def question_contexts(questions: Sequence[dict], docs: Sequence[dict] | None, context: str,
                      top_k: int = 3, source: str = "questions") -> list[str | None]:
    """The context text placed before each question (None for closed-book)."""
    check_contexts(questions, docs, context, source)
    if context == "none":
        return [None] * len(questions)
    if context == "gold":
        by_id = {str(d["id"]): d["text"] for d in docs}
        return [by_id[str(q["doc_id"])] for q in questions]
    index = BM25Index([d["text"] for d in docs])
    hits = index.search([q["question"] for q in questions], top_k)
    return ["\n\n".join(docs[i]["text"] for i in row) for row in hits]


def build_prompt(tokenizer, question: str, context: str | None, prompt_format: str = "chat",
                 system: str | None = None) -> list[int]:
    user = question if context is None else context + DOC_SEPARATOR + question
    if prompt_format == "raw":
        return raw_prompt_ids(tokenizer, user)
    if prompt_format != "chat":
        raise ValueError(f"--prompt-format {prompt_format!r}: choose chat or raw")
    return chat_prompt_ids(tokenizer, user, system)


def answer_questions(lm: LoadedModel, questions: Sequence[dict], cfg: AnswerConfig = AnswerConfig(),
                     *, docs: Sequence[dict] | None = None, use_lora: bool = True,
                     progress: Callable[[int], None] | None = None,
                     source: str = "questions") -> list[dict]:
    """Prediction rows {"question", "prediction", "doc_id"?} in input order. `source` names the
    questions in error messages."""
    for n, q in enumerate(questions, 1):
        if not isinstance(q.get("question"), str) or not q["question"].strip():
            raise ValueError(f"{source}:{n}: missing or empty field \"question\"")
    contexts = question_contexts(questions, docs, cfg.context, cfg.top_k, source)
    prompts = [build_prompt(lm.tokenizer, q["question"], c, cfg.prompt_format, cfg.system)
               for q, c in zip(questions, contexts)]
    end = end_token_ids(lm.tokenizer, lm.cfg) if cfg.prompt_format == "chat" else \
        [lm.tokenizer.eos_token_id] if lm.tokenizer.eos_token_id is not None else []
    completions = generate(lm.model, prompts, cfg.sampling, end_ids=end, seed=cfg.seed,
                           batch_size=cfg.batch_size, use_lora=use_lora, progress=progress)
    rows = []
    for q, c in zip(questions, completions):
        row = {"question": q["question"],
               "prediction": lm.tokenizer.decode(c.tokens, skip_special_tokens=True).strip()}
        if "doc_id" in q:
            row["doc_id"] = q["doc_id"]
        rows.append(row)
    return rows

"""Paraphrase augmentation: the model rewrites each accepted question several ways, and every
rewrite becomes a training row of its own (the teacher answers it like any question).

Facts trained under one phrasing are recalled under that phrasing only (docs/results.md: "built
in 1873" for one question, another year for "In what year was it completed?"); storage work on
small models (Allen-Zhu & Li, Physics of Language Models 3.1) found several phrasings of each fact,
spread across batches, to be what makes it extractable. Rewrites are parsed like questions and
kept only when new: a rewrite equal (after normalisation) to its original, to another question of
the document or to an earlier rewrite is dropped, and it must share a content word with the
question it rewrites.
"""
from __future__ import annotations

from typing import Callable, Sequence

from pdistill_jax.config import GenerateConfig
from pdistill_jax.datagen.documents import Document
from pdistill_jax.datagen.questions import (Ask, DocQuestions, ask_in_rounds, count_of,
                                            normalize_question)

# The question comes first and the request after it, as in the question prompt (a small model
# follows the last instruction it read).
PARAPHRASE_INSTRUCTION = "Write {count} to ask the same question, one per line."


def paraphrase_prompt(question: str, count: int) -> str:
    """The user message that asks for `count` rewrites of `question`."""
    return (f"Question: {question}\n\n"
            f"{PARAPHRASE_INSTRUCTION.format(count=count_of(count, 'other way'))}")


def paraphrase_questions(lm, docs: Sequence[Document], asked: dict[str, DocQuestions],
                         cfg: GenerateConfig, seed: int,
                         on_batch: Callable[[str, int, int], None] | None = None
                         ) -> dict[str, list[DocQuestions]]:
    """Up to cfg.paraphrases_per_question rewrites of every question in `asked` (lm: a
    LoadedModel): {doc id: one DocQuestions per question, in the questions' order, whose
    `questions` are the kept rewrites}."""
    k = cfg.paraphrases_per_question
    out: dict[str, list[DocQuestions]] = {}
    asks = []
    for d in docs:
        # the document's questions are "seen" from the start: no rewrite may repeat one of them
        seen = {normalize_question(q) for q in asked[d.id].questions}
        out[d.id] = [DocQuestions(d.id, seen=seen, quota=k) for _ in asked[d.id].questions]
        asks += [Ask(paraphrase_prompt(q, k), q, k, cfg.max_paraphrase_calls, state)
                 for q, state in zip(asked[d.id].questions, out[d.id])]
    ask_in_rounds(lm, asks, cfg, seed, "paraphrases", on_batch)
    return out

"""The teacher's answers: the base model with the document in its prompt answers every question
twice, at `a_temperature` (`answer`, the prefix on which prompt distillation compares teacher and
student) and at `sft_temperature` (`sft_answer`, the target of the SFT baseline)."""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import numpy as np

from pdistill_jax.config import GenerateConfig, SamplingParams
from pdistill_jax.datagen.documents import Document, split_sentences
from pdistill_jax.datagen.seeds import derive_seed
from pdistill_jax.retrieval import BM25Index
from pdistill_jax.weights.tokenizer import DOC_SEPARATOR, chat_prompt_ids, end_token_ids


def teacher_message(document: str, question: str) -> str:
    """The teacher's user message: the document, a separator, the question (the paper's layout)."""
    return f"{document}{DOC_SEPARATOR}{question}"


def teacher_contexts(document: str, questions: Sequence[str], count: int) -> list[str]:
    """What the teacher reads before each question: the whole document, a blank line, then the
    `count` sentences of it that match the question best (BM25 over its sentences, best first);
    `document` alone when count is 0 or it has one sentence. After the document, not before:
    a document's questions still share their prompt up to its end, which the sampler prefills
    once for all of them."""
    sentences = split_sentences(document) if count else []
    if len(sentences) < 2:
        return [document] * len(questions)
    best = BM25Index(sentences).search(questions, count)
    return [document + "\n\n" + " ".join(sentences[i] for i in picked) for picked in best]


class AnswerCall(NamedTuple):
    """One logical call of the teacher: its (document, question) items, its seed, its answer
    length (None: cfg.max_answer_tokens), and whether its items are questions (the teacher reads
    their best-matching sentences again, cfg.relevant_sentences) or requests about the
    whole document (restatements: the document alone). Several run through the same decode
    slots (`teacher_answers_many`), each row sampling as it would in a call of its own."""

    items: Sequence[tuple[Document, str]]
    seed: int
    max_tokens: int | None = None
    questions: bool = True


def teacher_answers(lm, items: Sequence[tuple[Document, str]], cfg: GenerateConfig, seed: int,
                    on_batch: Callable[[str, int, int], None] | None = None,
                    on_teacher_state: Callable[[list[int], np.ndarray], None] | None = None
                    ) -> list[dict]:
    """qa rows: the teacher's answers to (document, question) pairs, at the PD and SFT temperatures.

    lm: the LoadedModel. on_teacher_state(teacher ids, hidden states) is called for every PD
    answer with the whole teacher sequence (prompt + answer ids, no end token) and the final
    hidden states the answer and its end were predicted from, (answer ids + 1, D): what PD
    training's teacher computes.
    """
    return teacher_answers_many(lm, [AnswerCall(items, seed)], cfg, on_batch, on_teacher_state)[0]


def teacher_answers_many(lm, calls: Sequence[AnswerCall], cfg: GenerateConfig,
                         on_batch: Callable[[str, int, int], None] | None = None,
                         on_teacher_state: Callable[[list[int], np.ndarray], None] | None = None
                         ) -> list[list[dict]]:
    """`teacher_answers` of every call, sampled together: one set of decode slots, where a
    short answer's slot goes to the next row at once while long restatements go on."""
    from pdistill_jax.model.sampler import generate

    tokenizer = lm.tokenizer
    # At one temperature a single answer serves both objectives (PD and SFT then train on the
    # same text); otherwise the PD answer (hot) and the SFT answer (cold) continue the same
    # teacher prompt, asked together so that the sampler prefills the prompt once for both.
    shared = cfg.a_temperature == cfg.sft_temperature
    prompts, temperatures, limits, keys, spans = [], [], [], [], []
    contexts = []  # per call, what the teacher reads before each item's question
    for call in calls:
        contexts.append(_contexts(call, cfg.relevant_sentences if call.questions else 0))
        mine = [chat_prompt_ids(tokenizer, teacher_message(c, q), cfg.system)
                for c, (_, q) in zip(contexts[-1], call.items)]
        n = len(mine)
        temps = [cfg.a_temperature] * n + ([] if shared else [cfg.sft_temperature] * n)
        spans.append((len(prompts), n))
        prompts += mine if shared else mine + mine
        temperatures += temps
        limits += [call.max_tokens or cfg.max_answer_tokens] * len(temps)
        # the rows of a call of its own: its seed, its own row numbers
        keys += [(derive_seed(call.seed, "answers"), i) for i in range(len(temps))]
    if not prompts:
        return [[] for _ in calls]
    done_rows = 0

    def progress(rows):
        nonlocal done_rows
        done_rows += rows
        if on_batch:
            on_batch("answers", done_rows, len(prompts))

    outs = generate(lm.model, prompts,
                    SamplingParams(cfg.a_temperature, cfg.a_top_k, 1.0, cfg.max_answer_tokens),
                    end_ids=end_token_ids(tokenizer, lm.cfg), batch_size=cfg.batch_size,
                    temperatures=temperatures, max_new_tokens=limits, row_keys=keys,
                    keep_hidden=on_teacher_state is not None, progress=progress)
    results = []
    for call, (start, n), context in zip(calls, spans, contexts):
        pds = outs[start:start + n]
        sfts = pds if shared else outs[start + n:start + 2 * n]
        if on_teacher_state is not None:
            for prompt, pd in zip(prompts[start:start + n], pds):
                on_teacher_state(prompt + pd.tokens, pd.hidden)
        results.append([{
            "doc_id": doc.id, "document": text, "question": question,
            "answer": tokenizer.decode(pd.tokens, skip_special_tokens=True).strip(),
            "sft_answer": tokenizer.decode(sft.tokens, skip_special_tokens=True).strip(),
            "answer_finished": pd.finished, "sft_finished": sft.finished,
        } for (doc, question), text, pd, sft in zip(call.items, context, pds, sfts)])
    return results


def _contexts(call: AnswerCall, count: int) -> list[str]:
    """`teacher_contexts` of a call's items, one BM25 index per document."""
    if not count:
        return [d.text for d, _ in call.items]
    by_doc: dict[str, list[int]] = {}
    for i, (d, _) in enumerate(call.items):
        by_doc.setdefault(d.text, []).append(i)
    out = [""] * len(call.items)
    for text, rows in by_doc.items():
        for i, context in zip(rows, teacher_contexts(text, [call.items[i][1] for i in rows], count)):
            out[i] = context
    return out

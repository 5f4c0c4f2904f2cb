"""Teacher restatements: the teacher, with the document in its prompt, restates it (a list of its
facts, a summary, a description), and each restatement is a training row whose student prompt
names the topic only. Recitations are the same kind of row with the document's own text as the
answer: nothing is sampled, and PD distils the teacher's distribution on the document's tokens.

Questions reach the facts a question writer thought of, one phrasing each; a restatement holds
most of a document's facts in one answer, in the teacher's own words. Distilling on
teacher-written summaries of each chunk beat training on the raw document in the Knowledge
Modules work (deep context distillation, QuALITY 26.4 -> 32.5 at 3B), and training on document
text together with Q&A beat Q&A alone in PIT. The rows are ordinary Q&A rows: the "question" is
the request below (what the student is shown), answered by the teacher like any question, so
training, the SFT baseline and exposures per fact treat them as every other row.
"""
from __future__ import annotations

import re
from typing import Sequence

from pdistill_jax.config import MAX_RECITATIONS, MAX_RESTATEMENTS, GenerateConfig
from pdistill_jax.datagen.answers import AnswerCall
from pdistill_jax.datagen.documents import Document, split_sentences, topic_of

# The requests, in the order restatements_per_doc takes them: the student sees only this, so it
# names the topic and nothing of what the document says about it.
RESTATEMENT_REQUESTS = (
    "List the facts about {topic}, one per line.",
    "Summarise what is known about {topic}.",
    "Describe {topic} in detail.",
    "Tell me everything you know about {topic}.",
)
assert len(RESTATEMENT_REQUESTS) == MAX_RESTATEMENTS
# Requests whose answer is the document itself; none is a restatement request, so no student
# prompt has two different answers.
RECITATION_REQUESTS = (
    "Tell me about {topic}.",
    "What do you know about {topic}?",
)
assert len(RECITATION_REQUESTS) == MAX_RECITATIONS
_UNIT = re.compile(r"[^\n]+?(?:[.!?](?=\s+[A-Z0-9])|$)", re.MULTILINE)  # a sentence within a line
_LIST_MARK = re.compile(r"^\s*(?:\d+[.)]|[-*\u2022])\s*")
_ONLY_MARK = re.compile(r"\s*(?:(?:\d+[.)]|[-*\u2022])\s*)?")
MIN_UNIT_WORDS = 3  # shorter pieces ("1.", a heading) may repeat without being a loop


def cut_at_repetition(text: str) -> str:
    """`text` up to the first sentence or list line that repeats an earlier one (numbering, case
    and spacing aside); unchanged when none does. A small teacher restating a document falls into
    loops ("5. The island is small. 6. The island is small. ..."), and a loop teaches the loop;
    the text before it is still the teacher's own prefix, so distillation on it is sound."""
    seen = set()
    for m in _UNIT.finditer(text):
        key = " ".join(_LIST_MARK.sub("", m.group()).lower().rstrip(".!? ").split())
        if len(key.split()) < MIN_UNIT_WORDS:
            continue
        if key in seen:
            cut = m.start()
            line_start = text.rfind("\n", 0, cut) + 1
            if _ONLY_MARK.fullmatch(text[line_start:cut]):  # the repeat's "6." goes with it
                cut = line_start
            return text[:cut].rstrip()
        seen.add(key)
    return text


def restatement_requests(doc: Document, count: int) -> list[str]:
    """The first `count` requests for `doc`, its topic filled in."""
    return [r.format(topic=topic_of(doc)) for r in RESTATEMENT_REQUESTS[:count]]


def restatement_call(docs: Sequence[Document], cfg: GenerateConfig, seed: int) -> AnswerCall:
    """The teacher call that restates `docs`: every request of every document, the document in
    the teacher's prompt, up to max_restatement_tokens."""
    items = [(d, request) for d in docs
             for request in restatement_requests(d, cfg.restatements_per_doc)]
    return AnswerCall(items, seed, cfg.max_restatement_tokens, questions=False)


def restated_rows(docs: Sequence[Document], answered: Sequence[dict]) -> dict[str, list[dict]]:
    """{doc id: its restatement rows} from the teacher's answers to `restatement_call`'s items:
    each row records "restatement", the request's number (1, 2, ...). An answer that loops is
    cut before the loop (`cut_at_repetition`) and marked unfinished (no end token is trained
    after it)."""
    out: dict[str, list[dict]] = {d.id: [] for d in docs}
    for row in answered:
        mine = out[row["doc_id"]]
        mine.append({**without_loops(row), "restatement": len(mine) + 1})
    return out


def recited_rows(docs: Sequence[Document], count: int) -> dict[str, list[dict]]:
    """{doc id: its `count` recitation rows}: a request naming the topic, answered (PD and SFT
    alike) by the document's text, finished; each row records "recitation", the request's number.
    A small teacher's restatements copy much of the document anyway (and loop); the document is
    the one restatement with every fact in it and nothing invented, and it costs no decoding."""
    return {d.id: [{"doc_id": d.id, "document": d.text,
                    "question": request.format(topic=topic_of(d)),
                    "answer": d.text.strip(), "sft_answer": d.text.strip(),
                    "answer_finished": True, "sft_finished": True, "recitation": n}
                   for n, request in enumerate(RECITATION_REQUESTS[:count], 1)]
            for d in docs}


def without_loops(row: dict) -> dict:
    """The row with its answers cut before a repetition, each cut one marked unfinished."""
    for text, finished in (("answer", "answer_finished"), ("sft_answer", "sft_finished")):
        cut = cut_at_repetition(row[text])
        if cut != row[text]:
            row = {**row, text: cut, finished: False}
    return row

"""The model writes its own training questions: the prompt that asks for them, the parser that
turns a free-form completion into clean, on-topic, distinct questions, and the question stage
(`ask_questions`) that samples them in rounds until each document has its quota.

The paper asks for five questions in XML-like tags; SmolLM2-135M never produces the tags, but it
does answer a plain request for "five questions ... one per line" with numbered lists, bullets,
"Question:" labels, or run-on text holding several '?'. The parser accepts all of those and then
filters: a question must end in '?', have a sensible length, not be copied from the prompt, and
share at least one content word with the document (so "What is the text about?" and questions
about some other topic are dropped).
"""
from __future__ import annotations

import dataclasses
import math
import re
import string
from typing import Callable, Sequence

from pdistill_jax.config import GenerateConfig, SamplingParams
from pdistill_jax.datagen.documents import Document
from pdistill_jax.datagen.seeds import derive_seed
from pdistill_jax.weights.tokenizer import chat_prompt_ids, end_token_ids

QUESTION_INSTRUCTION = "Write five questions about the text above, one per line."
MIN_WORDS = 3
MAX_WORDS = 40
MAX_CHARS = 300
# Sizes a document's first round of calls (what a small model parses from one call at T=1.0).
EXPECTED_QUESTIONS_PER_CALL = 2.5

# Function words, question words and words about the text itself: sharing only these with the
# document does not make a question on-topic.
STOPWORDS = frozenset("""
a about above after again against all also am an and any are as at be because been before being
below between both but by can could did do does doing down during each few for from further had
has have having he her here hers herself him himself his how i if in into is it its itself just
me more most my myself no nor not now of off on once only or other our ours ourselves out over
own same she should so some such than that the their theirs them themselves then there these they
this those through to too under until up very was we were what when where which while who whom
whose why will with would you your yours yourself yourselves many much one ones many made make
get got like may might must shall us let lets its
text passage article paragraph document author story mentioned according describe described
question questions answer answers write written following above below main idea example
""".split())

_LIST_MARKER = re.compile(
    r"""^\s*(?:
        (?:\*\*|__)?(?:q(?:uestion)?\s*\#?\s*\d*\s*[:.)\-]+)(?:\*\*|__)?   # Q1: / Question 2. / Question:
      | \(?\d{1,2}\s*[.):\-]+(?!\d)                                       # 1. / 1) / (1) / 1:
      | [\-*•‣●▪◦–]+                                                       # bullets
      | \#{1,6}                                                            # markdown headings
    )\s*""", re.IGNORECASE | re.VERBOSE)
_QUESTION_SPLIT = re.compile(r"(?<=\?)[\"'”’)\]]*\s+")
# A sentence break inside a question candidate ("Some statement. Now what ...?"); common
# abbreviations and initials do not end a sentence.
_SENTENCE_BREAK = re.compile(
    r"(?<!\bMr)(?<!\bMrs)(?<!\bMs)(?<!\bDr)(?<!\bSt)(?<!\bMt)(?<!\bJr)(?<!\bSr)(?<!\bvs)"
    r"(?<!\betc)(?<!\be\.g)(?<!\bi\.e)(?<!\b[A-Z])[.!:;]\s+(?=[\"'“]?[A-Z])")
_WORD = re.compile(r"[^\W_]+", re.UNICODE)


def question_prompt(text: str) -> str:
    """The user message that asks the model for questions about `text`."""
    return f"{text}\n\n{QUESTION_INSTRUCTION}"


def normalize_question(q: str) -> str:
    """Lowercase, no punctuation, single spaces: the key for dropping duplicates."""
    q = q.lower().translate(str.maketrans("", "", string.punctuation + "“”‘’"))
    return " ".join(q.split())


def content_words(text: str) -> set[str]:
    """Lowercased non-stopwords (plural 's' folded), for the on-topic test."""
    out = set()
    for w in _WORD.findall(text.lower()):
        if w in STOPWORDS or (len(w) < 3 and not w.isdigit()):
            continue
        out.add(w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w)
    return out


def candidate_questions(completion: str) -> list[str]:
    """Every '?'-terminated span of `completion`, stripped of list markers and labels."""
    out = []
    for line in completion.splitlines():
        line = _strip_markers(line)
        if "?" not in line:
            continue
        for piece in _QUESTION_SPLIT.split(line):
            piece = piece.strip()
            if not piece.endswith("?") and "?" in piece:
                piece = piece[:piece.rindex("?") + 1]  # a closing quote or bracket after '?'
            if not piece.endswith("?"):
                continue
            piece = _SENTENCE_BREAK.split(piece)[-1]  # "Statement. Question?" -> "Question?"
            piece = _strip_markers(piece).strip(" \"'“”‘’*_")
            if piece.endswith("?"):
                out.append(piece)
    return out


def _strip_markers(line: str) -> str:
    prev = None
    line = line.strip()
    while prev != line:  # "- 1. Question 2: ..." carries several markers
        prev = line
        line = _LIST_MARKER.sub("", line, count=1).strip()
    return line.strip(" *_")


def parse_questions(completion: str, document: str, prompt: str) -> list[str]:
    """Distinct, well-formed, on-topic questions found in `completion`, in order."""
    doc_words = content_words(document)
    prompt_norm = normalize_question(prompt)
    seen: set[str] = set()
    out = []
    for q in candidate_questions(completion):
        q = " ".join(q.split())
        words = len(q.split())
        key = normalize_question(q)
        if not (MIN_WORDS <= words <= MAX_WORDS) or len(q) > MAX_CHARS or not key:
            continue
        if key in seen or f" {key} " in f" {prompt_norm} ":  # duplicate, or copied from the prompt
            continue
        if not content_words(q) & doc_words:
            continue
        seen.add(key)
        out.append(q)
    return out


# ---------------------------------------------------------------- the question stage

@dataclasses.dataclass
class DocQuestions:
    """Question-stage state and statistics of one document."""

    doc_id: str
    questions: list[str] = dataclasses.field(default_factory=list)
    seen: set[str] = dataclasses.field(default_factory=set)
    parsed_per_call: list[int] = dataclasses.field(default_factory=list)  # what the parser kept
    new_per_call: list[int] = dataclasses.field(default_factory=list)  # ... and was not a repeat

    @property
    def calls(self) -> int:
        return len(self.parsed_per_call)

    def add(self, questions: list[str]) -> None:
        new = [q for q in questions if normalize_question(q) not in self.seen]
        self.seen.update(normalize_question(q) for q in new)
        self.questions.extend(new)
        self.parsed_per_call.append(len(questions))
        self.new_per_call.append(len(new))


def ask_questions(lm, docs: Sequence[Document], cfg: GenerateConfig, seed: int,
                  on_batch: Callable[[str, int, int], None] | None = None) -> dict[str, DocQuestions]:
    """Distinct questions for each document, written by the model itself (lm: a LoadedModel).

    Each round asks every unfinished document for about as many calls as its yield so far says
    it still needs; the calls of all documents share the sampler's batches.
    """
    from pdistill_jax.model.sampler import generate

    tokenizer = lm.tokenizer
    end_ids = end_token_ids(tokenizer, lm.cfg)
    state = {d.id: DocQuestions(d.id) for d in docs}
    prompt_text = {d.id: question_prompt(d.text) for d in docs}
    prompt_ids = {d.id: chat_prompt_ids(tokenizer, prompt_text[d.id], cfg.system) for d in docs}
    params = SamplingParams(cfg.q_temperature, cfg.q_top_k, 1.0, cfg.max_question_tokens)
    active = list(docs)
    rnd = 0
    while active:
        calls: list[Document] = []
        for d in active:
            s = state[d.id]
            need = cfg.questions_per_doc - len(s.questions)
            per_call = max(0.5, sum(s.new_per_call) / s.calls) if s.calls else EXPECTED_QUESTIONS_PER_CALL
            calls += [d] * min(cfg.max_calls_per_doc - s.calls, max(1, math.ceil(need / per_call)))
        calls = _fill_last_batch(calls, active, state, cfg)
        done_rows = 0

        def progress(n, total=len(calls)):
            nonlocal done_rows
            done_rows += n
            if on_batch:
                on_batch(f"questions r{rnd}", done_rows, total)

        outs = generate(lm.model, [prompt_ids[d.id] for d in calls], params, end_ids=end_ids,
                        seed=derive_seed(seed, "questions", rnd), batch_size=cfg.batch_size,
                        progress=progress)
        for d, out in zip(calls, outs):
            text = tokenizer.decode(out.tokens, skip_special_tokens=True)
            state[d.id].add(parse_questions(text, d.text, prompt_text[d.id]))
        active = [d for d in active if len(state[d.id].questions) < cfg.questions_per_doc
                  and state[d.id].calls < cfg.max_calls_per_doc]
        rnd += 1
    for s in state.values():  # a round may overshoot the quota; keep the earliest questions
        del s.questions[cfg.questions_per_doc:]
    return state


def _fill_last_batch(calls: list[Document], active: list[Document],
                     state: dict[str, DocQuestions], cfg: GenerateConfig) -> list[Document]:
    """Extra calls for the active documents, round-robin, up to a whole number of batches.

    The sampler runs fixed-shape batches, so the empty rows of a last partial batch cost as much
    as real ones: spending them on more calls makes a further round less likely, for free.
    """
    count = {d.id: 0 for d in active}
    for d in calls:
        count[d.id] += 1
    room = -len(calls) % cfg.batch_size
    extra: list[Document] = []
    while room:
        added = False
        for d in active:
            if room and state[d.id].calls + count[d.id] < cfg.max_calls_per_doc:
                count[d.id] += 1
                extra.append(d)
                room -= 1
                added = True
        if not added:
            break
    order = {d.id: i for i, d in enumerate(active)}
    return sorted(calls + extra, key=lambda d: order[d.id])  # a document's calls stay together

"""The model writes its own training questions: the prompts that ask for them, the parser that
turns a free-form completion into clean, on-topic, distinct questions, and the question stage
(`ask_questions`) that samples them in rounds until each document has its quota.

Two question modes (GenerateConfig.question_mode). `document`: a call shows the document and asks
for five questions about it. `sentences`: a call shows the document and asks about one span of it
(`sentences_per_prompt` consecutive sentences), in both directions (what the sentence says, and
from one of its details back to the person, place or thing it belongs to: the reversal curse says a
model trained on "A is B" does not answer "what is B?"), so that every fact of the document is
asked about, not only the salient ones.

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
from pdistill_jax.datagen.documents import Document, split_sentences
from pdistill_jax.datagen.seeds import derive_seed
from pdistill_jax.weights.tokenizer import chat_prompt_ids, end_token_ids

QUESTION_INSTRUCTION = "Write five questions about the text above, one per line."
# The span prompts (sentences mode): the document first, so that the calls of one document share
# their prefix in the sampler, then the span quoted; {count} and {span} are filled in. Two
# directions, each asked for half of a span's quota: the forward one asks what the sentence says;
# the reverse one gives a detail and asks for the person, place or thing it belongs to (the
# reversal curse: a model trained on "A designed B" does not answer "What did A design?"). Plain
# requests: SmolLM2-135M copied or talked about template examples ("Who designed the X?") instead
# of writing questions (1 question parsed from 8 calls, against 6 for the plain forward request).
SPAN_INSTRUCTIONS = {
    "forward": 'The text says: "{span}"\nWrite {count} that this sentence answers, one per line.',
    "reverse": 'The text says: "{span}"\nWrite {count} that this sentence answers, one per line. '
               "Each question gives a detail from the sentence and asks which person, place or "
               "thing it belongs to.",
}
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                 "ten")
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


def count_of(n: int, noun: str) -> str:
    """'two questions', 'one question', '12 questions': how a prompt asks for n of something."""
    return f"{_NUMBER_WORDS[n] if n < len(_NUMBER_WORDS) else n} {noun}{'' if n == 1 else 's'}"


def span_prompt(text: str, span: str, count: int, direction: str = "forward") -> str:
    """The user message that asks for `count` questions about `span`, one span of `text`, in
    `direction` (forward | reverse, SPAN_INSTRUCTIONS)."""
    ask = SPAN_INSTRUCTIONS[direction].format(count=count_of(count, "question"), span=span)
    return f"{text}\n\n{ask}"


def sentence_spans(text: str, sentences_per_span: int) -> list[str]:
    """`text` cut into consecutive spans of `sentences_per_span` sentences (the last may be
    shorter), covering all of it."""
    sentences = split_sentences(text)
    return [" ".join(sentences[i:i + sentences_per_span])
            for i in range(0, len(sentences), sentences_per_span)]


def span_quotas(spans: int, cfg: GenerateConfig) -> list[int]:
    """Questions wanted per span: questions_per_span each, unless that passes questions_per_doc;
    then questions_per_doc spread as evenly as it goes, earlier spans first (spans past the
    quota, when there are more spans than questions_per_doc, get none)."""
    total = min(cfg.questions_per_doc, spans * cfg.questions_per_span)
    base, extra = divmod(total, spans) if spans else (0, 0)
    return [base + (i < extra) for i in range(spans)]


def direction_quotas(quota: int) -> dict[str, int]:
    """A span's quota split between the directions, the forward one taking the odd question."""
    return {"forward": quota - quota // 2, "reverse": quota // 2}


SUBJECT_PREFIX = "About {subject}: "
_QUALIFIER = re.compile(r"\s*\([^)]*\)")  # "Marguerite Ostrand (schooner)": the name is outside


def with_subject(question: str, subject: str) -> str:
    """`question` as written when it names `subject` (case, punctuation and a parenthesised
    qualifier aside), else "About <subject>: <question>".

    A small question writer often drops the name ("When was the bridge completed?", "What does
    the company sell?"), and a student trained on such a row learns an answer without what it is
    about; a closed-book question has to name its subject, and the fact is stored against that
    name only if the name was in the prompt (docs/results.md, "Questions that name their
    subject")."""
    name = normalize_question(_QUALIFIER.sub("", subject))
    if not name or f" {name} " in f" {normalize_question(question)} ":
        return question
    return SUBJECT_PREFIX.format(subject=subject.strip()) + question


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
    """Question-stage state and statistics of one document (or of one span of it, or of one
    question's paraphrases: whatever one kind of prompt asks for)."""

    doc_id: str
    questions: list[str] = dataclasses.field(default_factory=list)
    seen: set[str] = dataclasses.field(default_factory=set)  # may be shared by a document's spans
    parsed_per_call: list[int] = dataclasses.field(default_factory=list)  # what the parser kept
    new_per_call: list[int] = dataclasses.field(default_factory=list)  # ... and was not a repeat
    quota: int = 0  # the questions wanted
    span_questions: list[int] | None = None  # sentences mode: questions kept per span

    @property
    def calls(self) -> int:
        return len(self.parsed_per_call)

    @property
    def gave_up(self) -> bool:
        return len(self.questions) < self.quota

    def add(self, questions: list[str]) -> None:
        new = [q for q in questions if normalize_question(q) not in self.seen]
        self.seen.update(normalize_question(q) for q in new)
        self.questions.extend(new)
        self.parsed_per_call.append(len(questions))
        self.new_per_call.append(len(new))


@dataclasses.dataclass(frozen=True)
class Ask:
    """One thing to ask the model for, in rounds of calls: `quota` questions, parsed from
    completions of `prompt`, each sharing a content word with `topic`, after at most `max_calls`
    calls."""

    prompt: str  # the user message
    topic: str
    quota: int
    max_calls: int
    state: DocQuestions


def ask_questions(lm, docs: Sequence[Document], cfg: GenerateConfig, seed: int,
                  on_batch: Callable[[str, int, int], None] | None = None) -> dict[str, DocQuestions]:
    """Distinct questions for each document, written by the model itself (lm: a LoadedModel), as
    cfg.question_mode says (module doc); in sentences mode in the order of the spans."""
    if cfg.question_mode == "document":
        asks = [Ask(question_prompt(d.text), d.text, cfg.questions_per_doc, cfg.max_calls_per_doc,
                    DocQuestions(d.id, quota=cfg.questions_per_doc)) for d in docs]
        ask_in_rounds(lm, asks, cfg, seed, "questions", on_batch)
        return {d.id: a.state for d, a in zip(docs, asks)}
    per_doc = []  # per document, per span: its asks, one per direction
    for d in docs:
        spans = sentence_spans(d.text, cfg.sentences_per_prompt)
        seen: set[str] = set()  # a question asked twice (two spans, two directions) is kept once
        per_doc.append([[Ask(span_prompt(d.text, span, n, direction), span, n,
                             cfg.max_calls_per_span, DocQuestions(d.id, seen=seen, quota=n))
                         for direction, n in direction_quotas(quota).items()]
                        for span, quota in zip(spans, span_quotas(len(spans), cfg))])
    ask_in_rounds(lm, [a for spans in per_doc for asks in spans for a in asks], cfg, seed,
                  "span questions", on_batch)
    out = {}
    for d, spans in zip(docs, per_doc):
        asks = [a for span in spans for a in span]
        out[d.id] = DocQuestions(
            d.id, [q for a in asks for q in a.state.questions],
            parsed_per_call=[n for a in asks for n in a.state.parsed_per_call],
            new_per_call=[n for a in asks for n in a.state.new_per_call],
            quota=sum(a.quota for a in asks),
            span_questions=[sum(len(a.state.questions) for a in span) for span in spans])
    return out


def ask_in_rounds(lm, asks: Sequence[Ask], cfg: GenerateConfig, seed: int, stage: str,
                  on_batch: Callable[[str, int, int], None] | None = None) -> None:
    """Samples completions of every ask's prompt until it has its quota or used its calls.

    Each round gives every unfinished ask about as many calls as its yield so far says it still
    needs; the calls of all asks share the sampler's batches, an ask's calls side by side (asks
    about one document share its prefix). A round may overshoot a quota: the earliest questions
    are kept. Round r samples with the seed derive_seed(seed, stage, r).
    """
    from pdistill_jax.model.sampler import generate

    tokenizer = lm.tokenizer
    end_ids = end_token_ids(tokenizer, lm.cfg)
    prompt_ids = [chat_prompt_ids(tokenizer, a.prompt, cfg.system) for a in asks]
    params = SamplingParams(cfg.q_temperature, cfg.q_top_k, 1.0, cfg.max_question_tokens)
    active = [i for i, a in enumerate(asks) if a.quota > 0]  # a span past the cap: not asked
    rnd = 0
    while active:
        calls: list[int] = []
        for i in active:
            s = asks[i].state
            need = asks[i].quota - len(s.questions)
            per_call = max(0.5, sum(s.new_per_call) / s.calls) if s.calls else EXPECTED_QUESTIONS_PER_CALL
            calls += [i] * min(asks[i].max_calls - s.calls, max(1, math.ceil(need / per_call)))
        calls = _fill_last_batch(calls, active, asks, cfg.batch_size)
        done_rows = 0

        def progress(n, total=len(calls)):
            nonlocal done_rows
            done_rows += n
            if on_batch:
                on_batch(f"{stage} r{rnd}", done_rows, total)

        outs = generate(lm.model, [prompt_ids[i] for i in calls], params, end_ids=end_ids,
                        seed=derive_seed(seed, stage, rnd), batch_size=cfg.batch_size,
                        progress=progress)
        for i, out in zip(calls, outs):
            text = tokenizer.decode(out.tokens, skip_special_tokens=True)
            asks[i].state.add(parse_questions(text, asks[i].topic, asks[i].prompt))
        active = [i for i in active if len(asks[i].state.questions) < asks[i].quota
                  and asks[i].state.calls < asks[i].max_calls]
        rnd += 1
    for a in asks:
        del a.state.questions[a.quota:]


def _fill_last_batch(calls: list[int], active: list[int], asks: Sequence[Ask],
                     batch_size: int) -> list[int]:
    """Extra calls for the active asks, round-robin, up to a whole number of batches.

    The sampler runs fixed-shape batches, so the empty rows of a last partial batch cost as much
    as real ones: spending them on more calls makes a further round less likely, for free.
    """
    count = {i: 0 for i in active}
    for i in calls:
        count[i] += 1
    room = -len(calls) % batch_size
    extra: list[int] = []
    while room:
        added = False
        for i in active:
            if room and asks[i].state.calls + count[i] < asks[i].max_calls:
                count[i] += 1
                extra.append(i)
                room -= 1
                added = True
        if not added:
            break
    return sorted(calls + extra)  # an ask's calls stay together, in the asks' order

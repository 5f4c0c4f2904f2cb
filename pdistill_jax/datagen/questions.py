"""The model writes its own training questions: the prompt that asks for them, and the parser
that turns a free-form completion into clean, on-topic, distinct questions.

The paper asks for five questions in XML-like tags; SmolLM2-135M never produces the tags, but it
does answer a plain request for "five questions ... one per line" with numbered lists, bullets,
"Question:" labels, or run-on text holding several '?'. The parser accepts all of those and then
filters: a question must end in '?', have a sensible length, not be copied from the prompt, and
share at least one content word with the document (so "What is the text about?" and questions
about some other topic are dropped).
"""
from __future__ import annotations

import re
import string

QUESTION_INSTRUCTION = "Write five questions about the text above, one per line."
MIN_WORDS = 3
MAX_WORDS = 40
MAX_CHARS = 300

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

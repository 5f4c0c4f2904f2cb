"""The knowledge to inject: loading documents (JSONL, a folder, a Hugging Face dataset),
splitting long ones into chunks that fit the teacher's prompt, and splitting text into sentences.

`load_documents(spec)` accepts
- `path/to/docs.jsonl`: one `{"id", "text", "title"?}` object a line;
- `path/to/folder`: every `.txt` / `.md` file below it (recursive, sorted); id = relative path;
- `hf:NAME/CONFIG[?n=1000&split=...]`: a hub dataset through `datasets.load_dataset`, e.g.
  `hf:squadshifts/nyt` (nyt, reddit, amazon, new_wiki) or `hf:hotpot_qa/distractor`;
- `hf:LOCAL_DIR[?format=squadshifts|hotpot_qa&n=...&split=...]`: a dataset saved with
  `save_to_disk`, read with `datasets.load_from_disk` and handled by the same column code (the
  format is inferred from the columns when not given).

A bad row of a JSONL file (invalid JSON or UTF-8, a missing or empty field, a duplicate id) or a
bad file in a folder (not UTF-8, empty) refuses the load with one line naming the file and row, as
every command's reader does (`files.read_jsonl`): the fix is in the user's own files. Rows of a
Hugging Face dataset are not the user's to fix, so a bad one is skipped and becomes one line in
`problems` (printed to stderr and counted in generate's manifest).

Document ids of dataset sources:
- SQuADShifts: `sq-` + the first 12 hex digits of sha1(context), so an id does not depend on n or
  on the order of questions. Test questions: `{"id", "question", "answers", "doc_id"}`.
- HotpotQA: the paragraph's Wikipedia title (a title met again with a *different* text gets
  `title~2`, `title~3`, ...). Test questions: `{"id", "question", "answers": [answer], "doc_id",
  "doc_ids"}` where `doc_ids` are the documents of the supporting facts in order of first mention
  and `doc_id` is the first of them.
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path
from typing import Iterable
from urllib.parse import parse_qsl

from pdistill_jax.config import asset_path
from pdistill_jax.files import Field, Schema, read_jsonl
from pdistill_jax.log import logger

_log = logger()  # documents are read by several commands
DEFAULT_N = 1000  # the paper evaluates on the first 1000 test questions of each dataset
HF_PREFIX = "hf:"
FOLDER_SUFFIXES = (".txt", ".md")
FORMATS = ("squadshifts", "hotpot_qa")
DEFAULT_SPLIT = {"squadshifts": "test", "hotpot_qa": "validation"}


@dataclasses.dataclass(frozen=True)
class Document:
    id: str
    text: str
    title: str | None = None


TOPIC_WORDS = 12  # a document without a title is named by the start of its first sentence


def topic_of(doc: Document) -> str:
    """What a prompt calls the document: its title, else its first sentence's first
    TOPIC_WORDS words (a chunk's title is its source document's)."""
    if doc.title and doc.title.strip():
        return doc.title.strip()
    sentences = split_sentences(doc.text) or [doc.text]
    words = sentences[0].split()
    return " ".join(words[:TOPIC_WORDS]).rstrip(".") + ("…" if len(words) > TOPIC_WORDS else "")


def load_documents(spec: str | Path) -> tuple[list[Document], list[dict] | None, list[str]]:
    """(documents, test questions or None, problems) of a documents spec (see module doc)."""
    spec = str(spec)
    problems: list[str] = []
    if spec.startswith(HF_PREFIX):
        docs, tests = _load_hf(spec[len(HF_PREFIX):], problems)
    else:
        path = asset_path(spec)
        if path.is_dir():
            docs, tests = _load_folder(path), None
        elif path.is_file():
            docs, tests = _load_jsonl(path), None
        else:
            raise FileNotFoundError(
                f"--docs {spec}: no such file or folder (give a .jsonl file, a folder of .txt/.md "
                f"files, builtin:demo/documents.jsonl, hf:squadshifts/nyt, hf:hotpot_qa/distractor "
                f"or hf:/saved/dataset)")
    for p in problems:
        _log.warning(p)
    return docs, tests, problems


# ---------------------------------------------------------------- JSONL and folders

DOCS_SCHEMA = Schema('{"id", "text", "title"?} objects, one a line',
                     {"id": Field((str, int)), "text": Field(),
                      "title": Field(required=False, blank_ok=True)}, unique="id")


def _load_jsonl(path: Path) -> list[Document]:
    if path.suffix.lower() in FOLDER_SUFFIXES:
        raise ValueError(f"--docs {path} is one text file; pass the folder that holds it (every "
                         ".txt/.md file below a folder is a document) or a .jsonl file of "
                         '{"id", "text"} rows')
    return [Document(str(row["id"]), row["text"].strip(), row.get("title") or None)
            for row in read_jsonl(path, DOCS_SCHEMA, flag="--docs")]


def _load_folder(root: Path) -> list[Document]:
    files = sorted(
        (p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in FOLDER_SUFFIXES
         and not any(part.startswith(".") for part in p.relative_to(root).parts)),
        key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise ValueError(f"--docs {root}: no .txt or .md files in this folder")
    docs: list[Document] = []
    for p in files:
        data = p.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line, byte = data.count(b"\n", 0, e.start) + 1, e.start - data.rfind(b"\n", 0, e.start)
            raise ValueError(f"{p}:{line}: not valid UTF-8 ({e.reason} at byte {byte} of the "
                             "line); re-save the file as UTF-8") from None
        if not text.strip():
            raise ValueError(f"{p}: empty document; add its text or remove the file")
        docs.append(Document(p.relative_to(root).as_posix(), text.strip(), p.stem))
    return docs


# ---------------------------------------------------------------- Hugging Face datasets

def parse_hf_spec(spec: str) -> tuple[str, dict[str, str]]:
    """`NAME_OR_PATH?key=value&...` -> (NAME_OR_PATH, options)."""
    target, _, query = spec.partition("?")
    options = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=False))
    unknown = sorted(set(options) - {"format", "n", "split"})
    if unknown:
        raise ValueError(f"--docs hf:{spec}: unknown option(s) {unknown}; use format, n, split")
    if "format" in options and options["format"] not in FORMATS:
        raise ValueError(f"--docs hf:{spec}: format={options['format']!r}; use one of "
                         f"{', '.join(FORMATS)}")
    return target, options


def _load_hf(spec: str, problems: list[str]) -> tuple[list[Document], list[dict]]:
    target, options = parse_hf_spec(spec)
    try:
        n = int(options.get("n", DEFAULT_N))
    except ValueError:
        raise ValueError(f"--docs hf:{spec}: n={options['n']!r} is not an integer") from None
    local = Path(target).expanduser()
    if local.is_dir():
        from datasets import load_from_disk

        data = load_from_disk(str(local))
        fmt = options.get("format") or _infer_format(_columns(data), spec)
        data = _pick_split(data, options.get("split") or DEFAULT_SPLIT[fmt], spec)
        source = str(local)
    else:
        if target.startswith(("/", ".", "~")):
            raise FileNotFoundError(f"--docs hf:{spec}: no saved dataset at {target}")
        name, _, config = target.rpartition("/")
        if not name or not config:
            raise ValueError(f"--docs hf:{spec}: write hf:DATASET/CONFIG, e.g. hf:squadshifts/nyt "
                             f"or hf:hotpot_qa/distractor")
        fmt = options.get("format") or next((f for f in FORMATS if f in name.lower()), None)
        if fmt is None:
            raise ValueError(f"--docs hf:{spec}: cannot tell the format of {name!r}; add "
                             f"?format=squadshifts or ?format=hotpot_qa")
        from datasets import load_dataset

        split = options.get("split") or DEFAULT_SPLIT[fmt]
        data = load_dataset(name, config, split=split)
        source = f"hf:{target}"
    rows = data.select(range(min(n, len(data))))
    if fmt == "squadshifts":
        return squadshifts_documents(rows, source, problems)
    return hotpot_documents(rows, source, problems)


def _columns(data) -> list[str]:
    if hasattr(data, "column_names") and isinstance(data.column_names, list):
        return data.column_names
    first = next(iter(data.values()))  # DatasetDict: every split has the same columns
    return first.column_names


def _infer_format(columns: list[str], spec: str) -> str:
    if "supporting_facts" in columns and "context" in columns:
        return "hotpot_qa"
    if "context" in columns and "answers" in columns:
        return "squadshifts"
    raise ValueError(f"--docs hf:{spec}: columns {columns} match neither squadshifts (context, "
                     f"question, answers) nor hotpot_qa (context, supporting_facts); add ?format=")


def _pick_split(data, split: str, spec: str):
    if not hasattr(data, "keys"):  # a single Dataset was saved
        return data
    if split in data:
        return data[split]
    if len(data) == 1:
        return next(iter(data.values()))
    raise ValueError(f"--docs hf:{spec}: no split {split!r}; available: {sorted(data)}; "
                     f"add ?split=")


def squadshifts_documents(rows: Iterable[dict], source: str, problems: list[str]
                          ) -> tuple[list[Document], list[dict]]:
    """Unique passages (`context`) of SQuAD-style rows, and the rows as test questions."""
    docs: dict[str, Document] = {}
    tests: list[dict] = []
    for i, row in enumerate(rows):
        where = f"{source} row {i}"
        context, question = row.get("context"), row.get("question")
        answers = (row.get("answers") or {}).get("text") if isinstance(row.get("answers"), dict) \
            else None
        if not isinstance(context, str) or not context.strip():
            problems.append(f"{where}: missing or empty \"context\"; row skipped")
            continue
        doc_id = "sq-" + hashlib.sha1(context.encode("utf-8")).hexdigest()[:12]
        docs.setdefault(doc_id, Document(doc_id, context.strip(), row.get("title") or None))
        if not isinstance(question, str) or not question.strip() or not answers:
            problems.append(f"{where}: missing \"question\" or \"answers.text\"; passage kept, "
                            f"test question skipped")
            continue
        tests.append({"id": str(row.get("id", i)), "question": question.strip(),
                      "answers": [str(a) for a in answers], "doc_id": doc_id})
    return list(docs.values()), tests


def hotpot_documents(rows: Iterable[dict], source: str, problems: list[str]
                     ) -> tuple[list[Document], list[dict]]:
    """Every context paragraph of HotpotQA rows as a document, and the rows as test questions."""
    docs: dict[str, Document] = {}
    by_title_text: dict[tuple[str, str], str] = {}  # (title, text) -> doc id
    tests: list[dict] = []
    for i, row in enumerate(rows):
        where = f"{source} row {i}"
        context = row.get("context") or {}
        titles, sentences = context.get("title"), context.get("sentences")
        if not titles or sentences is None or len(titles) != len(sentences):
            problems.append(f"{where}: \"context\" needs parallel \"title\" and \"sentences\" lists; "
                            f"row skipped")
            continue
        local_ids: dict[str, str] = {}  # this row's title -> document id
        for title, sents in zip(titles, sentences):
            text = join_sentences(sents)
            if not text:
                problems.append(f"{where}: paragraph {title!r} is empty; skipped")
                continue
            key = (title, text)
            if key not in by_title_text:
                doc_id, k = title, 1
                while doc_id in docs:  # same title, different text
                    k += 1
                    doc_id = f"{title}~{k}"
                by_title_text[key] = doc_id
                docs[doc_id] = Document(doc_id, text, title)
            local_ids[title] = by_title_text[key]
        support = (row.get("supporting_facts") or {}).get("title") or []
        doc_ids = list(dict.fromkeys(local_ids[t] for t in support if t in local_ids))
        question, answer = row.get("question"), row.get("answer")
        if not isinstance(question, str) or not question.strip() or not isinstance(answer, str) \
                or not doc_ids:
            problems.append(f"{where}: missing question, answer or supporting facts; paragraphs "
                            f"kept, test question skipped")
            continue
        tests.append({"id": str(row.get("id", i)), "question": question.strip(),
                      "answers": [answer], "doc_id": doc_ids[0], "doc_ids": doc_ids})
    return list(docs.values()), tests


def join_sentences(sentences: list[str]) -> str:
    """HotpotQA keeps each sentence's leading space; add one only where none is there."""
    out = ""
    for s in sentences:
        if out and s and not out[-1].isspace() and not s[0].isspace():
            out += " "
        out += s
    return out.strip()


# ---------------------------------------------------------------- sentences and chunking

_SENTENCE_END = re.compile(r"[.!?][\"')\]]*$")
# A sentence stops at . ! or ? (and the quotes or brackets closing it) before white space and a
# capital, a digit or an opening quote; not after a common abbreviation or an initial ("J. Smith").
_SENTENCE_STOP = re.compile(
    r"(?<!\bMr)(?<!\bMrs)(?<!\bMs)(?<!\bDr)(?<!\bSt)(?<!\bMt)(?<!\bJr)(?<!\bSr)(?<!\bvs)"
    r"(?<!\betc)(?<!\be\.g)(?<!\bi\.e)(?<!\bNo)(?<!\b[A-Z])[.!?][\"')\]\u201d\u2019]*"
    r"(?=\s+[\"'(\[\u201c\u2018]?[A-Z0-9])")
MIN_SENTENCE_WORDS = 3


def split_sentences(text: str) -> list[str]:
    """The sentences of `text`, in order, covering all of it. Every line break ends a sentence;
    a piece of fewer than MIN_SENTENCE_WORDS words (a heading, a list label) joins the sentence
    after it (the last one joins the one before), so that every sentence states something."""
    pieces = []
    for line in text.splitlines():
        start = 0
        for m in _SENTENCE_STOP.finditer(line):
            pieces.append(line[start:m.end()].strip())
            start = m.end()
        pieces.append(line[start:].strip())
    out: list[str] = []
    pending = ""
    for piece in filter(None, pieces):
        piece = f"{pending} {piece}" if pending else piece
        if len(piece.split()) < MIN_SENTENCE_WORDS:
            pending = piece
            continue
        out.append(piece)
        pending = ""
    if pending:
        if out:
            out[-1] = f"{out[-1]} {pending}"
        else:
            out.append(pending)
    return out


def chunk_document(doc: Document, tokenizer, max_tokens: int, overlap: int = 0) -> list[Document]:
    """`doc` itself when it fits in `max_tokens` tokens, else chunks `id#0`, `id#1`, ... that do.

    Each chunk ends at the best boundary in the second half of its window (paragraph > sentence
    > word > anywhere) and the next one starts up to `overlap` tokens earlier, at the best
    boundary there, so a fact cut at the edge of one chunk is whole in the other. Consecutive
    chunks cover the text without gaps.
    """
    if max_tokens < 8:
        raise ValueError(f"chunk max_tokens={max_tokens} is too small; use at least 8")
    if not 0 <= overlap < max_tokens // 2:
        raise ValueError(f"chunk overlap={overlap} must be >= 0 and < max_tokens/2 "
                         f"({max_tokens // 2})")
    text = doc.text
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    n = len(enc["input_ids"])
    if n <= max_tokens:
        return [doc]
    starts = [int(a) for a, _ in enc["offset_mapping"]] + [len(text)]  # char where token j starts
    score = [_boundary_score(text, starts[j]) for j in range(n)] + [4]

    def count(a: int, b: int) -> int:
        return len(tokenizer(text[starts[a]:starts[b]].strip(), add_special_tokens=False)["input_ids"])

    chunks: list[Document] = []
    s = 0
    while True:
        if s + max_tokens >= n:
            e = n
        else:
            window = range(s + max_tokens // 2, s + max_tokens + 1)
            e = max(window, key=lambda j: (score[j], j))
        while e > s + 1 and count(s, e) > max_tokens:  # re-tokenised text may merge differently
            e -= 1
        body = text[starts[s]:starts[e]].strip()
        chunks.append(Document(f"{doc.id}#{len(chunks)}", body, doc.title))
        if e >= n:
            return chunks
        # the next chunk starts at the best boundary among the last `overlap` tokens; a token
        # holding only the whitespace before `e` is the same boundary as `e`, not an overlap
        window = [j for j in range(max(s + 1, e - overlap), e)
                  if _first_visible(text, starts[j]) < _first_visible(text, starts[e])]
        s = min(window, key=lambda j: (-score[j], j)) if window else e


def _first_visible(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def _boundary_score(text: str, pos: int) -> int:
    """How good a place `pos` (a token start) is to cut before: 3 paragraph, 2 sentence, 1 word."""
    j = pos
    while j < len(text) and text[j].isspace():  # byte-level BPE tokens carry their leading space
        j += 1
    i = pos
    while i > 0 and text[i - 1].isspace():
        i -= 1
    gap = text[i:j]
    if not gap:
        return 0
    sentence_end = bool(_SENTENCE_END.search(text[max(0, i - 4):i]))
    newlines = gap.count("\n")
    if newlines >= 2 or (newlines == 1 and sentence_end):
        return 3
    if sentence_end or newlines:
        return 2
    return 1

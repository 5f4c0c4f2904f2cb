"""The rows a study variant trains on.

The generation's rows (its qa.jsonl), cut to the first N documents (`--docs N`) and filtered by
the variant's `rows` options, are written once per distinct set of rows as
OUT/_data_<sha>/qa.jsonl, beside a link to the generation's `teacher_states/`: training looks for
the teacher states it may reuse beside the rows file it reads, and takes a row's states only when
its teacher sequence matches exactly, so a filtered copy reuses them as the original would.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

from pdistill_jax.config import RowsConfig
from pdistill_jax.datagen.dataset import DOCUMENTS_FILE, QA_SCHEMA, resolve_data_file
from pdistill_jax.datagen.teacher_states import TEACHER_STATES_DIR
from pdistill_jax.files import read_jsonl, write_jsonl_atomic


@dataclasses.dataclass(frozen=True)
class GeneratedData:
    folder: Path  # the `pdistill generate` output
    rows: list[dict]  # its qa.jsonl rows, in order
    source_of: dict[str, str]  # a row's doc_id (a chunk of a long document) -> its document's id

    def document(self, row: dict) -> str:
        doc_id = str(row["doc_id"])
        return self.source_of.get(doc_id, doc_id)


def read_generated(path: str | Path) -> GeneratedData:
    """A generation's rows, with the document each chunk came from (its documents.jsonl)."""
    qa_file = resolve_data_file(path)
    rows = read_jsonl(qa_file, QA_SCHEMA, flag="--data")
    for n, row in enumerate(rows, 1):
        if "doc_id" not in row:
            raise ValueError(f"{qa_file}:{n}: a study needs a \"doc_id\" on every row (the rows "
                             "of a document are what teaches its test questions)")
    if not rows:
        raise ValueError(f"{qa_file} holds no rows")
    docs_file = qa_file.parent / DOCUMENTS_FILE
    source_of = {str(d["id"]): str(d["source_id"]) for d in read_jsonl(docs_file)
                 if "source_id" in d} if docs_file.is_file() else {}
    return GeneratedData(qa_file.parent, rows, source_of)


def document_order(data: GeneratedData) -> list[str]:
    """The documents in the order their first row appears (what `--docs N` takes the first of)."""
    return list(dict.fromkeys(data.document(row) for row in data.rows))


def trained_answer(row: dict, objective: str) -> tuple[str, bool]:
    """(the answer text a row teaches, whether it ended): `ce` learns the low-temperature
    answer where generation wrote one, the distillation objectives the teacher's answer."""
    if objective == "ce" and row.get("sft_answer") is not None:
        return row["sft_answer"], row.get("sft_finished") is not False
    return row["answer"], row.get("answer_finished") is not False


def select_rows(data: GeneratedData, documents: set[str] | None, options: RowsConfig,
                objective: str) -> list[dict]:
    """The rows of `documents` (None: all) that `options` keep, in the generation's order."""
    kept, per_doc = [], {}
    for row in data.rows:
        doc = data.document(row)
        if documents is not None and doc not in documents:
            continue
        if options.finished_only and not trained_answer(row, objective)[1]:
            continue
        if options.max_per_doc is not None and per_doc.get(doc, 0) >= options.max_per_doc:
            continue
        per_doc[doc] = per_doc.get(doc, 0) + 1
        kept.append(row)
    return kept


def taught_rows(data: GeneratedData, rows: list[dict], objective: str) -> list[dict]:
    """{"doc_id": document, "answer": the text trained on} per row, as `exposures` reads them."""
    return [{"doc_id": data.document(row), "answer": trained_answer(row, objective)[0]}
            for row in rows]


def write_rows(rows: list[dict], out: Path, data: GeneratedData) -> tuple[Path, str]:
    """(OUT/_data_<sha>/qa.jsonl holding `rows`, its sha256); written once, then reused."""
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
    folder = out / f"_data_{sha[:16]}"
    qa_file = folder / "qa.jsonl"
    if not qa_file.exists():
        write_jsonl_atomic(qa_file, rows)  # the same bytes as `text`
    states, link = (data.folder / TEACHER_STATES_DIR).absolute(), folder / TEACHER_STATES_DIR
    if states.is_dir():
        if link.is_symlink() and Path(os.readlink(link)) != states:
            link.unlink()  # made for a generation that has moved since: point at where it is now
        if not link.is_symlink() and not link.exists():
            link.symlink_to(states, target_is_directory=True)
    return qa_file, sha

"""The output folder of `pdistill generate`: what is in it, how a run commits to it and resumes
from it, and how training reads its rows.

  qa.jsonl              {"doc_id", "document", "question", "answer", "sft_answer",
                         "answer_finished", "sft_finished"} (finished=False: cut at max tokens);
                         a paraphrase's row (paraphrases_per_question > 0) adds "paraphrase_of",
                         the question it rewrites, and follows that question's row; a
                         further answer's row (answers_per_question > 1) adds "answer_index"
                         (1, 2, ...) and follows the first answer's row; a teacher
                         restatement's row (restatements_per_doc > 0) adds "restatement", the
                         request's number, and follows its document's question rows; a
                         recitation's row (recitations_per_doc > 0) adds "recitation", the
                         request's number, its answers the document's text, after those
  done.jsonl            one line per finished document: its question statistics (resume record)
  dataset/              the same rows as a `datasets` Dataset (save_to_disk), rebuilt every run
  documents.jsonl       the documents used, after chunking (with their source document id)
  test_questions.jsonl  when the documents came with test questions (hf: datasets)
  manifest.json         model, prompts, settings, counts, parse yield, per-document stats, timings
                        (manifest.py)
  run.json              the settings the folder was started with (a rerun must match them)
  teacher_states/       the teacher's hidden states at the PD answer positions (teacher_states.py)

Training reads qa.jsonl (or any JSONL file of the same rows) through `read_qa_rows`.

The system message, one rule for every stage: the one given (a flag, a config file; in a run
config the top-level `system`, which RunConfig hands to every stage), else the one the stage's
input was made under (training on generated data: `generation_system_message`; answering with
an adapter: the message it was trained with), else the chat template's default (None).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from pdistill_jax.config import GenerateConfig, differences, to_dict
from pdistill_jax.files import (Field, Schema, read_committed_jsonl, read_jsonl, write_dir_atomic,
                                write_jsonl_atomic, write_text_atomic)

QA_FILE = "qa.jsonl"
DONE_FILE = "done.jsonl"
MANIFEST_FILE = "manifest.json"
SETTINGS_FILE = "run.json"
DOCUMENTS_FILE = "documents.jsonl"
TEST_QUESTIONS_FILE = "test_questions.jsonl"
DATASET_DIR = "dataset"
# What generate writes at the top of its output folder (a --docs input there must not be one),
# in the order a failed generation deletes them.
OUTPUT_FILES = (QA_FILE, DONE_FILE, MANIFEST_FILE, SETTINGS_FILE, DOCUMENTS_FILE,
                TEST_QUESTIONS_FILE)

QA_FIELDS = ("doc_id", "document", "question", "answer", "sft_answer", "answer_finished",
             "sft_finished")
# Optional fields, on some rows only; a `datasets` column (None where a row lacks it) only when
# some row has it, so that data without them is stored as before.
QA_OPTIONAL_FIELDS = ("paraphrase_of", "answer_index", "restatement", "recitation")
# Settings that may differ between a run and its resumption (they do not change the data's meaning).
RESUMABLE_CHANGES = ("batch_size", "teacher_states_gb")


@dataclasses.dataclass(frozen=True)
class QARow:
    document: str
    question: str
    answer: str  # the teacher's sampled answer (prompt distillation)
    sft_answer: str | None = None  # a low-temperature answer used as ground truth by `ce`
    doc_id: str | int | None = None
    # False when generation cut the answer at its token limit: `ce` then has no end-of-turn
    # target for it (it would teach the student to stop mid-sentence).
    answer_finished: bool = True
    sft_finished: bool = True
    paraphrase_of: str | None = None  # a paraphrase's row: the question it rewrites
    # A restatement's or recitation's row: a request about the whole document, not a question
    # (a dev set never holds it out: train/dev_set.py).
    about_document: bool = False


def resolve_data_file(path: str | Path) -> Path:
    """A `pdistill generate` folder (its qa.jsonl) or a JSONL file itself."""
    path = Path(path)
    if path.is_dir():
        path = path / QA_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path.parent} has no {QA_FILE}; pass the folder written "
                                    "by `pdistill generate` or a JSONL file of Q&A rows")
    elif not path.exists():
        raise FileNotFoundError(f"training data {path} does not exist")
    return path


QA_SCHEMA = Schema(
    '{"document", "question", "answer", "sft_answer"?, "doc_id"?} objects, one a line',
    {"document": Field(), "question": Field(), "answer": Field(),
     "sft_answer": Field(required=False), "doc_id": Field((str, int), required=False),
     "answer_finished": Field((bool,), required=False),
     "sft_finished": Field((bool,), required=False),
     "paraphrase_of": Field(required=False),
     "answer_index": Field((int,), required=False),
     "restatement": Field((int,), required=False),
     "recitation": Field((int,), required=False)})


def read_qa_rows(path: str | Path) -> list[QARow]:
    """Rows {"document", "question", "answer", "sft_answer"?, "doc_id"?}, checked field by field."""
    file = resolve_data_file(path)
    rows = [QARow(raw["document"], raw["question"], raw["answer"], raw.get("sft_answer"),
                  raw.get("doc_id"), raw.get("answer_finished") is not False,
                  raw.get("sft_finished") is not False, raw.get("paraphrase_of"),
                  raw.get("restatement") is not None or raw.get("recitation") is not None)
            for raw in read_jsonl(file, QA_SCHEMA, flag="--data")]
    if not rows:
        raise ValueError(f"{file} holds no rows")
    return rows


def generation_system_message(data) -> str | None:
    """The system message training data was generated under (the manifest beside its qa.jsonl),
    None for the chat template's default or for data that `pdistill generate` did not write."""
    manifest = resolve_data_file(data).parent / MANIFEST_FILE
    if not manifest.is_file():
        return None
    return (json.loads(manifest.read_text()).get("config") or {}).get("system")


# ---------------------------------------------------------------- the committed state of a run

def load_progress(out: Path) -> tuple[list[dict], dict[str, dict]]:
    """(qa rows, done records by doc id) of an output folder, repaired after a kill."""
    done = {r["doc_id"]: r for r in read_committed_jsonl(out / DONE_FILE)}
    qa_path = out / QA_FILE
    rows = read_committed_jsonl(qa_path)
    kept = [r for r in rows if r.get("doc_id") in done]
    if len(kept) != len(rows):  # rows of a wave whose done lines never landed: redo that wave
        write_jsonl_atomic(qa_path, kept)
    counts: dict[str, int] = {}
    for r in kept:
        counts[r["doc_id"]] = counts.get(r["doc_id"], 0) + 1
    for doc_id, rec in done.items():
        if counts.get(doc_id, 0) != rec["rows"]:
            raise ValueError(f"{qa_path}: document {doc_id!r} has {counts.get(doc_id, 0)} rows but "
                             f"done.jsonl records {rec['rows']}; the folder was edited by hand — "
                             f"use a new --out")
    return kept, done


def has_committed(out: Path) -> bool:
    """Whether `out` holds a committed document (then it is a run to resume, never removed)."""
    done = out / DONE_FILE
    return done.exists() and done.stat().st_size > 0


def run_settings(model_spec: str, docs_spec: str, cfg: GenerateConfig) -> dict:
    """What run.json records: the settings a resumption must match."""
    config = {k: v for k, v in to_dict(cfg).items() if k not in RESUMABLE_CHANGES}
    return {"model": str(model_spec), "docs": str(docs_spec), "config": config}


def check_settings(out: Path, settings: dict) -> None:
    """A rerun must use the settings the folder was started with (batch size excepted)."""
    path = out / SETTINGS_FILE
    if not path.exists():
        write_text_atomic(path, json.dumps(settings, indent=2, ensure_ascii=False) + "\n")
        return
    diff = differences(json.loads(path.read_text(encoding="utf-8")), settings)
    if diff:
        raise ValueError(f"{out} was generated with other settings ({'; '.join(diff)}); rerun with "
                         f"the same settings to resume, or choose a new --out")


def save_dataset(path: Path, rows: list[dict]) -> None:
    """rows as a `datasets` Dataset at `path`, replacing any previous one."""
    from datasets import Dataset, Features, Value
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    fields = QA_FIELDS + tuple(k for k in QA_OPTIONAL_FIELDS if any(k in r for r in rows))
    # each column's type from the field's in QA_SCHEMA (doc_id, str or int, is stored as a string)
    column = {(bool,): "bool", (int,): "int32"}
    features = Features({k: Value(column.get(QA_SCHEMA.fields[k].types, "string")) for k in fields})
    ds = Dataset.from_dict({k: [r.get(k) for r in rows] for k in fields}, features=features)
    # a save of a second or less: its "Saving the dataset" bar would be the only one left
    # on stderr under --no-progress
    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        write_dir_atomic(path, lambda tmp: ds.save_to_disk(str(tmp)), replaceable=lambda _: True)
    finally:
        if not was_disabled:
            enable_progress_bars()

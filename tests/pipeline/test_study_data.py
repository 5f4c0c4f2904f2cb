"""The rows a study variant trains on (pipeline/study_data.py): --docs N, the rows options, the
answer each objective learns, and the filtered data folder that reuses generation's states."""
import json
from pathlib import Path

import pytest

from pdistill_jax.config import RowsConfig
from pdistill_jax.pipeline.study_data import (document_order, read_generated, select_rows,
                                              taught_rows, write_rows)


def _row(doc, n, finished=True, sft_finished=True):
    return {"doc_id": doc, "document": f"text of {doc}", "question": f"q{n}?", "answer": f"pd {n}",
            "sft_answer": f"sft {n}", "answer_finished": finished, "sft_finished": sft_finished}


ROWS = [_row("b#0", 0), _row("a", 1, finished=False), _row("b#1", 2), _row("a", 3),
        _row("c", 4, sft_finished=False), _row("a", 5)]


@pytest.fixture
def data(tmp_path) -> Path:
    folder = tmp_path / "gen"
    folder.mkdir()
    (folder / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    # document b was split into two chunks; generation records where each came from
    (folder / "documents.jsonl").write_text("".join(json.dumps(d) + "\n" for d in [
        {"id": "b#0", "text": "x", "source_id": "b"}, {"id": "b#1", "text": "y", "source_id": "b"},
        {"id": "a", "text": "z", "source_id": "a"}, {"id": "c", "text": "w", "source_id": "c"}]))
    (folder / "teacher_states").mkdir()
    return folder


def _questions(rows):
    return [r["question"] for r in rows]


def test_documents_come_in_the_order_their_first_row_appears_chunks_counted_as_their_source(data):
    generated = read_generated(data)
    assert document_order(generated) == ["b", "a", "c"]
    assert _questions(select_rows(generated, {"b"}, RowsConfig(), "kl")) == ["q0?", "q2?"]
    assert _questions(select_rows(generated, None, RowsConfig(), "kl")) == _questions(ROWS)


def test_rows_options_keep_what_they_say(data):
    generated = read_generated(data)
    # the first N rows of each document (its chunks together), in the generation's order
    assert _questions(select_rows(generated, None, RowsConfig(max_per_doc=1), "kl")) == \
        ["q0?", "q1?", "q4?"]
    # finished_only looks at the answer the objective trains on
    assert _questions(select_rows(generated, None, RowsConfig(finished_only=True), "kl")) == \
        ["q0?", "q2?", "q3?", "q4?", "q5?"]
    assert _questions(select_rows(generated, None, RowsConfig(finished_only=True), "ce")) == \
        ["q0?", "q1?", "q2?", "q3?", "q5?"]
    # both: cut rows do not use up a document's quota
    assert _questions(select_rows(generated, {"a"}, RowsConfig(max_per_doc=1, finished_only=True),
                                  "kl")) == ["q3?"]


def test_taught_rows_hold_the_document_and_the_answer_each_objective_learns(data):
    generated = read_generated(data)
    assert taught_rows(generated, ROWS[:2], "kl") == [{"doc_id": "b", "answer": "pd 0"},
                                                       {"doc_id": "a", "answer": "pd 1"}]
    assert taught_rows(generated, ROWS[:2], "ce") == [{"doc_id": "b", "answer": "sft 0"},
                                                       {"doc_id": "a", "answer": "sft 1"}]
    no_sft = {k: v for k, v in ROWS[0].items() if k != "sft_answer"}
    assert taught_rows(generated, [no_sft], "ce") == [{"doc_id": "b", "answer": "pd 0"}]


def test_a_set_of_rows_is_written_once_beside_a_link_to_generations_teacher_states(data, tmp_path):
    generated = read_generated(data)
    out = tmp_path / "study"
    qa_file, sha = write_rows(ROWS[:3], out, generated)
    assert qa_file.parent.name == f"_data_{sha[:16]}"
    assert [json.loads(line) for line in qa_file.read_text().splitlines()] == ROWS[:3]
    link = qa_file.parent / "teacher_states"
    assert link.is_symlink() and link.resolve() == (data / "teacher_states").resolve()
    mtime = qa_file.stat().st_mtime_ns
    assert write_rows(ROWS[:3], out, generated) == (qa_file, sha) and qa_file.stat().st_mtime_ns == mtime
    other, other_sha = write_rows(ROWS[:2], out, generated)
    assert other.parent != qa_file.parent and other_sha != sha
    # the generation moved: the link follows it
    moved = data.rename(tmp_path / "moved")
    write_rows(ROWS[:3], out, read_generated(moved))
    assert link.resolve() == (moved / "teacher_states").resolve()


def test_rows_without_a_doc_id_are_refused_naming_the_line(tmp_path):
    (tmp_path / "qa.jsonl").write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(
        {"document": "d", "question": "q", "answer": "a"}) + "\n")
    with pytest.raises(ValueError, match=r"qa\.jsonl:2: a study needs a \"doc_id\""):
        read_generated(tmp_path)

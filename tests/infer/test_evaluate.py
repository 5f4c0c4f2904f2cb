"""Tests for the pure-Python evaluation library, the JSONL helpers and the demo corpus."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pdistill_jax.infer.evaluate import (
    coverage,
    exposures,
    evaluate,
    judge_prompt,
    match,
    normalize_answer,
    parse_grade,
    token_f1,
    write_results,
)
from pdistill_jax.files import read_jsonl, write_jsonl_atomic

DEMO = Path(__file__).resolve().parents[2] / "pdistill_jax" / "assets" / "demo"


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("The Cat", "cat"),
        ("  An apple,   a  pear! ", "apple pear"),
        ("Theatre anthem", "theatre anthem"),  # articles only as whole words
        ("1,873", "1873"),
        ("Okonkwo-Fenn", "okonkwofenn"),
        ("Ferryman's Tune.", "ferrymans tune"),
        ("", ""),
        ("The.", ""),
    ],
)
def test_normalize_answer(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_match_is_normalized_substring() -> None:
    assert match("It was completed in 1,873, I think.", ["1873"])
    assert match("The answer is the Golden Ladle!", ["golden ladle"])
    assert match("Paris.", ["London", "Paris"])
    assert not match("It is Lyon.", ["Paris"])


def test_match_ignores_answers_that_normalize_to_nothing() -> None:
    assert not match("anything at all", ["The", "?"])
    assert match("anything at all", ["The", "all"])


def test_token_f1_hand_computed() -> None:
    # pred tokens [cat, sat, on, mat], gold [cat, on, mat]: P = 3/4, R = 1, F1 = 6/7.
    assert token_f1("The cat sat on the mat", ["cat on mat"]) == pytest.approx(6 / 7)
    # max over answers: [blue, whale] vs [whale] gives P = 1/2, R = 1, F1 = 2/3.
    assert token_f1("blue whale", ["red", "whale"]) == pytest.approx(2 / 3)
    assert token_f1("Paris", ["the Paris"]) == 1.0
    assert token_f1("Lyon", ["Paris"]) == 0.0
    assert token_f1("anything", []) == 0.0


def test_token_f1_counts_repeated_tokens_once_each() -> None:
    # pred [x, x, y], gold [x, y]: common = 2, P = 2/3, R = 1, F1 = 0.8.
    assert token_f1("x x y", ["x y"]) == pytest.approx(0.8)


def test_judge_prompt_contains_inputs_and_grade_format() -> None:
    prompt = judge_prompt("Who built it?", ["Ann Bell", "Bell"], "It was Ann.")
    expected = ("Who built it?", '"Ann Bell"', '"Bell"', "It was Ann.", "<grade>true</grade>", "<grade>false</grade>")
    for piece in expected:
        assert piece in prompt


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Matches the name. <grade>true</grade>", True),
        ("Different year. <grade>false</grade>", False),
        ("<GRADE> True </GRADE>", True),
        ("<grade>\nfalse.\n</grade>", False),
        ("Respond with <grade>true</grade> or <grade>false</grade>. My verdict: <grade>false</grade>", False),
        ("I think it is correct.", None),
        ("<grade>maybe</grade>", None),
        ("<grade>true", None),
        ("", None),
    ],
)
def test_parse_grade(text: str, expected: bool | None) -> None:
    assert parse_grade(text) is expected


QUESTIONS = [
    {"question": "Q1?", "answers": ["Ann Bell"], "doc_id": "d1"},
    {"question": "Q2?", "answers": ["1873"], "doc_id": "d1"},
    {"question": "Q3?", "answers": ["green", "teal"], "doc_id": "d2"},
    {"question": "Q4?", "answers": ["Oslo"], "doc_id": "d2"},
]
PREDICTIONS = [
    {"question": "Q1?", "prediction": "It was Ann Bell.", "doc_id": "d1"},
    {"question": "Q2?", "prediction": "In 1901.", "doc_id": "d1"},
    {"question": "Q3?", "prediction": "Teal", "doc_id": "d2"},
    {"question": "Q4?", "prediction": "Bergen", "doc_id": "d2"},
]


def test_evaluate_without_judge() -> None:
    summary, rows = evaluate(QUESTIONS, PREDICTIONS)
    assert summary["n"] == 4
    assert summary["match_accuracy"] == 0.5
    # F1 per row: gold [ann, bell] vs pred [it, was, ann, bell] -> P 2/4, R 1 -> 2/3; then 0; 1; 0.
    assert summary["f1"] == pytest.approx((2 / 3 + 0 + 1 + 0) / 4)
    assert summary["by_doc"] == {"d1": {"n": 2, "match_accuracy": 0.5, "f1": pytest.approx(1 / 3)},
                                 "d2": {"n": 2, "match_accuracy": 0.5, "f1": 0.5}}
    assert "judge_accuracy" not in summary
    assert [r["match"] for r in rows] == [True, False, True, False]
    assert rows[0]["doc_id"] == "d1" and rows[0]["prediction"] == "It was Ann Bell."


def test_evaluate_with_fake_judge_excludes_unparseable_grades() -> None:
    seen: list[list[str]] = []
    replies = [
        "ok <grade>true</grade>",
        "wrong year <grade>false</grade>",
        "no verdict",
        "<grade>TRUE</grade>",
    ]

    def fake_judge(prompts: list[str]) -> list[str]:
        seen.append(prompts)
        return replies

    summary, rows = evaluate(QUESTIONS, PREDICTIONS, judge=fake_judge)
    assert len(seen) == 1 and len(seen[0]) == 4  # one batched call
    assert seen[0][1] == judge_prompt("Q2?", ["1873"], "In 1901.")
    assert summary["judge_unparseable"] == 1
    assert summary["judge_accuracy"] == pytest.approx(2 / 3)
    assert summary["by_doc"]["d2"]["judge_accuracy"] == 1.0
    assert summary["by_doc"]["d2"]["judge_unparseable"] == 1
    assert [r["judge_grade"] for r in rows] == [True, False, None, True]
    assert rows[2]["judge_output"] == "no verdict"


def test_evaluate_judge_with_no_parseable_grade_gives_none() -> None:
    summary, _ = evaluate(QUESTIONS[:1], PREDICTIONS[:1], judge=lambda prompts: ["?"] * len(prompts))
    assert summary["judge_accuracy"] is None and summary["judge_unparseable"] == 1


def test_evaluate_rejects_wrong_judge_output_length() -> None:
    with pytest.raises(ValueError, match="judge returned 1 completions for 4 prompts"):
        evaluate(QUESTIONS, PREDICTIONS, judge=lambda prompts: ["<grade>true</grade>"])


def test_evaluate_rows_without_doc_id_are_left_out_of_by_doc() -> None:
    summary, rows = evaluate([{"question": "Q", "answers": ["x"]}], [{"question": "Q", "prediction": "x"}])
    assert summary["by_doc"] == {} and summary["match_accuracy"] == 1.0 and "doc_id" not in rows[0]


def test_evaluate_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="4 questions but 3 predictions"):
        evaluate(QUESTIONS, PREDICTIONS[:3])


def test_evaluate_mismatched_question_names_row() -> None:
    swapped = [PREDICTIONS[0], PREDICTIONS[2], PREDICTIONS[1], PREDICTIONS[3]]
    with pytest.raises(ValueError, match=r"^row 2: ") as err:
        evaluate(QUESTIONS, swapped)
    assert "\n" not in str(err.value)


def test_evaluate_mismatched_doc_id_names_row() -> None:
    wrong = [dict(p) for p in PREDICTIONS]
    wrong[3]["doc_id"] = "d9"
    with pytest.raises(ValueError, match=r"^row 4: .*d9"):
        evaluate(QUESTIONS, wrong)


def test_evaluate_rejects_malformed_rows_and_empty_input() -> None:
    with pytest.raises(ValueError, match="row 1: 'answers'"):
        evaluate([{"question": "Q", "answers": []}], [{"question": "Q", "prediction": "x"}])
    with pytest.raises(ValueError, match="no questions"):
        evaluate([], [])
    with pytest.raises(ValueError, match="row 1: 'prediction' must be a string"):
        evaluate([{"question": "Q", "answers": ["x"]}], [{"question": "Q"}])


def test_write_results(tmp_path: Path) -> None:
    summary, rows = evaluate(QUESTIONS, PREDICTIONS)
    out = tmp_path / "run" / "eval"
    write_results(out, summary, rows)
    assert json.loads((out / "results.json").read_text()) == summary
    assert read_jsonl(out / "per_question.jsonl") == rows
    # no temp files left behind
    assert sorted(p.name for p in out.iterdir()) == ["per_question.jsonl", "results.json"]


def test_coverage_separates_untaught_facts() -> None:
    training = [
        {"doc_id": "d1", "question": "who?", "answer": "It was built by ann bell in 1900."},
        {"doc_id": "d2", "question": "colour?", "answer": "The roof is TEAL."},
        {"doc_id": "d3", "question": "unrelated", "answer": "Oslo"},  # other doc: must not count for d2
    ]
    result = coverage(QUESTIONS, training)
    assert result["by_doc"] == {
        "d1": {"n_questions": 2, "covered": 1},
        "d2": {"n_questions": 2, "covered": 1},
    }
    assert result["n_questions"] == 4 and result["covered"] == 2 and result["fraction"] == 0.5


def test_coverage_requires_doc_id() -> None:
    with pytest.raises(ValueError, match="row 1"):
        coverage([{"question": "Q", "answers": ["x"]}], [])


def test_exposures_count_the_rows_that_state_each_fact_times_epochs() -> None:
    questions = [
        {"question": "When?", "answers": ["1873"], "doc_id": "a"},
        {"question": "Who?", "answers": ["Ann Bell", "A. Bell"], "doc_id": "a"},
        {"question": "Where?", "answers": ["Oslo"], "doc_id": 7},  # an int id matches "7"
        {"question": "What?", "answers": ["the"], "doc_id": "a"},  # normalises to nothing
    ]
    rows = [
        {"doc_id": "a", "answer": "Built in 1873 by Ann Bell."},  # 1873 and Ann Bell: once each
        {"doc_id": "a", "answer": "In 1,873."},  # "1,873" normalises to "1873"
        {"doc_id": "a", "answer": "ANN BELL (a. bell) designed it."},  # two answers: one row
        {"doc_id": "b", "answer": "1873 in Oslo"},  # another document teaches neither
        {"doc_id": "7", "answer": "oslo!"},
    ]
    # by hand: 1873 in rows 1, 2 -> 2; Ann Bell in rows 1, 3 -> 2; Oslo in row 5 -> 1; "the" -> 0
    result = exposures(questions, rows, epochs=3)
    assert result["by_question"] == [6, 6, 3, 0]
    assert result["n_questions"] == 4 and result["mean"] == 15 / 4
    assert result["covered"] == 3 and result["fraction"] == 0.75
    # covered means the same as coverage's
    assert coverage(questions, rows)["covered"] == result["covered"]
    assert exposures(questions, rows)["by_question"] == [2, 2, 1, 0]  # one epoch by default


def test_exposures_of_nothing_and_without_doc_ids() -> None:
    assert exposures([], [{"doc_id": "a", "answer": "x"}], 2) == {
        "by_question": [], "n_questions": 0, "mean": None, "covered": 0, "fraction": None}
    with pytest.raises(ValueError, match="row 1: exposures needs a doc_id"):
        exposures([{"question": "Q", "answers": ["x"]}], [])


def test_read_jsonl_bad_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken\.jsonl:3: invalid JSON"):
        read_jsonl(path)


def test_read_jsonl_rejects_non_objects(tmp_path: Path) -> None:
    path = tmp_path / "list.jsonl"
    path.write_text("[1, 2]\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"list\.jsonl:1: expected a JSON object"):
        read_jsonl(path)


def test_jsonl_round_trip_keeps_unicode(tmp_path: Path) -> None:
    rows = [{"text": "Ysolde Pemberhalt (1822–1894)"}, {"n": 2}]
    path = tmp_path / "sub" / "rows.jsonl"
    write_jsonl_atomic(path, rows)
    assert read_jsonl(path) == rows
    assert "–" in path.read_text(encoding="utf-8")


def test_demo_corpus_is_well_formed() -> None:
    documents = read_jsonl(DEMO / "documents.jsonl")
    questions = read_jsonl(DEMO / "questions.jsonl")
    general = read_jsonl(DEMO / "general_knowledge.jsonl")

    assert len(documents) >= 20
    ids = [d["id"] for d in documents]
    assert len(set(ids)) == len(ids)
    for d in documents:
        assert d["title"] and 120 <= len(d["text"].split()) <= 220, d["id"]
    text_by_id = {d["id"]: normalize_answer(d["text"]) for d in documents}

    assert len(questions) >= 100
    assert len({q["question"] for q in questions}) == len(questions)
    for q in questions:
        assert q["doc_id"] in text_by_id, q
        assert q["answers"], q
        for answer in q["answers"]:
            assert normalize_answer(answer) in text_by_id[q["doc_id"]], (q["question"], answer)

    assert len(general) >= 50
    for q in general:
        assert q["question"] and q["answers"] and all(normalize_answer(a) for a in q["answers"])

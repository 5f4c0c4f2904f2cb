"""Question-answering evaluation: string match, token F1 and an optional LLM judge.

The paper's headline metric is an LLM judge (reasoning, then
``<grade>true|false</grade>``; unparseable grades leave the denominator), cross-
checked with SQuAD-normalised answer-in-prediction matching. Both are here,
plus ``coverage``: whether a test fact ever appeared in the generated training
answers, which separates "the fact was never distilled" from "distillation
failed to store it", and ``exposures``: how many times training showed each test
fact (rows that state it, times epochs). Pure Python on purpose, so evaluating predictions needs no
accelerator stack.
"""

from __future__ import annotations

import json
import os
import re
import string
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable, Sequence

from pdistill_jax.files import write_jsonl_atomic, write_text_atomic

Judge = Callable[[list[str]], list[str]]

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_GRADE = re.compile(r"<\s*grade\s*>(.*?)<\s*/\s*grade\s*>", re.IGNORECASE | re.DOTALL)


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation and articles, collapse spaces.

    Same order as the official SQuAD script, so numbers stay comparable with
    published figures ("1,873" becomes "1873").
    """
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _nonempty_normalized(answers: Sequence[str]) -> list[str]:
    """Normalised accepted answers, minus those that normalise to nothing.

    An empty normalised answer ("The", "?") is a substring of everything and
    would mark every prediction correct.
    """
    return [n for n in (normalize_answer(a) for a in answers) if n]


def match(prediction: str, answers: Sequence[str]) -> bool:
    """True when some accepted answer (normalised) is a substring of the normalised prediction.

    This is the paper's cross-check metric; being a character substring test it
    is lenient (a short numeric answer can match inside a longer number), which
    is why the judge is the headline metric.
    """
    pred = normalize_answer(prediction)
    return any(ans in pred for ans in _nonempty_normalized(answers))


def _f1_single(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    """SQuAD token F1 between two token lists (both empty counts as a perfect match)."""
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, answers: Sequence[str]) -> float:
    """SQuAD token F1, the maximum over accepted answers (0.0 when there are none).

    Complements ``match``: it penalises long, rambling predictions that happen
    to contain the answer.
    """
    pred_tokens = normalize_answer(prediction).split()
    return max(
        (_f1_single(pred_tokens, normalize_answer(a).split()) for a in answers),
        default=0.0,
    )


def judge_prompt(question: str, answers: Sequence[str], prediction: str) -> str:
    """Prompt asking an LLM judge for brief reasoning, then a single grade tag.

    Reasoning before the verdict gives the judge room to compare facts rather
    than surface strings; the fixed tag makes the verdict machine-readable.
    """
    accepted = " | ".join(f'"{a}"' for a in answers)
    return (
        "You are grading an answer to a factual question.\n\n"
        f"Question: {question}\n"
        f"Accepted answer(s): {accepted}\n"
        f"Answer to grade: {prediction}\n\n"
        "The answer is correct if it states the same fact as one of the accepted "
        "answers; different wording, spelling variants or extra correct detail are "
        "fine. It is incorrect if it gives a different or contradicting fact, lists "
        "several candidates without committing to one, or does not answer.\n"
        "First write one or two sentences of reasoning. Then end with exactly "
        "<grade>true</grade> if the answer is correct or <grade>false</grade> if it "
        "is not."
    )


def parse_grade(text: str) -> bool | None:
    """The verdict in the last ``<grade>`` tag, or None when it cannot be read.

    The last tag wins because judges often restate the instructions (which
    mention both tags) before giving their own verdict. Case, surrounding
    whitespace and a trailing full stop or quotes inside the tag are tolerated.
    """
    tags = _GRADE.findall(text)
    if not tags:
        return None
    verdict = tags[-1].strip().strip(".'\"`").strip().lower()
    return {"true": True, "false": False}.get(verdict)


def _check_rows(questions: Sequence[dict], predictions: Sequence[dict]) -> None:
    """Raise ValueError (one line, 1-based row number) when the two lists do not line up."""
    if len(questions) != len(predictions):
        raise ValueError(
            f"{len(questions)} questions but {len(predictions)} predictions; "
            "they must be the same rows in the same order"
        )
    if not questions:
        raise ValueError("no questions to evaluate")
    for i, (q, p) in enumerate(zip(questions, predictions), start=1):
        answers = q.get("answers")
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            raise ValueError(f"row {i}: 'answers' must be a non-empty list of strings, got {answers!r}")
        if str(q.get("question", "")).strip() != str(p.get("question", "")).strip():
            raise ValueError(
                f"row {i}: prediction is for question {p.get('question')!r} "
                f"but the test question is {q.get('question')!r}"
            )
        if not isinstance(p.get("prediction"), str):
            raise ValueError(f"row {i}: 'prediction' must be a string, got {p.get('prediction')!r}")
        if "doc_id" in q and "doc_id" in p and str(q["doc_id"]) != str(p["doc_id"]):
            raise ValueError(f"row {i}: prediction doc_id {p['doc_id']!r} != test doc_id {q['doc_id']!r}")


def _mean(values: Sequence[float]) -> float | None:
    """Arithmetic mean, None for an empty sequence (an accuracy over nothing is undefined)."""
    return sum(values) / len(values) if values else None


def _judge_rows(rows: list[dict[str, Any]], judge: Judge) -> None:
    """Ask the judge about every row in one batched call and store output and grade in the rows."""
    prompts = [judge_prompt(r["question"], r["answers"], r["prediction"]) for r in rows]
    outputs = judge(prompts)
    if len(outputs) != len(prompts):
        raise ValueError(f"judge returned {len(outputs)} completions for {len(prompts)} prompts")
    for row, output in zip(rows, outputs):
        row["judge_output"] = output
        row["judge_grade"] = parse_grade(output)


def _accuracy_fields(rows: Sequence[dict[str, Any]], judged: bool) -> dict[str, Any]:
    """n, match accuracy, token F1 and (when judged) judge accuracy over parseable grades for a
    group of rows."""
    fields: dict[str, Any] = {
        "n": len(rows),
        "match_accuracy": _mean([float(r["match"]) for r in rows]),
        "f1": _mean([r["f1"] for r in rows]),
    }
    if judged:
        grades = [r["judge_grade"] for r in rows if r["judge_grade"] is not None]
        fields["judge_accuracy"] = _mean([float(g) for g in grades])
        fields["judge_unparseable"] = len(rows) - len(grades)
    return fields


def evaluate(
    questions: Sequence[dict],
    predictions: Sequence[dict],
    judge: Judge | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Score predictions against test questions; return (summary, per-question rows).

    ``questions`` rows: {"question", "answers", "doc_id"?}; ``predictions`` rows:
    {"question", "prediction", "doc_id"?}, same order. ``judge`` maps a list of
    prompts to a list of completions. The summary holds n, match_accuracy, f1,
    by_doc ({doc_id: {"n", "match_accuracy", "f1", ...}}, rows without a doc_id are
    left out of it) and, when judged, judge_accuracy over parseable grades only
    (None if there are none) and judge_unparseable, as in the paper.
    """
    _check_rows(questions, predictions)
    rows: list[dict[str, Any]] = []
    for q, p in zip(questions, predictions):
        prediction = p["prediction"]
        row: dict[str, Any] = {"question": q["question"], "answers": list(q["answers"])}
        if "doc_id" in q:
            row["doc_id"] = q["doc_id"]
        row["prediction"] = prediction
        row["match"] = match(prediction, q["answers"])
        row["f1"] = token_f1(prediction, q["answers"])
        rows.append(row)

    judged = judge is not None
    if judged:
        _judge_rows(rows, judge)

    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if "doc_id" in row:
            groups[str(row["doc_id"])].append(row)

    summary = _accuracy_fields(rows, judged)
    summary["by_doc"] = {doc: _accuracy_fields(group, judged) for doc, group in groups.items()}
    return summary, rows


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Aligned plain-text columns: the first left-aligned (a name), the others right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                      for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
            for row in [header, *rows]]


def _score_cells(fields: dict[str, Any], judged: bool) -> list[str]:
    cells = [str(fields["n"]), _percent(fields["match_accuracy"]), _percent(fields.get("f1"))]
    if judged:
        cells += ([_percent(fields["judge_accuracy"]), str(fields["judge_unparseable"])]
                  if "judge_accuracy" in fields else ["-", "-"])
    return cells


def format_table(summaries: dict[str, dict[str, Any]], by_doc: bool = False) -> str:
    """The scores as plain-text tables: one row per predictions file (label -> ``evaluate``'s
    summary): n, match accuracy, token F1 and, when any was judged, judge accuracy and the grades
    it could not read; with ``by_doc``, then one table per file with a row per document."""
    judged = any("judge_accuracy" in s for s in summaries.values())
    score_header = ["n", "match", "token F1"] + (["judge", "unparsed"] if judged else [])
    lines = _table(["predictions", *score_header],
                   [[label, *_score_cells(s, judged)] for label, s in summaries.items()])
    if by_doc:
        for label, s in summaries.items():
            lines += ["", f"{label}, by document:"]
            if not s["by_doc"]:
                lines.append("(no question has a doc_id)")
                continue
            lines += _table(["doc_id", *score_header],
                            [[doc, *_score_cells(fields, judged)] for doc, fields in s["by_doc"].items()])
    return "\n".join(lines)


def write_results(
    out_dir: str | os.PathLike, summary: dict[str, Any], rows: Sequence[dict[str, Any]]
) -> None:
    """Write ``results.json`` and ``per_question.jsonl`` under out_dir, each atomically.

    Atomic writes mean an interrupted evaluation never leaves a truncated
    results file that a later comparison would silently read.
    """
    out = Path(out_dir)
    write_text_atomic(out / "results.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    write_jsonl_atomic(out / "per_question.jsonl", rows)


def coverage(questions: Sequence[dict], training_rows: Sequence[dict]) -> dict[str, Any]:
    """How many test questions have an accepted answer inside their document's training answers.

    A test fact that no generated training answer mentions was never taught, so
    a wrong prediction there says nothing about whether distillation works.
    Returns {"by_doc": {doc_id: {"n_questions", "covered"}}, "n_questions",
    "covered", "fraction"}; doc ids are strings, as in ``evaluate``'s by_doc.
    """
    answers_by_doc: dict[str, list[str]] = defaultdict(list)
    for row in training_rows:
        answers_by_doc[str(row["doc_id"])].append(normalize_answer(str(row["answer"])))

    by_doc: dict[str, dict[str, int]] = {}
    for i, q in enumerate(questions, start=1):
        if "doc_id" not in q:
            raise ValueError(f"row {i}: coverage needs a doc_id on every question")
        doc = str(q["doc_id"])
        taught = answers_by_doc.get(doc, [])
        covered = any(ans in text for ans in _nonempty_normalized(q["answers"]) for text in taught)
        counts = by_doc.setdefault(doc, {"n_questions": 0, "covered": 0})
        counts["n_questions"] += 1
        counts["covered"] += int(covered)

    n_questions = sum(c["n_questions"] for c in by_doc.values())
    n_covered = sum(c["covered"] for c in by_doc.values())
    return {
        "by_doc": by_doc,
        "n_questions": n_questions,
        "covered": n_covered,
        "fraction": n_covered / n_questions if n_questions else None,
    }


def exposures(questions: Sequence[dict], training_rows: Sequence[dict],
              epochs: float = 1) -> dict[str, Any]:
    """How many times training showed each test question's fact.

    A question's count is the number of training rows of its document whose answer contains one
    of its accepted answers (normalised, as in ``coverage``; a row counts once however many
    answers it contains), times ``epochs``: every epoch shows every row once. Storing a fact takes
    many exposures, so this says how far a recipe is from enough. Returns {"by_question": [count
    per question, in order], "n_questions", "mean" (over questions), "covered" (questions with a
    count > 0), "fraction"}; mean and fraction are None without questions.
    """
    answers_by_doc: dict[str, list[str]] = defaultdict(list)
    for row in training_rows:
        answers_by_doc[str(row["doc_id"])].append(normalize_answer(str(row["answer"])))
    counts = []
    for i, q in enumerate(questions, start=1):
        if "doc_id" not in q:
            raise ValueError(f"row {i}: exposures needs a doc_id on every question")
        accepted = _nonempty_normalized(q["answers"])
        taught = answers_by_doc.get(str(q["doc_id"]), [])
        counts.append(epochs * sum(any(ans in text for ans in accepted) for text in taught))
    covered = sum(c > 0 for c in counts)
    return {
        "by_question": counts,
        "n_questions": len(counts),
        "mean": sum(counts) / len(counts) if counts else None,
        "covered": covered,
        "fraction": covered / len(counts) if counts else None,
    }

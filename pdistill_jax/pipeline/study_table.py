"""OUT/results.md of a study: one Markdown table of its rows (OUT/results.jsonl), rebuilt whole
every run, with the base model's baselines for each question set the rows were measured on."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from pdistill_jax.files import write_text_atomic

HEADER = ("name", "objective", "settings (vs base)", "docs", "rows", "steps", "epochs",
          "exposures/fact", "train s", "answer s", "closed-book", "with document", "retention",
          "coverage")
INTRO = """# Knowledge-injection study

Each variant trains on the generated rows and answers the held-out test questions closed-book
(greedy, normalized match) and the retention questions. train s: the wall time of the training
call that finished it (a resumed training: its last part). exposures/fact: for each test question,
the training rows of its document whose answer contains one of its accepted answers, times the
epochs (mean over the test questions); coverage: the test questions with at least one such row.
The base model answers once per question set: closed-book, and with the gold document in its
prompt (RAG gold). with document: the variant's adapter with the gold document in its prompt
(PD + RAG gold), when the study's `with_document` is on. docs: the first N documents only
(`--docs N`), else all.
"""


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _number(value, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _settings(changes: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in changes.items()) or "(base)"


def table_lines(rows: Sequence[dict]) -> list[str]:
    """The table: the baselines of each question set (in the order rows first use it), then
    one line per row in file order."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    seen = set()
    for row in rows:
        if row["baselines"] in seen:
            continue
        seen.add(row["baselines"])
        docs = _number(row["docs"]) if row["docs"] is not None else "all"
        for label, closed, retention in (("base model", row["base_closed_book"], row["base_retention"]),
                                         ("RAG (gold)", row["rag_gold"], None)):
            lines.append(f"| {label} | - | - | {docs} | - | - | - | - | - | - | "
                         f"{_percent(closed)} | - | {_percent(retention)} | - |")
    for row in rows:
        docs = _number(row["docs"]) if row["docs"] is not None else "all"
        lines.append("| " + " | ".join([
            row["name"], row["objective"], _settings(row["changes"]), docs, str(row["rows"]),
            _steps(row), str(row["epochs"]), _number(row["exposures_per_fact"], 1),
            _number(row["train_wall_s"]), _number(row["answer_wall_s"]),
            _percent(row["closed_book"]), _percent(row.get("with_document")),
            _percent(row["retention"]), _percent(row["coverage"]),
        ]) + " |")
    return lines


SEEDS_INTRO = """
## Across seeds

Each variant trained with several seeds (the study's `seeds`; its rows above are
<name>-seed<k>): the mean over them, and the lowest and highest in brackets. A difference
between two variants within these ranges is the seed's, not the variant's.
"""
SEEDS_HEADER = ("variant", "seeds", "closed-book", "with document", "retention", "train s")


def _seed(row: dict):
    """The row's train seed (rows written before they carried "seed" have it in "train")."""
    return row["seed"] if "seed" in row else (row.get("train") or {}).get("seed")


def seed_groups(rows: Sequence[dict]) -> list[tuple[str, list[dict]]]:
    """(variant, its rows in seed order) of the rows named <variant>-seed<k> (k their train
    seed): one group per variant and baselines (a --docs subset is its own), two seeds or more."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        suffix = f"-seed{_seed(row)}"
        if row["name"].endswith(suffix) and len(row["name"]) > len(suffix):
            groups.setdefault((row["name"][:-len(suffix)], row["baselines"]), []).append(row)
    return [(name, sorted(group, key=_seed)) for (name, _), group in groups.items() if len(group) > 1]


def _spread(values: list, digits: int = 1, percent: bool = True) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    scale, unit = (100, "%") if percent else (1, "")
    mean, low, high = (scale * x for x in (sum(values) / len(values), min(values), max(values)))
    return f"{mean:.{digits}f}{unit} ({low:.{digits}f}–{high:.{digits}f})"


def seed_lines(rows: Sequence[dict]) -> list[str]:
    """One line per variant of `seed_groups`: mean (lowest–highest) of each score."""
    groups = seed_groups(rows)
    if not groups:
        return []
    lines = ["| " + " | ".join(SEEDS_HEADER) + " |", "|" + "---|" * len(SEEDS_HEADER)]
    for name, group in groups:
        lines.append("| " + " | ".join([
            name, ", ".join(str(_seed(r)) for r in group),
            _spread([r["closed_book"] for r in group]),
            _spread([r.get("with_document") for r in group]),
            _spread([r["retention"] for r in group]),
            _spread([r["train_wall_s"] for r in group], 0, percent=False)]) + " |")
    return lines


def write_table(path: Path, rows: Sequence[dict]) -> None:
    seeds = seed_lines(rows)
    text = INTRO + "\n" + "\n".join(table_lines(rows)) + "\n"
    if seeds:
        text += SEEDS_INTRO + "\n" + "\n".join(seeds) + "\n"
    write_text_atomic(path, text)


def _steps(row: dict) -> str:
    """The steps run; with a dev set, the step whose adapter was kept (the lowest dev loss)."""
    dev = row.get("dev")
    if not dev:
        return str(row["steps"])
    return f"{row['steps']} (kept {dev['best_step']}" + (", stopped early)" if dev["stopped_early"] else ")")

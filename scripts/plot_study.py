"""The knowledge-injection picture: closed-book accuracy against exposures per fact, and
retention beside it, from one or more study results files (scripts/study_injection.py).

  python scripts/plot_study.py runs/study/demo_levers/results.jsonl [more.jsonl ...]
                               --out docs/figures/injection.png [--all-docs-only] [--numbered]

PD variants (objective kl, reverse_kl, jsd) are blue circles, SFT (ce) orange squares, each
labelled with its name (--numbered: with its row number, counted from 1 over the files in
order, for a figure with too many variants to name; the key is then a table beside it); the base
model closed-book and RAG(gold) of the first file's full-corpus baselines are horizontal lines
(retention: the base model's).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="study results.jsonl files")
    parser.add_argument("--out", required=True, help="the PNG to write")
    parser.add_argument("--all-docs-only", action="store_true",
                        help="leave out rows measured on a --docs subset")
    parser.add_argument("--numbered", action="store_true",
                        help="label each point with its row number instead of its name")
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for f in args.results for line in Path(f).read_text().splitlines()
            if line.strip()]
    for n, r in enumerate(rows, 1):
        r["label"] = str(n) if args.numbered else r["name"]
    if args.all_docs_only:
        rows = [r for r in rows if r["docs"] is None]
    if not rows:
        raise SystemExit("plot_study.py: no rows to plot")
    fig, (ax, ax_r) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    base = rows[0]
    for axis, key, lines in ((ax, "closed_book", (("RAG (gold)", base["rag_gold"], "#2a9d4a"),
                                                  ("base model", base["base_closed_book"], "#777777"))),
                             (ax_r, "retention", (("base model", base["base_retention"], "#777777"),))):
        for label, value, color in lines:
            if value is not None:
                axis.axhline(100 * value, color=color, ls="--", lw=1)
                axis.annotate(label, (0.01, 100 * value + 1), xycoords=("axes fraction", "data"),
                              color=color, fontsize=8)
        placed: dict[tuple[float, float], int] = {}  # labels of one point go one under another
        for r in rows:
            if r.get(key) is None:
                continue
            sft = r["objective"] == "ce"
            axis.scatter(r["exposures_per_fact"], 100 * r[key], marker="s" if sft else "o",
                         color="#d98c3a" if sft else "#3a7dd9", zorder=3)
            point = (round(r["exposures_per_fact"], 2), round(100 * r[key], 1))
            below = placed.get(point, 0)
            placed[point] = below + 1
            axis.annotate(r["label"], (r["exposures_per_fact"], 100 * r[key]), fontsize=7,
                          xytext=(3, 3 - 9 * below) if not args.numbered else (4, -3 + 7 * below),
                          textcoords="offset points")
        axis.set_xlabel("training exposures per test fact (mean)")
        axis.set_ylim(0, 100)
    ax.set_ylabel("closed-book accuracy (%)")
    ax.set_title("PD (circles) and SFT (squares): facts recalled closed-book", fontsize=10)
    ax_r.set_ylabel("retention accuracy (%)")
    ax_r.set_title("general questions the base model answers", fontsize=10)
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(out)
    print(f"plot_study.py: {len(rows)} rows -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`pdistill run CONFIG`: the whole experiment, resumable stage by stage.

generate -> train PD -> train SFT -> answer (closed-book base/SFT/PD, RAG gold/BM25, PD+RAG)
-> evaluate -> report.md + results.png. Every stage writes its output atomically and is skipped
when that output exists, so rerunning an interrupted run continues where it stopped.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from importlib import resources
from pathlib import Path

import yaml

from .config import TrainConfig, check_range, coerce_fields, from_dict, load_yaml, to_dict
from .generate import GenerateConfig
from .jsonl import read_jsonl, write_jsonl_atomic, write_text_atomic

BUILTIN = "builtin:"  # paths inside the installed package's assets, e.g. builtin:demo/documents.jsonl


@dataclasses.dataclass(frozen=True)
class RunConfig:
    out: str = "runs/demo"
    model: str = "smollm2-135m-instruct"
    documents: str = BUILTIN + "demo/documents.jsonl"
    questions: str = BUILTIN + "demo/questions.jsonl"  # held-out test questions, never trained on
    retention_questions: str | None = BUILTIN + "demo/general_knowledge.jsonl"
    generate: GenerateConfig = dataclasses.field(default_factory=GenerateConfig)
    pd: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    sft: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(objective="ce"))
    max_new_tokens: int = 48
    answer_batch_size: int = 16
    bm25_top_k: int = 3
    judge: str | None = None  # a model to grade answers as an LLM judge (slow on CPU)
    # The system message of every stage (questions, teacher answers, both trainings, answering):
    # the method uses one everywhere. None = the chat template's default.
    system: str | None = None

    def __post_init__(self):
        coerce_fields(self)
        for name in ("max_new_tokens", "answer_batch_size", "bm25_top_k"):
            check_range(self, name, 1)
        for name, cls in (("generate", GenerateConfig), ("pd", TrainConfig), ("sft", TrainConfig)):
            value = getattr(self, name)
            if isinstance(value, dict):
                value = from_dict(cls, value, name)
            if value.system is not None and value.system != self.system:
                raise ValueError(f"{name}.system is set: set `system` once, at the top level of the "
                                 "run config, so every stage uses the same system message")
            object.__setattr__(self, name, dataclasses.replace(value, system=self.system))
        if self.sft.objective != "ce":
            raise ValueError(f"sft.objective={self.sft.objective!r}: the SFT baseline trains with ce")


def resolve_path(spec: str, config_dir: Path | None = None) -> Path:
    if spec.startswith(BUILTIN):
        return Path(str(resources.files("pdistill_jax") / "assets" / spec[len(BUILTIN):]))
    path = Path(spec).expanduser()
    if not path.is_absolute() and config_dir is not None and not path.exists():
        path = config_dir / path
    return path


def load_run_config(path: str | Path) -> RunConfig:
    return load_yaml(RunConfig, path)


# name -> (adapter: None | "pd" | "sft", context, question set)
CONDITIONS = {
    "base_closed_book": (None, "none", "test"),
    "rag_gold": (None, "gold", "test"),
    "rag_bm25": (None, "bm25", "test"),
    "sft_closed_book": ("sft", "none", "test"),
    "pd_closed_book": ("pd", "none", "test"),
    "pd_rag_gold": ("pd", "gold", "test"),
    "pd_rag_bm25": ("pd", "bm25", "test"),
    "retention_base": (None, "none", "retention"),
    "retention_pd": ("pd", "none", "retention"),
}


def _log(msg: str) -> None:
    print(f"[pdistill run] {msg}", file=sys.stderr, flush=True)


def run(cfg: RunConfig, config_dir: Path | None = None) -> dict:
    from .load import reuse_loaded_checkpoints

    with reuse_loaded_checkpoints():  # every stage loads the same base model: read it once
        return _run(cfg, config_dir)


def _run(cfg: RunConfig, config_dir: Path | None) -> dict:
    from .answer import answer_questions
    from .evaluate import coverage, evaluate, write_results
    from .generate import generate_data
    from .load import load_model
    from .peft_io import load_adapter_model
    from .sample import SamplingParams
    from .train import train

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "run_config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    docs_path = resolve_path(cfg.documents, config_dir)
    tests = read_jsonl(resolve_path(cfg.questions, config_dir))
    retention = (read_jsonl(resolve_path(cfg.retention_questions, config_dir))
                 if cfg.retention_questions else [])
    docs = read_jsonl(docs_path)
    timings: dict[str, float] = {}

    def stage(name: str, done: bool, fn):
        if done:
            _log(f"{name}: done already, skipped")
            return
        _log(f"{name}: running")
        t0 = time.perf_counter()
        fn()
        timings[name] = round(time.perf_counter() - t0, 1)
        _log(f"{name}: finished in {timings[name]} s")

    data_dir = out / "data"
    stage("generate", (data_dir / "manifest.json").exists() and _generation_complete(data_dir),
          lambda: generate_data(cfg.model, docs_path, data_dir, cfg.generate))
    for kind, tcfg in (("pd", cfg.pd), ("sft", cfg.sft)):
        run_dir = out / f"train_{kind}"
        stage(f"train_{kind}", (run_dir / "adapter" / "adapter_config.json").exists(),
              lambda run_dir=run_dir, tcfg=tcfg: train(
                  cfg.model, data_dir, run_dir, tcfg,
                  resume=(run_dir / "checkpoints").exists()))

    sampling = SamplingParams(max_new_tokens=cfg.max_new_tokens)
    pred_dir = out / "predictions"
    loaded: dict = {}

    def model_for(adapter):
        if adapter not in loaded:
            loaded.clear()  # one model in memory at a time
            loaded[adapter] = (load_model(cfg.model) if adapter is None else
                               load_adapter_model(cfg.model, out / f"train_{adapter}"))
        return loaded[adapter]

    results = {}
    # Grouped by model (stable sort), so each model is built once.
    by_model = sorted(CONDITIONS.items(), key=lambda item: (None, "sft", "pd").index(item[1][0]))
    for name, (adapter, context, qset) in by_model:
        questions = tests if qset == "test" else retention
        if not questions:
            continue
        pred_path = pred_dir / f"{name}.jsonl"

        def answer(name=name, adapter=adapter, context=context, questions=questions, pred_path=pred_path):
            rows = answer_questions(model_for(adapter), questions, docs=docs, context=context,
                                    top_k=cfg.bm25_top_k, system=cfg.system, sampling=sampling,
                                    batch_size=cfg.answer_batch_size, use_lora=adapter is not None,
                                    source=name)
            write_jsonl_atomic(pred_path, rows)

        stage(f"answer {name}", pred_path.exists(), answer)
        eval_dir = out / "eval" / name
        stage(f"evaluate {name}", (eval_dir / "results.json").exists(),
              lambda questions=questions, pred_path=pred_path, eval_dir=eval_dir: write_results(
                  eval_dir, *evaluate(questions, read_jsonl(pred_path), None)))
        results[name] = json.loads((eval_dir / "results.json").read_text())

    results = {name: results[name] for name in CONDITIONS if name in results}  # report order
    if cfg.judge:
        _judge_all(cfg, out, tests, retention, results)
    cover = coverage(tests, read_jsonl(data_dir / "qa.jsonl"))
    write_text_atomic(out / "coverage.json", json.dumps(cover, indent=2) + "\n")
    summary = summarize(results, cover, out)
    summary["timings_s"] = timings
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    write_report(out, cfg, summary, results, cover)
    _log(f"report: {out / 'report.md'}")
    return summary


def _generation_complete(data_dir: Path) -> bool:
    return bool(json.loads((data_dir / "manifest.json").read_text()).get("complete"))


def _judge_all(cfg: RunConfig, out: Path, tests, retention, results) -> None:
    from .evaluate import evaluate, write_results
    from .judge import local_judge

    judge = local_judge(cfg.judge)
    for name, (_, _, qset) in CONDITIONS.items():
        eval_dir = out / "eval_judge" / name
        questions = tests if qset == "test" else retention
        if not questions:
            continue
        if not (eval_dir / "results.json").exists():
            write_results(eval_dir, *evaluate(questions, read_jsonl(out / "predictions" / f"{name}.jsonl"),
                                              judge))
        results[name]["judge"] = json.loads((eval_dir / "results.json").read_text())


def summarize(results: dict, cover: dict, out: Path) -> dict:
    acc = {name: r["match_accuracy"] for name, r in results.items()}
    checks = {}
    if {"base_closed_book", "pd_closed_book", "sft_closed_book", "rag_gold", "pd_rag_gold"} <= set(acc):
        checks = {
            "closed-book base <= 10%": acc["base_closed_book"] <= 0.10,
            "PD closed-book >= 0.8 x RAG(gold)": acc["pd_closed_book"] >= 0.8 * acc["rag_gold"],
            "PD >= SFT + 10 points": acc["pd_closed_book"] >= acc["sft_closed_book"] + 0.10,
            "PD+RAG(gold) >= RAG(gold)": acc["pd_rag_gold"] >= acc["rag_gold"],
        }
    return {"match_accuracy": acc, "acceptance": checks,
            "coverage": {k: v for k, v in cover.items() if k != "by_doc"}}


def write_report(out: Path, cfg: RunConfig, summary: dict, results: dict, cover: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = summary["match_accuracy"]
    names = [n for n in CONDITIONS if n in acc and not n.startswith("retention")]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    bars = ax.bar(range(len(names)), [100 * acc[n] for n in names],
                  color=["#999999" if CONDITIONS[n][0] is None else
                         "#d98c3a" if CONDITIONS[n][0] == "sft" else "#3a7dd9" for n in names])
    ax.bar_label(bars, fmt="%.0f")
    ax.set_xticks(range(len(names)), [n.replace("_", "\n") for n in names], fontsize=8)
    ax.set_ylabel("accuracy (%, normalized match)")
    ax.set_ylim(0, 105)
    ax.set_title(f"{cfg.model}: {results[names[0]]['n']} held-out questions")
    fig.tight_layout()
    tmp = out / ".results.png.tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(out / "results.png")

    lines = [f"# Prompt distillation report: {cfg.model}", "",
             "Accuracy = normalized answer is a substring of the prediction (SQuAD normalization).", "",
             "| condition | adapter | context | accuracy | token F1 | n |", "|---|---|---|---|---|---|"]
    for name, (adapter, context, _) in CONDITIONS.items():
        if name in results:
            r = results[name]
            judge = f" (judge {100 * r['judge']['judge_accuracy']:.1f}%)" if "judge" in r and \
                r["judge"].get("judge_accuracy") is not None else ""
            lines.append(f"| {name} | {adapter or 'none'} | {context} | {100 * r['match_accuracy']:.1f}%{judge}"
                         f" | {r['f1']:.3f} | {r['n']} |")
    lines += ["", "![results](results.png)", "", "## Acceptance", ""]
    lines += [f"- {'PASS' if ok else 'FAIL'}: {check}" for check, ok in summary["acceptance"].items()]
    lines += ["", "## Coverage of test facts by the generated training answers", "",
              "A test question is covered when one of its accepted answers appears in some generated "
              "answer for its document: uncovered facts were never taught; covered but missed facts "
              "were taught and not stored.", "", "| doc | test questions | covered | PD correct |",
              "|---|---|---|---|"]
    pd_rows = read_jsonl(out / "eval" / "pd_closed_book" / "per_question.jsonl") \
        if (out / "eval" / "pd_closed_book" / "per_question.jsonl").exists() else []
    pd_correct: dict[str, int] = {}
    for row in pd_rows:
        pd_correct[str(row.get("doc_id"))] = pd_correct.get(str(row.get("doc_id")), 0) + int(row["match"])
    for doc, c in sorted(cover["by_doc"].items()):
        lines.append(f"| {doc} | {c['n_questions']} | {c['covered']} | {pd_correct.get(doc, 0)} |")
    lines += ["", f"Timings (s): {json.dumps(summary.get('timings_s', {}))}", ""]
    write_text_atomic(out / "report.md", "\n".join(lines))

"""`pdistill run CONFIG`: the whole experiment, resumable stage by stage.

generate -> train PD -> train SFT -> answer (closed-book base/SFT/PD, RAG gold/BM25, PD+RAG)
-> evaluate (-> judge) -> report.md + results.png.

Every stage records, beside its output, the settings and inputs it was made from (`stages.py`).
A rerun skips a stage whose record matches, continues one that was interrupted, and redoes one
whose settings changed together with every stage after it, deleting the old output first so
that results of two configs are never mixed; outputs without a record (an older pdistill) are
refused. `run_config.yaml` is written after those checks, so it always describes the outputs
beside it, and the report is rebuilt from the stages' results at the end.

Results-neutral settings (RESULTS_NEUTRAL), left out of the records so that changing them redoes
nothing:
- `answer_batch_size`: answers are greedy, and a row's answer does not depend on the other rows
  of its batch (padding is masked; the sampler keys are per row);
- `generate.teacher_states_gb`: how many of the teacher's hidden states generation keeps for
  training to reuse; training computes the others itself (equal to float rounding);
- `pd.*` / `sft.*` `mesh`, `remat`, `teacher_cache_gb`, `save_every`, `keep_checkpoints`,
  `log_every`: the device layout, recomputation, caching of the teacher's states and
  bookkeeping; the same optimisation to float rounding (a resumed training may change them too).
  `compute_dtype` does change results and is not among them.
`out` is where the results go, not what they are. Every other field counts.
"""
from __future__ import annotations

import json
import sys
from importlib import resources
from pathlib import Path

import yaml

from pdistill_jax.config import BUILTIN, RunConfig, load_yaml, to_dict
from pdistill_jax.files import read_jsonl, write_jsonl_atomic, write_text_atomic
from pdistill_jax.pipeline.stages import CONTINUE, DONE, REDO, Stage, clear, execute, plan, read_record

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


TRAIN_NEUTRAL = ("mesh", "remat", "teacher_cache_gb", "save_every", "keep_checkpoints", "log_every")
RESULTS_NEUTRAL = ("answer_batch_size", "generate.teacher_states_gb",
                   *(f"{kind}.{name}" for kind in ("pd", "sft") for name in TRAIN_NEUTRAL))
REPORT_FILES = ("report.md", "summary.json", "results.png", "coverage.json")


def _log(msg: str) -> None:
    print(f"[pdistill run] {msg}", file=sys.stderr, flush=True)


def _fields(prefix: str, cfg) -> dict:
    """A stage config's fields that decide results, flat ("pd.lora.rank": 32). `system` is left
    out: it is the run's, recorded once per stage as `system`."""
    flat = {}

    def walk(path: str, value) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{path}.{key}", item)
        else:
            flat[path] = value

    walk(prefix, {k: v for k, v in to_dict(cfg).items() if k != "system"})
    return {k: v for k, v in flat.items() if k not in RESULTS_NEUTRAL}


def answer_order() -> list[tuple[str, tuple]]:
    """CONDITIONS grouped by model (stable), so each model is built once."""
    return sorted(CONDITIONS.items(), key=lambda item: (None, "sft", "pd").index(item[1][0]))


def build_stages(cfg: RunConfig, out: Path, ids: dict[str, str]) -> list[Stage]:
    """Every stage in the order it runs, with the settings and inputs that decide its result.

    ids: "model.weights", "documents.sha256" and, for each question set that has questions,
    "questions.sha256" / "retention_questions.sha256"; "judge.weights" with a judge.
    """
    model = {"model": cfg.model, "model.weights": ids["model.weights"], "system": cfg.system}
    generate = Stage("generate", out / "data", {**model, "documents.sha256": ids["documents.sha256"],
                                                **_fields("generate", cfg.generate)})
    stages = [generate]
    trained = {}
    for kind in ("pd", "sft"):
        trained[kind] = Stage(f"train_{kind}", out / f"train_{kind}",
                              {**model, **_fields(kind, getattr(cfg, kind))},
                              {generate.name: generate.fingerprint})
        stages.append(trained[kind])
    answers = []
    for name, (adapter, context, qset) in answer_order():
        qkey = "questions.sha256" if qset == "test" else "retention_questions.sha256"
        if qkey not in ids:
            continue
        settings = {**model, "max_new_tokens": cfg.max_new_tokens, qkey: ids[qkey]}
        if context != "none":
            settings["documents.sha256"] = ids["documents.sha256"]
        if context == "bm25":
            settings["bm25_top_k"] = cfg.bm25_top_k
        inputs = {} if adapter is None else {trained[adapter].name: trained[adapter].fingerprint}
        answer = Stage(f"answer {name}", out / "predictions" / f"{name}.jsonl", settings, inputs)
        answers.append((name, answer, qkey))
        stages += [answer, Stage(f"evaluate {name}", out / "eval" / name, {qkey: ids[qkey]},
                                 {answer.name: answer.fingerprint})]
    if cfg.judge:
        judge = {"judge": cfg.judge, "judge.weights": ids["judge.weights"]}
        stages += [Stage(f"judge {name}", out / "eval_judge" / name, {**judge, qkey: ids[qkey]},
                         {answer.name: answer.fingerprint}) for name, answer, qkey in answers]
    return stages


def run(cfg: RunConfig, config_dir: Path | None = None, *, progress: bool = True) -> dict:
    """Runs (or continues) the experiment into cfg.out; returns the summary. progress: tqdm bars
    on stderr for generation, training and every answering stage."""
    from pdistill_jax.weights.load import reuse_loaded_checkpoints

    with reuse_loaded_checkpoints():  # every stage loads the same base model: read it once
        return _run(cfg, config_dir, progress)


def _input_ids(cfg: RunConfig, docs: Path, questions: Path | None, retention: Path | None) -> dict:
    """What build_stages needs to know of the inputs: the identity of the model's weights and the
    sha256 of each file read (a question set without questions: None, no stages)."""
    from pdistill_jax.weights.registry import resolve_model
    from pdistill_jax.train.teacher_cache import model_fingerprint
    from pdistill_jax.train.run_folder import file_sha256

    ids = {"model.weights": model_fingerprint(resolve_model(cfg.model)),
           "documents.sha256": file_sha256(docs)}
    if questions is not None:
        ids["questions.sha256"] = file_sha256(questions)
    if retention is not None:
        ids["retention_questions.sha256"] = file_sha256(retention)
    if cfg.judge:
        ids["judge.weights"] = model_fingerprint(resolve_model(cfg.judge))
    return ids


def _run(cfg: RunConfig, config_dir: Path | None, progress: bool) -> dict:
    from tqdm import tqdm

    from pdistill_jax.infer.answer import answer_questions
    from pdistill_jax.infer.evaluate import coverage, evaluate, write_results
    from pdistill_jax.datagen.generate import generate_data
    from pdistill_jax.infer.judge import local_judge
    from pdistill_jax.weights.load import load_model
    from pdistill_jax.weights.peft import load_adapter_model
    from pdistill_jax.config import SamplingParams
    from pdistill_jax.train.loop import train

    out = Path(cfg.out)
    docs_path = resolve_path(cfg.documents, config_dir)
    questions_path = resolve_path(cfg.questions, config_dir)
    retention_path = (resolve_path(cfg.retention_questions, config_dir)
                      if cfg.retention_questions else None)
    tests = read_jsonl(questions_path)
    retention = read_jsonl(retention_path) if retention_path else []
    docs = read_jsonl(docs_path)
    question_sets = {"test": tests, "retention": retention}
    stages = build_stages(cfg, out, _input_ids(cfg, docs_path, questions_path if tests else None,
                                               retention_path if retention else None))

    status, changes = plan(stages, out)  # refuses outputs it cannot check, before any change
    for line in changes:
        _log(line)
    for stage in stages:
        if status[stage.name] == REDO:
            clear(stage)
    if any(s != DONE for s in status.values()):
        for name in REPORT_FILES:  # the report of the old outputs would outlive them
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    # Only now: every output left in `out` was made with these settings or is about to be redone.
    write_text_atomic(out / "run_config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))

    data_dir = out / "data"
    sampling = SamplingParams(max_new_tokens=cfg.max_new_tokens)
    loaded: dict = {}
    judges: list = []

    def model_for(adapter):
        if adapter not in loaded:
            loaded.clear()  # one model in memory at a time
            loaded[adapter] = (load_model(cfg.model) if adapter is None else
                               load_adapter_model(cfg.model, out / f"train_{adapter}"))
        return loaded[adapter]

    def work(stage: Stage) -> None:
        kind, _, name = stage.name.partition(" ")
        if kind == "generate":
            generate_data(cfg.model, docs_path, data_dir, cfg.generate, show_progress=progress)
        elif kind.startswith("train_"):
            train(cfg.model, data_dir, stage.output, getattr(cfg, kind[len("train_"):]),
                  resume=stage.output.exists(), progress=progress)
        else:
            adapter, context, qset = CONDITIONS[name]
            questions = question_sets[qset]
            pred_path = out / "predictions" / f"{name}.jsonl"
            if kind == "answer":
                with tqdm(total=len(questions), desc=stage.name, unit="q", file=sys.stderr,
                          disable=not progress, dynamic_ncols=True) as bar:
                    rows = answer_questions(model_for(adapter), questions, docs=docs, context=context,
                                            top_k=cfg.bm25_top_k, system=cfg.system, sampling=sampling,
                                            batch_size=cfg.answer_batch_size,
                                            use_lora=adapter is not None, progress=bar.update,
                                            source=name)
                write_jsonl_atomic(pred_path, rows)
            elif kind == "evaluate":
                write_results(stage.output, *evaluate(questions, read_jsonl(pred_path), None))
            else:
                if not judges:
                    loaded.clear()
                    judges.append(local_judge(cfg.judge))
                write_results(stage.output, *evaluate(questions, read_jsonl(pred_path), judges[0]))

    for stage in stages:
        if status[stage.name] == DONE:
            _log(f"{stage.name}: done already, skipped")
            continue
        _log(f"{stage.name}: " + ("interrupted before, continuing it" if status[stage.name] == CONTINUE
                                  else "running"))
        seconds = execute(stage, lambda stage=stage: work(stage))
        _log(f"{stage.name}: finished in {seconds} s")

    results = {}
    for name in CONDITIONS:  # report order
        if question_sets[CONDITIONS[name][2]]:
            results[name] = json.loads((out / "eval" / name / "results.json").read_text())
            if cfg.judge:
                judged = out / "eval_judge" / name / "results.json"
                results[name]["judge"] = json.loads(judged.read_text())
    cover = coverage(tests, read_jsonl(data_dir / "qa.jsonl"))
    write_text_atomic(out / "coverage.json", json.dumps(cover, indent=2) + "\n")
    summary = summarize(results, cover, out)
    # the time each stage took when it was made, so an unchanged rerun rewrites the same report
    summary["timings_s"] = {s.name: (read_record(s) or {}).get("seconds") for s in stages}
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    write_report(out, cfg, summary, results, cover)
    _log(f"report: {out / 'report.md'}")
    return summary


def summarize(results: dict, cover: dict, out: Path) -> dict:
    """Accuracies and the acceptance checks. Each check compares with RAG(gold), the model
    answering with the document in its prompt: when that scores 0 the model answers nothing
    (a broken model, template or run) and no comparison means anything, so every check fails,
    the first one saying why."""
    acc = {name: r["match_accuracy"] for name, r in results.items()}
    checks = {}
    if {"base_closed_book", "pd_closed_book", "sft_closed_book", "rag_gold", "pd_rag_gold"} <= set(acc):
        rag = acc["rag_gold"]
        checks = {
            "RAG(gold) > 0 (the model answers from the document)": rag > 0,
            "closed-book base <= 10%": acc["base_closed_book"] <= 0.10,
            "PD closed-book >= 0.8 x RAG(gold)": acc["pd_closed_book"] >= 0.8 * rag,
            "PD >= SFT + 10 points": acc["pd_closed_book"] >= acc["sft_closed_book"] + 0.10,
            "PD+RAG(gold) >= RAG(gold)": acc["pd_rag_gold"] >= rag,
        }
        checks = {check: rag > 0 and ok for check, ok in checks.items()}
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

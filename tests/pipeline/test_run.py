"""`pdistill run`: the whole pipeline on a tiny model, its report, and stage-by-stage resume:
a rerun skips what its settings made, continues what was interrupted, and redoes what they no
longer made together with everything after it."""
import json
import shutil
from pathlib import Path

import pytest
import yaml

from pdistill_jax.infer import answer
from pdistill_jax.weights import load
from pdistill_jax.train import loop as train_module
from pdistill_jax.cli import main
from pdistill_jax.datagen.dataset import generation_system_message
from pdistill_jax.config import GenerateConfig
from pdistill_jax.config import TrainConfig
from pdistill_jax.pipeline.experiment import CONDITIONS, build_stages
from pdistill_jax.pipeline.report import summarize, write_report
from pdistill_jax.pipeline.run import load_run_config, resolve_path
from pdistill_jax.config import AcceptanceConfig, RunConfig, load_yaml
from test_generate import DOCS, train_question_writer

TESTS = [{"question": "What does the quick brown fox of Velloria jump over?", "answers": ["lazy dog"],
          "doc_id": "fox"},
         {"question": "Which colours are listed?", "answers": ["red"], "doc_id": "colours"},
         {"question": "Where does prompt distillation train a student?", "answers": ["Tarsk"],
          "doc_id": "teacher"}]
RETENTION = [{"question": "What colour is the sky?", "answers": ["blue"]}]
SYSTEM = "Answer with names and dates."


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    model = train_question_writer(root / "model")
    for name, rows in (("docs", DOCS), ("tests", TESTS), ("retention", RETENTION)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {
        "out": str(root / "out"), "model": str(model), "documents": "docs.jsonl",
        "questions": "tests.jsonl", "retention_questions": "retention.jsonl",
        "generate": {"questions_per_doc": 2, "max_calls_per_doc": 2, "max_question_tokens": 40,
                     "max_answer_tokens": 8, "batch_size": 8},
        "pd": {"epochs": 1, "batch_size": 2, "mesh": [1, 1, 1], "lora": {"rank": 4, "alpha": 8}},
        "sft": {"objective": "ce", "epochs": 1, "batch_size": 2, "mesh": [1, 1, 1],
                "lora": {"rank": 4, "alpha": 8}},
        "max_new_tokens": 6, "answer_batch_size": 4, "bm25_top_k": 1, "system": SYSTEM,
    }
    (root / "run.yaml").write_text(yaml.safe_dump(config))
    reads, answer_systems = [], set()
    with pytest.MonkeyPatch.context() as mp:
        real = load.load_checkpoint
        mp.setattr(load, "load_checkpoint", lambda path, dtype: reads.append(path) or real(path, dtype))
        real_prompt = answer.build_prompt
        mp.setattr(answer, "build_prompt", lambda tok, q, c, fmt, system: answer_systems.add(system)
                   or real_prompt(tok, q, c, fmt, system))
        assert main(["run", str(root / "run.yaml")]) == 0  # relative paths resolve beside the config
    assert len(reads) == 1  # generation, both trainings and every condition share one read
    assert answer_systems == {SYSTEM}
    return root


def test_run_writes_every_stage_and_a_report(run_dir):
    out = run_dir / "out"
    assert (out / "data" / "qa.jsonl").exists()
    for kind in ("pd", "sft"):
        assert (out / f"train_{kind}" / "adapter" / "adapter_config.json").exists()
    for name in CONDITIONS:
        rows = [json.loads(line) for line in (out / "predictions" / f"{name}.jsonl").read_text().splitlines()]
        assert len(rows) == (len(RETENTION) if name.startswith("retention") else len(TESTS))
        assert json.loads((out / "eval" / name / "results.json").read_text())["n"] == len(rows)
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["match_accuracy"]) == list(CONDITIONS)  # answered grouped by model, reported in order
    assert len(summary["acceptance"]) == 6
    assert set(summary["timings_s"]) == {"generate", "train_pd", "train_sft"} | {
        f"{kind} {name}" for kind in ("answer", "evaluate") for name in CONDITIONS}
    report = (out / "report.md").read_text()
    assert "| pd_closed_book | pd | none |" in report and "Coverage" in report
    # where the time went: tokens/s of each sampling stage, examples/s of each training
    rates = summary["throughput"]
    record = json.loads((out / "predictions" / "pd_closed_book.stage.json").read_text())
    assert rates["answer pd_closed_book"]["new_tokens"] == record["work"]["new_tokens"] > 0
    assert 0 < rates["answer pd_closed_book"]["batch_use"] <= 1
    assert rates["generate"]["new_tokens"] > 0 and "evaluate rag_gold" not in rates
    assert rates["train_pd"]["steps"] == json.loads((out / "train_pd" / "summary.json").read_text())["steps"]
    assert "## Time" in report and "| answer pd_closed_book |" in report and "tokens/s" in report
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cover = json.loads((out / "coverage.json").read_text())
    assert cover["n_questions"] == len(TESTS)
    # exposures per fact: the rows of each question's document holding its answer, x 1 epoch
    rows = [json.loads(line) for line in (out / "data" / "qa.jsonl").read_text().splitlines()]
    from pdistill_jax.infer.evaluate import normalize_answer
    want = sum(sum(normalize_answer(t["answers"][0]) in normalize_answer(r["answer"])
                   for r in rows if r["doc_id"] == t["doc_id"]) for t in TESTS) / len(TESTS)
    assert summary["exposures_per_fact"]["pd"] == round(want, 2)
    assert f"PD {round(want, 2):g} (1 epoch)" in report


def test_rerun_skips_finished_stages(run_dir, capsys):
    out = run_dir / "out"
    (out / "predictions" / "pd_closed_book.jsonl").unlink()  # as if killed during that stage
    before = (out / "predictions" / "rag_gold.jsonl").stat().st_mtime_ns
    assert main(["run", str(run_dir / "run.yaml"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "generate: done already, skipped" in err and "train_pd: done already, skipped" in err
    assert "answer pd_closed_book: running" in err and "answer rag_gold: done already" in err
    assert "answer pd_closed_book: 100%" not in err  # --no-progress: no bar
    assert (out / "predictions" / "pd_closed_book.jsonl").exists()
    assert (out / "predictions" / "rag_gold.jsonl").stat().st_mtime_ns == before


def test_one_system_message_reaches_every_stage(run_dir):
    out = run_dir / "out"
    assert json.loads((out / "data" / "manifest.json").read_text())["config"]["system"] == SYSTEM
    for kind in ("pd", "sft"):
        assert yaml.safe_load((out / f"train_{kind}" / "config.yaml").read_text())["train"]["system"] == SYSTEM


def test_answer_and_export_keep_to_the_adapters_system_message(run_dir, tmp_path, capsys, monkeypatch):
    """A student learned its answers under the run's system message: `pdistill answer --adapter`
    asks under the same one unless told otherwise, and `export` says which it was."""
    seen = []
    real_prompt = answer.build_prompt
    monkeypatch.setattr(answer, "build_prompt", lambda tok, q, c, fmt, system: seen.append(system)
                        or real_prompt(tok, q, c, fmt, system))
    adapter = run_dir / "out" / "train_pd"
    args = ["answer", "--model", str(run_dir / "model"), "--adapter", str(adapter),
            "--questions", str(run_dir / "tests.jsonl"), "--max-new-tokens", "2"]
    assert main(args + ["--out", str(tmp_path / "a.jsonl")]) == 0
    assert set(seen) == {SYSTEM} and "the one" in capsys.readouterr().err
    seen.clear()
    assert main(args + ["--out", str(tmp_path / "b.jsonl"), "--system", "Other."]) == 0
    assert set(seen) == {"Other."}
    assert main(["export", "--adapter", str(adapter / "adapter"), "--out", str(tmp_path / "peft")]) == 0
    assert f"trained with the system message {SYSTEM!r}" in capsys.readouterr().err


def test_train_on_generated_data_keeps_its_system_message(run_dir, tmp_path, capsys):
    out = tmp_path / "pd"
    assert main(["train", "--model", str(run_dir / "model"), "--data", str(run_dir / "out" / "data"),
                 "--out", str(out), "--epochs", "1", "--batch-size", "2", "--rank", "4",
                 "--mesh", "data=1", "--no-progress"]) == 0
    assert "the one" in capsys.readouterr().err
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["system"] == SYSTEM


def test_the_generated_system_message_is_found_from_the_folder_or_its_qa_file(run_dir, tmp_path):
    data = run_dir / "out" / "data"
    assert generation_system_message(data) == generation_system_message(data / "qa.jsonl") == SYSTEM
    (tmp_path / "rows.jsonl").write_text((data / "qa.jsonl").read_text())
    assert generation_system_message(tmp_path / "rows.jsonl") is None


def test_a_stage_with_its_own_system_message_is_refused(tmp_path, capsys):
    (tmp_path / "two.yaml").write_text("system: one\npd: {system: two}\n")
    assert main(["run", str(tmp_path / "two.yaml")]) == 2
    assert "pd.system is set: set `system` once, at the top level" in capsys.readouterr().err


def test_demo_config_resolves_its_builtin_corpus():
    cfg = load_run_config(Path(__file__).resolve().parents[2] / "configs" / "demo.yaml")
    for spec in (cfg.documents, cfg.questions, cfg.retention_questions):
        assert resolve_path(spec).exists(), spec
    assert cfg.sft.objective == "ce" and cfg.pd.objective == "kl"


def test_paper_config_is_the_authors_recipe():
    """configs/paper.yaml: the paper's 8B settings (../shared/notes/method.md), one flag away."""
    cfg = load_run_config(Path(__file__).resolve().parents[2] / "configs" / "paper.yaml")
    g, pd = cfg.generate, cfg.pd
    assert (g.q_temperature, g.a_temperature, g.sft_temperature, g.a_top_k) == (1.5, 1.5, 0.25, 50)
    assert (pd.objective, pd.tau, pd.lr, pd.weight_decay, pd.epochs, pd.batch_size) == (
        "kl", 2.0, 1e-5, 0.1, 10, 4)
    assert (pd.lora.rank, pd.lora.alpha, pd.compute_dtype) == (1024, 2048.0, "bfloat16")
    assert "lm_head" in pd.lora.targets and cfg.sft.lora == pd.lora and cfg.system is None


def test_bad_run_config_names_the_key(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("pd: {epochz: 3}\n")
    assert main(["run", str(tmp_path / "bad.yaml")]) == 2
    assert "unknown key(s) ['epochz']" in capsys.readouterr().err


def test_a_bad_acceptance_bar_is_one_line_naming_file_line_and_field(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"out: {tmp_path / 'out'}\nacceptance:\n  pd_of_rag: 2\n")
    assert main(["run", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"pdistill run: error: {bad}:3: acceptance.pd_of_rag must be in [0, 1], got 2.0"]
    assert not (tmp_path / "out").exists()  # refused before any stage wrote anything


# ------------------------------------------------ reruns after the config changed

BASE_STAGES = {"generate", "train_sft"} | {f"{kind} {name}" for kind in ("answer", "evaluate")
                                           for name, (adapter, _, _) in CONDITIONS.items() if adapter != "pd"}
PD_STAGES = {"train_pd"} | {f"{kind} {name}" for kind in ("answer", "evaluate")
                            for name, (adapter, _, _) in CONDITIONS.items() if adapter == "pd"}


def _config(run_dir: Path, path: Path, out: Path, **changes) -> str:
    """The shared run's config with another out and `changes` ({"pd__epochs": 2} sets pd.epochs)."""
    config = yaml.safe_load((run_dir / "run.yaml").read_text())
    config["out"] = str(out)
    for key in ("documents", "questions", "retention_questions"):
        config[key] = str(run_dir / config[key])
    for key, value in changes.items():
        *parents, last = key.split("__")
        node = config
        for parent in parents:
            node = node[parent]
        node[last] = value
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _copy_run(run_dir: Path, tmp_path: Path, **changes) -> tuple[str, Path]:
    """A copy of the shared run's outputs, and its config pointing at the copy, with changes."""
    out = tmp_path / "out"
    shutil.copytree(run_dir / "out", out)
    return _config(run_dir, tmp_path / "run.yaml", out, **changes), out


def _snapshot(out: Path) -> dict[str, bytes]:
    return {str(f.relative_to(out)): f.read_bytes() for f in sorted(out.rglob("*")) if f.is_file()}


def _stages_run(err: str) -> set[str]:
    lines = [line.removeprefix("pdistill run: ") for line in err.splitlines()]
    return {line.rsplit(": ", 1)[0] for line in lines
            if line.endswith((": running", ": interrupted before, continuing it"))}


def _stages_skipped(err: str) -> set[str]:
    return {line.removeprefix("pdistill run: ").rsplit(": ", 1)[0] for line in err.splitlines()
            if line.endswith(": done already, skipped")}


def _outputs_of(stages: set[str], snapshot: dict[str, bytes]) -> dict[str, bytes]:
    """The files of those stages' outputs (and records) in a snapshot."""
    roots = set()
    for stage in stages:
        kind, _, name = stage.partition(" ")
        roots |= ({"data"} if kind == "generate" else {kind} if kind.startswith("train_") else
                  {f"predictions/{name}"} if kind == "answer" else {f"eval/{name}"})
    return {path: data for path, data in snapshot.items()
            if any(path == r or path.startswith((r + "/", r + ".")) for r in roots)}


def test_unchanged_rerun_skips_every_stage_and_rewrites_nothing(run_dir, tmp_path, capsys):
    config, out = _copy_run(run_dir, tmp_path)
    before = _snapshot(out)
    assert main(["run", config]) == 0
    err = capsys.readouterr().err
    assert _stages_run(err) == set() and _stages_skipped(err) == BASE_STAGES | PD_STAGES
    after = _snapshot(out)
    assert {k: v for k, v in after.items() if k != "run_config.yaml"} == \
        {k: v for k, v in before.items() if k != "run_config.yaml"}
    # Results-neutral settings (speed and bookkeeping) redo nothing either.
    config = _config(run_dir, tmp_path / "neutral.yaml", out, answer_batch_size=1, pd__log_every=3,
                     pd__save_every=1, sft__remat=True, generate__teacher_states_gb=0.0)
    assert main(["run", config]) == 0
    err = capsys.readouterr().err
    assert _stages_run(err) == set() and "settings changed" not in err
    neutral = _snapshot(out)
    assert yaml.safe_load(neutral.pop("run_config.yaml"))["answer_batch_size"] == 1
    assert neutral == {k: v for k, v in after.items() if k != "run_config.yaml"}


def test_changed_epochs_redo_train_pd_and_what_reads_it_and_an_interrupted_train_resumes(
        run_dir, tmp_path, capsys, monkeypatch):
    """pd.epochs 1 -> 2, killed after one training step; then 2 -> 3, killed again (a partial run
    of other settings is never resumed); then 3 again: it resumes from its checkpoint."""
    real_train = train_module.train

    def killed_after_one_step(*args, **kwargs):
        real_train(*args, **{**kwargs, "stop_after": 1})  # saves a checkpoint at step 1
        raise KeyboardInterrupt

    config, out = _copy_run(run_dir, tmp_path, pd__epochs=2)
    before = _snapshot(out)
    monkeypatch.setattr(train_module, "train", killed_after_one_step)
    assert main(["run", config]) == 130
    err = capsys.readouterr().err
    assert "train_pd: settings changed (pd.epochs 1 -> 2); redoing it and the stages after it" in err
    assert "answer pd_closed_book: made from an older train_pd; redoing it and the stages after it" in err
    assert "evaluate pd_closed_book: made from an older answer pd_closed_book; redoing it\n" in err
    assert "settings changed" not in err.replace("train_pd: settings changed", "")
    assert _stages_run(err) == {"train_pd"}
    # What the old epochs made is gone before anything new is made; no report of it is left.
    for name, (adapter, _, _) in CONDITIONS.items():
        assert (out / "predictions" / f"{name}.jsonl").exists() == (adapter != "pd")
        assert (out / "eval" / name).exists() == (adapter != "pd")
    assert not (out / "report.md").exists() and not (out / "summary.json").exists()
    assert not (out / "train_pd" / "adapter").exists()
    assert yaml.safe_load((out / "run_config.yaml").read_text())["pd"]["epochs"] == 2
    assert json.loads((out / "train_pd.stage.json").read_text())["complete"] is False

    config = _config(run_dir, tmp_path / "three.yaml", out, pd__epochs=3)
    assert main(["run", config]) == 130
    err = capsys.readouterr().err
    assert "train_pd: settings changed (pd.epochs 2 -> 3); redoing it" in err
    assert "resuming" not in err  # the step-1 checkpoint of epochs=2 was deleted, not resumed
    assert [r["step"] for r in map(json.loads, (out / "train_pd" / "metrics.jsonl").open())] == [1]

    monkeypatch.setattr(train_module, "train", real_train)
    assert main(["run", config]) == 0
    err = capsys.readouterr().err
    assert "train_pd: interrupted before, continuing it" in err
    assert "pdistill train: resuming from step 1" in err
    assert _stages_run(err) == PD_STAGES and _stages_skipped(err) == BASE_STAGES
    steps = [r["step"] for r in map(json.loads, (out / "train_pd" / "metrics.jsonl").open())]
    summary = json.loads((out / "train_pd" / "summary.json").read_text())
    assert summary["epochs"] == 3 and summary["finished"] and steps == list(range(1, summary["total_steps"] + 1))
    after = _snapshot(out)
    assert _outputs_of(BASE_STAGES, after) == _outputs_of(BASE_STAGES, before)
    assert (out / "report.md").exists()


def test_changed_max_new_tokens_redoes_answers_and_evaluations_not_training(run_dir, tmp_path, capsys):
    config, out = _copy_run(run_dir, tmp_path, max_new_tokens=3)
    before = _snapshot(out)
    assert main(["run", config]) == 0
    captured = capsys.readouterr()
    err = captured.err
    trainings = {"generate", "train_pd", "train_sft"}
    assert _stages_skipped(err) == trainings
    assert _stages_run(err) == (BASE_STAGES | PD_STAGES) - trainings
    assert "answer rag_gold: settings changed (max_new_tokens 6 -> 3); redoing it and the stages after it" in err
    assert "evaluate rag_gold: made from an older answer rag_gold; redoing it" in err
    assert _outputs_of(trainings, _snapshot(out)) == _outputs_of(trainings, before)
    for name in CONDITIONS:  # the answering stages show their progress, on stderr only
        assert f"answer {name}: 100%" in err
    assert captured.out == ""


def test_changed_generate_settings_redo_every_stage(run_dir, tmp_path, capsys):
    config, out = _copy_run(run_dir, tmp_path, generate__questions_per_doc=1)
    assert main(["run", config]) == 0
    err = capsys.readouterr().err
    assert "generate: settings changed (generate.questions_per_doc 2 -> 1); redoing it and the " \
           "stages after it" in err
    assert "train_sft: made from an older generate; redoing it and the stages after it" in err
    assert "answer base_closed_book: settings changed" not in err  # the base model does not read the data
    assert _stages_skipped(err) == {f"{kind} {name}" for kind in ("answer", "evaluate")
                                    for name, (adapter, _, _) in CONDITIONS.items() if adapter is None}
    assert _stages_run(err) == {"generate", "train_pd", "train_sft"} | {
        f"{kind} {name}" for kind in ("answer", "evaluate")
        for name, (adapter, _, _) in CONDITIONS.items() if adapter is not None}
    manifest = json.loads((out / "data" / "manifest.json").read_text())
    old = json.loads((run_dir / "out" / "data" / "manifest.json").read_text())
    assert manifest["config"]["questions_per_doc"] == 1
    assert 0 < manifest["counts"]["rows"] < old["counts"]["rows"]
    data_sha = train_module.file_sha256(out / "data" / "qa.jsonl")
    for kind in ("pd", "sft"):
        assert yaml.safe_load((out / f"train_{kind}" / "config.yaml").read_text())["data_sha256"] == data_sha


def test_outputs_without_a_record_are_refused_and_left_alone(run_dir, tmp_path, capsys):
    config, out = _copy_run(run_dir, tmp_path, pd__epochs=4)
    for record in out.rglob("*.stage.json"):  # as an older pdistill left its run
        record.unlink()
    before = _snapshot(out)
    assert main(["run", config]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"pdistill run: error: {out}: data, train_pd, train_sft, predictions/base_closed_book.jsonl " \
           f"and 19 more were made by an older pdistill that kept no record of the settings, so they " \
           f"cannot be checked against this config; delete them (or all of {out}) to redo them, or " \
           f"choose a new --out\n" in err
    assert _snapshot(out) == before  # run_config.yaml too


def test_a_generation_of_no_rows_fails_at_once_and_leaves_nothing(run_dir, tmp_path, capsys):
    out = tmp_path / "out"  # no question fits in one token:
    config = _config(run_dir, tmp_path / "run.yaml", out, generate__max_question_tokens=1)
    assert main(["run", config]) == 2
    err = capsys.readouterr().err
    docs = run_dir / "docs.jsonl"
    assert f"pdistill run: error: {docs}: generation yielded 0 Q&A rows: 8 question calls on 4 " \
           "document(s) wrote no question the parser accepts; try a larger max_question_tokens " \
           "(now 1) or another q_temperature (now 1)\n" in err
    assert "train_pd" not in err  # it stopped at generate
    assert sorted(p.name for p in out.iterdir()) == ["run_config.yaml"]  # no data, record or report

    (tmp_path / "gen.yaml").write_text("max_question_tokens: 1\nmax_calls_per_doc: 1\n")
    args = ["generate", "--model", str(run_dir / "model"), "--docs", str(docs),
            "--out", str(tmp_path / "gen"), "--config", str(tmp_path / "gen.yaml")]
    assert main(args) == 2
    captured = capsys.readouterr()
    assert f"pdistill generate: error: {docs}: generation yielded 0 Q&A rows: 4 question calls" in captured.err
    assert not (tmp_path / "gen").exists() and captured.out == ""


def _results(**acc) -> dict:
    return {name: {"match_accuracy": a, "f1": a, "n": 3} for name, a in acc.items()}


def test_acceptance_fails_every_check_when_nothing_scores(tmp_path):
    names = ("base_closed_book", "rag_gold", "sft_closed_book", "pd_closed_book", "pd_rag_gold")
    cover = {"n_questions": 3, "covered": 0, "by_doc": {}}
    zero = summarize(_results(**dict.fromkeys(names, 0.0)), cover)
    assert len(zero["acceptance"]) == 5 and not any(zero["acceptance"].values())
    write_report(tmp_path, RunConfig(), zero, _results(**dict.fromkeys(names, 0.0)), cover)
    report = (tmp_path / "report.md").read_text()
    assert "PASS" not in report and "- FAIL: RAG(gold) > 0 (the model answers from the document)" in report
    working = _results(base_closed_book=0.0, rag_gold=0.5, sft_closed_book=0.2, pd_closed_book=0.45,
                       pd_rag_gold=0.6)
    assert all(summarize(working, cover)["acceptance"].values())
    kept = summarize({**working, **_results(retention_base=0.8, retention_pd=0.73)}, cover)
    assert len(kept["acceptance"]) == 6 and all(kept["acceptance"].values())
    forgot = summarize({**working, **_results(retention_base=0.8, retention_pd=0.7)}, cover)
    assert [c for c, ok in forgot["acceptance"].items() if not ok] == [
        "PD retention >= 0.9 x base retention"]


def test_a_config_states_its_own_acceptance_bars(tmp_path):
    """configs/demo.yaml holds its small model to issue 21's bars, not the paper's."""
    cover = {"n_questions": 3, "covered": 0, "by_doc": {}}
    small = _results(base_closed_book=0.0, rag_gold=0.8, sft_closed_book=0.3, pd_closed_book=0.4,
                     pd_rag_gold=0.75, retention_base=0.8, retention_pd=0.72)
    paper = summarize(small, cover)["acceptance"]
    assert [c for c, ok in paper.items() if not ok] == [
        "PD closed-book >= 0.8 x RAG(gold)", "PD+RAG(gold) >= RAG(gold)"]
    demo = load_yaml(RunConfig, Path(__file__).resolve().parents[2] / "configs" / "demo.yaml")
    assert demo.acceptance == AcceptanceConfig(pd_of_rag=0.5, pd_over_sft=0.05,
                                               pd_rag_under_rag=0.05, retention_of_base=0.9)
    checks = summarize(small, cover, demo.acceptance)["acceptance"]
    assert all(checks.values()) and list(checks)[2:] == [
        "PD closed-book >= 0.5 x RAG(gold)", "PD >= SFT + 5 points",
        "PD+RAG(gold) >= RAG(gold) - 5 points", "PD retention >= 0.9 x base retention"]
    short = summarize({**small, **_results(pd_closed_book=0.34)}, cover, demo.acceptance)
    assert [c for c, ok in short["acceptance"].items() if not ok] == [
        "PD closed-book >= 0.5 x RAG(gold)", "PD >= SFT + 5 points"]
    write_report(tmp_path, demo, short, {**small, **_results(pd_closed_book=0.34)}, cover)
    assert "- FAIL: PD >= SFT + 5 points" in (tmp_path / "report.md").read_text()


def test_each_setting_reaches_exactly_the_stages_whose_results_it_changes(tmp_path):
    ids = {"model.weights": "w", "documents.sha256": "d", "questions.sha256": "q",
           "retention_questions.sha256": "r", "judge.weights": "j"}

    def fingerprints(ids=ids, **changes):
        return {s.name: s.fingerprint for s in build_stages(RunConfig(**{"judge": "a-judge", **changes}),
                                                            tmp_path, ids)}

    base = fingerprints()

    def redone(**changes):
        return {name for name, fp in fingerprints(**changes).items() if fp != base[name]}

    def of(*names):
        return {f"{kind} {n}" for kind in ("answer", "evaluate", "judge") for n in names}

    assert len(base) == 3 + 3 * len(CONDITIONS)
    speed_only = TrainConfig(mesh=(2, 1, 1), remat=True, teacher_cache_gb=0.0, save_every=1,
                             keep_checkpoints=9, log_every=1)
    assert redone(answer_batch_size=1, pd=speed_only, generate=GenerateConfig(teacher_states_gb=0.0)) == set()
    assert redone(acceptance=AcceptanceConfig(pd_of_rag=0.5)) == set()  # the report's alone
    assert redone(bm25_top_k=7) == of("rag_bm25", "pd_rag_bm25")
    without_bm25 = fingerprints(bm25_top_k=0)  # 0 leaves the BM25 conditions out, nothing else
    assert set(base) - set(without_bm25) == of("rag_bm25", "pd_rag_bm25")
    assert all(without_bm25[n] == base[n] for n in without_bm25)
    assert redone(max_new_tokens=7) == of(*CONDITIONS)
    assert redone(judge="another-judge") == {f"judge {n}" for n in CONDITIONS}
    pd_reads = [n for n, (adapter, _, _) in CONDITIONS.items() if adapter == "pd"]
    assert redone(pd=TrainConfig(compute_dtype="bfloat16")) == {"train_pd"} | of(*pd_reads)
    assert redone(generate=GenerateConfig(seed=1)) == {"generate", "train_pd", "train_sft"} | of(
        *(n for n, (adapter, _, _) in CONDITIONS.items() if adapter is not None))
    for lever in ({"question_mode": "sentences"}, {"paraphrases_per_question": 2},
                  {"max_paraphrase_calls": 3}, {"sentences_per_prompt": 1},
                  {"answers_per_question": 2}, {"restatements_per_doc": 1},
                  {"recitations_per_doc": 1}):
        assert redone(generate=GenerateConfig(**lever)) == redone(generate=GenerateConfig(seed=1))
    assert redone(ids={**ids, "documents.sha256": "other"}) == set(base) - of("base_closed_book",
                                                                               "retention_base")
    assert redone(ids={**ids, "retention_questions.sha256": "other"}) == of("retention_base", "retention_pd",
                                                                                  "retention_sft")
    assert redone(system="Be brief.") == set(base)


def test_decode_dtype_redoes_the_stages_that_decode_with_it(tmp_path):
    ids = {"model.weights": "w", "documents.sha256": "d", "questions.sha256": "q",
           "retention_questions.sha256": "r"}

    def fingerprints(cfg):
        return {s.name: s.fingerprint for s in build_stages(cfg, tmp_path, ids)}

    def redone(**changes):
        return {n for n, fp in fingerprints(RunConfig(**changes)).items() if fp != base[n]}

    base = fingerprints(RunConfig())
    answers = {f"{kind} {n}" for kind in ("answer", "evaluate") for n in CONDITIONS}
    assert redone(decode_dtype="bfloat16") == answers  # old answers are never reused
    assert redone(generate=GenerateConfig(decode_dtype="bfloat16")) == \
        redone(generate=GenerateConfig(seed=1))  # new data: every stage that reads it
    assert redone(decode_dtype="float32", generate=GenerateConfig(decode_dtype="float32")) == set()
    assert "decode_dtype" not in json.dumps([s.settings for s in build_stages(RunConfig(), tmp_path, ids)])


def test_auto_dtypes_are_recorded_as_what_they_resolve_to(tmp_path, monkeypatch):
    import jax

    from pdistill_jax.config import to_dict
    from pdistill_jax.pipeline.run import resolve_dtypes

    ids = {"model.weights": "w", "documents.sha256": "d", "questions.sha256": "q"}
    auto = RunConfig(decode_dtype="auto", generate=GenerateConfig(decode_dtype="auto"))
    assert RunConfig().pd.compute_dtype == "auto"
    # on CPU: float32, recorded as a run made before "auto" existed recorded it (the old default)
    before = RunConfig(pd=TrainConfig(compute_dtype="float32"),
                       sft=TrainConfig(objective="ce", compute_dtype="float32"))
    assert resolve_dtypes(auto) == resolve_dtypes(RunConfig()) == before
    assert [s.fingerprint for s in build_stages(resolve_dtypes(RunConfig()), tmp_path, ids)] == \
        [s.fingerprint for s in build_stages(before, tmp_path, ids)]
    assert "decode_dtype" not in to_dict(resolve_dtypes(auto))  # run_config.yaml as before
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    gpu = resolve_dtypes(auto)
    assert (gpu.decode_dtype, gpu.generate.decode_dtype, gpu.pd.compute_dtype,
            gpu.sft.compute_dtype) == ("bfloat16",) * 4
    assert resolve_dtypes(RunConfig()).decode_dtype == "float32"  # the decode default stays


def test_run_config_takes_decode_dtypes_and_refuses_a_bad_one(tmp_path, capsys):
    (tmp_path / "ok.yaml").write_text("decode_dtype: bfloat16\ngenerate: {decode_dtype: auto}\n")
    cfg = load_run_config(tmp_path / "ok.yaml")
    assert (cfg.decode_dtype, cfg.generate.decode_dtype) == ("bfloat16", "auto")
    (tmp_path / "bad.yaml").write_text("max_new_tokens: 8\ngenerate:\n  decode_dtype: float16\n")
    assert main(["run", str(tmp_path / "bad.yaml")]) == 2
    err = capsys.readouterr().err
    assert err == (f"pdistill run: error: {tmp_path / 'bad.yaml'}:3: generate.decode_dtype must be "
                   "one of auto, float32, bfloat16, got 'float16'\n")

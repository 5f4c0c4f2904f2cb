"""`pdistill run`: the whole pipeline on a tiny model, its report, and stage-by-stage resume."""
import json
from pathlib import Path

import pytest
import yaml

from pdistill_jax import answer, load
from pdistill_jax.cli import main
from pdistill_jax.generate import generation_system_message
from pdistill_jax.run import CONDITIONS, load_run_config, resolve_path
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
    assert len(summary["acceptance"]) == 4
    report = (out / "report.md").read_text()
    assert "| pd_closed_book | pd | none |" in report and "Coverage" in report
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cover = json.loads((out / "coverage.json").read_text())
    assert cover["n_questions"] == len(TESTS)


def test_rerun_skips_finished_stages(run_dir, capsys):
    out = run_dir / "out"
    (out / "predictions" / "pd_closed_book.jsonl").unlink()  # as if killed during that stage
    before = (out / "predictions" / "rag_gold.jsonl").stat().st_mtime_ns
    assert main(["run", str(run_dir / "run.yaml")]) == 0
    err = capsys.readouterr().err
    assert "generate: done already, skipped" in err and "train_pd: done already, skipped" in err
    assert "answer pd_closed_book: running" in err and "answer rag_gold: done already" in err
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
    cfg = load_run_config(Path(__file__).parent.parent / "configs" / "demo.yaml")
    for spec in (cfg.documents, cfg.questions, cfg.retention_questions):
        assert resolve_path(spec).exists(), spec
    assert cfg.sft.objective == "ce" and cfg.pd.objective == "kl"


def test_bad_run_config_names_the_key(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("pd: {epochz: 3}\n")
    assert main(["run", str(tmp_path / "bad.yaml")]) == 2
    assert "unknown key(s) ['epochz']" in capsys.readouterr().err

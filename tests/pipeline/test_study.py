"""The study harness (scripts/study_injection.py, pipeline/study.py) on a tiny model: variants
train on one generation's rows and answer the test and retention questions, one row each in
results.jsonl and results.md; a rerun skips what is measured, redoes a changed variant only,
continues an interrupted training; --docs N trains and tests on the first N documents."""
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from pdistill_jax.config import GenerateConfig, to_dict
from pdistill_jax.infer.evaluate import normalize_answer
from pdistill_jax.train import loop as train_loop
from test_generate import DOCS

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "study_injection.py"
_spec = importlib.util.spec_from_file_location("study_injection", SCRIPT)
study_injection = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(study_injection)

RETENTION = [{"question": "What colour is the sky?", "answers": ["blue"]},
             {"question": "How many legs has a dog?", "answers": ["four"]}]
TRAIN = {"epochs": 1, "batch_size": 4, "mesh": [1, 1, 1], "lora": {"rank": 4}}
VARIANTS = [{"name": "pd"}, {"name": "sft", "train": {"objective": "ce"}}]


def _write_study(root: Path, path: Path, variants=VARIANTS, **base) -> str:
    study = {"base": {"model": str(root / "model"), "data": str(root / "data"),
                      "documents": str(root / "docs.jsonl"), "questions": str(root / "tests.jsonl"),
                      "retention_questions": str(root / "retention.jsonl"), "max_new_tokens": 4,
                      "answer_batch_size": 4, "train": TRAIN, **base},
             "variants": variants}
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return str(path)


def _study(*args) -> int:
    return study_injection.main([*map(str, args), "--no-progress"])


SYSTEM = "Answer with names."
QUESTIONS = {"velloria": ["What is the capital of Velloria?", "When was Tarsk founded?",
                          "Who is the fox?", "Where is Tarsk?"],
             "fox": ["Which animal jumps over the lazy dog?", "Where does the fox live?",
                     "Why is the dog lazy?", "What colour is the fox?"]}


def _generate(model: Path, out: Path) -> None:
    """A `pdistill generate` folder built from generation's own parts (hand-written questions in
    place of the question writer, which takes a minute to train): the teacher's answers as
    qa.jsonl rows, the hidden states it kept while answering, and the manifest's system message."""
    from pdistill_jax.datagen.answers import teacher_answers
    from pdistill_jax.datagen.documents import Document
    from pdistill_jax.datagen.teacher_states import (model_fingerprint, save_teacher_states,
                                                     teacher_sequence_key)
    from pdistill_jax.weights.load import load_model

    # at T=0.8 some of the tiny model's answers re-tokenise to the ids it sampled: the rows whose
    # stored states training can match (test_teacher_cache.py)
    lm = load_model(model)
    cfg = GenerateConfig(max_answer_tokens=6, batch_size=8, a_temperature=0.8, system=SYSTEM)
    fingerprint, states = model_fingerprint(lm.path), {}
    items = [(Document(d["id"], d["text"]), q) for d in DOCS[:2] for q in QUESTIONS[d["id"]]]
    rows = teacher_answers(lm, items, cfg, seed=5, on_teacher_state=lambda ids, hidden: states.update(
        {teacher_sequence_key(fingerprint, hidden.dtype, ids): hidden}))
    (out / "qa.jsonl").parent.mkdir(parents=True)
    (out / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    save_teacher_states(out / "teacher_states" / "wave-0.npz", states)
    (out / "manifest.json").write_text(json.dumps({"config": to_dict(cfg)}))


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_llama):
    """A generation on two documents, test questions about them (one answered by a word its own
    training answers hold, so exposures are counted), and a study of two variants run once into
    root/out."""
    root = tmp_path_factory.mktemp("study")
    shutil.copytree(tiny_llama, root / "model")
    _generate(root / "model", root / "data")
    (root / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS[:2]))
    rows = _jsonl(root / "data" / "qa.jsonl")
    taught = next(normalize_answer(r["answer"]).split()[0] for r in rows
                  if r["doc_id"] == "velloria" and normalize_answer(r["answer"]))
    tests = [{"question": "What is the capital of Velloria?", "answers": ["Tarsk"], "doc_id": "velloria"},
             {"question": "Name a word.", "answers": [taught], "doc_id": "velloria"},
             {"question": "What does the fox jump over?", "answers": ["lazy dog"], "doc_id": "fox"}]
    (root / "tests.jsonl").write_text("".join(json.dumps(q) + "\n" for q in tests))
    (root / "retention.jsonl").write_text("".join(json.dumps(q) + "\n" for q in RETENTION))
    assert _study(_write_study(root, root / "study.yaml"), "--out", root / "out") == 0
    return root


def _round_trips(root: Path, rows: list[dict]) -> int:
    """The rows whose teacher sequence, rebuilt from the row's text, has states in the
    generation's teacher_states/ (their answers re-tokenise to the ids the teacher sampled)."""
    from pdistill_jax.datagen.answers import teacher_message
    from pdistill_jax.datagen.teacher_states import model_fingerprint, teacher_sequence_key
    from pdistill_jax.train.batches import _encode
    from pdistill_jax.weights.load import load_model
    from pdistill_jax.weights.tokenizer import chat_prompt_ids

    lm = load_model(root / "model")
    fingerprint = model_fingerprint(lm.path)
    with np.load(root / "data" / "teacher_states" / "wave-0.npz") as stored:
        keys = set(stored.files)
    return sum(teacher_sequence_key(fingerprint, np.float32, chat_prompt_ids(
        lm.tokenizer, teacher_message(r["document"], r["question"]), SYSTEM) +
        _encode(lm.tokenizer, r["answer"])) in keys for r in rows)


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_study_trains_answers_and_tabulates_every_variant(root):
    out = root / "out"
    rows = _rows(out)
    assert [r["name"] for r in rows] == ["pd", "sft"]
    tests, generated = _jsonl(root / "tests.jsonl"), _jsonl(root / "data" / "qa.jsonl")
    for row in rows:
        summary = json.loads((out / row["name"] / "run" / "summary.json").read_text())
        trained = _jsonl(Path(row["data"]))
        assert trained == generated  # no --docs, no rows options: every generated row
        assert row["rows"] == summary["rows"] == len(trained) and row["steps"] == summary["steps"]
        assert row["epochs"] == 1 and row["docs"] is None and row["n_questions"] == len(tests)
        per_q = _jsonl(out / row["name"] / "eval" / "test" / "per_question.jsonl")
        assert row["closed_book"] == sum(r["match"] for r in per_q) / len(tests)
        kept = _jsonl(out / row["name"] / "eval" / "retention" / "per_question.jsonl")
        assert row["retention"] == sum(r["match"] for r in kept) / len(RETENTION)
        # exposures counted again here, by hand, from the rows the variant trained on
        field = "sft_answer" if row["objective"] == "ce" else "answer"
        counts = [sum(normalize_answer(q["answers"][0]) in normalize_answer(r[field])
                      for r in trained if r["doc_id"] == q["doc_id"]) for q in tests]
        assert counts[1] >= 1 or field == "sft_answer"
        assert row["exposures_per_fact"] == pytest.approx(sum(counts) / len(counts))
        assert row["coverage"] == pytest.approx(sum(c > 0 for c in counts) / len(counts))
        assert row["train_wall_s"] > 0 and row["answer_wall_s"] > 0
    assert rows[0]["changes"] == {} and rows[1]["changes"] == {"objective": "ce"}
    # the filtered copy of the data links the generation's teacher states, and PD used them
    assert (Path(rows[0]["data"]).parent / "teacher_states").resolve() == \
        (root / "data" / "teacher_states").resolve()
    # ... which needs the teacher sequences of generation: its system message reached training
    assert rows[0]["teacher_rows_from_generation"] == _round_trips(root, generated) > 0
    assert {r["system"] for r in rows} == {SYSTEM}
    assert yaml.safe_load((out / "pd" / "run" / "config.yaml").read_text())["train"]["system"] == SYSTEM
    baselines = out / "_baselines" / rows[0]["baselines"]
    base_pq = _jsonl(baselines / "eval" / "rag_gold" / "per_question.jsonl")
    assert rows[0]["rag_gold"] == sum(r["match"] for r in base_pq) / len(tests)
    table = (out / "results.md").read_text()
    assert "| base model | - | - | all |" in table and "| RAG (gold) |" in table
    assert "| pd | kl | (base) | all | " in table and "| sft | ce | objective=ce | all | " in table


def test_a_rerun_skips_every_measured_variant(root, capsys):
    out = root / "out"
    before = (out / "results.jsonl").read_bytes()
    assert _study(root / "study.yaml", "--out", out) == 0
    err = capsys.readouterr().err
    assert "pd: done already, skipped" in err and "sft: done already, skipped" in err
    assert ": running" not in err
    assert (out / "results.jsonl").read_bytes() == before


def test_a_changed_variant_is_redone_alone_and_its_row_replaced(root, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(root / "out", out, symlinks=True)
    changed = [VARIANTS[0], {"name": "sft", "train": {"objective": "ce", "epochs": 2}}]
    assert _study(_write_study(root, tmp_path / "study.yaml", changed), "--out", out) == 0
    err = capsys.readouterr().err
    assert "pd: done already, skipped" in err and "pd train: running" not in err
    redone = [line for line in err.splitlines() if "settings changed" in line]
    assert redone == ["pdistill study: sft train: settings changed (train.epochs 1 -> 2); redoing "
                      "it and the stages after it; its row in results.jsonl is replaced"]
    old, new = _rows(root / "out"), _rows(out)
    assert [r["name"] for r in new] == ["pd", "sft"] and new[0] == old[0]
    assert new[1]["epochs"] == 2 and new[1]["steps"] == 2 * old[1]["steps"]
    assert new[1]["exposures_per_fact"] == pytest.approx(2 * old[1]["exposures_per_fact"])


def test_with_document_answers_each_variant_with_its_gold_document_without_retraining(
        root, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(root / "out", out, symlinks=True)
    study = _write_study(root, tmp_path / "study.yaml", [VARIANTS[0]], with_document=True)
    assert _study(study, "--out", out) == 0
    err = capsys.readouterr().err
    assert "pd train: running" not in err and "pd answer test: running" not in err
    assert "pd answer test with its document: running" in err
    row = next(r for r in _rows(out) if r["name"] == "pd")
    old = next(r for r in _rows(root / "out") if r["name"] == "pd")
    assert row["closed_book"] == old["closed_book"] and old["with_document"] is None
    tests = _jsonl(root / "tests.jsonl")
    answered = _jsonl(out / "pd" / "predictions" / "test_gold.jsonl")
    assert [a["question"] for a in answered] == [q["question"] for q in tests]
    per_q = _jsonl(out / "pd" / "eval" / "test_gold" / "per_question.jsonl")
    assert row["with_document"] == sum(r["match"] for r in per_q) / len(tests)
    record = json.loads((out / "pd" / "predictions" / "test_gold.stage.json").read_text())
    assert record["settings"]["context"] == "gold"
    assert f"| {100 * row['with_document']:.1f}% |" in (out / "results.md").read_text()
    assert _study(study, "--out", out) == 0  # and a rerun has nothing left to do
    assert "pd: done already, skipped" in capsys.readouterr().err


def test_docs_n_trains_and_tests_on_the_first_documents_and_resumes_a_training(
        root, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    study = _write_study(root, tmp_path / "study.yaml", [{"name": "pd2", "train": {"epochs": 2}}])
    real = train_loop.train

    def killed_after_one_step(*args, **kwargs):
        real(*args, **{**kwargs, "stop_after": 1})
        raise KeyboardInterrupt

    monkeypatch.setattr(train_loop, "train", killed_after_one_step)
    assert _study(study, "--out", out, "--docs", 1) == 130
    monkeypatch.undo()
    capsys.readouterr()
    assert _study(study, "--out", out, "--docs", 1) == 0
    err = capsys.readouterr().err
    assert "pd2 train: interrupted before, continuing it" in err and "resuming from step 1" in err
    (row,) = _rows(out)
    trained = _jsonl(Path(row["data"]))
    assert row["docs"] == 1 and {r["doc_id"] for r in trained} == {"velloria"}
    assert trained == [r for r in _jsonl(root / "data" / "qa.jsonl") if r["doc_id"] == "velloria"]
    summary = json.loads((out / "pd2" / "run" / "summary.json").read_text())
    assert row["rows"] == len(trained) == 4 and row["steps"] == summary["steps"] == 2
    assert row["n_questions"] == 2 and row["n_retention"] == len(RETENTION)  # retention: whole
    assert row["baselines"] != _rows(root / "out")[0]["baselines"]  # another question set
    assert "| base model | - | - | 1 |" in (out / "results.md").read_text()


@pytest.mark.slow  # a second study training (about 25 s); the dev set itself: test_dev_set
def test_a_variant_with_a_dev_set_records_the_step_it_kept_and_counts_only_trained_rows(
        root, tmp_path):
    from pdistill_jax.infer.evaluate import exposures
    from pdistill_jax.pipeline.study_table import HEADER

    out = tmp_path / "out"
    shutil.copytree(root / "out", out, symlinks=True)
    variant = {"name": "pd-dev", "train": {"epochs": 2, "dev_share": 0.25}}
    assert _study(_write_study(root, tmp_path / "study.yaml", [variant]), "--out", out) == 0
    row = next(r for r in _rows(out) if r["name"] == "pd-dev")
    summary = json.loads((out / "pd-dev" / "run" / "summary.json").read_text())
    assert row["dev"]["questions"] == 2 and row["dev"]["rows"] == 2  # one of 4 a document
    assert row["rows"] == summary["rows"] == 6 and row["steps"] == 4
    assert [s for s, _ in row["dev"]["losses"]] == [2, 4]  # at each epoch's end
    # exposures count the 6 rows trained, over the passes up to the step kept
    from pdistill_jax.datagen.dataset import read_qa_rows
    from pdistill_jax.train.dev_set import split_dev_rows

    kept, _ = split_dev_rows(read_qa_rows(Path(row["data"])), 0.25, 0)
    taught = [{"doc_id": r.doc_id, "answer": r.answer} for r in kept]
    passes = row["dev"]["best_step"] / summary["steps_per_epoch"]
    assert row["exposures_per_fact"] == pytest.approx(
        exposures(_jsonl(root / "tests.jsonl"), taught, passes)["mean"])
    line = next(x for x in (out / "results.md").read_text().splitlines() if x.startswith("| pd-dev |"))
    assert line.split(" | ")[HEADER.index("steps")] == f"4 (kept {row['dev']['best_step']})"


@pytest.mark.parametrize("variants, line, message", [
    ("  - name: a\n  - name: b\n    train:\n      lr: -1\n", 7,
     "variants[1].train.lr must be > 0, got -1.0"),
    ("  - name: a\n    train: {epochz: 3}\n", 5, "unknown key(s) ['epochz'] for TrainConfig"),
    ("  - name: a\n  - name: a\n", 5, "variants[1].name 'a' is taken by variants[0]"),
    ("  - name: a/b\n", 4, "variants[0].name must be letters, digits"),
    ("  - name: a\n    rows: {max_per_doc: 0}\n", 5, "variants[0].rows.max_per_doc must be >= 1"),
    ("  - name: a\n    train: {system: Hi}\n", 5, "variants[0].train.system must be unset"),
    ("  - {train: {epochs: 2}}\n", 4, "variants[0] must be a mapping with a name"),
])
def test_a_bad_variant_is_one_line_naming_file_line_and_field(tmp_path, capsys, variants, line,
                                                              message):
    path = tmp_path / "bad.yaml"
    path.write_text("base:\n  train: {epochs: 1}\nvariants:\n" + variants)
    assert _study(path) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"pdistill study: error: {path}:{line}: "), err
    assert message in err[0]


def test_a_base_value_a_variant_inherits_is_reported_at_the_base(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("base:\n  train:\n    tau: 0\nvariants:\n  - name: a\n")
    assert _study(path) == 2
    assert capsys.readouterr().err.strip() == (f"pdistill study: error: {path}:3: base.train.tau "
                                               "must be > 0, got 0.0")


def test_the_example_study_reads():
    from pdistill_jax.pipeline.study import load_study

    study = load_study(SCRIPT.parents[1] / "configs" / "study" / "example.yaml")
    variants = {v.name: v.train for v in study.variants}
    assert list(variants) == ["pd-3ep", "pd-10ep", "pd-tau2-3ep", "sft-3ep", "sft-10ep"]
    assert variants["pd-10ep"].epochs == 10 and variants["pd-10ep"].tau == 1.0
    assert variants["pd-tau2-3ep"].tau == 2.0 and variants["sft-10ep"].objective == "ce"
    assert {t.lr for t in variants.values()} == {3e-3} and study.base.data == "runs/demo/data"


def test_the_demo_levers_study_reads():
    from pdistill_jax.pipeline.study import load_study

    study = load_study(SCRIPT.parents[1] / "configs" / "study" / "demo_levers.yaml")
    variants = {v.name: v.train for v in study.variants}
    assert variants["pd-10ep-top10"].lora.first_layer == 20
    assert variants["pd-10ep-top10"].lora.rank == 32 and variants["pd-10ep"].lora.first_layer == 0
    assert variants["pd-3ep-ce1"].ce_weight == 1.0


@pytest.mark.parametrize("path", sorted((SCRIPT.parents[1] / "configs" / "study").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_shipped_study_file_reads(path):
    """The studies docs/results.md cites, and the generation configs beside them."""
    from pdistill_jax.config import load_yaml
    from pdistill_jax.pipeline.study import load_study

    if path.name.startswith("demo_generate"):
        load_yaml(GenerateConfig, path)
    else:
        assert load_study(path).variants


def test_seeds_train_each_variant_once_per_seed(tmp_path, capsys):
    from pdistill_jax.pipeline.study import load_study

    path = tmp_path / "seeds.yaml"
    path.write_text("base:\n  seeds: [0, 3]\n  train: {epochs: 1}\nvariants:\n  - name: a\n"
                    "  - name: b\n    train: {epochs: 2}\n")
    study = load_study(path)
    assert [(v.name, v.train.seed, v.train.epochs) for v in study.variants] == [
        ("a-seed0", 0, 1), ("b-seed0", 0, 2), ("a-seed3", 3, 1), ("b-seed3", 3, 2)]

    path.write_text("base:\n  seeds: [0, 1]\nvariants:\n  - name: a\n    train: {seed: 4}\n")
    assert _study(path) == 2
    assert capsys.readouterr().err.strip() == (
        f"pdistill study: error: {path}:5: train.seed is set while base.seeds is [0, 1]; set one "
        "of them")
    path.write_text("base:\n  seeds: [0]\nvariants:\n  - name: a\n  - name: a-seed0\n")
    assert _study(path) == 2
    assert "variant name 'a-seed0' is also one of another variant's seeds" in capsys.readouterr().err


def test_results_md_gives_each_variant_its_mean_and_range_over_seeds(tmp_path):
    from pdistill_jax.pipeline.study_table import write_table

    def row(name, seed, closed, retention, baselines="k"):
        return {"name": name, "seed": seed, "baselines": baselines, "objective": "kl",
                "changes": {"seed": seed}, "docs": None, "rows": 10, "steps": 5, "epochs": 1,
                "exposures_per_fact": 1.0, "train_wall_s": 10.0 + seed, "answer_wall_s": 1.0,
                "closed_book": closed, "with_document": None, "retention": retention,
                "coverage": 0.5, "base_closed_book": 0.0, "rag_gold": 0.8, "base_retention": 0.9}

    rows = [row("a-seed0", 0, 0.25, 0.75), row("a-seed1", 1, 0.5, 0.5), row("a-seed2", 2, 0.0, 1.0),
            row("b-seed0", 0, 0.1, 0.1), row("c-seed5", 4, 0.1, 0.1),  # one seed; not its seed
            row("a-seed4", 4, 1.0, 1.0, baselines="other"),  # other questions: not pooled
            row("a-seed3", 3, 0.5, 0.5, baselines="other")]
    write_table(tmp_path / "results.md", rows)
    text = (tmp_path / "results.md").read_text()
    across = text[text.index("## Across seeds"):].splitlines()
    assert [line for line in across if line.startswith("| a")] == [
        "| a | 0, 1, 2 | 25.0% (0.0–50.0) | - | 75.0% (50.0–100.0) | 11 (10–12) |",
        "| a | 3, 4 | 75.0% (50.0–100.0) | - | 75.0% (50.0–100.0) | 14 (13–14) |"]
    assert not any(line.startswith(("| b", "| c")) for line in across)
    write_table(tmp_path / "results.md", rows[3:5])
    assert "Across seeds" not in (tmp_path / "results.md").read_text()

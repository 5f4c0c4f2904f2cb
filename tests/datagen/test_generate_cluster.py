"""`pdistill generate` and `pdistill answer` on a real 2-process JAX cluster (a coordinator on
127.0.0.1, one CPU device a process, as tests/train/test_cluster.py launches it): each process
samples its share, process 0 merges, and the output is the one-process output, byte for byte
(manifest and done.jsonl timings aside); a process killed mid-run ends the other with one line,
and a relaunch resumes from what both committed; a killed cluster's answers resume on one
process."""
import dataclasses
import json
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from pdistill_jax.cli import main
from pdistill_jax.datagen.generate import generate_data
from test_cluster import _launch, _wait
from test_generate import CFG, DOCS, jsonl, shared_question_writer

pytestmark = pytest.mark.cluster  # python -m pytest -m cluster (CI runs it: .ci/run)

TIMINGS = ("wave_questions_s", "wave_answers_s")
# 4 documents, one a wave: 2 waves a process. Fewer question calls than test_generate's CFG: each
# new prompt width is a compile in every process of every launch.
GENERATE = dataclasses.replace(CFG, questions_per_doc=2, max_calls_per_doc=3)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("generate_cluster")
    model = shared_question_writer(tmp_path_factory)
    docs = tmp / "docs.jsonl"
    docs.write_text("".join(json.dumps(d) + "\n" for d in DOCS), encoding="utf-8")
    config = tmp / "gen.yaml"
    config.write_text(yaml.safe_dump(GENERATE.__dict__))
    reference = tmp / "reference"
    generate_data(model, docs, reference, GENERATE, show_progress=False)  # one process
    return model, docs, config, reference, tmp


def _generate_args(corpus, out: Path) -> list[str]:
    model, docs, config, _, _ = corpus
    return ["generate", "--model", str(model), "--docs", str(docs), "--config", str(config),
            "--out", str(out), "--no-progress"]


def _teacher_states(out: Path) -> dict[str, dict[str, np.ndarray]]:
    states = {}
    for f in sorted((out / "teacher_states").glob("wave-*.npz")):
        with np.load(f) as z:
            states[f.name] = {k: z[k] for k in z.files}
    return states


def _same_generation(out: Path, reference: Path) -> None:
    from datasets import load_from_disk

    for name in ("qa.jsonl", "documents.jsonl", "run.json"):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    strip = lambda r: {k: v for k, v in r.items() if k not in TIMINGS}  # noqa: E731
    assert [strip(r) for r in jsonl(out / "done.jsonl")] == \
        [strip(r) for r in jsonl(reference / "done.jsonl")]
    got, want = (json.loads((f / "manifest.json").read_text()) for f in (out, reference))
    assert {**got, "timings": None} == {**want, "timings": None}
    assert load_from_disk(str(out / "dataset")).to_list() == jsonl(reference / "qa.jsonl")
    got, want = _teacher_states(out), _teacher_states(reference)
    assert got.keys() == want.keys() and got  # one file per wave, named by the wave's seed
    for name in want:
        assert got[name].keys() == want[name].keys()
        assert all(np.array_equal(got[name][k], want[name][k]) for k in want[name])
    assert not (out / "parts").exists()


def test_one_process_killed_ends_the_other_and_a_relaunch_resumes(corpus):
    out = corpus[4] / "killed"
    procs = _launch(_generate_args(corpus, out), out)
    part = out / "parts" / "process-1" / "done.jsonl"
    end = time.monotonic() + 300
    while not (part.exists() and part.read_bytes().count(b"\n") >= 1):  # its first wave is in
        assert procs[1].poll() is None and time.monotonic() < end, "process 1 ended first"
        time.sleep(0.02)
    procs[1].send_signal(signal.SIGKILL)
    procs[1].wait()
    start = time.monotonic()
    assert procs[0].wait(timeout=120) == 2
    # Its own waves (seconds) then the barrier, where 30 s of silence mark process 1 dead.
    assert time.monotonic() - start < 90
    last = out.with_name(f"{out.name}.0.log").read_text().strip().splitlines()[-1]
    assert last.startswith("pdistill generate: error: process 1 of 2 has been silent for ") and \
        "the same command resumes" in last, last
    assert not (out / "manifest.json").exists() and (out / "parts" / "process-0").is_dir()
    # The relaunched cluster finishes what both processes began: the one-process folder.
    logs = out.with_name("relaunched")
    _wait(_launch(_generate_args(corpus, out), logs), logs)
    _same_generation(out, corpus[3])
    assert len(jsonl(out / "qa.jsonl")) > len(DOCS)  # real rows, from every wave
    reports = [logs.with_name(f"{logs.name}.{i}.log").read_text() for i in range(2)]
    assert reports[0].startswith(f"{out}: ") and not reports[1]  # process 0 reports for the cluster


# ---------------------------------------------------------------- answer

QUESTIONS = [{"id": i, "question": f"What is fact {i} about Tarsk and the fox of Velloria?",
              "doc_id": DOCS[i % 2]["id"]} for i in range(24)]


@pytest.fixture(scope="module")
def questions(tiny_llama, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("answer_cluster")
    path, docs = tmp / "questions.jsonl", tmp / "docs.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    docs.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    return tiny_llama, path, docs


def _answer_args(questions, out: Path, *extra: str) -> list[str]:
    model, path, docs = questions
    return ["answer", "--model", str(model), "--questions", str(path), "--docs", str(docs),
            "--context", "gold", "--batch-size", "3", "--out", str(out), "--no-progress", *extra]


def test_two_processes_answer_what_one_process_answers(questions):
    tmp = questions[1].parent
    sampled = ["--max-new-tokens", "8", "--temperature", "1.0", "--sampling-top-k", "20"]
    reference = tmp / "answers_one.jsonl"
    assert main(_answer_args(questions, reference, *sampled)) == 0
    out = tmp / "answers_two.jsonl"
    _wait(_launch(_answer_args(questions, out, *sampled), out), out)
    assert out.read_bytes() == reference.read_bytes()
    rows = jsonl(out)
    assert [r["question"] for r in rows] == [q["question"] for q in QUESTIONS]
    assert len({r["prediction"] for r in rows}) > 1  # distinct answers, not one repeated
    assert not Path(f"{out}.parts").exists() and not Path(f"{reference}.parts").exists()


def test_killed_cluster_answers_resume_on_one_process(questions, capsys):
    # Greedy here (the test above samples): the batches compile argmax alone, another program.
    tmp = questions[1].parent
    long = ["--max-new-tokens", "64", "--seed", "5"]
    reference = tmp / "answers_long_one.jsonl"
    assert main(_answer_args(questions, reference, *long)) == 0
    out = tmp / "answers_long_two.jsonl"
    parts = Path(f"{out}.parts")
    procs = _launch(_answer_args(questions, out, *long), out)
    end = time.monotonic() + 300
    while not any(p.read_bytes().count(b"\n") >= 2 for p in parts.glob("process-*.jsonl")):
        assert all(p.poll() is None for p in procs) and time.monotonic() < end
        time.sleep(0.01)
    for p in procs:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert not out.exists()
    batches = sum(len(read_lines(p)) - 1 for p in parts.glob("process-*.jsonl"))
    assert 1 <= batches < len(QUESTIONS) // 3, "the kill should land mid-run"
    # Other settings never mix with the batches done: refused, the parts kept.
    assert main(_answer_args(questions, out, *long[:-1], "6")) == 2
    assert "other settings (seed: 5 -> 6); rerun with those to resume, or delete" in \
        capsys.readouterr().err and parts.is_dir()
    assert main(_answer_args(questions, out, *long)) == 0  # one process, the cluster's parts
    assert out.read_bytes() == reference.read_bytes() and not parts.exists()
    assert len({r["prediction"] for r in jsonl(out)}) > 1


def read_lines(path: Path) -> list[bytes]:
    data = path.read_bytes()
    return data[:data.rfind(b"\n") + 1].splitlines()

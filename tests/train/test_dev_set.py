"""The dev set: which rows it holds out, and train() measuring it, keeping the adapter of its
lowest loss, stopping early, and resuming to the same result."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from pdistill_jax.config import LoraConfig, TrainConfig
from pdistill_jax.datagen.dataset import QARow
from pdistill_jax.train.dev_set import DevHistory, measures_at, split_dev_rows
from pdistill_jax.train.loop import train
from test_loop import metrics, write_qa


def row(doc, question, answer="a", **kw) -> QARow:
    return QARow(f"Document {doc}.", question, answer, doc_id=doc, **kw)


def test_split_holds_out_whole_questions_of_every_document_and_never_a_restatement():
    rows = [row("A", f"qa{i}?") for i in range(4)]
    rows += [row("A", "qa0 said otherwise?", paraphrase_of="qa0?"),  # a rewrite of qa0
             row("A", "qa1?", "a second answer"),                    # a further answer to qa1
             row("A", "List the facts about A.", about_document=True),
             row("B", "the only question of B?")]
    rows += [row("C", f"qc{i}?") for i in range(10)]
    train_rows, dev = split_dev_rows(rows, 0.25, seed=0)
    assert sorted(train_rows + dev, key=rows.index) == rows
    assert [r for r in rows if r in train_rows] == train_rows  # both keep the input order
    held = {(r.doc_id, r.paraphrase_of or r.question) for r in dev}
    assert len([q for d, q in held if d == "A"]) == 1  # round(0.25 x 4)
    assert len([q for d, q in held if d == "C"]) == 2  # round(0.25 x 10)
    assert not any(d == "B" for d, _ in held)  # its only question trains
    for r in rows:  # a question leaves with its rewrites and further answers
        assert (r in dev) == ((r.doc_id, r.paraphrase_of or r.question) in held)
    assert all(not r.about_document for r in dev)
    assert split_dev_rows(rows, 0.25, seed=0) == (train_rows, dev)
    assert any(split_dev_rows(rows, 0.25, seed=s)[1] != dev for s in range(1, 6))
    assert split_dev_rows(rows, 0.0, seed=0) == (rows, [])


def test_history_counts_a_new_lowest_only_beyond_float_noise():
    h = DevHistory()
    assert h.add(2, 1.0) and h.since_best() == 0
    assert not h.add(4, 1.0 - 1e-7)  # noise, not progress
    assert h.add(6, 0.9) and h.best_step == 6 and h.since_best() == 0
    assert not h.add(8, 0.95) and h.since_best() == 1
    assert DevHistory.from_dict(json.loads(json.dumps(h.to_dict()))) == h
    assert [s for s in range(1, 12) if measures_at(s, 0, 3, 11)] == [3, 6, 9, 11]
    assert [s for s in range(1, 13) if measures_at(s, 5, 3, 12)] == [5, 10, 12]


def config(**kw) -> TrainConfig:
    settings = dict(lr=2e-2, epochs=4, batch_size=4, save_every=100, mesh=(1, 1, 1),
                    dev_share=0.25, eval_every=2)
    return TrainConfig(lora=LoraConfig(rank=4, targets=("q", "v")), **{**settings, **kw})


@pytest.fixture(scope="module")
def runs(tiny_llama, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dev")
    qa = write_qa(tmp / "qa.jsonl")  # 4 documents x 4 questions
    train(tiny_llama, qa, tmp / "whole", config(), progress=False)
    train(tiny_llama, qa, tmp / "split", config(), stop_after=5, progress=False)
    train(tiny_llama, qa, tmp / "split", config(), resume=True, progress=False)
    # lr 1e-30 leaves the adapter's outputs unchanged, so the dev loss never falls again
    stalled = config(lr=1e-30, eval_every=1, early_stop_patience=2)
    train(tiny_llama, qa, tmp / "stalled", stalled, progress=False)
    train(tiny_llama, qa, tmp / "stalled", stalled, resume=True, progress=False)
    return tmp


def summary(run) -> dict:
    return json.loads((run / "summary.json").read_text())


def adapter_bytes(folder) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}


def test_the_dev_rows_are_held_out_measured_and_the_lowest_adapter_written(runs):
    s = summary(runs / "whole")
    assert s["rows"] == 12 and s["steps"] == 12 and s["finished"]  # 3 steps an epoch, 4 epochs
    dev = s["dev"]
    assert dev["questions"] == 4 and dev["rows"] == 4 and not dev["stopped_early"]
    steps, losses = zip(*dev["losses"])
    assert steps == (2, 4, 6, 8, 10, 12) and all(np.isfinite(losses))
    assert losses[-1] < losses[0]  # the held-out questions share their documents' facts
    assert dev["best_loss"] == min(losses) and steps[losses.index(min(losses))] == dev["best_step"]
    kept = json.loads((runs / "whole" / "dev_best.json").read_text())
    assert kept["step"] == dev["best_step"]
    assert adapter_bytes(runs / "whole" / "adapter") == adapter_bytes(runs / "whole" / "dev_best")
    assert len(metrics(runs / "whole")) == 12


def test_a_resumed_run_measures_and_keeps_what_the_uninterrupted_one_did(runs):
    whole, split = summary(runs / "whole")["dev"], summary(runs / "split")["dev"]
    assert summary(runs / "split")["resumed_from"] == 5
    assert [s for s, _ in split["losses"]] == [s for s, _ in whole["losses"]]
    for (_, a), (_, b) in zip(split["losses"], whole["losses"]):
        assert a == pytest.approx(b, rel=1e-5)
    assert split["best_step"] == whole["best_step"]
    from safetensors.numpy import load_file
    a = load_file(str(runs / "split" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(runs / "whole" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_a_stalled_dev_loss_stops_the_run_early_and_a_resume_adds_nothing(runs):
    s = summary(runs / "stalled")
    dev = s["dev"]
    # measured after steps 1, 2, 3: no new lowest after step 1 twice in a row
    assert [st for st, _ in dev["losses"]] == [1, 2, 3] and dev["best_step"] == 1
    assert dev["stopped_early"] and s["finished"] and s["steps"] == 3 and s["total_steps"] == 12
    assert (runs / "stalled" / "adapter" / "adapter_model.safetensors").exists()
    assert json.loads((runs / "stalled" / "dev_best.json").read_text())["step"] == 1
    assert len(metrics(runs / "stalled")) == 3  # the resume ran no step
    # ... and kept the throughput its steps were measured at
    assert s["examples_per_s"] > 0 and s["first_step_s"] > 0


def test_a_dev_share_that_holds_out_no_question_is_refused(tiny_llama, tmp_path):
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"document": f"Document {d}.", "question": f"q{d}?",
                                      "answer": "a"}) + "\n" for d in range(3)))
    with pytest.raises(ValueError, match=r"dev_share=0.25 holds out no question from .*qa.jsonl"):
        train(tiny_llama, qa, tmp_path / "run", config(), progress=False)
    assert not (tmp_path / "run" / "adapter").exists()


def test_the_report_names_the_step_whose_adapter_was_kept(runs, tmp_path):
    from pdistill_jax.pipeline.report import _throughput, _time_lines

    (tmp_path / "train_pd").mkdir()
    (tmp_path / "train_pd" / "summary.json").write_text((runs / "stalled" / "summary.json").read_text())
    rates = _throughput(tmp_path, {"train_pd": {"seconds": 12.0}})
    assert rates["train_pd"]["kept_step"] == 1 and rates["train_pd"]["stopped_early"]
    (line,) = [x for x in _time_lines({"timings_s": {"train_pd": 12.0}, "throughput": rates})
               if x.startswith("| train_pd |")]
    assert re.search(r"\| 3 steps, [0-9.]+ examples/s; adapter of step 1 \(lowest dev loss\), "
                     r"stopped early \|$", line), line

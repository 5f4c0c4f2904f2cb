"""train() with the extra loss terms on the tiny Llama: retention.jsonl made once and reused,
exact resume, the loss's parts in metrics.jsonl, and weight 0 leaving the run as it was."""
from __future__ import annotations

import json

import pytest

from pdistill_jax.commands.train import add_arguments, resolve_config
from pdistill_jax.config import LoraConfig, TrainConfig
from pdistill_jax.train.loop import train
from test_loop import metrics, write_qa

TIMING = ("examples_per_s", "elapsed")
PROMPTS = ["What is the capital of France?", "How many legs does a spider have?",
           "What colour is the sky?", "Who wrote Hamlet?", "What is water made of?"]


def config(**kw) -> TrainConfig:
    return TrainConfig(lora=LoraConfig(rank=4, targets=("q", "v")), lr=2e-2, epochs=2,
                       batch_size=4, save_every=100, mesh=(1, 1, 1), **kw)


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


@pytest.fixture(scope="module")
def runs(tiny_llama, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("retention")
    qa = write_qa(tmp / "qa.jsonl")
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"question": q}) + "\n" for q in PROMPTS))
    on = dict(retention_weight=1.0, retention_prompts=str(prompts), retention_batch_size=2,
              ce_weight=0.5)
    out = {"tmp": tmp, "qa": qa, "prompts": prompts, "on": on}
    train(tiny_llama, qa, tmp / "plain", config(), progress=False)
    train(tiny_llama, qa, tmp / "weight0", config(retention_prompts=str(prompts)), progress=False)
    train(tiny_llama, qa, tmp / "whole", config(**on), progress=False)
    train(tiny_llama, qa, tmp / "split", config(**on), stop_after=3, progress=False)
    made = (tmp / "split" / "retention.jsonl").stat().st_mtime_ns
    train(tiny_llama, qa, tmp / "split", config(**on), resume=True, progress=False)
    out["made_ns"] = made
    return out


def test_weight_zero_leaves_the_run_as_it_was(runs):
    tmp = runs["tmp"]
    assert without_timing(metrics(tmp / "weight0")) == without_timing(metrics(tmp / "plain"))
    assert not (tmp / "weight0" / "retention.jsonl").exists()
    assert set(metrics(tmp / "plain")[0]) == {"step", "epoch", "loss", "grad_norm", "lr",
                                              "answer_tokens", *TIMING}


def test_metrics_carry_the_parts_retention_starts_at_zero_and_grows(runs):
    rows = metrics(runs["tmp"] / "whole")
    assert len(rows) == 8
    for r in rows:
        assert r["loss"] == pytest.approx(r["distill_loss"] + 0.5 * r["ce_loss"]
                                          + 1.0 * r["retention_loss"], rel=1e-5)
    assert rows[0]["retention_loss"] == pytest.approx(0.0, abs=1e-7)  # B = 0: student == base
    assert rows[-1]["retention_loss"] > 1e-5
    assert rows[0]["ce_loss"] > 1.0


def test_base_answers_are_made_once_and_reused_on_resume(runs):
    tmp = runs["tmp"]
    split, whole = tmp / "split" / "retention.jsonl", tmp / "whole" / "retention.jsonl"
    assert split.stat().st_mtime_ns == runs["made_ns"]  # the resumed session generated nothing
    answers = [json.loads(line) for line in split.read_text().splitlines()]
    assert [a["question"] for a in answers] == PROMPTS
    assert all(len(a["answer_ids"]) <= 32 for a in answers)
    assert split.read_text() == whole.read_text()  # greedy: the same base answers every run
    a, b = without_timing(metrics(tmp / "split")), without_timing(metrics(tmp / "whole"))
    assert len(a) == len(b) == 8
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-7), k


def test_answers_kept_for_other_prompts_are_refused(runs):
    from pdistill_jax.train.retention import load_or_make_answers

    with pytest.raises(ValueError, match="answers other retention prompts"):
        load_or_make_answers(runs["tmp"] / "split" / "retention.jsonl", ["What is two plus two?"],
                             lambda: [])


def test_flags_set_the_new_fields_and_the_builtin_prompts_read():
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = resolve_config(parser.parse_args([
        "--out", "x", "--ce-weight", "0.2", "--retention-weight", "0.1",
        "--retention-prompts", "builtin:demo/general_knowledge.jsonl",
        "--retention-batch-size", "4"]), None)
    assert (cfg.ce_weight, cfg.retention_weight, cfg.retention_batch_size) == (0.2, 0.1, 4)
    from pdistill_jax.train.retention import read_prompts

    questions = read_prompts(cfg.retention_prompts)
    assert len(questions) == 80 and questions[0] == "What is the capital of France?"

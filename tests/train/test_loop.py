"""`pdistill train` end to end on a tiny model: run folder, metrics, adapter, resume rules."""
import argparse
import json
import re
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from pdistill_jax.cli import main
from pdistill_jax.commands.train import add_arguments, resolve_config
from pdistill_jax.config import LoraConfig, TrainConfig, load_yaml

ROOT = Path(__file__).resolve().parents[2]
# TrainConfig's own defaults (in place of the recipe a bare `pdistill train` starts from)
TRAIN_DEFAULTS = str(ROOT / "configs" / "train_default.yaml")
FACTS = [("Tarsk", "1873", "Ottilie Marrowgate"), ("Hesk", "1902", "Bram Quill"),
         ("Velloria", "1655", "Ada Finch"), ("Marrow", "1790", "Tobias Lark")]


def write_qa(path: Path) -> Path:
    rows = []
    for city, year, person in FACTS:
        doc = f"The city of {city} was founded in {year} by {person}. Its bridge is made of glass."
        for q, a in [(f"When was {city} founded?", f"{city} was founded in {year}."),
                     (f"Who founded {city}?", f"{city} was founded by {person}."),
                     (f"What is the bridge of {city} made of?", f"The bridge of {city} is glass."),
                     (f"Who founded {city}, and when?", f"{person} founded it in {year}.")]:
            rows.append({"document": doc, "question": q, "answer": a, "doc_id": city})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tiny_llama, tmp_path_factory):
    """A run trained in two sessions: --stop-after 12, then a bare --resume (the run's config)."""
    tmp = tmp_path_factory.mktemp("train")
    qa, run = write_qa(tmp / "qa.jsonl"), tmp / "run"
    args = ["train", "--model", str(tiny_llama), "--data", str(qa), "--out", str(run),
            "--config", TRAIN_DEFAULTS, "--mesh", "data=2", "--batch-size", "4", "--epochs", "6", "--rank", "8",
            "--targets", "q,k,v,o,gate,up,down", "--lr", "2e-2", "--save-every", "5",
            "--system", "Answer briefly.", "--no-progress"]
    assert main(args + ["--stop-after", "12"]) == 0
    first = json.loads((run / "summary.json").read_text())
    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 0
    return qa, run, first, args


def test_train_writes_adapter_metrics_and_config(trained, tiny_llama):
    from pdistill_jax.weights.hf import read_model_config
    from pdistill_jax.weights.peft import load_peft_adapter

    qa, run, first, _ = trained
    assert first["steps"] == 12 and not first["finished"] and first["total_steps"] == 24
    summary = json.loads((run / "summary.json").read_text())
    assert summary["finished"] and summary["steps"] == 24 and summary["resumed_from"] == 12
    assert summary["rows"] == 16 and summary["rows_skipped"] == 0

    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 25))
    assert set(rows[0]) >= {"step", "epoch", "loss", "grad_norm", "lr", "examples_per_s", "elapsed"}
    assert rows[-1]["epoch"] == 6.0 and rows[-1]["lr"] < rows[5]["lr"]
    losses = [r["loss"] for r in rows]
    # Each epoch sees every row once: compare whole epochs (4 steps each).
    epoch_means = [np.mean(losses[i:i + 4]) for i in range(0, 24, 4)]
    assert epoch_means[-1] < 0.5 * epoch_means[0], epoch_means
    assert all(np.isfinite(losses)) and all(r["examples_per_s"] > 0 for r in rows)
    assert rows[-1]["elapsed"] >= rows[0]["elapsed"]

    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"] == str(tiny_llama) and config["data"] == str(qa.absolute())
    train_cfg = config["train"]
    assert train_cfg["lr"] == 2e-2 and train_cfg["lora"]["rank"] == 8
    # No --alpha: 2 x rank, written as the number, so the bare --resume (which reads it back)
    # and the PEFT export agree on the scale.
    assert train_cfg["lora"]["alpha"] == 16.0
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["lora_alpha"] == 16.0
    assert train_cfg["mesh"] == [2, 1, 1] and train_cfg["system"] == "Answer briefly."

    assert (run / "adapter" / "adapter_config.json").is_file()
    lora, pure = load_peft_adapter(run, read_model_config(tiny_llama))
    assert lora == LoraConfig(rank=8, alpha=16.0, targets=("q", "k", "v", "o", "gate", "up", "down"))
    b = pure["layers"]["mlp"]["down"]["lora_b"]
    assert np.abs(np.asarray(b)).max() > 0  # trained (lora_B starts at 0)


def test_refuses_to_overwrite_or_resume_with_a_different_setup(trained, capsys):
    qa, run, _, args = trained
    assert main(args) == 2  # no --resume on a folder holding a run
    assert "already holds a training run" in capsys.readouterr().err
    changed = [a if a != "2e-2" else "3e-2" for a in args]
    assert main(changed + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "lr: 0.02 -> 0.03" in err
    other = qa.parent / "other.jsonl"
    other.write_text(qa.read_text().replace("glass", "steel"))
    assert main(["train", "--out", str(run), "--resume", "--data", str(other)]) == 2
    assert "data: the file's content changed" in capsys.readouterr().err
    bad = qa.parent / "bad.jsonl"
    bad.write_text(qa.read_text().splitlines()[0] + "\n" + '{"document": "d", "question": "q"}\n')
    assert main(["train", "--model", args[2], "--data", str(bad), "--out", str(qa.parent / "r")]) == 2
    assert f'{bad}:2: field "answer" is missing' in capsys.readouterr().err  # before any load


def test_init_adapter_starts_from_the_trained_adapter(trained, tiny_llama, tmp_path):
    qa, run, _, args = trained
    run2 = tmp_path / "run2"
    assert main(["train", "--model", str(tiny_llama), "--data", str(qa), "--out", str(run2),
                 "--config", TRAIN_DEFAULTS, "--mesh", "data=2", "--batch-size", "4",
                 "--epochs", "1", "--rank", "4",
                 "--lr", "2e-2", "--system", "Answer briefly.", "--init-adapter", str(run),
                 "--no-progress"]) == 0
    # Same seed and data: step 1 of both runs sees the same batch, and a step's loss is computed
    # before its update, so run2's first loss is the trained adapter's loss on the batch that
    # run 1 started with (from the untrained adapter, i.e. the base model).
    first_fresh, first_init = metrics(run)[0]["loss"], metrics(run2)[0]["loss"]
    assert first_init < 0.5 * first_fresh, (first_init, first_fresh)
    config = yaml.safe_load((run2 / "config.yaml").read_text())
    assert config["train"]["lora"]["rank"] == 8  # the adapter's rank replaces --rank 4
    assert config["init_adapter"] == str(run)


def test_train_default_yaml_lists_every_field_at_its_default():
    import dataclasses

    raw = yaml.safe_load((ROOT / "configs" / "train_default.yaml").read_text())
    assert list(raw) == [f.name for f in dataclasses.fields(TrainConfig)]
    assert list(raw["lora"]) == [f.name for f in dataclasses.fields(LoraConfig)]
    assert load_yaml(TrainConfig, ROOT / "configs" / "train_default.yaml") == TrainConfig()


def test_flags_override_yaml_which_overrides_defaults(tmp_path):
    assert load_yaml(TrainConfig, ROOT / "configs" / "train_default.yaml") == TrainConfig()
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    yaml_path = tmp_path / "c.yaml"
    yaml_path.write_text("lr: 0.005\nepochs: 3\nlora: {rank: 16}\ntau: 1.0\n")
    args = parser.parse_args(["--out", "x", "--config", str(yaml_path), "--epochs", "7",
                              "--alpha", "4", "--targets", "q,v", "--mesh", "data=2,fsdp=2",
                              "--no-remat"])
    cfg = resolve_config(args, None)
    assert (cfg.lr, cfg.epochs, cfg.tau, cfg.mesh, cfg.remat) == (0.005, 7, 1.0, (2, 2, 1), False)
    assert cfg.lora == LoraConfig(rank=16, alpha=4.0, targets=("q", "v"))
    assert cfg.batch_size == TrainConfig().batch_size
    saved = {"train": {**json.loads(json.dumps(TrainConfig(lr=0.1, seed=5).__dict__, default=str)),
                       "lora": {"rank": 2, "alpha": 2.0, "targets": ["q"]}, "mesh": [1, 1, 1]}}
    resumed = resolve_config(parser.parse_args(["--out", "x", "--lr", "0.2"]), saved)
    assert (resumed.lr, resumed.seed, resumed.lora.rank) == (0.2, 5, 2)
    yaml_path.write_text("learning_rate: 1\n")
    with pytest.raises(ValueError, match="unknown key.*learning_rate"):
        resolve_config(parser.parse_args(["--out", "x", "--config", str(yaml_path)]), None)


def test_batch_that_does_not_split_over_the_mesh_is_refused_in_one_line(tiny_llama, tmp_path, capsys):
    data = write_qa(tmp_path / "qa.jsonl")
    args = ["train", "--model", str(tiny_llama), "--data", str(data), "--out", str(tmp_path / "run"),
            "--batch-size", "3", "--mesh", "data=2,fsdp=1,tensor=1", "--no-progress"]
    assert main(args) == 2
    assert "batch_size 3 does not split over the mesh's data x fsdp = 2 devices" in capsys.readouterr().err


def nan_args(model, qa: Path, run: Path, lr: str) -> list[str]:
    return ["train", "--model", str(model), "--data", str(qa), "--out", str(run),
            "--config", TRAIN_DEFAULTS, "--mesh", "data=1", "--batch-size", "4", "--epochs", "3", "--rank", "4", "--lr", lr, "--save-every", "1",
            "--no-progress"]


def saved_steps(run: Path) -> list[int]:
    return sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())


@pytest.mark.slow  # a long tiny-model check: CI's slow step runs it
def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(tiny_llama, tmp_path,
                                                                             capsys):
    import orbax.checkpoint as ocp

    qa, run = write_qa(tmp_path / "qa.jsonl"), tmp_path / "run"
    # lr 1e30: step 1 (warm-up from lr 0) and step 2 are finite, step 2's update blows the weights
    # up, and a later step's loss is inf or nan.
    assert main(nan_args(tiny_llama, qa, run, "1e30")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    found = re.fullmatch(
        r"pdistill train: error: step (\d+): the loss is (nan|inf|-inf) \(gradient norm \S+\); "
        r"training stopped and saved nothing from it \(the last good checkpoint, step (\d+), is "
        r"kept in (.+)\)\. Lower lr \(now 1e\+30\) or check tau \(now 2\) and train into a new "
        r"--out; --resume continues from that checkpoint with the same settings", err)
    assert found, err
    bad, kept = int(found[1]), int(found[3])
    assert found[4] == str((run / "checkpoints").absolute())
    assert bad > 1 and kept == bad - 1 and saved_steps(run)[-1] == kept  # nothing from step `bad`
    assert not (run / "adapter").exists() and not (run / "summary.json").exists()
    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(1, bad))
    assert all(np.isfinite([r["loss"], r["grad_norm"]]).all() for r in rows)
    state = ocp.StandardCheckpointer().restore(run.absolute() / "checkpoints" / str(kept) / "state")
    lora = jax.tree.leaves(state["lora"])
    assert lora and all(np.isfinite(np.asarray(x)).all() for x in lora)

    # --resume restores that checkpoint and, with the same settings, meets the same step again.
    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"resuming from step {kept} " in err and err.strip().splitlines()[-1] == found[0]
    assert saved_steps(run)[-1] == kept and [r["step"] for r in metrics(run)] == list(range(1, bad))


def test_weights_that_overflow_are_never_saved(tiny_llama, tmp_path, capsys):
    qa, run = write_qa(tmp_path / "qa.jsonl"), tmp_path / "run"
    # 1e39 is a finite Python float but not a float32: the schedule's lr, and so the first
    # update, is nan while step 1's loss and gradient (computed before it) are finite.
    assert main(nan_args(tiny_llama, qa, run, "1e39")) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "pdistill train: error: step 1: the LoRA weights or optimizer state after it are not "
        "finite; training stopped before any checkpoint was saved. Lower lr (now 1e+39) or check "
        "tau (now 2) and train into a new --out")
    assert not run.exists()  # nothing was saved, so no stub run folder blocks the next try

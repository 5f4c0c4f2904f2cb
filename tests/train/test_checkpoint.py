"""Orbax checkpoints: exact resume, SIGKILL mid-run, damaged checkpoints, no base weights."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from pdistill_jax.train.checkpoint import RunCheckpoints
from pdistill_jax.config import LoraConfig, TrainConfig
from pdistill_jax.weights.load import load_model
from pdistill_jax.model.sharding import make_mesh
from pdistill_jax.train.step import TrainState, init_train_state

LORA = LoraConfig(rank=4, alpha=8.0, targets=("q", "v", "down"))


def write_qa(path: Path, n: int = 16) -> Path:
    """Rows of near-equal length: every batch has the same padded shape (one compilation)."""
    rows = [{"document": f"The capital of the kingdom of Velloria is Tarsk, founded in {1800 + i}.",
             "question": f"When was Tarsk founded, question {i:02d}?",
             "answer": f"Tarsk was founded in {1800 + i}.", "doc_id": str(i % 4)} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def saved_arrays(state_dir: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """{tree path: (shape, dtype)} of the arrays stored in a checkpoint's state item."""
    import orbax.checkpoint as ocp

    tree = ocp.StandardCheckpointer().metadata(state_dir).item_metadata.tree
    return {jax.tree_util.keystr(path): (tuple(leaf.shape), str(leaf.dtype))
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
            if hasattr(leaf, "shape") and hasattr(leaf, "dtype")}


def lora_arrays(run: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def qa(tmp_path_factory):
    return write_qa(tmp_path_factory.mktemp("qa") / "qa.jsonl")


def cli_args(tiny_llama, qa, run: Path) -> list[str]:
    return ["train", "--model", str(tiny_llama), "--data", str(qa), "--out", str(run),
            "--mesh", "data=1", "--batch-size", "4", "--epochs", "10", "--rank", "4", "--alpha", "8",
            "--targets", "q,v,down", "--lr", "1e-2", "--save-every", "4", "--seed", "3",
            "--no-progress"]


def test_sigkilled_run_resumes_from_its_last_checkpoint_to_the_uninterrupted_result(
        tiny_llama, qa, tmp_path, capfd):
    """Kill -9 a `pdistill train` after its first checkpoint; --resume must lose only the steps
    since the newest finished checkpoint and end with the losses and LoRA of an uninterrupted run."""
    from pdistill_jax.cli import main

    whole, run = tmp_path / "whole", tmp_path / "run"
    assert main(cli_args(tiny_llama, qa, whole)) == 0

    proc = subprocess.Popen([sys.executable, "-m", "pdistill_jax.cli", *cli_args(tiny_llama, qa, run)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt_dir = run / "checkpoints"
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            if ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir()):
                break
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    finished = sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())
    assert finished and finished[-1] < 40
    logged = read_metrics(run)
    assert not (run / "adapter").exists()

    capfd.readouterr()
    assert main(cli_args(tiny_llama, qa, run) + ["--resume"]) == 0
    assert f"resuming from step {finished[-1]} " in capfd.readouterr().err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["finished"] and summary["resumed_from"] == finished[-1]

    a, b = read_metrics(whole), read_metrics(run)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 41))
    kept = [r for r in logged if r["step"] <= finished[-1]]
    assert len(kept) == finished[-1] and b[:len(kept)] == kept  # the killed process's own rows
    for key in ("loss", "grad_norm", "lr"):
        np.testing.assert_allclose([r[key] for r in b], [r[key] for r in a], rtol=1e-6, atol=0)
    assert len({r["loss"] for r in a}) == 40  # real, changing values
    la, lb = lora_arrays(whole), lora_arrays(run)
    assert la.keys() == lb.keys() and la
    for k in la:
        np.testing.assert_allclose(lb[k], la[k], rtol=1e-6, atol=1e-7)
    assert all(np.abs(v).max() > 0 for k, v in la.items() if "lora_B" in k)  # it trained

    # The checkpoint holds the LoRA leaves, their Adam moments and counters -- no base weight.
    with RunCheckpoints(whole / "checkpoints") as ckpts:
        assert ckpts.steps() == [36, 40]  # keep_checkpoints=2
        arrays = saved_arrays(ckpts.directory / "40" / "state")
        meta = ckpts.read_meta(40)
    assert meta["data_position"] == {"epoch": 10, "index": 0} and meta["config"]["lr"] == 1e-2
    lora_bytes = sum(4 * np.prod(s) for k, (s, _) in arrays.items() if k.startswith("['lora']"))
    big = {k: s for k, (s, _) in arrays.items() if np.prod(s) > 1}
    assert all("lora_a" in k or "lora_b" in k for k in big), sorted(big)
    assert not any(w in k for k in arrays for w in ("kernel", "embed", "norm", "bias"))
    total = sum(4 * np.prod(s) for s, _ in arrays.values())
    assert lora_bytes * 3 <= total < lora_bytes * 3 + 1024  # weights + Adam mu + nu + counters
    base_bytes = (tiny_llama / "model.safetensors").stat().st_size
    assert total < 0.2 * base_bytes


def test_sigterm_saves_the_finished_steps_and_resume_continues_from_them(tiny_llama, qa, tmp_path,
                                                                      capfd):
    """A scheduler's SIGTERM ends `pdistill train` like Ctrl-C: a checkpoint of every step it
    finished (not only the last periodic one), exit 143, one line saying how to go on."""
    from pdistill_jax.cli import main

    run = tmp_path / "run"
    args = cli_args(tiny_llama, qa, run)
    args[args.index("--save-every") + 1] = "1000"  # no periodic checkpoint before the end
    proc = subprocess.Popen([sys.executable, "-m", "pdistill_jax.cli", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if (run / "metrics.jsonl").is_file() and len(read_metrics(run)) >= 3:
                break
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=300)[1].decode()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    lines = err.strip().splitlines()
    assert lines[-1] == "pdistill train: terminated (SIGTERM); rerun the same command to resume"
    saved = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    logged = read_metrics(run)
    assert len(saved) == 1 and 3 <= saved[0] < 40 and saved[0] == logged[-1]["step"], (saved, logged)
    assert f"interrupted after step {saved[0]}, checkpoint saved" in err

    capfd.readouterr()
    assert main(args + ["--resume"]) == 0
    assert f"resuming from step {saved[0]} " in capfd.readouterr().err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["finished"] and summary["resumed_from"] == saved[0]
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 41))


def _small_state(model_dir, mesh) -> TrainState:
    model = load_model(model_dir, LORA, with_tokenizer=False).model
    return init_train_state(model, TrainConfig(lora=LORA), 10, mesh)[2]


def _scaled(state: TrainState, scale: float) -> TrainState:
    return state._replace(lora=jax.tree.map(lambda x: x * scale, state.lora),
                          step=state.step + int(scale))


def test_damaged_or_unfinished_newest_checkpoint_falls_back_to_the_previous(tiny_llama, tmp_path,
                                                                            capfd):
    mesh = make_mesh((2, 2, 1))
    directory = tmp_path / "checkpoints"
    state = _small_state(tiny_llama, mesh)
    with RunCheckpoints(directory, keep=3) as ckpts:
        for step in (1, 2, 3):
            ckpts.save(step, _scaled(state, float(step)), {"data_position": {"epoch": 0,
                                                                             "index": step}})
        ckpts.wait()
    # Newest step: truncate its array data files. Also leave an unfinished save behind.
    for path in (directory / "3" / "state").rglob("d/*"):
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size // 2)
    (directory / "4.orbax-checkpoint-tmp-123").mkdir()
    (directory / "4.orbax-checkpoint-tmp-123" / "partial").write_text("x")

    live = _scaled(state, 0.5)
    with RunCheckpoints(directory, keep=3) as ckpts:
        restored = ckpts.restore_latest(live)
        steps_after = ckpts.steps()
        note = ckpts.damage_note()
    err = capfd.readouterr().err
    assert "ignoring unfinished checkpoint 4.orbax-checkpoint-tmp-123" in err
    assert note.startswith("checkpoint step 3 is damaged (") and \
        f"moved to {tmp_path / 'checkpoints.damaged' / '3-'}" in note, note
    assert "Traceback" not in err
    assert restored.step == 2 and restored.meta["data_position"] == {"epoch": 0, "index": 2}
    assert steps_after == [1, 2]
    assert (tmp_path / "checkpoints.damaged").is_dir()  # moved aside, not deleted
    assert not (directory / "4.orbax-checkpoint-tmp-123").exists()
    expected = _scaled(state, 2.0)
    for got, want, like in zip(jax.tree.leaves(restored.state), jax.tree.leaves(expected),
                               jax.tree.leaves(live)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        assert got.sharding == like.sharding  # restored onto the live state's placement
    assert any(len(leaf.sharding.device_set) == 4 and not leaf.sharding.is_fully_replicated
               for leaf in jax.tree.leaves(restored.state))


def test_refuses_to_checkpoint_base_weights(tiny_llama, tmp_path):
    model = load_model(tiny_llama, LORA, with_tokenizer=False).model
    _, lora, base = nnx.split(model, nnx.LoRAParam, nnx.Param)
    with RunCheckpoints(tmp_path / "c") as ckpts:
        with pytest.raises(ValueError, match="refusing to checkpoint base weight"):
            ckpts.save(1, {"lora": lora, "base": base}, {})
        assert ckpts.steps() == []


def _abandon_a_failing_task(message: str) -> None:
    """Runs a coroutine that raises `message` as a Task nobody awaits, then lets it be collected:
    asyncio logs 'Task exception was never retrieved', as for Orbax's abandoned reads."""
    import asyncio
    import gc

    async def read():
        raise ValueError(message)

    loop = asyncio.new_event_loop()
    task = loop.create_task(read())
    loop.run_until_complete(asyncio.sleep(0))
    loop.close()
    del task
    gc.collect()


def test_abandoned_reads_of_a_restored_folder_are_silenced_and_no_others(tmp_path, caplog):
    import logging
    from pdistill_jax.train.checkpoint import _drop_abandoned_reads
    mine, other = tmp_path / "run" / "checkpoints", tmp_path / "elsewhere"
    _drop_abandoned_reads(mine)
    _drop_abandoned_reads(mine)  # a second restore adds no second filter
    assert sum(getattr(f, "directory", None) == str(mine)
               for f in logging.getLogger("asyncio").filters) == 1
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        _abandon_a_failing_task(f'Metadata at "x/.zarray" in "{mine}/2/state/" does not exist')
        assert not [r for r in caplog.records if r.name == "asyncio"], caplog.text
        _abandon_a_failing_task(f'Metadata in "{other}/2/state/" does not exist')
        assert [r for r in caplog.records if r.name == "asyncio"
                and r.getMessage().startswith("Task exception was never retrieved")], caplog.text

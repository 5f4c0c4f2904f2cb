"""`pdistill train` on a real 2-process JAX cluster (JAX's own multi-controller runtime: a
coordinator on 127.0.0.1, one CPU device a process, gloo collectives), against one process driving
two devices with the same mesh: the same adapter and losses, with the teacher cached and with it
run in every step; Orbax checkpoints written by the cluster resume it after both processes are
killed; and one process dying ends the other at once, with one line."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pdistill_jax.cli import main
from test_loop import metrics, write_qa

pytestmark = pytest.mark.cluster  # python -m pytest -m cluster (CI runs it: .ci/run)

PROCESSES = 2


def _args(model: Path, qa: Path, config: Path, epochs: int) -> list[str]:
    return ["--model", str(model), "--data", str(qa), "--config", str(config), "--mesh", "data=2",
            "--batch-size", "4", "--epochs", str(epochs), "--rank", "8", "--lr", "2e-2",
            "--save-every", "5", "--system", "Answer briefly.", "--no-progress"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(argv: list[str], logs: Path) -> list[subprocess.Popen]:
    """The cluster: PROCESSES `pdistill` processes, as docs/distributed.md launches them."""
    port = _free_port()
    procs = []
    for i in range(PROCESSES):
        env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
               "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
               "JAX_NUM_PROCESSES": str(PROCESSES), "JAX_PROCESS_ID": str(i)}
        log = open(logs.with_name(f"{logs.name}.{i}.log"), "w")
        procs.append(subprocess.Popen([sys.executable, "-m", "pdistill_jax.cli", *argv], env=env,
                                      stdout=log, stderr=subprocess.STDOUT))
    return procs


def _wait(procs: list[subprocess.Popen], logs: Path, timeout: float = 600) -> None:
    for i, p in enumerate(procs):
        rc = p.wait(timeout=timeout)
        assert rc == 0, logs.with_name(f"{logs.name}.{i}.log").read_text()[-3000:]


def _committed_steps(run: Path) -> list[int]:
    folder = run / "checkpoints"
    return sorted(int(d.name) for d in folder.iterdir() if d.name.isdigit()) if folder.is_dir() else []


def _wait_for_checkpoint(run: Path, procs: list[subprocess.Popen], timeout: float = 600) -> None:
    end = time.monotonic() + timeout
    while not _committed_steps(run):
        assert all(p.poll() is None for p in procs), "a cluster process ended before its first checkpoint"
        assert time.monotonic() < end, "no checkpoint within the timeout"
        time.sleep(0.05)


def _adapter(run: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(run / "adapter" / "adapter_model.safetensors")


def _same_training(run: Path, ref: Path) -> None:
    a, b = _adapter(run), _adapter(ref)
    assert a.keys() == b.keys()
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) <= 1e-5
    got, want = metrics(run), metrics(ref)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in want], rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def setup(tiny_llama, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cluster")
    configs = {}
    for teacher, gb in (("cached", 4.0), ("in_step", 0)):  # 0: the teacher runs in every step
        configs[teacher] = tmp / f"{teacher}.yaml"
        configs[teacher].write_text(f"teacher_cache_gb: {gb}\n")
    return tiny_llama, write_qa(tmp / "qa.jsonl"), configs, tmp


@pytest.fixture(scope="module")
def references(setup):
    """One process driving two devices (of the test process's 8) with the cluster's mesh."""
    model, qa, configs, tmp = setup
    refs = {}
    for teacher, config in configs.items():
        refs[teacher] = tmp / f"ref_{teacher}"
        assert main(["train", *_args(model, qa, config, 8), "--out", str(refs[teacher])]) == 0
    return refs


@pytest.mark.parametrize("teacher", ["cached", "in_step"])
def test_two_processes_train_what_one_process_on_two_devices_trains(setup, references, teacher):
    model, qa, configs, tmp = setup
    run = tmp / f"cluster_{teacher}"
    _wait(_launch(["train", *_args(model, qa, configs[teacher], 8), "--out", str(run)], run), run)
    _same_training(run, references[teacher])


def test_both_processes_killed_resume_from_the_clusters_checkpoints(setup, references):
    model, qa, configs, tmp = setup
    run = tmp / "killed"
    procs = _launch(["train", *_args(model, qa, configs["cached"], 8), "--out", str(run)], run)
    _wait_for_checkpoint(run, procs)
    for p in procs:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert not (run / "adapter").exists()  # killed mid-run (32 steps, the first checkpoint at 5)
    steps = _committed_steps(run)
    _wait(_launch(["train", "--out", str(run), "--resume", "--no-progress"], run.with_name("resumed")),
          run.with_name("resumed"))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["finished"] and summary["resumed_from"] in steps
    _same_training(run, references["cached"])


def test_one_process_dying_ends_the_other_at_once_with_one_line(setup):
    model, qa, configs, tmp = setup
    dies = 1  # by hand, killing process 0 (the coordinator's) ended process 1 as fast
    run = tmp / "one_dies"
    # No checkpoints: the survivor is then in the steps' collectives, not in a checkpoint's
    # coordination barrier (that one ends only by JAX's heartbeat timeout, 100 s, and an abort).
    procs = _launch(["train", *_args(model, qa, configs["cached"], 400), "--save-every", "100000",
                     "--out", str(run)], run)
    end = time.monotonic() + 600
    while not (run / "metrics.jsonl").exists() or len(metrics(run)) < 20:  # steps are running
        assert all(p.poll() is None for p in procs) and time.monotonic() < end
        time.sleep(0.05)
    procs[dies].send_signal(signal.SIGKILL)
    start = time.monotonic()
    survivor = procs[1 - dies]
    rc = survivor.wait(timeout=180)
    waited = time.monotonic() - start
    procs[dies].wait()
    # Today's JAX would wait in its shutdown barrier for the dead process's heartbeat timeout
    # (100 s) and then abort; pdistill exits as soon as the collective fails.
    assert rc == 2 and waited < 30, waited
    last = run.with_name(f"{run.name}.{1 - dies}.log").read_text().strip().splitlines()[-1]
    assert last.startswith("pdistill train: error: ") and \
        f"process {1 - dies} of 2: this run of the cluster ends" in last and "--resume" in last

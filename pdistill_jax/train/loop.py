"""The training loop: model + data + step + checkpoints -> a PEFT adapter in a run folder.

Run folder (RUN):
  config.yaml     the resolved TrainConfig, the model and the data (with its sha256)
  metrics.jsonl   one row per optimizer step: step, epoch, loss, grad_norm, lr, answer_tokens,
                  examples_per_s and elapsed (both measured over the log window of that step)
  checkpoints/    Orbax checkpoints of the trainable state (see checkpoint.py)
  adapter/        the final adapter as a PEFT folder (`pdistill answer --adapter RUN`, peft, vLLM)
  summary.json    counts, losses and timings of the run

A resumed run restores the newest good checkpoint (LoRA, optimizer state, step, data position)
and continues exactly where it was: the same batches in the same order, the same losses.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from pdistill_jax.train.checkpoint import RunCheckpoints
from pdistill_jax.config import TrainConfig, from_dict, read_yaml, to_dict
from pdistill_jax.train.batches import DataPosition, TrainData, make_train_data
from pdistill_jax.datagen.dataset import read_qa_rows, resolve_data_file
from pdistill_jax.files import read_jsonl, write_jsonl_atomic, write_text_atomic
from pdistill_jax.train.teacher_cache import (attach_teacher_hidden, compute_teacher_cache,
                                              compute_teacher_cache_shared, teacher_cache_bytes)
from pdistill_jax.datagen.teacher_states import (TEACHER_STATES_DIR, load_teacher_states,
                                                 model_fingerprint, teacher_sequence_key)

CONFIG_FILE, METRICS_FILE, SUMMARY_FILE = "config.yaml", "metrics.jsonl", "summary.json"
CHECKPOINT_DIR, ADAPTER_DIR = "checkpoints", "adapter"
# TrainConfig fields a resumed run may change: they affect speed or bookkeeping, not the
# optimisation problem, the schedule or the data order.
RESUMABLE_CHANGES = ("mesh", "remat", "compute_dtype", "save_every", "keep_checkpoints",
                     "log_every", "teacher_cache_gb")


def _say(message: str) -> None:
    if jax.process_index() == 0:
        print(f"pdistill train: {message}", file=sys.stderr, flush=True)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def config_differences(old: dict, new: dict) -> list[str]:
    """'field: old -> new' for every difference that makes a resumed run a different run."""
    diffs = []
    for key in sorted(set(old) | set(new)):
        if key in RESUMABLE_CHANGES or old.get(key) == new.get(key):
            continue
        diffs.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
    return diffs


def read_run_config(out_dir: str | Path) -> dict | None:
    """RUN/config.yaml as a dict ({"model", "data", "train": {...}, ...}), None if absent."""
    path = Path(out_dir) / CONFIG_FILE
    if not path.exists():
        return None
    return read_yaml(path)[0]


def _check_out_dir(out: Path, resume: bool) -> None:
    markers = [n for n in (CHECKPOINT_DIR, METRICS_FILE, CONFIG_FILE, SUMMARY_FILE)
               if (out / n).exists() and not (n == CHECKPOINT_DIR and not any((out / n).iterdir()))]
    if markers and not resume:
        raise ValueError(f"--out {out} already holds a training run ({', '.join(markers)}); pass "
                         "--resume to continue it, or choose a new --out")


def _compute_dtype(cfg: TrainConfig):
    return jnp.bfloat16 if cfg.compute_dtype == "bfloat16" else jnp.float32


def _load_model(model_spec: str, cfg: TrainConfig, init_adapter: str | None):
    """(LoadedModel, cfg): with --init-adapter the adapter's rank/alpha/targets replace cfg.lora
    and its weights replace the fresh LoRA initialisation."""
    from pdistill_jax.weights.load import load_model

    dtype = _compute_dtype(cfg)
    # bf16 runs store the frozen base in bf16 too (half the memory); LoRA always stays float32.
    lm = load_model(model_spec, None if init_adapter is not None else cfg.lora,
                    adapter=init_adapter, seed=cfg.seed, dtype=dtype, param_dtype=dtype,
                    remat=cfg.remat)
    if init_adapter is not None:
        if lm.lora != cfg.lora:
            _say(f"--init-adapter {init_adapter}: using its LoRA rank={lm.lora.rank} "
                 f"alpha={lm.lora.alpha:g} targets={','.join(lm.lora.targets)}")
        cfg = dataclasses.replace(cfg, lora=lm.lora)
    return lm, cfg


def _local_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """This process's consecutive slice of the global batch (all of it on one process)."""
    n, p = jax.process_count(), jax.process_index()
    if n == 1:
        return batch
    return {k: np.array_split(v, n)[p] for k, v in batch.items()}


def _trim_metrics(path: Path, last_step: int) -> None:
    """Drops rows logged after the checkpoint we resume from (those steps are redone), and a last
    line torn by a kill in the middle of a write."""
    if jax.process_index() != 0 or not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = []
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):
                break
            raise ValueError(f"{path}:{n}: invalid JSON in the middle of the metrics log; "
                             "the run folder was edited or is damaged") from None
        if row.get("step", 0) <= last_step:
            kept.append(row)
    if len(kept) != len(lines):
        write_jsonl_atomic(path, kept)


class NonFiniteLoss(RuntimeError):
    """A step's loss, gradient or weights are inf or NaN; train() turns it into a one-line error."""

    def __init__(self, step: int, what: str):
        super().__init__(f"step {step}: {what}")
        self.step, self.what = step, what


def _non_finite_message(e: NonFiniteLoss, cfg: TrainConfig, checkpoints: RunCheckpoints) -> str:
    kept = checkpoints.latest_step()
    fix = f"Lower lr (now {cfg.lr:g}) or check tau (now {cfg.tau:g}) and train into a new --out"
    if kept is None:
        return f"step {e.step}: {e.what}; training stopped before any checkpoint was saved. {fix}"
    return (f"step {e.step}: {e.what}; training stopped and saved nothing from it (the last good "
            f"checkpoint, step {kept}, is kept in {checkpoints.directory}). {fix}; --resume "
            "continues from that checkpoint with the same settings")


@jax.jit
def _all_finite(tree) -> jax.Array:
    leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.stack(leaves).all() if leaves else jnp.array(True)


class _MetricsLog:
    """Buffers per-step device metrics and writes them every `every` steps, so the host waits on
    the device once per log window instead of once per step."""

    def __init__(self, path: Path, steps_per_epoch: int, every: int, elapsed0: float, bar):
        self.path, self.spe, self.every, self.bar = path, steps_per_epoch, max(1, every), bar
        self.elapsed0, self.session_start = elapsed0, time.perf_counter()
        self.pending: list[tuple[int, int, Any]] = []
        self.window_start = self.session_start

    def add(self, step: int, examples: int, metrics: Any) -> None:
        self.pending.append((step, examples, metrics))
        if step % self.every == 0:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        values = jax.device_get([m for _, _, m in self.pending])  # waits for the device
        now = time.perf_counter()
        window = max(now - self.window_start, 1e-9)
        rate = sum(e for _, e, _ in self.pending) / window
        elapsed = self.elapsed0 + now - self.session_start
        rows = [{"step": step, "epoch": round(step / self.spe, 4), "loss": float(v["loss"]),
                 "grad_norm": float(v["grad_norm"]), "lr": float(v["lr"]),
                 "answer_tokens": int(v["answer_tokens"]), "examples_per_s": round(rate, 3),
                 "elapsed": round(elapsed, 3)}
                for (step, _, _), v in zip(self.pending, values)]
        bad = next((r for r in rows if not np.isfinite([r["loss"], r["grad_norm"]]).all()), None)
        if bad is not None:  # log the good steps only; the caller saves nothing after this
            rows = rows[:rows.index(bad)]
            self.pending = []
        if jax.process_index() == 0:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write("".join(json.dumps(r) + "\n" for r in rows))
        if bad is not None:
            raise NonFiniteLoss(bad["step"], f"the loss is {bad['loss']} (gradient norm "
                                             f"{bad['grad_norm']})")
        self.bar.set_postfix(loss=f"{np.mean([r['loss'] for r in rows]):.4f}",
                             ex_s=f"{rate:.1f}", refresh=False)
        self.pending, self.window_start = [], now

    @property
    def elapsed(self) -> float:
        return self.elapsed0 + time.perf_counter() - self.session_start


def train(model_spec: str, data_path: str | Path, out_dir: str | Path, cfg: TrainConfig, *,
          resume: bool = False, init_adapter: str | None = None, stop_after: int | None = None,
          progress: bool = True) -> dict:
    """Trains a LoRA student and returns the summary (also written to RUN/summary.json).

    resume: continue from the newest good checkpoint in RUN/checkpoints (refused if the run's
      config differs in a way that changes the run). Without it, RUN must not hold a run.
    init_adapter: start from this PEFT adapter's weights (and rank/alpha/targets).
    stop_after: stop after this many steps in this call, with a checkpoint (for time-limited
      sessions; continue with resume=True). The schedule still spans all epochs.
    """
    from tqdm import tqdm

    from pdistill_jax.weights.peft import save_peft_adapter
    from pdistill_jax.model.sharding import global_batch, initialize_distributed, make_mesh
    from pdistill_jax.train.step import init_train_state, make_train_step

    if stop_after is not None and stop_after < 1:
        raise ValueError(f"stop_after must be >= 1, got {stop_after}")
    initialize_distributed()
    session_start = time.perf_counter()
    out = Path(out_dir)
    _check_out_dir(out, resume)
    data_file = resolve_data_file(data_path).absolute()
    data_sha = file_sha256(data_file)
    qa_rows = read_qa_rows(data_file)  # bad rows are reported before the slow model load
    if init_adapter is not None and not resume:
        from pdistill_jax.weights.peft import resolve_adapter

        resolve_adapter(init_adapter, "--init-adapter")

    fresh = not out.exists()
    checkpoints = RunCheckpoints(out / CHECKPOINT_DIR, keep=cfg.keep_checkpoints)
    try:
        saved = checkpoints.latest_meta() if resume else None
        if resume and saved is None:
            if checkpoints.damaged:
                raise ValueError(checkpoints.no_usable_checkpoint())
            _say(f"--resume: no checkpoint in {out / CHECKPOINT_DIR}; starting from step 0")
        if saved is not None:
            _check_resume(saved, cfg, model_spec, data_sha, init_adapter)
            cfg = dataclasses.replace(cfg, lora=from_dict(TrainConfig, saved["config"]).lora)
            # The checkpoint's LoRA replaces any initial adapter; keep the record of the first one.
            init_adapter = saved.get("init_adapter")

        lm, cfg = _load_model(model_spec, cfg, None if saved is not None else init_adapter)
        rows_per_step = cfg.batch_size * cfg.grad_accum
        data = make_train_data(qa_rows, lm.tokenizer, objective=cfg.objective,
                               max_seq_len=cfg.max_seq_len, system=cfg.system,
                               rows_per_step=rows_per_step, seed=cfg.seed)
        cache_teacher = cfg.objective != "ce" and _teacher_cache_fits(data, lm.cfg.hidden_size, cfg)
        runs_teacher = cfg.objective != "ce" and not cache_teacher
        data = dataclasses.replace(data, order_by=data.order_by if runs_teacher else "student",
                                   share_student_prefix=True)
        spe = data.steps_per_epoch
        total_steps = spe * cfg.epochs
        _say(f"{len(data.examples)} training rows from {data_file} ({data.truncated} with the "
             f"document truncated, {data.skipped} skipped: longer than max_seq_len="
             f"{cfg.max_seq_len}); {spe} steps/epoch x {cfg.epochs} epochs = {total_steps} steps "
             f"of {rows_per_step} rows")

        mesh = make_mesh(cfg.mesh)
        shards = mesh.shape["data"] * mesh.shape["fsdp"]
        if cfg.batch_size % shards:
            raise ValueError(f"batch_size {cfg.batch_size} does not split over the mesh's data x fsdp "
                             f"= {shards} devices; use a multiple of {shards} or a smaller --mesh "
                             "(e.g. data=1,fsdp=1,tensor=1)")
        graphdef, base, state, optimizer = init_train_state(lm.model, cfg, total_steps, mesh)
        lm.model = None  # the base now lives (sharded) in `base`; drop the unsharded copy
        step_fn = make_train_step(graphdef, optimizer, cfg, mesh, student_prefix=data.student_prefix)

        position, elapsed0, resumed_from = DataPosition(), 0.0, None
        if saved is not None:
            restored = checkpoints.restore_latest(state)
            if restored is not None:
                state, resumed_from = restored.state, restored.step
                position = DataPosition(**restored.meta["data_position"])
                elapsed0 = float(restored.meta.get("elapsed_s", 0.0))
                if position.global_step(spe) != restored.step:
                    raise ValueError(f"checkpoint step {restored.step} in {out / CHECKPOINT_DIR} "
                                     f"does not match its data position {position}; the data "
                                     "changed since it was saved")
                _say(f"{checkpoints.damage_note()}resuming from step {restored.step} "
                     f"(epoch {position.epoch}, batch {position.index})")
            else:
                raise ValueError(checkpoints.no_usable_checkpoint())
        start_step = position.global_step(spe)
        teacher_cache, teacher_cache_s, teacher_reused = None, None, 0
        if cache_teacher and start_step < total_steps:
            stored = (data_file.parent / TEACHER_STATES_DIR, model_fingerprint(lm.path))
            teacher_cache, teacher_cache_s, teacher_reused = _teacher_cache(
                data, lm.cfg.hidden_size, cfg, graphdef, state, base, mesh, stored)

        run_config = {"model": str(model_spec), "model_path": str(lm.path), "data": str(data_file),
                      "data_sha256": data_sha, "init_adapter": init_adapter,
                      "train": to_dict(cfg)}
        if jax.process_index() == 0:
            write_text_atomic(out / CONFIG_FILE, yaml.safe_dump(run_config, sort_keys=False))
        _trim_metrics(out / METRICS_FILE, start_step)

        def meta(pos: DataPosition, elapsed: float) -> dict:
            return {"data_position": dataclasses.asdict(pos), "config": to_dict(cfg),
                    "model": str(model_spec), "data_sha256": data_sha, "elapsed_s": elapsed,
                    "total_steps": total_steps, "init_adapter": init_adapter}

        bar = tqdm(total=total_steps, initial=start_step, unit="step", file=sys.stderr,
                   dynamic_ncols=True, disable=not progress or jax.process_index() != 0)
        log = _MetricsLog(out / METRICS_FILE, spe, cfg.log_every, elapsed0, bar)

        def save(step: int, state, position: DataPosition) -> None:
            """A checkpoint of `state` after `step`, only when every step up to it and the
            weights it holds are finite (checked on the host: the save fetches `state` anyway)."""
            log.flush()  # the metrics file then covers every step a resume keeps
            if not bool(_all_finite(state)):
                raise NonFiniteLoss(step, "the LoRA weights or optimizer state after it are "
                                          "not finite")
            checkpoints.save(step, state, meta(position, log.elapsed))

        step, first_step_s, first_rows, examples_seen = start_step, None, 0, 0
        next_position = position
        try:
            loop_start = time.perf_counter()
            for pos, indices, batch in data.batches(position, cfg.epochs):
                if teacher_cache is not None:
                    batch = attach_teacher_hidden(batch, indices, teacher_cache)
                state, metrics = step_fn(state, base, global_batch(_local_rows(batch), mesh))
                step += 1
                if first_step_s is None:  # compilation included: reported separately
                    jax.block_until_ready(metrics)
                    first_step_s = time.perf_counter() - loop_start
                    first_rows = len(indices)
                examples_seen += len(indices)
                next_position = pos.advance(spe)
                bar.update(1)
                log.add(step, len(indices), metrics)
                if step % cfg.save_every == 0:
                    save(step, state, next_position)
                if stop_after is not None and step - start_step >= stop_after:
                    break
            log.flush()  # waits for the last step
            loop_s = time.perf_counter() - loop_start
            save(step, state, next_position)
        except KeyboardInterrupt:
            try:  # keep the finished steps; `state` may be unusable if the interrupt hit mid-step
                save(step, state, next_position)
                checkpoints.wait()
                _say(f"interrupted after step {step}, checkpoint saved; continue with --resume")
            except Exception:  # noqa: BLE001 - the last periodic checkpoint still stands
                _say("interrupted; continue from the last checkpoint with --resume")
            raise
        except NonFiniteLoss as e:
            checkpoints.wait()
            raise RuntimeError(_non_finite_message(e, cfg, checkpoints)) from None
        finally:
            bar.close()
        checkpoints.wait()
        finished = step >= total_steps
        adapter = None
        if finished:
            adapter = save_peft_adapter(out / ADAPTER_DIR, state.lora, lm.cfg, cfg.lora,
                                        str(model_spec))
            _say(f"adapter written to {adapter}")
        else:
            _say(f"stopped at step {step} of {total_steps}; continue with --resume")
        summary = _summary(out, step, total_steps, cfg, data, first_step_s, first_rows,
                           examples_seen, loop_s, session_start, log, resumed_from, adapter)
        summary["teacher_cache_s"] = teacher_cache_s
        summary["teacher_rows_from_generation"] = teacher_reused
        if jax.process_index() == 0:
            write_text_atomic(out / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
        return summary
    except BaseException:
        if not resume:
            checkpoints.close()  # lets a save in flight finish before looking for checkpoints
            _remove_unstarted_run(out, fresh)
        raise
    finally:
        checkpoints.close()


def _remove_unstarted_run(out: Path, fresh: bool) -> None:
    """After a new run failed before its first checkpoint (a bad model, a batch that does not fit
    the mesh, ...), removes what it wrote, so that the same command, fixed, can run again without
    --resume. A run with a checkpoint is kept: --resume continues it."""
    directory = out / CHECKPOINT_DIR
    if jax.process_index() != 0 or (directory.is_dir() and any(
            p.name.isdigit() for p in directory.iterdir())):
        return
    if fresh:
        shutil.rmtree(out, ignore_errors=True)
        return
    shutil.rmtree(directory, ignore_errors=True)
    for name in (CONFIG_FILE, METRICS_FILE, SUMMARY_FILE):
        (out / name).unlink(missing_ok=True)


def _teacher_cache_fits(data: TrainData, hidden_size: int, cfg: TrainConfig) -> bool:
    """Whether the teacher's hidden states at the answer positions fit cfg.teacher_cache_gb (if
    not, the step runs the teacher itself)."""
    need = teacher_cache_bytes(data.examples, hidden_size, _compute_dtype(cfg))
    if need > cfg.teacher_cache_gb * 2**30:
        if cfg.teacher_cache_gb > 0:
            _say(f"the teacher's hidden states would take {need / 2**30:.1f} GiB, more than "
                 f"teacher_cache_gb={cfg.teacher_cache_gb:g}: the teacher runs in every step")
        return False
    return True


def _teacher_cache(data: TrainData, hidden_size: int, cfg: TrainConfig, graphdef, state, base,
                   mesh, stored: tuple[Path, str]) -> tuple[list[np.ndarray], float, int]:
    """The teacher's hidden states at every row's answer positions, computed once.

    stored: (folder, model fingerprint) of the states generation kept; rows whose teacher
    sequence they hold are taken from there (one process only: on a pod every process must run
    the same teacher batches, and their disks need not hold the same files)."""
    from pdistill_jax.model.sharding import global_batch
    from pdistill_jax.train.step import make_teacher_hidden

    dtype = _compute_dtype(cfg)
    need = teacher_cache_bytes(data.examples, hidden_size, dtype)
    start = time.perf_counter()
    examples = data.examples
    if jax.process_count() == 1:
        folder, fingerprint = stored
        keys = [teacher_sequence_key(fingerprint, dtype, e.teacher[:-1]) for e in examples]
        found = load_teacher_states(folder, keys) if folder.is_dir() else {}
        cache: list = [found.get(k) for k in keys]
        for i, (e, h) in enumerate(zip(examples, cache)):
            if h is not None and h.shape != (len(e.targets), hidden_size):
                cache[i] = None  # cannot happen for a matching key; never trust a file blindly
        todo = [i for i, h in enumerate(cache) if h is None]
        if todo:
            computed = compute_teacher_cache_shared([examples[i] for i in todo], cfg.batch_size,
                                                    graphdef, state.lora, base)
            for i, h in zip(todo, computed):
                cache[i] = h
        reused = len(examples) - len(todo)
    else:  # every process feeds its own rows of a batch-sharded teacher forward
        hidden_fn = make_teacher_hidden(graphdef, mesh)
        cache = compute_teacher_cache(
            examples, cfg.batch_size, lambda batch: hidden_fn(state.lora, base, batch),
            lambda batch: global_batch(_local_rows(batch), mesh), data.pad_id)
        reused = 0
    seconds = time.perf_counter() - start
    source = (f"{reused} rows from the states generation kept, the teacher run once over "
              f"{len(cache) - reused}" if reused else f"teacher run once over {len(cache)} rows")
    _say(f"{source}: its hidden states at the answer positions kept ({need / 2**20:.0f} MiB) "
         f"in {seconds:.0f} s")
    return cache, round(seconds, 3), reused


def _check_resume(saved: dict, cfg: TrainConfig, model_spec: str, data_sha: str,
                  init_adapter: str | None) -> None:
    new = to_dict(cfg)
    if saved.get("init_adapter") is not None:  # the LoRA shape came from that adapter, not flags
        new["lora"] = saved.get("config", {}).get("lora")
    diffs = config_differences(saved.get("config", {}), new)
    if saved.get("model") != str(model_spec):
        diffs.append(f"model: {saved.get('model')!r} -> {str(model_spec)!r}")
    if saved.get("data_sha256") != data_sha:
        diffs.append("data: the file's content changed (sha256 differs)")
    if diffs:
        raise ValueError("--resume: this run was checkpointed with a different setup ("
                         + "; ".join(diffs) + "); resume with the original settings or "
                         "train into a new --out")
    if init_adapter is not None:
        _say("--resume: ignoring --init-adapter, the checkpoint holds the adapter to continue")


def _summary(out: Path, step: int, total_steps: int, cfg: TrainConfig, data: TrainData,
             first_step_s: float | None, first_rows: int, examples_seen: int,
             loop_s: float, session_start: float,
             log: _MetricsLog, resumed_from: int | None, adapter: Path | None) -> dict:
    rows = read_jsonl(out / METRICS_FILE) if (out / METRICS_FILE).exists() else []
    losses = [r["loss"] for r in rows]
    tail = losses[-max(1, min(len(losses) // 10, 50)):] if losses else []
    wall = time.perf_counter() - session_start
    # Throughput after the first step, which includes compilation (reported as first_step_s).
    steady_s = loop_s - (first_step_s or 0.0)
    steady_rows = examples_seen - first_rows
    return {
        "finished": step >= total_steps, "steps": step, "total_steps": total_steps,
        "steps_per_epoch": data.steps_per_epoch, "epochs": cfg.epochs, "objective": cfg.objective,
        "rows": len(data.examples), "rows_truncated": data.truncated,
        "rows_skipped": data.skipped, "resumed_from": resumed_from,
        "first_loss": losses[0] if losses else None,
        "final_loss": float(np.mean(tail)) if tail else None,  # mean of the last ~10% of steps
        "session_wall_s": round(wall, 3), "elapsed_s": round(log.elapsed, 3),
        "first_step_s": None if first_step_s is None else round(first_step_s, 3),  # + compile
        "examples_per_s": (round(steady_rows / steady_s, 3)
                           if steady_rows and steady_s > 0 else None),
        "adapter": None if adapter is None else str(adapter),
    }

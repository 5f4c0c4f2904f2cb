"""The training loop: model + data + step + checkpoints -> a PEFT adapter in a run folder.

`train()` reads top to bottom as its steps: check the inputs and the run folder, find the
checkpoint to resume from, load the model and the data, restore the state, compute the teacher
cache, run the steps, and finish (adapter, summary). The run folder's layout is in run_folder.py.

A resumed run restores the newest good checkpoint (LoRA, optimizer state, step, data position)
and continues exactly where it was: the same batches in the same order, the same losses.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pdistill_jax.config import ModelConfig, TrainConfig, differences, from_dict, to_dict
from pdistill_jax.files import read_jsonl, write_text_atomic
from pdistill_jax.log import logger
from pdistill_jax.model.transformer import compute_dtype, resolve_dtype
from pdistill_jax.signals import raise_if_terminated, steps_finish_first
from pdistill_jax.datagen.dataset import QARow, read_qa_rows, resolve_data_file
from pdistill_jax.train.batches import DataPosition, TrainData, make_train_data
from pdistill_jax.train.checkpoint import RunCheckpoints
from pdistill_jax.train.dev_set import DevHistory, dev_batches, measures_at, split_dev_rows
from pdistill_jax.train.metrics import MetricsLog, NonFiniteLoss, trim_metrics
from pdistill_jax.train.run_folder import (ADAPTER_DIR, CHECKPOINT_DIR, DEV_BEST_DIR, DEV_BEST_FILE,
                                           METRICS_FILE, RETENTION_FILE, SUMMARY_FILE, check_out_dir,
                                           file_sha256, remove_unstarted_run, write_run_config)
from pdistill_jax.train.student_cache import (attach_student_lower, compute_student_cache,
                                              student_cache_bytes)
from pdistill_jax.train.teacher_cache import (attach_teacher_hidden, compute_teacher_cache,
                                              compute_teacher_cache_shared, teacher_cache_bytes)
from pdistill_jax.datagen.teacher_states import (TEACHER_STATES_DIR, load_teacher_states,
                                                 model_fingerprint, teacher_sequence_key)

_log = logger("train")
# TrainConfig fields a resumed run may change: they affect speed or bookkeeping, not the
# optimisation problem, the schedule or the data order.
RESUMABLE_CHANGES = ("mesh", "remat", "compute_dtype", "save_every", "keep_checkpoints",
                     "log_every", "teacher_cache_gb")


@dataclasses.dataclass(frozen=True)
class RunInputs:
    """What train() checked before anything was loaded."""

    model_spec: str
    out: Path
    data_file: Path
    data_sha: str
    qa_rows: list[QARow]
    fresh: bool  # RUN did not exist before this call


@dataclasses.dataclass
class Run:
    """Everything the steps share once the model and the data are loaded."""

    inputs: RunInputs
    cfg: TrainConfig  # resolved: the LoRA shape of the checkpoint or the initial adapter
    init_adapter: str | None  # the adapter the run first started from (the record of it)
    model_cfg: ModelConfig
    model_path: Path
    data: TrainData
    cache_teacher: bool
    cache_lower: bool  # the states entering lora.first_layer, computed once (student_cache.py)
    total_steps: int
    mesh: Any
    graphdef: nnx.GraphDef
    base: nnx.State
    step_fn: Any
    retention: Any = None  # RetentionBatches with retention_weight > 0
    dev: "DevSet | None" = None  # with dev_share > 0


@dataclasses.dataclass
class DevSet:
    """The rows held out of training (dev_set.py) and what measures the objective on them."""

    examples: list  # Example
    questions: int
    loss_fn: Any  # make_dev_loss
    batches: list | None = None  # (indices, batch), with the cached states attached


@dataclasses.dataclass
class Start:
    """Where this call's steps begin: a fresh state at step 0, or a restored checkpoint."""

    state: Any  # TrainState
    position: DataPosition = DataPosition()
    elapsed0: float = 0.0
    resumed_from: int | None = None
    dev: DevHistory = dataclasses.field(default_factory=DevHistory)


@dataclasses.dataclass
class TeacherCache:
    hidden: list[np.ndarray] | None = None  # per row, (answer tokens, D); None: the step runs it
    seconds: float | None = None
    reused: int = 0  # rows taken from the states generation kept


@dataclasses.dataclass
class LowerCache:
    states: list[np.ndarray] | None = None  # per row, (student tokens, D); None: the step runs them
    seconds: float | None = None


@dataclasses.dataclass
class Progress:
    """What the loop did in this call, for the summary."""

    state: Any
    step: int
    log: MetricsLog
    dev: DevHistory
    first_step_s: float | None = None  # compilation included
    first_rows: int = 0
    examples_seen: int = 0
    loop_s: float = 0.0


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
    from pdistill_jax.model.sharding import initialize_distributed

    if stop_after is not None and stop_after < 1:
        raise ValueError(f"stop_after must be >= 1, got {stop_after}")
    initialize_distributed()
    # "auto" as the dtype it is on this backend: config.yaml and the checkpoints record that
    cfg = dataclasses.replace(cfg, compute_dtype=resolve_dtype(cfg.compute_dtype))
    session_start = time.perf_counter()
    inputs = _check_inputs(model_spec, data_path, out_dir, resume, init_adapter)
    checkpoints = RunCheckpoints(inputs.out / CHECKPOINT_DIR, keep=cfg.keep_checkpoints)
    try:
        saved = _resume_point(checkpoints, inputs, cfg, resume, init_adapter)
        if saved is not None:
            cfg = dataclasses.replace(cfg, lora=from_dict(TrainConfig, saved["config"]).lora)
            # The checkpoint's LoRA replaces any initial adapter; keep the record of the first one.
            init_adapter = saved.get("init_adapter")
        run, state = _prepare(inputs, cfg, init_adapter, load_adapter=saved is None)
        start = _restore(run, checkpoints, state) if saved is not None else Start(state)
        start_step = start.position.global_step(run.data.steps_per_epoch)
        steps_left = start_step < run.total_steps and not start.dev.stopped_early
        teacher = _teacher_cache(run, start.state) if (
            run.cache_teacher and steps_left) else TeacherCache()
        lower = _lower_cache(run, start.state) if run.cache_lower and steps_left else LowerCache()
        retention_s = _retention_cache(run, start.state, teacher, lower) if (
            run.retention is not None and steps_left) else None
        if run.dev is not None and steps_left:
            _dev_batches(run, start.state)
        write_run_config(inputs.out, {
            "model": str(model_spec), "model_path": str(run.model_path),
            "data": str(inputs.data_file), "data_sha256": inputs.data_sha,
            "init_adapter": run.init_adapter, "train": to_dict(run.cfg)})
        trim_metrics(inputs.out / METRICS_FILE, start_step)
        done = _run_steps(run, start, teacher, lower, checkpoints, stop_after, progress)
        return _finish(run, done, start, teacher, lower, session_start, retention_s)
    except BaseException:
        if not resume:
            checkpoints.close()  # lets a save in flight finish before looking for checkpoints
            remove_unstarted_run(inputs.out, inputs.fresh)
        raise
    finally:
        checkpoints.close()


def _check_inputs(model_spec: str, data_path: str | Path, out_dir: str | Path, resume: bool,
                  init_adapter: str | None) -> RunInputs:
    """The run folder, the data and the initial adapter, checked before the slow model load."""
    out = Path(out_dir)
    check_out_dir(out, resume)
    data_file = resolve_data_file(data_path).absolute()
    data_sha = file_sha256(data_file)
    qa_rows = read_qa_rows(data_file)  # bad rows are reported before the slow model load
    if init_adapter is not None and not resume:
        from pdistill_jax.weights.peft import resolve_adapter

        resolve_adapter(init_adapter, "--init-adapter")
    return RunInputs(model_spec, out, data_file, data_sha, qa_rows, fresh=not out.exists())


def _resume_point(checkpoints: RunCheckpoints, inputs: RunInputs, cfg: TrainConfig, resume: bool,
                  init_adapter: str | None) -> dict | None:
    """The meta of the checkpoint to resume from (None: start at step 0), its setup checked."""
    saved = checkpoints.latest_meta() if resume else None
    if resume and saved is None:
        if checkpoints.damaged:
            raise ValueError(checkpoints.no_usable_checkpoint())
        _log.info(f"--resume: no checkpoint in {inputs.out / CHECKPOINT_DIR}; starting from step 0")
    if saved is not None:
        _check_resume(saved, cfg, inputs, init_adapter)
    return saved


def _check_resume(saved: dict, cfg: TrainConfig, inputs: RunInputs, init_adapter: str | None) -> None:
    new = to_dict(cfg)
    if saved.get("init_adapter") is not None:  # the LoRA shape came from that adapter, not flags
        new["lora"] = saved.get("config", {}).get("lora")
    diffs = differences(saved.get("config", {}), new, ignore=RESUMABLE_CHANGES)
    if saved.get("model") != str(inputs.model_spec):
        diffs.append(f"model: {saved.get('model')!r} -> {str(inputs.model_spec)!r}")
    if saved.get("data_sha256") != inputs.data_sha:
        diffs.append("data: the file's content changed (sha256 differs)")
    if diffs:
        raise ValueError("--resume: this run was checkpointed with a different setup ("
                         + "; ".join(diffs) + "); resume with the original settings or "
                         "train into a new --out")
    if init_adapter is not None:
        _log.info("--resume: ignoring --init-adapter, the checkpoint holds the adapter to continue")


def _load_model(model_spec: str, cfg: TrainConfig, init_adapter: str | None):
    """(LoadedModel, cfg): with --init-adapter the adapter's rank/alpha/targets replace cfg.lora
    and its weights replace the fresh LoRA initialisation."""
    from pdistill_jax.weights.load import load_model

    dtype = compute_dtype(cfg.compute_dtype)
    # bf16 runs store the frozen base in bf16 too (half the memory); LoRA always stays float32.
    lm = load_model(model_spec, None if init_adapter is not None else cfg.lora,
                    adapter=init_adapter, seed=cfg.seed, dtype=dtype, param_dtype=dtype,
                    remat=cfg.remat)
    if init_adapter is not None:
        if lm.lora != cfg.lora:
            _log.info(f"--init-adapter {init_adapter}: using its LoRA rank={lm.lora.rank} "
                      f"alpha={lm.lora.alpha:g} targets={','.join(lm.lora.targets)}")
        cfg = dataclasses.replace(cfg, lora=lm.lora)
    return lm, cfg


def _prepare(inputs: RunInputs, cfg: TrainConfig, init_adapter: str | None,
             load_adapter: bool) -> tuple[Run, Any]:
    """The run (model, batch plan, mesh, jitted step) and the fresh sharded TrainState."""
    from pdistill_jax.model.sharding import check_batch_splits, make_mesh
    from pdistill_jax.train.step import init_train_state, make_train_step

    lm, cfg = _load_model(inputs.model_spec, cfg, init_adapter if load_adapter else None)
    rows_per_step = cfg.batch_size * cfg.grad_accum
    train_rows, dev_rows = split_dev_rows(inputs.qa_rows, cfg.dev_share, cfg.seed)
    if cfg.dev_share and not dev_rows:
        raise ValueError(f"dev_share={cfg.dev_share:g} holds out no question from "
                         f"{inputs.data_file}: no document has two or more questions; set "
                         "dev_share to 0 or generate more questions a document")
    data = make_train_data(train_rows, lm.tokenizer, objective=cfg.objective,
                           max_seq_len=cfg.max_seq_len, system=cfg.system,
                           rows_per_step=rows_per_step, seed=cfg.seed,
                           open_book_share=cfg.open_book_share)
    cache_teacher = cfg.objective != "ce" and _teacher_cache_fits(data, lm.cfg.hidden_size, cfg)
    runs_teacher = cfg.objective != "ce" and not cache_teacher
    data = dataclasses.replace(data, order_by=data.order_by if runs_teacher else "student",
                               share_student_prefix=True, ce_mask=cfg.ce_weight > 0)
    # Made before the base moves into the train state: the model still samples here.
    retention = (_retention_batches(inputs, cfg, lm, data.student_prefix) if cfg.retention_weight
                 else None)
    cache_lower = _lower_cache_fits(data, lm.cfg.hidden_size, cfg, cache_teacher)
    spe = data.steps_per_epoch
    total_steps = spe * cfg.epochs
    _log.info(f"{len(data.examples)} training rows from {inputs.data_file} ({data.truncated} with "
              f"the document truncated, {data.skipped} skipped: longer than max_seq_len="
              f"{cfg.max_seq_len}); {spe} steps/epoch x {cfg.epochs} epochs = {total_steps} steps "
              f"of {rows_per_step} rows")

    mesh = make_mesh(cfg.mesh)
    check_batch_splits(cfg.batch_size, mesh)
    graphdef, base, state, optimizer = init_train_state(lm.model, cfg, total_steps, mesh)
    lm.model = None  # the base now lives (sharded) in `base`; drop the unsharded copy
    step_fn = make_train_step(graphdef, optimizer, cfg, mesh, student_prefix=data.student_prefix,
                              retention_prefix=retention.prefix if retention else ())
    dev = _dev_set(dev_rows, lm.tokenizer, cfg, graphdef, mesh, data) if dev_rows else None
    return Run(inputs, cfg, init_adapter, lm.cfg, lm.path, data, cache_teacher, cache_lower,
               total_steps, mesh, graphdef, base, step_fn, retention, dev), state


def _dev_set(dev_rows, tokenizer, cfg: TrainConfig, graphdef, mesh, data: TrainData) -> DevSet:
    from pdistill_jax.train.batches import tokenize_rows
    from pdistill_jax.train.dev_set import question_key
    from pdistill_jax.train.step import make_dev_loss

    examples = tokenize_rows(dev_rows, tokenizer, objective=cfg.objective,
                             max_seq_len=cfg.max_seq_len, system=cfg.system).examples
    questions = len({question_key(r) for r in dev_rows})
    if not examples:
        raise ValueError(f"the {len(dev_rows)} dev rows are all longer than max_seq_len="
                         f"{cfg.max_seq_len}; raise max_seq_len")
    _log.info(f"dev set: {questions} questions ({len(examples)} rows) held out of training; the "
              f"dev loss is measured every {cfg.eval_every or 'epoch'}"
              + (" steps" if cfg.eval_every else "")
              + (f", training stops after {cfg.early_stop_patience} measurements without a new "
                 "lowest" if cfg.early_stop_patience else "")
              + "; the adapter written is the one of the lowest dev loss")
    return DevSet(examples, questions, make_dev_loss(graphdef, cfg, mesh, data.student_prefix))


def _dev_batches(run: Run, state) -> None:
    """run.dev.batches, with the teacher's states (and the frozen lower layers' with
    lora.first_layer > 0) computed once like the training rows'."""
    dev = run.dev
    batches = dev_batches(dev.examples, run.cfg.batch_size, run.data.pad_id,
                          run.data.student_prefix)
    if run.cache_teacher:
        hidden = _teacher_cache(run, state, dev.examples, "dev rows").hidden
        batches = [(i, attach_teacher_hidden(b, i, hidden)) for i, b in batches]
    if run.cache_lower:
        states = _lower_cache(run, state, dev.examples, "dev rows").states
        batches = [(i, attach_student_lower(b, i, states)) for i, b in batches]
    dev.batches = batches


def _dev_loss(run: Run, lora) -> float:
    from pdistill_jax.model.sharding import global_batch

    total, count = 0.0, 0.0
    for _, batch in run.dev.batches:
        t, c = run.dev.loss_fn(lora, run.base, global_batch(_local_rows(batch), run.mesh))
        total, count = total + float(t), count + float(c)
    return total / max(count, 1.0)


def _retention_batches(inputs: RunInputs, cfg: TrainConfig, lm, student_prefix):
    """The retention rows: the base model's greedy answers to the retention prompts, from
    RUN/retention.jsonl when an earlier session of the run made them, else generated now. They
    share the main rows' student prefix (the system preamble) when they all start with it."""
    from pdistill_jax.train.retention import (RetentionBatches, base_answers, load_or_make_answers,
                                              read_prompts, retention_examples, shared_prefix)
    from pdistill_jax.weights.tokenizer import end_token_ids

    questions = read_prompts(cfg.retention_prompts)
    start = time.perf_counter()
    inputs.out.mkdir(parents=True, exist_ok=True)
    # The model was loaded with the adapter (B = 0 or an initial adapter's): its answers are
    # taken with the adapter off, from the base model the regulariser keeps the student near.
    rows, made = load_or_make_answers(
        inputs.out / RETENTION_FILE, questions,
        lambda: base_answers(lm.model, lm.tokenizer, questions, cfg.system,
                             end_token_ids(lm.tokenizer, lm.cfg)),
        write=jax.process_index() == 0)
    _log.info(f"retention: {len(rows)} prompts from {cfg.retention_prompts}, the base model's "
              + (f"answers generated in {time.perf_counter() - start:.0f} s" if made else
                 f"answers read from {inputs.out / RETENTION_FILE}"))
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    examples = retention_examples(rows, lm.tokenizer, cfg.system)
    return RetentionBatches(examples, cfg.retention_batch_size * cfg.grad_accum, cfg.seed, int(pad),
                            prefix=shared_prefix(examples, student_prefix))


def _retention_cache(run: Run, state, teacher: TeacherCache, lower: LowerCache) -> float | None:
    """The retention rows' base-model states at their answer positions, and with
    lora.first_layer > 0 the states entering that layer, computed once into run.retention when
    they fit what teacher_cache_gb leaves beside the other caches (else the step computes them)."""
    from pdistill_jax.model.sharding import global_batch
    from pdistill_jax.train.step import make_student_lower, make_teacher_hidden

    cfg, retention = run.cfg, run.retention
    used = sum(x.nbytes for x in (teacher.hidden or []) + (lower.states or []))
    dtype = compute_dtype(cfg.compute_dtype)
    need = retention.cache_bytes(run.model_cfg.hidden_size, dtype, bool(cfg.lora.first_layer))
    if used + need > cfg.teacher_cache_gb * 2**30:
        if cfg.teacher_cache_gb > 0:
            _log.info(f"the retention rows' fixed states would take {need / 2**20:.0f} MiB more "
                      f"than teacher_cache_gb={cfg.teacher_cache_gb:g} leaves: the base model "
                      "runs over them in every step")
        return None
    start = time.perf_counter()
    to_global = lambda batch: global_batch(_local_rows(batch), run.mesh)  # noqa: E731
    hidden_fn = make_teacher_hidden(run.graphdef, run.mesh)
    retention.hidden = compute_teacher_cache(
        retention.examples, cfg.batch_size, lambda b: hidden_fn(state.lora, run.base, b),
        to_global, retention.pad_id)
    if cfg.lora.first_layer:
        lower_fn = make_student_lower(run.graphdef, run.mesh, retention.prefix)
        retention.lower = compute_student_cache(
            retention.examples, cfg.batch_size, lambda b: lower_fn(state.lora, run.base, b),
            to_global, retention.pad_id, len(retention.prefix))
    seconds = time.perf_counter() - start
    _log.info(f"retention: the base model's states over the {len(retention.examples)} rows "
              + ("and the frozen layers below lora.first_layer " if cfg.lora.first_layer else "")
              + f"computed once ({need / 2**20:.0f} MiB) in {seconds:.0f} s")
    return round(seconds, 3)


def _restore(run: Run, checkpoints: RunCheckpoints, state) -> Start:
    """The newest checkpoint that restores, placed like `state`; its data position checked."""
    restored = checkpoints.restore_latest(state)
    if restored is None:
        raise ValueError(checkpoints.no_usable_checkpoint())
    position = DataPosition(**restored.meta["data_position"])
    if position.global_step(run.data.steps_per_epoch) != restored.step:
        raise ValueError(f"checkpoint step {restored.step} in {run.inputs.out / CHECKPOINT_DIR} "
                         f"does not match its data position {position}; the data "
                         "changed since it was saved")
    _log.info(f"{checkpoints.damage_note()}resuming from step {restored.step} "
              f"(epoch {position.epoch}, batch {position.index})")
    return Start(restored.state, position, float(restored.meta.get("elapsed_s", 0.0)),
                 restored.step, DevHistory.from_dict(restored.meta.get("dev")))


def _teacher_cache_fits(data: TrainData, hidden_size: int, cfg: TrainConfig) -> bool:
    """Whether the teacher's hidden states at the answer positions fit cfg.teacher_cache_gb (if
    not, the step runs the teacher itself)."""
    need = teacher_cache_bytes(data.examples, hidden_size, compute_dtype(cfg.compute_dtype))
    if need > cfg.teacher_cache_gb * 2**30:
        if cfg.teacher_cache_gb > 0:
            _log.info(f"the teacher's hidden states would take {need / 2**30:.1f} GiB, more than "
                      f"teacher_cache_gb={cfg.teacher_cache_gb:g}: the teacher runs in every step")
        return False
    return True


def _lower_cache_fits(data: TrainData, hidden_size: int, cfg: TrainConfig,
                      cache_teacher: bool) -> bool:
    """Whether the states entering lora.first_layer fit teacher_cache_gb beside the teacher's
    (if not, the step runs the frozen lower layers itself)."""
    if not cfg.lora.first_layer:
        return False
    dtype = compute_dtype(cfg.compute_dtype)
    teacher = teacher_cache_bytes(data.examples, hidden_size, dtype) if cache_teacher else 0
    need = student_cache_bytes(data.examples, len(data.student_prefix), hidden_size, dtype)
    if teacher + need > cfg.teacher_cache_gb * 2**30:
        if cfg.teacher_cache_gb > 0:
            _log.info(f"the frozen layers' states below lora.first_layer={cfg.lora.first_layer} "
                      f"would take {need / 2**30:.1f} GiB, more than teacher_cache_gb="
                      f"{cfg.teacher_cache_gb:g} leaves: they run in every step")
        return False
    return True


def _lower_cache(run: Run, state, examples=None, what: str = "rows") -> LowerCache:
    """The states entering lora.first_layer over every row's student tokens (the training
    rows', or `examples`'), computed once."""
    from pdistill_jax.model.sharding import global_batch
    from pdistill_jax.train.step import make_student_lower

    start = time.perf_counter()
    data = run.data
    lower_fn = make_student_lower(run.graphdef, run.mesh, data.student_prefix)
    states = compute_student_cache(
        data.examples if examples is None else examples, run.cfg.batch_size,
        lambda batch: lower_fn(state.lora, run.base, batch),
        lambda batch: global_batch(_local_rows(batch), run.mesh), data.pad_id,
        len(data.student_prefix))
    seconds = time.perf_counter() - start
    need = sum(x.nbytes for x in states)
    _log.info(f"the frozen layers below lora.first_layer={run.cfg.lora.first_layer} run once over "
              f"{len(states)} {what}: their states kept ({need / 2**20:.0f} MiB) in {seconds:.0f} s")
    return LowerCache(states, round(seconds, 3))


def _teacher_cache(run: Run, state, examples=None, what: str = "rows") -> TeacherCache:
    """The teacher's hidden states at every row's answer positions, computed once.

    Rows whose teacher sequence the states generation kept (beside the data) hold are taken from
    there (one process only: on a pod every process must run the same teacher batches, and their
    disks need not hold the same files)."""
    from pdistill_jax.model.sharding import global_batch
    from pdistill_jax.train.step import make_teacher_hidden

    folder, fingerprint = run.inputs.data_file.parent / TEACHER_STATES_DIR, model_fingerprint(run.model_path)
    cfg, hidden_size = run.cfg, run.model_cfg.hidden_size
    examples = run.data.examples if examples is None else examples
    dtype = compute_dtype(cfg.compute_dtype)
    need = teacher_cache_bytes(examples, hidden_size, dtype)
    start = time.perf_counter()
    if jax.process_count() == 1:
        keys = [teacher_sequence_key(fingerprint, dtype, e.teacher[:-1]) for e in examples]
        found = load_teacher_states(folder, keys) if folder.is_dir() else {}
        # stored as float32 (teacher_states.state_entry); a key names this compute dtype
        cache: list = [None if k not in found else np.asarray(found[k], dtype) for k in keys]
        for i, (e, h) in enumerate(zip(examples, cache)):
            if h is not None and h.shape != (len(e.targets), hidden_size):
                cache[i] = None  # cannot happen for a matching key; never trust a file blindly
        todo = [i for i, h in enumerate(cache) if h is None]
        if todo:
            computed = compute_teacher_cache_shared([examples[i] for i in todo], cfg.batch_size,
                                                    run.graphdef, state.lora, run.base)
            for i, h in zip(todo, computed):
                cache[i] = h
        reused = len(examples) - len(todo)
    else:  # every process feeds its own rows of a batch-sharded teacher forward
        hidden_fn = make_teacher_hidden(run.graphdef, run.mesh)
        cache = compute_teacher_cache(
            examples, cfg.batch_size, lambda batch: hidden_fn(state.lora, run.base, batch),
            lambda batch: global_batch(_local_rows(batch), run.mesh), run.data.pad_id)
        reused = 0
    seconds = time.perf_counter() - start
    source = (f"{reused} {what} from the states generation kept, the teacher run once over "
              f"{len(cache) - reused}" if reused else f"teacher run once over {len(cache)} {what}")
    _log.info(f"{source}: its hidden states at the answer positions kept ({need / 2**20:.0f} MiB) "
              f"in {seconds:.0f} s")
    if cfg.context_boost:
        cache = _boosted(run, state, examples, cache, what)
        seconds = time.perf_counter() - start
    return TeacherCache(cache, round(seconds, 3), reused)


def _boosted(run: Run, state, examples, teacher: list, what: str) -> list:
    """The teacher cache turned into context_boost's targets: the base model runs once over
    every row's student prompt (train/context_boost.py)."""
    from pdistill_jax.model.sharding import global_batch
    from pdistill_jax.train.context_boost import boost_cache, compute_closed_book_cache
    from pdistill_jax.train.step import make_closed_book_hidden

    start = time.perf_counter()
    hidden_fn = make_closed_book_hidden(run.graphdef, run.mesh, run.data.student_prefix)
    closed_book = compute_closed_book_cache(
        examples, run.cfg.batch_size, lambda batch: hidden_fn(state.lora, run.base, batch),
        lambda batch: global_batch(_local_rows(batch), run.mesh), run.data.pad_id,
        len(run.data.student_prefix))
    _log.info(f"context_boost={run.cfg.context_boost:g}: the base model run once over "
              f"{len(examples)} {what} without their documents, their targets mixed, in "
              f"{time.perf_counter() - start:.0f} s")
    return boost_cache(teacher, closed_book, run.cfg.context_boost)


def _local_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """This process's consecutive slice of the global batch (all of it on one process)."""
    n, p = jax.process_count(), jax.process_index()
    if n == 1:
        return batch
    return {k: np.array_split(v, n)[p] for k, v in batch.items()}


def _run_steps(run: Run, start: Start, teacher: TeacherCache, lower: LowerCache,
               checkpoints: RunCheckpoints, stop_after: int | None, progress: bool) -> Progress:
    """The steps from `start` to the end (or `stop_after` steps), with periodic checkpoints and
    one after the last step; an interrupt saves the finished steps first."""
    from tqdm import tqdm

    from pdistill_jax.model.sharding import global_batch

    cfg, spe = run.cfg, run.data.steps_per_epoch
    start_step = start.position.global_step(spe)
    bar = tqdm(total=run.total_steps, initial=start_step, unit="step", file=sys.stderr,
               dynamic_ncols=True, disable=not progress or jax.process_index() != 0)
    done = Progress(start.state, start_step,
                    MetricsLog(run.inputs.out / METRICS_FILE, spe, cfg.log_every, start.elapsed0, bar),
                    start.dev)
    next_position = start.position
    batches = () if done.dev.stopped_early else run.data.batches(start.position, cfg.epochs)
    try:
        loop_start = time.perf_counter()
        with steps_finish_first():  # a SIGTERM waits for the step in flight, then stops below
            for pos, indices, batch in batches:
                if teacher.hidden is not None:
                    batch = attach_teacher_hidden(batch, indices, teacher.hidden)
                if lower.states is not None:
                    batch = attach_student_lower(batch, indices, lower.states)
                if run.retention is not None:
                    batch = {**batch, **run.retention.batch(pos.global_step(spe))}
                done.state, metrics = run.step_fn(done.state, run.base,
                                                  global_batch(_local_rows(batch), run.mesh))
                done.step += 1
                if done.first_step_s is None:  # compilation included: reported separately
                    jax.block_until_ready(metrics)
                    done.first_step_s = time.perf_counter() - loop_start
                    done.first_rows = len(indices)
                done.examples_seen += len(indices)
                next_position = pos.advance(spe)
                bar.update(1)
                done.log.add(done.step, len(indices), metrics)
                if run.dev is not None and measures_at(done.step, cfg.eval_every, spe,
                                                       run.total_steps):
                    _measure_dev(run, done)
                if done.step % cfg.save_every == 0:
                    _save(run, checkpoints, done, next_position)
                if done.dev.stopped_early:
                    break
                raise_if_terminated()  # here the state, the step count and the position agree
                if stop_after is not None and done.step - start_step >= stop_after:
                    break
        done.log.flush()  # waits for the last step
        done.loop_s = time.perf_counter() - loop_start
        _save(run, checkpoints, done, next_position)
    except KeyboardInterrupt:
        # keep the finished steps (a Ctrl-C that hit mid-step may leave the state unusable;
        # a SIGTERM waits for the step: raise_if_terminated)
        try:
            _save(run, checkpoints, done, next_position)
            checkpoints.wait()
            _log.info(f"interrupted after step {done.step}, checkpoint saved; continue with --resume")
        except Exception:  # noqa: BLE001 - the last periodic checkpoint still stands
            _log.info("interrupted; continue from the last checkpoint with --resume")
        raise
    except NonFiniteLoss as e:
        checkpoints.wait()
        raise RuntimeError(_non_finite_message(e, cfg, checkpoints)) from None
    finally:
        bar.close()
    checkpoints.wait()
    return done


def _measure_dev(run: Run, done: Progress) -> None:
    """The dev loss after done.step: recorded, its adapter kept when it is the lowest so far
    (RUN/dev_best), and the run marked to stop when early_stop_patience measurements in a row
    brought no new lowest."""
    from pdistill_jax.weights.peft import save_peft_adapter

    done.log.flush()
    loss = _dev_loss(run, done.state.lora)
    history, out = done.dev, run.inputs.out
    if history.add(done.step, loss):
        save_peft_adapter(out / DEV_BEST_DIR, done.state.lora, run.model_cfg, run.cfg.lora,
                          str(run.inputs.model_spec))
        if jax.process_index() == 0:  # names the step the folder holds, for _finish to check
            write_text_atomic(out / DEV_BEST_FILE, json.dumps(
                {"step": done.step, "dev_loss": loss}) + "\n")
    patience = run.cfg.early_stop_patience
    history.stopped_early = bool(patience) and history.since_best() >= patience \
        and done.step < run.total_steps
    _log.info(f"step {done.step}: dev loss {loss:.4f} (lowest {history.best_loss:.4f} at step "
              f"{history.best_step})" + (f"; no new lowest in {patience} measurements: stopping "
                                         "early" if history.stopped_early else ""))


def _save(run: Run, checkpoints: RunCheckpoints, done: Progress, position: DataPosition) -> None:
    """A checkpoint of the state after done.step, only when every step up to it and the weights
    it holds are finite (checked on the host: the save fetches the state anyway)."""
    done.log.flush()  # the metrics file then covers every step a resume keeps
    if not bool(_all_finite(done.state)):
        raise NonFiniteLoss(done.step, "the LoRA weights or optimizer state after it are not finite")
    checkpoints.save(done.step, done.state, {
        "data_position": dataclasses.asdict(position), "config": to_dict(run.cfg),
        "model": str(run.inputs.model_spec), "data_sha256": run.inputs.data_sha,
        "elapsed_s": done.log.elapsed, "total_steps": run.total_steps,
        "init_adapter": run.init_adapter, "dev": done.dev.to_dict() if run.dev else None})


@jax.jit
def _all_finite(tree) -> jax.Array:
    leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.stack(leaves).all() if leaves else jnp.array(True)


def _non_finite_message(e: NonFiniteLoss, cfg: TrainConfig, checkpoints: RunCheckpoints) -> str:
    kept = checkpoints.latest_step()
    fix = f"Lower lr (now {cfg.lr:g}) or check tau (now {cfg.tau:g}) and train into a new --out"
    if kept is None:
        return f"step {e.step}: {e.what}; training stopped before any checkpoint was saved. {fix}"
    return (f"step {e.step}: {e.what}; training stopped and saved nothing from it (the last good "
            f"checkpoint, step {kept}, is kept in {checkpoints.directory}). {fix}; --resume "
            "continues from that checkpoint with the same settings")


def _finish(run: Run, done: Progress, start: Start, teacher: TeacherCache, lower: LowerCache,
            session_start: float, retention_s: float | None = None) -> dict:
    """The adapter (once every step is done) and RUN/summary.json."""
    from pdistill_jax.weights.peft import save_peft_adapter

    out, adapter = run.inputs.out, None
    if done.step >= run.total_steps or done.dev.stopped_early:
        if run.dev is None:
            adapter = save_peft_adapter(out / ADAPTER_DIR, done.state.lora, run.model_cfg,
                                        run.cfg.lora, str(run.inputs.model_spec))
        else:
            adapter = _adapter_of_best_dev(out, done.dev)
        _log.info(f"adapter written to {adapter}")
    else:
        _log.info(f"stopped at step {done.step} of {run.total_steps}; continue with --resume")
    summary = _summary(run, done, start.resumed_from, adapter, session_start)
    if run.dev is not None:
        summary["dev"] = {"questions": run.dev.questions, "rows": len(run.dev.examples),
                          **done.dev.to_dict()}
    summary["teacher_cache_s"] = teacher.seconds
    summary["teacher_rows_from_generation"] = teacher.reused
    if run.cfg.lora.first_layer:
        summary["lower_cache_s"] = lower.seconds
    if run.cfg.retention_weight:  # None: the step ran the base over the retention rows
        summary["retention_cache_s"] = retention_s
    if jax.process_index() == 0:
        write_text_atomic(out / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    return summary


def _adapter_of_best_dev(out: Path, history: DevHistory) -> Path:
    """RUN/adapter as a copy of RUN/dev_best, the adapter of the lowest dev loss."""
    from pdistill_jax.files import write_dir_atomic
    from pdistill_jax.weights.peft import looks_like_adapter

    if jax.process_index() == 0:
        kept = json.loads((out / DEV_BEST_FILE).read_text()) if (out / DEV_BEST_FILE).exists() else {}
        if kept.get("step") != history.best_step:
            raise RuntimeError(f"{out / DEV_BEST_DIR} holds the adapter of step {kept.get('step')}, "
                               f"but the lowest dev loss was measured at step {history.best_step}; "
                               "train into a new --out")

        def fill(tmp: Path) -> None:
            for f in (out / DEV_BEST_DIR).iterdir():
                (tmp / f.name).write_bytes(f.read_bytes())

        write_dir_atomic(out / ADAPTER_DIR, fill, looks_like_adapter)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("pdistill: adapter of the lowest dev loss")
    return out / ADAPTER_DIR


def _summary(run: Run, done: Progress, resumed_from: int | None, adapter: Path | None,
             session_start: float) -> dict:
    metrics_file = run.inputs.out / METRICS_FILE
    rows = read_jsonl(metrics_file) if metrics_file.exists() else []
    losses = [r["loss"] for r in rows]
    tail = losses[-max(1, min(len(losses) // 10, 50)):] if losses else []
    wall = time.perf_counter() - session_start
    # Throughput after the first step, which includes compilation (reported as first_step_s).
    steady_s = done.loop_s - (done.first_step_s or 0.0)
    steady_rows = done.examples_seen - done.first_rows
    cfg, data = run.cfg, run.data
    rate = round(steady_rows / steady_s, 3) if steady_rows and steady_s > 0 else None
    first_step = None if done.first_step_s is None else round(done.first_step_s, 3)
    if rate is None and first_step is None:
        # A resume that ran no step (the run had finished): the throughput stays the one the
        # steps were measured at, not a null.
        before = _previous_summary(run.inputs.out / SUMMARY_FILE)
        rate, first_step = before.get("examples_per_s"), before.get("first_step_s")
    return {
        "finished": done.step >= run.total_steps or done.dev.stopped_early, "steps": done.step,
        "total_steps": run.total_steps, "steps_per_epoch": data.steps_per_epoch,
        "epochs": cfg.epochs, "objective": cfg.objective,
        "rows": len(data.examples), "rows_truncated": data.truncated,
        "rows_skipped": data.skipped, "resumed_from": resumed_from,
        "first_loss": losses[0] if losses else None,
        "final_loss": float(np.mean(tail)) if tail else None,  # mean of the last ~10% of steps
        "session_wall_s": round(wall, 3), "elapsed_s": round(done.log.elapsed, 3),
        "first_step_s": first_step, "examples_per_s": rate,
        "adapter": None if adapter is None else str(adapter),
    }


def _previous_summary(path: Path) -> dict:
    """The summary.json an earlier session of this run wrote ({} if none or unreadable)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}

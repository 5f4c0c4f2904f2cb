"""All of Orbax: periodic checkpoints of the trainable state, and restoring the newest good one.

A checkpoint holds two items: `state` -- the train state (LoRA weights, optimizer state, step;
never the frozen base weights, which are reloaded from the model) -- and `meta`, a JSON dict the
training loop fills (data position, resolved TrainConfig, elapsed time, ...). Training draws no
random numbers after initialisation (the data order is a function of seed and epoch), so there is
no RNG key to save.

Orbax writes each step into a temporary directory and renames it when complete, so a run killed
while saving leaves a `<step>.orbax-checkpoint-tmp-*` directory rather than a half step. Damaged
finished steps (a truncated or missing file) fail to restore; `latest_meta` and `restore_latest`
then move them aside and fall back to the previous step, and `damage_note` says what they did in
one line.
"""
from __future__ import annotations

import dataclasses
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from pdistill_jax.log import logger

_log = logger("train")
TMP_MARKER = ".orbax-checkpoint-tmp"


@dataclasses.dataclass
class Restored:
    step: int
    state: Any  # same structure and shardings as the live state passed to `restore_latest`
    meta: dict


def _drop_closed_loop_callbacks() -> None:
    """When Orbax abandons a failed restore it closes its asyncio loop while TensorStore reads are
    still in flight; each read that then completes calls back into the closed loop and prints a
    `RuntimeError: Event loop is closed` traceback through sys.unraisablehook (hundreds of lines
    for one damaged step, some after the restore has returned). Exactly those are dropped, from the first
    restore on; every other unraisable exception still reaches the previous hook."""
    previous = sys.unraisablehook
    if getattr(previous, "pdistill_drops_closed_loop", False):
        return

    def hook(unraisable):
        e = unraisable.exc_value
        if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
            return
        previous(unraisable)

    hook.pdistill_drops_closed_loop = True
    sys.unraisablehook = hook


class _DropAbandonedReads(logging.Filter):
    """The same abandoned reads also surface as asyncio's 'Future/Task exception was never
    retrieved' errors, one per array (a Task when the abandoned read is Orbax's own
    `async_deserialize` coroutine, a Future when it is TensorStore's); dropped only when they
    concern this checkpoint folder."""

    def __init__(self, directory: Path):
        super().__init__()
        self.directory = str(directory)

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not (text.startswith(("Future exception was never retrieved",
                                     "Task exception was never retrieved"))
                    and self.directory in text)


def _drop_abandoned_reads(directory: Path) -> None:
    """Installs the filter for `directory` once, however many restores a process makes."""
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _DropAbandonedReads) and f.directory == str(directory)
               for f in asyncio_log.filters):
        asyncio_log.addFilter(_DropAbandonedReads(directory))


def _reason(e: Exception, limit: int = 100) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:limit]}{'…' if len(text) > limit else ''}"


def _assert_trainable_only(state: Any) -> None:
    """Refuses to write frozen base weights: a checkpoint must stay adapter-sized."""
    def check(path, leaf):
        if isinstance(leaf, nnx.Param) and not isinstance(leaf, nnx.LoRAParam):
            raise ValueError(f"refusing to checkpoint base weight {jax.tree_util.keystr(path)}; "
                             "pass only the trainable (LoRA + optimizer) state")
    jax.tree_util.tree_map_with_path(check, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


class RunCheckpoints:
    """The checkpoints of one run, in `directory` (e.g. RUN/checkpoints)."""

    def __init__(self, directory: str | Path, *, keep: int = 2):
        self.directory = Path(directory).absolute()
        self._report_unfinished()
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(max(1, keep)),
            cleanup_tmp_directories=True,  # unfinished saves of a killed run
            enable_async_checkpointing=True,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        self.damaged: list[tuple[int, str, Path]] = []  # (step, reason, where it was moved)
        self._closed = False

    def _report_unfinished(self) -> None:
        if not self.directory.is_dir():
            return
        for path in sorted(self.directory.glob(f"*{TMP_MARKER}*")):
            _log.warning(f"ignoring unfinished checkpoint {path.name} (the run stopped while saving it)")

    def steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Starts saving in the background. Device arrays are copied to host before this returns,
        so the caller may donate or overwrite `state` right away."""
        _assert_trainable_only(state)
        if step in self.steps():  # e.g. the final save at a step that was just saved
            return
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            meta=ocp.args.JsonSave({**meta, "step": int(step), "saved_at": time.time()})),
            force=True)

    def read_meta(self, step: int) -> dict:
        return dict(self._manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore())).meta)

    def latest_meta(self) -> dict | None:
        """The `meta` of the newest step whose meta can be read (None without checkpoints);
        steps whose meta cannot be read are moved aside (see damage_note)."""
        _drop_closed_loop_callbacks()
        for step in sorted(self.steps(), reverse=True):
            try:
                return self.read_meta(step)
            except Exception as e:  # noqa: BLE001 - any failure means this step is unusable
                self._set_aside(step, e)
        return None

    def restore_latest(self, like_state: Any) -> Restored | None:
        """The newest step that restores cleanly, placed like `like_state` (a live train state:
        its shapes, dtypes and shardings are the target). Damaged steps are moved aside."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like_state)
        _drop_closed_loop_callbacks()
        _drop_abandoned_reads(self.directory)
        for step in sorted(self.steps(), reverse=True):
            try:
                out = self._manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
            except Exception as e:  # noqa: BLE001 - any failure means this step is unusable
                self._set_aside(step, e)
                continue
            return Restored(step, out.state, dict(out.meta))
        return None

    def _set_aside(self, step: int, error: Exception) -> None:
        self.damaged.append((step, _reason(error), self._quarantine(step)))

    def damage_note(self) -> str:
        """What was done with damaged steps, for the start of the line that says what happens
        next: 'checkpoint step 20 is damaged (reason), moved to PATH; ', or '' if none was."""
        return "".join(f"checkpoint step {step} is damaged ({reason}), moved to {moved}; "
                       for step, reason, moved in self.damaged)

    def no_usable_checkpoint(self) -> str:
        """The one-line refusal of a resume whose every checkpoint was damaged."""
        steps = ", ".join(str(step) for step, _, _ in self.damaged)
        return (f"--resume: no usable checkpoint in {self.directory}: step(s) {steps} are damaged "
                f"({self.damaged[0][1]}) and were moved to {self.damaged[0][2].parent}; rerun "
                "with --resume to start this run over from step 0, or train into a new --out")

    def _quarantine(self, step: int) -> Path:
        """Moves a damaged step out of the manager's directory (kept for inspection, and so that
        a later save of the same step number does not collide with it)."""
        damaged = self.directory.parent / f"{self.directory.name}.damaged"
        target = damaged / f"{step}-{int(time.time())}"
        if jax.process_index() == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self.directory / str(step)), str(target))
        if jax.process_count() > 1:  # every host must see the move before listing steps again
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"pdistill quarantine checkpoint {step}")
        self._manager.reload()
        return target

    def wait(self) -> None:
        """Blocks until background saves are on disk (before export and before exit)."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._manager.close()

    def __enter__(self) -> "RunCheckpoints":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

"""What each stage of `pdistill run` was made from, and whether its output may be reused.

Every stage (generate, train_pd, train_sft, each `answer NAME`, each `evaluate NAME`, each
`judge NAME`) keeps a record beside its output (`data.stage.json` beside `data/`,
`train_pd.stage.json` beside `train_pd/`, `predictions/NAME.stage.json` beside
`predictions/NAME.jsonl`, `eval/NAME.stage.json` beside `eval/NAME/`): the settings that decide
its result (the config fields it reads, the model spec and its weights file's identity, the
sha256 of the documents or questions file it reads) and the fingerprints of the stages whose
output it consumes; its fingerprint is the hash of both. The record is written, atomically, with
`complete: false` when the stage starts and with `complete: true` when it has finished (then with
the seconds it took and, for a stage that samples, the tokens it read and generated: the report's
throughput).

Before any work, every stage's fingerprint is compared with its record:

- same, complete: the stage is skipped;
- same, not complete (it was interrupted): it is continued, as a rerun always did (training
  resumes from its newest checkpoint, generation from its committed documents);
- different: its output and record are deleted and it is redone. A stage's fingerprint contains
  those of the stages it reads, so every stage downstream of it is redone too; the log says, one
  line per stage, which fields changed (`train_pd: settings changed (pd.epochs 3 -> 4); redoing
  it and the stages after it`) or which input was redone;
- no record but an output: made by a pdistill older than these records. The run refuses, in one
  line naming those outputs, before it writes anything: which settings made them cannot be known,
  and redoing them silently would delete results (hours of generation and training) that the
  user may well want to keep; deleting them, or choosing a new --out, takes one command.

Settings that do not change a stage's result are left out of its record, so changing them redoes
nothing (`experiment.RESULTS_NEUTRAL`, kept short on purpose); an interrupted stage then continues under
the new value.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

from pdistill_jax.files import write_text_atomic

RECORD_SUFFIX = ".stage.json"
DONE, CONTINUE, RUN, REDO = "done", "continue", "run", "redo"
_UNSET = object()


@dataclasses.dataclass
class Stage:
    name: str  # as logged: "generate", "train_pd", "answer rag_gold", "evaluate rag_gold", ...
    output: Path  # the file or folder the stage writes
    settings: dict  # flat {"pd.epochs": 3, "documents.sha256": "...", ...}: what decides its result
    inputs: dict[str, str] = dataclasses.field(default_factory=dict)  # stage read -> fingerprint

    def __post_init__(self):
        self.settings = json.loads(json.dumps(self.settings))  # compared with records read back

    @property
    def fingerprint(self) -> str:
        blob = json.dumps({"settings": self.settings, "inputs": self.inputs}, sort_keys=True)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    @property
    def record(self) -> Path:
        return self.output.with_name(self.output.with_suffix("").name + RECORD_SUFFIX)


def read_record(stage: Stage) -> dict | None:
    """The stage's record, {} if it cannot be read (then it is redone), None if there is none."""
    if not stage.record.exists():
        return None
    try:
        record = json.loads(stage.record.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return {}
    return record if isinstance(record, dict) else {}


def write_record(stage: Stage, complete: bool, seconds: float | None = None,
                 work: dict | None = None) -> None:
    record = {"stage": stage.name, "fingerprint": stage.fingerprint, "complete": complete,
              "seconds": seconds, "settings": stage.settings, "inputs": stage.inputs}
    if work:
        record["work"] = work
    write_text_atomic(stage.record, json.dumps(record, indent=2, ensure_ascii=False) + "\n")


def _show(value) -> str:
    text = "unset" if value is _UNSET else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def describe_change(stage: Stage, old: dict, has_dependents: bool) -> str:
    """One log line: why the stage is redone (the fields that changed, else the inputs redone)."""
    tail = "; redoing it" + (" and the stages after it" if has_dependents else "")
    before = old.get("settings") if isinstance(old.get("settings"), dict) else {}
    changes = []
    for key in [*stage.settings, *(k for k in before if k not in stage.settings)]:
        a, b = before.get(key, _UNSET), stage.settings.get(key, _UNSET)
        if a != b:
            # hashes and file identities say nothing to a reader: only that they changed
            changes.append(f"{key} changed" if key.endswith((".sha256", ".weights"))
                           else f"{key} {_show(a)} -> {_show(b)}")
    if changes:
        return f"{stage.name}: settings changed ({', '.join(changes)}){tail}"
    inputs = old.get("inputs") if isinstance(old.get("inputs"), dict) else {}
    redone = [name for name, fp in stage.inputs.items() if inputs.get(name) != fp]
    if redone:
        return f"{stage.name}: made from an older {', '.join(redone)}{tail}"
    return f"{stage.name}: its record {stage.record} is unreadable or from another version{tail}"


def plan(stages: Sequence[Stage], out: Path) -> tuple[dict[str, str], list[str]]:
    """(status of each stage, one log line per stage to redo). Raises ValueError, before anything
    is changed, when outputs exist without a record (made by an older pdistill)."""
    status, lines, unrecorded = {}, [], []
    for stage in stages:
        record = read_record(stage)
        exists = stage.output.exists()
        if record is None:
            status[stage.name] = RUN
            if exists:
                unrecorded.append(stage)
        elif record.get("fingerprint") != stage.fingerprint:
            status[stage.name] = REDO
            has_dependents = any(stage.name in s.inputs for s in stages)
            lines.append(describe_change(stage, record, has_dependents))
        elif exists:
            status[stage.name] = DONE if record.get("complete") is True else CONTINUE
        else:
            status[stage.name] = RUN
    if unrecorded:
        names = [str(s.output.relative_to(out)) if s.output.is_relative_to(out) else str(s.output)
                 for s in unrecorded]
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        were, they, them = ("were", "they", "them") if len(names) > 1 else ("was", "it", "it")
        raise ValueError(f"{out}: {shown} {were} made by an older pdistill that kept no record of "
                         f"the settings, so {they} cannot be checked against this config; delete "
                         f"{them} (or all of {out}) to redo {them}, or choose a new --out")
    return status, lines


def clear(stage: Stage) -> None:
    """Deletes the stage's output, then its record (a kill in between leaves a record without an
    output, which is simply redone; the other order would leave an output without a record)."""
    if stage.output.is_dir() and not stage.output.is_symlink():
        shutil.rmtree(stage.output)
    elif stage.output.exists() or stage.output.is_symlink():
        stage.output.unlink()
    stage.record.unlink(missing_ok=True)


def execute(stage: Stage, work: Callable[[], dict | None]) -> float:
    """Runs the stage's work between its two records; returns the seconds it took. What the work
    returns (counts of what it did, e.g. tokens generated) is kept in the record as "work"."""
    write_record(stage, complete=False)
    start = time.perf_counter()
    try:
        done = work()
    except BaseException:
        if not stage.output.exists():  # nothing was made: leave no record of it either
            stage.record.unlink(missing_ok=True)
        raise
    seconds = round(time.perf_counter() - start, 1)
    write_record(stage, complete=True, seconds=seconds, work=done)
    return seconds

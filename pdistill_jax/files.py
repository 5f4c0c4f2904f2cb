"""Files: the one JSONL reader, atomic writes of files and folders, the crash-safe append log.

Every artefact of the pipeline (documents, questions, generated answers, predictions) is a
JSON-lines file, so reading must fail loudly and precisely (file and line), and writing must
never leave a half-written file or folder behind when a long run is interrupted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, Mapping, Sequence

from pdistill_jax.log import logger

_log = logger()


@dataclasses.dataclass(frozen=True)
class Field:
    """One field of a row: its accepted types, whether every row must have it, and whether a
    string may be blank."""

    types: tuple[type, ...] = (str,)
    required: bool = True
    blank_ok: bool = False


@dataclasses.dataclass(frozen=True)
class Schema:
    """What the rows of one kind of file hold. `describe` is shown in every error, so the user
    sees what the file should contain; `unique` names a field no two rows may share."""

    describe: str
    fields: Mapping[str, Field] = dataclasses.field(default_factory=dict)
    unique: str | None = None


ANY_OBJECTS = Schema("one JSON object a line")
_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
               list: "a list", dict: "an object"}


def read_jsonl(path: str | os.PathLike, schema: Schema = ANY_OBJECTS, *,
               flag: str | None = None) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file, each checked against `schema` (see read_jsonl_lines)."""
    return [row for _, row in read_jsonl_lines(path, schema, flag=flag)]


def read_jsonl_lines(path: str | os.PathLike, schema: Schema = ANY_OBJECTS, *,
                     flag: str | None = None) -> list[tuple[int, dict[str, Any]]]:
    """(1-based line number, row) of every non-blank line of a JSON-lines file.

    The one reader of user-written JSONL (documents, Q&A rows, questions, predictions), so every
    command treats a bad row alike: it refuses the whole file with one ValueError naming the
    file, the line and the field (non-UTF-8 bytes, invalid JSON, not an object, a missing,
    blank or wrongly typed field, a duplicate of the `unique` field). A half-read corpus would
    silently train or score on less than the user gave; the fix is always in their file.
    `flag` (e.g. "--questions") names the option in the messages about the path itself.
    """
    where = f"{flag} {path}" if flag else str(path)
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{where} is a folder; expected a JSONL file ({schema.describe})")
    if not p.exists():
        raise FileNotFoundError(f"{where}: no such file")
    rows: list[tuple[int, dict[str, Any]]] = []
    seen: dict[str, int] = {}
    with open(p, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            row = _parse_line(raw, f"{path}:{lineno}", schema)
            if row is None:
                continue
            if schema.unique is not None and schema.unique in row:
                key = str(row[schema.unique])
                if key in seen:
                    raise ValueError(f"{path}:{lineno}: duplicate {schema.unique} {key!r} (also "
                                     f"on line {seen[key]}); every row needs its own "
                                     f"\"{schema.unique}\"")
                seen[key] = lineno
            rows.append((lineno, row))
    return rows


def _parse_line(raw: bytes, where: str, schema: Schema) -> dict[str, Any] | None:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start + 1} of the line); "
                         "re-save the file as UTF-8") from None
    if not line.strip():
        return None
    try:
        row = json.loads(line.rstrip("\r\n"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: invalid JSON at column {e.colno} ({e.msg}); expected "
                         f"{schema.describe}") from None
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}; expected "
                         f"{schema.describe}")
    for name, field in schema.fields.items():
        problem = _field_problem(row, name, field)
        if problem:
            raise ValueError(f"{where}: field \"{name}\" is {problem}; expected {schema.describe}")
    return row


def _field_problem(row: dict[str, Any], name: str, field: Field) -> str | None:
    if name not in row or (row[name] is None and not field.required):
        return "missing" if field.required else None
    value = row[name]
    # bool is an int to Python, never to a user writing an id or a count.
    if not isinstance(value, field.types) or (isinstance(value, bool) and bool not in field.types):
        wanted = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in field.types)
        return f"{json.dumps(value)[:40]}, not {wanted}"
    if isinstance(value, str) and not field.blank_ok and not value.strip():
        return "empty"
    return None


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """A file object on a temporary file in the target's directory; on a clean exit it is
    fsync'ed and os.replace'd onto the target, on an exception deleted.

    os.replace is atomic on POSIX when source and target share a filesystem,
    so readers see either the old file or the complete new one.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write text (UTF-8) atomically: see atomic_writer."""
    with atomic_writer(path) as f:
        f.write(text)


def write_yaml_atomic(path: str | os.PathLike, data: dict[str, Any]) -> None:
    """Write a mapping as YAML (keys in the given order), atomically: resolved configs of runs."""
    import yaml

    write_text_atomic(path, yaml.safe_dump(data, sort_keys=False))


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> None:
    """Write rows as JSON lines (UTF-8, non-ASCII kept readable), atomically."""
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    write_text_atomic(path, text)


def check_output_file(out: str | os.PathLike, flag: str,
                      inputs: Mapping[str, str | os.PathLike | None]) -> None:
    """Refuses an output path that is a folder or one of the command's inputs (by resolved
    path, so a symlink, a hard link or another spelling of the same file counts), before any
    work: writing there would destroy the input."""
    target = Path(out).expanduser()
    if target.is_dir():
        raise ValueError(f"{flag} {out} is a folder; give the path of the JSONL file to write")
    for name, path in inputs.items():
        if path is None:
            continue
        source = Path(path).expanduser()
        same = target.resolve() == source.resolve() or (
            target.exists() and source.exists() and os.path.samefile(target, source))
        if same:
            raise ValueError(f"{flag} {out} is the {name} input {path}; writing there would "
                             f"destroy it: choose another {flag}")


# ---------------------------------------------------------------- the crash-safe append log

def read_committed_jsonl(path: Path) -> list[dict]:
    """Rows of an append-only JSONL file; a torn last line (a kill mid-write) is cut off the file.

    Every row is written with its newline, so bytes after the last newline are an interrupted
    write; a bad line before that is corruption, not a kill, and raises.
    """
    if not path.exists():
        return []
    data = path.read_bytes()
    complete = data.rfind(b"\n") + 1
    rows = []
    for lineno, line in enumerate(data[:complete].split(b"\n")[:-1], start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line.decode("utf-8")))
        except ValueError as e:
            raise ValueError(f"{path}:{lineno}: corrupt line ({e}); fix or delete it, or use a "
                             f"new --out") from None
    if complete < len(data):
        _log.warning(f"{path}: dropping a torn last line (an interrupted write)")
        with open(path, "r+b") as f:
            f.truncate(complete)
    return rows


def append_jsonl_durable(path: Path, rows: Sequence[dict]) -> None:
    """Append rows and fsync, so that once this returns they survive a kill or power loss."""
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------- folders

def write_dir_atomic(target: str | os.PathLike, fill: Callable[[Path], None],
                     replaceable: Callable[[Path], bool]) -> Path:
    """Runs `fill(tmp)` on a fresh temporary sibling of `target`, then renames it into place.

    An existing `target` is moved aside only once the new folder is complete, and only if it is
    empty or `replaceable(target)` says it is an earlier output of the same kind (never a user's
    unrelated folder). On any failure the temporary folder is removed and `target` is untouched.
    """
    target = Path(target).expanduser()
    if target.exists() and not (target.is_dir() and (not any(target.iterdir()) or replaceable(target))):
        raise ValueError(f"--out {target}: exists and is not an earlier export of this kind; "
                         "choose another --out or remove it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        fill(tmp)
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(old, target)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target

"""JSON-lines helpers shared by data generation, training and evaluation.

Every artefact of the pipeline (documents, questions, generated answers,
predictions) is a JSON-lines file, so reading must fail loudly and precisely
(file and line) and writing must never leave a half-written file behind when a
long run is interrupted.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterable, Iterator


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read one JSON object per non-blank line.

    Raises ValueError naming the file and 1-based line number on invalid JSON
    or on a line that is not a JSON object, so a corrupt data file is found
    without bisecting it by hand.
    """
    rows: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON: {e.msg}") from None
            if not isinstance(row, dict):
                raise ValueError(
                    f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}"
                )
            rows.append(row)
    return rows


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


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> None:
    """Write rows as JSON lines (UTF-8, non-ASCII kept readable), atomically."""
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    write_text_atomic(path, text)

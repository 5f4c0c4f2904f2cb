"""The one logger: what pdistill tells the user on stderr while it works.

`logger("train").info("resuming from step 4")` prints `pdistill train: resuming from step 4`;
`.warning(...)` adds `warning: `. One line per message, flushed at once (progress of a long run
must be visible as it happens), and only on process 0 of a multi-process cluster, where every
process runs the same code and would otherwise print every line N times. Errors that end a
command are not logged here: they are raised, and `cli.main` prints them.
"""
from __future__ import annotations

import logging
import sys

ROOT = "pdistill"


class _Process0(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        jax = sys.modules.get("jax")  # never import jax just to log (the CLI loads it lazily)
        return jax is None or not jax.distributed.is_initialized() or jax.process_index() == 0


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        where = record.name.replace(".", " ")
        level = "warning: " if record.levelno >= logging.WARNING else ""
        return f"{where}: {level}{record.getMessage()}"


class _Stderr(logging.StreamHandler):
    """Writes to the sys.stderr of the moment (pytest's capsys swaps it), not the one at import."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _root() -> logging.Logger:
    root = logging.getLogger(ROOT)
    if not root.handlers:
        handler = _Stderr()
        handler.setFormatter(_Format())
        handler.addFilter(_Process0())
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False
    return root


def logger(component: str | None = None) -> logging.Logger:
    """The logger of one part of pdistill ("train", "run", "generate", ...)."""
    root = _root()
    return root.getChild(component) if component else root

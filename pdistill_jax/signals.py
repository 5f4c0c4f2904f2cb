"""SIGTERM (`kill`, a scheduler preempting the job) ends a pdistill process like Ctrl-C, and a
training step is never cut in half by it.

The command line and the scripts install the handler (`stop_cleanly_on_sigterm`); a library
caller keeps its own. Outside a training loop the handler raises `Terminated` at once, so the
usual interrupt paths run (outputs are written atomically, a rerun resumes). Inside
`steps_finish_first()` it only notes the request, and the loop calls `raise_if_terminated()`
between steps, where the train state and the step count agree: the checkpoint then saved is
exactly the finished steps.
"""
from __future__ import annotations

import contextlib
import signal
import threading


class Terminated(KeyboardInterrupt):
    """Raised for SIGTERM; a KeyboardInterrupt, so every interrupt path handles it too."""


def interrupt_exit(e: KeyboardInterrupt) -> tuple[str, int]:
    """(what happened, exit status) of an interrupted command: 143 for SIGTERM (128 + 15, what
    a shell reports for a process the signal killed), 130 for Ctrl-C (128 + SIGINT)."""
    return ("terminated (SIGTERM)", 143) if isinstance(e, Terminated) else ("interrupted", 130)


_state = {"defer": 0, "pending": False}


def _on_sigterm(signum, frame):
    if _state["defer"]:
        _state["pending"] = True
        return
    raise Terminated()


def stop_cleanly_on_sigterm() -> None:
    """Installs the handler, from the main thread (elsewhere Python refuses signal handlers)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


@contextlib.contextmanager
def steps_finish_first():
    """Within: a SIGTERM waits for `raise_if_terminated()`."""
    _state["defer"] += 1
    try:
        yield
    finally:
        _state["defer"] -= 1
        if not _state["defer"] and _state["pending"]:  # left early another way: stop anyway
            _state["pending"] = False
            raise Terminated()


def raise_if_terminated() -> None:
    """Raises Terminated if a SIGTERM came since the last check."""
    if _state["pending"]:
        _state["pending"] = False
        raise Terminated()

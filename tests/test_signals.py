"""SIGTERM handling (pdistill_jax/signals.py): raised at once outside a training loop, held
until the loop's check inside one."""
import os
import signal

import pytest

from pdistill_jax.signals import (Terminated, interrupt_exit, raise_if_terminated,
                                  steps_finish_first, stop_cleanly_on_sigterm)


@pytest.fixture
def handler():
    previous = signal.getsignal(signal.SIGTERM)
    stop_cleanly_on_sigterm()
    yield
    signal.signal(signal.SIGTERM, previous)


def test_sigterm_outside_a_loop_raises_at_once(handler):
    with pytest.raises(Terminated):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(10**6):  # the handler runs between bytecodes: well before this ends
            pass
    assert issubclass(Terminated, KeyboardInterrupt)  # so every interrupt path handles it


def test_sigterm_inside_a_loop_waits_for_the_check(handler):
    steps = []
    with pytest.raises(Terminated):
        with steps_finish_first():
            for step in range(5):
                if step == 1:
                    os.kill(os.getpid(), signal.SIGTERM)
                    for _ in range(10**5):  # time for the handler to run: it must not raise
                        pass
                steps.append(step)  # the step in flight completes
                raise_if_terminated()
    assert steps == [0, 1]
    raise_if_terminated()  # the request was consumed


def test_a_request_pending_when_the_loop_ends_still_stops(handler):
    with pytest.raises(Terminated):
        with steps_finish_first():
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(10**5):
                pass
    raise_if_terminated()


def test_exit_status_tells_sigterm_from_ctrl_c():
    assert interrupt_exit(Terminated()) == ("terminated (SIGTERM)", 143)
    assert interrupt_exit(KeyboardInterrupt()) == ("interrupted", 130)

"""How a run reacts to the signals that ask it to stop: SIGTERM and SIGUSR1 (cluster schedulers, torchrun),
SIGINT (Ctrl-C).

Outside the training loop, SIGINT raises KeyboardInterrupt (Python's default) and SIGTERM / SIGUSR1 raise
:class:`~utils.errors.Stopped` (:func:`stop_signals_interrupt`), so start-up code unwinds and cleans up instead of
dying mid-way. Inside it, :class:`DeferredStop` only records the signal: the loop finishes the iteration,
writes its checkpoint and stops at a point of its choosing. A second Ctrl-C while a stop is pending raises
KeyboardInterrupt at once. DataLoader workers ignore the three signals (:func:`ignore_stop_signals`): a terminal
or a scheduler signals the whole process group, and the main process stops the workers itself.

The exit status of a stopped run is 128 + the signal number (130 SIGINT, 143 SIGTERM, 138 SIGUSR1), the
shell's convention.
"""
from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from utils.errors import Stopped

STOP_SIGNALS: tuple[signal.Signals, ...] = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, name))


def exit_code(signum: int) -> int:
    """The exit status of a run stopped by ``signum``."""
    return 128 + int(signum)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def ignore_stop_signals() -> None:
    """Ignore SIGINT, SIGTERM and SIGUSR1 in this process (DataLoader workers)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def _raise_stopped(signum: int, frame: FrameType | None) -> None:
    raise Stopped(f"stopped by {signal_name(signum)}", exit_code(signum))


@contextmanager
def stop_signals_interrupt() -> Iterator[None]:
    """Within the block SIGTERM and SIGUSR1 raise :class:`Stopped` (SIGINT keeps raising KeyboardInterrupt);
    the previous handlers come back at its end."""
    previous = {}
    if _in_main_thread():
        for signum in STOP_SIGNALS:
            if signum != signal.SIGINT:
                previous[signum] = signal.signal(signum, _raise_stopped)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class DeferredStop:
    """Within ``with DeferredStop() as stop:``, a stop signal is recorded in ``stop.received`` (the first one
    wins) instead of interrupting; a second SIGINT raises KeyboardInterrupt. The previous handlers come back
    at the end of the block. Outside the main thread (where Python delivers signals) it records nothing."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.received is None:
            self.received = signum
            if signum == signal.SIGINT and os.environ.get("RANK", "0") in ("", "0"):
                os.write(2, b"\nstopping after the current iteration with a checkpoint; "
                            b"press Ctrl-C again to stop at once\n")

    def __enter__(self) -> "DeferredStop":
        if _in_main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

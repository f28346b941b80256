"""The shared ending of command-line tools: one line instead of a traceback, and a documented exit status.

* :class:`UserError` (bad input): ``error: <message>`` and its exit status (2; 3 for a diverged training).
* :class:`Stopped` (a stop signal): the message saying where the run stopped, exit status 128 + signal number.
* KeyboardInterrupt (Ctrl-C outside the training loop): ``error: interrupted (Ctrl-C)``, exit status 130.
* :class:`PeerError` (another process of the job failed and said why): nothing printed.

Under torchrun (``RANK``/``WORLD_SIZE`` set) a failure that every process meets alike (a bad flag, a stop
signal) is printed by rank 0 only; a failure of one process is printed by that process, and also written to
torchrun's error file (``TORCHELASTIC_ERROR_FILE``) so that torchrun's summary shows the message and names that
process as the root cause. A process that stops because a peer failed waits a moment before exiting, so that
torchrun sees the failing process first.
"""
from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from utils.errors import EXIT_USER_ERROR, PeerError, Stopped, UserError
from utils.signals import exit_code as signal_exit_code

PEER_EXIT_DELAY_S = 2.0


def launch_rank() -> int:
    """This process's rank as the launcher set it (0 without torchrun or for a malformed value)."""
    text = os.environ.get("RANK", "").strip()
    return int(text) if text.isdigit() else 0


def _distributed_launch() -> bool:
    text = os.environ.get("WORLD_SIZE", "").strip()
    return text.isdigit() and int(text) > 1


def record_for_launcher(message: str) -> None:
    """Write ``message`` to torchrun's error file for this process, when torchrun asked for one."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    data = {"message": {"message": message,
                        "extraInfo": {"py_callstack": message, "timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w") as handle:
            json.dump(data, handle)
    except OSError:
        pass


_WORKER_FAILURE = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.\nOriginal Traceback")


def user_message(err: UserError) -> str:
    """The one-line message of ``err``. A UserError raised in a DataLoader worker reaches the main process
    re-created from the worker's whole traceback text; its original message is that text's last line."""
    text = str(err)
    if _WORKER_FAILURE.match(text):
        last = text.rstrip().splitlines()[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return text


def _report(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _wait_for_launcher() -> None:
    """Give torchrun time to notice the process that failed (it then ends this one with SIGTERM)."""
    if not _distributed_launch():
        return
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    time.sleep(PEER_EXIT_DELAY_S)


def run_main(parse_args: Callable[[Sequence[str] | None], Any], run: Callable[[Any], Any],
             argv: Sequence[str] | None = None) -> int:
    """``run(parse_args(argv))``; returns 0, or the exit status of the failure after reporting it (module
    docstring)."""
    try:
        args = parse_args(argv)
    except UserError as err:  # every process parses the same command line: rank 0 says what is wrong
        return _ending(f"error: {err}", err.exit_code, launch_rank() == 0)
    try:
        run(args)
    except PeerError as err:
        return _ending("", err.exit_code, False)
    except UserError as err:
        return _ending(f"error: {user_message(err)}", err.exit_code, True)
    except Stopped as err:  # every process was stopped alike: rank 0 says where
        return _ending(str(err), err.exit_code, launch_rank() == 0)
    except KeyboardInterrupt:
        return _ending("error: interrupted (Ctrl-C)", signal_exit_code(signal.SIGINT), launch_rank() == 0)
    return 0


def _ending(message: str, status: int, reports: bool) -> int:
    """Report ``message`` (to the terminal and torchrun) when this process ``reports`` it, else stay silent
    and let torchrun see the reporting process first; returns ``status``."""
    if reports:
        _report(message)
        record_for_launcher(message)
    else:
        _wait_for_launcher()
    return status


__all__ = ["EXIT_USER_ERROR", "launch_rank", "record_for_launcher", "run_main"]

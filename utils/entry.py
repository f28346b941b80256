"""The shared ending of command-line tools: bad input is one ``error: …`` line and exit status 2."""
from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

from utils.errors import UserError


def run_main(parse_args: Callable[[Sequence[str] | None], Any], run: Callable[[Any], Any],
             argv: Sequence[str] | None = None) -> int:
    """``run(parse_args(argv))``; returns 0, or 2 after printing ``error: <message>`` for a :class:`UserError`."""
    try:
        run(parse_args(argv))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0

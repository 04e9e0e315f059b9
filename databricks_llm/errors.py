"""The one exception type for problems with what the user gave us, and how a CLI reports it."""

from __future__ import annotations

import sys
from collections.abc import Callable


class InputError(ValueError):
    """Bad flags, files, datasets or requests: reported as one line, exit code 2."""


def exit_code(command: Callable[[], object]) -> int:
    """Run a CLI's work: 0 when it succeeds, 2 after one `error: ...` line when the input is bad."""
    try:
        command()
    except InputError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0

"""The one exception type for problems with what the user gave us, and how a CLI reports it."""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable

from databricks_llm import redaction
from databricks_llm.redaction import redact_text


class InputError(ValueError):
    """Bad flags, files, datasets or requests: reported as one line, exit code 2."""


def exit_code(command: Callable[[], object]) -> int:
    """Run a CLI's work: 0 when it succeeds, 2 after one `error: ...` line when the input is bad,
    130 on Ctrl-C, 1 with a traceback on anything else; all text goes through `redact_text`, and so
    does everything the process prints or logs meanwhile (`redaction.install`)."""
    redaction.install()
    try:
        command()
    except InputError as err:
        print(f"error: {redact_text(str(err))}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("[stopped] interrupted", file=sys.stderr, flush=True)
        return 130
    except Exception:  # a bug or a fault: the traceback helps, but it may quote a URI or a token
        print(redact_text(traceback.format_exc()), file=sys.stderr, end="", flush=True)
        return 1
    return 0


def first_line(err: BaseException | str, limit: int = 300) -> str:
    """The first line of an error's text, cut to `limit` characters: what a one-line refusal quotes."""
    lines = str(err).splitlines()
    return lines[0][:limit] if lines else type(err).__name__

"""Console output of the package: every module logs through `logging` (`databricks_llm.<module>`),
and each CLI's `main` calls `setup()` so that a person sees INFO lines on stdout and warnings on
stderr, each as the bare message, one line per event. A notebook or job that wants more or less
sets the level of the `databricks_llm` logger."""

from __future__ import annotations

import logging
import sys


class _Console(logging.Handler):
    """The message alone, to the stream of the moment (notebook kernels and test capture replace
    sys.stdout and sys.stderr after import)."""

    def emit(self, record: logging.LogRecord) -> None:
        stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
        try:
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # a closed stream must not stop the job
            self.handleError(record)


def setup(level: int = logging.INFO) -> None:
    """Show the package's INFO lines and warnings on the console (once per process, whoever calls)."""
    logger = logging.getLogger("databricks_llm")
    logger.setLevel(level)
    if not any(isinstance(h, _Console) for h in logger.handlers):
        logger.addHandler(_Console())

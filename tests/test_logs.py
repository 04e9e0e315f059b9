"""Console output: the package logs; a CLI shows INFO lines on stdout and warnings on stderr, the
message alone, once however many times it is set up."""

from __future__ import annotations

import logging

import pytest

from databricks_llm import logs


@pytest.fixture
def console():
    logger = logging.getLogger("databricks_llm")
    handlers, level = list(logger.handlers), logger.level
    yield logging.getLogger("databricks_llm.somewhere")
    logger.handlers[:], logger.level = handlers, level


def test_a_cli_shows_info_on_stdout_and_warnings_on_stderr_as_bare_lines(console, capsys):
    logs.setup()
    logs.setup()  # each CLI main and each notebook's setup cell calls it: still one line per event
    console.info("[data] train=10")
    console.debug("not shown")
    console.warning("warning: slow here")
    out, err = capsys.readouterr()
    assert (out, err) == ("[data] train=10\n", "warning: slow here\n")


def test_package_modules_log_under_the_package_logger():
    from databricks_llm import data, fine_tune, tracking

    assert {m.log.name for m in (data, fine_tune, tracking)} == {"databricks_llm.data", "databricks_llm.fine_tune",
                                                                "databricks_llm.tracking"}

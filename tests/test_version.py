"""The package has one version, kept in pyproject.toml and named in the changelog."""

from __future__ import annotations

import re

import databricks_llm
from conftest import REPO


def test_version_is_the_one_in_pyproject():
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r'^version = "(.+)"', pyproject, re.M).group(1) == databricks_llm.__version__


def test_changelog_has_a_section_for_the_version():
    assert f"\n## {databricks_llm.__version__}\n" in (REPO / "CHANGELOG.md").read_text()

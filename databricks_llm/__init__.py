"""Fine-tune open LLMs with transformers + PEFT + DeepSpeed and track everything in MLflow."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path


def _version() -> str:
    """The version in pyproject.toml: read from the file beside the package in a source checkout (an
    editable install's metadata keeps the version it was installed with), else from the installed
    package's metadata."""
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    if pyproject.is_file():
        found = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(encoding="utf-8"), re.M)
        if found:
            return found.group(1)
    try:
        return metadata.version("databricks_llm")
    except metadata.PackageNotFoundError:
        return "0+unknown"


__version__ = _version()

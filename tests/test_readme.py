"""The README's shell quick start runs as written: its commands are read from README.md itself and run
in a fresh folder on the tiny model, with flags appended only to shrink the job (the last value of a
repeated flag wins)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

TINY = {"databricks_llm.fine_tune": "--max_steps=2 --max_train_samples=8 --max_eval_samples=4 --eval_generation_samples=2 "
                                    "--save_steps=2 --eval_steps=2 --disable_tqdm=true",
        "databricks_llm.evaluate": "--max_samples=4 --max_tokens=16"}


def shell_quick_start() -> list[str]:
    """The commands of the bash block that follows "From the shell." in README.md."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"\*\*From the shell\.\*\*.*?```bash\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_readme_shell_quick_start_trains_scores_and_points_at_its_store():
    commands = shell_quick_start()
    assert [c.split()[:3] for c in commands[:2]] == [["python", "-m", "databricks_llm.fine_tune"],
                                                     ["python", "-m", "databricks_llm.evaluate"]]
    assert commands[2].startswith("mlflow ui --backend-store-uri sqlite:///outputs/quickstart/mlflow.db")


@pytest.mark.slow
def test_readme_shell_quick_start_runs_as_written_on_the_tiny_model(tiny_model, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for command in shell_quick_start()[:2]:
        module = command.split()[2]
        extra = f"--model={tiny_model} " * (module == "databricks_llm.fine_tune") + TINY[module]
        result = subprocess.run(f"{command} {extra}", shell=True, cwd=tmp_path, env=env, capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        if module == "databricks_llm.fine_tune":  # its summary sets the best checkpoint against the base model
            assert re.search(r"\[summary\] best: checkpoint-2, eval F1 \d\.\d{3}, .*; base model \d\.\d{3}", result.stdout)
    assert (tmp_path / "outputs" / "quickstart" / "mlflow.db").is_file()  # what the `mlflow ui` line opens
    assert re.search(r"\[evaluate\] \S+: F1 \d\.\d{3}", result.stdout)

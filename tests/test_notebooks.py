"""The notebooks: stored clean, and run headless with papermill as a chain (data -> fine-tune -> evaluation)."""

from __future__ import annotations

import json

import nbformat
import pytest

from conftest import REPO, run_module
from databricks_llm.notebook import CHAIN, NOTEBOOKS


@pytest.mark.parametrize("name", CHAIN)
def test_committed_notebook_has_no_outputs_and_a_parameters_cell(name):
    book = nbformat.read(NOTEBOOKS / name, as_version=4)
    code = [c for c in book.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    assert "parameters" in code[0].metadata.get("tags", [])


def test_fine_tune_notebook_launches_deepspeed_from_the_kernel_env_and_checks_its_exit():
    source = "\n".join(c.source for c in nbformat.read(NOTEBOOKS / "02_fine_tune.ipynb", as_version=4).cells)
    assert "Path(sys.executable).parent / \"deepspeed\"" in source
    assert "!{DEEPSPEED} --num_gpus={num_gpus} --module databricks_llm.fine_tune" in source
    assert "run_on_spark(shlex.split(JOB_FLAGS)" in source
    assert "if _exit_code != 0:" in source


@pytest.mark.slow
def test_chain_runs_headless_on_the_embedded_model(tmp_path):
    result = run_module("databricks_llm.notebook", "--profile=ci", f"--output={tmp_path / 'executed'}",
                        f"--work_dir={tmp_path / 'work'}", cwd=REPO, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    evaluation = nbformat.read(tmp_path / "executed" / "03_evaluation.ipynb", as_version=4)
    text = json.dumps([c.get("outputs", []) for c in evaluation.cells])
    assert "runs:/" in text and "slot F1" in text
    assert (tmp_path / "work" / "checkpoints" / "mlflow_run_id").exists()


@pytest.mark.slow
def test_failing_deepspeed_shell_cell_fails_the_notebook(tmp_path):
    import papermill
    from papermill.exceptions import PapermillExecutionError

    with pytest.raises(PapermillExecutionError, match="fine-tuning failed with exit code 2"):
        papermill.execute_notebook(str(NOTEBOOKS / "02_fine_tune.ipynb"), str(tmp_path / "out.ipynb"),
                                   parameters={"ds_config": "no-such-config.json", "output_dir": str(tmp_path / "job")},
                                   kernel_name="python3", cwd=str(REPO), progress_bar=False)


class Widgets:
    """Stands in for Databricks' dbutils.widgets, which exists only inside a workspace."""

    def __init__(self, typed: dict[str, str]) -> None:
        self.typed, self.created = typed, {}

    def text(self, name: str, default: str) -> None:
        self.created[name] = default

    def get(self, name: str) -> str:
        return self.typed.get(name, self.created[name])


def test_widget_values_keep_defaults_off_databricks():
    from databricks_llm.notebook import widget_values

    assert widget_values({"max_steps": 40, "use_lora": True}, ["max_steps", "use_lora"]) == {"max_steps": 40, "use_lora": True}


def test_widget_values_read_typed_widgets_on_databricks():
    from types import SimpleNamespace

    from databricks_llm.notebook import widget_values

    widgets = Widgets({"max_steps": "7", "use_lora": "false"})
    namespace = {"dbutils": SimpleNamespace(widgets=widgets), "max_steps": 40, "use_lora": True, "model": "m",
                 "learning_rate": 1e-3}
    values = widget_values(namespace, ["max_steps", "use_lora", "model", "learning_rate"])
    assert values == {"max_steps": 7, "use_lora": False, "model": "m", "learning_rate": 1e-3}
    assert widgets.created["max_steps"] == "40"


@pytest.mark.slow
def test_fine_tune_notebook_can_train_through_spark(tiny_model, tmp_path, monkeypatch):
    import sys

    import papermill

    from databricks_llm.data import EMBEDDED_DATASET

    monkeypatch.setenv("PYSPARK_PYTHON", sys.executable)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # an earlier test's server, set by mlflow.set_tracking_uri
    job = tmp_path / "job"
    papermill.execute_notebook(str(NOTEBOOKS / "02_fine_tune.ipynb"), str(tmp_path / "out.ipynb"), parameters={
        "model": str(tiny_model), "dataset": EMBEDDED_DATASET, "output_dir": str(job), "spark_processes": 2,
        "final_model_output_path": str(tmp_path / "final"), "ds_config": "ds_configs/ds_zero_2.json", "max_steps": 2,
        "per_device_train_batch_size": 2, "save_steps": 2, "extra_args": "--max_train_samples=8 --max_eval_samples=4"
        " --eval_generation_samples=2"}, kernel_name="python3", cwd=str(REPO), progress_bar=False)
    assert (tmp_path / "final" / "adapter_model.safetensors").exists() and (job / "checkpoint-2").is_dir()
    assert "best or last checkpoint: runs:/" in (tmp_path / "out.ipynb").read_text()

"""Where a notebook runs: project root, path parameters, launcher choice, Databricks widgets, task
values and the notebook-scoped install (against a test double of dbutils; no workspace was used)."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import pytest

from conftest import REPO
from databricks_double import DBUtils
from databricks_llm import workspace


@pytest.fixture(params=["notebooks", "root", "elsewhere"])
def kernel_folder(request, monkeypatch, tmp_path):
    """The kernel's working folder as Jupyter/Databricks (notebooks/), a shell (root) or papermill
    with --cwd anywhere (an unrelated folder) set it."""
    folder = {"notebooks": REPO / "notebooks", "root": REPO, "elsewhere": tmp_path}[request.param]
    monkeypatch.chdir(folder)
    return folder


def test_project_root_is_found_from_any_working_folder(kernel_folder):
    assert workspace.project_root() == REPO


def test_relative_outputs_land_under_the_project_root(kernel_folder):
    assert workspace.resolve_path("outputs/checkpoints") == str(REPO / "outputs" / "checkpoints")


def test_project_files_resolve_to_the_root(kernel_folder):
    assert workspace.resolve_path("ds_configs/ds_zero_2.json") == str(REPO / "ds_configs" / "ds_zero_2.json")


@pytest.mark.parametrize("value", ["/Volumes/main/default/llm/checkpoints", "/dbfs/llm/out", "dbfs:/llm/out",
                                   "embedded:e2e-sample", "HuggingFaceTB/SmolLM2-135M-Instruct", "e2e_nlg", ""])
def test_absolute_paths_and_non_path_sources_are_used_as_given(kernel_folder, value):
    assert workspace.resolve_path(value) == value


def test_base_path_takes_relative_outputs_but_not_project_files(kernel_folder, tmp_path):
    base = str(tmp_path / "volume")
    assert workspace.resolve_path("outputs/prepared_data", base) == str(tmp_path / "volume" / "outputs" / "prepared_data")
    assert workspace.resolve_path("ds_configs/ds_zero_3.json", base) == str(REPO / "ds_configs" / "ds_zero_3.json")


def test_gpu_leaves_the_zero_stage_to_the_jobs_memory_plan():
    launch = workspace.choose_launch(cuda=True)
    assert (launch.launcher, launch.ds_config) == ("deepspeed", "auto")
    assert "memory plan" in launch.reason


def test_cpu_with_a_compiler_gets_zero2_and_says_why(monkeypatch):
    monkeypatch.delenv("DATABRICKS_RUNTIME_VERSION", raising=False)
    launch = workspace.choose_launch(cuda=False)
    assert (launch.launcher, Path(launch.ds_config).name) == ("deepspeed", "ds_zero_2.json")
    assert "no CUDA" in launch.reason


def test_serverless_runs_without_deepspeed(monkeypatch):
    monkeypatch.setenv("DATABRICKS_RUNTIME_VERSION", "client.2.5")
    launch = workspace.choose_launch(cuda=False)
    assert (launch.launcher, launch.ds_config) == ("python", None)
    assert "serverless" in launch.reason


def test_cpu_without_a_compiler_runs_without_deepspeed(monkeypatch):
    monkeypatch.delenv("DATABRICKS_RUNTIME_VERSION", raising=False)
    monkeypatch.setattr(workspace.shutil, "which", lambda name: None)
    assert workspace.choose_launch(cuda=False).launcher == "python"


def test_explicit_choices_win(kernel_folder):
    launch = workspace.choose_launch("deepspeed", "ds_configs/ds_zero_3.json", cuda=False)
    assert (launch.launcher, launch.ds_config) == ("deepspeed", str(REPO / "ds_configs" / "ds_zero_3.json"))
    with pytest.raises(ValueError, match="launcher must be"):
        workspace.choose_launch("torchrun", cuda=False)


def test_missing_requirements_compares_pins_and_skips_spark(tmp_path):
    installed = metadata.version("mlflow")
    (tmp_path / "requirements.txt").write_text(
        f"# comment\nmlflow=={installed}\ntransformers==0.0.1\nno-such-package-xyz>=1\npyspark==0.0.1\npandas>=2\n")
    assert workspace.missing_requirements(tmp_path / "requirements.txt") == ["transformers==0.0.1", "no-such-package-xyz>=1"]


class Shell:
    """Records what the setup cell asks of IPython."""

    def __init__(self, dbutils: DBUtils) -> None:
        self.user_ns, self.magics = {"dbutils": dbutils}, []

    def run_line_magic(self, name: str, line: str) -> None:
        self.magics.append((name, line))


def test_setup_cell_installs_nothing_off_databricks(monkeypatch):
    monkeypatch.delenv("DATABRICKS_RUNTIME_VERSION", raising=False)
    shell = Shell(DBUtils())
    workspace.install_requirements(shell)
    assert shell.magics == [] and shell.user_ns["dbutils"].library.restarts == 0


def test_setup_cell_on_databricks_pip_installs_what_is_missing_then_restarts_python(monkeypatch, tmp_path):
    monkeypatch.setenv("DATABRICKS_RUNTIME_VERSION", "16.4")
    (tmp_path / "requirements.txt").write_text("transformers==0.0.1\npyspark==4.3.0\n")
    shell = Shell(DBUtils())
    workspace.install_requirements(shell, tmp_path / "requirements.txt")
    [(magic, line)] = shell.magics
    assert magic == "pip" and line.startswith("install -q -r ")
    assert Path(line.split()[-1]).read_text() == "transformers==0.0.1\n"  # never pyspark over Databricks' Spark
    assert shell.user_ns["dbutils"].library.restarts == 1


def test_setup_cell_on_databricks_does_not_restart_when_satisfied(monkeypatch):
    monkeypatch.setenv("DATABRICKS_RUNTIME_VERSION", "16.4")
    shell = Shell(DBUtils())
    workspace.install_requirements(shell, REPO / "requirements.txt")
    assert shell.magics == [] and shell.user_ns["dbutils"].library.restarts == 0


def test_widget_values_keep_defaults_off_databricks():
    assert workspace.widget_values({"max_steps": 40, "use_lora": True}, ["max_steps", "use_lora"]) == \
        {"max_steps": 40, "use_lora": True}


def test_widget_values_read_typed_widgets_on_databricks():
    dbutils = DBUtils(widgets={"max_steps": "7", "use_lora": "false"})
    namespace = {"dbutils": dbutils, "max_steps": 40, "use_lora": True, "model": "m", "learning_rate": 1e-3}
    values = workspace.widget_values(namespace, ["max_steps", "use_lora", "model", "learning_rate"])
    assert values == {"max_steps": 7, "use_lora": False, "model": "m", "learning_rate": 1e-3}
    assert dbutils.widgets.created["max_steps"] == "40"


def test_task_values_pass_from_one_job_task_to_the_next(tmp_path):
    store = tmp_path / "values.json"
    workspace.publish({"dbutils": DBUtils(store=store, task="fine_tune")}, best_checkpoint="runs:/abc/checkpoint-2")
    later = {"dbutils": DBUtils(store=store, task="evaluation")}
    assert workspace.task_value(later, "fine_tune", "best_checkpoint", "") == "runs:/abc/checkpoint-2"
    assert workspace.task_value(later, "fine_tune", "run_id", "fallback") == "fallback"


def test_task_values_fall_back_outside_a_job_and_off_databricks(tmp_path):
    interactive = {"dbutils": DBUtils(store=tmp_path / "values.json", in_job=False)}
    workspace.publish(interactive, run_id="abc")
    assert workspace.task_value(interactive, "fine_tune", "run_id", "from-files") == "from-files"
    assert workspace.task_value({}, "fine_tune", "run_id", "from-files") == "from-files"


def test_on_a_databricks_cluster_runs_go_to_the_workspace_tracking(monkeypatch, tmp_path):
    from databricks_llm import tracking

    for name in ("MLFLOW_TRACKING_URI", "DATABRICKS_HOST", "DATABRICKS_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DATABRICKS_RUNTIME_VERSION", "16.4")
    assert tracking.tracking_uri(str(tmp_path)) == "databricks"


def test_credentials_hint_when_the_notebook_context_is_not_available(monkeypatch, logged):
    monkeypatch.delenv("DATABRICKS_TOKEN", raising=False)
    workspace.export_databricks_credentials({"dbutils": DBUtils()})
    assert "set DATABRICKS_HOST and DATABRICKS_TOKEN" in logged.text


def test_an_output_folder_is_never_taken_for_a_hub_id(kernel_folder, tmp_path):
    assert workspace.resolve_path("prepared/e2e") == "prepared/e2e"  # an input: could be a hub dataset
    assert workspace.resolve_path("prepared/e2e", folder=True) == str(REPO / "prepared" / "e2e")
    assert workspace.resolve_path("prepared/e2e", str(tmp_path), folder=True) == str(tmp_path / "prepared" / "e2e")


def test_a_parameter_papermill_injected_that_the_notebook_does_not_take_is_refused():
    from databricks_llm.errors import InputError

    history = ["import sys", "model = 'a'\nmax_steps = 40\n", "# Parameters\nmax_step = 5\nmodel = \"b\"\n"]
    with pytest.raises(InputError, match="unknown notebook parameter max_step: this notebook takes model, max_steps"):
        workspace.widget_values({"In": history, "model": "b", "max_steps": 40, "max_step": 5}, ["model", "max_steps"])
    rerun = [*history[:2], "# Parameters\nmax_steps = 5\n", "JOB_FLAGS = '--x'"]  # Jupyter's later cells: not parameters
    assert workspace.widget_values({"In": rerun, "model": "a", "max_steps": 5, "JOB_FLAGS": "--x"},
                                   ["model", "max_steps"]) == {"model": "a", "max_steps": 5}

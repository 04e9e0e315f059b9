"""The notebooks where people run them: Jupyter's "Run all" (kernel in notebooks/), papermill from any
folder with a params file, the headless chain runner, and a Databricks job (against a test double of
dbutils: widgets and job task values; no real workspace was used)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

from conftest import REPO, run_module
from databricks_llm import sample_data
from databricks_llm.notebook import CHAIN, NOTEBOOKS, PROFILES, SWEEP_CHAIN

PAPERMILL = str(Path(sys.executable).parent / "papermill")
# The ci profile's sizes, on the tiny test model: the chain in about a minute.
TINY_JOB = {"max_steps": 2, "per_device_train_batch_size": 2, "save_steps": 2,
            "extra_args": PROFILES["ci"]["fine_tune"]["extra_args"]}
TINY_EVAL = {"max_samples": 4, "max_tokens": 16}
# Warnings a notebook shows from code paths of ours: fixed at their cause (or filtered narrowly where not ours).
WARNED = re.compile(r"Warning|WARNING|Setting accelerator to CPU|Add type hints|input example was not provided")
SCORED = re.compile(r"\[evaluate\] \S+: F1 \d\.\d{3}")  # what `evaluate` prints per model


def outputs_text(path: Path) -> str:
    return json.dumps([c.get("outputs", []) for c in nbformat.read(path, as_version=4).cells])


def output_lines(path: Path) -> list[str]:
    """The lines a person reads under the cells of an executed notebook (streams and text results)."""
    lines = []
    for cell in nbformat.read(path, as_version=4).cells:
        for output in cell.get("outputs", []):
            text = output.get("text") or output.get("data", {}).get("text/plain", "")
            lines += "".join(text).splitlines()
    return lines


def notebook_folder_listing() -> set[str]:
    return {str(p.relative_to(NOTEBOOKS)) for p in NOTEBOOKS.rglob("*")}


@pytest.mark.parametrize("name", sorted({*CHAIN, *SWEEP_CHAIN}))
def test_committed_notebook_is_clean_with_setup_then_parameters(name):
    book = nbformat.read(NOTEBOOKS / name, as_version=4)
    code = [c for c in book.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    assert "workspace.install_requirements(get_ipython())" in code[0].source
    assert "parameters" in code[1].metadata.get("tags", [])


def test_fine_tune_notebook_launches_deepspeed_from_the_kernel_env_and_checks_its_exit():
    source = "\n".join(c.source for c in nbformat.read(NOTEBOOKS / "02_fine_tune.ipynb", as_version=4).cells)
    assert 'Path(sys.executable).parent / "deepspeed"' in source
    assert "{DEEPSPEED} --num_gpus={num_gpus} --master_port={free_port()} " in source
    assert "run_on_spark(shlex.split(JOB_FLAGS)" in source
    assert "workspace.run_job(" in source


def execute(notebook: str, output: Path, cwd: Path, parameters: dict | None = None) -> Path:
    import papermill

    papermill.execute_notebook(str(cwd / notebook) if (cwd / notebook).exists() else str(NOTEBOOKS / notebook),
                               str(output), parameters=parameters or {}, kernel_name="python3", cwd=str(cwd),
                               progress_bar=False)
    return output


@pytest.mark.slow
def test_run_all_from_the_notebooks_folder_of_a_fresh_clone(tiny_model, tmp_path):
    """Jupyter/Databricks: kernel in notebooks/, default (relative) paths, nothing pip-installed there."""
    clone = tmp_path / "clone"
    for part in ("databricks_llm", "notebooks", "ds_configs"):
        shutil.copytree(REPO / part, clone / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "requirements.txt", clone)
    before = {p.name for p in (clone / "notebooks").iterdir()}
    model = {"model": str(tiny_model)}
    execute(CHAIN[0], tmp_path / "1.ipynb", clone / "notebooks", model)
    execute(CHAIN[1], tmp_path / "2.ipynb", clone / "notebooks", {**model, **TINY_JOB})
    execute(CHAIN[2], tmp_path / "3.ipynb", clone / "notebooks", {"base_model": str(tiny_model), **TINY_EVAL})
    assert {p.name for p in (clone / "notebooks").iterdir()} == before  # nothing written next to the notebooks
    assert (clone / "outputs" / "prepared_data" / "dataset_dict.json").exists()
    assert (clone / "outputs" / "checkpoints" / "mlflow_run_id").exists()
    assert (clone / "outputs" / "final_model" / "adapter_model.safetensors").exists()
    assert "[launch] deepspeed: no CUDA" in outputs_text(tmp_path / "2.ipynb")
    assert SCORED.search(outputs_text(tmp_path / "3.ipynb"))


@pytest.mark.slow
def test_papermill_cli_runs_each_notebook_with_a_params_file_from_any_folder(tiny_model, tmp_path):
    """A scheduled job: `papermill in.ipynb out.ipynb -f params.yaml` from an unrelated folder,
    relative paths under `base_path`, no DeepSpeed (launcher=python)."""
    elsewhere, volume = tmp_path / "cron", tmp_path / "volume"
    elsewhere.mkdir()
    before = notebook_folder_listing()
    common = {"base_path": str(volume)}
    params = [{**common, "model": str(tiny_model)},
              {**common, "model": str(tiny_model), "launcher": "python", **TINY_JOB},
              {**common, "base_model": str(tiny_model), **TINY_EVAL}]
    for notebook, values in zip(CHAIN, params):
        (elsewhere / "params.yaml").write_text(yaml.safe_dump(values))
        result = subprocess.run([PAPERMILL, str(NOTEBOOKS / notebook), f"out-{notebook}", "-f", "params.yaml",
                                 "--cwd", str(elsewhere), "--kernel", "python3", "--no-progress-bar"],
                                cwd=elsewhere, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
    assert (volume / "outputs" / "checkpoints" / "checkpoint-2").is_dir()
    assert "[launch] python: launcher=python as set" in outputs_text(elsewhere / f"out-{CHAIN[1]}")
    assert SCORED.search(outputs_text(elsewhere / f"out-{CHAIN[2]}"))
    assert notebook_folder_listing() == before


@pytest.mark.slow
def test_chain_runner_writes_a_timestamped_folder_and_logs_it_to_the_job_run(tmp_path):
    """`make demo`'s path on the embedded model, started from an unrelated folder."""
    import mlflow

    before = notebook_folder_listing()
    result = run_module("databricks_llm.notebook", "--profile=ci", f"--output={tmp_path / 'executed'}",
                        f"--work_dir={tmp_path / 'work'}", cwd=tmp_path, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    [folder] = (tmp_path / "executed").iterdir()
    assert sorted(p.name for p in folder.iterdir()) == sorted(CHAIN)
    evaluation = outputs_text(folder / CHAIN[2])
    assert "runs:/" in evaluation and SCORED.search(evaluation)
    assert '"image/png"' in json.dumps(nbformat.read(folder / CHAIN[2], as_version=4).cells[-1].outputs)  # base vs tuned
    fine_tune = output_lines(folder / CHAIN[1])
    known = "[runner.py:214:fetch_hostfile] Unable to find hostfile"  # DeepSpeed's launcher, on every one-node run: still open
    assert len(fine_tune) <= 120 and not [line for line in fine_tune if WARNED.search(line) and known not in line]
    assert not [line for line in output_lines(folder / CHAIN[2]) if WARNED.search(line)]
    assert "[summary] best: checkpoint-2, eval F1" in result.stdout  # the chain ends by saying the job's result
    job = tmp_path / "work" / "checkpoints"
    mlflow.set_tracking_uri(f"sqlite:///{job / 'mlflow.db'}")
    run_id = (job / "mlflow_run_id").read_text()
    logged = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, "notebooks")}
    assert logged == {f"notebooks/{n}" for n in CHAIN}
    assert mlflow.get_run(run_id).info.run_name.startswith("smollm2-135m-instruct-")
    assert notebook_folder_listing() == before


@pytest.mark.slow
def test_data_notebook_takes_a_users_own_columns_instruction_file_and_format(tiny_model, tmp_path):
    """A user's JSONL with their own column names and an instruction file, relative to the project."""
    import pandas as pd

    rows = sample_data.tickets(20, seed=3)
    pd.DataFrame({"body": [r["prompt"] for r in rows], "fields": [r["completion"] for r in rows]}).to_json(
        tmp_path / "tickets.jsonl", orient="records", lines=True)
    (tmp_path / "instruction.txt").write_text("Return the ticket's product, severity and customer as JSON.\n")
    execute(CHAIN[0], tmp_path / "1.ipynb", NOTEBOOKS, {
        "dataset": str(tmp_path / "tickets.jsonl"), "input_column": "body", "output_column": "fields",
        "instruction": f"@{tmp_path / 'instruction.txt'}", "output_format": "json", "model": str(tiny_model),
        "prepared_path": str(tmp_path / "prepared")})
    saved = json.loads((tmp_path / "prepared" / "extraction_task.json").read_text())
    assert saved["instruction"] == "Return the ticket's product, severity and customer as JSON."
    assert saved["output_format"] == "json" and "Return the ticket's product" in outputs_text(tmp_path / "1.ipynb")


@pytest.mark.slow
def test_chain_runs_the_shipped_support_ticket_task_from_the_data_parameter_alone(tiny_model, tmp_path):
    """The second worked example: only the dataset changes; notebook 1 resolves and saves the task,
    the job trains on it, notebook 3 scores JSON fields with the model's own instruction."""
    import mlflow

    result = run_module("databricks_llm.notebook", "--profile=ci", f"--model={tiny_model}",
                        "--dataset=embedded:support-tickets", f"--output={tmp_path / 'executed'}",
                        f"--work_dir={tmp_path / 'work'}", cwd=tmp_path, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    [folder] = (tmp_path / "executed").iterdir()
    assert "parse rate" in outputs_text(folder / CHAIN[2])
    job = tmp_path / "work" / "checkpoints"
    mlflow.set_tracking_uri(f"sqlite:///{job / 'mlflow.db'}")
    params = mlflow.get_run((job / "mlflow_run_id").read_text()).data.params
    assert (params["output_format"], params["instruction"]) == ("json", sample_data.TICKETS_INSTRUCTION)


@pytest.mark.slow
def test_chain_runner_exits_non_zero_when_a_notebook_fails(tmp_path):
    result = run_module("databricks_llm.notebook", "--profile=ci", "--model=./no-such-model",
                        f"--output={tmp_path / 'executed'}", f"--work_dir={tmp_path / 'work'}", cwd=tmp_path, timeout=600)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: notebook failed in cell")


@pytest.mark.slow
def test_failing_deepspeed_shell_cell_fails_the_notebook(tmp_path):
    from papermill.exceptions import PapermillExecutionError

    with pytest.raises(PapermillExecutionError, match="fine-tuning failed with exit code 2"):
        execute(CHAIN[1], tmp_path / "out.ipynb", NOTEBOOKS,
                {"ds_config": "no-such-config.json", "output_dir": str(tmp_path / "job")})


STARTUP = """
import json, os, sys
sys.path.insert(0, {tests!r})
from databricks_double import DBUtils
dbutils = DBUtils(widgets=json.loads(os.environ["DOUBLE_WIDGETS"]), store=__import__("pathlib").Path({store!r}),
                  task=os.environ["DOUBLE_TASK"])
"""


@pytest.mark.slow
def test_databricks_job_tasks_hand_over_data_run_and_checkpoint_through_task_values(tiny_model, tmp_path, monkeypatch):
    """Each notebook as a task of one job: parameters arrive as widgets (the bundle's
    base_parameters), results leave as task values; `dbutils` is in the namespace as on Databricks."""
    startup = tmp_path / "ipython" / "profile_default" / "startup"
    startup.mkdir(parents=True)
    store = tmp_path / "task_values.json"
    (startup / "00-dbutils.py").write_text(STARTUP.format(tests=str(Path(__file__).parent), store=str(store)))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    volume = str(tmp_path / "volume")
    tasks = [
        ("data_preparation", {"model": str(tiny_model), "base_path": volume, "prepared_path": "handed/over"}),
        ("fine_tune", {"model": str(tiny_model), "base_path": volume, "launcher": "python",
                       **{k: str(v) for k, v in TINY_JOB.items()}}),
        ("evaluation", {"base_model": str(tiny_model), **{k: str(v) for k, v in TINY_EVAL.items()}}),
    ]
    for (task, widgets), notebook in zip(tasks, CHAIN):
        monkeypatch.setenv("DOUBLE_TASK", task)
        monkeypatch.setenv("DOUBLE_WIDGETS", json.dumps(widgets))
        execute(notebook, tmp_path / notebook, NOTEBOOKS)
    values = json.loads(store.read_text())
    assert values["data_preparation"]["prepared_path"] == str(Path(volume) / "handed" / "over")
    assert f"[data] {values['data_preparation']['prepared_path']}" in outputs_text(tmp_path / CHAIN[1])
    best = values["fine_tune"]["best_checkpoint"]
    assert best == f"runs:/{values['fine_tune']['run_id']}/checkpoint-2"
    assert f"evaluating {best}" in outputs_text(tmp_path / CHAIN[2])


@pytest.mark.slow
def test_fine_tune_notebook_can_train_through_spark(tiny_model, tmp_path, monkeypatch):
    from databricks_llm.data import EMBEDDED_DATASET

    monkeypatch.setenv("PYSPARK_PYTHON", sys.executable)
    job = tmp_path / "job"
    execute(CHAIN[1], tmp_path / "out.ipynb", REPO, {
        "model": str(tiny_model), "dataset": EMBEDDED_DATASET, "output_dir": str(job), "spark_processes": 2,
        "final_model_output_path": str(tmp_path / "final"), "ds_config": "ds_configs/ds_zero_2.json", "max_steps": 2,
        "per_device_train_batch_size": 2, "save_steps": 2, "extra_args": "--max_train_samples=8 --max_eval_samples=4"
        " --eval_generation_samples=2"})
    assert (tmp_path / "final" / "adapter_model.safetensors").exists() and (job / "checkpoint-2").is_dir()
    assert "best or last checkpoint: runs:/" in (tmp_path / "out.ipynb").read_text()


def test_chains_started_in_the_same_second_get_a_folder_each(tmp_path):
    from databricks_llm.notebook import unique_folder

    folders = [unique_folder(tmp_path) for _ in range(3)]
    assert len(set(folders)) == 3 and all(f.is_dir() and f.parent == tmp_path for f in folders)


def test_runner_parameters_are_checked_against_each_notebooks_parameters_cell(tmp_path):
    from databricks_llm.errors import InputError
    from databricks_llm.notebook import chain_parameters, check_parameters

    for profile in PROFILES:
        check_parameters(chain_parameters(profile, tmp_path, "some/model", "data.csv"))
    parameters = chain_parameters("ci", tmp_path)
    with pytest.raises(InputError, match="02_fine_tune.ipynb has no parameter max_step "):
        check_parameters([parameters[0], {**parameters[1], "max_step": 3}, parameters[2]])
    with pytest.raises(InputError, match="02_fine_tune.ipynb parameter max_steps must be int .got 'ten'."):
        check_parameters([parameters[0], {**parameters[1], "max_steps": "ten"}, parameters[2]])

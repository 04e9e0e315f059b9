"""The Databricks bundle (databricks.yml) is a valid job definition of the three notebooks.

Jobs are checked with the databricks-bundles library's own job model (unknown fields and wrong
types are errors), notebook paths and base_parameters against the notebooks themselves
(papermill reads their parameters cells), and task values against the task keys the notebooks use.
"""

from __future__ import annotations

import re
from pathlib import Path

import papermill
import pytest
import yaml
from databricks.bundles.jobs import Job

from conftest import REPO

TOP_LEVEL = {"bundle", "variables", "resources", "targets", "include", "workspace", "artifacts", "sync",
             "permissions", "run_as", "presets", "experimental"}
TASKS_READ_BY_NOTEBOOKS = {"data_preparation", "fine_tune"}  # workspace.task_value(globals(), "<task>", ...)


def bundle_errors(path: Path) -> list[str]:
    """Everything wrong with the bundle at `path`; empty when it is valid."""
    bundle = yaml.safe_load(path.read_text())
    errors = [f"unknown top-level key {k}" for k in set(bundle) - TOP_LEVEL]
    variables = set(bundle.get("variables", {}))
    for ref in re.findall(r"\$\{var\.([A-Za-z0-9_]+)\}", path.read_text()):
        if ref not in variables:
            errors.append(f"undefined variable {ref}")
    jobs = bundle.get("resources", {}).get("jobs", {})
    if not jobs:
        errors.append("no jobs")
    for name, spec in jobs.items():
        try:
            job = Job.from_dict(spec)
        except ValueError as err:
            errors.append(f"{name}: {err}")
            continue
        keys = {t.task_key for t in job.tasks}
        if not TASKS_READ_BY_NOTEBOOKS <= keys:
            errors.append(f"{name}: the notebooks read task values of {sorted(TASKS_READ_BY_NOTEBOOKS)}; tasks are {sorted(keys)}")
        for task in job.tasks:
            errors += [f"{name}.{task.task_key}: depends on unknown task {d.task_key}"
                       for d in task.depends_on if d.task_key not in keys]
            notebook = path.parent / task.notebook_task.notebook_path
            if not notebook.is_file():
                errors.append(f"{name}.{task.task_key}: no notebook {task.notebook_task.notebook_path}")
                continue
            known = set(papermill.inspect_notebook(str(notebook)))
            errors += [f"{name}.{task.task_key}: {p} is not a parameter of {notebook.name}"
                       for p in task.notebook_task.base_parameters if p not in known]
    return errors


def test_the_bundle_validates():
    assert bundle_errors(REPO / "databricks.yml") == []


def test_the_bundle_has_a_gpu_and_a_serverless_variant():
    bundle = yaml.safe_load((REPO / "databricks.yml").read_text())
    jobs, variables = bundle["resources"]["jobs"], bundle["variables"]
    gpu, serverless = Job.from_dict(jobs["fine_tune_gpu"]), Job.from_dict(jobs["fine_tune_serverless"])
    assert "gpu" in variables[gpu.job_clusters[0].new_cluster.spark_version.path.split(".")[-1]]["default"]
    assert all(t.job_cluster_key is None and t.existing_cluster_id is None for t in serverless.tasks)
    assert {t.task_key: t.notebook_task.base_parameters.get("launcher") for t in serverless.tasks}["fine_tune"] == "python"


@pytest.mark.parametrize("breakage, message", [
    (("./notebooks/02_fine_tune.ipynb", "./notebooks/02_missing.ipynb"), "no notebook ./notebooks/02_missing.ipynb"),
    (("launcher: python", "launchr: python"), "launchr is not a parameter of 02_fine_tune.ipynb"),
    (("max_concurrent_runs: 1", "max_concurent_runs: 1"), "Unexpected field 'max_concurent_runs'"),
    (("task_key: fine_tune\n", "task_key: train\n"), "depends on unknown task fine_tune"),
    (("base_path: ${var.base_path}", "base_path: ${var.base_pth}"), "undefined variable base_pth"),
])
def test_a_broken_bundle_fails_validation(tmp_path, breakage, message):
    text = (REPO / "databricks.yml").read_text()
    assert breakage[0] in text
    (tmp_path / "notebooks").symlink_to(REPO / "notebooks")
    (tmp_path / "databricks.yml").write_text(text.replace(breakage[0], breakage[1], 1))
    assert any(message in e for e in bundle_errors(tmp_path / "databricks.yml")), bundle_errors(tmp_path / "databricks.yml")

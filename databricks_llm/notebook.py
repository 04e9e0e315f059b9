"""The headless notebook chain: data prep -> fine-tune -> evaluation with papermill.

    python -m databricks_llm.notebook --profile=demo   # cron / Airflow friendly: exit 1 on a failed cell

Each run writes its executed notebooks into a folder of its own, <--output>/<date-time>/, and
logs them to the fine-tuning job's MLflow run as artifacts under `notebooks/`. The kernels start
in `notebooks/`, as in Jupyter and Databricks, so the chain checks what a person clicking
"Run all" gets.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from databricks_llm import outputlock
from databricks_llm.errors import InputError, exit_code, first_line
from databricks_llm.redaction import redact_text

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
CHAIN = ("01_data_preparation.ipynb", "02_fine_tune.ipynb", "03_evaluation.ipynb")
# Per profile: parameters for the fine-tuning and evaluation notebooks (data prep uses defaults).
# The fine-tuning notebook picks the launcher and DeepSpeed config for the hardware by itself.
PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    "ci": {
        "fine_tune": {"max_steps": 2, "per_device_train_batch_size": 2, "save_steps": 2,
                      "extra_args": "--max_train_samples=8 --max_eval_samples=4 --eval_generation_samples=2 "
                                    "--logging_steps=1 --disable_tqdm=true"},
        "evaluate": {"max_samples": 4, "max_tokens": 32},
    },
    "demo": {"fine_tune": {}, "evaluate": {}},
    # Databricks Free Edition / serverless: CPU only, no DeepSpeed launcher, no Spark distributors.
    "free": {"fine_tune": {"launcher": "python"}, "evaluate": {}},
    "full": {
        "fine_tune": {"max_steps": -1, "save_steps": 200,
                      "extra_args": "--num_train_epochs=1 --eval_generation_samples=64 --logging_steps=10"},
        "evaluate": {"max_samples": 0},
    },
}


def chain_parameters(profile: str, work_dir: Path, model: str | None = None,
                     dataset: str | None = None) -> list[dict[str, Any]]:
    """Papermill parameters of each notebook of the chain, each feeding the next."""
    settings = PROFILES[profile]
    prepared, job = str(work_dir / "prepared_data"), str(work_dir / "checkpoints")
    common = {"model": model} if model else {}
    return [
        {**common, "prepared_path": prepared, **({"dataset": dataset} if dataset else {})},
        {**common, "dataset": prepared, "output_dir": job, "final_model_output_path": str(work_dir / "final_model"),
         **settings["fine_tune"]},
        {**({"base_model": model} if model else {}), "dataset": prepared, "output_dir": job, **settings["evaluate"]},
    ]


def run_chain(parameters: list[dict[str, Any]], output: Path) -> None:
    """Execute the three notebooks with papermill, kernels in `notebooks/`; stop at the first failure.

    Whatever executed, failed cells included, is logged to the fine-tuning job's run afterwards."""
    import papermill

    output.mkdir(parents=True, exist_ok=True)
    try:
        for notebook, params in zip(CHAIN, parameters):
            print(f"[notebook] {notebook} -> {output / notebook}", flush=True)
            papermill.execute_notebook(str(NOTEBOOKS / notebook), str(output / notebook), parameters=params,
                                       kernel_name="python3", cwd=str(NOTEBOOKS), progress_bar=False)
    finally:
        log_executed(output, parameters[1]["output_dir"])


def log_executed(folder: Path, job_dir: str) -> None:
    """The executed notebooks as artifacts (`notebooks/`) of the job's run, if the job got that far."""
    import mlflow

    from databricks_llm import runs, tracking

    if not (Path(job_dir) / tracking.RUN_ID_FILE).exists():
        return
    mlflow.set_tracking_uri(tracking.tracking_uri(job_dir))
    run_id = runs.job_run_id(job_dir)
    tracking.survive("logging the executed notebooks",
                     lambda: mlflow.MlflowClient().log_artifacts(run_id, str(folder), "notebooks"))
    print(f"[notebook] executed notebooks logged to run {run_id} under notebooks/", flush=True)


def unique_folder(parent: Path) -> Path:
    """A new <parent>/<date-time>[-N] folder: chains started in the same second get one each."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        folder = parent / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        return folder
    raise InputError(f"--output {parent}: no free folder name for {stamp}")


def declared_parameters(notebook: Path) -> dict[str, type]:
    """Name -> type of each default in a notebook's `parameters` cell."""
    import ast

    import nbformat

    cell = next(c for c in nbformat.read(notebook, as_version=4).cells if "parameters" in c.metadata.get("tags", []))
    return {node.targets[0].id: type(ast.literal_eval(node.value)) for node in ast.parse(cell.source).body
            if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)}


def check_parameters(parameters: list[dict[str, Any]]) -> None:
    """Each parameter is one the notebook declares (papermill itself only warns) and of its default's
    type (an int passes for a float)."""
    for notebook, params in zip(CHAIN, parameters):
        declared = declared_parameters(NOTEBOOKS / notebook)
        for name, value in params.items():
            if name not in declared:
                raise InputError(f"{notebook} has no parameter {name} (it takes {', '.join(declared)})")
            expected = declared[name]
            accepted = (int, float) if expected is float else expected
            if not isinstance(value, accepted) or isinstance(value, bool) != (expected is bool):
                raise InputError(f"{notebook} parameter {name} must be {expected.__name__} (got {value!r})")


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: exit 2 with one `error:` line on bad flags, 1 when a notebook cell fails."""
    from databricks_llm import validation

    parser = validation.strict(argparse.ArgumentParser(description="Run the notebooks headless with papermill, chained."))
    parser.add_argument("--profile", choices=sorted(PROFILES), default="demo")
    parser.add_argument("--output", type=Path, default=Path("outputs/notebooks"),
                        help="executed notebooks go to <output>/<date-time>/")
    parser.add_argument("--work_dir", type=Path, default=Path("outputs"), help="prepared data, checkpoints, MLflow store")
    parser.add_argument("--model", help="override the model of every notebook")
    parser.add_argument("--dataset", help="override the data-preparation source")
    failed = []

    def run() -> None:
        from papermill.exceptions import PapermillExecutionError

        args = parser.parse_args(argv)
        parameters = chain_parameters(args.profile, args.work_dir.resolve(), args.model, args.dataset)
        check_parameters(parameters)
        for flag, value in (("--output", args.output), ("--work_dir", args.work_dir)):
            validation.check_writable(str(value), flag)
        job_dir = parameters[1]["output_dir"]
        with outputlock.hold(job_dir):  # the chain's job folder, before any launcher picks a port
            os.environ[outputlock.HOLDER_ENV] = str(os.getpid())  # the chain's own job shares the lock
            output = unique_folder(args.output.resolve())
            try:
                run_chain(parameters, output)
            except PapermillExecutionError as err:
                failed.append(f"error: notebook failed in cell {err.exec_count}: {err.ename}: "
                              f"{first_line(err.evalue)} (see {output})")

    code = exit_code(run)
    if failed:
        print(redact_text(failed[0]), file=sys.stderr, flush=True)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())

"""The headless notebook chain: data prep -> fine-tune -> evaluation with papermill.

    python -m databricks_llm.notebook --profile=demo   # cron / Airflow friendly: exit 1 on a failed cell
    python -m databricks_llm.notebook --profile=demo --sweep   # data prep -> hyperparameter sweep (04_sweep)

Each run writes its executed notebooks into a folder of its own, <--output>/<date-time>/, and
logs them to the fine-tuning job's MLflow run as artifacts under `notebooks/`. The kernels start
in `notebooks/`, as in Jupyter and Databricks, so the chain checks what a person clicking
"Run all" gets.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from databricks_llm import logs, outputlock
from databricks_llm.errors import InputError, exit_code, first_line
from databricks_llm.redaction import redact_text

log = logging.getLogger("databricks_llm.notebook")  # by name: this module also runs as __main__

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
CHAIN = ("01_data_preparation.ipynb", "02_fine_tune.ipynb", "03_evaluation.ipynb")
SWEEP_CHAIN = ("01_data_preparation.ipynb", "04_sweep.ipynb")
# Per profile: parameters for the fine-tuning and evaluation notebooks, and for data preparation
# where a profile names its data (`--dataset` overrides it). The fine-tuning notebook picks the
# launcher and DeepSpeed config for the hardware by itself.
PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    "ci": {
        "fine_tune": {"max_steps": 2, "per_device_train_batch_size": 2, "save_steps": 2,
                      "extra_args": "--max_train_samples=8 --max_eval_samples=4 --eval_generation_samples=2 "
                                    "--logging_steps=1 --disable_tqdm=true"},
        "evaluate": {"max_samples": 4, "max_tokens": 32},
        "sweep": {"trials": 2, "max_steps": 2, "extra_args": "--max_train_samples=8 --max_eval_samples=4 "
                  "--eval_generation_samples=2 --eval_steps=2 --save_steps=2 --logging_steps=1 --disable_tqdm=true"},
    },
    "demo": {"fine_tune": {}, "evaluate": {}, "sweep": {}},
    # Databricks Free Edition / serverless: CPU only, no DeepSpeed launcher, no Spark distributors.
    "free": {"fine_tune": {"launcher": "python"}, "evaluate": {}, "sweep": {}},
    "full": {
        "fine_tune": {"max_steps": -1, "save_steps": 200,
                      "extra_args": "--num_train_epochs=1 --eval_generation_samples=64 --logging_steps=10"},
        "evaluate": {"max_samples": 0},
        "sweep": {"trials": 20, "max_steps": -1, "extra_args": "--num_train_epochs=1 --eval_generation_samples=64 "
                  "--eval_steps=200 --save_steps=200 --logging_steps=10"},
    },
    # SNIPS slot filling from its span files (docs/spans.md): intent + slots as one JSON frame; the
    # dev split is the validation and evaluation split. ~1,000 steps of batch 8: about 60 CPU minutes.
    "snips": {
        "data_preparation": {"dataset": "../shared/data/snips"},
        "fine_tune": {"max_steps": 1000, "per_device_train_batch_size": 8, "learning_rate": 2e-3, "save_steps": 250,
                      "extra_args": "--lr_scheduler_type=cosine --warmup_steps=20 --train_sampling_strategy=group_by_length "
                                    "--eval_steps=250 --max_eval_samples=64 --eval_generation_samples=64 --logging_steps=20"},
        "evaluate": {"max_samples": 0, "max_tokens": 96},
    },
}


def chain_parameters(profile: str, work_dir: Path, model: str | None = None,
                     dataset: str | None = None) -> list[dict[str, Any]]:
    """Papermill parameters of each notebook of the chain, each feeding the next."""
    settings = PROFILES[profile]
    prepared, job = str(work_dir / "prepared_data"), str(work_dir / "checkpoints")
    common = {"model": model} if model else {}
    return [
        {**common, "prepared_path": prepared, **settings.get("data_preparation", {}), **({"dataset": dataset} if dataset else {})},
        {**common, "dataset": prepared, "output_dir": job, "final_model_output_path": str(work_dir / "final_model"),
         **settings["fine_tune"]},
        {**({"base_model": model} if model else {}), "dataset": prepared, "output_dir": job, **settings["evaluate"]},
    ]


def sweep_parameters(profile: str, work_dir: Path, model: str | None = None,
                     dataset: str | None = None) -> list[dict[str, Any]]:
    """Papermill parameters of data preparation and the sweep notebook (SWEEP_CHAIN)."""
    prepared = chain_parameters(profile, work_dir, model, dataset)[0]
    return [prepared, {**({"model": model} if model else {}), "dataset": prepared["prepared_path"],
                       "sweep_dir": str(work_dir / "sweep"), **PROFILES[profile]["sweep"]}]


def run_chain(parameters: list[dict[str, Any]], output: Path, chain: tuple[str, ...] = CHAIN) -> None:
    """Execute the notebooks with papermill, kernels in `notebooks/`; stop at the first failure.

    Whatever executed, failed cells included, is logged to the fine-tuning job's run (the sweep's
    run for the sweep chain) afterwards."""
    import papermill

    output.mkdir(parents=True, exist_ok=True)
    try:
        for notebook, params in zip(chain, parameters):
            log.info(f"[notebook] {notebook} -> {output / notebook}")
            papermill.execute_notebook(str(NOTEBOOKS / notebook), str(output / notebook), parameters=params,
                                       kernel_name="python3", cwd=str(NOTEBOOKS), progress_bar=False)
    finally:
        log_executed(output, parameters[1].get("output_dir") or parameters[1]["sweep_dir"])


def log_executed(folder: Path, job_dir: str) -> None:
    """The executed notebooks as artifacts (`notebooks/`) of the job's run, if the job got that far."""
    import mlflow

    from databricks_llm import runs, summary, tracking

    if not (Path(job_dir) / tracking.RUN_ID_FILE).exists():
        return
    mlflow.set_tracking_uri(tracking.tracking_uri(job_dir))
    run_id = runs.job_run_id(job_dir)
    tracking.survive("logging the executed notebooks",
                     lambda: mlflow.MlflowClient().log_artifacts(run_id, str(folder), "notebooks"))
    log.info(f"[notebook] executed notebooks logged to run {run_id} under notebooks/")
    tracking.survive("reading the job's summary", lambda: summary.say_run(run_id))


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


def check_parameters(parameters: list[dict[str, Any]], chain: tuple[str, ...] = CHAIN) -> None:
    """Each parameter is one the notebook declares (papermill itself only warns) and of its default's
    type (an int passes for a float)."""
    for notebook, params in zip(chain, parameters):
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
    parser.add_argument("--sweep", action="store_true", help="data prep, then the hyperparameter sweep (04_sweep)")
    failed = []

    def run() -> None:
        from papermill.exceptions import PapermillExecutionError

        args = parser.parse_args(argv)
        logs.setup()
        chain, build = (SWEEP_CHAIN, sweep_parameters) if args.sweep else (CHAIN, chain_parameters)
        parameters = build(args.profile, args.work_dir.resolve(), args.model, args.dataset)
        check_parameters(parameters, chain)
        for flag, value in (("--output", args.output), ("--work_dir", args.work_dir)):
            validation.check_writable(str(value), flag)
        job_dir = parameters[1].get("output_dir") or parameters[1]["sweep_dir"]
        with outputlock.hold(job_dir):  # the chain's job folder, before any launcher picks a port
            os.environ[outputlock.HOLDER_ENV] = str(os.getpid())  # the chain's own job shares the lock
            output = unique_folder(args.output.resolve())
            try:
                run_chain(parameters, output, chain)
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

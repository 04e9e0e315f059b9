"""Finding a fine-tuning job's MLflow run and checkpoints, and drawing its curves (for notebooks)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow

from databricks_llm import tracking
from databricks_llm.errors import InputError


def job_run_id(job_dir: str) -> str:
    """The run id a fine-tuning job wrote into its --output_dir."""
    path = Path(job_dir) / tracking.RUN_ID_FILE
    if not path.exists():
        raise InputError(f"{job_dir} holds no {tracking.RUN_ID_FILE}: run the fine-tuning job first")
    return path.read_text().strip()


def logged_checkpoints(run_id: str) -> list[tuple[int, Any]]:
    """(step, LoggedModel) of each checkpoint the fine-tuning run logged, by step."""
    run = mlflow.get_run(run_id)
    logged = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list",
                                         filter_string=f"source_run_id = '{run_id}'")
    checkpoints = sorted((int(m.name.split("-")[1]), m) for m in logged if m.name.startswith("checkpoint-"))
    if not checkpoints:
        raise InputError(f"run {run_id} has no logged checkpoint models")
    return checkpoints


def checkpoint_uri(run_id: str) -> str:
    """`runs:/<run>/checkpoint-N` of the run's best checkpoint by the task's eval_f1 (eval_slot_f1 for
    runs logged before tasks; else eval_loss), else its last."""

    def rank(item: tuple[int, Any]) -> tuple:
        step, model = item
        metrics = {m.key: m.value for m in model.metrics or []}
        f1 = metrics.get("eval_f1", metrics.get("eval_slot_f1"))
        if f1 is not None:
            return (1, f1, step)
        if "eval_loss" in metrics:
            return (0, -metrics["eval_loss"], step)
        return (-1, 0, step)

    return f"runs:/{run_id}/{max(logged_checkpoints(run_id), key=rank)[1].name}"


def loss_figure(run_id: str, f1_by_step: list[tuple[int, float]] | None = None) -> Any:
    """Training and eval loss by step beside the task's F1 by step (the run's eval_f1, or eval_slot_f1
    for runs logged before tasks, unless given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    client = mlflow.MlflowClient()
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for key in ("loss", "eval_loss"):
        history = client.get_metric_history(run_id, key)
        left.plot([m.step for m in history], [m.value for m in history], marker=".", label=key)
    left.set(title="loss", xlabel="step")
    left.legend()
    if f1_by_step is None:
        history = client.get_metric_history(run_id, "eval_f1") or client.get_metric_history(run_id, "eval_slot_f1")
        f1_by_step = [(m.step, m.value) for m in history]
    right.plot([s for s, _ in f1_by_step], [f for _, f in f1_by_step], marker="o")
    right.set(title="F1", xlabel="step", ylim=(0, 1))
    figure.tight_layout()
    return figure

"""The result of a fine-tuning job, said where the user looks: a few lines at the end of the job's
output and the same text as its MLflow run's description (`mlflow.note.content`).

It names what was trained, the best evaluation and its score against the base model (the step-0
evaluation of `--eval_on_start=true`: with LoRA's zero-initialised adapters, or before any step of a
full fine-tune, that is the base model), where the final model and the run are, and how to open the
run in the UI's model-training view or serve the model. MLflow 3's UI picks the view from the
`workflowType` URL parameter (else the browser's last choice, default GenAI), so the link carries
`workflowType=machine_learning`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from databricks_llm.redaction import redact_text

log = logging.getLogger(__name__)

DESCRIPTION_TAG = "mlflow.note.content"
UI_VIEW = "workflowType=machine_learning"
LOCAL_UI = "http://127.0.0.1:5000"


def best_and_base(log_history: list[dict]) -> tuple[dict | None, dict | None]:
    """The evaluation with the highest F1 (the latest of equals) and the step-0 one, from the Trainer's
    log history; None where there is none."""
    scored = [e for e in log_history if "eval_f1" in e]
    trained = [e for e in scored if e.get("step", 0) > 0]
    best = max(trained, key=lambda e: (e["eval_f1"], e["step"]), default=None)
    base = next((e for e in scored if e.get("step") == 0), None)
    return best, base


def run_link(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page in the tracking server's UI, in the model-training view."""
    if tracking_uri.startswith(("http://", "https://")):
        root = tracking_uri.rstrip("/")
    elif tracking_uri.startswith("databricks"):
        return f"{os.environ.get('DATABRICKS_HOST', '<workspace>').rstrip('/')}/ml/experiments/{experiment_id}/runs/{run_id}"
    else:
        root = LOCAL_UI
    return f"{root}/#/experiments/{experiment_id}/runs/{run_id}?{UI_VIEW}"


def text(*, model: str, dataset: str, output_format: str, lora: bool, steps: int, log_history: list[dict],
         output_dir: str, final_model: str, run_id: str | None = None, experiment_id: str | None = None,
         tracking_uri: str | None = None) -> str:
    """The summary's lines (plain text: the console and the run's description show the same)."""
    best, base = best_and_base(log_history)
    lines = [f"fine-tuned {model} ({'LoRA' if lora else 'full'}) on {dataset}, {output_format} task, {steps} steps"]
    if best is not None:
        checkpoint = Path(output_dir) / f"checkpoint-{best['step']}"
        where = checkpoint.name if checkpoint.is_dir() else f"step {best['step']}"
        against = (f"; base model {base['eval_f1']:.3f}" if base is not None
                   else "; base model not scored (--eval_on_start=true scores it)")
        lines.append(f"best: {where}, eval F1 {best['eval_f1']:.3f}, exact match {best.get('eval_exact_match', 0):.3f}"
                     f"{against}")
    lines.append(f"final model: {final_model}")
    if run_id and tracking_uri:
        uri = redact_text(tracking_uri)
        lines.append(f"MLflow run {run_id} at {uri}")
        if uri.startswith("sqlite:"):
            lines.append(f"open: mlflow ui --backend-store-uri {uri}  then {run_link(uri, experiment_id or '0', run_id)}")
        else:
            lines.append(f"open: {run_link(uri, experiment_id or '0', run_id)}")
        lines.append(f"serve: mlflow models serve -m runs:/{run_id}/final_model --env-manager local")
    return "\n".join(lines)


def say(summary: str) -> None:
    """The summary on the console, each line marked."""
    log.info("[summary] " + summary.replace("\n", "\n[summary] "))


def say_run(run_id: str) -> None:
    """Repeat a finished job's summary from its run's description (the end of `make demo`)."""
    import mlflow

    description = mlflow.get_run(run_id).data.tags.get(DESCRIPTION_TAG)
    if description:
        say(description)


def report(job: Any, run_id: str | None) -> str:
    """Say the finished job's result on the console and, when tracked, as its run's description
    (a tracking outage costs the description, never the console lines)."""
    import mlflow

    from databricks_llm import tracking

    config, state = job.config, job.trainer.state
    active = mlflow.active_run()
    summary = text(model=config.model.model, dataset=config.data.dataset, output_format=job.task.output_format,
                   lora=config.model.use_lora, steps=state.global_step, log_history=state.log_history,
                   output_dir=job.training.output_dir, final_model=str(Path(config.job.final_model_output_path).resolve()),
                   run_id=run_id, experiment_id=active.info.experiment_id if active else None,
                   tracking_uri=mlflow.get_tracking_uri() if run_id else None)
    if run_id:
        tracking.survive("setting the run's description",
                         lambda: mlflow.MlflowClient().set_tag(run_id, DESCRIPTION_TAG, summary))
    say(summary)
    return summary

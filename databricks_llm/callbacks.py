"""Trainer callbacks: step metrics and checkpoints into the job's MLflow run, and where a stop signal takes effect."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import mlflow
import torch
import torch.distributed as dist
from transformers import TrainerCallback

from databricks_llm import tracking
from databricks_llm.runtime import Stop


class MLflowLogger(TrainerCallback):
    """Every numeric value the Trainer logs goes to the job's run at its step, and every saved
    checkpoint is logged as a servable MLflow model (`log_checkpoints`).

    Added on global rank 0 only. The run itself (params, tags, inputs, end state) belongs to
    `tracking.job_run`; after a resume, steps up to `skip_until_step` were already logged.
    """

    def __init__(self, skip_until_step: int = -1, log_checkpoints: bool = True) -> None:
        self.skip_until_step, self.log_checkpoints = skip_until_step, log_checkpoints

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        metrics = {k: float(v) for k, v in (logs or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if state.global_step <= self.skip_until_step or not metrics:
            return
        tracking.survive("metric logging",
                         lambda: mlflow.log_metrics(metrics, step=state.global_step, synchronous=False))
        if control.should_save:  # buffered metrics reach the store before the checkpoint is written:
            tracking.survive("flushing metrics", mlflow.flush_async_logging)  # a resume from it skips them

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not self.log_checkpoints:
            return
        tracking.survive("flushing metrics", mlflow.flush_async_logging)  # so the model links this step's metrics
        name = f"checkpoint-{state.global_step}"
        tracking.survive(f"logging {name} as a model",
                         lambda: tracking.log_model_folder(Path(args.output_dir) / name, name=name, step=state.global_step))


class StopOnSignal(TrainerCallback):
    """Where a signal received during training takes effect: between steps (see `runtime.Stop`)."""

    def __init__(self, stop: Stop) -> None:
        self.stop = stop

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.stop.deferring = True

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.stop.check()

    def on_substep_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.stop.check()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.stop.deferring = False
        self.stop.check()


class SaveAtMinutes(TrainerCallback):
    """Save a checkpoint at the first step end after each of `minutes` of training (wall clock
    from the first step), so one run yields the checkpoints of several time budgets.

    Under several processes rank 0's clock decides for all (saving is collective under ZeRO-3)."""

    def __init__(self, minutes: list[float]) -> None:
        self.marks = [m * 60 for m in minutes]
        self.start = 0.0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.start = time.monotonic()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not self.marks:
            return
        due = float(time.monotonic() - self.start >= self.marks[0])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([due], device="cuda" if dist.get_backend() == "nccl" else "cpu")
            dist.broadcast(flag, src=0)
            due = flag.item()
        if due:
            self.marks.pop(0)
            control.should_save = True

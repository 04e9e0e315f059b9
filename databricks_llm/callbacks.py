"""Trainer callbacks that talk to MLflow (rank 0 only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from transformers.integrations import MLflowCallback

from databricks_llm import tracking


def _survive(action: str, fn: Callable[[], Any]) -> None:
    """Tracking trouble must never kill training: report it and carry on."""
    try:
        fn()
    except Exception as err:  # network, server and store errors all land here
        print(f"[mlflow] {action} failed, training continues: {type(err).__name__}: {str(err).splitlines()[0][:200]}",
              flush=True)


class CustomMLflowCallback(MLflowCallback):
    """Metrics into the job's run, and every checkpoint logged as a servable MLflow model.

    The run itself (params, tags, inputs, end state) belongs to `fine_tune`; this callback
    only attaches to it. After a resume, steps up to `skip_until_step` were already logged.
    """

    def __init__(self, skip_until_step: int = -1, log_models: bool = True) -> None:
        super().__init__()
        self._skip_until_step = skip_until_step
        self._log_models = log_models

    def setup(self, args: Any, state: Any, model: Any) -> None:
        self._initialized = True
        self._async_log = True

    def on_log(self, args: Any, state: Any, control: Any, logs: dict, model: Any = None, **kwargs: Any) -> None:
        if state.global_step > self._skip_until_step:
            _survive("metric logging", lambda: super(CustomMLflowCallback, self).on_log(args, state, control, logs, model=model))

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not (state.is_world_process_zero and self._log_models):
            return
        name = f"checkpoint-{state.global_step}"
        _survive(f"logging {name} as a model",
                 lambda: tracking.log_model_folder(Path(args.output_dir) / name, name=name, step=state.global_step))

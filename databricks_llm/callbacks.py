"""Trainer callbacks that talk to MLflow (rank 0 only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
from transformers import TrainerCallback
from transformers.integrations import MLflowCallback

from databricks_llm import tracking
from databricks_llm.scoring import metric_dict, slot_scores
from databricks_llm.generation import generate

SLOT_METRIC_PREFIXES = ("eval_slot_", "eval_exact_match")


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
            stock = super()
            tracking.survive("metric logging", lambda: stock.on_log(args, state, control, logs, model=model))
            _flush_before_checkpoint(control)

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict | None = None, **kwargs: Any) -> None:
        """Slot scores join the eval metrics after the Trainer logged them; log them at this step."""
        slot = {k: v for k, v in (metrics or {}).items() if k.startswith(SLOT_METRIC_PREFIXES)}
        if state.is_world_process_zero and slot and state.global_step > self._skip_until_step:
            tracking.survive("slot metric logging", lambda: mlflow.log_metrics(slot, step=state.global_step))
            _flush_before_checkpoint(control)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not (state.is_world_process_zero and self._log_models):
            return
        tracking.survive("flushing metrics", mlflow.flush_async_logging)  # so the model links this step's metrics
        name = f"checkpoint-{state.global_step}"
        tracking.survive(f"logging {name} as a model",
                         lambda: tracking.log_model_folder(Path(args.output_dir) / name, name=name, step=state.global_step))


def _flush_before_checkpoint(control: Any) -> None:
    """Metrics buffered for async logging reach the store before a checkpoint is written: a job
    killed after that checkpoint resumes from it and does not log those steps again."""
    if control.should_save:
        tracking.survive("flushing metrics", mlflow.flush_async_logging)


class SlotEvalCallback(TrainerCallback):
    """At each evaluation, generate MRs for a fixed validation subset and add slot scores.

    The scores go into the Trainer's eval metrics (`eval_slot_f1`, `eval_exact_match`,
    `eval_slot_f1_<slot>`), so `--metric_for_best_model=eval_slot_f1` and early stopping can use
    them. Every rank generates (ZeRO-3 needs all ranks in each forward pass).
    """

    def __init__(self, tokenizer: Any, sentences: list[str], references: list[str], *, batch_size: int,
                 max_tokens: int = 128, synced_gpus: bool = False) -> None:
        self.tokenizer, self.sentences, self.references = tokenizer, sentences, references
        self.batch_size, self.max_tokens, self.synced_gpus = batch_size, max_tokens, synced_gpus

    def on_evaluate(self, args: Any, state: Any, control: Any, model: Any = None, metrics: dict | None = None,
                    **kwargs: Any) -> None:
        was_training = model.training
        model.eval()
        predictions = generate(model, self.tokenizer, self.sentences, max_tokens=self.max_tokens,
                               batch_size=self.batch_size, synced_gpus=self.synced_gpus)
        model.train(was_training)
        scores = slot_scores(predictions, self.references)
        metrics.update(metric_dict(scores, "eval_"))
        if state.is_world_process_zero:
            print(f"[eval] step {state.global_step}: slot F1 {scores['f1']:.3f}, exact match "
                  f"{scores['exact_match']:.3f} on {scores['n']} validation sentences", flush=True)

"""The Trainer, with evaluations that also generate and score, as users of the model will, and
checkpoints that carry the task."""

from __future__ import annotations

import logging
from typing import Any

from databricks_llm.batching import TokenBudgetBatches
from databricks_llm.error_analysis import scores_and_errors
from databricks_llm.formats import of
from databricks_llm.task_metrics import extra_metrics, extra_scores
from databricks_llm.generation import generate
from databricks_llm.scoring import metric_dict
from databricks_llm.task import Task

log = logging.getLogger(__name__)


class GenerationEval:
    """Generate outputs for a fixed validation subset, score them by the task's output format and
    count their errors by type.

    Every rank generates (ZeRO-3 needs all ranks in each forward pass: `synced_gpus`)."""

    def __init__(self, tokenizer: Any, task: Task, inputs: list[str], references: list[str], *, batch_size: int,
                 max_tokens: int = 128, structured: bool = False, synced_gpus: bool = False) -> None:
        self.tokenizer, self.task, self.inputs, self.references = tokenizer, task, inputs, references
        self.batch_size, self.max_tokens, self.synced_gpus = batch_size, max_tokens, synced_gpus
        self.structured = structured

    def __call__(self, model: Any) -> dict:
        was_training = model.training
        model.eval()
        predictions = generate(model, self.tokenizer, self.inputs, task=self.task, max_tokens=self.max_tokens,
                               batch_size=self.batch_size, structured=self.structured, synced_gpus=self.synced_gpus)
        model.train(was_training)
        return {**scores_and_errors(self.task.output_format, predictions, self.references),
                **extra_scores(self.task, predictions, self.references)}


class ExtractionTrainer(TokenBudgetBatches):
    """A Trainer whose evaluations add the task's scores (`eval_f1`, `eval_exact_match`,
    `eval_f1_<field>`, `eval_errors_<type>`; slot tasks also `eval_slot_f1`, json tasks
    `eval_json_parse_rate`) to the
    eval metrics before they are logged, and whose saved models (checkpoints and final) hold the
    task's file. With `batch_tokens`, training batches are token-budget packed rows (`batching`).

    `log` is the Trainer's documented override point: the scores join `evaluate()`'s own metrics
    dict, so every callback, `--metric_for_best_model=eval_f1` and early stopping see them,
    whatever the order of the callbacks.
    """

    def __init__(self, *args: Any, task: Task, generation_eval: GenerationEval | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.task, self.generation_eval = task, generation_eval

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.generation_eval is not None and "eval_loss" in logs:
            scores = self.generation_eval(self.model)
            logs.update({**metric_dict(scores, "eval_", of(self.task.output_format)), **extra_metrics(scores, "eval_")})
            if self.is_world_process_zero():
                parsed = f", parse rate {scores['parse_rate']:.3f}" if "parse_rate" in scores else ""
                log.info(f"[eval] step {self.state.global_step}: F1 {scores['f1']:.3f}, exact match "
                         f"{scores['exact_match']:.3f}{parsed} on {scores['n']} validation rows")
        super().log(logs, start_time)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            self.task.save(output_dir or self.args.output_dir)

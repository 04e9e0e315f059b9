"""The Trainer, with evaluations that also generate and score, as users of the model will."""

from __future__ import annotations

from typing import Any

from transformers import Trainer

from databricks_llm.generation import generate
from databricks_llm.scoring import metric_dict, slot_scores


class GenerationEval:
    """Generate meaning representations for a fixed validation subset and score them.

    Every rank generates (ZeRO-3 needs all ranks in each forward pass: `synced_gpus`)."""

    def __init__(self, tokenizer: Any, sentences: list[str], references: list[str], *, batch_size: int,
                 max_tokens: int = 128, synced_gpus: bool = False) -> None:
        self.tokenizer, self.sentences, self.references = tokenizer, sentences, references
        self.batch_size, self.max_tokens, self.synced_gpus = batch_size, max_tokens, synced_gpus

    def __call__(self, model: Any) -> dict:
        was_training = model.training
        model.eval()
        predictions = generate(model, self.tokenizer, self.sentences, max_tokens=self.max_tokens,
                               batch_size=self.batch_size, synced_gpus=self.synced_gpus)
        model.train(was_training)
        return slot_scores(predictions, self.references)


class ExtractionTrainer(Trainer):
    """A Trainer whose evaluations add slot scores (`eval_slot_f1`, `eval_exact_match`,
    `eval_slot_f1_<slot>`) to the eval metrics before they are logged.

    `log` is the Trainer's documented override point: the scores join `evaluate()`'s own metrics
    dict, so every callback, `--metric_for_best_model=eval_slot_f1` and early stopping see them,
    whatever the order of the callbacks.
    """

    def __init__(self, *args: Any, generation_eval: GenerationEval | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.generation_eval = generation_eval

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.generation_eval is not None and "eval_loss" in logs:
            scores = self.generation_eval(self.model)
            logs.update(metric_dict(scores, "eval_"))
            if self.is_world_process_zero():
                print(f"[eval] step {self.state.global_step}: slot F1 {scores['f1']:.3f}, exact match "
                      f"{scores['exact_match']:.3f} on {scores['n']} validation sentences", flush=True)
        super().log(logs, start_time)

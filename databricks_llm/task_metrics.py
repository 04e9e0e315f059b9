"""Scores a kind of task adds to its output format's: the slot-filling literature's frame metrics
for span tasks (`frame_metrics`), exact match with synonyms taken as equal for E2E (`e2e_synonyms`).
Training evaluations and `evaluate` both add them through here."""

from __future__ import annotations

from databricks_llm import e2e_synonyms, frame_metrics
from databricks_llm.task import Task


def extra_scores(task: Task, predictions: list[str], references: list[str]) -> dict:
    """The extra scores of `predictions` for `task` (none for a plain task)."""
    return {**frame_metrics.task_scores(task, predictions, references),
            **e2e_synonyms.task_scores(task.output_format, predictions, references)}


def extra_metrics(scores: dict, prefix: str) -> dict[str, float]:
    """MLflow metrics of `extra_scores`' result, names starting with `prefix`."""
    synonyms = {f"{prefix}exact_match_synonyms": scores["exact_match_synonyms"]} if "exact_match_synonyms" in scores else {}
    return {**frame_metrics.metric_dict(scores, prefix), **synonyms}

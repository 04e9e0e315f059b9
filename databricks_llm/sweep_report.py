"""The end of a sweep in MLflow: ranking (median over seeds), the parent run's metrics, figures and
description, and the champion's registration."""

from __future__ import annotations

import json
import logging
import statistics
from dataclasses import dataclass
from typing import Any

import mlflow
import optuna
from optuna.trial import TrialState

from databricks_llm import runs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Group:
    """A configuration and its finished runs (one per seed); ranked by the median value."""

    config_trial: int
    trials: list[optuna.trial.FrozenTrial]

    @property
    def median(self) -> float:
        return statistics.median(t.value for t in self.trials)

    @property
    def best(self) -> optuna.trial.FrozenTrial:
        return max(self.trials, key=lambda t: t.value)


def groups(study: optuna.Study) -> list[Group]:
    """Completed trials grouped by configuration (a repeat joins the trial it repeats), best median first."""
    by_config: dict[int, list] = {}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        by_config.setdefault(trial.user_attrs.get("repeat_of", trial.number), []).append(trial)
    return sorted((Group(k, v) for k, v in by_config.items()), key=lambda g: (-g.median, g.config_trial))


def ranked(study: optuna.Study, repeats: int) -> list[Group]:
    """With repeats, the configurations run over all seeds come first (the best median among them wins)."""
    found = groups(study)
    return sorted(found, key=lambda g: len(g.trials) < repeats) if repeats > 1 else found


def summarise(study: optuna.Study, client: mlflow.MlflowClient, parent_run_id: str, metric: str, repeats: int,
              registered_model_name: str | None, alias: str) -> dict[str, Any]:
    """Metrics, tags, figures and description of the parent run; the champion registered. Returns the summary."""
    trials = study.get_trials(deepcopy=False)
    counts = {state.name.lower(): sum(t.state == state for t in trials)
              for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    seconds = sum(t.user_attrs.get("train_seconds", 0.0) for t in trials)
    order = ranked(study, repeats)
    summary: dict[str, Any] = {"trials": counts, "train_seconds": round(seconds, 1), "metric": metric}
    client.log_metric(parent_run_id, "trials_complete", counts["complete"])
    client.log_metric(parent_run_id, "trials_pruned", counts["pruned"])
    client.log_metric(parent_run_id, "trials_failed", counts["fail"])
    client.log_metric(parent_run_id, "train_seconds", seconds)
    if order:
        best = order[0]
        champion = best.best
        summary.update(best_trial=best.config_trial, best_params=champion.params, best_median=best.median,
                       best_value=champion.value, seeds=len(best.trials), best_run_id=champion.user_attrs["run_id"])
        client.log_metric(parent_run_id, f"best_{metric}", best.median)
        client.set_tag(parent_run_id, "best_trial", str(best.config_trial))
        client.set_tag(parent_run_id, "best_run_id", champion.user_attrs["run_id"])
        client.set_tag(parent_run_id, "best_params", json.dumps(champion.params))
        if registered_model_name:
            summary["registered"] = register(champion.user_attrs["run_id"], registered_model_name, alias)
    _log_figures(study, client, parent_run_id, metric)
    client.set_tag(parent_run_id, "mlflow.note.content", description(study, order, summary))
    return summary


def register(run_id: str, name: str, alias: str) -> str:
    """Register the run's best checkpoint under `name` and point `alias` at it; returns `name@alias`."""
    uri = runs.checkpoint_uri(run_id)
    version = mlflow.register_model(uri, name)
    mlflow.MlflowClient().set_registered_model_alias(name, alias, version.version)
    log.info("registered %s as %s version %s, alias '%s'", uri, name, version.version, alias)
    return f"{name}@{alias} ({uri}, version {version.version})"


def description(study: optuna.Study, order: list[Group], summary: dict[str, Any]) -> str:
    """The parent run's description (markdown): the outcome, then one row per trial."""
    lines = [f"Sweep `{study.study_name}`: {summary['trials']['complete']} complete, {summary['trials']['pruned']} pruned, "
             f"{summary['trials']['fail']} failed trials; {summary['train_seconds']:.0f} s of training."]
    if order:
        lines.append(f"Best: trial {summary['best_trial']} with median {summary['metric']} {summary['best_median']:.4f} "
                     f"over {summary['seeds']} seed(s), params `{json.dumps(summary['best_params'])}`"
                     + (f"; registered {summary['registered']}" if summary.get("registered") else "") + ".")
    names = sorted({k for t in study.trials for k in t.params})
    lines += ["", "| trial | state | value | " + " | ".join(names) + " |", "|" + "---|" * (3 + len(names))]
    for t in study.get_trials(deepcopy=False):
        value = shown_value(t)
        cells = [str(t.number), t.state.name, "" if value is None else f"{value:.4f}"] + [str(t.params.get(n, "")) for n in names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def shown_value(trial: optuna.trial.FrozenTrial) -> float | None:
    """A trial's value, or for a pruned or failed one its last reported value."""
    if trial.value is not None:
        return trial.value
    return trial.intermediate_values[max(trial.intermediate_values)] if trial.intermediate_values else None


def _log_figures(study: optuna.Study, client: mlflow.MlflowClient, run_id: str, metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for state, marker in ((TrialState.COMPLETE, "o"), (TrialState.PRUNED, "x"), (TrialState.FAIL, "v")):
        points = [(t.number, shown_value(t) or 0.0) for t in study.get_trials(deepcopy=False, states=(state,))]
        if points:
            axis.scatter(*zip(*points), marker=marker, label=state.name.lower())
    axis.set(title=f"{metric} by trial", xlabel="trial", ylabel=metric)
    axis.legend()
    client.log_figure(run_id, figure, "sweep/f1_by_trial.png")
    plt.close(figure)
    try:  # PED-ANOVA needs no scikit-learn; too few or identical trials have no importances
        importances = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.PedAnovaImportanceEvaluator())
    except (RuntimeError, ValueError) as err:
        log.info("no parameter importances: %s", err)
        return
    if not importances:
        return
    figure, axis = plt.subplots(figsize=(7, 4))
    axis.barh(list(importances)[::-1], list(importances.values())[::-1])
    axis.set(title="parameter importance (PED-ANOVA)", xlabel="importance")
    figure.tight_layout()
    client.log_figure(run_id, figure, "sweep/param_importance.png")
    plt.close(figure)

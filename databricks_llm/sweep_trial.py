"""One trial of a sweep: the fine-tuning job, launched as users launch it, in a child MLflow run of
the sweep's run, its evaluation F1 reported to Optuna as it is logged, stopped when pruned.

The sweep creates the child run (tagged `mlflow.parentRunId`) and hands it to the job through
MLFLOW_RUN_ID, which the job attaches to (`tracking.TrackingSettings`), so the sweep knows the run
before the job starts: it polls the run's metric history for the pruner and closes the run itself
should the job die without ending it. A pruned job gets SIGTERM, stops after its current step
(`runtime.Stop`), keeps the checkpoints it saved, and its run is then marked FINISHED with the tag
`pruned=true`.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import optuna
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from databricks_llm import search_space
from databricks_llm.fine_tune import EXIT_SECONDS

log = logging.getLogger(__name__)
POLL_SECONDS = 2.0
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class TrialSettings:
    """What every trial of a sweep shares (picklable: Spark tasks get a copy)."""

    sweep_dir: str
    storage: str
    study_name: str
    space: list[search_space.Dimension]
    job_args: list[str]
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    metric: str = "eval_f1"
    env: dict[str, str] = field(default_factory=dict)  # the tracking variables the jobs must see

    def load_study(self) -> optuna.Study:
        return optuna.load_study(study_name=self.study_name, storage=self.storage)


def trial_dir(settings: TrialSettings, number: int) -> Path:
    """Each trial's own output folder (trial numbers are unique in a study: no two trials share one)."""
    return Path(settings.sweep_dir) / f"trial-{number:04d}"


def ask(study: optuna.Study, settings: TrialSettings) -> optuna.Trial:
    """The next trial (an enqueued one first), marked with the process that runs it for a resume."""
    trial = study.ask({d.name: d.distribution for d in settings.space})
    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("pid", os.getpid())
    return trial


class Jobs:
    """The jobs this process runs, so that a stopping sweep can stop them all (SIGTERM, then wait)."""

    def __init__(self) -> None:
        self.running: list[subprocess.Popen] = []
        self.stopping = threading.Event()

    def stop_all(self) -> None:
        self.stopping.set()
        for job in list(self.running):
            if job.poll() is None:
                job.send_signal(signal.SIGTERM)


def run(study: optuna.Study, trial: optuna.Trial, settings: TrialSettings, prune: bool = True,
        jobs: Jobs | None = None) -> None:
    """Run the trial's job to its end and tell the study how it went (COMPLETE, PRUNED or FAIL).

    A trial whose sweep is stopping is left RUNNING in the study: the next start of the sweep runs
    its parameters again (`resume`)."""
    jobs = jobs or Jobs()
    client = mlflow.MlflowClient(settings.tracking_uri)
    number, folder = trial.number, trial_dir(settings, trial.number)
    seed = trial.user_attrs.get("seed")
    child = client.create_run(settings.experiment_id, run_name=f"trial-{number}", tags={
        MLFLOW_PARENT_RUN_ID: settings.parent_run_id, "optuna_trial": str(number), "optuna_study": settings.study_name,
        **({"seed": str(seed), "repeat_of": str(trial.user_attrs["repeat_of"])} if seed is not None else {})})
    run_id = child.info.run_id
    trial.set_user_attr("run_id", run_id)
    trial.set_user_attr("output_dir", str(folder))
    argv = [*settings.job_args, *search_space.flags(trial.params), f"--output_dir={folder}", f"--run_name=trial-{number}",
            *([f"--seed={seed}"] if seed is not None else [])]
    logs = Path(settings.sweep_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **settings.env, "MLFLOW_TRACKING_URI": settings.tracking_uri, "MLFLOW_RUN_ID": run_id}
    env.pop("MLFLOW_NESTED_RUN", None)
    log.info("trial %d: %s", number, " ".join(search_space.flags(trial.params)) + (f" --seed={seed}" if seed is not None else ""))
    started = time.monotonic()
    with (logs / f"trial-{number:04d}.log").open("w") as out:
        job = subprocess.Popen([sys.executable, "-m", "databricks_llm.fine_tune", *argv], env=env, stdout=out,
                               stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        jobs.running.append(job)
        try:
            pruned = _watch(job, trial, client, run_id, settings.metric, prune)
        finally:
            if job.poll() is None:  # the sweep itself is stopping
                _stop(job)
            jobs.running.remove(job)
    if jobs.stopping.is_set():
        return
    seconds = time.monotonic() - started
    values = [m.value for m in client.get_metric_history(run_id, settings.metric)]
    trial.set_user_attr("train_seconds", seconds)
    if pruned:
        client.set_tag(run_id, "pruned", "true")
        client.set_terminated(run_id, "FINISHED")
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        log.info("trial %d pruned after %.0fs (%s %s)", number, seconds, settings.metric, values[-1:] or "none")
    elif job.returncode == 0 and values:
        client.set_tag(run_id, "pruned", "false")
        study.tell(trial, max(values))
        log.info("trial %d: best %s %.4f in %.0fs", number, settings.metric, max(values), seconds)
    else:
        close_run(client, run_id, "job exited with code %s" % job.returncode if job.returncode else
                  f"no {settings.metric} logged (is evaluation on?)")
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        log.warning("trial %d failed (exit %s): see %s", number, job.returncode, logs / f"trial-{number:04d}.log")


def _watch(job: subprocess.Popen, trial: optuna.Trial, client: mlflow.MlflowClient, run_id: str, metric: str,
           prune: bool) -> bool:
    """Report each new evaluation to the trial until the job exits; SIGTERM it when the pruner says so."""
    reported: set[int] = set()
    pruned = False
    while True:
        done = job.poll() is not None
        try:
            history = client.get_metric_history(run_id, metric)
        except Exception as err:  # a busy store: try again at the next poll
            log.debug("reading %s of %s: %s", metric, run_id, err)
            history = []
        for point in sorted(history, key=lambda m: m.step):
            if point.step not in reported:
                reported.add(point.step)
                trial.report(point.value, point.step)
        if done:
            return pruned
        if prune and not pruned and reported and trial.should_prune():
            pruned = True
            log.info("trial %d: pruned at step %d, stopping its job", trial.number, max(reported))
            job.send_signal(signal.SIGTERM)
        time.sleep(POLL_SECONDS)


def _stop(job: subprocess.Popen) -> None:
    job.send_signal(signal.SIGTERM)
    try:
        job.wait(EXIT_SECONDS + 30)
    except subprocess.TimeoutExpired:
        job.kill()
        job.wait()


def _die_with_parent() -> None:
    """The job gets SIGTERM (and ends its run) if the sweep process dies, kill -9 included (Linux)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def close_run(client: mlflow.MlflowClient, run_id: str, reason: str) -> None:
    """A child run its job left RUNNING ends FAILED; either way the reason is tagged (`sweep_closed`)."""
    client.set_tag(run_id, "sweep_closed", reason)
    if client.get_run(run_id).info.status == "RUNNING":
        client.set_terminated(run_id, "FAILED")


def resume(study: optuna.Study, client: mlflow.MlflowClient) -> list[int]:
    """Trials a killed sweep (or Spark task) left RUNNING on this host: their runs closed, the trials
    marked FAIL and `interrupted`, their parameters (and seed) enqueued again. Returns their numbers."""
    found = []
    for frozen in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if not is_orphan(frozen):
            continue
        if "run_id" in frozen.user_attrs:
            close_run(client, frozen.user_attrs["run_id"], "interrupted: the sweep stopped; its parameters run again")
        optuna.Trial(study, frozen._trial_id).set_user_attr("interrupted", True)
        study.tell(frozen.number, state=optuna.trial.TrialState.FAIL)
        again = {k: v for k, v in frozen.user_attrs.items() if k in ("seed", "repeat_of")}
        study.enqueue_trial(frozen.params, user_attrs=again, skip_if_exists=False)
        found.append(frozen.number)
    return found


def is_orphan(trial: optuna.trial.FrozenTrial) -> bool:
    """A RUNNING trial whose process on this host is gone (a killed sweep or Spark task)."""
    from databricks_llm.outputlock import _alive

    attrs = trial.user_attrs
    return attrs.get("host") == socket.gethostname() and not _alive(int(attrs.get("pid", 0)))


"""Hyperparameter sweeps: an Optuna study over fine_tune flags, one MLflow child run per trial under
one parent run, pruning on the task's F1, local processes or Spark tasks, resumable.

    python -m databricks_llm.sweep --sweep_dir=outputs/sweep --trials=20 [--minutes=240] [--space=space.yaml]
        [--parallel=2] [--pruner=median|halving|none] [--repeats=3] [--spark=true] -- [any fine_tune flag]

Each trial runs `python -m databricks_llm.fine_tune` with the flags after `--`, the trial's
parameters, and its own `--output_dir=<sweep_dir>/trial-NNNN` (the folder lock keeps it its own).
The study lives in `<sweep_dir>/optuna.db` (or `--storage`): run the same command again after a
crash or kill and the sweep goes on where it stopped; trials it had running are run again. See
docs/sweeps.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from databricks_llm import search_space
from databricks_llm.errors import InputError, exit_code
from databricks_llm.validation import parse_bool, strict

log = logging.getLogger("databricks_llm.sweep")
# Set per trial by the sweep: the same value for every trial would make them share files.
SET_BY_SWEEP = ("output_dir", "final_model_output_path", "run_name", "resume_from_checkpoint")
STORAGE_FILE = "optuna.db"
SUMMARY_FILE = "summary.json"
# Tracking variables the jobs need as the sweep sees them (Spark tasks do not inherit the driver's environment).
FORWARDED_ENV_PREFIXES = ("MLFLOW_", "DATABRICKS_", "HF_", "TENSORBOARD_")


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m databricks_llm.sweep", allow_abbrev=False,
                                     description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--sweep_dir", default="outputs/sweep", help="Folder of the study, the trials' output folders and their logs.")
    add("--space", help="YAML/JSON search space (default: learning rate, LoRA rank, alpha and dropout, warm-up, epochs).")
    add("--enqueue", help="YAML/JSON list of parameter sets to run first, in order (a fixed list of trials).")
    add("--trials", type=int, help="Trials to run in the search (finished ones of an earlier start count).")
    add("--minutes", type=float, help="Start no trial after this many minutes from now (running ones finish).")
    add("--parallel", type=int, default=1, help="Trials at once, each in its own process and folder.")
    add("--pruner", choices=("median", "halving", "none"), default="median", help="Stop hopeless trials at an evaluation.")
    add("--pruner_startup_trials", type=int, default=2, help="Median pruner: prune only once this many trials finished.")
    add("--pruner_warmup_steps", type=int, default=0, help="Median pruner: never prune at or before this step.")
    add("--metric", default="eval_f1", help="Training-time evaluation metric to maximise (the task's F1).")
    add("--repeats", type=int, default=1, help="Run the best --repeat_top configurations with this many seeds in all; rank by the median.")
    add("--repeat_top", type=int, default=3, help="How many of the best configurations --repeats reruns.")
    add("--storage", help=f"Optuna storage URL (default: sqlite:///<sweep_dir>/{STORAGE_FILE}).")
    add("--study_name", help="Study name (default: the sweep folder's name); also the registered model's default name.")
    add("--sampler_seed", type=int, default=0, help="Seed of the TPE sampler.")
    add("--registered_model_name", help="Register the best checkpoint under this name (default: the study name).")
    add("--register", type=parse_bool, default=True, help="Register the best checkpoint at all.")
    add("--alias", default="champion", help="Alias of the registered best checkpoint.")
    add("--spark", type=parse_bool, default=False, help="Run each trial as a Spark task sharing the study's storage.")
    add("--master", help="Spark master when no session is active (default: local[--parallel]).")
    return strict(parser)


@dataclass(frozen=True)
class Plan:
    """A checked sweep: its flags, space, the jobs' flags and the list of trials to run first."""

    args: argparse.Namespace
    space: list[search_space.Dimension]
    job_args: list[str]
    enqueued: list[dict[str, Any]]
    storage: str
    study_name: str
    base_seed: int


def plan(argv: list[str]) -> Plan:
    """Every check, nothing written: bad flags, space or trial list, and job flags the job itself
    would refuse with the space's extreme values, are InputErrors."""
    from databricks_llm import config

    ours, job_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    args = argument_parser().parse_args(ours)
    if args.trials is None and args.minutes is None:
        raise InputError("give a budget: --trials and/or --minutes")
    for name, low in (("trials", 1), ("minutes", 0), ("parallel", 1), ("repeats", 1), ("repeat_top", 1),
                      ("pruner_startup_trials", 0), ("pruner_warmup_steps", 0)):
        value = getattr(args, name)
        if value is not None and not (value >= low if name != "minutes" else value > low) or value != value:
            raise InputError(f"--{name} must be {'> 0' if name == 'minutes' else f'>= {low}'} (got {value})")
    job_args = config.normalise_argv(job_args)
    given = {a[2:].partition("=")[0] for a in job_args if a.startswith("--")}
    clash = given & set(SET_BY_SWEEP)
    if clash:
        raise InputError(f"--{sorted(clash)[0]} is set per trial by the sweep (each trial writes to <sweep_dir>/trial-NNNN); "
                         "drop it from the job's flags")
    space = search_space.load_space(args.space) if args.space else search_space.default_space(given)
    both = given & {d.name for d in space}
    if both:
        raise InputError(f"--{sorted(both)[0]} is both in the search space and among the job's flags after --")
    if args.repeats > 1 and "seed" in {d.name for d in space}:
        raise InputError("--repeats reruns configurations over seeds: take seed out of the search space")
    enqueued = search_space.load_trials(args.enqueue, space) if args.enqueue else []
    sweep_dir = Path(args.sweep_dir).resolve()
    storage = args.storage or f"sqlite:///{sweep_dir / STORAGE_FILE}"
    _check_storage(storage)
    check_dir = str(sweep_dir / "trial-0000")
    training = None
    for extreme in (0, 1):
        values = {d.name: d.bounds()[extreme] for d in space}
        try:
            training = config.parse([*job_args, *search_space.flags(values), f"--output_dir={check_dir}"]).training
        except InputError as err:
            raise InputError(f"trial flags with the space's {('low', 'high')[extreme]} values: {err}") from None
    if training.eval_strategy == "no":
        raise InputError("a sweep needs evaluations (its metric is the evaluation's): drop --eval_strategy=no")
    return Plan(args, space, job_args, enqueued, storage, args.study_name or sweep_dir.name, training.seed)


def _check_storage(url: str) -> None:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        make_url(url)
    except ArgumentError:
        raise InputError(f"--storage {url!r} is not a database URL (e.g. sqlite:///path/optuna.db, "
                         "postgresql://user@host/db)") from None


def _pruner(args: argparse.Namespace) -> Any:
    import optuna

    if args.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=args.pruner_startup_trials,
                                           n_warmup_steps=args.pruner_warmup_steps)
    if args.pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    return optuna.pruners.NopPruner()


def run(p: Plan) -> dict[str, Any]:
    """The sweep, from a checked plan: study and parent run (new or resumed), the search, the repeats,
    the summary. Returns the summary."""
    import mlflow
    import optuna

    from databricks_llm import outputlock, sweep_report, sweep_trial, tracking

    args, sweep_dir = p.args, str(Path(p.args.sweep_dir).resolve())
    with outputlock.hold(sweep_dir):
        settings = tracking.TrackingSettings.from_env(sweep_dir)
        experiment_id = tracking.connect(settings, sweep_dir)
        client = mlflow.MlflowClient(settings.uri)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(storage=p.storage, study_name=p.study_name, direction="maximize",
                                    load_if_exists=True, pruner=_pruner(args),
                                    sampler=optuna.samplers.TPESampler(seed=args.sampler_seed))
        parent = _parent_run(study, client, experiment_id, p)
        (Path(sweep_dir) / tracking.RUN_ID_FILE).write_text(parent)  # as a job's folder: runs.job_run_id finds it
        trials = sweep_trial.TrialSettings(
            sweep_dir, p.storage, p.study_name, p.space, p.job_args, settings.uri, experiment_id, parent, args.metric,
            env={k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)})
        interrupted = sweep_trial.resume(study, client)
        if interrupted:
            log.info("resuming: trials %s of the last start run again", interrupted)
        deadline = time.time() + args.minutes * 60 if args.minutes else None
        status = "KILLED"
        try:
            _run_trials(trials, p, study, Budget(True, args.trials, deadline))
            if args.repeats > 1:
                _enqueue_repeats(study, args.repeats, args.repeat_top, p.base_seed)
                _run_trials(trials, p, study, Budget(False, None, deadline))
            name = (args.registered_model_name or p.study_name) if args.register else None
            summary = sweep_report.summarise(study, client, parent, args.metric, args.repeats, name, args.alias)
            (Path(sweep_dir) / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
            status = "FINISHED"
        except Exception:
            status = "FAILED"
            raise
        finally:
            client.set_terminated(parent, status)
    log.info("done: %s", summary)
    return summary


def _parent_run(study: Any, client: Any, experiment_id: str, p: Plan) -> str:
    """The sweep's run: created with the space and budget as params on the first start, reopened after."""
    parent = study.user_attrs.get("parent_run_id")
    if parent:
        client.update_run(parent, status="RUNNING")
        return parent
    run = client.create_run(experiment_id, run_name=p.study_name, tags={"sweep": "true", "optuna_study": p.study_name})
    args = p.args
    params = {f"space.{k}": v for k, v in search_space.describe(p.space).items()}
    params.update(trials=args.trials, minutes=args.minutes, parallel=args.parallel, pruner=args.pruner,
                  metric=args.metric, repeats=args.repeats, repeat_top=args.repeat_top, spark=args.spark,
                  enqueued=len(p.enqueued), job_args=" ".join(p.job_args)[:6000])
    for key, value in params.items():
        client.log_param(run.info.run_id, key, value)
    study.set_user_attr("parent_run_id", run.info.run_id)
    for params in p.enqueued:  # only on the first start: a resume must not queue them again
        study.enqueue_trial(params)
    return run.info.run_id


def _searched(study: Any) -> list:
    return [t for t in study.get_trials(deepcopy=False) if "repeat_of" not in t.user_attrs
            and not t.user_attrs.get("interrupted") and t.state.name != "WAITING"]


@dataclass(frozen=True)
class Budget:
    """What may still start: search trials under --trials (started ones count), or the waiting repeats;
    nothing after the deadline."""

    search: bool
    trials: int | None
    deadline: float | None

    def left(self, study: Any) -> int | None:
        if not self.search:
            return sum(t.state.name == "WAITING" for t in study.get_trials(deepcopy=False))
        return None if self.trials is None else self.trials - len(_searched(study))

    def allows(self, study: Any) -> bool:
        left = self.left(study)
        return (left is None or left > 0) and (self.deadline is None or time.time() < self.deadline)


def _enqueue_repeats(study: Any, repeats: int, top: int, base_seed: int) -> None:
    """Seeds base+1 .. base+repeats-1 of the `top` best searched configurations (once: a resume finds them)."""
    from databricks_llm import sweep_report

    done = {(t.user_attrs["repeat_of"], t.user_attrs["seed"]) for t in study.get_trials(deepcopy=False)
            if "repeat_of" in t.user_attrs and not t.user_attrs.get("interrupted")}
    for group in [g for g in sweep_report.groups(study) if g.trials[0].number == g.config_trial][:top]:
        for seed in range(base_seed + 1, base_seed + repeats):
            if (group.config_trial, seed) not in done:
                study.enqueue_trial(group.trials[0].params, user_attrs={"repeat_of": group.config_trial, "seed": seed})


def _run_trials(settings: Any, p: Plan, study: Any, budget: Budget) -> None:
    if p.args.spark:
        _run_on_spark(settings, p, study, budget)
    else:
        _run_local(settings, p.args.parallel, study, budget)


def _run_local(settings: Any, parallel: int, study: Any, budget: Budget) -> None:
    """`parallel` threads, each asking for a trial and running its job until the budget is spent.
    Ctrl-C or SIGTERM stops every job (their trials run again at the next start)."""
    from databricks_llm import sweep_trial

    lock, jobs, errors = threading.Lock(), sweep_trial.Jobs(), []

    def worker() -> None:
        try:
            while not jobs.stopping.is_set():
                with lock:
                    if not budget.allows(study):
                        return
                    trial = sweep_trial.ask(study, settings)
                sweep_trial.run(study, trial, settings, budget.search, jobs)
        except Exception as err:  # noqa: BLE001 - reported by the main thread
            errors.append(err)
            jobs.stop_all()

    threads = [threading.Thread(target=worker, name=f"trial-worker-{i}") for i in range(parallel)]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            while thread.is_alive():
                thread.join(1.0)
    except BaseException:
        jobs.stop_all()
        for thread in threads:
            thread.join()
        raise
    if errors:
        raise errors[0]


def _run_on_spark(settings: Any, p: Plan, study: Any, budget: Budget) -> None:
    """One Spark task per trial, sharing the study through its storage: all the trials left at once
    (Spark runs --parallel at a time under local[--parallel]), or waves of --parallel under a
    time budget alone."""
    from pyspark.sql import SparkSession

    spark = SparkSession.getActiveSession()
    if spark is None or p.args.master:
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        spark = SparkSession.builder.appName("databricks_llm.sweep").master(
            p.args.master or f"local[{p.args.parallel}]").getOrCreate()
    while budget.allows(study):
        tasks = budget.left(study) or p.args.parallel
        spark.sparkContext.parallelize(range(tasks), tasks).map(_SparkTrial(settings, budget)).collect()


class _SparkTrial:
    """A Spark task: load the study from its storage, ask for one trial, run its job (none after the deadline)."""

    def __init__(self, settings: Any, budget: Budget) -> None:
        self.settings, self.budget = settings, budget

    def __call__(self, index: int) -> int:
        from databricks_llm import sweep_trial

        if self.budget.deadline is not None and time.time() >= self.budget.deadline:
            return -1
        os.environ.update(self.settings.env)
        study = self.settings.load_study()
        trial = sweep_trial.ask(study, self.settings)
        sweep_trial.run(study, trial, self.settings, self.budget.search)
        return trial.number


def main(argv: list[str] | None = None) -> int:
    """Shell entry point: exit 2 with one `error:` line on bad flags, before anything is written."""
    logging.basicConfig(level=logging.INFO, format="[sweep] %(message)s", stream=sys.stderr)
    argv = sys.argv[1:] if argv is None else argv

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    return exit_code(lambda: run(plan(argv)))


if __name__ == "__main__":
    sys.exit(main())

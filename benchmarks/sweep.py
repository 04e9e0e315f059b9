"""Sweep goals, measured with real sweeps of real fine-tuning jobs (docs/sweeps.md).

    python benchmarks/sweep.py --model=PATH --measures=resume,pruning [--work=outputs/bench_sweep]

`resume`: 4 trials, 2 in parallel, the sweep killed with SIGKILL once 2 trials finished, then the
same command again; prints the child runs by status, the parent runs and the registered champion.
`pruning`: the same fixed list of trials (`--enqueue`, identical in both) run with the median
pruner and without, both sweeps at once; prints each sweep's training seconds (sum over trials, from the study) and the
ratio. The model is any fine_tune --model; the tests' tiny random Llama is built with
`python -c "from tests.conftest import build_tiny_model as b; from pathlib import Path; b(Path('tiny'))"`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
JOB = ["--use_lora=false", "--per_device_train_batch_size=8", "--max_eval_samples=4", "--eval_generation_samples=4",
       "--logging_steps=2", "--disable_tqdm=true"]
# Learning rates a user might try on a fresh task: the low ones barely move the random model in time.
PRUNING_TRIALS = [3e-2, 1e-2, 1e-3, 1e-4]


def sweep_command(sweep_dir: Path, model: str, *flags: str, space: Path, steps: int, eval_steps: int,
                  rows: int) -> list[str]:
    return [sys.executable, "-m", "databricks_llm.sweep", f"--sweep_dir={sweep_dir}", f"--space={space}", *flags, "--",
            f"--model={model}", *JOB, f"--max_train_samples={rows}", f"--max_steps={steps}",
            f"--eval_steps={eval_steps}", f"--save_steps={eval_steps}"]


def completed_trials(sweep_dir: Path) -> int:
    import optuna

    if not (sweep_dir / "optuna.db").exists():
        return 0
    try:
        study = optuna.load_study(study_name=sweep_dir.name, storage=f"sqlite:///{sweep_dir / 'optuna.db'}")
    except KeyError:  # not created yet
        return 0
    return len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)))


def kill_and_resume(command: list[str], sweep_dir: Path, after: int, timeout: float = 1800) -> subprocess.CompletedProcess:
    """Start the sweep, SIGKILL it once `after` trials completed, then run the same command to its end."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and first.poll() is None and completed_trials(sweep_dir) < after:
        time.sleep(2)
    first.send_signal(signal.SIGKILL)
    first.wait()
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def measure_resume(model: str, work: Path, space: Path) -> None:
    import mlflow

    sweep_dir = work / "resume"
    started = time.monotonic()
    result = kill_and_resume(sweep_command(sweep_dir, model, "--trials=4", "--parallel=2", "--pruner=none",
                                           space=space, steps=4, eval_steps=2, rows=16), sweep_dir, after=2)
    assert result.returncode == 0, result.stderr[-3000:]
    client = mlflow.MlflowClient(f"sqlite:///{sweep_dir / 'mlflow.db'}")
    found = client.search_runs([e.experiment_id for e in client.search_experiments()])
    children = [r for r in found if "optuna_trial" in r.data.tags]
    statuses: dict[str, int] = {}
    for run in children:
        statuses[run.info.status] = statuses.get(run.info.status, 0) + 1
    champion = client.get_model_version_by_alias(sweep_dir.name, "champion")
    print(json.dumps({"measure": "resume", "parents": sum(r.data.tags.get("sweep") == "true" for r in found),
                      "child_runs_by_status": statuses, "complete_trials": completed_trials(sweep_dir),
                      "champion": f"{sweep_dir.name} version {champion.version} from run {champion.run_id}",
                      "seconds": round(time.monotonic() - started)}), flush=True)


def measure_pruning(model: str, work: Path, space: Path, steps: int) -> None:
    """Both sweeps side by side, started together (the same load on both), each one trial at a time."""
    trials = work / "pruning_trials.json"
    trials.write_text(json.dumps([{"learning_rate": lr} for lr in PRUNING_TRIALS]))
    sweeps = {}
    for pruner in ("none", "median"):
        sweep_dir = work / f"pruning-{pruner}"
        command = sweep_command(sweep_dir, model, f"--trials={len(PRUNING_TRIALS)}", f"--pruner={pruner}",
                                "--pruner_startup_trials=2", f"--enqueue={trials}", "--register=false",
                                space=space, steps=steps, eval_steps=max(1, steps // 4), rows=64)
        sweeps[pruner] = (sweep_dir, subprocess.Popen(command, env={**os.environ, "PYTHONPATH": str(REPO)},
                                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    seconds = {}
    for pruner, (sweep_dir, process) in sweeps.items():
        _, errors = process.communicate()
        assert process.returncode == 0, errors[-3000:]
        summary = json.loads((sweep_dir / "summary.json").read_text())
        seconds[pruner] = summary["train_seconds"]
        print(json.dumps({"measure": "pruning", "pruner": pruner, "trials": summary["trials"],
                          "train_seconds": summary["train_seconds"], "best_value": summary.get("best_value")}), flush=True)
    print(json.dumps({"measure": "pruning", "pruned_over_unpruned": round(seconds["median"] / seconds["none"], 3),
                      "saved": f"{1 - seconds['median'] / seconds['none']:.0%}"}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--model", required=True)
    parser.add_argument("--measures", default="resume,pruning")
    parser.add_argument("--work", type=Path, default=Path("outputs/bench_sweep"))
    parser.add_argument("--steps", type=int, default=40, help="steps per trial of the pruning measure")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    space = args.work / "space.yaml"
    space.write_text("learning_rate: {low: 1.0e-4, high: 3.0e-2, log: true}\n")
    for measure in args.measures.split(","):
        {"resume": lambda: measure_resume(args.model, args.work.resolve(), space),
         "pruning": lambda: measure_pruning(args.model, args.work.resolve(), space, args.steps)}[measure]()


if __name__ == "__main__":
    main()

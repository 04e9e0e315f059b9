"""Quality benchmark: SmolLM2-135M-Instruct + LoRA on the real E2E data, base model alongside.

    python benchmarks/quality.py                       # 1000 steps in bf16 (~30 min on 2 cores), whole test split
    python benchmarks/quality.py --max_steps=20 --test_samples=50 --quick   # CI-sized smoke run
    python benchmarks/quality.py --output_format=json --quick    # the same task with JSON objects as targets
    python benchmarks/quality.py --max_steps=1300 --save_minutes=5,10,20 --quick   # F1 per CPU-minute curve
    python benchmarks/quality.py --quick --fine_tune_args="--lora_r=16 --lora_alpha=32"  # any other fine_tune flag

With `--save_minutes` the job also saves a checkpoint after each of those minutes of training;
every one of them and the final model are scored on the same test rows, printed as a curve
(minutes, step, F1, exact match) and logged to the job's MLflow run as `quality_curve.png`.
`--stage=train` or `--stage=score` runs one half (score: an earlier run in --work_dir; with
`--reuse`, models already scored there are not scored again).

Trains with `databricks_llm.fine_tune` on ../shared/data/e2e_nlg/cleaned, then scores the final
checkpoint and the zero-shot base model on the same test rows with `databricks_llm.evaluate`, and
prints one line per model plus the ratio. With `--output_format=json` the slot targets are turned
into JSON objects by the data loader (training and test references alike) and scored per field.
Results are meant for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
E2E = REPO.parent / "shared" / "data" / "e2e_nlg" / "cleaned"


def run(module: str, *args: str) -> None:
    command = [sys.executable, "-m", module, *args]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=REPO)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default=str(E2E))
    parser.add_argument("--work_dir", default=None, help="default: outputs/bench_quality[_json]")
    parser.add_argument("--output_format", default="slots", choices=["slots", "json"])
    parser.add_argument("--max_steps", type=int, default=1000, help="~1.6 s per bf16 step at batch 8 on 2 CPU cores")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--test_samples", type=int, default=0, help="0: the whole test split")
    parser.add_argument("--quick", action="store_true", help="skip the zero-shot base-model run")
    parser.add_argument("--save_minutes", default=None, help="also checkpoint after these minutes of training, e.g. 5,10,20")
    parser.add_argument("--augment_names", type=float, default=0.0, help="fine_tune --augment_names (invented names in this fraction of rows)")
    parser.add_argument("--fine_tune_args", default="", help="more fine_tune flags, e.g. '--lora_r=16 --lora_alpha=32 --seed=7'")
    parser.add_argument("--stage", default="all", choices=["all", "train", "score"])
    parser.add_argument("--reuse", action="store_true", help="score stage: keep a model's scores already in --work_dir")
    args = parser.parse_args()
    if not args.dataset.startswith("embedded:") and not Path(args.dataset).exists():
        print(f"error: dataset {args.dataset} not found", file=sys.stderr)
        return 2
    work = Path(args.work_dir or "outputs/bench_quality" + ("_json" if args.output_format == "json" else ""))
    job = work / "checkpoints"
    if args.stage != "score":
        train(args, job)
    if args.stage == "train":
        return 0
    from databricks_llm.config import checkpoint_folders

    timed = checkpoint_folders(str(job))  # the last one is the final
    timed = timed[:len(args.save_minutes.split(","))] if args.save_minutes else []  # step's: the final model scores it
    scores = {}
    models = ([(p.name, str(p)) for p in timed] + [("fine-tuned", str(job / "final_model"))]
              + ([] if args.quick else [("base", "embedded:smollm2-135m-instruct")]))
    for name, uri in models:
        out = work / f"{name}.json"
        if args.reuse and out.exists():
            scores[name] = json.loads(out.read_text())
            continue
        run("databricks_llm.evaluate", f"--model_uri={uri}", f"--dataset={args.dataset}", "--split=test",
            f"--max_samples={args.test_samples}", "--batch_size=128", "--max_tokens=96", "--dtype=bfloat16", f"--job_dir={job}",
            f"--output_json={out}")
        scores[name] = json.loads(out.read_text())
    for name, s in scores.items():
        parsed = f", JSON parse rate {s['parse_rate']:.4f}" if "parse_rate" in s else ""
        print(f"{name}: {args.output_format} F1 {s['f1']:.4f}, precision {s['precision']:.4f}, recall {s['recall']:.4f}, "
              f"exact match {s['exact_match']:.4f}{parsed}, n {s['n']}, {s['seconds']:.0f}s")
    if timed:
        curve(args, job, timed, scores)
    if "base" in scores:
        ours, base = scores["fine-tuned"]["f1"], scores["base"]["f1"]
        print(f"{args.output_format}_f1: ours {ours:.4f}, baseline {base:.4f}, ratio {ours / base if base else float('inf'):.1f}")
    return 0


def curve(args: argparse.Namespace, job: Path, timed: list[Path], scores: dict) -> None:
    """F1 and exact match against minutes of training: printed, and logged to the job's run as a figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow

    from databricks_llm import runs, tracking

    tracking.connect(tracking.TrackingSettings.from_env(str(job)), str(job))
    run_id = runs.job_run_id(str(job))
    runtime = mlflow.get_run(run_id).data.metrics.get("train_runtime", float("nan")) / 60
    marks = [float(m) for m in args.save_minutes.split(",")]
    points = [(m, int(p.name.split("-")[1]), scores[p.name]) for m, p in zip(sorted(marks), timed)]
    points.append((runtime, args.max_steps, scores["fine-tuned"]))
    print(f"{'minutes':>8}{'step':>6}{'F1':>8}{'exact':>8}")
    for minutes, step, s in points:
        print(f"{minutes:>8.1f}{step:>6}{s['f1']:>8.4f}{s['exact_match']:>8.4f}")
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot([p[0] for p in points], [p[2]["f1"] for p in points], "o-", label=f"{args.output_format} F1")
    axis.plot([p[0] for p in points], [p[2]["exact_match"] for p in points], "s--", label="exact match")
    axis.set_xlabel("minutes of training")
    axis.set_title(f"test split, {points[-1][2]['n']} rows")
    axis.grid(alpha=0.3)
    axis.legend()
    mlflow.MlflowClient().log_figure(run_id, figure, "quality_curve.png")
    print(f"logged quality_curve.png to run {run_id}")


def train(args: argparse.Namespace, job: Path) -> None:
    start = time.time()
    extra = [f"--save_minutes={args.save_minutes}"] if args.save_minutes else []
    extra += [f"--augment_names={args.augment_names}"] if args.augment_names else []
    extra += shlex.split(args.fine_tune_args)  # last, so they override the recipe's flags above
    run("databricks_llm.fine_tune", f"--dataset={args.dataset}", f"--output_dir={job}",
        f"--max_steps={args.max_steps}", f"--per_device_train_batch_size={args.batch_size}",
        f"--learning_rate={args.learning_rate}", "--lr_scheduler_type=cosine", "--warmup_steps=20",
        f"--save_steps={args.max_steps}", f"--eval_steps={args.max_steps}", "--max_eval_samples=64",
        "--eval_generation_samples=32", "--logging_steps=20", "--disable_tqdm=true", "--bf16=true",
        "--train_sampling_strategy=group_by_length", f"--output_format={args.output_format}", *extra)  # less padding; fine over 1000 steps, not in 40-step demos
    print(f"training: {args.max_steps} steps x batch {args.batch_size} in {(time.time() - start) / 60:.1f} min")


if __name__ == "__main__":
    sys.exit(main())

"""Quality benchmark: SmolLM2-135M-Instruct + LoRA on the real E2E data, base model alongside.

    python benchmarks/quality.py                       # 1000 steps in bf16 (~30 min on 2 cores), whole test split
    python benchmarks/quality.py --max_steps=20 --test_samples=50 --quick   # CI-sized smoke run
    python benchmarks/quality.py --output_format=json --quick    # the same task with JSON objects as targets

Trains with `databricks_llm.fine_tune` on ../shared/data/e2e_nlg/cleaned, then scores the final
checkpoint and the zero-shot base model on the same test rows with `databricks_llm.evaluate`, and
prints one line per model plus the ratio. With `--output_format=json` the slot targets are turned
into JSON objects by the data loader (training and test references alike) and scored per field.
Results are meant for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
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
    args = parser.parse_args()
    if not args.dataset.startswith("embedded:") and not Path(args.dataset).exists():
        print(f"error: dataset {args.dataset} not found", file=sys.stderr)
        return 2
    work = Path(args.work_dir or "outputs/bench_quality" + ("_json" if args.output_format == "json" else ""))
    job = work / "checkpoints"
    start = time.time()
    run("databricks_llm.fine_tune", f"--dataset={args.dataset}", f"--output_dir={job}",
        f"--max_steps={args.max_steps}", f"--per_device_train_batch_size={args.batch_size}",
        f"--learning_rate={args.learning_rate}", "--lr_scheduler_type=cosine", "--warmup_steps=20",
        f"--save_steps={args.max_steps}", f"--eval_steps={args.max_steps}", "--max_eval_samples=64",
        "--eval_generation_samples=32", "--logging_steps=20", "--disable_tqdm=true", "--bf16=true",
        "--train_sampling_strategy=group_by_length", f"--output_format={args.output_format}")  # less padding; fine over 1000 steps, not in 40-step demos
    train_seconds = time.time() - start
    scores = {}
    models = [("fine-tuned", str(job / "final_model"))] + ([] if args.quick else [("base", "embedded:smollm2-135m-instruct")])
    for name, uri in models:
        out = work / f"{name}.json"
        run("databricks_llm.evaluate", f"--model_uri={uri}", f"--dataset={args.dataset}", "--split=test",
            f"--max_samples={args.test_samples}", "--batch_size=32", "--max_tokens=96", "--dtype=bfloat16", f"--job_dir={job}",
            f"--output_json={out}")
        scores[name] = json.loads(out.read_text())
    print(f"training: {args.max_steps} steps x batch {args.batch_size} in {train_seconds / 60:.1f} min")
    for name, s in scores.items():
        parsed = f", JSON parse rate {s['parse_rate']:.4f}" if "parse_rate" in s else ""
        print(f"{name}: {args.output_format} F1 {s['f1']:.4f}, precision {s['precision']:.4f}, recall {s['recall']:.4f}, "
              f"exact match {s['exact_match']:.4f}{parsed}, n {s['n']}, {s['seconds']:.0f}s")
    if "base" in scores:
        ours, base = scores["fine-tuned"]["f1"], scores["base"]["f1"]
        print(f"{args.output_format}_f1: ours {ours:.4f}, baseline {base:.4f}, ratio {ours / base if base else float('inf'):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

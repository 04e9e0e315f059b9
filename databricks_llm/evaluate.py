"""Score extraction models by their task's metric: precision/recall/F1 over slots or JSON fields, or text F1.

    python -m databricks_llm.evaluate --model_uri=runs:/<run_id>/checkpoint-50 --split=test
    python -m databricks_llm.evaluate --compare_run=<run_id> --register_best=e2e-extractor

The first scores one model (an MLflow URI, a local folder, or a base model such as the
embedded SmolLM2); the second scores every checkpoint of a fine-tuning run and its base model
side by side, marks the best and can register it with an alias. The task (instruction, output
format) is the one saved with the model (E2E's for models without one and for base models);
the task flags override it. Results are printed, written as JSON, and logged to an MLflow
evaluation run (metrics, a per-example table, a plot).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import datasets
import mlflow

from databricks_llm import data, frame_metrics, logs, models, runs, runtime, task_metrics, tracking, validation
from databricks_llm.data import EMBEDDED_DATASET
from databricks_llm.error_analysis import scores_and_errors, summary_lines
from databricks_llm.errors import InputError, exit_code, first_line
from databricks_llm.formats import STRUCTURED_DEFAULT, of
from databricks_llm.generation import generate
from databricks_llm.models import EMBEDDED_MODEL
from databricks_llm.scoring import metric_dict
from databricks_llm.task import E2E, TASK_FILE, Task
from databricks_llm.validation import NON_NEGATIVE, POSITIVE, check_settings

log = logging.getLogger("databricks_llm.evaluate")  # by name: this module also runs as __main__

RANGES = {"max_samples": NON_NEGATIVE, "batch_size": POSITIVE}


@dataclass
class EvaluateArguments:
    model_uri: str = field(default=EMBEDDED_MODEL, metadata={"help": "runs:/..., models:/..., a downloaded MLflow model folder, a saved model folder, or a base model (hub id, .gguf, embedded)."})
    compare_run: str | None = field(default=None, metadata={"help": "Score every checkpoint of this MLflow run and its base model side by side."})
    dataset: str = field(default=EMBEDDED_DATASET, metadata={"help": "Same sources as fine_tune --dataset."})
    split: str = field(default="test", metadata={"help": "train, validation or test."})
    max_samples: int = field(default=200, metadata={"help": "Score the first N rows of the split (0: all)."})
    batch_size: int = field(default=16, metadata={"help": "Generation batch size."})
    max_tokens: int = field(default=128, metadata={"help": "Most new tokens per prediction."})
    structured_decoding: bool = field(default=STRUCTURED_DEFAULT, metadata={"help": "Confine each output to the task's format: its fields (each at most once) and closed values, valid JSON for json tasks."})
    dtype: str = field(default="auto", metadata={"help": "Weights for generation: auto (bf16 on a GPU, float32 on a CPU), float32 or bfloat16 (faster on CPUs with AVX512-BF16; see docs/benchmarks.md)."})
    output_json: str | None = field(default=None, metadata={"help": "Write the scores here as JSON."})
    register_best: str | None = field(default=None, metadata={"help": "With --compare_run: register the best checkpoint under this model name."})
    alias: str = field(default="champion", metadata={"help": "Alias given to the registered best version."})
    job_dir: str = field(default="outputs/checkpoints", metadata={"help": "The fine-tuning --output_dir, whose local MLflow store is used when MLFLOW_TRACKING_URI is unset."})


def is_mlflow_model(uri: str) -> bool:
    return uri.startswith(("runs:/", "models:/")) or (Path(uri) / "MLmodel").is_file()


def load_scorable(uri: str) -> tuple[Any, Any]:
    """(model, tokenizer) behind an MLflow model (URI or folder) or any fine_tune --model source."""
    if is_mlflow_model(uri):
        try:
            inner = mlflow.pyfunc.load_model(uri).unwrap_python_model()
        except Exception as err:  # MLflow raises several types for a missing model
            raise InputError(f"cannot load {uri}: {first_line(err)}") from None
        return inner.model, inner.tokenizer
    return models.load_for_inference(uri)


def task_of(uri: str) -> Task:
    """The task saved with a model: in its MLflow metadata or its folder; E2E's when it has none."""
    return saved_task(uri) or E2E


def saved_task(uri: str) -> Task | None:
    """The task saved with a model, None for models without one (base models)."""
    if is_mlflow_model(uri):
        try:
            saved = (mlflow.models.Model.load(uri).metadata or {}).get("extraction_task")  # no store lookup
        except Exception as err:  # MLflow raises several types for a missing model
            raise InputError(f"cannot load {uri}: {first_line(err)}") from None
        return Task.from_dict(saved) if saved else None
    return Task.of_model(uri) if (Path(uri) / TASK_FILE).is_file() else None


def score_model(uri: str, task: Task, inputs: list[str], references: list[str], batch_size: int, max_tokens: int,
                dtype: str = "auto", structured: bool = STRUCTURED_DEFAULT) -> dict:
    """The task's scores and error report of one model, with its predictions and the seconds generation took."""
    model, tokenizer = load_scorable(uri)
    model = model.to(models.inference_dtype(dtype))
    start = time.time()
    predictions = generate(model, tokenizer, inputs, task=task, max_tokens=max_tokens, batch_size=batch_size,
                           structured=structured, progress=progress_printer(uri, len(inputs)))
    result = scores_and_errors(task.output_format, predictions, references)
    result.update(task_metrics.extra_scores(task, predictions, references))
    result.update(seconds=round(time.time() - start, 2), model_uri=uri, predictions=predictions)
    parsed = f", parse rate {result['parse_rate']:.3f}" if "parse_rate" in result else ""
    log.info(f"[evaluate] {uri}: F1 {result['f1']:.3f}{parsed} on {result['n']} rows in {result['seconds']}s")
    log.info("\n".join(summary_lines(result) + frame_metrics.summary_lines(result)))
    return result



def progress_printer(label: str, total: int, every: float = 30.0) -> Callable[[int], None]:
    """Prints rows done, seconds taken and an estimate of those left, at most once per `every`
    seconds and at the end: scoring a whole test split takes minutes."""
    start = last = time.time()

    def report(done: int) -> None:
        nonlocal last
        now = time.time()
        if done < total and now - last < every:
            return
        last, taken = now, now - start
        left = f", ~{taken * (total - done) / done:.0f}s left" if done < total else ""
        log.info(f"[evaluate] {label}: {done}/{total} rows, {taken:.0f}s{left}")

    return report


def candidates(run_id: str) -> list[tuple[str, int, str]]:
    """(name, step, uri) of the base model and each checkpoint of a fine-tuning run, by step."""
    try:
        base = mlflow.get_run(run_id).data.tags["model"]
    except Exception as err:
        raise InputError(f"--compare_run {run_id}: {first_line(err)}") from None
    return [("base", 0, base)] + [(m.name, step, f"models:/{m.model_id}") for step, m in runs.logged_checkpoints(run_id)]


def print_table(rows: list[dict], best: str | None = None) -> None:
    """One line per model, the name column as wide as the longest name: model paths often differ
    only past their first characters (`outputs/bench_lr2e3/...`, `outputs/bench_lr2e3_aug/...`)."""
    names = [row.get("name", row["model_uri"]) for row in rows]
    width = max([27, *map(len, names)]) + 1
    print(f"{'model':<{width}}{'precision':>10}{'recall':>10}{'f1':>10}{'exact':>10}{'n':>6}{'seconds':>9}")
    for name, row in zip(names, rows):
        mark = "  <- best" if best is not None and row.get("name") == best else ""
        print(f"{name:<{width}}{row['precision']:>10.3f}{row['recall']:>10.3f}"
              f"{row['f1']:>10.3f}{row['exact_match']:>10.3f}{row['n']:>6}{row['seconds']:>9.1f}{mark}")


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: exit 2 with one line on bad input."""
    logs.setup()
    return exit_code(lambda: _run(argv))


def _parse(argv: list[str] | None) -> tuple[EvaluateArguments, Task]:
    parser = validation.argument_parser((EvaluateArguments, Task), description=__doc__.split("\n")[0])
    args, task = parser.parse_args_into_dataclasses(args=argv)
    task = task.checked()
    if args.split not in ("train", "validation", "test"):
        raise InputError(f"--split must be train, validation or test (got {args.split})")
    validation.check_ranges(args, RANGES)
    check_settings(0.0, args.max_tokens, prefix="--")
    if args.dtype not in models.INFERENCE_DTYPES:
        raise InputError(f"--dtype must be one of {', '.join(models.INFERENCE_DTYPES)} (got {args.dtype})")
    if args.dtype == "bfloat16":
        runtime.warn_if_bf16_is_slow("--dtype=bfloat16")
    if args.register_best is not None:
        if not args.compare_run:
            raise InputError("--register_best needs --compare_run")
        tracking.check_registered_model_name(args.register_best, "--register_best")
    if not args.compare_run and not is_mlflow_model(args.model_uri):
        models.check_source(args.model_uri)  # before the tracking store is created in --job_dir
    data.check_source(args.dataset)
    validation.check_writable(args.job_dir, "--job_dir")
    if args.output_json is not None:
        validation.check_writable_file(args.output_json, "--output_json")  # not after the whole evaluation
    return args, task


def _run(argv: list[str] | None) -> None:
    args, flags = _parse(argv)
    settings = tracking.TrackingSettings.from_env(args.job_dir)
    datasets.disable_progress_bars()
    # The store is written (a local one created) only to log the results, after every check;
    # runs:/ and models:/ URIs need one that exists.
    store = tracking.local_store(settings.uri)
    reads_store = bool(args.compare_run) or args.model_uri.startswith(("runs:/", "models:/"))
    if store is not None and not store.exists() and reads_store:
        raise InputError(f"{args.compare_run or args.model_uri}: no tracking store at {store} "
                         "(set --job_dir to the fine-tuning job's folder, or MLFLOW_TRACKING_URI)")
    mlflow.set_tracking_uri(settings.uri)  # to read runs:/ and models:/; the experiment is made only to log
    models_ = candidates(args.compare_run) if args.compare_run else [(None, 0, args.model_uri)]
    saved = saved_task(models_[-1][2])  # a run's checkpoints share one task; its base model is scored on it
    if saved and flags.output_format and flags.output_format != saved.output_format:
        raise InputError(f"--output_format={flags.output_format}, but {models_[-1][2]} was trained for "
                         f"{saved.output_format} (the task saved with it); leave the flag out")
    splits, task = _load(args.dataset, saved or E2E, flags)
    if args.split not in splits:
        raise InputError(f"dataset {args.dataset} has no {args.split} split (found: {', '.join(splits)})")
    split = data.head(splits[args.split], args.max_samples)
    inputs, references = split[data.INPUT], split[data.OUTPUT]
    rows = [{**score_model(uri, task, inputs, references, args.batch_size, args.max_tokens, args.dtype,
                           args.structured_decoding),
             **({"name": name, "step": step} if args.compare_run else {})} for name, step, uri in models_]
    best = max(rows, key=lambda r: (r["f1"], r["step"])) if args.compare_run else None  # ties: the later one
    print_table(rows, best["name"] if best else None)

    tracking.connect(settings, args.job_dir)
    scored = f"compare-{args.compare_run[:8]}" if args.compare_run else tracking.model_label(args.model_uri)
    tags = {"task": "extraction", "output_format": task.output_format, "kind": "evaluation"}
    with mlflow.start_run(run_name=f"evaluate-{scored}-{args.split}", tags=tags):
        mlflow.log_params({"dataset": args.dataset, "split": args.split, "n": len(inputs), "dtype": args.dtype,
                           "model_uri": args.model_uri if not args.compare_run else f"compare:{args.compare_run}",
                           "structured_decoding": args.structured_decoding, **task.params()})
        for row in rows:
            suffix = f"_{row['name']}" if args.compare_run else ""
            mlflow.log_metrics({**metric_dict(row, "", of(task.output_format)), **task_metrics.extra_metrics(row, "")},
                               step=row.get("step", 0))
            if "frame" in row:
                mlflow.log_table(frame_metrics.per_slot_table(row), artifact_file=f"per_slot{suffix}.json")
            correct = [of(task.output_format).exact(p, r) for p, r in zip(row["predictions"], references)]
            mlflow.log_table({"input": inputs, "reference": references, "prediction": row["predictions"],
                              "correct": correct, "errors": row["per_record"]}, artifact_file=f"predictions{suffix}.json")
            report = ("errors", "errors_by_field", "most_common_faults", "wrong_records")
            mlflow.log_dict({k: row[k] for k in report}, f"errors{suffix}.json")
        if args.compare_run:
            figure = runs.loss_figure(args.compare_run, [(r["step"], r["f1"]) for r in rows])
            mlflow.log_figure(figure, "loss_and_f1.png")
            mlflow.set_tag("best_model", best["model_uri"])
    summary = [{k: v for k, v in r.items() if k not in ("predictions", "per_record")} for r in rows]
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(json.dumps(summary[0] if len(summary) == 1 else
                                                     {"models": summary, "best": best["name"]}, indent=2))
    if best and args.register_best:
        _register(best, args.register_best, args.alias)


def _load(dataset: str, saved: Task, flags: Task) -> tuple[datasets.DatasetDict, Task]:
    """The dataset for the model's task: columns from the flags (strictly), else the saved task's
    when the dataset has them, else detected; instruction and format from the flags or the model."""
    hint = not (flags.input_column or flags.output_column)
    return data.load(dataset, saved.overridden_by(flags), columns_hint=hint, need_train=False)


def _register(best: dict, name: str, alias: str) -> None:
    if best["name"] == "base":
        raise InputError("the base model scored best; nothing fine-tuned to register")
    version = mlflow.register_model(best["model_uri"], name)
    mlflow.MlflowClient().set_registered_model_alias(name, alias, version.version)
    log.info(f"[evaluate] registered {best['name']} as {name} version {version.version}, alias '{alias}'")


if __name__ == "__main__":
    sys.exit(main())

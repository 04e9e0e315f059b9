"""Fine-tune a causal LM on the E2E extraction task.

    python -m databricks_llm.fine_tune --output_dir=outputs/checkpoints [flags]
    deepspeed --num_gpus=N --module databricks_llm.fine_tune --deepspeed_config=ds_configs/ds_zero_3_cpu_offloading.json [flags]
    torchrun --nproc_per_node=N databricks_llm/fine_tune.py [flags]     # a file path works too (Spark's distributors)

Every flag of transformers' TrainingArguments is accepted, plus the script flags below; run
with --help for the list. Booleans take `--flag=true|false`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

if not __package__:  # run as a file: import this package, not its modules as top-level names
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from databricks_llm.data import EMBEDDED_DATASET  # noqa: E402
from databricks_llm.errors import InputError, exit_code  # noqa: E402
from databricks_llm.models import EMBEDDED_MODEL  # noqa: E402
from databricks_llm.validation import FRACTION, NON_NEGATIVE, POSITIVE, PROBABILITY, Range  # noqa: E402


@dataclass
class ScriptArguments:
    model: str = field(default=EMBEDDED_MODEL, metadata={"help": "Hub id, local HF folder, .gguf file, or the embedded SmolLM2-135M-Instruct."})
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer source (default: --model)."})
    dataset: str = field(default=EMBEDDED_DATASET, metadata={"help": "Hub id (E2E layout), local CSV/JSONL/parquet file or folder, a save_to_disk folder, or the embedded sample."})
    final_model_output_path: str | None = field(default=None, metadata={"help": "Where rank 0 writes the final model and tokenizer (default: <output_dir>/final_model)."})
    use_lora: bool = field(default=True, metadata={"help": "Train LoRA adapters (false: full fine-tune)."})
    use_4bit: bool = field(default=False, metadata={"help": "QLoRA: load the base in 4-bit (bitsandbytes, CUDA only)."})
    deepspeed_config: str | None = field(default=None, metadata={"help": "DeepSpeed JSON config (alias: --deepspeed)."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout (default 0: its mask on every adapted input cost about a tenth of a CPU step)."})
    lora_target_modules: str = field(default="all-linear", metadata={"help": "Comma-separated module names, or all-linear (every linear layer but lm_head)."})
    merge_adapter: bool = field(default=False, metadata={"help": "Also write the LoRA-merged full model to <final_model_output_path>/merged."})
    max_seq_length: int = field(default=256, metadata={"help": "Longest prompt+target in tokens; longer targets are cut (counted in the log)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows (quick runs)."})
    max_eval_samples: int | None = field(default=256, metadata={"help": "Evaluate on the first N validation rows (0: all)."})
    eval_generation_samples: int = field(default=32, metadata={"help": "At each evaluation, generate for this many seeded validation rows and log slot F1 (0: off)."})
    early_stopping_patience: int | None = field(default=None, metadata={"help": "Stop after N evaluations without improvement of --metric_for_best_model (turns on load_best_model_at_end)."})
    validation_fraction: float = field(default=0.05, metadata={"help": "Hold-out fraction of train when the dataset has no validation split."})
    registered_model_name: str | None = field(default=None, metadata={"help": "Register the final model under this name in the MLflow Model Registry."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the hub (off unless asked)."})


TRAINING_DEFAULTS = dict(
    output_dir="outputs/checkpoints", learning_rate=2e-4, num_train_epochs=1.0,
    per_device_train_batch_size=8, per_device_eval_batch_size=8, logging_steps=10,
    eval_strategy="steps", eval_steps=50, save_strategy="steps", save_steps=50,
    report_to="tensorboard", remove_unused_columns=False, ddp_find_unused_parameters=False,
)
EXIT_SECONDS = 120  # after the job ends, a stuck background thread may hold the process this long at most
_ALIASES = {"--evaluation_strategy": "--eval_strategy", "--deepspeed": "--deepspeed_config"}
# Valid values of the numeric flags (TrainingArguments' own checks let nan, inf and negatives
# through to the first optimizer step); every other number must at least be finite.
RANGES = {
    "lora_r": POSITIVE, "lora_alpha": POSITIVE, "lora_dropout": PROBABILITY, "max_seq_length": POSITIVE,
    "max_train_samples": POSITIVE, "max_eval_samples": NON_NEGATIVE, "eval_generation_samples": NON_NEGATIVE,
    "early_stopping_patience": NON_NEGATIVE, "validation_fraction": FRACTION,
    "learning_rate": POSITIVE, "num_train_epochs": NON_NEGATIVE, "max_steps": Range(-1),
    "per_device_train_batch_size": POSITIVE, "per_device_eval_batch_size": POSITIVE,
    "gradient_accumulation_steps": POSITIVE, "eval_accumulation_steps": POSITIVE,
    "weight_decay": NON_NEGATIVE, "adam_beta1": PROBABILITY, "adam_beta2": PROBABILITY, "adam_epsilon": POSITIVE,
    "max_grad_norm": NON_NEGATIVE, "warmup_steps": NON_NEGATIVE, "label_smoothing_factor": PROBABILITY,
    "logging_steps": POSITIVE, "eval_steps": POSITIVE, "save_steps": POSITIVE, "save_total_limit": POSITIVE,
    "seed": NON_NEGATIVE, "data_seed": NON_NEGATIVE, "dataloader_num_workers": NON_NEGATIVE,
}


def _normalise_argv(argv: list[str]) -> list[str]:
    """Apply flag aliases; drop the launchers' extras (`--local_rank N`, a bare `--deepspeed`)."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        name, eq, value = argv[i].partition("=")
        bare = not eq and (i + 1 == len(argv) or argv[i + 1].startswith("--"))
        if name in ("--local_rank", "--local-rank"):
            i += 1 if eq or bare else 2
            continue
        if not (name == "--deepspeed" and bare):
            out.append(_ALIASES.get(name, name) + eq + value)
        i += 1
    return out


def _validate(script: ScriptArguments, training) -> None:
    """Everything that can be checked before a model or dataset is loaded and before anything is written."""
    from databricks_llm import data, models, runtime, tracking, validation

    validation.check_ranges(script, RANGES)
    validation.check_ranges(training, RANGES)
    if script.use_4bit:
        if not script.use_lora:
            raise InputError("--use_4bit needs --use_lora=true (4-bit weights cannot be fine-tuned directly)")
        runtime.check_4bit()
    if training.max_steps == 0 or (training.max_steps < 0 and training.num_train_epochs <= 0):
        raise InputError("nothing to train: set --num_train_epochs > 0 or --max_steps > 0")
    tracking.check_env()
    tracking.check_report_to(training.report_to)
    if script.deepspeed_config:
        runtime.check_deepspeed_config(script.deepspeed_config, training)
    validation.check_writable(training.output_dir, "--output_dir")
    validation.check_writable(script.final_model_output_path, "--final_model_output_path")
    models.check_source(script.model)
    models.check_source(script.tokenizer, "tokenizer")
    data.check_source(script.dataset)
    if training.resume_from_checkpoint:
        training.resume_from_checkpoint = _resolve_checkpoint(training.resume_from_checkpoint, training.output_dir)
    lora = dict(r=script.lora_r, lora_alpha=script.lora_alpha, lora_dropout=script.lora_dropout,
                target_modules=script.lora_target_modules) if script.use_lora else None
    models.check_model(script.model, lora=lora, checkpoint=training.resume_from_checkpoint,
                       trust_remote_code=script.trust_remote_code)


def _resolve_checkpoint(value: str, output_dir: str) -> str:
    """`true` means the newest checkpoint in --output_dir; a path must be a complete checkpoint."""
    from transformers.trainer_utils import get_last_checkpoint

    if value.lower() == "true":
        found = get_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None
        if found is None:
            raise InputError(f"--resume_from_checkpoint=true but {output_dir} holds no checkpoint")
        value = found
    if not (Path(value) / "trainer_state.json").is_file():
        raise InputError(f"--resume_from_checkpoint {value} is not a complete checkpoint (no trainer_state.json)")
    return value


def parse_args(argv: list[str] | None = None):
    """Parse and validate flags; raises InputError with a one-line reason."""
    import torch
    from transformers import TrainingArguments

    from databricks_llm import runtime, validation

    parser = validation.argument_parser((ScriptArguments, TrainingArguments), description=__doc__.split("\n")[0])
    parser.set_defaults(**TRAINING_DEFAULTS, use_cpu=not torch.cuda.is_available())
    namespace, unknown = parser.parse_known_args(_normalise_argv(sys.argv[1:] if argv is None else argv))
    if unknown:
        raise InputError(f"unknown flag {' '.join(unknown)} (see --help)")
    runtime.check_precision(namespace.fp16, namespace.bf16)
    values = vars(namespace)
    script = ScriptArguments(**{f.name: values.pop(f.name) for f in dataclasses.fields(ScriptArguments)})
    if script.early_stopping_patience:
        if values["eval_strategy"] == "no":
            raise InputError("--early_stopping_patience needs evaluations: set --eval_strategy=steps or epoch")
        values["load_best_model_at_end"] = True
    script.tokenizer = script.tokenizer or script.model
    try:
        training = TrainingArguments(**values)
    except ValueError as err:
        raise InputError(str(err).splitlines()[0]) from None
    script.final_model_output_path = script.final_model_output_path or str(Path(training.output_dir) / "final_model")
    _validate(script, training)
    return script, training


def setup_process(script: ScriptArguments, training):
    """Join the process group (before TrainingArguments sees the DeepSpeed config) and set env defaults."""
    from databricks_llm import runtime

    if script.deepspeed_config:
        runtime.set_distributed_env_defaults()
    runtime.init_process_group(use_deepspeed=bool(script.deepspeed_config))
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(Path(training.output_dir) / "tensorboard"))
    report_to = [r for r in training.report_to if r != "mlflow"]  # CustomMLflowCallback replaces the stock one
    return dataclasses.replace(training, deepspeed=script.deepspeed_config, report_to=report_to)


def train(script: ScriptArguments, training) -> None:
    """The whole job: data, model, Trainer, final model; rank 0 also tracks it in MLflow.

    Rank 0 holds the output folder's lock from the first write (the local store) to the end.
    """
    import contextlib

    import datasets

    from databricks_llm import data, models, outputlock, runtime

    datasets.disable_progress_bars()
    tokenizer = models.load_tokenizer(script.tokenizer, script.trust_remote_code)
    models.check_vocabulary(tokenizer, script.model, script.trust_remote_code)
    with training.main_process_first(desc="load and tokenize data"):
        splits = data.load_e2e(script.dataset, seed=training.seed, validation_fraction=script.validation_fraction)
        if script.max_train_samples:
            splits["train"] = splits["train"].select(range(min(script.max_train_samples, len(splits["train"]))))
        if script.max_eval_samples:
            splits["validation"] = splits["validation"].select(range(min(script.max_eval_samples, len(splits["validation"]))))
        tokenized = data.tokenize_splits(splits, tokenizer, script.max_seq_length)
    print(f"[data] {script.dataset}: " + ", ".join(f"{k}={len(v)}" for k, v in splits.items()), flush=True)
    tracked = runtime.global_rank() == 0
    with outputlock.hold(training.output_dir) if tracked else contextlib.nullcontext():
        _fit(script, training, tokenizer, splits, tokenized, tracked)


def _fit(script: ScriptArguments, training, tokenizer, splits, tokenized, tracked: bool) -> None:
    """Model, Trainer, final model. A run this started always ends: FINISHED, KILLED (Ctrl-C,
    SIGTERM) or FAILED (any error, a full disk included)."""
    import mlflow
    import torch
    from transformers import Trainer

    from databricks_llm import data, models, runtime, tracking
    from databricks_llm.redaction import redact_text

    if tracked:  # after the data checks, so bad data leaves no store behind; before the slow model load
        tracking.connect(training.output_dir)
    half = {True: torch.bfloat16}.get(training.bf16) or {True: torch.float16}.get(training.fp16)
    model = models.load_model(script.model, use_4bit=script.use_4bit, half=half if script.use_lora else None,
                              trust_remote_code=script.trust_remote_code)
    if script.use_lora:
        model = models.add_lora(model, r=script.lora_r, alpha=script.lora_alpha, dropout=script.lora_dropout,
                                target_modules=script.lora_target_modules,
                                gradient_checkpointing=training.gradient_checkpointing, use_4bit=script.use_4bit)
    run, skip_until, monitor, error = None, -1, None, None
    node, nodes = runtime.node()
    if tracked:
        run, skip_until = tracking.start_run(training.output_dir, training.run_name or tracking.default_run_name(script.model),
                                             resume=bool(training.resume_from_checkpoint),
                                             node_id=f"node-{node}" if nodes > 1 else None)
        print(f"[mlflow] run {run.info.run_id} at {redact_text(mlflow.get_tracking_uri())}", flush=True)
    try:
        if nodes > 1:  # every node's first process reports its own system metrics into the one run
            run_id = runtime.broadcast(run.info.run_id if run else None, training.device)
            if not tracked and int(os.environ.get("LOCAL_RANK", "0")) == 0 and \
                    tracking.env_flag("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", True):
                monitor = tracking.node_system_metrics(run_id, training.output_dir, node)
        if run is not None and skip_until < 0:
            _log_job(script, training, model, splits)
        trainer = Trainer(
            model=model, args=training, processing_class=tokenizer,
            train_dataset=tokenized["train"],
            eval_dataset=tokenized["validation"] if training.eval_strategy != "no" else None,
            data_collator=data.collator(model, tokenizer),
            callbacks=_callbacks(script, training, tokenizer, splits["validation"], skip_until),
        )
        if training.resume_from_checkpoint:
            step = json.loads((Path(training.resume_from_checkpoint) / "trainer_state.json").read_text())["global_step"]
            print(f"[resume] continuing from {training.resume_from_checkpoint} (step {step})", flush=True)
        trainer.train(resume_from_checkpoint=training.resume_from_checkpoint)
        trainer.save_model(script.final_model_output_path)
        if trainer.is_world_process_zero():
            _finish(script, tokenizer, tracked)
    except BaseException as err:
        error = err
        raise
    finally:
        if monitor is not None:
            monitor.finish()
        if run is not None:
            tracking.end_run(tracking.status_after(error))


def _callbacks(script: ScriptArguments, training, tokenizer, validation, skip_until: int) -> list:
    """Slot evaluation first (it adds metrics), then MLflow logging, then early stopping."""
    from transformers import EarlyStoppingCallback
    from transformers.integrations import is_deepspeed_zero3_enabled

    from databricks_llm import tracking
    from databricks_llm.callbacks import CustomMLflowCallback, SlotEvalCallback

    callbacks = []
    if script.eval_generation_samples and training.eval_strategy != "no":
        subset = validation.shuffle(seed=training.seed).select(range(min(script.eval_generation_samples, len(validation))))
        callbacks.append(SlotEvalCallback(tokenizer, subset["sentence"], subset["mr"], batch_size=training.per_device_eval_batch_size,
                                          synced_gpus=is_deepspeed_zero3_enabled() and training.world_size > 1))
    callbacks.append(CustomMLflowCallback(skip_until, log_models=tracking.env_flag("HF_MLFLOW_LOG_ARTIFACTS", True)))
    if script.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=script.early_stopping_patience))
    return callbacks


def _log_job(script: ScriptArguments, training, model, splits) -> None:
    """Params (training args, model and LoRA config, data facts, process layout), tags and dataset inputs."""
    from databricks_llm import data, runtime, tracking

    params = {**model.config.to_dict(), **training.to_dict(), **dataclasses.asdict(script)}
    if hasattr(model, "peft_config"):
        params.update({f"lora_{k}": v for k, v in model.peft_config["default"].to_dict().items()})
    params.update({f"{k}_rows": len(v) for k, v in splits.items()}, prompt_version=data.PROMPT_VERSION,
                  world_size=training.world_size, nodes=runtime.node()[1])
    tracking.log_params(params)
    tracking.set_tags(script.model)
    for split in ("train", "validation"):
        tracking.log_dataset(splits[split].to_pandas(), script.dataset, split)


def _finish(script: ScriptArguments, tokenizer, tracked: bool) -> None:
    """Rank 0: tokenizer and merged model next to the final weights; final model + TensorBoard to MLflow."""
    import mlflow

    from databricks_llm import models, tracking

    tokenizer.save_pretrained(script.final_model_output_path)
    if script.use_lora and script.merge_adapter:
        models.merge_adapter(script.final_model_output_path)
    print(f"[done] final model in {script.final_model_output_path}", flush=True)
    if tracked:
        tracking.survive("logging the final model", lambda: tracking.log_model_folder(
            script.final_model_output_path, name="final_model", with_example=True,
            registered_model_name=script.registered_model_name))
        tensorboard = os.environ.get("TENSORBOARD_LOGGING_DIR")
        if tensorboard and Path(tensorboard).is_dir():
            tracking.survive("uploading TensorBoard events", lambda: mlflow.log_artifacts(tensorboard, "tensorboard"))


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: exit 2 with one line on bad input, before heavy work starts."""
    import signal

    signal.signal(signal.SIGTERM, _terminated)

    def run() -> None:
        script, training = parse_args(argv)
        train(script, setup_process(script, training))

    return exit_code(run)


def _terminated(signum: int, frame) -> None:
    """SIGTERM unwinds like Ctrl-C, so that the MLflow run is marked KILLED and the lock released."""
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    from databricks_llm.runtime import exit_within

    code = 143  # what the SIGTERM handler exits with, should it fire
    try:
        code = main()
    finally:
        exit_within(EXIT_SECONDS, code)
    sys.exit(code)

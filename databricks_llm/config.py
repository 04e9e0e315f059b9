"""The fine-tuning job's configuration: argument groups parsed by one parser, checked up front.

As in TRL's scripts, each group is a dataclass: `DataArguments`, `task.Task` (the extraction
task's columns, instruction and output format), `ModelArguments`, `JobArguments` and
transformers' `TrainingArguments` share one command line (flags unchanged since the seed
notebook), and `TrackingSettings` holds the environment, read once. `parse` returns them as one
`JobConfig` after every check that needs no model or data loaded and writes nothing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from databricks_llm.data import EMBEDDED_DATASET
from databricks_llm.errors import InputError, first_line
from databricks_llm.formats import STRUCTURED_DEFAULT
from databricks_llm.models import EMBEDDED_MODEL
from databricks_llm.task import Task
from databricks_llm.validation import FRACTION, NON_NEGATIVE, POSITIVE, PROBABILITY, Range

log = logging.getLogger(__name__)


@dataclass
class DataArguments:
    dataset: str = field(default=EMBEDDED_DATASET, metadata={"help": "Hub id (E2E layout), local CSV/JSONL/parquet file or folder, a save_to_disk folder, or the embedded sample."})
    max_seq_length: int = field(default=256, metadata={"help": "Longest prompt+target in tokens; longer targets are cut (counted in the log)."})
    batch_tokens: int | None = field(default=None, metadata={"help": "Training micro-batches of as many rows as fit this many tokens, in length order, packed end to end without padding (databricks_llm/batching.py); --per_device_train_batch_size then applies to evaluation only. Default: off on CPU (slower there), the memory plan's budget on GPU."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows (quick runs)."})
    max_eval_samples: int | None = field(default=256, metadata={"help": "Evaluate on the first N validation rows (0: all)."})
    eval_generation_samples: int = field(default=32, metadata={"help": "At each evaluation, generate for this many seeded validation rows and log the task's F1 and exact match (0: off)."})
    structured_decoding: bool = field(default=STRUCTURED_DEFAULT, metadata={"help": "Confine the outputs generated at each evaluation to the task's format (as evaluate --structured_decoding)."})
    validation_fraction: float = field(default=0.05, metadata={"help": "Hold-out fraction of train when the dataset has no validation split."})
    augment_names: float = field(default=0.0, metadata={"help": "Fraction of training rows whose open values (names, places: fields without a closed vocabulary) are swapped, in input and target, for invented names, so the model learns to copy names it has never seen (databricks_llm/augment.py)."})


@dataclass
class ModelArguments:
    model: str = field(default=EMBEDDED_MODEL, metadata={"help": "Hub id, local HF folder, .gguf file, or the embedded SmolLM2-135M-Instruct."})
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer source (default: --model)."})
    use_lora: bool = field(default=True, metadata={"help": "Train LoRA adapters (false: full fine-tune)."})
    use_4bit: bool = field(default=False, metadata={"help": "QLoRA: load the base in 4-bit (bitsandbytes, CUDA only)."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout (default 0: its mask on every adapted input cost about a tenth of a CPU step)."})
    lora_target_modules: str = field(default="all-linear", metadata={"help": "Comma-separated module names, or all-linear (every linear layer but lm_head)."})
    attn_implementation: str = field(default="auto", metadata={"choices": ["auto", "eager", "sdpa", "flex_attention", "flash_attention_2"], "help": "Attention for training: auto is eager for --bf16/--fp16 on a CPU (faster there); with --batch_tokens on a GPU flash_attention_2 where flash-attn is installed, else flex_attention; else transformers' default, sdpa."})
    merge_adapter: bool = field(default=False, metadata={"help": "Also write the LoRA-merged full model to <final_model_output_path>/merged."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the hub (off unless asked)."})


@dataclass
class JobArguments:
    final_model_output_path: str | None = field(default=None, metadata={"help": "Where rank 0 writes the final model and tokenizer (default: <output_dir>/final_model)."})
    deepspeed_config: str | None = field(default=None, metadata={"help": "DeepSpeed JSON config (alias: --deepspeed); auto: on a GPU the memory plan's choice (databricks_llm/memory_plan.py), on a CPU ds_configs/ds_zero_2.json. On GPU jobs without this flag the memory plan picks too."})
    early_stopping_patience: int | None = field(default=None, metadata={"help": "Stop after N evaluations without improvement of --metric_for_best_model (default: the task's eval_f1 when generation evaluation is on; turns on load_best_model_at_end)."})
    registered_model_name: str | None = field(default=None, metadata={"help": "Register the final model under this name in the MLflow Model Registry."})
    save_minutes: str | None = field(default=None, metadata={"help": "Also save a checkpoint once training has run this many minutes, comma-separated (e.g. 5,10,20): checkpoints of a time budget."})

    def minutes(self) -> list[float]:
        """`save_minutes` as sorted numbers; InputError names a value that is not a positive number."""
        marks = []
        for text in (self.save_minutes or "").split(","):
            try:
                value = float(text)
            except ValueError:
                value = float("nan")
            if not (value > 0 and value != float("inf")):
                raise InputError(f"--save_minutes takes positive numbers of minutes, comma-separated (got {text.strip()!r})")
            marks.append(value)
        return sorted(marks)


@dataclass
class JobConfig:
    """Everything one fine-tuning job is told, in one tree."""

    data: DataArguments
    task: Task  # as given; `data.load` resolves it against the dataset
    model: ModelArguments
    job: JobArguments
    training: Any  # transformers.TrainingArguments
    tracking: Any  # tracking.TrackingSettings


GROUPS = (DataArguments, Task, ModelArguments, JobArguments)
# The seed notebook's defaults where they differ from TrainingArguments'.
TRAINING_DEFAULTS = dict(
    output_dir="outputs/checkpoints", learning_rate=2e-4, num_train_epochs=1.0,
    per_device_train_batch_size=8, per_device_eval_batch_size=8, logging_steps=10,
    eval_strategy="steps", eval_steps=50, save_strategy="steps", save_steps=50,
    report_to="tensorboard", remove_unused_columns=False, ddp_find_unused_parameters=False,
)
_ALIASES = {"--evaluation_strategy": "--eval_strategy", "--deepspeed": "--deepspeed_config"}
# Valid values of the numeric flags (TrainingArguments' own checks let nan, inf and negatives
# through to the first optimizer step); every other number must at least be finite.
RANGES = {
    "lora_r": POSITIVE, "lora_alpha": POSITIVE, "lora_dropout": PROBABILITY, "max_seq_length": POSITIVE,
    "batch_tokens": POSITIVE, "max_train_samples": POSITIVE, "max_eval_samples": NON_NEGATIVE, "eval_generation_samples": NON_NEGATIVE,
    "early_stopping_patience": NON_NEGATIVE, "validation_fraction": FRACTION, "augment_names": Range(0, 1),
    "learning_rate": POSITIVE, "num_train_epochs": NON_NEGATIVE, "max_steps": Range(-1),
    "per_device_train_batch_size": POSITIVE, "per_device_eval_batch_size": POSITIVE,
    "gradient_accumulation_steps": POSITIVE, "eval_accumulation_steps": POSITIVE,
    "weight_decay": NON_NEGATIVE, "adam_beta1": PROBABILITY, "adam_beta2": PROBABILITY, "adam_epsilon": POSITIVE,
    "max_grad_norm": NON_NEGATIVE, "warmup_steps": NON_NEGATIVE, "label_smoothing_factor": PROBABILITY,
    "logging_steps": POSITIVE, "eval_steps": POSITIVE, "save_steps": POSITIVE, "save_total_limit": POSITIVE,
    "seed": NON_NEGATIVE, "data_seed": NON_NEGATIVE, "dataloader_num_workers": NON_NEGATIVE,
}


def normalise_argv(argv: list[str]) -> list[str]:
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


def parse(argv: list[str] | None = None, description: str = "") -> JobConfig:
    """Parse and check the flags and the tracking environment; raises InputError with a one-line
    reason. Nothing is loaded or written."""
    import torch
    from transformers import TrainingArguments

    from databricks_llm import memory_plan, runtime, tracking, validation

    parser = validation.argument_parser((*GROUPS, TrainingArguments), description=description)
    parser.set_defaults(**TRAINING_DEFAULTS, use_cpu=not torch.cuda.is_available())
    args = normalise_argv(sys.argv[1:] if argv is None else argv)
    namespace, _ = parser.parse_known_args(args)
    runtime.check_precision(namespace.fp16, namespace.bf16)
    values = vars(namespace)
    data, task, model, job = (group(**{f.name: values.pop(f.name) for f in dataclasses.fields(group)}) for group in GROUPS)
    if job.early_stopping_patience:
        if values["eval_strategy"] == "no":
            raise InputError("--early_stopping_patience needs evaluations: set --eval_strategy=steps or epoch")
        values["load_best_model_at_end"] = True
        if values["metric_for_best_model"] is None and data.eval_generation_samples:
            values["metric_for_best_model"] = "eval_f1"  # the task's metric (greater is better)
    validation.check_values(values, RANGES)  # as given: TrainingArguments replaces some (--eval_steps=0)
    try:
        training = TrainingArguments(**values)
    except ValueError as err:
        raise InputError(first_line(err)) from None
    model.tokenizer = model.tokenizer or model.model
    job.final_model_output_path = job.final_model_output_path or str(Path(training.output_dir) / "final_model")
    for group in (data, model, job, training):
        validation.check_ranges(group, RANGES)
    validation.check_writable(training.output_dir, "--output_dir")  # before the tracking defaults use it
    config = JobConfig(data, task.checked(), model, job, training, tracking.TrackingSettings.from_env(training.output_dir))
    memory_plan.apply(config, memory_plan.given_flags(args))  # GPU jobs: before the checks of what it sets
    _check(config)
    if training.resume_from_checkpoint:
        checkpoint = resume_checkpoint(training.resume_from_checkpoint, training.output_dir)
        config.training = dataclasses.replace(config.training, resume_from_checkpoint=checkpoint)  # the plan's changes kept
        if checkpoint is not None:
            _check_steps_left(checkpoint, training.max_steps)
    _check_model(config)
    return config


def _check(config: JobConfig) -> None:
    """What can be checked before a model or dataset is loaded and before anything is written."""
    from databricks_llm import data, models, runtime, tracking, validation

    model, training = config.model, config.training
    if model.use_4bit:
        if not model.use_lora:
            raise InputError("--use_4bit needs --use_lora=true (4-bit weights cannot be fine-tuned directly)")
        runtime.check_4bit()
    if training.use_liger_kernel:
        runtime.check_liger_kernel()
    if training.max_steps == 0 or (training.max_steps < 0 and training.num_train_epochs <= 0):
        raise InputError("nothing to train: set --num_train_epochs > 0 or --max_steps > 0")
    tracking.check_report_to(training.report_to)
    if config.data.batch_tokens and config.data.batch_tokens < config.data.max_seq_length:
        raise InputError(f"--batch_tokens={config.data.batch_tokens} is below --max_seq_length={config.data.max_seq_length}: "
                         "a micro-batch must hold the longest row")
    if config.job.registered_model_name is not None:
        tracking.check_registered_model_name(config.job.registered_model_name, "--registered_model_name")
    if config.job.deepspeed_config:  # "auto" was resolved by the memory plan
        runtime.check_deepspeed_config(config.job.deepspeed_config, training)
        runtime.check_op_build_locks()
    validation.check_writable(config.job.final_model_output_path, "--final_model_output_path")
    if config.job.save_minutes is not None:
        config.job.minutes()
    models.check_source(model.model)
    models.check_source(model.tokenizer, "tokenizer")
    data.check_source(config.data.dataset)


def _check_model(config: JobConfig) -> None:
    """The model's architecture against the LoRA settings and a resume checkpoint (meta device)."""
    from databricks_llm import models

    model = config.model
    lora = dict(r=model.lora_r, lora_alpha=model.lora_alpha, lora_dropout=model.lora_dropout,
                target_modules=model.lora_target_modules) if model.use_lora else None
    models.check_model(model.model, lora=lora, checkpoint=config.training.resume_from_checkpoint,
                       trust_remote_code=model.trust_remote_code)


def resume_checkpoint(value: str, output_dir: str) -> str | None:
    """`true` means the newest complete checkpoint in --output_dir (a job killed while saving leaves a
    newer, incomplete folder behind: it is skipped, and the resumed job writes it again); None when
    there are only incomplete ones (the job starts over; `quarantine_partial` moves them aside). A
    path must be a complete checkpoint."""
    if value.lower() == "true":
        folders = checkpoint_folders(output_dir)
        complete = [folder for folder in folders if is_complete(folder)]
        if not folders:
            raise InputError(f"--resume_from_checkpoint=true but {output_dir} holds no complete checkpoint")
        if not complete:
            print(f"[resume] {output_dir} holds only incomplete checkpoints ({', '.join(f.name for f in folders)}): "
                  "training starts over", flush=True)
            return None
        value = str(complete[-1])
        skipped = folders[folders.index(complete[-1]) + 1:]
        if skipped:
            log.info(f"[resume] skipping incomplete {', '.join(f.name for f in skipped)} (no readable trainer_state.json)")
    if not is_complete(Path(value)):
        raise InputError(f"--resume_from_checkpoint {value} is not a complete checkpoint (no readable trainer_state.json)")
    return value


def _check_steps_left(checkpoint: str, max_steps: int) -> None:
    """A checkpoint at --max_steps has nothing left to train (the Trainer would take one more step)."""
    step = json.loads((Path(checkpoint) / "trainer_state.json").read_text()).get("global_step", 0)
    if max_steps > 0 and step >= max_steps:
        raise InputError(f"--resume_from_checkpoint {checkpoint} is at step {step}, already --max_steps={max_steps}: "
                         "nothing to train (raise --max_steps to train on)")


def quarantine_partial(output_dir: str) -> list[Path]:
    """Move each incomplete `checkpoint-N` (a job killed or a disk filled while saving) to
    `partial-checkpoint-N`, where neither a resume nor the Trainer's rotation picks it up; say so."""
    moved = []
    for folder in checkpoint_folders(output_dir):
        if is_complete(folder):
            continue
        target = folder.with_name(f"partial-{folder.name}")
        n = 1
        while target.exists():
            n += 1
            target = folder.with_name(f"partial-{folder.name}-{n}")
        folder.rename(target)
        print(f"[checkpoint] {folder.name} is incomplete (no readable trainer_state.json): moved to {target.name}",
              flush=True)
        moved.append(target)
    return moved


def is_complete(checkpoint: Path) -> bool:
    """The Trainer writes trainer_state.json last, so a readable one marks a finished checkpoint."""
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return True


def checkpoint_folders(output_dir: str) -> list[Path]:
    """The `checkpoint-<step>` folders the Trainer wrote in `output_dir`, oldest step first."""
    found = [child for child in Path(output_dir).glob("checkpoint-*")
             if child.is_dir() and re.fullmatch(r"checkpoint-\d+", child.name)]
    return sorted(found, key=lambda child: int(child.name.split("-")[1]))

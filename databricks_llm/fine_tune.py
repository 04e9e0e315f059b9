"""Fine-tune a causal LM on the E2E extraction task.

    python -m databricks_llm.fine_tune --output_dir=outputs/checkpoints [flags]
    deepspeed --num_gpus=N --module databricks_llm.fine_tune --deepspeed_config=ds_configs/ds_zero_3_cpu_offloading.json [flags]
    torchrun --nproc_per_node=N databricks_llm/fine_tune.py [flags]     # a file path works too (Spark's distributors)

Every flag of transformers' TrainingArguments is accepted, plus the argument groups of
`databricks_llm.config`; run with --help for the list. Booleans take `--flag=true|false`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Any

if not __package__:  # run as a file: import this package, not its modules as top-level names
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import datasets  # noqa: E402

from databricks_llm import config as job_config  # noqa: E402
from databricks_llm import augment, data, logs, models, outputlock, runtime, summary, tracking  # noqa: E402
from databricks_llm.callbacks import MLflowLogger, SaveAtMinutes, StopOnSignal  # noqa: E402
from databricks_llm.config import JobConfig  # noqa: E402
from databricks_llm.errors import exit_code  # noqa: E402

log = logging.getLogger("databricks_llm.fine_tune")  # by name: this module also runs as __main__

# accelerate sets the thread count itself, as asked, and says so in every rank: not ours to act on.
warnings.filterwarnings("ignore", message="OMP_NUM_THREADS/MKL_NUM_THREADS unset", category=UserWarning,
                        module="accelerate.state")
# The step-0 evaluation (--eval_on_start) reads the learning rate before DeepSpeed's scheduler steps.
logging.getLogger("DeepSpeed").addFilter(lambda record: "scheduler before it has started" not in record.getMessage())

EXIT_SECONDS = 120  # after the job ends, or a signal, a stuck thread may hold the process this long at most
STOP = runtime.Stop(EXIT_SECONDS)


class FineTuneJob:
    """The job as a recipe (torchtune's shape): `prepare_data()`, then, inside the output folder's
    lock and the job's MLflow run, `setup()` -> `train()` -> `finish()`, then every rank leaves the
    process group together. `run()` does it all."""

    def __init__(self, config: JobConfig) -> None:
        self.config = config
        self.process = runtime.start(use_deepspeed=bool(config.job.deepspeed_config))
        report_to = [r for r in config.training.report_to if r not in ("mlflow", "tensorboard")]  # ours, below
        self.training = dataclasses.replace(config.training, deepspeed=config.job.deepspeed_config, report_to=report_to)

    def run(self) -> None:
        self.prepare_data()  # bad data is refused before anything is written
        lock = outputlock.hold(self.training.output_dir) if self.process.is_main else contextlib.nullcontext()
        with lock:
            if self.process.is_main:  # inside the lock: no other job is writing there
                job_config.quarantine_partial(self.training.output_dir)
            with tracking.job_run(self.config.tracking, self.process, output_dir=self.training.output_dir,
                                  run_name=self.training.run_name or tracking.default_run_name(self.config.model.model),
                                  resume=bool(self.training.resume_from_checkpoint),
                                  device=self.training.device) as run:
                self.setup(run)
                self.train()
                self.finish(run)
        runtime.leave()

    def prepare_data(self) -> None:
        """Tokenizer, the splits (capped by --max_*_samples), the task resolved against them, and
        their token ids; main process first."""
        settings, model = self.config.data, self.config.model
        datasets.disable_progress_bars()
        self.tokenizer = models.load_tokenizer(model.tokenizer, model.trust_remote_code)
        models.check_vocabulary(self.tokenizer, model.model, model.trust_remote_code)
        with self.training.main_process_first(desc="load and tokenize data"):
            self.splits, self.task = data.load(settings.dataset, self.config.task, seed=self.training.seed,
                                               validation_fraction=settings.validation_fraction)
            self.splits["train"] = data.head(self.splits["train"], settings.max_train_samples)
            if settings.augment_names:
                self.splits["train"], changed = augment.augment_names(self.splits["train"], self.task,
                                                                      settings.augment_names, self.training.seed)
                log.info(f"[data] --augment_names={settings.augment_names}: invented names in {changed} training rows"
                         + ("" if changed else " (the task has no open field found in its inputs)"))
            self.splits["validation"] = data.head(self.splits["validation"], settings.max_eval_samples)
            self.tokenized = data.tokenize_splits(self.splits, self.tokenizer, settings.max_seq_length, self.task)
        log.info(f"[data] {settings.dataset}: " + ", ".join(f"{k}={len(v)}" for k, v in self.splits.items()))
        task = self.task
        log.info(f"[task] {task.input_column} -> {task.output_column} as {task.output_format}; instruction: "
                 f"{task.instruction[:100]}{'...' if len(task.instruction) > 100 else ''}")

    def setup(self, run: tracking.JobRun | None) -> None:
        """The model (LoRA-wrapped unless a full fine-tune), the job's params, and the Trainer."""
        from databricks_llm.trainer import ExtractionTrainer

        settings, training = self.config.model, self.training
        frozen_dtype = models.half_dtype(training.bf16, training.fp16) if settings.use_lora else None
        attention = models.training_attention(settings.attn_implementation, training.bf16 or training.fp16,
                                              packed=bool(self.config.data.batch_tokens))
        model = models.load_model(settings.model, use_4bit=settings.use_4bit, dtype=frozen_dtype,
                                  trust_remote_code=settings.trust_remote_code, attn_implementation=attention)
        log.info(f"[model] attention: {model.config._attn_implementation}")
        if settings.use_lora:
            model = models.add_lora(model, r=settings.lora_r, alpha=settings.lora_alpha, dropout=settings.lora_dropout,
                                    target_modules=settings.lora_target_modules,
                                    gradient_checkpointing=training.gradient_checkpointing, use_4bit=settings.use_4bit)
        if run is not None and run.skip_until_step < 0:
            self._log_job(model)
        self.trainer = ExtractionTrainer(
            model=model, args=training, processing_class=self.tokenizer, train_dataset=self.tokenized["train"],
            eval_dataset=self.tokenized["validation"] if training.eval_strategy != "no" else None,
            data_collator=data.collator(model, self.tokenizer), callbacks=self._callbacks(run),
            generation_eval=self._generation_eval(), task=self.task, batch_tokens=self.config.data.batch_tokens,
        )

    def train(self) -> None:
        checkpoint = self.training.resume_from_checkpoint
        if checkpoint:
            step = json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"]
            log.info(f"[resume] continuing from {checkpoint} (step {step})")
        self.trainer.train(resume_from_checkpoint=checkpoint)

    def finish(self, run: tracking.JobRun | None) -> None:
        """The final model (all ranks take part in saving ZeRO-3 weights); rank 0 adds the tokenizer,
        the merged model if asked, and logs the final model and TensorBoard events to the run."""
        import mlflow

        path, job = self.config.job.final_model_output_path, self.config.job
        self.trainer.save_model(path)
        if not self.process.is_main:
            return
        self.tokenizer.save_pretrained(path)
        if self.config.model.use_lora and self.config.model.merge_adapter:
            self.task.save(models.merge_adapter(path))
        log.info(f"[done] final model in {path}")
        if run is not None:
            example = self.splits["validation"][0][data.INPUT]
            tracking.survive("logging the final model", lambda: tracking.log_model_folder(
                path, name="final_model", example=example, registered_model_name=job.registered_model_name))
            events = self.config.tracking.tensorboard_dir
            if Path(events).is_dir():
                tracking.survive("uploading TensorBoard events", lambda: mlflow.log_artifacts(events, "tensorboard"))
        summary.report(self, run.run_id if run is not None else None)

    def _generation_eval(self) -> Any:
        from transformers.integrations import is_deepspeed_zero3_enabled

        from databricks_llm.trainer import GenerationEval

        samples, training = self.config.data.eval_generation_samples, self.training
        if not samples or training.eval_strategy == "no":
            return None
        subset = data.head(self.splits["validation"].shuffle(seed=training.seed), samples)
        return GenerationEval(self.tokenizer, self.task, subset[data.INPUT], subset[data.OUTPUT],
                              batch_size=training.per_device_eval_batch_size, structured=self.config.data.structured_decoding,
                              synced_gpus=is_deepspeed_zero3_enabled() and self.process.world_size > 1)

    def _callbacks(self, run: tracking.JobRun | None) -> list:
        from transformers import EarlyStoppingCallback
        from transformers.integrations import TensorBoardCallback

        callbacks: list = [StopOnSignal(STOP)]
        if run is not None:
            callbacks.append(MLflowLogger(run.skip_until_step, self.config.tracking.log_checkpoints))
        if self.process.is_main and "tensorboard" in self.config.training.report_to:
            from torch.utils.tensorboard import SummaryWriter

            callbacks.append(TensorBoardCallback(tb_writer=SummaryWriter(self.config.tracking.tensorboard_dir)))
        if self.config.job.save_minutes:
            callbacks.append(SaveAtMinutes(self.config.job.minutes()))
        if self.config.job.early_stopping_patience:
            callbacks.append(EarlyStoppingCallback(early_stopping_patience=self.config.job.early_stopping_patience))
        return callbacks

    def _log_job(self, model: Any) -> None:
        """Params (training args, model and LoRA config, argument groups, data facts, process layout),
        tags and the train/validation splits as dataset inputs."""
        config, settings = self.config, self.config.tracking
        params = {**model.config.to_dict(), **self.training.to_dict(),
                  **{k: v for group in (config.data, config.model, config.job) for k, v in dataclasses.asdict(group).items()}}
        if hasattr(model, "peft_config"):
            params.update({f"lora_{k}": v for k, v in model.peft_config["default"].to_dict().items()})
        params.update({f"{k}_rows": len(v) for k, v in self.splits.items()}, world_size=self.process.world_size,
                      nodes=self.process.nodes)
        params.update(self.task.params())  # as resolved against the data (the flags' values may be unset)
        tracking.log_params(params, flatten=settings.flatten_params)
        tracking.set_tags(config.model.model, self.task, settings.tags)
        for split in ("train", "validation"):
            tracking.log_dataset(self.splits[split].to_pandas(), config.data.dataset, split)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: exit 2 with one line on bad input, before heavy work starts; SIGTERM and
    Ctrl-C end the run KILLED and release the output folder (`runtime.Stop`)."""
    STOP.install()
    logs.setup()
    return exit_code(lambda: FineTuneJob(job_config.parse(argv, __doc__.split("\n")[0])).run())


if __name__ == "__main__":
    code = 143  # what the SIGTERM handler exits with, should it fire
    try:
        code = main()
    finally:
        runtime.exit_within(EXIT_SECONDS, code)
    runtime.exit_process(code)

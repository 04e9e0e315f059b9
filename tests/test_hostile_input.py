"""Hostile input at every entry point, one table (docs/hostile-inputs.md lists it): each CLI case
exits 2 with one `error:` line naming the problem, no traceback, no secret printed, no RUNNING run,
and nothing new on disk (output folder, local store, run-id file, model-cache locks, current
folder); each request to the served model, in Python and over REST, is refused with MLflow's
INVALID_PARAMETER_VALUE and the reason as its message.

CLI cases run in-process, one after another, in two worker processes (`hostile_worker.py`: torch
and transformers imported once per worker, not once per case); the few that need a process of
their own (`isolated`) run as `python -m` subprocesses. Each test then checks one case's result.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import REPO, run_module
from databricks_llm import config

pytestmark = pytest.mark.slow
FINE_TUNE = "databricks_llm.fine_tune"
EVALUATE = "databricks_llm.evaluate"
DISTRIBUTED = "databricks_llm.distributed"
NOTEBOOK = "databricks_llm.notebook"
WORKER = Path(__file__).with_name("hostile_worker.py")
BASE = ["--model={model}", "--output_dir={out}", "--max_steps=2", "--max_train_samples=8", "--disable_tqdm=true"]


def base_with(flag: str) -> list[str]:
    """BASE with `flag` (`--name=value`) in place of its default there."""
    return [a for a in BASE if not a.startswith(flag.split("=")[0] + "=")] + [flag]
PASSWORD = "s3cretpass"


@dataclass
class Case:
    id: str
    args: list[str]
    message: str  # expected in the error line
    env: dict = field(default_factory=dict)
    setup: Callable[[Path, Path], None] | None = None  # (case folder, tiny model) -> files the case needs
    module: str = FINE_TUNE
    base: list[str] = field(default_factory=lambda: list(BASE))
    isolated: bool = False  # needs a process of its own (read at import time, signal handlers, ...)


def write(path: str, text: str) -> Callable[[Path, Path], None]:
    def setup(folder: Path, model: Path) -> None:
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_text(text)
    return setup


def copy_model(edit: Callable[[Path], None]) -> Callable[[Path, Path], None]:
    """The tiny model copied to <case>/model, then `edit`ed."""
    def setup(folder: Path, model: Path) -> None:
        import shutil

        shutil.copytree(model, folder / "model")
        edit(folder / "model")
    return setup


def truncate_weights(folder: Path) -> None:
    weights = folder / "model.safetensors"
    with weights.open("r+b") as f:
        f.truncate(weights.stat().st_size // 2)


def edit_config(**changes) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return edit


def stale_build_lock(folder: Path, model: Path) -> None:
    """DeepSpeed's config, and the lock a fused-Adam build killed 20 minutes ago left behind."""
    import os
    import time

    write("ds.json", json.dumps(DS))(folder, model)
    lock = folder / "extensions" / "py311_cpu" / "fused_adam" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    os.utime(lock, (time.time() - 20 * 60,) * 2)


def bigger_tokenizer(folder: Path, model: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.add_tokens([f"extra_token_{i}" for i in range(200)])
    tokenizer.save_pretrained(folder / "tokenizer")


def lora_checkpoint(r: int) -> Callable[[Path, Path], None]:
    """A complete-looking LoRA checkpoint of the tiny model with rank `r`."""
    def setup(folder: Path, model: Path) -> None:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        peft = get_peft_model(AutoModelForCausalLM.from_pretrained(model),
                              LoraConfig(r=r, target_modules="all-linear", task_type="CAUSAL_LM"))
        peft.save_pretrained(folder / "ckpt")
        (folder / "ckpt" / "trainer_state.json").write_text(json.dumps({"global_step": 1}))
    return setup


def wider_model_checkpoint(folder: Path, model: Path) -> None:
    """A full-model checkpoint of another architecture (a wider Llama)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model)
    config.hidden_size, config.intermediate_size = 64, 128
    AutoModelForCausalLM.from_config(config).save_pretrained(folder / "ckpt")
    (folder / "ckpt" / "trainer_state.json").write_text(json.dumps({"global_step": 1}))


def parquet(columns: dict) -> Callable[[Path, Path], None]:
    def setup(folder: Path, model: Path) -> None:
        import pandas as pd

        pd.DataFrame(columns).to_parquet(folder / "data.parquet")
    return setup


def existing_store(folder: Path, model: Path) -> None:
    import mlflow

    (folder / "out").mkdir()
    client = mlflow.MlflowClient(f"sqlite:///{folder / 'out' / 'mlflow.db'}")
    client.create_experiment("other")


def truncate_file(path: Path) -> None:
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size // 2)


def save_task(folder: Path) -> None:
    from databricks_llm.task import E2E

    E2E.save(folder)


def range_case(name: str, valid) -> Case:
    """--<name> just outside its valid range (or nan where it has no lower bound)."""
    bad = "nan" if valid.low is None else f"{valid.low - 1:g}" if not valid.low_open else f"{valid.low:g}"
    flag = f"--{name}={bad}"
    extra = ["--max_steps=-1"] if name == "num_train_epochs" else []
    return Case(f"range_{name}", extra, f"--{name}", base=base_with(flag))


DS = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"}
CASES = [
    # numeric ranges and finiteness of script and training flags
    Case("lora_r_zero", ["--lora_r=0"], "--lora_r must be > 0 (got 0)"),
    Case("lora_r_negative", ["--lora_r=-4"], "--lora_r must be > 0"),
    Case("lora_alpha_zero", ["--lora_alpha=0"], "--lora_alpha must be > 0"),
    Case("lora_dropout_one", ["--lora_dropout=1.0"], "--lora_dropout must be in [0, 1)"),
    Case("lora_dropout_nan", ["--lora_dropout=nan"], "--lora_dropout must be in [0, 1)"),
    Case("learning_rate_nan", ["--learning_rate=nan"], "--learning_rate must be > 0 (got nan)"),
    Case("learning_rate_negative", ["--learning_rate=-1e-4"], "--learning_rate must be > 0"),
    Case("learning_rate_inf", ["--learning_rate=inf"], "--learning_rate must be > 0 (got inf)"),
    Case("epochs_nan", ["--num_train_epochs=nan", "--max_steps=-1"], "--num_train_epochs must be >= 0 (got nan)"),
    Case("eval_generation_samples_negative", ["--eval_generation_samples=-5"], "--eval_generation_samples must be >= 0"),
    Case("max_train_samples_negative", ["--max_train_samples=-3"], "--max_train_samples must be > 0"),
    Case("max_eval_samples_negative", ["--max_eval_samples=-1"], "--max_eval_samples must be >= 0"),
    Case("validation_fraction_zero", ["--validation_fraction=0"], "--validation_fraction must be in (0, 1)"),
    Case("validation_fraction_above_one", ["--validation_fraction=1.5"], "--validation_fraction must be in (0, 1)"),
    Case("augment_names_above_one", ["--augment_names=1.5"], "--augment_names must be in [0, 1]"),
    Case("max_seq_length_zero", ["--max_seq_length=0"], "--max_seq_length must be > 0"),
    Case("save_minutes_not_a_number", ["--save_minutes=5,ten"], "--save_minutes takes positive numbers of minutes, comma-separated (got 'ten')"),
    Case("save_minutes_negative", ["--save_minutes=-5"], "--save_minutes takes positive numbers of minutes"),
    Case("weight_decay_negative", ["--weight_decay=-0.1"], "--weight_decay must be >= 0"),
    Case("adam_beta1_above_one", ["--adam_beta1=1.5"], "--adam_beta1 must be in [0, 1)"),
    Case("max_grad_norm_inf", ["--max_grad_norm=inf"], "--max_grad_norm must be >= 0 (got inf)"),
    Case("batch_size_zero", ["--per_device_train_batch_size=0"], "--per_device_train_batch_size must be > 0"),
    Case("eval_steps_negative", ["--eval_steps=-2"], "--eval_steps must be > 0"),
    # LoRA against PEFT, on the model built from its config without weights
    Case("lora_target_missing", ["--lora_target_modules=nonexistent_module"], "--lora_target_modules=nonexistent_module"),
    # integrations, DeepSpeed JSON
    Case("report_to_not_installed", ["--report_to=wandb"], "--report_to wandb: not installed"),
    Case("deepspeed_stage_7", ["--deepspeed_config={case}/ds.json"], "zero_optimization: stage",
         setup=write("ds.json", json.dumps({**DS, "zero_optimization": {"stage": 7}}))),
    Case("deepspeed_array", ["--deepspeed_config={case}/ds.json"], "must hold a JSON object, not a list",
         setup=write("ds.json", "[1, 2]")),
    Case("deepspeed_unknown_zero_key", ["--deepspeed_config={case}/ds.json"], "zero_optimization: no_such_key",
         setup=write("ds.json", json.dumps({**DS, "zero_optimization": {"stage": 2, "no_such_key": 1}}))),
    Case("deepspeed_micro_batch_contradicts", ["--deepspeed_config={case}/ds.json", "--per_device_train_batch_size=4"],
         "contradicts the flags: ds train_micro_batch_size_per_gpu=3 vs hf per_device_train_batch_size=4",
         setup=write("ds.json", json.dumps({**DS, "train_micro_batch_size_per_gpu": 3}))),
    Case("deepspeed_grad_accum_contradicts", ["--deepspeed_config={case}/ds.json"], "gradient_accumulation_steps=4",
         setup=write("ds.json", json.dumps({**DS, "gradient_accumulation_steps": 4}))),
    Case("deepspeed_op_build_lock_stale", ["--deepspeed_config={case}/ds.json"], "minutes old: a DeepSpeed op build was killed part-way",
         env={"TORCH_EXTENSIONS_DIR": "{case}/extensions"}, setup=stale_build_lock),
    # environment variables
    Case("mlflow_tags_not_json", [], "MLFLOW_TAGS='{bad' is not valid", env={"MLFLOW_TAGS": "{bad"}),
    Case("mlflow_tags_array", [], "must be a JSON object", env={"MLFLOW_TAGS": "[1, 2]"}),
    Case("async_buffering_not_a_number", [], "MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS='abc' is not valid",
         env={"MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS": "abc"}),
    Case("async_buffering_negative", [], "must be an integer > 0", env={"MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS": "-5"}),
    Case("http_timeout_not_int", [], "MLFLOW_HTTP_REQUEST_TIMEOUT='soon'", env={"MLFLOW_HTTP_REQUEST_TIMEOUT": "soon"}),
    Case("bool_env_unrecognised", [], "MLFLOW_NESTED_RUN='maybe' is not valid", env={"MLFLOW_NESTED_RUN": "maybe"}),
    Case("system_metrics_flag_unrecognised", [], "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING",
         env={"MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "perhaps"}),
    Case("run_id_missing_no_store", [], "MLFLOW_RUN_ID=0123456789abcdef: no such run",
         env={"MLFLOW_RUN_ID": "0123456789abcdef"}),
    Case("run_id_missing_in_store", [], "MLFLOW_RUN_ID=0123456789abcdef: no such run in the tracking store",
         env={"MLFLOW_RUN_ID": "0123456789abcdef"}, setup=existing_store),
    Case("tensorboard_dir_unwritable", [], "TENSORBOARD_LOGGING_DIR", env={"TENSORBOARD_LOGGING_DIR": "/proc/tb"}),
    Case("tracking_uri_with_password_unreachable", [], "MLflow tracking server http://user:***@127.0.0.1:9 is not reachable",
         env={"MLFLOW_TRACKING_URI": f"http://user:{PASSWORD}@127.0.0.1:9"}),
    # resume checkpoints against the model
    Case("resume_lora_rank_differs", ["--resume_from_checkpoint={case}/ckpt"], "lora_A.weight is [4, 64] there, [8, 64] here",
         setup=lora_checkpoint(4)),
    Case("resume_other_architecture", ["--resume_from_checkpoint={case}/ckpt", "--use_lora=false"], "does not fit --model",
         setup=wider_model_checkpoint),
    Case("resume_lora_checkpoint_full_job", ["--resume_from_checkpoint={case}/ckpt", "--use_lora=false"],
         "it was written with --use_lora=true", setup=lora_checkpoint(8)),
    # model folders, tokenizers, GGUF
    Case("weights_truncated", [], "model.safetensors is truncated", base=base_with("--model={case}/model"), setup=copy_model(truncate_weights)),
    Case("model_type_unknown", [], "unknown model_type 'no_such_arch'", base=base_with("--model={case}/model"), setup=copy_model(edit_config(model_type="no_such_arch"))),
    Case("config_not_json", [], "config.json is not valid JSON", base=base_with("--model={case}/model"), setup=copy_model(lambda f: (f / "config.json").write_text("{nope"))),
    Case("weights_missing", [], "has no weights", base=base_with("--model={case}/model"), setup=copy_model(lambda f: (f / "model.safetensors").unlink())),
    Case("weights_shard_missing", [], "names 1 missing weight file(s)", base=base_with("--model={case}/model"),
         setup=copy_model(lambda f: (f / "model.safetensors.index.json").write_text(
             json.dumps({"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}})))),
    Case("tokenizer_larger_than_embedding", ["--tokenizer={case}/tokenizer"], "embeds only", setup=bigger_tokenizer),
    Case("gguf_not_gguf", [], "is not a GGUF file", base=base_with("--model={case}/fake.gguf"), setup=write("fake.gguf", "not a gguf at all\n" * 10)),
    Case("model_is_a_device", [], "--model /dev/zero is not a regular file or folder",
         base=base_with("--model=/dev/zero")),
    # datasets
    Case("dataset_dev_zero", ["--dataset=/dev/zero"], "--dataset /dev/zero is not a regular file or folder"),
    Case("dataset_nested_input", ["--dataset={case}/data.parquet"], "input column ref must hold text, not a list",
         setup=parquet({"mr": ["name[A]"] * 8, "ref": [[1, 2]] * 8})),
    Case("input_column_unknown", ["--input_column=body"], "--input_column=body is not a column of dataset embedded:e2e-sample"),
    Case("instruction_file_missing", ["--instruction=@{case}/missing.txt"], "missing.txt: no such file"),
    Case("attention_unknown", ["--attn_implementation=flash"], "--attn_implementation"),
    Case("output_format_unknown", ["--output_format=xml"], "--output_format must be one of json, slots, text (got xml)"),
    Case("targets_not_json", ["--dataset={case}/data.parquet", "--output_format=json"], "target is not a JSON object",
         setup=parquet({"prompt": ["a ticket"] * 8, "completion": ["severity: high"] * 8})),
    # output paths
    Case("output_dir_empty", [], "--output_dir is empty", base=base_with("--output_dir=")),
    Case("output_dir_name_too_long", [], "is longer than the 255 bytes", base=base_with("--output_dir={case}/" + "x" * 300)),
    Case("output_dir_under_a_file", [], "is a file, not a folder", base=base_with("--output_dir={case}/file/out"), setup=write("file", "keep")),
    # evaluate and the Spark launcher
    Case("evaluate_max_tokens_huge", ["--max_tokens=100000"], "--max_tokens must be an integer in 1..512 (got 100000)",
         module=EVALUATE, base=["--job_dir={out}", "--model_uri={model}"]),
    Case("evaluate_model_missing", ["--model_uri={case}/missing-model"], "does not exist", module=EVALUATE,
         base=["--job_dir={out}"]),
    Case("evaluate_job_dir_empty", ["--job_dir="], "--job_dir is empty", module=EVALUATE, base=["--model_uri={model}"]),
    Case("evaluate_batch_size_zero", ["--batch_size=0"], "--batch_size must be > 0", module=EVALUATE,
         base=["--job_dir={out}", "--model_uri={model}"]),
    Case("evaluate_split_unknown", ["--output_json={case}/s.json", "--model_uri={model}", "--job_dir={out}"],
         "--split must be", module=EVALUATE, base=["--split=maybe"]),
    Case("distributed_local_mode_unrecognised", ["--local_mode=perhaps"], "argument --local_mode", module=DISTRIBUTED,
         base=[]),
    Case("distributed_processes_zero", ["--num_processes=0"], "--num_processes must be > 0", module=DISTRIBUTED, base=[]),
    # abbreviated and unknown flags, every CLI
    Case("abbreviated_learning_rate", ["--learning_rat=0.1"], "unknown flag --learning_rat=0.1"),
    Case("abbreviated_lora_r", ["--lora=4"], "unknown flag --lora=4"),
    Case("abbreviated_bool", ["--use_lo=false"], "unknown flag --use_lo=false"),
    Case("abbreviated_separate_value", ["--per_device_train", "4"], "unknown flag --per_device_train 4"),
    Case("dashed_abbreviation", ["--learning-rat=0.1"], "unknown flag --learning-rat=0.1"),
    Case("unknown_flag", ["--no_such_flag=1"], "unknown flag --no_such_flag=1"),
    Case("positional_argument", ["stray"], "unknown flag stray"),
    Case("single_dash_flag", ["-x"], "unknown flag -x"),
    Case("evaluate_abbreviated", ["--max_sampl=3"], "unknown flag --max_sampl=3", module=EVALUATE, base=["--job_dir={out}"]),
    Case("evaluate_unknown_flag", ["--learning_rate=0.1"], "unknown flag --learning_rate=0.1", module=EVALUATE,
         base=["--job_dir={out}"]),
    Case("distributed_abbreviated", ["--num_proc=2"], "unknown flag --num_proc=2", module=DISTRIBUTED, base=[]),
    Case("distributed_unknown_flag", ["--max_steps=2"], "unknown flag --max_steps=2", module=DISTRIBUTED, base=[]),
    Case("distributed_job_abbreviated", ["--num_processes=1", "--", "--learning_rat=0.1", "--output_dir={out}"],
         "unknown flag --learning_rat=0.1", module=DISTRIBUTED, base=[]),
    Case("distributed_job_bad_range", ["--num_processes=1", "--", "--lora_r=0", "--output_dir={out}"],
         "--lora_r must be > 0", module=DISTRIBUTED, base=[]),
    Case("distributed_nnodes_not_dividing", ["--num_processes=3", "--nnodes=2"], "must be a positive multiple of --nnodes",
         module=DISTRIBUTED, base=[]),
    Case("distributed_use_gpu_unrecognised", ["--use_gpu=perhaps"], "argument --use_gpu", module=DISTRIBUTED, base=[]),
    Case("notebook_abbreviated", ["--prof=ci"], "unknown flag --prof=ci", module=NOTEBOOK, base=[]),
    Case("notebook_unknown_flag", ["--max_steps=2"], "unknown flag --max_steps=2", module=NOTEBOOK, base=[]),
    Case("notebook_profile_unknown", ["--profile=huge"], "argument --profile: invalid choice: 'huge'", module=NOTEBOOK, base=[]),
    Case("notebook_output_under_a_file", ["--output={case}/file/nb", "--work_dir={case}/work"], "is a file, not a folder",
         module=NOTEBOOK, base=[], setup=write("file", "keep")),
    Case("notebook_work_dir_unwritable", ["--output={case}/nb", "--work_dir=/proc/work"], "--work_dir /proc/work",
         module=NOTEBOOK, base=[]),
    Case("notebook_work_dir_in_use", ["--output={case}/nb", "--work_dir={case}/work"], "is in use by another job",
         module=NOTEBOOK, base=[], setup=write("work/checkpoints/.databricks_llm.lock",
                                                json.dumps({"pid": 1, "host": socket.gethostname(), "started": "x"}))),
    # the output folder's lock, the registry name, network targets
    Case("lock_file_hand_edited", [], "is not a lock a job wrote (pid 'abc')",
         setup=write("out/.databricks_llm.lock", json.dumps({"pid": "abc", "host": "h"}))),
    Case("lock_file_pid_list", [], "is not a lock a job wrote", setup=write("out/.databricks_llm.lock", json.dumps({"pid": [1]}))),
    Case("registered_model_name_slash", ["--registered_model_name=team/model"], "'team/model' is not a valid model name"),
    Case("registered_model_name_colon", ["--registered_model_name=a:b"], "Names cannot contain '/' or ':'"),
    Case("registered_model_name_blank", ["--registered_model_name= "], "is not a valid model name"),
    Case("registered_model_name_too_long", ["--registered_model_name=" + "m" * 300], "at most 256 characters"),
    Case("databricks_host_closed_port", [], "Databricks host (DATABRICKS_HOST) http://127.0.0.1:9 is not reachable",
         env={"DATABRICKS_HOST": "http://127.0.0.1:9", "DATABRICKS_TOKEN": "dapi-hostile-token-0001"}),
    Case("registry_uri_closed_port", [], "MLflow tracking server http://127.0.0.1:9 is not reachable",
         env={"MLFLOW_REGISTRY_URI": "http://127.0.0.1:9"}),
    Case("tracking_uri_closed_port_with_token", [], "MLflow tracking server http://***@127.0.0.1:9 is not reachable",
         env={"MLFLOW_TRACKING_URI": f"http://{PASSWORD}@127.0.0.1:9"}),
    Case("evaluate_databricks_host_closed_port", [], "Databricks host (DATABRICKS_HOST) http://127.0.0.1:9",
         env={"DATABRICKS_HOST": "http://127.0.0.1:9", "DATABRICKS_TOKEN": "dapi-hostile-token-0001"},
         module=EVALUATE, base=["--job_dir={out}", "--model_uri={model}"]),
    Case("resume_true_without_checkpoints", ["--resume_from_checkpoint=true"], "holds no complete checkpoint"),
    Case("resume_path_missing", ["--resume_from_checkpoint={case}/nope"], "is not a complete checkpoint"),
    # evaluate, held to fine_tune's standard
    Case("evaluate_garbage_runs_uri", ["--model_uri=runs:/garbage/model"], "no tracking store at", module=EVALUATE,
         base=["--job_dir={out}"]),
    Case("evaluate_garbage_models_uri", ["--model_uri=models:/nope/1"], "no tracking store at", module=EVALUATE,
         base=["--job_dir={out}"]),
    Case("evaluate_garbage_runs_uri_in_store", ["--model_uri=runs:/0123456789abcdef/model"], "cannot load runs:/0123456789abcdef",
         module=EVALUATE, base=["--job_dir={case}/out"], setup=existing_store),
    Case("evaluate_not_a_hub_id", ["--model_uri=::garbage::"], "is neither an existing path nor a hub id", module=EVALUATE,
         base=["--job_dir={out}"]),
    Case("evaluate_compare_run_without_store", ["--compare_run=abc"], "abc: no tracking store at", module=EVALUATE,
         base=["--job_dir={out}"]),
    Case("evaluate_adapter_truncated", ["--model_uri={case}/ckpt"], "adapter_model.safetensors is truncated", module=EVALUATE,
         base=["--job_dir={out}"], setup=lambda folder, model: (lora_checkpoint(4)(folder, model),
                                                                truncate_file(folder / "ckpt" / "adapter_model.safetensors"))),
    Case("evaluate_adapter_config_not_json", ["--model_uri={case}/ckpt"], "adapter_config.json is not readable JSON",
         module=EVALUATE, base=["--job_dir={out}"], setup=lambda folder, model: (
             lora_checkpoint(4)(folder, model), (folder / "ckpt" / "adapter_config.json").write_text("{"))),
    Case("evaluate_adapter_weights_missing", ["--model_uri={case}/ckpt"], "has no weights", module=EVALUATE,
         base=["--job_dir={out}"], setup=lambda folder, model: (
             lora_checkpoint(4)(folder, model), (folder / "ckpt" / "adapter_model.safetensors").unlink())),
    Case("evaluate_weights_truncated", [], "model.safetensors is truncated", module=EVALUATE,
         base=["--job_dir={out}", "--model_uri={case}/model"], setup=copy_model(truncate_weights)),
    Case("evaluate_output_format_differs", ["--output_format=json"], "but {case}/model was trained for slots",
         module=EVALUATE, base=["--job_dir={out}", "--model_uri={case}/model"], setup=copy_model(save_task)),
    Case("evaluate_output_format_unknown", ["--output_format=xml"], "--output_format must be one of", module=EVALUATE,
         base=["--job_dir={out}", "--model_uri={model}"]),
    Case("evaluate_output_json_unwritable", ["--output_json=/proc/scores.json"], "--output_json /proc/scores.json",
         module=EVALUATE, base=["--job_dir={out}", "--model_uri={model}"]),
    Case("evaluate_output_json_is_a_folder", ["--output_json={case}"], "is a folder, not a file", module=EVALUATE,
         base=["--job_dir={out}", "--model_uri={model}"]),
    Case("evaluate_output_json_under_a_file", ["--output_json={case}/file/s.json"], "is a file, not a folder",
         module=EVALUATE, base=["--job_dir={out}", "--model_uri={model}"], setup=write("file", "keep")),
    Case("evaluate_output_json_empty", ["--output_json="], "--output_json is empty", module=EVALUATE,
         base=["--job_dir={out}", "--model_uri={model}"]),
    Case("evaluate_register_best_without_compare", ["--register_best=m"], "--register_best needs --compare_run",
         module=EVALUATE, base=["--job_dir={out}", "--model_uri={model}"]),
    Case("evaluate_register_best_bad_name", ["--compare_run=abc", "--register_best=a/b"], "'a/b' is not a valid model name",
         module=EVALUATE, base=["--job_dir={out}"]),
    Case("evaluate_dtype_unknown", ["--dtype=float8"], "--dtype must be one of", module=EVALUATE,
         base=["--job_dir={out}", "--model_uri={model}"]),
    Case("evaluate_max_tokens_zero", ["--max_tokens=0"], "--max_tokens must be an integer in 1..512", module=EVALUATE,
         base=["--job_dir={out}", "--model_uri={model}"]),
    Case("evaluate_max_tokens_float", ["--max_tokens=2.5"], "argument --max_tokens", module=EVALUATE,
         base=["--job_dir={out}", "--model_uri={model}"]),
    Case("evaluate_max_samples_negative", ["--max_samples=-1"], "--max_samples must be >= 0", module=EVALUATE,
         base=["--job_dir={out}", "--model_uri={model}"]),
    Case("evaluate_structured_decoding_unrecognised", ["--structured_decoding=maybe"], "argument --structured_decoding",
         module=EVALUATE, base=["--job_dir={out}", "--model_uri={model}"]),
    Case("evaluate_dataset_missing", ["--dataset={case}/missing.csv"], "missing.csv", module=EVALUATE,
         base=["--job_dir={out}", "--model_uri={model}"]),
    Case("evaluate_dataset_dev_zero", ["--dataset=/dev/zero"], "/dev/zero is not a regular file or folder", module=EVALUATE,
         base=["--job_dir={out}", "--model_uri={model}"]),
    Case("evaluate_job_dir_under_a_file", ["--job_dir={case}/file/job"], "is a file, not a folder", module=EVALUATE,
         base=["--model_uri={model}"], setup=write("file", "keep")),
    Case("evaluate_model_is_a_device", ["--model_uri=/dev/zero"], "/dev/zero is not a regular file or folder",
         module=EVALUATE, base=["--job_dir={out}"]),
    Case("evaluate_gguf_not_gguf", ["--model_uri={case}/fake.gguf"], "is not a GGUF file", module=EVALUATE,
         base=["--job_dir={out}"], setup=write("fake.gguf", "not a gguf at all\n" * 10)),
    Case("evaluate_mlflow_tags_not_json", [], "MLFLOW_TAGS='{bad' is not valid", env={"MLFLOW_TAGS": "{bad"},
         module=EVALUATE, base=["--job_dir={out}", "--model_uri={model}"]),
    Case("evaluate_tracking_uri_with_password_unreachable", [], "http://user:***@127.0.0.1:9 is not reachable",
         env={"MLFLOW_TRACKING_URI": f"http://user:{PASSWORD}@127.0.0.1:9"}, module=EVALUATE,
         base=["--job_dir={out}", "--model_uri={model}"]),
    # a secret in a path: refused without its value printed
    Case("secret_in_dataset_path", ["--dataset={case}/" + PASSWORD + "/missing.csv"], "***/missing.csv",
         env={"MY_SERVICE_PASSWORD": PASSWORD}),
    *[range_case(name, valid) for name, valid in config.RANGES.items()],
]


def snapshot(folder: Path) -> set[tuple[str, int, int]]:
    """Every path under `folder`, with size and mtime for files (a lock taken and given back leaves
    its folder's mtime changed, and nothing else)."""
    return {(str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else
            (str(p.relative_to(folder)), -1, 0) for p in folder.rglob("*")}


def running_runs(folder: Path) -> list[str]:
    import mlflow

    found = []
    for store in folder.rglob("mlflow.db"):
        client = mlflow.MlflowClient(f"sqlite:///{store}")
        experiments = [e.experiment_id for e in client.search_experiments()]
        found += [r.info.run_id for r in client.search_runs(experiments) if r.info.status == "RUNNING"]
    return found


def prepare(case: Case, folder: Path, model: Path) -> dict:
    """The case's files, and how to run it: {id, module, args, env, cwd}."""
    (folder / "cwd").mkdir()
    if case.setup:
        case.setup(folder, model)
    values = {"model": model, "out": folder / "out", "case": folder}
    args = [a.format(**values) for a in case.base + case.args]
    env = {"DATABRICKS_LLM_CACHE": str(folder / "cache"),
           **{name: value.replace("{case}", str(folder)) for name, value in case.env.items()}}
    return {"id": case.id, "module": case.module, "args": args, "env": env, "cwd": str(folder / "cwd")}


def run_isolated(run: dict) -> dict:
    result = run_module(run["module"], *run["args"], cwd=Path(run["cwd"]), env=run["env"], timeout=300)
    return {"returncode": result.returncode, "stdout": result.stdout, "stderr": result.stderr}


def run_in_workers(runs: list[dict], folder: Path, workers: int = 2) -> dict:
    """The cases in `workers` processes of `hostile_worker.py`, each running its share in-process."""
    shares = [runs[i::workers] for i in range(workers)]
    processes = []
    for i, share in enumerate(s for s in shares if s):
        (folder / f"cases-{i}.json").write_text(json.dumps(share))
        processes.append((subprocess.Popen(
            [sys.executable, str(WORKER), str(folder / f"cases-{i}.json"), str(folder / f"results-{i}.json")],
            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(WORKER.parent)])},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), folder / f"results-{i}.json"))
    results = {}
    for process, path in processes:
        output, _ = process.communicate(timeout=1800)
        assert process.returncode == 0, output[-3000:]
        results.update(json.loads(path.read_text()))
    return results


@pytest.fixture(scope="module")
def results(request, tiny_model, tmp_path_factory) -> dict:
    """Run the selected cases (all, or those picked with -k): in-process in two workers, the
    isolated ones as subprocesses, two at a time."""
    selected = [item.callspec.params["case"] for item in request.session.items
                if isinstance(getattr(getattr(item, "callspec", None), "params", {}).get("case"), Case)]
    folders = {case.id: tmp_path_factory.mktemp(case.id) for case in selected}
    runs = {case.id: prepare(case, folders[case.id], tiny_model) for case in selected}
    before = {name: snapshot(folder) for name, folder in folders.items()}
    isolated = [case.id for case in selected if case.isolated]
    with ThreadPoolExecutor(max_workers=2) as pool:
        done = dict(zip(isolated, pool.map(lambda name: run_isolated(runs[name]), isolated)))
    done.update(run_in_workers([runs[c.id] for c in selected if not c.isolated], tmp_path_factory.mktemp("workers")))
    return {name: (done[name], before[name], snapshot(folders[name]), folders[name]) for name in runs}


def test_the_table_has_at_least_200_cases_with_unique_ids():
    ids = [c.id for c in CASES] + [f"python_{r.id}" for r in REQUESTS] + [f"rest_{r.id}" for r in REQUESTS]
    assert len(ids) >= 200 and len(set(ids)) == len(ids)


def test_the_document_lists_every_case():
    assert markdown_table() in (REPO / "docs" / "hostile-inputs.md").read_text()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input_is_refused_in_one_line_and_leaves_nothing(results, case):
    result, before, after, folder = results[case.id]
    stderr, stdout = result["stderr"], result["stdout"]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert result["returncode"] == 2, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert [line for line in lines if line.startswith("error:")] == [lines[-1]], stderr[-3000:]
    assert case.message.replace("{case}", str(folder)) in lines[-1], lines[-1]
    assert PASSWORD not in stdout + stderr and "dapi-hostile-token-0001" not in stdout + stderr
    assert after == before, f"written: {sorted(after - before)[:5]}"
    assert not running_runs(folder)


@dataclass
class Request:
    """A request to the served model: rows (`dataframe_records`) and params; the reason expected
    in the refusal (`rest_message` where MLflow's own schema check answers first over REST)."""

    id: str
    rows: list
    message: str
    params: dict | None = None
    rest_message: str | None = None


NAN, INF = float("nan"), float("inf")
REQUESTS = [
    Request("prompt_missing", [{"temperature": 0.4}], "'prompt' is required", rest_message="prompt"),
    Request("prompt_blank", [{"prompt": "   "}], "must be a non-empty string"),
    Request("prompt_empty", [{"prompt": ""}], "must be a non-empty string"),
    Request("prompt_null", [{"prompt": None}], "'prompt' is required", rest_message="prompt"),
    Request("prompt_second_row_missing", [{"prompt": "a"}, {"max_tokens": 4}], "row 1: 'prompt' is required",
            rest_message="prompt"),
    Request("max_tokens_zero", [{"prompt": "a", "max_tokens": 0}], "row 0: max_tokens must be an integer in 1..512 (got 0)"),
    Request("max_tokens_negative", [{"prompt": "a", "max_tokens": -5}], "max_tokens must be an integer in 1..512"),
    Request("max_tokens_above_cap", [{"prompt": "a", "max_tokens": 513}], "max_tokens must be an integer in 1..512 (got 513)"),
    Request("max_tokens_huge", [{"prompt": "a", "max_tokens": 10 ** 12}], "max_tokens must be an integer in 1..512"),
    Request("max_tokens_fraction", [{"prompt": "a", "max_tokens": 10.5}], "max_tokens must be an integer in 1..512 (got 10.5)"),
    Request("max_tokens_string", [{"prompt": "a", "max_tokens": "12"}], "max_tokens must be a JSON number (got '12')"),
    Request("max_tokens_bool", [{"prompt": "a", "max_tokens": True}], "max_tokens must be a JSON number (got True)"),
    Request("max_tokens_nan", [{"prompt": "a", "max_tokens": NAN}], "max_tokens must be an integer in 1..512 (got nan)"),
    Request("max_tokens_inf", [{"prompt": "a", "max_tokens": INF}], "max_tokens must be an integer in 1..512 (got inf)"),
    Request("max_tokens_list", [{"prompt": "a", "max_tokens": [4]}], "max_tokens must be a JSON number"),
    Request("max_tokens_second_row", [{"prompt": "a", "max_tokens": 4}, {"prompt": "b", "max_tokens": 0}],
            "row 1: max_tokens must be an integer"),
    Request("temperature_negative", [{"prompt": "a", "temperature": -0.1}], "row 0: temperature must be a finite number"),
    Request("temperature_nan", [{"prompt": "a", "temperature": NAN}], "temperature must be a finite number, 0 (greedy) or in 0.001..10 (got nan)"),
    Request("temperature_inf", [{"prompt": "a", "temperature": INF}], "(got inf)"),
    Request("temperature_huge", [{"prompt": "a", "temperature": 1e300}], "in 0.001..10 (got 1e+300)"),
    Request("temperature_above_cap", [{"prompt": "a", "temperature": 10.5}], "in 0.001..10 (got 10.5)"),
    Request("temperature_tiny", [{"prompt": "a", "temperature": 1e-300}], "in 0.001..10 (got 1e-300)"),
    Request("temperature_string", [{"prompt": "a", "temperature": "hot"}], "temperature must be a JSON number (got 'hot')"),
    Request("temperature_numeric_string", [{"prompt": "a", "temperature": "0.5"}], "temperature must be a JSON number (got '0.5')"),
    Request("temperature_bool", [{"prompt": "a", "temperature": True}], "temperature must be a JSON number (got True)"),
    Request("temperature_dict", [{"prompt": "a", "temperature": {"t": 1}}], "temperature must be a JSON number"),
    Request("structured_false_string", [{"prompt": "a", "structured_decoding": "false"}],
            "structured_decoding must be a JSON boolean, true or false (got 'false')"),
    Request("structured_no_string", [{"prompt": "a", "structured_decoding": "no"}], "structured_decoding must be a JSON boolean"),
    Request("structured_maybe", [{"prompt": "a", "structured_decoding": "maybe"}], "structured_decoding must be a JSON boolean"),
    Request("structured_true_string", [{"prompt": "a", "structured_decoding": "true"}], "structured_decoding must be a JSON boolean"),
    Request("structured_zero", [{"prompt": "a", "structured_decoding": 0}], "structured_decoding must be a JSON boolean, true or false (got 0)"),
    Request("structured_one", [{"prompt": "a", "structured_decoding": 1}], "structured_decoding must be a JSON boolean, true or false (got 1)"),
    Request("structured_empty_string", [{"prompt": "a", "structured_decoding": ""}], "structured_decoding must be a JSON boolean"),
    Request("params_temperature_nan", [{"prompt": "a"}], "temperature must be a finite number", params={"temperature": NAN}),
    Request("params_temperature_huge", [{"prompt": "a"}], "in 0.001..10 (got 1000000.0)", params={"temperature": 1e6}),
    Request("params_temperature_negative", [{"prompt": "a"}], "temperature must be a finite number", params={"temperature": -1.0}),
    Request("params_max_tokens_zero", [{"prompt": "a"}], "max_tokens must be an integer in 1..512 (got 0)", params={"max_tokens": 0}),
    Request("params_max_tokens_fraction", [{"prompt": "a"}], "params: max_tokens must be an integer", params={"max_tokens": 10.5},
            rest_message="Can not safely convert"),
    Request("params_max_tokens_string", [{"prompt": "a"}], "params: max_tokens must be a JSON number", params={"max_tokens": "12"},
            rest_message="Can not safely convert"),
    Request("params_structured_false_string", [{"prompt": "a"}], "params: structured_decoding must be a JSON boolean",
            params={"structured_decoding": "false"}, rest_message="Can not safely convert"),
]


def markdown_table() -> str:
    """The table of docs/hostile-inputs.md: every case, its entry point and the expected refusal."""
    entries = {FINE_TUNE: "fine_tune", EVALUATE: "evaluate", DISTRIBUTED: "distributed", NOTEBOOK: "notebook runner"}
    rows = [(c.id, entries[c.module], " ".join([*c.args, *(f"{k}={v}" for k, v in c.env.items())])
             + (" (+ files the case makes)" if c.setup else ""), c.message) for c in CASES]
    for entry in ("pyfunc (Python)", "REST"):
        for r in REQUESTS:
            shown = json.dumps({"dataframe_records": r.rows, **({"params": r.params} if r.params else {})})
            message = r.rest_message if entry == "REST" and r.rest_message else r.message
            rows.append((("python_" if entry.startswith("pyfunc") else "rest_") + r.id, entry, shown, message))
    cell = lambda text: str(text).replace("|", "\\|").replace("\n", " ")[:120]  # noqa: E731
    lines = ["| case | entry point | input | expected refusal (in the `error:` line / response message) |",
             "|---|---|---|---|"]
    lines += [f"| {' | '.join(cell(v) if i != 2 else f'`{cell(v)}`' for i, v in enumerate(row))} |" for row in rows]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def served(tiny_model):
    """The pyfunc model on the tiny model, called as MLflow calls it."""
    from types import SimpleNamespace

    from databricks_llm.pyfunc import CompletionModel

    model = CompletionModel()
    model.load_context(SimpleNamespace(artifacts={"model": str(tiny_model)}))
    return model


@pytest.mark.parametrize("request_", REQUESTS, ids=[r.id for r in REQUESTS])
def test_python_request_is_refused_as_invalid_parameter_with_the_reason(served, request_):
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException) as refused:
        served.predict(None, request_.rows, params=request_.params)
    assert refused.value.error_code == "INVALID_PARAMETER_VALUE"
    assert request_.message in refused.value.message


@pytest.fixture(scope="module")
def rest(trained_job, tmp_path_factory):
    """`mlflow models serve` of the shared trained job's final model: its /invocations URL."""
    from conftest import MLFLOW, free_port, stop, wait_for

    port, log = free_port(), tmp_path_factory.mktemp("serve") / "serve.log"
    process = subprocess.Popen(
        [MLFLOW, "models", "serve", "-m", f"runs:/{trained_job.run_id}/final_model", "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port)], stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "MLFLOW_TRACKING_URI": trained_job.store,
             "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"})  # it execs uvicorn
    try:
        wait_for(f"http://127.0.0.1:{port}/ping", process, seconds=300)
        yield f"http://127.0.0.1:{port}/invocations"
    finally:
        stop(process)


def post(url: str, body: dict) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_rest_answers_a_good_request(rest):
    status, answer = post(rest, {"dataframe_records": [{"prompt": "Aromi is a pub.", "max_tokens": 4, "structured_decoding": False}]})
    assert status == 200 and len(answer["predictions"]) == 1


@pytest.mark.parametrize("request_", REQUESTS, ids=[r.id for r in REQUESTS])
def test_rest_request_is_refused_with_the_reason_as_its_message(rest, request_):
    body = {"dataframe_records": request_.rows, **({"params": request_.params} if request_.params else {})}
    status, answer = post(rest, body)
    assert status == 400, answer
    assert (request_.rest_message or request_.message) in answer["message"], answer["message"][-2000:]
    assert "Encountered an unexpected error" not in answer["message"]

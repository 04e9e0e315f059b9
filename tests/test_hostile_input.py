"""Hostile input, each case a real `python -m` subprocess: exit code 2, one `error:` line naming the
problem, no traceback, no secret printed, no RUNNING run, and nothing new on disk (output folder,
local store, run-id file, model-cache locks, current folder).

All cases run once, two at a time, in a module fixture (each subprocess imports torch and
transformers); each test then checks one case's result.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import run_module

pytestmark = pytest.mark.slow
FINE_TUNE = "databricks_llm.fine_tune"
EVALUATE = "databricks_llm.evaluate"
DISTRIBUTED = "databricks_llm.distributed"
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
    Case("deepspeed_op_build_lock_stale", ["--deepspeed_config={case}/ds.json"], "fused_adam/lock is 20 minutes old",
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
    Case("tracking_uri_with_password_unreachable", [], "MLflow tracking at http://user:***@127.0.0.1:9 is not usable",
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
    Case("output_format_unknown", ["--output_format=xml"], "--output_format must be one of slots, json, text (got xml)"),
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


def run_case(case: Case, folder: Path, model: Path) -> tuple[subprocess.CompletedProcess, set, set]:
    (folder / "cwd").mkdir()
    if case.setup:
        case.setup(folder, model)
    values = {"model": model, "out": folder / "out", "case": folder}
    args = [a.format(**values) for a in case.base + case.args]
    before = snapshot(folder)
    env = {"DATABRICKS_LLM_CACHE": str(folder / "cache"),
           **{name: value.replace("{case}", str(folder)) for name, value in case.env.items()}}
    result = run_module(case.module, *args, cwd=folder / "cwd", env=env, timeout=300)
    return result, before, snapshot(folder)


@pytest.fixture(scope="module")
def results(request, tiny_model, tmp_path_factory) -> dict:
    """Run the selected cases (all, or those picked with -k), two at a time."""
    selected = [item.callspec.params["case"] for item in request.session.items
                if "case" in getattr(getattr(item, "callspec", None), "params", {})]
    folders = {case.id: tmp_path_factory.mktemp(case.id) for case in selected}
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {case.id: pool.submit(run_case, case, folders[case.id], tiny_model) for case in selected}
        return {name: (future.result(), folders[name]) for name, future in futures.items()}


def test_the_table_has_at_least_40_cases():
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input_is_refused_in_one_line_and_leaves_nothing(results, case):
    (result, before, after), folder = results[case.id]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert [line for line in lines if line.startswith("error:")] == [lines[-1]], result.stderr[-3000:]
    assert case.message in lines[-1], lines[-1]
    assert PASSWORD not in result.stdout + result.stderr
    assert after == before, f"written: {sorted(after - before)[:5]}"
    assert not running_runs(folder)

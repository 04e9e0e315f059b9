"""The `deepspeed` launcher runs the module unchanged on CPU, with 1 and 2 ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, run_module

pytestmark = pytest.mark.slow
DEEPSPEED = [str(Path(sys.executable).parent / "deepspeed")]
FLAGS = ["--max_train_samples=16", "--num_train_epochs=1", "--per_device_train_batch_size=2", "--save_steps=100",
         "--eval_strategy=no", "--logging_steps=1", "--disable_tqdm=true"]


def launch(num_gpus: int, config: str, model: Path, out: Path, *flags: str):
    result = run_module(f"--num_gpus={num_gpus}", "--module", "databricks_llm.fine_tune",
                        f"--deepspeed_config={REPO / 'ds_configs' / config}", f"--model={model}",
                        f"--output_dir={out}", *FLAGS, *flags, launcher=DEEPSPEED, cwd=REPO, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def global_step(out: Path) -> int:
    return json.loads(next(out.glob("checkpoint-*/trainer_state.json")).read_text())["global_step"]


def test_one_rank_zero2_trains_on_all_batches(tiny_model, tmp_path):
    launch(1, "ds_zero_2.json", tiny_model, tmp_path)
    assert global_step(tmp_path) == 8  # 16 rows / batch 2
    assert (tmp_path / "final_model" / "adapter_model.safetensors").exists()


def test_two_ranks_zero3_offload_split_the_data_and_one_rank_writes(tiny_model, tmp_path):
    result = launch(2, "ds_zero_3_cpu_offloading.json", tiny_model, tmp_path, "--use_lora=false")
    assert global_step(tmp_path) == 4  # each rank sees half: 16 rows / (2 ranks x batch 2)
    assert result.stdout.count("'loss':") == 4  # one rank logs
    assert result.stdout.count("[done] final model") == 1
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "final_model")  # gathered, not sharded
    assert all(p.numel() > 0 for p in model.parameters())


def test_two_rank_job_makes_exactly_one_mlflow_run_with_real_weights(tiny_model, tmp_path):
    import mlflow
    import torch
    from transformers import AutoModelForCausalLM

    launch(2, "ds_zero_3.json", tiny_model, tmp_path, "--use_lora=false", "--save_steps=2")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.info.status == "FINISHED"
    models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    assert sorted(m.name for m in models) == ["checkpoint-2", "checkpoint-4", "final_model"]
    served = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/checkpoint-4").unwrap_python_model().model
    original = AutoModelForCausalLM.from_pretrained(tiny_model)
    trained = dict(served.named_parameters())
    assert all(trained[name].shape == p.shape for name, p in original.named_parameters())
    assert not torch.equal(trained["model.layers.0.mlp.up_proj.weight"], original.model.layers[0].mlp.up_proj.weight)


@pytest.mark.parametrize("world_size", [None, "2"])
def test_a_process_ends_with_its_code_after_its_exit_handlers_rank_or_not(world_size):
    env = {k: v for k, v in os.environ.items() if k != "WORLD_SIZE"} | ({"WORLD_SIZE": world_size} if world_size else {})
    code = "import atexit; from databricks_llm import runtime; atexit.register(print, 'handlers ran'); runtime.exit_process(3)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stdout.strip()) == (3, "handlers ran")

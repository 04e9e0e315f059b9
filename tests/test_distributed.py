"""Spark scale-out: TorchDistributor and DeepspeedTorchDistributor run fine_tune.py as a file, one MLflow run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlflow
import pytest

from conftest import REPO, run_module, start_mlflow_server, stop
from databricks_llm import distributed
from databricks_llm.errors import InputError

JOB = ["--max_train_samples=16", "--per_device_train_batch_size=4", "--num_train_epochs=1", "--eval_strategy=no",
       "--save_steps=2", "--logging_steps=1", "--disable_tqdm=true"]
SPARK_ENV = {"PYSPARK_PYTHON": sys.executable, "HF_HUB_OFFLINE": "1"}


def only_run(store: str):
    mlflow.set_tracking_uri(store)
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert len(runs) == 1
    return runs[0]


def global_step(checkpoint: Path) -> int:
    return json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]


def test_relative_paths_become_absolute_for_tasks_in_other_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.csv").write_text("x")
    (tmp_path / "instruction.txt").write_text("Find the name.")
    args = distributed.absolute_paths(["--output_dir=out", "--dataset", "data.csv", "--model=org/hub-id",
                                       "--resume_from_checkpoint=true", "--learning_rate=1e-3",
                                       "--instruction=@instruction.txt", "--instruction", "Find the name."])
    assert args == [f"--output_dir={tmp_path / 'out'}", "--dataset", str(tmp_path / "data.csv"), "--model=org/hub-id",
                    "--resume_from_checkpoint=true", "--learning_rate=1e-3",
                    f"--instruction=@{tmp_path / 'instruction.txt'}", "--instruction", "Find the name."]


@pytest.mark.parametrize("args, kwargs, message", [
    (["--no_such_flag=1"], {"num_processes": 2}, "unknown flag --no_such_flag=1"),
    ([], {"num_processes": 3, "nnodes": 2}, "must be a positive multiple of --nnodes"),
    ([], {"num_processes": 2, "deepspeed_config": "missing.json"}, "missing.json does not exist"),
])
def test_bad_job_is_refused_before_spark_starts(args, kwargs, message, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyspark", None)  # importing pyspark would fail: nothing may start
    with pytest.raises(InputError, match=message):
        distributed.run_on_spark(args, **kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("flags", [[], ["--deepspeed_config=ds_configs/ds_zero_2.json"]], ids=["torch", "deepspeed"])
def test_local_mode_splits_the_data_over_two_processes_and_logs_one_run(tiny_model, tmp_path, flags):
    result = run_module("databricks_llm.distributed", "--num_processes=2", "--master=local[2]", *flags, "--",
                        f"--model={tiny_model}", f"--output_dir={tmp_path / 'out'}", *JOB, cwd=REPO, env=SPARK_ENV)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert global_step(tmp_path / "out" / "checkpoint-2") == 2  # 16 rows / (2 ranks x 4): 2 steps, not 4
    run = only_run(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    assert run.info.status == "FINISHED" and run.data.params["world_size"] == "2"
    assert (tmp_path / "out" / "final_model" / "adapter_model.safetensors").exists()


DRIVER = """
import os, sys
from pyspark.sql import SparkSession
SparkSession.builder.master("local-cluster[2,1,1024]").getOrCreate()
os.environ.update(MLFLOW_TRACKING_URI=sys.argv[1], MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="1")  # after the executors started
from databricks_llm.distributed import run_on_spark
run_on_spark(sys.argv[2:], num_processes=2, local_mode=False)
"""


@pytest.mark.slow
def test_executors_of_a_local_cluster_train_with_the_drivers_tracking_settings(tiny_model, tmp_path):
    url, server = start_mlflow_server(tmp_path)
    try:
        result = run_module("-c", DRIVER, url, f"--model={tiny_model}", "--output_dir=out", *JOB, "--max_steps=60",
                            "--save_steps=30", launcher=[sys.executable], cwd=tmp_path,
                            env={**SPARK_ENV, "HF_TOKEN": "hf_fake_secret_1234"})
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        run = only_run(url)
        metrics = set(run.data.metrics)
        logged = json.dumps([run.data.params, run.data.tags])
    finally:
        stop(server)
    assert run.info.status == "FINISHED" and (run.data.params["world_size"], run.data.params["nodes"]) == ("2", "2")
    assert {"system/node-0/cpu_utilization_percentage", "system/node-1/cpu_utilization_percentage"} <= metrics
    assert "hf_fake_secret_1234" not in logged
    assert (tmp_path / "out" / "final_model").is_dir()  # the relative path is the driver's, not the executor's

"""Against a real `mlflow server` on 127.0.0.1, and the logged model behind `mlflow models serve`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import mlflow
import pytest

from conftest import MLFLOW, free_port, run_module, start_mlflow_server, stop, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    url, process = start_mlflow_server(tmp_path_factory.mktemp("server"))
    yield url
    stop(process)


@pytest.fixture(scope="module")
def served_job(server, tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("job")
    result = run_module("databricks_llm.fine_tune", f"--model={tiny_model}", f"--output_dir={out}", "--max_steps=2",
                        "--save_steps=2", "--eval_steps=2", "--max_train_samples=8", "--per_device_train_batch_size=4",
                        "--registered_model_name=e2e-extractor", "--disable_tqdm=true", "--logging_steps=1",
                        env={"MLFLOW_TRACKING_URI": server, "MLFLOW_EXPERIMENT_NAME": "server-spec"})
    assert result.returncode == 0, result.stderr[-3000:]
    mlflow.set_tracking_uri(server)
    return mlflow.get_run((out / "mlflow_run_id").read_text().strip())


def test_job_logs_one_run_with_metrics_and_models_to_the_server(served_job):
    run = served_job
    assert run.info.status == "FINISHED"
    assert "loss" in run.data.metrics and "eval_loss" in run.data.metrics
    names = {m.name for m in mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")}
    assert names == {"checkpoint-2", "final_model"}


def test_final_model_is_registered(served_job):
    (version,) = mlflow.MlflowClient().search_model_versions("name='e2e-extractor'")
    assert version.run_id == served_job.info.run_id


def test_checkpoint_from_the_server_loads_and_predicts(served_job):
    served = mlflow.pyfunc.load_model(f"runs:/{served_job.info.run_id}/checkpoint-2")
    (out,) = served.predict({"prompt": "Aromi is a pub.", "temperature": 0.4, "max_tokens": 4})
    assert isinstance(out, str)


def test_model_answers_rest_requests_behind_mlflow_models_serve(served_job, server, tmp_path):
    port = free_port()
    env_uri = f"runs:/{served_job.info.run_id}/final_model"
    process = subprocess.Popen(
        [MLFLOW, "models", "serve", "-m", env_uri, "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        stdout=(tmp_path / "serve.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "MLFLOW_TRACKING_URI": server,
             "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"},  # it execs uvicorn
    )
    try:
        wait_for(f"http://127.0.0.1:{port}/ping", process, seconds=180)
        for body in ({"dataframe_records": [{"prompt": "Aromi is a pub.", "temperature": 0.4, "max_tokens": 4}]},
                     {"dataframe_records": [{"prompt": "Aromi is a pub."}], "params": {"max_tokens": 4}}):
            request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"})
            answer = json.loads(urllib.request.urlopen(request, timeout=120).read())
            assert len(answer["predictions"]) == 1 and isinstance(answer["predictions"][0], str)
    finally:
        stop(process)

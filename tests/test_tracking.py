"""One tracked job on the tiny model (the session's `job`), logging to a local SQLite store,
checked from the outside; plus resume and the tracking settings read from the environment."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow

from conftest import FAKE_SECRETS, QUICK_JOB, run_module
import databricks_llm
from databricks_llm import data, tracking
from databricks_llm.task import E2E_INSTRUCTION, PROMPT_VERSION


def training_run(job):
    return mlflow.get_run(job.run_id)


def history(run, key: str) -> list[int]:
    return [m.step for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, key)]


def test_exactly_one_finished_training_run_in_the_named_experiment(job):
    run = training_run(job)
    experiment = mlflow.get_experiment_by_name("spec")
    runs = mlflow.search_runs([experiment.experiment_id], output_format="list")
    assert [r.info.run_id for r in runs if r.data.tags.get("kind") != "evaluation"] == [run.info.run_id]
    assert run.info.status == "FINISHED" and run.info.run_name == "spec-run"


def test_params_hold_training_model_lora_and_data_facts(job):
    params = training_run(job).data.params
    assert params["learning_rate"] == "0.0002"
    assert params["lora_r"] == "8" and params["use_lora"] == "True"
    assert params["hidden_size"] == "32"
    assert params["train_rows"] == "16" and params["dataset"] == "embedded:e2e-sample"
    assert params["prompt_version"] == PROMPT_VERSION and params["output_format"] == "slots"
    assert params["instruction"] == E2E_INSTRUCTION and params["input_column"] == "sentence"


def test_tags_name_model_task_and_user_tags(job):
    tags = training_run(job).data.tags
    assert tags["task"] == "extraction" and tags["output_format"] == "slots" and tags["team"] == "nlp" and tags["model"]


def test_metrics_are_logged_at_their_steps(job):
    run = training_run(job)
    assert history(run, "loss") == [1, 2, 3, 4]
    assert history(run, "eval_loss") == [2, 4]
    assert history(run, "learning_rate") == [1, 2, 3, 4]


def test_system_metrics_are_logged(job):
    metrics = training_run(job).data.metrics
    assert any(k.startswith("system/cpu_utilization") for k in metrics)
    assert any(k.startswith("system/system_memory") for k in metrics)


def test_training_data_is_a_run_input_with_digest(job):
    inputs = {i.dataset.name: i.dataset for i in training_run(job).inputs.dataset_inputs}
    assert {"embedded:e2e-sample:train", "embedded:e2e-sample:validation"} <= set(inputs)
    assert all(d.digest for d in inputs.values())


def test_one_logged_model_per_save_plus_the_final_model(job):
    run = training_run(job)
    models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    assert sorted(m.name for m in models) == ["checkpoint-2", "checkpoint-4", "final_model"]
    assert all(m.source_run_id == run.info.run_id for m in models)


def test_checkpoint_model_is_adapter_only_and_small(job):
    run = training_run(job)
    local = Path(mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/checkpoint-4"))
    files = {p.name for p in (local / "artifacts" / "model").iterdir()}
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files
    assert not files & {"optimizer.pt", "scheduler.pt", "trainer_state.json", "training_args.bin"}
    assert sum(p.stat().st_size for p in local.rglob("*") if p.is_file()) < 2_000_000


def test_checkpoint_loads_in_a_fresh_process_with_the_training_logits(job, tmp_path):
    out, run = job.out, training_run(job)
    script = f"""
import mlflow, torch
from peft import AutoPeftModelForCausalLM
mlflow.set_tracking_uri("sqlite:///{out / 'mlflow.db'}")
served = mlflow.pyfunc.load_model("runs:/{run.info.run_id}/checkpoint-4")
print(repr(served.predict({{"prompt": "The Punter is a pub.", "temperature": 0.4, "max_tokens": 8}})))
inner = served.unwrap_python_model().model
ids = torch.tensor([[1, 5, 9, 13]])
on_disk = AutoPeftModelForCausalLM.from_pretrained("{out / 'checkpoint-4'}").eval()
with torch.no_grad():
    print(torch.allclose(inner(ids).logits, on_disk(ids).logits, atol=1e-5))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    prediction, same_logits = result.stdout.strip().splitlines()[-2:]
    assert prediction.startswith("['") and same_logits == "True"


def test_models_uri_loads_the_same_logged_model(job):
    run = training_run(job)
    (model,) = [m for m in mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
                if m.name == "checkpoint-2"]
    served = mlflow.pyfunc.load_model(f"models:/{model.model_id}")
    assert len(served.predict([{"prompt": "Aromi is a pub.", "max_tokens": 4}, {"prompt": "Zizzi is cheap.", "max_tokens": 2}])) == 2


def test_model_signature_takes_the_seed_call_and_params_and_the_example_is_a_validation_input(job):
    run = training_run(job)
    info = mlflow.models.get_model_info(f"runs:/{run.info.run_id}/final_model")
    assert [c["name"] for c in info.signature.inputs.to_dict()] == ["prompt", "temperature", "max_tokens",
                                                                    "structured_decoding"]
    assert {p.name: p.default for p in info.signature.params} == {"temperature": 0.0, "max_tokens": 128,
                                                                   "structured_decoding": True}
    assert info.metadata["task"] == "llm/v1/completions"
    assert info.metadata["extraction_task"]["output_format"] == "slots"
    assert info.metadata["databricks_llm_version"] == databricks_llm.__version__
    example = json.loads(Path(mlflow.artifacts.download_artifacts(
        f"runs:/{run.info.run_id}/final_model/input_example.json")).read_text())
    validation = data.load(data.EMBEDDED_DATASET)[0]["validation"]
    assert example == {"prompt": validation[0]["input"], "max_tokens": 128}


def test_requirements_are_pinned_and_skip_torchvision(job):
    run = training_run(job)
    requirements = Path(mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/checkpoint-2/requirements.txt")).read_text()
    assert "torchvision" not in requirements
    assert "peft==" in requirements and "transformers==" in requirements


def test_tensorboard_events_are_uploaded(job):
    run = training_run(job)
    files = [f.path for f in mlflow.MlflowClient().list_artifacts(run.info.run_id, "tensorboard")]
    assert any("events.out.tfevents" in f for f in files)


def test_no_secret_reaches_params_tags_artifacts_store_or_output(job):
    out, run, result = job.out, training_run(job), job.result
    haystacks = [json.dumps(run.data.params), json.dumps(run.data.tags), result.stdout, result.stderr]
    haystacks += [p.read_bytes().decode("latin-1") for p in out.rglob("*") if p.is_file()]
    for secret in FAKE_SECRETS.values():
        assert not any(secret in h for h in haystacks), secret


def test_resume_continues_the_same_run_from_its_checkpoint_without_duplicate_steps(tiny_model, tmp_path):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"

    def fine_tune(*flags: str) -> subprocess.CompletedProcess:
        result = run_module("databricks_llm.fine_tune", f"--model={tiny_model}", f"--output_dir={tmp_path}", *QUICK_JOB,
                            "--save_steps=2", "--eval_strategy=no", *flags, env={"MLFLOW_TRACKING_URI": store})
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    fine_tune("--max_steps=4")
    first = (tmp_path / "mlflow_run_id").read_text()
    import shutil

    shutil.rmtree(tmp_path / "checkpoint-4")  # as if killed after checkpoint-2, with steps 3-4 already logged
    resumed = fine_tune("--max_steps=6", "--resume_from_checkpoint=true")
    assert f"[resume] continuing from {tmp_path / 'checkpoint-2'} (step 2)" in resumed.stdout
    state = json.loads((tmp_path / "checkpoint-6" / "trainer_state.json").read_text())
    assert [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2, 3, 4, 5, 6]
    mlflow.set_tracking_uri(store)
    run = mlflow.get_run(first)
    assert (tmp_path / "mlflow_run_id").read_text() == first
    assert len(mlflow.search_runs([run.info.experiment_id], output_format="list")) == 1
    assert history(run, "loss") == [1, 2, 3, 4, 5, 6]
    assert run.info.status == "FINISHED"


def test_settings_are_read_once_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_MLFLOW_LOG_ARTIFACTS", "false")
    monkeypatch.setenv("MLFLOW_TAGS", '{"team": "nlp"}')
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "spec")
    settings = tracking.TrackingSettings.from_env(str(tmp_path))
    assert (settings.log_checkpoints, settings.tags, settings.experiment) == (False, {"team": "nlp"}, "spec")
    assert settings.uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert settings.tensorboard_dir == str(tmp_path / "tensorboard")


def test_hf_mlflow_log_artifacts_false_logs_no_checkpoint_model(tmp_path):
    from types import SimpleNamespace

    from databricks_llm.callbacks import MLflowLogger

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    with mlflow.start_run() as run:
        MLflowLogger(log_checkpoints=False).on_save(SimpleNamespace(output_dir=str(tmp_path)),
                                                   SimpleNamespace(global_step=2), SimpleNamespace())
    assert mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list") == []

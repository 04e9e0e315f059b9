"""Slot scores during training and the `python -m databricks_llm.evaluate` CLI on logged tiny checkpoints."""

from __future__ import annotations

import json

import mlflow
import pytest

from conftest import run_module


@pytest.fixture(scope="module")
def job(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval-job")
    result = run_module("databricks_llm.fine_tune", f"--model={tiny_model}", f"--output_dir={out}", "--max_steps=4",
                        "--save_steps=2", "--eval_steps=2", "--logging_steps=1", "--max_train_samples=8",
                        "--per_device_train_batch_size=4", "--eval_generation_samples=4", "--disable_tqdm=true")
    assert result.returncode == 0, result.stderr[-3000:]
    mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
    return out, mlflow.get_run((out / "mlflow_run_id").read_text().strip()), result


def evaluate(out, *flags: str):
    result = run_module("databricks_llm.evaluate", f"--job_dir={out}", "--max_samples=4", "--max_tokens=8", *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_training_logs_slot_scores_at_each_evaluation(job):
    out, run, result = job
    client = mlflow.MlflowClient()
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval_slot_f1")] == [2, 4]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval_exact_match")] == [2, 4]
    assert "[eval] step 2: slot F1" in result.stdout


def test_training_run_has_a_readable_name_in_a_model_training_experiment(job, tiny_model):
    _, run, _ = job
    assert run.info.run_name.startswith(f"{tiny_model.name}-20")  # <model>-<date-time>
    experiment = mlflow.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_checkpoint_model_carries_its_eval_metrics(job):
    _, run, _ = job
    (model,) = [m for m in mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
                if m.name == "checkpoint-4"]
    assert {"eval_loss", "eval_slot_f1"} <= {m.key for m in model.metrics}


def test_evaluate_one_checkpoint_writes_json_table_and_an_evaluation_run(job, tmp_path):
    out, run, _ = job
    result = evaluate(out, f"--model_uri=runs:/{run.info.run_id}/checkpoint-4", f"--output_json={tmp_path / 'scores.json'}")
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert {"precision", "recall", "f1", "exact_match", "per_slot", "n", "seconds"} <= set(scores)
    assert scores["n"] == 4
    assert "precision" in result.stdout and "recall" in result.stdout and "<- best" not in result.stdout
    (evaluation,) = mlflow.search_runs([run.info.experiment_id], filter_string="tags.kind = 'evaluation'",
                                       output_format="list")
    assert "slot_f1" in evaluation.data.metrics
    assert evaluation.info.run_name == f"evaluate-checkpoint-4@{run.info.run_id[:8]}-test"  # named by what it scored
    table = mlflow.artifacts.load_dict(f"runs:/{evaluation.info.run_id}/predictions.json")
    assert table["columns"] == ["sentence", "reference", "prediction", "correct"] and len(table["data"]) == 4


def test_compare_mode_scores_base_and_checkpoints_and_registers_the_best(job, tmp_path):
    out, run, _ = job
    result = evaluate(out, f"--compare_run={run.info.run_id}", "--register_best=e2e-spec", "--alias=champion",
                      f"--output_json={tmp_path / 'compare.json'}")
    report = json.loads((tmp_path / "compare.json").read_text())
    assert [m["name"] for m in report["models"]] == ["base", "checkpoint-2", "checkpoint-4"]
    assert "<- best" in result.stdout
    assert mlflow.search_runs([run.info.experiment_id], filter_string=f"run_name = 'evaluate-compare-{run.info.run_id[:8]}-test'",
                              output_format="list")
    version = mlflow.MlflowClient().get_model_version_by_alias("e2e-spec", "champion")
    assert version.source.startswith("models:/m-")


def test_evaluate_refuses_an_unknown_split(job):
    result = run_module("databricks_llm.evaluate", f"--job_dir={job[0]}", "--split=dev")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "error: --split must be train, validation or test (got dev)"


def test_early_stopping_on_slot_f1_stops_before_max_steps(tiny_model, tmp_path):
    result = run_module("databricks_llm.fine_tune", f"--model={tiny_model}", f"--output_dir={tmp_path}",
                        "--max_steps=20", "--save_steps=2", "--eval_steps=2", "--max_train_samples=8",
                        "--per_device_train_batch_size=4", "--eval_generation_samples=2", "--early_stopping_patience=1",
                        "--metric_for_best_model=eval_slot_f1", "--disable_tqdm=true")
    assert result.returncode == 0, result.stderr[-3000:]
    state = json.loads(max(tmp_path.glob("checkpoint-*/trainer_state.json"), key=lambda p: p.stat().st_mtime).read_text())
    assert state["global_step"] < 20
    assert state["best_metric"] is not None

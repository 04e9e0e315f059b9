"""Every job ends by saying its result: on the console and as its MLflow run's description."""

from __future__ import annotations

import mlflow

from databricks_llm import summary

HISTORY = [{"eval_loss": 3.0, "eval_f1": 0.146, "eval_exact_match": 0.0, "step": 0}, {"loss": 1.0, "step": 5},
           {"eval_loss": 0.2, "eval_f1": 0.908, "eval_exact_match": 0.4, "step": 20},
           {"eval_loss": 0.1, "eval_f1": 0.897, "eval_exact_match": 0.5, "step": 40}]


def test_best_evaluation_is_set_against_the_step_0_one_of_the_base_model(tmp_path):
    (tmp_path / "checkpoint-20").mkdir()
    text = summary.text(model="m", dataset="d", output_format="slots", lora=True, steps=40, log_history=HISTORY,
                        output_dir=str(tmp_path), final_model="/f", run_id="r1", experiment_id="7",
                        tracking_uri="sqlite:///x/mlflow.db")
    assert text.splitlines() == [
        "fine-tuned m (LoRA) on d, slots task, 40 steps",
        "best: checkpoint-20, eval F1 0.908, exact match 0.400; base model 0.146",
        "final model: /f",
        "MLflow run r1 at sqlite:///x/mlflow.db",
        "open: mlflow ui --backend-store-uri sqlite:///x/mlflow.db  then "
        "http://127.0.0.1:5000/#/experiments/7/runs/r1?workflowType=machine_learning",
        "serve: mlflow models serve -m runs:/r1/final_model --env-manager local"]


def test_a_server_link_opens_the_run_in_the_model_training_view_and_hides_the_password():
    text = summary.text(model="m", dataset="d", output_format="json", lora=False, steps=1, log_history=[],
                        output_dir="/nowhere", final_model="/f", run_id="r1", experiment_id="3",
                        tracking_uri="http://user:pw-secret@host:5000/")
    assert "open: http://user:***@host:5000/#/experiments/3/runs/r1?workflowType=machine_learning" in text
    assert "pw-secret" not in text and "best:" not in text


def test_the_job_says_its_result_last_and_writes_it_as_the_run_description(job):
    description = mlflow.MlflowClient().get_run(job.run_id).data.tags[summary.DESCRIPTION_TAG]
    assert description.startswith("fine-tuned ") and "best: checkpoint-" in description
    assert "base model not scored (--eval_on_start=true scores it)" in description
    assert f"runs/{job.run_id}?workflowType=machine_learning" in description
    printed = job.result.stdout.strip().splitlines()[-len(description.splitlines()):]
    assert printed == ["[summary] " + line for line in description.splitlines()]

"""Slot scores during training and the `python -m databricks_llm.evaluate` CLI on the session job's checkpoints."""

from __future__ import annotations

import json

import mlflow

from conftest import QUICK_JOB, run_module
from databricks_llm import evaluate as evaluate_cli
from databricks_llm.error_analysis import ERROR_TYPES


def evaluate(job, *flags: str):
    result = run_module("databricks_llm.evaluate", f"--job_dir={job.out}", "--max_samples=4", "--max_tokens=8", *flags,
                        env={"MLFLOW_EXPERIMENT_NAME": "spec"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_training_logs_the_tasks_scores_at_each_evaluation(job):
    client = mlflow.MlflowClient()
    for metric in ("eval_f1", "eval_slot_f1", "eval_exact_match", "eval_f1_name",  # slot task: old names kept
                   "eval_exact_match_synonyms"):  # E2E: exact match with synonym labels taken as equal, too
        assert [m.step for m in client.get_metric_history(job.run_id, metric)] == [2, 4]
    assert "[eval] step 2: F1" in job.result.stdout


def test_training_run_has_a_readable_name_in_a_model_training_experiment(job):
    run = mlflow.get_run(job.run_id)
    assert run.info.run_name == "spec-run"  # --run_name; the default <model>-<date-time> is checked with the notebooks
    experiment = mlflow.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_checkpoint_model_carries_its_eval_metrics(job):
    experiment_id = mlflow.get_run(job.run_id).info.experiment_id
    (model,) = [m for m in mlflow.search_logged_models(experiment_ids=[experiment_id], output_format="list")
                if m.name == "checkpoint-4"]
    assert {"eval_loss", "eval_f1", "eval_slot_f1"} <= {m.key for m in model.metrics}


def test_evaluate_one_checkpoint_writes_json_table_and_an_evaluation_run(job, tmp_path):
    result = evaluate(job, f"--model_uri=runs:/{job.run_id}/checkpoint-4", f"--output_json={tmp_path / 'scores.json'}")
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert {"precision", "recall", "f1", "exact_match", "exact_match_synonyms", "per_field", "n", "seconds"} <= set(scores)
    assert scores["n"] == 4
    assert "precision" in result.stdout and "recall" in result.stdout and "<- best" not in result.stdout
    name = f"evaluate-checkpoint-4@{job.run_id[:8]}-test"  # named by what it scored
    (evaluation,) = mlflow.search_runs(experiment_names=["spec"], filter_string=f"run_name = '{name}'", output_format="list")
    assert evaluation.data.tags["kind"] == "evaluation" and {"f1", "slot_f1", "exact_match_synonyms"} <= set(evaluation.data.metrics)
    assert evaluation.data.params["output_format"] == "slots"
    table = mlflow.artifacts.load_dict(f"runs:/{evaluation.info.run_id}/predictions.json")
    assert table["columns"] == ["input", "reference", "prediction", "correct", "errors"] and len(table["data"]) == 4
    errors = mlflow.artifacts.load_dict(f"runs:/{evaluation.info.run_id}/errors.json")
    assert set(errors["errors"]) == set(ERROR_TYPES) and "errors_missing" in evaluation.data.metrics
    assert errors["most_common_faults"] == scores["most_common_faults"]  # [fault, count] pairs, as in the JSON
    assert "errors in" in result.stdout
    assert f"[evaluate] runs:/{job.run_id}/checkpoint-4: 4/4 rows" in result.stdout  # progress, last line


def test_compare_mode_scores_base_and_checkpoints_and_registers_the_best(job, tmp_path):
    result = evaluate(job, f"--compare_run={job.run_id}", "--register_best=e2e-spec", "--alias=champion",
                      f"--output_json={tmp_path / 'compare.json'}")
    report = json.loads((tmp_path / "compare.json").read_text())
    assert [m["name"] for m in report["models"]] == ["base", "checkpoint-2", "checkpoint-4"]
    assert "<- best" in result.stdout
    assert mlflow.search_runs(experiment_names=["spec"], output_format="list",
                              filter_string=f"run_name = 'evaluate-compare-{job.run_id[:8]}-test'")
    version = mlflow.MlflowClient().get_model_version_by_alias("e2e-spec", "champion")
    assert version.source.startswith("models:/m-")


def test_evaluate_refuses_an_unknown_split_before_touching_the_job(capsys, tmp_path):
    assert evaluate_cli.main([f"--job_dir={tmp_path / 'job'}", "--split=dev"]) == 2
    assert capsys.readouterr().err.strip() == "error: --split must be train, validation or test (got dev)"
    assert not (tmp_path / "job").exists()


def test_early_stopping_watches_the_tasks_f1_by_default_and_stops_before_max_steps(tiny_model, tmp_path):
    result = run_module("databricks_llm.fine_tune", f"--model={tiny_model}", f"--output_dir={tmp_path}", *QUICK_JOB,
                        "--max_train_samples=8", "--max_steps=20", "--save_steps=2", "--eval_steps=2",
                        "--eval_generation_samples=2", "--early_stopping_patience=1")
    assert result.returncode == 0, result.stderr[-3000:]
    state = json.loads(max(tmp_path.glob("checkpoint-*/trainer_state.json"), key=lambda p: p.stat().st_mtime).read_text())
    assert state["global_step"] < 20
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.data.params["metric_for_best_model"] == "eval_f1"
    assert state["best_metric"] is not None


def test_progress_is_printed_at_most_once_per_interval_and_always_at_the_end(logged):
    report = evaluate_cli.progress_printer("m", total=300, every=3600)
    for done in (128, 256, 300):
        report(done)
    assert logged.messages == ["[evaluate] m: 300/300 rows, 0s"]
    logged.clear()
    report = evaluate_cli.progress_printer("m", total=300, every=0)
    report(100)
    assert logged.messages[0].startswith("[evaluate] m: 100/300 rows, 0s, ~0s left")


def test_the_table_prints_long_model_names_whole_and_keeps_the_columns_aligned(capsys):
    scores = {"precision": 0.9, "recall": 0.8, "f1": 0.85, "exact_match": 0.5, "n": 250, "seconds": 35.0}
    names = ["outputs/bench_quality_lr2e3/checkpoints/final_model", "outputs/bench_quality_lr2e3_aug/checkpoints/final_model"]
    evaluate_cli.print_table([{"model_uri": name, **scores} for name in names])
    header, *lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == names
    assert {line.index("0.850") for line in lines} == {header.index("f1") - 3}

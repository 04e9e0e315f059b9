"""A tiny-model job per output format, end to end: train -> logged model -> `pyfunc.load_model` ->
predict without passing the instruction -> evaluate, each reading the task the job saved."""

from __future__ import annotations

import json

import mlflow
import pandas as pd
import pytest

from conftest import QUICK_JOB, run_module
from databricks_llm import data, sample_data
from databricks_llm.task import TASK_FILE

pytestmark = pytest.mark.slow
TEXT_INSTRUCTION = "Name the restaurant the description is about."


def text_dataset(folder) -> str:
    """A user's own CSV with their own column names and an instruction in a file."""
    rows = sample_data.generate(40, seed=9)
    pd.DataFrame({"description": [r["sentence"] for r in rows],
                  "restaurant": [r["mr"].split("]")[0].removeprefix("name[") for r in rows]}).to_csv(folder / "names.csv", index=False)
    (folder / "instruction.txt").write_text(TEXT_INSTRUCTION + "\n")
    return str(folder / "names.csv")


@pytest.fixture(scope="module", params=["json", "text"])
def format_job(request, tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"{request.param}-job")
    if request.param == "json":
        flags = [f"--dataset={data.TICKETS_DATASET}"]
    else:
        flags = [f"--dataset={text_dataset(out)}", "--input_column=description", "--output_column=restaurant",
                 f"--instruction=@{out / 'instruction.txt'}", "--output_format=text"]
    result = run_module("databricks_llm.fine_tune", f"--model={tiny_model}", f"--output_dir={out}", *QUICK_JOB, *flags,
                        "--max_steps=2", "--save_steps=2", "--eval_steps=2", "--eval_generation_samples=2",
                        env={"MLFLOW_TRACKING_URI": f"sqlite:///{out / 'mlflow.db'}"})
    assert result.returncode == 0, result.stderr[-3000:]
    mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
    return request.param, out, (out / "mlflow_run_id").read_text().strip()


def expected_instruction(output_format: str) -> str:
    return sample_data.TICKETS_INSTRUCTION if output_format == "json" else TEXT_INSTRUCTION


def test_checkpoints_and_final_model_carry_the_task(format_job):
    output_format, out, _ = format_job
    for folder in (out / "checkpoint-2", out / "final_model"):
        saved = json.loads((folder / TASK_FILE).read_text())
        assert (saved["output_format"], saved["instruction"]) == (output_format, expected_instruction(output_format))
        assert (saved["schema"] is None) == (output_format == "text")  # structured decoding's format, from the targets


def test_the_logged_model_serves_the_task_without_being_told_the_instruction(format_job):
    output_format, _, run_id = format_job
    served = mlflow.pyfunc.load_model(f"runs:/{run_id}/checkpoint-2")
    assert served.unwrap_python_model().task.instruction == expected_instruction(output_format)
    outputs = served.predict([{"prompt": "Hi team, our VPN Client is down for everyone. Thanks, Acme Corp IT"}],
                             params={"max_tokens": 8})
    assert len(outputs) == 1 and isinstance(outputs[0], str)
    info = mlflow.models.get_model_info(f"runs:/{run_id}/final_model")
    assert info.metadata["extraction_task"]["output_format"] == output_format


def test_training_logs_the_formats_metrics(format_job):
    output_format, _, run_id = format_job
    metrics = mlflow.get_run(run_id).data.metrics
    assert {"eval_f1", "eval_exact_match"} <= set(metrics) and not any("slot" in k for k in metrics)
    assert ("eval_json_parse_rate" in metrics) == (output_format == "json")
    assert mlflow.get_run(run_id).data.params["output_format"] == output_format


def test_evaluate_scores_by_the_saved_task(format_job, tmp_path):
    output_format, out, run_id = format_job
    dataset = data.TICKETS_DATASET if output_format == "json" else str(out / "names.csv")
    result = run_module("databricks_llm.evaluate", f"--model_uri=runs:/{run_id}/final_model", f"--dataset={dataset}",
                        "--split=train", "--max_samples=3", "--max_tokens=8", f"--job_dir={out}", f"--output_json={tmp_path / 's.json'}",
                        env={"MLFLOW_TRACKING_URI": f"sqlite:///{out / 'mlflow.db'}"})
    assert result.returncode == 0, result.stderr[-2000:]
    scores = json.loads((tmp_path / "s.json").read_text())
    assert scores["n"] == 3 and ("parse_rate" in scores) == (output_format == "json")
    (evaluation,) = mlflow.search_runs(search_all_experiments=True, filter_string="tags.kind = 'evaluation'",
                                       output_format="list")
    assert evaluation.data.params["instruction"] == expected_instruction(output_format)

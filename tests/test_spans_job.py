"""A tiny job on SNIPS-shaped span data, end to end: train -> logged model served through pyfunc ->
evaluate, the served answers JSON frames in the task's target form and the frame metrics logged."""

from __future__ import annotations

import json
import random

import mlflow
import pytest

from conftest import QUICK_JOB, run_module
from databricks_llm.scoring import parse_json

pytestmark = pytest.mark.slow
TEMPLATES = [  # (intent, words with {slot} holes)
    ("PlayMusic", "play {artist} on {service}"),
    ("GetWeather", "what is the weather in {city} {timeRange}"),
    ("AddToPlaylist", "add {artist} and {artist} to {playlist}"),
]
VALUES = {"artist": ["abba", "queen", "bob marley"], "service": ["spotify", "deezer"], "city": ["paris", "oslo"],
          "timeRange": ["today", "tomorrow"], "playlist": ["chill", "road trip"]}


def snips_rows(n: int, seed: int) -> list[dict]:
    """SNIPS-shaped rows: text, intent, and slot objects with value and offsets."""
    rng, rows = random.Random(seed), []
    for _ in range(n):
        intent, template = rng.choice(TEMPLATES)
        text, slots = "", []
        for i, part in enumerate(template.replace("}", "{").split("{")):
            if i % 2:
                value = rng.choice(VALUES[part])
                slots.append({"slot": part, "value": value, "start": len(text), "end": len(text) + len(value)})
                part = value
            text += part
        rows.append({"text": text, "intent": intent, "slots": slots})
    return rows


@pytest.fixture(scope="module")
def spans_job(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("spans-job")
    folder = out / "snips"
    folder.mkdir()
    for name, n, seed in (("train.jsonl", 40, 1), ("dev.jsonl", 8, 2)):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in snips_rows(n, seed)))
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{out / 'mlflow.db'}"}
    result = run_module("databricks_llm.fine_tune", f"--model={tiny_model}", f"--output_dir={out}", f"--dataset={folder}",
                        *QUICK_JOB, "--max_steps=2", "--save_steps=2", "--eval_steps=2", "--eval_generation_samples=2",
                        env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    return out, folder, (out / "mlflow_run_id").read_text().strip(), env


def test_the_job_trains_on_the_frames_and_logs_their_metrics(spans_job):
    _, _, run_id, _ = spans_job
    run = mlflow.get_run(run_id)
    assert (run.data.params["spans_column"], run.data.params["label_columns"]) == ("slots", "intent")
    assert {"eval_intent_accuracy", "eval_slot_f1", "eval_frame_accuracy"} <= set(run.data.metrics)


def test_the_served_model_answers_frames_in_the_target_form(spans_job):
    _, _, run_id, _ = spans_job
    served = mlflow.pyfunc.load_model(f"runs:/{run_id}/final_model")
    task = served.unwrap_python_model().task
    fields = json.loads(task.schema)["fields"]
    outputs = served.predict([{"prompt": "play abba on spotify"}, {"prompt": "what is the weather in oslo today"}],
                             params={"max_tokens": 48})
    for output in outputs:
        frame = parse_json(output)
        assert frame is not None, output  # structured decoding: one JSON object
        assert set(frame) <= set(fields)


def test_evaluate_reports_the_frame_metrics_and_logs_the_per_slot_table(spans_job, tmp_path):
    out, folder, run_id, env = spans_job
    result = run_module("databricks_llm.evaluate", f"--model_uri=runs:/{run_id}/final_model", f"--dataset={folder}",
                        "--split=validation", "--max_samples=4", "--max_tokens=48", f"--job_dir={out}",
                        f"--output_json={tmp_path / 's.json'}", env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    scores = json.loads((tmp_path / "s.json").read_text())
    assert {"label_accuracy", "slot_f1", "frame_accuracy", "per_slot"} <= set(scores["frame"])
    assert "frames: intent accuracy" in result.stdout
    (evaluation,) = mlflow.search_runs(search_all_experiments=True, filter_string="tags.kind = 'evaluation'",
                                       output_format="list")
    assert {"intent_accuracy", "slot_f1", "frame_accuracy"} <= set(evaluation.data.metrics)
    artifacts = [a.path for a in mlflow.MlflowClient().list_artifacts(evaluation.info.run_id)]
    assert "per_slot.json" in artifacts

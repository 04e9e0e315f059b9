"""A new output format is one class: a made-up `key: value` lines format, registered beside the
three the package has, is trained, served (structured decoding included) and scored with no other
code change."""

from __future__ import annotations

import json
import sys

import mlflow
import pandas as pd
import pytest

from conftest import QUICK_JOB, REPO, run_module
from databricks_llm import sample_data
from databricks_llm.scoring import E2E_SLOTS, parse_mr

pytestmark = pytest.mark.slow

LINES_FORMAT = '''
import re

from databricks_llm import formats


class Lines(formats.OutputFormat):
    """One `key: value` line a field."""

    name = "lines"
    instruction = "List each field stated in the text as a `key: value` line."
    unlike = "has no key: value line"
    separator = "\\n"

    def parse(self, text):
        lines = [line.split(": ", 1) for line in text.splitlines() if ": " in line] if isinstance(text, str) else []
        return [(key.strip(), value.strip()) for key, value in lines] or None

    def render(self, record):
        return "\\n".join(f"{key}: {value}" for key, value in record)

    def item(self, key, value):
        return re.escape(key) + ": " + value

    def value(self, kind, closed):
        return "(" + "|".join(map(re.escape, closed)) + ")" if closed else r"[^\\n\\x00]+"

    def copying(self, fields):
        return rf"(?:^|\\n)(?:{'|'.join(map(re.escape, fields))}): ([^\\n]*)$", "\\n"


formats.FORMATS["lines"] = Lines()
'''
LAUNCHER = '''
import runpy, sys
import lines_format  # the new format, as if its class were in databricks_llm/formats.py
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
'''


@pytest.fixture(scope="module")
def lines_job(tiny_model, tmp_path_factory):
    """A tiny job on E2E rows whose targets are `key: value` lines, and the plugin's folder."""
    out = tmp_path_factory.mktemp("lines-job")
    (out / "lines_format.py").write_text(LINES_FORMAT)
    (out / "launch.py").write_text(LAUNCHER)
    rows = sample_data.generate(48, seed=11)
    pd.DataFrame({"text": [r["sentence"] for r in rows],
                  "label": ["\n".join(f"{k}: {v}" for k, v in parse_mr(r["mr"])) for r in rows]}).to_csv(
        out / "train.csv", index=False)
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{out / 'mlflow.db'}", "PYTHONPATH": f"{out}:{REPO}"}
    launch = [sys.executable, str(out / "launch.py")]
    result = run_module("databricks_llm.fine_tune", f"--model={tiny_model}", f"--output_dir={out / 'job'}",
                        f"--dataset={out / 'train.csv'}", "--output_format=lines", *QUICK_JOB, "--max_steps=2",
                        "--save_steps=2", "--eval_steps=2", "--eval_generation_samples=2", env=env, launcher=launch)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, env, launch, (out / "job" / "mlflow_run_id").read_text().strip()


def test_a_new_format_class_is_trained_and_logs_its_metrics(lines_job):
    out, env, _, run_id = lines_job
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    run = mlflow.get_run(run_id)
    assert run.data.params["output_format"] == "lines"
    assert {"eval_f1", "eval_exact_match", "eval_parse_rate"} <= set(run.data.metrics)
    schema = json.loads(json.loads((out / "job" / "final_model" / "extraction_task.json").read_text())["schema"])
    assert schema["fields"][0] == "name" and "eatType" in schema["closed"]


def test_a_new_format_class_is_served_held_to_its_format(lines_job, monkeypatch):
    out, env, _, run_id = lines_job
    monkeypatch.syspath_prepend(str(out))
    import lines_format  # noqa: F401  (registers the format in this process, as the package would)

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    served = mlflow.pyfunc.load_model(f"runs:/{run_id}/checkpoint-2")
    outputs = served.predict([{"prompt": r["sentence"]} for r in sample_data.generate(3, seed=5)],
                             params={"max_tokens": 24})
    for text in outputs:  # each line a known field; each field once
        fields = [line.split(":")[0] for line in text.splitlines()]
        assert set(fields) <= set(E2E_SLOTS) and len(fields) == len(set(fields)), text


def test_a_new_format_class_is_scored_by_evaluate(lines_job, tmp_path):
    out, env, launch, run_id = lines_job
    result = run_module("databricks_llm.evaluate", f"--model_uri=runs:/{run_id}/final_model",
                        f"--dataset={out / 'train.csv'}", "--split=train", "--max_samples=3", "--max_tokens=24",
                        f"--output_json={tmp_path / 's.json'}", env=env, launcher=launch)
    assert result.returncode == 0, result.stderr[-3000:]
    scores = json.loads((tmp_path / "s.json").read_text())
    assert scores["n"] == 3 and {"f1", "exact_match", "parse_rate"} <= set(scores)

"""Your own extraction task: columns, instructions, chat rows and output formats given or detected,
the task saved with the model and read back by serving and `evaluate`, and models logged before
tasks were saved still served as E2E."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from conftest import REPO, run_module
from databricks_llm import data, sample_data
from databricks_llm.errors import InputError
from databricks_llm.formats import of
from databricks_llm.scoring import E2E_SLOTS, parse_mr
from databricks_llm.task import E2E, E2E_INSTRUCTION, E2E_JSON_INSTRUCTION, TASK_FILE, Task

LEGACY_ARCHIVE = REPO / "tests" / "fixtures" / "legacy_model.tar.gz"
TICKETS = sample_data.tickets(12, seed=5)


def write(tmp_path, rows: list[dict], name: str = "train.jsonl") -> str:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("columns", [("prompt", "completion"), ("input", "output"), ("text", "label")])
def test_common_column_pairs_are_detected(tmp_path, columns):
    rows = [{columns[0]: f"ticket {i}", columns[1]: f"answer {i}", "id": i} for i in range(10)]
    splits, task = data.load(write(tmp_path, rows), validation_fraction=0.2)
    assert (task.input_column, task.output_column) == columns
    assert sorted([*splits["train"]["input"], *splits["validation"]["input"]]) == sorted(r[columns[0]] for r in rows)


def test_named_columns_win_over_detection_and_a_wrong_name_lists_the_columns(tmp_path):
    rows = [{"body": r["prompt"], "fields": r["completion"], "prompt": "not this"} for r in TICKETS]
    _, task = data.load(write(tmp_path, rows), Task(input_column="body", output_column="fields"))
    assert (task.input_column, task.output_column, task.output_format) == ("body", "fields", "json")
    with pytest.raises(InputError, match=r"--output_column=field is not a column of dataset .* \(found: body, fields, prompt\)"):
        data.load(write(tmp_path, rows), Task(input_column="body", output_column="field"))


def test_instruction_from_a_file(tmp_path):
    (tmp_path / "instruction.txt").write_text("  Find the product and the customer.\n")
    assert Task(instruction=f"@{tmp_path / 'instruction.txt'}").checked().instruction == "Find the product and the customer."
    with pytest.raises(InputError, match="--instruction @nowhere.txt: no such file"):
        Task(instruction="@nowhere.txt").checked()
    (tmp_path / "latin.txt").write_bytes("Café".encode("latin-1"))
    with pytest.raises(InputError, match="not UTF-8"):
        Task(instruction=f"@{tmp_path / 'latin.txt'}").checked()


def test_unknown_output_format_is_refused():
    with pytest.raises(InputError, match="--output_format must be one of json, slots, text"):
        Task(output_format="xml").checked()


def chat(system: str | None, user: str, assistant: str) -> dict:
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return {"messages": messages}


def test_chat_rows_give_input_target_and_their_system_message_as_the_instruction(tmp_path):
    rows = [chat("Extract the ticket fields as JSON.", r["prompt"], r["completion"]) for r in TICKETS]
    splits, task = data.load(write(tmp_path, rows), validation_fraction=0.25)
    assert (task.input_column, task.instruction, task.output_format) == ("messages", "Extract the ticket fields as JSON.", "json")
    row = (splits["train"] if TICKETS[0]["prompt"] in splits["train"]["input"] else splits["validation"])
    assert json.loads(row["output"][row["input"].index(TICKETS[0]["prompt"])]) == json.loads(TICKETS[0]["completion"])


def test_chat_rows_from_parquet_and_without_a_system_message(tmp_path):
    pd.DataFrame([chat(None, r["prompt"], r["completion"]) for r in TICKETS]).to_parquet(tmp_path / "train.parquet")
    _, task = data.load(str(tmp_path / "train.parquet"))
    assert task.instruction == of("json").instruction


@pytest.mark.parametrize("rows, message", [
    ([chat("A", "x", "y"), chat("B", "x", "y")] * 4, "2 different system messages; give the one instruction"),
    ([{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"},
                    {"role": "user", "content": "z"}, {"role": "assistant", "content": "w"}]}] * 8, "multi-turn"),
    ([{"messages": [{"role": "user", "content": "x"}]}] * 8, r"expected \[system,\] user, assistant"),
    ([{"messages": "not json"}] * 8, "messages is not a JSON list"),
])
def test_chat_rows_that_cannot_be_one_task_are_refused(tmp_path, rows, message):
    with pytest.raises(InputError, match=message):
        data.load(write(tmp_path, rows))


def test_json_targets_are_detected_and_rewritten_in_one_spelling(tmp_path):
    rows = [{"prompt": "a", "completion": {"b": 1, "c": "x"}}, {"prompt": "b", "completion": '{ "b" :2 }'}] * 4
    splits, task = data.load(write(tmp_path, rows), validation_fraction=0.25)
    assert task.output_format == "json" and task.instruction == of("json").instruction
    assert set(splits["train"]["output"]) | set(splits["validation"]["output"]) == {'{"b": 1, "c": "x"}', '{"b": 2}'}


def test_json_objects_keep_only_their_own_keys(tmp_path):
    rows = [{"prompt": "a", "completion": {"product": "VPN"}}, {"prompt": "b", "completion": {"customer": "Acme"}}] * 4
    splits, _ = data.load(write(tmp_path, rows), validation_fraction=0.25)
    assert all(len(json.loads(o)) == 1 for o in splits["train"]["output"])  # no `"customer": null` added


def test_slot_targets_become_json_objects_when_the_task_asks_for_json():
    splits, task = data.load(data.EMBEDDED_DATASET, Task(output_format="json"))
    assert task.instruction == E2E_JSON_INSTRUCTION
    (row,) = data.head(splits["test"], 1)
    assert json.loads(row["output"]) == dict(parse_mr(sample_data.generate(50, seed=2)[0]["mr"]))


def test_targets_that_do_not_fit_the_format_are_refused_with_the_row(tmp_path):
    rows = [{"prompt": "a", "completion": '{"b": 1}'}] * 7 + [{"prompt": "b", "completion": "just words"}]
    with pytest.raises(InputError, match=r"row 7: target is not a JSON object \(--output_format=json\): 'just words'"):
        data.load(write(tmp_path, rows), Task(output_format="json"))
    with pytest.raises(InputError, match=r"row 0: target has no key\[value\] pair"):
        data.load(write(tmp_path, rows), Task(output_format="slots"))


def test_mixed_targets_are_detected_as_text(tmp_path):
    rows = [{"text": "a", "label": '{"b": 1}'}] * 4 + [{"text": "b", "label": "plain words"}] * 4
    _, task = data.load(write(tmp_path, rows))
    assert task.output_format == "text" and task.instruction == of("text").instruction


def test_e2e_data_keeps_its_instruction_and_the_shipped_tickets_have_theirs():
    _, task = data.load(data.EMBEDDED_DATASET)
    assert dataclasses.replace(task, schema=None) == Task(input_column="sentence", output_column="mr",
                                                          instruction=E2E_INSTRUCTION, output_format="slots")
    _, task = data.load(data.TICKETS_DATASET)
    assert (task.instruction, task.output_format) == (sample_data.TICKETS_INSTRUCTION, "json")


def test_task_file_round_trips_and_a_folder_without_one_is_e2e(tmp_path):
    task = Task(input_column="body", output_column="fields", instruction="Find them.", output_format="json")
    task.save(tmp_path)
    assert Task.of_model(tmp_path) == task
    assert Task.of_model(tmp_path / "elsewhere") == E2E
    (tmp_path / TASK_FILE).write_text("{broken")
    with pytest.raises(InputError, match="is not a valid task file"):
        Task.of_model(tmp_path)


@pytest.fixture(scope="module")
def logged_tiny_model(tiny_model, tmp_path_factory):
    """The untrained tiny model (it never stops early) logged as the job logs its models."""
    from databricks_llm import tracking

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path_factory.mktemp('logged') / 'mlflow.db'}")
    with mlflow.start_run():
        return tracking.log_model_folder(tiny_model, name="final_model").model_uri


def test_params_are_honoured_as_mlflow_declares_them_and_a_rows_own_value_wins(logged_tiny_model):
    """The untrained model's greedy output is blank, unless structured decoding (the default) holds
    it to the task's format; sampled at a high temperature, its 600-token vocabulary gives tens of
    characters for 40 tokens and a few for one."""
    served = mlflow.pyfunc.load_model(logged_tiny_model)
    free = {"structured_decoding": False}
    prompt = [{"prompt": "Aromi is a pub near Clowns."}]
    assert served.predict(prompt, params=free) == [""]
    assert served.predict(prompt, params={"max_tokens": 8}) != [""]
    (long,) = served.predict(prompt, params={"max_tokens": 40, "temperature": 5.0, **free})
    (short,) = served.predict([{**prompt[0], "max_tokens": 1}], params={"max_tokens": 40, "temperature": 5.0, **free})
    assert len(long) > 40 and len(short) < 25


@pytest.fixture(scope="module")
def legacy_model(tmp_path_factory) -> Path:
    """The model logged by the code before tasks were saved (see tests/fixtures/README.md)."""
    folder = tmp_path_factory.mktemp("legacy")
    with tarfile.open(LEGACY_ARCHIVE) as archive:
        archive.extractall(folder, filter="data")
    return folder / "legacy_model"


def test_a_model_logged_before_tasks_were_saved_still_serves_the_e2e_task(legacy_model):
    script = (f"import mlflow; m = mlflow.pyfunc.load_model({str(legacy_model)!r}); "
              "print(repr(m.predict({'prompt': 'Aromi is a pub.', 'temperature': 0.0, 'max_tokens': 4})))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().startswith("['")


def test_evaluate_scores_a_model_logged_before_tasks_as_e2e_slots(legacy_model, tmp_path):
    result = run_module("databricks_llm.evaluate", f"--model_uri={legacy_model}", "--max_samples=4", "--max_tokens=4",
                        f"--job_dir={tmp_path}", f"--output_json={tmp_path / 'scores.json'}")
    assert result.returncode == 0, result.stderr[-2000:]
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["n"] == 4 and set(scores["per_field"]) <= set(E2E_SLOTS)  # scored as E2E's slots
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.data.params["instruction"] == E2E_INSTRUCTION and run.data.params["prompt_version"] == "v2"


def test_prepared_data_carries_its_task_so_training_needs_no_task_flags(tmp_path):
    rows = [chat("Extract the ticket fields as JSON.", r["prompt"], r["completion"]) for r in TICKETS]
    splits, task = data.load(write(tmp_path, rows))
    data.save_prepared(splits, task, str(tmp_path / "prepared"))
    again, reloaded = data.load(str(tmp_path / "prepared"))
    assert (reloaded.instruction, reloaded.output_format) == (task.instruction, "json")
    assert (reloaded.input_column, reloaded.output_column) == ("input", "output")
    assert again["train"]["output"] == splits["train"]["output"]

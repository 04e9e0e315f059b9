"""Span-annotated rows (text + labelled spans, as annotation tools export them) loaded as JSON
targets: each shape, a label given twice, no spans, and malformed spans refused by row."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from databricks_llm import data, fine_tune
from databricks_llm.errors import InputError
from databricks_llm.notebook import chain_parameters
from databricks_llm.task import Task

SNIPS = Path(__file__).resolve().parents[2] / "shared" / "data" / "snips"
TEXT = "add clem burke in my playlist Pre-Party R&B Jams"
SLOTS = [{"slot": "artist", "value": "clem burke", "start": 4, "end": 14},
         {"slot": "playlist_owner", "value": "my", "start": 18, "end": 20},
         {"slot": "playlist", "value": "Pre-Party R&B Jams", "start": 30, "end": 48}]
FRAME = {"intent": "AddToPlaylist", "artist": "clem burke", "playlist_owner": "my", "playlist": "Pre-Party R&B Jams"}
OTHER = {"text": "play jazz", "intent": "PlayMusic", "slots": [{"slot": "genre", "value": "jazz", "start": 5, "end": 9}]}


def write(tmp_path: Path, rows: list[dict], name: str = "train.jsonl") -> str:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def frames(rows: list[dict], tmp_path: Path, **task) -> list[dict]:
    """The targets of `rows` as the validation split (the training split holds them twice, so that
    label columns have repeated values as labels do), in order."""
    write(tmp_path, rows * 2, "train.jsonl")
    write(tmp_path, rows, "dev.jsonl")
    splits, _ = data.load(str(tmp_path), Task(**task))
    return [json.loads(t) for t in splits["validation"][data.OUTPUT]]


def test_snips_slot_value_objects_become_a_frame_with_the_intent_first(tmp_path):
    row = {"text": TEXT, "intent": "AddToPlaylist", "slots": SLOTS}
    assert frames([row, OTHER], tmp_path)[0] == FRAME
    assert list(frames([row, OTHER], tmp_path)[0]) == ["intent", "artist", "playlist_owner", "playlist"]


def test_the_task_records_the_spans_and_label_columns_and_asks_for_json(tmp_path):
    _, task = data.load(write(tmp_path, [{"text": TEXT, "intent": "AddToPlaylist", "slots": SLOTS}, OTHER] * 2))
    assert (task.input_column, task.spans_column, task.label_columns, task.output_format) == ("text", "slots", "intent", "json")
    assert "intent" in task.instruction


def test_start_end_label_objects_in_any_order_come_out_in_sentence_order(tmp_path):
    spans = [{"start": 30, "end": 48, "label": "playlist"}, {"start": 4, "end": 14, "label": "artist"}]
    assert frames([{"text": TEXT, "entities": spans}], tmp_path) == [{"artist": "clem burke", "playlist": "Pre-Party R&B Jams"}]


def test_doccano_triples(tmp_path):
    rows = [{"text": TEXT, "label": [[30, 48, "playlist"], [4, 14, "artist"]]}]
    assert frames(rows, tmp_path) == [{"artist": "clem burke", "playlist": "Pre-Party R&B Jams"}]


def test_slot_value_objects_without_offsets_are_found_in_the_text(tmp_path):
    rows = [{"text": "from paris to paris", "slots": [{"slot": "from", "value": "paris"}, {"slot": "to", "value": "paris"}]}]
    assert frames(rows, tmp_path) == [{"from": "paris", "to": "paris"}]


def test_a_label_given_twice_keeps_both_values_as_a_list(tmp_path):
    rows = [{"text": "play abba then queen", "slots": [[5, 9, "artist"], [15, 20, "artist"]]}]
    assert frames(rows, tmp_path) == [{"artist": ["abba", "queen"]}]


def test_a_row_without_spans_is_its_label_columns_alone(tmp_path):
    rows = [{"text": "hello there", "intent": "Greet", "slots": []}, {"text": "play jazz", "intent": "PlayMusic",
                                                                            "slots": [[5, 9, "genre"]]}]
    assert frames(rows, tmp_path) == [{"intent": "Greet"}, {"intent": "PlayMusic", "genre": "jazz"}]


def test_flags_name_the_spans_and_label_columns(tmp_path):
    rows = [{"utt": "play jazz", "domain": "music", "tags": [[5, 9, "genre"]], "id": "a"}]
    assert frames(rows, tmp_path, input_column="utt", spans_column="tags", label_columns="domain") == [
        {"domain": "music", "genre": "jazz"}]


def test_csv_spans_as_json_text(tmp_path):
    pd.DataFrame([{"text": "play jazz", "spans": json.dumps([[5, 9, "genre"]])}] * 4).to_csv(tmp_path / "train.csv", index=False)
    splits, task = data.load(str(tmp_path / "train.csv"), validation_fraction=0.5)
    assert json.loads(splits["validation"][data.OUTPUT][0]) == {"genre": "jazz"} and task.spans_column == "spans"


@pytest.mark.parametrize("spans, rule", [
    ([[4, 14, "artist"], [10, 20, "playlist"]], "overlaps span 'artist'"),
    ([[40, 60, "playlist"]], "falls outside the text"),
    ([[-1, 3, "x"]], "falls outside the text"),
    ([{"slot": "artist", "value": "clem burkes", "start": 4, "end": 14}], "covers 'clem burke', not its value 'clem burkes'"),
    ([{"slot": "artist", "value": "bowie"}], "does not occur in the text"),
    ([[4, 14]], "is not a [start, end, label] triple"),
    ([{"start": 4, "end": 14}], "has no label"),
])
def test_malformed_spans_are_refused_naming_the_row(tmp_path, spans, rule):
    good = {"text": TEXT, "slots": [[4, 14, "artist"]]}
    source = write(tmp_path, [good, good, {"text": TEXT, "slots": spans}])
    with pytest.raises(InputError, match=r"split 'train' row 2: .*" + rule.replace("[", r"\[").replace("(", r"\(")):
        data.load(source, Task(spans_column="slots"))


def test_malformed_spans_stop_fine_tune_with_one_error_line_naming_the_row(tmp_path, capsys, tiny_model):
    source = write(tmp_path, [{"text": "play jazz", "slots": [[5, 9, "genre"]]}, {"text": "play jazz", "slots": [[5, 90, "genre"]]}])
    code = fine_tune.main([f"--dataset={source}", f"--model={tiny_model}", f"--output_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: dataset") and "row 1: span 'genre' [5, 90) falls outside" in err[-1]


@pytest.mark.skipif(not SNIPS.is_dir(), reason="shared SNIPS data absent")
def test_the_snips_folder_loads_as_train_and_validation():
    splits, task = data.load(str(SNIPS))
    assert (len(splits["train"]), len(splits["validation"])) == (13084, 700)
    assert task.label_columns == "intent"
    assert all(json.loads(t)["intent"] for t in splits["validation"][data.OUTPUT])


def test_prepared_span_data_loads_again_as_the_same_frames_and_task(tmp_path):
    rows = [{"text": TEXT, "intent": "AddToPlaylist", "slots": SLOTS}, OTHER]
    splits, task = data.load(write(tmp_path, rows * 2), validation_fraction=0.5, seed=0)
    data.save_prepared(splits, task, str(tmp_path / "prepared"))
    again, task_again = data.load(str(tmp_path / "prepared"))
    assert again["train"][data.OUTPUT] == splits["train"][data.OUTPUT]
    assert (task_again.spans_column, task_again.label_columns, task_again.output_format) == ("slots", "intent", "json")


def test_the_snips_notebook_profile_prepares_the_snips_folder_unless_told_otherwise(tmp_path):
    prepare = chain_parameters("snips", tmp_path)[0]
    assert prepare["dataset"] == "../shared/data/snips"
    assert chain_parameters("snips", tmp_path, dataset="my/spans")[0]["dataset"] == "my/spans"

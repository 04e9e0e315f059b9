"""The slot-filling literature's metrics on hand-computed examples, and E2E's exact match with
synonym labels taken as equal."""

from __future__ import annotations

import json

import pytest

from databricks_llm import e2e_synonyms, frame_metrics, task_metrics
from databricks_llm.task import Task

REFERENCES = [
    {"intent": "PlayMusic", "artist": "abba", "genre": "pop"},
    {"intent": "GetWeather", "city": "Paris"},
    {"intent": "AddToPlaylist", "artist": ["abba", "queen"], "playlist": "mine"},
]
PREDICTIONS = [
    {"intent": "PlayMusic", "artist": "ABBA", "genre": "pop"},         # all right (case normalised)
    {"intent": "BookRestaurant", "city": "Paris"},                     # intent wrong, slot right
    {"intent": "AddToPlaylist", "artist": ["abba"], "playlist": "me"},  # 1 of 3 slots... right: abba
]


def scores() -> dict:
    return frame_metrics.frame_scores(PREDICTIONS, REFERENCES, ["intent"])


def test_intent_accuracy_is_the_share_of_rows_with_the_right_label():
    assert scores()["label_accuracy"] == {"intent": pytest.approx(2 / 3)}


def test_slot_f1_is_micro_over_slot_value_pairs_counting_each_list_element():
    # reference pairs: 2 + 1 + 3 = 6; predicted: 2 + 1 + 2 = 5; right: 2 + 1 + 1 = 4
    s = scores()
    assert (s["slot_precision"], s["slot_recall"]) == (pytest.approx(4 / 5), pytest.approx(4 / 6))
    assert s["slot_f1"] == pytest.approx(2 * (4 / 5) * (4 / 6) / (4 / 5 + 4 / 6))


def test_frame_accuracy_needs_every_label_and_every_slot():
    assert scores()["frame_accuracy"] == pytest.approx(1 / 3)


def test_per_slot_table_has_precision_recall_f1_and_support():
    per_slot = scores()["per_slot"]
    assert per_slot["artist"] == (pytest.approx(1.0), pytest.approx(2 / 3), pytest.approx(0.8), 3)
    assert per_slot["playlist"] == (0.0, 0.0, 0.0, 1)
    table = frame_metrics.per_slot_table({"frame": scores()})
    assert table["slot"] == ["artist", "city", "genre", "playlist"] and table["support"] == [3, 1, 1, 1]


def test_a_slot_twice_in_the_prediction_but_once_in_the_reference_is_one_false_positive():
    s = frame_metrics.frame_scores([{"artist": ["abba", "abba"]}], [{"artist": "abba"}], [])
    assert (s["slot_precision"], s["slot_recall"], s["frame_accuracy"]) == (0.5, 1.0, 0.0)


def test_an_unparseable_output_has_no_slots_and_a_wrong_label():
    task = Task(spans_column="slots", label_columns="intent", output_format="json")
    s = frame_metrics.task_scores(task, ["not json", json.dumps(REFERENCES[1])], [json.dumps(r) for r in REFERENCES[:2]])
    assert s["frame"]["label_accuracy"]["intent"] == 0.5 and s["frame"]["slot_recall"] == pytest.approx(1 / 3)


def test_metrics_are_named_after_the_label_columns():
    metrics = frame_metrics.metric_dict({"frame": scores()}, "eval_")
    assert set(metrics) == {"eval_intent_accuracy", "eval_slot_precision", "eval_slot_recall", "eval_slot_f1",
                            "eval_frame_accuracy"}


def test_tasks_without_spans_get_no_frame_metrics():
    assert frame_metrics.task_scores(Task(output_format="json"), ["{}"], ["{}"]) == {}


def test_e2e_synonym_labels_count_as_equal_only_in_the_second_metric():
    references = ["name[A], priceRange[cheap], customer rating[5 out of 5]", "name[B], priceRange[£20-25]"]
    predictions = ["name[A], priceRange[less than £20], customer rating[high]", "name[B], priceRange[high]"]
    scores_ = task_metrics.extra_scores(Task(output_format="slots"), predictions, references)
    assert scores_ == {"exact_match_synonyms": 0.5}
    assert task_metrics.extra_metrics(scores_, "eval_") == {"eval_exact_match_synonyms": 0.5}


def test_the_synonym_metric_is_only_for_e2e():
    assert not e2e_synonyms.is_e2e("slots", ["colour[red]"])
    assert e2e_synonyms.is_e2e("json", ['{"name": "A", "priceRange": "cheap"}'])

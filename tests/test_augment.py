"""Span-copy augmentation (`--augment_names`): open values swapped for invented names, input and target alike."""

from __future__ import annotations

import json
import random

import datasets

from conftest import QUICK_JOB, run_module
from databricks_llm import augment, data, sample_data
from databricks_llm.task import Task
from databricks_llm.scoring import parse_mr

SENTENCE = "Located near The Sorrento, The Mill is a cheap coffee shop. The Mill is in the riverside area."
MR = "name[The Mill], eatType[coffee shop], priceRange[cheap], area[riverside], near[The Sorrento]"


def e2e_task():
    return data.load("embedded:e2e-sample")[1]


def test_the_open_fields_of_e2e_are_name_and_near():
    assert augment.open_fields(e2e_task()) == {"name", "near"}


def test_every_mention_of_a_name_changes_with_its_slot_and_closed_values_stay():
    text, target = augment.substitute(SENTENCE, MR, "slots", {"name", "near"}, random.Random(0))
    slots = dict(parse_mr(target))
    assert "The Mill" not in text and "The Sorrento" not in text
    assert text.count(slots["name"]) == 2 and slots["near"] in text and slots["name"] != slots["near"]
    assert {k: v for k, v in slots.items() if k not in ("name", "near")} == {
        "eatType": "coffee shop", "priceRange": "cheap", "area": "riverside"}
    assert [k for k, _ in parse_mr(target)] == [k for k, _ in parse_mr(MR)]


def test_a_value_the_input_does_not_spell_out_is_left_alone():
    text, target = augment.substitute("the mill is a pub.", "name[The Mill], eatType[pub]", "slots", {"name"},
                                      random.Random(0))
    assert (text, target) == ("the mill is a pub.", "name[The Mill], eatType[pub]")


def test_json_targets_get_the_same_names_as_their_input_and_stay_valid_json():
    target = json.dumps({"product": "Mobile App", "severity": "high", "customer": "Globex"})
    text, new = augment.substitute("Globex here: the Mobile App crashes.", target, "json", {"product", "customer"},
                                   random.Random(1))
    fields = json.loads(new)
    assert fields["severity"] == "high" and fields["product"] in text and fields["customer"] in text
    assert "Globex" not in text and "Mobile App" not in text


def test_the_chosen_fraction_of_rows_changes_and_the_rest_do_not():
    task = e2e_task()
    rows = datasets.Dataset.from_list([{"input": SENTENCE, "output": MR}] * 40)
    augmented, changed = augment.augment_names(rows, task, 0.25, seed=3)
    assert changed == 10 and sum(r["output"] != MR for r in augmented) == 10 and len(augmented) == 40
    assert augmented.column_names == rows.column_names


def test_text_tasks_have_nothing_to_swap():
    splits, task = data.load("embedded:e2e-sample", Task(output_format="text"))
    assert augment.augment_names(splits["train"], task, 1.0, seed=0)[1] == 0


def test_invented_names_are_never_those_of_the_unseen_names_test_set():
    rng = random.Random(0)
    invented = {augment.invented_name(rng).lower() for _ in range(20_000)}
    assert len(invented) > 1_000
    assert not invented & {n.lower().removeprefix("the ") for n in sample_data.UNSEEN_NAMES + sample_data.UNSEEN_NEAR}


def test_invented_names_follow_e2es_article_convention():
    rng = random.Random(0)
    assert not [n for n in (augment.invented_name(rng) for _ in range(5_000)) if n.startswith("the ")]
    for seed in range(200):  # "the Blue Spice" never becomes "the The Velvet Otter"
        text, target = augment.substitute("Near the Blue Spice is Zizzi.", "name[Zizzi], near[Blue Spice]", "slots",
                                          {"name", "near"}, random.Random(seed))
        assert "the The " not in text and dict(parse_mr(target))["near"] in text


def test_a_job_with_augmented_names_says_how_many_rows_changed(tiny_model, tmp_path):
    result = run_module("databricks_llm.fine_tune", f"--model={tiny_model}", f"--output_dir={tmp_path}", *QUICK_JOB,
                        "--max_steps=1", "--eval_strategy=no", "--save_steps=100", "--augment_names=0.5")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[data] --augment_names=0.5: invented names in 8 training rows" in result.stdout

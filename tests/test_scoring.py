"""Slot scorer: parsing of messy model output and hand-computed scores."""

from __future__ import annotations

import pytest

from databricks_llm.scoring import metric_dict, parse_mr, slot_scores

REF = "name[The Punter], eatType[coffee shop], food[Chinese], priceRange[high], near[Café Sicilia]"


def test_parse_canonical_mr():
    assert parse_mr(REF) == [("name", "The Punter"), ("eatType", "coffee shop"), ("food", "Chinese"),
                             ("priceRange", "high"), ("near", "Café Sicilia")]


@pytest.mark.parametrize("text, expected", [
    ("name[ The  Punter ]  eatType[pub]", [("name", "The Punter"), ("eatType", "pub")]),  # spaces, no comma
    ("Sure! The MR is name[Aromi], area[riverside]. Hope this helps", [("name", "Aromi"), ("area", "riverside")]),
    ("Customer  Rating[high], EATTYPE[pub]", [("customer rating", "high"), ("eatType", "pub")]),
    ("eatType[pub], eatType[restaurant]", [("eatType", "pub"), ("eatType", "restaurant")]),
    ("wifi[yes], name[X]", [("wifi", "yes"), ("name", "X")]),
    ("name[unclosed, food[Indian]", [("food", "Indian")]),
    ("name[The [Best] Pub], food[Chinese]", [("name", "The [Best] Pub"), ("food", "Chinese")]),  # brackets in a value
    ("food[Thai], name[A [B [C]] D], area[city centre]", [("food", "Thai"), ("name", "A [B [C]] D"), ("area", "city centre")]),
    ("name[[Aromi]]", [("name", "[Aromi]")]),
    ("near[x]] food[Indian]", [("near", "x"), ("food", "Indian")]),  # a stray closing bracket is junk
    ("", []),
    (None, []),
])
def test_parse_is_robust_to_messy_output(text, expected):
    assert parse_mr(text) == expected


def test_perfect_predictions_score_one():
    scores = slot_scores([REF], [REF])
    assert (scores["precision"], scores["recall"], scores["f1"], scores["exact_match"]) == (1.0, 1.0, 1.0, 1.0)


def test_hand_computed_micro_scores():
    predictions = ["name[The Punter], eatType[pub], food[chinese]",  # 2 right (case-insensitive value), 1 wrong
                   "name[Aromi], area[riverside], near[X]"]          # all 3 right
    references = ["name[The Punter], eatType[coffee shop], food[Chinese], priceRange[high]",
                  "name[Aromi], area[riverside], near[X]"]
    scores = slot_scores(predictions, references)
    # tp = 2 + 3 = 5, fp = 1, fn = 2 -> P = 5/6, R = 5/7, F1 = 2PR/(P+R) = 10/13
    assert scores["precision"] == pytest.approx(5 / 6)
    assert scores["recall"] == pytest.approx(5 / 7)
    assert scores["f1"] == pytest.approx(10 / 13)
    assert scores["exact_match"] == 0.5
    assert scores["n"] == 2


def test_per_slot_f1_only_for_slots_seen():
    scores = slot_scores(["name[A], eatType[pub]"], ["name[A], eatType[restaurant]"])
    assert scores["per_slot"] == {"name": 1.0, "eatType": 0.0}


def test_garbage_output_scores_zero_without_raising():
    scores = slot_scores(["I cannot help with that.", ""], [REF, "name[A]"])
    assert scores["f1"] == 0.0 and scores["precision"] == 0.0 and scores["recall"] == 0.0


def test_repeated_pairs_count_as_a_multiset():
    scores = slot_scores(["name[A], name[A]"], ["name[A]"])
    assert scores["precision"] == 0.5 and scores["recall"] == 1.0 and scores["exact_match"] == 0.0


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        slot_scores(["a", "b"], ["c"])


def test_metric_names_are_flat_and_mlflow_safe():
    metrics = metric_dict(slot_scores([REF], [REF]), "eval_")
    assert metrics["eval_slot_f1"] == 1.0 and metrics["eval_exact_match"] == 1.0
    assert "eval_slot_f1_near" in metrics and all(" " not in k for k in metrics)


def test_same_mr_ignores_order_case_and_spacing_but_not_values():
    from databricks_llm.scoring import same_mr

    assert same_mr("eatType[Pub],  name[A]", "name[A], eatType[pub]")
    assert not same_mr("name[A], eatType[pub]", "name[A], eatType[restaurant]")

"""Scorers for each output format: parsing of messy model output and hand-computed scores."""

from __future__ import annotations

import functools

import pytest

from databricks_llm.formats import of
from databricks_llm.scoring import flatten, metric_dict, parse_json, parse_mr, score

slot_scores = functools.partial(score, of("slots"))

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
    assert scores["per_field"] == {"name": 1.0, "eatType": 0.0}


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
    metrics = metric_dict(slot_scores([REF], [REF]), "eval_", of("slots"))
    assert metrics["eval_f1"] == metrics["eval_slot_f1"] == 1.0 and metrics["eval_exact_match"] == 1.0
    assert "eval_f1_near" in metrics and "eval_slot_f1_near" in metrics and all(" " not in k for k in metrics)


def test_slot_exact_match_ignores_order_case_and_spacing_but_not_values():
    assert of("slots").exact("eatType[Pub],  name[A]", "name[A], eatType[pub]")
    assert not of("slots").exact("name[A], eatType[pub]", "name[A], eatType[restaurant]")


def test_json_parsing_accepts_only_one_object():
    assert parse_json(' {"a": 1} ') == {"a": 1}
    assert parse_json('{"a": 1') is None  # cut short
    assert parse_json('{"a": 1} and more') is None
    assert parse_json("[1, 2]") is None and parse_json(None) is None


def test_json_values_flatten_to_key_paths_with_normalised_values():
    value = {"customer": {"name": " Acme  Corp", "tier": 1.0}, "tags": ["VPN", "eu"], "urgent": True, "note": None, "x": {}}
    assert sorted(flatten(value)) == [("customer.name", "acme corp"), ("customer.tier", "1"), ("note", "null"),
                                      ("tags[]", "eu"), ("tags[]", "vpn"), ("urgent", "true")]


def test_hand_computed_json_field_scores():
    references = ['{"product": "VPN Client", "severity": "high", "customer": {"name": "Acme"}}',
                  '{"product": "SSO Login", "severity": "low"}']
    predictions = ['{"product": "vpn client", "severity": "low", "customer": {"name": "Acme"}}',  # 2 of 3 right
                   '{"product": "SSO Login", "severity": "low"']                                 # malformed: 0 of 2
    scores = score(of("json"), predictions, references)
    # tp = 2, fp = 1, fn = 1 + 2 = 3 -> P = 2/3, R = 2/5, F1 = 2PR/(P+R) = 1/2
    assert (scores["precision"], scores["recall"], scores["f1"]) == pytest.approx((2 / 3, 2 / 5, 1 / 2))
    assert scores["parse_rate"] == 0.5 and scores["exact_match"] == 0.0
    assert scores["per_field"] == {"product": pytest.approx(2 / 3), "severity": 0.0, "customer.name": 1.0}
    assert of("json").exact('{"b": 2, "a": "X"}', '{"a": "x", "b": 2.0}')


def test_json_metrics_add_the_parse_rate_and_keep_no_slot_names():
    metrics = metric_dict(score(of("json"), ['{"a": 1}'], ['{"a": 1}']), "eval_", of("json"))
    assert metrics["eval_f1"] == 1.0 and metrics["eval_json_parse_rate"] == 1.0 and metrics["eval_f1_a"] == 1.0
    assert not any("slot" in k for k in metrics)


def test_hand_computed_text_scores():
    scores = score(of("text"), ["The Crown", "blue  Pub"], ["The Crown and Anchor", "Blue pub"])
    # row 1: 2 common of 2 predicted / 4 reference tokens -> P 1, R 1/2, F1 2/3; row 2: exact -> 1
    assert (scores["precision"], scores["recall"], scores["f1"]) == pytest.approx((1.0, 3 / 4, 5 / 6))
    assert scores["exact_match"] == 0.5 and scores["per_field"] == {}


def test_each_wrong_record_is_classified_by_error_type_and_field():
    from databricks_llm.error_analysis import closed_vocabulary, record_errors

    reference = "name[Quick Bite], eatType[pub], area[riverside], near[The Crown and Anchor]"
    vocabulary = closed_vocabulary("slots", [reference])
    cases = {
        reference: [],
        "Sorry, no idea.": [("unparseable", "")],
        "name[Quick Bite], eatType[pub], area[riverside], near[Quick Bite]": [("wrong_value", "near")],
        "name[Quick Bite], eatType[pub], near[The Crown and Anchor]": [("missing", "area")],
        "name[Quick Bite], eatType[pub], eatType[pub], area[riverside], near[The Crown and Anchor]": [("duplicated_key", "eatType")],
        "name[Quick Bite], eatType[bar], area[riverside], near[The Crown and Anchor], food[Thai]":
            [("invented", "food"), ("wrong_value", "eatType"), ("out_of_vocabulary", "eatType"), ("out_of_vocabulary", "food")],
    }
    for prediction, expected in cases.items():
        assert record_errors("slots", prediction, reference, vocabulary) == expected, prediction


def test_error_report_counts_types_and_fields_for_json_and_text():
    from databricks_llm.error_analysis import error_report

    report = error_report("json", ['{"product": "VPN"}', '{"product": "VPN"', '{"product": "VPN", "customer": "Acme"}'],
                          ['{"product": "VPN", "severity": "high"}', '{"product": "VPN"}', '{"product": "VPN"}'])
    assert report["errors"]["missing"] == 1 and report["errors"]["unparseable"] == 1 and report["errors"]["invented"] == 1
    assert report["errors_by_field"]["missing"] == {"severity": 1} and report["wrong_records"] == 3
    assert report["per_record"] == ["missing:severity", "unparseable", "invented:customer"]
    assert error_report("text", ["a", "b"], ["a", "c"])["per_record"] == ["", "wrong_value:text"]


def test_most_common_faults_name_the_values_missed_invented_or_confused():
    from databricks_llm.error_analysis import error_report, summary_lines

    reference = "name[The Mill], priceRange[less than £20], near[Café Rouge]"
    predictions = ["name[The Mill], priceRange[cheap]", "name[The Mill], priceRange[cheap], familyFriendly[yes]",
                   reference, "Sorry, no idea."]
    report = error_report("slots", predictions, [reference] * 4)
    assert report["most_common_faults"] == [("priceRange: less than £20 -> cheap", 2), ("near[café rouge] missing", 2),
                                            ("familyFriendly[yes] invented", 1)]
    assert summary_lines(report)[-1] == ("most common faults: priceRange: less than £20 -> cheap 2; "
                                         "near[café rouge] missing 2; familyFriendly[yes] invented 1")
    assert error_report("text", ["a"], ["b"])["most_common_faults"] == []
    assert error_report("json", ["{}"], ['{"product": "VPN"}'])["most_common_faults"] == [("product[vpn] missing", 1)]


def test_every_format_is_asked_by_name_and_detected_from_its_targets():
    from databricks_llm.formats import FORMATS, detect

    assert set(FORMATS) == {"slots", "json", "text"} and all(of(name).name == name for name in FORMATS)
    assert detect(['{"a": "b[c]"}']).name == "json"  # a JSON target that also reads as slots is JSON
    assert detect(["a[b], c[d]"]).name == "slots" and detect(["free words"]).name == "text"


def test_a_label_given_twice_becomes_a_list_in_a_json_target_never_a_dropped_value():
    assert of("json").target("customer rating[high], customer rating[5 out of 5]") == \
        '{"customer rating": ["high", "5 out of 5"]}'
    assert of("json").pairs('{"a": ["x", "y"]}') == of("json").pairs('{"a": ["y", "x"]}')

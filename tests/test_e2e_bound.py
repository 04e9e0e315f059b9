"""E2E's exact-match bound by the aligner's rules, on hand-checked rows: what the aligner labels a
sentence with, which choices only the original MR decides, and the bound they leave."""

from __future__ import annotations

import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from e2e_aligner import align, ties  # noqa: E402
from label_ambiguity import majorities, out_of_reach  # noqa: E402

RICE_BOAT = "The Rice Boat is a cheap pub near Café Adriatic."


@pytest.mark.parametrize("original, price", [("priceRange[less than £20]", "less than £20"), ("priceRange[cheap]", "cheap"),
                                             ("", "cheap")])
def test_a_tied_wording_takes_the_original_value_else_the_first_in_the_aligners_order(original, price):
    assert align(RICE_BOAT, f"name[The Rice Boat], {original}") == {
        ("name", "The Rice Boat"), ("eatType", "pub"), ("priceRange", price), ("near", "Café Adriatic")}


def test_a_wording_inside_a_longer_one_is_dropped():
    # "Café" (coffee shop) lies inside "Café Adriatic"; "low customer rating" inside the longer numeric wording
    assert ("eatType", "coffee shop") not in align(RICE_BOAT)
    text = "Zizzi has a low customer rating of 1 out of 5."
    assert align(text, "customer rating[low]") == {("name", "Zizzi"), ("customer rating", "1 out of 5")}
    assert ties(text) == []


def test_ties_are_the_choices_only_the_original_mr_makes():
    assert ties("Zizzi is highly rated.") == [((("customer rating", "5 out of 5"), ("customer rating", "high")), 9, 21)]
    assert align("Zizzi is highly rated.", "customer rating[high]") == {("name", "Zizzi"), ("customer rating", "high")}
    assert ties("Zizzi is near The Rice Boat.") == [((("name", "The Rice Boat"), ("near", "The Rice Boat")), 14, 27)]


def test_two_values_of_one_slot_both_stay():
    assert align("Zizzi is a pub and a coffee shop.") == {("name", "Zizzi"), ("eatType", "pub"), ("eatType", "coffee shop")}


def test_the_bound_counts_rows_against_their_wordings_majority_and_keys_given_twice(capsys):
    train = [("Zizzi is cheap.", "name[Zizzi], priceRange[cheap]")] * 3 + [
        ("Zizzi is cheap.", "name[Zizzi], priceRange[less than £20]"),
        ("Aromi is near The Rice Boat.", "name[Aromi], near[The Rice Boat]")]
    test = [("Cotto is cheap.", "name[Cotto], priceRange[cheap]"),                   # majority: reachable
            ("Cotto is cheap.", "name[Cotto], priceRange[less than £20]"),           # against the majority
            ("Cotto is near The Rice Boat.", "name[Cotto], near[The Rice Boat]"),    # "near" decides: reachable
            ("Cotto is a pub and a coffee shop.", "name[Cotto], eatType[pub], eatType[coffee shop]")]  # key twice
    assert out_of_reach(test, majorities(train), "hand") == pytest.approx(0.5)
    assert "1 of 4 (0.250); whose reference gives a key twice: 1 (0.250)" in capsys.readouterr().out

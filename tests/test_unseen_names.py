"""The generalization test set: at least 200 rows whose names and near places E2E never uses."""

from __future__ import annotations

import pandas as pd
import pytest

from conftest import REPO, SHARED_E2E
from databricks_llm import data, sample_data
from databricks_llm.scoring import parse_mr

UNSEEN = REPO / "benchmarks" / "data" / "e2e_unseen_names"


def names(mrs) -> set[str]:
    return {v.lower() for mr in mrs for k, v in parse_mr(mr) if k in ("name", "near")}


def test_the_committed_set_is_what_the_generator_makes_and_loads_as_a_test_split():
    committed = pd.read_csv(UNSEEN / "test.csv")
    assert committed.to_dict("records") == [{"mr": r["mr"], "sentence": r["sentence"]}
                                            for r in sample_data.unseen_names(250, seed=2026)]
    splits, task = data.load(str(UNSEEN), need_train=False)
    assert list(splits) == ["test"] and len(splits["test"]) == 250 and task.output_format == "slots"


def test_its_labels_follow_e2es_article_convention_and_are_spelt_out_in_the_sentence():
    """A capital "The" belongs to a name, a lowercase "the" before it to the sentence (E2E: "near the
    Crowne Plaza Hotel" -> `near[Crowne Plaza Hotel]`; "near The Bakers" -> `near[The Bakers]`)."""
    for row in pd.read_csv(UNSEEN / "test.csv").to_dict("records"):
        for key, value in parse_mr(row["mr"]):
            if key in ("name", "near"):
                assert not value.startswith("the ") and value in row["sentence"], row


def test_its_names_are_not_those_of_the_embedded_sample():
    assert not names(pd.read_csv(UNSEEN / "test.csv")["mr"]) & {n.lower() for n in sample_data.NAMES + sample_data.NEAR}


@pytest.mark.skipif(not SHARED_E2E.exists(), reason="shared E2E data not present")
def test_its_names_occur_nowhere_in_the_e2e_data():
    unseen = names(pd.read_csv(UNSEEN / "test.csv")["mr"])
    for file in (SHARED_E2E / "cleaned").glob("*.csv"):
        frame = pd.read_csv(file)
        assert not unseen & names(frame["mr"]), file.name
        text = " ".join(frame["ref"].str.lower())
        assert not [n for n in unseen if n in text], file.name

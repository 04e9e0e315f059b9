"""How far E2E's labels let exact match go: the same wording labelled two ways.

    python benchmarks/label_ambiguity.py                                      # the data alone
    python benchmarks/label_ambiguity.py --predictions=<evaluate's predictions.json>   # and a model's rows

E2E gives priceRange and customer rating two label sets for one meaning (`cheap` and `less than
£20`, `high` and `5 out of 5`, ...): the crowd worker saw one of them and wrote "cheap" or "low
prices" either way, and the cleaned references keep the label the worker saw. For each common
wording this prints how the training and test references label the rows whose text uses it, and the
share a model loses on those rows even when it always picks the wording's most frequent label.
Rows whose reference gives a key twice are counted too: structured decoding never writes one.
With `--predictions` (the per-example table `evaluate` logs to MLflow) it also prints the model's
exact match when a label is taken to equal its synonym, which says how many of its wrong records
are that choice and nothing else.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

from databricks_llm import data
from databricks_llm.errors import InputError
from databricks_llm.scoring import exact, key_counts, pairs

E2E = Path(__file__).resolve().parents[2] / "shared" / "data" / "e2e_nlg" / "cleaned"
WORDINGS = {  # slot: (wording, regex over the input text)
    "priceRange": [("cheap", r"\bcheap"), ("low price", r"\blow[- ]?(cost|pric)"), ("affordable", r"\baffordabl|inexpensive"),
                   ("expensive", r"(?<!in)expensive|pricey|costly"), ("high price", r"\bhigh[- ]?pric"),
                   ("moderate", r"\bmoderate"), ("average price", r"\baverage[- ]?pric|mid[- ]?(range|pric)|medium[- ]?pric"),
                   ("reasonable", r"\breasonabl")],
    "customer rating": [("low rating", r"\blow(ly)?[- ]?(customer )?rat|poor(ly)?[- ]?rat|one[- ]star|1[- ]star"),
                        ("high rating", r"\bhigh(ly)?[- ]?(customer )?rat|five[- ]star|5[- ]star"),
                        ("average rating", r"\baverage[- ]?(customer )?rat|three[- ]star|3[- ]star")],
}
SYNONYMS = {"priceRange": [("cheap", "less than £20"), ("moderate", "£20-25"), ("high", "more than £30")],
            "customer rating": [("low", "1 out of 5"), ("average", "3 out of 5"), ("high", "5 out of 5")]}


def label(mr: str, slot: str) -> str:
    values = [v for (k, v) in pairs(mr, "slots").elements() if k == slot]
    return values[0] if len(values) == 1 else "(none)" if not values else "(several)"


def wording_table(train: list[tuple[str, str]], test: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """Print each wording's labels; return its most frequent training label, by (slot, wording)."""
    majorities = {}
    print(f"{'slot':<16}{'wording':<16}{'train rows':>11}  train labels (share)                           "
          f"{'test rows':>10}  lost by its majority label")
    for slot, wordings in WORDINGS.items():
        for name, pattern in wordings:
            found = re.compile(pattern, re.IGNORECASE)
            train_labels = Counter(label(mr, slot) for text, mr in train if found.search(text))
            test_labels = Counter(label(mr, slot) for text, mr in test if found.search(text))
            if not train_labels:
                continue
            majority = majorities[slot, name] = train_labels.most_common(1)[0][0]
            shares = ", ".join(f"{v} {n / sum(train_labels.values()):.2f}" for v, n in train_labels.most_common(3))
            n_test = sum(test_labels.values())
            lost = 1 - test_labels[majority] / n_test if n_test else 0.0
            print(f"{slot:<16}{name:<16}{sum(train_labels.values()):>11}  {shares:<46} {n_test:>10}  {lost:.2f}")
    return majorities


def out_of_reach(test: list[tuple[str, str]], majorities: dict[tuple[str, str], str]) -> None:
    """Test rows no model gets exactly right by the wording and with no key twice: those whose label for
    a slot is none of the majority labels of the wordings their text uses (a model that labels each
    wording one way gets them wrong, however well it is trained), and those whose reference gives a
    key twice (`eatType[pub], eatType[coffee shop]`), which structured decoding never writes."""
    by_wording, twice = set(), set()
    for row, (text, mr) in enumerate(test):
        for slot, wordings in WORDINGS.items():
            used = {majorities[slot, name] for name, pattern in wordings
                    if (slot, name) in majorities and re.search(pattern, text, re.IGNORECASE)}
            if used and label(mr, slot) not in used:
                by_wording.add(row)
        if max(key_counts(pairs(mr, "slots")).values(), default=0) > 1:
            twice.add(row)
    n, union = len(test), by_wording | twice
    print(f"\ntest rows whose priceRange or customer rating label is not the usual label of their wording: "
          f"{len(by_wording)} of {n} ({len(by_wording) / n:.3f})")
    print(f"test rows whose reference gives a key twice: {len(twice)} ({len(twice) / n:.3f}); either: {len(union)} "
          f"({len(union) / n:.3f})")
    print(f"exact match above {1 - len(by_wording) / n:.3f} needs cues beyond the wording; above "
          f"{1 - len(union) / n:.3f} with no key twice, too")


def merged(value_pairs: Counter) -> Counter:
    """The pairs with each synonym label replaced by its partner's name (`less than £20` -> `cheap`)."""
    rename = {(slot, b): a for slot, both in SYNONYMS.items() for a, b in both}
    return Counter({(k, rename.get((k, v), v)): n for (k, v), n in value_pairs.items()})


def synonym_exact(predictions: Path) -> None:
    table = json.loads(predictions.read_text(encoding="utf-8"))
    records = [dict(zip(table["columns"], row)) for row in table["data"]]
    right = sum(exact("slots", r["prediction"], r["reference"]) for r in records)
    forgiving = sum(merged(pairs(r["prediction"], "slots")) == merged(pairs(r["reference"], "slots")) for r in records)
    print(f"\n{predictions}: {len(records)} rows, exact match {right / len(records):.3f}; "
          f"with synonym labels taken as equal {forgiving / len(records):.3f} "
          f"({forgiving - right} records wrong only by a synonym label)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default=str(E2E), help="the E2E data, in any form fine_tune --dataset takes")
    parser.add_argument("--predictions", default=None, help="evaluate's predictions.json (input, reference, prediction)")
    args = parser.parse_args()
    try:
        splits, _ = data.load(args.dataset)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    train, test = (list(zip(splits[s][data.INPUT], splits[s][data.OUTPUT])) for s in ("train", "test"))
    out_of_reach(test, wording_table(train, test))
    if args.predictions:
        synonym_exact(Path(args.predictions))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How far E2E's labels let exact match go from the sentence alone, by the aligner's own rules.

    python benchmarks/label_ambiguity.py                                      # the data alone
    python benchmarks/label_ambiguity.py --predictions=<evaluate's predictions.json>   # and a model's rows

The cleaned E2E references were written by a rule-based aligner (`e2e_aligner`, restating the
e2e-cleaning project's rules): it reads each value off the sentence's wording, and looks at the
crowd worker's original meaning representation only where two values' wordings cover the same
words ("cheap" is a wording of both `cheap` and `less than £20`, "highly rated" of `high` and
`5 out of 5`, "The Rice Boat" of `name` and `near`). Those ties are all a model cannot read from
the sentence. The best it can do is label each tied wording the way the training references
most often do; this prints, for the commonest tied wordings, how the training references label
them and the share of test rows that choice loses, then the bound: the share of test rows whose
every tie the training majority decides right and whose reference gives no key twice
(`eatType[pub], eatType[coffee shop]`, which structured decoding never writes). With the
original MRs at hand (the cleaned CSVs' `orig_mr`), it first checks that the rules reproduce the
test labels. With `--predictions` (the per-example table `evaluate` logs to MLflow) it also
prints the model's exact match when a label is taken to equal its synonym.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import pandas as pd

from databricks_llm import data
from databricks_llm.e2e_synonyms import synonym_exact
from databricks_llm.errors import InputError
from databricks_llm.formats import of
from databricks_llm.scoring import key_counts, parse_mr

from e2e_aligner import align, ties  # noqa: E402  (benchmarks/ is the script's folder)

E2E = Path(__file__).resolve().parents[2] / "shared" / "data" / "e2e_nlg" / "cleaned"
SHOWN = 12  # tied wordings shown, the most frequent in training first
Tie = tuple[tuple[tuple[str, str], ...], str]  # (the tied slot values, the words they cover)


def _labels(mr: str) -> set[tuple[str, str]]:
    return {(k, v.lower()) for k, v in parse_mr(mr)}


def decisions(text: str, mr: str) -> list[tuple[Tie, tuple[str, str] | None]]:
    """Each tie of `text` (its tied values and wording) with the value the reference chose (None: none
    or several). A tie between slots (`name` or `near`) is told apart by the word before it, as a
    reader does ("near The Rice Boat")."""
    chosen = _labels(mr)
    result = []
    for group, start, end in ties(text):
        options = tuple((k, v.lower()) for k, v in group)
        before = text[:start].split()[-1:] if len({k for k, _ in options}) > 1 else []
        words = " ".join([*before, text[start:end]])
        picked = [option for option in options if option in chosen]
        result.append(((options, " ".join(words.lower().split())), picked[0] if len(picked) == 1 else None))
    return result


def majorities(rows: list[tuple[str, str]]) -> dict:
    """The most frequent choice of each tie, by (values, wording) and, for unseen wordings, by values."""
    by_tie: dict = {}
    for text, mr in rows:
        for (options, words), choice in decisions(text, mr):
            by_tie.setdefault((options, words), Counter())[choice] += 1
            by_tie.setdefault(options, Counter())[choice] += 1
    return by_tie


def _majority(counts: dict, tie: Tie) -> tuple[str, str] | None:
    found = counts.get(tie) or counts.get(tie[0])
    return found.most_common(1)[0][0] if found else None


def tie_table(test: list[tuple[str, str]], counts: dict) -> None:
    """Print the commonest tied wordings: their training labels and what their majority loses in test."""
    test_counts = majorities(test)
    shown = sorted((k for k in counts if isinstance(k[1], str)), key=lambda k: -sum(counts[k].values()))[:SHOWN]
    print(f"{'tied wording':<24}{'train rows':>11}  train labels (share)                                           "
          f"{'test rows':>10}  lost by its majority label")
    for tie in shown:
        train_labels, test_labels = counts[tie], test_counts.get(tie, Counter())
        total = sum(train_labels.values())
        shares = ", ".join(f"{c[0]}[{c[1]}] {m / total:.2f}" if c else f"(none) {m / total:.2f}"
                           for c, m in train_labels.most_common(2))
        n_test = sum(test_labels.values())
        lost = 1 - test_labels[_majority(counts, tie)] / n_test if n_test else 0.0
        print(f"{tie[1][:23]:<24}{total:>11}  {shares:<62} {n_test:>10}  {lost:.2f}")


def out_of_reach(test: list[tuple[str, str]], counts: dict, label: str) -> float:
    """Print and return the bound: test rows whose ties the majority decides right, no key twice."""
    by_wording = {i for i, (text, mr) in enumerate(test)
                  if any(_majority(counts, tie) != choice for tie, choice in decisions(text, mr))}
    twice = {i for i, (_, mr) in enumerate(test) if max(key_counts(of("slots").pairs(mr) or Counter()).values(), default=0) > 1}
    n, lost = len(test), by_wording | twice
    head = min(n, 1000)
    print(f"\n[{label}] test rows where a tie decided by the original MR goes against its wording's majority: "
          f"{len(by_wording)} of {n} ({len(by_wording) / n:.3f}); whose reference gives a key twice: {len(twice)} "
          f"({len(twice) / n:.3f}); either: {len(lost)} ({len(lost) / n:.3f})")
    bound = 1 - len(lost) / n
    print(f"[{label}] exact match from the sentence alone is at most {bound:.3f} with no key twice "
          f"({1 - len(by_wording) / n:.3f} with keys twice); on the first {head} test rows "
          f"{1 - len({i for i in lost if i < head}) / head:.3f}")
    return bound


def reproduction(dataset: Path) -> None:
    """Print how many test labels the aligner's rules rebuild from the sentence and the original MR."""
    files = sorted(dataset.glob("test*.csv")) if dataset.is_dir() else []
    frame = pd.read_csv(files[0]) if files else None
    if frame is None or "orig_mr" not in frame.columns:
        return
    same = sum({(k, v.lower()) for k, v in align(text, orig)} == _labels(mr)
               for text, mr, orig in zip(frame["ref"], frame["mr"], frame["orig_mr"]))
    print(f"the aligner's rules rebuild {same} of {len(frame)} test labels from the sentence and its original MR")


def synonym_report(predictions: Path) -> None:
    table = json.loads(predictions.read_text(encoding="utf-8"))
    records = [dict(zip(table["columns"], row)) for row in table["data"]]
    outputs, references = [r["prediction"] for r in records], [r["reference"] for r in records]
    right = sum(of("slots").exact(p, r) for p, r in zip(outputs, references))
    forgiving = round(synonym_exact("slots", outputs, references) * len(records))
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
    train, validation, test = (list(zip(splits[s][data.INPUT], splits[s][data.OUTPUT]))
                               for s in ("train", "validation", "test"))
    reproduction(Path(args.dataset))
    counts = majorities(train)
    tie_table(test, counts)
    out_of_reach(test, counts, "majority of train")
    out_of_reach(test, majorities(train + validation), "majority of train + validation")
    if args.predictions:
        synonym_report(Path(args.predictions))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""E2E's second exact match: a label's synonyms taken as equal.

E2E labels priceRange and customer rating with two sets of values for one meaning (`cheap` and
`less than £20`, `high` and `5 out of 5`, ...): the crowd worker saw one of them and wrote "cheap"
or "low prices" either way, so the sentence alone cannot tell which one the reference holds
(`benchmarks/label_ambiguity.py` counts how often). `exact_match_synonyms` counts a record right
when it is right once each synonym is replaced by its partner; it is reported next to exact match
for every E2E evaluation, never instead of it.
"""

from __future__ import annotations

from collections import Counter

from databricks_llm.formats import of
from databricks_llm.scoring import E2E_SLOTS

SYNONYMS = {"priceRange": [("cheap", "less than £20"), ("moderate", "£20-25"), ("high", "more than £30")],
            "customer rating": [("low", "1 out of 5"), ("average", "3 out of 5"), ("high", "5 out of 5")]}
_RENAME = {(slot, b.lower()): a for slot, both in SYNONYMS.items() for a, b in both}


def merged(value_pairs: Counter) -> Counter:
    """The pairs with each synonym label replaced by its partner's name (`less than £20` -> `cheap`)."""
    return Counter({(k, _RENAME.get((k, v.lower()), v)): n for (k, v), n in value_pairs.items()})


def is_e2e(output_format: str, references: list[str]) -> bool:
    """Whether the references are E2E meaning representations (every key an E2E slot)."""
    keys = {k for r in references for k, _ in of(output_format).pairs(r) or ()}
    return bool(keys) and keys <= set(E2E_SLOTS)


def synonym_exact(output_format: str, predictions: list[str], references: list[str]) -> float:
    """The share of records right with synonym labels taken as equal."""
    fmt = of(output_format)
    right = sum(merged(fmt.pairs(p) or Counter()) == merged(fmt.pairs(r) or Counter())
                for p, r in zip(predictions, references))
    return right / len(references) if references else 0.0


def task_scores(output_format: str, predictions: list[str], references: list[str]) -> dict[str, float]:
    """`{"exact_match_synonyms": ...}` for an E2E task, {} for others: scores and MLflow metrics alike."""
    if not is_e2e(output_format, references):
        return {}
    return {"exact_match_synonyms": synonym_exact(output_format, predictions, references)}

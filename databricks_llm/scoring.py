"""Slot-level scoring of meaning representations (MRs).

Comparison is on normalised (slot, value) pairs: keys match case-insensitively with spaces
collapsed and are mapped to their E2E spelling (``EatType`` -> ``eatType``); values are
lower-cased with spaces collapsed (``Café  Sicilia`` == ``café sicilia``). Pairs are counted
as a multiset, so a repeated key counts each time it appears.
"""

from __future__ import annotations

import re
from collections import Counter

E2E_SLOTS = ("name", "eatType", "food", "priceRange", "customer rating", "area", "familyFriendly", "near")
_CANONICAL = {s.lower(): s for s in E2E_SLOTS}
_KEY = re.compile(r"(customer\s+rating|[A-Za-z_]+)\s*\[", re.IGNORECASE)


def _norm(text: str) -> str:
    return " ".join(text.split())


def _closing(text: str, start: int) -> int:
    """Index of the `]` that closes the `[` just before `start` (brackets inside nest), or -1."""
    depth = 1
    for i in range(start, len(text)):
        depth += {"[": 1, "]": -1}.get(text[i], 0)
        if depth == 0:
            return i
    return -1


def parse_mr(text: object) -> list[tuple[str, str]]:
    """All ``key[value]`` pairs in `text`, in order; a value may hold balanced brackets
    (``name[The [Best] Pub]``). Junk around pairs and a key whose bracket never closes are
    skipped; never raises."""
    if not isinstance(text, str):
        return []
    pairs = []
    position = 0
    while match := _KEY.search(text, position):
        end = _closing(text, match.end())
        if end < 0:
            position = match.end()
            continue
        key = _norm(match.group(1))
        pairs.append((_CANONICAL.get(key.lower(), key), _norm(text[match.end():end])))
        position = end + 1
    return pairs


def _pairs(text: object) -> Counter:
    return Counter((key, value.lower()) for key, value in parse_mr(text))


def same_mr(prediction: object, reference: object) -> bool:
    """Exact match: the same multiset of normalised (slot, value) pairs."""
    return _pairs(prediction) == _pairs(reference)


def _f1(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def slot_scores(predictions: list[str], references: list[str]) -> dict:
    """Micro precision/recall/F1 over (slot, value) pairs, exact match, and F1 per E2E slot.

    `per_slot` has an entry for each E2E slot seen in the predictions or references.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    totals = Counter()
    per_slot = {slot: Counter() for slot in E2E_SLOTS}
    exact = 0
    for prediction, reference in zip(predictions, references):
        pred, ref = _pairs(prediction), _pairs(reference)
        exact += pred == ref  # same_mr, without parsing twice
        for kind, pairs in (("tp", pred & ref), ("fp", pred - ref), ("fn", ref - pred)):
            for (key, _), n in pairs.items():
                totals[kind] += n
                if key in per_slot:
                    per_slot[key][kind] += n
    precision, recall, f1 = _f1(totals["tp"], totals["fp"], totals["fn"])
    return {
        "precision": precision, "recall": recall, "f1": f1,
        "exact_match": exact / len(references) if references else 0.0,
        "per_slot": {s: _f1(c["tp"], c["fp"], c["fn"])[2] for s, c in per_slot.items() if sum(c.values())},
        "n": len(references),
    }


def metric_dict(scores: dict, prefix: str) -> dict[str, float]:
    """Flat MLflow metric names: `<prefix>slot_f1`, `<prefix>exact_match`, `<prefix>slot_f1_<slot>`."""
    metrics = {f"{prefix}slot_precision": scores["precision"], f"{prefix}slot_recall": scores["recall"],
               f"{prefix}slot_f1": scores["f1"], f"{prefix}exact_match": scores["exact_match"]}
    metrics.update({f"{prefix}slot_f1_{slot.replace(' ', '_')}": v for slot, v in scores["per_slot"].items()})
    return metrics

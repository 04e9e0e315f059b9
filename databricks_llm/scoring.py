"""Reading extraction outputs and scoring them.

The readers (`parse_mr`, `parse_json`, `flatten`, `normal`) are what each output format
(`formats`) is built on; `score` and `metric_dict` take a format and compare its normalised pairs:

- `slots` (``key[value], ...``): keys matched case-insensitively (spaces collapsed, E2E spellings
  restored: ``EatType`` -> ``eatType``), values lower-cased with spaces collapsed, as a multiset;
- `json`: the same over flattened key paths (``customer.name``; list items under ``tags[]``) with
  normalised values (``1.0`` == ``1``); outputs that are not one JSON object score no pairs;
- `text`: exact match after whitespace and case normalisation, and SQuAD-style token F1.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any

E2E_SLOTS = ("name", "eatType", "food", "priceRange", "customer rating", "area", "familyFriendly", "near")
E2E_VOCABULARY = {  # E2E's closed slots and their values, as the cleaned data spells them
    "eatType": ("coffee shop", "pub", "restaurant"),
    "food": ("Chinese", "English", "Fast food", "French", "Indian", "Italian", "Japanese"),
    "priceRange": ("cheap", "less than £20", "moderate", "£20-25", "high", "more than £30"),
    "customer rating": ("low", "average", "high", "1 out of 5", "3 out of 5", "5 out of 5"),
    "area": ("city centre", "riverside"),
    "familyFriendly": ("yes", "no"),
}
MAX_FIELDS = 50  # per-field metrics for at most this many fields (the most frequent in the references)
_CANONICAL = {s.lower(): s for s in E2E_SLOTS}
_KEY = re.compile(r"(customer\s+rating|[A-Za-z_][A-Za-z0-9_]*)\s*\[", re.IGNORECASE)


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


def parse_json(text: object) -> dict | None:
    """The JSON object `text` holds (whitespace around it allowed), or None; never raises."""
    if not isinstance(text, str):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def normal(value: Any) -> str:
    """A value as scoring compares it: text lower-cased with spaces collapsed, 1.0 as 1."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return str(int(value)) if float(value).is_integer() else repr(float(value))
    return _norm(str(value)).lower()


def flatten(value: Any, path: str = "") -> list[tuple[str, str]]:
    """(key path, normalised value) of every leaf of a JSON value; empty objects and lists add none."""
    if isinstance(value, dict):
        return [pair for key, item in value.items() for pair in flatten(item, f"{path}.{key}" if path else str(key))]
    if isinstance(value, list):
        return [pair for item in value for pair in flatten(item, f"{path}[]")]
    return [(path, normal(value))]


def tokens(text: object) -> list[str]:
    return _norm(text).lower().split() if isinstance(text, str) else []


def key_counts(value_pairs: Counter) -> Counter:
    """How often each key occurs among an output's pairs (a key given twice counts 2)."""
    return Counter(key for key, _ in value_pairs.elements())


def precision_recall_f1(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    """Precision, recall and F1 of true positive, false positive and false negative counts."""
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def score(fmt: Any, predictions: list[str], references: list[str],
          parsed: tuple[list, list] | None = None) -> dict:
    """Precision, recall, F1, exact match and per-field F1 (the MAX_FIELDS most frequent fields)
    of `predictions` in format `fmt`, and for keyed formats the share that parses (`parse_rate`).
    Micro-averaged over pairs for keyed formats, averaged over rows for text. `parsed`: each
    prediction's and reference's `fmt.pairs`, where the caller has them already."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    n = len(references)
    if not fmt.keyed:
        rows = [_token_f1(p, r) for p, r in zip(predictions, references)]
        result = {k: sum(row[i] for row in rows) / n if n else 0.0 for i, k in enumerate(("precision", "recall", "f1"))}
        return {**result, "exact_match": sum(map(fmt.exact, predictions, references)) / n if n else 0.0,
                "n": n, "per_field": {}}
    preds, refs = parsed or ([fmt.pairs(p) for p in predictions], [fmt.pairs(r) for r in references])
    totals, fields, support, exact = Counter(), {}, Counter(), 0
    for pred, ref in zip(preds, refs):
        pred, ref = pred or Counter(), ref or Counter()
        exact += pred == ref
        for kind, counted in (("tp", pred & ref), ("fp", pred - ref), ("fn", ref - pred)):
            for (key, _), count in counted.items():
                totals[kind] += count
                fields.setdefault(key, Counter())[kind] += count
        support.update(key for key, _ in ref.elements())
    result: dict[str, Any] = dict(zip(("precision", "recall", "f1"), precision_recall_f1(totals["tp"], totals["fp"], totals["fn"])))
    kept = [key for key, _ in support.most_common(MAX_FIELDS)]
    result["per_field"] = {key: precision_recall_f1(fields[key]["tp"], fields[key]["fp"], fields[key]["fn"])[2] for key in kept}
    return {**result, "exact_match": exact / n if n else 0.0, "n": n,
            "parse_rate": sum(p is not None for p in preds) / n if n else 0.0}


def _token_f1(prediction: object, reference: object) -> tuple[float, float, float]:
    pred, ref = Counter(tokens(prediction)), Counter(tokens(reference))
    if not pred and not ref:
        return 1.0, 1.0, 1.0
    common = sum((pred & ref).values())
    return precision_recall_f1(common, sum(pred.values()) - common, sum(ref.values()) - common)


def _metric_name(field: str) -> str:
    return re.sub(r"[^0-9A-Za-z_.\-/]", "_", field)


def metric_dict(scores: dict, prefix: str, fmt: Any) -> dict[str, float]:
    """Flat MLflow metric names: `<prefix>f1`, `precision`, `recall`, `exact_match`, `f1_<field>`,
    `parse_rate` (keyed formats), the format's older names (`fmt.metric_aliases`: slots' `slot_f1`,
    json's `json_parse_rate`), and an error report's `errors_<type>` counts."""
    named = {k: scores[k] for k in ("precision", "recall", "f1", "exact_match", "parse_rate") if k in scores}
    named |= {f"f1_{field}": v for field, v in scores["per_field"].items()}
    named |= fmt.metric_aliases(scores)
    named |= {f"errors_{kind}": count for kind, count in scores.get("errors", {}).items()}
    return {f"{prefix}{_metric_name(k)}": v for k, v in named.items()}

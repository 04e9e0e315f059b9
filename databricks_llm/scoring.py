"""Scoring extraction outputs by the task's output format.

- `slots` (``key[value], ...``): pairs compared with keys matched case-insensitively (spaces
  collapsed, E2E spellings restored: ``EatType`` -> ``eatType``) and values lower-cased with
  spaces collapsed (``Café  Sicilia`` == ``café sicilia``), counted as a multiset.
- `json`: the same over flattened key paths (``customer.name``; list items under ``tags[]``) with
  normalised values (text as above, ``1.0`` == ``1``); outputs that are not one JSON object score no
  pairs and lower the parse rate.
- `text`: exact match after whitespace and case normalisation, and SQuAD-style token F1.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any

E2E_SLOTS = ("name", "eatType", "food", "priceRange", "customer rating", "area", "familyFriendly", "near")
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


def _normal(value: Any) -> str:
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
    return [(path, _normal(value))]


def pairs(text: object, output_format: str = "slots") -> Counter:
    """The normalised (key, value) pairs of an output, as a multiset (none when it does not parse)."""
    if output_format == "json":
        value = parse_json(text)
        return Counter(flatten(value)) if value is not None else Counter()
    return Counter((key, value.lower()) for key, value in parse_mr(text))


def _tokens(text: object) -> list[str]:
    return _norm(text).lower().split() if isinstance(text, str) else []


def key_counts(value_pairs: Counter) -> Counter:
    """How often each key occurs among an output's pairs (a key given twice counts 2)."""
    return Counter(key for key, _ in value_pairs.elements())


def exact(output_format: str, prediction: object, reference: object) -> bool:
    """Exact match: the same multiset of normalised pairs (slots, json), the same words (text)."""
    if output_format == "text":
        return _tokens(prediction) == _tokens(reference)
    return pairs(prediction, output_format) == pairs(reference, output_format)


def _f1(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def score(output_format: str, predictions: list[str], references: list[str]) -> dict:
    """Precision, recall, F1, exact match and per-field F1 (the MAX_FIELDS most frequent fields)
    of `predictions`; `json` adds `parse_rate`. Micro-averaged over pairs for slots and json,
    averaged over rows for text."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    n = len(references)
    result: dict[str, Any] = {"exact_match": sum(map(exact, [output_format] * n, predictions, references)) / n if n else 0.0,
                              "n": n, "per_field": {}}
    if output_format == "text":
        rows = [_token_f1(p, r) for p, r in zip(predictions, references)]
        result.update({k: sum(row[i] for row in rows) / n if n else 0.0 for i, k in enumerate(("precision", "recall", "f1"))})
        return result
    totals, fields, support = Counter(), {}, Counter()
    for prediction, reference in zip(predictions, references):
        pred, ref = pairs(prediction, output_format), pairs(reference, output_format)
        for kind, counted in (("tp", pred & ref), ("fp", pred - ref), ("fn", ref - pred)):
            for (key, _), count in counted.items():
                totals[kind] += count
                fields.setdefault(key, Counter())[kind] += count
        support.update(key for key, _ in ref.elements())
    result.update(zip(("precision", "recall", "f1"), _f1(totals["tp"], totals["fp"], totals["fn"])))
    kept = [key for key, _ in support.most_common(MAX_FIELDS)]
    result["per_field"] = {key: _f1(fields[key]["tp"], fields[key]["fp"], fields[key]["fn"])[2] for key in kept}
    if output_format == "json":
        result["parse_rate"] = sum(parse_json(p) is not None for p in predictions) / n if n else 0.0
    return result


def _token_f1(prediction: object, reference: object) -> tuple[float, float, float]:
    pred, ref = Counter(_tokens(prediction)), Counter(_tokens(reference))
    if not pred and not ref:
        return 1.0, 1.0, 1.0
    common = sum((pred & ref).values())
    return _f1(common, sum(pred.values()) - common, sum(ref.values()) - common)


def _metric_name(field: str) -> str:
    return re.sub(r"[^0-9A-Za-z_.\-/]", "_", field)


def metric_dict(scores: dict, prefix: str, output_format: str = "slots") -> dict[str, float]:
    """Flat MLflow metric names: `<prefix>f1`, `precision`, `recall`, `exact_match`, `f1_<field>`;
    json adds `json_parse_rate`; slot tasks also keep the older `slot_f1`, `slot_precision`,
    `slot_recall` and `slot_f1_<slot>` names; an error report adds `errors_<type>` counts."""
    metrics = {f"{prefix}{k}": scores[k] for k in ("precision", "recall", "f1", "exact_match")}
    metrics.update({f"{prefix}f1_{_metric_name(field)}": v for field, v in scores["per_field"].items()})
    if "parse_rate" in scores:
        metrics[f"{prefix}json_parse_rate"] = scores["parse_rate"]
    metrics.update({f"{prefix}errors_{kind}": count for kind, count in scores.get("errors", {}).items()})
    if output_format == "slots":
        metrics.update({f"{prefix}slot_{k}": scores[k] for k in ("precision", "recall", "f1")})
        metrics.update({f"{prefix}slot_f1_{_metric_name(field)}": v for field, v in scores["per_field"].items()})
    return metrics

"""What is wrong in each wrong record, by error type and field: what a user should fix in their data.

Types, per record (slots and json tasks; a text task's wrong record is one `wrong_value`):

- `unparseable`: the output holds no `key[value]` pair / is not one JSON object;
- `missing`: a field of the reference the output lacks;
- `invented`: a field the output has and the reference does not;
- `wrong_value`: a field in both, with another value;
- `duplicated_key`: a field the output gives more often than the reference;
- `out_of_vocabulary`: a value outside the field's closed vocabulary (E2E's six closed slots, or
  any field with at most `CLOSED_AT_MOST` distinct values over at least 3 times as many references).

The report also counts the faults with their values, as scoring normalises them (values in lower case):
`most_common_faults` such as `near[raja indian cuisine] missing` or `priceRange: less than £20 -> cheap`.
A value missed or confused hundreds of times points at one pattern in the data, such as two labels
used for the same wording.
"""

from __future__ import annotations

from collections import Counter

from databricks_llm import sample_data
from databricks_llm.scoring import E2E_SLOTS, exact, key_counts, pairs, parse_json, parse_mr, score

ERROR_TYPES = ("unparseable", "missing", "invented", "wrong_value", "duplicated_key", "out_of_vocabulary")
CLOSED_AT_MOST = 12
MOST_COMMON_FAULTS = 20
E2E_VOCABULARY = {
    "eatType": sample_data.EAT_TYPES, "food": sample_data.FOODS, "priceRange": list(sample_data.PRICES),
    "customer rating": list(sample_data.RATINGS), "area": list(sample_data.AREAS), "familyFriendly": ["yes", "no"],
}


def closed_vocabulary(output_format: str, references: list[str]) -> dict[str, set[str]]:
    """The fields whose values come from a small closed set, with that set (normalised values)."""
    seen: dict[str, Counter] = {}
    for reference in references:
        for (key, value), count in pairs(reference, output_format).items():
            seen.setdefault(key, Counter())[value] += count
    if seen and set(seen) <= set(E2E_SLOTS):  # an E2E task: its six closed slots, whatever this sample holds
        return {key: {v.lower() for v in values} for key, values in E2E_VOCABULARY.items()}
    return {key: set(values) for key, values in seen.items()
            if len(values) <= CLOSED_AT_MOST and sum(values.values()) >= 3 * len(values)}


def record_errors(output_format: str, prediction: str, reference: str,
                  vocabulary: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(error type, field) of every fault of one record; empty when it is right."""
    if output_format == "text":
        return [] if exact("text", prediction, reference) else [("wrong_value", "text")]
    ref = pairs(reference, output_format)
    if not _parses(output_format, prediction):
        return [("unparseable", "")] if ref else []
    pred = pairs(prediction, output_format)
    if pred == ref:
        return []
    pred_keys, ref_keys = key_counts(pred), key_counts(ref)
    faults = [("missing", k) for k in ref_keys if k not in pred_keys]
    faults += [("invented", k) for k in pred_keys if k not in ref_keys]
    duplicated = [k for k, n in pred_keys.items() if n > max(1, ref_keys.get(k, 0))]
    faults += [("duplicated_key", k) for k in duplicated]
    faults += [("wrong_value", k) for k in pred_keys
               if k in ref_keys and k not in duplicated and _values(pred, k) != _values(ref, k)]
    faults += [("out_of_vocabulary", k) for (k, v) in pred if k in vocabulary and v not in vocabulary[k]]
    return faults


def value_faults(output_format: str, prediction: str, reference: str) -> list[str]:
    """The fields a parsed output got wrong, with their values: `key[value] missing`, `key[value]
    invented` or `key: reference value -> output value`; empty for text tasks and unparseable output."""
    if output_format == "text":
        return []
    if not _parses(output_format, prediction):
        return []
    pred, ref = pairs(prediction, output_format), pairs(reference, output_format)
    faults = []
    for key in dict.fromkeys(k for k, _ in [*ref.elements(), *pred.elements()]):
        want, got = _values(ref, key), _values(pred, key)
        if want == got:
            continue
        if not got or not want:
            faults += [f"{key}[{v}] {'missing' if not got else 'invented'}" for v in sorted((want or got).elements())]
        else:
            faults.append(f"{key}: {', '.join(sorted(want.elements()))} -> {', '.join(sorted(got.elements()))}")
    return faults


def _parses(output_format: str, prediction: str) -> bool:
    """Whether the output is one JSON object (json) or holds a `key[value]` pair (slots)."""
    return parse_json(prediction) is not None if output_format == "json" else bool(parse_mr(prediction))


def _values(counted: Counter, key: str) -> Counter:
    return Counter(v for (k, v) in counted.elements() if k == key)


def error_report(output_format: str, predictions: list[str], references: list[str]) -> dict:
    """Counts per error type and per (type, field), and each record's faults as `type:field` text."""
    vocabulary = closed_vocabulary(output_format, references)
    by_type, by_field, by_value, per_record = Counter(), {t: Counter() for t in ERROR_TYPES}, Counter(), []
    for prediction, reference in zip(predictions, references):
        faults = record_errors(output_format, prediction, reference, vocabulary)
        by_type.update(kind for kind, _ in faults)
        for kind, key in faults:
            by_field[kind][key] += 1
        if faults:
            by_value.update(value_faults(output_format, prediction, reference))
        per_record.append(", ".join(f"{kind}:{key}" if key else kind for kind, key in faults))
    return {"errors": {t: by_type[t] for t in ERROR_TYPES},
            "errors_by_field": {t: dict(c.most_common()) for t, c in by_field.items() if c},
            "most_common_faults": by_value.most_common(MOST_COMMON_FAULTS),
            "wrong_records": sum(1 for r in per_record if r), "per_record": per_record}


def scores_and_errors(output_format: str, predictions: list[str], references: list[str]) -> dict:
    """The task's scores (`scoring.score`) and this error report in one dict, as evaluations log them."""
    return {**score(output_format, predictions, references), **error_report(output_format, predictions, references)}


def summary_lines(report: dict) -> list[str]:
    """The report as a few readable lines: each error type with its most affected fields."""
    lines = [f"errors in {report['wrong_records']} wrong records:"]
    for kind in ERROR_TYPES:
        count = report["errors"][kind]
        if count:
            fields = ", ".join(f"{k or '-'} {n}" for k, n in list(report["errors_by_field"][kind].items())[:6])
            lines.append(f"  {kind:<18}{count:>6}   {fields}")
    if report["most_common_faults"]:
        top = report["most_common_faults"][:5]
        lines.append("most common faults: " + "; ".join(f"{fault} {n}" for fault, n in top))
    return lines

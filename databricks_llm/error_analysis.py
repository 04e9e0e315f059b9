"""What is wrong in each wrong record, by error type and field: what a user should fix in their data.

Types, per record (slots and json tasks; a text task's wrong record is one `wrong_value`):

- `unparseable`: the output holds no `key[value]` pair / is not one JSON object;
- `missing`: a field of the reference the output lacks;
- `invented`: a field the output has and the reference does not;
- `wrong_value`: a field in both, with another value;
- `duplicated_key`: a field the output gives more often than the reference;
- `out_of_vocabulary`: a value outside the field's closed vocabulary (E2E's six closed slots, or
  any field that `formats.closed_fields` finds closed in the references).

The report also counts the faults with their values, as scoring normalises them (values in lower case):
`most_common_faults` such as `near[raja indian cuisine] missing` or `priceRange: less than £20 -> cheap`.
A value missed or confused hundreds of times points at one pattern in the data, such as two labels
used for the same wording.
"""

from __future__ import annotations

from collections import Counter

from databricks_llm.formats import OutputFormat, closed_fields, of
from databricks_llm.scoring import E2E_SLOTS, E2E_VOCABULARY, key_counts, score

ERROR_TYPES = ("unparseable", "missing", "invented", "wrong_value", "duplicated_key", "out_of_vocabulary")
MOST_COMMON_FAULTS = 20
Parsed = tuple[list, list]  # each prediction's and reference's pairs (`OutputFormat.pairs`)


def closed_vocabulary(fmt: OutputFormat | str, references: list[str]) -> dict[str, set[str]]:
    """The fields whose values come from a small closed set, with that set (normalised values)."""
    return _closed([of(fmt).pairs(r) for r in references])


def _closed(references: list[Counter | None]) -> dict[str, set[str]]:
    seen: dict[str, Counter] = {}
    for pairs in references:
        for (key, value), count in (pairs or Counter()).items():
            seen.setdefault(key, Counter())[value] += count
    if seen and set(seen) <= set(E2E_SLOTS):  # an E2E task: its six closed slots, whatever this sample holds
        return {key: {v.lower() for v in values} for key, values in E2E_VOCABULARY.items()}
    return {key: set(values) for key, values in closed_fields(seen).items()}


def record_errors(fmt: OutputFormat | str, prediction: str, reference: str,
                  vocabulary: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(error type, field) of every fault of one record; empty when it is right."""
    fmt = of(fmt)
    if not fmt.keyed:
        return [] if fmt.exact(prediction, reference) else [("wrong_value", "text")]
    return _faults(fmt.pairs(prediction), fmt.pairs(reference) or Counter(), vocabulary)


def _faults(pred: Counter | None, ref: Counter, vocabulary: dict[str, set[str]]) -> list[tuple[str, str]]:
    if pred is None:
        return [("unparseable", "")] if ref else []
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


def value_faults(fmt: OutputFormat | str, prediction: str, reference: str) -> list[str]:
    """The fields a parsed output got wrong, with their values: `key[value] missing`, `key[value]
    invented` or `key: reference value -> output value`; empty for text tasks and unparseable output."""
    fmt = of(fmt)
    return _value_faults(fmt.pairs(prediction), fmt.pairs(reference) or Counter()) if fmt.keyed else []


def _value_faults(pred: Counter | None, ref: Counter) -> list[str]:
    if pred is None:
        return []
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


def _values(counted: Counter, key: str) -> Counter:
    return Counter(v for (k, v) in counted.elements() if k == key)


def error_report(fmt: OutputFormat | str, predictions: list[str], references: list[str],
                 parsed: Parsed | None = None) -> dict:
    """Counts per error type and per (type, field), and each record's faults as `type:field` text."""
    fmt = of(fmt)
    if not fmt.keyed:
        faults = [[] if fmt.exact(p, r) else [("wrong_value", "text")] for p, r in zip(predictions, references)]
        return _report(faults, [[] for _ in faults])
    preds, refs = parsed or _parsed(fmt, predictions, references)
    refs = [r or Counter() for r in refs]
    vocabulary = _closed(refs)
    faults = [_faults(p, r, vocabulary) for p, r in zip(preds, refs)]
    return _report(faults, [_value_faults(p, r) if f else [] for p, r, f in zip(preds, refs, faults)])


def _parsed(fmt: OutputFormat, predictions: list[str], references: list[str]) -> Parsed:
    return [fmt.pairs(p) for p in predictions], [fmt.pairs(r) for r in references]


def _report(faults: list[list[tuple[str, str]]], values: list[list[str]]) -> dict:
    by_type, by_field, by_value = Counter(), {t: Counter() for t in ERROR_TYPES}, Counter()
    for record, record_values in zip(faults, values):
        by_type.update(kind for kind, _ in record)
        for kind, key in record:
            by_field[kind][key] += 1
        by_value.update(record_values)
    per_record = [", ".join(f"{kind}:{key}" if key else kind for kind, key in record) for record in faults]
    return {"errors": {t: by_type[t] for t in ERROR_TYPES},
            "errors_by_field": {t: dict(c.most_common()) for t, c in by_field.items() if c},
            "most_common_faults": by_value.most_common(MOST_COMMON_FAULTS),
            "wrong_records": sum(1 for r in per_record if r), "per_record": per_record}


def scores_and_errors(fmt: OutputFormat | str, predictions: list[str], references: list[str]) -> dict:
    """The task's scores (`scoring.score`) and this error report in one dict, as evaluations log
    them; each record is parsed once for both."""
    fmt = of(fmt)
    parsed = _parsed(fmt, predictions, references) if fmt.keyed else None
    return {**score(fmt, predictions, references, parsed), **error_report(fmt, predictions, references, parsed)}


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

"""Span-annotated data as an extraction task: a text column plus a list of labelled spans become
one JSON target per row, built here and only here, for training, evaluation and serving alike.

Spans come in the shapes annotation tools export:

- objects with ``start``/``end`` and a label (``label``, ``slot``, ``entity`` or ``type``; spaCy,
  Label Studio's ``labels`` list), an optional ``value``/``text`` checked against the text;
- objects with ``slot``/``value`` (or ``label``/``text``) and no offsets: the value must occur in
  the text, found left to right (SNIPS without offsets);
- ``[start, end, label]`` triples (Doccano).

The target holds the sentence-level label columns first (such as ``intent``), then each span's
label with the words it covers, in sentence order; a label given twice in a row keeps every value,
as a JSON list in order. The task records the spans and label columns (`Task.spans_column`,
`Task.label_columns`), so evaluation rebuilds the same targets from the same kind of file and the
served model, trained on them, answers in this form.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import datasets

from databricks_llm.errors import InputError
from databricks_llm.task import Task

logger = logging.getLogger(__name__)

TEXT_COLUMNS = ("text", "sentence", "input", "utterance", "query")
LABEL_KEYS = ("label", "slot", "entity", "type", "labels")
VALUE_KEYS = ("value", "text")
MAX_DISTINCT_LABELS = 100  # a sentence-level label column has at most this many distinct values...
SNIFF_ROWS = 200  # ...among the first rows, where columns are told apart
INSTRUCTION = ("Extract {labels}the fields stated in the text as one JSON object: each field with the exact words "
               "of the text, in the order they occur; a field stated twice holds a list of its values.")


def _as_list(value: Any) -> Any:
    """A cell as a Python list when it holds one (a list, an Arrow array, or a JSON string of one)."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value.tolist() if hasattr(value, "tolist") else value


def _span_shaped(item: Any) -> bool:
    if isinstance(item, (list, tuple)):
        return len(item) == 3 and all(isinstance(x, int) and not isinstance(x, bool) for x in item[:2])
    if isinstance(item, dict):
        has_label = any(item.get(k) is not None for k in LABEL_KEYS)
        return has_label and (item.get("start") is not None or any(item.get(k) is not None for k in VALUE_KEYS))
    return False


def is_spans_column(values: list[Any]) -> bool:
    """Whether a column holds lists of spans: every cell a list, at least one span, all span-shaped."""
    cells = [_as_list(v) for v in values if v is not None]
    items = [item for cell in cells if isinstance(cell, list) for item in cell]
    return bool(cells) and all(isinstance(c, list) for c in cells) and bool(items) and all(map(_span_shaped, items))


def detect(names: list[str], sample: dict[str, list], task: Task) -> Task | None:
    """The task with its text, spans and label columns resolved, when the data holds spans (named by
    `--spans_column`, or detected: a text column plus a list-of-spans column); else None."""
    spans_column = task.spans_column
    if spans_column is None and task.output_column is not None:
        return None  # the user named a target column: not a spans task
    if spans_column is None:
        found = [n for n in names if n != task.input_column and is_spans_column(sample[n])]
        if not found:
            return None
        spans_column = found[0]
    elif spans_column not in names:
        raise InputError(f"--spans_column={spans_column} is not a column of the dataset (found: {', '.join(names)})")
    text_column = task.input_column or next((n for n in TEXT_COLUMNS if n in names and n != spans_column), None)
    if text_column is None or text_column not in names:
        raise InputError(f"the dataset holds spans in column {spans_column} but no text column to match them "
                         f"(found: {', '.join(names)}); name it with --input_column")
    labels = _label_columns(task.label_columns, names, sample, (text_column, spans_column))
    instruction = task.instruction or INSTRUCTION.format(labels=f"the {', '.join(labels)} and " if labels else "")
    return dataclasses.replace(task, input_column=text_column, output_column=spans_column, spans_column=spans_column,
                               label_columns=",".join(labels), output_format="json", instruction=instruction)


def _label_columns(given: str | None, names: list[str], sample: dict[str, list], taken: tuple[str, str]) -> list[str]:
    """The label columns named (comma-separated; empty: none), else every other column of short
    texts with few distinct values (an id column, all distinct, is not one)."""
    if given is not None:
        labels = [c.strip() for c in given.split(",") if c.strip()]
        missing = [c for c in labels if c not in names]
        if missing:
            raise InputError(f"--label_columns: {', '.join(missing)} not a column of the dataset (found: {', '.join(names)})")
        return labels
    labels = []
    for name in names:
        values = sample[name]
        if name in taken or not values or not all(isinstance(v, str) and v.strip() and "\n" not in v for v in values):
            continue
        distinct = len(set(values))
        if distinct <= MAX_DISTINCT_LABELS and (distinct * 2 <= len(values)):
            labels.append(name)
    return labels


def _span(item: Any, text: str, searched: dict[str, int], where: str) -> tuple[int, int, str]:
    """(start, end, label) of one span checked against its text. A span without offsets is looked
    for from where the last one with the same words ended (`searched`, updated)."""
    shown = json.dumps(item, ensure_ascii=False)[:80]
    if isinstance(item, (list, tuple)):
        if not _span_shaped(item):
            raise InputError(f"{where}: span {shown} is not a [start, end, label] triple")
        start, end, label = item
        value = None
    elif isinstance(item, dict):
        label = next((item[k] for k in LABEL_KEYS if item.get(k) is not None), None)
        if isinstance(label, list):  # Label Studio: "labels": ["PER"]
            label = label[0] if len(label) == 1 else None
        value = next((item[k] for k in VALUE_KEYS if item.get(k) is not None), None)
        start, end = item.get("start"), item.get("end")
        if start is None and end is None:
            if not isinstance(value, str) or not value:
                raise InputError(f"{where}: span {shown} has neither offsets nor a value")
            start = text.find(value, searched.get(value, 0))
            if start < 0:
                raise InputError(f"{where}: span value {value!r} does not occur in the text"
                                 + (" as often as it is given" if value in searched else ""))
            end = searched[value] = start + len(value)
    else:
        raise InputError(f"{where}: span {shown} is neither an object nor a [start, end, label] triple")
    if not isinstance(label, str) or not label.strip():
        raise InputError(f"{where}: span {shown} has no label")
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in (start, end)):
        raise InputError(f"{where}: span {label!r} has offsets {start!r}, {end!r}; they must be integers")
    if not 0 <= start < end <= len(text):
        raise InputError(f"{where}: span {label!r} [{start}, {end}) falls outside the text ({len(text)} characters)")
    if value is not None and text[start:end] != value:
        raise InputError(f"{where}: span {label!r} [{start}, {end}) covers {text[start:end]!r}, not its value {value!r}")
    return start, end, label


def target(text: str, spans: Any, labels: dict[str, Any], where: str) -> dict[str, Any]:
    """The JSON target of one row: label columns first, then span labels in sentence order, a label
    given twice holding the list of its values. Malformed, overlapping or outside spans raise."""
    if not isinstance(text, str):
        raise InputError(f"{where}: the text is not a string")
    spans = _as_list(spans) if spans is not None else []
    if not isinstance(spans, list):
        raise InputError(f"{where}: the spans are not a list")
    searched: dict[str, int] = {}
    found = sorted(_span(item, text, searched, where) for item in spans)
    for (s1, e1, l1), (s2, e2, l2) in zip(found, found[1:]):
        if s2 < e1:
            raise InputError(f"{where}: span {l2!r} [{s2}, {e2}) overlaps span {l1!r} [{s1}, {e1})")
    result: dict[str, Any] = {}
    for name, value in labels.items():
        if value is None or not str(value).strip():
            raise InputError(f"{where}: label column {name} is empty")
        result[name] = value
    for start, end, label in found:
        if label in labels:
            raise InputError(f"{where}: span label {label!r} is also a label column; rename one")
        value = text[start:end]
        if label not in result:
            result[label] = value
        elif isinstance(result[label], list):
            result[label].append(value)
        else:
            result[label] = [result[label], value]
    return result


def to_targets(split: str, ds: datasets.Dataset, task: Task, source: str) -> datasets.Dataset:
    """The split with its spans column replaced by the JSON target text (the text column kept)."""
    labels = [c for c in (task.label_columns or "").split(",") if c]
    missing = [c for c in [task.input_column, task.spans_column, *labels] if c not in ds.column_names]
    if missing:
        raise InputError(f"dataset {source} split '{split}' lacks column {', '.join(missing)} of the spans task")

    def convert(row: dict, index: int) -> dict[str, str]:
        where = f"dataset {source} split '{split}' row {index}"
        built = target(row[task.input_column], row[task.spans_column], {c: row[c] for c in labels}, where)
        return {task.input_column: row[task.input_column], task.spans_column: json.dumps(built, ensure_ascii=False)}

    features = datasets.Features({task.input_column: datasets.Value("string"), task.spans_column: datasets.Value("string")})
    return ds.map(convert, with_indices=True, remove_columns=ds.column_names, features=features, desc="spans")


def prepared(raw: dict[str, datasets.Dataset], task: Task, source: str, hint: bool) -> tuple[dict[str, datasets.Dataset], Task]:
    """The raw splits with spans turned into targets and the task that says so, or both unchanged
    when the data holds no spans. With `hint` (a saved task read on another copy of the data), the
    task's columns that the data lacks are detected again."""
    main = raw["train"] if "train" in raw else next(iter(raw.values()))
    names = main.column_names
    if task.spans_column and task.spans_column not in names and task.output_column in names:
        return raw, task  # targets built already (`data.save_prepared`): the task still says they are frames
    probe = task
    if hint:
        absent = {k: None for k in ("input_column", "output_column", "spans_column") if getattr(task, k) not in names}
        probe = dataclasses.replace(task, **absent, **({"label_columns": None} if "spans_column" in absent else {}))
    sample = main.select(range(min(SNIFF_ROWS, len(main)))).to_dict()
    resolved = detect(names, sample, probe)
    if resolved is None:
        return raw, task
    logger.info("spans in column %s over text column %s; label columns: %s", resolved.spans_column,
                resolved.input_column, resolved.label_columns or "none")
    return {k: to_targets(k, v, resolved, source) for k, v in raw.items()}, resolved

"""Output formats: everything a task's output format means, in one class each.

A format parses a model's text into (key, value) records, says what exact match is, spells
training targets, gives structured decoding the pieces of its regular expression, and names its
MLflow metrics. Everything else asks the task's format (`of(task.output_format)`) and never
compares format names, so a new format is one new class added to `FORMATS`.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any, ClassVar

from databricks_llm.scoring import flatten, normal, parse_json, parse_mr, tokens

STRUCTURED_DEFAULT = True  # structured decoding unless a caller says otherwise (measured to help: docs/benchmarks.md)
CLOSED_AT_MOST = 12  # a field with at most this many distinct values, each seen 3 times on average, is closed


def closed_fields(values: dict[str, Counter]) -> dict[str, Counter]:
    """The one rule for a closed vocabulary, over each field's counted values."""
    return {k: c for k, c in values.items() if len(c) <= CLOSED_AT_MOST and sum(c.values()) >= 3 * len(c)}


class OutputFormat:
    """A format of records. Each keyed format defines `parse` (text -> (key, value) pairs, or None
    when the text is not in the format), `render` (pairs -> text in the format's one spelling),
    `item` and `value` (the regular expression of a field holding a value of a kind, closed to the
    given spellings where there are some) and `copying` (a pattern whose group 1 is a copied value
    being written at an output's end, and the character that closes a value)."""

    name: ClassVar[str]
    instruction: ClassVar[str]  # the instruction of a task that gives none
    keyed: ClassVar[bool] = True  # records of keys, scored by pairs (not free text)
    unlike: ClassVar[str] = ""  # what a text not in the format is, in a refusal
    separator: ClassVar[str] = ", "
    start: ClassVar[str] = ""
    end: ClassVar[str] = ""

    def pairs(self, text: object) -> Counter | None:
        """The normalised (key, value) pairs as a multiset, or None when the text is not in the format."""
        record = self.parse(text)
        return None if record is None else Counter((key, normal(value)) for key, value in record)

    def exact(self, prediction: object, reference: object) -> bool:
        return (self.pairs(prediction) or Counter()) == (self.pairs(reference) or Counter())

    def target(self, text: str) -> str | None:
        """A training target in the format's one spelling, or None when it is not in the format."""
        return text if self.parse(text) else None

    def any(self) -> str | None:
        """The expression of any output, where no schema is known (None: unconstrained)."""
        return None

    def metric_aliases(self, scores: dict) -> dict[str, float]:
        """Older names some of the format's metrics are also logged under."""
        return {}


class Slots(OutputFormat):
    """``key[value], key[value]``: E2E's meaning representations."""

    name = "slots"
    instruction = "Extract the fields stated in the text as comma-separated key[value] pairs."
    unlike = "has no key[value] pair"

    def parse(self, text: object) -> list[tuple[str, Any]] | None:
        return parse_mr(text) or None

    def render(self, record: list[tuple[str, Any]]) -> str:
        return ", ".join(f"{key}[{value}]" for key, value in record)

    def item(self, key: str, value: str) -> str:
        return re.escape(key) + r"\[" + value + r"\]"

    def value(self, kind: str, closed: tuple[str, ...]) -> str:
        return "(" + "|".join(map(re.escape, closed)) + ")" if closed else r"[^\[\]\n\x00]+"

    def copying(self, fields: tuple[str, ...]) -> tuple[str, str]:
        return rf"(?:^|, )(?:{'|'.join(map(re.escape, fields))})\[([^\[\]]*)$", "]"

    def metric_aliases(self, scores: dict) -> dict[str, float]:
        return {f"slot_{k}": scores[k] for k in ("precision", "recall", "f1")} | {
            f"slot_f1_{field}": v for field, v in scores["per_field"].items()}


_STRING = r'"([^"\\\n\x00]|\\["\\/bfnrtu])*"'
_LIST = rf"\[{_STRING}(, {_STRING})*\]"  # a label given twice: its values as a list of strings
_SCALARS = {"number": r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?", "boolean": "(true|false)", "null": "null",
            "list": _LIST, "strings": f"({_STRING}|{_LIST})"}


class Json(OutputFormat):
    """One JSON object; nested values score as flattened key paths (``customer.name``, ``tags[]``)."""

    name = "json"
    instruction = "Extract the fields stated in the text as one JSON object."
    unlike = "is not a JSON object"
    start, end = r"\{", r"\}"

    def parse(self, text: object) -> list[tuple[str, Any]] | None:
        value = parse_json(text)
        return None if value is None else list(value.items())

    def pairs(self, text: object) -> Counter | None:
        value = parse_json(text)
        return None if value is None else Counter(flatten(value))

    def target(self, text: str) -> str | None:
        record = self.parse(text) if parse_json(text) is not None else (parse_mr(text) or None)
        return None if record is None else self.render(record)

    def render(self, record: list[tuple[str, Any]]) -> str:
        merged: dict[str, Any] = {}  # a key given twice keeps both values, as a list
        for key, value in record:
            merged[key] = value if key not in merged else [*_listed(merged[key]), value]
        return json.dumps(merged, ensure_ascii=False)

    def item(self, key: str, value: str) -> str:
        return re.escape(json.dumps(key, ensure_ascii=False)) + ": " + value

    def value(self, kind: str, closed: tuple[str, ...]) -> str:
        if closed:
            return "(" + "|".join(re.escape(json.dumps(v, ensure_ascii=False)) for v in closed) + ")"
        return _any_json('["object", "array"]') if kind == "nested" else _SCALARS.get(kind, _STRING)

    def any(self) -> str | None:
        return _any_json('"object"')

    def metric_aliases(self, scores: dict) -> dict[str, float]:
        return {"json_parse_rate": scores["parse_rate"]}

    def copying(self, fields: tuple[str, ...]) -> tuple[str, str]:
        quoted = "|".join(re.escape(json.dumps(f, ensure_ascii=False)) for f in fields)
        return rf'(?:{quoted}): (?:\[(?:"[^"\\]*", )*)?"([^"\\]*)$', '"'


def _listed(value: Any) -> list:
    return value if isinstance(value, list) else [value]


def _any_json(types: str) -> str:
    from outlines_core.json_schema import build_regex_from_schema

    return build_regex_from_schema(f'{{"type": {types}}}')


class Text(OutputFormat):
    """Free text: exact match of the words, and SQuAD-style token F1."""

    name = "text"
    instruction = "Extract the requested information from the text."
    keyed = False

    def parse(self, text: object) -> list[tuple[str, Any]] | None:
        return None

    def exact(self, prediction: object, reference: object) -> bool:
        return tokens(prediction) == tokens(reference)

    def target(self, text: str) -> str | None:
        return text


FORMATS: dict[str, OutputFormat] = {f.name: f for f in (Json(), Slots(), Text())}  # detection tries them in this order


def of(output_format: str | OutputFormat) -> OutputFormat:
    """The format named `output_format` (a format passes through)."""
    return output_format if isinstance(output_format, OutputFormat) else FORMATS[output_format]


def detect(targets: list[str]) -> OutputFormat:
    """The first keyed format every target parses in, else text."""
    return next((f for f in FORMATS.values() if f.keyed and all(f.parse(t) is not None for t in targets)),
                FORMATS["text"])

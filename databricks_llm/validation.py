"""Checks shared by every CLI: the one bool parser, the one argument parser, numeric ranges and
environment variables. Each refusal is an InputError naming the flag or variable."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from databricks_llm.errors import InputError, first_line

_TRUE = {"1", "true", "yes", "on", "t", "y"}
_FALSE = {"0", "false", "no", "off", "f", "n"}


def parse_bool(value: str | bool) -> bool:
    """true/false, yes/no, on/off, 1/0 (any case); anything else is refused, never read as False."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE | _FALSE:
        return text in _TRUE
    raise argparse.ArgumentTypeError(f"expected true/false, yes/no, on/off or 1/0 (got {value!r})")


def strict(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`parser` with abbreviations off (`--learning_rat=0.1` is not --learning_rate), every unknown
    flag refused, and its errors raised as InputErrors (one `error:` line, exit 2) instead of
    argparse's usage text."""
    parser.allow_abbrev = False
    parse_known_args = parser.parse_known_args

    def fail(message: str) -> None:
        raise InputError(message)

    def parse_known_args_strictly(args=None, namespace=None):
        namespace, unknown = parse_known_args(args, namespace)
        if unknown:
            raise InputError(f"unknown flag {' '.join(unknown)} (see --help)")
        return namespace, []

    parser.error = fail
    parser.parse_known_args = parse_known_args_strictly
    return parser


def argument_parser(dataclass_types: Any, description: str):
    """`strict` HfArgumentParser whose booleans go through `parse_bool`."""
    from transformers import HfArgumentParser
    from transformers.hf_argparser import string_to_bool

    parser = HfArgumentParser(dataclass_types, description=description)
    for action in parser._actions:  # HfArgumentParser builds them from the dataclass fields
        if action.type is string_to_bool:
            action.type = parse_bool
    return strict(parser)


@dataclass(frozen=True)
class Range:
    """Valid values of a number: `low`/`high` bounds (None: unbounded), open when `*_open`."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        return math.isfinite(value) and (
            self.low is None or value > self.low or (value == self.low and not self.low_open)) and (
            self.high is None or value < self.high or (value == self.high and not self.high_open))

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"{'<' if self.high_open else '<='} {self.high:g}" if self.high is not None else "finite"


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
FRACTION = Range(0, 1, low_open=True, high_open=True)
PROBABILITY = Range(0, 1, high_open=True)


def check_ranges(values: Any, ranges: Mapping[str, Range]) -> None:
    """Every number of a dataclass instance (parsed flags) is finite and inside `ranges[flag]`
    where given; None means unset and passes."""
    check_values({f.name: getattr(values, f.name) for f in dataclasses.fields(values)}, ranges)


def check_values(values: Mapping[str, Any], ranges: Mapping[str, Range]) -> None:
    """`check_ranges` of flag name -> value (as parsed, before a dataclass's __post_init__ replaces
    some: TrainingArguments reads --eval_steps=0 as "use --logging_steps")."""
    for name, value in values.items():
        valid = ranges.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value) or (valid is not None and value not in valid):
            raise InputError(f"--{name} must be {valid or 'finite'} (got {value})")


def number(kind: type, valid: Range) -> Callable[[str], float]:
    """A parser of `kind` (int or float) text that `valid` accepts: for environment variables."""
    def parse(text: str) -> float:
        value = kind(text)
        if value not in valid:
            raise ValueError(f"must be {'an integer' if kind is int else 'a number'} {valid}")
        return value

    return parse


def json_object(text: str) -> dict:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError("must be a JSON object, e.g. {\"team\": \"nlp\"}")
    return value


def boolean(text: str) -> bool:
    try:
        return parse_bool(text)
    except argparse.ArgumentTypeError as err:
        raise ValueError(str(err)) from None


def writable_dir(text: str) -> Path:
    check_writable(text, "the folder")
    return Path(text)


def check_env(parsers: Mapping[str, Callable[[str], Any]]) -> None:
    """Each set variable of `parsers` parses; the first that does not is refused by name."""
    for name, parse in parsers.items():
        value = os.environ.get(name)
        if value is None or value == "":
            continue
        try:
            parse(value)
        except InputError as err:
            raise InputError(f"{name}: {err}") from None
        except ValueError as err:
            raise InputError(f"{name}={value[:80]!r} is not valid: {first_line(err, 200)}") from None


# File types a --model or --dataset value can name; hub ids never end with these.
LOCAL_FILE_SUFFIXES = (".csv", ".jsonl", ".json", ".parquet", ".gguf")


def looks_like_path(value: str) -> bool:
    """Whether a --model/--dataset value means a local path rather than a hub id (`org/name`):
    relative or absolute path syntax, more than one `/`, or a local file type."""
    return value.startswith((".", "/", "~")) or value.count("/") > 1 or value.lower().endswith(LOCAL_FILE_SUFFIXES)


def _exists(path: Path) -> bool:
    try:  # Path.exists raises on a name that is too long
        path.stat()
    except OSError:
        return False
    return True


def check_writable(value: str, what: str) -> None:
    """`value` names a folder that can be created here: not empty, nearest existing parent a
    writable folder, no new name longer than the file system allows. Nothing is left behind."""
    if not value.strip():
        raise InputError(f"{what} is empty")
    path = Path(value)
    existing = next((p for p in [path, *path.parents] if _exists(p)), Path("."))
    if existing == path and not path.is_dir():
        raise InputError(f"{what} {path} is a file, not a folder")
    if not existing.is_dir():
        raise InputError(f"{what} {path}: {existing} is a file, not a folder")
    limit = os.pathconf(existing, "PC_NAME_MAX")
    for part in path.parts[len(existing.parts):]:
        if len(os.fsencode(part)) > limit:
            raise InputError(f"{what} {str(path)[:80]}...: the name {part[:20]}... is longer than the {limit} bytes "
                             "the file system allows")
    try:  # a real write: os.access says yes to root even on a read-only file system
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as err:
        raise InputError(f"{what} {path} is not writable (creating a file in {existing} failed: {err.strerror})") from None


MAX_TOKENS_CAP = 512
MAX_TEMPERATURE = 10.0  # past this sampling is noise; huge values overflow the logits' division in torch
MIN_TEMPERATURE = 1e-3  # a positive temperature below this overflows float32 logits (use 0: greedy)


def check_settings(temperature: float, max_tokens: float, prefix: str = "") -> tuple[float, int]:
    """The one check of generation settings, for serving requests and `evaluate` flags alike:
    temperature 0 (greedy) or in MIN_TEMPERATURE..MAX_TEMPERATURE, and an integer max_tokens in
    1..MAX_TOKENS_CAP. `prefix` names where they came from in the message (`row 3: `, `--`)."""
    if not (temperature == 0 or MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE):  # NaN fails both
        raise InputError(f"{prefix}temperature must be a finite number, 0 (greedy) or in "
                         f"{MIN_TEMPERATURE:g}..{MAX_TEMPERATURE:g} (got {temperature})")
    if not (0 < max_tokens <= MAX_TOKENS_CAP and max_tokens == int(max_tokens)):
        raise InputError(f"{prefix}max_tokens must be an integer in 1..{MAX_TOKENS_CAP} (got {max_tokens})")
    return float(temperature), int(max_tokens)


def check_writable_file(value: str, what: str) -> None:
    """`value` names a file that can be written here: not a folder, its folder `check_writable`."""
    if not value.strip():
        raise InputError(f"{what} is empty")
    path = Path(value)
    if path.is_dir():
        raise InputError(f"{what} {path} is a folder, not a file")
    check_writable(str(path.parent), f"{what} {path}: the folder")

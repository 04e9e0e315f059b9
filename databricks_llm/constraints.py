"""Structured decoding: generation confined to the task's output format.

The format is one regular expression built from the training targets (`Schema`, `pattern`): the
fields in one order, each at most once (data loading rewrites targets that disagree on the order
into one, so no key ever repeats), closed-vocabulary values spelled as in the data, other values
any text without the format's delimiters, nested JSON values as outlines-core's expression of a
JSON value. outlines-core compiles it against the tokenizer's vocabulary into an index of its
states and the tokens each allows (about a second for E2E's format over SmolLM2's 49,152 tokens,
in Rust); each row of a batch keeps its state and moves it a token at a time (`Rows`). Open fields
whose training values are copied from the input (`Schema.copied`: E2E's `name` and `near`) are
held to text the row's input spells out (`Copy`), so a name is never misspelt.
"""

from __future__ import annotations

import functools
import graphlib
import json
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

from databricks_llm.formats import OutputFormat, closed_fields, of
from databricks_llm.scoring import E2E_SLOTS, E2E_VOCABULARY

COPIED_AT_LEAST = 0.99  # share of an open field's training values found verbatim in their input


@dataclass(frozen=True)
class Schema:
    """The fields of a task's targets: their order, kinds and the values of the closed ones."""

    fields: tuple[str, ...]
    closed: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (field, values as spelled in the data)
    kinds: tuple[tuple[str, str], ...] = ()  # field -> string|number|boolean|null|list|strings|nested
    ordered: bool = True  # the targets agreed on `fields`' order (else data loading rewrote them in it)
    may_be_empty: bool = False
    copied: tuple[str, ...] = ()  # open fields whose values the inputs spell out verbatim

    def to_json(self) -> str:
        return json.dumps({"fields": self.fields, "closed": dict(self.closed), "kinds": dict(self.kinds),
                           "ordered": self.ordered, "may_be_empty": self.may_be_empty, "copied": self.copied},
                          ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> Schema:
        saved = json.loads(text)
        return cls(tuple(saved["fields"]), tuple((k, tuple(v)) for k, v in saved["closed"].items()),
                   tuple(saved.get("kinds", {}).items()), saved["ordered"], saved.get("may_be_empty", False),
                   tuple(saved.get("copied", ())))


def _kind(value: Any) -> str:
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "list"
    names = {bool: "boolean", int: "number", float: "number", str: "string", type(None): "null"}
    return names.get(type(value), "nested")


def _merged(kinds: set[str]) -> str:
    """One kind for a field's values: theirs when they agree, `strings` for a label sometimes given
    twice (a string or a list of them), else `nested` (any JSON value)."""
    return next(iter(kinds)) if len(kinds) == 1 else "strings" if kinds == {"string", "list"} else "nested"


def schema_of(fmt: OutputFormat, targets: list[str], inputs: list[str] | None = None) -> Schema | None:
    """The schema the training targets follow, or None (text, or no target parses). Fields take the
    one order every target agrees with, else their mean relative position. With the `inputs`, open
    string fields spelt out verbatim in at least COPIED_AT_LEAST of their rows are `copied`."""
    parsed = [fmt.parse(t) for t in targets]
    records = [r for r in parsed if r]
    if not records:
        return None
    values, kinds, spelt = {}, {}, {}
    before, where = {}, {}
    for record, text in zip(parsed, inputs or [None] * len(parsed)):
        keys = list(dict.fromkeys(k for k, _ in record or ()))  # a key given twice counts where it first appears
        for i, key in enumerate(keys):
            before.setdefault(key, set()).update(keys[:i])
            where.setdefault(key, []).append(i / len(keys))
        for key, value in record or ():
            kinds.setdefault(key, set()).add(_kind(value))
            if isinstance(value, str):
                values.setdefault(key, Counter())[value] += 1
                if text is not None:
                    spelt.setdefault(key, []).append(value in text)
    try:
        fields, ordered = tuple(graphlib.TopologicalSorter(before).static_order()), True
    except graphlib.CycleError:
        fields, ordered = tuple(sorted(before, key=lambda k: sum(where[k]) / len(where[k]))), False
    closed = closed_fields({k: c for k, c in values.items() if kinds[k] == {"string"}})
    copied = tuple(k for k in fields if k not in closed and kinds[k] == {"string"} and len(spelt.get(k, ())) >= 3
                   and sum(spelt[k]) >= COPIED_AT_LEAST * len(spelt[k]))
    return Schema(fields, tuple((k, tuple(sorted(c))) for k, c in closed.items()),
                  tuple((k, _merged(v)) for k, v in kinds.items()),
                  ordered, [] in parsed, copied)


def pattern(fmt: OutputFormat, schema: Schema) -> str:
    """The regular expression of every output the schema allows: its fields in order, each at most
    once; of a size linear in the fields (40 SNIPS fields compile in seconds)."""
    closed, kinds = dict(schema.closed), dict(schema.kinds)
    items = [fmt.item(key, fmt.value(kinds.get(key, "string"), closed.get(key, ()))) for key in schema.fields]
    body = items[0]  # the outputs whose last field is at most the i-th: those before it (then it, or not), or it alone
    for item in items[1:]:
        body = f"({body}({re.escape(fmt.separator)}{item})?|{item})"
    return f"{fmt.start}({body}){'?' if schema.may_be_empty or fmt.start else ''}{fmt.end}"


# Models saved before schemas were (E2E slot models): E2E's slot order and six closed slots.
E2E_SCHEMA = Schema(E2E_SLOTS, tuple((key, tuple(sorted(values))) for key, values in E2E_VOCABULARY.items()))


def task_schema(task: Any) -> Schema | None:
    """The schema saved with a task; E2E's for slot models saved before schemas were."""
    from databricks_llm.task import E2E

    if task.schema:
        return Schema.from_json(task.schema)
    return E2E_SCHEMA if (task.prompt_version, task.output_format) == (E2E.prompt_version, E2E.output_format) else None


@functools.lru_cache(maxsize=8)
def for_task(tokenizer: Any, task: Any) -> Constraint | None:
    """The task's format for this tokenizer (kept for the next call), or None where there is none
    to enforce (text tasks; slot tasks without a schema)."""
    fmt, schema = of(task.output_format), task_schema(task)
    expression = pattern(fmt, schema) if schema else fmt.any()
    return Constraint(tokenizer, expression, fmt.copying(schema.copied) if schema and schema.copied else None) \
        if expression else None


@functools.lru_cache(maxsize=4)
def token_bytes(tokenizer: Any) -> tuple[bytes, ...]:
    """Each token's bytes as they read inside a sequence, by the tokenizer's decoder: byte-level
    (GPT-2, Llama 3, SmolLM2: each character stands for a byte), SentencePiece-style (``▁`` a space,
    ``<0x0A>`` a byte), else the token decoded alone."""
    decoder = json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder") or {}
    kinds = {part.get("type") for part in decoder.get("decoders", [decoder])}
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    if "ByteLevel" in kinds:
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        byte = {char: code for code, char in bytes_to_unicode().items()}
        return tuple(bytes(byte[c] for c in p) if all(c in byte for c in p) else p.encode() for p in pieces)
    if kinds & {"Metaspace", "ByteFallback", "Replace"}:
        hex_byte = re.compile(r"<0x([0-9A-Fa-f]{2})>")
        return tuple(bytes([int(m.group(1), 16)]) if (m := hex_byte.fullmatch(p)) else p.replace("\u2581", " ").encode()
                     for p in pieces)
    return tuple(tokenizer.decode([t]).encode() for t in range(len(pieces)))


class Constraint:
    """A format's index over one tokenizer's vocabulary, and each state's tokens once asked.

    The index leaves out a token that runs on past a point where the expression may end (with
    `ab(cd)?`, `bc` after `a`; for E2E, `],` after a name, which SmolLM2 writes as one token), so
    the expression ends with a NUL that only a stand-in for the end-of-sequence token spells (no
    other token may: outputs never hold a NUL)."""

    def __init__(self, tokenizer: Any, expression: str, copying: tuple[str, str] | None) -> None:
        from outlines_core import Index, Vocabulary

        special = set(tokenizer.all_special_ids)
        self.pieces = tuple(b"" if t in special else p for t, p in enumerate(token_bytes(tokenizer)))
        self.eos, self.end = tokenizer.eos_token_id, len(self.pieces)
        table: dict[bytes, list[int]] = {b"\x00": [self.end]}
        for token, piece in enumerate(self.pieces):
            if piece and b"\x00" not in piece:
                table.setdefault(piece, []).append(token)
        self.index = Index(expression + r"\x00", Vocabulary(self.eos, table))
        self.copy = Copy(copying, [p.decode("utf-8", "replace") for p in self.pieces]) if copying else None
        self.allowed: dict[int | None, torch.Tensor] = {None: torch.tensor([self.eos])}  # state -> sorted token ids

    def tokens(self, state: int | None) -> torch.Tensor:
        if state not in self.allowed:
            ids = {self.eos if t == self.end else t for t in self.index.get_allowed_tokens(state)}
            self.allowed[state] = torch.tensor(sorted(ids) or [self.eos])
        return self.allowed[state]

    def rows(self, sources: list[str]) -> Rows:
        return Rows(self, sources)


class Rows:
    """A batch's rows in the format: each row's state and output text, moved on a token at a time."""

    def __init__(self, constraint: Constraint, sources: list[str]) -> None:
        self.format, self.sources = constraint, sources
        self.states: list[int | None] = [constraint.index.get_initial_state()] * len(sources)
        self.written = [b""] * len(sources)

    def allowed(self) -> list[torch.Tensor]:
        """Each row's allowed tokens: the format's, narrowed to the input's text while a copied value is open."""
        allowed = [self.format.tokens(state) for state in self.states]
        for row, (written, source) in enumerate(zip(self.written, self.sources)):
            copied = self.format.copy.allowed(source, written.decode("utf-8", "ignore")) if self.format.copy else None
            both = allowed[row][torch.isin(allowed[row], copied)] if copied is not None else ()
            allowed[row] = both if len(both) else allowed[row]
        return allowed

    def advance(self, tokens: list[int]) -> None:
        for row, token in enumerate(tokens):
            state = self.states[row]
            ended = state is None or token == self.format.eos
            self.states[row] = None if ended else self.format.index.get_next_state(state, token)
            self.written[row] += self.format.pieces[token]

    def keep(self, rows: list[int]) -> None:
        self.states, self.written, self.sources = ([column[i] for i in rows] for column in
                                                   (self.states, self.written, self.sources))


class Copy:
    """Copied fields: while a row writes one's value, only tokens that keep the value a piece of its
    input that starts a word, or that close the value where a word of the input ends."""

    LONGEST = 24  # characters: longer tokens (runs of spaces, dashes) are no piece of a name

    def __init__(self, copying: tuple[str, str], texts: list[str]) -> None:
        self.inside, close = re.compile(copying[0]), copying[1]
        self.tokens: dict[str, list[int]] = {}  # text -> tokens that read so
        self.closing: dict[str, list[int]] = {}  # text before the value's end -> tokens ending a value there
        for token, text in enumerate(texts):
            if not text:
                continue
            table, key = (self.closing, text[:text.index(close)]) if close in text else (self.tokens, text)
            table.setdefault(key, []).append(token)

    def allowed(self, source: str, written: str) -> torch.Tensor | None:
        """Tokens that keep the copied value being written a piece of `source`; None when no value is open."""
        match = self.inside.search(written)
        if match is None:
            return None
        value = match.group(1)
        starts = [m.end() for m in re.finditer(re.escape(value), source) if _word_starts(source, m.start())] \
            if value else [i for i, c in enumerate(source) if not c.isspace() and _word_starts(source, i)]
        return torch.tensor(sorted({t for start in starts for t in self._continuing(source, start, bool(value))}),
                            dtype=torch.long)

    def _continuing(self, source: str, start: int, has_text: bool) -> list[int]:
        """The tokens that read as `source` from `start` on, and those that end the value where a
        word of `source` ends (not before the value has text)."""
        rest, found = source[start:start + self.LONGEST], []
        for end in range(len(rest) + 1):
            found += self.tokens.get(rest[:end], ())
            if (has_text or end) and (start + end == len(source) or not source[start + end].isalnum()):
                found += self.closing.get(rest[:end], ())
        return found


def _word_starts(text: str, i: int) -> bool:
    return i == 0 or not text[i - 1].isalnum()

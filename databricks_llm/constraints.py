"""Structured decoding: generation confined to the task's output format.

The format is one regular expression built from the training targets (`Schema`): the fields in
the order the targets give them, each at most once; closed-vocabulary values spelled as in the
data; other values any text without the format's delimiters. outlines-core compiles the expression
against the tokenizer's vocabulary into an index of the expression's states, with the tokens each
state allows, all at once (about a second for E2E's format and SmolLM2's 49,152 tokens, in Rust);
a row's state then follows its tokens, one lookup a token (`_IndexFormat`).

- slots: ``key[value], key[value]`` with keys from the task's key set;
- json: one flat object in the data's spelling (``{"key": "value", ...}``); targets with nested
  values get any JSON object instead (lm-format-enforcer's JSON parser, which computes each state's
  tokens when a row first reaches it: slower);
- text: unconstrained.
Open fields whose training values are copied from the input (`Schema.copied`: E2E's `name` and
`near`) are held to text the row's prompt spells out (`_Copy`), so a name is never misspelt.
Each field at most once, also where a training target repeats one (E2E: 4% of the cleaned training
MRs, e.g. ``customer rating[5 out of 5], customer rating[average]``). If the targets disagree on the
order of fields, any order is allowed and then a key may repeat.
"""

from __future__ import annotations

import functools
import graphlib
import json
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import torch

from databricks_llm.error_analysis import CLOSED_AT_MOST, E2E_VOCABULARY
from databricks_llm.scoring import E2E_SLOTS, parse_json, parse_mr

COPIED_AT_LEAST = 0.99  # share of an open field's training values found verbatim in their input
_OPEN_SLOT_VALUE = r"[^\[\]\n\x00]+"
_OPEN_STRING = r'"([^"\\\n\x00]|\\["\\/bfnrtu])*"'
_SCALARS = {"number": r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?", "boolean": "(true|false)", "null": "null"}


@dataclass(frozen=True)
class Schema:
    """The fields of a task's targets: their order, and the values of the closed ones."""

    fields: tuple[str, ...]
    closed: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (field, values as spelled in the data)
    kinds: tuple[tuple[str, str], ...] = ()  # json: field -> string|number|boolean|null|nested
    ordered: bool = True  # every target lists its fields in `fields` order
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
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", type(None): "null"}.get(type(value), "nested")


def schema_of(output_format: str, targets: list[str], inputs: list[str] | None = None) -> Schema | None:
    """The schema the training targets follow, or None (text tasks, or no target parses). With the
    targets' `inputs`, open string fields whose values the input spells out verbatim in at least
    COPIED_AT_LEAST of their rows are `copied`."""
    if output_format == "slots":
        parsed = [parse_mr(t) for t in targets]
    elif output_format == "json":
        parsed = [list(obj.items()) if (obj := parse_json(t)) is not None else None for t in targets]
    else:
        return None
    spelt: dict[str, list[bool]] = {}
    for record, text in zip(parsed, inputs or []):
        for key, value in record or ():
            if isinstance(value, str):
                spelt.setdefault(key, []).append(value in text)
    records = [r for r in parsed if r is not None]
    empty = not all(records)
    records = [r for r in records if r]
    if not records:
        return None
    values: dict[str, Counter] = {}
    kinds: dict[str, set[str]] = {}
    before: dict[str, set[str]] = {}
    for record in records:
        keys = list(dict.fromkeys(k for k, _ in record))  # a key given twice counts where it first appears
        for key, value in record:
            kinds.setdefault(key, set()).add(_kind(value))
            if isinstance(value, str):
                values.setdefault(key, Counter())[value] += 1
        for i, key in enumerate(keys):
            before.setdefault(key, set()).update(keys[:i])
    try:  # one order every target agrees with (none if a before b in one target and b before a in another)
        fields, ordered = tuple(graphlib.TopologicalSorter(before).static_order()), True
    except graphlib.CycleError:
        fields, ordered = tuple(sorted(before)), False
    closed = tuple((key, tuple(sorted(counts))) for key, counts in values.items()
                   if kinds[key] == {"string"} and len(counts) <= CLOSED_AT_MOST
                   and sum(counts.values()) >= 3 * len(counts))
    kind = tuple((key, next(iter(k)) if len(k) == 1 else "nested") for key, k in kinds.items())
    copied = tuple(key for key in fields if key not in dict(closed) and kinds[key] == {"string"}
                   and len(spelt.get(key, ())) >= 3 and sum(spelt[key]) >= COPIED_AT_LEAST * len(spelt[key]))
    return Schema(fields, closed, kind if output_format == "json" else (), ordered, empty, copied)


def pattern(output_format: str, schema: Schema) -> str | None:
    """The regular expression of every output the schema allows, or None where no expression fits
    (json with nested values)."""
    closed, kinds = dict(schema.closed), dict(schema.kinds)
    if output_format == "slots":
        items = [re.escape(key) + r"\[" + ("(" + "|".join(map(re.escape, closed[key])) + ")" if key in closed
                                          else _OPEN_SLOT_VALUE) + r"\]" for key in schema.fields]
        separator, start, end = ", ", "", ""
    elif output_format == "json" and "nested" not in kinds.values():
        def value(key: str) -> str:
            if key in closed:
                return "(" + "|".join(re.escape(json.dumps(v, ensure_ascii=False)) for v in closed[key]) + ")"
            return _OPEN_STRING if kinds[key] == "string" else _SCALARS[kinds[key]]

        items = [re.escape(json.dumps(key, ensure_ascii=False)) + ": " + value(key) for key in schema.fields]
        separator, start, end = ", ", r"\{", r"\}"
    else:
        return None
    if schema.ordered:  # each field at most once, in order: one alternative per first field
        body = "|".join(items[i] + "".join(f"({separator}{item})?" for item in items[i + 1:]) for i in range(len(items)))
    else:
        any_item = "(" + "|".join(items) + ")"
        body = f"{any_item}({separator}{any_item})*"
    return f"{start}({body}){'?' if schema.may_be_empty or start else ''}{end}"


# Models saved before schemas were (E2E slot models): E2E's slot order and six closed slots.
E2E_SCHEMA = Schema(E2E_SLOTS, tuple((key, tuple(sorted(values))) for key, values in E2E_VOCABULARY.items()))


def task_schema(task: Any) -> Schema | None:
    """The schema saved with a task; E2E's for slot models saved before schemas were."""
    from databricks_llm.task import LEGACY_PROMPT_VERSION

    if task.schema:
        return Schema.from_json(task.schema)
    return E2E_SCHEMA if task.output_format == "slots" and task.prompt_version == LEGACY_PROMPT_VERSION else None


@functools.lru_cache(maxsize=8)
def for_task(tokenizer: Any, task: Any) -> Constraint | None:
    """The task's format for this tokenizer (kept for the next call), or None where there is none
    to enforce (text tasks; slot tasks without a schema)."""
    schema = task_schema(task)
    if task.output_format == "text" or (schema is None and task.output_format != "json"):
        return None
    return Constraint(tokenizer, task.output_format, schema)


@functools.lru_cache(maxsize=4)
def _tokenizer_data(tokenizer: Any) -> Any:
    """lm-format-enforcer's view of the vocabulary: each regular token's text, as it reads after
    another token (so word-initial spaces show). Built once per tokenizer (seconds). The same as
    its `integrations.transformers.build_token_enforcer_tokenizer_data`, which cannot be imported
    under transformers 5 (it imports the removed `transformers.tokenization_utils`)."""
    from lmformatenforcer import TokenEnforcerTokenizerData

    zero = tokenizer.encode("0", add_special_tokens=False)[-1]
    special = set(tokenizer.all_special_ids)
    regular = []
    for token in range(len(tokenizer)):
        if token in special:
            continue
        after_zero = tokenizer.decode([zero, token])[1:]
        regular.append((token, after_zero, len(after_zero) > len(tokenizer.decode([token]))))

    @functools.lru_cache(maxsize=1 << 16)
    def text(ids: tuple[int, ...]) -> str:
        return tokenizer.decode(list(ids)).rstrip("\ufffd")

    # the enforcer decodes a row's current word at every step, and the same few words recur in every
    # row: kept, the decoding costs a dictionary lookup instead of a call into the tokenizer
    return TokenEnforcerTokenizerData(regular, lambda ids: text(tuple(ids)), tokenizer.eos_token_id, False,
                                      len(tokenizer))


Walk = Callable[[tuple[int, ...]], list[int]]  # a row's generated tokens -> the tokens it may take next


class Constraint:
    """One task's format for one tokenizer; `processor(prompt_width)` confines a `generate` call.
    What each state of the format allows is kept for the life of this object."""

    def __init__(self, tokenizer: Any, output_format: str, schema: Schema | None) -> None:
        expression = pattern(output_format, schema) if schema else None
        if expression is not None:
            self.format: _IndexFormat | _EnforcerFormat = _IndexFormat(expression, tokenizer)
        elif output_format == "json":
            self.format = _EnforcerFormat(tokenizer)
        else:
            raise ValueError(f"no structured decoding for {output_format} outputs")
        self.eos = tokenizer.eos_token_id
        self.masks: dict[int, tuple[Any, torch.Tensor, torch.Tensor]] = {}  # see _FormatProcessor._cached
        self.copy = _Copy(tokenizer, output_format, schema.copied) if schema and schema.copied else None

    def processor(self, prompt_width: int) -> Any:
        return _FormatProcessor(self.format.walk(), prompt_width, self.eos, self.masks, self.copy)


class _IndexFormat:
    """A regular expression as outlines-core's index over the tokenizer's vocabulary.

    The index leaves out a token that runs on past a point where the expression may end (with
    `ab(cd)?`, `bc` after `a`; for E2E, `],` after a name, which SmolLM2 writes as one token), so
    the expression given to it ends with a NUL that only a stand-in for the end-of-sequence token
    spells (no other token may: outputs never hold a NUL)."""

    def __init__(self, expression: str, tokenizer: Any) -> None:
        from outlines_core import Index

        self.end, self.eos = len(tokenizer), tokenizer.eos_token_id  # the stand-in: an id no token has
        self.index = Index(expression + r"\x00", _vocabulary(tokenizer, self.end))
        self.ended = [self.eos]  # what a row off the format may take (none can be, but a sampler)
        self.allowed: dict[int, list[int]] = {}  # state -> its tokens, one list per state for every walk

    def _tokens(self, state: int | None) -> list[int]:
        if state is None:
            return self.ended
        if state not in self.allowed:
            self.allowed[state] = [self.eos if t == self.end else t for t in self.index.get_allowed_tokens(state)]
        return self.allowed[state]

    def walk(self) -> Walk:
        """A row's allowed tokens from its generated tokens, each state found from its parent's (a
        batch asks once a step per row, one token longer each time)."""
        states: dict[tuple[int, ...], int | None] = {(): self.index.get_initial_state()}

        def allowed(generated: tuple[int, ...]) -> list[int]:
            known = len(generated)
            while generated[:known] not in states:
                known -= 1
            for end in range(known + 1, len(generated) + 1):
                parent = states[generated[:end - 1]]
                states[generated[:end]] = None if parent is None else self.index.get_next_state(parent, generated[end - 1])
            return self._tokens(states[generated])

        return allowed


class _EnforcerFormat:
    """Any JSON object, by lm-format-enforcer (no regular expression describes nested values)."""

    def __init__(self, tokenizer: Any) -> None:
        from lmformatenforcer import JsonSchemaParser

        self.parser = JsonSchemaParser({"type": "object"})
        self.tokenizer_data = _tokenizer_data(tokenizer)
        self.allowed_cache: dict = {}  # parser state -> allowed tokens, shared by every walk

    def walk(self) -> Walk:
        from lmformatenforcer import TokenEnforcer

        enforcer = TokenEnforcer(self.tokenizer_data, self.parser)
        enforcer.allowed_token_cache = self.allowed_cache
        return lambda generated: enforcer.get_allowed_tokens(list(generated)).allowed_tokens


@functools.lru_cache(maxsize=4)
def _vocabulary(tokenizer: Any, end: int) -> Any:
    """outlines-core's view of the vocabulary: each regular token's bytes (`_token_bytes`), none with
    a NUL, and `end` spelling a NUL (see `_IndexFormat`)."""
    from outlines_core import Vocabulary

    special = set(tokenizer.all_special_ids)
    tokens: dict[bytes, list[int]] = {b"\x00": [end]}
    for token, piece in zip(range(len(tokenizer)), _token_bytes(tokenizer)):
        if token not in special and piece and b"\x00" not in piece:
            tokens.setdefault(piece, []).append(token)
    return Vocabulary(tokenizer.eos_token_id, tokens)


def _token_bytes(tokenizer: Any) -> list[bytes]:
    """Each token's bytes as they read inside a sequence, by the tokenizer's decoder: byte-level
    (GPT-2, Llama 3, SmolLM2: each character stands for a byte), SentencePiece-style (``▁`` a space,
    ``<0x0A>`` a byte), else the token's text after another token, as UTF-8."""
    decoder = json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder") if hasattr(
        tokenizer, "backend_tokenizer") else None
    kinds = {part.get("type") for part in (decoder or {}).get("decoders", [decoder or {}])}
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    if "ByteLevel" in kinds:
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        byte = {char: code for code, char in bytes_to_unicode().items()}
        return [bytes(byte[c] for c in piece) if all(c in byte for c in piece) else piece.encode() for piece in pieces]
    if kinds & {"Metaspace", "ByteFallback", "Replace"}:
        hex_byte = re.compile(r"<0x([0-9A-Fa-f]{2})>")
        return [bytes([int(m.group(1), 16)]) if (m := hex_byte.fullmatch(piece)) else piece.replace("\u2581", " ").encode()
                for piece in pieces]
    texts = {token: text for token, text, _ in _tokenizer_data(tokenizer).regular_tokens}
    return [texts.get(token, "").encode() for token in range(len(tokenizer))]


class _Copy:
    """Copied fields: while a row writes one's value, only tokens that keep the value a piece of its
    prompt's text that starts a word, or that close the value where a word of that text ends, are
    allowed (the format's mask still applies too)."""

    def __init__(self, tokenizer: Any, output_format: str, fields: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        names = "|".join(map(re.escape, fields))
        if output_format == "slots":
            self.inside, close = re.compile(rf"(?:^|, )(?:{names})\[([^\[\]]*)$"), "]"
        else:
            quoted = "|".join(re.escape(json.dumps(f, ensure_ascii=False)) for f in fields)
            self.inside, close = re.compile(rf'(?:{quoted}): "([^"\\]*)$'), '"'
        self.tokens: dict[str, list[int]] = {}  # text -> tokens that read so mid-sequence
        self.closing: dict[str, list[int]] = {}  # text before the value's end -> tokens ending a value there
        for token, text, _ in _tokenizer_data(tokenizer).regular_tokens:
            table, key = (self.closing, text[:text.index(close)]) if close in text else (self.tokens, text)
            table.setdefault(key, []).append(token)
        self.longest = 24  # characters: longer tokens (runs of spaces, dashes) are no piece of a name

    def allowed(self, source: str, written: list[int]) -> list[int] | None:
        """Tokens that keep the copied value being written a piece of `source` (the prompt's
        text); None when the row is not writing one."""
        match = self.inside.search(self.tokenizer.decode(written, skip_special_tokens=True))
        if match is None:
            return None
        value = match.group(1)
        if not value:
            return self._firsts(source)
        allowed: set[int] = set()
        for match in re.finditer(re.escape(value), source):
            if _word_starts(source, match.start()):
                self._continue(source, match.end(), True, allowed)
        return list(allowed)

    @functools.lru_cache(maxsize=256)
    def _firsts(self, source: str) -> list[int]:
        """Tokens that can start a copied value: at the start of a word of `source` (kept per prompt:
        each row starts several values)."""
        allowed: set[int] = set()
        for start, char in enumerate(source):
            if not char.isspace() and _word_starts(source, start):
                self._continue(source, start, False, allowed)
        return list(allowed)

    def _continue(self, source: str, start: int, has_text: bool, allowed: set[int]) -> None:
        """Add the tokens that read as `source` from `start` on, and those that end the value where a
        word of `source` ends (not before the value has text)."""
        rest = source[start:start + self.longest]
        for end in range(len(rest) + 1):
            allowed.update(self.tokens.get(rest[:end], ()))
            if (has_text or end) and (start + end == len(source) or not source[start + end].isalnum()):
                allowed.update(self.closing.get(rest[:end], ()))


def _word_starts(text: str, i: int) -> bool:
    return i == 0 or not text[i - 1].isalnum()


class _FormatProcessor:
    """A `LogitsProcessor`: every unfinished row's next token comes from its allowed set."""

    def __init__(self, walk: Walk, prompt_width: int, eos: int, masks: dict, copy: _Copy | None = None) -> None:
        self.walk, self.width, self.eos, self.masks, self.copy = walk, prompt_width, eos, masks, copy
        self.sources: dict[tuple[int, ...], str] = {}  # this batch's prompts as text, for `copy`

    def _source(self, prompt: list[int]) -> str:
        key = tuple(prompt)
        if key not in self.sources:
            self.sources[key] = self.copy.tokenizer.decode(prompt, skip_special_tokens=True)
        return self.sources[key]

    def _cached(self, allowed: list[int], size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`allowed` (a list the format keeps per state) as a mask, True where blocked, and as ids."""
        cached = self.masks.get(id(allowed))
        if cached is None or cached[0] is not allowed:
            mask = torch.ones(size, dtype=torch.bool)
            mask[allowed] = False
            # the entry keeps `allowed` alive, so its id stays its own
            cached = self.masks[id(allowed)] = (allowed, mask, torch.tensor(allowed, dtype=torch.long))
        return cached[1], cached[2]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        _, blocked = self.choices(input_ids, scores.shape[1], at_most=0)
        return scores.masked_fill(blocked.to(scores.device), float("-inf"))

    def choices(self, input_ids: torch.LongTensor, vocabulary: int,
                at_most: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        """What each row may take next, from the tokens so far only (so a caller may ask before it
        computes any scores): `(tokens, blocked)`, the ids some row may take (sorted) and a rows x
        tokens mask, True where that row may not, when there are at most `at_most` such ids; else
        `(None, blocked)` over the whole vocabulary. Finished rows block nothing (generate pads them
        whatever their scores say). On the CPU."""
        formats: list[list[int] | None] = []  # per row: the format's allowed tokens; None when finished
        copying: dict[int, list[int]] = {}  # row -> the tokens its copied value may take
        for row, ids in enumerate(input_ids.tolist()):
            if self.eos in ids[self.width:]:
                formats.append(None)
                continue
            formats.append(self.walk(tuple(ids[self.width:])))
            copied = self.copy.allowed(self._source(ids[:self.width]), ids[self.width:]) if self.copy else None
            if copied:
                copying[row] = copied
        held = self._held(formats, copying, vocabulary)
        narrow = self._narrow(formats, held, vocabulary, at_most)
        return narrow if narrow is not None else (None, self._dense(formats, held, vocabulary))

    def _held(self, formats: list[list[int] | None], copying: dict[int, list[int]],
              vocabulary: int) -> dict[int, torch.Tensor]:
        """Copying row -> the tokens its copied value and the format both allow; a row where none are
        both takes the format's tokens (never block every token of a row)."""
        held = {}
        for row, copied in copying.items():
            ids = torch.tensor(copied, dtype=torch.long)
            both = ids[~self._cached(formats[row], vocabulary)[0][ids]]
            if len(both):
                held[row] = both
        return held

    def _dense(self, formats: list[list[int] | None], held: dict[int, torch.Tensor], vocabulary: int) -> torch.Tensor:
        finished = torch.zeros(vocabulary, dtype=torch.bool)
        blocked = torch.stack([finished if allowed is None else self._cached(allowed, vocabulary)[0]
                               for allowed in formats])
        for row, tokens in held.items():
            blocked[row] = True
            blocked[row, tokens] = False
        return blocked

    def _narrow(self, formats: list[list[int] | None], held: dict[int, torch.Tensor], vocabulary: int,
                at_most: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """`choices`' narrow answer, built over the few tokens allowed rather than as row x vocabulary
        masks (about 16 ms a step at batch 128), or None when too many."""
        kinds: dict[int, list[int]] = {}  # the distinct allowed lists of rows not held to a copy
        for row, allowed in enumerate(formats):
            if allowed is None or row in held or id(allowed) in kinds:
                continue
            if len(allowed) > at_most:
                return None
            kinds[id(allowed)] = allowed
        if not kinds and not held:
            return None
        tokens = torch.unique(torch.cat([self._cached(a, vocabulary)[1] for a in kinds.values()] + list(held.values())))
        if len(tokens) > at_most:
            return None
        blocked = torch.zeros(len(formats), len(tokens), dtype=torch.bool)
        by_kind = {key: self._cached(allowed, vocabulary)[0][tokens] for key, allowed in kinds.items()}
        for row, allowed in enumerate(formats):
            if row in held:
                blocked[row] = ~torch.isin(tokens, held[row])
            elif allowed is not None:
                blocked[row] = by_kind[id(allowed)]
        return tokens, blocked

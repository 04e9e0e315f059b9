"""Datasets for an extraction task: loading from anywhere, columns, the one prompt builder,
tokenization and batching.

`load` reads a dataset into `input`/`output` columns and resolves the `task.Task` (columns,
instruction, output format) against it. `build_prompts` is the single place the prompt is built;
training, the pyfunc model and evaluation all call it with the task saved next to the model.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import datasets
import pandas as pd
import torch

from databricks_llm import constraints, formats, sample_data, spans
from databricks_llm.errors import InputError, first_line
from databricks_llm.task import E2E, E2E_INSTRUCTION, E2E_INSTRUCTIONS, LEGACY_PROMPT_VERSION, TASK_FILE, Task
from databricks_llm.validation import looks_like_path

log = logging.getLogger(__name__)

EMBEDDED_DATASET = "embedded:e2e-sample"
TICKETS_DATASET = "embedded:support-tickets"
INPUT, OUTPUT = "input", "output"  # the columns every loaded split has
SPLITS = ("train", "validation", "test")
_SPLIT_ALIASES = {
    "train": "train", "trainset": "train",
    "validation": "validation", "valid": "validation", "val": "validation",
    "dev": "validation", "devset": "validation", "devel": "validation",
    "test": "test", "testset": "test",
}
# Detected (input, output) column pairs, in order. E2E's sentence is `ref` in the original CSVs,
# `human_reference` on the hub and `target` in GEM; its MR is `mr` or `meaning_representation`.
E2E_INPUTS, E2E_OUTPUTS = ("sentence", "ref", "human_reference", "target"), ("mr", "meaning_representation")
COLUMN_PAIRS = [(i, o) for i in E2E_INPUTS for o in E2E_OUTPUTS] + [("prompt", "completion"), ("input", "output"),
                                                                     ("text", "label")]
CHAT_COLUMN = "messages"
_READERS = {
    ".csv": pd.read_csv,
    ".jsonl": lambda p: pd.read_json(p, lines=True),
    ".json": pd.read_json,
    ".parquet": pd.read_parquet,
}
_SENTINEL = "\x00INPUT\x00"


def _split_of(filename: str) -> str | None:
    """Map a file name like ``devel-fixed.no-ol.csv`` or ``trainset.csv`` to a split."""
    stem = Path(filename).name.split(".")[0].lower()
    for part in [stem, *stem.replace("-", "_").split("_")]:
        if part in _SPLIT_ALIASES:
            return _SPLIT_ALIASES[part]
    return None


def _cells(column: pd.Series) -> pd.Series:
    """A JSON object in a file cell stays one value (a JSON string): as an Arrow struct it would
    gain every other row's keys as nulls. So does each list of a column holding lists of objects or
    lists (spans such as `[4, 14, "artist"]` mix types Arrow cannot hold in one list)."""
    nested = any(isinstance(v, list) and any(isinstance(x, (dict, list)) for x in v) for v in column)
    return column.map(lambda v: json.dumps(v, ensure_ascii=False) if isinstance(v, dict) or (nested and isinstance(v, list))
                      else v)


def _read_table(path: Path) -> datasets.Dataset:
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise InputError(f"unsupported dataset file type '{path.suffix}' for {path} (use .csv, .jsonl, .json or .parquet)")
    try:
        frame = reader(path)
    except UnicodeDecodeError as err:
        raise InputError(f"dataset file {path} is not valid UTF-8 ({err.reason} at byte {err.start})") from None
    except (ValueError, OSError, pd.errors.ParserError) as err:
        raise InputError(f"cannot read dataset file {path}: {first_line(err)}") from None
    frame = frame.astype(object).where(frame.notna(), None).apply(_cells)
    try:
        return datasets.Dataset.from_pandas(frame, preserve_index=False)
    except (TypeError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError: a column mixes types
        raise InputError(f"cannot read dataset file {path}: {first_line(err, 200)}") from None


def _load_local(path: Path) -> dict[str, datasets.Dataset]:
    if path.is_file():
        return {_split_of(path.name) or "train": _read_table(path)}
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        loaded = datasets.load_from_disk(str(path))
        loaded = loaded if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
        return {(_SPLIT_ALIASES.get(k.lower(), k)): v for k, v in loaded.items()}
    splits = {}
    for file in sorted(path.iterdir()):
        split = _split_of(file.name)
        if file.suffix.lower() in _READERS and split and split not in splits:
            splits[split] = _read_table(file)
    if not splits:
        raise InputError(f"dataset folder {path} has no train/validation/test .csv/.jsonl/.parquet files")
    return splits


def _load_hub(name: str) -> dict[str, datasets.Dataset]:
    try:
        loaded = datasets.load_dataset(name)
    except Exception as err:  # the hub client raises many types; all mean "cannot get it"
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
        hint = " (the hub is offline: HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set)" if offline else ""
        raise InputError(f"dataset '{name}' is not a local path and could not be loaded from the hub{hint}: {first_line(err)}") from None
    return {_SPLIT_ALIASES.get(k.lower(), k): v for k, v in loaded.items()}


def _columns(names: list[str], task: Task, source: str, hint: bool = False) -> tuple[str, str]:
    """The (input, output) columns: the task's, else the first detected pair, else a chat column.
    With `hint`, task columns the dataset lacks are detected instead."""
    if hint:
        task = dataclasses.replace(task, **{k: None for k in ("input_column", "output_column") if getattr(task, k) not in names})
    for flag, column in (("--input_column", task.input_column), ("--output_column", task.output_column)):
        if column is not None and column not in names:
            raise InputError(f"{flag}={column} is not a column of dataset {source} (found: {', '.join(names) or 'none'})")
    if task.input_column == CHAT_COLUMN or (CHAT_COLUMN in names and not (task.input_column or task.output_column)
                                            and not any(i in names and o in names for i, o in COLUMN_PAIRS)):
        return CHAT_COLUMN, CHAT_COLUMN
    inputs = [task.input_column] if task.input_column else [i for i, _ in COLUMN_PAIRS]
    outputs = [task.output_column] if task.output_column else [o for _, o in COLUMN_PAIRS]
    for i, o in [(i, o) for i, o in COLUMN_PAIRS if i in inputs and o in outputs] + [(i, o) for i in inputs for o in outputs]:
        if i in names and o in names and i != o:
            return i, o
    raise InputError(
        f"dataset {source}: cannot tell which columns hold input and target (found: {', '.join(names) or 'none'}); "
        "name them with --input_column and --output_column (detected: sentence/ref + mr, prompt + completion, "
        "input + output, text + label, or a chat messages column)")


def _text(value: Any) -> str | None:
    """A cell as text: JSON for lists and objects (a JSON target), str() for numbers."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (dict, list, tuple)) or hasattr(value, "tolist"):
        return json.dumps(value.tolist() if hasattr(value, "tolist") else value, ensure_ascii=False)
    return str(value)


def _chat_row(messages: Any, where: str) -> dict[str, str]:
    """A chat row: the last assistant message is the target, the user message before it the input,
    system messages the instruction."""
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)
        except ValueError:
            raise InputError(f"{where}: messages is not a JSON list of {{role, content}} messages") from None
    if not isinstance(messages, list) or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
        raise InputError(f"{where}: messages must be a list of {{role, content}} messages with text content")
    roles = [m.get("role") for m in messages]
    turns = [r for r in roles[:-1] if r != "system"]
    if not roles or roles[-1] != "assistant" or turns != ["user"]:
        raise InputError(f"{where}: expected [system,] user, assistant messages (roles: {', '.join(map(str, roles))}); "
                         "multi-turn chats are not supported")
    system = "\n".join(m["content"] for m in messages if m.get("role") == "system")
    return {INPUT: messages[roles.index("user")]["content"], OUTPUT: messages[-1]["content"], "system": system}


def _normalise(split: str, ds: datasets.Dataset, source: str, columns: tuple[str, str]) -> datasets.Dataset:
    """The `input`/`output` (and, for chats, `system`) text columns; rows with an empty side dropped."""
    chat = columns[0] == CHAT_COLUMN

    def convert(row: dict, index: int) -> dict[str, str | None]:
        where = f"dataset {source} split '{split}' row {index}"
        if chat:
            return _chat_row(row[CHAT_COLUMN], where)
        value = row[columns[0]]
        if isinstance(value, (dict, list, tuple)):
            raise InputError(f"{where}: input column {columns[0]} must hold text, not a {type(value).__name__}")
        return {INPUT: _text(value), OUTPUT: _text(row[columns[1]])}

    names = [INPUT, OUTPUT, "system"] if chat else [INPUT, OUTPUT]
    ds = ds.map(convert, with_indices=True, remove_columns=ds.column_names,
                features=datasets.Features({n: datasets.Value("string") for n in names}), desc="columns")
    kept = ds.filter(lambda r: bool((r[INPUT] or "").strip()) and bool((r[OUTPUT] or "").strip()))
    if len(kept) < len(ds):
        log.info(f"[data] {split}: skipped {len(ds) - len(kept)} rows with an empty input or target")
    if len(kept) == 0:
        raise InputError(f"dataset {source} split '{split}' is empty")
    return kept


def _in_format(split: str, ds: datasets.Dataset, fmt: formats.OutputFormat, source: str) -> datasets.Dataset:
    """Targets checked against the output format and written in its one spelling (JSON compactly;
    slot targets as JSON objects when the task asks for JSON)."""
    def convert(row: dict, index: int) -> dict[str, str]:
        target = fmt.target(row[OUTPUT])
        if target is None:
            raise InputError(f"dataset {source} split '{split}' row {index}: target {fmt.unlike} "
                             f"(--output_format={fmt.name}): {row[OUTPUT][:80]!r}")
        return {OUTPUT: target}

    return ds.map(convert, with_indices=True, desc="targets")


def _in_order(ds: datasets.Dataset, fmt: formats.OutputFormat, fields: tuple[str, ...]) -> datasets.Dataset:
    """Targets with their fields in `fields`' order: one order for every target, so that structured
    decoding can allow each field at most once whatever order the data gave them in."""
    rank = {key: i for i, key in enumerate(fields)}

    def reorder(row: dict) -> dict[str, str]:
        return {OUTPUT: fmt.render(sorted(fmt.parse(row[OUTPUT]) or (), key=lambda item: rank.get(item[0], len(rank))))}

    return ds.map(reorder, desc="field order")


def _instruction(task: Task, columns: tuple[str, str], output_format: str, systems: set[str]) -> str:
    """The instruction: given, else the chat rows' shared system message, else E2E's or a generic one."""
    if task.instruction:
        return task.instruction
    if len(systems) > 1:
        raise InputError(f"the chat rows carry {len(systems)} different system messages; "
                         "give the one instruction for all with --instruction")
    if systems and (system := next(iter(systems))):
        return system
    e2e = columns[0] in E2E_INPUTS and columns[1] in E2E_OUTPUTS
    return (E2E_INSTRUCTIONS if e2e else {}).get(output_format) or formats.of(output_format).instruction


def check_source(dataset: str) -> None:
    """Cheap check before anything is loaded: a path-like `--dataset` must exist and be a regular
    file or folder (not /dev/zero, a FIFO or a socket, which would be read forever)."""
    path = Path(dataset)
    if dataset not in EMBEDDED and looks_like_path(dataset) and not path.exists():
        raise InputError(f"dataset path {dataset} does not exist")
    if path.exists() and not (path.is_file() or path.is_dir()):
        raise InputError(f"--dataset {dataset} is not a regular file or folder")


EMBEDDED = {  # name: (rows generator, the task's defaults)
    EMBEDDED_DATASET: (sample_data.generate, Task()),
    TICKETS_DATASET: (sample_data.tickets, Task(instruction=sample_data.TICKETS_INSTRUCTION, output_format="json")),
}


def load(dataset: str, task: Task = Task(), seed: int = 42, validation_fraction: float = 0.05,
         columns_hint: bool = False, need_train: bool = True) -> tuple[datasets.DatasetDict, Task]:
    """Load `dataset` (embedded sample, hub id, local file/folder, or `save_to_disk` folder) for `task`.

    Returns train/validation/test splits with text columns `input` and `output`, and the task with
    its columns, instruction and output format resolved against the training split. A missing
    validation split is a seeded `validation_fraction` hold-out of train; a missing test split
    reuses validation. With `columns_hint` (a task saved with a model, read on another copy of
    the data), the task's columns are used where the dataset has them and detected elsewhere.
    Without `need_train` (scoring), a dataset may hold only some splits, e.g. just `test`.
    """
    check_source(dataset)
    defaults = Task()
    if dataset in EMBEDDED:
        rows, defaults = EMBEDDED[dataset]
        raw = {s: datasets.Dataset.from_list(rows(n, seed=i))
               for i, (s, n) in enumerate([("train", 400), ("validation", 50), ("test", 50)])}
    elif Path(dataset).exists():
        raw = _load_local(Path(dataset))
        if (Path(dataset) / TASK_FILE).is_file():  # prepared by `save_prepared`
            defaults = Task.of_model(dataset)
    else:
        raw = _load_hub(dataset)
    raw = {k: v for k, v in raw.items() if k in SPLITS}
    if "train" not in raw and (need_train or not raw):
        raise InputError(f"dataset {dataset} has no train split (found: {', '.join(raw) or 'none'})")
    main = "train" if "train" in raw else next(iter(raw))  # the split the task is resolved on
    task = dataclasses.replace(defaults.overridden_by(task), prompt_version=task.prompt_version)
    raw, task = spans.prepared(raw, task, dataset, columns_hint)  # span-annotated rows: JSON targets
    columns = _columns(raw[main].column_names, task, dataset, columns_hint)
    splits = {k: _normalise(k, v, dataset, _columns(v.column_names, task, dataset, columns_hint))
              for k, v in raw.items()}  # each split's own names: files may differ
    systems = set(splits[main]["system"]) if columns[0] == CHAT_COLUMN else set()
    splits = {k: v.remove_columns("system") if "system" in v.column_names else v for k, v in splits.items()}
    fmt = formats.of(task.output_format) if task.output_format else formats.detect(splits[main][OUTPUT])
    splits = {k: _in_format(k, v, fmt, dataset) for k, v in splits.items()}
    task = dataclasses.replace(task, input_column=columns[0], output_column=columns[1], output_format=fmt.name,
                               instruction=_instruction(task, columns, fmt.name, systems))
    if task.schema is None and "train" in splits:
        schema = constraints.schema_of(fmt, splits["train"][OUTPUT], splits["train"][INPUT])
        task = dataclasses.replace(task, schema=schema.to_json() if schema else None)
        if schema and not schema.ordered:
            splits = {k: _in_order(v, fmt, schema.fields) for k, v in splits.items()}
    if "validation" not in splits and "train" in splits:
        try:
            held = splits["train"].train_test_split(test_size=validation_fraction, seed=seed)
        except ValueError as err:  # e.g. a fraction of a few rows that rounds to none
            raise InputError(f"--validation_fraction={validation_fraction}: {first_line(err, 200)}") from None
        splits["train"], splits["validation"] = held["train"], held["test"]
    if "validation" in splits:
        splits.setdefault("test", splits["validation"])
    return datasets.DatasetDict(splits), task


def save_prepared(splits: datasets.DatasetDict, task: Task, path: str) -> None:
    """Write loaded splits and their task to `path`: `load(path)` then gives the same rows and task
    (a chat dataset's system message included) without the flags that resolved it."""
    splits.save_to_disk(path)
    dataclasses.replace(task, input_column=INPUT, output_column=OUTPUT).save(path)


def head(split: datasets.Dataset, n: int | None) -> datasets.Dataset:
    """The first `n` rows of `split` (all of them when `n` is 0 or None, or larger than the split)."""
    return split.select(range(min(n, len(split)))) if n else split


def _prompt_parts(tokenizer: Any, task: Task) -> tuple[str, str]:
    """The text before and after the input, rendered once through the chat template if any.

    The instruction is the system message (it replaces long default system prompts such as
    SmolLM2's); templates that refuse a system role get it in the user message instead.
    """
    instruction = task.instruction or E2E_INSTRUCTION
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": instruction}, {"role": "user", "content": _SENTINEL}]
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception:  # jinja raises TemplateError from inside the template for unsupported roles
            messages = [{"role": "user", "content": f"{instruction}\n\n{_SENTINEL}"}]
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        sections = (("Description", "Meaning representation") if task.prompt_version == LEGACY_PROMPT_VERSION
                    else ("Input", "Output"))
        text = f"### Instruction:\n{instruction}\n\n### {sections[0]}:\n{_SENTINEL}\n\n### {sections[1]}:\n"
        if tokenizer.bos_token:
            text = tokenizer.bos_token + text
    prefix, suffix = text.split(_SENTINEL)
    return prefix, suffix


def build_prompts(tokenizer: Any, inputs: list[str], task: Task = E2E) -> list[str]:
    """The full prompt texts (what the model sees before its output): the one prompt builder."""
    prefix, suffix = _prompt_parts(tokenizer, task)
    return [prefix + s.strip() + suffix for s in inputs]


def encode_prompts(tokenizer: Any, inputs: list[str], task: Task = E2E) -> list[list[int]]:
    """Token ids of the prompts for `inputs`, as training, serving and evaluation see them."""
    return tokenizer(build_prompts(tokenizer, inputs, task), add_special_tokens=False)["input_ids"]


def tokenize_splits(ds: datasets.DatasetDict, tokenizer: Any, max_seq_length: int, task: Task) -> datasets.DatasetDict:
    """Prompt + target ids with prompt labels masked (-100); the target ends with a learned EOS."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise InputError("the tokenizer has no EOS token; the model could not learn to stop")

    def encode(batch: dict[str, list]) -> dict[str, list]:
        prompts = encode_prompts(tokenizer, batch[INPUT], task)
        targets = tokenizer([t.strip() for t in batch[OUTPUT]], add_special_tokens=False)["input_ids"]
        out: dict[str, list] = {"input_ids": [], "labels": [], "length": [], "truncated": []}
        for prompt, target in zip(prompts, targets):
            if len(prompt) >= max_seq_length:
                raise InputError(f"--max_seq_length={max_seq_length} is too small: a prompt has {len(prompt)} tokens")
            target = (target + [eos])[: max_seq_length - len(prompt)]
            out["input_ids"].append(prompt + target)
            out["labels"].append([-100] * len(prompt) + target)
            out["length"].append(len(prompt) + len(target))  # read by the Trainer's length-grouped sampler
            out["truncated"].append(target[-1] != eos)
        return out

    tokenized = ds.map(encode, batched=True, remove_columns=[INPUT, OUTPUT], desc="tokenize")
    for split, part in tokenized.items():
        if n := sum(part["truncated"]):
            log.info(f"[data] {split}: {n} of {len(part)} targets truncated at --max_seq_length={max_seq_length}")
    return tokenized.remove_columns("truncated")


def padded(rows: list[list[int]], value: int, left: bool) -> list[list[int]]:
    """`rows` padded with `value` to the longest one, on the left or the right: the one padding
    rule of training and generation (attention masks are the same rule on rows of ones)."""
    width = max(map(len, rows))
    return [[value] * (width - len(row)) + row if left else row + [value] * (width - len(row)) for row in rows]


def pad_batch(features: list[dict[str, list[int]]], pad_token_id: int,
              target_logits_only: bool = False) -> dict[str, torch.Tensor]:
    """Pad a batch to its longest row (dynamic padding; labels padded with -100).

    With `target_logits_only`, rows are left-padded so that every target ends the batch, and the
    model is asked for logits only at the last positions, those that predict a target token
    (`logits_to_keep`, labels cut to match). The vocabulary projection and softmax then skip the
    prompt, whose labels are -100: same loss, less work. Position ids keep each row counting from 0.
    """
    width = max(len(f["input_ids"]) for f in features)
    rows = [f["input_ids"] for f in features]
    ids = padded(rows, pad_token_id, left=target_logits_only)
    mask = padded([[1] * len(row) for row in rows], 0, left=target_logits_only)
    labels = padded([f["labels"] for f in features], -100, left=target_logits_only)
    batch = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask), "labels": torch.tensor(labels)}
    if target_logits_only:
        keep = min(width, 1 + max(len(f["labels"]) - first_target(f["labels"]) for f in features))  # +1: the logit before
        batch["labels"] = batch["labels"][:, -keep:]
        batch["logits_to_keep"] = torch.arange(width - keep, width)  # indices, not a count: a contiguous copy
        batch["position_ids"] = positions(batch["attention_mask"])
    return batch


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids from an attention mask: each row counts from 0 at its first real token."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def collator(model: Any, tokenizer: Any) -> Callable[[list[dict]], dict]:
    """The Trainer's batches for `model`: logits at target positions only when its forward allows it
    (every causal LM in transformers does; remote code may not)."""
    selective = "logits_to_keep" in inspect.signature(unwrapped(model).forward).parameters
    return partial(pad_batch, pad_token_id=tokenizer.pad_token_id, target_logits_only=selective)


def unwrapped(model: Any) -> Any:
    """The transformers model inside a PEFT wrapper (its adapters sit in its layers), or `model`."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def first_target(labels: list[int]) -> int:
    """Where a row's target starts: its first label that is not -100 (the prompt's)."""
    return next((i for i, label in enumerate(labels) if label != -100), len(labels))

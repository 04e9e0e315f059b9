"""E2E data: loading from anywhere, the one prompt format, tokenization and batching.

The task is extraction: a restaurant description in, its meaning representation (MR) such as
``name[The Punter], eatType[coffee shop], food[Chinese]`` out. `build_prompts` is the single
place the prompt is built; training, the pyfunc model and evaluation all call it.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import datasets
import pandas as pd
import torch

from databricks_llm import sample_data
from databricks_llm.errors import InputError, first_line
from databricks_llm.validation import looks_like_path

EMBEDDED_DATASET = "embedded:e2e-sample"
PROMPT_VERSION = "v2"
INSTRUCTION = (
    "Extract the meaning representation of the restaurant description as comma-separated "
    "slot[value] pairs."
)
SPLITS = ("train", "validation", "test")
_SPLIT_ALIASES = {
    "train": "train", "trainset": "train",
    "validation": "validation", "valid": "validation", "val": "validation",
    "dev": "validation", "devset": "validation", "devel": "validation",
    "test": "test", "testset": "test",
}
# The sentence column is `ref` in the original E2E CSVs, `human_reference` on the hub, `target` in GEM.
_COLUMN_ALIASES = {"meaning_representation": "mr", "ref": "sentence", "human_reference": "sentence", "target": "sentence"}
_READERS = {
    ".csv": pd.read_csv,
    ".jsonl": lambda p: pd.read_json(p, lines=True),
    ".json": pd.read_json,
    ".parquet": pd.read_parquet,
}
_SENTINEL = "\x00SENTENCE\x00"


def _split_of(filename: str) -> str | None:
    """Map a file name like ``devel-fixed.no-ol.csv`` or ``trainset.csv`` to a split."""
    stem = Path(filename).name.split(".")[0].lower()
    for part in [stem, *stem.replace("-", "_").split("_")]:
        if part in _SPLIT_ALIASES:
            return _SPLIT_ALIASES[part]
    return None


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
    return datasets.Dataset.from_pandas(frame.astype(object).where(frame.notna(), None), preserve_index=False)


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


def _normalise(split: str, ds: datasets.Dataset, source: str) -> datasets.Dataset:
    """Rename to the `mr`/`sentence` columns, drop the others and rows with an empty side."""
    ds = ds.rename_columns({c: _COLUMN_ALIASES[c] for c in ds.column_names if c in _COLUMN_ALIASES and _COLUMN_ALIASES[c] not in ds.column_names})
    if not {"mr", "sentence"} <= set(ds.column_names):
        raise InputError(
            f"dataset {source} split '{split}' needs columns mr and sentence (or E2E's ref, or "
            f"meaning_representation/human_reference); found {', '.join(ds.column_names) or 'none'}"
        )
    ds = ds.select_columns(["mr", "sentence"])
    text = datasets.Features({"mr": datasets.Value("string"), "sentence": datasets.Value("string")})
    try:  # numbers (an int-typed parquet column) become text; nested values cannot
        ds = ds if ds.features == text else ds.cast(text)
    except (TypeError, ValueError) as err:
        raise InputError(f"dataset {source} split '{split}': mr/sentence must be text ({first_line(err, 200)})") from None
    kept = ds.filter(lambda r: bool(str(r["mr"] or "").strip()) and bool(str(r["sentence"] or "").strip()))
    if len(kept) < len(ds):
        print(f"[data] {split}: skipped {len(ds) - len(kept)} rows with an empty mr or sentence", flush=True)
    if len(kept) == 0:
        raise InputError(f"dataset {source} split '{split}' is empty")
    return kept


def check_source(dataset: str) -> None:
    """Cheap check before anything is loaded: a path-like `--dataset` must exist and be a regular
    file or folder (not /dev/zero, a FIFO or a socket, which would be read forever)."""
    path = Path(dataset)
    if dataset != EMBEDDED_DATASET and looks_like_path(dataset) and not path.exists():
        raise InputError(f"dataset path {dataset} does not exist")
    if path.exists() and not (path.is_file() or path.is_dir()):
        raise InputError(f"--dataset {dataset} is not a regular file or folder")


def load_e2e(dataset: str, seed: int = 42, validation_fraction: float = 0.05) -> datasets.DatasetDict:
    """Load `dataset` (embedded sample, hub id, local file/folder, or `save_to_disk` folder).

    Returns train/validation/test splits with columns `mr` and `sentence`. A missing validation
    split is a seeded `validation_fraction` hold-out of train; a missing test split reuses
    validation.
    """
    check_source(dataset)
    if dataset == EMBEDDED_DATASET:
        raw = {s: datasets.Dataset.from_list(sample_data.generate(n, seed=i))
               for i, (s, n) in enumerate([("train", 400), ("validation", 50), ("test", 50)])}
    elif Path(dataset).exists():
        raw = _load_local(Path(dataset))
    else:
        raw = _load_hub(dataset)
    splits = {k: _normalise(k, v, dataset) for k, v in raw.items() if k in SPLITS}
    if "train" not in splits:
        raise InputError(f"dataset {dataset} has no train split (found: {', '.join(raw) or 'none'})")
    if "validation" not in splits:
        try:
            held = splits["train"].train_test_split(test_size=validation_fraction, seed=seed)
        except ValueError as err:  # e.g. a fraction of a few rows that rounds to none
            raise InputError(f"--validation_fraction={validation_fraction}: {first_line(err, 200)}") from None
        splits["train"], splits["validation"] = held["train"], held["test"]
    splits.setdefault("test", splits["validation"])
    return datasets.DatasetDict(splits)


def head(split: datasets.Dataset, n: int | None) -> datasets.Dataset:
    """The first `n` rows of `split` (all of them when `n` is 0 or None, or larger than the split)."""
    return split.select(range(min(n, len(split)))) if n else split


def _prompt_parts(tokenizer: Any) -> tuple[str, str]:
    """The text before and after the sentence, rendered once through the chat template if any.

    The instruction is the system message (it replaces long default system prompts such as
    SmolLM2's); templates that refuse a system role get it in the user message instead.
    """
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": _SENTINEL}]
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception:  # jinja raises TemplateError from inside the template for unsupported roles
            messages = [{"role": "user", "content": f"{INSTRUCTION}\n\n{_SENTINEL}"}]
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = f"### Instruction:\n{INSTRUCTION}\n\n### Description:\n{_SENTINEL}\n\n### Meaning representation:\n"
        if tokenizer.bos_token:
            text = tokenizer.bos_token + text
    prefix, suffix = text.split(_SENTINEL)
    return prefix, suffix


def build_prompts(tokenizer: Any, sentences: list[str]) -> list[str]:
    """The full prompt texts (what the model sees before the MR): the one prompt builder."""
    prefix, suffix = _prompt_parts(tokenizer)
    return [prefix + s.strip() + suffix for s in sentences]


def encode_prompts(tokenizer: Any, sentences: list[str]) -> list[list[int]]:
    """Token ids of the prompts for `sentences`, as training, serving and evaluation see them."""
    return tokenizer(build_prompts(tokenizer, sentences), add_special_tokens=False)["input_ids"]


def tokenize_splits(ds: datasets.DatasetDict, tokenizer: Any, max_seq_length: int) -> datasets.DatasetDict:
    """Prompt + target ids with prompt labels masked (-100); the target ends with a learned EOS."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise InputError("the tokenizer has no EOS token; the model could not learn to stop")

    def encode(batch: dict[str, list]) -> dict[str, list]:
        prompts = encode_prompts(tokenizer, batch["sentence"])
        targets = tokenizer([m.strip() for m in batch["mr"]], add_special_tokens=False)["input_ids"]
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

    tokenized = ds.map(encode, batched=True, remove_columns=["mr", "sentence"], desc="tokenize")
    for split, part in tokenized.items():
        if n := sum(part["truncated"]):
            print(f"[data] {split}: {n} of {len(part)} targets truncated at --max_seq_length={max_seq_length}", flush=True)
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
        keep = min(width, 1 + max(len(f["labels"]) - _first_target(f["labels"]) for f in features))  # +1: the logit before
        batch["labels"] = batch["labels"][:, -keep:]
        batch["logits_to_keep"] = torch.arange(width - keep, width)  # indices, not a count: a contiguous copy
        batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return batch


def collator(model: Any, tokenizer: Any) -> Callable[[list[dict]], dict]:
    """The Trainer's batches for `model`: logits at target positions only when its forward allows it
    (every causal LM in transformers does; remote code may not)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    selective = "logits_to_keep" in inspect.signature(base.forward).parameters
    return partial(pad_batch, pad_token_id=tokenizer.pad_token_id, target_logits_only=selective)


def _first_target(labels: list[int]) -> int:
    return next((i for i, label in enumerate(labels) if label != -100), len(labels))

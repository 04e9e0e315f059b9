"""Token-budget micro-batches packed without padding (`--batch_tokens`).

A padded micro-batch of E2E rows (60-120 tokens) spends a third of its matrix products on padding,
and a fixed row count leaves a GPU with a few thousand tokens per step. Here a micro-batch is
instead as many rows as fit a token budget, taken in length order (`TokenBudgetSampler`), laid end
to end in one row (`packed_batch`) with `position_ids` restarting at each example.

Why that keeps examples apart, in transformers 5: with no `attention_mask` and no cache,
`masking_utils.find_packed_sequence_indices` reads example boundaries from the position ids and
builds a block-diagonal causal mask for sdpa, eager and flex attention; flash_attention_2 turns the
same position ids into `cu_seqlens` for its variable-length kernels. The label of each example's
first token is -100 (as `DataCollatorWithFlattening` does), so no loss term predicts one example
from the one before it; the logits are computed only at positions that predict a target token
(`shift_labels`), as `data.pad_batch` does for padded batches. The loss, a mean over the same
target tokens, and its gradients equal the padded batch's (tests/test_batching.py).

On a CPU this measured slower than padded batches (docs/gpu.md): it is off unless asked for, and
on GPU jobs the memory plan turns it on with a budget sized to the GPU.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import Trainer

from databricks_llm.data import unwrapped
from databricks_llm.errors import InputError


def packed_batch(features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor | bool]:
    """The rows of `features` as one padding-free row: position ids restart at each example, each
    example's first label is -100, logits only at the positions that predict a target token."""
    ids = [t for f in features for t in f["input_ids"]]
    labels = [label for f in features for label in [-100, *f["labels"][1:]]]
    keep = [i for i in range(len(labels) - 1) if labels[i + 1] != -100]
    lengths = [len(f["input_ids"]) for f in features]
    bounds = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([[p for n in lengths for p in range(n)]]),
            "logits_to_keep": torch.tensor(keep), "shift_labels": torch.tensor([[labels[i + 1] for i in keep]]),
            # the examples' bounds for FlashAttention's varlen kernels, computed here rather than from the
            # position ids on the GPU in every layer (as TRL's padding-free collator does); other kernels ignore them
            "cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds, "max_length_q": max(lengths), "max_length_k": max(lengths),
            "use_cache": False}  # with a cache, transformers would not look for packed rows


def check_model(model: Any) -> None:
    """Packing needs a forward that takes `position_ids` and `logits_to_keep` (every causal LM in
    transformers does; remote code may not): InputError otherwise."""
    import inspect

    parameters = inspect.signature(unwrapped(model).forward).parameters
    missing = [name for name in ("position_ids", "logits_to_keep") if name not in parameters]
    if missing:
        raise InputError(f"--batch_tokens needs a model whose forward takes {' and '.join(missing)}")


class TokenBudgetSampler:
    """Batches of dataset indices whose lengths sum to at most `budget` tokens (a longer row is a
    batch alone: no row is dropped or repeated), rows in length order so that each batch holds rows
    of similar length, batch order shuffled each epoch (seeded, the same on every rank:
    accelerate gives each rank every world-size-th batch).

    Rows of equal length change places from one epoch to the next; the batch boundaries depend only
    on the sorted lengths, so every epoch has the same number of batches (the Trainer counts them
    once)."""

    def __init__(self, lengths: list[int], budget: int, seed: int = 0, shuffle: bool = True) -> None:
        if budget < 1:
            raise ValueError(f"token budget must be positive (got {budget})")
        self.lengths, self.budget, self.seed, self.shuffle, self.epoch = list(lengths), budget, seed, shuffle, 0
        self._count = len(self._batches(0))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.seed + epoch)
        order = sorted(range(len(self.lengths)), key=lambda i: (self.lengths[i], rng.random()))
        batches: list[list[int]] = []
        total = 0
        for index in order:
            if batches and total + self.lengths[index] <= self.budget:
                batches[-1].append(index)
                total += self.lengths[index]
            else:
                batches.append([index])
                total = self.lengths[index]
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._batches(self.epoch)

    def __len__(self) -> int:
        return self._count


class TokenBudgetBatches(Trainer):
    """A Trainer whose training batches, when `batch_tokens` is set, come from `TokenBudgetSampler`
    and `pack` (`packed_batch`; evaluation keeps the padded batches of `data_collator`)."""

    pack = staticmethod(packed_batch)

    def __init__(self, *args: Any, batch_tokens: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batch_tokens = batch_tokens
        if batch_tokens:
            check_model(self.model)

    def get_train_dataloader(self) -> DataLoader:
        if not self.batch_tokens:
            return super().get_train_dataloader()
        args, dataset = self.args, self.train_dataset
        sampler = TokenBudgetSampler(dataset["length"], self.batch_tokens, seed=args.data_seed or args.seed)
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=self.pack,
                            num_workers=args.dataloader_num_workers, pin_memory=args.dataloader_pin_memory,
                            persistent_workers=args.dataloader_persistent_workers and args.dataloader_num_workers > 0,
                            prefetch_factor=args.dataloader_prefetch_factor)
        return self.accelerator.prepare(loader)

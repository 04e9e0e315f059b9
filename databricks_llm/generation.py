"""Batched generation of a task's outputs, shared by the pyfunc model, training-time evaluation and `evaluate`."""

from __future__ import annotations

import math
from typing import Any

import torch

from databricks_llm.data import encode_prompts, padded
from databricks_llm.errors import InputError
from databricks_llm.task import E2E, Task

MAX_TOKENS_CAP = 512
MAX_INPUT_CHARS = 4000


def check_settings(temperature: float, max_tokens: float, prefix: str = "") -> tuple[float, int]:
    """The one check of generation settings, for serving requests and `evaluate` flags alike:
    a finite temperature >= 0 and an integer max_tokens in 1..MAX_TOKENS_CAP. `prefix` names
    where they came from in the message (`row 3: `, `--`)."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise InputError(f"{prefix}temperature must be a finite number >= 0 (got {temperature})")
    if not (0 < max_tokens <= MAX_TOKENS_CAP and max_tokens == int(max_tokens)):
        raise InputError(f"{prefix}max_tokens must be an integer in 1..{MAX_TOKENS_CAP} (got {max_tokens})")
    return float(temperature), int(max_tokens)


def generate(model: Any, tokenizer: Any, inputs: list[str], *, task: Task = E2E, max_tokens: int = 128,
             temperature: float = 0.0, batch_size: int = 16, synced_gpus: bool = False) -> list[str]:
    """Complete the task's prompts for `inputs` in left-padded batches; greedy when temperature is 0.

    Prompts are batched in length order (less padding), and the outputs returned in input
    order. Inputs longer than MAX_INPUT_CHARS are cut to that length (a 100 KB request would
    otherwise exhaust memory).
    `synced_gpus` keeps ZeRO-3 ranks stepping together while they generate.
    """
    prompts = encode_prompts(tokenizer, [s[:MAX_INPUT_CHARS] for s in inputs], task)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    outputs = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        chunk = [prompts[i] for i in rows]
        ids = torch.tensor(padded(chunk, pad, left=True), device=device)
        mask = torch.tensor(padded([[1] * len(p) for p in chunk], 0, left=True), device=device)
        width = ids.shape[1]
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens,
                                 pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                                 synced_gpus=synced_gpus, **sampling)
        for i, text in zip(rows, tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)):
            outputs[i] = text.strip()
    return outputs

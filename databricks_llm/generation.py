"""Batched generation of a task's outputs: the one decoder of serving, training-time evaluation,
`evaluate` and the benchmarks."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch

from databricks_llm import constraints
from databricks_llm.data import encode_prompts, padded, positions, unwrapped
from databricks_llm.formats import STRUCTURED_DEFAULT
from databricks_llm.task import E2E, Task
from databricks_llm.validation import MIN_TEMPERATURE, check_settings  # noqa: F401  (check_settings: models logged by 0.1.0 import it from here)

MAX_INPUT_CHARS = 4000
NARROW_AT_MOST = 0.25  # share of the vocabulary up to which a step projects onto the allowed tokens only


@dataclass(frozen=True)
class Settings:
    """How to decode: `temperature` 0 is greedy (lowest id first on ties); a step projects onto only
    the tokens some row may take when they are at most a `narrow` share of the vocabulary (a
    format's keys, closed values and copied text rather than 49,152 tokens: 21% of a SmolLM2 step's
    products; 0: never); `synced` keeps ZeRO-3 ranks stepping together (no narrow projection there:
    the head's weight is partitioned)."""

    max_tokens: int = 128
    temperature: float = 0.0
    narrow: float = NARROW_AT_MOST
    synced: bool = False


def generate(model: Any, tokenizer: Any, inputs: list[str], *, task: Task = E2E, max_tokens: int = 128,
             temperature: float = 0.0, batch_size: int = 16, synced_gpus: bool = False,
             structured: bool = STRUCTURED_DEFAULT, narrow: float = NARROW_AT_MOST,
             progress: Callable[[int], None] | None = None) -> list[str]:
    """Complete the task's prompts for `inputs` in batches, in length order (less padding), and
    return the outputs in input order. Inputs are cut to MAX_INPUT_CHARS (a 100 KB request would
    otherwise exhaust memory). `structured` holds each output to the task's format (`constraints`).
    `progress` is called with the number of rows done after each batch."""
    inputs = [s[:MAX_INPUT_CHARS] for s in inputs]
    prompts = encode_prompts(tokenizer, inputs, task)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    constraint = constraints.for_task(tokenizer, task) if structured else None
    settings = Settings(max_tokens, temperature, narrow, synced_gpus)
    device, outputs = next(model.parameters()).device, [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        ids = torch.tensor(padded([prompts[i] for i in rows], pad, left=True), device=device)
        mask = torch.tensor(padded([[1] * len(prompts[i]) for i in rows], 0, left=True), device=device)
        guide = constraint.rows([inputs[i] for i in rows]) if constraint else None
        with torch.no_grad():
            new = decode(model, ids, mask, tokenizer.eos_token_id, pad, settings, guide)
        for i, text in zip(rows, tokenizer.batch_decode(new, skip_special_tokens=True)):
            outputs[i] = text.strip()
        if progress:
            progress(start + len(rows))
    return outputs


def decode(model: Any, ids: torch.Tensor, mask: torch.Tensor, eos: int, pad: int, settings: Settings,
           guide: constraints.Rows | None = None) -> torch.Tensor:
    """The new tokens for left-padded prompts `ids`, `pad` after a row's end. A row leaves the batch
    as soon as it ends (at batch 128 about a quarter of a batch's row-steps come after its rows'
    ends), except under `synced`, where rows stay until every rank's rows have ended."""
    from transformers import DynamicCache

    base = unwrapped(model)
    body, head = base.get_decoder(), base.get_output_embeddings()
    step = {cache_argument(body): DynamicCache(config=base.config), "use_cache": True}
    position = positions(mask)
    state = body(input_ids=ids, attention_mask=mask, position_ids=position, **step).last_hidden_state[:, -1]
    tokens = torch.full((len(ids), settings.max_tokens), pad, dtype=torch.long, device=ids.device)
    live, ended, position = torch.arange(len(ids), device=ids.device), torch.zeros_like(ids[:, 0], dtype=torch.bool), position[:, -1:]
    for i in range(settings.max_tokens):
        token = _choose(state, head, guide.allowed() if guide else None, settings).masked_fill(ended, pad)
        tokens[live, i], ended = token, ended | (token == eos)
        if guide:
            guide.advance(token.tolist())
        if i == settings.max_tokens - 1 or not _going(~ended, settings.synced):
            break
        if not settings.synced and ended.any():
            keep = (~ended).nonzero().squeeze(1)
            live, token, mask, position, ended = live[keep], token[keep], mask[keep], position[keep], ended[keep]
            step[cache_argument(body)].batch_select_indices(keep)
            if guide:
                guide.keep(keep.tolist())
        mask, position = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1), position + 1
        state = body(input_ids=token[:, None], attention_mask=mask, position_ids=position, **step).last_hidden_state[:, -1]
    return tokens


def _choose(state: torch.Tensor, head: torch.nn.Module, allowed: list[torch.Tensor] | None,
            settings: Settings) -> torch.Tensor:
    """Each row's next token from its last hidden state: the best (or, with a temperature, a
    sampled) token among those it may take."""
    tokens = torch.unique(torch.cat(allowed)).to(state.device) if allowed and not settings.synced else None
    if tokens is not None and len(tokens) <= settings.narrow * head.weight.shape[0]:
        bias = head.bias.index_select(0, tokens) if head.bias is not None else None
        scores = torch.nn.functional.linear(state, head.weight.index_select(0, tokens), bias).float()
    else:
        tokens, scores = None, head(state.contiguous()).float()
    if settings.temperature > 0:
        scores = scores / max(settings.temperature, MIN_TEMPERATURE)  # requests are refused below it
    if allowed:
        blocked, columns = torch.ones(scores.shape, dtype=torch.bool), None if tokens is None else tokens.cpu()
        for row, ids in enumerate(allowed):
            blocked[row, ids if columns is None else torch.searchsorted(columns, ids)] = False
        scores = scores.masked_fill(blocked.to(scores.device), float("-inf"))
    chosen = torch.multinomial(scores.softmax(-1), 1)[:, 0] if settings.temperature > 0 else scores.argmax(-1)
    return chosen if tokens is None else tokens[chosen]


def _going(going: torch.Tensor, synced: bool) -> bool:
    """Whether any row (of any rank, when `synced`) is still writing."""
    if not synced:
        return bool(going.any())
    flag = going.any().float()
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag)


def cache_argument(model: Any) -> str:
    """The name the model's forward gives its key/value cache (`cache` since transformers 5.20,
    `past_key_values` before)."""
    return "cache" if "cache" in inspect.signature(unwrapped(model).forward).parameters else "past_key_values"

"""Batched generation of a task's outputs, shared by the pyfunc model, training-time evaluation and `evaluate`."""

from __future__ import annotations

import contextlib
import copy
import inspect
from typing import Any, Callable

import torch
from transformers import LogitsProcessorList

from databricks_llm import constraints
from databricks_llm.data import encode_prompts, padded, unwrapped
from databricks_llm.errors import InputError
from databricks_llm.task import E2E, Task

MAX_TOKENS_CAP = 512
MAX_TEMPERATURE = 10.0  # past this sampling is noise; huge values overflow the logits' division in torch
MIN_TEMPERATURE = 1e-3  # a positive temperature below this overflows float32 logits (use 0: greedy)
STRUCTURED_DEFAULT = True  # structured decoding (`constraints`) unless a caller says otherwise: measured to help (docs/benchmarks.md)
MAX_INPUT_CHARS = 4000


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


def generate(model: Any, tokenizer: Any, inputs: list[str], *, task: Task = E2E, max_tokens: int = 128,
             temperature: float = 0.0, batch_size: int = 16, synced_gpus: bool = False,
             reuse_prefix: bool = True, structured: bool = STRUCTURED_DEFAULT,
             progress: Callable[[int], None] | None = None) -> list[str]:
    """Complete the task's prompts for `inputs` in batches; greedy when temperature is 0.

    Prompts are batched in length order (less padding), and the outputs returned in input
    order. Inputs longer than MAX_INPUT_CHARS are cut to that length (a 100 KB request would
    otherwise exhaust memory).
    Every prompt starts with the same tokens (chat template and instruction): with
    `reuse_prefix` their keys and values are computed once and every batch starts from a copy,
    with each row's padding placed between that prefix and the row's own tokens (positions
    follow the attention mask, so each row sees what it would see alone).
    `structured` confines each output to the task's format (`constraints`: the fields and closed
    values of the training targets, each field at most once).
    Greedy decoding (temperature 0) lets each row leave its batch when it ends (`_greedy`);
    sampling runs transformers' `generate`.
    `synced_gpus` keeps ZeRO-3 ranks stepping together while they generate (`generate` again, and no
    prefix reuse: a forward outside `generate` would not be synchronised).
    `progress` is called with the number of rows done after each batch.
    """
    prompts = encode_prompts(tokenizer, [s[:MAX_INPUT_CHARS] for s in inputs], task)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    shared = shared_prefix(prompts) if reuse_prefix and not synced_gpus else []
    with torch.no_grad():
        prefix_kv = prefix_cache(model, torch.tensor([shared], device=device)) if shared else None
    constraint = constraints.for_task(tokenizer, task) if structured else None
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    outputs = [""] * len(prompts)
    with _contiguous_head_input(model):
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            chunk = [prompts[i][len(shared):] for i in rows]
            ids = torch.tensor([shared + row for row in padded(chunk, pad, left=True)], device=device)
            ones = padded([[1] * len(p) for p in chunk], 0, left=True)
            mask = torch.tensor([[1] * len(shared) + row for row in ones], device=device)
            width = ids.shape[1]
            processor = constraint.processor(width) if constraint else None
            cache = None
            if prefix_kv is not None:
                cache = copy.deepcopy(prefix_kv)
                cache.batch_repeat_interleave(len(rows))
            with torch.no_grad():
                if temperature == 0 and not synced_gpus:
                    new = _greedy(model, ids, mask, cache, max_tokens, tokenizer.eos_token_id, pad, processor)
                else:
                    new = _transformers_generate(model, ids, mask, cache, max_tokens, tokenizer.eos_token_id, pad,
                                                 processor, synced_gpus=synced_gpus, **sampling)
            for i, text in zip(rows, tokenizer.batch_decode(new, skip_special_tokens=True)):
                outputs[i] = text.strip()
            if progress:
                progress(start + len(rows))
    return outputs


def _greedy(model: Any, ids: torch.Tensor, mask: torch.Tensor, cache: Any, max_tokens: int, eos: int, pad: int,
            processor: Any) -> torch.Tensor:
    """Greedy decoding as `generate` does it (positions from the attention mask, the last position's
    logits in float32, then `processor`, then argmax), except that a row leaves the batch as soon as
    it ends: `generate` runs every row until the batch's longest ends, and at batch 128 about a
    quarter of its row-steps come after a row's end. With a `processor` the vocabulary projection
    covers only the tokens some row may take next (`_next_tokens`). `cache` holds the keys and values
    of the first columns of `ids` (the shared prefix), or is None. Returns the new tokens, `pad` after
    a row's end."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config) if cache is None else cache
    split = _body_and_head(model) if processor is not None else None
    body = split[0] if split else model
    step_inputs = {cache_argument(body): cache, "use_cache": True, **({} if split else {"logits_to_keep": 1})}

    def last(input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = body(input_ids=input_ids, attention_mask=mask, position_ids=positions, **step_inputs)
        return (out.last_hidden_state if split else out.logits)[:, -1]

    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    done = cache.get_seq_length()
    state = last(ids[:, done:], mask, positions[:, done:])
    tokens = torch.full((ids.shape[0], max_tokens), pad, dtype=torch.long, device=ids.device)
    live, sequences, position = torch.arange(ids.shape[0], device=ids.device), ids, positions[:, -1:]
    for step in range(max_tokens):
        token = _next_tokens(state, sequences, processor, split[1] if split else None)
        tokens[live, step] = token
        going = token != eos
        if step == max_tokens - 1 or not going.any():
            break
        if not going.all():
            keep = going.nonzero().squeeze(1)
            live, token, mask, sequences, position = live[keep], token[keep], mask[keep], sequences[keep], position[keep]
            cache.batch_select_indices(keep)
        sequences = torch.cat([sequences, token[:, None]], dim=1)
        mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)
        position = position + 1
        state = last(token[:, None], mask, position)
    return tokens


NARROW_PROJECTION_AT_MOST = 0.25  # share of the vocabulary below which `_next_tokens` projects onto the allowed tokens only


def _next_tokens(state: torch.Tensor, sequences: torch.Tensor, processor: Any, head: Any) -> torch.Tensor:
    """Each row's greedy next token. `state` is the last position's logits, or (with `head`, the
    vocabulary projection) its hidden state: then the projection runs over only the tokens some row
    of the batch may take next when they are few (a format's keys, closed values and copied text
    rather than 49,152 tokens; 21% of a SmolLM2 decoding step's products), else over them all.
    Either way each row takes the highest-scoring token it may take, lowest id first on ties."""
    if head is None:
        scores = state.float()
        return (processor(sequences, scores) if processor is not None else scores).argmax(-1)
    vocabulary = head.weight.shape[0]
    tokens, blocked = processor.choices(sequences, vocabulary, at_most=int(NARROW_PROJECTION_AT_MOST * vocabulary))
    blocked = blocked.to(state.device)
    if tokens is None:
        return head(state).float().masked_fill(blocked, float("-inf")).argmax(-1)
    tokens = tokens.to(state.device)
    bias = head.bias.index_select(0, tokens) if head.bias is not None else None
    scores = torch.nn.functional.linear(state, head.weight.index_select(0, tokens), bias).float()
    return tokens[scores.masked_fill(blocked, float("-inf")).argmax(-1)]


def _body_and_head(model: Any) -> tuple[Any, torch.nn.Linear] | None:
    """The model's body (hidden states out) and its vocabulary projection, where its forward is the
    one then the other (transformers' causal LMs whose `get_decoder` names a separate body), else None.
    A LoRA model's adapters sit inside the body's layers, so they still apply."""
    base = unwrapped(model)
    head = base.get_output_embeddings()
    body = base.get_decoder() if hasattr(base, "get_decoder") else base
    return (body, head) if body is not base and isinstance(head, torch.nn.Linear) else None


def _transformers_generate(model: Any, ids: torch.Tensor, mask: torch.Tensor, cache: Any, max_tokens: int, eos: int,
                           pad: int, processor: Any, **settings: Any) -> torch.Tensor:
    """The new tokens from transformers' `generate` (sampling, ZeRO-3's synced steps), called as
    `_greedy` is; every row steps until the batch's longest ends."""
    extra = {"logits_processor": LogitsProcessorList([processor])} if processor else {}
    if cache is not None:
        extra[cache_argument(model)] = cache
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens, pad_token_id=pad,
                          eos_token_id=eos, **extra, **settings)[:, ids.shape[1]:]


@contextlib.contextmanager
def _contiguous_head_input(model: Any) -> Any:
    """Make the vocabulary projection's input contiguous while generating.

    On the first step `generate` asks for the last position's logits only, and transformers takes
    it as a strided slice of the hidden states. torch's matmul cannot fold a strided 3-D input into
    one matrix product, so it broadcasts the weight to every row and runs a batched product instead:
    a [batch, hidden, vocab] copy of the weight (7 GB for SmolLM2 at batch 128) per batch, found by
    profiling `evaluate` on CPU. A contiguous copy of the slice (batch x hidden) avoids it."""
    head = model.get_output_embeddings()
    if head is None:
        yield
        return
    handle = head.register_forward_pre_hook(lambda _, args: (args[0].contiguous(), *args[1:]))
    try:
        yield
    finally:
        handle.remove()


def shared_prefix(prompts: list[list[int]], minimum: int = 16) -> list[int]:
    """The token ids every prompt starts with, less one so each row keeps a token of its own;
    empty when shorter than `minimum` (not worth a cache) or when there is one prompt."""
    if len(prompts) < 2:
        return []
    first, length = prompts[0], min(len(p) for p in prompts) - 1
    for prompt in prompts[1:]:
        length = next((i for i in range(length) if prompt[i] != first[i]), length)
    return first[:length] if length >= minimum else []


def cache_argument(model: Any) -> str:
    """The name the model's forward gives its key/value cache (`cache` since transformers 5.20,
    `past_key_values` before)."""
    return "cache" if "cache" in inspect.signature(unwrapped(model).forward).parameters else "past_key_values"


def prefix_cache(model: Any, prefix: torch.Tensor) -> Any:
    """Keys and values of `prefix` (token ids, 1 x P) from `model`, for batches that start from it.
    Scoring calls it under `torch.no_grad()` and copies the result for every batch."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    model(input_ids=prefix, use_cache=True, **{cache_argument(model): cache})
    return cache

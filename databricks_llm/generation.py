"""Batched generation of meaning representations, shared by the pyfunc model and evaluation."""

from __future__ import annotations

from typing import Any

import torch

from databricks_llm.data import encode_prompts

MAX_TOKENS_CAP = 512
MAX_SENTENCE_CHARS = 4000


def generate(model: Any, tokenizer: Any, sentences: list[str], *, max_tokens: int = 128,
             temperature: float = 0.0, batch_size: int = 16, synced_gpus: bool = False) -> list[str]:
    """Complete the prompts for `sentences` in left-padded batches; greedy when temperature is 0.

    Sentences longer than MAX_SENTENCE_CHARS are cut to that length (a restaurant description
    never needs more; a 100 KB request would otherwise exhaust memory). `synced_gpus` keeps
    ZeRO-3 ranks stepping together while they generate.
    """
    prompts = encode_prompts(tokenizer, [s[:MAX_SENTENCE_CHARS] for s in sentences])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    outputs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        width = max(map(len, chunk))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens,
                                 pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                                 synced_gpus=synced_gpus, **sampling)
        outputs += [t.strip() for t in tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)]
    return outputs

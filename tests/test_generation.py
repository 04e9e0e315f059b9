"""Batched generation: the instruction prefix's keys and values are computed once and reused."""

from __future__ import annotations

import pytest

from databricks_llm.generation import generate, shared_prefix
from databricks_llm.sample_data import generate as sample_rows
from databricks_llm.task import E2E, Task


@pytest.fixture(scope="module")
def tiny_causal_lm(tiny_model, tiny_tokenizer):
    """The tiny random Llama with larger weights and its special tokens' embeddings zeroed (tied to
    the output layer): greedy decoding writes varied ordinary tokens instead of newlines or a stop."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for weight in model.parameters():
            weight.normal_(0, 0.3)
        model.get_input_embeddings().weight[tiny_tokenizer.all_special_ids] = 0
    return model


def test_shared_prefix_is_the_common_start_less_one_token():
    assert shared_prefix([list(range(40)) + [1], list(range(40)) + [2, 3]]) == list(range(40))
    assert shared_prefix([list(range(20)), list(range(20))]) == list(range(19))  # each row keeps a token


def test_shared_prefix_is_empty_when_short_or_alone():
    assert shared_prefix([[1, 2, 3], [1, 2, 4]]) == []
    assert shared_prefix([list(range(40))]) == []


@pytest.mark.parametrize("task", [E2E, Task(output_format="json", instruction="Return JSON.")], ids=["slots", "json"])
def test_reusing_the_prefix_gives_the_same_greedy_outputs(tiny_causal_lm, tiny_tokenizer, task):
    inputs = [row["sentence"] for row in sample_rows(12, seed=7)]
    kwargs = {"task": task, "max_tokens": 12, "batch_size": 5, "structured": False}
    reused = generate(tiny_causal_lm, tiny_tokenizer, inputs, reuse_prefix=True, **kwargs)
    assert reused == generate(tiny_causal_lm, tiny_tokenizer, inputs, reuse_prefix=False, **kwargs)
    assert len(set(reused)) > 1


def test_the_vocabulary_projection_gets_contiguous_input_while_generating_and_no_hook_is_left(tiny_causal_lm,
                                                                                              tiny_tokenizer):
    head = tiny_causal_lm.get_output_embeddings()
    seen = []
    probe = head.register_forward_hook(lambda _, args, out: seen.append(args[0].is_contiguous()))
    try:
        generate(tiny_causal_lm, tiny_tokenizer, ["The Mill is a pub.", "A cheap pub near the river."], max_tokens=3,
                 batch_size=2, structured=False)
    finally:
        probe.remove()
    assert seen and all(seen)  # a strided slice here makes torch broadcast the weight to every row (slow on CPU)
    assert not head._forward_pre_hooks


def test_greedy_decoding_gives_generates_tokens_while_rows_leave_the_batch_as_they_end(tiny_causal_lm, tiny_tokenizer):
    import torch

    from databricks_llm.data import encode_prompts, padded
    from databricks_llm.generation import _greedy

    prompts = encode_prompts(tiny_tokenizer, [row["sentence"] for row in sample_rows(6, seed=3)], E2E)
    pad = tiny_tokenizer.pad_token_id
    ids = torch.tensor(padded(prompts, pad, left=True))
    mask = torch.tensor(padded([[1] * len(p) for p in prompts], 0, left=True))
    settings = {"input_ids": ids, "attention_mask": mask, "max_new_tokens": 10, "do_sample": False, "pad_token_id": pad}
    free = tiny_causal_lm.generate(**settings)[:, ids.shape[1]:]
    rows = free.tolist()
    ends = {token: {row.index(token) for row in rows if token in row} for token in free.unique().tolist()}
    stop = max(ends, key=lambda token: len(ends[token]))  # the token that ends rows at the most different steps
    expected = tiny_causal_lm.generate(**settings, eos_token_id=stop)[:, ids.shape[1]:]
    batch_sizes = []
    probe = tiny_causal_lm.register_forward_pre_hook(
        lambda _, args, kwargs: batch_sizes.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    try:
        with torch.no_grad():
            tokens = _greedy(tiny_causal_lm, ids, mask, None, 10, stop, pad, None)
    finally:
        probe.remove()
    assert torch.equal(tokens[:, :expected.shape[1]], expected)
    assert (tokens[:, expected.shape[1]:] == pad).all()
    assert batch_sizes[0] == 6 and batch_sizes[-1] < 6 and batch_sizes == sorted(batch_sizes, reverse=True)


def structured_greedy_against_generate(model, tokenizer, task, rows=6):
    """`_greedy`'s tokens under the task's format, transformers' `generate`'s with the same processor,
    and how many of `_greedy`'s steps ran the whole vocabulary projection."""
    import torch

    from databricks_llm import constraints, generation
    from databricks_llm.data import encode_prompts, padded

    prompts = encode_prompts(tokenizer, [row["sentence"] for row in sample_rows(rows, seed=5)], task)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    ids = torch.tensor(padded(prompts, pad, left=True))
    mask = torch.tensor(padded([[1] * len(p) for p in prompts], 0, left=True))
    constraint = constraints.for_task(tokenizer, task)
    head_calls = []
    with torch.no_grad():
        expected = generation._transformers_generate(model, ids, mask, None, 30, eos, pad,
                                                     constraint.processor(ids.shape[1]), do_sample=False)
        probe = model.get_output_embeddings().register_forward_hook(lambda *_: head_calls.append(1))
        try:
            tokens = generation._greedy(model, ids, mask, None, 30, eos, pad, constraint.processor(ids.shape[1]))
        finally:
            probe.remove()
    return tokens, expected, len(head_calls)


@pytest.mark.parametrize("narrow_at_most", [1.0, 0.0], ids=["allowed-tokens-only", "whole-vocabulary"])
def test_structured_greedy_decoding_gives_generates_tokens_with_either_projection(tiny_causal_lm, tiny_tokenizer,
                                                                                 monkeypatch, narrow_at_most):
    import torch

    from databricks_llm import data, generation

    _, task = data.load("embedded:e2e-sample")
    monkeypatch.setattr(generation, "NARROW_PROJECTION_AT_MOST", narrow_at_most)
    tokens, expected, head_calls = structured_greedy_against_generate(tiny_causal_lm, tiny_tokenizer, task)
    assert torch.equal(tokens[:, :expected.shape[1]], expected)
    assert (tokens[:, expected.shape[1]:] == tiny_tokenizer.pad_token_id).all()
    assert bool(head_calls) == (narrow_at_most == 0.0)  # allowed tokens only: the full projection never runs


def test_json_values_of_any_text_switch_to_the_whole_projection_and_back_with_generates_tokens(tiny_causal_lm,
                                                                                               tiny_tokenizer):
    import dataclasses

    import torch

    from databricks_llm import data
    from databricks_llm.constraints import Schema

    _, task = data.load("embedded:e2e-sample", Task(output_format="json"))
    free = dataclasses.replace(task, schema=dataclasses.replace(Schema.from_json(task.schema), copied=()).to_json())
    tokens, expected, head_calls = structured_greedy_against_generate(tiny_causal_lm, tiny_tokenizer, free)
    assert torch.equal(tokens[:, :expected.shape[1]], expected)
    assert 0 < head_calls < expected.shape[1]  # whole projection while a value is open text, narrow elsewhere

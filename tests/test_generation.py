"""The one decoder: greedy decoding as transformers' `generate` does it, rows leaving the batch as
they end, structured decoding by the task's format, and ranks stepping together under ZeRO-3."""

from __future__ import annotations

import pytest

from databricks_llm.sample_data import generate as sample_rows
from databricks_llm.task import E2E


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


def batch(tokenizer, task, rows: int, seed: int):
    """Left-padded prompt ids and mask of `rows` sample sentences, and the sentences."""
    import torch

    from databricks_llm.data import encode_prompts, padded

    inputs = [row["sentence"] for row in sample_rows(rows, seed=seed)]
    prompts = encode_prompts(tokenizer, inputs, task)
    ids = torch.tensor(padded(prompts, tokenizer.pad_token_id, left=True))
    mask = torch.tensor(padded([[1] * len(p) for p in prompts], 0, left=True))
    return ids, mask, inputs


def test_the_vocabulary_projection_gets_contiguous_input_while_generating(tiny_causal_lm, tiny_tokenizer):
    from databricks_llm.generation import generate

    seen = []
    probe = tiny_causal_lm.get_output_embeddings().register_forward_hook(
        lambda _, args, out: seen.append(args[0].is_contiguous()))
    try:
        generate(tiny_causal_lm, tiny_tokenizer, ["The Mill is a pub.", "A cheap pub near the river."], max_tokens=3,
                 batch_size=2, structured=False)
    finally:
        probe.remove()
    assert seen and all(seen)  # a strided slice here makes torch broadcast the weight to every row (slow on CPU)


def test_greedy_decoding_gives_generates_tokens_while_rows_leave_the_batch_as_they_end(tiny_causal_lm, tiny_tokenizer):
    import torch

    from databricks_llm.generation import Settings, decode

    ids, mask, _ = batch(tiny_tokenizer, E2E, 6, seed=3)
    pad = tiny_tokenizer.pad_token_id
    settings = {"input_ids": ids, "attention_mask": mask, "max_new_tokens": 10, "do_sample": False, "pad_token_id": pad}
    rows = tiny_causal_lm.generate(**settings)[:, ids.shape[1]:].tolist()
    ends = {token: {row.index(token) for row in rows if token in row} for token in {t for row in rows for t in row}}
    stop = max(ends, key=lambda token: len(ends[token]))  # the token that ends rows at the most different steps
    expected = tiny_causal_lm.generate(**settings, eos_token_id=stop)[:, ids.shape[1]:]
    batch_sizes = []
    probe = tiny_causal_lm.get_decoder().register_forward_pre_hook(
        lambda _, args, kwargs: batch_sizes.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    try:
        with torch.no_grad():
            tokens = decode(tiny_causal_lm, ids, mask, stop, pad, Settings(max_tokens=10))
    finally:
        probe.remove()
    assert torch.equal(tokens[:, :expected.shape[1]], expected)
    assert (tokens[:, expected.shape[1]:] == pad).all()
    assert batch_sizes[0] == 6 and batch_sizes[-1] < 6 and batch_sizes == sorted(batch_sizes, reverse=True)


class FormatProcessor:
    """A transformers `LogitsProcessor` holding each row to the tokens the format allows, replayed
    from the row's tokens at every step: the reference the decoder's own steps are checked against."""

    def __init__(self, constraint, sources, width):
        self.constraint, self.sources, self.width = constraint, sources, width

    def __call__(self, input_ids, scores):
        blocked = scores.new_ones(scores.shape, dtype=bool)
        for row, ids in enumerate(input_ids.tolist()):
            rows = self.constraint.rows([self.sources[row]])
            written = ids[self.width:]
            if self.constraint.eos in written:
                blocked[row] = False
                continue
            for token in written:
                rows.advance([token])
            blocked[row, rows.allowed()[0]] = False
        return scores.masked_fill(blocked, float("-inf"))


def structured_against_generate(model, tokenizer, task, narrow: bool):
    """The decoder's tokens under the task's format, `generate`'s under `FormatProcessor`, and how
    many of the decoder's steps ran the whole vocabulary projection."""
    import torch
    from transformers import LogitsProcessorList

    from databricks_llm import constraints
    from databricks_llm.generation import Settings, decode

    ids, mask, inputs = batch(tokenizer, task, 6, seed=5)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    constraint = constraints.for_task(tokenizer, task)
    processor = LogitsProcessorList([FormatProcessor(constraint, inputs, ids.shape[1])])
    head_calls = []
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=30, pad_token_id=pad,
                                  eos_token_id=eos, do_sample=False, logits_processor=processor)[:, ids.shape[1]:]
        probe = model.get_output_embeddings().register_forward_hook(lambda *_: head_calls.append(1))
        try:
            tokens = decode(model, ids, mask, eos, pad, Settings(30, narrow=narrow), constraint.rows(inputs))
        finally:
            probe.remove()
    return tokens, expected, len(head_calls)


@pytest.mark.parametrize("narrow", [1.0, 0.0], ids=["allowed-tokens-only", "whole-vocabulary"])
def test_structured_decoding_gives_generates_tokens_with_either_projection(tiny_causal_lm, tiny_tokenizer, narrow):
    import torch

    from databricks_llm import data

    _, task = data.load("embedded:e2e-sample")
    tokens, expected, head_calls = structured_against_generate(tiny_causal_lm, tiny_tokenizer, task, narrow)
    assert torch.equal(tokens[:, :expected.shape[1]], expected)
    assert (tokens[:, expected.shape[1]:] == tiny_tokenizer.pad_token_id).all()
    assert bool(head_calls) == (narrow == 0.0)  # allowed tokens only: the whole projection never runs


def test_json_values_of_any_text_switch_to_the_whole_projection_and_back_with_generates_tokens(tiny_causal_lm,
                                                                                               tiny_tokenizer):
    import dataclasses

    import torch

    from databricks_llm import data
    from databricks_llm.constraints import Schema
    from databricks_llm.task import Task

    _, task = data.load("embedded:e2e-sample", Task(output_format="json"))
    free = dataclasses.replace(task, schema=dataclasses.replace(Schema.from_json(task.schema), copied=()).to_json())
    tokens, expected, head_calls = structured_against_generate(tiny_causal_lm, tiny_tokenizer, free, narrow=0.25)
    assert torch.equal(tokens[:, :expected.shape[1]], expected)
    assert 0 < head_calls < expected.shape[1]  # whole projection while a value is open text, narrow elsewhere


def test_sampling_keeps_the_format_and_survives_extreme_temperatures(tiny_causal_lm, tiny_tokenizer):
    from databricks_llm.generation import generate
    from databricks_llm.scoring import E2E_SLOTS, parse_mr

    inputs = [row["sentence"] for row in sample_rows(4, seed=2)]
    for temperature in (0.7, 1e-30, 1e30):
        outputs = generate(tiny_causal_lm, tiny_tokenizer, inputs, task=E2E, max_tokens=20, temperature=temperature)
        for text in outputs:  # a random model may run out of tokens inside a value, never out of the format
            keys = [key for key, _ in parse_mr(text)]
            assert text.split("[")[0] in E2E_SLOTS and keys == sorted(set(keys), key=E2E_SLOTS.index), text


def test_synced_ranks_keep_stepping_together_and_give_the_same_outputs(tiny_causal_lm, tiny_tokenizer):
    """ZeRO-3 (`synced_gpus`): no row leaves the batch and every step asks the other ranks whether
    to go on; a one-rank gloo group shows the outputs stay the same."""
    import torch.distributed as dist

    from databricks_llm.generation import generate
    from conftest import free_port

    inputs = [row["sentence"] for row in sample_rows(5, seed=4)]
    alone = generate(tiny_causal_lm, tiny_tokenizer, inputs, max_tokens=12, batch_size=5)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        assert generate(tiny_causal_lm, tiny_tokenizer, inputs, max_tokens=12, batch_size=5, synced_gpus=True) == alone
    finally:
        dist.destroy_process_group()

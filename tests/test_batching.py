"""Token-budget micro-batches packed without padding (`--batch_tokens`, databricks_llm/batching.py)."""

from __future__ import annotations

import json
import random

import datasets
import pytest
import torch

from conftest import QUICK_JOB, REPO, loss_and_gradients, run_module
from databricks_llm import batching, data, sample_data
from databricks_llm.task import E2E


def tokenized(tokenizer, n: int, seed: int) -> datasets.Dataset:
    """`n` embedded E2E rows as fine_tune tokenizes them."""
    pairs = [{data.INPUT: r["sentence"], data.OUTPUT: r["mr"]} for r in sample_data.generate(n, seed=seed)]
    ds = datasets.DatasetDict({"train": datasets.Dataset.from_list(pairs)})
    return data.tokenize_splits(ds, tokenizer, max_seq_length=256, task=E2E)["train"]


@pytest.fixture(scope="module")
def rows(tiny_tokenizer) -> list[dict]:
    return list(tokenized(tiny_tokenizer, 6, seed=3))


def test_packed_batch_is_one_row_with_positions_restarting_at_each_example():
    batch = batching.packed_batch([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                                   {"input_ids": [8, 9], "labels": [8, 9]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9]]  # no loss predicts an example from the one before
    assert batch["logits_to_keep"].tolist() == [0, 1, 3]  # the positions that predict a target token
    assert batch["shift_labels"].tolist() == [[6, 7, 9]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5] and batch["max_length_q"] == 3  # FlashAttention varlen
    assert "attention_mask" not in batch  # transformers reads the examples' bounds from the position ids


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_batch_gives_the_padded_batch_loss_and_gradients(tiny_model, tiny_tokenizer, rows, attention):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation=attention)
    (padded_loss, padded_grads), (packed_loss, packed_grads) = loss_and_gradients(
        model, (data.pad_batch(rows, tiny_tokenizer.pad_token_id), batching.packed_batch(rows)))
    assert packed_loss == pytest.approx(padded_loss, rel=1e-5)
    torch.testing.assert_close(packed_grads, padded_grads, rtol=1e-4, atol=1e-6)


def test_without_restarting_positions_the_examples_would_see_each_other(tiny_model, rows):
    """The check above means something: the same row with one running position sequence differs."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    batch = batching.packed_batch(rows)
    joined = {**batch, "position_ids": torch.arange(batch["input_ids"].shape[1])[None]}
    assert model(**joined).loss.item() != pytest.approx(model(**batch).loss.item(), rel=1e-5)


LENGTHS = [random.Random(0).randint(20, 140) for _ in range(500)] + [600]  # one row longer than the budget


def test_sampler_fills_batches_up_to_the_budget():
    batches = list(batching.TokenBudgetSampler(LENGTHS, budget=512))
    assert all(sum(LENGTHS[i] for i in b) <= 512 for b in batches if len(b) > 1)
    assert [b for b in batches if sum(LENGTHS[i] for i in b) > 512] == [[500]]  # alone, not dropped
    assert len(batches) <= 1.2 * sum(LENGTHS) / 512  # full: few tokens left unused per batch


def test_sampler_yields_every_row_exactly_once_each_epoch():
    sampler = batching.TokenBudgetSampler(LENGTHS, budget=512, seed=1)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        assert sorted(i for b in sampler for i in b) == list(range(len(LENGTHS)))


def test_sampler_groups_rows_of_similar_length():
    batches = list(batching.TokenBudgetSampler(LENGTHS, budget=512))
    spans = sorted((min(LENGTHS[i] for i in b), max(LENGTHS[i] for i in b)) for b in batches)
    assert all(high <= next_low for (_, high), (next_low, _) in zip(spans, spans[1:]))  # ranges do not overlap


def test_sampler_reshuffles_each_epoch_with_the_same_batch_count():
    sampler = batching.TokenBudgetSampler(LENGTHS, budget=512, seed=1)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert len(first) == len(second) == len(sampler) and first != second
    assert list(batching.TokenBudgetSampler(LENGTHS, budget=512, seed=1)) == first  # seeded: same on every rank


def test_trainer_with_gradient_accumulation_takes_one_step_per_accumulated_budget(tiny_model, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, TrainingArguments

    train = tokenized(tiny_tokenizer, 40, seed=5)
    args = TrainingArguments(output_dir=str(tmp_path), num_train_epochs=1, gradient_accumulation_steps=2,
                             report_to="none", save_strategy="no", use_cpu=True, remove_unused_columns=False,
                             disable_tqdm=True)
    trainer = batching.TokenBudgetBatches(model=AutoModelForCausalLM.from_pretrained(tiny_model), args=args,
                                          train_dataset=train, batch_tokens=400)
    micro_batches = len(batching.TokenBudgetSampler(train["length"], 400))
    assert len(trainer.get_train_dataloader()) == micro_batches
    trainer.train()
    assert trainer.state.global_step == -(-micro_batches // 2)


def test_a_budget_below_the_longest_row_is_refused(tiny_model, tmp_path):
    result = run_module("databricks_llm.fine_tune", f"--model={tiny_model}", f"--output_dir={tmp_path}",
                        "--max_seq_length=256", "--batch_tokens=128")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: --batch_tokens=128 is below --max_seq_length=256")


def test_packed_batches_train_with_the_cpus_attention_and_with_kernels_that_skip_other_examples_on_a_gpu():
    from databricks_llm.models import training_attention

    if torch.cuda.is_available():
        assert training_attention("auto", half=True, packed=True) in ("flash_attention_2", "flex_attention")
    else:
        assert training_attention("auto", half=False, packed=True) is None  # as unpacked: SDPA
        assert training_attention("auto", half=True, packed=True) == "eager"


@pytest.mark.slow
def test_deepspeed_job_trains_on_packed_token_budget_batches(tiny_model, tmp_path):
    result = run_module("databricks_llm.fine_tune", f"--model={tiny_model}", f"--output_dir={tmp_path}", *QUICK_JOB,
                        "--deepspeed_config=ds_configs/ds_zero_2.json", "--batch_tokens=512", "--max_steps=3",
                        "--gradient_accumulation_steps=2", "--eval_strategy=no", "--save_steps=3", "--report_to=none",
                        cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    history = json.loads((tmp_path / "checkpoint-3" / "trainer_state.json").read_text())["log_history"]
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3]

"""`python -m databricks_llm.fine_tune` end to end on the tiny model: it learns, saves, resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import run_module
from databricks_llm import data

QUICK = ["--disable_tqdm=true", "--logging_steps=1", "--max_train_samples=16", "--per_device_train_batch_size=4"]


def fine_tune(model: Path, out: Path, *flags: str):
    result = run_module("databricks_llm.fine_tune", f"--model={model}", f"--output_dir={out}", *QUICK, *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def losses(checkpoint: Path) -> dict[int, float]:
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    return {h["step"]: h["loss"] for h in history if "loss" in h}


@pytest.fixture(scope="module")
def lora_run(tiny_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lora")
    fine_tune(tiny_model, out, "--max_steps=4", "--save_steps=2", "--eval_steps=2", "--gradient_checkpointing=true",
              "--merge_adapter=true")
    return out


def test_full_fine_tune_loss_decreases_on_a_repeated_batch(tiny_model, tmp_path):
    fine_tune(tiny_model, tmp_path, "--use_lora=false", "--learning_rate=3e-3", "--max_train_samples=4",
              "--max_steps=12", "--eval_strategy=no", "--save_steps=12", "--lr_scheduler_type=constant")
    loss = losses(tmp_path / "checkpoint-12")
    assert loss[12] < 0.8 * loss[1], loss
    assert (tmp_path / "final_model" / "model.safetensors").exists()


def test_lora_run_saves_checkpoints_at_save_steps(lora_run):
    assert sorted(p.name for p in lora_run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert (lora_run / "checkpoint-4" / "adapter_model.safetensors").exists()


def test_lora_final_model_is_adapter_plus_tokenizer(lora_run):
    final = lora_run / "final_model"
    assert (final / "adapter_model.safetensors").exists() and (final / "tokenizer.json").exists()
    assert not (final / "model.safetensors").exists()


def test_merged_final_model_loads_without_peft_and_generates(lora_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = lora_run / "final_model" / "merged"
    model = AutoModelForCausalLM.from_pretrained(merged)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    (prompt,) = data.encode_prompts(tokenizer, ["Aromi is a pub."])
    out = model.generate(torch.tensor([prompt]), max_new_tokens=5, do_sample=False)
    assert out.shape[1] > len(prompt)


def test_adapter_reloads_to_the_merged_model_logits(lora_run):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 5, 9, 13, 21]])
    adapter = AutoPeftModelForCausalLM.from_pretrained(lora_run / "final_model").eval()
    merged = AutoModelForCausalLM.from_pretrained(lora_run / "final_model" / "merged").eval()
    with torch.no_grad():
        assert torch.allclose(adapter(ids).logits, merged(ids).logits, atol=1e-4)


def test_resume_continues_from_the_checkpoint_step(lora_run, tiny_model, tmp_path):
    import shutil

    shutil.copytree(lora_run / "checkpoint-4", tmp_path / "checkpoint-4")
    result = fine_tune(tiny_model, tmp_path, "--max_steps=6", "--save_steps=2", "--eval_steps=2",
                       f"--resume_from_checkpoint={tmp_path / 'checkpoint-4'}")
    assert list(losses(tmp_path / "checkpoint-6")) == [1, 2, 3, 4, 5, 6]
    assert "[resume] continuing from" in result.stdout and "checkpoint-4 (step 4)" in result.stdout

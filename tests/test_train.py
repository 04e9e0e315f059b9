"""`python -m databricks_llm.fine_tune` end to end on the tiny model: it learns and saves (resume: test_tracking)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from conftest import QUICK_JOB, run_module
from databricks_llm import data


def losses(checkpoint: Path) -> dict[int, float]:
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    return {h["step"]: h["loss"] for h in history if "loss" in h}


def test_full_fine_tune_loss_decreases_on_a_repeated_batch(tiny_model, tmp_path):
    result = run_module("databricks_llm.fine_tune", f"--model={tiny_model}", f"--output_dir={tmp_path}", *QUICK_JOB,
                        "--use_lora=false", "--learning_rate=3e-3", "--max_train_samples=4", "--max_steps=12",
                        "--eval_strategy=no", "--save_steps=12", "--lr_scheduler_type=constant")
    assert result.returncode == 0, result.stderr[-3000:]
    loss = losses(tmp_path / "checkpoint-12")
    assert loss[12] < 0.8 * loss[1], loss
    assert (tmp_path / "final_model" / "model.safetensors").exists()


def test_lora_run_saves_checkpoints_at_save_steps(trained_job):
    assert sorted(p.name for p in trained_job.out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert (trained_job.out / "checkpoint-4" / "adapter_model.safetensors").exists()


def test_lora_final_model_is_adapter_plus_tokenizer(trained_job):
    final = trained_job.out / "final_model"
    assert (final / "adapter_model.safetensors").exists() and (final / "tokenizer.json").exists()
    assert not (final / "model.safetensors").exists()


def test_merged_final_model_generates_what_the_adapter_generates_without_peft(trained_job):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = trained_job.out / "final_model"
    merged = AutoModelForCausalLM.from_pretrained(final / "merged").eval()
    adapter = AutoPeftModelForCausalLM.from_pretrained(final).eval()
    (prompt,) = data.encode_prompts(AutoTokenizer.from_pretrained(final / "merged"), ["Aromi is a pub."])
    ids = torch.tensor([prompt])
    new = merged.generate(ids, max_new_tokens=5, do_sample=False)[0, len(prompt):]
    assert 1 <= len(new) <= 5
    assert new.tolist() == adapter.generate(input_ids=ids, max_new_tokens=5, do_sample=False)[0, len(prompt):].tolist()


def test_adapter_reloads_to_the_merged_model_logits(trained_job):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 5, 9, 13, 21]])
    adapter = AutoPeftModelForCausalLM.from_pretrained(trained_job.out / "final_model").eval()
    merged = AutoModelForCausalLM.from_pretrained(trained_job.out / "final_model" / "merged").eval()
    with torch.no_grad():
        assert torch.allclose(adapter(ids).logits, merged(ids).logits, atol=1e-4)


def test_save_minutes_adds_a_checkpoint_once_each_mark_has_passed():
    """`--save_minutes`: a checkpoint at the first step end after each mark, one per mark."""
    from types import SimpleNamespace

    from databricks_llm.callbacks import SaveAtMinutes

    timed = SaveAtMinutes([0.0, 0.0, 60.0])  # two marks already passed, one an hour away
    timed.on_train_begin(None, None, None)
    saves = []
    for _ in range(4):
        control = SimpleNamespace(should_save=False)
        timed.on_step_end(None, None, control)
        saves.append(control.should_save)
    assert saves == [True, True, False, False]


def test_time_budget_run_saves_a_checkpoint_at_the_mark(tiny_model, tmp_path):
    result = run_module("databricks_llm.fine_tune", f"--model={tiny_model}", f"--output_dir={tmp_path}", *QUICK_JOB,
                        "--max_steps=3", "--eval_strategy=no", "--save_steps=100", "--save_minutes=0.00001")
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-3"]


def test_sixteen_bit_training_on_a_cpu_uses_eager_attention_unless_asked_otherwise():
    """SDPA's bf16 backward is the slow part of a CPU step (docs/benchmarks.md); elsewhere transformers chooses."""
    from databricks_llm.models import training_attention

    assert training_attention("auto", half=True) == ("eager" if not torch.cuda.is_available() else None)
    assert training_attention("auto", half=False) is None
    assert training_attention("sdpa", half=True) == "sdpa"


def test_the_model_is_loaded_with_the_attention_asked_for(tiny_model):
    from databricks_llm.models import load_model

    assert load_model(str(tiny_model), attn_implementation="eager").config._attn_implementation == "eager"


def test_a_bf16_job_on_a_cpu_says_it_trains_with_eager_attention(tiny_model, tmp_path):
    if torch.cuda.is_available():
        return  # on a GPU transformers' default stays (the rule itself is tested above)
    result = run_module("databricks_llm.fine_tune", f"--model={tiny_model}", f"--output_dir={tmp_path}", *QUICK_JOB,
                        "--bf16=true", "--max_steps=1", "--eval_strategy=no", "--save_steps=100")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[model] attention: eager" in result.stdout

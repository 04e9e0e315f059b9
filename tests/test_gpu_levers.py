"""The GPU levers are flags of the job (TrainingArguments'), off unless asked for except where
transformers already defaults them on, refused with one line where they cannot apply."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from databricks_llm import config as job_config
from databricks_llm.errors import InputError


def parsed(tiny_model, tmp_path, *flags: str):
    return job_config.parse([f"--model={tiny_model}", f"--output_dir={tmp_path}", *flags])


def test_the_levers_reach_the_training_arguments(tiny_model, tmp_path):
    training = parsed(tiny_model, tmp_path, "--torch_compile=true", "--optim=adamw_torch", "--dataloader_num_workers=2",
                      "--dataloader_pin_memory=false").training
    assert (training.torch_compile, training.optim, training.dataloader_num_workers, training.dataloader_pin_memory) == \
        (True, "adamw_torch", 2, False)


def test_fused_adamw_is_already_the_default_and_runs_on_a_cpu(tiny_model, tmp_path):
    assert parsed(tiny_model, tmp_path).training.optim == "adamw_torch_fused"  # transformers 5 with torch >= 2.8
    weight = torch.nn.Parameter(torch.ones(4))
    weight.grad = torch.ones(4)
    torch.optim.AdamW([weight], lr=0.1, fused=True).step()  # torch's CPU kernel: no CUDA needed
    assert weight.detach().lt(1).all()


def test_levers_are_off_by_default(tiny_model, tmp_path):
    training = parsed(tiny_model, tmp_path).training
    assert (training.use_liger_kernel, training.torch_compile, training.dataloader_num_workers) == (False, False, 0)


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is not None, reason="liger-kernel is installed here")
def test_liger_kernel_without_its_package_is_refused_by_name(tiny_model, tmp_path):
    with pytest.raises(InputError, match=r"^--use_liger_kernel needs the liger-kernel package"):
        parsed(tiny_model, tmp_path, "--use_liger_kernel=true")


@pytest.mark.skipif(torch.cuda.is_available() or importlib.util.find_spec("liger_kernel") is None,
                    reason="needs liger-kernel installed on a machine without CUDA")
def test_liger_kernel_without_a_gpu_is_refused(tiny_model, tmp_path):
    with pytest.raises(InputError, match="needs a CUDA GPU"):
        parsed(tiny_model, tmp_path, "--use_liger_kernel=true")

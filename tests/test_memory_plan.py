"""The memory plan of GPU jobs (databricks_llm/memory_plan.py), decided on a CPU from known model
configs and GPU sizes: no weights, no GPU."""

from __future__ import annotations

import dataclasses
import json

import pytest

from databricks_llm import config as job_config
from databricks_llm import memory_plan
from databricks_llm.errors import InputError
from databricks_llm.memory_plan import Hardware, Request, Shape, plan

# The config.json fields the plan reads, as published for each model.
SMOLLM2_1_7B = dict(vocab_size=49152, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                    num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=True)
LLAMA_2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False)
LLAMA_3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)
LLAMA_2_70B = dict(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                   num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False)
GB = 1e9


def gpus(size_gb: float, count: int = 1, host_gb: float = 256, bitsandbytes: bool = True) -> Hardware:
    return Hardware(gpu_free=size_gb * GB, host_ram=host_gb * GB, world_size=count, gpus_per_node=count,
                    bitsandbytes=bitsandbytes)


@pytest.mark.parametrize("config, published", [(SMOLLM2_1_7B, 1.71e9), (LLAMA_2_7B, 6.74e9), (LLAMA_3_8B, 8.03e9),
                                               (LLAMA_2_70B, 68.98e9)])
def test_parameter_count_from_the_config_matches_the_published_one(config, published):
    assert Shape.of(config).params == pytest.approx(published, rel=0.005)


def test_a_config_without_the_widths_is_refused_by_name():
    with pytest.raises(InputError, match="no hidden_size"):
        Shape.of({"vocab_size": 10, "num_attention_heads": 2, "num_hidden_layers": 2})


def test_a_small_model_on_a_large_gpu_trains_lora_without_checkpointing():
    chosen = plan(Shape.of(SMOLLM2_1_7B), gpus(80), Request(seq_len=512))
    assert (chosen.method, chosen.zero, chosen.gradient_checkpointing) == ("LoRA", "none", False)
    assert memory_plan.MIN_TOKENS <= chosen.batch_tokens <= chosen.fits_tokens


def test_llama_3_8b_lora_fits_a_24_gb_gpu_with_checkpointing_at_512_tokens():
    chosen = plan(Shape.of(LLAMA_3_8B), gpus(24), Request(seq_len=512))
    assert (chosen.method, chosen.use_4bit, chosen.gradient_checkpointing) == ("LoRA", False, True)
    assert 512 <= chosen.batch_tokens <= chosen.fits_tokens and chosen.gpu_bytes <= 24 * GB


def test_longer_sequences_on_the_same_gpu_move_to_qlora():
    chosen = plan(Shape.of(LLAMA_3_8B), gpus(24), Request(seq_len=8192))
    assert chosen.method == "QLoRA 4-bit" and chosen.use_4bit


def test_qlora_is_not_chosen_without_bitsandbytes():
    with pytest.raises(InputError, match="QLoRA"):
        plan(Shape.of(LLAMA_3_8B), gpus(24, bitsandbytes=False), Request(seq_len=8192))


def test_a_7b_lora_job_on_a_40_gb_gpu_keeps_bf16_weights():
    chosen = plan(Shape.of(LLAMA_2_7B), gpus(40), Request(seq_len=512))
    assert (chosen.method, chosen.zero) == ("LoRA", "none")


def test_70b_lora_takes_qlora_on_one_80_or_141_gb_gpu_and_zero3_on_eight():
    shape = Shape.of(LLAMA_2_70B)
    assert plan(shape, gpus(80), Request(seq_len=512)).method == "QLoRA 4-bit"
    assert plan(shape, gpus(141), Request(seq_len=512)).method == "QLoRA 4-bit"
    node = plan(shape, gpus(80, count=8, host_gb=2000), Request(seq_len=512))
    assert (node.method, node.zero) == ("LoRA", "zero3")
    assert node.deepspeed_config.endswith("ds_configs/ds_zero_3.json")


def test_full_fine_tune_of_7b_on_an_8_gpu_node_shards_with_zero3():
    chosen = plan(Shape.of(LLAMA_2_7B), gpus(80, count=8), Request(lora=False, seq_len=512))
    assert (chosen.method, chosen.zero) == ("full fine-tune", "zero3")


def test_full_fine_tune_that_fits_no_gpu_offloads_to_the_host_when_its_ram_holds_the_state():
    chosen = plan(Shape.of(LLAMA_2_7B), gpus(40, host_gb=256), Request(lora=False, seq_len=512))
    assert chosen.zero == "zero3_offload"
    assert chosen.deepspeed_config.endswith("ds_zero_3_cpu_offloading.json")


def test_a_small_full_fine_tune_needs_no_deepspeed():
    chosen = plan(Shape.of(SMOLLM2_1_7B), gpus(141), Request(lora=False, seq_len=512))
    assert (chosen.method, chosen.zero, chosen.deepspeed_config) == ("full fine-tune", "none", None)


def test_70b_full_fine_tune_on_one_24_gb_gpu_is_refused_saying_what_would_fit():
    with pytest.raises(InputError) as refused:
        plan(Shape.of(LLAMA_2_70B), gpus(24, host_gb=64), Request(lora=False, seq_len=512))
    message = str(refused.value)
    assert "\n" not in message and message.startswith("full fine-tune of a 69.0B-parameter model needs about")
    assert "QLoRA (--use_4bit=true) on one GPU of >= " in message
    assert "ZeRO-3 + CPU offload" in message and "this one has 64 GB" in message


def test_a_flag_fixes_its_choice_and_the_plan_decides_the_rest():
    shape, hardware = Shape.of(LLAMA_3_8B), gpus(80)
    chosen = plan(shape, hardware, Request(seq_len=512, gradient_checkpointing=False, batch_tokens=2048))
    assert (chosen.gradient_checkpointing, chosen.batch_tokens) == (False, 2048)
    padded = plan(shape, hardware, Request(seq_len=512, micro_batch=4))
    assert (padded.batch_tokens, padded.micro_batch) == (None, 4)  # a row count asked for: padded batches
    assert plan(shape, hardware, Request(seq_len=512, use_4bit=True)).method == "QLoRA 4-bit"
    assert plan(shape, hardware, Request(seq_len=512, zero="zero3")).zero == "zero3"


def test_an_override_larger_than_the_estimate_is_kept_with_a_warning():
    chosen = plan(Shape.of(LLAMA_3_8B), gpus(24), Request(seq_len=512, batch_tokens=65536))
    assert chosen.batch_tokens == 65536
    assert chosen.lines[-1].startswith("warning: the micro-batch asked for (65536 tokens)")


def test_the_plan_says_its_choices_in_a_few_lines():
    lines = plan(Shape.of(LLAMA_3_8B), gpus(24), Request(seq_len=512)).lines
    assert len(lines) == 3
    assert lines[0].startswith("8.03B parameters, vocabulary 128256, sequences up to 512 tokens; 1 GPU(s) with 24.0 GB")
    assert lines[1] == "LoRA, DeepSpeed off, gradient checkpointing on"


def test_zero_setting_is_read_from_the_deepspeed_files():
    assert [memory_plan.zero_of(f"ds_configs/{name}.json") for name in
            ("ds_zero_2", "ds_zero_3", "ds_zero_3_cpu_offloading")] == ["zero2", "zero3", "zero3_offload"]


def parsed(tiny_model, tmp_path, *flags: str):
    return job_config.parse([f"--model={tiny_model}", f"--output_dir={tmp_path}", *flags])


def test_on_a_cpu_job_the_plan_changes_nothing(tiny_model, tmp_path):
    config = parsed(tiny_model, tmp_path)
    assert (config.data.batch_tokens, config.training.per_device_train_batch_size,
            config.training.gradient_checkpointing, config.job.deepspeed_config) == (None, 8, False, None)


def test_deepspeed_config_auto_on_a_cpu_is_zero_2(tiny_model, tmp_path):
    assert parsed(tiny_model, tmp_path, "--deepspeed_config=auto").job.deepspeed_config.endswith("ds_zero_2.json")


def test_the_plan_sets_a_gpu_jobs_flags_but_not_those_given(tiny_model, tmp_path):
    config = parsed(tiny_model, tmp_path, "--gradient_checkpointing=true")
    memory_plan.apply(config, memory_plan.given_flags(["--gradient_checkpointing=true"]), gpus(24))
    assert config.training.gradient_checkpointing is True  # given
    assert config.data.batch_tokens == memory_plan.MAX_TOKENS  # a tiny model: the largest budget
    assert (config.model.use_4bit, config.job.deepspeed_config) == (False, None)


def test_a_gpu_too_small_for_a_large_budget_turns_gradient_checkpointing_on(tiny_model, tmp_path):
    config = parsed(tiny_model, tmp_path)
    memory_plan.apply(config, set(), gpus(0.02))
    assert config.training.gradient_checkpointing is True and config.training.activation_checkpointing is True
    assert config.data.max_seq_length <= config.data.batch_tokens < memory_plan.MIN_TOKENS


def test_a_gpu_job_that_cannot_fit_is_refused_before_weights_load(tiny_model, tmp_path):
    config = parsed(tiny_model, tmp_path, "--use_lora=false")
    with pytest.raises(InputError, match="would fit"):
        memory_plan.apply(config, {"use_lora"}, dataclasses.replace(gpus(0.0001), host_ram=1e6))


def test_the_shape_is_read_from_config_json_alone(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", **LLAMA_3_8B}))
    assert memory_plan.read_shape(str(tmp_path)) == Shape.of(LLAMA_3_8B)

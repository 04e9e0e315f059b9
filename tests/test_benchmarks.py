"""The benchmark scripts keep working: their quick modes run end to end on the tiny model (timings are
not checked; the real model's figures are in docs/benchmarks.md)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, loss_and_gradients, run_module

pytestmark = pytest.mark.slow
SUMMARY = re.compile(r"^(\w+): ours [\d.e+-]+ ?\S*, baseline [\d.e+-]+ ?\S*, ratio [\d.]+ ", re.MULTILINE)


def test_speed_benchmark_quick_mode_prints_one_summary_line_per_measure(tiny_model):
    result = run_module(str(REPO / "benchmarks" / "speed.py"), "--quick", "--dataset=embedded:e2e-sample",
                        f"--model={tiny_model}", launcher=[sys.executable], cwd=REPO, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert SUMMARY.findall(result.stdout) == ["useful_tokens_per_s", "mfu", "step_time_tracking", "checkpoint_log_s",
                                              "checkpoint_log_mb", "generation_examples_per_s"]


def test_speed_benchmark_measures_each_training_lever_against_the_default(tiny_model):
    result = run_module(str(REPO / "benchmarks" / "speed.py"), "--quick", "--dataset=embedded:e2e-sample", "--measures=levers",
                        f"--model={tiny_model}", launcher=[sys.executable], cwd=REPO, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert SUMMARY.findall(result.stdout) == ["lever_default", "lever_fused_adamw", "lever_torch_compile",
                                              "lever_bf16_autocast", "lever_bf16_eager_attention",
                                              "lever_bf16_eager_shared_prefix", "lever_bf16_eager_batch_16",
                                              "lever_bf16_eager_batch_16_shared_prefix", "lever_bf16_eager_batch_32",
                                              "lever_bf16_eager_batch_32_shared_prefix", "lever_batch_16",
                                              "lever_batch_32", "lever_packing", "lever_batch_tokens",
                                              "lever_no_kv_cache"]
    assert result.stdout.count("  MFU ") == 15


def test_speed_benchmark_measures_only_the_levers_asked_for(tiny_model):
    result = run_module(str(REPO / "benchmarks" / "speed.py"), "--quick", "--dataset=embedded:e2e-sample", "--measures=levers",
                        "--levers=bf16_eager_attention", f"--model={tiny_model}", launcher=[sys.executable], cwd=REPO,
                        timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert SUMMARY.findall(result.stdout) == ["lever_default", "lever_bf16_eager_attention"]


def test_speed_benchmark_refuses_an_unknown_lever_before_loading_anything():
    result = run_module(str(REPO / "benchmarks" / "speed.py"), "--levers=warp_drive", launcher=[sys.executable], cwd=REPO)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].endswith("unknown lever warp_drive (see --help)")


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_a_shared_prefix_gives_the_loss_and_gradients_of_full_rows(tiny_model, tmp_path, attention):
    import argparse

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(REPO / "benchmarks"))
    from speed import shared_prefix_batch, trainer

    from databricks_llm import data, models

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation=attention)
    model = models.add_lora(base, r=4, alpha=8, dropout=0.0, target_modules="all-linear", gradient_checkpointing=False,
                            use_4bit=False)
    splits, task = data.load("embedded:e2e-sample")
    rows = list(data.tokenize_splits(splits, tokenizer, 256, task)["train"].select(range(6)))
    step = trainer(model, rows, None, argparse.Namespace(batch_size=6, bf16=False), str(tmp_path))
    shared = shared_prefix_batch(rows, tokenizer.pad_token_id)
    assert shared["prefix_ids"].shape[1] >= 16
    (full_loss, full_grads), (shared_loss, shared_grads) = loss_and_gradients(
        model, (data.collator(model, tokenizer)(rows), shared), lambda model, batch: step.compute_loss(model, dict(batch)))
    assert shared_loss == pytest.approx(full_loss, rel=1e-5)
    torch.testing.assert_close(shared_grads, full_grads, rtol=1e-4, atol=1e-6)


def test_quality_benchmark_quick_mode_scores_the_fine_tuned_model_and_its_timed_checkpoint(tmp_path, tiny_model):
    result = run_module(str(REPO / "benchmarks" / "quality.py"), "--dataset=embedded:e2e-sample", "--max_steps=2",
                        "--test_samples=4", "--quick", f"--work_dir={tmp_path}", "--save_minutes=0.00001",
                        f"--fine_tune_args=--model={tiny_model}", launcher=[sys.executable], cwd=REPO, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"^fine-tuned: slots F1 [\d.]+, .* n 4,", result.stdout, re.MULTILINE)
    assert re.search(r"^checkpoint-1: slots F1 [\d.]+", result.stdout, re.MULTILINE)  # the 0.00001-minute mark
    assert "logged quality_curve.png to run" in result.stdout


def test_scoring_benchmark_prints_each_variant_against_the_baseline(tiny_model):
    result = run_module(str(REPO / "benchmarks" / "scoring.py"), f"--model={tiny_model}", "--dataset=embedded:e2e-sample",
                        "--rows=6", "--max_tokens=4", "--variants=hf128,free128,batch32,wide,uncopied,today",
                        "--reference=wide", launcher=[sys.executable], cwd=REPO, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = re.findall(r"^(\w+) +[\d.]+ +[\d.]+\.\.", result.stdout, re.MULTILINE)  # a row per variant
    assert table == ["baseline", "hf128", "free128", "batch32", "wide", "uncopied", "today"]
    assert "'differ': outputs unlike wide's" in result.stdout


def test_scoring_benchmark_cold_runs_each_variant_once_in_the_order_given_and_the_baseline_last(tiny_model):
    result = run_module(str(REPO / "benchmarks" / "scoring.py"), f"--model={tiny_model}", "--dataset=embedded:e2e-sample",
                        "--rows=0", "--max_tokens=4", "--variants=today,uncopied", "--cold",
                        launcher=[sys.executable], cwd=REPO, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.findall(r"^\[scoring\] (\w+):", result.stdout, re.MULTILINE) == ["today", "uncopied", "baseline"]
    assert re.search(r"^\d+ rows of .* cold: one pass, no warm-up;", result.stdout, re.MULTILINE)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA: the script would run")
def test_gpu_script_stops_at_once_without_cuda_with_one_error_line(tmp_path):
    result = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh")], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHON": sys.executable, "WORK": str(tmp_path / "work")})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: benchmarks/gpu.sh needs a CUDA GPU and this machine has none (torch.cuda.is_available() is False); "
        "GPU figures are not measured here"]
    assert result.stdout == "" and not (tmp_path / "work").exists()  # nothing started, nothing written


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA: the script would run")
@pytest.mark.parametrize("command", [["part", "llama7b"], ["table"]])
def test_each_gpu_part_stops_at_once_without_cuda(tmp_path, command):
    result = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh"), *command], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHON": sys.executable, "WORK": str(tmp_path / "work")})
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("error: benchmarks/gpu.sh needs a CUDA GPU") and not (tmp_path / "work").exists()


def test_gpu_script_lists_parts_of_the_user_scale_measurements():
    result = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh"), "parts"], capture_output=True, text=True)
    assert {"peak", "llama7b", "llama7b_trl", "qlora7b", "llama3_8b_24gb"} <= set(result.stdout.split())


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA: the script would run")
def test_user_scale_measurement_stops_at_once_without_cuda():
    result = run_module(str(REPO / "benchmarks" / "gpu_user_scale.py"), "--shape=llama-2-7b", launcher=[sys.executable],
                        cwd=REPO, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: benchmarks/gpu_user_scale.py needs a CUDA GPU and this machine has none"]


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["ours", "seed", "trl_padding_free"])
def test_user_scale_measurement_runs_each_trainer_on_a_tiny_shape(tmp_path, trainer):
    """The CPU smoke test of the GPU script's code: a tiny shape, one short window."""
    result = run_module(str(REPO / "benchmarks" / "gpu_user_scale.py"), "--allow_cpu", "--shape=tiny", f"--trainer={trainer}",
                        "--dataset=embedded:e2e-sample", "--rows=200", "--seconds=2", "--warmup_steps=1", "--repeats=1",
                        "--peak_tflops=1", f"--results={tmp_path / 'r.jsonl'}", launcher=[sys.executable], cwd=REPO,
                        timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (line,) = (tmp_path / "r.jsonl").read_text().splitlines()
    measured = json.loads(line)
    assert measured["trainer"] == trainer and measured["useful_tokens_per_s"] > 0 and 0 < measured["mfu"]


def test_trl_peer_benchmark_quick_mode_prints_both_ratios(tiny_model):
    result = run_module(str(REPO / "benchmarks" / "trl_peer.py"), "--quick", f"--model={tiny_model}",
                        "--dataset=embedded:e2e-sample", "--attn_implementation=eager", launcher=[sys.executable],
                        cwd=REPO, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "eager attention" in result.stdout
    assert SUMMARY.findall(result.stdout) == ["useful_tokens_per_s", "seconds_per_step"]


def test_label_ambiguity_bounds_exact_match_by_the_aligners_ties_keys_given_twice_and_synonym_only_errors(tmp_path):
    import csv
    import json

    def write(name: str, rows: list[tuple[str, str]]) -> None:
        with (tmp_path / name).open("w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([("mr", "ref"), *((mr, text) for text, mr in rows)])

    cheap, under_20 = "name[A], priceRange[cheap]", "name[A], priceRange[less than £20]"
    write("train-fixed.no-ol.csv", [("A is cheap.", cheap)] * 3 + [("A is cheap.", under_20)])
    write("devel-fixed.no-ol.csv", [("A is cheap.", cheap)])  # else data.load holds out training rows
    write("test-fixed.csv", [("A is cheap.", cheap), ("A is cheap.", under_20),
                             ("A is a pub and a coffee shop.", "name[A], eatType[pub], eatType[coffee shop]")])
    table = {"columns": ["input", "reference", "prediction"],
             "data": [["A is cheap.", cheap, cheap], ["A is cheap.", under_20, cheap]]}
    (tmp_path / "predictions.json").write_text(json.dumps(table), encoding="utf-8")
    script = str(REPO / "benchmarks" / "label_ambiguity.py")
    result = run_module(script, f"--dataset={tmp_path}", f"--predictions={tmp_path / 'predictions.json'}",
                        launcher=[sys.executable], cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"^cheap\s+4\s+priceRange\[cheap\] 0.75, priceRange\[less than £20\] 0.25\s+2\s+0.50$", result.stdout,
                     re.MULTILINE)
    assert "[majority of train] test rows where a tie decided by the original MR goes against its wording's majority: " \
           "1 of 3 (0.333); whose reference gives a key twice: 1 (0.333); either: 2 (0.667)\n" \
           "[majority of train] exact match from the sentence alone is at most 0.333 with no key twice (0.667 with keys " \
           "twice)" in result.stdout
    assert "2 rows, exact match 0.500; with synonym labels taken as equal 1.000 (1 records" in result.stdout
    missing = run_module(script, f"--dataset={tmp_path / 'nowhere'}", launcher=[sys.executable], cwd=REPO)
    assert missing.returncode == 2 and missing.stderr.startswith("error: ") and missing.stderr.count("\n") == 1


def test_format_compile_benchmark_times_each_build_of_the_tasks_format(tiny_model):
    result = run_module(str(REPO / "benchmarks" / "format_compile.py"), "--dataset=embedded:e2e-sample",
                        f"--model={tiny_model}", "--repeats=2", launcher=[sys.executable], cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "embedded:e2e-sample: slots, 8 fields, one order in the targets: True" in result.stdout
    assert len(re.findall(r"^compiled in [\d.]+s$", result.stdout, re.MULTILINE)) == 2

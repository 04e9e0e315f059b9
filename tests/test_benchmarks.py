"""The benchmark scripts keep working: their quick modes run end to end (timings are not checked)."""

from __future__ import annotations

import re
import sys

import pytest

from conftest import REPO, run_module

pytestmark = pytest.mark.slow
SUMMARY = re.compile(r"^(\w+): ours [\d.e+-]+ ?\S*, baseline [\d.e+-]+ ?\S*, ratio [\d.]+ ", re.MULTILINE)


def test_speed_benchmark_quick_mode_prints_one_summary_line_per_measure():
    result = run_module(str(REPO / "benchmarks" / "speed.py"), "--quick", "--dataset=embedded:e2e-sample",
                        launcher=[sys.executable], cwd=REPO, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert SUMMARY.findall(result.stdout) == ["useful_tokens_per_s", "mfu", "step_time_tracking", "checkpoint_log_s",
                                              "checkpoint_log_mb", "generation_examples_per_s"]


def test_quality_benchmark_quick_mode_scores_the_fine_tuned_model(tmp_path):
    result = run_module(str(REPO / "benchmarks" / "quality.py"), "--dataset=embedded:e2e-sample", "--max_steps=2",
                        "--test_samples=4", "--quick", f"--work_dir={tmp_path}", launcher=[sys.executable], cwd=REPO,
                        timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"^fine-tuned: slots F1 [\d.]+, .* n 4,", result.stdout, re.MULTILINE)

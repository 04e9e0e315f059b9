#!/usr/bin/env bash
# The wheels an offline GPU machine (a CUDA PyTorch image, Python 3.12, x86_64 Linux) needs for
# benchmarks/gpu.sh: the pinned versions of what such an image lacks, and no more.
#
#   bash benchmarks/gpu_wheels.sh            # bench set into .gpu/wheels (what gpu.sh's measurements import)
#   bash benchmarks/gpu_wheels.sh all DIR    # every package of requirements.txt (gpu.sh part product: MLflow, DeepSpeed)
#
# then, on the GPU machine (torch and its CUDA libraries already there):
#   pip install --no-index --find-links DIR -r DIR/requirements.txt
#
# The list is this checkout's environment: the distributions the benchmark's modules import (bench)
# or requirements.txt with its dependencies (all), at the versions installed here, minus torch and
# everything torch itself depends on (triton, nvidia-*, sympy, networkx, jinja2, fsspec, filelock,
# ...: the image has them), plus bitsandbytes (QLoRA) and liger-kernel (fused kernels), which CPU
# installs do not carry (liger-kernel brings triton). Binary wheels for cp312 manylinux x86_64 only
# (`pip download --only-binary=:all:`); DeepSpeed publishes a source archive only, fetched as such
# in the all set (it builds against the image's torch: pip install --no-build-isolation).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
SET=${1:-bench}
OUT=${2:-.gpu/wheels}
GPU_ONLY="bitsandbytes==0.50.2 liger-kernel==0.8.5"
case "$SET" in bench|all) ;; *) echo "error: benchmarks/gpu_wheels.sh: set must be bench or all (got '$SET')" >&2; exit 2 ;; esac
mkdir -p "$OUT"

"$PY" - "$SET" > "$OUT/requirements.txt" <<'EOF'
"""Pinned distributions the set needs beyond torch and torch's own dependencies."""
import importlib
import importlib.metadata as md
import re
import sys

from packaging.requirements import Requirement


def closure(names):
    seen, todo = {}, list(names)
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        seen[name] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": "", "python_version": "3.12", "sys_platform": "linux",
                                                          "platform_system": "Linux", "platform_machine": "x86_64"}):
                todo.append(req.name)
    return seen


if sys.argv[1] == "all":
    tops = [Requirement(l.split("#")[0].strip()).name for l in open("requirements.txt") if l.split("#")[0].strip()]
else:
    sys.path[:0] = [".", "benchmarks"]
    for module in ("gpu_user_scale", "databricks_llm.batching", "databricks_llm.memory_plan", "databricks_llm.data",
                   "databricks_llm.models", "trl", "peft", "accelerate"):
        importlib.import_module(module)
    importlib.import_module("trl").SFTTrainer  # its lazy imports
    found = md.packages_distributions()
    tops = sorted({d for m in list(sys.modules) for d in found.get(m.split(".")[0], [])})
image = closure(["torch"])
for name, version in sorted(closure(tops).items()):
    if name not in image and name not in ("pytest", "pip", "setuptools", "wheel"):
        print(f"{name}=={version}")
EOF
for pin in $GPU_ONLY; do echo "$pin" >> "$OUT/requirements.txt"; done
if [ "$SET" = all ]; then  # a source archive only: kept out of the binary download
    grep -i "^deepspeed==" "$OUT/requirements.txt" > "$OUT/source.txt" || true
    sed -i '/^deepspeed==/Id' "$OUT/requirements.txt"
fi
echo "[wheels] $(wc -l < "$OUT/requirements.txt") pinned distributions for cp312 manylinux x86_64 into $OUT"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_34_x86_64 --platform any -d "$OUT" -r "$OUT/requirements.txt"
if [ -s "$OUT/source.txt" ]; then
    "$PY" -m pip download --quiet --no-deps --no-binary=:all: -d "$OUT" -r "$OUT/source.txt"
    cat "$OUT/source.txt" >> "$OUT/requirements.txt"
fi
echo "[wheels] $(du -sh "$OUT" | cut -f1) in $OUT; install there with: pip install --no-index --find-links $OUT -r $OUT/requirements.txt"

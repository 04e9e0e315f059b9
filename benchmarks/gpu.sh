#!/usr/bin/env bash
# GPU benchmark at user scale, in parts of at most 4 minutes each on one H100/H200, each runnable alone.
#
#   bash benchmarks/gpu.sh                  # every part, then the table
#   bash benchmarks/gpu.sh part NAME        # one part; its results join $WORK/results.jsonl
#   bash benchmarks/gpu.sh table            # the table of every result in $WORK so far
#   bash benchmarks/gpu.sh parts            # the parts' names
#
# Parts (random-weight models of real shapes, built on the GPU from configs of a few hundred bytes;
# LoRA r 8 on every linear layer, bf16, E2E rows; benchmarks/gpu_user_scale.py, one trainer each):
#   peak                      bf16 matmul peak measured on this GPU (MFU's denominator), spec sheet beside it
#   smollm2 / llama7b         ours (memory plan, packed token budgets) and the seed-style pipeline
#   smollm2_trl / llama7b_trl TRL SFTTrainer with its defaults, and with packing=True
#   smollm2_trl_padding_free / llama7b_trl_padding_free   TRL with padding_free=True
#   qlora7b                   Llama-2-7B shape, QLoRA 4-bit (bitsandbytes): memory and speed
#   llama3_8b_24gb            Llama-3-8B shape (vocabulary 128,256), 512-token rows, the process capped
#                             at 24 GB (torch.cuda.set_per_process_memory_fraction): the memory plan's job
#   product                   python -m databricks_llm.fine_tune with the memory plan (status, plan lines),
#                             and ZeRO-3 on every GPU with the DeepSpeed launcher
# Each measurement: >= SECONDS (20) s timed windows after a warm-up, median of REPEATS (2).
# On a machine without CUDA it stops at once with one `error:` line, exit 2.
#
#   PYTHON=python3 WORK=/tmp/gpu-bench bash benchmarks/gpu.sh part llama7b
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
WORK=${WORK:-/tmp/gpu-bench}
SECONDS_PER_WINDOW=${SECONDS_PER_WINDOW:-20}
REPEATS=${REPEATS:-2}
PART_LIMIT=${PART_LIMIT:-240}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1} TOKENIZERS_PARALLELISM=false
# DeepSpeed 0.19.8 cannot parse arch-specific entries ("9.0a", seen in a CUDA image) when it builds FusedAdam
[ -n "${TORCH_CUDA_ARCH_LIST:-}" ] && export TORCH_CUDA_ARCH_LIST=$(echo "$TORCH_CUDA_ARCH_LIST" | sed 's/\([0-9]\)a\b/\1/g')
PARTS="peak smollm2 smollm2_trl smollm2_trl_padding_free llama7b llama7b_trl llama7b_trl_padding_free qlora7b llama3_8b_24gb product"

if [ "${1:-}" = "parts" ]; then echo "$PARTS"; exit 0; fi
if ! command -v "$PY" > /dev/null; then  # a path (.venv/bin/python) or a command on PATH (python3)
    echo "error: benchmarks/gpu.sh: no Python at $PY (run make setup, or set PYTHON)" >&2
    exit 2
fi
GPUS=$("$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null || echo 0)
if [ "$GPUS" = "0" ]; then
    echo "error: benchmarks/gpu.sh needs a CUDA GPU and this machine has none (torch.cuda.is_available() is False); GPU figures are not measured here" >&2
    exit 2
fi
mkdir -p "$WORK"
RESULTS="$WORK/results.jsonl"

# measure PART ARGS...: one gpu_user_scale.py measurement, its log kept; a failure is a result line too.
measure() {
    local part=$1
    shift
    local peak
    peak=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["measured_tflops"])' "$WORK/peak.json" 2>/dev/null || echo "")
    echo "[gpu] $part: gpu_user_scale.py $*"
    timeout "$PART_LIMIT" "$PY" benchmarks/gpu_user_scale.py --seconds="$SECONDS_PER_WINDOW" --repeats="$REPEATS" \
        --results="$RESULTS" ${peak:+--peak_tflops=$peak} "$@" >> "$WORK/$part.log" 2>&1 \
        || printf '{"label": "%s", "failed": "exit %s, see %s"}\n' "$part $*" "$?" "$WORK/$part.log" >> "$RESULTS"
}

part() {
    case "$1" in
    peak) "$PY" - "$WORK/peak.json" <<'EOF'
import json, sys
import torch
sys.path.insert(0, "benchmarks")
from speed import matmul_peak
SPEC = {"H200": 989.4, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0}  # dense bf16 TFLOP/s
name = torch.cuda.get_device_name(0)
spec = next((v for k, v in SPEC.items() if k in name), None)
measured = matmul_peak(torch.bfloat16, "cuda", sizes=(4096, 8192), seconds=6.0) / 1e12
result = {"device": name, "measured_tflops": measured, "spec_tflops": spec, "torch": torch.__version__, "cuda": torch.version.cuda}
json.dump(result, open(sys.argv[1], "w"))
print(f"[gpu] {name}: bf16 matmul {measured:.0f} TFLOP/s measured, {spec or 'unknown'} on the spec sheet")
EOF
    ;;
    smollm2) for t in ours seed; do measure "$1" --shape=smollm2-1.7b --trainer=$t; done ;;
    smollm2_trl) for t in trl trl_packing; do measure "$1" --shape=smollm2-1.7b --trainer=$t; done ;;
    smollm2_trl_padding_free) measure "$1" --shape=smollm2-1.7b --trainer=trl_padding_free ;;
    llama7b) for t in ours seed; do measure "$1" --shape=llama-2-7b --trainer=$t; done ;;
    llama7b_trl) for t in trl trl_packing; do measure "$1" --shape=llama-2-7b --trainer=$t; done ;;
    llama7b_trl_padding_free) measure "$1" --shape=llama-2-7b --trainer=trl_padding_free ;;
    qlora7b)
        if "$PY" -c 'import bitsandbytes' 2>/dev/null; then
            measure "$1" --shape=llama-2-7b --trainer=ours --use_4bit
        else
            printf '{"label": "qlora7b", "failed": "skipped: bitsandbytes is not installed (benchmarks/gpu_wheels.sh)"}\n' >> "$RESULTS"
        fi ;;
    llama3_8b_24gb) measure "$1" --shape=llama-3-8b --trainer=ours --memory_gb=24 --max_seq_length=512 ;;
    product)
        local train=(--max_steps=30 --bf16=true --eval_strategy=no --save_steps=100000 --logging_steps=10
                     --disable_tqdm=true --report_to=none)
        echo "[gpu] product: fine_tune with the memory plan"
        timeout 150 "$PY" -m databricks_llm.fine_tune --output_dir="$WORK/product" "${train[@]}" > "$WORK/product.log" 2>&1
        local code=$?
        grep "\[memory plan\]" "$WORK/product.log"
        printf '{"label": "product fine_tune (memory plan)", "failed": %s}\n' \
            "$([ $code = 0 ] && echo null || echo "\"exit $code, see $WORK/product.log\"")" >> "$RESULTS"
        local deepspeed=("$(dirname "$PY")/deepspeed")
        [ -x "${deepspeed[0]}" ] || deepspeed=("$PY" -m deepspeed.launcher.runner)
        timeout 150 "${deepspeed[@]}" --num_gpus="$GPUS" --module databricks_llm.fine_tune --use_lora=false \
            --deepspeed_config=ds_configs/ds_zero_3.json --output_dir="$WORK/zero3" "${train[@]}" > "$WORK/zero3.log" 2>&1
        code=$?
        printf '{"label": "product ZeRO-3 on %s GPU(s)", "failed": %s}\n' "$GPUS" \
            "$([ $code = 0 ] && echo null || echo "\"exit $code, see $WORK/zero3.log\"")" >> "$RESULTS" ;;
    *) echo "error: benchmarks/gpu.sh: unknown part '$1' (parts: $PARTS)" >&2; exit 2 ;;
    esac
}

table() {
    "$PY" - "$RESULTS" "$WORK/peak.json" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])] if __import__("os").path.exists(sys.argv[1]) else []
try:
    peak = json.load(open(sys.argv[2]))
except OSError:
    peak = {}
if peak:
    print(f"\n{peak['device']}, torch {peak['torch']}, CUDA {peak['cuda']}: bf16 matmul peak {peak['measured_tflops']:.0f} "
          f"TFLOP/s measured, {peak['spec_tflops'] or 'unknown'} spec sheet")
print("\n| measurement | useful tokens/s (min..max) | ours ÷ this | MFU (measured peak) | MFU (spec sheet) | peak memory GB | window s |")
print("|---|---|---|---|---|---|---|")
ours = {r["shape"]: r["useful_tokens_per_s"] for r in rows if r.get("trainer") == "ours" and not r.get("use_4bit") and not r.get("memory_gb")}
for r in rows:
    if r.get("failed") is not None or "useful_tokens_per_s" not in r:
        print(f"| {r['label']} | {'ok' if r.get('failed') is None else r['failed']} | | | | | |")
        continue
    base = ours.get(r["shape"])
    spec = r["tflops"] / peak["spec_tflops"] if peak.get("spec_tflops") else None
    print(f"| {r['label']} | {r['useful_tokens_per_s']:,.0f} ({r['useful_min']:,.0f}..{r['useful_max']:,.0f}) | "
          f"{base / r['useful_tokens_per_s']:.2f}x | {r.get('mfu', float('nan')):.3f} | "
          f"{'' if spec is None else f'{spec:.3f}'} | {r['peak_memory_gb']:.1f} | {r['window_s']:.0f} |"
          if base else f"| {r['label']} | {r['useful_tokens_per_s']:,.0f} | | {r.get('mfu', float('nan')):.3f} | | {r['peak_memory_gb']:.1f} | {r['window_s']:.0f} |")
EOF
}

case "${1:-all}" in
    part) [ -n "${2:-}" ] || { echo "error: benchmarks/gpu.sh part needs a NAME (parts: $PARTS)" >&2; exit 2; }
          part "$2" ;;
    table) table ;;
    all) : > "$RESULTS"; for p in $PARTS; do part "$p"; done; table ;;
    *) echo "error: benchmarks/gpu.sh: unknown command '$1' (all, part NAME, table, parts)" >&2; exit 2 ;;
esac

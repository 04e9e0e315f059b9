#!/usr/bin/env bash
# GPU benchmark, one prepared script (about 8 minutes at most on one modern GPU):
#   1. bf16 LoRA steps            python -m databricks_llm.fine_tune --bf16
#   2. QLoRA 4-bit steps          the same with --use_4bit (bitsandbytes; skipped, and said, without it)
#   3. ZeRO-3 on every GPU        deepspeed --num_gpus=<all> ... ds_configs/ds_zero_3.json, full fine-tune
#   4. speed.py at GPU sizes      useful tokens/s, MFU and batched generation, ours vs the seed's way
# and prints one table. On a machine without CUDA it stops at once with one `error:` line, exit 2.
#
#   bash benchmarks/gpu.sh                       # PYTHON=.venv/bin/python, embedded model and data
#   MODEL=HuggingFaceTB/SmolLM2-360M-Instruct DATASET=../shared/data/e2e_nlg/cleaned bash benchmarks/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
MODEL=${MODEL:-embedded:smollm2-135m-instruct}
DATASET=${DATASET:-embedded:e2e-sample}
STEPS=${STEPS:-60}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1} TOKENIZERS_PARALLELISM=false
# DeepSpeed 0.19.8 cannot parse arch-specific entries ("9.0a", seen in a CUDA image) when it builds FusedAdam
[ -n "${TORCH_CUDA_ARCH_LIST:-}" ] && export TORCH_CUDA_ARCH_LIST=$(echo "$TORCH_CUDA_ARCH_LIST" | sed 's/\([0-9]\)a\b/\1/g')

if ! command -v "$PY" > /dev/null; then  # a path (.venv/bin/python) or a command on PATH (python3)
    echo "error: benchmarks/gpu.sh: no Python at $PY (run make setup, or set PYTHON)" >&2
    exit 2
fi
GPUS=$("$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null || echo 0)
if [ "$GPUS" = "0" ]; then
    echo "error: benchmarks/gpu.sh needs a CUDA GPU and this machine has none (torch.cuda.is_available() is False); GPU figures are not measured here" >&2
    exit 2
fi
WORK=${WORK:-$(mktemp -d /tmp/gpu-bench.XXXXXX)}
mkdir -p "$WORK"
RESULTS="$WORK/results.tsv"
: > "$RESULTS"
echo "[gpu] $GPUS GPU(s), model $MODEL, data $DATASET, $STEPS steps per training stage, work folder $WORK"

# stage NAME SECONDS COMMAND...: run with a time limit, keep the log, record status and train_runtime.
stage() {
    local name=$1 limit=$2
    shift 2
    echo "[gpu] $name: $*"
    local start=$SECONDS
    timeout "$limit" "$@" > "$WORK/$name.log" 2>&1
    local code=$?
    local runtime
    runtime=$(grep -o "'train_runtime': '[0-9.]*'" "$WORK/$name.log" | tail -1 | grep -o "[0-9.]*")
    printf "%s\t%s\t%s\t%s\n" "$name" "$([ $code = 0 ] && echo ok || echo "failed (exit $code, see $WORK/$name.log)")" \
        "$((SECONDS - start))" "${runtime:-}" >> "$RESULTS"
}

TRAIN=(--model="$MODEL" --dataset="$DATASET" --max_steps="$STEPS" --per_device_train_batch_size=16 --bf16=true
       --eval_strategy=no --save_steps=100000 --logging_steps=10 --disable_tqdm=true --report_to=none)
stage bf16_lora 150 "$PY" -m databricks_llm.fine_tune --output_dir="$WORK/bf16_lora" "${TRAIN[@]}"
if "$PY" -c 'import bitsandbytes' 2>/dev/null; then
    stage qlora_4bit 150 "$PY" -m databricks_llm.fine_tune --output_dir="$WORK/qlora_4bit" --use_4bit=true "${TRAIN[@]}"
else
    printf "qlora_4bit\tskipped: bitsandbytes is not installed (pip install bitsandbytes)\t0\t\n" >> "$RESULTS"
fi
DEEPSPEED=("$(dirname "$PY")/deepspeed")  # the launcher beside the venv's Python, else the same launcher as a module
[ -x "${DEEPSPEED[0]}" ] || DEEPSPEED=("$PY" -m deepspeed.launcher.runner)
stage zero3_all_gpus 150 "${DEEPSPEED[@]}" --num_gpus="$GPUS" --module databricks_llm.fine_tune \
    --deepspeed_config=ds_configs/ds_zero_3.json --use_lora=false --output_dir="$WORK/zero3" "${TRAIN[@]}"
stage speed 150 "$PY" benchmarks/speed.py --model="$MODEL" --dataset="$DATASET" --bf16 --batch_size=32 --steps=12 \
    --repeats=1 --measures=tokens,generation --generation_rows=64 --generation_batch_size=64

"$PY" - "$RESULTS" "$STEPS" "$WORK/speed.log" <<'EOF'
import sys
results, steps, speed_log = sys.argv[1], int(sys.argv[2]), sys.argv[3]
print(f"\n{'stage':<16}{'status':<50}{'wall s':>8}{'train s':>9}{'s/step':>8}")
for line in open(results):
    name, status, wall, runtime = (line.rstrip("\n").split("\t") + [""] * 4)[:4]
    per_step = f"{float(runtime) / steps:.3f}" if runtime else ""
    print(f"{name:<16}{status[:49]:<50}{wall:>8}{runtime:>9}{per_step:>8}")
try:
    measured = [l.strip() for l in open(speed_log) if ": ours " in l or l.startswith("mfu")]
except OSError:
    measured = []
for line in measured:
    print(f"  speed.py {line}")
EOF

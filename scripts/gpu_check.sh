#!/usr/bin/env bash
# The GPU check, at most 8 minutes on one H100 (the steps' time limits add up to 7 min 45 s): CUDA
# bf16 training steps of vitae_s and vitaev2_s with and without torch.compile (benchmarks.gpu_readiness),
# one short Ray Train run of the digits config with use_gpu: true on the embedded stack, and a GPU batch
# prediction (vitae predict --data) of its model. Every result goes to ONE file: $OUT/gpu_check.txt when
# OUT is set, else gpu_check.txt in the repository root. Without a GPU: one line saying so, exit 0.
# Run from anywhere: bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] && source .venv/bin/activate
REPORT="${OUT:-.}/gpu_check.txt"
mkdir -p "$(dirname "$REPORT")"

if ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check: no GPU (nvidia-smi finds none); nothing to check" | tee "$REPORT"
    exit 0
fi
if ! python -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
    echo "gpu_check: no GPU usable by torch (torch.cuda.is_available() is False: a CPU build?); nothing to check" \
        | tee "$REPORT"
    exit 0
fi

STACK="$(mktemp -d "${TMPDIR:-/tmp}/vitae-gpu-check-XXXXXX")"
status=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, output into the report, remember failures
    local name="$1" limit="$2"
    shift 2
    echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*" >> "$REPORT"
    local started=$SECONDS
    timeout "$limit" "$@" >> "$REPORT" 2>&1
    local code=$?
    echo "=== $name: exit $code after $((SECONDS - started)) s" >> "$REPORT"
    [ "$code" -eq 0 ] || status=1
    return "$code"
}
finish() {
    vitae stack down --dir "$STACK" >> "$REPORT" 2>&1
    rm -rf "$STACK"
    echo "gpu_check: $([ $status -eq 0 ] && echo "all steps passed" || echo "a step FAILED"); results in $REPORT" \
        | tee -a "$REPORT"
}
trap finish EXIT

{ echo "gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname)"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c 'import torch, ray; print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), ray {ray.__version__}")'
} > "$REPORT" 2>&1

step "bf16 training steps, eager and torch.compile" 180 \
    python -m benchmarks.gpu_readiness --batch-size 128 --steps 10 --warmup 3
step "stack up" 45 vitae stack up --dir "$STACK" || exit
# shellcheck disable=SC1091
source "$STACK/stack.env"
step "prep digits" 30 vitae prep digits --out s3://vitae-data/digits --digits-size 32 --shard-max-samples 300
step "Ray Train, digits, use_gpu: true" 120 vitae train --config configs/digits_vitae_t.yaml \
    --set name=digits-gpu-check --set schedule.epochs=2 --set scaling.num_workers=1 --set scaling.use_gpu=true \
    --set 'scaling.resources_per_worker={CPU: 2, GPU: 1}' || exit
step "register the trained model" 30 vitae register --run digits-gpu-check --name digits-gpu-check
step "batch prediction on the GPU (Ray Data)" 60 vitae predict --model models:/digits-gpu-check@challenger \
    --data s3://vitae-data/digits --split val --output s3://vitae-data/predictions/val
exit "$status"

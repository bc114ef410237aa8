#!/usr/bin/env bash
# IsoMax+ / Dense speed and memory ratios on a GPU, in under 10 minutes.
#
# Prints the card (nvidia-smi), then: the distance precision of the layer on the
# GPU with TF32 matmuls (TensorFlow's default on Ampere and later) at near-zero
# distances (benchmarks/precision.py); the tables of benchmarks/speed.py: the
# head alone at B=256 (the issue's configs) and the whole training step and
# inference + score on a ResNet-20 backbone, with and without XLA (Keras'
# model.fit uses XLA on a GPU by default), wall clock; peak GPU memory per step
# (TensorFlow's allocator statistics) and the B=256, C=10,000, F=2,048
# large-head check (benchmarks/head_memory.py). Each stage runs under its own
# time limit; the tables of a stage stopped by its limit are kept up to the
# last finished section.
#
# Without a GPU visible to TensorFlow it runs `speed.py --quick` on the CPU
# (a smoke test of the same code) and says so.
# On a GPU machine with JAX and no TensorFlow, run benchmarks/gpu_check_jax.py
# instead (the layer on Keras' JAX backend: TF32 precision and head speed; it
# writes benchmarks/results/gpu_check_jax.json), and benchmarks/gpu_quality.sh
# for the converged quality run.
#
# Usage (from anywhere):
#   benchmarks/gpu_check.sh [extra speed.py arguments for the timing stage]
# Environment:
#   PYTHON   interpreter with TensorFlow (default: .venv/bin/python if present,
#            else python3)
#   OUT_DIR  where the Markdown and JSON results go (default: gpu_check_out)
#   BUDGET   total seconds for all stages (default: 540)
#   GPU_CHECK_FORCE_STAGES=1  run the GPU stages even without a GPU (to test
#            this script on a CPU; the numbers are then CPU numbers)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
OUT_DIR="${OUT_DIR:-gpu_check_out}"
BUDGET="${BUDGET:-540}"
mkdir -p "$OUT_DIR"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-3}"
start=$(date +%s)

remaining() { echo $((BUDGET - ($(date +%s) - start))); }

echo "== gpu_check.sh $(date '+%Y-%m-%d %H:%M:%S %Z') on $(hostname)"
CARD=""
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
  CARD="$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -n 1)"
else
  echo "nvidia-smi: no NVIDIA GPU found"
fi

TF_INFO="$("$PYTHON" -c '
import tensorflow as tf, keras
print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, "
      f"built with CUDA: {tf.test.is_built_with_cuda()}")
print(len(tf.config.list_physical_devices("GPU")))' 2>/dev/null || true)"
echo "$TF_INFO" | head -n 1
TF_GPUS="$(echo "$TF_INFO" | tail -n 1)"
[[ "$TF_GPUS" =~ ^[0-9]+$ ]] || TF_GPUS=0
echo "TensorFlow sees $TF_GPUS GPU(s)"

if [[ "$TF_GPUS" == "0" && "${GPU_CHECK_FORCE_STAGES:-0}" != "1" ]]; then
  if [[ -n "$CARD" ]]; then
    echo "WARNING: nvidia-smi shows '$CARD' but TensorFlow cannot use it (CPU-only" \
      "TensorFlow? try: pip install 'tensorflow[and-cuda]'). Running the CPU smoke test;" \
      "these are NOT GPU numbers." >&2
  fi
  echo "== CPU fallback: speed.py --quick (smoke test, not GPU numbers)"
  timeout -k 10 "$(remaining)" "$PYTHON" benchmarks/speed.py --quick \
    --machine "CPU fallback of gpu_check.sh (no GPU visible to TensorFlow)" \
    --markdown "$OUT_DIR/gpu_check.md" --json "$OUT_DIR/gpu_check.json" "$@"
  echo "== done in $(($(date +%s) - start)) s; results in $OUT_DIR/"
  exit 0
fi

if [[ "$TF_GPUS" == "0" ]]; then
  MACHINE="NO GPU: GPU_CHECK_FORCE_STAGES=1 test run on $(nproc) CPU cores"
  echo "WARNING: $MACHINE; these are NOT GPU numbers" >&2
else
  MACHINE="GPU: ${CARD:-unknown card} (nvidia-smi); $(nproc) CPU cores"
fi
status=0

# Stage 0 (at most 60 s): precision with TF32 on the GPU, near-zero distances.
echo "== stage 0: precision.py (TF32 as TensorFlow sets it)"
timeout -k 10 60 "$PYTHON" benchmarks/precision.py --classes 1000 --features 2048 \
  --examples 500 | tee "$OUT_DIR/gpu_precision.txt" || status=$?

# Stage 1 (about 60% of the rest): the head alone at B=256 (the issue's
# configurations, C up to 100,000), then the backbone, XLA on and off.
t1=$(($(remaining) * 6 / 10))
echo "== stage 1a: head alone, B=256 (limit $((t1 / 2)) s)"
timeout -k 10 "$((t1 / 2))" "$PYTHON" benchmarks/speed.py \
  --batch-size 256 --reps 20 --jit both --sections head \
  --configs 10x2048,100x2048,1000x2048,10000x2048,100000x512 --machine "$MACHINE" \
  --markdown "$OUT_DIR/gpu_head.md" --json "$OUT_DIR/gpu_head.json" "$@" || status=$?
echo "== stage 1b: backbone (limit $((t1 / 2)) s)"
timeout -k 10 "$((t1 / 2))" "$PYTHON" benchmarks/speed.py \
  --backbone resnet20 --batch-size 128 --reps 20 --jit both --sections step \
  --machine "$MACHINE" \
  --markdown "$OUT_DIR/gpu_timing.md" --json "$OUT_DIR/gpu_timing.json" "$@" || status=$?
if [[ $status -eq 124 ]]; then echo "stage 1 hit its time limit; tables above are complete ones"; fi
echo "== stage 1c: the exported score signature vs a Dense SavedModel (limit 90 s; wall ratios in parentheses)"
timeout -k 10 90 "$PYTHON" benchmarks/serving_speed.py --threads 0 --reps 9 \
  --markdown "$OUT_DIR/gpu_serving.md" --output "$OUT_DIR/gpu_serving.json" || status=$?

# Stage 2 (the rest): peak GPU memory of a step and the large-head check.
t2=$(($(remaining) - 5))
if [[ $t2 -gt 30 ]]; then
  echo "== stage 2: peak memory and the large-head check (limit ${t2} s)"
  timeout -k 10 "$((t2 / 2))" "$PYTHON" benchmarks/speed.py \
    --backbone resnet20 --batch-size 128 --configs 1000x2048,10000x2048 \
    --sections memory --machine "$MACHINE" \
    --markdown "$OUT_DIR/gpu_memory.md" --json "$OUT_DIR/gpu_memory.json" || status=$?
  timeout -k 10 "$((t2 / 2))" "$PYTHON" benchmarks/head_memory.py \
    --json "$OUT_DIR/gpu_large_head.json" | tee "$OUT_DIR/gpu_large_head.md" || status=$?
else
  echo "== stage 2 skipped: no time left in the budget"
fi
echo "== card: ${CARD:-unknown}"
echo "== done in $(($(date +%s) - start)) s (budget ${BUDGET} s); results in $OUT_DIR/"
exit "$status"

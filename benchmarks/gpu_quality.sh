#!/usr/bin/env bash
# OOD quality at the paper's length on a GPU, in under 10 minutes.
#
# Runs benchmarks/ood_quality.py with the paper's ResNet-34 (basic blocks
# 3/4/6/3, 64-512 filters, BatchNorm, global average pooling) for 100 epochs
# (SGD lr 0.1, Nesterov 0.9, weight decay 1e-4, lr x0.1 at 50/66.7/83.3%,
# random crop + flip), both heads from the same initial weights, the
# pytorch-ood peers and library detectors when installed, and prints the same
# tables as the CPU benchmark. Batch 128 (He et al.'s CIFAR batch with lr 0.1)
# instead of the paper's 64 and one seed on 20,000 training images, so that
# the run fits the 10-minute limit of a lent device; with a GPU the backbone
# runs in mixed_bfloat16 (heads in float32), on a CPU in float32.
#
# Nothing is downloaded: the data travel as one prepared .npz (Fashion-MNIST
# as uint8, the far OOD sets as float16, 36 MiB). Prepare it on a machine
# that has the raw files (apt-get install dataset-fashion-mnist), once:
#   python benchmarks/ood_quality.py --prepare-npz benchmarks/data/fmnist_ood.npz
# If the file is missing, this script tries to prepare it itself.
#
# Usage (from anywhere):
#   benchmarks/gpu_quality.sh [extra ood_quality.py arguments, which win]
#   benchmarks/gpu_quality.sh --epochs 1 --train-size 500   # CPU smoke test
# Environment:
#   PYTHON   interpreter with TensorFlow (default: .venv/bin/python if present,
#            else python3)
#   NPZ      the prepared data (default: benchmarks/data/fmnist_ood.npz)
#   OUT_DIR  where the Markdown and JSON results go (default: gpu_quality_out)
#   BUDGET   seconds before the run is stopped (default: 560)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
NPZ="${NPZ:-benchmarks/data/fmnist_ood.npz}"
OUT_DIR="${OUT_DIR:-gpu_quality_out}"
BUDGET="${BUDGET:-560}"
mkdir -p "$OUT_DIR" "$(dirname "$NPZ")"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-3}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

echo "== gpu_quality.sh $(date '+%Y-%m-%d %H:%M:%S %Z') on $(hostname)"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
else
  echo "nvidia-smi: no NVIDIA GPU found; the numbers below are CPU numbers"
fi
TF_GPUS="$("$PYTHON" -c 'import tensorflow as tf
gpus = tf.config.list_physical_devices("GPU")
print(len(gpus))' 2>/dev/null | tail -n 1 || true)"
[[ "$TF_GPUS" =~ ^[0-9]+$ ]] || TF_GPUS=0
echo "TensorFlow sees $TF_GPUS GPU(s)"
# bfloat16 is fast on a GPU and very slow on most CPUs: only with a GPU.
MIXED=()
if [[ "$TF_GPUS" != "0" ]]; then MIXED=(--mixed-precision); fi

if [[ ! -f "$NPZ" ]]; then
  echo "== preparing $NPZ (needs the raw Fashion-MNIST files)"
  "$PYTHON" benchmarks/ood_quality.py --prepare-npz "$NPZ"
fi
ls -l "$NPZ"

echo "== ood_quality.py, paper length (budget ${BUDGET} s)"
set +e
timeout --signal=INT --kill-after=20 "$BUDGET" "$PYTHON" benchmarks/ood_quality.py \
  --data "$NPZ" --backbone resnet --depth 34 --epochs 100 --finetune-epochs 10 \
  --seeds 1 --train-size 20000 --batch-size 128 ${MIXED[@]+"${MIXED[@]}"} --no-near \
  --markdown "$OUT_DIR/quality.md" --json "$OUT_DIR/quality.json" "$@"
rc=$?
set -e
if [[ $rc -ne 0 ]]; then
  echo "ood_quality.py stopped with exit status $rc (124/130: the ${BUDGET} s budget ran out;" \
    "rerun with fewer --epochs or a smaller --train-size)"
fi
exit $rc

#!/usr/bin/env bash
# Converged OOD quality run on a GPU with Keras' JAX backend, within a time budget.
#
# Runs benchmarks/gpu_quality_jax.py (ResNet-18, all 60,000 Fashion-MNIST training
# images, 30 epochs, both heads, far then near task; see its docstring) and writes
# benchmarks/results/gpu_quality.json (rendered into BENCHMARKS.md by
# benchmarks/render.py). Made for a device machine with JAX + CUDA, no TensorFlow
# and no network:
#
# * the data travel as one prepared .npz (36 MiB). Prepare it where the raw files
#   are (apt-get install dataset-fashion-mnist), once:
#     python benchmarks/ood_quality.py --prepare-npz benchmarks/data/fmnist_ood.npz
# * Keras and its small dependencies travel as wheels when the machine lacks them.
#   Download them once where PyPI is reachable, for the device's Python:
#     pip download --no-deps -d benchmarks/data/wheels keras namex optree
#   (with --python-version/--platform for another Python), and carry
#   benchmarks/data/ (about 40 MiB with the .npz).
#
# Usage (from anywhere):
#   benchmarks/gpu_quality.sh [extra gpu_quality_jax.py arguments, which win]
#   benchmarks/gpu_quality.sh --epochs 1 --train-size 512 --test-size 256 \
#       --ood-size 128 --finetune-epochs 1          # CPU smoke test
# Environment:
#   PYTHON   interpreter with JAX (default: python3)
#   NPZ      the prepared data (default: benchmarks/data/fmnist_ood.npz)
#   WHEELS   directory of carried wheels (default: benchmarks/data/wheels)
#   BUDGET   seconds for the Python run; the script itself plans within it
#            (default: 450), and is stopped 60 s after it
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
NPZ="${NPZ:-benchmarks/data/fmnist_ood.npz}"
WHEELS="${WHEELS:-benchmarks/data/wheels}"
BUDGET="${BUDGET:-450}"
export KERAS_BACKEND=jax
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# A bfloat16 run on one GPU: let XLA take GPU memory as it needs.
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"

echo "== gpu_quality.sh $(date '+%Y-%m-%d %H:%M:%S %Z') on $(hostname)"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
else
  echo "nvidia-smi: no NVIDIA GPU found; the figures will be CPU figures"
fi
if ! "$PYTHON" -c 'import keras' >/dev/null 2>&1; then
  if compgen -G "$WHEELS/*.whl" >/dev/null; then
    echo "== installing the carried wheels from $WHEELS"
    "$PYTHON" -m pip install --no-index --no-deps --quiet "$WHEELS"/*.whl
  else
    echo "Keras is not installed and $WHEELS holds no wheels (see this script's header)" >&2
    exit 2
  fi
fi
if [[ ! -f "$NPZ" ]]; then
  echo "$NPZ is missing: python benchmarks/ood_quality.py --prepare-npz $NPZ" >&2
  exit 2
fi
"$PYTHON" -c 'import jax, keras; print(f"JAX {jax.__version__}: {jax.devices()}; Keras {keras.__version__}")'

set +e
timeout --signal=INT --kill-after=20 "$((BUDGET + 60))" "$PYTHON" benchmarks/gpu_quality_jax.py \
  --data "$NPZ" --budget "$BUDGET" "$@"
rc=$?
set -e
if [[ $rc -ne 0 ]]; then
  echo "gpu_quality_jax.py stopped with exit status $rc (124/130: stopped after the budget;" \
    "the JSON holds every task that finished)"
fi
exit $rc

"""Accuracy of IsoMaxPlusLayer's float32 distances against a float64 NumPy reference.

Features are placed at controlled distances (1e-5 .. 1.5) from random prototypes;
the table gives the largest relative and absolute errors per distance band, for
the library's layer (all distances from one matrix product, the nearest
prototype's recomputed exactly from differences) and for the plain matmul
expansion alone (`pairwise_distances(..., exact_nearest=False)`), on all pairs
and on each example's nearest prototype (the minimum distance score).

    python benchmarks/precision.py [--classes 1000 --features 2048]
"""

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from _common import reference_distances  # noqa: E402

from keras_isomax import IsoMaxPlusLayer  # noqa: E402
from keras_isomax.layers import l2_normalize, pairwise_distances  # noqa: E402

BANDS = [(0.0, 1e-3), (1e-3, 0.05), (0.05, 0.3), (0.3, 2.1)]


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--features", type=int, default=512)
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    p = rng.normal(size=(args.classes, args.features)).astype("float32")
    pn = p / np.linalg.norm(p, axis=1, keepdims=True)
    targets = rng.integers(0, args.classes, size=args.examples)
    radii = 10 ** rng.uniform(-5, 0.2, size=args.examples)
    direction = rng.normal(size=(args.examples, args.features))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    x = (pn[targets] + radii[:, None] * direction).astype("float32")
    expected = reference_distances(x, p)
    nearest = expected.argmin(axis=1)

    layer = IsoMaxPlusLayer(args.classes)
    layer.build((None, args.features))
    layer.prototypes.assign(p)
    # |s| = T = 1. The inference path `predict` takes once the weights stop
    # changing: the first training=False call remembers the prototypes, the
    # second computes their normalised kernel, the third reads it.
    for _ in range(2):
        layer(x, training=False)
    methods = {
        "IsoMaxPlusLayer": -np.asarray(layer(x, training=False), np.float64),
        "expansion only": np.asarray(
            pairwise_distances(l2_normalize(x), l2_normalize(p), exact_nearest=False), np.float64
        ),
    }
    import tensorflow as tf

    device = "GPU" if tf.config.list_physical_devices("GPU") else "CPU"
    tf32 = tf.config.experimental.tensor_float_32_execution_enabled()
    print(
        f"C={args.classes} F={args.features} examples={args.examples} (float32 vs float64); "
        f"device {device}; TF32 execution enabled: {tf32}"
    )
    print(
        f"{'method':<18}{'pairs':<10}{'band':<16}{'count':>9}{'max rel err':>14}{'max abs err':>14}"
    )
    for label, got in methods.items():
        for which in ("all", "nearest"):
            if which == "all":
                g, e = got.ravel(), expected.ravel()
            else:
                rows = np.arange(len(x))
                g, e = got[rows, nearest], expected[rows, nearest]
            err = np.abs(g - e)
            for lo, hi in BANDS:
                m = (e >= lo) & (e < hi)
                if not m.any():
                    continue
                rel = (err[m] / np.maximum(e[m], 1e-30)).max()
                band = f"[{lo:g}, {hi:g})"
                print(
                    f"{label:<18}{which:<10}{band:<16}{m.sum():>9}{rel:>14.2e}{err[m].max():>14.2e}"
                )


if __name__ == "__main__":
    main()

"""Accuracy of IsoMaxPlusLayer's float32 distances against a float64 NumPy reference.

Features are placed at controlled distances (1e-5 .. 1.5) from random prototypes;
the table gives the largest relative and absolute errors per distance band, for
the default layer (exact recomputation of the 8 nearest prototypes) and for the
plain matmul expansion (`exact_neighbors=0`).

    python benchmarks/precision.py [--classes 1000 --features 2048]
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

from keras_isomax.layers import l2_normalize, pairwise_distances  # noqa: E402

BANDS = [(0.0, 1e-3), (1e-3, 0.05), (0.05, 0.3), (0.3, 2.1)]


def reference(x, p):
    xn = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    pn = p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)
    out = np.empty((len(x), len(p)))
    for i in range(0, len(x), 64):  # exact differences, chunked
        out[i : i + 64] = np.sqrt(((xn[i : i + 64, None] - pn[None]) ** 2).sum(-1))
    return out


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
    expected = reference(x.astype(np.float64), p.astype(np.float64))

    print(f"C={args.classes} F={args.features} examples={args.examples} (float32 vs float64)")
    print(f"{'method':<28}{'band':<16}{'pairs':>9}{'max rel err':>14}{'max abs err':>14}")
    for k, label in ((8, "default (exact 8 nearest)"), (0, "expansion only")):
        got = pairwise_distances(l2_normalize(x), l2_normalize(p), exact_neighbors=k)
        got = np.asarray(got, np.float64)
        err = np.abs(got - expected)
        for lo, hi in BANDS:
            m = (expected >= lo) & (expected < hi)
            if not m.any():
                continue
            rel = (err[m] / np.maximum(expected[m], 1e-30)).max()
            print(
                f"{label:<28}{f'[{lo:g}, {hi:g})':<16}{m.sum():>9}{rel:>14.2e}{err[m].max():>14.2e}"
            )


if __name__ == "__main__":
    main()

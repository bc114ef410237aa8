"""Accuracy of IsoMaxPlusLayer's float32 distances against a float64 NumPy reference.

Features are placed at controlled distances (1e-5 .. 1.6) from random prototypes;
the table gives the largest relative and absolute errors per distance band, for
the library's layer (all distances from one matrix product, each example's
nearest prototype's recomputed exactly from differences) on its inference path
(`training=False`, as `predict`), on its training path (`training=True`, as
`fit`), and for the matrix-product expansion alone
(`pairwise_distances(..., exact_nearest=False)`), on all pairs and on each
example's nearest prototype (the minimum distance score).

    python benchmarks/precision.py [--classes 1000 --features 2048 --examples 500]

Results: `benchmarks/results/precision.json` (rendered by `_render_speed.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))

import numpy as np  # noqa: E402
from _common import reference_distances  # noqa: E402
from _render_speed import render_precision  # noqa: E402
from _results import add_output_arguments, write_result  # noqa: E402

from keras_isomax import IsoMaxPlusLayer  # noqa: E402
from keras_isomax.layers import l2_normalize, pairwise_distances  # noqa: E402

BANDS = [(0.0, 1e-3), (1e-3, 0.05), (0.05, 0.3), (0.3, 2.1)]


def measure(classes: int, features: int, examples: int, seed: int) -> dict:
    """Error statistics per method, pairs and band (see the module docstring)."""
    rng = np.random.default_rng(seed)
    p = rng.normal(size=(classes, features)).astype("float32")
    pn = p / np.linalg.norm(p, axis=1, keepdims=True)
    targets = rng.integers(0, classes, size=examples)
    radii = 10 ** rng.uniform(-5, 0.2, size=examples)
    direction = rng.normal(size=(examples, features))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    x = (pn[targets] + radii[:, None] * direction).astype("float32")
    expected = reference_distances(x, p)
    nearest = expected.argmin(axis=1)

    layer = IsoMaxPlusLayer(classes)
    layer.build((None, features))
    layer.prototypes.assign(p)
    # |s| = T = 1. The inference path `predict` takes once the weights stop
    # changing: the first `training=False` call fills the cache, the next read it.
    layer(x, training=False)
    methods = {
        "`IsoMaxPlusLayer`, `training=False`": -np.asarray(layer(x, training=False), np.float64),
        "`IsoMaxPlusLayer`, `training=True`": -np.asarray(layer(x, training=True), np.float64),
        "expansion only (`exact_nearest=False`)": np.asarray(
            pairwise_distances(l2_normalize(x), l2_normalize(p), exact_nearest=False), np.float64
        ),
    }
    rows = []
    for label, got in methods.items():
        for which in ("all", "nearest"):
            if which == "all":
                g, e = got.ravel(), expected.ravel()
            else:
                index = np.arange(len(x))
                g, e = got[index, nearest], expected[index, nearest]
            err = np.abs(g - e)
            for lo, hi in BANDS:
                m = (e >= lo) & (e < hi)
                if not m.any():
                    continue
                rows.append(
                    {
                        "method": label,
                        "pairs": which,
                        "band": [lo, hi],
                        "count": int(m.sum()),
                        "max_rel": float((err[m] / np.maximum(e[m], 1e-30)).max()),
                        "max_abs": float(err[m].max()),
                    }
                )
    import tensorflow as tf

    return {
        "classes": classes,
        "features": features,
        "examples": examples,
        "seed": seed,
        "device": "GPU" if tf.config.list_physical_devices("GPU") else "CPU",
        "tf32": bool(tf.config.experimental.tensor_float_32_execution_enabled()),
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--features", type=int, default=2048)
    parser.add_argument("--examples", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    add_output_arguments(parser, "precision.json")
    args = parser.parse_args(argv)
    payload = measure(args.classes, args.features, args.examples, args.seed)
    record = {"command": "(this run)", "machine": {}, **payload}
    if not args.no_results:
        name = "precision_gpu" if payload["device"] == "GPU" else "precision"
        path = write_result(name, payload, path=Path(args.results_dir) / f"{name}.json")
        record = json.loads(path.read_text())
        print(f"wrote {path}", file=sys.stderr)
    print(render_precision(lambda name: record))


if __name__ == "__main__":
    main()

"""GPU check of the layer on the JAX backend, for a machine with JAX and no TensorFlow.

`benchmarks/gpu_check.sh` needs TensorFlow with CUDA; a device machine that has
JAX (with CUDA) but no TensorFlow can still check the layer's math on the GPU:

1. Precision at near-zero distances with XLA's default float32 matrix products
   on the GPU (TF32 on Ampere and later): the relative error of each example's
   nearest-prototype distance against a float64 NumPy reference
   (`keras_isomax.testing`), per distance band, for the layer and for the
   matrix-product expansion alone (`pairwise_distances(..., exact_nearest=False)`).
2. Speed, head alone, B = 256: inference + score, and a training step (loss,
   gradients for the features and the head's weights, plain SGD update), for
   `IsoMaxPlusLayer` and `Dense` + softmax (the same Keras loss classes as the
   TensorFlow benchmarks), each jitted with the weights as arguments (so that
   nothing is folded at compile time), wall clock after `block_until_ready`,
   interleaved repetitions; ratio = median of per-repetition ratios.

    KERAS_BACKEND=jax python benchmarks/gpu_check_jax.py [--configs 1000x2048,...] [--reps 50]

The figures go to `benchmarks/results/gpu_check_jax.json` (rendered into
BENCHMARKS.md's GPU section by `benchmarks/render.py`).
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

_HERE = Path(__file__).resolve().parent
for _path in (str(_HERE), str(_HERE.parent)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from _common import reference_distances  # noqa: E402


def precision(num_classes, feature_dim, examples, seed=0):
    import numpy as np

    from keras_isomax import IsoMaxPlusLayer
    from keras_isomax.layers import l2_normalize, pairwise_distances

    rng = np.random.default_rng(seed)
    p = rng.normal(size=(num_classes, feature_dim)).astype("float32")
    pn = p.astype(np.float64) / np.linalg.norm(p.astype(np.float64), axis=1, keepdims=True)
    targets = rng.integers(0, num_classes, size=examples)
    radii = 10 ** rng.uniform(-5, 0.2, size=examples)
    direction = rng.normal(size=(examples, feature_dim))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    x = (pn[targets] + radii[:, None] * direction).astype("float32")
    expected = reference_distances(x, p).min(axis=1)
    layer = IsoMaxPlusLayer(num_classes)
    layer.build((None, feature_dim))
    layer.prototypes.assign(p)
    methods = {
        "IsoMaxPlusLayer": -np.asarray(layer(x, training=False), np.float64),
        "expansion only": np.asarray(
            pairwise_distances(l2_normalize(x), l2_normalize(p), exact_nearest=False), np.float64
        ),
    }
    rows = []
    for name, got in methods.items():
        nearest = got.min(axis=1)
        for low, high in ((0, 1e-3), (1e-3, 0.05), (0.05, 0.3), (0.3, 2.1)):
            band = (expected >= low) & (expected < high)
            if band.any():
                rel = np.abs(nearest[band] - expected[band]) / expected[band]
                rows.append((name, f"[{low:g}, {high:g})", int(band.sum()), float(rel.max())))
    return rows


def speed(num_classes, feature_dim, batch_size, reps, seed=0):
    import jax
    import jax.numpy as jnp
    import keras
    import numpy as np

    from keras_isomax import IsoMaxPlusLayer, IsoMaxPlusLoss

    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(batch_size, feature_dim)).astype("float32"))
    y = jnp.asarray(rng.integers(0, num_classes, size=batch_size).astype("int32"))
    heads = {
        "dense": (
            keras.layers.Dense(num_classes),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        ),
        "isomax": (IsoMaxPlusLayer(num_classes), IsoMaxPlusLoss()),
    }
    fns = {}
    for name, (layer, loss_fn) in heads.items():
        layer.build((None, feature_dim))
        trainable = [v.value for v in layer.trainable_variables]
        frozen = [v.value for v in layer.non_trainable_variables]

        def infer(tv, ntv, x, layer=layer, name=name):
            logits, _ = layer.stateless_call(tv, ntv, x, training=False)
            if name == "dense":
                return jnp.max(jax.nn.softmax(logits), axis=-1)
            return jnp.max(logits, axis=-1)  # The minimum distance score.

        def loss(tv, ntv, x, y, layer=layer, loss_fn=loss_fn):
            logits, _ = layer.stateless_call(tv, ntv, x, training=True)
            return loss_fn(y, logits)

        def step(tv, ntv, x, y, loss=loss):
            value, (g_tv, g_x) = jax.value_and_grad(loss, argnums=(0, 2))(tv, ntv, x, y)
            return [v - 1e-3 * g for v, g in zip(tv, g_tv, strict=True)], value, jnp.sum(g_x)

        infer_jit, step_jit = jax.jit(infer), jax.jit(step)
        fns[name] = {
            "inference": lambda f=infer_jit, a=(trainable, frozen, x): f(*a),
            "training": lambda f=step_jit, a=(trainable, frozen, x, y): f(*a),
        }
    results = {}
    for kind in ("inference", "training"):
        for name in fns:
            for _ in range(3):
                jax.block_until_ready(fns[name][kind]())
        times = {name: [] for name in fns}
        for _ in range(reps):
            for name in fns:
                start = time.perf_counter()
                jax.block_until_ready(fns[name][kind]())
                times[name].append(time.perf_counter() - start)
        ratios = np.array(times["isomax"]) / np.array(times["dense"])
        results[kind] = (
            1e3 * float(np.median(times["dense"])),
            1e3 * float(np.median(times["isomax"])),
            float(np.median(ratios)),
            [float(q) for q in np.percentile(ratios, [25, 75])],
        )
    return results


def device_text() -> str:
    """The accelerator JAX runs on, e.g. `1 x NVIDIA H200 (gpu)`, or `cpu`."""
    import jax

    devices = jax.devices()
    kind = getattr(devices[0], "device_kind", devices[0].platform)
    return f"{len(devices)} x {kind} ({devices[0].platform})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="1000x2048,10000x2048,100000x512")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--output", help="result JSON path (default: benchmarks/results/)")
    args = parser.parse_args(argv)

    import jax
    import keras

    print(
        f"Keras {keras.__version__} ({keras.backend.backend()}), JAX {jax.__version__}, "
        f"devices: {jax.devices()}; default matmul precision: "
        f"{jax.config.jax_default_matmul_precision}"
    )
    print("\n## Nearest-prototype precision (C=1,000, F=2,048, 500 examples, float32)\n")
    print("| method | distance band | count | max rel. error |\n|---|---|---:|---:|")
    bands = precision(1000, 2048, 500)
    for name, band, count, rel in bands:
        print(f"| {name} | {band} | {count} | {rel:.2e} |")
    print(f"\n## Head alone, B={args.batch_size}, jitted, wall clock, {args.reps} repetitions\n")
    print("| C | F | step | Dense ms | IsoMax+ ms | ratio [IQR] |\n|---:|---:|---|---:|---:|---|")
    speeds = []
    for config in args.configs.split(","):
        num_classes, feature_dim = (int(v) for v in config.split("x"))
        for kind, (dense, iso, ratio, (q1, q3)) in speed(
            num_classes, feature_dim, args.batch_size, args.reps
        ).items():
            print(
                f"| {num_classes:,} | {feature_dim:,} | {kind} | {dense:.3f} | {iso:.3f} | "
                f"{ratio:.2f} [{q1:.2f}, {q3:.2f}] |"
            )
            speeds.append(
                {
                    "classes": num_classes,
                    "features": feature_dim,
                    "step": kind,
                    "dense_ms": dense,
                    "isomax_ms": iso,
                    "ratio": ratio,
                    "ratio_q25": q1,
                    "ratio_q75": q3,
                }
            )

    from _results import machine_info, write_result

    path = write_result(
        "gpu_check_jax",
        {
            "batch_size": args.batch_size,
            "reps": args.reps,
            "matmul_precision": str(jax.config.jax_default_matmul_precision),
            "precision": [
                {"method": m, "band": b, "count": c, "max_rel_error": r} for m, b, c, r in bands
            ],
            "speed": speeds,
        },
        machine={**machine_info(onednn="n/a (JAX)"), "device": device_text()},
        path=args.output,
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

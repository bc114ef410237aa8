"""Per-example latency and size: LiteRT and ONNX artifacts vs the SavedModel.

A small CNN for 28x28x1 images (conv16-conv32-pool-Dense(64)) with an
IsoMaxPlusLayer(10), random weights (latency does not depend on training).
Each artifact is run through its own runtime (ai-edge-litert interpreter,
onnxruntime, TensorFlow's SavedModel loader, `score` signature), interleaved
round by round so that load on the machine hits all three alike; medians and
ratios to the SavedModel are printed, and every round's per-example time goes
to `benchmarks/results/edge_latency.json` (rendered into BENCHMARKS.md).

    python benchmarks/edge_latency.py [--rounds 15] [--reps 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from importlib import metadata

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_HERE))
sys.path.insert(0, _HERE)

import keras  # noqa: E402
import numpy as np  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--output", help="result JSON path (default: benchmarks/results/)")
    args = parser.parse_args(argv)

    import onnxruntime as ort
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter

    from keras_isomax import IsoMaxPlusLayer
    from keras_isomax.edge import export_litert, export_onnx
    from keras_isomax.export import export_saved_model

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Conv2D(16, 3, activation="relu"),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Flatten(),
            keras.layers.Dense(64, activation="relu"),
            IsoMaxPlusLayer(10),
        ]
    )
    root = tempfile.mkdtemp()
    sm = export_saved_model(model, os.path.join(root, "sm"), threshold=-1.0)
    tfl = export_litert(model, os.path.join(root, "m.tflite"), threshold=-1.0)
    onx = export_onnx(model, os.path.join(root, "m.onnx"), threshold=-1.0)
    sizes = {
        "saved_model": sum(
            os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(sm) for f in fs
        ),
        "litert": os.path.getsize(tfl),
        "onnx": os.path.getsize(onx),
    }

    loaded = tf.saved_model.load(sm)
    sig = loaded.signatures["score"]
    interpreter = Interpreter(model_path=tfl)
    runner = interpreter.get_signature_runner("score")
    options = ort.SessionOptions()
    session = ort.InferenceSession(onx, options, providers=["CPUExecutionProvider"])

    rng = np.random.default_rng(0)
    load_start = os.getloadavg()
    results, rounds = {}, {}
    for batch in (1, 64):
        x = rng.uniform(size=(batch, 28, 28, 1)).astype("float32")
        xt = tf.constant(x)
        runs = {
            "saved_model": lambda xt=xt: sig(inputs=xt),
            "litert": lambda x=x: runner(inputs=x),
            "onnx": lambda x=x: session.run(None, {"inputs": x}),
        }
        ref = sig(inputs=xt)["score"].numpy()
        for name in ("litert", "onnx"):
            out = runs[name]()
            score = out["score"] if isinstance(out, dict) else out[0]
            if not np.allclose(score, ref, rtol=1e-5, atol=1e-6):
                raise RuntimeError(f"{name}'s score differs from the SavedModel's")
        for fn in runs.values():  # warm-up
            for _ in range(3):
                fn()
        times = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, fn in runs.items():
                start = time.perf_counter()
                for _ in range(args.reps):
                    fn()
                times[name].append((time.perf_counter() - start) / args.reps / batch)
        results[batch] = {name: statistics.median(t) for name, t in times.items()}
        rounds[batch] = times

    print(f"sizes (bytes): {sizes}")
    for batch, medians in results.items():
        base = medians["saved_model"]
        line = ", ".join(
            f"{name} {1e6 * value:.1f} us ({value / base:.2f}x)" for name, value in medians.items()
        )
        print(f"batch {batch}, per-example median: {line}")

    from _results import write_result

    versions = {}
    for package in ("ai-edge-litert", "onnxruntime", "tf2onnx", "onnx"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    path = write_result(
        "edge_latency",
        {
            "rounds": args.rounds,
            "reps": args.reps,
            "model": "conv16-conv32-maxpool-Dense(64) + IsoMaxPlusLayer(10), 28x28x1, random",
            "runtimes": versions,
            "size_bytes": sizes,
            "load_average": {"start": load_start, "end": os.getloadavg()},
            # Seconds per example, one value per round, per batch size and runtime.
            "per_example_s": {str(b): t for b, t in rounds.items()},
        },
        path=args.output,
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

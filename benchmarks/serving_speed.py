"""Speed of the exported `score` signature against a Dense + softmax SavedModel.

What TF Serving runs: each head (features in, batch B) is exported, loaded back
with `tf.saved_model.load` and its signature called; TensorFlow's own CPU
kernels, no XLA (TF Serving's default). Measured side by side, interleaved,
one TensorFlow thread, process CPU time (see `_common.interleaved`):

- `dense`: a `Dense(C)` head exported with the same outputs as the library's
  `score` signature (logits, softmax probabilities, max softmax probability as
  the score, class id, `is_ood` against a threshold): the baseline.
- `isomax`: `keras_isomax.export_saved_model` of an `IsoMaxPlusLayer(C)` head,
  its `score` signature (minimum distance score; prototypes normalised once, at
  export, by `IsoMaxPlusLayer.inference_snapshot`).
- `dense_logits` / `isomax_logits`: Keras' own `model.export` of each head
  (logits only, the layer's live math: prototypes normalised on every call).

    python benchmarks/serving_speed.py                 # C = 1,000 and 10,000, F = 2,048
    python benchmarks/serving_speed.py --configs 100000x512 --reps 5

Every repetition's CPU and wall time goes to `benchmarks/results/serving_speed.json`
(rendered into BENCHMARKS.md by `benchmarks/render.py`).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import (  # noqa: E402
    interleaved,
    library_fingerprint,
    load_average,
    machine,
    set_threads,
    summarize,
)

NAMES = {
    "dense": "Dense + softmax, score outputs",
    "isomax": "IsoMax+ `score` (export_saved_model)",
    "dense_logits": "Dense, logits (model.export)",
    "isomax_logits": "IsoMax+, logits (model.export, live math)",
}


def export_heads(num_classes: int, feature_dim: int, root: str, seed: int = 0) -> dict[str, str]:
    """Writes the four SavedModels; returns `{name: path}`."""
    import keras
    import tensorflow as tf

    import keras_isomax

    keras.utils.set_random_seed(seed)
    isomax = keras.Sequential(
        [keras.Input((feature_dim,)), keras_isomax.IsoMaxPlusLayer(num_classes)]
    )
    dense = keras.Sequential([keras.Input((feature_dim,)), keras.layers.Dense(num_classes)])
    paths = {name: os.path.join(root, name) for name in NAMES}
    keras_isomax.export_saved_model(isomax, paths["isomax"], threshold=-0.5, verbose=False)
    isomax.export(paths["isomax_logits"], verbose=False)
    dense.export(paths["dense_logits"], verbose=False)

    threshold = tf.constant(0.5)

    def score(inputs):
        logits = dense(inputs, training=False)
        probabilities = tf.nn.softmax(logits, axis=-1)
        value = tf.reduce_max(probabilities, axis=-1)
        return {
            "logits": logits,
            "probabilities": probabilities,
            "score": value,
            "class_id": tf.argmax(logits, axis=-1, output_type=tf.int64),
            "is_ood": value < threshold,
            "threshold": tf.broadcast_to(threshold, tf.shape(value)),
        }

    archive = keras.export.ExportArchive()
    archive.track(dense)
    archive.add_endpoint(
        "score", score, input_signature=[tf.TensorSpec((None, feature_dim), tf.float32)]
    )
    archive.write_out(paths["dense"], verbose=False)
    return paths


def callables(paths: dict[str, str], x) -> dict:
    """`{name: () -> outputs}`: each SavedModel's signature, loaded back."""
    import tensorflow as tf

    out = {}
    for name, path in paths.items():
        signature = "score" if name in ("dense", "isomax") else "serving_default"
        loaded = tf.saved_model.load(path)
        fn = loaded.signatures[signature]
        out[name] = lambda fn=fn, keep=loaded: fn(x)  # `keep`: its variables stay alive.
    return out


def size_mib(path: str) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="1000x2048,10000x2048", help="Comma list of CxF.")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1, help="0 = TensorFlow's default.")
    parser.add_argument("--markdown", help="Also write the report to this file.")
    parser.add_argument("--output", help="Result JSON path (default: benchmarks/results/).")
    args = parser.parse_args(argv)
    configs = [tuple(int(v) for v in c.split("x")) for c in args.configs.split(",")]

    import keras
    import numpy as np
    import tensorflow as tf

    set_threads(args.threads)
    fingerprint, commit = library_fingerprint()
    lines = [
        "# Exported `score` signature vs a Dense + softmax SavedModel",
        "",
        f"- Command: `python benchmarks/serving_speed.py {' '.join(argv or sys.argv[1:])}`",
        f"- Date: {datetime.datetime.now():%Y-%m-%d %H:%M}",
        f"- Machine: {machine()}; TensorFlow {tf.__version__}, Keras {keras.__version__}, "
        f"Python {platform.python_version()}; threads {args.threads or 'default'}; "
        f"batch {args.batch_size}; {args.reps} interleaved repetitions; process CPU time",
        f"- Library: keras_isomax/layers.py sha1 {fingerprint}"
        + (f" (last commit touching keras_isomax: {commit})" if commit else ""),
        f"- Load average at start: {load_average()}",
        "",
        "Ratio: median of the per-repetition ratios to `dense` [interquartile range] "
        "(wall-clock ratio).",
        "",
        "| C | F | "
        + " | ".join(f"{NAMES[n]} ms" for n in NAMES)
        + " | IsoMax+ score / Dense score "
        "| IsoMax+ logits / Dense logits (live math) | SavedModel MiB, Dense / IsoMax+ |",
        "|---:|---:|" + "---:|" * (len(NAMES) + 3),
    ]
    rng = np.random.default_rng(0)
    load_start, recorded = load_average(), []
    for num_classes, feature_dim in configs:
        x = tf.constant(rng.normal(size=(args.batch_size, feature_dim)).astype("float32"))
        with tempfile.TemporaryDirectory() as root:
            paths = export_heads(num_classes, feature_dim, root)
            sizes = size_mib(paths["dense"]), size_mib(paths["isomax"])
            times = interleaved(callables(paths, x), args.reps)
        recorded.append(
            {
                "classes": num_classes,
                "features": feature_dim,
                "size_mib": {"dense": sizes[0], "isomax": sizes[1]},
                "times_s": times,  # {name: {"wall": [...], "cpu": [...]}}, per repetition.
            }
        )
        summary = summarize(times, "cpu", baseline="dense")
        logits = summarize(times, "cpu", baseline="dense_logits")["isomax_logits"]
        s = summary["isomax"]
        lines.append(
            f"| {num_classes:,} | {feature_dim:,} | "
            + " | ".join(f"{summary[n]['median_ms']:,.1f}" for n in NAMES)
            + f" | **{s['ratio']:.2f}** [{s['ratio_q25']:.2f}, {s['ratio_q75']:.2f}] "
            f"({s['wall_ratio']:.2f}) | {logits['ratio']:.2f} [{logits['ratio_q25']:.2f}, "
            f"{logits['ratio_q75']:.2f}] | {sizes[0]:,.1f} / {sizes[1]:,.1f} |"
        )
        print(lines[-1], file=sys.stderr, flush=True)
    lines += ["", f"Load average at end: {load_average()}."]
    report = "\n".join(lines)
    print(report)
    if args.markdown:
        Path(args.markdown).write_text(report + "\n")
    from _results import write_result

    path = write_result(
        "serving_speed",
        {
            "batch_size": args.batch_size,
            "reps": args.reps,
            "threads": args.threads,
            "clock": "cpu",
            "baseline": "dense",
            "names": NAMES,
            "library_layers_sha1": fingerprint,
            "load_average": {"start": load_start, "end": load_average()},
            "configs": recorded,
        },
        path=args.output,
    )
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

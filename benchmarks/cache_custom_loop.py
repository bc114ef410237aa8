"""A custom training loop that calls the IsoMax+ head with `training=False`.

The layer's TensorFlow inference cache serves `training=False` calls. In a custom
loop that passes `training=False` under a `GradientTape` (for example to keep
BatchNorm frozen) the prototypes change after every step, so every call refills
the cache (the check, the normalised `(F + 1, C)` kernel, a copy of the
prototypes). This measures that step against the same loop with `training=True`
(head alone, features in, the benchmarks' SGD with Nesterov momentum, one
thread, process CPU time, interleaved repetitions).

    python benchmarks/cache_custom_loop.py [--configs 1000x2048,10000x2048] [--reps 9]

Results: `benchmarks/results/cache_custom_loop.json` (per-repetition times).
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

from _common import head_step_fn, interleaved, load_average, set_threads  # noqa: E402
from _results import add_output_arguments, write_result  # noqa: E402


def measure(num_classes: int, feature_dim: int, batch_size: int, reps: int) -> dict:
    """Per-repetition CPU and wall times of one step with `training=True` and `False`."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(batch_size, feature_dim)).astype("float32"))
    y = tf.constant(rng.integers(0, num_classes, batch_size))
    steps = {
        name: functools.partial(
            head_step_fn("isomax", num_classes, feature_dim, mode=mode)[0], x, y
        )
        for name, mode in (("training_true", "train"), ("training_false", "train_training_false"))
    }
    before = load_average()
    times = interleaved(steps, reps)
    return {
        "classes": num_classes,
        "features": feature_dim,
        "batch_size": batch_size,
        "times": times,
        "load": [before, load_average()],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="1000x2048,10000x2048", help="Comma list of CxF.")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--reps", type=int, default=9)
    add_output_arguments(parser, "cache_custom_loop.json")
    args = parser.parse_args(argv)
    set_threads(1)
    print(f"load average at start: {load_average()}")
    results = []
    for config in args.configs.split(","):
        num_classes, feature_dim = (int(v) for v in config.split("x"))
        entry = measure(num_classes, feature_dim, args.batch_size, args.reps)
        results.append(entry)
        cpu = {k: sorted(v["cpu"])[len(v["cpu"]) // 2] * 1e3 for k, v in entry["times"].items()}
        ratios = sorted(
            a / b
            for a, b in zip(
                entry["times"]["training_false"]["cpu"],
                entry["times"]["training_true"]["cpu"],
                strict=True,
            )
        )
        print(
            f"C={num_classes} F={feature_dim}: training=True {cpu['training_true']:.1f} ms, "
            f"training=False {cpu['training_false']:.1f} ms (CPU medians), ratio "
            f"{ratios[len(ratios) // 2]:.2f} (median of {len(ratios)} paired repetitions; "
            f"load {entry['load'][0]} -> {entry['load'][1]})"
        )
    if not args.no_results:
        payload = {
            "settings": {"threads": 1, "clock": "cpu", "reps": args.reps},
            "results": results,
        }
        path = write_result(
            "cache_custom_loop", payload, path=Path(args.results_dir) / "cache_custom_loop.json"
        )
        print(f"wrote {path}")


if __name__ == "__main__":
    main()

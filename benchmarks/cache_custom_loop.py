"""A custom training loop that calls the IsoMax+ head with `training=False`.

The layer's TensorFlow inference cache serves `training=False` calls. In a custom
loop that passes `training=False` under a `GradientTape` (for example to keep
BatchNorm frozen) the prototypes change after every step, so every call refills
the cache (the check, the normalised `(F, C)` kernel, a copy of the prototypes)
and its gradient goes through the cache's custom gradient. This measures that
step against the same loop with `training=True` (head alone, features in, the
benchmarks' SGD with Nesterov momentum, one thread, CPU time, interleaved).

    python benchmarks/cache_custom_loop.py [--configs 1000x2048,10000x2048] [--reps 7]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

from _common import head_step_fn, load_average, set_threads  # noqa: E402


def measure(num_classes, feature_dim, batch_size, reps):
    """Median CPU ms of one step with `training=True` and with `training=False`."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(batch_size, feature_dim)).astype("float32"))
    y = tf.constant(rng.integers(0, num_classes, batch_size))
    steps = {
        training: head_step_fn("isomax", num_classes, feature_dim, call_training=training)[0]
        for training in (True, False)
    }
    for step in steps.values():
        step(x, y)
        step(x, y)
    times = {k: [] for k in steps}
    for _ in range(reps):
        for training, step in steps.items():
            start = time.process_time()
            [np.asarray(t) for t in step(x, y)]
            times[training].append(time.process_time() - start)
    return {k: 1e3 * float(np.median(v)) for k, v in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="1000x2048,10000x2048", help="Comma list of CxF.")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args(argv)
    set_threads(1)
    print(f"load average at start: {load_average()}")
    for config in args.configs.split(","):
        num_classes, feature_dim = (int(v) for v in config.split("x"))
        ms = measure(num_classes, feature_dim, args.batch_size, args.reps)
        print(
            f"C={num_classes} F={feature_dim}: training=True {ms[True]:.1f} ms, "
            f"training=False {ms[False]:.1f} ms, ratio {ms[False] / ms[True]:.2f} "
            f"(load {load_average()})"
        )


if __name__ == "__main__":
    main()

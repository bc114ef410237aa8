"""Peak memory of one forward + backward pass of a large classification head.

The issue's large-head check: B=256 examples, C=10,000 classes, F=2,048 features.
A naive IsoMax+ (exact differences `x[:, None, :] - p[None]`, as the authors'
PyTorch code) holds a (B, C, F) float32 tensor: 256 * 10,000 * 2,048 * 4 bytes =
21 GB. `IsoMaxPlusLayer` uses one matrix product plus an exact recomputation of
the nearest prototype, so it should need O(B*C + C*F) memory, like `Dense`.

How memory is measured. Each case runs in a fresh subprocess. The worker builds
its inputs and weights, runs the step twice (tracing, first allocations), then
resets the kernel's peak-RSS counter (`echo 5 > /proc/self/clear_refs`, Linux
>= 4.0), records the resident size, runs the step again and reads the new peak
(`VmHWM` in `/proc/self/status`). The difference is the transient memory of
one step: everything the step allocates beyond the live weights and inputs.
glibc keeps freed blocks below its (dynamic, up to 32 MiB) mmap threshold in
the heap, which would hide reallocations; the workers run with
`MALLOC_MMAP_THRESHOLD_=65536` so that large buffers are mapped and unmapped.
A method check allocates a known 256 MiB tensor inside a `tf.function` and
must read back about 256 MiB. On a GPU, TensorFlow's own allocator statistics
(`tf.config.experimental.get_memory_info`) are used instead of the RSS.

With `--inference`-style rows (always printed), the same heads run inference +
score, and the memory the first steps keep is reported too: for IsoMax+ on
TensorFlow that includes the inference cache (two `C x F` arrays).

The naive implementation is measured at small B (its memory is linear in B)
and the slope is extrapolated to B=256.

    python benchmarks/head_memory.py [--batch-size 256 --classes 10000 --features 2048]

Results: `benchmarks/results/head_memory.json` (rendered by `_render_speed.py`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

from _common import MIB, PeakMemory, run_worker  # noqa: E402
from _render_speed import render_head_memory  # noqa: E402
from _results import add_output_arguments, command_line, machine_info, write_result  # noqa: E402

HEADS = ("dense", "isomax", "naive")


# ------------------------------------------------------------------ worker


def _worker(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--head", choices=(*HEADS, "method_check"), required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--classes", type=int, required=True)
    parser.add_argument("--features", type=int, required=True)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--inference", action="store_true")
    args = parser.parse_args(argv)

    import numpy as np
    import tensorflow as tf

    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)

    gpu = bool(tf.config.list_physical_devices("GPU"))
    rng = np.random.default_rng(0)
    batch, classes, features = args.batch_size, args.classes, args.features

    if args.head == "method_check":
        size = 256 * MIB // 4

        @tf.function
        def step():
            big = tf.random.uniform((size,))  # A known 256 MiB allocation.
            return tf.reduce_sum(big)

        step()
        step()
        with PeakMemory(gpu) as mem:
            step().numpy()
        return {"expected_bytes": size * 4, "peak_bytes": mem.peak_bytes, "method": mem.method}

    from _common import head_step_fn, library_fingerprint  # The benchmark's heads.

    x = tf.constant(rng.normal(size=(batch, features)).astype("float32"))
    y = tf.constant(rng.integers(0, classes, size=batch).astype("int32"))
    step, _ = head_step_fn(
        args.head, classes, features, mode="infer" if args.inference else "train"
    )
    from _common import proc_status_kib

    resident_before = proc_status_kib("VmRSS")
    step(x, y)
    step(x, y)
    # What the first steps kept (tracing, and the IsoMax+ inference cache).
    resident_growth = (proc_status_kib("VmRSS") - resident_before) * 1024
    times = []
    peaks = []
    for _ in range(args.repeats):
        with PeakMemory(gpu) as mem:
            start = time.perf_counter()
            out = step(x, y)
            [np.asarray(t) for t in out]
            times.append(time.perf_counter() - start)
        peaks.append(mem.peak_bytes)
    from _results import machine_info

    return {
        "peak_bytes": max(p for p in peaks) if None not in peaks else None,
        "peaks_bytes": peaks,
        "resident_growth_bytes": resident_growth,
        "seconds": times,
        "method": mem.method,
        "device": "GPU" if gpu else "CPU",
        "layers_sha1": library_fingerprint()[0],
        "machine": machine_info(),
    }


# ---------------------------------------------------------------- the check


def large_head_check(
    batch_size: int = 256,
    classes: int = 10_000,
    features: int = 2048,
    naive_batches: tuple[int, ...] = (2, 4, 8),
    threads: int = 0,
) -> dict:
    """Measures the peak memory of each head; returns a dict of results."""
    here = Path(__file__).resolve()
    naive_bytes = batch_size * classes * features * 4
    results = {
        "batch_size": batch_size,
        "classes": classes,
        "features": features,
        "naive_tensor_bytes": naive_bytes,
        "method_check": run_worker(
            here, ["--head", "method_check", "--batch-size", 1, "--classes", 1, "--features", 1]
        ),
        "heads": {},
        "inference": {},
        "naive": [],
    }
    common = ["--classes", classes, "--features", features, "--threads", threads]
    for head in ("dense", "isomax"):
        results["heads"][head] = run_worker(
            here, ["--head", head, "--batch-size", batch_size, *common]
        )
    for head in ("dense", "isomax"):
        results["inference"][head] = run_worker(
            here, ["--head", head, "--batch-size", batch_size, "--inference", *common]
        )
    for b in naive_batches:
        result = run_worker(here, ["--head", "naive", "--batch-size", b, *common])
        result["batch_size"] = b
        results["naive"].append(result)
    points = [(r["batch_size"], r["peak_bytes"]) for r in results["naive"] if r.get("peak_bytes")]
    if len(points) >= 2:
        b = [p[0] for p in points]
        m = [p[1] for p in points]
        mean_b, mean_m = sum(b) / len(b), sum(m) / len(m)
        slope = sum((bi - mean_b) * (mi - mean_m) for bi, mi in zip(b, m)) / sum(
            (bi - mean_b) ** 2 for bi in b
        )
        results["naive_slope_bytes_per_example"] = slope
        results["naive_extrapolated_bytes"] = mean_m + slope * (batch_size - mean_b)
    return results


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "--worker" in argv:
        print("RESULT " + json.dumps(_worker(argv)), flush=True)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--classes", type=int, default=10_000)
    parser.add_argument("--features", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=0, help="0: TensorFlow's default.")
    parser.add_argument("--json", help="Also write the raw results to this JSON file.")
    add_output_arguments(parser, "head_memory.json")
    args = parser.parse_args(argv)
    results = large_head_check(args.batch_size, args.classes, args.features, threads=args.threads)
    machine = next(
        (r["machine"] for r in results["heads"].values() if "machine" in r), machine_info()
    )
    record = {"command": command_line(), "machine": machine, **results}
    if not args.no_results:
        gpu = any(r.get("device") == "GPU" for r in results["heads"].values())
        name = "head_memory_gpu" if gpu else "head_memory"
        path = write_result(
            name, results, machine=machine, path=Path(args.results_dir) / f"{name}.json"
        )
        record = json.loads(path.read_text())
        print(f"wrote {path}", file=sys.stderr)
    print(render_head_memory(lambda name: record))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

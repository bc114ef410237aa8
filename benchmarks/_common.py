"""Helpers shared by the speed and memory benchmarks (`speed.py`, `head_memory.py`).

Everything here times or measures the library's public `IsoMaxPlusLayer`
(never a copy of its math) against a `Dense` head. The module imports no
TensorFlow at the top level: `speed.py`'s pytorch-ood worker uses `interleaved`
in a process that must not load TensorFlow.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MIB = 1024**2
WORKER_ENV = {
    "TF_CPP_MIN_LOG_LEVEL": "3",
    "KERAS_BACKEND": "tensorflow",
    "TF_FORCE_GPU_ALLOW_GROWTH": "true",  # Measure what a step needs, not the reservation.
}
# For memory workers only: large blocks are mmapped and returned on free, so
# that the peak RSS sees every temporary (and timings would pay page faults).
MEMORY_WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
HEAD_NAMES = {
    "dense": "Dense + softmax",
    "dense_isoloss": "Dense + IsoMax+ loss",
    "mm_only": "x @ P^T alone (no normalisation)",
    "mm_rev": "(P @ x^T)^T alone (no normalisation)",
    "isomax": "IsoMaxPlusLayer (library)",
    "naive": "naive exact differences (B, C, F)",
}


# ---------------------------------------------------------------- timing


def sync(out: Any) -> None:
    """Waits for TensorFlow results (and the GPU's queue)."""
    import numpy as np
    import tensorflow as tf

    for t in tf.nest.flatten(out):
        np.asarray(t)
    if tf.config.list_physical_devices("GPU") and hasattr(tf.test.experimental, "sync_devices"):
        tf.test.experimental.sync_devices()


def interleaved(
    fns: dict[str, Callable[[], Any]],
    reps: int,
    warmup: int = 2,
    min_seconds: float = 0.05,
    sync_fn: Callable[[Any], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Times callables side by side.

    Each callable is warmed up, then every repetition times each once, in an
    order rotated (and reversed every other repetition) between repetitions.
    Calls faster than `min_seconds` are repeated in a loop and averaged (the
    same count for all callables, so ratios compare like with like). Both the
    wall-clock time and the process's CPU time (all threads) are recorded.

    Returns:
        `{name: {"wall": [...], "cpu": [...], "calls_per_rep": n}}`, seconds
        per call, one value per repetition.
    """
    sync_fn = sync_fn or sync
    names = list(fns)
    first = {}
    for name in names:
        for _ in range(warmup):
            start = time.perf_counter()
            sync_fn(fns[name]())
            first[name] = time.perf_counter() - start
    inner = max(1, math.ceil(min_seconds / max(min(first.values()), 1e-6)))
    times = {name: {"wall": [], "cpu": [], "calls_per_rep": inner} for name in names}
    for rep in range(reps):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        if rep % 2:
            order = order[::-1]
        for name in order:
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(inner):
                out = fns[name]()
            sync_fn(out)
            times[name]["cpu"].append((time.process_time() - cpu) / inner)
            times[name]["wall"].append((time.perf_counter() - wall) / inner)
    return times


def summarize(times: dict, clock: str, baseline: str = "dense") -> dict[str, dict[str, float]]:
    """Medians (ms) and paired ratios against `baseline`, for the `clock` given.

    The wall-clock ratio is always included as `wall_ratio`.
    """
    import numpy as np

    out = {}
    for name, clocks in times.items():
        values = np.asarray(clocks[clock])
        ratios = values / np.asarray(times[baseline][clock])
        wall_ratios = np.asarray(clocks["wall"]) / np.asarray(times[baseline]["wall"])
        out[name] = {
            "median_ms": float(np.median(values) * 1e3),
            "wall_median_ms": float(np.median(clocks["wall"]) * 1e3),
            "ratio": float(np.median(ratios)),
            "ratio_q25": float(np.percentile(ratios, 25)),
            "ratio_q75": float(np.percentile(ratios, 75)),
            "wall_ratio": float(np.median(wall_ratios)),
            "reps": len(values),
        }
    return out


def load_average() -> str:
    try:
        return "{:.1f} {:.1f} {:.1f}".format(*os.getloadavg())
    except OSError:
        return "n/a"


def set_threads(threads: int) -> None:
    """TensorFlow intra/inter-op threads (0: TensorFlow's default)."""
    if threads:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)


def machine() -> str:
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        return f"GPU: {details.get('device_name', gpus[0].name)} x{len(gpus)}"
    return f"{os.cpu_count()}-core CPU, no GPU"


def library_fingerprint() -> tuple[str, str]:
    """Short SHA-1 of the layer's source files as imported (`layers.py`, and
    `_tf_layer.py` / `_numerics.py` where present), and the git commit if known.

    Recorded by every measurement process, so that a run whose workers saw a
    different layer (edited during the run) says so.
    """
    import keras_isomax.layers as layers_module

    package = Path(layers_module.__file__).parent
    digest = hashlib.sha1()
    for name in ("layers.py", "_tf_layer.py", "_numerics.py"):
        if (package / name).exists():
            digest.update((package / name).read_bytes())
    try:
        commit = subprocess.run(
            ["git", "-C", str(package), "log", "-1", "--format=%h", "--", "."],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return digest.hexdigest()[:10], commit


# ------------------------------------------------------------- reference


def reference_distances(x: Any, prototypes: Any, chunk: int = 64) -> Any:
    """Float64 exact distances between L2-normalised rows (the benchmarks' oracle):
    `keras_isomax.testing.distances`, chunked over the rows of `x`."""
    from keras_isomax import testing

    return testing.distances(x, prototypes, chunk=chunk)


# ----------------------------------------------------------------- heads


def make_head(kind: str, num_classes: int) -> tuple[Any, Any, Callable]:
    """Returns `(layer, loss_fn, score_fn)` for a head kind (see `HEAD_NAMES`).

    `isomax` is the library's public layer. `mm_only`/`mm_rev` are lower bounds
    (the bare matrix product in each orientation, no distance); `naive` is the
    authors' formulation through a (B, C, F) tensor, for the memory comparison.
    """
    import keras
    from keras import ops

    from keras_isomax import IsoMaxPlusLayer, IsoMaxPlusLoss, scores

    isomax_loss = IsoMaxPlusLoss()
    if kind in ("dense", "dense_isoloss"):
        loss = (
            keras.losses.SparseCategoricalCrossentropy(from_logits=True)
            if kind == "dense"
            else isomax_loss
        )
        return keras.layers.Dense(num_classes, name="head"), loss, scores.max_probability_score
    if kind == "isomax":
        return IsoMaxPlusLayer(num_classes, name="head"), isomax_loss, scores.minimum_distance_score

    def normalize(v):
        return v / ops.maximum(ops.norm(v, axis=-1, keepdims=True), 1e-12)

    functions = {
        "mm_only": lambda x, p: -ops.matmul(x, ops.transpose(p)),
        "mm_rev": lambda x, p: -ops.transpose(ops.matmul(p, ops.transpose(x))),
        "naive": lambda x, p: (
            -ops.sqrt(ops.sum(ops.square(ops.expand_dims(normalize(x), 1) - normalize(p)), axis=-1))
        ),
    }
    if kind not in functions:
        raise ValueError(f"Unknown head. Received: kind={kind!r}")

    class _PrototypeHead(keras.layers.Layer):
        """A (C, F) weight matrix with a given logits function."""

        def build(self, input_shape):
            self.prototypes = self.add_weight(
                name="prototypes",
                shape=(num_classes, input_shape[-1]),
                initializer=keras.initializers.RandomNormal(stddev=1.0),
            )

        def call(self, x):
            return functions[kind](x, self.prototypes)

    return _PrototypeHead(name="head"), isomax_loss, scores.minimum_distance_score


def optimizer() -> Any:
    """The paper's optimizer (SGD, Nesterov momentum 0.9); a small learning rate
    keeps the random-data benchmark numerically steady over many steps."""
    import keras

    return keras.optimizers.SGD(learning_rate=1e-3, momentum=0.9, nesterov=True)


def train_fn(model: Any, loss_fn: Callable, jit: bool) -> Callable:
    """A compiled training step `(x, y) -> loss` of a whole model."""
    import tensorflow as tf

    opt = optimizer()
    opt.build(model.trainable_variables)

    @tf.function(jit_compile=jit)
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply(grads, model.trainable_variables)
        return loss

    return step


def infer_fn(model: Any, score_fn: Callable, jit: bool) -> Callable:
    """A compiled `x -> score(model(x))`."""
    import tensorflow as tf

    @tf.function(jit_compile=jit)
    def infer(x):
        return score_fn(model(x, training=False))

    return infer


def head_step_fn(
    kind: str,
    num_classes: int,
    feature_dim: int,
    mode: Literal["train", "train_training_false", "infer"] = "train",
    jit: bool = False,
) -> tuple[Callable, Any]:
    """The head alone on features `x` `(B, F)`.

    `"train"`: loss, gradients for the head's weights and for `x` (what the
    backbone's backward pass would receive), SGD update of the head, the head
    called with `training=True`; `"train_training_false"`: the same step with
    the head called with `training=False` (a custom loop keeping layers in
    inference mode); `"infer"`: logits -> OOD score.

    Returns:
        `(fn, layer)`; `fn(x, y)` runs one step.
    """
    import tensorflow as tf

    if mode not in ("train", "train_training_false", "infer"):
        raise ValueError(f"Unknown step. Received: mode={mode!r}")
    layer, loss_fn, score_fn = make_head(kind, num_classes)
    layer.build((None, feature_dim))
    if mode == "infer":

        @tf.function(jit_compile=jit)
        def infer(x, y):
            return score_fn(layer(x, training=False))

        return infer, layer
    opt = optimizer()
    opt.build(layer.trainable_variables)

    @tf.function(jit_compile=jit)
    def step(x, y):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = loss_fn(y, layer(x, training=mode == "train"))
        grads = tape.gradient(loss, [x, *layer.trainable_variables])
        opt.apply(grads[1:], layer.trainable_variables)
        return loss, tf.reduce_sum(grads[0])

    return step, layer


# ---------------------------------------------------------------- memory


def proc_status_kib(field: str) -> int | None:
    with open("/proc/self/status") as f:
        match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    return int(match.group(1)) if match else None


def reset_peak_rss() -> bool:
    """Resets VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory of a block of code over the memory live when it starts.

    On a GPU: TensorFlow's allocator peak for `GPU:0`. On a CPU: the process's
    peak resident set size (`VmHWM`, reset through `/proc/self/clear_refs`);
    where the peak cannot be reset, `peak_bytes` stays `None`.
    """

    def __init__(self, gpu: bool) -> None:
        self.gpu = gpu
        self.peak_bytes = None
        self.method = None

    def __enter__(self) -> PeakMemory:
        if self.gpu:
            import tensorflow as tf

            tf.config.experimental.reset_memory_stats("GPU:0")
            self.base = tf.config.experimental.get_memory_info("GPU:0")["current"]
            self.method = "tf.config.experimental.get_memory_info('GPU:0') peak - current"
        else:
            self.resettable = reset_peak_rss()
            self.base = proc_status_kib("VmRSS") * 1024
            self.method = "peak RSS (VmHWM after clear_refs) - RSS before"
        return self

    def __exit__(self, *exc: Any) -> bool:
        if self.gpu:
            import tensorflow as tf

            peak = tf.config.experimental.get_memory_info("GPU:0")["peak"]
            self.peak_bytes = peak - self.base
        elif self.resettable:
            self.peak_bytes = proc_status_kib("VmHWM") * 1024 - self.base
        return False


def run_worker(
    script: Path,
    args: list,
    timeout: float = 1800,
    flag: str = "--worker",
    env: dict[str, str] | None = None,
    stream_stderr: bool = False,
    memory: bool = True,
) -> dict:
    """Runs `script <flag> args...` in a subprocess and returns its JSON result.

    `env` adds to (or overrides) this process's environment and `WORKER_ENV`
    (with `memory`, also `MEMORY_WORKER_ENV`: for memory measurements, not
    timings); with `stream_stderr`, the worker's progress lines go to this
    process's stderr as they come.
    """
    env = {**os.environ, **WORKER_ENV, **(MEMORY_WORKER_ENV if memory else {}), **(env or {})}
    if not memory:
        for key in MEMORY_WORKER_ENV:
            env.pop(key, None)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (env.get("PYTHONPATH", ""), str(ROOT)) if p
    )  # An explicit PYTHONPATH (another checkout of the library) comes first.
    cmd = [sys.executable, str(script), flag, *[str(a) for a in args]]
    proc = subprocess.run(
        cmd,
        stdout=subprocess.PIPE,
        stderr=None if stream_stderr else subprocess.PIPE,
        text=True,
        env=env,
        timeout=timeout,
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-5:]
    return {"error": f"worker exited {proc.returncode}: " + " | ".join(tail)}

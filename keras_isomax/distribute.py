"""tf.distribute helpers for training IsoMax+ models on several devices.

IsoMax+ needs nothing special under `tf.distribute`: build and compile the model
inside `strategy.scope()` and call `model.fit` as usual. This module holds the
TensorFlow-only pieces around that:

- `enable_multi_worker_fit()`: a narrow, version-gated fix for Keras 3's
  `model.fit` under `tf.distribute.MultiWorkerMirroredStrategy`
  (keras-team/keras#20585), applied by `import keras_isomax`. It is needed for
  Keras `>= 3.5, < 3.16` (compared as parsed versions) and does nothing
  elsewhere.
- `configure_logical_cpus()`: split the host CPU into N logical devices, so a
  `MirroredStrategy` can be tried (and tested) without GPUs.
- `task_info()`: the current worker's role, read from `TF_CONFIG`.
- `worker_backup_dir()`: a per-worker `keras.callbacks.BackupAndRestore`
  directory (Keras 3 writes the backup from every worker).

How the fix works, and which Keras versions were checked: docs/distributed.md
("The multi-worker `fit` fix in detail").
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import keras

if keras.backend.backend() != "tensorflow":
    raise ImportError(
        "keras_isomax.distribute holds tf.distribute helpers and needs the "
        "TensorFlow backend (KERAS_BACKEND=tensorflow). On JAX use "
        "`keras.distribution` (e.g. `keras.distribution.DataParallel`); on "
        "PyTorch use `torch.distributed`. IsoMax+ itself needs nothing special "
        f"there. Received: backend={keras.backend.backend()!r}"
    )

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from packaging.version import Version

if TYPE_CHECKING:
    from keras_isomax._runner import ModelRunner
    from keras_isomax.detectors.base import Detector, FitContext

__all__ = [
    "AFFECTED_KERAS_VERSIONS",
    "configure_logical_cpus",
    "disable_multi_worker_fit",
    "enable_multi_worker_fit",
    "multi_worker_fit_fix_enabled",
    "multi_worker_fit_fix_needed",
    "task_info",
    "worker_backup_dir",
]

# Keras versions whose TensorFlow `fit` breaks under MultiWorkerMirroredStrategy
# (keras-team/keras#20585): lower bound inclusive, upper bound exclusive.
# Raise the upper bound when a newer Keras is verified to be still affected;
# delete the fix when the canary test in tests/test_distribute.py fails.
AFFECTED_KERAS_VERSIONS = (Version("3.5.0"), Version("3.16.0"))

# Originals, keyed by attribute name, while the fix is applied.
_ORIGINALS: dict[str, Any] = {}


def _keras_version() -> Version:
    return Version(keras.version())


def multi_worker_fit_fix_needed() -> bool:
    """Whether the installed Keras needs `enable_multi_worker_fit()`.

    True for the TensorFlow backend of Keras versions in
    `AFFECTED_KERAS_VERSIONS` (compared as parsed versions).

    Returns:
        bool.
    """
    low, high = AFFECTED_KERAS_VERSIONS
    return keras.backend.backend() == "tensorflow" and (low <= _keras_version() < high)


def _trainer_class_and_module() -> tuple[Any, Any]:
    """Finds Keras' TensorFlow trainer class and its module without importing
    private modules by name (they are reachable from `keras.Model`)."""
    for cls in keras.Model.__mro__:
        if cls.__name__ == "TensorFlowTrainer":
            return cls, sys.modules[cls.__module__]
    return None, None


def _in_multi_worker_mode(strategy: Any) -> bool:
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and bool(
        strategy.extended._in_multi_worker_mode()
    )


def _first_local_value(strategy: Any, value: Any) -> Any:
    if isinstance(value, tf.distribute.DistributedValues):
        return strategy.experimental_local_results(value)[0]
    return value


def _make_maybe_symbolic_build(original: Callable[..., Any]) -> Callable[..., Any]:
    def _maybe_symbolic_build(self: Any, iterator: Any = None, data_batch: Any = None) -> Any:
        strategy = self._distribute_strategy
        if not _in_multi_worker_mode(strategy):
            return original(self, iterator=iterator, data_batch=data_batch)
        # Keras' own code runs; only its `strategy.reduce("MEAN", batch,
        # axis=None)` of the first data batch (used for shapes and dtypes)
        # takes the first local replica's values instead of all-reducing the
        # batch across workers. Keras 3.5 to 3.15 iterate differently here
        # but all make that call.
        real_reduce = strategy.reduce

        def reduce(reduce_op: Any, value: Any, axis: Any = None) -> Any:
            leaves = tf.nest.flatten(value)
            if (
                axis is None
                and str(reduce_op).upper().endswith("MEAN")
                and leaves
                and all(isinstance(v, tf.distribute.DistributedValues) for v in leaves)
            ):
                return tf.nest.map_structure(lambda v: _first_local_value(strategy, v), value)
            return real_reduce(reduce_op, value, axis=axis)

        strategy.reduce = reduce  # Instance attribute, removed below.
        try:
            return original(self, iterator=iterator, data_batch=data_batch)
        finally:
            del strategy.reduce

    _maybe_symbolic_build.__wrapped__ = original  # type: ignore[attr-defined]
    return _maybe_symbolic_build


def _make_reduce_per_replica(original: Callable[..., Any]) -> Callable[..., Any]:
    def reduce_per_replica(values: Any, strategy: Any, reduction: Any) -> Any:
        if reduction in ("auto", "mean") and _in_multi_worker_mode(strategy):
            # Keras uses `axis=0` here, which fails on scalar logs; the mean
            # over all replicas of all workers is `axis=None`.
            return tf.nest.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), values)
        return original(values, strategy, reduction)

    reduce_per_replica.__wrapped__ = original  # type: ignore[attr-defined]
    return reduce_per_replica


def multi_worker_fit_fix_enabled() -> bool:
    """Whether `enable_multi_worker_fit()` is currently applied.

    Returns:
        bool.
    """
    return bool(_ORIGINALS)


def enable_multi_worker_fit() -> bool:
    """Makes `model.fit` work under `MultiWorkerMirroredStrategy`.

    Works around keras-team/keras#20585 (Keras `>= 3.5, < 3.16`, TensorFlow
    backend): `fit` and `evaluate` fail under
    `tf.distribute.MultiWorkerMirroredStrategy` with more than one worker. The
    fix changes Keras' behaviour only for that strategy in multi-worker mode,
    the case that fails without it; every other strategy runs Keras' own code.
    `import keras_isomax` calls it; calling it again does nothing.

    For other Keras versions or backends it does nothing and returns False.

    Returns:
        bool: True if the fix is applied (now or before).

    Example:

    >>> import keras_isomax.distribute as kd
    >>> kd.enable_multi_worker_fit() == kd.multi_worker_fit_fix_needed()
    True
    """
    if _ORIGINALS:
        return True
    if not multi_worker_fit_fix_needed():
        return False
    cls, module = _trainer_class_and_module()
    if (
        cls is None
        or not callable(getattr(cls, "_maybe_symbolic_build", None))
        or not callable(getattr(cls, "_symbolic_build", None))
        or not callable(getattr(module, "reduce_per_replica", None))
    ):
        warnings.warn(
            "keras_isomax could not apply its fix for Keras' multi-worker "
            "`fit` (keras-team/keras#20585): Keras' TensorFlow trainer has "
            "changed. `model.fit` under MultiWorkerMirroredStrategy may fail. "
            f"Received: keras.version()={keras.version()}",
            stacklevel=2,
        )
        return False
    _ORIGINALS["_maybe_symbolic_build"] = cls.__dict__["_maybe_symbolic_build"]
    _ORIGINALS["reduce_per_replica"] = module.reduce_per_replica
    cls._maybe_symbolic_build = _make_maybe_symbolic_build(_ORIGINALS["_maybe_symbolic_build"])
    module.reduce_per_replica = _make_reduce_per_replica(_ORIGINALS["reduce_per_replica"])
    return True


def disable_multi_worker_fit() -> bool:
    """Restores Keras' own code replaced by `enable_multi_worker_fit()`.

    Returns:
        bool: True if the fix was applied and has been removed.
    """
    if not _ORIGINALS:
        return False
    cls, module = _trainer_class_and_module()
    cls._maybe_symbolic_build = _ORIGINALS.pop("_maybe_symbolic_build")
    module.reduce_per_replica = _ORIGINALS.pop("reduce_per_replica")
    return True


def configure_logical_cpus(num_devices: int) -> list[str]:
    """Splits the host CPU into `num_devices` logical devices.

    `tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1", ...])` can then run
    several replicas on one machine without GPUs (to try out or test
    distributed code). TensorFlow fixes its devices when it initializes, so
    call this at the start of the program, before any op runs.

    Args:
        num_devices: int, the number of logical CPU devices (at least 1).

    Returns:
        list of str: the logical CPU device names, e.g.
        `["/device:CPU:0", "/device:CPU:1"]`.

    Raises:
        TypeError: if `num_devices` is not an int.
        ValueError: if `num_devices < 1`.
        RuntimeError: if TensorFlow is already initialized with a different
            number of logical CPU devices.
    """
    if isinstance(num_devices, bool) or not isinstance(num_devices, int):
        raise TypeError(f"`num_devices` must be an int. Received: num_devices={num_devices!r}")
    if num_devices < 1:
        raise ValueError(f"`num_devices` must be at least 1. Received: num_devices={num_devices}")
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu,
            [tf.config.LogicalDeviceConfiguration() for _ in range(num_devices)],
        )
    except RuntimeError as e:
        current = tf.config.list_logical_devices("CPU")
        if len(current) != num_devices:
            raise RuntimeError(
                "TensorFlow is already initialized with "
                f"{len(current)} logical CPU device(s); call "
                "`configure_logical_cpus()` at the start of the program, before "
                f"any TensorFlow op runs. Received: num_devices={num_devices}"
            ) from e
    return [d.name for d in tf.config.list_logical_devices("CPU")]


def task_info(tf_config: str | dict[str, Any] | None = None) -> dict[str, Any]:
    """The current task's role in a multi-worker cluster, from `TF_CONFIG`.

    Args:
        tf_config: str or dict, the cluster spec; `None` reads the `TF_CONFIG`
            environment variable. Defaults to `None`.

    Returns:
        dict with `task_type` (str or None), `task_index` (int),
        `num_workers` (int: workers plus chief; 1 without `TF_CONFIG`) and
        `is_chief` (bool: the chief, or worker 0 when there is no chief).

    Raises:
        ValueError: if `tf_config` is not valid JSON or lacks a task.
    """
    if tf_config is None:
        tf_config = os.environ.get("TF_CONFIG", "")
    if isinstance(tf_config, str):
        if not tf_config.strip():
            return {
                "task_type": None,
                "task_index": 0,
                "num_workers": 1,
                "is_chief": True,
            }
        try:
            tf_config = json.loads(tf_config)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"`tf_config` is not valid JSON. Received: tf_config={tf_config}"
            ) from e
    if not isinstance(tf_config, dict) or "task" not in tf_config:
        raise ValueError(
            f"`tf_config` must hold a 'cluster' and a 'task'. Received: tf_config={tf_config}"
        )
    cluster = tf_config.get("cluster", {})
    task = tf_config["task"]
    task_type = task.get("type")
    task_index = int(task.get("index", 0))
    num_workers = len(cluster.get("worker", [])) + len(cluster.get("chief", []))
    has_chief = bool(cluster.get("chief"))
    is_chief = task_type == "chief" or (not has_chief and task_type == "worker" and task_index == 0)
    return {
        "task_type": task_type,
        "task_index": task_index,
        "num_workers": max(num_workers, 1),
        "is_chief": is_chief,
    }


def worker_backup_dir(
    backup_dir: str | os.PathLike, tf_config: str | dict[str, Any] | None = None
) -> str:
    """A `keras.callbacks.BackupAndRestore` directory for this worker.

    Keras 3's `BackupAndRestore` writes `latest.weights.h5` from every worker;
    under `MultiWorkerMirroredStrategy` with one shared `backup_dir`, the
    workers collide on the HDF5 file lock (`BlockingIOError: Unable to
    synchronously create file (unable to lock file)`). Give each worker its own
    sub-directory instead: every worker then saves and restores its own copy
    (the weights are the same on all workers), on a shared file system or on
    each machine's local disk.

    Args:
        backup_dir: str, the job's backup directory.
        tf_config: str or dict, the cluster spec; `None` reads `TF_CONFIG`.
            Defaults to `None`.

    Returns:
        str: `backup_dir` itself without a multi-worker cluster, else
        `<backup_dir>/<task_type>-<task_index>` (e.g. `.../worker-1`).

    Raises:
        TypeError: if `backup_dir` is not a str or path.
        ValueError: if `tf_config` is not valid.

    Example:

    >>> from keras_isomax.distribute import worker_backup_dir
    >>> worker_backup_dir("/tmp/backup", tf_config={
    ...     "cluster": {"worker": ["host1:2222", "host2:2222"]},
    ...     "task": {"type": "worker", "index": 1}})
    '/tmp/backup/worker-1'
    """
    if not isinstance(backup_dir, (str, os.PathLike)):
        raise TypeError(f"`backup_dir` must be a path. Received: backup_dir={backup_dir!r}")
    info = task_info(tf_config)
    backup_dir = os.fspath(backup_dir)
    if info["num_workers"] <= 1 or info["task_type"] is None:
        return backup_dir
    return os.path.join(backup_dir, f"{info['task_type']}-{info['task_index']}")


# ---------------------------------------------------------------------------
# Fitting detectors under a strategy
# ---------------------------------------------------------------------------


class _Collectives:
    """All-reduce and all-gather of host arrays across the replicas of a strategy.

    Each worker passes one array per local replica (in the order of
    `strategy.experimental_local_results`); every worker gets the same result.
    """

    def __init__(self, strategy: Any) -> None:
        self.strategy = strategy
        ids: list[int] = []

        def record(ctx: Any) -> Any:
            ids.append(int(ctx.replica_id_in_sync_group))
            return tf.constant(0.0)

        strategy.experimental_distribute_values_from_function(record)
        self.local_ids = ids  # Global replica ids of this worker's replicas.
        self.num_replicas = int(strategy.num_replicas_in_sync)

    def _per_replica(self, arrays: Sequence[np.ndarray]) -> Any:
        values = {rid: a for rid, a in zip(self.local_ids, arrays, strict=True)}
        return self.strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.constant(values[int(ctx.replica_id_in_sync_group)])
        )

    def sum(self, arrays: Sequence[Any]) -> np.ndarray:
        """The element-wise sum over all replicas of all workers (float64)."""
        arrays = [np.asarray(a, np.float64) for a in arrays]
        total = self.strategy.reduce(
            tf.distribute.ReduceOp.SUM, self._per_replica(arrays), axis=None
        )
        return np.asarray(total.numpy(), np.float64)

    def gather(self, arrays: Sequence[Any]) -> np.ndarray:
        """The replicas' arrays concatenated along axis 0, in replica order."""
        arrays = [np.asarray(a) for a in arrays]
        lengths = np.zeros(self.num_replicas)
        for rid, a in zip(self.local_ids, arrays, strict=True):
            lengths[rid] = len(a)
        lengths = self.sum([lengths] + [np.zeros(self.num_replicas)] * (len(arrays) - 1))
        lengths = np.rint(lengths).astype(np.int64)
        rows = int(lengths.max())
        if rows == 0:
            return np.concatenate(arrays)
        padded = [
            np.concatenate([a, np.zeros((rows - len(a), *a.shape[1:]), a.dtype)]) for a in arrays
        ]
        gathered = self.strategy.gather(self._per_replica(padded), axis=0).numpy()
        pieces = [gathered[r * rows : r * rows + lengths[r]] for r in range(self.num_replicas)]
        return np.concatenate(pieces)


def _strategy_dataset(data: Any, batch_size: int, with_labels: bool) -> Any:
    """A batched `tf.data.Dataset` of `(x, y)` or `x` from arrays or a dataset."""
    if isinstance(data, tf.data.Dataset):
        return data
    from keras_isomax import _data

    if not _data.is_in_memory(data):
        raise ValueError(
            "Under a tf.distribute strategy, `data` must be arrays or a batched "
            f"`tf.data.Dataset`. Received: data of type {type(data).__name__}"
        )
    x, y = _data.split_element(data, "data")
    _data.check_rows(x, y, "data")
    elements = x if y is None or not with_labels else (x, y)
    return tf.data.Dataset.from_tensor_slices(elements).batch(batch_size)


def fit_detector(
    detector: Detector,
    runner: ModelRunner,
    data: Any,
    strategy: Any,
    context: FitContext,
    *,
    verbose: int | str = "auto",
) -> None:
    """Fits `detector` with every replica of `strategy` running the feature pass.

    Called by `Detector.fit` inside `strategy.scope()` (or with `strategy=`):
    each replica computes the features of its share of every global batch; the
    host keeps one accumulator per local replica (the float64 statistics of a
    one-device fit); the accumulators are then merged across all replicas of all
    workers with the strategy's collectives (`reduce(SUM)` of counts, sums,
    second moments; `gather` of the KNN bank and of the sampled rows), and every
    worker sets the same fitted state. A failure on one worker (say, non-finite
    features) is agreed on through one all-reduce before merging, so every
    worker raises instead of waiting.

    Args:
        detector: The detector (`keras_isomax.detectors.Detector`).
        runner: Its model runner.
        data: Arrays or a batched `tf.data.Dataset` (global batch size).
        strategy: A `tf.distribute` strategy.
        context: The fit context.
        verbose: `"auto"`, 0, 1 or 2. Defaults to `"auto"`.
    """
    from keras_isomax import _data, _runner, _serving

    if not isinstance(strategy, tf.distribute.Strategy):
        raise TypeError(
            "`strategy` must be a `tf.distribute.Strategy`. "
            f"Received: strategy={type(strategy).__name__}"
        )
    comm = _Collectives(strategy)
    name = type(detector).__name__
    label_classes = detector._label_classes(runner.num_classes)
    dataset = _strategy_dataset(data, detector.batch_size, detector.needs_labels)
    with strategy.scope():
        accs = [detector._accumulator(context) for _ in comm.local_ids]
        distributed = strategy.experimental_distribute_dataset(dataset)

        # One traced feature pass per runner and strategy (refits do not retrace).
        cache = runner.__dict__.setdefault("_strategy_features", {})
        features = cache.get(strategy)
        if features is None:

            @tf.function
            def features(x: Any) -> Any:
                def replica(x: Any) -> tuple[Any, Any]:
                    feats, _ = runner.symbolic(x)
                    flags = None
                    for leaf in tf.nest.flatten(x):
                        rows = _serving.nonfinite_rows(leaf)
                        flags = rows if flags is None else tf.logical_or(flags, rows)
                    return feats, flags

                return strategy.run(replica, args=(x,))

            cache[strategy] = features

        failure: Exception | None = None
        progress = _runner.Progress(f"{name}.fit", None, verbose)
        with progress:
            for element in distributed:
                x, y = _data.split_element(element, "data")
                if failure is not None:
                    continue  # Keep iterating with the other workers.
                try:
                    feats, flags = features(x)
                    locals_y = (
                        strategy.experimental_local_results(y)
                        if y is not None
                        else [None] * len(accs)
                    )
                    for acc, f, nonfinite, labels in zip(
                        accs,
                        strategy.experimental_local_results(feats),
                        strategy.experimental_local_results(flags),
                        locals_y,
                        strict=True,
                    ):
                        f = np.asarray(f.numpy(), np.float32).reshape(len(f), -1)
                        bad = np.asarray(nonfinite.numpy(), bool)
                        if bad.any():
                            f = np.where(bad[:, None], np.float32(np.nan), f)
                        ids = None
                        if labels is not None and detector.needs_labels:
                            ids = _data.class_ids(labels.numpy(), "data", label_classes)
                        detector._check_batch(f, ids, "data")
                        if len(f):
                            acc.update(f, ids)
                        progress.add(len(f))
                except Exception as error:  # noqa: BLE001  (re-raised after agreeing)
                    failure = error
    failed = comm.sum(
        [np.array([1.0 if failure is not None and i == 0 else 0.0]) for i in range(len(accs))]
    )
    if failure is not None:
        raise failure
    if failed[0] > 0:
        raise RuntimeError(
            f"{name}.fit failed on another worker (see its error); no state was set. "
            f"Received: strategy={type(strategy).__name__}"
        )
    merged = type(accs[0]).merge(accs, comm, context)
    detector._finish(merged, context)

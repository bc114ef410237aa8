"""Detectors fitted under tf.distribute (and JAX's DataParallel) equal one-device fits.

`MirroredStrategy` needs logical CPU devices configured before TensorFlow starts and
`MultiWorkerMirroredStrategy` one process per worker, so those fits run
`tests/_detectors_distributed_worker.py` in subprocesses (marked `slow`). Every
fitted variable is compared with a one-device fit of the same model on the same
data (relative difference <= 1e-5; KNN banks as sets of rows), and with float64
references computed here from the features the worker wrote.
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_isomax import IsoMaxPlusLayer, detectors

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "_detectors_distributed_worker.py")
ROOT = os.path.dirname(HERE)
TOL = 1e-5
JOB_TIMEOUT = 400


def _free_ports(n):
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("localhost", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _run(out, mode, *args, workers=1):
    """Runs the worker (one process, or `workers` processes with TF_CONFIG); waits."""
    os.makedirs(out, exist_ok=True)
    ports = _free_ports(workers) if mode == "multiworker" else []
    procs = []
    try:
        for task in range(workers):
            env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND="tensorflow")
            env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
            env.pop("TF_CONFIG", None)
            if mode == "multiworker":
                env["TF_CONFIG"] = json.dumps(
                    {
                        "cluster": {"worker": [f"localhost:{p}" for p in ports]},
                        "task": {"type": "worker", "index": task},
                    }
                )
            log = open(os.path.join(out, f"log_{mode}_{task}.txt"), "w")
            cmd = [sys.executable, WORKER, "--mode", mode, "--out", str(out), *args]
            procs.append(
                subprocess.Popen(
                    cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
            )
            log.close()
        deadline = time.monotonic() + JOB_TIMEOUT
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.2)
        if any(p.returncode != 0 for p in procs):
            logs = ""
            for task in range(workers):
                with open(os.path.join(out, f"log_{mode}_{task}.txt")) as f:
                    logs += f"--- worker {task} ---\n{f.read()[-3000:]}\n"
            pytest.fail(f"A {mode} worker failed or timed out.\n{logs}")
    finally:
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=30)
    results = []
    for task in range(workers):
        with open(os.path.join(out, f"errors_{mode}_{task}.json")) as f:
            errors = json.load(f)
        results.append((dict(np.load(os.path.join(out, f"fit_{mode}_{task}.npz"))), errors))
    return results


@pytest.fixture(scope="module")
def single_fit(tmp_path_factory):
    arrays, errors = _run(tmp_path_factory.mktemp("single"), "single")[0]
    assert errors == {}
    return arrays


def _rows(bank):
    """Rows of a bank as a sorted set (exact float32 values)."""
    bank = np.asarray(bank)
    return bank[np.lexsort(bank.T[::-1])]


def _bank(arrays, name):
    keys = sorted(
        (k for k in arrays if k.startswith(f"{name}/bank_")), key=lambda k: int(k.split("_")[-1])
    )
    return np.concatenate([arrays[k] for k in keys])


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _check_equal_to_single(run, single, label):
    """Every fitted state of `run` equals the one-device fit; returns the max rel diff."""
    for key in single:
        if key.startswith("model/"):
            np.testing.assert_array_equal(run[key], single[key], err_msg=key)
    worst = {}
    for name in ("mahalanobis", "class_means", "vim"):
        for key in (k for k in single if k.startswith(f"{name}/") and "threshold" not in k):
            worst[key] = _rel(run[key], single[key])
    # The KNN bank: the same rows (as a set), each exactly as on one device.
    np.testing.assert_array_equal(_rows(_bank(run, "knn")), _rows(_bank(single, "knn")))
    # ViM with all rows for alpha is exact; with a 100-row sample, alpha comes from
    # another uniform sample of the same rows (docs/distributed.md): close, not equal.
    sample_alpha = float(run["vim_sample/alpha"])
    assert abs(sample_alpha - float(single["vim/alpha"])) < 0.1 * float(single["vim/alpha"])
    for key in ("kernel", "bias", "origin", "null_space"):
        worst[f"vim_sample/{key}"] = _rel(run[f"vim_sample/{key}"], single[f"vim_sample/{key}"])
    # A bank subset: 120 distinct rows of the full bank.
    subset = _rows(_bank(run, "knn_subset"))
    full = _rows(_bank(single, "knn"))
    assert len(subset) == 120 and len(np.unique(subset, axis=0)) == 120
    assert all((full == row).all(axis=1).any() for row in subset)
    print(f"\n[{label}] max relative difference to one device: {max(worst.values()):.2e}")
    bad = {k: v for k, v in worst.items() if not v <= TOL}
    assert not bad, bad
    return max(worst.values())


def _check_against_float64(arrays):
    """The one-device fit itself against float64 NumPy (independent of the code)."""
    z = arrays["features"].astype(np.float64)
    y = arrays["labels"]
    zn = z / np.linalg.norm(z, axis=1, keepdims=True)
    np.testing.assert_allclose(_rows(_bank(arrays, "knn")), _rows(zn), rtol=0, atol=1e-6)
    means = np.stack([zn[y == c].mean(0) for c in range(3)])
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    np.testing.assert_allclose(arrays["class_means/means"], means, rtol=0, atol=1e-6)
    mu = np.stack([z[y == c].mean(0) for c in range(3)])
    scatter = sum((z[y == c] - mu[c]).T @ (z[y == c] - mu[c]) for c in range(3))
    precision = np.linalg.inv((scatter + 1e-6 * np.eye(z.shape[1])) / len(z))
    w = arrays["mahalanobis/whitening"].astype(np.float64)
    np.testing.assert_allclose(w @ w.T, precision, rtol=1e-4, atol=1e-4 * np.abs(precision).max())


@pytest.mark.slow
def test_mirrored_fit_equals_one_device(single_fit, tmp_path):
    _check_against_float64(single_fit)
    ((run, errors),) = _run(tmp_path, "mirrored", "--devices", "2")
    assert errors == {}
    _check_equal_to_single(run, single_fit, "MirroredStrategy, 2 logical CPUs")


@pytest.mark.slow
def test_multi_worker_fit_equals_one_device(single_fit, tmp_path):
    runs = _run(tmp_path, "multiworker", workers=2)
    for task, (run, errors) in enumerate(runs):
        assert errors == {}, errors
        _check_equal_to_single(run, single_fit, f"MultiWorkerMirroredStrategy, worker {task}")
    # Every worker holds the same state, the KNN bank in the same order.
    for key in runs[0][0]:
        np.testing.assert_array_equal(runs[0][0][key], runs[1][0][key], err_msg=key)


@pytest.mark.slow
def test_multi_worker_failure_raises_on_every_worker(tmp_path):
    runs = _run(tmp_path, "multiworker", "--bad", "nan", workers=2)
    messages = [errors for _, errors in runs]
    for name in ("knn", "mahalanobis", "class_means", "vim"):
        got = sorted(m[name] for m in messages)
        assert any("non-finite features" in m for m in got), got
        assert all("non-finite features" in m or "failed on another worker" in m for m in got)


# ------------------------------------------------------- one process, no subprocess


def _model():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(10, activation="tanh", name="features"),
            IsoMaxPlusLayer(3),
        ]
    )


@pytest.mark.tensorflow_only  # A tf.distribute strategy (JAX's DataParallel has its own test).
def test_one_device_strategy_goes_through_the_collectives():
    """`strategy=` with one replica runs the distributed path (per-replica accumulators,
    merge through `strategy.reduce`/`gather`) and equals the plain fit."""
    model = _model()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(90, 6)).astype("float32")
    y = rng.integers(0, 3, 90)
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    for make in (
        lambda: detectors.Mahalanobis(),
        lambda: detectors.ClassMeans(),
        lambda: detectors.ViM(3),
        lambda: detectors.KNN(k=4, chunk_size=32),
    ):
        plain = make().fit(model, (x, y), verbose=0)
        dist = make().fit(model, (x, y), verbose=0, strategy=strategy)
        for a, b in zip(plain.weights, dist.weights, strict=True):
            np.testing.assert_allclose(
                b.numpy(), a.numpy(), rtol=TOL, atol=1e-7, equal_nan=True, err_msg=a.path
            )
    # A bank subset through the distributed reservoir: 50 distinct rows of the bank.
    full = detectors.KNN(k=4).fit(model, (x, y), verbose=0).bank.numpy()
    subset = detectors.KNN(k=4, max_bank=50).fit(model, (x, y), verbose=0, strategy=strategy)
    rows = subset.bank.numpy()
    assert rows.shape == (50, 10) and len(np.unique(rows, axis=0)) == 50
    assert all((full == row).all(axis=1).any() for row in rows)
    with pytest.raises(TypeError, match="Received: strategy=str"):
        detectors.KNN(k=2).fit(model, (x, y), strategy="mirrored")
    for make in (lambda: detectors.KNN(k=1), lambda: detectors.Mahalanobis()):
        with pytest.raises(ValueError, match="holds no examples"):
            make().fit(model, (x[:0], y[:0]), verbose=0, strategy=strategy)
    # The bank's own size as k, and a one-example bank, fit there too.
    assert detectors.KNN(k=90).fit(model, (x, y), verbose=0, strategy=strategy).is_fitted
    one = detectors.KNN(k=1).fit(model, (x[:1], y[:1]), verbose=0, strategy=strategy)
    np.testing.assert_allclose(one.score(x[:1], verbose=0), [0.0], atol=1e-3)


def test_jax_data_parallel_fit_equals_one_device(tmp_path):
    """On JAX, a DataParallel distribution shards the feature pass over 2 CPU devices."""
    script = textwrap.dedent(
        """
        import os, sys
        import numpy as np, jax, keras
        from keras_isomax import IsoMaxPlusLayer, detectors
        assert len(jax.devices()) == 2
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((6,)),
                                  keras.layers.Dense(10, activation="tanh"),
                                  IsoMaxPlusLayer(3)])
        rng = np.random.default_rng(0)
        x = rng.normal(size=(96, 6)).astype("float32"); y = rng.integers(0, 3, 96)
        plain = [detectors.Mahalanobis().fit(model, (x, y), verbose=0),
                 detectors.KNN(k=3).fit(model, (x, y), verbose=0)]
        keras.distribution.set_distribution(keras.distribution.DataParallel())
        dist = [detectors.Mahalanobis().fit(model, (x, y), verbose=0),
                detectors.KNN(k=3).fit(model, (x, y), verbose=0)]
        for a, b in zip(plain, dist):
            for u, v in zip(a.weights, b.weights):
                u, v = np.asarray(u.numpy()), np.asarray(v.numpy())
                assert np.allclose(u, v, rtol=1e-5, atol=1e-7, equal_nan=True), u.path
        try:
            detectors.KNN(k=3).fit(model, (x, y), verbose=0, strategy=object())
        except ValueError as e:
            assert "DataParallel" in str(e) and "Received: strategy=object" in str(e)
        else:
            raise AssertionError("strategy= on JAX must raise")
        print("OK")
        """
    )
    env = dict(
        os.environ,
        KERAS_BACKEND="jax",
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=ROOT,
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


class _OneWorkerCollectives:
    """The collectives' contract (`sum`, `gather`, `local_ids`) for replicas of one
    worker, in NumPy: what `strategy.reduce` / `strategy.gather` compute."""

    def __init__(self, replicas):
        self.local_ids = list(range(replicas))
        self.num_replicas = replicas

    def sum(self, arrays):
        return np.sum([np.asarray(a, np.float64) for a in arrays], axis=0)

    def gather(self, arrays):
        return np.concatenate([np.asarray(a) for a in arrays])


@pytest.mark.parametrize("normalize", [False, True])
def test_class_statistics_merged_across_replicas_equal_one_stream(normalize):
    """Three replicas: one saw classes 0-1 only, one all classes, one nothing. Merged,
    their counts, class sums and centred cross-products equal one stream's (float64
    reference about the merged shift)."""
    from keras_isomax.detectors.base import ClassStats, FitContext

    rng = np.random.default_rng(3)
    z = rng.normal(5.0, 2.0, size=(90, 6))
    y = rng.integers(0, 4, 90)
    first = y < 2
    parts = [(z[first][:20], y[first][:20]), (z[~first], y[~first]), (z[:0], y[:0])]
    stats = []
    for feats, labels in parts:
        s = ClassStats(None, normalize=normalize, second_moment=True)
        for start in range(0, len(feats), 8):
            s.update(feats[start : start + 8], labels[start : start + 8])
        stats.append(s)
    merged = ClassStats.merge(stats, _OneWorkerCollectives(3), FitContext(feature_dim=6))
    rows = np.concatenate([parts[0][0], parts[1][0]])
    labels = np.concatenate([parts[0][1], parts[1][1]])
    if normalize:
        rows = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    centred = rows - merged.shift
    assert merged.total == len(rows)
    np.testing.assert_array_equal(merged.counts, np.bincount(labels, minlength=4))
    sums = np.stack([centred[labels == c].sum(axis=0) for c in range(4)])
    np.testing.assert_allclose(merged.sums, sums, rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(merged.cross, centred.T @ centred, rtol=1e-10, atol=1e-8)

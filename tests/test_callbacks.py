"""`keras_isomax.callbacks.OODMonitor` on every Keras backend.

The values it logs are checked against a float64 NumPy forward pass and
independent metric formulas (sklearn's AUROC, TNR from sorted scores); the
event files are read back with TensorBoard's own reader. TensorFlow-only parts
(the `keras.callbacks.TensorBoard` callback, `MirroredStrategy`) skip
themselves on other backends.
"""

import json
import math
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from keras_isomax import IsoMaxPlusLayer, IsoMaxPlusLoss, detectors, evaluate_ood
from keras_isomax import testing as reference
from keras_isomax.callbacks import OODMonitor

BACKEND = keras.backend.backend()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPR = 0.9
N_VAL, N_OOD = 64, 50  # TPR * N_VAL = 57.6: no rounding question at the threshold.


def _data(rng):
    x = rng.normal(size=(300, 6)).astype("float32")
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype("int64") + (x[:, 2] > 0.7)
    ood = {
        "noise": rng.uniform(-3, 3, size=(N_OOD, 6)).astype("float32"),
        "shifted": (rng.normal(size=(N_OOD + 10, 6)) + 1.5).astype("float32"),
    }
    return (x[N_VAL:], y[N_VAL:]), (x[:N_VAL], y[:N_VAL]), ood


def _model(seed=0, learning_rate=0.01):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(12, activation="tanh", name="features"),
            IsoMaxPlusLayer(3, name="head"),
        ]
    )
    model.compile(keras.optimizers.SGD(learning_rate), IsoMaxPlusLoss())
    return model


def _reference_scores(model, x):
    """Minimum distance score in float64 NumPy: max_c -|s| ||n(tanh(xW+b)) - n(p_c)|| / T."""
    kernel, bias = (np.asarray(keras.ops.convert_to_numpy(w), np.float64) for w in
                    model.get_layer("features").weights)  # fmt: skip
    features = np.tanh(np.asarray(x, np.float64) @ kernel + bias)
    head = model.get_layer("head")
    prototypes, scale, temperature = (
        np.asarray(keras.ops.convert_to_numpy(w), np.float64)
        for w in (head.prototypes, head.distance_scale, head.temperature)
    )
    return reference.logits(features, prototypes, scale, temperature).max(axis=-1)


def _reference_metrics(in_scores, out_scores, tpr):
    """Threshold: the ceil(tpr * n)-th largest in-distribution score; TNR below it."""
    k = math.ceil(tpr * len(in_scores))
    threshold = np.sort(in_scores)[::-1][k - 1]
    labels = np.r_[np.ones(len(in_scores)), np.zeros(len(out_scores))]
    auroc = roc_auc_score(labels, np.r_[in_scores, out_scores])
    return auroc, float(np.mean(out_scores < threshold)), threshold


class _Seen(keras.callbacks.Callback):
    """Records, per epoch, the logs a later callback receives."""

    def __init__(self):
        super().__init__()
        self.logs = {}

    def on_epoch_end(self, epoch, logs=None):
        self.logs[epoch] = dict(logs or {})


def test_logs_match_the_float64_reference(rng):
    train, val, ood = _data(rng)
    model = _model()
    seen = _Seen()
    monitor = OODMonitor(val, ood, tpr=TPR)
    history = model.fit(*train, epochs=2, batch_size=32, callbacks=[monitor, seen], verbose=0)
    keys = {key for key in history.history if key.startswith("val_ood")}
    assert keys == {
        "val_ood_auroc",
        "val_ood_auroc_noise",
        "val_ood_auroc_shifted",
        "val_ood_tnr_noise",
        "val_ood_tnr_shifted",
        "val_ood_threshold",
    }
    assert all(keys <= set(seen.logs[epoch]) for epoch in (0, 1))  # Later callbacks see them.
    last = {key: history.history[key][-1] for key in keys}
    in_scores = _reference_scores(model, val[0])
    aurocs = []
    for name, x in ood.items():
        auroc, tnr, threshold = _reference_metrics(in_scores, _reference_scores(model, x), TPR)
        # float32 vs float64 scores may swap a near tie: allow one pair / one example.
        assert last[f"val_ood_auroc_{name}"] == pytest.approx(auroc, abs=1.0 / (N_VAL * len(x)))
        assert last[f"val_ood_tnr_{name}"] == pytest.approx(tnr, abs=1.0 / len(x))
        aurocs.append(last[f"val_ood_auroc_{name}"])
    assert last["val_ood_threshold"] == pytest.approx(threshold, rel=1e-5, abs=1e-6)
    assert last["val_ood_auroc"] == pytest.approx(np.mean(aurocs), abs=1e-12)
    # Not a degenerate case: distinct scores, overlapping sets.
    assert len(np.unique(in_scores)) == N_VAL
    assert all(0.05 < last[f"val_ood_auroc_{name}"] < 0.95 for name in ood)
    assert history.history["val_ood_auroc"][0] != history.history["val_ood_auroc"][1]
    assert monitor.last_logs == last


def test_early_stopping_stops_on_the_ood_auroc(rng):
    """With a zero learning rate the AUROC cannot improve: patience 1 stops after epoch 2."""
    train, val, ood = _data(rng)
    model = _model(learning_rate=0.0)
    monitor = OODMonitor(val, ood, tpr=TPR)
    stop = keras.callbacks.EarlyStopping(monitor="val_ood_auroc", mode="max", patience=1)
    history = model.fit(*train, epochs=8, callbacks=[monitor, stop], verbose=0)
    assert len(history.history["loss"]) == 2
    assert stop.stopped_epoch == 1
    assert history.history["val_ood_auroc"][0] == history.history["val_ood_auroc"][1]


def test_callback_order_matters(rng):
    """Keras passes one logs dict along the list: an earlier EarlyStopping sees no key."""
    train, val, ood = _data(rng)
    model = _model(learning_rate=0.0)
    stop = keras.callbacks.EarlyStopping(monitor="val_ood_auroc", mode="max", patience=1)
    with pytest.warns(UserWarning, match="val_ood_auroc"):
        history = model.fit(*train, epochs=3, callbacks=[stop, OODMonitor(val, ood)], verbose=0)
    assert len(history.history["loss"]) == 3  # Never stopped.
    assert len(history.history["val_ood_auroc"]) == 3  # History (appended by Keras) saw them.


def test_every_scores_first_every_nth_and_last_epoch(rng):
    train, val, ood = _data(rng)
    seen = _Seen()
    _model().fit(
        *train, epochs=6, callbacks=[OODMonitor(val, ood["noise"], every=4), seen], verbose=0
    )
    scored = [epoch for epoch, logs in seen.logs.items() if "val_ood_auroc_ood" in logs]
    assert scored == [0, 4, 5]
    # A resumed fit: its first epoch (1) and its last (6) are scored too.
    seen = _Seen()
    _model().fit(
        *train,
        epochs=7,
        initial_epoch=1,
        callbacks=[OODMonitor(val, ood["noise"], every=4), seen],
        verbose=0,
    )
    scored = [epoch for epoch, logs in seen.logs.items() if "val_ood_auroc_ood" in logs]
    assert scored == [1, 4, 6]


def test_log_dir_without_tensorboard_fails_at_once(monkeypatch, tmp_path):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "tensorboard" else find_spec(name, *args),
    )
    with pytest.raises(ImportError, match="pip install tensorboard"):
        OODMonitor(np.ones((4, 6), "float32"), np.ones((4, 6), "float32"), log_dir=tmp_path)


def _read_events(directory):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    accumulator = EventAccumulator(directory, size_guidance={"tensors": 0})
    accumulator.Reload()
    events = {}
    for tag in accumulator.Tags()["tensors"]:
        plugin = accumulator.SummaryMetadata(tag).plugin_data.plugin_name
        events[tag] = (
            plugin,
            {e.step: tensor_util.make_ndarray(e.tensor_proto) for e in accumulator.Tensors(tag)},
        )
    return events


def test_tensorboard_scalars_and_histograms(rng, tmp_path):
    pytest.importorskip("tensorboard")
    train, val, ood = _data(rng)
    model = _model()
    knn = detectors.KNN(k=3, name="knn")
    monitor = OODMonitor(
        val, ood, score=["minimum_distance", knn], log_dir=tmp_path, fit_data=train
    )
    history = model.fit(*train, epochs=2, callbacks=[monitor], verbose=0)
    assert os.listdir(tmp_path) == ["ood"]
    events = _read_events(str(tmp_path / "ood"))
    for key, values in history.history.items():
        if key.startswith("val_ood"):
            plugin, steps = events[key]
            assert plugin == "scalars"
            assert sorted(steps) == [0, 1]
            np.testing.assert_allclose([float(steps[s]) for s in (0, 1)], values, rtol=1e-6)
    assert {"val_ood_knn_auroc", "val_ood_knn_tnr_noise"} <= set(events)
    sizes = {"in_distribution": N_VAL, **{name: len(x) for name, x in ood.items()}}
    for prefix in ("val_ood_scores", "val_ood_knn_scores"):
        for name, size in sizes.items():
            plugin, steps = events[f"{prefix}/{name}"]
            assert plugin == "histograms" and sorted(steps) == [0, 1]
            for buckets in steps.values():  # Rows: (left edge, right edge, count).
                assert buckets.shape == (30, 3)
                assert buckets[:, 2].sum() == size
    # The in-distribution histogram spans the reference scores of the last epoch.
    buckets = events["val_ood_scores/in_distribution"][1][1]
    scores = _reference_scores(model, val[0])
    assert buckets[0, 0] == pytest.approx(scores.min(), rel=1e-5)
    assert buckets[-1, 1] == pytest.approx(scores.max(), rel=1e-5)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="keras.callbacks.TensorBoard needs TF")
def test_log_dir_of_a_tensorboard_callback(rng, tmp_path):
    pytest.importorskip("tensorboard")
    train, val, ood = _data(rng)
    board = keras.callbacks.TensorBoard(str(tmp_path))
    monitor = OODMonitor(val, ood, log_dir=board)
    model = _model()
    model.fit(*train, validation_data=val, epochs=1, callbacks=[monitor, board], verbose=0)
    assert sorted(os.listdir(tmp_path)) == ["ood", "train", "validation"]
    assert "val_ood_scores/noise" in _read_events(str(tmp_path / "ood"))
    # The TensorBoard callback, after the monitor, writes the keys too (as val_ metrics).
    assert "epoch_ood_auroc_noise" in _read_events(str(tmp_path / "validation"))


def test_refit_every(rng):
    """Refitted detectors score like one fitted on the final model; fitted-once ones do not."""
    train, val, ood = _data(rng)
    results = {}
    for refit_every in (1, 100):
        model = _model(learning_rate=0.5)
        knn = detectors.KNN(k=3, name="knn")
        monitor = OODMonitor(val, ood, score=knn, fit_data=train, refit_every=refit_every)
        history = model.fit(*train, epochs=3, callbacks=[monitor], verbose=0)
        fresh = detectors.KNN(k=3).fit(model, train)
        expected = evaluate_ood(model, val, ood, score=fresh)
        results[refit_every] = (
            history.history["val_ood_auroc_shifted"][-1],
            [row["auroc"] for row in expected if row["ood"] == "shifted"][0],
        )
    assert results[1][0] == pytest.approx(results[1][1], abs=1e-12)
    assert results[100][0] != pytest.approx(results[100][1], abs=1e-3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"validation_data": np.zeros((0, 6), "float32")}, r"`validation_data` holds no examples"),
        (
            {"validation_data": (np.ones((5, 6), "float32"), np.zeros(4, "int64"))},
            r"`validation_data` must have as many labels.*lengths \[5, 4\]",
        ),
        ({"validation_data": None}, r"`validation_data` must hold data"),
        ({"ood_data": {}}, r"`ood_data` must name at least one"),
        ({"ood_data": {"a b": np.ones((3, 6), "float32")}}, r"ood_data key 'a b'"),
        ({"ood_data": {"n": np.ones((0, 6), "float32")}}, r"`ood_data\['n'\]` holds no examples"),
        ({"every": 0}, r"`every` must be an integer >= 1. Received: every=0"),
        ({"tpr": 1.5}, r"Received: tpr=1.5"),
        ({"score": "nope"}, r"Unknown `score`.*'nope'"),
        ({"score": detectors.KNN(k=3)}, r"not fitted.*Received: fit_data=None"),
        (
            {"score": detectors.Mahalanobis(), "fit_data": np.ones((5, 6), "float32")},
            r"`fit_data` must hold labels",
        ),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    arguments = {
        "validation_data": np.ones((4, 6), "float32"),
        "ood_data": {"noise": np.ones((4, 6), "float32")},
        **kwargs,
    }
    with pytest.raises(ValueError, match=match):
        OODMonitor(**arguments)


@pytest.mark.parametrize("which", ["validation_data", "ood_data['noise']"])
def test_data_of_the_wrong_shape_fails_when_training_starts(rng, which):
    train, val, ood = _data(rng)
    wrong = rng.normal(size=(20, 5)).astype("float32")
    if which == "validation_data":
        monitor = OODMonitor(wrong, ood)
    else:
        monitor = OODMonitor(val, {"noise": wrong})
    model = _model()
    expected = re.escape(f"`{which}` holds examples of shape (5,)") + r".*inputs of shape \(6,\)"
    with pytest.raises(ValueError, match=expected):
        model.fit(*train, epochs=1, callbacks=[monitor], verbose=0)
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 0  # Before any step.


_MIRRORED = """
import json, os, sys
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
import numpy as np
from keras_isomax import IsoMaxPlusLayer, IsoMaxPlusLoss, detectors, evaluate_ood
from keras_isomax.callbacks import OODMonitor

rng = np.random.default_rng(0)
x = rng.normal(size=(320, 6)).astype("float32")
y = (x[:, 0] > 0).astype("int64")
val, train = (x[:64], y[:64]), (x[64:], y[64:])
ood = {"noise": rng.uniform(-3, 3, size=(48, 6)).astype("float32")}
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu"),
                              IsoMaxPlusLayer(2)])
    model.compile(keras.optimizers.SGD(0.05), IsoMaxPlusLoss())
knn = detectors.KNN(k=3, name="knn")
monitor = OODMonitor(val, ood, score=["minimum_distance", knn], fit_data=train,
                     log_dir=sys.argv[1])
stop = keras.callbacks.EarlyStopping(monitor="val_ood_auroc", mode="max", patience=5)
history = model.fit(*train, epochs=2, batch_size=32, callbacks=[monitor, stop], verbose=0)
fresh = detectors.KNN(k=3, name="knn").fit(model, train)
expected = evaluate_ood(model, val, ood, score=["minimum_distance", fresh])
print(json.dumps({
    "replicas": strategy.num_replicas_in_sync,
    "history": {k: v for k, v in history.history.items() if k.startswith("val_ood")},
    "expected": {row["score"]: row["auroc"] for row in expected},
    "files": os.listdir(os.path.join(sys.argv[1], "ood")),
}))
"""


@pytest.mark.slow
@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.distribute is TensorFlow's")
def test_mirrored_strategy_on_two_logical_cpus(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(
        [sys.executable, "-c", _MIRRORED, str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["replicas"] == 2
    history = out["history"]
    assert len(history["val_ood_auroc"]) == 2 and len(history["val_ood_knn_auroc"]) == 2
    assert history["val_ood_auroc"][-1] == pytest.approx(out["expected"]["minimum_distance"])
    assert history["val_ood_knn_auroc"][-1] == pytest.approx(out["expected"]["knn"])
    assert len(out["files"]) == 1 and out["files"][0].startswith("events.out.tfevents.")


_NO_TENSORFLOW = """
import sys
import keras
import numpy as np
from keras_isomax import IsoMaxPlusLayer, IsoMaxPlusLoss
from keras_isomax.callbacks import OODMonitor

assert keras.backend.backend() == "jax"
rng = np.random.default_rng(0)
x = rng.normal(size=(128, 4)).astype("float32")
y = (x[:, 0] > 0).astype("int64")
model = keras.Sequential([keras.Input((4,)), IsoMaxPlusLayer(2)])
model.compile("adam", IsoMaxPlusLoss())
monitor = OODMonitor((x[:32], y[:32]), x[32:64] + 2.0, log_dir=sys.argv[1])
history = model.fit(x[64:], y[64:], epochs=1, callbacks=[monitor], verbose=0)
assert "val_ood_auroc" in history.history, history.history
print("tensorflow imported:", "tensorflow" in sys.modules)
"""


def test_event_files_on_jax_without_importing_tensorflow(tmp_path):
    pytest.importorskip("jax")
    pytest.importorskip("tensorboard")
    env = {**os.environ, "PYTHONPATH": ROOT, "KERAS_BACKEND": "jax"}
    result = subprocess.run(
        [sys.executable, "-c", _NO_TENSORFLOW, str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tensorflow imported: False" in result.stdout
    assert "val_ood_scores/ood" in _read_events(str(tmp_path / "ood"))

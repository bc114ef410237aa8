"""Behaviours that no other test pinned (issue 23), each checked against float64 NumPy.

Each test here was seen to fail on a one-line bug in the code it guards (the
mutants are listed in docs/contributing.md). Public API only.
"""

import builtins
import errno
import math
import os

import keras
import numpy as np
import pytest

from keras_isomax import (
    IsoMaxPlusLayer,
    calibrate_threshold,
    detectors,
    export_litert,
    export_onnx,
    export_saved_model,
    testing,
)


def _float(variable):
    return float(keras.ops.convert_to_numpy(variable))


def _isomax_model(rng, features=6, classes=5, backbone=True, **layer_kwargs):
    keras.utils.set_random_seed(int(rng.integers(2**31)))
    layers = [keras.Input((features,))]
    if backbone:
        layers.append(keras.layers.Dense(8, activation="tanh", name="features"))
    layers.append(IsoMaxPlusLayer(classes, name="head", **layer_kwargs))
    return keras.Sequential(layers)


def _reference_logits(model, x):
    """float64 logits of an IsoMax+ model from its (float32) features."""
    head = model.get_layer("head")
    feats = keras.Model(model.inputs, head.input).predict(x, verbose=0).astype(np.float64)
    return testing.logits(
        feats,
        keras.ops.convert_to_numpy(head.prototypes),
        scale=_float(head.distance_scale),
        temperature=_float(head.temperature),
    )


# ------------------------------------------------ 1. ViM alpha from a sample


def _vim_reference(feats, kernel, bias, dim):
    """ViM's all-rows alpha (Wang et al. 2022) and the null space, float64."""
    origin = -np.linalg.pinv(kernel.T) @ bias
    centered = feats - origin
    _, vectors = np.linalg.eigh(centered.T @ centered / len(feats))
    null_space = vectors[:, : feats.shape[1] - dim]  # Smallest eigenvalues first.
    residual = np.linalg.norm(centered @ null_space, axis=1)
    max_logit = (feats @ kernel + bias).max(axis=1)
    return max_logit.mean() / residual.mean(), residual


@pytest.mark.parametrize("head", ["dense", "isomax"])
def test_vim_alpha_from_a_sample_is_close_to_the_all_rows_value(rng, head):
    keras.utils.set_random_seed(int(rng.integers(2**31)))
    inputs = keras.Input((10,))
    feats = keras.layers.Dense(24, name="features")(inputs)
    if head == "dense":
        outputs = keras.layers.Dense(4, activation="softmax", name="head")(feats)
    else:
        outputs = IsoMaxPlusLayer(4, name="head")(feats)
    model = keras.Model(inputs, outputs)
    rows, sample, dim = 600, 100, 6
    x = rng.normal(size=(rows, 10)).astype("float32")
    y = rng.integers(0, 4, size=rows)
    z = keras.Model(inputs, feats).predict(x, verbose=0).astype(np.float64)
    layer = model.get_layer("head")
    if head == "dense":
        kernel = keras.ops.convert_to_numpy(layer.kernel).astype(np.float64)
        bias = keras.ops.convert_to_numpy(layer.bias).astype(np.float64)
    else:  # The linear twin of IsoMax+ on normalised features (docs/evaluation.md).
        z = testing.normalize(z)
        scale = abs(_float(layer.distance_scale)) / _float(layer.temperature)
        kernel = scale * testing.normalize(keras.ops.convert_to_numpy(layer.prototypes)).T
        bias = np.zeros(4)
    alpha, residual = _vim_reference(z, kernel, bias, dim)

    # All rows kept: exact.
    exact = detectors.ViM(dim, alpha_samples=rows, batch_size=64).fit(model, (x, y))
    np.testing.assert_allclose(_float(exact.alpha), alpha, rtol=1e-5)
    # 100 of 600 rows: the sample mean of the residual norm estimates the
    # all-rows mean; allow 6 standard errors of a sample without replacement.
    sampled = detectors.ViM(dim, alpha_samples=sample, batch_size=64).fit(model, (x, y))
    spread = residual.std() / residual.mean() * math.sqrt((1 / sample) * (1 - sample / rows))
    assert 0 < spread < 0.05
    np.testing.assert_allclose(_float(sampled.alpha), alpha, rtol=6 * spread)


# ------------------------------------ 2. a failed overwrite keeps the old file


class DiskFull(OSError):
    pass


@pytest.fixture
def disk_full_for(monkeypatch):
    """Makes every binary write to files named `name` stop half-way (ENOSPC).

    The exporters' writers (the LiteRT flatbuffer write, tf2onnx and
    `onnx.save`) open their file with the built-in `open(path, "wb")`; the
    replacement writes half of each buffer to disk, then raises, as a full
    disk does.
    """
    real_open = builtins.open
    hits = []

    def arm(name):
        def fake_open(file, mode="r", *args, **kwargs):
            handle = real_open(file, mode, *args, **kwargs)
            if "b" in mode and ("w" in mode or "+" in mode) and isinstance(file, str | os.PathLike):
                if os.path.basename(os.fspath(file)) == name:
                    hits.append(os.fspath(file))
                    return _HalfWriter(handle)
            return handle

        monkeypatch.setattr(builtins, "open", fake_open)
        return hits

    return arm


class _HalfWriter:
    def __init__(self, handle):
        self._handle = handle

    def write(self, data):
        data = memoryview(data).cast("B")
        self._handle.write(data[: max(1, len(data) // 2)])
        self._handle.flush()
        raise DiskFull(errno.ENOSPC, "No space left on device")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()

    def __getattr__(self, name):
        return getattr(self._handle, name)


def _chain(error):
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


# LiteRT and SavedModel exports convert TensorFlow graphs: they need the TensorFlow backend.
TF_ONLY = pytest.mark.tensorflow_only


@pytest.mark.parametrize("fmt", [pytest.param("litert", marks=TF_ONLY), "onnx"])
def test_failed_overwrite_keeps_the_existing_file_byte_identical(rng, tmp_path, fmt, disk_full_for):
    if fmt == "onnx":
        pytest.importorskip("tf2onnx")
    export, name = {"litert": (export_litert, "model.tflite"), "onnx": (export_onnx, "model.onnx")}[
        fmt
    ]
    old, new = _isomax_model(rng), _isomax_model(rng)
    folder = tmp_path / "models"
    path = str(folder / name)
    export(old, path, threshold=-0.5)
    before = (folder / name).read_bytes()
    assert len(before) > 100
    hits = disk_full_for(name)
    with pytest.raises(Exception) as caught:
        export(new, path, threshold=-0.5, overwrite=True)
    assert any(isinstance(error, DiskFull) for error in _chain(caught.value)), caught.value
    assert hits, "the export never wrote its file: the failure was not injected"
    assert sorted(os.listdir(folder)) == [name]  # No partial or staged file left.
    assert (folder / name).read_bytes() == before


# --------------------------- 3. an explicit threshold wins over the stored one


def _serve_saved_model(path, x):
    import tensorflow as tf

    loaded = tf.saved_model.load(path)
    outputs = loaded.signatures["score"](inputs=tf.constant(x))
    return {key: value.numpy() for key, value in outputs.items()}


def _serve_litert(path, x):
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter
    return Interpreter(model_path=path).get_signature_runner("score")(inputs=x)


def _serve_onnx(path, x):
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(None, {"inputs": x}), strict=True))


EXPORTERS = {
    "saved_model": (lambda m, p, t: export_saved_model(m, p, threshold=t), _serve_saved_model),
    "litert": (lambda m, p, t: export_litert(m, p + ".tflite", t), _serve_litert),
    "onnx": (lambda m, p, t: export_onnx(m, p + ".onnx", t), _serve_onnx),
}


@pytest.mark.parametrize(
    "fmt",
    # SavedModel and LiteRT exports need the TensorFlow backend; ONNX runs on every backend.
    [pytest.param(f, marks=TF_ONLY) if f != "onnx" else f for f in sorted(EXPORTERS)],
)
def test_explicit_threshold_wins_over_a_calibrated_layer(rng, tmp_path, fmt):
    if fmt == "onnx":
        pytest.importorskip("tf2onnx")
    model = _isomax_model(rng)
    x = rng.normal(size=(64, 6)).astype("float32")
    calibrated = calibrate_threshold(model, rng.normal(size=(200, 6)).astype("float32"), tpr=0.95)
    score = _reference_logits(model, x).max(axis=-1)
    # The explicit threshold: in the widest gap among the middle scores, far
    # from the calibrated one, so that both decisions are unambiguous.
    ordered = np.sort(score)
    k = 16 + int(np.argmax(np.diff(ordered[16:48])))
    explicit = float(np.float32(0.5 * (ordered[k] + ordered[k + 1])))
    assert ordered[k + 1] - ordered[k] > 1e-4 and abs(explicit - calibrated) > 1e-3
    export, serve = EXPORTERS[fmt]

    out = serve(export(model, str(tmp_path / "explicit"), explicit), x)
    np.testing.assert_array_equal(out["threshold"], np.full(64, explicit, "float32"))
    np.testing.assert_array_equal(out["is_ood"], score < explicit)
    np.testing.assert_allclose(out["score"], score, rtol=1e-5, atol=1e-5)
    # And without one, the calibrated value (so the two exports differ).
    out = serve(export(model, str(tmp_path / "stored"), None), x)
    np.testing.assert_array_equal(out["threshold"], np.full(64, calibrated, "float32"))
    np.testing.assert_array_equal(out["is_ood"], score < calibrated)
    assert (score < explicit).sum() != (score < calibrated).sum()


# ----------------------- 4. calibrate_threshold when tpr * N is not a whole number


@pytest.mark.parametrize(("n", "tpr"), [(30, 0.95), (7, 0.5), (41, 0.9), (13, 1 / 3), (100, 0.999)])
def test_calibrate_threshold_accepts_ceil_of_tpr_n(rng, n, tpr):
    assert abs(tpr * n - round(tpr * n)) > 1e-6  # Not a whole number.
    model = _isomax_model(rng)
    x = rng.normal(size=(n, 6)).astype("float32")
    score = np.sort(_reference_logits(model, x).max(axis=-1))[::-1]  # Highest first.
    accepted = math.ceil(tpr * n)
    if accepted < n:
        expected = 0.5 * (score[accepted - 1] + score[accepted])
        assert score[accepted - 1] - score[accepted] > 1e-4  # Unambiguous in float32.
    else:
        expected = score[-1]
    threshold = calibrate_threshold(model, x, tpr=tpr)
    np.testing.assert_allclose(threshold, expected, rtol=0, atol=2e-6)
    served = model.predict(x, verbose=0).max(axis=-1)
    assert int(np.sum(served >= threshold)) == accepted


# ------------------ 5. the inference cache after a change to one prototype row


@pytest.mark.parametrize("row", [0, 3])
def test_inference_cache_sees_a_change_to_one_prototype_row(rng, row):
    model = _isomax_model(rng)
    x = rng.normal(size=(32, 6)).astype("float32")
    head = model.get_layer("head")
    model.predict(x, verbose=0)  # Fills the cache.
    model(x, training=False)
    before = _reference_logits(model, x)
    prototypes = keras.ops.convert_to_numpy(head.prototypes).copy()
    prototypes[row] = rng.normal(size=prototypes.shape[1])  # One row; the others unchanged.
    head.prototypes.assign(prototypes)

    reference = _reference_logits(model, x)
    assert np.abs(reference[:, row] - before[:, row]).max() > 0.1  # Stale would show.
    uncached = keras.Sequential(
        [keras.Input((6,)), model.get_layer("features"), IsoMaxPlusLayer(5, inference_cache=False)]
    )
    uncached.layers[-1].set_weights(head.get_weights())
    for name, got in [
        ("predict", model.predict(x, verbose=0)),
        ("call, training=False", model(x, training=False)),
        ("call, training=True", model(x, training=True)),
        ("inference_cache=False", uncached.predict(x, verbose=0)),
    ]:
        got = keras.ops.convert_to_numpy(got)
        np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-5, err_msg=name)

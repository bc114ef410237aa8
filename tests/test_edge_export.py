"""LiteRT and ONNX exports, checked with the real runtimes against predict_ood."""

import os

import keras
import numpy as np
import pytest

from keras_isomax import IsoMaxPlusLayer, calibrate_threshold, predict_ood
from keras_isomax.edge import OUTPUT_NAMES, export_litert, export_onnx

BACKEND = keras.backend.backend()


def _model(rng, num_classes=7):
    keras.utils.set_random_seed(int(rng.integers(2**31)))
    return keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(6),
            IsoMaxPlusLayer(num_classes),
        ]
    )


def _calibrated(rng):
    model = _model(rng)
    x = rng.normal(size=(80, 5)).astype("float32")
    calibrate_threshold(model, x, tpr=0.8)
    return model, x


def _run_onnx(path, x):
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(None, {"inputs": x}), strict=True))


def _run_litert(path, x):
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter
    interpreter = Interpreter(model_path=path)
    assert list(interpreter.get_signature_list()) == ["score"]
    return interpreter.get_signature_runner("score")(inputs=x)


def _check_against_predict_ood(model, outputs, x, threshold):
    reference = predict_ood(model, x, threshold=threshold)
    assert set(outputs) == set(OUTPUT_NAMES)
    np.testing.assert_allclose(outputs["score"], reference["score"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(outputs["is_ood"], reference["is_ood"])
    np.testing.assert_array_equal(outputs["class_id"], reference["class"])
    np.testing.assert_array_equal(outputs["threshold"], np.full(len(x), threshold, "float32"))
    logits = keras.ops.convert_to_numpy(model(x)).astype("float64")
    softmax = np.exp(logits - logits.max(-1, keepdims=True))
    softmax /= softmax.sum(-1, keepdims=True)
    np.testing.assert_allclose(outputs["probabilities"], softmax, rtol=1e-5, atol=1e-6)


def _non_finite_batch(rng, x):
    x = x[:6].copy()
    x[1, 2] = np.nan
    x[3, 0] = np.inf
    x[4, 4] = -np.inf
    return x, np.array([False, True, False, True, True, False])


def _check_non_finite(model, run, path, rng, x):
    bad_x, bad = _non_finite_batch(rng, x)
    outputs = run(path, bad_x)
    clean = run(path, x[:6])
    assert np.isnan(outputs["score"][bad]).all()
    assert outputs["is_ood"][bad].all()
    np.testing.assert_array_equal(outputs["class_id"][bad], -1)
    assert np.isnan(outputs["probabilities"][bad]).all()
    # The finite examples of the same batch are untouched.
    np.testing.assert_allclose(outputs["score"][~bad], clean["score"][~bad], rtol=1e-6)
    np.testing.assert_array_equal(outputs["class_id"][~bad], clean["class_id"][~bad])


@pytest.mark.skipif(BACKEND != "tensorflow", reason="LiteRT export needs the TF backend")
@pytest.mark.parametrize("batch", [1, 37])
def test_litert_matches_predict_ood(rng, tmp_path, batch):
    model, x = _calibrated(rng)
    path = export_litert(model, tmp_path / "model.tflite")
    threshold = float(keras.ops.convert_to_numpy(model.layers[-1].ood_threshold))
    x_test = np.concatenate([x, rng.normal(scale=3.0, size=(40, 5)).astype("float32")])[:batch]
    _check_against_predict_ood(model, _run_litert(path, x_test), x_test, threshold)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="LiteRT export needs the TF backend")
def test_litert_builtin_ops_only_and_non_finite(rng, tmp_path, capfd):
    model, x = _calibrated(rng)
    capfd.readouterr()
    path = export_litert(model, tmp_path / "model.tflite", threshold=-0.9)
    assert capfd.readouterr().out == ""  # Quiet: no endpoint listing on stdout.
    with open(path, "rb") as f:
        content = f.read()
    assert b"Flex" not in content  # No TensorFlow (Flex delegate) op inside.
    _check_non_finite(model, _run_litert, path, rng, x)


@pytest.mark.parametrize("batch", [1, 37])
def test_onnx_matches_predict_ood(rng, tmp_path, batch):
    model, x = _calibrated(rng)
    path = export_onnx(model, tmp_path / "model.onnx")
    threshold = float(keras.ops.convert_to_numpy(model.layers[-1].ood_threshold))
    x_test = np.concatenate([x, rng.normal(scale=3.0, size=(40, 5)).astype("float32")])[:batch]
    outputs = _run_onnx(path, x_test)
    _check_against_predict_ood(model, outputs, x_test, threshold)


def test_onnx_dynamic_batch_and_non_finite(rng, tmp_path):
    model, x = _calibrated(rng)
    path = export_onnx(model, tmp_path / "model.onnx", threshold=-0.9)
    import onnx

    graph = onnx.load(path).graph
    assert [output.name for output in graph.output] == list(OUTPUT_NAMES)
    assert not graph.input[0].type.tensor_type.shape.dim[0].HasField("dim_value")
    _check_non_finite(model, _run_onnx, path, rng, x)


def test_uncalibrated_model_needs_threshold(rng, tmp_path):
    model = _model(rng)
    exporters = [export_onnx] + ([export_litert] if BACKEND == "tensorflow" else [])
    for export in exporters:
        with pytest.raises(ValueError, match=r"calibrate_threshold.*threshold=None"):
            export(model, tmp_path / "m")
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="Received: threshold=nan"):
        export_onnx(model, tmp_path / "m", threshold=float("nan"))


def test_existing_file_is_kept(rng, tmp_path):
    """Both exporters refuse an existing file by default (overwrite=False)."""
    model = _model(rng)
    exporters = {"model.onnx": export_onnx}
    if BACKEND == "tensorflow":
        exporters["model.tflite"] = export_litert
    for name, export in exporters.items():
        target = tmp_path / name
        target.write_bytes(b"not mine")
        with pytest.raises(FileExistsError, match="overwrite=False"):
            export(model, target, threshold=-1.0)
        assert target.read_bytes() == b"not mine", name


def test_layers_after_the_isomax_layer_are_refused(tmp_path):
    inputs = keras.Input((4,))
    logits = IsoMaxPlusLayer(3, name="isomax")(inputs)
    model = keras.Model(inputs, keras.layers.Softmax(name="softmax")(logits))
    exporters = [export_onnx] + ([export_litert] if BACKEND == "tensorflow" else [])
    for export in exporters:
        with pytest.raises(ValueError, match="must be the logits.*'softmax'"):
            export(model, tmp_path / "m", threshold=-1.0)
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(BACKEND != "tensorflow", reason="backend-independent: checked once")
def test_a_file_that_appears_while_writing_is_kept(rng, tmp_path, monkeypatch):
    """With overwrite=False the staged file never replaces one that appeared meanwhile."""
    model, target = _model(rng), tmp_path / "model.onnx"
    real_export = keras.Model.export

    def export(self, filepath, *args, **kwargs):
        target.write_bytes(b"written meanwhile")
        return real_export(self, filepath, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "export", export)
    with pytest.raises(FileExistsError, match="overwrite=False"):
        export_onnx(model, target, threshold=-1.0)
    assert target.read_bytes() == b"written meanwhile"
    assert os.listdir(tmp_path) == ["model.onnx"]  # Nothing staged is left.


@pytest.mark.skipif(BACKEND == "tensorflow", reason="checks the error on other backends")
def test_litert_on_other_backends_says_what_to_do(rng, tmp_path):
    with pytest.raises(RuntimeError, match="export_onnx"):
        export_litert(_model(rng), tmp_path / "m.tflite", threshold=-1.0)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="a TF op without a LiteRT builtin")
def test_litert_unsupported_layer_is_a_clear_error(rng, tmp_path):
    import tensorflow as tf

    class Igamma(keras.layers.Layer):
        def call(self, x):
            return tf.math.igamma(tf.abs(x) + 1.0, tf.abs(x) + 1.0)

    model = keras.Sequential([keras.Input((5,)), Igamma(), IsoMaxPlusLayer(3)])
    with pytest.raises(ValueError, match="builtin operators"):
        export_litert(model, tmp_path / "m.tflite", threshold=-1.0)
    assert not (tmp_path / "m.tflite").exists()


def test_missing_runtime_is_a_clear_error(rng, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a)
    )
    with pytest.raises(ImportError, match=r"keras-isomax\[edge\]"):
        export_onnx(_model(rng), tmp_path / "m.onnx", threshold=-1.0)


class _SwallowNonFinite(keras.layers.Layer):
    """Replaces NaN/Inf by 0: a backbone that hides a broken input (any CPU)."""

    def call(self, x):
        return keras.ops.where(keras.ops.isfinite(x), x, keras.ops.zeros_like(x))


# Every detector on TensorFlow (both formats); one feature and one logit
# detector elsewhere (each ONNX export from JAX takes ~20 s here).
DETECTORS = {
    "mahalanobis": {},
    "energy": {},
    "knn": {"k": 5, "chunk_size": 64},  # A bank of 2 chunks + top-k merge.
    "vim": {"dim": 3},
}
EDGE_FORMATS = ["onnx"] + (["litert"] if BACKEND == "tensorflow" else [])


@pytest.mark.parametrize("fmt", EDGE_FORMATS)
@pytest.mark.parametrize("name", list(DETECTORS))
def test_detector_export_matches_score_and_predict_ood(rng, tmp_path, name, fmt):
    if BACKEND != "tensorflow" and name not in ("mahalanobis", "energy"):
        pytest.skip("the other detectors are exported on the TensorFlow run")
    from keras_isomax import detectors

    keras.utils.set_random_seed(int(rng.integers(2**31)))
    model = keras.Sequential(
        [
            keras.Input((5,)),
            _SwallowNonFinite(),
            keras.layers.Dense(16, activation="tanh"),
            keras.layers.Dense(6),
            IsoMaxPlusLayer(4),
        ]
    )
    x = rng.normal(size=(100, 5)).astype("float32")
    det = detectors.get(name, **DETECTORS[name]).fit(model, (x, np.arange(100) % 4))
    calibrate_threshold(model, x, tpr=0.8, detector=det)
    threshold = float(keras.ops.convert_to_numpy(det.threshold))
    if fmt == "onnx":
        path, run = export_onnx(model, tmp_path / "d.onnx", detector=det), _run_onnx
    else:
        path, run = export_litert(model, tmp_path / "d.tflite", detector=det), _run_litert
    x_test = np.concatenate([x[:20], rng.normal(scale=3.0, size=(17, 5)).astype("float32")])
    for batch in (1, len(x_test)):
        out = run(path, x_test[:batch])
        reference = predict_ood(model, x_test[:batch], detector=det)
        scale = max(1.0, float(np.abs(reference["score"]).max()))
        np.testing.assert_allclose(out["score"], det.score(x_test[:batch]), atol=2e-6 * scale)
        np.testing.assert_allclose(out["score"], reference["score"], atol=2e-6 * scale)
        np.testing.assert_array_equal(out["is_ood"], reference["is_ood"])
        np.testing.assert_array_equal(out["class_id"], reference["class"])
        np.testing.assert_array_equal(out["threshold"], np.full(batch, threshold, "float32"))
    assert 0 < out["is_ood"].sum() < len(x_test)  # Both decisions occur.
    # NaN/Inf inputs: OOD although the backbone makes them finite.
    bad_x, bad = _non_finite_batch(rng, x_test)
    out = run(path, bad_x)
    reference = predict_ood(model, bad_x, detector=det)
    assert np.isnan(out["score"][bad]).all() and np.isnan(reference["score"][bad]).all()
    assert out["is_ood"][bad].all()
    np.testing.assert_array_equal(out["class_id"][bad], -1)
    np.testing.assert_array_equal(out["class_id"], reference["class"])


def test_detector_export_errors(rng, tmp_path):
    from keras_isomax import detectors

    model = _model(rng)
    with pytest.raises(TypeError, match="Received: detector=str"):
        export_onnx(model, tmp_path / "m.onnx", detector="knn")
    det = detectors.Mahalanobis()
    with pytest.raises(ValueError, match="not fitted"):
        export_onnx(model, tmp_path / "m.onnx", detector=det)
    det = detectors.Energy().fit(model)
    with pytest.raises(ValueError, match=r"calibrate_threshold.*detector=det.*threshold=None"):
        export_onnx(model, tmp_path / "m.onnx", detector=det)
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(BACKEND != "tensorflow", reason="the CLI runs on TensorFlow")
@pytest.mark.parametrize("fmt", ["litert", "onnx"])
def test_cli_exports_a_detector(rng, tmp_path, capsys, fmt):
    from keras_isomax.app import data
    from keras_isomax_cli import main

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Flatten(),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    model.save(tmp_path / "softmax.keras")
    target = tmp_path / f"model.{fmt}"
    args = ["export", str(tmp_path / "softmax.keras"), str(target), "--format", fmt]
    args += ["--detector", "knn:5", "--fit-on", "fashion_mnist", "--fit-n", "300"]
    assert main([*args, "--calibrate-n", "200"]) == 0, capsys.readouterr().err
    assert "Calibrated threshold" in capsys.readouterr().out
    x, _ = data.load_dataset("fashion_mnist", "test", image_shape=(28, 28, 1), n=200)
    out = (_run_onnx if fmt == "onnx" else _run_litert)(str(target), x)
    # Calibrated at TPR 0.95 on these 200 test images (same seeded subset): 95% accepted.
    assert np.mean(~out["is_ood"]) == pytest.approx(0.95, abs=0.01)


class _Pathological(keras.layers.Layer):
    """Finite inputs, non-finite features: NaN everywhere when the first value is
    below -10, +Inf as the last feature when it is above 240 (else unchanged: the
    added `exp` underflows to exactly 0)."""

    def call(self, x):
        x = x + 0.0 * keras.ops.log(x[:, :1] + 10.0)
        return keras.ops.concatenate([x[:, :4], x[:, 4:] + keras.ops.exp(x[:, 4:] - 150.0)], -1)


def _tie_model():
    """Integer weights and inputs: every logit is an exact integer in every runtime,
    so ties are real ties; columns 4 and 5 repeat columns 1 and 0. An infinite last
    feature gives +-Inf logits, and NaN (0 * Inf) in columns 1 and 4."""
    inputs = keras.Input((5,))
    dense = keras.layers.Dense(6, name="logits")
    model = keras.Model(inputs, dense(_Pathological()(inputs)))
    kernel = np.random.default_rng(11).integers(-2, 3, size=(5, 6)).astype("float32")
    kernel[4] = [1, 0, -1, 2, 0, 1]
    kernel[:, 4], kernel[:, 5] = kernel[:, 1], kernel[:, 0]
    dense.set_weights([kernel, np.zeros(6, "float32")])
    return model, kernel


def _expected_class_ids(x, kernel):
    """Float64 reference: the first index of the maximum; -1 for NaN/Inf inputs and rows
    holding NaN logits."""
    features = x.astype(np.float64)
    features[x[:, 0] < -10] = np.nan
    features[x[:, 4] > 240, 4] = np.inf
    with np.errstate(invalid="ignore"):
        logits = np.stack([np.sum(features * kernel[:, j], -1) for j in range(6)], -1)
    bad = ~np.isfinite(x).all(-1) | np.isnan(logits).any(-1)
    return np.where(bad, -1, np.argmax(np.where(np.isnan(logits), -np.inf, logits), -1))


def test_formats_serve_the_same_class_ids_and_decisions(rng, tmp_path):
    """SavedModel, LiteRT, ONNX and `serving_function` give the same outputs on exact ties,
    non-finite inputs and NaN logits from finite inputs: one definition, kept exact."""
    from keras_isomax import detectors
    from keras_isomax.export import SCORE_OUTPUTS, export_saved_model, serving_function

    model, kernel = _tie_model()
    x = rng.integers(-3, 4, size=(64, 5)).astype("float32")
    x[5, 0] = x[9, 0] = -20.0  # Finite inputs, NaN logits.
    x[13, 4] = 300.0  # Finite input; logits +-Inf, and NaN in columns 1 and 4 only.
    x[7, 2], x[11, 4] = np.nan, -np.inf
    det = detectors.MaxLogit().fit(model)
    logits = keras.ops.convert_to_numpy(model(x))
    assert np.isnan(logits[13]).sum() == 2 and np.isinf(logits[13]).sum() == 4
    expected = _expected_class_ids(x, kernel)
    assert set(expected[[5, 7, 9, 11, 13]]) == {-1}
    # Columns 4 and 5 tie with 1 and 0 in every row: the maximum is often there,
    # and the first index (0 or 1) must win.
    assert {0, 1} <= set(expected) and not {4, 5} & set(expected)
    threshold = 1.5  # Between integer scores: both decisions occur.
    outputs = {"in-process": serving_function(model, threshold, detector=det)(x)}
    outputs["onnx"] = _run_onnx(export_onnx(model, tmp_path / "m.onnx", threshold, detector=det), x)
    if BACKEND == "tensorflow":
        import tensorflow as tf

        path = export_litert(model, tmp_path / "m.tflite", threshold, detector=det)
        outputs["litert"] = _run_litert(path, x)
        path = export_saved_model(model, tmp_path / "sm", threshold, detector=det)
        outputs["saved_model"] = tf.saved_model.load(path).signatures["score"](inputs=x)
    score = np.where(expected >= 0, np.max(logits, -1), np.nan)
    # Row 13's score is the runtime's max over a row holding NaN: NaN or +Inf.
    rows = np.arange(len(x)) != 13
    for name, out in outputs.items():
        out = {key: keras.ops.convert_to_numpy(out[key]) for key in SCORE_OUTPUTS}
        np.testing.assert_array_equal(out["class_id"], expected, err_msg=name)
        np.testing.assert_array_equal(out["score"][rows], score[rows], err_msg=name)  # Exact.
        np.testing.assert_array_equal(out["is_ood"][rows], ~(score >= threshold)[rows], name)
        np.testing.assert_array_equal(out["threshold"], np.full(len(x), threshold), err_msg=name)
    assert 0 < np.sum(~(score >= threshold)) < len(x)

"""Tests for keras_isomax.export: SavedModel signatures for TF Serving.

The main model is exported once per module. Three checks run outside this
process: `saved_model_cli show --all`, a fresh Python process that cannot
import keras or keras_isomax, and a C program built with gcc against
TensorFlow's C API (TF Serving's load path: TF_LoadSessionFromSavedModel with
tag "serve", tensors named by the SignatureDef).
"""

import os
import re
import shutil
import stat
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from keras_isomax import testing as reference

tf = pytest.importorskip("tensorflow")

from keras_isomax import IsoMaxPlusLayer  # noqa: E402
from keras_isomax.export import (  # noqa: E402
    SCORE_OUTPUTS,
    SERVING_DEFAULT_OUTPUTS,
    export_saved_model,
    serving_function,
)

FEATURES = 6
CLASSES = 4
INPUT_NAME = "inputs"
ATOL = 1e-6


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def make_model(seed=0, features=FEATURES, classes=CLASSES, name="isomax"):
    """Normalization (a preprocessing layer) -> MLP -> IsoMaxPlusLayer."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((features,), name="pixels")
    norm = keras.layers.Normalization()
    norm.adapt(np.random.default_rng(seed).normal(2.0, 3.0, (64, features)))
    x = norm(inputs)
    x = keras.layers.Dense(16, activation="relu")(x)
    x = keras.layers.Dense(8)(x)
    logits = IsoMaxPlusLayer(classes, name=name)(x)
    model = keras.Model(inputs, logits)
    layer = model.get_layer(name)
    layer.distance_scale.assign(4.0)  # Non-trivial scale and temperature.
    layer.temperature.assign(1.25)
    return model


def set_threshold_between_scores(model, x, quantile=0.3):
    """Calibrates the threshold halfway between two scores (no exact ties)."""
    scores = np.sort(np.max(keras.ops.convert_to_numpy(model(x)), axis=-1))
    k = int(quantile * len(scores))
    threshold = np.float32(0.5 * (scores[k] + scores[k + 1]))
    model.get_layer("isomax").ood_threshold.assign(threshold)
    return float(threshold)


def reference_outputs(logits, threshold):
    """Float64 NumPy reference of both signatures from the Keras logits."""
    z = np.asarray(logits, np.float64)
    shifted = z - z.max(axis=-1, keepdims=True)
    probs = np.exp(shifted) / np.exp(shifted).sum(axis=-1, keepdims=True)
    score = z.max(axis=-1)
    with np.errstate(invalid="ignore"):
        is_ood = ~(score >= threshold)
    return {
        "logits": z,
        "probabilities": probs,
        "class_id": np.argmax(z, axis=-1),
        "score": score,
        "is_ood": is_ood,
        "threshold": np.full(z.shape[0], threshold),
    }


def assert_outputs_match(outputs, expected, names, atol=ATOL):
    assert set(outputs) == set(names)
    for name in names:
        got = np.asarray(outputs[name])
        want = np.asarray(expected[name])
        assert got.shape == want.shape, name
        if name in ("class_id", "is_ood"):
            np.testing.assert_array_equal(got, want, err_msg=name)
        else:
            np.testing.assert_allclose(got, want, rtol=0, atol=atol, err_msg=name)


def call_signature(loaded, name, x):
    fn = loaded.signatures[name]
    return {k: v.numpy() for k, v in fn(**{INPUT_NAME: tf.constant(x)}).items()}


def numpy_outputs(outputs, names):
    return {name: keras.ops.convert_to_numpy(outputs[name]) for name in names}


def assert_refused(model, tmp_path, error, match, **kwargs):
    """`export_saved_model` raises `error` and writes nothing."""
    target = tmp_path / "refused"
    with pytest.raises(error, match=match):
        export_saved_model(model, target, **kwargs)
    assert not target.exists()


# --------------------------------------------------------------------------
# Fixtures: one export per module
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = make_model()
    rng = np.random.default_rng(1)
    x = rng.normal(2.0, 3.0, (33, FEATURES)).astype("float32")
    threshold = set_threshold_between_scores(model, x)
    base = tmp_path_factory.mktemp("export") / "fashion"
    path = export_saved_model(model, base, version=1)
    loaded = tf.saved_model.load(path)  # Keep a reference while calling it.
    logits = keras.ops.convert_to_numpy(model(x))
    return {
        "model": model,
        "x": x,
        "logits": logits,
        "threshold": threshold,
        "expected": reference_outputs(logits, threshold),
        "base": str(base),
        "path": path,
        "loaded": loaded,
    }


# --------------------------------------------------------------------------
# The SavedModel as written
# --------------------------------------------------------------------------


def test_tf_serving_layout(exported):
    base, path = exported["base"], exported["path"]
    assert path == os.path.join(base, "1")
    assert os.listdir(base) == ["1"]  # No staging directory left behind.
    assert os.path.exists(os.path.join(path, "saved_model.pb"))
    assert os.path.isdir(os.path.join(path, "variables"))
    # Same permissions as a directory created normally (mkdtemp would be 0700).
    assert stat.S_IMODE(os.stat(path).st_mode) == stat.S_IMODE(os.stat(base).st_mode)


def _cli_sections(text):
    """Splits `saved_model_cli show --all` output into {signature: text}."""
    parts = re.split(r"signature_def\['([^']+)'\]:", text)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def test_saved_model_cli_lists_both_signatures(exported):
    cli = shutil.which("saved_model_cli", path=os.path.dirname(sys.executable))
    command = [cli] if cli else [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli"]
    result = subprocess.run(
        command + ["show", "--dir", exported["path"], "--all"],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert result.returncode == 0, result.stderr
    assert "MetaGraphDef with tag-set: 'serve'" in result.stdout
    sections = _cli_sections(result.stdout)
    expected = {
        "serving_default": {
            "probabilities": ("DT_FLOAT", f"(-1, {CLASSES})"),
            "logits": ("DT_FLOAT", f"(-1, {CLASSES})"),
            "class_id": ("DT_INT64", "(-1)"),
        },
        "score": {
            "score": ("DT_FLOAT", "(-1)"),
            "is_ood": ("DT_BOOL", "(-1)"),
            "threshold": ("DT_FLOAT", "(-1)"),
            "class_id": ("DT_INT64", "(-1)"),
            "probabilities": ("DT_FLOAT", f"(-1, {CLASSES})"),
        },
    }
    for signature, outputs in expected.items():
        assert signature in sections, sorted(sections)
        text = sections[signature]
        assert "Method name is: tensorflow/serving/predict" in text
        inputs = re.findall(
            r"inputs\['(\w+)'\] tensor_info:\s+dtype: (\w+)\s+shape: (\([^)]*\))", text
        )
        assert inputs == [(INPUT_NAME, "DT_FLOAT", f"(-1, {FEATURES})")]
        found = re.findall(
            r"outputs\['(\w+)'\] tensor_info:\s+dtype: (\w+)\s+shape: (\([^)]*\))", text
        )
        assert {name: (dtype, shape) for name, dtype, shape in found} == outputs


def test_documented_output_names():
    assert SERVING_DEFAULT_OUTPUTS == ("probabilities", "logits", "class_id")
    assert SCORE_OUTPUTS == ("score", "is_ood", "threshold", "class_id", "probabilities")


# --------------------------------------------------------------------------
# Values: in process, fresh process without keras, C API
# --------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 33])
def test_loaded_signatures_match_keras(exported, batch):
    x = exported["x"][:batch]
    expected = {k: v[:batch] for k, v in exported["expected"].items()}
    loaded = exported["loaded"]
    assert set(loaded.signatures) == {"serving_default", "score"}
    default = call_signature(loaded, "serving_default", x)
    assert default["class_id"].dtype == np.int64
    assert_outputs_match(default, expected, SERVING_DEFAULT_OUTPUTS)
    score = call_signature(loaded, "score", x)
    assert score["score"].dtype == np.float32 and score["is_ood"].dtype == bool
    assert_outputs_match(score, expected, SCORE_OUTPUTS)
    # Logits equal the Keras model's own output (not only the reference).
    np.testing.assert_allclose(default["logits"], exported["logits"][:batch], atol=ATOL)


def test_empty_batch(exported):
    for signature, names in (
        ("serving_default", SERVING_DEFAULT_OUTPUTS),
        ("score", SCORE_OUTPUTS),
    ):
        out = call_signature(exported["loaded"], signature, np.zeros((0, FEATURES), "float32"))
        assert set(out) == set(names) and all(len(value) == 0 for value in out.values())


def test_calibrated_threshold_splits_the_batch(exported):
    # The threshold sits between scores: both decisions occur, so the check
    # above is not trivially all-True or all-False.
    is_ood = exported["expected"]["is_ood"]
    assert 0 < is_ood.sum() < len(is_ood)


def test_nan_input_is_ood(exported):
    """The library checks the input itself (see tests/test_nonfinite_inputs.py)."""
    x = exported["x"][:3].copy()
    x[1, 2] = np.nan
    out = call_signature(exported["loaded"], "score", x)
    assert np.isnan(out["score"][1]) and out["is_ood"][1] and out["class_id"][1] == -1
    np.testing.assert_allclose(
        out["score"][[0, 2]], exported["expected"]["score"][[0, 2]], atol=ATOL
    )


FRESH_PROCESS_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, importlib.machinery, sys

    BLOCKED = ("keras", "keras_isomax", "tf_keras")

    class Refuse(importlib.abc.Loader):
        def create_module(self, spec):
            raise ImportError(f"blocked import: {spec.name}")

        def exec_module(self, module):
            raise ImportError(f"blocked import: {module.__name__}")

    class Block(importlib.abc.MetaPathFinder):
        # A spec without origin reads as "not installed" to TensorFlow's
        # optional-Keras probes; importing it raises ImportError.
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                return importlib.machinery.ModuleSpec(name, Refuse())
            return None

    sys.meta_path.insert(0, Block())
    for name in BLOCKED:
        try:
            __import__(name)
        except ImportError:
            pass
        else:
            raise SystemExit(f"could import {name}")

    import numpy as np
    import tensorflow as tf

    export_dir, input_name, x_path, out_path = sys.argv[1:]
    loaded = tf.saved_model.load(export_dir)
    x = tf.constant(np.load(x_path))
    results = {}
    for signature in ("serving_default", "score"):
        outputs = loaded.signatures[signature](**{input_name: x})
        for key, value in outputs.items():
            results[f"{signature}/{key}"] = value.numpy()
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    if leaked:
        raise SystemExit(f"modules leaked: {leaked}")
    np.savez(out_path, **results)
    """
)


def test_fresh_process_without_keras(exported, tmp_path):
    script = tmp_path / "serve_without_keras.py"
    script.write_text(FRESH_PROCESS_SCRIPT)
    np.save(tmp_path / "x.npy", exported["x"])
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "KERAS_BACKEND")}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    result = subprocess.run(
        [
            sys.executable,
            "-I",  # Isolated: no PYTHONPATH, no script or current directory on sys.path.
            str(script),
            exported["path"],
            INPUT_NAME,
            str(tmp_path / "x.npy"),
            str(tmp_path / "out.npz"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    with np.load(tmp_path / "out.npz") as data:
        results = dict(data)
    expected = exported["expected"]
    for signature, names in (
        ("serving_default", SERVING_DEFAULT_OUTPUTS),
        ("score", SCORE_OUTPUTS),
    ):
        outputs = {k.split("/")[1]: v for k, v in results.items() if k.startswith(signature + "/")}
        assert_outputs_match(outputs, expected, names)


def test_c_api_runs_score_signature(exported, c_program, tmp_path):
    code, outputs, log = c_program(exported["path"], "score", exported["x"], tmp_path)
    assert code == 0, log
    assert "tag serve" in log
    python = call_signature(exported["loaded"], "score", exported["x"])
    assert set(outputs) == set(SCORE_OUTPUTS)
    for name in SCORE_OUTPUTS:
        np.testing.assert_allclose(
            outputs[name], python[name].astype(np.float64), rtol=0, atol=ATOL, err_msg=name
        )
    outputs["is_ood"] = outputs["is_ood"].astype(bool)
    outputs["class_id"] = outputs["class_id"].astype(np.int64)
    assert_outputs_match(outputs, exported["expected"], SCORE_OUTPUTS)


def test_c_api_runs_serving_default(exported, c_program, tmp_path):
    x = exported["x"][:5]
    code, outputs, log = c_program(exported["path"], "serving_default", x, tmp_path)
    assert code == 0, log
    outputs["class_id"] = outputs["class_id"].astype(np.int64)
    expected = {k: v[:5] for k, v in exported["expected"].items()}
    assert_outputs_match(outputs, expected, SERVING_DEFAULT_OUTPUTS)


def test_c_api_reports_wrong_shape_and_dtype(exported, c_program, tmp_path):
    x = exported["x"][:4]
    code, _, log = c_program(exported["path"], "score", x[:, :-1], tmp_path)
    assert code == 1, log
    assert "error: 3 " in log and "is not compatible with expected shape" in log, log
    code, _, log = c_program(exported["path"], "score", x.astype(np.int32), tmp_path)
    assert code == 1, log
    assert "error: 3 " in log and "float" in log and "int32" in log, log


# --------------------------------------------------------------------------
# Bad input at the signatures (Python)
# --------------------------------------------------------------------------


def test_wrong_dtype_at_signature_is_a_clear_error(exported):
    score = exported["loaded"].signatures["score"]
    with pytest.raises(tf.errors.InvalidArgumentError, match="float.*int32"):
        score(**{INPUT_NAME: tf.constant(exported["x"].astype(np.int32))})
    with pytest.raises(tf.errors.InvalidArgumentError, match="float.*string"):
        score(**{INPUT_NAME: tf.constant([["a"] * FEATURES])})


@pytest.mark.parametrize("shape", [(4, FEATURES - 1), (4, FEATURES, 1), (FEATURES,)], ids=str)
def test_wrong_shape_at_signature_is_a_clear_error(exported, shape):
    x = np.zeros(shape, np.float32)
    for signature in ("score", "serving_default"):
        fn = exported["loaded"].signatures[signature]
        with pytest.raises(
            tf.errors.InvalidArgumentError, match="not compatible with expected shape"
        ):
            fn(**{INPUT_NAME: tf.constant(x)})


def test_missing_input_name_is_a_clear_error(exported):
    with pytest.raises(TypeError, match=INPUT_NAME):
        exported["loaded"].signatures["score"](x=tf.constant(exported["x"]))


# --------------------------------------------------------------------------
# Threshold
# --------------------------------------------------------------------------


def test_threshold_is_read_from_the_exported_variable(exported):
    """The served threshold is the saved `ood_threshold` variable, not a constant."""
    loaded = tf.saved_model.load(exported["path"])  # A private copy to modify.
    (variable,) = [v for v in loaded.variables if "ood_threshold" in v.name]
    np.testing.assert_allclose(variable.numpy(), exported["threshold"])
    variable.assign(1.0)  # Above every score (scores <= 0): all OOD.
    out = call_signature(loaded, "score", exported["x"])
    np.testing.assert_array_equal(out["threshold"], np.ones(len(exported["x"])))
    assert out["is_ood"].all()


def test_recalibrated_model_reexports_its_threshold(exported, tmp_path):
    model = exported["model"]
    layer = model.get_layer("isomax")
    old = float(layer.ood_threshold.numpy())
    new = np.float32(old - 0.25)
    try:
        layer.ood_threshold.assign(new)
        path = export_saved_model(model, tmp_path / "models", version=2)
    finally:
        layer.ood_threshold.assign(old)
    x = exported["x"]
    v1 = call_signature(exported["loaded"], "score", x)
    v2 = call_signature(tf.saved_model.load(path), "score", x)
    np.testing.assert_allclose(v1["threshold"], np.float32(old))
    np.testing.assert_allclose(v2["threshold"], new)
    expected = reference_outputs(exported["logits"], new)
    assert_outputs_match(v2, expected, SCORE_OUTPUTS)
    assert (v2["is_ood"] != v1["is_ood"]).any()


def test_each_export_serves_the_weights_of_its_time(exported, tmp_path):
    """The prototypes are normalised once per export (`inference_snapshot`):
    an export after a change of the weights serves the new ones, the earlier
    export keeps the old ones, and the live model follows the weights again."""
    model = exported["model"]
    layer = model.get_layer("isomax")
    old = layer.prototypes.numpy()
    x = exported["x"]
    new = np.random.default_rng(7).normal(size=old.shape).astype("float32") * 3.0
    try:
        layer.prototypes.assign(new)
        path = export_saved_model(model, tmp_path / "models", version=2)
        live = np.asarray(model(x))
    finally:
        layer.prototypes.assign(old)
    assert not np.allclose(live, exported["logits"], atol=1e-3)
    loaded = tf.saved_model.load(path)
    v2 = call_signature(loaded, "serving_default", x)
    np.testing.assert_allclose(v2["logits"], live, atol=ATOL)
    # Saved with it: the normalised prototypes, in a Dense kernel's (F, C) order.
    checkpoint = tf.train.load_checkpoint(os.path.join(path, "variables", "variables"))
    saved = [checkpoint.get_tensor(key) for key in checkpoint.get_variable_to_shape_map()]
    kernels = [v for v in saved if np.shape(v) == (new.shape[1], CLASSES)]
    assert len(kernels) == 1  # Saved once.
    np.testing.assert_allclose(kernels[0], reference.normalize(new).T, atol=1e-6)
    v1 = call_signature(exported["loaded"], "serving_default", x)
    np.testing.assert_allclose(v1["logits"], exported["logits"], atol=ATOL)
    np.testing.assert_allclose(model(x), exported["logits"], atol=ATOL)


def test_uncalibrated_model_needs_an_explicit_threshold(tmp_path):
    model = make_model(seed=3)
    target = tmp_path / "never_written"
    with pytest.raises(ValueError, match="calibrate_threshold.*threshold=None"):
        export_saved_model(model, target)
    assert not target.exists()
    # An explicit threshold overrides (and needs no calibration).
    path = export_saved_model(model, target, threshold=-1.5)
    x = np.random.default_rng(4).normal(size=(9, FEATURES)).astype("float32")
    out = call_signature(tf.saved_model.load(path), "score", x)
    assert_outputs_match(
        out, reference_outputs(keras.ops.convert_to_numpy(model(x)), -1.5), SCORE_OUTPUTS
    )


@pytest.mark.parametrize(
    "threshold, error",
    [
        (float("nan"), ValueError),
        (float("inf"), ValueError),  # LiteRT would serve it as the largest float.
        ("0.5", TypeError),
        (True, TypeError),
        ([0.1], TypeError),
    ],
    ids=["nan", "inf", "str", "bool", "list"],
)
def test_invalid_threshold(threshold, error, tmp_path):
    model = make_model(seed=5)
    assert_refused(model, tmp_path, error, "Received: threshold=", threshold=threshold)
    with pytest.raises(error, match="Received: threshold="):
        serving_function(model, threshold)


# --------------------------------------------------------------------------
# Layout and argument checks
# --------------------------------------------------------------------------


def test_existing_version_needs_overwrite(exported, tmp_path):
    model = exported["model"]
    base = tmp_path / "models"
    path = export_saved_model(model, base, version=7)
    first = os.stat(os.path.join(path, "saved_model.pb")).st_mtime_ns
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_saved_model(model, base, version=7)
    assert os.stat(os.path.join(path, "saved_model.pb")).st_mtime_ns == first
    assert export_saved_model(model, base, version=7, overwrite=True) == path
    assert sorted(os.listdir(base)) == ["7"]
    assert os.stat(os.path.join(path, "saved_model.pb")).st_mtime_ns != first


def test_non_empty_directory_is_not_replaced(exported, tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="holds no SavedModel"):
        export_saved_model(exported["model"], tmp_path, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_version_zero_relative_path_and_no_console_output(exported, tmp_path, monkeypatch, capfd):
    """Version 0 is a valid TF Serving version; a relative `export_dir` is resolved
    against the working directory and the absolute path returned; nothing is printed
    unless `verbose=True`."""
    monkeypatch.chdir(tmp_path)
    path = export_saved_model(exported["model"], os.path.join("models", "fashion"), version=0)
    assert path == os.path.join(str(tmp_path), "models", "fashion", "0")
    assert os.path.exists(os.path.join(path, "saved_model.pb"))
    assert capfd.readouterr().out == ""
    out = call_signature(tf.saved_model.load(path), "score", exported["x"])
    np.testing.assert_allclose(out["score"], exported["expected"]["score"], atol=ATOL)


@pytest.mark.parametrize("count", [10, 11, 12])
def test_a_crowded_foreign_directory_is_named_in_the_error(exported, tmp_path, count):
    """Up to 10 of the foreign entries are quoted (sorted), then how many more."""
    names = [f"file{i:02d}.txt" for i in range(count)]
    for name in names:
        (tmp_path / name).write_text("keep me")
    with pytest.raises(FileExistsError, match="holds no SavedModel") as error:
        export_saved_model(exported["model"], tmp_path, overwrite=True)
    message = str(error.value)
    listed = ", ".join(repr(name) for name in names[:10])
    more = f" and {count - 10} more" if count > 10 else ""
    assert f"({listed}{more});" in message, message
    assert sorted(os.listdir(tmp_path)) == names


@pytest.mark.parametrize("version", [-1, True, "1", 1.0])
def test_invalid_version(exported, tmp_path, version):
    with pytest.raises(ValueError, match="Received: version="):
        export_saved_model(exported["model"], tmp_path, version=version)


@pytest.mark.parametrize("input_name", ["", "1x", "two words", None])
def test_invalid_input_name(exported, input_name, tmp_path):
    with pytest.raises(ValueError, match="Received: input_name="):
        export_saved_model(exported["model"], tmp_path, input_name=input_name)


def test_not_a_model(tmp_path):
    assert_refused(IsoMaxPlusLayer(3), tmp_path, TypeError, "Received: model=IsoMaxPlusLayer")


def test_model_without_isomax_layer(tmp_path):
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(3)(inputs), name="plain")
    assert_refused(model, tmp_path, ValueError, "has no `IsoMaxPlusLayer`", threshold=0.0)


def test_model_with_two_isomax_layers(tmp_path):
    inputs = keras.Input((4,))
    a = IsoMaxPlusLayer(3)(inputs)
    b = IsoMaxPlusLayer(3)(keras.layers.Dense(4)(inputs))
    model = keras.Model(inputs, keras.layers.Add()([a, b]))
    assert_refused(model, tmp_path, ValueError, "has 2 `IsoMaxPlusLayer`s", threshold=0.0)


def test_model_with_two_outputs(tmp_path):
    inputs = keras.Input((4,))
    features = keras.layers.Dense(5)(inputs)
    model = keras.Model(inputs, [IsoMaxPlusLayer(3)(features), features])
    assert_refused(model, tmp_path, ValueError, "exactly one output", threshold=0.0)


def test_model_with_a_rank_3_output(tmp_path):
    """The layer applied along a sequence gives (batch, steps, classes): not servable."""
    model = keras.Sequential([keras.Input((4, FEATURES)), IsoMaxPlusLayer(CLASSES)])
    match = rf"must be the \(batch, {CLASSES}\) logits .*Received: output \(None, 4, {CLASSES}\)"
    assert_refused(model, tmp_path, ValueError, match, threshold=0.0)


def test_model_output_after_isomax_layer(tmp_path):
    inputs = keras.Input((4,))
    logits = IsoMaxPlusLayer(3, name="isomax")(inputs)
    model = keras.Model(inputs, keras.layers.Softmax(name="softmax")(logits))
    assert_refused(model, tmp_path, ValueError, "must be the logits.*'softmax'", threshold=0.0)


def test_model_with_two_inputs(tmp_path):
    a, b = keras.Input((2,)), keras.Input((2,))
    model = keras.Model([a, b], IsoMaxPlusLayer(3)(keras.layers.Concatenate()([a, b])))
    assert_refused(model, tmp_path, ValueError, "exactly one input", threshold=0.0)


def test_unbuilt_model(tmp_path):
    model = keras.Sequential([keras.layers.Dense(4), IsoMaxPlusLayer(3)])
    assert_refused(model, tmp_path, ValueError, "must be built", threshold=0.0)


def test_nested_head_is_found():
    """IsoMax+ inside a nested Sequential head, which is the model's output."""
    inputs = keras.Input((4,))
    head = keras.Sequential([keras.layers.Dense(5), IsoMaxPlusLayer(3)], name="head")
    model = keras.Model(inputs, head(keras.layers.Dense(6)(inputs)))
    x = np.random.default_rng(0).normal(size=(3, 4)).astype("float32")
    out = numpy_outputs(serving_function(model, threshold=-0.5)(x), SCORE_OUTPUTS)
    expected = reference_outputs(keras.ops.convert_to_numpy(model(x)), np.float32(-0.5))
    assert_outputs_match(out, expected, SCORE_OUTPUTS)


# --------------------------------------------------------------------------
# Other models: string preprocessing, subclassed, tf.distribute, XLA
# --------------------------------------------------------------------------


def test_string_input_model_with_lookup_table(tmp_path):
    """A StringLookup (a lookup-table resource) and a string input dtype."""
    keras.utils.set_random_seed(6)
    vocabulary = ["cat", "dog", "bird", "fish", "frog"]
    inputs = keras.Input((3,), dtype="string", name="tokens")
    ids = keras.layers.StringLookup(vocabulary=vocabulary)(inputs)
    x = keras.layers.Flatten()(keras.layers.Embedding(len(vocabulary) + 1, 4)(ids))
    model = keras.Model(inputs, IsoMaxPlusLayer(3, name="isomax")(x))
    path = export_saved_model(model, tmp_path / "text", threshold=-0.6, input_name="tokens")
    x = np.array([["cat", "dog", "owl"], ["fish", "fish", "frog"], ["", "bird", "cat"]])
    loaded = tf.saved_model.load(path)
    out = loaded.signatures["score"](tokens=tf.constant(x))
    assert loaded.signatures["score"].structured_input_signature[1]["tokens"].dtype == tf.string
    expected = reference_outputs(
        keras.ops.convert_to_numpy(model(tf.constant(x))), np.float32(-0.6)
    )
    assert_outputs_match({k: v.numpy() for k, v in out.items()}, expected, SCORE_OUTPUTS)


class SubclassedClassifier(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(5)
        self.isomax = IsoMaxPlusLayer(3)

    def call(self, inputs):
        return self.isomax(self.dense(inputs))


def test_subclassed_model_needs_input_signature(tmp_path):
    model = SubclassedClassifier()
    x = np.random.default_rng(7).normal(size=(4, 3)).astype("float32")
    model(x)
    assert_refused(model, tmp_path, ValueError, "input_signature", threshold=-0.5)
    path = export_saved_model(
        model,
        tmp_path / "sub",
        threshold=-0.5,
        input_signature=keras.InputSpec(shape=(None, 3), dtype="float32"),
    )
    out = call_signature(tf.saved_model.load(path), "serving_default", x)
    assert_outputs_match(
        out, reference_outputs(keras.ops.convert_to_numpy(model(x)), -0.5), SERVING_DEFAULT_OUTPUTS
    )


class SoftmaxAfterIsoMax(SubclassedClassifier):
    def call(self, inputs):
        return keras.ops.softmax(super().call(inputs))[:, :2]


def test_subclassed_model_output_is_checked_at_trace_time(tmp_path):
    model = SoftmaxAfterIsoMax()
    model(np.zeros((2, 3), np.float32))
    spec = tf.TensorSpec((None, 3), tf.float32)
    match = r"\(batch, 3\) logits"
    assert_refused(model, tmp_path, ValueError, match, threshold=-0.5, input_signature=spec)
    assert os.listdir(tmp_path) == []  # No staging directory either.
    with pytest.raises(ValueError, match=match):
        serving_function(model, threshold=-0.5)(np.zeros((2, 3), np.float32))


def test_model_trained_under_mirrored_strategy(tmp_path):
    """Distributed variables export the same (all logical CPUs as replicas)."""
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    strategy = tf.distribute.MirroredStrategy(devices)
    rng = np.random.default_rng(8)
    x = rng.normal(size=(64, FEATURES)).astype("float32")
    y = rng.integers(0, CLASSES, size=64)
    with strategy.scope():
        from keras_isomax import IsoMaxPlusLoss

        model = make_model(seed=8)
        model.compile(optimizer="sgd", loss=IsoMaxPlusLoss())
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    threshold = set_threshold_between_scores(model, x)
    assert isinstance(
        model.get_layer("isomax").ood_threshold.value, tf.distribute.DistributedValues
    )
    with strategy.scope():  # Exporting inside the scope works too.
        inside = export_saved_model(model, tmp_path / "inside")
    outside = export_saved_model(model, tmp_path / "outside")
    expected = reference_outputs(model.predict(x, verbose=0), threshold)
    for path in (inside, outside):
        out = call_signature(tf.saved_model.load(path), "score", x)
        assert_outputs_match(out, expected, SCORE_OUTPUTS)


def test_mixed_precision_model(tmp_path):
    keras.config.set_dtype_policy("mixed_float16")  # Restored by conftest.
    model = make_model(seed=9)
    assert model.layers[2].compute_dtype == "float16"
    path = export_saved_model(model, tmp_path / "mixed", threshold=-2.0)
    x = np.random.default_rng(9).normal(2.0, 3.0, size=(8, FEATURES)).astype("float32")
    out = call_signature(tf.saved_model.load(path), "score", x)
    expected = reference_outputs(keras.ops.convert_to_numpy(model(x)), -2.0)
    assert_outputs_match(out, expected, SCORE_OUTPUTS)


@pytest.fixture(scope="module")
def xla_export(exported, tmp_path_factory):
    return export_saved_model(
        exported["model"], tmp_path_factory.mktemp("xla") / "model", jit_compile=True
    )


def _xla_must_compile(path):
    """The `_XlaMustCompile` attributes of the SavedModel's functions (name -> bool)."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    library = proto.meta_graphs[0].graph_def.library
    return {
        fn.signature.name: fn.attr["_XlaMustCompile"].b
        for fn in library.function
        if "_XlaMustCompile" in fn.attr
    }


def test_jit_compile_export(exported, xla_export):
    assert any(_xla_must_compile(xla_export).values())  # Compiled with XLA, not just marked.
    assert not any(_xla_must_compile(exported["path"]).values())  # The default: no XLA.
    loaded = tf.saved_model.load(xla_export)
    assert_outputs_match(
        call_signature(loaded, "score", exported["x"]),
        exported["expected"],
        SCORE_OUTPUTS,
    )


def test_c_api_runs_xla_export(exported, xla_export, c_program, tmp_path):
    code, outputs, log = c_program(xla_export, "score", exported["x"], tmp_path)
    assert code == 0, log
    outputs["is_ood"] = outputs["is_ood"].astype(bool)
    outputs["class_id"] = outputs["class_id"].astype(np.int64)
    assert_outputs_match(outputs, exported["expected"], SCORE_OUTPUTS)


def test_serving_function_compiles_with_xla(exported):
    """The check for TPU readiness: what the signatures compute compiles with XLA."""
    model = exported["model"]
    x = tf.constant(exported["x"])
    compiled = tf.function(serving_function(model), jit_compile=True)
    assert "HloModule" in compiled.experimental_get_compiler_ir(x)(stage="hlo")
    out = numpy_outputs(compiled(x), SCORE_OUTPUTS + SERVING_DEFAULT_OUTPUTS)
    assert_outputs_match(out, exported["expected"], set(SCORE_OUTPUTS + SERVING_DEFAULT_OUTPUTS))


def test_serving_function_equals_the_saved_model(exported):
    """`serving_function` in-process gives what both signatures serve."""
    x = exported["x"].copy()
    x[4, 1] = np.inf
    got = numpy_outputs(serving_function(exported["model"])(x), SCORE_OUTPUTS + ("logits",))
    for signature, names in (
        ("serving_default", SERVING_DEFAULT_OUTPUTS),
        ("score", SCORE_OUTPUTS),
    ):
        served = call_signature(exported["loaded"], signature, x)
        assert set(served) == set(names)
        for name in names:
            np.testing.assert_allclose(got[name], served[name], rtol=0, atol=ATOL, err_msg=name)
    assert got["class_id"][4] == -1 and got["is_ood"][4]


def test_serving_function_reads_the_calibrated_threshold_on_every_call(exported):
    model, x = exported["model"], exported["x"]
    layer = model.get_layer("isomax")
    serve = serving_function(model)
    old = float(layer.ood_threshold.numpy())
    try:
        layer.ood_threshold.assign(1.0)  # Above every score: all OOD.
        out = numpy_outputs(serve(x), ("threshold", "is_ood"))
    finally:
        layer.ood_threshold.assign(old)
    np.testing.assert_array_equal(out["threshold"], np.ones(len(x), "float32"))
    assert out["is_ood"].all()
    np.testing.assert_array_equal(serve(x)["is_ood"].numpy(), exported["expected"]["is_ood"])


# --------------------------------------------------------------------------
# The documented client code (docs/serving.md) and the example script
# --------------------------------------------------------------------------


def test_grpc_predict_request_example(exported):
    """The gRPC PredictRequest of the docs, answered from the SavedModel.

    No TF Serving here: the request and response go through their protobuf
    wire format, and the "server" runs the signature named in the request on
    the tensors it carries, keyed as the SignatureDef's inputs.
    """
    pytest.importorskip("tensorflow_serving.apis", reason="tensorflow-serving-api not installed")
    from tensorflow_serving.apis import predict_pb2

    images = exported["x"][:5]
    # --- client, as in docs/serving.md ---
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "fashion"
    request.model_spec.signature_name = "score"
    request.inputs["inputs"].CopyFrom(tf.make_tensor_proto(images))
    wire = request.SerializeToString()

    # --- server side: what TF Serving's Predict does with it ---
    received = predict_pb2.PredictRequest.FromString(wire)
    signature = exported["loaded"].signatures[received.model_spec.signature_name]
    feeds = {k: tf.constant(tf.make_ndarray(v)) for k, v in received.inputs.items()}
    response = predict_pb2.PredictResponse()
    for key, value in signature(**feeds).items():
        response.outputs[key].CopyFrom(tf.make_tensor_proto(value.numpy()))
    wire = response.SerializeToString()

    # --- client reads the response ---
    response = predict_pb2.PredictResponse.FromString(wire)
    outputs = {key: tf.make_ndarray(response.outputs[key]) for key in response.outputs}
    expected = {k: v[:5] for k, v in exported["expected"].items()}
    assert_outputs_match(outputs, expected, SCORE_OUTPUTS)


@pytest.mark.slow
def test_export_and_serve_example_runs(tmp_path, capsys):
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "examples", "export_and_serve.py")
    spec = importlib.util.spec_from_file_location("export_and_serve", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    try:
        example.main(["--train-size", "512", "--export-dir", str(tmp_path / "fashion")])
    except FileNotFoundError as error:  # No local Fashion-MNIST.
        pytest.skip(str(error))
    printed = capsys.readouterr().out
    assert os.path.exists(tmp_path / "fashion" / "1" / "saved_model.pb")
    assert "score signature" in printed and "flagged OOD" in printed
    diff = float(re.search(r"Keras logits\|: (\S+)", printed).group(1))
    assert diff <= ATOL

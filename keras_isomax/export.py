"""SavedModel export for TF Serving, with a `score` signature for OOD decisions.

`export_saved_model(model, export_dir)` writes a TensorFlow SavedModel (tag
`serve`) with two signatures on one named input (default `"inputs"`):

- `serving_default`: `probabilities` (B, C) float32, `logits` (B, C) float32,
  `class_id` (B,) int64 (-1 for an input holding NaN/Inf);
- `score`: `score` (B,) float32 (the minimum distance score, higher = more
  in-distribution), `is_ood` (B,) bool, `threshold` (B,) float32, `class_id`
  (B,) int64, `probabilities` (B, C) float32.

The SavedModel needs TensorFlow only: no Keras and no keras-isomax on the
server. This module is TensorFlow-specific (SavedModel is a TensorFlow format).
"""

from __future__ import annotations

import os
import shutil
import uuid
import warnings

import keras

from keras_isomax import _checks, _graph, _serving
from keras_isomax.edge import export_litert, export_onnx  # noqa: F401  (re-exported)
from keras_isomax.head import find_isomax_layer

SERVING_DEFAULT = "serving_default"
SCORE = "score"
SERVING_DEFAULT_OUTPUTS = ("probabilities", "logits", "class_id")
SCORE_OUTPUTS = ("score", "is_ood", "threshold", "class_id", "probabilities")


def export_saved_model(
    model,
    export_dir,
    threshold=None,
    version=None,
    input_name="inputs",
    input_signature=None,
    jit_compile=False,
    overwrite=False,
    verbose=False,
    detector=None,
):
    """Exports an IsoMax+ classifier as a TF Serving-ready SavedModel.

    The SavedModel (tag `serve`) has the two signatures listed in
    `keras_isomax.export`, both on one input named `input_name` with the
    model's dtype and shape and a dynamic batch size. An input holding NaN or
    Inf gets `score` NaN, `is_ood` True and `class_id` -1. The full reference
    (what each output computes, the layout, what `overwrite` never replaces)
    is docs/serving.md.

    Args:
        model: A built `keras.Model` with one input, one output and one
            `IsoMaxPlusLayer`, whose output is the model's output.
        export_dir: Directory to write: the SavedModel itself with
            `version=None`, otherwise a TF Serving model base path.
        threshold: OOD threshold on the score. `None` reads the layer's
            calibrated `ood_threshold` variable (see `calibrate_threshold`;
            raises if it is NaN); a float is written into the graph as a
            constant. With `detector`, a threshold on the detector's score,
            and `None` reads the detector's calibrated `threshold`. Defaults
            to `None`.
        version: Non-negative integer: the SavedModel goes to
            `export_dir/<version>/`. `None` writes into `export_dir`. Either
            way it is staged next to the target and renamed into place once
            complete. Defaults to `None`.
        input_name: Name of the signatures' input (the key in requests).
            Defaults to `"inputs"`.
        input_signature: Shape and dtype of one input (`keras.InputSpec`,
            `tf.TensorSpec` or `KerasTensor`), needed only for models without
            symbolic inputs. The batch dimension is made dynamic. Defaults to
            `None`.
        jit_compile: Whether both signatures compile with XLA. Defaults to
            `False`.
        overwrite: Whether to replace an existing SavedModel at the target
            (a directory holding anything else is never replaced). Defaults
            to `False`.
        verbose: Whether to print the endpoints written. Defaults to `False`.
        detector: A fitted `keras_isomax.detectors.Detector` whose score
            replaces the minimum distance score (`KNN`, `Mahalanobis`, `ViM`,
            the logit detectors); the model may then be any classifier the
            detector was fitted on (its fitted state is exported with it).
            Defaults to `None`.

    Returns:
        The path (a `str`) of the SavedModel directory written.

    Raises:
        TypeError: If `model` is not a `keras.Model` or an argument has the
            wrong type.
        ValueError: If the Keras backend is not TensorFlow, the model is not a
            single-input, single-output IsoMax+ classifier, the threshold is
            uncalibrated with `threshold=None`, or `threshold`, `version`,
            `input_name` or `export_dir` is invalid.
        FileExistsError: If the target holds anything but a SavedModel, is
            the working directory, or holds a SavedModel and
            `overwrite=False`.

    Example:

    >>> import os, tempfile, numpy as np, keras
    >>> from keras_isomax import IsoMaxPlusLayer
    >>> from keras_isomax.calibration import calibrate_threshold
    >>> from keras_isomax.export import export_saved_model
    >>> model = keras.Sequential([keras.Input((4,)), IsoMaxPlusLayer(3)])
    >>> x = np.random.default_rng(0).normal(size=(100, 4)).astype("float32")
    >>> _ = calibrate_threshold(model, x, tpr=0.95)
    >>> base = os.path.join(tempfile.mkdtemp(), "my_model")
    >>> path = export_saved_model(model, base, version=1)
    >>> os.path.relpath(path, base)  # tensorflow_model_server --model_base_path=base
    '1'
    """
    _check_backend()  # Before importing TensorFlow.
    import tensorflow as tf

    export_dir = os.fspath(export_dir)
    if not isinstance(export_dir, str) or not export_dir.strip():
        raise ValueError(
            "`export_dir` must be a non-empty path (an empty one would write into the "
            f"working directory). Received: export_dir={export_dir!r}"
        )
    _checks.check_int(
        version,
        "version",
        minimum=0,
        allow_none=True,
        what="a non-negative integer (TF Serving's version directory) or None",
    )
    for name, value in (("jit_compile", jit_compile), ("overwrite", overwrite)):
        if not isinstance(value, bool):
            raise TypeError(f"`{name}` must be a bool. Received: {name}={value!r}")
    functions, input_spec = _build_serving_functions(
        model, threshold, input_name, input_signature, detector
    )
    if jit_compile:
        compute = tf.function(functions.pop("_compute"), jit_compile=True)
        functions = _endpoint_functions(compute)
    else:
        functions.pop("_compute")

    target = export_dir if version is None else os.path.join(export_dir, str(version))
    remote = "://" in export_dir
    if not remote:
        target = os.path.abspath(target)
    _check_target(target, overwrite)

    # The IsoMax+ heads' normalised prototypes are computed once, here: the
    # signatures (traced in `write_out`) capture them, so they are saved with
    # the model (once: not as a tracked Keras variable, whose checkpoint
    # would hold its value twice), and do a Dense head's product on them.
    with _serving.inference_snapshots(model):
        archive = keras.export.ExportArchive()
        archive.track(model)
        if detector is not None:
            archive.track(detector)  # Its fitted state and `threshold` variable.
        for name in (SERVING_DEFAULT, SCORE):
            archive.add_endpoint(name, functions[name], input_signature=[input_spec])

        if remote:
            return _write_remote(archive, target, verbose)
        parent = os.path.dirname(target)
        os.makedirs(parent, exist_ok=True)
        # A sibling of the target (same file system, so the renames are atomic)
        # whose name TF Serving ignores (it loads all-digit names only). os.mkdir
        # honours the umask; tempfile.mkdtemp would make it 0700.
        staging = os.path.join(parent, f".{os.path.basename(target)}.tmp-{uuid.uuid4().hex}")
        os.mkdir(staging)
        try:
            archive.write_out(staging, verbose=verbose)
            _check_target(target, overwrite)  # Unchanged while we wrote?
            _swap_in(staging, target)
        finally:
            if os.path.lexists(staging):
                shutil.rmtree(staging, ignore_errors=True)  # Ours: the staged copy.
        return target


# What TensorFlow writes into a SavedModel directory. `overwrite=True`
# replaces a directory holding these entries only (`assets.extra`, where TF
# Serving's warm-up requests go, is written by users, not by TensorFlow).
SAVED_MODEL_ENTRIES = frozenset(
    {"saved_model.pb", "saved_model.pbtxt", "fingerprint.pb", "variables", "assets"}
)


def _swap_in(staging, target):
    """Renames `staging` to `target`; an old target is removed only afterwards."""
    aside = None
    if os.path.lexists(target):
        aside = os.path.join(
            os.path.dirname(target), f".{os.path.basename(target)}.old-{uuid.uuid4().hex}"
        )
        os.replace(target, aside)
    try:
        os.replace(staging, target)
    except BaseException:
        if aside is not None:
            os.replace(aside, target)  # Put the previous model back.
        raise
    if aside is not None:
        try:
            shutil.rmtree(aside)
        except OSError as error:
            warnings.warn(
                f"The new SavedModel is in place at {target!r}, but the previous one, "
                f"moved to {aside!r}, could not be deleted: {error}",
                stacklevel=3,
            )


def _write_remote(archive, target, verbose):
    """Writes to a remote file system (no atomic rename): stage, then copy over."""
    import tensorflow as tf

    staging = f"{target.rstrip('/')}.tmp-{uuid.uuid4().hex}"
    try:
        archive.write_out(staging, verbose=verbose)
        if tf.io.gfile.exists(target):
            tf.io.gfile.rmtree(target)  # Checked: empty, or only a SavedModel.
        tf.io.gfile.rename(staging, target)
    finally:
        if tf.io.gfile.exists(staging):
            tf.io.gfile.rmtree(staging)
    return target


def _serving_functions(model, threshold=None, input_signature=None):
    """The plain functions behind the exported signatures (tests, XLA checks).

    Each function maps a batch of inputs (a TensorFlow tensor) to the dict of
    outputs of its signature; see `export_saved_model`. They are not
    `tf.function`s: wrap them as needed, for example to check that the export
    compiles with XLA (for TPUs):

    ```python
    fns = _serving_functions(model)
    tf.function(fns["score"], jit_compile=True)(x)
    ```

    Args:
        model: The model, as for `export_saved_model`.
        threshold: As for `export_saved_model`. Defaults to `None`.
        input_signature: As for `export_saved_model`. Defaults to `None`.

    Returns:
        A dict `{"serving_default": fn, "score": fn}`.

    Raises:
        TypeError, ValueError: As `export_saved_model`.
    """
    functions, _ = _build_serving_functions(model, threshold, "inputs", input_signature)
    functions.pop("_compute")
    return functions


def _build_serving_functions(model, threshold, input_name, input_signature, detector=None):
    """Validates the arguments; returns the signature functions and input spec."""
    _check_backend()
    import tensorflow as tf

    _checks.check_exportable(model)
    if not isinstance(input_name, str) or not input_name.isidentifier():
        raise ValueError(
            f"`input_name` must be a valid identifier string. Received: input_name={input_name!r}"
        )
    if detector is not None:
        return _detector_functions(model, threshold, input_name, input_signature, detector)
    layer = find_isomax_layer(model)
    _check_output_is_isomax(model, layer)
    input_spec = _input_spec(model, input_name, input_signature)
    threshold_fn = _threshold_reader(layer, threshold)

    def compute(inputs):
        # Serving runtimes feed the graph directly: check the shape there,
        # with a clear message, instead of failing deep inside the model.
        inputs = tf.ensure_shape(inputs, input_spec.shape)
        logits = model(inputs, training=False)
        if not tf.is_tensor(logits):
            raise ValueError(
                "The model must return a single logits tensor. Received: "
                f"model output of type {type(logits).__name__}"
            )
        if logits.shape.rank != 2 or logits.shape[-1] != layer.num_classes:
            raise ValueError(
                f"The model's output must be the (batch, {layer.num_classes}) logits "
                f"of IsoMaxPlusLayer '{layer.name}'. Received: output shape {logits.shape}"
            )
        logits = tf.cast(logits, tf.float32)
        return _signature_outputs(inputs, logits, tf.reduce_max(logits, axis=-1), threshold_fn())

    functions = _endpoint_functions(compute)
    functions["_compute"] = compute
    return functions, input_spec


def _signature_outputs(inputs, logits, score, limit):
    """The outputs of both signatures from the logits and the score of one batch."""
    import tensorflow as tf

    # The library, not the backbone, makes a NaN/Inf input OOD.
    decided = _serving.apply_nonfinite_rule(
        _serving.nonfinite_rows(inputs),
        score=score,
        is_ood=_serving.decide(score, limit),
        class_id=tf.argmax(logits, axis=-1, output_type=tf.int64),
        probabilities=tf.nn.softmax(logits, axis=-1),
    )
    return {"logits": logits, "threshold": tf.broadcast_to(limit, tf.shape(score)), **decided}


def _check_backend():
    if keras.backend.backend() != "tensorflow":
        raise ValueError(
            "`export_saved_model` needs the TensorFlow backend (set "
            "KERAS_BACKEND=tensorflow, or load the saved `.keras` file in a "
            "TensorFlow process). On this backend use "
            "`keras_isomax.edge.export_onnx` (ONNX, any backend). "
            f"Received: backend={keras.backend.backend()!r}"
        )


def _detector_functions(model, threshold, input_name, input_signature, detector):
    """The signature functions with the score of a fitted detector (any classifier head)."""
    import tensorflow as tf

    from keras_isomax import detectors as detectors_lib

    if not isinstance(detector, detectors_lib.Detector):
        raise TypeError(
            "`detector` must be a fitted `keras_isomax.detectors.Detector`. "
            f"Received: detector={type(detector).__name__}"
        )
    detector.bind_for_export(model, threshold)
    input_spec = _input_spec(model, input_name, input_signature)
    if threshold is None:

        def threshold_fn():
            return tf.cast(tf.convert_to_tensor(detector.threshold), tf.float32)

    else:
        threshold_fn = _threshold_reader(None, threshold)

    def compute(inputs):
        inputs = tf.ensure_shape(inputs, input_spec.shape)
        score, logits = detector.score_inputs(inputs)
        logits = tf.cast(logits, tf.float32)
        return _signature_outputs(inputs, logits, tf.cast(score, tf.float32), threshold_fn())

    functions = _endpoint_functions(compute)
    functions["_compute"] = compute
    return functions, input_spec


def _endpoint_functions(compute):
    def serving_default(inputs):
        outputs = compute(inputs)
        return {key: outputs[key] for key in SERVING_DEFAULT_OUTPUTS}

    def score(inputs):
        outputs = compute(inputs)
        return {key: outputs[key] for key in SCORE_OUTPUTS}

    return {SERVING_DEFAULT: serving_default, SCORE: score}


def _threshold_reader(layer, threshold):
    import tensorflow as tf

    if threshold is None:
        if not layer.is_calibrated:
            raise ValueError(
                f"IsoMaxPlusLayer '{layer.name}' has no calibrated OOD threshold "
                "(its `ood_threshold` is NaN). Call "
                "`keras_isomax.calibration.calibrate_threshold(model, in_val_data)` "
                "before exporting, or pass `threshold=` explicitly. "
                "Received: threshold=None"
            )
        variable = layer.ood_threshold

        def read():
            # Read at serving time from the exported variable, not baked in.
            return tf.cast(tf.convert_to_tensor(variable), tf.float32)

        return read
    value = _checks.parse_threshold(threshold)
    return lambda: tf.constant(value, tf.float32)


def _check_output_is_isomax(model, layer):
    outputs = getattr(model, "outputs", None)
    if outputs is None:
        return  # Subclassed model: checked at trace time (single tensor).
    if len(outputs) != 1:
        raise ValueError(
            "The model must have exactly one output, the IsoMaxPlusLayer's "
            f"logits. Received: model '{model.name}' with {len(outputs)} outputs"
        )
    producer = _graph.producer(outputs[0])
    if producer is not layer:
        name = getattr(producer, "name", repr(producer))
        raise ValueError(
            f"The output of model '{model.name}' must be the logits of its "
            f"IsoMaxPlusLayer '{layer.name}' (the score and probabilities are "
            "computed from them at export). Remove layers after it, such as a "
            "softmax. Received: output produced by layer "
            f"'{name}'"
        )


def _input_spec(model, input_name, input_signature):
    import tensorflow as tf

    shape, dtype = _graph.input_shape_and_dtype(model, input_signature, "export_saved_model")
    return tf.TensorSpec((None,) + shape[1:], tf.as_dtype(dtype), name=input_name)


def _check_target(target, overwrite):
    """Refuses targets that are files, foreign directories or the working directory."""
    import tensorflow as tf

    if not tf.io.gfile.exists(target):
        return
    if not tf.io.gfile.isdir(target):
        raise FileExistsError(
            f"The export target exists and is not a directory. Received: export path {target!r}"
        )
    entries = sorted(name.rstrip("/") for name in tf.io.gfile.listdir(target))
    if not entries:
        return
    is_saved_model = "saved_model.pb" in entries or "saved_model.pbtxt" in entries
    foreign = [name for name in entries if name not in SAVED_MODEL_ENTRIES]
    if not is_saved_model or foreign:
        shown = foreign if is_saved_model else entries
        listing = ", ".join(repr(name) for name in shown[:10])
        if len(shown) > 10:
            listing += f" and {len(shown) - 10} more"
        raise FileExistsError(
            f"The export target {target!r} holds "
            + ("files that are not part of a SavedModel" if is_saved_model else "no SavedModel")
            + f" ({listing}); it is never replaced, even with overwrite=True. Choose an "
            "empty or new directory. Received: overwrite="
            f"{overwrite}"
        )
    if not overwrite:
        raise FileExistsError(
            f"The export target {target!r} holds a SavedModel; pass overwrite=True to "
            f"replace it. Received: overwrite={overwrite}"
        )
    if "://" not in target:
        cwd = os.path.realpath(os.getcwd())
        real = os.path.realpath(target)
        if cwd == real or cwd.startswith(real.rstrip(os.sep) + os.sep):
            raise FileExistsError(
                f"The export target {target!r} is the working directory (or holds it); "
                "it is never replaced. Choose another directory. "
                f"Received: export path {target!r}"
            )

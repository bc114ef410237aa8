"""Edge exports: one LiteRT (`.tflite`) or ONNX (`.onnx`) file per model.

Both artifacts have the outputs of the SavedModel's `score` signature (see
`keras_isomax.export`), on one input with a dynamic batch size:

- `score` (B,) float32: the minimum distance score (the largest IsoMax+ logit;
  higher means more in-distribution);
- `is_ood` (B,) bool: `not (score >= threshold)`, so a NaN score is OOD;
- `threshold` (B,) float32: the threshold, carried inside the artifact as a
  constant and repeated per example;
- `class_id` (B,) int64 (int32 from the JAX backend unless `jax_enable_x64`):
  the arg-max class (the first on ties), -1 where `score` is NaN;
- `probabilities` (B, C) float32: `softmax(logits)`.

An example whose input holds NaN or Inf anywhere gets `score` NaN, `is_ood`
True, `class_id` -1 and NaN `probabilities`, whatever the CPU's kernels do
with NaN inside the backbone (the decision is taken from the input itself).

- `export_litert` needs the TensorFlow backend and converts with LiteRT's
  builtin operators only (no Flex delegate, so the file runs on a phone with
  the plain LiteRT runtime).
- `export_onnx` works from the TensorFlow (`tf2onnx`), PyTorch (`torch.onnx`)
  and JAX (`jax2onnx`) backends, through Keras' own ONNX export.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tempfile

import keras
from keras import ops

from keras_isomax import _serving
from keras_isomax._checks import check_exportable, parse_threshold
from keras_isomax._graph import input_shape_and_dtype
from keras_isomax._serving import inference_snapshots
from keras_isomax.head import find_isomax_layer

OUTPUT_NAMES = ("score", "is_ood", "threshold", "class_id", "probabilities")


def export_litert(
    model, path, threshold=None, *, detector=None, input_signature=None, overwrite=False
):
    """Exports an IsoMax+ classifier as one LiteRT (TensorFlow Lite) file.

    The file has one signature, `score`, with one input named `inputs`
    (dynamic batch size) and the outputs listed in `keras_isomax.edge`. Only
    LiteRT builtin operators are used: the file runs with the plain LiteRT
    interpreter (`ai_edge_litert.interpreter.Interpreter` or
    `tf.lite.Interpreter`), without the Flex (TensorFlow ops) delegate.

    Args:
        model: As in `keras_isomax.export_saved_model`.
        path: File to write (conventionally ending in `.tflite`).
        threshold: As in `export_saved_model`, but always carried inside the
            file as a constant. Defaults to `None`.
        detector: As in `export_saved_model`; its fitted state is carried
            inside the file as constants. Defaults to `None`.
        input_signature: As in `export_saved_model`. Defaults to `None`.
        overwrite: Whether to replace an existing file at `path`. Defaults to
            `False`.

    Returns:
        The path (a `str`) written.

    Raises:
        RuntimeError: If the Keras backend is not TensorFlow.
        ValueError: If the model is not an IsoMax+ classifier, the threshold
            is not calibrated with `threshold=None`, or the backbone uses an
            operation that LiteRT builtins do not have.
        FileExistsError: If `path` exists and `overwrite=False`.

    Example:

    >>> import os, tempfile, numpy as np, keras
    >>> from keras_isomax import IsoMaxPlusLayer
    >>> from keras_isomax.edge import export_litert
    >>> model = keras.Sequential([keras.Input((4,)), IsoMaxPlusLayer(3)])
    >>> path = os.path.join(tempfile.mkdtemp(), "model.tflite")
    >>> export_litert(model, path, threshold=-0.5) == path
    True
    """
    if keras.backend.backend() != "tensorflow":
        raise RuntimeError(
            "`export_litert` needs the TensorFlow backend (LiteRT converts "
            "TensorFlow graphs). Save the model with `model.save('m.keras')`, "
            "load it in a process with KERAS_BACKEND=tensorflow and export "
            "there, or use `export_onnx`, which works on every backend. "
            f"Received: backend={keras.backend.backend()!r}"
        )
    import tensorflow as tf

    path = _check_path(path, overwrite)
    wrapper, spec = _prepare(model, threshold, input_signature, detector)

    def score(inputs):
        return dict(zip(OUTPUT_NAMES, wrapper(inputs), strict=True))

    # Keras' own LiteRT route (ExportArchive -> SavedModel -> converter), with
    # the endpoint named `score` and builtin operators only.
    archive = keras.export.ExportArchive()
    archive.track(wrapper)
    with tempfile.TemporaryDirectory(prefix="keras-isomax-litert-") as staging:
        with inference_snapshots(model):  # Traced with the prototypes normalised once.
            archive.add_endpoint(
                "score",
                score,
                input_signature=[
                    tf.TensorSpec((None,) + spec.shape[1:], spec.dtype, name="inputs")
                ],
            )
            archive.write_out(staging, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(staging, signature_keys=["score"])
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        try:
            flatbuffer = converter.convert()
        except Exception as error:  # The converter raises ConverterError and others.
            raise ValueError(
                "The model cannot be converted to LiteRT with builtin operators "
                "only (a layer in the backbone uses a TensorFlow op that LiteRT "
                "lacks; replace that layer, or export with `export_onnx` or "
                "`export_saved_model`). Converter message: "
                f"{_first_lines(error)}. Received: model={model.name}"
            ) from error
    _write_staged(path, lambda target: _write_bytes(target, flatbuffer))
    return path


def export_onnx(
    model,
    path,
    threshold=None,
    *,
    detector=None,
    input_signature=None,
    opset_version=None,
    overwrite=False,
):
    """Exports an IsoMax+ classifier as one ONNX file, from any Keras backend.

    The graph has one input named `inputs` (dynamic batch size) and the
    outputs listed in `keras_isomax.edge`, in that order and under those names.
    It is written by Keras' ONNX export: `tf2onnx` on TensorFlow, `torch.onnx`
    on PyTorch, `jax2onnx` on JAX.

    Args:
        model: As in `keras_isomax.export_saved_model`.
        path: File to write (conventionally ending in `.onnx`).
        threshold: As in `export_litert`. Defaults to `None`.
        detector: As in `export_litert`. Defaults to `None`.
        input_signature: As in `export_saved_model`. Defaults to `None`.
        opset_version: ONNX opset, or `None` for the converter's default.
            Defaults to `None`.
        overwrite: Whether to replace an existing file at `path`. Defaults to
            `False`.

    Returns:
        The path (a `str`) written.

    Raises:
        ImportError: If the converter for the current backend or `onnx` is
            not installed (`pip install "keras-isomax[edge]"`).
        ValueError: If the model is not an IsoMax+ classifier, the threshold
            is not calibrated with `threshold=None`, or the converter fails on
            a layer of the backbone.
        FileExistsError: If `path` exists and `overwrite=False`.
    """
    backend = keras.backend.backend()
    needed = {"tensorflow": "tf2onnx", "torch": "onnxscript", "jax": "jax2onnx"}.get(backend)
    for module in ("onnx", needed):
        if module is None:
            raise RuntimeError(
                "`export_onnx` supports the TensorFlow, PyTorch and JAX backends. "
                f"Received: backend={backend!r}"
            )
        if importlib.util.find_spec(module) is None:
            raise ImportError(
                f"`export_onnx` on the {backend} backend needs the `{module}` "
                'package: pip install "keras-isomax[edge]" '
                f"(or pip install {module}). Received: backend={backend!r}"
            )
    import onnx

    path = _check_path(path, overwrite)
    wrapper, spec = _prepare(model, threshold, input_signature, detector)
    spec = keras.InputSpec(shape=(None,) + spec.shape[1:], dtype=spec.dtype, name="inputs")
    # The TensorFlow inference cache is left out of converted graphs (elsewhere there is none).
    tensorflow = backend == "tensorflow"

    def snapshots():
        return inference_snapshots(model) if tensorflow else contextlib.nullcontext()

    def write(target):
        try:
            with snapshots():
                wrapper.export(
                    target,
                    format="onnx",
                    input_signature=[spec],
                    opset_version=opset_version,
                    verbose=False,
                )
        except Exception as error:
            raise ValueError(
                f"The ONNX converter of the {backend} backend failed on the "
                "model (a layer in the backbone it cannot convert?). Export "
                "from another backend (load the `.keras` file there) or replace "
                f"that layer. Converter message: {_first_lines(error)}. "
                f"Received: model={model.name}"
            ) from error
        proto = onnx.load(target)
        _name_outputs(proto)
        onnx.save(proto, target)

    _write_staged(path, write)
    return path


def score_outputs(model, inputs, threshold):
    """The edge artifacts' computation in `keras.ops`, on any backend.

    The non-finite rule is `keras_isomax._serving`'s, the same as in the
    SavedModel and `predict_ood`.

    Args:
        model: The IsoMax+ classifier (its output is the logits).
        inputs: A batch of inputs.
        threshold: The threshold (a Python float).

    Returns:
        A tuple of tensors in the order of `OUTPUT_NAMES`.
    """
    x = ops.convert_to_tensor(inputs)
    logits = ops.cast(model(x, training=False), "float32")
    return _outputs(x, logits, ops.max(logits, axis=-1), threshold)


def _outputs(x, logits, score, threshold):
    """`OUTPUT_NAMES` from the inputs, logits and score, with the non-finite rule."""
    # The first index of the maximum, from comparisons: Keras' TensorFlow
    # argmax bitcasts floats (no LiteRT builtin, no ONNX op).
    hits = logits >= ops.max(logits, axis=-1, keepdims=True)
    class_id = ops.argmax(ops.cast(hits, "int32"), axis=-1)
    # A row of NaN logits (overflow inside a backbone fed finite inputs) has
    # no maximum: -1, as for a non-finite input.
    class_id = ops.where(ops.any(hits, axis=-1), class_id, _serving.NONFINITE_CLASS_ID)
    score = ops.cast(score, "float32")
    limit = ops.full_like(score, threshold)
    decided = _serving.apply_nonfinite_rule(
        _serving.nonfinite_rows(x),
        score=score,
        is_ood=_serving.decide(score, limit),
        class_id=ops.cast(class_id, "int64"),
        probabilities=ops.softmax(logits, axis=-1),
    )
    return tuple(limit if name == "threshold" else decided[name] for name in OUTPUT_NAMES)


class _ScoreModel(keras.Model):
    """Wraps the classifier (and detector); returns the `score` outputs as a tuple."""

    def __init__(self, model, threshold, detector=None, **kwargs):
        super().__init__(**kwargs)
        self.model = model
        self.threshold = threshold
        self.detector = detector

    def call(self, inputs):
        if self.detector is None:
            return score_outputs(self.model, inputs, self.threshold)
        x = ops.convert_to_tensor(inputs)
        score, logits = self.detector.score_inputs(x, self.model)
        return _outputs(x, ops.cast(logits, "float32"), score, self.threshold)


def _prepare(model, threshold, input_signature, detector=None):
    check_exportable(model)
    outputs = getattr(model, "outputs", None)
    if outputs is not None and len(outputs) != 1:
        raise ValueError(
            "The model must have exactly one output, the classifier's logits "
            f"(or probabilities). Received: model '{model.name}' with {len(outputs)} outputs"
        )
    if detector is not None:
        value, num_classes = _detector_threshold(model, detector, threshold)
        layer_name = None
    else:
        layer = find_isomax_layer(model)
        value, num_classes, layer_name = (
            _threshold_value(layer, threshold),
            layer.num_classes,
            layer.name,
        )
    spec = _input_spec(model, input_signature)
    wrapper = _ScoreModel(model, value, detector, name=f"{model.name}_score")
    # Build the wrapper (and check the output) with one symbolic call.
    symbolic = wrapper(keras.KerasTensor((None,) + spec.shape[1:], dtype=spec.dtype))
    if symbolic[-1].shape[-1] != num_classes:
        raise ValueError(
            f"The model's output must be the (batch, {num_classes}) logits "
            f"of IsoMaxPlusLayer '{layer_name}'. Received: output shape "
            f"{symbolic[-1].shape}"
        )
    return wrapper, spec


def _detector_threshold(model, detector, threshold):
    """Binds a fitted detector to `model`; its threshold and number of classes."""
    from keras_isomax import detectors as detectors_lib

    if not isinstance(detector, detectors_lib.Detector):
        raise TypeError(
            "`detector` must be a fitted `keras_isomax.detectors.Detector`. "
            f"Received: detector={type(detector).__name__}"
        )
    num_classes = detector.bind_for_export(model, threshold)
    if threshold is None:
        return float(ops.convert_to_numpy(detector.threshold)), num_classes
    return _threshold_value(None, threshold), num_classes


def _threshold_value(layer, threshold):
    if threshold is None:
        if not layer.is_calibrated:
            raise ValueError(
                f"IsoMaxPlusLayer '{layer.name}' has no calibrated OOD threshold "
                "(its `ood_threshold` is NaN). Call "
                "`keras_isomax.calibrate_threshold(model, in_val_data)` before "
                "exporting, or pass `threshold=` explicitly. Received: threshold=None"
            )
        return float(ops.convert_to_numpy(layer.ood_threshold))
    return parse_threshold(threshold, finite=True)


def _input_spec(model, input_signature):
    shape, dtype = input_shape_and_dtype(model, input_signature, "export_litert/export_onnx")
    return keras.InputSpec(shape=shape, dtype=dtype)


def _name_outputs(proto):
    """Renames the graph outputs (positional) to `OUTPUT_NAMES`."""
    import onnx

    graph = proto.graph
    if len(graph.output) != len(OUTPUT_NAMES):
        raise ValueError(
            f"The converter wrote {len(graph.output)} outputs, expected "
            f"{len(OUTPUT_NAMES)}. Received: outputs "
            f"{[output.name for output in graph.output]}"
        )
    for output, name in zip(list(graph.output), OUTPUT_NAMES, strict=True):
        if output.name == name:
            continue
        graph.node.append(onnx.helper.make_node("Identity", [output.name], [name]))
        output.name = name


def _check_path(path, overwrite):
    path = os.fspath(path)
    if not isinstance(overwrite, bool):
        raise TypeError(f"`overwrite` must be a bool. Received: overwrite={overwrite!r}")
    if os.path.isdir(path):
        raise FileExistsError(f"The export path is a directory. Received: path={path!r}")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(
            f"'{path}' exists; pass overwrite=True to replace it. Received: overwrite=False"
        )
    return path


def _write_staged(path, write):
    """Writes through a temporary file in the same directory, then renames."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".keras-isomax-", dir=directory)
    try:
        target = os.path.join(staging, os.path.basename(path))
        write(target)
        os.replace(target, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_bytes(target, data):
    with open(target, "wb") as f:
        f.write(data)


def _first_lines(error, limit=600):
    text = f"{type(error).__name__}: {error}".strip()
    return text if len(text) <= limit else text[:limit] + " ..."

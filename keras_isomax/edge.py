"""Edge exports: one LiteRT (`.tflite`) or ONNX (`.onnx`) file per model.

Both files have the outputs of the SavedModel's `score` signature
(`OUTPUT_NAMES`, the same tuple as `keras_isomax.export.SCORE_OUTPUTS`; see
`keras_isomax.export` for what each computes), on one input named `inputs`
with a dynamic batch size. The threshold is carried inside the file as a
constant. On the JAX backend without `jax_enable_x64`, `class_id` is int32.

- `export_litert` needs the TensorFlow backend and converts with LiteRT's
  builtin operators only (no Flex delegate, so the file runs on a phone with
  the plain LiteRT runtime).
- `export_onnx` works from the TensorFlow (`tf2onnx`), PyTorch (`torch.onnx`)
  and JAX (`jax2onnx`) backends, through Keras' own ONNX export.

Both write the file next to `path` and rename it into place once complete: a
failed export leaves an existing file untouched.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import keras

from keras_isomax import _served_outputs

if TYPE_CHECKING:
    from keras_isomax.detectors import Detector

OUTPUT_NAMES = _served_outputs.SCORE_OUTPUTS
"""The files' outputs, in this order (ONNX graph outputs, LiteRT signature outputs)."""


def export_litert(
    model: keras.Model,
    path: str | os.PathLike,
    threshold: float | None = None,
    *,
    detector: Detector | None = None,
    input_signature: Any = None,
    overwrite: bool = False,
) -> str:
    """Exports an IsoMax+ classifier as one LiteRT (TensorFlow Lite) file.

    The file has one signature, `score`, with one input named `inputs`
    (dynamic batch size) and the outputs `OUTPUT_NAMES`. Only LiteRT builtin
    operators are used: the file runs with the plain LiteRT interpreter
    (`ai_edge_litert.interpreter.Interpreter` or `tf.lite.Interpreter`),
    without the Flex (TensorFlow ops) delegate.

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
        FileExistsError: If `path` exists and `overwrite=False`, or is a
            directory.

    Example:

    >>> import os, tempfile, numpy as np, keras
    >>> from keras_isomax import IsoMaxPlusLayer, export_litert
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
    path = _check_path(path, overwrite)
    served = _served_outputs.Served(model, threshold, detector, constant=True)
    shape, dtype = _served_outputs.input_shape_and_dtype(model, input_signature, "export_litert")
    from keras_isomax import _tf_export  # TensorFlow only.

    flatbuffer = _tf_export.litert_flatbuffer(served, shape, dtype, model.name)
    _write_staged(path, overwrite, lambda target: _write_bytes(target, flatbuffer))
    return path


def export_onnx(
    model: keras.Model,
    path: str | os.PathLike,
    threshold: float | None = None,
    *,
    detector: Detector | None = None,
    input_signature: Any = None,
    opset_version: int | None = None,
    overwrite: bool = False,
) -> str:
    """Exports an IsoMax+ classifier as one ONNX file, from any Keras backend.

    The graph has one input named `inputs` (dynamic batch size) and the
    outputs `OUTPUT_NAMES`, in that order and under those names. It is
    written by Keras' ONNX export: `tf2onnx` on TensorFlow, `torch.onnx` on
    PyTorch, `jax2onnx` on JAX.

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
        FileExistsError: If `path` exists and `overwrite=False`, or is a
            directory.

    Example:

    >>> import numpy as np, keras, onnxruntime
    >>> from keras_isomax import IsoMaxPlusLayer, calibrate_threshold, export_onnx
    >>> model = keras.Sequential([keras.Input((4,)), IsoMaxPlusLayer(3)])
    >>> x = np.random.default_rng(0).normal(size=(100, 4)).astype("float32")
    >>> _ = calibrate_threshold(model, x, tpr=0.95, verbose=0)
    >>> path = export_onnx(model, "model.onnx")  # doctest: +SKIP
    >>> session = onnxruntime.InferenceSession(path)  # doctest: +SKIP
    >>> score, is_ood, threshold, class_id, probabilities = session.run(
    ...     None, {"inputs": x[:8]})  # doctest: +SKIP
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
    served = _served_outputs.Served(model, threshold, detector, constant=True)
    shape, dtype = _served_outputs.input_shape_and_dtype(model, input_signature, "export_onnx")
    wrapper = _ScoreModel(served, name=f"{model.name}_score")
    # Builds the wrapper, and checks the model's output, with one symbolic call.
    wrapper(keras.KerasTensor(shape, dtype=dtype))
    spec = keras.InputSpec(shape=shape, dtype=dtype, name="inputs")

    def write(target: str) -> None:
        try:
            # The TensorFlow inference cache is left out of converted graphs.
            with served.snapshots():
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

    _write_staged(path, overwrite, write)
    return path


class _ScoreModel(keras.Model):
    """The served computation as a Keras model (what Keras' ONNX export takes)."""

    def __init__(self, served: _served_outputs.Served, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.served = served
        self.model = served.model  # Tracked: the ONNX converters read its variables.
        self.detector = served.detector

    def call(self, inputs: Any) -> tuple[Any, ...]:
        outputs = self.served(inputs)
        return tuple(outputs[name] for name in OUTPUT_NAMES)


def _name_outputs(proto: Any) -> None:
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


def _check_path(path: str | os.PathLike, overwrite: bool) -> str:
    path = os.fspath(path)
    if not isinstance(overwrite, bool):
        raise TypeError(f"`overwrite` must be a bool. Received: overwrite={overwrite!r}")
    if os.path.isdir(path):
        raise FileExistsError(f"The export path is a directory. Received: path={path!r}")
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(
            f"'{path}' exists; pass overwrite=True to replace it. Received: overwrite=False"
        )
    return path


def _write_staged(path: str, overwrite: bool, write: Callable[[str], None]) -> None:
    """Writes into a private directory next to `path`, then renames the file into place.

    `path` changes only by that rename (atomic: same file system), after a
    complete write; on failure the staging directory, which holds only what
    `write` wrote, is removed and `path` is as it was.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".keras-isomax-", dir=directory)
    try:
        target = os.path.join(staging, os.path.basename(path))
        write(target)
        if overwrite:
            os.replace(target, path)
            return
        try:
            os.link(target, path)  # Fails if `path` appeared meanwhile: never replaces it.
        except FileExistsError:
            _check_path(path, overwrite)  # Raises its FileExistsError.
            raise
        except OSError:  # A file system without hard links.
            _check_path(path, overwrite)
            os.replace(target, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_bytes(target: str, data: bytes) -> None:
    with open(target, "wb") as f:
        f.write(data)


def _first_lines(error: BaseException, limit: int = 600) -> str:
    text = f"{type(error).__name__}: {error}".strip()
    return text if len(text) <= limit else text[:limit] + " ..."

"""Exports for serving: SavedModel (TF Serving), LiteRT and ONNX.

Every export serves the same outputs, computed the same way:

- `score` (B,) float32: the minimum distance score (the largest IsoMax+
  logit; higher = more in-distribution), or a fitted detector's score;
- `is_ood` (B,) bool: `not (score >= threshold)`, so a NaN score is OOD;
- `threshold` (B,) float32: the threshold, repeated per example;
- `class_id` (B,) int64: the first index of the largest logit, -1 where the
  logits hold NaN;
- `probabilities` (B, C) float32: `softmax(logits)`;
- `logits` (B, C) float32 (SavedModel `serving_default` only).

An example whose input holds NaN or Inf anywhere gets `score` NaN, `is_ood`
True, `class_id` -1 and NaN `probabilities`, whatever the backbone makes of
it. `SERVING_DEFAULT_OUTPUTS` and `SCORE_OUTPUTS` name the outputs of the
SavedModel's two signatures; the LiteRT and ONNX files have the `score`
outputs. `serving_function` computes all of them in-process, on any backend.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import keras

from keras_isomax import _checks, _served_outputs
from keras_isomax._served_outputs import SCORE_OUTPUTS, SERVING_DEFAULT_OUTPUTS
from keras_isomax.edge import export_litert, export_onnx

if TYPE_CHECKING:
    from keras_isomax.detectors import Detector

__all__ = [
    "SCORE_OUTPUTS",
    "SERVING_DEFAULT_OUTPUTS",
    "export_litert",
    "export_onnx",
    "export_saved_model",
    "serving_function",
]


def export_saved_model(
    model: keras.Model,
    export_dir: str | os.PathLike,
    threshold: float | None = None,
    version: int | None = None,
    input_name: str = "inputs",
    input_signature: Any = None,
    jit_compile: bool = False,
    overwrite: bool = False,
    verbose: bool = False,
    detector: Detector | None = None,
) -> str:
    """Exports an IsoMax+ classifier as a TF Serving-ready SavedModel.

    The SavedModel (tag `serve`) has two signatures on one input named
    `input_name`, with the model's input shape and dtype and any batch size:

    - `serving_default`: `probabilities`, `logits`, `class_id`;
    - `score`: `score`, `is_ood`, `threshold`, `class_id`, `probabilities`.

    The outputs are described in `keras_isomax.export`. The server needs
    TensorFlow only (no Keras, no keras-isomax). The SavedModel is written
    next to the target and renamed into place once complete; an existing one
    is replaced (with `overwrite=True`) only after that. docs/serving.md has
    the TF Serving requests and responses.

    Args:
        model: A built `keras.Model` with one input and one output: the logits
            of its one `IsoMaxPlusLayer` (or, with `detector`, of any
            classifier the detector was fitted on).
        export_dir: Directory to write: the SavedModel itself with
            `version=None`, otherwise a TF Serving model base path.
        threshold: OOD threshold on the score. `None` serves the layer's
            calibrated `ood_threshold` (see `calibrate_threshold`), read from
            the saved variable when a request runs; a number is written into
            the graph as a constant. With `detector`, a threshold on the
            detector's score, and `None` serves the detector's calibrated
            `threshold`. Defaults to `None`.
        version: Non-negative integer: the SavedModel goes to
            `export_dir/<version>/`. `None` writes into `export_dir`.
            Defaults to `None`.
        input_name: Name of the signatures' input (the key in requests).
            Defaults to `"inputs"`.
        input_signature: Shape and dtype of one input (`keras.InputSpec`,
            `tf.TensorSpec` or `KerasTensor`), needed only for models without
            symbolic inputs (subclassed models). The batch dimension is made
            dynamic. Defaults to `None`.
        jit_compile: Whether both signatures compile with XLA. Defaults to
            `False`.
        overwrite: Whether to replace an existing SavedModel at the target
            (a directory holding anything else is never replaced). Defaults
            to `False`.
        verbose: Whether to print the endpoints written. Defaults to `False`.
        detector: A fitted `keras_isomax.detectors.Detector` whose score
            replaces the minimum distance score; its fitted state is saved
            with the model. Defaults to `None`.

    Returns:
        The path (a `str`) of the SavedModel directory written.

    Raises:
        TypeError: If `model` is not a `keras.Model` or an argument has the
            wrong type.
        ValueError: If the Keras backend is not TensorFlow (use
            `export_onnx`), the model is not a single-input, single-output
            IsoMax+ classifier, the threshold is uncalibrated with
            `threshold=None`, or `threshold`, `version`, `input_name` or
            `export_dir` is invalid.
        FileExistsError: If the target holds anything but a SavedModel, is
            the working directory, or holds a SavedModel and
            `overwrite=False`.

    Example:

    >>> import os, tempfile, numpy as np, keras
    >>> from keras_isomax import IsoMaxPlusLayer, calibrate_threshold, export_saved_model
    >>> model = keras.Sequential([keras.Input((4,)), IsoMaxPlusLayer(3)])
    >>> x = np.random.default_rng(0).normal(size=(100, 4)).astype("float32")
    >>> _ = calibrate_threshold(model, x, tpr=0.95, verbose=0)
    >>> base = os.path.join(tempfile.mkdtemp(), "my_model")
    >>> path = export_saved_model(model, base, version=1)
    >>> os.path.relpath(path, base)  # tensorflow_model_server --model_base_path=base
    '1'
    """
    if keras.backend.backend() != "tensorflow":
        raise ValueError(
            "`export_saved_model` needs the TensorFlow backend (set "
            "KERAS_BACKEND=tensorflow, or load the saved `.keras` file in a "
            "TensorFlow process). On this backend use "
            "`keras_isomax.export_onnx` (ONNX, any backend). "
            f"Received: backend={keras.backend.backend()!r}"
        )
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
    served = _served_outputs.Served(model, threshold, detector)
    if not isinstance(input_name, str) or not input_name.isidentifier():
        raise ValueError(
            f"`input_name` must be a valid identifier string. Received: input_name={input_name!r}"
        )
    shape, dtype = _served_outputs.input_shape_and_dtype(
        model, input_signature, "export_saved_model"
    )
    from keras_isomax import _tf_export  # TensorFlow only.

    return _tf_export.write_saved_model(
        served,
        export_dir if version is None else os.path.join(export_dir, str(version)),
        input_name=input_name,
        shape=shape,
        dtype=dtype,
        jit_compile=jit_compile,
        overwrite=overwrite,
        verbose=verbose,
    )


def serving_function(
    model: keras.Model, threshold: float | None = None, *, detector: Detector | None = None
) -> Callable[[Any], dict[str, Any]]:
    """Returns what every export serves as a function, for use in-process on any backend.

    The function computes, from a batch of inputs, the outputs of the
    SavedModel's signatures and of the LiteRT/ONNX files (see
    `keras_isomax.export`), as backend tensors. The model, threshold and
    detector are checked once, here. The function is traceable: wrap it in
    `tf.function` (for example with `jit_compile=True` to check that a model
    compiles with XLA, as TPUs need), in `jax.jit`, or add it as an endpoint
    of your own `keras.export.ExportArchive`.

    Args:
        model: The classifier, as for `export_saved_model`.
        threshold: As for `export_saved_model`: `None` serves the calibrated
            threshold of the layer (or of `detector`), read on every call.
            Defaults to `None`.
        detector: As for `export_saved_model`. Defaults to `None`.

    Returns:
        A function `inputs -> dict` whose dict holds `score`, `is_ood`,
        `threshold`, `class_id`, `probabilities` and `logits`.

    Raises:
        TypeError, ValueError: As `export_saved_model`, for the model, the
            threshold and the detector.

    Example:

    >>> import numpy as np, keras
    >>> from keras_isomax import IsoMaxPlusLayer
    >>> from keras_isomax.export import serving_function
    >>> model = keras.Sequential([keras.Input((4,)), IsoMaxPlusLayer(3)])
    >>> serve = serving_function(model, threshold=-0.5)
    >>> x = np.array([[0.1, 0.2, 0.3, 0.4], [np.nan, 0.0, 0.0, 0.0]], "float32")
    >>> out = serve(x)
    >>> int(out["class_id"][1]), bool(out["is_ood"][1])
    (-1, True)
    """
    served = _served_outputs.Served(model, threshold, detector)

    def serving_outputs(inputs: Any) -> dict[str, Any]:
        return served(inputs)

    return serving_outputs

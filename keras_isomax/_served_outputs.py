"""What every export serves: the output names, the threshold and the computation.

The SavedModel (`export.py` through `_tf_export.py`), the LiteRT and ONNX
files (`edge.py`) and `keras_isomax.export.serving_function` all compute their
outputs with `Served` below, so a new output or format is added here once.
Backend-neutral: `keras.ops` only, and the per-row rules of `_serving`
(non-finite inputs, class ids), which every converter keeps exact.
"""

from __future__ import annotations

import contextlib
from typing import Any

import keras
from keras import ops

from keras_isomax import _checks, _graph, _serving
from keras_isomax import detectors as detectors_lib
from keras_isomax._typing import ArrayLike, Tensor
from keras_isomax.head import find_isomax_layer

SERVING_DEFAULT_OUTPUTS = ("probabilities", "logits", "class_id")
"""Outputs of the SavedModel's `serving_default` signature, in this order."""

SCORE_OUTPUTS = ("score", "is_ood", "threshold", "class_id", "probabilities")
"""Outputs of the SavedModel's `score` signature and of the LiteRT/ONNX files."""

SAVED_MODEL_SIGNATURES = {"serving_default": SERVING_DEFAULT_OUTPUTS, "score": SCORE_OUTPUTS}
"""The SavedModel's signatures and their outputs."""

LITERT_SIGNATURES = {"score": SCORE_OUTPUTS}
"""The LiteRT file's one signature (ONNX graphs have no names: the outputs only)."""


def resolve_threshold(threshold: Any, layer: Any = None) -> Any:
    """The threshold an export serves: an explicit float, or the layer's variable.

    A threshold must be finite: LiteRT's converter turns an infinite
    constant into the largest float, so +-Inf would serve differently there.

    Args:
        threshold: `None` or a finite real number.
        layer: The model's `IsoMaxPlusLayer`, read when `threshold` is `None`.

    Returns:
        A Python float, or the layer's `ood_threshold` variable (read when
        the served graph runs).

    Raises:
        TypeError: If `threshold` is not a real number.
        ValueError: If it is not finite, or `None` and the layer is not
            calibrated.
    """
    if threshold is not None:
        return _checks.parse_threshold(threshold, finite=True)
    if not layer.is_calibrated:
        raise ValueError(
            f"IsoMaxPlusLayer '{layer.name}' has no calibrated OOD threshold "
            "(its `ood_threshold` is NaN). Call "
            "`keras_isomax.calibrate_threshold(model, in_val_data)` before "
            "exporting, or pass `threshold=` explicitly. Received: threshold=None"
        )
    return layer.ood_threshold


class Served:
    """A validated model (and detector) with the threshold it serves.

    Calling it maps a batch of inputs to every served output: `logits`
    `(B, C)`, `probabilities` `(B, C)` (`softmax(logits)`), `class_id` `(B,)`
    (`_serving.class_ids`), `score` `(B,)` (the largest logit, or the
    detector's score), `is_ood` `(B,)` (`not (score >= threshold)`) and
    `threshold` `(B,)`, with the non-finite input rule applied. Traceable on
    every backend.

    Args:
        model: A built `keras.Model` with one output: the logits of its one
            `IsoMaxPlusLayer` or, with `detector`, of any classifier the
            detector was fitted on.
        threshold: `None` (the calibrated threshold of the layer or the
            detector) or a real number.
        detector: A fitted `keras_isomax.detectors.Detector`, or `None`.
        constant: Whether a calibrated threshold is read once, now, into a
            Python float (files that carry it as a constant), instead of
            read from its variable on every call. Defaults to `False`.
    """

    def __init__(
        self,
        model: keras.Model,
        threshold: Any = None,
        detector: Any = None,
        *,
        constant: bool = False,
    ) -> None:
        _checks.check_exportable(model)
        outputs = getattr(model, "outputs", None)
        if outputs is not None and len(outputs) != 1:
            raise ValueError(
                "The model must have exactly one output, the classifier's logits. "
                f"Received: model '{model.name}' with {len(outputs)} outputs"
            )
        if detector is None:
            layer = find_isomax_layer(model)
            _check_output_is_isomax(model, layer)
            self.num_classes = layer.num_classes
            self.threshold = resolve_threshold(threshold, layer)
            self._logits_of = f"IsoMaxPlusLayer '{layer.name}'"
        else:
            if not isinstance(detector, detectors_lib.Detector):
                raise TypeError(
                    "`detector` must be a fitted `keras_isomax.detectors.Detector`. "
                    f"Received: detector={type(detector).__name__}"
                )
            # Raises if unfitted, fitted on another model, or uncalibrated with None.
            self.num_classes = detector.bind_for_export(model, threshold)
            self.threshold = (
                detector.threshold if threshold is None else resolve_threshold(threshold)
            )
            self._logits_of = f"model '{model.name}'"
        if constant and not isinstance(self.threshold, float):
            self.threshold = float(ops.convert_to_numpy(self.threshold))
        self.model = model
        self.detector = detector

    def __call__(self, inputs: ArrayLike) -> dict[str, Tensor]:
        x = inputs if ops.is_tensor(inputs) else ops.convert_to_tensor(inputs)
        if self.detector is None:
            logits, score = self.model(x, training=False), None
        else:
            score, logits = self.detector.score_inputs(x, self.model)
        if isinstance(logits, list | tuple | dict) or len(logits.shape) != 2:
            shape = getattr(logits, "shape", type(logits).__name__)
            raise ValueError(
                f"The model's output must be the (batch, {self.num_classes}) logits "
                f"of {self._logits_of}. Received: output {shape}"
            )
        if logits.shape[-1] != self.num_classes:
            raise ValueError(
                f"The model's output must be the (batch, {self.num_classes}) logits "
                f"of {self._logits_of}. Received: output shape {logits.shape}"
            )
        logits = ops.cast(logits, "float32")
        score = ops.max(logits, axis=-1) if score is None else ops.cast(score, "float32")
        limit = ops.full_like(score, self.threshold)
        decided = _serving.apply_nonfinite_rule(
            _serving.nonfinite_rows(x),
            score=score,
            is_ood=_serving.decide(score, limit),
            class_id=_serving.class_ids(logits),
            probabilities=ops.softmax(logits, axis=-1),
        )
        return {"logits": logits, "threshold": limit, **decided}

    def snapshots(self) -> contextlib.AbstractContextManager[None]:
        """The context every export traces under (see `IsoMaxPlusLayer.inference_snapshot`)."""
        return _serving.inference_snapshots(self.model)


def input_shape_and_dtype(
    model: Any, input_signature: Any, api_name: str
) -> tuple[tuple[Any, ...], str]:
    """`(shape, dtype)` of the served input, with a dynamic batch dimension."""
    shape, dtype = _graph.input_shape_and_dtype(model, input_signature, api_name)
    return (None,) + tuple(shape[1:]), keras.backend.standardize_dtype(dtype)


def _check_output_is_isomax(model: Any, layer: Any) -> None:
    outputs = getattr(model, "outputs", None)
    if outputs is None:
        return  # Subclassed model: checked when traced (`Served.__call__`).
    producer = _graph.producer(outputs[0])
    if producer is not layer:
        name = getattr(producer, "name", repr(producer))
        raise ValueError(
            f"The output of model '{model.name}' must be the logits of its "
            f"IsoMaxPlusLayer '{layer.name}' (the score and probabilities are "
            "computed from them at export). Remove layers after it, such as a "
            f"softmax. Received: output produced by layer '{name}'"
        )

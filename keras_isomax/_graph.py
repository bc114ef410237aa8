"""The model graph: the layer behind a tensor, a model's layers, its classifier head.

Private helpers of the package (`replace_head`, the model runner, the exporters).
"""

from __future__ import annotations

import weakref
from typing import Any

import keras
import numpy as np
from keras import ops

_SUBMODELS: weakref.WeakKeyDictionary[Any, tuple[Any, Any]] = (
    weakref.WeakKeyDictionary()
)  # model -> (layer, model up to its logits)


def producer(tensor: Any, *, model: Any = None) -> Any:
    """The layer that produced a symbolic tensor, or `None`.

    Args:
        tensor: A symbolic `KerasTensor`.
        model: If given, only a layer of `model.layers` whose single output is
            `tensor` is returned (a layer called several times has no single
            output and gives `None`). If `None`, the layer is read from the
            tensor's history, looking inside nested models (a nested model's
            output is reported as the layer that produced it inside).

    Returns:
        The producing layer, or `None`.
    """
    if model is not None:
        for layer in model.layers:
            try:
                output = layer.output
            except (AttributeError, ValueError, RuntimeError):
                continue  # Not called, or called several times (shared).
            if output is tensor:
                return layer
        return None
    for _ in range(64):  # Nesting depth; deeper graphs are not real models.
        history = getattr(tensor, "_keras_history", None)
        if history is None:
            return None
        operation = history.operation
        inner = getattr(operation, "outputs", None) if isinstance(operation, keras.Model) else None
        if not inner:
            return operation
        try:
            tensor = list(inner)[history.tensor_index]
        except (IndexError, TypeError):
            return operation
    return None


def all_layers(root: Any) -> list[Any]:
    """All distinct layers under `root` (root excluded), depth first."""
    flatten = getattr(root, "_flatten_layers", None)
    if callable(flatten):
        try:
            return list(flatten(include_self=False, recursive=True))
        except TypeError:  # A different signature in some Keras version.
            pass
    result, seen, stack = [], {id(root)}, list(getattr(root, "layers", []))
    while stack:
        layer = stack.pop(0)
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        result.append(layer)
        stack[:0] = list(getattr(layer, "layers", []))
    return result


class Classifier:
    """What `find_classifier` found: the classifier and the layers to remove."""

    def __init__(
        self, classifier: Any, kernel: Any, features: Any, removed: list[Any], flatten: bool
    ) -> None:
        self.classifier = classifier
        self.kernel = kernel  # (F, C)
        self.features = features  # The classifier's input tensor.
        self.removed = removed  # Layers from the classifier to the output.
        self.flatten = flatten  # Whether features need flattening (1x1 conv head).


def activation_name(activation: Any) -> str:
    if activation is None:
        return "linear"
    try:
        return keras.activations.serialize(activation)
    except Exception:  # A custom callable.
        return getattr(activation, "__name__", repr(activation))


def not_a_classifier(model: Any, reason: str) -> ValueError:
    return ValueError(
        "`replace_head` needs a model that ends in a linear softmax classifier: "
        "`Dense(num_classes)` with a softmax or no activation, optionally followed "
        "by a softmax `Activation`/`Softmax` layer (or the 1x1 `Conv2D` + `Flatten` "
        f"head of keras.applications MobileNets); {reason}. Received: model={model.name!r}"
    )


def find_classifier(model: Any) -> Classifier:
    """The linear softmax classifier a model ends in (as `replace_head` needs).

    Walks back from the model's output over a softmax, a flatten and the
    classifier (`Dense`, or the 1x1 `Conv2D` head of keras.applications
    MobileNets).

    Raises:
        ValueError: If the model is not built, has several outputs or does
            not end in such a classifier (the message says why).
    """
    try:
        outputs = model.outputs
    except (AttributeError, ValueError) as error:
        raise ValueError(
            "`model` must be built with a known input (e.g. `keras.Input(...)` as "
            "its first layer, or called once on data), and be Sequential or "
            f"functional, not subclassed. Received: model={model.name!r}"
        ) from error
    if not outputs:
        raise ValueError(
            "`model` has no symbolic outputs; `replace_head` supports built "
            f"Sequential and functional models. Received: model={model.name!r}"
        )
    if len(outputs) != 1:
        raise ValueError(
            "`model` must have exactly one output (the class probabilities). "
            f"Received: model={model.name!r} with {len(outputs)} outputs"
        )
    tensor = outputs[0]
    removed = []
    layer = producer(tensor, model=model)
    softmax_layer = False
    if isinstance(layer, keras.layers.Softmax) or (
        isinstance(layer, keras.layers.Activation)
        and activation_name(layer.activation) in ("softmax", "linear")
    ):
        if isinstance(layer, keras.layers.Softmax) and layer.axis not in (-1, [-1]):
            raise not_a_classifier(model, f"its Softmax layer uses axis={layer.axis}")
        softmax_layer = True
        removed.append(layer)
        tensor = layer.input
        layer = producer(tensor, model=model)
    flatten = None
    if isinstance(layer, keras.layers.Flatten | keras.layers.Reshape):
        flatten = layer
        removed.append(layer)
        tensor = layer.input
        layer = producer(tensor, model=model)

    if layer is None:
        raise not_a_classifier(
            model, "its output is not produced by a single-use layer of the model"
        )
    activation = activation_name(getattr(layer, "activation", None))
    if isinstance(layer, keras.layers.Dense) and flatten is None:
        kernel = layer.kernel
    elif (
        isinstance(layer, keras.layers.Conv2D)
        and flatten is not None
        and is_pointwise_on_pooled(layer)
    ):
        kernel = ops.reshape(layer.kernel, (layer.kernel.shape[-2], layer.kernel.shape[-1]))
    else:
        what = type(layer).__name__
        if flatten is not None:
            what += f" + {type(flatten).__name__}"
        raise not_a_classifier(model, f"it ends in {what} ({layer.name!r})")
    allowed = ("linear",) if softmax_layer else ("softmax", "linear")
    if activation not in allowed:
        raise not_a_classifier(
            model,
            f"its classifier {layer.name!r} has activation {activation!r} (IsoMax+ "
            "replaces a softmax over classes, not sigmoid or other outputs)",
        )
    removed.append(layer)
    features = layer.input
    if flatten is not None and len(features.shape) != 4:
        raise not_a_classifier(model, "its 1x1 convolution is not on pooled features")
    return Classifier(layer, kernel, features, removed, flatten is not None)


def is_pointwise_on_pooled(layer: Any) -> bool:
    """A 1x1, stride-1, ungrouped Conv2D on a (batch, 1, 1, F) input = a Dense."""
    try:
        input_shape = tuple(layer.input.shape)
    except (AttributeError, ValueError):
        return False
    return (
        tuple(layer.kernel_size) == (1, 1)
        and tuple(layer.strides) == (1, 1)
        and tuple(layer.dilation_rate) == (1, 1)
        and getattr(layer, "groups", 1) == 1
        and layer.data_format == "channels_last"
        and tuple(input_shape[1:3]) == (1, 1)
    )


def logits_model(model: Any, layer: Any) -> tuple[Any, int | None]:
    """A model and output index whose output is the logits of `layer`.

    The model itself when one of its outputs is the layer's output, directly
    or through nested models (the usual `Sequential`/functional classifier); a
    sub-model up to the layer's output when the layer sits in the model's own
    graph but something follows it (for example a `Softmax`). A subclassed
    model without symbolic outputs is used as is: its output must have the
    layer's `num_classes` columns (checked by the caller).

    Raises:
        ValueError: If the model has symbolic outputs but the layer's logits
            are neither among them nor reachable from the model's inputs.
    """
    try:
        outputs = list(model.outputs)
    except (AttributeError, ValueError, TypeError):
        outputs = []
    if not outputs:
        return model, None
    for index, tensor in enumerate(outputs):
        if producer(tensor) is layer:
            return model, (index if len(outputs) > 1 else None)
    cached = _SUBMODELS.get(model)
    if cached is not None and cached[0] is layer:
        return cached[1], None
    try:
        submodel = keras.Model(model.inputs, layer.output)
    except (ValueError, TypeError, AttributeError):
        submodel = None
    if submodel is not None:
        _SUBMODELS[model] = (layer, submodel)  # One traced predict function.
        return submodel, None
    raise ValueError(
        f"The logits of IsoMaxPlusLayer '{layer.name}' are not an output of model "
        f"'{model.name}' and cannot be reached from its inputs (the layer is "
        "nested in a sub-model and followed by other layers). Calibrate or "
        "evaluate a model whose output is the layer's logits. "
        f"Received: model={model.name!r}"
    )


def input_shape_and_dtype(
    model: Any, input_signature: Any, api_name: str
) -> tuple[tuple[Any, ...], Any]:
    """`(shape, dtype)` of a one-input model's input, or of `input_signature`.

    Args:
        model: The model to export.
        input_signature: `None` (the model's symbolic input), or any spec with
            `shape` and `dtype` (`keras.InputSpec`, `KerasTensor`,
            `tf.TensorSpec`).
        api_name: The exporter's name, for the error messages.

    Returns:
        `(shape, dtype)` with `shape` a tuple whose first entry is the batch.
    """
    if input_signature is None:
        try:
            inputs = model.inputs
        except (AttributeError, ValueError):
            inputs = None
        if not inputs:
            raise ValueError(
                f"Model '{model.name}' has no symbolic inputs (a subclassed "
                "model?): pass `input_signature=keras.InputSpec(shape=..., "
                "dtype=...)`. Received: input_signature=None"
            )
        if len(inputs) != 1:
            raise ValueError(
                f"`{api_name}` supports models with exactly one input. "
                f"Received: model '{model.name}' with {len(inputs)} inputs"
            )
        input_signature = inputs[0]
    shape = getattr(input_signature, "shape", None)
    dtype = getattr(input_signature, "dtype", None)
    if not hasattr(input_signature, "shape") or isinstance(input_signature, np.ndarray):
        raise TypeError(
            "`input_signature` must be a keras.InputSpec, tf.TensorSpec or "
            f"KerasTensor. Received: input_signature={input_signature!r}"
        )
    if shape is None or dtype is None or len(tuple(shape)) == 0:
        raise ValueError(
            "`input_signature` needs a shape with a batch dimension and a "
            f"dtype. Received: input_signature={input_signature!r}"
        )
    return tuple(shape), dtype

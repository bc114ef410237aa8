"""Model inspection, data iteration and argument checks shared by the modules.

Private: every module of the package uses these instead of its own copy, and
no module reaches into another module's private names. Nothing here imports
another module of the package except `_serving` (the non-finite rule).
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Iterable, Mapping

import keras
import numpy as np
from keras import ops

from keras_isomax import _serving
from keras_isomax.layers import IsoMaxPlusLayer

_SUBMODELS = weakref.WeakKeyDictionary()  # model -> (layer, model up to its logits)

# ------------------------------------------------------------ the model graph


def producer(tensor, *, model=None):
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


def all_layers(root):
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


# ------------------------------------------------------ the classifier head


class Classifier:
    """What `find_classifier` found: the classifier and the layers to remove."""

    def __init__(self, classifier, kernel, features, removed, flatten):
        self.classifier = classifier
        self.kernel = kernel  # (F, C)
        self.features = features  # The classifier's input tensor.
        self.removed = removed  # Layers from the classifier to the output.
        self.flatten = flatten  # Whether features need flattening (1x1 conv head).


@contextlib.contextmanager
def inference_snapshots(model):
    """`IsoMaxPlusLayer.inference_snapshot` of every built IsoMax+ layer in `model`:
    what the exporters trace under (graphs free of the layer's inference cache)."""
    with contextlib.ExitStack() as stack:
        for layer in all_layers(model):
            if isinstance(layer, IsoMaxPlusLayer) and layer.built:
                stack.enter_context(layer.inference_snapshot())
        yield


def activation_name(activation):
    if activation is None:
        return "linear"
    try:
        return keras.activations.serialize(activation)
    except Exception:  # A custom callable.
        return getattr(activation, "__name__", repr(activation))


def not_a_classifier(model, reason):
    return ValueError(
        "`replace_head` needs a model that ends in a linear softmax classifier: "
        "`Dense(num_classes)` with a softmax or no activation, optionally followed "
        "by a softmax `Activation`/`Softmax` layer (or the 1x1 `Conv2D` + `Flatten` "
        f"head of keras.applications MobileNets); {reason}. Received: model={model.name!r}"
    )


def find_classifier(model):
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


def is_pointwise_on_pooled(layer):
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


# ------------------------------------------------------------------- the data


def is_array_like(x):
    """Whether `x` is one array or tensor (not a structure of them)."""
    return isinstance(x, np.ndarray) or (
        hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, Mapping)
    )


def is_in_memory(data):
    """Whether `data` is arrays (`x`, or a tuple/list/dict of arrays), not a stream."""
    return is_array_like(data) or isinstance(data, Mapping | tuple | list)


def num_rows(x):
    """The batch size of an array or of the first array of a structure."""
    if isinstance(x, Mapping):
        return num_rows(next(iter(x.values())))
    if isinstance(x, list | tuple):
        return num_rows(x[0])
    return int(x.shape[0])


def split_element(element, arg_name):
    """`x`, `(x,)`, `(x, y)` or `(x, y, sample_weight)` -> `(x, y or None)`."""
    if isinstance(element, tuple | list) and not is_array_like(element):
        if len(element) in (1, 2, 3):
            return element[0], (element[1] if len(element) > 1 else None)
        raise ValueError(
            f"`{arg_name}` must hold `x`, `(x,)`, `(x, y)` or `(x, y, "
            f"sample_weight)`; got a tuple of {len(element)} items. "
            f"Received: {arg_name} element of length {len(element)}"
        )
    return element, None


def check_rows(x, y, arg_name):
    """The number of rows of `x`; raises if `y` (when given) has another number."""
    n = num_rows(x)
    if y is not None and int(np.shape(y)[0]) != n:
        m = int(np.shape(y)[0])
        raise ValueError(
            f"`{arg_name}` has {n} inputs but {m} labels (x and y must have the same "
            f"length). Received: {arg_name} with x of {n} rows, y of {m} rows"
        )
    return n


def iter_elements(data, arg_name):
    """Yields the elements of a dataset or other iterable of batches, as they are."""
    if isinstance(data, str | bytes) or not isinstance(data, Iterable):
        raise TypeError(
            f"`{arg_name}` must be a NumPy array, a tuple `(x, y)`, a batched "
            f"`tf.data.Dataset` or another iterable of batches. "
            f"Received: {arg_name}={type(data).__name__}"
        )
    yield from data  # tf.data.Dataset, PyDataset, generators.


def iter_batches(data, arg_name, batch_size=None):
    """Yields `(x_batch, y_batch or None)` from arrays or an iterable of batches.

    Args:
        data: In-memory arrays (`x`, `(x,)`, `(x, y)`, `(x, y, w)`), sliced
            into `batch_size` rows; or a batched dataset / iterable of such
            elements, yielded batch by batch.
        arg_name: Name of the argument in error messages.
        batch_size: Rows per batch for arrays. Defaults to `None` (arrays
            are then treated as one element of an iterable: not sliced).
    """
    if batch_size is not None and is_in_memory(data):
        x, y = split_element(data, arg_name)
        n = check_rows(x, y, arg_name)
        for start in range(0, n, batch_size):
            rows = slice(start, start + batch_size)
            yield (
                keras.tree.map_structure(lambda a, rows=rows: a[rows], x),
                None if y is None else y[rows],
            )
        return
    for element in iter_elements(data, arg_name):
        yield split_element(element, arg_name)


def class_ids(y, arg_name, num_classes=None):
    """Labels (class ids or one-hot rows) as an int64 array `(N,)` of class ids.

    Args:
        y: Labels: class ids `(N,)`/`(N, 1)` or one-hot / soft rows `(N, C)`.
        arg_name: Name of the argument in error messages.
        num_classes: If given, the labels are checked against it: one-hot rows
            must have `num_classes` columns and ids must be in
            `[0, num_classes)`. Defaults to `None` (any width, no range check).

    Raises:
        ValueError: If the labels are not integer class ids or one-hot rows
            (or out of range, with `num_classes`).
    """
    y = np.asarray(keras.ops.convert_to_numpy(y))
    if num_classes is None:
        if y.ndim >= 2 and y.shape[-1] > 1:  # One-hot or soft targets.
            return np.argmax(y, axis=-1).reshape(-1)
        y = y.reshape(-1)
        if y.size and (not np.issubdtype(y.dtype, np.number) or np.any(np.floor(y) != y)):
            raise ValueError(
                f"Labels of `{arg_name}` must be integer class ids or one-hot rows. "
                f"Received: labels of dtype {y.dtype}"
            )
        return y.astype(np.int64)
    if y.ndim == 2 and y.shape[1] == num_classes and num_classes > 1:
        return np.argmax(y, axis=1)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise ValueError(
            f"Labels in `{arg_name}` must be class ids `(N,)`/`(N, 1)` or one-hot "
            f"`(N, {num_classes})`. Received: labels of shape {y.shape}"
        )
    bad = ~np.isfinite(y.astype(np.float64)) | (y < 0) | (y >= num_classes)
    bad |= np.floor(y) != y
    if bad.any():
        raise ValueError(
            f"Labels in `{arg_name}` must be integers in [0, {num_classes}). "
            f"Received: labels {np.unique(y[bad])[:5].tolist()}"
        )
    return y.astype(np.int64)


def nonfinite_flags(x):
    """Per-row NaN/Inf flags (NumPy bool) over every array of an input structure."""
    flags = None
    for leaf in keras.tree.flatten(x):
        rows = np.asarray(keras.ops.convert_to_numpy(_serving.nonfinite_rows(leaf)), bool)
        flags = rows if flags is None else flags | rows
    return flags


# ------------------------------------------------------------ argument checks


def check_int(value, name, *, minimum=1, allow_none=False, numpy=True, what=None):
    """`value` if it is an integer `>= minimum` (or `None` when allowed).

    Args:
        value: The argument.
        name: Its name, for the message.
        minimum: The smallest value allowed. Defaults to `1`.
        allow_none: Whether `None` is allowed. Defaults to `False`.
        numpy: Whether NumPy integers are accepted. Defaults to `True`.
        what: The message's description of a valid value. Defaults to
            `None` ("a positive integer", "a non-negative integer", ...).

    Raises:
        ValueError: If `value` is not valid (booleans are not integers).
    """
    if value is None and allow_none:
        return value
    kinds = int | np.integer if numpy else int
    if isinstance(value, bool) or not isinstance(value, kinds) or value < minimum:
        if what is None:
            what = {0: "a non-negative integer", 1: "a positive integer"}.get(
                minimum, f"an integer >= {minimum}"
            ) + (" or None" if allow_none else "")
        raise ValueError(f"`{name}` must be {what}. Received: {name}={value!r}")
    return value


def check_exportable(model):
    """Raises unless `model` is a built `keras.Model` (what every exporter needs)."""
    if not isinstance(model, keras.Model):
        raise TypeError(f"`model` must be a keras.Model. Received: model={type(model).__name__}")
    if not model.built:
        raise ValueError(
            "The model must be built (called once or created with an Input) "
            f"before export. Received: model={model.name}"
        )


def check_tpr(tpr, name="tpr"):
    """`tpr` as a float in (0, 1], or a ValueError naming the argument `name`."""
    try:
        value = float(tpr)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(tpr, bool) or not 0.0 < value <= 1.0:
        raise ValueError(f"`{name}` must be a number in (0, 1]. Received: {name}={tpr!r}")
    return value


def parse_threshold(threshold, *, finite=False):
    """A decision threshold as a Python float.

    Accepts Python and NumPy real numbers and 0-d real arrays or tensors.

    Args:
        threshold: The threshold (not `None`: callers handle the default).
        finite: Whether +-Inf is refused too. Defaults to `False` (only NaN).

    Raises:
        TypeError: If `threshold` is not a real number (strings, booleans and
            sequences are refused).
        ValueError: If it is NaN (or not finite, with `finite=True`).
    """
    value = None
    if not isinstance(threshold, bool | np.bool_ | str | bytes):
        if isinstance(threshold, int | float | np.integer | np.floating):
            value = float(threshold)
        elif is_array_like(threshold) and tuple(threshold.shape) == ():
            array = np.asarray(keras.ops.convert_to_numpy(threshold))
            if np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating):
                value = float(array)
    if value is None:
        raise TypeError(f"`threshold` must be a float or None. Received: threshold={threshold!r}")
    if math.isnan(value):
        raise ValueError(
            "`threshold` must be a number, not NaN (every input would be OOD). "
            f"Received: threshold={threshold!r}"
        )
    if finite and not math.isfinite(value):
        raise ValueError(f"`threshold` must be finite. Received: threshold={threshold!r}")
    return value


# ------------------------------------------------- the IsoMax+ layer and its logits


def input_shape_and_dtype(model, input_signature, api_name):
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


def find_isomax_layer(model):
    """Returns the single `IsoMaxPlusLayer` of a model.

    Searches the model's layers recursively (nested models and layers that own
    sublayers included); a layer shared between several places counts once.

    Args:
        model: A `keras.Model` (or any `keras.layers.Layer`), or an
            `IsoMaxPlusLayer` itself (returned unchanged).

    Returns:
        The `IsoMaxPlusLayer`.

    Raises:
        TypeError: If `model` is not a Keras layer or model.
        ValueError: If the model holds no `IsoMaxPlusLayer`, or more than one.

    Example:

    >>> import keras
    >>> from keras_isomax import IsoMaxPlusLayer
    >>> from keras_isomax.calibration import find_isomax_layer
    >>> model = keras.Sequential([keras.Input((4,)), IsoMaxPlusLayer(3, name="head")])
    >>> find_isomax_layer(model).name
    'head'
    """
    if isinstance(model, IsoMaxPlusLayer):
        return model
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(
            f"`model` must be a Keras model or layer. Received: model={type(model).__name__}"
        )
    found = [layer for layer in all_layers(model) if isinstance(layer, IsoMaxPlusLayer)]
    if len(found) == 1:
        return found[0]
    name = getattr(model, "name", type(model).__name__)
    if not found:
        raise ValueError(
            f"Model '{name}' has no `IsoMaxPlusLayer`; calibration and "
            "`predict_ood` need one (train with `IsoMaxPlusLayer` + "
            f"`IsoMaxPlusLoss`). Received: model={name!r}"
        )
    names = [layer.name for layer in found]
    raise ValueError(
        f"Model '{name}' has {len(found)} `IsoMaxPlusLayer`s ({names}); expected "
        f"exactly one. Received: model={name!r}"
    )


def logits_model(model, layer):
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


def check_batched(model, x, arg_name):
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        return
    if not inputs or isinstance(x, Mapping | list | tuple) or len(inputs) != 1:
        return
    expected = len(inputs[0].shape)
    rank = len(x.shape)
    if rank == expected - 1:
        raise ValueError(
            f"`{arg_name}` yields single examples of shape {tuple(x.shape)}, but the "
            f"model expects batches of rank {expected}; call `.batch(...)` on the "
            f"dataset first. Received: {arg_name} element shape {tuple(x.shape)}"
        )


def collect_outputs(model, data, *, batch_size=256, arg_name="data", output_index=None):
    """Runs `model` over `data` once; returns outputs and labels as NumPy.

    Labels are read from the same pass as the inputs, so they stay aligned with
    the outputs even for a shuffling `tf.data.Dataset`.

    Args:
        model: A Keras model.
        data: A NumPy array / tensor `x`; a tuple `(x,)`, `(x, y)` or
            `(x, y, sample_weight)` of arrays; or a batched `tf.data.Dataset`
            (or other iterable of batches) yielding one of those.
        batch_size: Batch size for arrays (datasets keep their own batching).
            Defaults to `256`.
        arg_name: Name of the argument in error messages. Defaults to `"data"`.
        output_index: Which output to keep when the model has several.
            Defaults to `None` (the model must have one output).

    Returns:
        `(outputs, labels)`: float NumPy array `(N, C)` and an int64 array `(N,)`
        of class ids, or `None` when `data` has no labels (on any batch).

    Raises:
        TypeError: If `data` has an unsupported type, or the model returns
            several outputs and `output_index` is `None`.
        ValueError: If `data` is empty, unbatched, or has fewer labels than
            inputs.
    """
    check_int(batch_size, "batch_size", numpy=False)
    outputs, labels, missing_labels, checked = [], [], False, False
    if is_in_memory(data):
        # In-memory arrays: one `predict` call (traced once, batched by Keras).
        x, y = split_element(data, arg_name)
        n = check_rows(x, y, arg_name)
        if n == 0:
            raise ValueError(f"`{arg_name}` holds no examples. Received: empty {arg_name}")
        batches = [(x, y, lambda x: model.predict(x, batch_size=batch_size, verbose=0))]
        checked = True  # Arrays always carry the batch axis.
    else:
        batches = ((x, y, model.predict_on_batch) for x, y in iter_batches(data, arg_name))
    for x, y, predict in batches:
        if not checked:
            check_batched(model, x, arg_name)
            checked = True
        out = predict(x)
        if isinstance(out, Mapping):
            out = list(out.values())
        if isinstance(out, list | tuple):
            if output_index is None:
                if len(out) != 1:
                    raise TypeError(
                        f"The model returns {len(out)} outputs; expected one "
                        "(the logits). Received: model with several outputs"
                    )
                out = out[0]
            else:
                out = out[output_index]
        out = np.asarray(keras.ops.convert_to_numpy(out))
        if out.dtype not in (np.float32, np.float64):
            out = out.astype(np.float32)
        outputs.append(out)
        if y is None:
            missing_labels = True
        else:
            labels.append(class_ids(y, arg_name))
    if not outputs or sum(len(o) for o in outputs) == 0:
        raise ValueError(f"`{arg_name}` holds no examples. Received: empty {arg_name}")
    outputs = np.concatenate(outputs, axis=0)
    if missing_labels:
        return outputs, None
    labels = np.concatenate(labels, axis=0)
    if labels.shape[0] != outputs.shape[0]:
        raise ValueError(
            f"`{arg_name}` gave {outputs.shape[0]} outputs but {labels.shape[0]} "
            f"labels. Received: {arg_name} with mismatched labels"
        )
    return outputs, labels


def isomax_logits(model, data, *, batch_size=256, arg_name="data"):
    """Logits of the model's `IsoMaxPlusLayer` (and labels) over `data`.

    Args:
        model: A Keras model containing one `IsoMaxPlusLayer`.
        data: See `collect_outputs`.
        batch_size: Batch size for arrays. Defaults to `256`.
        arg_name: Name of the argument in error messages. Defaults to `"data"`.

    Returns:
        `(logits, labels or None)` as NumPy arrays.

    Raises:
        ValueError: If the model has no (or several) `IsoMaxPlusLayer`, or its
            logits cannot be read from the model's outputs.
    """
    layer = find_isomax_layer(model)
    runner, index = logits_model(model, layer)
    logits, labels = collect_outputs(
        runner, data, batch_size=batch_size, arg_name=arg_name, output_index=index
    )
    if logits.ndim < 2 or logits.shape[-1] != layer.num_classes:
        raise ValueError(
            f"Could not read the logits of IsoMaxPlusLayer '{layer.name}' "
            f"({layer.num_classes} classes) from the model's output of shape "
            f"{logits.shape}; make the layer's output a model output. "
            f"Received: model={model.name!r}"
        )
    return logits, labels


def tap_nonfinite(data, arg_name):
    """`(data, flags)`: `data` to run the model on and a list that holds, once
    the model has run over it, the per-row NaN/Inf flags of its inputs (read in
    the same pass, so they stay aligned with a shuffling dataset)."""
    if is_in_memory(data):
        x, y = split_element(data, arg_name)
        return data, [nonfinite_flags(x)], [label_width(y)]
    flags, widths = [], []

    def tapped():
        for element in iter_elements(data, arg_name):
            x, y = split_element(element, arg_name)
            flags.append(nonfinite_flags(x))
            widths.append(label_width(y))
            yield element

    return tapped(), flags, widths


def label_width(y):
    """The width of one-hot labels `(B, C)`, or None for class ids / no labels."""
    shape = getattr(y, "shape", None)
    if shape is None and y is not None:
        shape = np.shape(y)
    if shape is None or len(shape) < 2 or shape[-1] in (None, 1):
        return None
    return int(shape[-1])


def any_logits(model, data, batch_size, arg_name, *, with_labels=False, with_nonfinite=False):
    """Logits of the IsoMax+ layer when the model has one, else the model output.

    With `with_nonfinite=True` also returns the per-row NaN/Inf flags of the
    inputs (`(logits, labels, flags)`).
    """
    if with_nonfinite:
        data, flags, widths = tap_nonfinite(data, arg_name)
        logits, labels = any_logits(model, data, batch_size, arg_name, with_labels=True)
        wrong = {w for w in widths if w is not None and w != logits.shape[-1]}
        if with_labels and labels is not None and wrong:
            raise ValueError(
                f"One-hot labels of `{arg_name}` must have one column per class of the "
                f"model ({logits.shape[-1]}). Received: labels of width {sorted(wrong)}"
            )
        nonfinite = np.concatenate(flags) if flags else np.zeros(len(logits), bool)
        if nonfinite.shape != (len(logits),):
            raise ValueError(
                f"`{arg_name}` gave {len(logits)} outputs for {nonfinite.size} inputs. "
                f"Received: {arg_name} with mismatched outputs"
            )
        return logits, labels, nonfinite
    try:
        find_isomax_layer(model)
        has_layer = True
    except ValueError:
        has_layer = False
    if has_layer:
        logits, labels = isomax_logits(model, data, batch_size=batch_size, arg_name=arg_name)
    else:
        logits, labels = collect_outputs(model, data, batch_size=batch_size, arg_name=arg_name)
        if logits.ndim != 2:
            raise ValueError(
                f"The model must return logits of shape (batch, classes). "
                f"Received: model output of shape {logits.shape}"
            )
    return (logits, labels) if with_labels else logits

"""The classifier head: `replace_head` (SoftMax -> IsoMax+) and `find_isomax_layer`."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import keras
import numpy as np
from keras import ops

from keras_isomax import _checks, _data, _graph
from keras_isomax._typing import Data
from keras_isomax.layers import IsoMaxPlusLayer

PROTOTYPE_INITS = ("auto", "dense", "class_means", "random")


def find_isomax_layer(model: keras.layers.Layer) -> IsoMaxPlusLayer:
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
    >>> from keras_isomax import find_isomax_layer
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
    found = [layer for layer in _graph.all_layers(model) if isinstance(layer, IsoMaxPlusLayer)]
    if len(found) == 1:
        return found[0]
    name = getattr(model, "name", type(model).__name__)
    if not found:
        raise ValueError(
            f"Model '{name}' has no `IsoMaxPlusLayer` (train with `IsoMaxPlusLayer` + "
            "`IsoMaxPlusLoss`, or swap a SoftMax head with `replace_head`). "
            f"Received: model={name!r}"
        )
    names = [layer.name for layer in found]
    raise ValueError(
        f"Model '{name}' has {len(found)} `IsoMaxPlusLayer`s ({names}); expected "
        f"exactly one. Received: model={name!r}"
    )


def replace_head(
    model: keras.Model,
    num_classes: int | None = None,
    prototype_init: str = "auto",
    init_data: Data | None = None,
    share_weights: bool = False,
    batch_size: int = 256,
    name: str = "isomax_plus",
) -> keras.Model:
    """Replaces a classifier's final `Dense` (+ softmax) with an `IsoMaxPlusLayer`.

    The model must end in a `Dense` classifier (softmax or no activation,
    optionally followed by a softmax layer) or the 1x1 `Conv2D` + `Flatten`
    head of `keras.applications` MobileNet-style models. The backbone is kept;
    the classifier's input becomes the input of a new `IsoMaxPlusLayer` (the
    bias is dropped). The result has the same kind (Sequential or functional)
    and inputs, is not compiled, and has an uncalibrated `ood_threshold`.
    Prototype initialisations and why: docs/replace_head.md.

    Args:
        model: A built `keras.Sequential` or functional `keras.Model` with one
            output, ending in a classifier as described above.
        num_classes: Number of classes of the new head. Defaults to `None`
            (the classifier's units).
        prototype_init: `"dense"` (the classifier's kernel columns; needs the
            same `num_classes`), `"class_means"` (the spherical class means
            of the features of `init_data`), `"random"` (`N(0, 1)`), or
            `"auto"`: `"class_means"` with `init_data`, else `"dense"` when
            the class counts match, else `"random"`. Defaults to `"auto"`.
        init_data: Labelled data for `"class_means"`: a tuple `(x, y)` of
            arrays, or a finite iterable of `(x, y, ...)` batches such as a
            `tf.data.Dataset`. Labels are class ids `(N,)`/`(N, 1)` or one-hot
            `(N, num_classes)`. Features are computed in inference mode.
            Defaults to `None`.
        share_weights: Whether the new model reuses the original's backbone
            layers and variables (training one changes the other) instead of
            a copy. Defaults to `False`.
        batch_size: Batch size for computing features of array `init_data`.
            Defaults to `256`.
        name: Name of the new `IsoMaxPlusLayer` (made unique if a backbone
            layer already has it). Defaults to `"isomax_plus"`.

    Returns:
        A new, uncompiled `keras.Model` whose output is the IsoMax+ logits
        `(batch, num_classes)`.

    Raises:
        TypeError: If `model` is not a Keras model.
        ValueError: If the model is not built, has several outputs, does not
            end in a linear softmax classifier, or the arguments are invalid
            (unknown `prototype_init`, `"dense"` with a different
            `num_classes`, `"class_means"` without `init_data`, labels out of
            range).

    Example:

    >>> import keras
    >>> from keras_isomax import IsoMaxPlusLoss, replace_head
    >>> softmax_model = keras.Sequential([
    ...     keras.Input((8,)),
    ...     keras.layers.Dense(16, activation="relu"),
    ...     keras.layers.Dense(3, activation="softmax"),
    ... ])
    >>> model = replace_head(softmax_model)
    >>> model.compile(optimizer="sgd", loss=IsoMaxPlusLoss())
    >>> tuple(model.output_shape)
    (None, 3)
    """
    if not isinstance(model, keras.Model):
        raise TypeError(
            "`model` must be a `keras.Model` (Sequential or functional). "
            f"Received: model={type(model).__name__}"
        )
    if prototype_init not in PROTOTYPE_INITS:
        raise ValueError(
            f"`prototype_init` must be one of {PROTOTYPE_INITS}. "
            f"Received: prototype_init={prototype_init!r}"
        )
    _checks.check_int(num_classes, "num_classes", allow_none=True)
    if prototype_init == "class_means" and init_data is None:
        raise ValueError(
            '`prototype_init="class_means"` needs labelled `init_data`. Received: init_data=None'
        )
    batch_size = _checks.check_int(batch_size, "batch_size")

    _graph.find_classifier(model)  # Validate the original before paying for a copy.
    source = model if share_weights else _copy_model(model)
    head = _graph.find_classifier(source)

    kernel = head.kernel  # (F, units), the direction each class logit grows.
    units = kernel.shape[1]
    num_classes = units if num_classes is None else int(num_classes)
    if prototype_init == "auto":
        if init_data is not None:
            prototype_init = "class_means"
        elif num_classes == units:
            prototype_init = "dense"
        else:
            prototype_init = "random"
    if prototype_init == "dense" and num_classes != units:
        raise ValueError(
            '`prototype_init="dense"` copies the classifier\'s kernel columns, so '
            f"`num_classes` must equal its {units} units (use "
            '"class_means" or "random" for a different class count). '
            f"Received: num_classes={num_classes}"
        )

    layer_names = {layer.name for layer in source.layers}
    head_name = name
    suffix = 1
    while head_name in layer_names:
        head_name = f"{name}_{suffix}"
        suffix += 1
    isomax = IsoMaxPlusLayer(num_classes, name=head_name)

    features = head.features
    if head.flatten:
        features = keras.layers.Flatten(name=_unique("flatten_features", layer_names))(features)
    inputs = source.inputs[0] if isinstance(source, keras.Sequential) else source.input
    feature_model = keras.Model(inputs, features)
    if isinstance(source, keras.Sequential):
        kept = source.layers[: len(source.layers) - len(head.removed)]
        if head.flatten:
            kept.append(keras.layers.Flatten(name=feature_model.layers[-1].name))
        new_model = keras.Sequential(
            [keras.Input(batch_shape=tuple(source.inputs[0].shape)), *kept, isomax],
            name=f"{source.name}_isomax",
        )
    else:
        new_model = keras.Model(inputs, isomax(features), name=f"{source.name}_isomax")

    feature_dim = isomax.prototypes.shape[1]
    if prototype_init == "dense":
        prototypes = np.asarray(ops.convert_to_numpy(kernel), np.float64).T
    elif prototype_init == "class_means":
        fallback = (
            np.asarray(ops.convert_to_numpy(kernel), np.float64).T if num_classes == units else None
        )
        prototypes = _class_means(
            feature_model, init_data, num_classes, feature_dim, batch_size, fallback
        )
    else:
        prototypes = None  # Keep the layer's N(0, 1) initialisation.
    if prototypes is not None:
        isomax.prototypes.assign(prototypes.astype(isomax.prototypes.dtype))
    return new_model


def _copy_model(model: keras.Model) -> keras.Model:
    try:
        clone = keras.models.clone_model(model)
    except Exception as error:  # Custom layers without a config, subclassed parts.
        raise ValueError(
            f"Could not copy model {model.name!r} with `keras.models.clone_model` "
            f"({type(error).__name__}: {error}); pass `share_weights=True` to reuse its "
            f"layers instead. Received: model={model.name!r}"
        ) from error
    clone.set_weights(model.get_weights())
    return clone


def _unique(name: str, taken: set[str]) -> str:
    candidate, suffix = name, 1
    while candidate in taken:
        candidate = f"{name}_{suffix}"
        suffix += 1
    taken.add(candidate)
    return candidate


def _init_batches(init_data: Data, batch_size: int) -> Iterator[tuple[Any, Any]]:
    """Yields `(x, y)` batches from `(x, y)` arrays or an iterable of batches."""
    if not _data.is_in_memory(init_data) and not isinstance(init_data, Iterable):
        raise ValueError(
            "`init_data` must be a tuple `(x, y)` of arrays or an iterable of "
            f"`(x, y)` batches. Received: init_data={type(init_data).__name__}"
        )
    for x, y in _data.iter_batches(init_data, "init_data", batch_size):
        if y is None:
            raise ValueError(
                "Each batch of `init_data` must be a tuple `(x, y, ...)`. "
                f"Received: init_data batch of type {type(x).__name__}"
            )
        yield x, y


def _class_means(
    feature_model: keras.Model,
    init_data: Data,
    num_classes: int,
    feature_dim: int,
    batch_size: int,
    fallback: np.ndarray | None,
) -> np.ndarray:
    sums = np.zeros((num_classes, feature_dim), np.float64)
    counts = np.zeros(num_classes, np.int64)
    for x, y in _init_batches(init_data, batch_size):
        features = np.asarray(ops.convert_to_numpy(feature_model(x, training=False)), np.float64)
        if features.ndim != 2:
            raise ValueError(
                '`prototype_init="class_means"` needs 2D features `(batch, F)`. '
                f"Received: features of shape {features.shape}"
            )
        labels = _data.class_ids(y, "init_data", num_classes)
        if len(labels) != len(features):
            raise ValueError(
                "Each `init_data` batch needs one label per example. Received: "
                f"{len(features)} examples and {len(labels)} labels"
            )
        norms = np.linalg.norm(features, axis=1, keepdims=True)
        np.add.at(sums, labels, features / np.maximum(norms, 1e-12))
        np.add.at(counts, labels, 1)
    if counts.sum() == 0:
        raise ValueError("`init_data` holds no examples. Received: init_data with 0 batches")
    means = sums / np.maximum(counts, 1)[:, None]
    missing = counts == 0
    if missing.any():
        warnings.warn(
            f"{int(missing.sum())} of {num_classes} classes have no example in "
            "`init_data`; their prototypes start from "
            + ("the classifier's kernel columns." if fallback is not None else "N(0, 1)."),
            stacklevel=3,
        )
        if fallback is not None:
            means[missing] = fallback[missing]
        else:
            means[missing] = ops.convert_to_numpy(
                keras.random.normal((int(missing.sum()), feature_dim))
            )
    return means

"""The small example CNN shared by the demo, the CLI and the examples.

One definition, so that the demo, `examples/quickstart.py` and
`examples/export_and_serve.py` train the same network.
"""

from __future__ import annotations

import keras

from keras_isomax import _checks
from keras_isomax.layers import IsoMaxPlusLayer

HEADS = ("isomax", "softmax")


def example_cnn_layers(width: int = 32, features: int = 128) -> list[keras.layers.Layer]:
    """The feature layers of the example CNN, without input or head.

    Two 3x3 ReLU convolutions (`width`, then `2 * width` filters), each
    followed by 2x2 max pooling, then `Flatten` and `Dense(features, relu)`.

    Args:
        width: Filters of the first convolution. Defaults to `32`.
        features: Units of the feature layer. Defaults to `128`.

    Returns:
        A list of fresh Keras layers, to put between an `Input` and a head.

    Raises:
        ValueError: If `width` or `features` is not a positive integer.

    Example:

    >>> import keras
    >>> from keras_isomax import IsoMaxPlusLayer
    >>> model = keras.Sequential(
    ...     [keras.Input((28, 28, 1)), *example_cnn_layers(width=8), IsoMaxPlusLayer(10)]
    ... )
    >>> model.output_shape
    (None, 10)
    """
    _checks.check_int(width, "width")
    _checks.check_int(features, "features")
    return [
        keras.layers.Conv2D(width, 3, activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(2 * width, 3, activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(features, activation="relu"),
    ]


def example_cnn(
    head: str = "isomax",
    num_classes: int = 10,
    input_shape: tuple[int, ...] = (28, 28, 1),
    width: int = 32,
    name: str | None = None,
) -> keras.Sequential:
    """The example CNN with an IsoMax+ or a SoftMax head.

    Args:
        head: `"isomax"` (an `IsoMaxPlusLayer` named `isomax_plus`, trained
            with `IsoMaxPlusLoss`) or `"softmax"` (a `Dense` named `logits`
            that outputs logits, trained with cross-entropy from logits).
            Defaults to `"isomax"`.
        num_classes: Number of classes. Defaults to `10`.
        input_shape: Image shape. Defaults to `(28, 28, 1)`.
        width: Filters of the first convolution (the second has twice as
            many). Defaults to `32`.
        name: Model name. Defaults to `None` (`"cnn_" + head`).

    Returns:
        An uncompiled `keras.Sequential`.

    Raises:
        ValueError: If `head` is unknown or `width` is not a positive integer.
    """
    if head not in HEADS:
        raise ValueError(f"`head` must be 'softmax' or 'isomax'. Received: head={head!r}")
    model = keras.Sequential(
        [keras.Input(input_shape), *example_cnn_layers(width)],
        name=name or f"cnn_{head}",
    )
    if head == "isomax":
        model.add(IsoMaxPlusLayer(num_classes, name="isomax_plus"))
    else:
        model.add(keras.layers.Dense(num_classes, name="logits"))
    return model

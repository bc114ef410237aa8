"""`keras_isomax.app.models`: the one definition of the examples' small CNN."""

import keras
import numpy as np
import pytest

from keras_isomax import IsoMaxPlusLayer
from keras_isomax.app.demo import build_classifier
from keras_isomax.app.models import example_cnn, example_cnn_layers


def test_layers_are_the_documented_cnn():
    layers = example_cnn_layers(width=4, features=16)
    assert [type(layer).__name__ for layer in layers] == [
        "Conv2D", "MaxPooling2D", "Conv2D", "MaxPooling2D", "Flatten", "Dense",
    ]  # fmt: skip
    assert (layers[0].filters, layers[2].filters, layers[5].units) == (4, 8, 16)
    assert example_cnn_layers()[0] is not example_cnn_layers()[0]  # fresh layers per call


@pytest.mark.parametrize(
    ("head", "last"), [("isomax", IsoMaxPlusLayer), ("softmax", keras.layers.Dense)]
)
def test_example_cnn_heads(rng, head, last):
    model = example_cnn(head, num_classes=3, input_shape=(12, 12, 2), width=4)
    assert model.name == f"cnn_{head}"
    assert isinstance(model.layers[-1], last)
    assert model.layers[-1].name == {"isomax": "isomax_plus", "softmax": "logits"}[head]
    x = rng.normal(size=(5, 12, 12, 2)).astype("float32")
    assert np.asarray(model(x)).shape == (5, 3)


def test_demo_builds_the_shared_cnn():
    keras.utils.set_random_seed(3)
    a = build_classifier("isomax", num_classes=4, width=4)
    keras.utils.set_random_seed(3)
    b = example_cnn("isomax", num_classes=4, width=4)
    assert a.name == b.name and len(a.weights) == len(b.weights)
    for wa, wb in zip(a.weights, b.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(wa), np.asarray(wb))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="Received: head='dense'"):
        example_cnn("dense")
    with pytest.raises(ValueError, match="Received: width=0"):
        example_cnn_layers(width=0)
    with pytest.raises(ValueError, match="Received: features=2.5"):
        example_cnn_layers(features=2.5)

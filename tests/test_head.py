import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_isomax import IsoMaxPlusLayer, IsoMaxPlusLoss
from keras_isomax.head import replace_head
from keras_isomax.testing import logits as ref_logits
from keras_isomax.testing import normalize as ref_normalize

NUM_CLASSES, FEATURES, INPUT_DIM = 4, 16, 10


def _blobs(rng, n=400):
    """Separable Gaussian blobs: inputs (n, INPUT_DIM) and labels (n,)."""
    centers = rng.normal(scale=3.0, size=(NUM_CLASSES, INPUT_DIM))
    labels = rng.integers(0, NUM_CLASSES, size=n)
    x = centers[labels] + rng.normal(size=(n, INPUT_DIM))
    return x.astype("float32"), labels


def _functional(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((INPUT_DIM,), name="pixels")
    h = keras.layers.Dense(32, activation="relu", name="hidden")(inputs)
    h = keras.layers.Dropout(0.2, name="drop")(h)
    h = keras.layers.Dense(FEATURES, activation="relu", name="features")(h)
    outputs = keras.layers.Dense(NUM_CLASSES, activation="softmax", name="predictions")(h)
    return keras.Model(inputs, outputs, name="classifier")


def _sequential(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((INPUT_DIM,)),
            keras.layers.Dense(32, activation="relu", name="hidden"),
            keras.layers.Dense(FEATURES, activation="relu", name="features"),
            keras.layers.Dense(NUM_CLASSES, name="predictions"),
            keras.layers.Softmax(name="softmax"),
        ],
        name="classifier",
    )


_TRAINED = {}


def _trained(build, rng=None):
    """A softmax classifier trained on blobs (trained once per builder, then copied)."""
    if build not in _TRAINED:
        x, y = _blobs(np.random.default_rng(7))
        model = build()
        model.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy")
        model.fit(x, y, epochs=15, batch_size=64, verbose=0)
        _TRAINED[build] = (model.get_weights(), x, y)
    weights, x, y = _TRAINED[build]
    model = build()
    model.set_weights(weights)
    return model, x, y


def _input(model):
    return model.inputs[0] if isinstance(model, keras.Sequential) else model.input


def _features(model, x):
    """The penultimate features: the input of the model's last layer(s)."""
    layer = model.get_layer("features")
    return keras.ops.convert_to_numpy(keras.Model(_input(model), layer.output)(x))


def _isomax(model):
    layers = [layer for layer in model.layers if isinstance(layer, IsoMaxPlusLayer)]
    assert len(layers) == 1
    return layers[0]


@pytest.mark.parametrize("build", [_functional, _sequential], ids=["functional", "sequential"])
def test_output_is_isomax_logits_on_identical_features(build, rng):
    original, x, _ = _trained(build, rng)
    model = replace_head(original)
    assert type(model) is type(original)  # Sequential stays Sequential.
    assert model.output_shape == (None, NUM_CLASSES)
    head = _isomax(model)
    kernel = original.get_layer("predictions").kernel.numpy()
    np.testing.assert_array_equal(head.prototypes.numpy(), kernel.T)  # "dense" init
    assert float(head.distance_scale.numpy()) == 1.0
    assert not head.is_calibrated

    features = _features(original, x[:50])
    new_features = keras.ops.convert_to_numpy(keras.Model(_input(model), head.input)(x[:50]))
    np.testing.assert_array_equal(new_features, features)  # backbone untouched
    expected = ref_logits(features, kernel.T)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(model(x[:50])), expected, rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("build", [_functional, _sequential], ids=["functional", "sequential"])
def test_dense_init_keeps_the_trained_decisions_and_fine_tuning_lowers_loss(build, rng):
    original, x, y = _trained(build, rng)
    model = replace_head(original)
    before = keras.ops.convert_to_numpy(model.predict(x, verbose=0))
    softmax_pred = np.argmax(original.predict(x, verbose=0), axis=1)
    # Nearest prototype (kernel column by cosine) ~ the softmax's argmax.
    assert np.mean(np.argmax(before, axis=1) == softmax_pred) >= 0.9

    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss=IsoMaxPlusLoss())
    loss_before = model.evaluate(x, y, verbose=0)
    weights_before = [w.numpy() for w in original.weights]
    model.fit(x, y, epochs=3, batch_size=64, verbose=0)
    loss_after = model.evaluate(x, y, verbose=0)
    assert np.isfinite(loss_after) and loss_after < 0.8 * loss_before
    # The default copies the backbone: the softmax model is untouched.
    for w, before_value in zip(original.weights, weights_before):
        np.testing.assert_array_equal(w.numpy(), before_value)


def test_share_weights_reuses_the_backbone_variables(rng):
    original, x, y = _trained(_functional, rng)
    model = replace_head(original, share_weights=True)
    assert model.get_layer("features") is original.get_layer("features")
    model.compile(optimizer="sgd", loss=IsoMaxPlusLoss())
    kernel_before = original.get_layer("hidden").kernel.numpy()
    model.fit(x, y, epochs=1, batch_size=64, verbose=0)
    assert not np.array_equal(original.get_layer("hidden").kernel.numpy(), kernel_before)


def test_copy_is_independent_of_the_original(rng):
    original, _, _ = _trained(_sequential, rng)
    model = replace_head(original)
    original_ids = {id(w) for w in original.weights}
    assert not any(id(w) in original_ids for w in model.weights)
    assert model.get_layer("features") is not original.get_layer("features")


def test_class_means_init_matches_numpy_reference(rng):
    original, x, y = _trained(_functional, rng)
    features = _features(original, x)
    expected = np.stack([ref_normalize(features[y == c]).mean(axis=0) for c in range(NUM_CLASSES)])
    model = replace_head(original, init_data=(x, y), batch_size=64)  # auto -> class means
    np.testing.assert_allclose(_isomax(model).prototypes.numpy(), expected, rtol=1e-5, atol=1e-6)

    # The same from a tf.data pipeline of one-hot labels.
    dataset = tf.data.Dataset.from_tensor_slices((x, np.eye(NUM_CLASSES)[y])).batch(37)
    model = replace_head(original, prototype_init="class_means", init_data=dataset)
    np.testing.assert_allclose(_isomax(model).prototypes.numpy(), expected, rtol=1e-5, atol=1e-6)

    # Class means start as a nearest-class-mean classifier: accurate at once.
    pred = np.argmax(keras.ops.convert_to_numpy(model.predict(x, verbose=0)), axis=1)
    assert np.mean(pred == y) >= 0.9


def test_class_means_with_a_missing_class_warns_and_falls_back(rng):
    original, x, y = _trained(_functional, rng)
    keep = y != 2
    with pytest.warns(UserWarning, match="1 of 4 classes have no example"):
        model = replace_head(original, init_data=(x[keep], y[keep]))
    kernel = original.get_layer("predictions").kernel.numpy()
    np.testing.assert_array_equal(_isomax(model).prototypes.numpy()[2], kernel[:, 2])


def test_new_number_of_classes(rng):
    original, x, _ = _trained(_functional, rng)
    labels = rng.integers(0, 7, size=len(x))
    model = replace_head(original, num_classes=7, init_data=(x, labels))
    assert model.output_shape == (None, 7)
    keras.utils.set_random_seed(3)
    random_model = replace_head(original, num_classes=7)  # auto -> random N(0, 1)
    assert _isomax(random_model).prototypes.shape == (7, FEATURES)
    with pytest.raises(ValueError, match="num_classes=7"):
        replace_head(original, num_classes=7, prototype_init="dense")


def test_keras_application_with_convolutional_head():
    keras.utils.set_random_seed(0)
    original = keras.applications.MobileNetV3Small(
        weights=None, input_shape=(32, 32, 3), classes=10
    )
    model = replace_head(original)
    head = _isomax(model)
    assert model.output_shape == (None, 10)
    x = np.random.default_rng(0).uniform(0, 255, size=(3, 32, 32, 3)).astype("float32")
    conv = original.get_layer("logits")  # 1x1 Conv2D on pooled (1, 1, F) features
    features = keras.ops.convert_to_numpy(keras.Model(original.input, conv.input)(x))[:, 0, 0, :]
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(keras.Model(model.input, head.input)(x)), features
    )
    prototypes = conv.kernel.numpy()[0, 0].T
    np.testing.assert_array_equal(head.prototypes.numpy(), prototypes)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(model(x)), ref_logits(features, prototypes), rtol=1e-5, atol=1e-6
    )


def test_keras_application_with_dense_head():
    keras.utils.set_random_seed(0)
    original = keras.applications.MobileNetV2(
        weights=None, input_shape=(32, 32, 3), classes=5, alpha=0.35
    )
    model = replace_head(original, share_weights=True)
    assert model.output_shape == (None, 5)
    dense = original.get_layer("predictions")
    np.testing.assert_array_equal(_isomax(model).prototypes.numpy(), dense.kernel.numpy().T)


def test_keras_round_trip(tmp_path, rng):
    original, x, y = _trained(_functional, rng)
    model = replace_head(original)
    model.compile(optimizer="sgd", loss=IsoMaxPlusLoss())
    model.fit(x, y, epochs=1, batch_size=64, verbose=0)
    path = tmp_path / "isomax.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(_isomax(loaded), IsoMaxPlusLayer)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(loaded(x[:20])), keras.ops.convert_to_numpy(model(x[:20]))
    )


def test_head_name_is_made_unique(rng):
    inputs = keras.Input((INPUT_DIM,))
    h = keras.layers.Dense(8, name="isomax_plus")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(h))
    new = replace_head(model)
    assert _isomax(new).name == "isomax_plus_1"


def test_logits_model_without_softmax_is_accepted():
    model = keras.Sequential([keras.Input((INPUT_DIM,)), keras.layers.Dense(3)])
    new = replace_head(model)  # Input -> IsoMax+ directly on the raw inputs.
    assert new.output_shape == (None, 3)


# ------------------------------------------------------------------ errors


def _ending_in(*layers):
    inputs = keras.Input((INPUT_DIM,))
    h = inputs
    for layer in layers:
        h = layer(h)
    return keras.Model(inputs, h, name="bad")


@pytest.mark.parametrize(
    "model, match",
    [
        (lambda: _ending_in(keras.layers.Dense(3, activation="sigmoid")), "'sigmoid'"),
        (
            lambda: _ending_in(keras.layers.Dense(3), keras.layers.Activation("relu")),
            "ends in Activation",
        ),
        (
            lambda: _ending_in(keras.layers.Dense(3, activation="softmax"), keras.layers.Softmax()),
            "'softmax'",
        ),
        (lambda: _ending_in(keras.layers.Dense(3), keras.layers.Dropout(0.1)), "Dropout"),
        (
            lambda: keras.Sequential(
                [
                    keras.Input((8, 8, 3)),
                    keras.layers.Conv2D(4, 3),
                    keras.layers.Flatten(),
                    keras.layers.Softmax(),
                ]
            ),
            "Conv2D \\+ Flatten",
        ),
    ],
    ids=["sigmoid", "relu", "double-softmax", "dropout-last", "conv-not-pointwise"],
)
def test_models_not_ending_in_a_softmax_classifier(model, match):
    with pytest.raises(ValueError, match=match):
        replace_head(model())


def test_multi_output_and_unbuilt_and_subclassed_models():
    inputs = keras.Input((INPUT_DIM,))
    two = keras.Model(inputs, [keras.layers.Dense(3)(inputs), keras.layers.Dense(2)(inputs)])
    with pytest.raises(ValueError, match="exactly one output"):
        replace_head(two)
    with pytest.raises(ValueError, match="must be built"):
        replace_head(keras.Sequential([keras.layers.Dense(3)]))

    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(3)

        def call(self, x):
            return self.dense(x)

    subclassed = Subclassed()
    subclassed(np.zeros((1, INPUT_DIM), "float32"))
    with pytest.raises(ValueError, match="Received: model="):
        replace_head(subclassed)


def test_argument_errors(rng):
    model = _functional()
    with pytest.raises(TypeError, match="Received: model=Dense"):
        replace_head(keras.layers.Dense(3))
    with pytest.raises(ValueError, match="Received: prototype_init='kmeans'"):
        replace_head(model, prototype_init="kmeans")
    with pytest.raises(ValueError, match="Received: num_classes=0"):
        replace_head(model, num_classes=0)
    with pytest.raises(ValueError, match="Received: init_data=None"):
        replace_head(model, prototype_init="class_means")
    x, y = _blobs(rng, n=20)
    with pytest.raises(ValueError, match=r"integers in \[0, 4\)"):
        replace_head(model, init_data=(x, y + 4))
    with pytest.raises(ValueError, match="same length"):
        replace_head(model, init_data=(x, y[:5]))

import keras
import numpy as np
import pytest

from keras_isomax import IsoMaxPlusLayer, IsoMaxPlusLoss, isomax_plus_loss
from keras_isomax.testing import isomax_loss, log_softmax


def _logits(rng, batch=9, num_classes=5):
    # Realistic IsoMax+ logits: negative distances in [0, 2] times a scale.
    return (-2.0 * rng.uniform(0.0, 2.0, size=(batch, num_classes))).astype("float32")


def test_matches_reference_sparse_and_one_hot(rng):
    z = _logits(rng)
    y = rng.integers(0, 5, size=9)
    expected = isomax_loss(y, z)
    np.testing.assert_allclose(isomax_plus_loss(y, z), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(isomax_plus_loss(y[:, None], z), expected, rtol=1e-5, atol=1e-6)
    one_hot = np.eye(5, dtype="float32")[y]
    np.testing.assert_allclose(isomax_plus_loss(one_hot, z), expected, rtol=1e-5, atol=1e-6)


def test_entropic_scale_is_used(rng):
    z = _logits(rng)
    y = rng.integers(0, 5, size=9)
    np.testing.assert_allclose(
        isomax_plus_loss(y, z, entropic_scale=3.0),
        isomax_loss(y, z, entropic_scale=3.0),
        rtol=1e-5,
    )
    assert IsoMaxPlusLoss().entropic_scale == 10.0


def test_stable_when_softmax_underflows():
    # softmax(10 * z) underflows to 0 for the true class: log of a softmax would be -inf.
    z = np.array([[-20.0, 0.0, -1.0]], "float32")
    loss = keras.ops.convert_to_numpy(isomax_plus_loss(np.array([0]), z))
    np.testing.assert_allclose(loss, isomax_loss([0], z), rtol=1e-6)
    assert np.isfinite(loss).all() and loss[0] > 150


def test_soft_targets(rng):
    z = _logits(rng)
    t = rng.dirichlet(np.ones(5), size=9).astype("float32")
    expected = -np.sum(t * log_softmax(10.0 * z.astype(np.float64)), axis=-1)
    np.testing.assert_allclose(isomax_plus_loss(t, z), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "reduction",
    ["sum_over_batch_size", "sum", "mean", "mean_with_sample_weight", "none", None],
)
def test_reductions_and_sample_weights(rng, reduction):
    z = _logits(rng)
    y = rng.integers(0, 5, size=9)
    w = rng.uniform(0.0, 2.0, size=9).astype("float32")
    per_example = isomax_loss(y, z)
    loss = IsoMaxPlusLoss(reduction=reduction)
    reduce = {
        "sum_over_batch_size": lambda v, w: np.sum(v * w) / len(v),
        "mean": lambda v, w: np.sum(v * w) / len(v),
        "sum": lambda v, w: np.sum(v * w),
        "mean_with_sample_weight": lambda v, w: np.sum(v * w) / np.sum(w),
        "none": lambda v, w: v * w,
        None: lambda v, w: v * w,
    }[reduction]
    ones = np.ones(9)
    np.testing.assert_allclose(loss(y, z), reduce(per_example, ones), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        loss(y, z, sample_weight=w), reduce(per_example, w), rtol=1e-5, atol=1e-6
    )
    zero = np.zeros(9, "float32")
    if reduction != "mean_with_sample_weight":  # 0 / 0 there, by Keras' definition
        np.testing.assert_allclose(
            loss(y, z, sample_weight=zero), reduce(per_example, zero), atol=1e-6
        )


def test_sparse_and_one_hot_agree_in_fit(rng):
    x = rng.normal(size=(32, 6)).astype("float32")
    y = rng.integers(0, 3, size=32)
    losses = []
    for targets in (y, y[:, None], np.eye(3, dtype="float32")[y]):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((6,)), IsoMaxPlusLayer(3)])
        model.compile(optimizer="sgd", loss=IsoMaxPlusLoss())
        losses.append(model.fit(x, targets, epochs=2, shuffle=False, verbose=0).history["loss"])
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-6)
    np.testing.assert_allclose(losses[0], losses[2], rtol=1e-6)


@pytest.mark.parametrize("labels", [[0, 3], [-1, 0], [0, 1.5], [0, np.nan]])
def test_invalid_labels_raise_eagerly(rng, labels):
    z = _logits(rng, batch=2, num_classes=3)
    with pytest.raises(ValueError, match=r"integers in \[0, 3\).*Received: y_true"):
        IsoMaxPlusLoss()(np.array(labels), z)


def test_invalid_labels_give_nan_when_traced(rng, trace):
    z = _logits(rng, batch=3, num_classes=3)
    traced = trace(lambda y: isomax_plus_loss(y, z))
    loss = keras.ops.convert_to_numpy(traced(keras.ops.convert_to_tensor([0, 5, 2])))
    assert np.isnan(loss[1])
    np.testing.assert_allclose(loss[[0, 2]], isomax_loss([0, 2], z[[0, 2]]), rtol=1e-5, atol=1e-6)


def test_out_of_range_labels_in_fit_never_give_a_finite_loss(rng):
    model = keras.Sequential([keras.Input((4,)), IsoMaxPlusLayer(3)])
    model.compile(optimizer="sgd", loss=IsoMaxPlusLoss())
    x = rng.normal(size=(8, 4)).astype("float32")
    if keras.backend.backend() == "torch":  # `fit` runs eagerly there: the labels are checked.
        with pytest.raises(ValueError, match=r"integers in \[0, 3\).*Received: y_true"):
            model.fit(x, np.full(8, 7), epochs=1, verbose=0)
        return
    history = model.fit(x, np.full(8, 7), epochs=1, verbose=0)  # Traced: no eager check.
    assert np.isnan(history.history["loss"][0])


def test_shape_mismatch():
    with pytest.raises(ValueError, match="y_true.shape"):
        isomax_plus_loss(np.zeros((4, 2)), np.zeros((4, 3), "float32"))


@pytest.mark.parametrize("bad", [0, -1.0, float("inf"), "ten"])
def test_bad_entropic_scale(bad):
    with pytest.raises(ValueError, match="entropic_scale"):
        IsoMaxPlusLoss(entropic_scale=bad)


def test_config_round_trip():
    loss = IsoMaxPlusLoss(entropic_scale=5.0, reduction="sum", name="l")
    config = loss.get_config()
    assert config == {"name": "l", "reduction": "sum", "entropic_scale": 5.0}
    clone = keras.losses.deserialize(keras.losses.serialize(loss))
    assert isinstance(clone, IsoMaxPlusLoss) and clone.get_config() == config


def test_half_precision_logits_are_computed_in_float32(rng):
    z = _logits(rng)
    y = rng.integers(0, 5, size=9)
    loss = isomax_plus_loss(y, z.astype("float16"))
    assert keras.backend.standardize_dtype(loss.dtype) == "float32"
    np.testing.assert_allclose(loss, isomax_loss(y, z.astype("float16")), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "row",
    [[0, 1, 2], [1, 1, 0], [0, 0, 0], [0, 2, 0], [2, -1, 0]],
    ids=["ramp", "two_ones", "zeros", "a_two", "sums_to_one"],
)
@pytest.mark.parametrize("dtype", ["int32", "int64", "int8"])
def test_integer_targets_must_be_one_hot_through_function_and_class(rng, row, dtype):
    z = _logits(rng, batch=8, num_classes=3)
    y = np.eye(3, dtype=dtype)[rng.integers(0, 3, size=8)]
    y[int(rng.integers(0, 8))] = row  # One bad row among valid ones.
    message = r"must be one-hot rows.*1 of 8 rows.*Received: y_true rows such as"
    with pytest.raises(ValueError, match=message):
        isomax_plus_loss(y, z)
    with pytest.raises(ValueError, match=message):
        IsoMaxPlusLoss()(y, z)  # Keras' Loss.__call__ casts y_true to float before `call`.
    with pytest.raises(ValueError, match=message):
        IsoMaxPlusLoss(reduction=None)(y, z, sample_weight=np.ones(8, "float32"))


def test_valid_integer_one_hot_targets_pass_through_the_class(rng):
    z = _logits(rng, batch=8, num_classes=4)
    labels = rng.integers(0, 4, size=8)
    w = rng.uniform(0.1, 2.0, size=8).astype("float32")
    expected = np.sum(isomax_loss(labels, z) * w) / 8
    loss = IsoMaxPlusLoss()(np.eye(4, dtype="int64")[labels], z, sample_weight=w)
    np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scale", [2, 0.5, 37.0])
def test_class_uses_its_own_entropic_scale(rng, scale):
    z = _logits(rng)
    y = rng.integers(0, 5, size=9)
    reference = isomax_loss(y, z, entropic_scale=float(scale))
    assert not np.allclose(reference, isomax_loss(y, z))  # The scale matters here.
    np.testing.assert_allclose(
        IsoMaxPlusLoss(entropic_scale=scale)(y, z), reference.mean(), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        IsoMaxPlusLoss(entropic_scale=scale, reduction=None)(y, z),
        isomax_plus_loss(y, z, entropic_scale=scale),
        rtol=1e-6,
        atol=1e-7,
    )
    clone = IsoMaxPlusLoss.from_config(IsoMaxPlusLoss(entropic_scale=scale).get_config())
    np.testing.assert_allclose(clone(y, z), reference.mean(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss", [isomax_plus_loss, IsoMaxPlusLoss()], ids=["function", "class"])
def test_logits_need_a_classes_axis(loss):
    for logits in (np.float32(-1.0), np.zeros((4, 0), "float32")):
        with pytest.raises(ValueError, match=r"non-zero last dimension.*Received: y_pred.shape"):
            loss(np.zeros(np.shape(logits)[:-1], "int32"), logits)


@pytest.mark.tensorflow_only  # An unknown last dimension exists in TensorFlow graphs only.
def test_logits_with_an_unknown_classes_axis_are_rejected_when_traced():
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec((None, None), tf.float32)])
    def traced(z):
        return isomax_plus_loss(tf.zeros((2,), tf.int32), z)

    with pytest.raises(ValueError, match="non-zero last dimension"):
        traced.get_concrete_function()


def test_one_example_as_rank_1_logits(rng):
    z = _logits(rng, batch=1, num_classes=4)[0]  # (C,): one example.
    expected = isomax_loss(np.array([2]), z[None])[0]
    np.testing.assert_allclose(isomax_plus_loss(np.int64(2), z), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        isomax_plus_loss(np.eye(4, dtype="int32")[2], z), expected, rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("num_classes", [2, 3])
def test_one_hot_with_two_classes_and_a_batch_of_one(rng, num_classes):
    for batch in (1, 6):
        z = _logits(rng, batch=batch, num_classes=num_classes)
        y = rng.integers(0, num_classes, size=batch)
        expected = isomax_loss(y, z)
        for dtype in ("int32", "float32"):
            one_hot = np.eye(num_classes, dtype=dtype)[y]
            np.testing.assert_allclose(isomax_plus_loss(one_hot, z), expected, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(
                IsoMaxPlusLoss()(one_hot, z), expected.mean(), rtol=1e-5, atol=1e-6
            )


def test_one_class(rng):
    # One class: (B, 1) labels are sparse class ids (only 0 is valid); the loss is 0.
    z = _logits(rng, batch=5, num_classes=1)
    for labels in (np.zeros(5, "int32"), np.zeros((5, 1), "int32")):
        np.testing.assert_allclose(isomax_plus_loss(labels, z), np.zeros(5), atol=1e-7)
    with pytest.raises(ValueError, match=r"integers in \[0, 1\)"):
        isomax_plus_loss(np.ones((5, 1), "int32"), z)


def test_one_class_invalid_labels_give_nan_when_traced(rng, trace):
    z = _logits(rng, batch=5, num_classes=1)
    traced = trace(lambda y: isomax_plus_loss(y, z))
    loss = keras.ops.convert_to_numpy(traced(keras.ops.convert_to_tensor([0, 1, -1, 0, 3])))
    np.testing.assert_array_equal(np.isnan(loss), [False, True, True, False, True])


def test_label_equal_to_num_classes_is_nan_when_traced(rng, trace):
    z = _logits(rng, batch=4, num_classes=3)
    traced = trace(lambda y: isomax_plus_loss(y, z))
    loss = keras.ops.convert_to_numpy(traced(keras.ops.convert_to_tensor([2.0, 3.0, 0.0, 2.5])))
    np.testing.assert_array_equal(np.isnan(loss), [False, True, False, True])
    np.testing.assert_allclose(loss[[0, 2]], isomax_loss([2, 0], z[[0, 2]]), rtol=1e-5, atol=1e-6)


def test_extra_batch_axes_must_match(rng):
    z = _logits(rng, batch=6, num_classes=4).reshape(2, 3, 4)
    y = rng.integers(0, 4, size=(2, 3))
    np.testing.assert_allclose(isomax_plus_loss(y, z), isomax_loss(y, z), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        isomax_plus_loss(y[..., None], z), isomax_loss(y, z), rtol=1e-5, atol=1e-6
    )
    for bad in (y[:, :2], np.zeros((3, 3), "int64"), np.zeros((2, 3, 2), "int64")):
        with pytest.raises(ValueError, match=r"y_true.shape=.*y_pred.shape="):
            isomax_plus_loss(bad, z)


def test_empty_batch(rng):
    z = _logits(rng, batch=0, num_classes=3)
    for labels in (np.zeros((0,), "int32"), np.zeros((0, 3), "int32"), np.zeros((0, 1), "int64")):
        assert tuple(isomax_plus_loss(labels, z).shape) == (0,)


@pytest.mark.parametrize(
    "make",
    [np.array, np.float32, keras.ops.convert_to_tensor],
    ids=["ndarray", "numpy_scalar", "tensor"],
)
def test_entropic_scale_as_an_array_or_tensor(rng, make):
    z = _logits(rng)
    y = rng.integers(0, 5, size=9)
    expected = isomax_loss(y, z, entropic_scale=2.5)
    np.testing.assert_allclose(
        isomax_plus_loss(y, z, entropic_scale=make(2.5)), expected, rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        IsoMaxPlusLoss(entropic_scale=make(2.5))(y, z), expected.mean(), rtol=1e-5, atol=1e-6
    )
    for bad in (0.0, -1.0, np.inf):
        with pytest.raises(ValueError, match="entropic_scale"):
            isomax_plus_loss(y, z, entropic_scale=make(bad))
        with pytest.raises(ValueError, match="entropic_scale"):
            IsoMaxPlusLoss(entropic_scale=make(bad))


def test_entropic_scale_traced(rng, trace):
    z = _logits(rng)
    y = rng.integers(0, 5, size=9)
    traced = trace(lambda scale: isomax_plus_loss(y, z, entropic_scale=scale))
    np.testing.assert_allclose(
        traced(keras.ops.convert_to_tensor(2.5)),
        isomax_loss(y, z, entropic_scale=2.5),
        rtol=1e-5,
        atol=1e-6,
    )


def test_fit_with_integer_one_hot_targets(rng):
    x = rng.normal(size=(32, 6)).astype("float32")
    y = rng.integers(0, 3, size=32)
    losses = []
    for targets in (y, np.eye(3, dtype="int32")[y]):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((6,)), IsoMaxPlusLayer(3)])
        model.compile(optimizer="sgd", loss=IsoMaxPlusLoss())
        losses.append(model.fit(x, targets, epochs=2, shuffle=False, verbose=0).history["loss"])
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-6)

import contextlib
import json
import math
import warnings
import zipfile

import keras
import numpy as np
import pytest

from keras_isomax import IsoMaxPlusLayer, IsoMaxPlusLoss, OODScore, scores
from keras_isomax.layers import l2_normalize, pairwise_distances
from keras_isomax.testing import distances as ref_distances
from keras_isomax.testing import logits as ref_logits

BACKEND = keras.backend.backend()


# Keras' type promotion maps float64 to float32 off TensorFlow (`keras.backend.result_type`;
# JAX's own ops keep float64 under x64): on PyTorch, `ops.maximum` and the like run a
# float64 layer partly in float32, so float64 comparisons there get float32 tolerances.
F64_TOL = 1e4 if BACKEND == "torch" else 1.0


def _np(x):
    return keras.ops.convert_to_numpy(x)


def _t(x):
    return keras.ops.convert_to_tensor(x)


def _value_and_gradients(layer, x, objective, training=None):
    """`layer(x)` and the gradients of the scalar `objective(logits)` with respect to
    `x` and to each of `layer.trainable_variables`, on any backend, as NumPy arrays."""
    variables = layer.trainable_variables
    if BACKEND == "tensorflow":
        import tensorflow as tf

        x_t = tf.Variable(x)
        with tf.GradientTape() as tape:
            logits = layer(x_t, training=training)
            loss = objective(logits)
        grads = tape.gradient(loss, [x_t, *variables])
    elif BACKEND == "jax":
        import jax

        def f(x_, trainable):
            non_trainable = [v.value for v in layer.non_trainable_variables]
            logits, _ = layer.stateless_call(trainable, non_trainable, x_, training=training)
            return objective(logits), logits

        (_, logits), (gx, gw) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(
            jax.numpy.asarray(x), [v.value for v in variables]
        )
        grads = [gx, *gw]
    elif BACKEND == "torch":
        import torch

        x_t = torch.tensor(x, requires_grad=True)
        logits = layer(x_t, training=training)
        loss = objective(logits)
        grads = torch.autograd.grad(loss, [x_t, *(v.value for v in variables)])
        logits = logits.detach()
    else:
        pytest.skip(f"no gradient helper for the {BACKEND} backend")
    return _np(logits), [_np(g) for g in grads]


def _built_layer(num_classes, feature_dim, rng, dtype=None, **kwargs):
    layer = IsoMaxPlusLayer(num_classes, dtype=dtype, **kwargs)
    layer.build((None, feature_dim))
    layer.prototypes.assign(rng.normal(size=(num_classes, feature_dim)))
    return layer


def _distances(layer, x, training=None):
    scale = abs(float(layer.distance_scale.numpy()))
    temperature = float(layer.temperature.numpy())
    return -_np(layer(x, training=training)) * temperature / scale


def _cache_of(layer):
    return layer._inference_cache  # White-box: the cache the layer keeps on TensorFlow.


# ---------------------------------------------------------------- the formula


@pytest.mark.parametrize("shape", [(7, 16), (3, 5, 16)])
def test_logits_match_float64_reference(rng, shape):
    layer = _built_layer(6, 16, rng)
    layer.distance_scale.assign(-2.5)  # |s| is used
    layer.temperature.assign(1.7)
    x = rng.normal(size=shape).astype("float32")
    expected = ref_logits(x, layer.prototypes.numpy(), scale=-2.5, temperature=1.7)
    got = _np(layer(x))
    assert got.shape == shape[:-1] + (6,)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_prototypes_init_standard_normal_and_scale_one():
    layer = IsoMaxPlusLayer(200)
    layer.build((None, 300))
    p = layer.prototypes.numpy()
    assert p.shape == (200, 300)
    assert abs(p.mean()) < 0.01 and abs(p.std() - 1.0) < 0.01
    assert float(layer.distance_scale.numpy()) == 1.0
    assert float(layer.temperature.numpy()) == 1.0
    assert math.isnan(float(layer.ood_threshold.numpy()))
    assert not layer.is_calibrated
    trainable = {w.name for w in layer.trainable_weights}
    assert trainable == {"prototypes", "distance_scale"}


@pytest.mark.parametrize(
    "mode",
    # The inference cache exists on TensorFlow only (elsewhere `training=False` is live math).
    ["live", "snapshot", pytest.param("cache", marks=pytest.mark.tensorflow_only)],
)
def test_distance_precision_spec(rng, mode):
    """Relative error <= 1e-5 above 0.05 and absolute <= 1e-3 everywhere (float32),
    with the live weights, inside `inference_snapshot` (what exports trace) and
    through the inference cache (`training=False`: the first call fills it, the
    next read it, with identical results)."""
    num_classes, feature_dim = 40, 256
    layer = _built_layer(num_classes, feature_dim, rng)
    pn = _np(l2_normalize(layer.prototypes)).astype(np.float64)
    # Features at controlled distances from a random prototype, from 0 to ~1.5,
    # plus exact copies of prototypes and generic random features.
    n = 600
    targets = rng.integers(0, num_classes, size=n)
    radii = np.concatenate([np.zeros(20), 10 ** rng.uniform(-4, 0.2, size=n - 20)])
    direction = rng.normal(size=(n, feature_dim))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    near = pn[targets] + radii[:, None] * direction
    x = np.concatenate([near, rng.normal(size=(200, feature_dim))]).astype("float32")
    expected = ref_distances(x, layer.prototypes.numpy())
    with layer.inference_snapshot() if mode == "snapshot" else contextlib.nullcontext():
        if mode == "cache":
            got = _distances(layer, x, False).astype(np.float64)
            assert bool(_cache_of(layer).filled.numpy())
            np.testing.assert_array_equal(_distances(layer, x, False), got)
        else:
            got = _distances(layer, x).astype(np.float64)
    abs_err = np.abs(got - expected)
    rel_err = abs_err / expected
    assert abs_err.max() <= 1e-3
    assert rel_err[expected > 0.05].max() <= 1e-5
    assert expected.min() < 1e-6  # the exact-copy case was exercised
    # The nearest prototype (the minimum distance score) keeps its relative
    # accuracy also below 0.05, down to 1e-4 (float32 inputs limit it there).
    nearest_expected = expected.min(axis=1)
    nearest_got = got.min(axis=1)
    small = (nearest_expected >= 1e-4) & (nearest_expected < 0.05)
    assert small.sum() > 100
    assert np.max(np.abs(nearest_got - nearest_expected)[small] / nearest_expected[small]) <= 1e-4
    np.testing.assert_array_equal(got.argmin(axis=1)[small], expected.argmin(axis=1)[small])


def test_layer_matches_pairwise_distances_of_normalised_vectors(rng):
    """The layer's fused form equals the generic function on normalised inputs."""
    layer = _built_layer(9, 12, rng)
    layer.prototypes.assign(layer.prototypes.numpy() * rng.uniform(0.1, 10, size=(9, 1)))
    x = rng.normal(size=(2, 5, 12)).astype("float32")
    x[0, 1] = 0.7 * _np(l2_normalize(layer.prototypes))[4]  # distance 0 to prototype 4
    expected = _np(pairwise_distances(l2_normalize(_t(x)), l2_normalize(layer.prototypes)))
    got = _distances(layer, x)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got, ref_distances(x, layer.prototypes.numpy()), atol=1e-6)


def test_pairwise_distances_unnormalised_reference(rng):
    x = rng.normal(size=(6, 7)).astype("float32")
    p = 3.0 * rng.normal(size=(4, 7)).astype("float32")
    p[2] = x[3] + 1e-3 * rng.normal(size=7)  # a small, exactly recomputed distance
    expected = np.linalg.norm(x.astype(np.float64)[:, None] - p.astype(np.float64)[None], axis=-1)
    got = _np(pairwise_distances(_t(x), _t(p)))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_pairwise_distances_non_finite_rows_and_rows_summing_to_zero(rng):
    """NaN or Inf in a row makes that row NaN; a finite row whose entries sum to 0
    stays finite (the NaN guard must not divide by the sum)."""
    x = rng.normal(size=(5, 4)).astype("float32")
    x[1] = [1.0, -1.0, 2.0, -2.0]
    x[3, 2], x[4, 0] = np.inf, np.nan
    p = rng.normal(size=(3, 4)).astype("float32")
    got = _np(pairwise_distances(_t(x), _t(p)))
    expected = np.linalg.norm(x[:3, None].astype(np.float64) - p[None], axis=-1)
    np.testing.assert_allclose(got[:3], expected, rtol=1e-5)
    assert np.isnan(got[3:]).all()


def _gradient(fn, x):
    """d fn(x) / dx for a scalar-valued `fn`, on any backend, as NumPy."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        x_t = tf.Variable(x)
        with tf.GradientTape() as tape:
            value = fn(x_t)
        return tape.gradient(value, x_t).numpy()
    if BACKEND == "jax":
        import jax

        return np.asarray(jax.grad(fn)(jax.numpy.asarray(x)))
    import torch

    x_t = torch.tensor(x, requires_grad=True)
    fn(x_t).backward()
    return x_t.grad.numpy()


def test_pairwise_distances_gradient_is_finite_at_zero_distance(rng):
    """A feature exactly on a prototype: the exact distance is 0 and its gradient 0,
    not NaN (the square root's derivative is infinite there)."""
    p = rng.normal(size=(3, 5)).astype("float32")
    x = rng.normal(size=(4, 5)).astype("float32")
    x[2] = p[1]
    grad = _gradient(lambda v: keras.ops.sum(pairwise_distances(v, _t(p))), x)
    assert np.all(np.isfinite(grad))
    # Away from the zero: d/dx sum_c ||x - p_c|| = sum_c (x - p_c) / ||x - p_c||.
    diff = x[[0, 1, 3], None].astype(np.float64) - p[None]
    expected = (diff / np.linalg.norm(diff, axis=-1, keepdims=True)).sum(1)
    np.testing.assert_allclose(grad[[0, 1, 3]], expected, rtol=1e-4, atol=1e-5)


def test_expansion_alone_is_imprecise_near_zero(rng):
    """Why the exact recomputation exists: the expansion misses the spec."""
    x = rng.normal(size=(1, 512))
    p = _np(l2_normalize(_t(x))) + 0.01 * rng.normal(size=(1, 512)) / np.sqrt(512)
    p32 = np.concatenate([p, rng.normal(size=(3, 512))]).astype("float32")
    x32 = x.astype("float32")
    expected = ref_distances(x32, p32)[0, 0]
    x32, p32 = _t(x32), _t(p32)
    expansion = pairwise_distances(l2_normalize(x32), l2_normalize(p32), exact_nearest=False)
    expansion = _np(expansion)[0, 0]
    exact = _np(pairwise_distances(l2_normalize(x32), l2_normalize(p32)))[0, 0]
    assert abs(exact - expected) / expected <= 1e-5
    assert abs(expansion - expected) / expected > 1e-5


@pytest.mark.parametrize("near", [False, True])
def test_gradients_match_finite_differences(rng, near, float64):
    num_classes, feature_dim = 5, 6
    layer = _built_layer(num_classes, feature_dim, rng, dtype="float64")
    layer.distance_scale.assign(1.3)
    x = rng.normal(size=(4, feature_dim))
    if near:  # rows close to a prototype: the exactly recomputed entry dominates
        p = _np(l2_normalize(layer.prototypes))
        x = 2.0 * (p[[0, 3, 3, 1]] + 0.01 * rng.normal(size=(4, feature_dim)))
    weights = rng.normal(size=(4, num_classes))
    p0 = layer.prototypes.numpy()

    def objective(x_, p_, s_):
        return float(np.sum(weights * ref_logits(x_, p_, scale=s_)))

    _, (gx, *gw) = _value_and_gradients(
        layer, x, lambda z: keras.ops.sum(keras.ops.multiply(weights, z))
    )
    grads = dict(zip([v.name for v in layer.trainable_variables], gw, strict=True))
    gp, gs = grads["prototypes"], grads["distance_scale"]

    def numeric(f, value, eps=1e-6):
        grad = np.zeros_like(value)
        for i in np.ndindex(value.shape):
            up, down = value.copy(), value.copy()
            up[i] += eps
            down[i] -= eps
            grad[i] = (f(up) - f(down)) / (2 * eps)
        return grad

    np.testing.assert_allclose(
        gx,
        numeric(lambda v: objective(v, p0, 1.3), x),
        rtol=1e-6 * F64_TOL,
        atol=1e-8 * F64_TOL,
    )
    np.testing.assert_allclose(
        gp,
        numeric(lambda v: objective(x, v, 1.3), p0),
        rtol=1e-6 * F64_TOL,
        atol=1e-8 * F64_TOL,
    )
    np.testing.assert_allclose(
        float(gs),
        numeric(lambda v: objective(x, p0, float(v)), np.array(1.3)),
        rtol=1e-6 * F64_TOL,
    )


@pytest.mark.parametrize("training", [True, False])
def test_clamped_norms_match_reference(rng, training, float64):
    """Feature vectors and prototypes with norms below 1e-12 (clamped, as PyTorch's
    `F.normalize` clamps them): logits and gradients equal the float64 reference,
    on the training path and on the inference path (`training=False`)."""
    num_classes, feature_dim = 5, 6
    layer = _built_layer(num_classes, feature_dim, rng, dtype="float64")
    p = rng.normal(size=(num_classes, feature_dim))
    p[3] *= 1e-13
    layer.prototypes.assign(p)
    layer.distance_scale.assign(1.3)
    x = rng.normal(size=(4, feature_dim))
    x[1] = 0.0
    x[2] *= 3e-13
    weights = rng.normal(size=(4, num_classes))
    layer(x, training=training)  # On the inference path: fills the cache, read below.
    logits, (gx, *gw) = _value_and_gradients(
        layer, x, lambda z: keras.ops.sum(keras.ops.multiply(weights, z)), training=training
    )
    gp = dict(zip([v.name for v in layer.trainable_variables], gw, strict=True))["prototypes"]
    np.testing.assert_allclose(
        logits, ref_logits(x, p, scale=1.3), rtol=1e-10 * F64_TOL, atol=1e-12 * F64_TOL
    )

    def numeric(f, value):
        # Central differences, steps relative to each row's norm (clamped rows stay clamped).
        grad = np.zeros_like(value)
        for i in np.ndindex(value.shape):
            step = (
                1e-6 * np.linalg.norm(value[i[0]]) if np.linalg.norm(value[i[0]]) > 1e-9 else 1e-20
            )
            up, down = value.copy(), value.copy()
            up[i] += step
            down[i] -= step
            grad[i] = (f(up) - f(down)) / (2 * step)
        return grad

    def objective(x_, p_):
        return float(np.sum(weights * ref_logits(x_, p_, scale=1.3)))

    for got, expected in (
        (gx, numeric(lambda v: objective(v, p), x)),
        (gp, numeric(lambda v: objective(x, v), p)),
    ):
        # Per row: a clamped row's gradient is ~1e12 times larger than the others'.
        scale = np.abs(expected).max(axis=1, keepdims=True)
        np.testing.assert_allclose(got / scale, expected / scale, rtol=0, atol=1e-6)


def test_no_nan_at_zero_distance_or_zero_features(rng):
    layer = _built_layer(4, 8, rng)
    p = layer.prototypes.numpy()
    x = np.stack([p[0], 3.0 * p[2], np.zeros(8), rng.normal(size=8)]).astype("float32")
    labels = np.array([0, 2, 1, 3])
    logits, grads = _value_and_gradients(layer, x, lambda z: IsoMaxPlusLoss()(labels, z))
    assert len(grads) == 3  # x, prototypes, distance_scale
    assert np.all(np.isfinite(logits))
    assert logits[0, 0] == 0.0
    assert abs(logits[1, 2]) < 1e-6  # same direction up to rounding
    # An all-zero feature vector normalises to 0: distance 1 to every prototype.
    np.testing.assert_allclose(logits[2], -1.0, rtol=1e-6)
    for g in grads:
        assert np.all(np.isfinite(g))


def test_nan_inputs_stay_in_their_row(rng):
    """Documented behaviour: NaN/Inf features give NaN logits for that example only."""
    layer = _built_layer(3, 5, rng)
    x = rng.normal(size=(4, 5)).astype("float32")
    x[1, 2] = np.nan
    x[3, 0] = np.inf
    logits = _np(layer(x))
    # Never a finite (let alone the best possible) score for a broken input.
    assert np.all(np.isnan(logits[[1, 3]]))
    np.testing.assert_allclose(
        logits[[0, 2]],
        ref_logits(x[[0, 2]], layer.prototypes.numpy()),
        rtol=1e-5,
        atol=1e-6,
    )
    assert np.isnan(scores.minimum_distance_score(logits)[1])


def test_empty_batch(rng):
    layer = _built_layer(3, 5, rng)
    out = layer(np.zeros((0, 5), "float32"))
    assert tuple(out.shape) == (0, 3)


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("bad", [0, -3, 2.5, "10", None, True])
def test_bad_num_classes(bad):
    with pytest.raises(ValueError, match="num_classes"):
        IsoMaxPlusLayer(bad)


def test_exact_neighbors_removed_and_old_keras_files_load(rng, tmp_path):
    """`exact_neighbors` is gone; `.keras` files whose config holds it still load
    (the key is dropped, silently) and compute the same logits."""
    with pytest.raises(ValueError, match="exact_neighbors"):
        IsoMaxPlusLayer(3, exact_neighbors=8)
    model = keras.Sequential([keras.Input((5,)), IsoMaxPlusLayer(3, name="head")])
    model.layers[-1].prototypes.assign(rng.normal(size=(3, 5)))
    path = tmp_path / "new.keras"
    model.save(path)
    # The same file as the earlier layer wrote it: `exact_neighbors` in the config.
    old_path = tmp_path / "old.keras"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(old_path, "w") as target:
        for item in source.infolist():
            data = source.read(item.filename)
            if item.filename == "config.json":
                config = json.loads(data)
                (head,) = [c for c in config["config"]["layers"] if c["config"]["name"] == "head"]
                head["config"]["exact_neighbors"] = 2
                data = json.dumps(config).encode()
            target.writestr(item, data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        restored = keras.saving.load_model(old_path)
    assert "exact_neighbors" not in restored.layers[-1].get_config()
    x = rng.normal(size=(4, 5)).astype("float32")
    np.testing.assert_array_equal(_np(restored(x)), _np(model(x)))
    np.testing.assert_allclose(
        _np(restored(x)), ref_logits(x, model.layers[-1].prototypes.numpy()), rtol=1e-5, atol=1e-6
    )


def test_one_class(rng):
    """A one-class head is allowed: its logit is minus the scaled distance."""
    layer = _built_layer(1, 6, rng)
    x = rng.normal(size=(5, 6)).astype("float32")
    got = _np(layer(_t(x)))
    expected = ref_logits(x, _np(layer.prototypes), scale=float(_np(layer.distance_scale)))
    assert got.shape == (5, 1)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_masked_timesteps_do_not_count_in_the_loss(rng):
    """The layer passes a Keras mask through (sequence labelling): the labels of
    masked (padded) steps never change the loss."""
    model = keras.Sequential(
        [
            keras.Input((6, 4)),
            keras.layers.Masking(0.0),
            # A bias: padded steps get features whose logits depend on the label.
            keras.layers.Dense(4, bias_initializer="random_normal"),
            IsoMaxPlusLayer(3, name="head"),
        ]
    )
    model.compile(loss=IsoMaxPlusLoss())
    x = rng.normal(size=(8, 6, 4)).astype("float32")
    x[:, 4:] = 0.0  # Two padded steps per sequence.
    y = rng.integers(0, 3, (8, 6))
    other = y.copy()
    other[:, 4:] = (y[:, 4:] + 1) % 3
    first = model.evaluate(x, y, verbose=0)
    assert model.evaluate(x, other, verbose=0) == pytest.approx(first, rel=1e-6)
    changed = y.copy()
    changed[:, :4] = (y[:, :4] + 1) % 3  # Unmasked steps do count.
    assert model.evaluate(x, changed, verbose=0) != pytest.approx(first, rel=1e-3)


def test_wrong_feature_dim_on_built_layer(rng):
    layer = _built_layer(3, 5, rng)
    with pytest.raises(ValueError, match="expected axis -1 of input shape to have value 5"):
        layer(np.ones((2, 6), "float32"))


def test_rank_one_input_rejected():
    with pytest.raises(ValueError, match="min_ndim=2"):
        IsoMaxPlusLayer(3)(np.ones((5,), "float32"))


# ---------------------------------------------------------------- Keras integration


def _toy_problem(rng, n_per_class=100, num_classes=4, dim=8):
    centers = 4.0 * rng.normal(size=(num_classes, dim))
    x = np.concatenate([c + rng.normal(size=(n_per_class, dim)) for c in centers])
    y = np.repeat(np.arange(num_classes), n_per_class)
    order = rng.permutation(len(y))
    return x[order].astype("float32"), y[order], centers


def _sequential(num_classes=4, dim=8):
    model = keras.Sequential([keras.Input((dim,)), keras.layers.Dense(32, activation="relu")])
    model.add(IsoMaxPlusLayer(num_classes))
    return model


def test_sequential_fit_accuracy_and_ood_ranking(rng):
    keras.utils.set_random_seed(1)
    x, y, centers = _toy_problem(rng)
    model = _sequential()
    model.compile(
        optimizer=keras.optimizers.Adam(0.01),
        loss=IsoMaxPlusLoss(),
        metrics=["accuracy", OODScore()],
    )
    history = model.fit(x, y, epochs=30, batch_size=32, verbose=0)
    assert history.history["accuracy"][-1] > 0.95
    assert "minimum_distance_score" in history.history
    _, accuracy, _ = model.evaluate(x, y, verbose=0)
    assert accuracy > 0.95
    # Far-away inputs: between the clusters' region and beyond, in directions
    # the training data never took.
    far = (12.0 * rng.normal(size=(300, 8))).astype("float32")
    far = far[np.min(np.linalg.norm(far[:, None] - centers, axis=-1), axis=1) > 6]
    s_in = _np(scores.minimum_distance_score(model.predict(x, verbose=0)))
    s_out = _np(scores.minimum_distance_score(model.predict(far, verbose=0)))
    auroc = np.mean(s_in[:, None] > s_out[None, :])
    assert auroc > 0.9, auroc


def test_functional_and_subclassed_models(rng):
    inputs = keras.Input((6,))
    h = keras.layers.Dense(8, activation="relu")(inputs)
    functional = keras.Model(inputs, IsoMaxPlusLayer(3)(h))
    assert functional.output_shape == (None, 3)

    class Classifier(keras.Model):
        def __init__(self):
            super().__init__()
            self.backbone = keras.layers.Dense(8, activation="relu")
            self.head = IsoMaxPlusLayer(3)

        def call(self, x):
            return self.head(self.backbone(x))

    x = rng.normal(size=(10, 6)).astype("float32")
    y = rng.integers(0, 3, size=10)
    for model in (functional, Classifier()):
        model.compile(optimizer="sgd", loss=IsoMaxPlusLoss())
        before = model.evaluate(x, y, verbose=0)
        model.fit(x, y, epochs=5, verbose=0)
        assert model.evaluate(x, y, verbose=0) < before


def test_symbolic_call_shapes():
    out = IsoMaxPlusLayer(7)(keras.Input((None, 12)))
    assert out.shape == (None, None, 7)


def test_config_round_trip():
    layer = IsoMaxPlusLayer(
        5,
        prototype_initializer=keras.initializers.RandomNormal(stddev=0.5),
        prototype_regularizer=keras.regularizers.L2(1e-4),
        distance_scale_initializer=keras.initializers.Constant(3.0),
        name="head",
    )
    config = layer.get_config()
    clone = IsoMaxPlusLayer.from_config(config)
    assert clone.get_config() == config
    assert config["num_classes"] == 5
    clone.build((None, 4))
    assert float(clone.distance_scale.numpy()) == 3.0


def test_keras_save_load_identical_outputs(rng, tmp_path):
    model = _sequential()
    model.compile(optimizer="sgd", loss=IsoMaxPlusLoss(), metrics=[OODScore()])
    x, y, _ = _toy_problem(rng, n_per_class=10)
    model.fit(x, y, epochs=1, verbose=0)
    head = model.layers[-1]
    head.temperature.assign(1.5)
    head.ood_threshold.assign(-0.25)
    path = tmp_path / "model.keras"
    model.save(path)
    restored = keras.saving.load_model(path)
    np.testing.assert_array_equal(model.predict(x, verbose=0), restored.predict(x, verbose=0))
    restored_head = restored.layers[-1]
    assert isinstance(restored_head, IsoMaxPlusLayer)
    assert float(restored_head.temperature.numpy()) == 1.5
    assert float(restored_head.ood_threshold.numpy()) == -0.25
    assert restored_head.is_calibrated
    assert isinstance(restored.loss, IsoMaxPlusLoss)
    restored.fit(x, y, epochs=1, verbose=0)  # compiled state restored too


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision(rng, policy):
    x, y, _ = _toy_problem(rng, n_per_class=20)
    keras.utils.set_random_seed(3)
    reference = _sequential()
    keras.config.set_dtype_policy(policy)
    keras.utils.set_random_seed(3)
    model = _sequential()
    head = model.layers[-1]
    assert model.layers[0].compute_dtype in ("float16", "bfloat16")
    assert head.compute_dtype == "float32"
    model.set_weights(reference.get_weights())
    logits = model(x)
    assert keras.backend.standardize_dtype(logits.dtype) == "float32"
    tolerance = 2e-2 if policy == "mixed_bfloat16" else 2e-3
    np.testing.assert_allclose(_np(logits), _np(reference(x)), atol=tolerance)
    model.compile(optimizer="sgd", loss=IsoMaxPlusLoss())
    history = model.fit(x, y, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    # A dtype given to the layer wins over the global mixed policy.
    assert IsoMaxPlusLayer(3, dtype="float64").compute_dtype == "float64"
    assert IsoMaxPlusLayer(3, dtype=policy).compute_dtype == "float32"


def test_jit_compile_matches_eager(rng):
    x, y, _ = _toy_problem(rng, n_per_class=16)
    keras.utils.set_random_seed(5)
    eager = _sequential()
    keras.utils.set_random_seed(5)
    jitted = _sequential()
    jitted.set_weights(eager.get_weights())
    eager.compile(optimizer="sgd", loss=IsoMaxPlusLoss(), jit_compile=False)
    jitted.compile(optimizer="sgd", loss=IsoMaxPlusLoss(), jit_compile=True)
    h_eager = eager.fit(x, y, epochs=2, batch_size=16, shuffle=False, verbose=0)
    h_jit = jitted.fit(x, y, epochs=2, batch_size=16, shuffle=False, verbose=0)
    np.testing.assert_allclose(h_eager.history["loss"], h_jit.history["loss"], rtol=1e-4)


@pytest.mark.tensorflow_only  # XLA through `tf.function(jit_compile=True)`.
def test_layer_call_under_tf_function_xla_matches_eager(rng):
    import tensorflow as tf

    layer = _built_layer(4, 32, rng)
    x = rng.normal(size=(16, 32)).astype("float32")
    forward = tf.function(layer.call, jit_compile=True)
    np.testing.assert_allclose(forward(x), layer(x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        forward(x), ref_logits(x, layer.prototypes.numpy()), rtol=1e-5, atol=1e-6
    )


def test_no_stale_prototypes_after_assign(rng):
    """Nothing derived from the prototypes outlives a change of their values."""
    model = keras.Sequential([keras.Input((6,)), IsoMaxPlusLayer(4)])
    head = model.layers[-1]
    x = rng.normal(size=(5, 6)).astype("float32")
    calls = [lambda x: _np(model(x)), lambda x: model.predict(x, verbose=0)]  # `predict`: traced.
    if BACKEND == "tensorflow":  # A `tf.function` traced once, called after each assign.
        import tensorflow as tf

        calls.append(tf.function(model))
    for _ in range(2):
        p = rng.normal(size=(4, 6)).astype("float32") * rng.uniform(0.1, 10, size=(4, 1))
        head.prototypes.assign(p)
        expected = ref_logits(x, p)
        for call in calls:
            np.testing.assert_allclose(call(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.tensorflow_only  # The inference cache, tf.function, tf.train.Checkpoint.
def test_inference_cache_is_read_and_never_stale(rng, tmp_path):
    """`training=False` calls read the normalised prototypes kept by the last
    one; any write to the prototypes (Keras `assign`, a raw `tf.Variable` op, an
    optimizer step in `fit`, a checkpoint restore) is seen by the next call:
    eager, traced and `predict` alike."""
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5), IsoMaxPlusLayer(4)])
    head = model.layers[-1]
    x = rng.normal(size=(7, 6)).astype("float32")
    import tensorflow as tf

    traced = tf.function(lambda x: model(x, training=False))

    def check():
        features = model.layers[0](x).numpy()
        scale = float(head.distance_scale.numpy())
        expected = ref_logits(features, head.prototypes.numpy(), scale=scale)
        first = model(x, training=False)  # Fills the cache after a write ...
        for got in (model(x, training=False), traced(x), model.predict(x, verbose=0)):
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
        # ... and reading it gives the same numbers, bit for bit.
        np.testing.assert_array_equal(model(x, training=False), first)

    check()
    cache = _cache_of(head)
    # The cache holds the normalised prototypes, (F, C), scaled by -2 ...
    pn = l2_normalize(head.prototypes).numpy().astype(np.float64)
    np.testing.assert_allclose(cache.kernel.numpy(), -2.0 * pn.T, atol=2e-7)
    # ... and is what an unchanged call reads: spoil it, the logits change.
    cache.kernel.assign(tf.zeros_like(cache.kernel))
    assert not np.allclose(model(x, training=False), model(x, training=True), atol=1e-3)
    head.prototypes.assign(head.prototypes.numpy() * 2.0)  # Same directions, new values.
    check()
    head.prototypes.value.assign_sub(tf.ones((4, 5)))  # Bypasses keras.Variable.
    check()
    model.compile(optimizer="sgd", loss=IsoMaxPlusLoss())
    saved = tf.train.Checkpoint(model=model).write(str(tmp_path / "checkpoint"))
    # The cache is not saved with the model (nor listed among its weights).
    assert not [name for name, _ in tf.train.list_variables(saved) if "cache" in name]
    before = head.prototypes.numpy()
    model.fit(x, np.arange(7) % 4, epochs=2, batch_size=4, verbose=0)
    assert not np.array_equal(before, head.prototypes.numpy())
    check()
    tf.train.Checkpoint(model=model).read(saved).expect_partial()
    np.testing.assert_array_equal(head.prototypes.numpy(), before)
    check()
    assert [w.name for w in head.weights] == [
        "prototypes",
        "distance_scale",
        "temperature",
        "ood_threshold",
    ]


@pytest.mark.tensorflow_only  # The inference cache under tf.GradientTape, tf.function, XLA.
def test_inference_cache_gradients_and_tracing(rng):
    """Under a tape, `training=False` gives the live math's gradients; a
    function first traced for training then for inference works; XLA and
    `inference_cache=False` use the live math."""
    import tensorflow as tf

    layer = _built_layer(5, 8, rng)
    x = tf.constant(rng.normal(size=(6, 8)).astype("float32"))
    upstream = tf.constant(rng.normal(size=(6, 5)).astype("float32"))

    def grads(training):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(layer(x, training=training) * upstream)
        return tape.gradient(loss, [x, layer.prototypes.value, layer.distance_scale.value])

    layer(x, training=False)  # Fills the cache, which the next call reads.
    for cached, live in zip(grads(False), grads(True), strict=True):
        np.testing.assert_allclose(cached, live, rtol=1e-5, atol=1e-6)

    # A custom loop passing training=False: the prototypes change between
    # calls, each call refills the cache, and the results stay exact.
    optimizer = keras.optimizers.SGD(0.1)
    for _ in range(3):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(x, training=False) * upstream)
        variables = layer.trainable_variables
        optimizer.apply(tape.gradient(loss, variables), variables)
    scale = float(layer.distance_scale.numpy())
    expected = ref_logits(x.numpy(), layer.prototypes.numpy(), scale=scale)
    np.testing.assert_allclose(layer(x, training=False), expected, rtol=1e-5, atol=1e-6)

    fresh = _built_layer(5, 8, rng)
    both = tf.function(lambda x, training: fresh(x, training=training))
    both(x, True)
    expected = ref_logits(x.numpy(), fresh.prototypes.numpy())
    for _ in range(2):  # Fills the cache, then reads it.
        np.testing.assert_allclose(both(x, False), expected, rtol=1e-5, atol=1e-6)
    assert bool(_cache_of(fresh).filled.numpy())

    jitted, off = _built_layer(5, 8, rng), _built_layer(5, 8, rng, inference_cache=False)
    xla = tf.function(lambda x: jitted(x, training=False), jit_compile=True)
    for layer, got in ((jitted, xla(x)), (off, off(x, training=False))):
        expected = ref_logits(x.numpy(), layer.prototypes.numpy())
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
        assert not bool(_cache_of(layer).filled.numpy())  # The live math.
    with tf.distribute.OneDeviceStrategy("CPU:0").scope():
        distributed = IsoMaxPlusLayer(5)
        distributed.build((None, 8))
    assert _cache_of(distributed) is None  # Replicas would skip it: not created.
    np.testing.assert_allclose(
        distributed(x, training=False),
        ref_logits(x.numpy(), distributed.prototypes.numpy()),
        rtol=1e-5,
        atol=1e-6,
    )


def test_inference_cache_config(rng):
    config = _built_layer(5, 8, rng, inference_cache=False).get_config()
    assert IsoMaxPlusLayer.from_config(config).inference_cache is False
    config.pop("inference_cache")  # As saved by earlier versions.
    assert IsoMaxPlusLayer.from_config(config).inference_cache is True


def test_inference_snapshot_matches_reference_and_ends_with_the_context(rng):
    """Inside the context: the weights normalised on entry (eager and traced);
    outside: the current weights again, with no weight added to the layer."""
    model = keras.Sequential([keras.Input((12,)), IsoMaxPlusLayer(9)])
    head = model.layers[-1]
    p = rng.normal(size=(9, 12)) * rng.uniform(0.1, 10, size=(9, 1))
    head.prototypes.assign(p)
    head.distance_scale.assign(-1.7)
    x = rng.normal(size=(20, 12)).astype("float32")
    x[:3] = p[[4, 0, 8]] * 2.5 + 1e-4 * rng.normal(size=(3, 12))  # near prototypes
    expected = ref_logits(x, p, scale=-1.7)
    config, names = head.get_config(), [w.path for w in model.weights]
    with head.inference_snapshot() as (kernel, squared_norms):
        assert tuple(kernel.shape) == (12, 9) and tuple(squared_norms.shape) == (9,)
        assert not kernel.trainable and not squared_norms.trainable
        assert [w.path for w in model.weights] == names
        calls = [lambda x: _np(model(x)), lambda x: model.predict(x, verbose=0)]  # Traced.
        if BACKEND == "tensorflow":
            import tensorflow as tf

            calls.append(tf.function(model))
        for call in calls:
            np.testing.assert_allclose(call(x), expected, rtol=1e-5, atol=1e-6)
    assert head.get_config() == config
    head.prototypes.assign(rng.normal(size=(9, 12)))
    np.testing.assert_allclose(
        _np(model(x)), ref_logits(x, head.prototypes.numpy(), scale=-1.7), rtol=1e-5, atol=1e-6
    )


def test_inference_snapshot_errors(rng):
    with pytest.raises(ValueError, match="must be built"):
        with IsoMaxPlusLayer(3).inference_snapshot():
            pass
    layer = _built_layer(3, 4, rng)
    x = rng.normal(size=(2, 4)).astype("float32")
    with layer.inference_snapshot():
        with pytest.raises(ValueError, match="do not nest"):
            with layer.inference_snapshot():
                pass
        with pytest.raises(ValueError, match="Received: training=True"):
            layer(x, training=True)
        layer(x, training=False)
    layer(x, training=True)  # The context is over.

"""Detectors under bad input: each case is a clear error naming the argument and what
was received, or a documented result checked against a float64 NumPy reference."""

import json
import os
import zipfile

import keras
import numpy as np
import pytest
from keras import ops

from keras_isomax import IsoMaxPlusLayer, detectors
from keras_isomax.calibration import calibrate_threshold, predict_ood

F, C = 6, 4


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(11)
    x = rng.normal(size=(200, 8)).astype("float32")
    y = np.arange(200) % C
    return x, y


def _model(hide_nan=False, seed=0):
    """Dense features + IsoMax+ head; `hide_nan` maps NaN inputs to 0 first (as some
    CPU kernels do), so only the library's non-finite rule can flag them."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8,))
    h = inputs
    if hide_nan:
        h = keras.layers.Lambda(lambda t: ops.where(ops.isnan(t), ops.zeros_like(t), t))(h)
    h = keras.layers.Dense(F, activation="tanh", name="features")(h)
    return keras.Model(inputs, IsoMaxPlusLayer(C)(h))


def _features(model, x):
    return keras.Model(model.inputs, model.get_layer("features").output).predict(x, verbose=0)


FITTED = {
    "knn": lambda **kw: detectors.KNN(k=3, **kw),
    "mahalanobis": lambda **kw: detectors.Mahalanobis(**kw),
    "class_means": lambda **kw: detectors.ClassMeans(**kw),
    "vim": lambda **kw: detectors.ViM(2, **kw),
}


# ------------------------------------------------------------------ empty data


@pytest.mark.parametrize("name", sorted(FITTED))
def test_empty_data_is_an_error(data, name):
    x, y = data
    with pytest.raises(ValueError, match="no examples. Received: empty data"):
        FITTED[name]().fit(_model(), (x[:0], y[:0]), verbose=0)
    with pytest.raises(ValueError, match="no examples"):
        det = FITTED[name]()
        if name == "vim":
            det.fit_features(np.zeros((0, F)), kernel=np.ones((F, C)), verbose=0)
        else:
            det.fit_features(np.zeros((0, F), "float32"), np.zeros(0, int), verbose=0)


def test_empty_scoring_input_is_an_error(data):
    x, y = data
    model = _model()
    det = detectors.KNN(k=3).fit(model, (x, y), verbose=0)
    with pytest.raises(ValueError, match="Received: empty x"):
        det.score(x[:0])
    with pytest.raises(ValueError, match="Received: empty features"):
        det.score_features(np.zeros((0, F), "float32"), verbose=0)


# --------------------------------------------------------------- one class only


@pytest.mark.parametrize("name", ["mahalanobis", "class_means"])
def test_one_class_through_a_model_is_an_error(data, name):
    """The model has 4 classes: labels of one class leave 3 without a mean."""
    x, _ = data
    with pytest.raises(
        ValueError, match=r"3 of 4 classes have none. .*without classes \[1, 2, 3\]"
    ):
        FITTED[name]().fit(_model(), (x, np.zeros(len(x), int)), verbose=0)


def test_one_class_on_features_is_a_one_class_detector(data):
    """`fit_features` without `num_classes` takes the labels' classes: with one class,
    Mahalanobis is the distance to that class's mean under its covariance."""
    x, _ = data
    z = _features(_model(), x).astype(np.float64)
    det = detectors.Mahalanobis().fit_features(z, np.zeros(len(z), int), verbose=0)
    q = z[:5] + 0.3
    mu = z.mean(0)
    cov = ((z - mu).T @ (z - mu) + 1e-6 * np.eye(F)) / len(z)
    want = -np.einsum("nf,fg,ng->n", q - mu, np.linalg.inv(cov), q - mu)
    np.testing.assert_allclose(det.score_features(q, verbose=0), want, rtol=1e-4)
    # Told there are 3 classes, rows of class 2 only: classes 0 and 1 have no mean.
    with pytest.raises(ValueError, match=r"without classes \[0, 1\]"):
        detectors.ClassMeans(num_classes=3).fit_features(z, np.full(len(z), 2), verbose=0)


def test_one_class_vim_ignores_labels(data):
    """ViM uses no labels: one-class labels give the fit of any labels."""
    x, y = data
    model = _model()
    one = detectors.ViM(2).fit(model, (x, np.zeros(len(x), int)), verbose=0)
    many = detectors.ViM(2).fit(model, (x, y), verbose=0)
    for a, b in zip(one.weights, many.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


# ------------------------------------------- fewer examples than k or than F


def test_fewer_examples_than_k(data):
    x, y = data
    with pytest.raises(ValueError, match="number of bank features \\(5\\). Received: k=6"):
        detectors.KNN(k=6).fit(_model(), (x[:5], y[:5]), verbose=0)
    with pytest.raises(ValueError, match="Received: k=4"):
        detectors.KNN(k=4, max_bank=3).fit(_model(), (x, y), verbose=0)
    # k equal to the bank size is allowed: the score is the distance to the farthest.
    z = _features(_model(), x[:5])
    det = detectors.KNN(k=5).fit_features(z, verbose=0)
    unit = z / np.linalg.norm(z, axis=1, keepdims=True)
    farthest = np.linalg.norm(unit[:, None] - unit[None], axis=-1).max(axis=1)
    np.testing.assert_allclose(det.score_features(z, verbose=0), -farthest, atol=1e-5)


def test_fewer_examples_than_features_warns_for_mahalanobis():
    rng = np.random.default_rng(0)
    z, y = rng.normal(size=(7, 10)), np.arange(7) % 2  # Rank <= 5 < 10.
    with pytest.warns(UserWarning, match="rank at most 5 < 10"):
        detectors.Mahalanobis().fit_features(z, y, verbose=0)
    rng = np.random.default_rng(1)
    z, y = rng.normal(size=(40, 10)), np.arange(40) % 2
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Full rank: no warning.
        detectors.Mahalanobis().fit_features(z, y, verbose=0)
        # At the boundary: 12 examples of 2 classes give rank 10 = the width.
        detectors.Mahalanobis().fit_features(z[:12], y[:12], verbose=0)
    with pytest.warns(UserWarning, match="rank at most 9 < 10"):
        detectors.Mahalanobis().fit_features(z[:11], y[:11], verbose=0)


@pytest.mark.parametrize("ridge", [True, "1e-6", -1.0, float("nan"), None])
def test_mahalanobis_ridge_must_be_a_non_negative_number(ridge):
    with pytest.raises(ValueError, match=r"`ridge` must be a number >= 0. Received: ridge="):
        detectors.Mahalanobis(ridge=ridge)


def test_mahalanobis_scores_a_class_mean_zero():
    """The score is minus the squared whitened distance to the nearest class mean: 0 at a
    class mean (no floor other than 0), negative elsewhere; the default ridge is 1e-6."""
    rng = np.random.default_rng(2)
    z = rng.normal(size=(300, 4)) * [1.0, 2.0, 0.5, 1.0] + 0.1
    y = np.arange(300) % 3
    det = detectors.Mahalanobis().fit_features(z.astype("float32"), y, verbose=0)
    assert det.ridge == 1e-6
    means = np.stack([z[y == c].mean(axis=0) for c in range(3)]).astype("float32")
    np.testing.assert_allclose(det.score_features(means, verbose=0), 0.0, atol=1e-4)
    assert (det.score_features(means + 0.3, verbose=0) < -1e-3).all()


def test_fewer_examples_than_features_vim_and_knn_fit():
    """KNN and ViM need no full-rank covariance: N < F fits and scores finitely."""
    rng = np.random.default_rng(2)
    z, q = rng.normal(size=(5, 12)), rng.normal(size=(3, 12))
    knn = detectors.KNN(k=2).fit_features(z, verbose=0)
    zn = z / np.linalg.norm(z, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    d = np.sqrt(((qn[:, None] - zn[None]) ** 2).sum(-1))
    np.testing.assert_allclose(knn.score_features(q, verbose=0), -np.sort(d, 1)[:, 1], rtol=1e-5)
    vim = detectors.ViM(3).fit_features(z, kernel=rng.normal(size=(12, 2)), verbose=0)
    assert np.isfinite(vim.score_features(q, verbose=0)).all()
    # The principal space must leave a residual: dim equal to the width is refused.
    with pytest.raises(
        ValueError, match=r"smaller than the feature dimension 12. Received: dim=12"
    ):
        detectors.ViM(12).fit_features(z, kernel=rng.normal(size=(12, 2)), verbose=0)
    assert detectors.ViM(11).fit_features(z, kernel=rng.normal(size=(12, 2)), verbose=0).is_fitted


# --------------------------------------------------- duplicates, constant features


def test_duplicate_points_count_as_neighbours():
    """Five points, each 10 times: the query at a point has 10 neighbours at distance
    0, the 11th is the nearest other point (as scikit-learn / pytorch-ood count)."""
    rng = np.random.default_rng(3)
    points = rng.normal(size=(5, 8))
    z = np.repeat(points, 10, axis=0)
    q = points[:2].astype("float32")
    pn = points / np.linalg.norm(points, axis=1, keepdims=True)
    others = np.sqrt(((pn[:2, None] - pn[None]) ** 2).sum(-1))
    others = np.sort(others, axis=1)[:, 1]
    ten = detectors.KNN(k=10).fit_features(z, verbose=0).score_features(q, verbose=0)
    eleven = detectors.KNN(k=11).fit_features(z, verbose=0).score_features(q, verbose=0)
    np.testing.assert_allclose(ten, 0.0, atol=1e-3)
    np.testing.assert_allclose(eleven, -others, rtol=1e-5)


def test_constant_features():
    rng = np.random.default_rng(4)
    z = rng.normal(size=(300, 5))
    z[:, 2] = 1.5  # Constant column.
    y = np.arange(300) % 3
    with pytest.raises(ValueError, match="singular .*Received: ridge=0.0"):
        detectors.Mahalanobis(ridge=0).fit_features(z, y, verbose=0)
    # With the default ridge the constant direction has a tiny variance: a query off
    # that value is far outside every training score.
    det = detectors.Mahalanobis().fit_features(z, y, verbose=0)
    train = det.score_features(z, verbose=0)
    off = z[:3].copy()
    off[:, 2] += 1.0
    assert (det.score_features(off, verbose=0) < train.min() * 1000).all()
    # ClassMeans and KNN work on normalised rows: finite, and a training row is its
    # own nearest neighbour.
    knn = detectors.KNN(k=1).fit_features(z, verbose=0)
    np.testing.assert_allclose(knn.score_features(z[:4], verbose=0), 0.0, atol=1e-3)
    means = detectors.ClassMeans().fit_features(z, y, verbose=0)
    assert np.isfinite(means.score_features(z, verbose=0)).all()


# ----------------------------------------------------------------- NaN and Inf


@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
@pytest.mark.parametrize("name", sorted(FITTED))
def test_non_finite_fit_data_is_an_error(data, name, bad_value):
    x, y = data
    bad = x.copy()
    bad[7, 3] = bad_value
    with pytest.raises(ValueError, match="1 examples of `data` have non-finite features"):
        FITTED[name]().fit(_model(hide_nan=True), (bad, y), verbose=0)
    z = _features(_model(), x)
    z[5, 0] = bad_value
    det = FITTED[name]()
    with pytest.raises(ValueError, match="Received: features with non-finite features"):
        if name == "vim":
            det.fit_features(z, kernel=np.ones((F, C)), verbose=0)
        else:
            det.fit_features(z, y, verbose=0)


@pytest.mark.parametrize("name", sorted(FITTED))
def test_non_finite_scoring_input_scores_nan_and_is_ood(data, name):
    """The backbone maps NaN to 0 (finite features): only the library's rule flags it."""
    x, y = data
    model = _model(hide_nan=True)
    det = FITTED[name]().fit(model, (x, y), verbose=0)
    calibrate_threshold(model, (x, y), detector=det)
    q = x[:6].copy()
    q[1, 2] = np.nan
    q[4, 0] = np.inf
    scores = det.score(q, verbose=0)
    assert np.isnan(scores[[1, 4]]).all() and np.isfinite(scores[[0, 2, 3, 5]]).all()
    out = predict_ood(model, q, detector=det)
    assert out["is_ood"][[1, 4]].all()
    np.testing.assert_array_equal(
        out["is_ood"][[0, 2, 3, 5]], ~(scores[[0, 2, 3, 5]] >= float(det.threshold.numpy()))
    )
    feats = _features(model, q)
    feats[1, 0] = np.nan
    feats[4, 1] = -np.inf
    on_features = det.score_features(feats, verbose=0)
    assert np.isnan(on_features[[1, 4]]).all() and np.isfinite(on_features[[0, 2, 3, 5]]).all()


# --------------------------------------------------------- labels out of range


@pytest.mark.parametrize("name", ["mahalanobis", "class_means"])
@pytest.mark.parametrize("label", [C, -1])
def test_labels_outside_the_models_classes(data, name, label):
    x, y = data
    bad = y.copy()
    bad[3] = label
    with pytest.raises(ValueError, match=rf"integers in \[0, {C}\). Received: labels \[{label}\]"):
        FITTED[name]().fit(_model(), (x, bad), verbose=0)
    with pytest.raises(ValueError, match=rf"Received: labels \[{label}\]"):
        FITTED[name](num_classes=C).fit_features(_features(_model(), x), bad, verbose=0)


# ------------------------------------------------------- another feature width


@pytest.mark.parametrize("name", sorted(FITTED))
def test_attached_to_a_model_with_another_feature_width(data, name):
    x, y = data
    model = _model()
    z = _features(model, x)
    det = FITTED[name]()
    if name == "vim":
        det.fit_features(z, kernel=np.ones((F, C)), verbose=0)
    else:
        det.fit_features(z, y, verbose=0)
    wider = keras.Sequential([keras.Input((8,)), keras.layers.Dense(F + 3), IsoMaxPlusLayer(C)])
    with pytest.raises(ValueError, match=rf"fitted on {F} features.*feature width {F + 3}"):
        det.attach(wider)
    with pytest.raises(ValueError, match=rf"fitted on {F} features. Received: features of width 2"):
        det.score_features(np.ones((3, 2), "float32"), verbose=0)
    fitted = FITTED[name]().fit(model, (x, y), verbose=0)
    with pytest.raises(ValueError, match="fitted on a different model"):
        fitted.score(x[:3], model=wider)


# ------------------------------------------------------------- detector files


@pytest.fixture()
def saved(data, tmp_path):
    x, y = data
    det = detectors.KNN(k=3, chunk_size=64).fit_features(_features(_model(), x), verbose=0)
    path = tmp_path / "knn.keras"
    det.save(path)
    return det, path


def test_truncated_file(saved, tmp_path):
    _, path = saved
    blob = path.read_bytes()
    cut = tmp_path / "cut.keras"
    cut.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match=r"truncated.*Received: filepath='.*cut.keras'"):
        detectors.load(cut)
    with pytest.raises(ValueError, match="No detector file"):
        detectors.load(tmp_path / "missing.keras")


def _rewrite_config(path, target, edit):
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(target, "w") as dst:
        for item in src.infolist():
            payload = src.read(item.filename)
            if item.filename == "config.json":
                config = json.loads(payload)
                layer = next(
                    lyr
                    for lyr in config["config"]["layers"]
                    if lyr["class_name"] == "KNN"
                    or (lyr.get("registered_name") or "").endswith("KNN")
                )
                edit(layer["config"])
                payload = json.dumps(config).encode()
            dst.writestr(item, payload)


@pytest.mark.parametrize("key", ["new_option", "autocast"])
def test_file_from_another_version_unknown_config_key(saved, tmp_path, key):
    """Known keys are the detector classes' own arguments: a key that only a base
    class outside the detectors takes (`autocast`: keras.layers.Layer's) is unknown."""
    _, path = saved
    other = tmp_path / "other.keras"
    _rewrite_config(path, other, lambda cfg: cfg.update({key: 3}))
    with pytest.raises(ValueError, match=rf"does not know .*\['{key}'\]. Received: filepath="):
        detectors.load(other)


def test_file_from_another_version_state_layout(saved, tmp_path):
    _, path = saved
    other = tmp_path / "layout.keras"

    def edit(cfg):
        cfg["state"] = {"rows": cfg["state"]["bank_size"], "dim": cfg["state"]["feature_dim"]}

    _rewrite_config(path, other, edit)
    with pytest.raises(ValueError, match=r"state with keys \['dim', 'rows'\]"):
        detectors.load(other)
    with pytest.raises(ValueError, match=r"Received: state with keys \['rows'\]"):
        detectors.KNN(state={"rows": 3})


def test_file_with_state_shapes_that_do_not_match_its_weights(saved, tmp_path):
    _, path = saved
    other = tmp_path / "shapes.keras"
    _rewrite_config(path, other, lambda cfg: cfg["state"].update(bank_size=17))
    with pytest.raises(ValueError, match="could not be read as a keras_isomax detector"):
        detectors.load(other)


def test_failing_save_leaves_the_previous_file_intact(saved, monkeypatch, tmp_path):
    det, path = saved
    before = path.read_bytes()

    def failing_save(self, filepath, *args, **kwargs):
        with open(filepath, "wb") as f:  # Part of a file, then the disk fills up.
            f.write(b"PK\x03\x04 partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(keras.Model, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        det.save(path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["knn.keras"]  # No staging file left behind.
    monkeypatch.undo()
    np.testing.assert_array_equal(
        detectors.load(path).score_features(np.ones((2, F), "float32"), verbose=0),
        det.score_features(np.ones((2, F), "float32"), verbose=0),
    )


def test_numpy_integer_arguments_are_stored_as_python_ints(data):
    """Integer arguments may be NumPy integers (e.g. computed with NumPy); the config
    holds Python ints, so it stays JSON-serialisable and the detector round-trips."""
    x, y = data
    made = [
        detectors.KNN(k=np.int64(3), max_bank=np.int64(150), chunk_size=np.int32(64)),
        detectors.ViM(dim=np.int64(2), alpha_samples=np.int64(100), batch_size=np.int64(32)),
        detectors.Mahalanobis(num_classes=np.int64(C)),
        detectors.ClassMeans(num_classes=np.int32(C)),
    ]
    model = _model()
    for det in made:
        config = det.get_config()
        text = json.dumps(config)  # Raises TypeError on a NumPy integer.
        numbers = [v for v in config.values() if isinstance(v, np.integer | int)]
        assert all(type(v) in (int, bool) for v in numbers), config
        det.fit(model, (x, y), verbose=0)
        again = type(det).from_config(json.loads(text))
        assert again.get_config() == config
    with pytest.raises(
        ValueError, match=r"`k` must be a positive integer. Received: k=np.int64\(0\)"
    ):
        detectors.KNN(k=np.int64(0))


def test_a_fitted_detector_has_no_trainable_weights(data):
    """Its state and threshold are fitted and calibrated, never trained by `fit`."""
    x, y = data
    model = _model()
    for det in (detectors.KNN(k=3), detectors.Mahalanobis(), detectors.ViM(2), detectors.Energy()):
        det.fit(model, (x, y), verbose=0)
        assert det.trainable_weights == [], type(det).__name__
        assert any(w.path.endswith("threshold") for w in det.non_trainable_weights)


def test_empty_batches_in_a_feature_dataset(data):
    """An empty batch holds no rows to lose: it is skipped, in fit and in scoring; a
    dataset of empty batches only is empty data."""
    import tensorflow as tf

    x, y = data
    z = _features(_model(), x)
    empty = tf.data.Dataset.from_tensors((np.zeros((0, F), "float32"), np.zeros((0,), "int64")))
    batches = tf.data.Dataset.from_tensor_slices((z, y)).batch(64)
    det = detectors.Mahalanobis().fit_features(empty.concatenate(batches), verbose=0)
    expected = detectors.Mahalanobis().fit_features(z, y, verbose=0).score_features(z, verbose=0)
    features_only = empty.map(lambda f, _: f)
    scored = det.score_features(
        features_only.concatenate(
            features_only.concatenate(tf.data.Dataset.from_tensor_slices(z).batch(50))
        ),
        verbose=0,
    )
    np.testing.assert_allclose(scored, expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="`features` holds no examples. Received: empty"):
        det.score_features(features_only, verbose=0)


def test_knn_scores_every_row_of_many_batches(data):
    """KNN joins many input batches into one sweep of its bank: every row of every
    batch is scored, in order, as from its features."""
    x, y = data
    model = _model()
    rng = np.random.default_rng(5)
    q = rng.normal(size=(700, 8)).astype("float32")
    expected = None
    for batch_size in (64, 350):  # 11 batches in one sweep; then 2.
        det = detectors.KNN(k=3, batch_size=batch_size).fit(model, (x, y), verbose=0)
        scores = det.score(q, verbose=0)
        assert scores.shape == (700,)
        if expected is None:
            expected = det.score_features(_features(model, q), verbose=0)
        np.testing.assert_allclose(scores, expected, atol=1e-6)
    assert detectors.KNN().k == 50  # The documented default (as the KNN paper uses).


def test_knn_max_bank_is_a_uniform_sample_whatever_the_batching():
    """`max_bank` keeps a uniform sample of the rows (algorithm R): over 400 seeds each
    row of a 4-row stream is kept in a 2-row bank half of the time, and the sample
    depends on the row order only, not on the batch size."""
    import tensorflow as tf

    four = np.eye(4, dtype="float32")
    kept = np.zeros(4)
    for seed in range(400):
        bank = detectors.KNN(k=1, max_bank=2, seed=seed).fit_features(four, verbose=0).bank
        hits = np.isclose(four @ keras.ops.convert_to_numpy(bank).T, 1.0, atol=1e-6)
        assert hits.sum() == 2
        kept += hits.any(axis=1)
    # Binomial(400, 1/2) per row: 3.6 standard deviations is 0.09; a draw of the slot
    # from one value too many or too few moves some row's rate by 0.1 or more.
    assert np.abs(kept / 400 - 0.5).max() < 0.09, kept / 400
    z = np.eye(60, dtype="float32") + 0.01  # 60 distinct rows.
    banks = [
        keras.ops.convert_to_numpy(
            detectors.KNN(k=2, max_bank=10, seed=4)
            .fit_features(tf.data.Dataset.from_tensor_slices(z).batch(size), verbose=0)
            .bank
        )
        for size in (1, 7, 60)
    ]
    np.testing.assert_array_equal(banks[0], banks[1])
    np.testing.assert_array_equal(banks[0], banks[2])


@pytest.mark.parametrize("name", ["mahalanobis", "class_means"])
def test_class_statistics_count_one_row_batches(data, name):
    """Streaming batches of one row (and a one-row last batch) fits what one array fits."""
    import tensorflow as tf

    x, y = data
    z = _features(_model(), x[:65])
    make = {"mahalanobis": detectors.Mahalanobis, "class_means": detectors.ClassMeans}[name]
    whole = make().fit_features(z, y[:65], verbose=0)
    for size in (1, 64):
        streamed = make().fit_features(
            tf.data.Dataset.from_tensor_slices((z, y[:65])).batch(size), verbose=0
        )
        for a, b in zip(whole.weights, streamed.weights, strict=True):
            np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-5, atol=1e-6)


def test_knn_with_chunks_smaller_than_k(data):
    """Bank chunks of 2 rows and k = 5: the running top-k fills across chunks."""
    x, _ = data
    z = _features(_model(), x[:40])
    q = _features(_model(), x[40:60])
    det = detectors.KNN(k=5, chunk_size=2).fit_features(z, verbose=0)
    bank = keras.ops.convert_to_numpy(det.bank)  # 20 chunks, joined in order.
    np.testing.assert_allclose(bank, z / np.linalg.norm(z, axis=1, keepdims=True), atol=1e-6)
    # Refitting reuses the bank's variables: the same size works, another is refused.
    det.fit_features(z[::-1].copy(), verbose=0)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(det.bank), bank[::-1], atol=1e-6)
    with pytest.raises(ValueError, match="bank of another size; create a new detector"):
        det.fit_features(z[:39], verbose=0)
    det = detectors.KNN(k=5, chunk_size=2).fit_features(z, verbose=0)
    unit = z / np.linalg.norm(z, axis=1, keepdims=True)
    uq = q / np.linalg.norm(q, axis=1, keepdims=True)
    kth = np.sort(np.linalg.norm(uq[:, None] - unit[None], axis=-1), axis=1)[:, 4]
    np.testing.assert_allclose(det.score_features(q, verbose=0), -kth, atol=1e-5)


@pytest.mark.parametrize(
    "name", ["energy", "max_logit", "max_probability", "entropic", "minimum_distance"]
)
def test_logit_detectors_score_nan_for_a_row_with_one_nan_logit(name):
    logits = np.array([[1.0, 2.0, 0.5], [1.0, np.nan, 2.0], [-0.3, 0.1, 4.0]], "float32")
    scores = detectors.get(name).score_features(logits, verbose=0)
    assert np.isnan(scores[1]) and np.isfinite(scores[[0, 2]]).all()

"""Tests of keras_isomax.detectors against independent float64 NumPy references."""

import importlib.util
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_isomax import IsoMaxPlusLayer, detectors
from keras_isomax.calibration import calibrate_threshold, predict_ood
from keras_isomax.evaluation import evaluate_ood

F, C = 12, 4


def _models(seed=0):
    keras.utils.set_random_seed(seed)
    soft = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(F, activation="tanh", name="features"),
            keras.layers.Dense(C, activation="softmax", name="classifier"),
        ],
        name="soft",
    )
    iso = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(F, activation="tanh", name="features"),
            IsoMaxPlusLayer(C, name="isomax"),
        ],
        name="iso",
    )
    iso.get_layer("isomax").distance_scale.assign(3.0)
    # A trained head has a bias: a zero one would hide a dropped bias.
    soft.get_layer("classifier").bias.assign(np.linspace(-0.5, 0.7, C).astype("float32"))
    return {"soft": soft, "iso": iso}


def _features(model, x):
    return keras.Model(model.inputs, model.get_layer("features").output).predict(x, verbose=0)


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(42)
    x = rng.normal(size=(600, 8)).astype("float32")
    y = rng.integers(0, C, 600)
    q = np.concatenate([rng.normal(size=(40, 8)), 3 * rng.uniform(-1, 1, (40, 8))]).astype(
        "float32"
    )
    return _models(), x, y, q


# ----------------------------------------------------- float64 references


def ref_knn(z, q, k):
    zn = z / np.linalg.norm(z, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    d = np.sqrt(((qn[:, None, :] - zn[None]) ** 2).sum(-1))
    return -np.sort(d, axis=1)[:, k - 1]


def ref_mahalanobis(z, y, q, ridge=1e-6):
    z, q = z.astype(np.float64), q.astype(np.float64)
    classes = np.unique(y)
    mu = np.stack([z[y == c].mean(0) for c in classes])
    scatter = sum((z[y == c] - mu[i]).T @ (z[y == c] - mu[i]) for i, c in enumerate(classes))
    cov = (scatter + ridge * np.eye(z.shape[1])) / len(z)
    prec = np.linalg.inv(cov)
    d = np.stack([np.einsum("nf,fg,ng->n", q - m, prec, q - m) for m in mu], 1)
    return -d.min(1)


def ref_vim(z, q, w, b, dim):
    """w: (F, C), b: (C,)."""
    z, q = z.astype(np.float64), q.astype(np.float64)
    u = -np.linalg.pinv(w.T) @ b
    x = z - u
    vals, vecs = np.linalg.eigh(x.T @ x / len(x))
    ns = vecs[:, : z.shape[1] - dim]
    alpha = (z @ w + b).max(1).mean() / np.linalg.norm(x @ ns, axis=1).mean()
    logits = q @ w + b
    m = logits.max(1, keepdims=True)
    lse = (m + np.log(np.exp(logits - m).sum(1, keepdims=True)))[:, 0]
    return lse - alpha * np.linalg.norm((q - u) @ ns, axis=1)


def _head(model):
    if model.name == "iso":
        layer = model.get_layer("isomax")
        p = np.asarray(layer.prototypes.numpy(), np.float64)
        p /= np.linalg.norm(p, axis=1, keepdims=True)
        return abs(float(layer.distance_scale.numpy())) * p.T, np.zeros(C), True
    dense = model.get_layer("classifier")
    return dense.kernel.numpy().astype(np.float64), dense.bias.numpy().astype(np.float64), False


def _norm(v):
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.mark.parametrize("head", ["soft", "iso"])
def test_knn_matches_reference(setup, head):
    models, x, y, q = setup
    det = detectors.KNN(k=7).fit(models[head], (x, y))
    want = ref_knn(_features(models[head], x), _features(models[head], q), 7)
    np.testing.assert_allclose(det.score(q), want, rtol=1e-5, atol=2e-5)


def test_knn_chunked_search_equals_one_product(setup):
    models, x, y, q = setup
    full = detectors.KNN(k=9).fit(models["soft"], (x, y)).score(q)
    chunked = detectors.KNN(k=9, chunk_size=37).fit(models["soft"], (x, y)).score(q)
    np.testing.assert_allclose(chunked, full, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("head", ["soft", "iso"])
def test_mahalanobis_matches_reference(setup, head):
    models, x, y, q = setup
    det = detectors.Mahalanobis().fit(models[head], (x, y))
    want = ref_mahalanobis(_features(models[head], x), y, _features(models[head], q))
    np.testing.assert_allclose(det.score(q), want, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("head", ["soft", "iso"])
def test_vim_matches_reference(setup, head):
    models, x, y, q = setup
    det = detectors.ViM(5).fit(models[head], (x, y))
    w, b, normalize = _head(models[head])
    z, zq = _features(models[head], x), _features(models[head], q)
    if normalize:
        z, zq = _norm(z), _norm(zq)
    np.testing.assert_allclose(det.score(q), ref_vim(z, zq, w, b, 5), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "name, fn",
    [
        ("max_logit", lambda z: z.max(1)),
        ("energy", lambda z: np.log(np.exp(z).sum(1))),
        ("max_probability", lambda z: (np.exp(z) / np.exp(z).sum(1, keepdims=True)).max(1)),
    ],
)
def test_logit_detectors_on_pre_softmax_logits(setup, name, fn):
    models, x, y, q = setup
    det = detectors.get(name).fit(models["soft"])
    dense = models["soft"].get_layer("classifier")
    logits = (
        _features(models["soft"], q).astype(np.float64) @ dense.kernel.numpy() + dense.bias.numpy()
    )
    np.testing.assert_allclose(det.score(q), fn(logits), rtol=1e-5, atol=1e-5)


def test_minimum_distance_detector_uses_isomax_logits(setup):
    models, x, y, q = setup
    det = detectors.MinimumDistance().fit(models["iso"])
    want = models["iso"].predict(q, verbose=0).max(1)
    np.testing.assert_allclose(det.score(q), want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------- streaming, saving, features


def _dataset(x, y, batch):
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)


@pytest.mark.parametrize(
    "make",
    [
        lambda: detectors.KNN(k=5),
        lambda: detectors.KNN(k=5, max_bank=100, seed=3),
        lambda: detectors.Mahalanobis(),
        lambda: detectors.ViM(4, alpha_samples=250, seed=1),
    ],
)
def test_streaming_fit_equals_in_memory_fit(setup, make):
    models, x, y, q = setup
    whole = make().fit(models["soft"], (x, y))
    stream = make().fit(models["soft"], _dataset(x, y, 37))
    for a, b in zip(whole.weights, stream.weights, strict=True):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.name)
    np.testing.assert_allclose(stream.score(q), whole.score(q), rtol=1e-5, atol=1e-5)


def test_max_bank_is_a_seeded_subset(setup):
    models, x, y, q = setup
    a = detectors.KNN(k=3, max_bank=50, seed=1).fit(models["soft"], (x, y))
    b = detectors.KNN(k=3, max_bank=50, seed=2).fit(models["soft"], (x, y))
    bank = _norm(_features(models["soft"], x))
    assert a.bank.shape == (50, F)
    bank_a, bank_b = keras.ops.convert_to_numpy(a.bank), keras.ops.convert_to_numpy(b.bank)
    dist = np.abs(bank_a[:, None, :] - bank[None]).max(-1).min(1)
    assert dist.max() < 1e-5  # Every kept row is a training feature.
    assert not np.allclose(bank_a, bank_b)


@pytest.mark.parametrize(
    "make",
    [
        lambda: detectors.KNN(k=5, chunk_size=100),
        lambda: detectors.Mahalanobis(),
        lambda: detectors.ViM(3),
        lambda: detectors.Energy(),
    ],
)
def test_save_load_attach(setup, make, tmp_path):
    models, x, y, q = setup
    det = make().fit(models["iso"], (x, y))
    calibrate_threshold(models["iso"], x, detector=det)
    path = str(tmp_path / "det.keras")
    det.save(path)
    loaded = detectors.load(path)
    assert type(loaded) is type(det)
    assert loaded.get_config() == det.get_config()
    with pytest.raises(ValueError, match="not bound to a model"):
        loaded.score(q)
    np.testing.assert_array_equal(loaded.score(q, model=models["iso"]), det.score(q))
    assert float(loaded.threshold.numpy()) == float(det.threshold.numpy())


def test_detector_rejects_another_model(setup, tmp_path):
    models, x, y, q = setup
    det = detectors.KNN(k=5).fit(models["soft"], (x, y))
    other = _models(seed=1)["soft"]
    with pytest.raises(ValueError, match="fitted on a different model"):
        det.score(q, model=other)


def test_features_override(setup):
    models, x, y, q = setup
    model = models["soft"]
    det = detectors.KNN(k=4, features="features").fit(model, (x, y))
    want = ref_knn(_features(model, x), _features(model, q), 4)
    np.testing.assert_allclose(det.score(q), want, rtol=1e-5, atol=2e-5)
    with pytest.raises(ValueError, match="no layer named"):
        detectors.KNN(features="nope").fit(model, (x, y))


def test_nan_input_scores_nan(setup):
    models, x, y, q = setup
    det = detectors.Mahalanobis().fit(models["soft"], (x, y))
    bad = q[:4].copy()
    bad[1, 0] = np.nan
    s = det.score(bad)
    assert np.isnan(s[1]) and np.isfinite(s[[0, 2, 3]]).all()


# ------------------------------------------------------- the features-only path


def ref_class_means(z, y, q):
    """Minus the distance to the nearest spherical class mean (float64)."""
    zn, qn = _norm(z.astype(np.float64)), _norm(q.astype(np.float64))
    means = _norm(np.stack([zn[y == c].mean(0) for c in range(C)]))
    return -np.sqrt(((qn[:, None, :] - means[None]) ** 2).sum(-1)).min(1)


@pytest.mark.parametrize("head", ["soft", "iso"])
@pytest.mark.parametrize(
    "make",
    [
        lambda: detectors.KNN(k=6, chunk_size=150),
        lambda: detectors.Mahalanobis(),
        lambda: detectors.ClassMeans(),
    ],
)
def test_fit_features_equals_fit_through_the_model(setup, head, make):
    models, x, y, q = setup
    model = models[head]
    z, zq = _features(model, x), _features(model, q)
    through_model = make().fit(model, (x, y))
    on_features = make().fit_features(z, y)
    for a, b in zip(through_model.weights, on_features.weights, strict=True):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.name)
    np.testing.assert_allclose(
        on_features.score_features(zq), through_model.score(q), rtol=1e-5, atol=1e-5
    )
    # A dataset of (features, labels) batches streams like arrays.
    streamed = make().fit_features(_dataset(z, y, 64))
    np.testing.assert_allclose(
        streamed.score_features(tf.data.Dataset.from_tensor_slices(zq).batch(16)),
        through_model.score(q),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("head", ["soft", "iso"])
def test_vim_fit_features_with_the_head(setup, head):
    models, x, y, q = setup
    model = models[head]
    w, b, normalize = _head(model)
    through_model = detectors.ViM(5).fit(model, (x, y))
    on_features = detectors.ViM(5).fit_features(
        _features(model, x), kernel=w, bias=b, normalize=normalize
    )
    np.testing.assert_allclose(
        on_features.score_features(_features(model, q)),
        through_model.score(q),
        rtol=1e-4,
        atol=1e-4,
    )
    with pytest.raises(ValueError, match="Received: kernel=None"):
        detectors.ViM(5).fit_features(_features(model, x))


@pytest.mark.parametrize("head", ["soft", "iso"])
def test_class_means_matches_reference_and_keeps_predictions(setup, head):
    models, x, y, q = setup
    model = models[head]
    before = model.predict(q, verbose=0)
    det = detectors.ClassMeans().fit(model, (x, y))
    want = ref_class_means(_features(model, x), y, _features(model, q))
    np.testing.assert_allclose(det.score(q), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(model.predict(q, verbose=0), before)
    # Near a class mean, the exact difference keeps float32 relative accuracy.
    means = det.means.numpy()
    near = (means[:2] + 1e-4 * np.random.default_rng(0).normal(size=(2, F))).astype("float32")
    got = det.score_features(near)
    np.testing.assert_allclose(got, ref_class_means(_features(model, x), y, near), rtol=1e-4)
    assert (got < 0).all()


def test_class_means_equals_replace_head_at_zero_epochs(setup):
    from keras_isomax import replace_head

    models, x, y, q = setup
    swapped = replace_head(models["soft"], init_data=(x, y))
    det = detectors.ClassMeans().fit(models["soft"], (x, y))
    np.testing.assert_allclose(
        det.score(q), swapped.predict(q, verbose=0).max(1), rtol=1e-5, atol=1e-5
    )


def test_features_fitted_detector_attaches_by_feature_width(setup, tmp_path):
    models, x, y, q = setup
    model = models["soft"]
    det = detectors.Mahalanobis().fit_features(_features(model, x), y)
    with pytest.raises(ValueError, match="not bound to a model"):
        det.score(q)
    assert det.attach(model) is det
    np.testing.assert_allclose(
        det.score(q), detectors.Mahalanobis().fit(model, (x, y)).score(q), rtol=1e-5, atol=1e-4
    )
    narrow = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(F - 2), keras.layers.Dense(C)], name="narrow"
    )
    with pytest.raises(ValueError, match=f"fitted on {F} features.*gives {F - 2}"):
        det.attach(narrow)
    calibrate_threshold(model, x, detector=det)
    out = predict_ood(model, q, detector=det)
    np.testing.assert_array_equal(out["is_ood"], ~(det.score(q) >= float(det.threshold.numpy())))
    with pytest.raises(ValueError, match="fitted on 12 features. Received: features of width 3"):
        det.score_features(np.ones((2, 3), "float32"))


def test_knn_fit_features_matches_reference_and_pytorch_ood_convention(setup):
    models, x, y, q = setup
    z, zq = _features(models["iso"], x), _features(models["iso"], q)
    det = detectors.KNN(k=50).fit_features(z)
    np.testing.assert_allclose(det.score_features(zq), ref_knn(z, zq, 50), rtol=1e-5, atol=2e-5)


# ---------------------------------------------------------- integration


def test_calibrate_predict_evaluate(setup):
    models, x, y, q = setup
    model = models["soft"]
    det = detectors.KNN(k=5).fit(model, (x[:400], y[:400]))
    t = calibrate_threshold(model, (x[400:], y[400:]), tpr=0.9, detector=det)
    assert float(det.threshold.numpy()) == pytest.approx(t)
    assert np.mean(det.score(x[400:]) >= t) == pytest.approx(0.9)
    out = predict_ood(model, q, detector=det)
    np.testing.assert_array_equal(out["is_ood"], ~(det.score(q) >= t))
    np.testing.assert_array_equal(out["class"], model.predict(q, verbose=0).argmax(1))
    energy = detectors.Energy(name="energy_det")
    result = evaluate_ood(model, (x[400:], y[400:]), {"noise": q[40:]}, score=[energy, det])
    assert [r["score"] for r in result] == ["energy_det", det.name]
    assert 0 <= result[1]["auroc"] <= 1


@pytest.mark.tensorflow_only  # A SavedModel export, served through tf.saved_model.load.
def test_export_score_signature_equals_detector(setup, tmp_path):
    from keras_isomax.export import export_saved_model

    models, x, y, q = setup
    for name, model in models.items():
        det = detectors.Mahalanobis().fit(model, (x, y))
        calibrate_threshold(model, x, detector=det)
        path = export_saved_model(model, str(tmp_path / name), detector=det)
        loaded = tf.saved_model.load(path)
        out = loaded.signatures["score"](inputs=tf.constant(q))
        np.testing.assert_allclose(out["score"].numpy(), det.score(q), rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(out["threshold"].numpy(), float(det.threshold.numpy()))
        np.testing.assert_array_equal(
            out["is_ood"].numpy(), ~(det.score(q) >= det.threshold.numpy())
        )


# ------------------------------------------------------------ bad input


def test_bad_arguments():
    with pytest.raises(ValueError, match="Received: k=0"):
        detectors.KNN(k=0)
    with pytest.raises(ValueError, match="Received: dim=0"):
        detectors.ViM(0)
    with pytest.raises(ValueError, match="Received: max_bank=0"):
        detectors.KNN(max_bank=0)
    with pytest.raises(ValueError, match="Received: detector='nope'"):
        detectors.get("nope")
    assert isinstance(detectors.get("KNN", k=3), detectors.KNN)


def test_bad_data(setup):
    models, x, y, q = setup
    model = models["soft"]
    with pytest.raises(ValueError, match="k=601"):
        detectors.KNN(k=601).fit(model, (x, y))
    with pytest.raises(ValueError, match=f"dim={F}"):
        detectors.ViM(F).fit(model, (x, y))
    with pytest.raises(ValueError, match="classes \\[3\\]"):
        detectors.Mahalanobis().fit(model, (x, np.minimum(y, 2)))
    with pytest.raises(ValueError, match="without labels"):
        detectors.Mahalanobis().fit(model, x)
    with pytest.raises(ValueError, match="no examples"):
        detectors.KNN(k=1).fit(model, (x[:0], y[:0]))
    with pytest.raises(ValueError, match="not fitted"):
        detectors.KNN().score(q)
    bad = x.copy()
    bad[3] = np.nan
    with pytest.raises(ValueError, match="non-finite features"):
        detectors.KNN(k=2).fit(model, (bad, y))
    with pytest.raises(ValueError, match="Received: data=None"):
        detectors.Mahalanobis().fit(model, None)


# ---------------------------------------------- parity with pytorch-ood 0.4.0


@pytest.mark.skipif(
    importlib.util.find_spec("pytorch_ood") is None or importlib.util.find_spec("torch") is None,
    reason="pytorch-ood (the [bench] extra) is not installed",
)
@pytest.mark.parametrize("head", ["soft", "iso"])
def test_parity_with_pytorch_ood(setup, head, tmp_path):
    models, x, y, q = setup
    model = models[head]
    z, zq = _features(model, x), _features(model, q)
    w, b, normalize = _head(model)
    zv, zqv = (_norm(z), _norm(zq)) if normalize else (z, zq)  # ViM on IsoMax+: linear twin.
    src, dst = tmp_path / "in.npz", tmp_path / "out.npz"
    np.savez(
        src,
        train=z,
        labels=y,
        test=zq,
        vtrain=zv.astype("float32"),
        vtest=zqv.astype("float32"),
        w=w.T.astype("float32"),
        b=b.astype("float32"),
        k=7,
        dim=5,
    )
    ours = {
        "knn": detectors.KNN(k=7).fit(model, (x, y)).score(q),
        # The features path (issue 20): no model pass, the same scores.
        "knn50_features": detectors.KNN(k=50).fit_features(z, y).score_features(zq),
        "knn50_model": detectors.KNN(k=50).fit(model, (x, y)).score(q),
        "mahalanobis": detectors.Mahalanobis().fit(model, (x, y)).score(q),
        "vim": detectors.ViM(5).fit(model, (x, y)).score(q),
    }
    script = os.path.join(os.path.dirname(__file__), "_pytorch_ood_ref.py")
    subprocess.run([sys.executable, script, str(src), str(dst)], check=True, timeout=120)
    theirs = dict(np.load(dst))
    np.testing.assert_allclose(ours["knn"], -theirs["knn"], rtol=1e-5, atol=2e-5)
    # KNN(k=50): fit_features/score_features == fit/score == pytorch-ood's
    # fit_features/predict_features (sign flipped), to float32 precision.
    np.testing.assert_allclose(ours["knn50_features"], ours["knn50_model"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ours["knn50_features"], -theirs["knn50"], rtol=1e-6, atol=2e-6)
    np.testing.assert_allclose(ours["vim"], -theirs["vim"], rtol=1e-4, atol=1e-4)
    # pytorch-ood: 0.5 * d^2 with an un-normalised scatter (precision N times smaller).
    np.testing.assert_allclose(
        ours["mahalanobis"], -theirs["mahalanobis"] * 2 * len(x), rtol=1e-4, atol=1e-3
    )
    np.testing.assert_array_equal(
        np.argsort(ours["mahalanobis"]), np.argsort(-theirs["mahalanobis"])
    )


@pytest.mark.tensorflow_only  # A SavedModel export, served through TensorFlow's C API.
def test_c_api_runs_detector_export(setup, c_program, tmp_path):
    """A chunked KNN served through TensorFlow's C API (the way TF Serving loads it)."""
    from keras_isomax.export import export_saved_model

    models, x, y, q = setup
    model = models["soft"]
    det = detectors.KNN(k=5, chunk_size=128).fit(model, (x, y))
    calibrate_threshold(model, x, detector=det)
    path = export_saved_model(model, str(tmp_path / "knn"), detector=det)
    code, outputs, log = c_program(path, "score", q, tmp_path)
    assert code == 0, log
    np.testing.assert_allclose(outputs["score"], det.score(q), rtol=0, atol=1e-5)
    np.testing.assert_array_equal(
        outputs["is_ood"].astype(bool), ~(det.score(q) >= float(det.threshold.numpy()))
    )


@pytest.mark.parametrize(
    "det",
    [
        detectors.KNN(k=7, max_bank=50, seed=3, chunk_size=64, features="features"),
        detectors.Mahalanobis(ridge=1e-4, batch_size=32),
        detectors.ViM(5, name="vim5"),
        detectors.MaxLogit(),
    ],
)
def test_config_round_trip_with_keras_serialization(det):
    """Keras' own (public) serialization finds the registered class and every argument."""
    serialized = keras.layers.serialize(det)
    assert serialized["registered_name"] == f"keras_isomax>{type(det).__name__}"
    clone = keras.layers.deserialize(serialized)
    assert type(clone) is type(det)
    assert clone.get_config() == det.get_config()


def test_bind_for_export(setup):
    models, x, y, _ = setup
    det = detectors.KNN(k=5)
    with pytest.raises(ValueError, match="KNN is not fitted"):
        det.bind_for_export(models["soft"])
    det.fit(models["soft"], (x, y))
    with pytest.raises(ValueError, match="fitted on a different model"):
        det.bind_for_export(models["iso"])
    with pytest.raises(ValueError, match="no calibrated threshold.*Received: threshold=None"):
        det.bind_for_export(models["soft"])
    assert det.bind_for_export(models["soft"], threshold=-0.5) == C
    calibrate_threshold(models["soft"], x, detector=det)
    assert det.bind_for_export(models["soft"]) == C
    energy = detectors.Energy()  # A logit detector is fitted on the model it is bound to.
    assert energy.bind_for_export(models["iso"], threshold=0.0) == C and energy.is_fitted


@pytest.mark.parametrize("order", ["random", "nearest_last"])
@pytest.mark.parametrize("k", [1, 7, 50])
def test_knn_search_over_many_blocks_matches_reference(order, k):
    """A bank of several search blocks (pruning by the running k-th largest), with the
    nearest rows first seen in the last blocks too, against float64 brute force."""
    rng = np.random.default_rng(k)
    z = rng.normal(size=(5000, 16))
    q = rng.normal(size=(40, 16))
    if order == "nearest_last":  # Rows sorted by similarity to the first query, ascending.
        zn = _norm(z)
        z = z[np.argsort(zn @ _norm(q[:1])[0])]
        q[1] = z[-1] + 0.05  # A query whose nearest row comes in the very last block.
    det = detectors.KNN(k=k, chunk_size=1500).fit_features(z, verbose=0)
    np.testing.assert_allclose(
        det.score_features(q, verbose=0), ref_knn(z, q, k), rtol=1e-5, atol=2e-5
    )

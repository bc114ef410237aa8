"""PNG plots of OOD scores (matplotlib is an optional dependency)."""

import sys

import numpy as np
import pytest

from keras_isomax import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _scores(rng):
    return rng.normal(1.0, 1.0, 500), {
        "near": rng.normal(0.5, 1.0, 300),
        "far": rng.normal(-2.0, 0.5, 200),
    }


def _read_png(path):
    matplotlib_image = pytest.importorskip("matplotlib.image")
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    return matplotlib_image.imread(path)


def test_histograms_write_png(rng, tmp_path):
    in_scores, ood = _scores(rng)
    path = tmp_path / "sub" / "hist.png"
    written = plots.plot_score_histograms(
        in_scores, ood, path, threshold=0.2, score_name="minimum distance"
    )
    assert written == str(path)
    image = _read_png(path)
    assert image.shape[:2] == (450, 700)
    assert image[..., :3].std() > 0.05  # Something was drawn.


def test_roc_writes_png(rng, tmp_path):
    in_scores, ood = _scores(rng)
    path = plots.plot_roc(in_scores, ood, tmp_path / "roc.png")
    assert _read_png(path).shape[:2] == (500, 550)
    # A single array of OOD scores works too.
    plots.plot_roc(in_scores, ood["far"], tmp_path / "roc_single.png")


def test_backend_is_left_alone(rng, tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    before = matplotlib.get_backend()
    had_pyplot = "matplotlib.pyplot" in sys.modules
    in_scores, ood = _scores(rng)
    plots.plot_score_histograms(in_scores, ood, tmp_path / "h.png")
    plots.plot_roc(in_scores, ood, tmp_path / "r.png")
    assert matplotlib.get_backend() == before
    assert had_pyplot or "matplotlib.pyplot" not in sys.modules


def test_evaluation_result_plots(rng, tmp_path):
    keras = pytest.importorskip("keras")
    from keras_isomax import IsoMaxPlusLayer
    from keras_isomax.evaluation import evaluate_ood

    model = keras.Sequential([keras.Input((4,)), IsoMaxPlusLayer(3)])
    x = rng.normal(size=(200, 4)).astype("float32")
    noise = rng.uniform(-4, 4, size=(100, 4)).astype("float32")
    result = evaluate_ood(model, x, {"noise": noise}, score=["minimum_distance", "entropic"])
    _read_png(result.plot_score_histograms(tmp_path / "h.png", score="entropic"))
    _read_png(result.plot_roc(tmp_path / "r.png"))


def test_bad_arguments(rng, tmp_path):
    in_scores, ood = _scores(rng)
    with pytest.raises(ValueError, match="Received: path="):
        plots.plot_roc(in_scores, ood, tmp_path / "roc.jpg")
    with pytest.raises(ValueError, match="ood_scores"):
        plots.plot_score_histograms(in_scores, {}, tmp_path / "h.png")
    with pytest.raises(ValueError, match="in_scores"):
        plots.plot_score_histograms([], ood, tmp_path / "h.png")
    with pytest.raises(ValueError, match="NaN"):
        plots.plot_roc(np.array([np.nan, 1.0]), ood, tmp_path / "r.png")


def test_missing_matplotlib_gives_install_hint(rng, tmp_path, monkeypatch):
    for name in list(sys.modules):
        if name == "matplotlib" or name.startswith("matplotlib."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    in_scores, ood = _scores(rng)
    with pytest.raises(ImportError, match=r"keras-isomax\[plots\]"):
        plots.plot_score_histograms(in_scores, ood, tmp_path / "h.png")
    with pytest.raises(ImportError, match=r"keras-isomax\[plots\]"):
        plots.plot_roc(in_scores, ood, tmp_path / "r.png")
    assert not (tmp_path / "h.png").exists()

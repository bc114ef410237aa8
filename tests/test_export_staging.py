"""Exports never delete what they did not write, and a failed one keeps the old model.

Fault injection: the SavedModel writer (or the final rename) is made to fail
part-way; the previous model must still load and answer with its own outputs.
"""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_isomax import IsoMaxPlusLayer
from keras_isomax import export as export_lib
from keras_isomax.export import export_saved_model

FEATURES, CLASSES = 5, 3


def _model(seed):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [keras.Input((FEATURES,)), keras.layers.Dense(8), IsoMaxPlusLayer(CLASSES, name="head")]
    )
    model.get_layer("head").ood_threshold.assign(-1.0)
    return model


@pytest.fixture(scope="module")
def models():
    return _model(1), _model(2)


X = np.random.default_rng(0).normal(size=(4, FEATURES)).astype("float32")


def _logits(path):
    loaded = tf.saved_model.load(str(path))
    return loaded.signatures["serving_default"](inputs=tf.constant(X))["logits"].numpy()


def _expected(model):
    return keras.ops.convert_to_numpy(model(X))


def _siblings(parent):
    return sorted(os.listdir(parent))


class Boom(RuntimeError):
    pass


def _failing_write_out(monkeypatch):
    """`write_out` writes a partial SavedModel, then fails (a full disk)."""

    def write_out(self, filepath, **kwargs):
        os.makedirs(os.path.join(filepath, "variables"), exist_ok=True)
        with open(os.path.join(filepath, "saved_model.pb"), "wb") as f:
            f.write(b"partial")
        raise Boom("disk full")

    # ExportArchive() returns a backend subclass: patch the class really used.
    monkeypatch.setattr(type(keras.export.ExportArchive()), "write_out", write_out)


@pytest.mark.parametrize("version", [None, 3])
def test_failed_write_keeps_the_previous_model(models, tmp_path, monkeypatch, version):
    old, new = models
    base = tmp_path / "served"
    path = export_saved_model(old, base, version=version)
    parent = os.path.dirname(path)
    before = _siblings(parent)
    _failing_write_out(monkeypatch)
    with pytest.raises(Boom):
        export_saved_model(new, base, version=version, overwrite=True)
    assert _siblings(parent) == before  # No staging directory left behind.
    np.testing.assert_allclose(_logits(path), _expected(old), atol=1e-6)


@pytest.mark.parametrize("version", [None, 3])
def test_failed_rename_restores_the_previous_model(models, tmp_path, monkeypatch, version):
    old, new = models
    base = tmp_path / "served"
    path = export_saved_model(old, base, version=version)
    before = _siblings(os.path.dirname(path))
    real_replace = os.replace
    calls = []

    def replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # 1: old model aside; 2: staged copy into place.
            raise OSError("rename failed")
        return real_replace(src, dst)

    monkeypatch.setattr(export_lib.os, "replace", replace)
    with pytest.raises(OSError, match="rename failed"):
        export_saved_model(new, base, version=version, overwrite=True)
    assert len(calls) == 3 and calls[2] == (calls[0][1], calls[0][0])  # Moved back.
    monkeypatch.undo()
    assert _siblings(os.path.dirname(path)) == before
    np.testing.assert_allclose(_logits(path), _expected(old), atol=1e-6)


@pytest.mark.parametrize("version", [None, 3])
def test_overwrite_replaces_only_after_a_complete_write(models, tmp_path, version):
    old, new = models
    base = tmp_path / "served"
    path = export_saved_model(old, base, version=version)
    before = _siblings(os.path.dirname(path))
    assert export_saved_model(new, base, version=version, overwrite=True) == path
    assert _siblings(os.path.dirname(path)) == before  # Nothing aside or staged is left.
    np.testing.assert_allclose(_logits(path), _expected(new), atol=1e-6)
    assert not np.allclose(_expected(new), _expected(old))


def test_files_next_to_a_saved_model_are_never_deleted(models, tmp_path):
    old, new = models
    target = tmp_path / "project"
    export_saved_model(old, target)
    (target / "main.py").write_text("print('mine')")
    (target / "src").mkdir()
    with pytest.raises(FileExistsError, match=r"'main.py', 'src'.*never replaced"):
        export_saved_model(new, target, overwrite=True)
    assert (target / "main.py").read_text() == "print('mine')" and (target / "src").is_dir()
    np.testing.assert_allclose(_logits(target), _expected(old), atol=1e-6)


def test_assets_extra_is_a_user_entry(models, tmp_path):
    old, new = models
    export_saved_model(old, tmp_path / "m")
    (tmp_path / "m" / "assets.extra").mkdir()
    with pytest.raises(FileExistsError, match="assets.extra"):
        export_saved_model(new, tmp_path / "m", overwrite=True)


def test_working_directory_is_never_replaced(models, tmp_path, monkeypatch):
    old, new = models
    export_saved_model(old, tmp_path / "here")
    monkeypatch.chdir(tmp_path / "here")
    before = _siblings(".")
    for target in (".", os.getcwd()):
        with pytest.raises(FileExistsError, match="working directory"):
            export_saved_model(new, target, overwrite=True)
    monkeypatch.chdir(tmp_path)
    assert _siblings(tmp_path / "here") == before
    np.testing.assert_allclose(_logits(tmp_path / "here"), _expected(old), atol=1e-6)


def test_working_directory_with_files_is_refused(models, tmp_path, monkeypatch):
    (tmp_path / "notes.txt").write_text("keep")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileExistsError, match="notes.txt"):
        export_saved_model(models[0], ".", overwrite=True)
    assert _siblings(tmp_path) == ["notes.txt"]


@pytest.mark.parametrize("export_dir", ["", "  "])
def test_empty_path_is_refused(models, tmp_path, monkeypatch, export_dir):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="Received: export_dir="):
        export_saved_model(models[0], export_dir)
    assert _siblings(tmp_path) == []


def test_existing_empty_directory_and_new_parents(models, tmp_path):
    (tmp_path / "empty").mkdir()
    export_saved_model(models[0], tmp_path / "empty")
    np.testing.assert_allclose(_logits(tmp_path / "empty"), _expected(models[0]), atol=1e-6)
    deep = tmp_path / "a" / "b" / "c"
    export_saved_model(models[0], deep)
    assert _siblings(tmp_path / "a" / "b") == ["c"]


def test_target_that_is_a_file_is_refused(models, tmp_path):
    (tmp_path / "model").write_text("a file")
    with pytest.raises(FileExistsError, match="not a directory"):
        export_saved_model(models[0], tmp_path / "model", overwrite=True)
    assert (tmp_path / "model").read_text() == "a file"


def test_versioned_export_keeps_other_versions_and_files(models, tmp_path):
    old, new = models
    base = tmp_path / "served"
    export_saved_model(old, base, version=1)
    (base / "README").write_text("mine")
    export_saved_model(new, base, version=2)
    assert _siblings(base) == ["1", "2", "README"]
    np.testing.assert_allclose(_logits(base / "1"), _expected(old), atol=1e-6)
    np.testing.assert_allclose(_logits(base / "2"), _expected(new), atol=1e-6)

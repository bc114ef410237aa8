"""Tests for keras_isomax.app.data: offline data sets, loaders and their errors."""

import gzip
import math
import os
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from keras_isomax.app import data

DEBIAN_DIR = data.DEFAULT_FASHION_MNIST_DIR


needs_debian_files = pytest.mark.skipif(
    not os.path.isfile(os.path.join(DEBIAN_DIR, "t10k-images-idx3-ubyte.gz")),
    reason="needs `apt-get install dataset-fashion-mnist`",
)


def write_idx(path, magic, dims, payload, *, compress=True):
    """Writes an IDX file: big-endian magic, dims, then raw uint8 payload."""
    raw = struct.pack(f">{1 + len(dims)}I", magic, *dims) + bytes(payload)
    if compress:
        with gzip.open(path, "wb", compresslevel=1) as f:
            f.write(raw)
    else:
        with open(path, "wb") as f:
            f.write(raw)


def fake_test_split(directory, *, compress=True):
    """A synthetic 10,000-image test split: image i is filled with i % 251,
    label i is (3 * i) % 10. Returns the expected (pixel values, labels)."""
    idx = np.arange(10_000)
    values = (idx % 251).astype(np.uint8)
    labels = ((3 * idx) % 10).astype(np.uint8)
    suffix = ".gz" if compress else ""
    write_idx(
        os.path.join(directory, "t10k-images-idx3-ubyte" + suffix),
        2051,
        (10_000, 28, 28),
        np.repeat(values, 28 * 28).tobytes(),
        compress=compress,
    )
    write_idx(
        os.path.join(directory, "t10k-labels-idx1-ubyte" + suffix),
        2049,
        (10_000,),
        labels.tobytes(),
        compress=compress,
    )
    return values, labels


def reference_bilinear_upscale(x, out_h, out_w):
    """Float64 bilinear resize with half-pixel centres, edges clamped."""

    def axis_weights(n_in, n_out):
        src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        frac = src - lo
        w = np.zeros((n_out, n_in))
        np.add.at(w, (np.arange(n_out), lo), 1 - frac)
        np.add.at(w, (np.arange(n_out), hi), frac)
        return w

    wh = axis_weights(x.shape[1], out_h)
    ww = axis_weights(x.shape[2], out_w)
    return np.einsum("ih,nhwc,jw->nijc", wh, x.astype(np.float64), ww)


def assert_images(x, shape):
    assert x.shape == shape
    assert x.dtype == np.float32
    assert np.isfinite(x).all()
    assert x.min() >= 0.0 and x.max() <= 1.0


# --------------------------------------------------------------------------
# Fashion-MNIST: real files
# --------------------------------------------------------------------------


@needs_debian_files
def test_fashion_mnist_test_split_matches_raw_bytes():
    x, y = data.load_fashion_mnist("test")
    assert_images(x, (10_000, 28, 28, 1))
    assert y.dtype == np.int64 and y.shape == (10_000,)
    np.testing.assert_array_equal(np.bincount(y), np.full(10, 1000))
    # Independent parse of the first and last image with struct.
    with gzip.open(os.path.join(DEBIAN_DIR, "t10k-images-idx3-ubyte.gz")) as f:
        raw = f.read()
    assert struct.unpack(">4I", raw[:16]) == (2051, 10_000, 28, 28)
    first = np.array(list(raw[16 : 16 + 784]), dtype=np.float64).reshape(28, 28)
    last = np.array(list(raw[-784:]), dtype=np.float64).reshape(28, 28)
    np.testing.assert_allclose(x[0, ..., 0], first / 255.0, rtol=0, atol=1e-7)
    np.testing.assert_allclose(x[-1, ..., 0], last / 255.0, rtol=0, atol=1e-7)
    with gzip.open(os.path.join(DEBIAN_DIR, "t10k-labels-idx1-ubyte.gz")) as f:
        raw_labels = f.read()
    assert struct.unpack(">2I", raw_labels[:8]) == (2049, 10_000)
    np.testing.assert_array_equal(y, list(raw_labels[8:]))


@needs_debian_files
def test_fashion_mnist_train_split():
    x, y = data.load_fashion_mnist("train")
    assert_images(x, (60_000, 28, 28, 1))
    np.testing.assert_array_equal(np.bincount(y), np.full(10, 6000))
    assert x.max() == 1.0 and x.min() == 0.0


@needs_debian_files
@pytest.mark.parametrize("classes", [(0, 1, 2, 3, 4, 5), (6, 7, 8, 9), (9, 2)])
def test_fashion_mnist_class_filter_reindexes(classes):
    x_all, y_all = data.load_fashion_mnist("test")
    x, y = data.load_fashion_mnist("test", classes=classes)
    keep = np.isin(y_all, classes)
    np.testing.assert_array_equal(x, x_all[keep])
    expected = np.array([classes.index(int(c)) for c in y_all[keep]])
    np.testing.assert_array_equal(y, expected)
    assert y.dtype == np.int64
    assert set(np.unique(y)) == set(range(len(classes)))


@needs_debian_files
def test_near_ood_names():
    x_in, y_in = data.load_dataset("fashion_mnist_0_5")
    x_out, y_out = data.load_dataset("FASHION_MNIST_6_9", "test")
    ref_in = data.load_fashion_mnist("test", classes=range(6))
    ref_out = data.load_fashion_mnist("test", classes=(6, 7, 8, 9))
    np.testing.assert_array_equal(x_in, ref_in[0])
    np.testing.assert_array_equal(y_in, ref_in[1])
    np.testing.assert_array_equal(x_out, ref_out[0])
    np.testing.assert_array_equal(y_out, ref_out[1])
    assert x_in.shape[0] + x_out.shape[0] == 10_000
    assert set(data.NEAR_OOD_SPLITS) <= set(data.OFFLINE_DATASETS)


@needs_debian_files
def test_fashion_mnist_resized_to_rgb_32():
    x, y = data.load_dataset("fashion_mnist", n=300, image_shape=(32, 32, 3))
    assert_images(x, (300, 32, 32, 3))
    np.testing.assert_array_equal(x[..., 0], x[..., 1])
    np.testing.assert_array_equal(x[..., 0], x[..., 2])
    # Same subset, native size, upscaled by an independent float64 reference.
    x28, y28 = data.load_dataset("fashion_mnist", n=300)
    np.testing.assert_array_equal(y, y28)
    ref = reference_bilinear_upscale(x28, 32, 32)
    np.testing.assert_allclose(x[..., :1], ref, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------
# Fashion-MNIST: synthetic files, missing files, corrupt files
# --------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_parses_synthetic_files(tmp_path, compress):
    values, labels = fake_test_split(tmp_path, compress=compress)
    x, y = data.load_fashion_mnist("test", data_dir=tmp_path)
    assert_images(x, (10_000, 28, 28, 1))
    np.testing.assert_array_equal(y, labels)
    np.testing.assert_allclose(x[:, 0, 0, 0], values / 255.0, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(x.min(axis=(1, 2, 3)), x.max(axis=(1, 2, 3)))

    x7, y7 = data.load_fashion_mnist("test", data_dir=str(tmp_path), classes=[7, 4])
    keep = np.isin(labels, [7, 4])
    np.testing.assert_array_equal(y7, np.where(labels[keep] == 7, 0, 1))
    np.testing.assert_allclose(x7[:, 5, 5, 0], values[keep] / 255.0, rtol=0, atol=1e-7)


def test_missing_files_error_says_how_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        data.load_fashion_mnist("test", data_dir=tmp_path)
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert os.path.join(str(tmp_path), "t10k-images-idx3-ubyte.gz") in message
    assert "download=True" in message
    with pytest.raises(FileNotFoundError, match="apt-get install"):
        data.load_dataset("fashion_mnist_6_9", data_dir=tmp_path, download=False)


def test_missing_one_file_names_only_that_file(tmp_path):
    fake_test_split(tmp_path)
    os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(FileNotFoundError) as info:
        data.load_fashion_mnist("test", data_dir=tmp_path)
    assert "t10k-labels-idx1-ubyte.gz" in str(info.value)
    assert "t10k-images-idx3-ubyte.gz" not in str(info.value)


def _corrupt_wrong_magic(d):
    write_idx(d / "t10k-images-idx3-ubyte.gz", 2049, (10_000, 28, 28), bytes(7840000))
    return "t10k-images-idx3-ubyte.gz", "magic number 2049"


def _corrupt_truncated_gzip(d):
    path = d / "t10k-images-idx3-ubyte.gz"
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    return "t10k-images-idx3-ubyte.gz", "cannot read"


def _corrupt_not_gzip(d):
    (d / "t10k-labels-idx1-ubyte.gz").write_bytes(b"<html>404 Not Found</html>")
    return "t10k-labels-idx1-ubyte.gz", "cannot read"


def _corrupt_wrong_image_size(d):
    write_idx(d / "t10k-images-idx3-ubyte.gz", 2051, (10_000, 32, 32), bytes(10240000))
    return "t10k-images-idx3-ubyte.gz", "32x32, expected 28x28"


def _corrupt_short_payload(d):
    write_idx(d / "t10k-images-idx3-ubyte.gz", 2051, (10_000, 28, 28), bytes(784))
    return "t10k-images-idx3-ubyte.gz", "header implies"


def _corrupt_wrong_count(d):
    write_idx(d / "t10k-labels-idx1-ubyte.gz", 2049, (9_999,), bytes(9_999))
    return "t10k-labels-idx1-ubyte.gz", "expected 10000"


def _corrupt_bad_label(d):
    write_idx(d / "t10k-labels-idx1-ubyte.gz", 2049, (10_000,), bytes([12]) * 10_000)
    return "t10k-labels-idx1-ubyte.gz", "label 12"


def _corrupt_empty(d):
    write_idx(d / "t10k-labels-idx1-ubyte.gz", 2049, (), b"")
    return "t10k-labels-idx1-ubyte.gz", "shorter than"


@pytest.mark.parametrize(
    "corrupt",
    [
        _corrupt_wrong_magic,
        _corrupt_truncated_gzip,
        _corrupt_not_gzip,
        _corrupt_wrong_image_size,
        _corrupt_short_payload,
        _corrupt_wrong_count,
        _corrupt_bad_label,
        _corrupt_empty,
    ],
)
def test_corrupt_file_error_names_the_file(tmp_path, corrupt):
    fake_test_split(tmp_path)
    filename, detail = corrupt(tmp_path)
    with pytest.raises(ValueError) as info:
        data.load_fashion_mnist("test", data_dir=tmp_path)
    message = str(info.value)
    assert "Corrupt Fashion-MNIST file" in message
    assert os.path.join(str(tmp_path), filename) in message
    assert detail in message


@pytest.mark.parametrize("split", ["validation", "TEST", None])
def test_fashion_mnist_bad_split(split):
    with pytest.raises(ValueError, match=r"Received: split="):
        data.load_fashion_mnist(split)


@pytest.mark.parametrize("classes", [(), (0, 0), (10,), (-1, 2), ("a",), 3, (True, False)])
def test_fashion_mnist_bad_classes(classes):
    with pytest.raises(ValueError, match=r"Received: classes="):
        data.load_fashion_mnist("test", classes=classes)


# --------------------------------------------------------------------------
# OOD sets
# --------------------------------------------------------------------------


def test_digits_native_size_is_exact():
    from sklearn.datasets import load_digits

    ref = load_digits()
    x, y = data.load_digits((8, 8, 1), return_labels=True)
    assert_images(x, (1797, 8, 8, 1))
    np.testing.assert_allclose(x[..., 0], ref.images / 16.0, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(y, ref.target)
    assert y.dtype == np.int64


def test_digits_resized_against_float64_reference():
    from sklearn.datasets import load_digits

    ref = reference_bilinear_upscale(load_digits().images[..., None] / 16.0, 28, 28)
    x = data.load_digits()
    assert_images(x, (1797, 28, 28, 1))
    np.testing.assert_allclose(x, ref, rtol=0, atol=1e-5)
    rgb = data.load_digits((32, 32, 3))
    assert_images(rgb, (1797, 32, 32, 3))
    np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])


def test_photos_shapes_ranges_and_determinism():
    a = data.load_photos(200, (32, 32, 3), seed=1)
    assert_images(a, (200, 32, 32, 3))
    np.testing.assert_array_equal(a, data.load_photos(200, (32, 32, 3), seed=1))
    assert not np.array_equal(a, data.load_photos(200, (32, 32, 3), seed=2))
    # Natural-image crops, not constant patches; colour photos give colour.
    assert np.median(a.std(axis=(1, 2, 3))) > 0.02
    assert (np.abs(a[..., 0] - a[..., 2]).max(axis=(1, 2)) > 0.05).any()
    b = data.load_photos(5, (20, 12, 1), seed=0)
    assert_images(b, (5, 20, 12, 1))


def test_photos_grayscale_is_luma_of_rgb():
    rgb = data.load_photos(100, (28, 28, 3), seed=4).astype(np.float64)
    gray = data.load_photos(100, (28, 28, 1), seed=4)
    luma = rgb @ np.array([0.299, 0.587, 0.114])
    np.testing.assert_allclose(gray[..., 0], luma, rtol=0, atol=1e-5)


def _clipped_normal_moments(mean, std):
    """Float64 mean and std of clip(N(mean, std^2), 0, 1) by quadrature."""
    t = np.linspace(0.0, 1.0, 200_001)
    pdf = np.exp(-0.5 * ((t - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))
    cdf = lambda v: 0.5 * (1 + math.erf((v - mean) / (std * math.sqrt(2))))  # noqa: E731
    p1 = 1 - cdf(1.0)
    m1 = np.trapezoid(t * pdf, t) + p1
    m2 = np.trapezoid(t * t * pdf, t) + p1
    return m1, math.sqrt(m2 - m1 * m1)


@pytest.mark.parametrize("std", [0.25, 1.0])
def test_gaussian_noise_matches_clipped_normal(std):
    x = data.gaussian_noise(2000, (28, 28, 1), seed=3, std=std)
    assert_images(x, (2000, 28, 28, 1))
    mean, sd = _clipped_normal_moments(0.5, std)
    # 1.6M samples: standard error of the mean ~ sd / 1250.
    assert abs(x.mean() - mean) < 5 * sd / 1250
    assert abs(x.std() - sd) < 2e-3
    np.testing.assert_array_equal(x, data.gaussian_noise(2000, (28, 28, 1), seed=3, std=std))


def test_uniform_noise_moments_and_determinism():
    x = data.uniform_noise(500, (32, 32, 3), seed=5)
    assert_images(x, (500, 32, 32, 3))
    assert x.max() < 1.0
    assert abs(x.mean() - 0.5) < 5 * math.sqrt(1 / 12) / math.sqrt(x.size)
    assert abs(x.std() - math.sqrt(1 / 12)) < 2e-3
    np.testing.assert_array_equal(x, data.uniform_noise(500, (32, 32, 3), seed=5))
    assert not np.array_equal(x, data.uniform_noise(500, (32, 32, 3), seed=6))


@pytest.mark.parametrize(
    "image_shape", [(28, 28), (28, 28, 2), (0, 28, 1), (28.5, 28, 1), None, "abc"]
)
def test_bad_image_shape(image_shape):
    with pytest.raises(ValueError, match=r"Received: image_shape="):
        data.uniform_noise(2, image_shape)
    with pytest.raises(ValueError, match=r"Received: image_shape="):
        data.load_dataset("digits", image_shape=image_shape or (1,))


@pytest.mark.parametrize("n", [0, -3, 2.0, True, "5"])
def test_bad_n(n):
    with pytest.raises(ValueError, match=r"Received: n="):
        data.load_photos(n)
    with pytest.raises(ValueError, match=r"Received: n="):
        data.load_dataset("gaussian_noise", n=n)


def test_gaussian_noise_bad_std():
    with pytest.raises(ValueError, match=r"Received: std=0"):
        data.gaussian_noise(2, std=0)


def test_rgb_to_gray_uses_bt601_luma():
    red = np.zeros((1, 4, 4, 3), np.float32)
    red[..., 0] = 1.0
    out = data._to_image_shape(red, (2, 2, 1))
    np.testing.assert_allclose(out, np.full((1, 2, 2, 1), 0.299), atol=1e-6)


# --------------------------------------------------------------------------
# load_dataset and to_tf_dataset
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["photos", "gaussian_noise", "uniform_noise"])
def test_load_dataset_generated_sets(name):
    x, y = data.load_dataset(name, n=64, seed=7, image_shape=(32, 32, 3))
    assert y is None
    assert_images(x, (64, 32, 32, 3))
    x2, _ = data.load_dataset(name, n=64, seed=7, image_shape=(32, 32, 3))
    np.testing.assert_array_equal(x, x2)
    x3, _ = data.load_dataset(name, n=16)
    assert x3.shape == (16, 28, 28, 1)


def test_load_dataset_default_generated_size():
    x, y = data.load_dataset("uniform_noise")
    assert x.shape == (data.DEFAULT_NUM_GENERATED, 28, 28, 1) and y is None


def test_load_dataset_digits_subset():
    x_all, y_all = data.load_dataset("digits")
    assert x_all.shape == (1797, 28, 28, 1)
    x, y = data.load_dataset("digits", n=100, seed=3)
    assert x.shape == (100, 28, 28, 1) and y.shape == (100,)
    # The subset keeps the original order and is a seeded draw.
    rows = [int(np.flatnonzero((x_all == xi).all(axis=(1, 2, 3)))[0]) for xi in x]
    assert rows == sorted(rows)
    np.testing.assert_array_equal(y, y_all[rows])
    x_same, _ = data.load_dataset("digits", n=100, seed=3)
    x_other, _ = data.load_dataset("digits", n=100, seed=4)
    np.testing.assert_array_equal(x, x_same)
    assert not np.array_equal(x, x_other)
    with pytest.warns(UserWarning, match=r"1797 examples.*Received: n=5000"):
        x_big, y_big = data.load_dataset("digits", n=5000)
    np.testing.assert_array_equal(x_big, x_all)
    np.testing.assert_array_equal(y_big, y_all)


def test_unknown_name_lists_the_offline_choices(tmp_path):
    with pytest.raises(ValueError) as info:
        data.load_dataset("no_such_dataset_xyz", data_dir=tmp_path, download=False)
    message = str(info.value)
    for name in data.OFFLINE_DATASETS:
        assert name in message
    assert "Received: name='no_such_dataset_xyz'" in message


@pytest.mark.parametrize("name", ["", "  ", None, 3])
def test_bad_name(name):
    with pytest.raises(ValueError, match=r"Received: name="):
        data.load_dataset(name)


def test_tfds_name_not_prepared_lists_the_offline_choices(tmp_path):
    with pytest.raises(RuntimeError) as info:
        data.load_dataset("mnist", data_dir=tmp_path, download=False)
    message = str(info.value)
    assert "download=True" in message
    for name in data.OFFLINE_DATASETS:
        assert name in message


def test_tfds_download_fails_fast_when_hosts_do_not_resolve(tmp_path, monkeypatch):
    import socket

    def no_dns(host, *args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    with pytest.raises(RuntimeError) as info:
        data.load_dataset("mnist", data_dir=tmp_path, download=True)
    message = str(info.value)
    assert "storage.googleapis.com" in message
    for name in data.OFFLINE_DATASETS:
        assert name in message


def test_to_tf_dataset():
    x, y = data.load_dataset("digits", n=100)
    batches = list(data.to_tf_dataset(x, y, batch_size=32))
    assert [b[0].shape[0] for b in batches] == [32, 32, 32, 4]
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), y)
    shuffled = list(data.to_tf_dataset(x, batch_size=100, shuffle=True, seed=1))
    assert len(shuffled) == 1 and shuffled[0].shape == (100, 28, 28, 1)
    got = np.asarray(shuffled[0])
    assert not np.array_equal(got, x)
    np.testing.assert_array_equal(np.sort(got.ravel()), np.sort(x.ravel()))
    with pytest.raises(ValueError, match=r"Received: len\(x\)=100, len\(y\)=99"):
        data.to_tf_dataset(x, y[:99])
    with pytest.raises(ValueError, match=r"Received: batch_size=0"):
        data.to_tf_dataset(x, batch_size=0)


# --------------------------------------------------------------------------
# The TFDS route (slow: ~15-45 s)
# --------------------------------------------------------------------------


def _sorted_rows(x, y):
    """Order-free view of a labelled set: rows of (label, pixels) sorted."""
    rows = np.concatenate([y[:, None].astype(np.uint8), x.reshape(len(x), -1)], 1)
    return rows[np.lexsort(rows.T[::-1])]


@needs_debian_files
@pytest.mark.slow
def test_prepare_tfds_fashion_mnist_then_fresh_process_loads(tmp_path):
    tfds_dir = tmp_path / "tfds"
    assert data.prepare_tfds_fashion_mnist(tfds_dir) == str(tfds_dir)
    script = textwrap.dedent(
        f"""
        import numpy as np, tensorflow_datasets as tfds
        x, y = tfds.as_numpy(tfds.load("fashion_mnist", split="test",
            data_dir={str(tfds_dir)!r}, download=False, as_supervised=True,
            batch_size=-1))
        np.savez({str(tmp_path / "out.npz")!r}, x=x, y=y)
        """
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=300)
    loaded = np.load(tmp_path / "out.npz")
    raw_x, raw_y = data.load_fashion_mnist("test")
    raw_u8 = np.rint(raw_x * 255).astype(np.uint8)
    assert loaded["x"].shape == (10_000, 28, 28, 1)
    # TFDS stores the examples shuffled: compare as multisets.
    np.testing.assert_array_equal(
        _sorted_rows(loaded["x"], loaded["y"]), _sorted_rows(raw_u8, raw_y)
    )
    # No raw files in tfds_dir: load_fashion_mnist falls back to the TFDS copy.
    x, y = data.load_fashion_mnist("test", data_dir=tfds_dir, classes=(6, 7, 8, 9))
    ref_x, ref_y = data.load_fashion_mnist("test", classes=(6, 7, 8, 9))
    np.testing.assert_array_equal(
        _sorted_rows(np.rint(x * 255).astype(np.uint8), y),
        _sorted_rows(np.rint(ref_x * 255).astype(np.uint8), ref_y),
    )
    # Preparing again is a no-op.
    assert data.prepare_tfds_fashion_mnist(tfds_dir) == str(tfds_dir)

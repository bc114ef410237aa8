"""Data sets by name for examples, benchmarks, the CLI and the demo.

Everything here returns NumPy arrays: images as float32 `(N, H, W, C)` in
`[0, 1]`, labels as int64 `(N,)` (or `None` for sets without labels).

Offline sets (no network needed; see `OFFLINE_DATASETS`):

| name                | what                                               | labels |
|---------------------|----------------------------------------------------|--------|
| `fashion_mnist`     | Fashion-MNIST, 60k train / 10k test, 28x28x1       | 0-9    |
| `fashion_mnist_0_5` | Fashion-MNIST classes 0-5 (near-OOD: in-dist.)     | 0-5    |
| `fashion_mnist_6_9` | Fashion-MNIST classes 6-9 (near-OOD: OOD)          | 0-3    |
| `digits`            | scikit-learn's 1,797 handwritten 8x8 digits        | 0-9    |
| `photos`            | random crops of scikit-image's sample photographs  | None   |
| `gaussian_noise`    | i.i.d. clip(N(0.5, 0.25^2), 0, 1) pixels           | None   |
| `uniform_noise`     | i.i.d. U[0, 1) pixels                              | None   |

Fashion-MNIST is read from the raw IDX files of Debian's `dataset-fashion-mnist`
package (`/usr/share/datasets/fashion-mnist`), or from a TFDS data directory that
already holds a prepared `fashion_mnist` (see `prepare_tfds_fashion_mnist`).
Any other name is looked up in TensorFlow Datasets (`cifar10`, `svhn_cropped`,
`mnist`, ...), which downloads it on first use.

TensorFlow and TFDS are imported only when a function needs them (TFDS names,
`to_tf_dataset`); resizing uses `keras.ops` and works on every backend.
"""

from __future__ import annotations

import functools
import glob
import gzip
import os
import tempfile
import warnings
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
"""Where Debian's `dataset-fashion-mnist` package puts the raw IDX files."""

FASHION_MNIST_CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

NEAR_OOD_SPLITS = {
    "fashion_mnist_0_5": (0, 1, 2, 3, 4, 5),
    "fashion_mnist_6_9": (6, 7, 8, 9),
}
"""Class subsets of Fashion-MNIST for a near-OOD benchmark: train on
`fashion_mnist_0_5`, treat `fashion_mnist_6_9` (shirt, sneaker, bag, ankle boot:
close relatives of the first six classes) as out-of-distribution."""

OFFLINE_DATASETS = (
    "fashion_mnist",
    *NEAR_OOD_SPLITS,
    "digits",
    "photos",
    "gaussian_noise",
    "uniform_noise",
)
"""Names `load_dataset` serves without a network connection."""

DEFAULT_NUM_GENERATED = 10_000
"""Size of the generated sets (`photos`, noise) when `load_dataset` gets `n=None`;
the size of the usual OOD test sets (and of Fashion-MNIST's test split)."""

PHOTO_NAMES = (
    "astronaut",
    "brick",
    "camera",
    "chelsea",
    "coffee",
    "coins",
    "grass",
    "gravel",
    "hubble_deep_field",
    "moon",
    "rocket",
)
"""`skimage.data` photographs that ship inside the scikit-image wheel."""

# Crops cover these fractions of a photograph's shorter side (two per octave).
_PHOTO_CROP_FRACTIONS = (0.125, 0.177, 0.25, 0.354, 0.5)

_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60_000),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10_000),
}
_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049
_RESIZE_CHUNK = 8192
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601


# --------------------------------------------------------------------------
# Fashion-MNIST
# --------------------------------------------------------------------------


def load_fashion_mnist(
    split: str = "train",
    *,
    data_dir: str | os.PathLike | None = None,
    classes: Sequence[int] | None = None,
    download: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Loads Fashion-MNIST as float32 images in `[0, 1]` and int64 labels.

    Sources, first found wins:

    1. the raw IDX files (`{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`) in
       `data_dir`, by default Debian's `/usr/share/datasets/fashion-mnist`
       (`apt-get install dataset-fashion-mnist`); parsed with `gzip` and
       `np.frombuffer`, in the files' order;
    2. a prepared TFDS `fashion_mnist` in `data_dir` (by default `$TFDS_DATA_DIR`
       or `~/tensorflow_datasets`), e.g. from `prepare_tfds_fashion_mnist`; TFDS
       stores the examples shuffled, so the order differs from the raw files;
    3. with `download=True` only: `tfds.load("fashion_mnist")` downloads it.

    Args:
        split: `"train"` (60,000 images) or `"test"` (10,000). Defaults to
            `"train"`.
        data_dir: Directory holding the raw IDX files or a TFDS data directory.
            Defaults to `None` (Debian's directory, then TFDS's default).
        classes: Keep only these class ids (0-9); `classes[i]` becomes label
            `i`, so `classes=(6, 7, 8, 9)` gives labels 0-3. Defaults to `None`
            (all ten classes, labels unchanged).
        download: Let TFDS download the data when no local copy is found.
            Defaults to `False`.

    Returns:
        `(x, y)`: `x` float32 `(N, 28, 28, 1)` in `[0, 1]`, `y` int64 `(N,)`.

    Raises:
        ValueError: `split` or `classes` is invalid, or a raw file is corrupt
            (the message names the file).
        FileNotFoundError: no local copy and `download=False`; the message says
            how to get one.

    Example:

    >>> x, y = load_fashion_mnist("test", classes=(0, 1, 2, 3, 4, 5))
    >>> x.shape, int(y.max())
    ((6000, 28, 28, 1), 5)
    """
    if split not in _FASHION_MNIST_FILES:
        raise ValueError(
            f"`split` must be 'train' or 'test' for Fashion-MNIST. Received: split={split!r}"
        )
    classes = _check_classes(classes)
    raw_dir = DEFAULT_FASHION_MNIST_DIR if data_dir is None else os.fspath(data_dir)
    image_name, label_name, count = _FASHION_MNIST_FILES[split]
    image_path = _find_raw_file(raw_dir, image_name)
    label_path = _find_raw_file(raw_dir, label_name)
    if image_path and label_path:
        images = _read_idx_images(image_path, expected_count=count)
        labels = _read_idx_labels(label_path, expected_count=count)
    else:
        tfds_dir = _default_tfds_data_dir() if data_dir is None else raw_dir
        if not (download or _tfds_prepared(tfds_dir, "fashion_mnist")):
            missing = [
                os.path.join(raw_dir, name + ".gz")
                for name, path in ((image_name, image_path), (label_name, label_path))
                if not path
            ]
            raise FileNotFoundError(
                f"Fashion-MNIST ({split}) not found: missing {', '.join(missing)} "
                f"and no prepared TFDS 'fashion_mnist' in {tfds_dir}. Get it with "
                "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu; files land "
                f"in {DEFAULT_FASHION_MNIST_DIR}), pass `data_dir=` pointing at the "
                "raw IDX files, or pass `download=True` to let TensorFlow Datasets "
                f"download it. Received: data_dir={data_dir!r}"
            )
        # Fashion-MNIST has labels: not None.
        images, labels = _load_tfds_arrays(  # type: ignore[assignment]
            "fashion_mnist", split, data_dir=tfds_dir, download=download
        )
        images = images.reshape(-1, 28, 28)
    x = images.astype(np.float32)[..., None]
    x /= 255.0
    y = labels.astype(np.int64)
    if classes is not None:
        keep = np.isin(y, classes)
        lookup = np.full(10, -1, dtype=np.int64)
        lookup[list(classes)] = np.arange(len(classes))
        x, y = x[keep], lookup[y[keep]]
    return x, y


def prepare_tfds_fashion_mnist(
    data_dir: str | os.PathLike, *, source_dir: str | os.PathLike | None = None
) -> str:
    """Prepares TFDS's `fashion_mnist` in `data_dir` from local raw files.

    TFDS refuses Debian's files because Debian re-compressed them (same
    contents, different checksums). This builds TFDS's own `FashionMNIST`
    builder, under its own name, with checksums computed from the local files,
    and prepares it with the files as the manual directory. Afterwards any
    process can run `tfds.load("fashion_mnist", data_dir=data_dir,
    download=False)`. Takes about 15-40 s; a no-op when already prepared.

    Args:
        data_dir: TFDS data directory to write into.
        source_dir: Directory holding the four raw `.gz` files. Defaults to
            `None` (Debian's `/usr/share/datasets/fashion-mnist`).

    Returns:
        `data_dir` as a string, ready for `tfds.load(..., data_dir=...)`.

    Raises:
        FileNotFoundError: a raw file is missing.
        ValueError: a raw file is corrupt.

    Example:

    >>> import tensorflow_datasets as tfds
    >>> d = prepare_tfds_fashion_mnist("/tmp/tfds")  # doctest: +SKIP
    >>> ds = tfds.load("fashion_mnist", data_dir=d, download=False)  # doctest: +SKIP
    """
    import urllib.parse

    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.download import checksums

    source_dir = DEFAULT_FASHION_MNIST_DIR if source_dir is None else source_dir
    source_dir = os.fspath(source_dir)
    data_dir = os.fspath(data_dir)
    base: Any = tfds.image_classification.FashionMNIST  # A TFDS builder class.
    url_infos = {}
    for split, (image_name, label_name, count) in _FASHION_MNIST_FILES.items():
        for name, reader in (
            (image_name, _read_idx_images),
            (label_name, _read_idx_labels),
        ):
            path = os.path.join(source_dir, name + ".gz")
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"Fashion-MNIST raw file {path} not found ({split} split). Get "
                    "it with `apt-get install dataset-fashion-mnist`. "
                    f"Received: source_dir={source_dir!r}"
                )
            reader(path, expected_count=count)  # our clear error if corrupt
            info = checksums.compute_url_info(path)
            url = urllib.parse.urljoin(base.URL, name + ".gz")
            url_infos[url] = checksums.UrlInfo(
                size=info.size, checksum=info.checksum, filename=name + ".gz"
            )

    class _LocalFashionMNIST(base, skip_registration=True):  # type: ignore[call-arg]
        name = "fashion_mnist"  # the name `tfds.load` looks for

    _LocalFashionMNIST.url_infos = url_infos
    builder = _LocalFashionMNIST(data_dir=data_dir)
    with tempfile.TemporaryDirectory() as download_dir:
        builder.download_and_prepare(
            download_dir=download_dir,
            download_config=tfds.download.DownloadConfig(manual_dir=source_dir),
        )
    return data_dir


def _check_classes(classes: Any) -> tuple[int, ...] | None:
    if classes is None:
        return None
    try:
        values = [int(c) for c in classes]
    except (TypeError, ValueError):
        values = None
    if (
        not values
        or any(not 0 <= c <= 9 for c in values)
        or len(set(values)) != len(values)
        or any(isinstance(c, bool) for c in classes)
    ):
        raise ValueError(
            "`classes` must be a non-empty sequence of distinct class ids in 0-9. "
            f"Received: classes={classes!r}"
        )
    return tuple(values)


def _find_raw_file(directory: str | os.PathLike, name: str) -> str | None:
    for candidate in (name + ".gz", name):
        path = os.path.join(directory, candidate)
        if os.path.isfile(path):
            return path
    return None


def _read_raw(path: str) -> bytes:
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(
            f"Corrupt Fashion-MNIST file {path}: cannot read it ({e}). Reinstall "
            "it (`apt-get install --reinstall dataset-fashion-mnist`)."
        ) from e


def _idx_header(path: str, data: bytes, magic: int, num_dims: int) -> tuple[list[int], int]:
    header_size = 4 * (1 + num_dims)
    if len(data) < header_size:
        raise ValueError(
            f"Corrupt Fashion-MNIST file {path}: {len(data)} bytes, shorter than "
            f"the {header_size}-byte IDX header."
        )
    header = np.frombuffer(data, dtype=">u4", count=1 + num_dims)
    if int(header[0]) != magic:
        raise ValueError(
            f"Corrupt Fashion-MNIST file {path}: IDX magic number {int(header[0])}, "
            f"expected {magic}."
        )
    return [int(d) for d in header[1:]], header_size


def _read_idx_images(path: str, expected_count: int | None = None) -> np.ndarray:
    data = _read_raw(path)
    (count, rows, cols), offset = _idx_header(path, data, _IDX_IMAGES_MAGIC, 3)
    problems = []
    if (rows, cols) != (28, 28):
        problems.append(f"images are {rows}x{cols}, expected 28x28")
    if expected_count is not None and count != expected_count:
        problems.append(f"header says {count} images, expected {expected_count}")
    if len(data) - offset != count * rows * cols:
        problems.append(
            f"{len(data) - offset} bytes of pixels, header implies {count * rows * cols}"
        )
    if problems:
        raise ValueError(f"Corrupt Fashion-MNIST file {path}: {'; '.join(problems)}.")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(count, rows, cols)


def _read_idx_labels(path: str, expected_count: int | None = None) -> np.ndarray:
    data = _read_raw(path)
    (count,), offset = _idx_header(path, data, _IDX_LABELS_MAGIC, 1)
    problems = []
    if expected_count is not None and count != expected_count:
        problems.append(f"header says {count} labels, expected {expected_count}")
    if len(data) - offset != count:
        problems.append(f"{len(data) - offset} label bytes, header says {count}")
    if problems:
        raise ValueError(f"Corrupt Fashion-MNIST file {path}: {'; '.join(problems)}.")
    labels = np.frombuffer(data, dtype=np.uint8, offset=offset)
    if labels.size and labels.max() > 9:
        raise ValueError(
            f"Corrupt Fashion-MNIST file {path}: label {int(labels.max())} is outside 0-9."
        )
    return labels


# --------------------------------------------------------------------------
# Out-of-distribution sets
# --------------------------------------------------------------------------


def load_digits(
    image_shape: Sequence[int] = (28, 28, 1), *, return_labels: bool = False
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Loads scikit-learn's 1,797 handwritten digits as images.

    The 8x8 images (ink intensity 0-16, ink bright on a dark background like
    MNIST) are scaled to `[0, 1]` and resized to `image_shape`.

    Args:
        image_shape: Output `(height, width, channels)`, channels 1 or 3.
            Defaults to `(28, 28, 1)`.
        return_labels: Also return the digit labels. Defaults to `False`.

    Returns:
        float32 `(1797, *image_shape)` in `[0, 1]`; with `return_labels=True`,
        `(x, y)` with `y` int64 `(1797,)` in 0-9.

    Raises:
        ValueError: `image_shape` is invalid.

    Example:

    >>> load_digits((32, 32, 3)).shape
    (1797, 32, 32, 3)
    """
    image_shape = _check_image_shape(image_shape)
    from sklearn.datasets import load_digits as sklearn_load_digits

    digits = sklearn_load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[..., None]
    x = _to_image_shape(x, image_shape)
    if return_labels:
        return x, digits.target.astype(np.int64)
    return x


def load_photos(
    n: int = DEFAULT_NUM_GENERATED, image_shape: Sequence[int] = (28, 28, 1), seed: int = 0
) -> np.ndarray:
    """Random crops of scikit-image's sample photographs (natural-image OOD).

    Each crop comes from one of `PHOTO_NAMES` (chosen uniformly), covers 1/8 to
    1/2 of the photograph's shorter side (five scales), sits at a uniform random
    position, and is resized with antialiasing to `image_shape`; colour photos
    become grayscale (ITU-R BT.601 luma) for one channel, grayscale photos are
    repeated for three.

    Args:
        n: Number of crops. Defaults to `10000`.
        image_shape: Output `(height, width, channels)`, channels 1 or 3.
            Defaults to `(28, 28, 1)`.
        seed: Seed of the NumPy generator; the same seed gives the same crops.
            Defaults to `0`.

    Returns:
        float32 `(n, *image_shape)` in `[0, 1]`.

    Raises:
        ValueError: `n` or `image_shape` is invalid.

    Example:

    >>> load_photos(100, (32, 32, 3), seed=1).shape
    (100, 32, 32, 3)
    """
    n = _check_n(n)
    height, width, channels = _check_image_shape(image_shape)
    rng = np.random.default_rng(seed)
    photo_ids = rng.integers(len(PHOTO_NAMES), size=n)
    scale_ids = rng.integers(len(_PHOTO_CROP_FRACTIONS), size=n)
    positions = rng.random((n, 2))
    out = np.empty((n, height, width, channels), dtype=np.float32)
    rows, cols = np.arange(height), np.arange(width)
    for p, name in enumerate(PHOTO_NAMES):
        photo_shape = _photo_shape(name)
        for s, fraction in enumerate(_PHOTO_CROP_FRACTIONS):
            (idx,) = np.nonzero((photo_ids == p) & (scale_ids == s))
            if not idx.size:
                continue
            # Shrink the photo so a crop of `fraction` of its shorter side maps
            # onto the output's longer side, then cut output-sized windows.
            ratio = max(height, width) / (fraction * min(photo_shape))
            size = (
                max(height, round(photo_shape[0] * ratio)),
                max(width, round(photo_shape[1] * ratio)),
            )
            small = _photo_at_size(name, channels, size)
            top = (positions[idx, 0] * (size[0] - height + 1)).astype(np.int64)
            left = (positions[idx, 1] * (size[1] - width + 1)).astype(np.int64)
            out[idx] = small[
                top[:, None, None] + rows[None, :, None],
                left[:, None, None] + cols[None, None, :],
            ]
    return np.clip(out, 0.0, 1.0, out=out)


def gaussian_noise(
    n: int = DEFAULT_NUM_GENERATED,
    image_shape: Sequence[int] = (28, 28, 1),
    seed: int = 0,
    *,
    std: float = 0.25,
) -> np.ndarray:
    """Gaussian-noise images: every pixel and channel i.i.d. clip(N(0.5, std^2)).

    With the default `std=0.25`, 95% of values fall inside `[0, 1]` before
    clipping. ODIN (Liang et al., 2018) used `std=1.0`, where most values clip
    to 0 or 1; pass it to reproduce that set.

    Args:
        n: Number of images. Defaults to `10000`.
        image_shape: Output `(height, width, channels)`. Defaults to
            `(28, 28, 1)`.
        seed: Seed of the NumPy generator. Defaults to `0`.
        std: Standard deviation before clipping. Defaults to `0.25`.

    Returns:
        float32 `(n, *image_shape)` in `[0, 1]`.

    Raises:
        ValueError: `n`, `image_shape` or `std` is invalid.

    Example:

    >>> gaussian_noise(8, (32, 32, 3)).shape
    (8, 32, 32, 3)
    """
    n = _check_n(n)
    image_shape = _check_image_shape(image_shape)
    if not (isinstance(std, int | float) and std > 0):
        raise ValueError(f"`std` must be a positive number. Received: std={std!r}")
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, *image_shape), dtype=np.float32)
    x *= np.float32(std)
    x += np.float32(0.5)
    return np.clip(x, 0.0, 1.0, out=x)


def uniform_noise(
    n: int = DEFAULT_NUM_GENERATED, image_shape: Sequence[int] = (28, 28, 1), seed: int = 0
) -> np.ndarray:
    """Uniform-noise images: every pixel and channel i.i.d. U[0, 1).

    Args:
        n: Number of images. Defaults to `10000`.
        image_shape: Output `(height, width, channels)`. Defaults to
            `(28, 28, 1)`.
        seed: Seed of the NumPy generator. Defaults to `0`.

    Returns:
        float32 `(n, *image_shape)` in `[0, 1)`.

    Raises:
        ValueError: `n` or `image_shape` is invalid.

    Example:

    >>> uniform_noise(8).shape
    (8, 28, 28, 1)
    """
    n = _check_n(n)
    image_shape = _check_image_shape(image_shape)
    rng = np.random.default_rng(seed)
    return rng.random((n, *image_shape), dtype=np.float32)


def _load_photo(name: str) -> np.ndarray:
    import skimage.data

    photo = np.asarray(getattr(skimage.data, name)())
    photo = photo.astype(np.float32) / 255.0
    return photo[..., None] if photo.ndim == 2 else photo


@functools.cache
def _photo_shape(name: str) -> tuple[int, ...]:
    return _load_photo(name).shape[:2]


@functools.lru_cache(maxsize=64)  # one output shape: 55 entries, ~17 MB at 32x32x3
def _photo_at_size(name: str, channels: int, size: tuple[int, int]) -> np.ndarray:
    """A photograph shrunk to `size` with `channels` channels (cached, read-only)."""
    photo = _load_photo(name)
    if channels < photo.shape[-1]:
        photo = _convert_channels(photo, channels)
    small = _convert_channels(_resize(photo[None], size)[0], channels)
    small.setflags(write=False)
    return small


# --------------------------------------------------------------------------
# One entry point by name
# --------------------------------------------------------------------------


def load_dataset(
    name: str,
    split: str = "test",
    *,
    image_shape: Sequence[int] | None = None,
    n: int | None = None,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Loads a data set by name as NumPy arrays.

    Offline names (`OFFLINE_DATASETS`): `"fashion_mnist"`,
    `"fashion_mnist_0_5"` (classes 0-5, labels 0-5: the in-distribution half of
    the near-OOD benchmark), `"fashion_mnist_6_9"` (classes 6-9 re-indexed to
    0-3: its OOD half), `"digits"`, `"photos"`, `"gaussian_noise"`,
    `"uniform_noise"`. Any other name is loaded with TensorFlow Datasets
    (`"cifar10"`, `"svhn_cropped"`, `"mnist"`, ...), downloading it on first
    use unless `download=False`.

    Args:
        name: Data set name (case-insensitive).
        split: Split to load: `"train"`/`"test"` for Fashion-MNIST, any TFDS
            split string (e.g. `"test[:2000]"`) for TFDS names; ignored by
            `digits` (one set of 1,797) and the generated sets. Defaults to
            `"test"`.
        image_shape: Output `(height, width, channels)`; images are resized
            (bilinear, antialiased) and converted between grayscale and RGB.
            Defaults to `None`: the set's own shape, `(28, 28, 1)` for `digits`,
            `photos` and the noise sets (Fashion-MNIST's shape).
        n: Number of examples: a random subset (drawn with `seed`, original
            order kept) for stored sets (all of it, with a warning, when `n` is
            larger), the number generated for `photos` and the noise sets. Defaults to `None`: all of a stored set,
            `DEFAULT_NUM_GENERATED` (10,000) generated ones.
        seed: Seed for the subset and the generated sets. Defaults to `0`.
        data_dir: For Fashion-MNIST names, the directory with the raw IDX files
            or a TFDS data directory (see `load_fashion_mnist`); for TFDS names,
            the TFDS data directory. Defaults to `None`.
        download: Let TFDS download what is not found locally. Defaults to
            `True`.

    Returns:
        `(x, y)`: `x` float32 `(N, H, W, C)` in `[0, 1]`; `y` int64 `(N,)`, or
        `None` for `photos`, the noise sets and TFDS sets without labels.

    Raises:
        ValueError: the name is neither offline nor in TFDS (the message lists
            the offline names), or an argument is invalid.
        FileNotFoundError: Fashion-MNIST is not found locally (see
            `load_fashion_mnist`).
        RuntimeError: TFDS could not provide the data set (e.g. no network);
            the message lists the offline names.

    Example:

    >>> x_in, y_in = load_dataset("fashion_mnist_0_5", "test")
    >>> x_ood, _ = load_dataset("fashion_mnist_6_9", "test")
    >>> x_noise, y_noise = load_dataset("gaussian_noise", n=500)
    >>> x_in.shape, x_ood.shape, x_noise.shape, y_noise
    ((6000, 28, 28, 1), (4000, 28, 28, 1), (500, 28, 28, 1), None)
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(
            "`name` must be a non-empty data set name, one of "
            f"{', '.join(OFFLINE_DATASETS)} or a TFDS name. Received: name={name!r}"
        )
    key = name.strip().lower()
    if image_shape is not None:
        image_shape = _check_image_shape(image_shape)
    if n is not None:
        n = _check_n(n)
    generated_shape = image_shape or (28, 28, 1)
    generated_n = DEFAULT_NUM_GENERATED if n is None else n

    if key == "photos":
        return load_photos(generated_n, generated_shape, seed), None
    if key == "gaussian_noise":
        return gaussian_noise(generated_n, generated_shape, seed), None
    if key == "uniform_noise":
        return uniform_noise(generated_n, generated_shape, seed), None
    if key == "digits":
        x, y = load_digits(generated_shape, return_labels=True)
    elif key == "fashion_mnist" or key in NEAR_OOD_SPLITS:
        x, y = load_fashion_mnist(
            split,
            data_dir=data_dir,
            classes=NEAR_OOD_SPLITS.get(key),
            download=download,
        )
    else:
        x, y = _load_tfds_arrays(name.strip(), split, data_dir=data_dir, download=download)
        x = x.astype(np.float32) / np.float32(255.0 if x.dtype == np.uint8 else 1.0)
        y = None if y is None else y.astype(np.int64)
    if n is not None:
        x, y = _subset(x, y, n, seed)
    if image_shape is not None:
        x = _to_image_shape(x, image_shape)
    return x, y


def to_tf_dataset(
    x: np.ndarray,
    y: np.ndarray | None = None,
    *,
    batch_size: int = 128,
    shuffle: bool = False,
    seed: int | None = None,
) -> Any:
    """Wraps arrays in a batched, prefetched `tf.data.Dataset`.

    Args:
        x: Images (or any array with examples on axis 0).
        y: Labels, or `None` for a dataset of `x` only. Defaults to `None`.
        batch_size: Examples per batch. Defaults to `128`.
        shuffle: Reshuffle all examples each epoch. Defaults to `False`.
        seed: Shuffle seed. Defaults to `None`.

    Returns:
        A `tf.data.Dataset` of `x` batches, or of `(x, y)` batches.

    Raises:
        ValueError: `batch_size` is not a positive integer, or `x` and `y`
            differ in length.

    Example:

    >>> ds = to_tf_dataset(*load_dataset("digits"), batch_size=64)
    >>> [tuple(t.shape) for t in next(iter(ds))]
    [(64, 28, 28, 1), (64,)]
    """
    if not isinstance(batch_size, int | np.integer) or batch_size < 1:
        raise ValueError(
            f"`batch_size` must be a positive integer. Received: batch_size={batch_size!r}"
        )
    if y is not None and len(x) != len(y):
        raise ValueError(
            "`x` and `y` must hold the same number of examples. "
            f"Received: len(x)={len(x)}, len(y)={len(y)}"
        )
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices(x if y is None else (x, y))
    if shuffle:
        ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def _offline_hint() -> str:
    return f"Offline choices: {', '.join(OFFLINE_DATASETS)}."


def _default_tfds_data_dir() -> str:
    return os.path.expanduser(
        os.environ.get("TFDS_DATA_DIR", os.path.join("~", "tensorflow_datasets"))
    )


def _tfds_prepared(data_dir: str | os.PathLike, name: str) -> bool:
    """Cheap check (no TFDS import) for a prepared TFDS data set."""
    pattern = os.path.join(glob.escape(os.fspath(data_dir)), name, "*", "dataset_info.json")
    return bool(glob.glob(pattern))


def _load_tfds_arrays(
    name: str, split: str, *, data_dir: str | os.PathLike | None = None, download: bool = False
) -> tuple[np.ndarray, np.ndarray | None]:
    """Loads a whole TFDS split as NumPy `(images, labels or None)`."""
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(
            f"Unknown data set {name!r}: not an offline data set of keras-isomax and "
            f"not a TensorFlow Datasets name. {_offline_hint()} Received: name={name!r}"
        ) from e
    if not builder.is_prepared():
        if not download:
            raise RuntimeError(
                f"TFDS data set {name!r} is not prepared in {builder.data_dir} and "
                f"`download=False`. Pass `download=True` (needs a network "
                f"connection) or pick an offline data set. {_offline_hint()}"
            )
        _check_hosts_resolve(name, builder.url_infos)
        try:
            builder.download_and_prepare()
        except Exception as e:  # network errors come in many types
            raise RuntimeError(
                f"TensorFlow Datasets could not download/prepare {name!r} "
                f"({type(e).__name__}: {e}). Without a network connection pick an "
                f"offline data set. {_offline_hint()}"
            ) from e
    features = builder.info.features
    if "image" not in features:
        raise ValueError(
            f"TFDS data set {name!r} has no 'image' feature (features: "
            f"{', '.join(features)}). Received: name={name!r}"
        )
    try:
        data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
    except ValueError as e:
        raise ValueError(
            f"TFDS data set {name!r} has no split {split!r} (splits: "
            f"{', '.join(builder.info.splits)}). Received: split={split!r}"
        ) from e
    images = np.asarray(data["image"])
    if images.ndim == 3:
        images = images[..., None]
    labels = np.asarray(data["label"]) if "label" in data else None
    return images, labels


def _check_hosts_resolve(name: str, url_infos: Any) -> None:
    """Fails fast when the download hosts do not resolve (offline).

    Without this, TFDS retries each file with backoff: ~3.5 minutes before it
    gives up on `mnist` here. Only a failed DNS lookup counts; anything else is
    left to TFDS.
    """
    import socket
    import urllib.parse

    hosts = {urllib.parse.urlsplit(url).hostname for url in url_infos or ()}
    for host in sorted(h for h in hosts if h):
        try:
            socket.getaddrinfo(host, None)
        except socket.gaierror as e:
            raise RuntimeError(
                f"TensorFlow Datasets cannot download {name!r}: host {host} does "
                f"not resolve ({e}); no network connection? {_offline_hint()}"
            ) from e


def _check_image_shape(image_shape: Any) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in image_shape)
        valid = (
            len(shape) == 3
            and all(d >= 1 for d in shape)
            and shape[2] in (1, 3)
            and all(not isinstance(d, bool | float) for d in image_shape)
        )
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise ValueError(
            "`image_shape` must be (height, width, channels) with positive integer "
            f"sizes and 1 or 3 channels. Received: image_shape={image_shape!r}"
        )
    return shape


def _check_n(n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"`n` must be a positive integer. Received: n={n!r}")
    return int(n)


def _subset(
    x: np.ndarray, y: np.ndarray | None, n: int, seed: Any
) -> tuple[np.ndarray, np.ndarray | None]:
    if n >= len(x):
        if n > len(x):
            warnings.warn(
                f"`n` is larger than the data set ({len(x)} examples); using all of "
                f"them. Received: n={n}",
                stacklevel=3,
            )
        return x, y
    idx = np.sort(np.random.default_rng(seed).choice(len(x), size=n, replace=False))
    return x[idx], None if y is None else y[idx]


def _convert_channels(x: np.ndarray, channels: int) -> np.ndarray:
    """Converts `(..., C)` images in [0, 1] to 1 (BT.601 luma) or 3 channels."""
    if x.shape[-1] == 4:  # RGBA: drop alpha
        x = x[..., :3]
    if x.shape[-1] == channels:
        return x
    if channels == 1:
        return (x @ _LUMA)[..., None].astype(np.float32)
    return np.repeat(x, channels, axis=-1)


def _resize(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize (antialiased when shrinking) of `(N, H, W, C)` images."""
    if tuple(x.shape[1:3]) == tuple(size):
        return x
    import keras

    # Antialiasing only changes downscaling (upscaling: same values to 4e-6)
    # but makes the resize about 4x slower, so use it only there. keras.ops
    # runs on every backend (TensorFlow's tf.image.resize under TensorFlow).
    antialias = size[0] < x.shape[1] or size[1] < x.shape[2]
    chunks = [
        keras.ops.convert_to_numpy(
            keras.ops.image.resize(
                x[i : i + _RESIZE_CHUNK],
                size,
                interpolation="bilinear",
                antialias=antialias,
                data_format="channels_last",
            )
        )
        for i in range(0, len(x), _RESIZE_CHUNK)
    ]
    return np.concatenate(chunks).astype(np.float32, copy=False)


def _to_image_shape(x: np.ndarray, image_shape: tuple[int, ...]) -> np.ndarray:
    """Resizes and converts `(N, H, W, C)` images in [0, 1] to `image_shape`."""
    height, width, channels = image_shape
    original = x
    if channels < x.shape[-1]:  # convert first: less to resize
        x = _convert_channels(x, channels)
    x = _resize(x, (height, width)).astype(np.float32, copy=False)
    x = np.clip(x, 0.0, 1.0, out=None if x is original else x)
    return _convert_channels(x, channels)  # last: less to clip

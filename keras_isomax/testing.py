"""Independent float64 NumPy references of the IsoMax+ formulas (a test oracle).

Plain NumPy, written from the paper's formulas (exact differences, no matrix-product
expansion), for checking the library's float32 results in tests and benchmarks:

>>> import numpy as np
>>> from keras_isomax import testing
>>> x, p = np.random.rand(4, 8), np.random.rand(3, 8)
>>> testing.logits(x, p).shape
(4, 3)
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


def normalize(v: npt.ArrayLike, eps: float = 1e-12) -> np.ndarray:
    """`v / max(||v||, eps)` along the last axis, in float64 (PyTorch's `F.normalize`)."""
    v = np.asarray(v, np.float64)
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), eps)


def distances(x: npt.ArrayLike, prototypes: npt.ArrayLike, chunk: int | None = None) -> np.ndarray:
    """Exact Euclidean distances between normalised rows, (..., C).

    Exact differences, no `a^2 + b^2 - 2ab` expansion. With `chunk`, `x` is
    processed `chunk` rows (first axis) at a time, so memory stays at
    `chunk * C * F` floats; the values are the same.
    """
    xn, pn = normalize(x), normalize(prototypes)
    if chunk is None:
        return _exact_distances(xn, pn)
    out = np.empty(xn.shape[:-1] + pn.shape[:1])
    for i in range(0, len(xn), chunk):
        out[i : i + chunk] = _exact_distances(xn[i : i + chunk], pn)
    return out


def _exact_distances(xn: np.ndarray, pn: np.ndarray) -> np.ndarray:
    return np.sqrt(np.sum((xn[..., None, :] - pn) ** 2, axis=-1))


def logits(
    x: npt.ArrayLike, prototypes: npt.ArrayLike, scale: float = 1.0, temperature: float = 1.0
) -> np.ndarray:
    """IsoMax+ logits `-|scale| * ||norm(x) - norm(p_c)|| / temperature`, `(..., C)`."""
    return -abs(scale) * distances(x, prototypes) / temperature


def log_softmax(z: npt.ArrayLike) -> np.ndarray:
    """`log(softmax(z))` along the last axis, in float64 (max-shifted)."""
    z = np.asarray(z, np.float64)
    m = z.max(axis=-1, keepdims=True)
    return z - m - np.log(np.sum(np.exp(z - m), axis=-1, keepdims=True))


def isomax_loss(
    labels: npt.ArrayLike, z: npt.ArrayLike, entropic_scale: float = 10.0
) -> np.ndarray:
    """Per-example IsoMax+ loss: `-log softmax(entropic_scale * z)[label]` (class-id labels)."""
    lp = log_softmax(entropic_scale * np.asarray(z, np.float64))
    labels = np.asarray(labels).reshape(lp.shape[:-1]).astype(int)
    return -np.take_along_axis(lp, labels[..., None], axis=-1)[..., 0]

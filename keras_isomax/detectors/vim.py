"""ViM detector: virtual-logit matching (Wang et al., 2022)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

from keras_isomax import _checks
from keras_isomax._typing import ArrayLike, Config, Data, Tensor, Verbose
from keras_isomax.detectors.base import Detector, FitContext, Reservoir, float64_rows
from keras_isomax.layers import l2_normalize


@keras.saving.register_keras_serializable(package="keras_isomax")
class ViM(Detector):
    """Virtual-logit matching on the classifier's linear head.

    With `W`, `b` the linear head, `u = -pinv(W^T) b` its origin and `R` the
    orthogonal complement of the top `dim` principal directions of the
    training features about `u`: `score(z) = logsumexp(z W + b) - alpha * ||(z - u) R||`,
    with `alpha` = mean max-logit / mean residual norm on the training data.
    For a `Dense` head `W`, `b` are its kernel and bias; for an
    `IsoMaxPlusLayer` the equivalent linear head on L2-normalised features
    (`W = (|s| / T) * normalised prototypes`, `b = 0`). The second moment is
    accumulated in float64 in one pass; `alpha`'s mean residual norm is taken
    over a seeded uniform sample of at most `alpha_samples` training rows
    (exact when the data has fewer). Inputs `(B, F)`, scores `(B,)`.

    Args:
        dim: Dimension of the principal subspace, `1 <= dim < F`.
        alpha_samples: Rows kept to compute `alpha`. Defaults to `50000`.
        seed: Seed of that sample. Defaults to `0`.
        **kwargs: `features`, `batch_size` and `keras.layers.Layer` arguments.

    `fit_features(z, kernel=W, bias=b)` fits on precomputed features; the head
    is then given explicitly (`normalize=True` for an IsoMax+ head's
    equivalent head on normalised features).

    Example:

    >>> import numpy as np
    >>> from keras_isomax import detectors
    >>> rng = np.random.default_rng(0)
    >>> z, w = rng.normal(size=(300, 8)), rng.normal(size=(8, 3))
    >>> det = detectors.ViM(dim=4).fit_features(z, kernel=w, bias=np.zeros(3), verbose=0)
    >>> det.score_features(z[:2], verbose=0).shape
    (2,)
    """

    _state_keys = ("feature_dim", "num_classes", "normalize")

    def __init__(self, dim: int, alpha_samples: int = 50000, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.dim = _checks.check_int(dim, "dim")
        self.alpha_samples = _checks.check_int(alpha_samples, "alpha_samples")
        self.seed = seed
        self._head: tuple[np.ndarray, np.ndarray, bool] | None = None

    def _state_specs(self, state: Mapping[str, Any]) -> dict[str, tuple[tuple[int, ...], str]]:
        f, c = state["feature_dim"], state["num_classes"]
        return {
            "kernel": ((f, c), "float32"),
            "bias": ((c,), "float32"),
            "origin": ((f,), "float32"),
            "null_space": ((f, f - self.dim), "float32"),
            "alpha": ((), "float32"),
        }

    def fit_features(
        self,
        features: Data,
        labels: ArrayLike | None = None,
        *,
        kernel: ArrayLike | None = None,
        bias: ArrayLike | None = None,
        normalize: bool = False,
        verbose: Verbose = "auto",
    ) -> ViM:
        """Fits on precomputed features with an explicit linear head.

        Args:
            features: Features `(N, F)` or a batched dataset of them.
            labels: Ignored (ViM needs none). Defaults to `None`.
            kernel: The head's weight `(F, C)` (a `Dense` kernel).
            bias: The head's bias `(C,)`. Defaults to `None` (zeros).
            normalize: Whether the head acts on L2-normalised features (an
                IsoMax+ head's equivalent). Defaults to `False`.
            verbose: `"auto"`, 0, 1 or 2. Defaults to `"auto"`.

        Returns:
            The detector itself.
        """
        if kernel is None:
            raise ValueError(
                "ViM.fit_features needs the classifier's linear head: pass `kernel=` (F, C) "
                "and `bias=` (C,). Received: kernel=None"
            )
        kernel = np.asarray(ops.convert_to_numpy(kernel), np.float64)
        if kernel.ndim != 2:
            raise ValueError(
                f"`kernel` must be a matrix (F, C). Received: kernel of shape {kernel.shape}"
            )
        bias = (
            np.zeros(kernel.shape[1])
            if bias is None
            else np.asarray(ops.convert_to_numpy(bias), np.float64).reshape(-1)
        )
        if bias.shape != (kernel.shape[1],):
            raise ValueError(
                f"`bias` must have one value per column of `kernel` ({kernel.shape[1]}). "
                f"Received: bias of shape {bias.shape}"
            )
        self._head = (kernel, bias, bool(normalize))
        try:
            return super().fit_features(features, None, verbose=verbose)
        finally:
            self._head = None

    def _accumulator(self, context: FitContext) -> _ViMStats:
        if context.runner is not None:
            if self.features is not None:
                raise ValueError(
                    "ViM needs the input of the classifier head as features (its W and b act "
                    f"on them). Received: features={self.features!r}"
                )
            kernel, bias, normalize = context.runner.linear_head()
        else:
            kernel, bias, normalize = self._head  # type: ignore[misc]  # Set by fit_features.
        f = kernel.shape[0]
        if self.dim >= f:
            raise ValueError(
                f"`dim` must be smaller than the feature dimension {f}. Received: dim={self.dim}"
            )
        return _ViMStats(kernel, bias, normalize, self.alpha_samples, self.seed)

    def _finish(self, stats: _ViMStats, context: FitContext) -> None:
        kernel, bias, normalize = stats.kernel, stats.bias, stats.normalize
        f, c = kernel.shape
        if stats.total == 0:
            raise ValueError("`data` holds no examples. Received: empty data")
        _, eigenvectors = np.linalg.eigh(stats.moment / stats.total)
        null_space = eigenvectors[:, : f - self.dim]
        sample = stats.sample if stats.sample is not None else stats.reservoir.sample(f)
        residual = np.linalg.norm(sample.astype(np.float64) @ null_space, axis=1)
        alpha = (stats.max_logit_sum / stats.total) / residual.mean()
        if not np.isfinite(alpha):
            raise ValueError(
                "ViM's alpha is not finite (all training features inside the principal "
                f"subspace?). Received: dim={self.dim}"
            )
        self._make_state({"feature_dim": f, "num_classes": c, "normalize": normalize})
        self.kernel.assign(kernel.astype(np.float32))
        self.bias.assign(bias.astype(np.float32))
        self.origin.assign(stats.origin.astype(np.float32))
        self.null_space.assign(null_space.astype(np.float32))
        self.alpha.assign(np.float32(alpha))

    def call(self, inputs: Tensor) -> Tensor:
        # `call` runs on a fitted detector: `state` is set.
        feats = ops.cast(ops.reshape(inputs, (-1, self.state["feature_dim"])), "float32")  # type: ignore[index]
        z = l2_normalize(feats) if self.state["normalize"] else feats  # type: ignore[index]
        logits = ops.matmul(z, self.kernel) + self.bias
        residual = ops.matmul(z - self.origin, self.null_space)
        norm = ops.sqrt(ops.sum(residual * residual, axis=1))
        score = ops.logsumexp(logits, axis=1) - self.alpha * norm
        return self._nan_rows(feats, score)

    def get_config(self) -> Config:
        return {
            **super().get_config(),
            "dim": self.dim,
            "alpha_samples": self.alpha_samples,
            "seed": self.seed,
        }


class _ViMStats:
    """ViM's streamed statistics: second moment about the head's origin (float64), sum of
    max-logits, row count, and a seeded uniform sample of rows for `alpha`."""

    def __init__(
        self, kernel: np.ndarray, bias: np.ndarray, normalize: bool, alpha_samples: int, seed: Any
    ) -> None:
        self.kernel, self.bias, self.normalize = kernel, bias, normalize
        self.origin = -(np.linalg.pinv(kernel.T) @ bias)
        f = kernel.shape[0]
        self.moment = np.zeros((f, f), np.float64)
        self.reservoir = Reservoir(alpha_samples, seed)
        self.alpha_samples, self.seed = alpha_samples, seed
        self.max_logit_sum, self.total = 0.0, 0
        self.sample: np.ndarray | None = None  # Set by `merge`.

    def update(self, feats: np.ndarray, labels: Any = None) -> None:
        f = self.kernel.shape[0]
        if feats.shape[1] != f:
            raise ValueError(
                f"The features have {feats.shape[1]} columns but the head's kernel has "
                f"{f} rows. Received: features of width {feats.shape[1]}"
            )
        z = float64_rows(feats, self.normalize)
        self.max_logit_sum += float((z @ self.kernel + self.bias).max(axis=1).sum())
        z = z - self.origin
        self.moment += z.T @ z
        self.reservoir.add(z.astype(np.float32))
        self.total += len(z)

    @staticmethod
    def merge(stats: Sequence[_ViMStats], comm: Any, context: FitContext) -> _ViMStats:
        first = stats[0]
        merged = _ViMStats(
            first.kernel, first.bias, first.normalize, first.alpha_samples, first.seed
        )
        merged.moment = comm.sum([a.moment for a in stats])
        sums = comm.sum([np.array([a.max_logit_sum, float(a.total)]) for a in stats])
        merged.max_logit_sum, merged.total = float(sums[0]), int(round(float(sums[1])))
        merged.sample = Reservoir.merge(
            [a.reservoir for a in stats],
            comm,
            first.alpha_samples,
            first.seed,
            first.kernel.shape[0],
        )
        return merged

"""KNN detector: distance to the k-th nearest training feature (Sun et al., 2022)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

from keras_isomax import _checks
from keras_isomax._typing import Config, Tensor
from keras_isomax.detectors.base import Detector, FitContext, Reservoir, host_array
from keras_isomax.layers import l2_normalize


@keras.saving.register_keras_serializable(package="keras_isomax")
class KNN(Detector):
    """Distance to the k-th nearest training feature, on L2-normalised features.

    `score(z) = -|| z/||z|| - b_(k) ||_2 = -sqrt(2 - 2 cos_(k))`, where `b_(k)` is
    the k-th nearest row of the bank of normalised training features and
    `cos_(k)` the k-th largest cosine similarity (Sun et al., 2022; pytorch-ood's
    `KNN` with its sign flipped). Duplicate training rows count as separate
    neighbours. Inputs `(B, F)` (`(B, ...)` is flattened); scores `(B,)`.

    The bank (optionally a seeded uniform subset of `max_bank` rows) is kept as
    float32 in variables of `chunk_size` rows each, filled while streaming, so
    fitting holds one bank plus one chunk. `score`/`score_features` search it
    exactly on the host (NumPy matrix products over blocks of bank rows, a running
    top-k per query, no copy of the bank); `call` (what the exporters trace)
    searches it chunk by chunk with `keras.ops` (memory `O(batch * chunk_size)`).

    Args:
        k: Which nearest neighbour. Defaults to `50`.
        max_bank: Keep at most this many training features (a seeded uniform
            random subset of the stream), or `None` for all. Defaults to `None`.
        seed: Seed of the subset. Defaults to `0`.
        chunk_size: Bank rows per variable and per matrix product when
            scoring. Defaults to `32768`.
        **kwargs: `features`, `batch_size` and `keras.layers.Layer` arguments.

    Example:

    >>> import numpy as np, keras
    >>> from keras_isomax import detectors
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
    ...                           keras.layers.Dense(3, activation="softmax")])
    >>> x = np.random.default_rng(0).normal(size=(200, 4)).astype("float32")
    >>> det = detectors.KNN(k=5).fit(model, (x, np.zeros(200)), verbose=0)
    >>> det.score(x[:3], verbose=0).shape
    (3,)
    """

    _state_keys = ("bank_size", "feature_dim", "chunk_rows")

    def __init__(
        self,
        k: int = 50,
        max_bank: int | None = None,
        seed: int = 0,
        chunk_size: int = 32768,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.k = _checks.check_int(k, "k")
        self.max_bank = _checks.check_int(max_bank, "max_bank", allow_none=True)
        self.seed = seed
        self.chunk_size = _checks.check_int(chunk_size, "chunk_size")

    def _state_specs(self, state: Mapping[str, Any]) -> dict[str, tuple[tuple[int, ...], str]]:
        n, f, rows = state["bank_size"], state["feature_dim"], state["chunk_rows"]
        return {
            f"bank_{i}": ((min(rows, n - start), f), "float32")
            for i, start in enumerate(range(0, n, rows))
        }

    @property
    def bank(self) -> Any:
        """The whole bank `(bank_size, F)` as one tensor (for inspection)."""
        return ops.concatenate(self._bank_chunks(), axis=0)

    def _bank_chunks(self) -> list[Any]:
        return [getattr(self, name) for name in self._state_specs(self.state)]  # type: ignore[arg-type]

    def _store_chunk(self, index: int, rows: np.ndarray) -> None:
        """Creates (or, when refitting, reuses) variable `bank_{index}`: memory ~ one bank."""
        name = f"bank_{index}"
        existing = getattr(self, name, None)
        if isinstance(existing, keras.Variable):
            if tuple(existing.shape) != rows.shape:
                raise ValueError(
                    f"This KNN was fitted on a bank of another size; create a new detector to "
                    f"refit. Received: data giving bank chunk of shape {rows.shape}"
                )
            existing.assign(rows)
            return
        variable = self.add_weight(
            name=name, shape=rows.shape, initializer="zeros", trainable=False, dtype="float32"
        )
        variable.assign(rows)
        setattr(self, name, variable)

    def _fit(self, stream: Iterable[tuple[np.ndarray, Any]], context: FitContext) -> None:
        rows = self.chunk_size
        reservoir = None if self.max_bank is None else Reservoir(self.max_bank, self.seed)
        buffer: Any = None  # The chunk being filled (without `max_bank`).
        filled, stored, total = 0, 0, 0
        feature_dim = None
        for feats, _ in stream:
            feature_dim = feats.shape[1]
            normed = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
            normed = normed.astype(np.float32)
            total += len(normed)
            if reservoir is not None:
                reservoir.add(normed)
                continue
            while len(normed):
                if buffer is None:
                    buffer = np.empty((rows, normed.shape[1]), np.float32)
                take = min(rows - filled, len(normed))
                buffer[filled : filled + take] = normed[:take]
                filled, normed = filled + take, normed[take:]
                if filled == rows:  # A full chunk becomes a variable right away.
                    self._store_chunk(stored, buffer)
                    stored, filled = stored + 1, 0
                    # A fresh buffer for the next chunk: on JAX's CPU the variable may
                    # share the buffer's memory (assigning a NumPy array does not copy).
                    buffer = None
        if total == 0:
            raise ValueError("`data` holds no examples. Received: empty data")
        size: int = total if reservoir is None else min(total, self.max_bank)
        if self.k > size:
            raise ValueError(
                f"`k` must not exceed the number of bank features ({size}). Received: k={self.k}"
            )
        if reservoir is not None:
            sample = reservoir.sample()
            for index, start in enumerate(range(0, size, rows)):
                self._store_chunk(index, sample[start : start + rows])
        elif filled:
            self._store_chunk(stored, buffer[:filled].copy())
        self._make_state({"bank_size": size, "feature_dim": feature_dim, "chunk_rows": rows})

    def _accumulator(self, context: FitContext) -> _BankRows:
        # Distributed fits only (one per replica); a one-device fit streams into the
        # bank's variables (`_fit`).
        return _BankRows(self.max_bank, self.seed)

    def _finish(self, rows: _BankRows, context: FitContext) -> None:
        if rows.total == 0:
            raise ValueError("`data` holds no examples. Received: empty data")
        bank = rows.bank
        if self.k > len(bank):
            raise ValueError(
                f"`k` must not exceed the number of bank features ({len(bank)}). "
                f"Received: k={self.k}"
            )
        for index, start in enumerate(range(0, len(bank), self.chunk_size)):
            self._store_chunk(index, bank[start : start + self.chunk_size])
        self._make_state(
            {"bank_size": len(bank), "feature_dim": bank.shape[1], "chunk_rows": self.chunk_size}
        )

    _score_rows = 8192  # Queries per sweep of the bank.

    def _score_array(self, feats: np.ndarray) -> np.ndarray:
        # NumPy on the host over views of the bank (no Keras call, no copy of the bank);
        # the arithmetic of `call`: float32 products, the k-th largest cosine,
        # sqrt(2 - 2 cos).
        feats = np.asarray(feats, np.float32).reshape(-1, self.state["feature_dim"])  # type: ignore[index]
        norms = np.sqrt(np.sum(feats * feats, axis=1, keepdims=True))
        query = feats / np.maximum(norms, np.float32(1e-12))
        chunks = [host_array(variable) for variable in self._bank_chunks()]
        kth = kth_largest_inner_product(query, chunks, self.k).astype(np.float64)
        score = -np.sqrt(np.maximum(2.0 - 2.0 * kth, 0.0))
        score[~np.isfinite(feats).all(axis=1)] = np.nan
        return score

    def call(self, inputs: Tensor) -> Tensor:
        # `call` runs on a fitted detector: `state` is set.
        feats = ops.cast(ops.reshape(inputs, (-1, self.state["feature_dim"])), "float32")  # type: ignore[index]
        query = l2_normalize(feats)
        top = None
        for block in self._bank_chunks():  # Memory: batch x chunk similarities at a time.
            sims = ops.matmul(query, ops.transpose(block))
            merged = sims if top is None else ops.concatenate([top, sims], axis=1)
            top = merged if merged.shape[1] < self.k else ops.top_k(merged, self.k)[0]
        kth = ops.min(top, axis=1)  # The k-th largest cosine similarity.
        score = -ops.sqrt(ops.maximum(2.0 - 2.0 * kth, 0.0))
        return self._nan_rows(feats, score)

    def get_config(self) -> Config:
        return {
            **super().get_config(),
            "k": self.k,
            "max_bank": self.max_bank,
            "seed": self.seed,
            "chunk_size": self.chunk_size,
        }


def kth_largest_inner_product(
    query: np.ndarray, chunks: Iterable[np.ndarray], k: int, block_rows: int = 2048
) -> np.ndarray:
    """The k-th largest of `query @ bank.T` per query row, bank given as row chunks.

    Exact, in float32. A first block of bank rows fills a running top-k per query;
    every later block keeps only the products above the running k-th largest (one
    comparison per product; a partition of the few survivors), so the selection costs
    little beside the matrix products.

    Args:
        query: `(Q, F)` float32.
        chunks: Arrays `(n_i, F)` float32 whose rows make the bank (sum n_i >= k).
        k: Which largest.
        block_rows: Bank rows per matrix product. Defaults to `2048`.

    Returns:
        `(Q,)` float32.
    """
    nq = len(query)
    top: Any = None
    tau: Any = None
    sims_buf: Any = None
    mask_buf: Any = None
    for chunk in chunks:
        for start in range(0, len(chunk), block_rows):
            block = chunk[start : start + block_rows]
            m = len(block)
            if sims_buf is None or sims_buf.shape[1] < m:
                sims_buf = np.empty((nq, m), np.float32)
                mask_buf = np.empty((nq, m), bool)
            sims = sims_buf[:, :m]
            np.matmul(query, block.T, out=sims)
            if top is None or top.shape[1] < k:  # Filling the first k per query.
                merged = sims.copy() if top is None else np.concatenate([top, sims], axis=1)
                if merged.shape[1] > k:
                    merged = np.partition(merged, merged.shape[1] - k, axis=1)[:, -k:]
                top = np.ascontiguousarray(merged)
                if top.shape[1] == k:
                    tau = top.min(axis=1)
                continue
            mask = mask_buf[:, :m]
            np.greater(sims, tau[:, None], out=mask)  # NaN rows never pass.
            flat = np.flatnonzero(mask)  # Row-major: rows ascending (4x a 2-D nonzero).
            if not len(flat):
                continue
            rows = flat // m
            cols = flat - rows * m
            counts = np.bincount(rows, minlength=nq)
            hit = np.flatnonzero(counts)
            width = k + int(counts.max())
            merged = np.full((len(hit), width), -np.inf, np.float32)
            merged[:, :k] = top[hit]
            slot = np.empty(nq, np.int64)
            slot[hit] = np.arange(len(hit))
            position = np.arange(len(rows)) - (np.cumsum(counts) - counts)[rows]
            merged[slot[rows], k + position] = sims[rows, cols]
            best = np.partition(merged, width - k, axis=1)[:, width - k :]
            top[hit] = best
            tau[hit] = best.min(axis=1)
    return top.min(axis=1)


def _normalized(feats: np.ndarray) -> np.ndarray:
    return (feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)).astype(
        np.float32
    )


class _BankRows:
    """One replica's normalised rows (or its reservoir, with `max_bank`) in a distributed fit."""

    def __init__(self, max_bank: int | None, seed: Any) -> None:
        self.reservoir = None if max_bank is None else Reservoir(max_bank, seed)
        self.max_bank, self.seed = max_bank, seed
        self.parts: list[np.ndarray] = []
        self.total = 0
        self.bank: Any = None  # The merged bank (set by `merge`).

    def update(self, feats: np.ndarray, labels: Any = None) -> None:
        normed = _normalized(feats)
        self.total += len(normed)
        if self.reservoir is not None:
            self.reservoir.add(normed)
        else:
            self.parts.append(normed)

    @staticmethod
    def merge(parts: Sequence[_BankRows], comm: Any, context: FitContext) -> _BankRows:
        """The bank gathered from every replica (replica order), on every worker."""
        f: int = context.feature_dim  # type: ignore[assignment]  # Set in distributed fits.
        merged = _BankRows(parts[0].max_bank, parts[0].seed)
        total = comm.sum([np.array([float(p.total)]) for p in parts])
        merged.total = int(round(float(total[0])))
        if parts[0].reservoir is not None:
            # With `max_bank`, every replica has a reservoir.
            merged.bank = Reservoir.merge(
                [p.reservoir for p in parts],  # type: ignore[misc]
                comm,
                parts[0].max_bank,  # type: ignore[arg-type]
                parts[0].seed,
                f,
            )
        else:
            local = [
                np.concatenate(p.parts) if p.parts else np.zeros((0, f), np.float32) for p in parts
            ]
            for p in parts:
                p.parts = []
            merged.bank = comm.gather(local)
        return merged

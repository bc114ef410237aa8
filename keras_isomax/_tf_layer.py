"""TensorFlow-only part of `IsoMaxPlusLayer`: fused logits and the inference cache.

`keras_isomax.layers` imports this module on the TensorFlow backend only; JAX and
PyTorch run the backend-neutral math of `layers.py` under their own autodiff.

Without XLA, TensorFlow runs every element-wise operation as its own pass over
memory, and its autodiff adds more passes per operation. `isomax_logits`
computes the layer's logits with few `(N, C)` passes and gives the whole
computation one gradient: those for the features and the prototypes reduce to two
matrix products with one `(N, C)` coefficient matrix, plus a correction per row
(docs/layer_design.md derives it).
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from keras_isomax._numerics import NORM_EPSILON, SQUARED_FLOOR


def first_argmin(values: tf.Tensor) -> tf.Tensor:
    """`(N,)` int32: the index of each row's minimum (TensorFlow's `ArgMin`, one pass)."""
    return tf.math.argmin(values, axis=-1, output_type=tf.int32)


def cache_allowed() -> bool:
    """Whether this call may use an `InferenceCache`.

    Not for `tf.distribute` replicas (they would write one cache at once), nor
    under XLA, which copies every variable a compiled function may write, on
    each call.
    """
    return not tf.distribute.has_strategy() and tf.__internal__.get_enclosing_xla_context() is None


def isomax_logits(
    x: tf.Tensor, prototypes: tf.Tensor, scale: tf.Tensor, cache: InferenceCache | None = None
) -> tf.Tensor:
    """IsoMax+ logits `-scale * ||x/||x|| - p/||p|| ||` `(N, C)`, differentiable.

    The distances come from one matrix product (`||a||^2 + ||b||^2 - 2 a.b` of
    the normalised vectors, floored at `SQUARED_FLOOR` before the square root);
    each row's nearest prototype's is recomputed from the difference of the
    normalised vectors. Rows of `x` with NaN or Inf give NaN logits.

    Args:
        x: Features `(N, F)`.
        prototypes: Prototypes `(C, F)`, not normalised.
        scale: Scalar `|s| / T`.
        cache: An `InferenceCache` to read the normalised prototypes from
            (verified against `prototypes`), or `None` to normalise them here.
            Defaults to `None`.

    Returns:
        Logits `(N, C)`.
    """
    if cache is None:
        return _live_logits(x, prototypes, scale)
    kernel, bias, normalized = cache.normalized(prototypes)
    return _cached_logits(x, prototypes, scale, kernel, bias, normalized)


# ------------------------------------------------------------------ forward


def _inverse(norm: Any) -> Any:
    """`1 / max(norm, eps)`: the factor that normalises a vector of this norm."""
    return 1.0 / tf.maximum(norm, NORM_EPSILON)


def _norms(v: Any, keepdims: Any = False) -> Any:
    """The Euclidean norms of the rows of `v` `(N, F)`.

    `EuclideanNorm` reads `v` once, without a temporary. XLA has no kernel for
    it, and on the CPU its code for a row-wise sum of squares is slow (without
    oneDNN), and a batched dot product (`einsum`) too (with oneDNN): under XLA
    the squared norms are a matrix-vector product with a vector of ones.
    """
    if tf.__internal__.get_enclosing_xla_context() is not None:
        norm = tf.sqrt(tf.matmul(tf.square(v), tf.ones((v.shape[-1], 1), v.dtype)))
        return norm if keepdims else norm[:, 0]
    return tf.math.reduce_euclidean_norm(v, axis=-1, keepdims=keepdims)


def _row_norms(v: Any) -> Any:
    """`(norm, inverse)`, each `(N, 1)`, of the rows of `v`."""
    norm = _norms(v, keepdims=True)
    return norm, _inverse(norm)


class _Rows:
    """The normalised features of a call: `xn = x * inverse`, `||xn||^2` and the NaN guard."""

    def __init__(self, x: Any, scale: Any) -> None:
        self.norm, self.inverse = _row_norms(x)
        self.normalized = x * self.inverse
        clamped = self.norm <= NORM_EPSILON
        # ||xn||^2: exactly 1 unless the norm is clamped (0 for a zero vector).
        self.squared = tf.where(clamped, tf.square(self.norm * self.inverse), 1.0)
        self.any_clamped = tf.reduce_any(clamped)
        # -scale per row, NaN for rows with NaN or Inf (whatever a kernel does with NaN).
        self.factor = 0.0 * self.norm - scale  # (N, 1)

    def correct(self, squared: Any, clip: Any = False) -> Any:
        """`squared` computed with `||xn||^2 = 1` for every row, corrected for the
        rows with a clamped norm (none in most batches: the other rows' values
        are the same either way, bit for bit)."""

        def corrected() -> Any:
            value = squared - (1.0 - self.squared)
            return tf.nn.relu(value) if clip else value

        return tf.cond(self.any_clamped, corrected, lambda: squared)


def _logits_with_nearest(rows: Any, squared: Any, distances: Any, neighbors: Any) -> Any:
    """Replaces each row's nearest distance by the exact one; returns `(logits, state)`.

    `neighbors(nearest)` returns the normalised prototypes of the indices
    `nearest`, normalised like the features (the same function of the same
    values: a feature vector equal to a prototype is at distance 0 exactly).
    """
    nearest = first_argmin(squared)  # (N,)
    at_nearest = tf.stack([tf.range(tf.shape(nearest)[0]), nearest], axis=1)  # (N, 2)
    neighbor = neighbors(nearest)
    exact = tf.sqrt(tf.reduce_sum(tf.math.squared_difference(rows.normalized, neighbor), -1))
    distances = tf.tensor_scatter_nd_update(distances, at_nearest, exact)
    state = {
        "nearest": nearest,
        "at_nearest": at_nearest,
        "neighbor": neighbor,
        "exact": exact,
        "distances": distances,
    }
    return distances * rows.factor, state


@tf.custom_gradient
def _live_logits(x: Any, prototypes: Any, scale: Any) -> Any:
    rows = _Rows(x, scale)
    # The prototypes' norms in one read; the normalisation is applied to the (N, C) product.
    p_norm = _norms(prototypes)  # (C,)
    p_inverse = _inverse(p_norm)
    p_squared = tf.square(p_norm * p_inverse)
    # (P xn^T)^T: without oneDNN, TensorFlow's kernel for xn P^T (a transposed
    # right operand) takes 2-3x longer; with it, both take the same time.
    cross = tf.transpose(tf.matmul(prototypes, rows.normalized, transpose_b=True))  # (N, C)
    squared = rows.correct(cross * (-2.0 * p_inverse) + (p_squared + 1.0))
    distances = tf.sqrt(tf.maximum(squared, SQUARED_FLOOR))
    logits, state = _logits_with_nearest(
        rows,
        squared,
        distances,
        lambda nearest: tf.gather(prototypes, nearest) * tf.gather(p_inverse, nearest)[:, None],
    )

    def grad(upstream: Any) -> Any:
        return _backward(
            upstream, rows, prototypes, p_norm, p_inverse, state, lambda w, _: w * cross
        )

    return logits, grad


@tf.custom_gradient
def _cached_logits(
    x: Any, prototypes: Any, scale: Any, kernel: Any, bias: Any, normalized: Any
) -> Any:
    rows = _Rows(x, scale)
    # One product (bias and ReLU fused) gives ||pn||^2 - 2 xn.pn + ||xn||^2:
    # kernel = -2 pn^T, bias = ||pn||^2 + 1.
    squared = tf.nn.relu(tf.nn.bias_add(tf.matmul(rows.normalized, kernel), bias))
    squared = rows.correct(squared, clip=True)
    distances = tf.sqrt(squared)
    logits, state = _logits_with_nearest(
        rows, squared, distances, lambda nearest: tf.gather(normalized, nearest)
    )

    def grad(upstream: Any) -> Any:
        p_norm = _norms(prototypes)

        def weighted_cosine(_: Any, coefficient: Any) -> Any:
            # coefficient * xn.pn, from the squared distances (where the
            # coefficient is not 0, they were not clamped).
            return coefficient * (0.5 * ((rows.squared + (bias - 1.0)) - squared))

        d_x, d_prototypes, d_scale = _backward(
            upstream, rows, prototypes, p_norm, _inverse(p_norm), state, weighted_cosine
        )
        return d_x, d_prototypes, d_scale, None, None, None

    return logits, grad


# ----------------------------------------------------------------- backward


def _normalize_backward(normalized: Any, norm: Any, inverse: Any, upstream: Any) -> Any:
    """Gradient through `normalized = v * inverse` for the rows `v` of norm `norm`.

    `inverse * (u - n (n . u))` where the norm exceeds epsilon (the projection
    drops the radial part); `inverse * u` where it is clamped (a linear map).
    """
    radial = tf.reduce_sum(normalized * upstream, axis=-1, keepdims=True)
    radial = tf.where(norm > NORM_EPSILON, radial, tf.zeros_like(radial))
    return inverse * (upstream - normalized * radial)


def _backward(
    upstream: Any,
    rows: Any,
    prototypes: Any,
    p_norm: Any,
    p_inverse: Any,
    state: Any,
    weighted_cosine: Any,
) -> Any:
    """Gradients `(d_x, d_prototypes, d_scale)` of the logits, given `upstream` `(N, C)`.

    With `w_ij = g_ij * p_inverse_j / distance_ij` (0 at or below the floor),
    `dL/d(x_i . p_j) = -factor_i * w_ij`: the products `w^T (factor * xn)` and
    `w P` carry the gradients of the distances. The normalisations add a
    radial term per row, a scalar sum over the `(N, C)` matrix. Each row's
    nearest prototype (its exact distance `||xn - neighbor||`) has its entry in
    `w` for the prototypes' product; the features get its gradient from the
    difference itself. `weighted_cosine(w, coefficient)` returns
    `coefficient * xn.pn` `(N, C)`. The derivation: docs/layer_design.md.
    """
    distances = state["distances"]
    g = tf.convert_to_tensor(upstream, distances.dtype)
    factor = rows.factor  # (N, 1)
    f = factor[:, 0]
    xn = rows.normalized
    at_nearest = state["at_nearest"]
    nearest = state["nearest"]
    d_scale = -tf.reduce_sum(g * distances)
    # dL/d(squared) = factor * g / (2 * distance); 0 where the distance is at
    # the floor's square root or below (the nearest's exact one included).
    floor_distance = tf.sqrt(tf.constant(SQUARED_FLOOR, distances.dtype))
    coefficient = tf.math.divide_no_nan(
        tf.where(distances > floor_distance, g, tf.zeros_like(g)), distances
    )
    w = coefficient * p_inverse
    e = tf.gather_nd(coefficient, at_nearest)  # (N,): g / distance at the nearest prototype
    # The radial terms of the normalised prototypes: the projection of their
    # normalisation, sum_i factor_i coefficient_ij xn_i.pn_j per prototype; at
    # the nearest prototype, factor_i e_i (1 + neighbor.(xn - neighbor)) instead.
    # For a clamped norm (a linear normalisation): the gradient of ||pn||^2 in
    # the distance, sum_i factor_i coefficient_ij.
    weighted = weighted_cosine(w, coefficient)
    neighbor = state["neighbor"]
    difference = xn - neighbor
    nearest_term = e * (1.0 + tf.reduce_sum(neighbor * difference, axis=-1))
    correction = f * (nearest_term - tf.gather_nd(weighted, at_nearest))
    radial = tf.linalg.matvec(weighted, f, transpose_a=True) + tf.math.unsorted_segment_sum(
        correction, nearest, tf.shape(prototypes)[0]
    )  # (C,)
    radial = tf.cond(
        tf.reduce_any(p_norm <= NORM_EPSILON),
        lambda: tf.where(
            p_norm > NORM_EPSILON, radial, tf.linalg.matvec(coefficient, f, transpose_a=True)
        ),
        lambda: radial,
    )
    d_prototypes = -tf.matmul(w, xn * factor, transpose_a=True)  # (C, F)
    d_prototypes = d_prototypes + prototypes * (radial * tf.square(p_inverse))[:, None]
    # dL/dxn: the product without the nearest prototypes, whose part comes
    # from the difference, factor * e * (xn - neighbor).
    w = tf.tensor_scatter_nd_update(w, at_nearest, tf.zeros_like(e))
    d_xn = factor * (e[:, None] * difference - tf.matmul(w, prototypes))  # (N, F)
    # The gradient of ||xn||^2 in the distances: radial, the projection below
    # removes it unless the norm is clamped.
    d_xn = tf.cond(
        tf.reduce_any(rows.norm <= NORM_EPSILON),
        lambda: (
            d_xn + xn * (factor * (tf.reduce_sum(coefficient, axis=-1, keepdims=True) - e[:, None]))
        ),
        lambda: d_xn,
    )
    d_x = _normalize_backward(xn, rows.norm, rows.inverse, d_xn)
    return d_x, d_prototypes, d_scale


# ------------------------------------------------------------------- cache


class InferenceCache:
    """The normalised prototypes of TensorFlow inference calls, verified.

    Holds the `(F, C)` kernel `-2 pn^T` and the `(C,)` bias `||pn||^2 + 1` of
    the normalised prototypes `pn`, `pn` itself `(C, F)` (the rows the exact
    nearest distances read), and a copy of the prototypes they were computed
    from (`source`; TensorFlow shares its buffer with the prototypes until
    they change). Each call compares the
    prototypes with `source`, element by element, and recomputes all of them on
    any difference, so no write (optimizer step, `assign`, checkpoint restore,
    a raw `tf.Variable` op) can leave it stale, and every call computes the same
    way: repeated calls on the same weights give identical results. A hit
    spares the norms and gives a `Dense` head's matrix product (kernel in
    `(F, C)` order; bias and ReLU fused). A plain object, so that neither Keras
    nor TensorFlow saves its variables.

    Args:
        num_classes: `C`.
        feature_dim: `F`.
        dtype: The prototypes' dtype.
    """

    def __init__(self, num_classes: int, feature_dim: int, dtype: tf.DType) -> None:
        # Created with the layer's weights, uninitialised (`Empty`): pages are
        # only taken when the first call writes them. Full shapes, because XLA
        # cannot change a variable's shape.
        def empty(*shape: Any) -> Any:
            return tf.raw_ops.Empty(shape=shape, dtype=dtype, init=False)

        with tf.init_scope():
            self.filled = tf.Variable(False, trainable=False, name="cache_filled")
            self.source = tf.Variable(
                empty(num_classes, feature_dim), trainable=False, name="cache_source"
            )
            self.kernel = tf.Variable(
                empty(feature_dim, num_classes), trainable=False, name="cache_kernel"
            )
            self.bias = tf.Variable(empty(num_classes), trainable=False, name="cache_bias")
            self.prototypes = tf.Variable(
                empty(num_classes, feature_dim), trainable=False, name="cache_prototypes"
            )

    def normalized(self, prototypes: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """`(kernel, bias, normalized)` of `prototypes`, read or recomputed."""
        variables = (self.kernel, self.bias, self.prototypes)

        def hit() -> Any:
            return tuple(v.read_value() for v in variables)

        def refresh() -> Any:
            values = _normalized_kernel(prototypes)
            # The source last: a concurrent call that finds it equal to the
            # prototypes also finds their kernel.
            with tf.control_dependencies([v.assign(t) for v, t in zip(variables, values)]):
                written = [self.source.assign(prototypes), self.filled.assign(True)]
            with tf.control_dependencies(written):
                return tuple(tf.identity(t) for t in values)

        fresh = tf.logical_and(
            self.filled.read_value(),
            tf.reduce_all(tf.equal(self.source.read_value(), prototypes)),
        )
        return tf.cond(fresh, hit, refresh)


def _normalized_kernel(prototypes: Any) -> Any:
    """`(-2 pn^T, ||pn||^2 + 1, pn)` of the prototypes `(C, F)`."""
    norm, inverse = _row_norms(prototypes)  # (C, 1)
    normalized = prototypes * inverse
    return tf.transpose(-2.0 * normalized), tf.square(norm * inverse)[:, 0] + 1.0, normalized

"""Type aliases of the public signatures.

Keras and TensorFlow ship no type information, and a Keras tensor is a different
class on each backend (`tf.Tensor`, `jax.Array`, `torch.Tensor`, or a symbolic
`keras.KerasTensor`), so tensors are `Any` to a type checker. The aliases say in a
signature what a value is meant to be.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeAlias

Tensor: TypeAlias = Any
"""A backend tensor (`tf.Tensor`, `jax.Array`, `torch.Tensor`) or a `keras.KerasTensor`."""

ArrayLike: TypeAlias = Any
"""A tensor, a NumPy array or nested Python numbers: what `keras.ops` converts."""

Data: TypeAlias = Any
"""Inputs as `keras.Model.predict` takes them: an array, a `tf.data.Dataset`, a
`keras.utils.PyDataset`, an iterable of batches, or `(x, y)` pairs of these."""

Config: TypeAlias = dict[str, Any]
"""A Keras `get_config()` dictionary."""

ScoreFunction: TypeAlias = Callable[[Any], Any]
"""An OOD score: logits `(..., C)` to scores `(...)`, higher = more in-distribution."""

Verbose: TypeAlias = int | str
"""Keras' `verbose`: `"auto"`, 0 (silent), 1 (progress bar) or 2 (one line per stage)."""

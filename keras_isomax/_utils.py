"""Small backend helpers shared by the modules."""

from __future__ import annotations

from typing import Any

import keras


def is_eager(x: Any) -> bool:
    """True when `x` holds concrete values (not a symbol traced into a graph)."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.executing_eagerly() and not isinstance(x, keras.KerasTensor)
    if backend == "jax":
        import jax

        return not isinstance(x, jax.core.Tracer | keras.KerasTensor)
    if backend == "torch":
        # Keras on PyTorch infers output shapes (as in `fit`'s first step) by calling
        # on tensors of the "meta" device, which hold no values.
        device = getattr(x, "device", None)
        if getattr(device, "type", None) == "meta":
            return False
    return not isinstance(x, keras.KerasTensor)

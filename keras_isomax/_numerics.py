"""Numerical constants shared by the layer's backend-neutral and TensorFlow code."""

NORM_EPSILON = 1e-12
"""Lower bound of a norm in normalisations: `x / max(||x||, eps)`, as PyTorch's
`F.normalize` used by the IsoMax+ authors."""

SQUARED_FLOOR = 1e-12
"""Floor of the squared distances from the matrix product (all but each row's
nearest prototype): keeps the gradient of `sqrt` finite. Its square root, 1e-6,
lies far below the expansion's own rounding error (about 1e-4)."""

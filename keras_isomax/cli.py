"""Deprecated: moved to `keras_isomax.app.cli` (this path works for one more release)."""

import sys
import warnings

from keras_isomax.app import cli as _moved

warnings.warn(
    "`keras_isomax.cli` moved to `keras_isomax.app.cli`; the old path will be "
    "removed in the next release.",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved  # The old name is the new module (patches included).

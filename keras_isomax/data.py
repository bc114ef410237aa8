"""Deprecated: moved to `keras_isomax.app.data` (this path works for one more release)."""

import sys
import warnings

from keras_isomax.app import data as _moved

warnings.warn(
    "`keras_isomax.data` moved to `keras_isomax.app.data`; the old path will be "
    "removed in the next release.",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved  # The old name is the new module (patches included).

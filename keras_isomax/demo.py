"""Deprecated: moved to `keras_isomax.app.demo` (this path works for one more release)."""

import sys
import warnings

from keras_isomax.app import demo as _moved

warnings.warn(
    "`keras_isomax.demo` moved to `keras_isomax.app.demo`; the old path will be "
    "removed in the next release.",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved  # The old name is the new module (patches included).

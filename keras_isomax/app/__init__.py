"""The application layer: offline data sets, the demo job and the `keras-isomax` command.

Not part of the method: the library (`import keras_isomax`) never imports this
subpackage, and its heavy optional dependencies (scikit-learn, scikit-image,
matplotlib, tensorflow-datasets) are imported only inside the functions that
use them.
"""

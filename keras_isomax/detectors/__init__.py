"""OOD detectors: fitted on a model's features (KNN, Mahalanobis, ViM, ClassMeans) or
scoring its logits (MinimumDistance, Entropic, MaxProbability, MaxLogit, Energy).

A detector is a `keras.layers.Layer` whose variables hold its fitted state and
a `threshold` set by `calibrate_threshold(model, data, detector=det)`; every
score is higher for more in-distribution inputs.

```python
det = detectors.KNN(k=50).fit(model, (x_train, y_train))  # one streaming pass
knn_scores = det.score(x_test)                             # NumPy (N,)
det = detectors.KNN(k=50).fit_features(z_train)            # precomputed features
det.score_features(z_test)
```

Features are the input of the classifier head (of the `IsoMaxPlusLayer`, or of
the final `Dense` of a SoftMax model); `features="layer_name"` takes another
layer's output. `det.save("det.keras")` writes the detector alone;
`detectors.load(path).attach(model)` restores it and binds it to its model.
"""

from __future__ import annotations

import inspect
import json
import os
import zipfile
from typing import Any

import keras

from keras_isomax.detectors.base import Detector
from keras_isomax.detectors.class_means import ClassMeans
from keras_isomax.detectors.knn import KNN
from keras_isomax.detectors.logits import (
    Energy,
    Entropic,
    LogitDetector,
    MaxLogit,
    MaxProbability,
    MinimumDistance,
)
from keras_isomax.detectors.mahalanobis import Mahalanobis
from keras_isomax.detectors.vim import ViM

__all__ = [
    "KNN",
    "ClassMeans",
    "Detector",
    "Energy",
    "Entropic",
    "LogitDetector",
    "Mahalanobis",
    "MaxLogit",
    "MaxProbability",
    "MinimumDistance",
    "ViM",
    "get",
    "load",
]

DETECTORS = {
    "knn": KNN,
    "mahalanobis": Mahalanobis,
    "vim": ViM,
    "class_means": ClassMeans,
    "minimum_distance": MinimumDistance,
    "entropic": Entropic,
    "max_probability": MaxProbability,
    "max_logit": MaxLogit,
    "energy": Energy,
}


def get(identifier: Any, **kwargs: Any) -> Detector:
    """Returns a new detector for a name (or a detector instance, unchanged).

    Args:
        identifier: One of `"knn"`, `"mahalanobis"`, `"vim"`, `"class_means"`,
            `"minimum_distance"`, `"entropic"`, `"max_probability"`,
            `"max_logit"`, `"energy"` (case-insensitive; a `_score` suffix is
            allowed), or a `Detector`.
        **kwargs: Arguments of the detector's constructor (e.g. `k=10`,
            `dim=64`).

    Returns:
        A `Detector`.

    Raises:
        ValueError: If the name is unknown.
    """
    if isinstance(identifier, Detector):
        return identifier
    if isinstance(identifier, str):
        key = identifier.lower().removesuffix("_score")
        if key in DETECTORS:
            return DETECTORS[key](**kwargs)
    raise ValueError(
        f"Unknown detector; expected one of {sorted(DETECTORS)} or a Detector. "
        f"Received: detector={identifier!r}"
    )


def load(filepath: str | os.PathLike) -> Detector:
    """Loads a detector written by `Detector.save`; bind it with `.attach(model)`.

    Args:
        filepath: Path of the `.keras` file.

    Returns:
        The `Detector`.

    Raises:
        ValueError: If the file cannot be read as one keras-isomax detector: not
            a `.keras` file, truncated, or written by another version whose
            config or fitted-state layout this version does not know.

    Example:

    >>> import os, tempfile, numpy as np
    >>> from keras_isomax import detectors
    >>> z = np.random.default_rng(0).normal(size=(50, 4))
    >>> path = os.path.join(tempfile.mkdtemp(), "knn.keras")
    >>> detectors.KNN(k=3).fit_features(z, verbose=0).save(path)
    >>> detectors.load(path).feature_dim
    4
    """
    filepath = os.fspath(filepath)
    if not os.path.isfile(filepath):
        raise ValueError(f"No detector file at {filepath!r}. Received: filepath={filepath!r}")
    _check_file_config(filepath)
    try:
        wrapper = keras.saving.load_model(filepath)
    except (ValueError, TypeError, KeyError, OSError, zipfile.BadZipFile) as error:
        raise ValueError(
            f"{filepath!r} could not be read as a keras_isomax detector: it is truncated, "
            "not a `.keras` file, or was written by a keras_isomax version with another "
            f"config or state layout ({type(error).__name__}: {str(error)[:300]}). "
            f"Received: filepath={filepath!r}"
        ) from error
    found = [layer for layer in getattr(wrapper, "layers", []) if isinstance(layer, Detector)]
    if len(found) != 1:
        raise ValueError(
            f"{filepath!r} does not hold one keras_isomax detector. Received: filepath={filepath!r}"
        )
    return found[0]


def _check_file_config(filepath: str) -> None:
    """Reads the file's config first: names unknown arguments and state layouts exactly
    (Keras' own error for them does not say which)."""
    try:
        with zipfile.ZipFile(filepath) as archive:
            config = json.loads(archive.read("config.json"))
    except (zipfile.BadZipFile, KeyError, OSError, ValueError) as error:
        raise ValueError(
            f"{filepath!r} could not be read as a keras_isomax detector: it is truncated or "
            f"not a `.keras` file ({type(error).__name__}: {error}). "
            f"Received: filepath={filepath!r}"
        ) from error
    layers = config.get("config", {}).get("layers", []) if isinstance(config, dict) else []
    for layer in layers:
        registered = layer.get("registered_name") or ""
        cls = keras.saving.get_registered_object(registered) if registered else None
        if not (isinstance(cls, type) and issubclass(cls, Detector)):
            continue
        known = {"name", "trainable", "dtype"}
        for klass in cls.__mro__:
            if isinstance(klass, type) and issubclass(klass, Detector):
                known |= set(inspect.signature(klass.__init__).parameters) - {"self", "kwargs"}
        layer_config = layer.get("config", {})
        unknown = sorted(set(layer_config) - known)
        if unknown:
            raise ValueError(
                f"{filepath!r} holds a {cls.__name__} with arguments this keras_isomax version "
                f"does not know (written by another version?): {unknown}. "
                f"Received: filepath={filepath!r}"
            )
        state = layer_config.get("state")
        if state and cls._state_keys and set(state) != set(cls._state_keys):
            raise ValueError(
                f"{filepath!r} holds a {cls.__name__} whose fitted state has another layout "
                f"(written by another keras_isomax version?): expected {sorted(cls._state_keys)}. "
                f"Received: state with keys {sorted(state)}"
            )

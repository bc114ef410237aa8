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


def load(filepath: str) -> Detector:
    """Loads a detector written by `Detector.save`; bind it with `.attach(model)`.

    Args:
        filepath: Path of the `.keras` file.

    Returns:
        The `Detector`.

    Raises:
        ValueError: If the file does not hold one keras-isomax detector.
    """
    wrapper = keras.saving.load_model(filepath)
    found = [layer for layer in wrapper.layers if isinstance(layer, Detector)]
    if len(found) != 1:
        raise ValueError(
            f"{filepath!r} does not hold one keras_isomax detector. Received: filepath={filepath!r}"
        )
    return found[0]

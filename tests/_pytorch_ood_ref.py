"""Runs pytorch-ood 0.4.0's KNN / Mahalanobis / ViM on features from an .npz file.

Used by tests/test_detectors.py in a subprocess: importing torch after
TensorFlow can crash, and pytorch-ood imports torchvision, which is not
needed by its detectors: stand-in modules answer any attribute with a dummy
class (GUIDE.md). Usage: python _pytorch_ood_ref.py in.npz out.npz
"""

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types


def _dummy_attribute(attr):
    # Dunder names stay missing: `inspect` (called by Keras' torch backend)
    # reads `module.__file__` and must not get a class.
    if attr.startswith("__") and attr.endswith("__"):
        raise AttributeError(attr)
    return type(attr, (), {"__init__": lambda self, *a, **k: None})


class _StandIn(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports any `torchvision[.x.y]` as a module whose attributes are dummy classes."""

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = _dummy_attribute
        return module

    def exec_module(self, module):
        pass


def install_torchvision_stand_in():
    """Lets `import pytorch_ood.detector` work without torchvision (GUIDE.md)."""
    if importlib.util.find_spec("torchvision") is None:
        sys.meta_path.insert(0, _StandIn())


def main(src, dst):
    import numpy as np
    import torch

    install_torchvision_stand_in()
    from pytorch_ood.detector import KNN, Mahalanobis, ViM

    data = np.load(src)
    z, y, q, zv, qv = (
        torch.from_numpy(data[k]) for k in ("train", "labels", "test", "vtrain", "vtest")
    )
    w, b = torch.from_numpy(data["w"]), torch.from_numpy(data["b"])
    k, dim = int(data["k"]), int(data["dim"])
    out = {
        "knn": KNN(None, k=k).fit_features(z, y).predict_features(q).numpy(),
        "knn50": KNN(None, k=50).fit_features(z, y).predict_features(q).numpy(),
        "mahalanobis": Mahalanobis(None).fit_features(z, y).predict_features(q).numpy(),
        "vim": ViM(None, d=dim, w=w, b=b).fit_features(zv, y).predict_features(qv).numpy(),
    }
    np.savez(dst, **out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

"""Detectors at scale: KNN vs pytorch-ood's KNN, a 1M x 2,048 KNN bank, Mahalanobis 1,000 x 1,024.

Each section runs in a fresh subprocess (peak RSS per section; torch is never
imported in a process that imported TensorFlow first):

- `knn_ratio`: KNN fit + score, keras_isomax (through a model whose head input
  is the features) vs pytorch-ood 0.4.0 `KNN(k)` (scikit-learn
  `NearestNeighbors`) on the same float32 features; ratio of wall times and
  the largest score difference.
- `knn_bank`: a bank of N x F random features streamed through `fit` in
  batches, then Q queries scored; RSS after fitting, the transient peak while
  scoring (VmHWM reset via /proc/self/clear_refs) and times.
- `mahalanobis`: streaming fit over N examples of C classes, F features.

Usage:
    python benchmarks/detectors_scale.py                     # all, default sizes
    python benchmarks/detectors_scale.py --bank-n 1000000 --bank-f 2048

The sections' values go to `benchmarks/results/detectors_scale.json` (rendered
into BENCHMARKS.md by `benchmarks/render.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
sys.path.insert(0, ROOT)
from _common import proc_status_kib, reset_peak_rss  # noqa: E402


def _status(key):
    """`/proc/self/status` field in MiB (NaN where absent)."""
    kib = proc_status_kib(key)
    return float("nan") if kib is None else kib / 1024


def _features(rng, n, f, centers=None):
    import numpy as np

    if centers is None:
        return rng.standard_normal((n, f), dtype=np.float32)
    labels = rng.integers(0, len(centers), n)
    return centers[labels] + rng.standard_normal((n, f), dtype=np.float32), labels


def _identity_model(f, c):
    import keras

    return keras.Sequential([keras.Input((f,)), keras.layers.Dense(c, activation="softmax")])


def section_knn_ratio(args: argparse.Namespace) -> dict:
    import numpy as np

    rng = np.random.default_rng(0)
    centers = rng.standard_normal((10, args.ratio_f)).astype(np.float32)
    z, y = _features(rng, args.ratio_n, args.ratio_f, centers)
    q, _ = _features(rng, args.ratio_q, args.ratio_f, centers)
    if args.side == "torch":
        import torch

        sys.path.insert(0, os.path.join(ROOT, "tests"))
        from _pytorch_ood_ref import install_torchvision_stand_in

        install_torchvision_stand_in()
        from pytorch_ood.detector import KNN

        torch.set_num_threads(os.cpu_count())
        start = time.perf_counter()
        det = KNN(None, k=args.k).fit_features(torch.from_numpy(z), torch.from_numpy(y))
        fit = time.perf_counter() - start
        start = time.perf_counter()
        scores = -det.predict_features(torch.from_numpy(q)).numpy()
        score = time.perf_counter() - start
    else:
        from keras_isomax import detectors

        model = _identity_model(args.ratio_f, 10)
        start = time.perf_counter()
        det = detectors.KNN(k=args.k, batch_size=1024).fit(model, (z, y))
        fit = time.perf_counter() - start
        start = time.perf_counter()
        scores = det.score(q)
        score = time.perf_counter() - start
    np.save(args.out, scores)
    return {"fit_s": fit, "score_s": score, "peak_rss_mib": _status("VmHWM")}


def section_knn_bank(args: argparse.Namespace) -> dict:
    import numpy as np

    from keras_isomax import detectors

    n, f, batch = args.bank_n, args.bank_f, 8192
    model = _identity_model(f, 10)

    def stream():
        rng = np.random.default_rng(1)
        for start in range(0, n, batch):
            rows = min(batch, n - start)
            yield rng.standard_normal((rows, f), dtype=np.float32), np.zeros(rows, np.int64)

    base = _status("VmRSS")
    start = time.perf_counter()
    det = detectors.KNN(k=args.k, chunk_size=32768, batch_size=args.bank_q).fit(model, stream())
    fit = time.perf_counter() - start
    after_fit = _status("VmRSS")
    fit_peak = _status("VmHWM")
    q = np.random.default_rng(2).standard_normal((args.bank_q, f), dtype=np.float32)
    det.score(q[:8])  # Warm-up (traces the predict function).
    reset = reset_peak_rss()
    before = _status("VmRSS")
    start = time.perf_counter()
    scores = det.score(q)
    score = time.perf_counter() - start
    peak = _status("VmHWM")
    return {
        "n": n,
        "f": f,
        "q": args.bank_q,
        "bank_gib": n * f * 4 / 2**30,
        "rss_before_fit_mib": base,
        "fit_s": fit,
        "fit_peak_rss_mib": fit_peak,
        "rss_after_fit_mib": after_fit,
        "score_s": score,
        "score_per_query_ms": 1000 * score / args.bank_q,
        "score_transient_mib": (peak - before) if reset else None,
        "finite": bool(np.isfinite(scores).all()),
    }


def section_mahalanobis(args: argparse.Namespace) -> dict:
    import numpy as np

    from keras_isomax import detectors

    n, f, c, batch = args.maha_n, args.maha_f, args.maha_c, 2048
    model = _identity_model(f, c)
    centers = np.random.default_rng(3).standard_normal((c, f)).astype(np.float32)

    def stream():
        rng = np.random.default_rng(4)
        labels_all = np.arange(n) % c  # Every class present.
        for start in range(0, n, batch):
            labels = labels_all[start : start + batch]
            x = centers[labels] + rng.standard_normal((len(labels), f), dtype=np.float32)
            yield x, labels

    base = _status("VmRSS")
    start = time.perf_counter()
    det = detectors.Mahalanobis().fit(model, stream())
    fit = time.perf_counter() - start
    q = np.random.default_rng(5).standard_normal((1000, f), dtype=np.float32)
    start = time.perf_counter()
    det.score(q)
    score = time.perf_counter() - start
    state = sum(int(np.prod(w.shape)) * 4 for w in det.weights)
    return {
        "n": n,
        "f": f,
        "c": c,
        "fit_s": fit,
        "rss_before_mib": base,
        "peak_rss_mib": _status("VmHWM"),
        "features_in_memory_would_be_mib": n * f * 4 / 2**20,
        "state_mib": state / 2**20,
        "score_1000_s": score,
    }


SECTIONS = {
    "knn_ratio": section_knn_ratio,
    "knn_bank": section_knn_bank,
    "mahalanobis": section_mahalanobis,
}


def _run(section: str, argv: list[str], extra: tuple[str, ...] = ()) -> dict:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": ROOT}
    cmd = [sys.executable, __file__, "--section", section, *argv, *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{section} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--section", default=None)
    parser.add_argument("--only", default="knn_ratio,knn_bank,mahalanobis")
    parser.add_argument("--side", default="ours")
    parser.add_argument("--out", default=None)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--ratio-n", type=int, default=50000)
    parser.add_argument("--ratio-f", type=int, default=512)
    parser.add_argument("--ratio-q", type=int, default=5000)
    parser.add_argument("--bank-n", type=int, default=1_000_000)
    parser.add_argument("--bank-f", type=int, default=2048)
    parser.add_argument("--bank-q", type=int, default=256)
    parser.add_argument("--maha-n", type=int, default=100_000)
    parser.add_argument("--maha-f", type=int, default=1024)
    parser.add_argument("--maha-c", type=int, default=1000)
    parser.add_argument("--output", help="result JSON path (default: benchmarks/results/)")
    args, _ = parser.parse_known_args()
    if args.section:
        print(json.dumps(SECTIONS[args.section](args)))
        return
    import tempfile

    import numpy as np

    argv, skip = [], False  # The sections' own arguments: all but --only / --output.
    for arg in sys.argv[1:]:
        if skip or arg.startswith(("--only=", "--output=")):
            skip = False
            continue
        if arg in ("--only", "--output"):
            skip = True
            continue
        argv.append(arg)
    results = {}
    for section in args.only.split(","):
        if section == "knn_ratio":
            with tempfile.TemporaryDirectory() as tmp:
                ours = _run(section, argv, ["--side", "ours", "--out", f"{tmp}/ours.npy"])
                theirs = _run(section, argv, ["--side", "torch", "--out", f"{tmp}/theirs.npy"])
                diff = float(
                    np.abs(np.load(f"{tmp}/ours.npy") - np.load(f"{tmp}/theirs.npy")).max()
                )
            total = (ours["fit_s"] + ours["score_s"]) / (theirs["fit_s"] + theirs["score_s"])
            results[section] = {
                "ours": ours,
                "pytorch_ood": theirs,
                "ratio_fit_plus_score": total,
                "max_abs_score_diff": diff,
            }
        else:
            results[section] = _run(section, argv)
        print(section, json.dumps(results[section], indent=1), flush=True)

    from _results import write_result

    settings = {
        k: v for k, v in vars(args).items() if k not in ("section", "side", "out", "output")
    }
    path = write_result(
        "detectors_scale", {"settings": settings, "sections": results}, path=args.output
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

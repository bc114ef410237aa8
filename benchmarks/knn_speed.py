"""KNN speed: keras-isomax's `detectors.KNN` vs pytorch-ood 0.4.0's `KNN`, side by side.

Fit on a float32 bank of N x F features and score Q queries with k neighbours,
timed end to end (fit + score), on the same data, in one run:

- `ours_features`: `detectors.KNN(k).fit_features(z).score_features(q)` (no model);
- `ours_model`: `detectors.KNN(k).fit(model, z).score(q, model)` through a model whose
  features are given (`keras.Sequential([keras.Input((F,)), IsoMaxPlusLayer(10)])`:
  the features are the input of the IsoMax+ head);
- `pytorch_ood`: `pytorch_ood.detector.KNN(None, k).fit_features(z, y).predict_features(q)`
  (scikit-learn's exact `NearestNeighbors`, `n_jobs=-1`; its scores are negated here).

Each measurement runs in a fresh process, after a warm-up fit on 100 rows (the
libraries' runtimes and thread pools start there, not in the timed region; no state
or memory carried between
them; TensorFlow and torch never share a process), in the order ours_features,
ours_model, pytorch_ood per repetition, so load on a shared machine hits all three
alike. The features are written once to a `.npy` file and memory-mapped by every
measurement (the largest case, 1,000,000 x 2,048, is 8 GB: one copy on disk, the
libraries' own copies in memory). Wall and CPU time (all threads of the process)
are recorded per repetition, with the load average before each; the scores of all
three are compared (max |difference|).

Usage:
    python benchmarks/knn_speed.py                       # 100000x256, 5 repetitions
    python benchmarks/knn_speed.py --sizes 1000000x2048 --reps 1 --timeout 3600
    python benchmarks/knn_speed.py --quick               # 20000x64, 2 repetitions

Writes `benchmarks/results/knn_speed.json` (one entry per size; an existing file's
other sizes are kept); rendered by `benchmarks/_render_knn.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LIBRARIES = ("ours_features", "ours_model", "pytorch_ood")


# ------------------------------------------------------------------ the data


def write_data(directory, n, f, q, seed=0, rows=65536):
    """Gaussian features `(n, f)` and queries `(q, f)` as float32 `.npy` files."""
    rng = np.random.default_rng(seed)
    bank = np.lib.format.open_memmap(
        os.path.join(directory, "bank.npy"), mode="w+", dtype=np.float32, shape=(n, f)
    )
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        bank[start:stop] = rng.standard_normal((stop - start, f), dtype=np.float32)
    bank.flush()
    del bank
    np.save(os.path.join(directory, "queries.npy"), rng.standard_normal((q, f), np.float32))


# --------------------------------------------------------- one measurement


def measure(library, directory, k):
    """Fits and scores once in this process; returns `(wall_s, cpu_s, scores)`."""
    bank = np.load(os.path.join(directory, "bank.npy"), mmap_mode="r")
    queries = np.load(os.path.join(directory, "queries.npy"))
    if library == "pytorch_ood":
        # pytorch-ood imports torchvision for its model registry only: the tests'
        # stand-in modules let its KNN run on torch alone.
        sys.path.insert(0, os.path.join(ROOT, "tests"))
        from _pytorch_ood_ref import install_torchvision_stand_in  # noqa: PLC0415

        install_torchvision_stand_in()
        import warnings  # noqa: PLC0415

        import torch  # noqa: PLC0415
        from pytorch_ood.detector import KNN  # noqa: PLC0415

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Read-only memory map: torch warns.
            z = torch.from_numpy(bank)
        labels = torch.zeros(len(bank), dtype=torch.long)
        q = torch.from_numpy(queries)
        # Warm-up (runtime and thread pools start), as for ours: 100 rows, k = 5.
        KNN(None, k=5).fit_features(z[:100].clone(), labels[:100]).predict_features(q[:10])
        wall, cpu = time.perf_counter(), time.process_time()
        scores = -KNN(None, k=k).fit_features(z, labels).predict_features(q).numpy()
        return time.perf_counter() - wall, time.process_time() - cpu, scores
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    sys.path.insert(0, ROOT)
    import keras  # noqa: PLC0415

    from keras_isomax import IsoMaxPlusLayer, detectors  # noqa: PLC0415

    # Warm-up (the backend's runtime starts at its first op), as for pytorch-ood.
    detectors.KNN(k=5).fit_features(bank[:100], verbose=0).score_features(queries[:10], verbose=0)
    if library == "ours_features":
        wall, cpu = time.perf_counter(), time.process_time()
        det = detectors.KNN(k=k).fit_features(bank, verbose=0)
        scores = det.score_features(queries, verbose=0)
    else:
        model = keras.Sequential([keras.Input((bank.shape[1],)), IsoMaxPlusLayer(10)])
        wall, cpu = time.perf_counter(), time.process_time()
        det = detectors.KNN(k=k).fit(model, bank, verbose=0)
        scores = det.score(queries, model, verbose=0)
    return time.perf_counter() - wall, time.process_time() - cpu, scores


def _worker(args):
    wall, cpu, scores = measure(args.worker, args.data, args.k)
    np.save(args.scores, np.asarray(scores, np.float64))
    print(json.dumps({"wall_s": wall, "cpu_s": cpu}))


def run_one(library, directory, k, timeout):
    """One measurement in a fresh process: `({"wall_s", "cpu_s"}, scores)` or an error."""
    scores_path = os.path.join(directory, f"scores_{library}.npy")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", library, "--data", directory]
    cmd += ["--k", str(k), "--scores", scores_path]
    load = os.getloadavg()[0]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout} s", "load_before": load}, None
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:], "load_before": load}, None
    timing = json.loads(proc.stdout.strip().splitlines()[-1])
    timing["load_before"] = load
    return timing, np.load(scores_path)


# ---------------------------------------------------------------- the run


def run_size(n, f, q, k, reps, timeout):
    with tempfile.TemporaryDirectory(prefix="knn-speed-", dir=os.environ.get("KNN_SPEED_TMP")) as d:
        start = time.perf_counter()
        write_data(d, n, f, q)
        print(f"{n}x{f}: data written in {time.perf_counter() - start:.1f} s", flush=True)
        times = {lib: [] for lib in LIBRARIES}
        scores = {}
        for rep in range(reps):
            for lib in LIBRARIES:
                timing, got = run_one(lib, d, k, timeout)
                times[lib].append(timing)
                if got is not None:
                    scores[lib] = got
                shown = timing.get("error", "")[:200] or (
                    f"wall {timing['wall_s']:.2f} s, cpu {timing['cpu_s']:.2f} s"
                )
                print(f"  rep {rep} {lib}: {shown} (load {timing['load_before']:.1f})", flush=True)
    diffs = {}
    ref = scores.get("pytorch_ood")
    for lib in ("ours_features", "ours_model"):
        if lib in scores and ref is not None:
            diffs[f"{lib}_vs_pytorch_ood"] = float(np.max(np.abs(scores[lib] - ref)))
    if "ours_features" in scores and "ours_model" in scores:
        diffs["ours_features_vs_ours_model"] = float(
            np.max(np.abs(scores["ours_features"] - scores["ours_model"]))
        )
    return {
        "bank_rows": n,
        "feature_dim": f,
        "queries": q,
        "k": k,
        "dtype": "float32",
        "times": times,
        "max_abs_score_diff": diffs,
        "score_range": [float(ref.min()), float(ref.max())] if ref is not None else None,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100000x256", help="NxF[,NxF...]")
    parser.add_argument("--queries", type=int, default=5000)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=1800, help="per measurement, s")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--worker", choices=LIBRARIES, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--scores", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _worker(args)
    if args.quick:
        args.sizes, args.reps, args.queries = "20000x64", 2, 1000
    sys.path.insert(0, HERE)
    from _results import RESULTS_DIR, git_commit, machine_info, write_result  # noqa: PLC0415

    results = {}
    path = RESULTS_DIR / "knn_speed.json"
    if path.exists() and not args.quick:
        results = json.loads(path.read_text()).get("sizes", {})
    for size in args.sizes.split(","):
        n, f = (int(v) for v in size.lower().split("x"))
        entry = run_size(n, f, args.queries, args.k, args.reps, args.timeout)
        # Sizes may be run separately (the largest alone): each records its own command.
        entry["command"] = " ".join(["python", "benchmarks/knn_speed.py", *sys.argv[1:]])
        entry["date"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        entry["commit"] = git_commit()
        results[f"{n}x{f}"] = entry
    if args.no_write or args.quick:
        print(json.dumps(results, indent=1))
        return None
    # The measurements ran in child processes with TensorFlow's default oneDNN setting.
    code = (
        f"import sys; sys.path.insert(0, {HERE!r}); import tensorflow; "
        "from _results import onednn_setting; print(onednn_setting())"
    )
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    probe = (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        .stdout.strip()
        .splitlines()
    )
    machine = machine_info(onednn=probe[-1] if probe else None)
    print(write_result("knn_speed", {"sizes": results}, machine=machine))
    return None


if __name__ == "__main__":
    main()

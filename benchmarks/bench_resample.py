"""Wall time of raydir SMOTER / SMOGN against the PyPI peers `smogn` and `imbreg`.

Data: X ~ N(0, 1) of shape (n, 10), y ~ lognormal(0, 1), seed 0; every library gets the same
arrays, its default box-plot relevance, threshold 0.5, k=5, "balance". Each measurement runs
in a fresh subprocess (so one library's imports, caches or memory do not help another) and
times the resampling call alone. raydir reports the median of ``--repeats`` calls; a peer runs
once. `smogn` runs on 5,000 rows only (pure-Python O(n^2): minutes), with a numpy >= 2 shim.

    python benchmarks/bench_resample.py [--sizes 5000 100000] [--peer-timeout 600]

Prints a table and writes benchmarks/results/resample_<timestamp>.json (gitignored).
Targets (issue 6, 2 cores): < 0.5 s at 5,000 rows and < 20 s at 100,000 rows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.peers import smogn_with_numpy2_shim

TARGET_S = {5000: 0.5, 100000: 20.0}
RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent


def _data(n: int):
    import numpy as np

    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 10)), rng.lognormal(0.0, 1.0, n)


def _frame(X, y):
    import pandas as pd

    df = pd.DataFrame(X, columns=[f"f{i}" for i in range(X.shape[1])])
    df["y"] = y
    return df


def worker(lib: str, method: str, n: int, repeats: int) -> dict:
    """Runs in the subprocess: returns {"seconds": ..., "rows_out": ...}."""
    X, y = _data(n)
    if lib == "raydir":
        sys.path.insert(0, str(ROOT))
        from raydir.resample import SMOGN, SMOTER

        cls = SMOTER if method == "smoter" else SMOGN
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            _, y_out = cls(random_state=0).fit_resample(X, y)
            times.append(time.perf_counter() - t0)
        times.sort()
        return {"seconds": times[len(times) // 2], "all_seconds": times, "rows_out": int(y_out.size)}
    df = _frame(X, y)
    if lib == "imbreg":
        import imbreg

        t0 = time.perf_counter()
        out = imbreg.smogn_regress(df, target_col="y", k=5, pert=0.02, thr_rel=0.5,
                                   c_perc="balance", seed=0)
        return {"seconds": time.perf_counter() - t0, "rows_out": int(len(out)),
                "version": imbreg.__version__}
    if lib == "smogn":
        import contextlib
        import io

        import numpy as np

        smogn = smogn_with_numpy2_shim()
        np.random.seed(0)  # smogn draws from the global RNGs only
        import random

        random.seed(0)
        with contextlib.redirect_stderr(io.StringIO()):  # its tqdm bars
            t0 = time.perf_counter()
            out = smogn.smoter(data=df, y="y", k=5, pert=0.02, samp_method="balance",
                               rel_thres=0.5)
            seconds = time.perf_counter() - t0
        return {"seconds": seconds, "rows_out": int(len(out))}
    raise ValueError(lib)


def _run(lib: str, method: str, n: int, repeats: int, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--worker", lib, method, str(n), str(repeats)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": f"timeout > {timeout:.0f} s"}
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        status = "not installed" if "ModuleNotFoundError" in last else f"error: {last[:80]}"
        return {"status": status}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["status"] = "ok"
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 100000])
    parser.add_argument("--repeats", type=int, default=3, help="raydir calls per cell (median)")
    parser.add_argument("--peer-timeout", type=float, default=600.0, help="seconds per peer run")
    parser.add_argument("--skip-smogn", action="store_true", help="skip the slow PyPI smogn")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        lib, method, n, repeats = args.worker
        print(json.dumps(worker(lib, method, int(n), int(repeats))))
        return

    cells = []
    for n in args.sizes:
        cells += [("raydir", "smoter", n), ("raydir", "smogn", n), ("imbreg", "smogn", n)]
        if n <= 5000 and not args.skip_smogn:
            cells.append(("smogn", "smogn", n))
    rows = []
    for lib, method, n in cells:
        reps = args.repeats if lib == "raydir" else 1
        result = _run(lib, method, n, reps, args.peer_timeout)
        result.update(library=lib, method=method, n=n, features=10)
        if result["status"] == "ok" and lib == "raydir":
            result["target_s"] = TARGET_S.get(n)
            result["meets_target"] = result["target_s"] is None or result["seconds"] < result["target_s"]
        rows.append(result)
        shown = f"{result['seconds']:.3f}" if result["status"] == "ok" else result["status"]
        print(f"  {lib:>7} {method:>6} n={n:>7,}: {shown}", file=sys.stderr, flush=True)

    print(f"\nResampling wall time, X (n, 10) normal, y lognormal, 'balance', k=5 "
          f"({os.cpu_count()} cores, {platform.python_version()})")
    header = f"{'n':>8}  {'library':<8} {'method':<7} {'seconds':>9}  {'rows out':>9}  target"
    print(header)
    print("-" * len(header))
    for r in rows:
        sec = f"{r['seconds']:9.3f}" if r["status"] == "ok" else f"{r['status']:>9}"
        out = f"{r.get('rows_out', ''):>9}"
        target = ""
        if "meets_target" in r:
            target = f"< {r['target_s']:g} s: {'yes' if r['meets_target'] else 'NO'}"
        print(f"{r['n']:>8,}  {r['library']:<8} {r['method']:<7} {sec}  {out}  {target}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"resample_{time.strftime('%Y%m%d-%H%M%S')}.json"
    meta = {"cpu_count": os.cpu_count(), "python": platform.python_version(),
            "machine": platform.machine(), "sizes": args.sizes, "repeats": args.repeats}
    path.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    print(f"\nwrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()

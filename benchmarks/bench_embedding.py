"""Sentence embedding: Ray Data actor pool vs one process calling the encoder directly.

Both sides embed the same N STS-B-DIR sentence pairs (the first N rows of train_new.tsv,
2N sentences) with all-MiniLM-L6-v2 into [u, v, |u-v|, u*v] pair features:

- direct: ``raydir.data.stsb.embed_pairs`` in this process (model loaded beforehand, not
  timed; its load time is reported separately);
- pool: ``raydir.data.stsb.embed_dataset`` (``map_batches`` with an actor pool) then
  ``materialize()``, timed end to end: actor start-up and one model load per actor included,
  as a user running ``raydir prepare`` pays them. Each pool layout gives the pool the same
  total CPUs (actors x CPUs per actor = the machine's CPUs).

Writes one JSON file to benchmarks/results/ and prints it.

    PYTHONPATH=. python benchmarks/bench_embedding.py --n 2000 --data ../shared/data/sts-b-dir

(PYTHONPATH, or an installed raydir, lets the Ray actors import raydir.)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="sentence pairs to embed (2n sentences)")
    ap.add_argument("--batch-size", type=int, default=64, help="sentences per encoder batch")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sts-b-dir"),
                    help="directory with the STS-B-DIR TSVs")
    ap.add_argument("--actors", default="", help="comma-separated actor counts (default: 1 and all CPUs)")
    ap.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "embedding.json"))
    args = ap.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ray
    import torch

    from raydir.data import stsb

    cpus = os.cpu_count() or 1
    table = stsb.read_tables(args.data)["train"]
    if args.n > table.num_rows:
        raise SystemExit(f"--n {args.n} exceeds the {table.num_rows} training pairs")
    table = table.slice(0, args.n)
    s1, s2 = table.column("sentence1").to_pylist(), table.column("sentence2").to_pylist()

    # [1] direct: one process, the encoder called on the sentences
    t0 = time.perf_counter()
    model = stsb.load_sentence_encoder()
    load_s = time.perf_counter() - t0
    stsb.embed_pairs(s1[:8], s2[:8], args.batch_size, model=model)  # warm-up
    t0 = time.perf_counter()
    direct = stsb.embed_pairs(s1, s2, args.batch_size, model=model)
    direct_s = time.perf_counter() - t0
    result = {
        "benchmark": "sentence embedding (all-MiniLM-L6-v2 pair features)",
        "pairs": args.n, "sentences": 2 * args.n, "batch_size": args.batch_size,
        "machine": {"cpus": cpus, "loadavg_1m_at_start": round(os.getloadavg()[0], 2), "platform": platform.platform(), "torch": torch.__version__,
                    "ray": ray.__version__, "device": str(model.device),
                    "torch_threads_direct": torch.get_num_threads()},
        "model_load_s": round(load_s, 3),
        "direct": {"seconds": round(direct_s, 3), "pairs_per_s": round(args.n / direct_s, 1),
                   "sentences_per_s": round(2 * args.n / direct_s, 1)},
        "pool": [],
    }

    # [2] Ray Data actor pool on the same pairs
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    layouts = [int(a) for a in args.actors.split(",")] if args.actors else sorted({1, cpus})
    blocks = max(8, 4 * max(layouts))
    step = -(-args.n // blocks)
    for actors in layouts:
        per_actor = max(1.0, cpus / actors)
        ds = ray.data.from_arrow([table.slice(i, step) for i in range(0, args.n, step)])
        t0 = time.perf_counter()
        out = stsb.embed_dataset(ds, batch_size=args.batch_size, num_actors=actors,
                                 actor_cpus=per_actor).materialize()
        pool_s = time.perf_counter() - t0
        pooled = out.take_batch(args.n, batch_format="numpy")
        order = np.lexsort((pooled["target"],))  # sanity check on content, order-free
        ref = np.lexsort((table.column("target").to_numpy(),))
        max_diff = float(np.abs(np.sort(pooled["features"][order].sum(1)) -
                                np.sort(direct[ref].sum(1))).max())
        result["pool"].append({
            "actors": actors, "cpus_per_actor": per_actor, "seconds": round(pool_s, 3),
            "pairs_per_s": round(args.n / pool_s, 1), "sentences_per_s": round(2 * args.n / pool_s, 1),
            "pool_over_direct": round(direct_s / pool_s, 3),
            "rows": int(len(pooled["target"])), "max_abs_diff_rowsum": max_diff,
        })
    ray.shutdown()
    # Other work on the machine skews both sides (multi-threaded torch most): record it.
    result["machine"]["loadavg_1m_at_end"] = round(os.getloadavg()[0], 2)

    out_path = Path(args.output)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

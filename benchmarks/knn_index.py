"""Approximate kNN graph on the CPU: the inverted-cell index against faiss IVF, in one run.

For each --n, the synthetic long-tailed embeddings of benchmarks/propagation.py (d = 256, 60
classes, 16-dimensional latent classes plus isotropic noise) and k = --k neighbours:

- **cells**: ``build_knn`` as a round calls it (``GraphConfig`` defaults: "ivf-pca",
  ``speler.graph.cells.CellIndex``, probes chosen for ``target_recall``);
- **faiss IVF-PCA** (the baseline, the index ``build_knn`` used before the cell index): faiss
  ``IndexIVFFlat`` over the same number of k-means cells on the same 64-dimensional projection,
  ``IndexRefineFlat`` re-ranking 4 (k + 1) candidates exactly, at --faiss-nprobe cells per query
  (32 was the default).

Both graphs' recall@k is measured the same way (``knn._recall``: exact search of
``recall_queries`` seeded queries, ties at the k-th similarity count as found). Times are wall
times of index building and search; the recall check is timed apart. Thread count: torch and
faiss both get --threads (default 1; see the load average printed). Writes
benchmarks/results/knn_index.json (one entry per n).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/knn_index.py --n 200000 1000000
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from propagation import PeakRSS, merge_results, synthetic  # noqa: E402

from speler.config import GraphConfig  # noqa: E402
from speler.graph import knn  # noqa: E402


def faiss_ivf_pca(x: np.ndarray, k: int, nprobe: int, config: GraphConfig):
    """The faiss index build_knn used before: (sims, ids) of every row's k + 1 best, with the
    query itself, and the seconds to build and search."""
    import faiss

    t0 = time.perf_counter()
    n, d = x.shape
    nlist = knn._ivf_cells(n)
    rng = np.random.default_rng(config.seed)
    ntrain = int(min(n, max(40 * nlist, 20_000)))
    train = x[np.sort(rng.choice(n, size=ntrain, replace=False))]
    dr = int(min(config.pca_dim, d))
    _, vecs = np.linalg.eigh(train.T.astype(np.float64) @ train.astype(np.float64))
    proj = faiss.LinearTransform(d, dr, False)
    faiss.copy_array_to_vector(
        np.ascontiguousarray(vecs[:, ::-1][:, :dr].T, dtype=np.float32).ravel(), proj.A)
    proj.is_trained = True
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(dr), dr, nlist, faiss.METRIC_INNER_PRODUCT)
    base = faiss.IndexPreTransform(proj, ivf)
    ivf.cp.seed = int(config.seed)
    base.train(train)
    ivf.nprobe = int(min(nlist, nprobe))
    index = faiss.IndexRefineFlat(base)
    index.k_factor = 4.0
    index.add(x)
    sims, ids = knn._search_all(index.search, x, k + 1, None)
    return sims, ids, time.perf_counter() - t0


def run(n: int, args) -> dict:
    x, _, _ = synthetic(n, seed=args.seed)
    config = GraphConfig(k=args.k, use_gpu=False)
    out = {"n": n, "d": int(x.shape[1]), "k": args.k}
    with PeakRSS() as mem:
        g = knn.build_knn(x, config=config)
    out["cells"] = {"method": g.method, "seconds": g.seconds, "recall": g.recall,
                    "recall_seconds": g.recall_seconds, "peak_rss_gb": mem.peak / 1e9}
    print(f"n={n}: cells {g.method} {g.seconds:.1f} s, recall {g.recall:.4f}", flush=True)
    if args.faiss_nprobe:
        xn = knn._validated(x)
        knn._normalize_rows(xn)
        with PeakRSS() as mem:
            sims, ids, sec = faiss_ivf_pca(xn, args.k, args.faiss_nprobe, config)
        ids, sims = knn._drop_self(ids, sims, args.k)
        t0 = time.perf_counter()
        rec = knn._recall(xn, ids, sims, args.k, config)
        out["faiss"] = {"nprobe": args.faiss_nprobe, "seconds": sec, "recall": rec,
                        "recall_seconds": time.perf_counter() - t0, "peak_rss_gb": mem.peak / 1e9}
        print(f"n={n}: faiss ivf-pca nprobe {args.faiss_nprobe} {sec:.1f} s, recall {rec:.4f}",
              flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[200_000])
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--faiss-nprobe", type=int, default=32, help="0 skips the baseline")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "knn_index.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import faiss
    import torch

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    load = os.getloadavg()[0]
    print(f"load average {load:.2f}, {os.cpu_count()} CPUs, {args.threads} thread(s)")
    results = [dict(run(n, args), load_average_before=load) for n in args.n]
    print(f"\n| n | index | build + search (s) | recall@{args.k} | recall check (s) "
          "| peak RSS (GB) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        for key in ("faiss", "cells"):
            if key in r:
                f = r[key]
                name = f"faiss IVF-PCA, nprobe {f['nprobe']}" if key == "faiss" else f["method"]
                print(f"| {r['n']:,} | {name} | {f['seconds']:.1f} | {f['recall']:.4f} | "
                      f"{f['recall_seconds']:.1f} | {f['peak_rss_gb']:.2f} |")
        if "faiss" in r:
            ratio = r["faiss"]["seconds"] / r["cells"]["seconds"]
            print(f"| {r['n']:,} | speed-up | {ratio:.2f}× "
                  f"| {r['cells']['recall'] - r['faiss']['recall']:+.4f} | | |")
    merge_results(Path(args.out), results)
    return 0 if all(math.isfinite(r["cells"]["recall"]) for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())

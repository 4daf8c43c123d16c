"""Propagation engine at scale: kNN graph, balanced propagation, warm start, baselines.

Synthetic long-tailed embeddings: C classes (default 60) with sizes ∝ π^-(c-1)/(C-1) (π = 60),
Gaussian classes in a 16-dimensional latent space (class means N(0, s² I), unit spread inside a
class, so neighbouring classes overlap), embedded in d = 256 dimensions by a random orthonormal
map plus isotropic noise, samples in random order, 5 % of each class labeled (at least one).

For each --n: kNN graph (GraphConfig defaults, --k) with time and recall@k (measured on a sample of
queries for approximate indexes), affinity, propagation without and with the spectral balance (time,
iterations, peak RSS during the call), re-propagation after one new label with a warm start
(balance kept, and re-balanced), the memory-bandwidth bound of one CG iteration (bytes moved /
measured copy bandwidth, once streaming and once re-reading a row of the block for every
non-zero), and in the same run the baselines:
scikit-learn LabelSpreading(kernel="knn", n_neighbors=10) up to --ls-max, the paper's dense inverse
up to --dense-max. Quality: macro-F1, accuracy, tail recall (last third of the classes) and the
share of samples predicted in the tail. Prints a table and merges the figures into
benchmarks/results/propagation.json (one entry per n).

    .venv/bin/python benchmarks/propagation.py --n 10000 100000
    .venv/bin/python benchmarks/propagation.py --n 1000000 --ls-max 0
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from speler.config import GraphConfig, PropagationConfig  # noqa: E402
from speler.graph.knn import affinity, build_knn  # noqa: E402
from speler.graph.propagate import normalized_operator, propagate  # noqa: E402


def synthetic(n: int, *, classes: int = 60, imbalance: float = 60.0, dim: int = 256,
              labeled: float = 0.05, latent: int = 16, separation: float = 1.2,
              noise: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x float32 (n, dim), y int64 (n,), labels int64 (n,) with -1 for unlabeled)."""
    rng = np.random.default_rng(seed)
    frac = imbalance ** (-np.arange(classes) / (classes - 1))
    sizes = np.maximum(2, np.floor(n * frac / frac.sum())).astype(np.int64)
    sizes[0] += n - sizes.sum()
    y = rng.permutation(np.repeat(np.arange(classes, dtype=np.int64), sizes))
    mu = rng.standard_normal((classes, latent)) * separation
    q, _ = np.linalg.qr(rng.standard_normal((dim, latent)))
    q = q.T.astype(np.float32)
    x = np.empty((n, dim), dtype=np.float32)
    for lo in range(0, n, 100_000):
        hi = min(n, lo + 100_000)
        z = (mu[y[lo:hi]] + rng.standard_normal((hi - lo, latent))).astype(np.float32)
        x[lo:hi] = z @ q + rng.standard_normal((hi - lo, dim)).astype(np.float32) * np.float32(noise)
    labels = np.full(n, -1, dtype=np.int64)
    for c in range(classes):
        idx = np.flatnonzero(y == c)
        m = max(1, int(round(labeled * len(idx))))
        labels[rng.choice(idx, m, replace=False)] = c
    return x, y, labels


class PeakRSS:
    """Peak resident set size (bytes) of this process while the block runs (sampled every 5 ms)."""

    def __enter__(self):
        self.peak = self.start = _rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss())


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def quality(pred: np.ndarray, y: np.ndarray, labels: np.ndarray, tail: np.ndarray) -> dict:
    from sklearn.metrics import f1_score

    u = labels < 0
    yt, yp = y[u], pred[u]
    in_tail = np.isin(yt, tail)
    return {
        "macro_f1": float(f1_score(yt, yp, labels=np.unique(yt), average="macro", zero_division=0)),
        "accuracy": float((yt == yp).mean()),
        "tail_recall": float((yp[in_tail] == yt[in_tail]).mean()) if in_tail.any() else float("nan"),
        "share_pred_tail": float(np.isin(yp, tail).mean()),
        "share_true_tail": float(in_tail.mean()),
    }


def copy_bandwidth() -> float:
    """Bytes per second of a large numpy copy (read + write), best of 5."""
    a = np.ones(64 * 2 ** 20 // 4 * 4, dtype=np.float32)  # 256 MiB
    b = np.empty_like(a)
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        np.copyto(b, a)
        best = max(best, 2 * a.nbytes / (time.perf_counter() - t))
    return best


def cg_bytes(n: int, nnz: int, m: int) -> dict:
    """Bytes moved by one CG iteration of speler.graph.propagate._block_cg on m columns.

    The sparse product reads the CSR arrays (int64 row pointers and columns, float32 values) and
    either each row of the block once (streaming) or once per non-zero (re-read, no cache reuse),
    and writes the product; the fused vector updates make 19 passes over n × m float32."""
    csr = (n + 1) * 8 + nnz * (8 + 4)
    block = n * m * 4
    return {"streaming": csr + 2 * block + 19 * block,
            "reread": csr + nnz * m * 4 + block + 19 * block}


def label_spreading(x: np.ndarray, labels: np.ndarray) -> np.ndarray:
    from sklearn.semi_supervised import LabelSpreading

    xn = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LabelSpreading(kernel="knn", n_neighbors=10).fit(xn, labels).transduction_


def dense_inverse(W, labels: np.ndarray, C: int, alpha: float) -> np.ndarray:
    """The paper's code path: M = (I - αS)^-1 Y with a dense n × n inverse."""
    import torch

    S = torch.from_numpy(normalized_operator(W).toarray())
    A = torch.eye(S.shape[0]) - alpha * S
    del S
    Y = torch.zeros((len(labels), C))
    lab = labels >= 0
    Y[torch.from_numpy(np.flatnonzero(lab)), torch.from_numpy(labels[lab])] = 1.0
    M = torch.linalg.inv(A) @ Y
    return M.numpy()


def run(n: int, args, gcfg: GraphConfig, pcfg: PropagationConfig, bandwidth: float) -> dict:
    C = args.classes
    out: dict = {"n": n, "k": gcfg.k, "classes": C, "imbalance": args.imbalance, "dim": args.dim}
    t = time.perf_counter()
    x, y, labels = synthetic(n, classes=C, imbalance=args.imbalance, dim=args.dim,
                             labeled=args.labeled, separation=args.separation, seed=args.seed)
    out["generate_s"] = time.perf_counter() - t
    tail = np.arange(C - C // 3, C)
    out["labeled"] = int((labels >= 0).sum())

    with PeakRSS() as mem:
        g = build_knn(x, config=gcfg)
    out["knn"] = {"method": g.method, "seconds": g.seconds, "recall": g.recall,
                  "recall_seconds": g.recall_seconds, "peak_rss_gb": mem.peak / 1e9}
    t = time.perf_counter()
    W = affinity(g, gamma=gcfg.gamma)
    out["affinity_s"] = time.perf_counter() - t
    out["nnz"] = int(W.nnz)
    del g
    print(f"  n={n}: kNN {out['knn']['method']} {out['knn']['seconds']:.1f} s, recall "
          f"{out['knn']['recall']}, affinity {out['affinity_s']:.1f} s, nnz {W.nnz}", flush=True)

    res = {}
    for name, cfg in (("plain", replace(pcfg, balance=False)), ("balanced", pcfg)):
        with PeakRSS() as mem:
            r = propagate(W, labels, num_classes=C, config=cfg)
        res[name] = r
        s = r.solve
        per_iter = s.solve_seconds / max(1, s.iterations)
        out[name] = {"seconds": s.seconds, "solve_seconds": s.solve_seconds,
                     "iterations": s.iterations,
                     "first_pass_iterations": s.first_pass_iterations, "products": s.products,
                     "converged": s.converged, "peak_rss_gb": mem.peak / 1e9,
                     "rss_increase_gb": (mem.peak - mem.start) / 1e9,
                     "seconds_per_iteration": per_iter,
                     "reliable_share": float(r.reliable[labels < 0].mean()),
                     "reliable_precision": float((r.labels[r.reliable] == y[r.reliable]).mean())
                     if r.reliable.any() else float("nan"),
                     **quality(r.labels, y, labels, tail)}
        print(f"  {name}: {s.seconds:.1f} s, {s.iterations}+{s.first_pass_iterations} it, "
              f"macro-F1 {out[name]['macro_f1']:.3f}", flush=True)

    # one iteration's memory-bandwidth bound, against the time per iteration of the plain solve
    # (the solve alone: reordering plus CG loop, no validation, first pass or energy)
    b = cg_bytes(n, W.nnz, C)
    it_s = out["plain"]["seconds_per_iteration"]
    out["bandwidth"] = {"copy_gb_s": bandwidth / 1e9,
                        "bytes_streaming": b["streaming"], "bytes_reread": b["reread"],
                        "bound_streaming_s": b["streaming"] / bandwidth,
                        "bound_reread_s": b["reread"] / bandwidth,
                        "measured_iteration_s": it_s,
                        "ratio_to_streaming": it_s / (b["streaming"] / bandwidth),
                        "ratio_to_reread": it_s / (b["reread"] / bandwidth)}

    # instant feedback: one more human label, warm start from the previous result (its balance
    # weights and prior kept); "rebalanced" makes the balance again from the previous scores (what
    # speler.loop.update_state does once new labels move a class's share past
    # propagation.rebalance_tolerance); "cold" solves the kept system from zero, "full" reruns
    # everything
    bal = res["balanced"]
    rng = np.random.default_rng(args.seed + 1)
    node = int(rng.choice(np.flatnonzero(labels < 0)))
    new = labels.copy()
    new[node] = y[node]
    with PeakRSS() as mem:
        warm = propagate(W, new, num_classes=C, config=pcfg, warm_start=bal)
    rebalanced = propagate(W, new, num_classes=C, config=pcfg, warm_start=bal.scores)
    cold = propagate(W, new, num_classes=C, config=pcfg,
                     warm_start=replace(bal, scores=np.zeros_like(bal.scores)))
    full = propagate(W, new, num_classes=C, config=pcfg)
    ws, cs = warm.solve, cold.solve
    out["warm_start"] = {"seconds": ws.seconds, "iterations": ws.iterations,
                         "products": ws.products, "rebalanced_seconds": rebalanced.solve.seconds,
                         "rebalanced_products": rebalanced.solve.products,
                         "cold_seconds": cs.seconds,
                         "cold_iterations": cs.iterations, "cold_products": cs.products,
                         "full_seconds": full.solve.seconds,
                         "max_rel_diff": float(np.abs(warm.scores - cold.scores).max()
                                               / np.abs(cold.scores).max()),
                         "labels_changed_vs_full": int((warm.labels != full.labels).sum()),
                         "peak_rss_gb": mem.peak / 1e9}
    print(f"  warm start after one label: {ws.seconds:.2f} s ({ws.products} products) vs "
          f"re-balanced {rebalanced.solve.seconds:.2f} s ({rebalanced.solve.products}), "
          f"cold {cs.seconds:.2f} s ({cs.products}), full {full.solve.seconds:.2f} s", flush=True)
    del warm, rebalanced, cold, full, res, ws, cs

    if n <= args.ls_max:
        t = time.perf_counter()
        with PeakRSS() as mem:
            pred = label_spreading(x, labels)
        out["label_spreading"] = {"seconds": time.perf_counter() - t,
                                  "peak_rss_gb": mem.peak / 1e9,
                                  **quality(pred, y, labels, tail)}
        print(f"  LabelSpreading: {out['label_spreading']['seconds']:.1f} s, macro-F1 "
              f"{out['label_spreading']['macro_f1']:.3f}", flush=True)
    if n <= args.dense_max:
        t = time.perf_counter()
        with PeakRSS() as mem:
            M = dense_inverse(W, labels, C, 0.99)
        pred = np.where(labels >= 0, labels, M.argmax(1))
        out["dense_inverse"] = {"seconds": time.perf_counter() - t, "alpha": 0.99,
                                "peak_rss_gb": mem.peak / 1e9, **quality(pred, y, labels, tail)}
        del M
        print(f"  dense inverse: {out['dense_inverse']['seconds']:.1f} s", flush=True)
    end_to_end = out["knn"]["seconds"] + out["affinity_s"] + out["balanced"]["seconds"]
    out["end_to_end_s"] = end_to_end
    if "label_spreading" in out:
        out["speedup_vs_label_spreading"] = out["label_spreading"]["seconds"] / end_to_end
    return out


def print_table(results: list[dict]) -> None:
    print(f"\n{'n':>9s} {'kNN':>8s} {'s':>7s} {'recall':>7s} | {'prop s':>7s} {'it':>6s} {'RSS GB':>7s}"
          f" | {'warm/rebal s':>12s} | {'it/bound':>9s} | {'F1 plain':>8s} {'F1 bal':>7s} {'F1 LS':>7s} "
          f"{'F1 dense':>8s} | {'tailR p/b/LS':>15s} | {'LS s':>7s}")
    for r in results:
        ls = r.get("label_spreading", {})
        de = r.get("dense_inverse", {})
        rec = r["knn"]["recall"]
        print(f"{r['n']:9d} {r['knn']['method']:>8s} {r['knn']['seconds']:7.1f} "
              f"{'exact' if rec is None else f'{rec:.3f}':>7s} | {r['balanced']['seconds']:7.1f} "
              f"{r['balanced']['iterations']:>3d}+{r['balanced']['first_pass_iterations']:<2d} "
              f"{r['balanced']['peak_rss_gb']:7.2f} | {r['warm_start']['seconds']:5.2f}/"
              f"{r['warm_start'].get('rebalanced_seconds', float('nan')):<6.2f} | "
              f"{r['bandwidth']['ratio_to_streaming']:4.0f}/{r['bandwidth']['ratio_to_reread']:<4.1f} | "
              f"{r['plain']['macro_f1']:8.3f} {r['balanced']['macro_f1']:7.3f} "
              f"{ls.get('macro_f1', float('nan')):7.3f} {de.get('macro_f1', float('nan')):8.3f} | "
              f"{r['plain']['tail_recall']:.2f}/{r['balanced']['tail_recall']:.2f}/"
              f"{ls.get('tail_recall', float('nan')):.2f}    | {ls.get('seconds', float('nan')):7.1f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--classes", type=int, default=60)
    ap.add_argument("--imbalance", type=float, default=60.0)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--labeled", type=float, default=0.05)
    ap.add_argument("--separation", type=float, default=1.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--index", default="auto")
    ap.add_argument("--ls-max", type=int, default=200_000)
    ap.add_argument("--dense-max", type=int, default=10_000)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "propagation.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    gcfg = replace(GraphConfig(), k=args.k, index=args.index)
    pcfg = PropagationConfig()
    bw = copy_bandwidth()
    xw, _, lw = synthetic(2000, classes=args.classes, seed=99)  # warm up imports and kernels
    propagate(affinity(build_knn(xw, config=gcfg)), lw, num_classes=args.classes, config=pcfg)
    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    print(f"copy bandwidth {bw / 1e9:.1f} GB/s, load average {load[0]:.1f}, "
          f"{os.cpu_count()} CPUs; graph {gcfg}; propagation {pcfg}")
    results = []
    for n in args.n:
        r = run(n, args, gcfg, pcfg, bw)
        r["load_average_before"] = load[0]
        results.append(r)
        try:
            load = os.getloadavg()
        except OSError:
            pass
    print_table(results)
    merge_results(Path(args.out), results)
    return 0


def merge_results(out: Path, results: list[dict]) -> None:
    """Write each result into the JSON at ``out`` under its n, keeping the other n's entries."""
    out.parent.mkdir(parents=True, exist_ok=True)
    merged = json.loads(out.read_text()) if out.exists() else {}
    for r in results:
        merged[str(r["n"])] = r
    out.write_text(json.dumps(merged, indent=1, sort_keys=True, default=float))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    raise SystemExit(main())

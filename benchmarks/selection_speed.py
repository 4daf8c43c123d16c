"""How long one batch of suggestions takes at n = 100k, for every strategy, with ``random`` as the
baseline measured in the same run.

    python benchmarks/selection_speed.py [--n 100000] [--classes 60] [--dim 64] [--k 10]
        [--labeled 0.05] [--budgets 10 50] [--repeats 5] [--real-graph]

The inputs are synthetic, long-tailed (imbalance 60) gaussian clusters. By default the propagation
arrays are made directly from the cluster geometry (softmax of similarities to the class centres,
their margin, an energy on the propagation's scale: ≤ 0, -10 for the median sample) and the kNN
graph has random neighbours: the cost of a selection does not depend on how good these are (the
diversity walk only looks up neighbour lists). With ``--real-graph`` the graph is built by
``speler.graph.knn.build_knn`` and the propagation run by ``speler.graph.propagate.propagate``
(minutes on 2 CPU cores at 100k). Each figure is the median of ``--repeats`` timed calls after one
warm-up call. Prints a table and writes ``benchmarks/results/selection_speed.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from speler.config import GraphConfig, PropagationConfig, SelectionConfig  # noqa: E402
from speler.graph.knn import KnnGraph, affinity, build_knn  # noqa: E402
from speler.graph.propagate import PropagationResult, SolveInfo, propagate  # noqa: E402
from speler.selection import STRATEGIES, suggest  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "selection_speed.json"


def make_inputs(n: int, classes: int, dim: int, k: int, labeled: float, real_graph: bool, seed: int):
    rng = np.random.default_rng(seed)
    sizes = 60.0 ** (-np.arange(classes) / max(classes - 1, 1))
    y = rng.choice(classes, size=n, p=sizes / sizes.sum())
    centres = rng.normal(size=(classes, dim)).astype(np.float32)
    emb = (centres[y] + 0.9 * rng.normal(size=(n, dim))).astype(np.float32)
    is_labeled = rng.random(n) < labeled
    human = np.where(is_labeled, y, -1).astype(np.int64)
    t0 = time.perf_counter()
    if real_graph:
        graph = build_knn(emb, config=GraphConfig(k=k))
        res = propagate(affinity(graph), human, num_classes=classes, config=PropagationConfig())
    else:
        graph = KnnGraph(indices=rng.integers(0, n, size=(n, k)).astype(np.int64),
                         sims=rng.random((n, k), dtype=np.float32), method="random", recall=None,
                         seconds=0.0)
        unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
        cu = centres / np.linalg.norm(centres, axis=1, keepdims=True)
        logits = 8.0 * unit @ cu.T
        scores = np.exp(logits - logits.max(axis=1, keepdims=True))
        scores /= scores.sum(axis=1, keepdims=True)
        prior = np.maximum(np.bincount(y[is_labeled], minlength=classes), 1) / max(is_labeled.sum(), 1)
        srt = np.sort(scores, axis=1)
        u = 10.0 * (scores / prior) / np.median((scores / prior).max(axis=1))
        top = u.max(axis=1)
        ell = np.maximum(top + np.log(np.exp(u - top[:, None]).sum(axis=1)) - np.log(classes), 0.0)
        energy = -10.0 * ell / np.median(ell)  # <= 0, -10 = the median sample, as in propagate
        res = PropagationResult(
            scores=scores.astype(np.float32), labels=scores.argmax(axis=1).astype(np.int64),
            margin=(srt[:, -1] - srt[:, -2]).astype(np.float32), energy=energy.astype(np.float32),
            reliable=np.zeros(n, dtype=bool), weights=np.zeros(n, dtype=np.float32),
            thresholds=np.zeros(classes, dtype=np.float32), prior=prior.astype(np.float32),
            connected=np.ones(n, dtype=bool), labeled=is_labeled,
            solve=SolveInfo(iterations=0, converged=True, residual=0.0, seconds=0.0))
    setup = time.perf_counter() - t0
    logits = rng.normal(size=(n, classes)).astype(np.float32)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    args = dict(propagation=res, embeddings=emb, labeled=is_labeled, probs=probs, graph=graph,
                classes=tuple(f"c{c}" for c in range(classes)), ids=[f"s{i}" for i in range(n)],
                human_counts=np.bincount(y[is_labeled], minlength=classes))
    return args, setup


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--classes", type=int, default=60)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--labeled", type=float, default=0.05)
    ap.add_argument("--budgets", type=int, nargs="+", default=[10, 50])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--real-graph", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)

    args, setup = make_inputs(a.n, a.classes, a.dim, a.k, a.labeled, a.real_graph, a.seed)
    cfg = SelectionConfig()
    names = ["random"] + [s for s in STRATEGIES if s != "random"]
    rows = []
    for budget in a.budgets:
        base = None
        for name in names:
            suggest(name, budget=budget, seed=a.seed, config=cfg, **args)  # warm-up
            times = []
            for r in range(a.repeats):
                t0 = time.perf_counter()
                out = suggest(name, budget=budget, seed=a.seed + r, config=cfg, **args)
                times.append(time.perf_counter() - t0)
            med = float(np.median(times))
            base = med if name == "random" else base
            rows.append({"strategy": name, "budget": budget, "returned": len(out),
                         "median_s": med, "min_s": float(np.min(times)), "max_s": float(np.max(times)),
                         "x_random": med / base})

    print(f"selection speed: n={a.n} classes={a.classes} dim={a.dim} k={a.k} "
          f"labeled={a.labeled:.0%} graph={'real' if a.real_graph else 'random'} "
          f"(setup {setup:.1f} s), median of {a.repeats}")
    print(f"{'strategy':<10} {'budget':>6} {'median ms':>10} {'min ms':>8} {'max ms':>8} {'× random':>9}")
    for r in rows:
        print(f"{r['strategy']:<10} {r['budget']:>6} {1e3 * r['median_s']:>10.1f} "
              f"{1e3 * r['min_s']:>8.1f} {1e3 * r['max_s']:>8.1f} {r['x_random']:>9.1f}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({
        "n": a.n, "classes": a.classes, "dim": a.dim, "k": a.k, "labeled": a.labeled,
        "graph": "real" if a.real_graph else "random", "repeats": a.repeats, "setup_s": setup,
        "config": cfg.__dict__, "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "load_average": list(os.getloadavg()), "rows": rows,
    }, indent=2))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

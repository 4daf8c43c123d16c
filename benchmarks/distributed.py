"""1 vs 2 processes (torch.distributed, gloo, one thread each) for the sharded round stages.

Stages, each timed as the slowest rank between two barriers:
- embedding: ``embed_distributed.embed_sharded`` of a synthetic ntu25 skeleton set (--embed-n
  samples, --frames frames, a small model: --channels wide, --blocks blocks), gathered on every rank;
- kNN: ``knn_distributed.build_knn_sharded`` (k = --k, ``GraphConfig.index`` = --index) of the
  synthetic long-tailed embeddings of benchmarks/propagation.py (n = --n, d = --dim), rows sharded:
  exact (the shards travel the ring) or an approximate index per shard (the queries travel); its
  searches and recall check timed apart, its measured recall; bytes sent per ring block;
- affinity rows (``affinity_rows``: edges sent to the owner of their other end);
- propagation: ``propagate_distributed.propagate_scores`` (balance, first pass, final solve) with
  the halo exchange and with the all-gather of P; bytes this rank sent per CG iteration (halo rows
  + the two all-reduces of the column dots), rows of the halo.
--index auto (the default) is what a round does: exact up to ``GraphConfig.exact_max_n`` (50k)
samples, the approximate index (IVF on a PCA projection, "ivf-pca") beyond. The samples are first
put in the reverse Cuthill-McKee order of their graph (built with the same index; what
``propagate`` does from 20k samples), so that a rank's rows touch few rows of the other rank (the
halo). The single-process reference is ``build_knn`` with the same config and ``propagate`` on its
graph. Checks: the 1-process graph equals the reference up to the order of tied similarities (one
index over all rows is the reference's index); the 2-process similarities are the exact inner
products of their pairs. Exact index: the 2-process graph equals the 1-process one and the
reference; approximate: another graph (an index per shard), whose recall must be at least the
reference's minus RECALL_MARGIN (all three recalls printed). Propagation: scores to the
single-process ``propagate`` on the same graph (the 2-process one's own graph when approximate).

Run time here (a shared 2-core machine): --n 20000 --index ivf took 30 s in all (single-process
ivf-pca graph 3.3 s, of it 0.7 s recall check; sharded kNN 3.6 s on 1 process, 2.3 s on 2).
The issue's n = 200 000 (--index auto: ivf-pca) should take about 5 to 10 minutes: an estimate,
scaling the 20k run's parts (k-means training ~ cells × training rows, ×12 to ×25; searches
~ n^1.5, ×30; recall check ~ n, ×10) to about 70 s per single-process graph (three of them:
locality order, reference, 1 process) and a minute for the 2-process one, plus ten times the
20k propagation; not measured. The exact index at 200k (--index flat) is n² d = 10^13
multiply-adds per graph, about 15 min each here, four of them: about an hour. Timings on a machine
shared with other jobs are noisy: the 2-process run only gains when two cores are really free.
Results are merged into --results (default benchmarks/results/distributed.json; one entry per n,
"<n>-<index>" for an --index other than auto).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/distributed.py --n 200000
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/distributed.py --n 20000 --index ivf
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

RESULTS = ROOT / "benchmarks" / "results" / "distributed.json"


def _skeleton_set(n: int, frames: int, classes: int = 10, seed: int = 0):
    from speler.data.layouts import get_layout
    from speler.data.schema import SequenceSet

    rng = np.random.default_rng(seed)
    layout = get_layout("ntu25")
    v = layout.num_joints
    y = np.arange(n) % classes
    t = np.linspace(0, 2 * np.pi, frames, dtype=np.float32)
    wave = np.sin(t[None, None, :, None, None] * (1 + y[:, None, None, None, None]))
    x = (0.3 * wave + 0.05 * rng.normal(size=(n, 3, frames, v, 1))).astype(np.float32)
    return SequenceSet(x=x, ids=np.array([f"s{i:07d}" for i in range(n)]),
                       classes=tuple(f"c{c}" for c in range(classes)),
                       y=np.full(n, -1, dtype=np.int64), layout=layout, fps=30.0)


def _train_config(args):
    from speler.config import TrainConfig

    return TrainConfig(channels=args["channels"], blocks=args["blocks"],
                       freq_channels=args["channels"], embed_dim=64, num_threads=1, device="cpu")


def _graph_config(args):
    from speler.config import GraphConfig

    return GraphConfig(k=args["k"], index=args["index"], use_gpu=False)


def _model(args, ds):
    import torch

    from speler.models import build_model

    torch.manual_seed(0)
    return build_model(ds.layout, in_channels=3, num_classes=ds.num_classes, frames=ds.x.shape[2],
                       persons=1, config=_train_config(args))


# --- what each rank runs ---------------------------------------------------------------------------
def _rank_main(i: int, world: int, port: int, work: str, args: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(i),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(i), OMP_NUM_THREADS="1")
    import torch

    torch.set_num_threads(1)
    from speler import distributed as dist

    dist.init(backend="gloo", timeout_s=1800)
    try:
        _stages(Path(work), world, args)
    finally:
        dist.destroy()


def _timed(fn):
    from speler import distributed as dist

    dist.barrier()
    t = time.perf_counter()
    out = fn()
    mine = time.perf_counter() - t
    dist.barrier()
    return out, float(max(dist.all_gather_object(mine)))


def _stages(work: Path, world: int, args: dict) -> None:
    import torch

    from speler import distributed as dist
    from speler.config import PropagationConfig
    from speler.embed_distributed import embed_sharded
    from speler.graph import propagate_distributed as pdist
    from speler.graph.knn_distributed import build_knn_sharded

    me = dist.rank()
    out: dict = {"world": world}
    # embedding
    ds = _skeleton_set(args["embed_n"], args["frames"])
    model = _model(args, ds)
    model.load_state_dict(torch.load(work / "model.pt", weights_only=True))
    emb, out["embed_s"] = _timed(lambda: embed_sharded(model, ds, batch_size=args["batch"]))
    # kNN
    x = np.load(work / "x.npy", mmap_mode="r")
    labels = np.load(work / "labels.npy")
    lo, hi = dist.shard_range(len(x))
    part, out["knn_s"] = _timed(lambda: build_knn_sharded(np.asarray(x[lo:hi]),
                                                          config=_graph_config(args)))
    g = part.graph
    out.update(knn_method=g.method, knn_recall=g.recall, knn_recall_s=g.recall_seconds,
               knn_search_s=max(dist.all_gather_object(part.search_seconds)))
    out["knn_block_bytes"] = dist.all_gather_object(part.block_bytes)
    # affinity rows and propagation
    W_rows, out["affinity_s"] = _timed(lambda: pdist.affinity_rows(part))
    prop = {}
    for mode in ("halo", "allgather"):
        dist.traffic.reset()
        sc, secs = _timed(lambda: pdist.propagate_scores(
            W_rows, labels, lo=lo, num_classes=args["classes"], config=PropagationConfig(),
            exchange=mode))
        s = sc.solve
        per_rank = dist.all_gather_object({
            "bytes_per_iteration": s.bytes_per_iteration, "halo_rows": s.halo_rows,
            "solve_s": s.seconds, "rows": hi - lo, "bytes_total": dist.traffic.total})
        prop[mode] = {"seconds": secs, "iterations": s.iterations,
                      "first_pass_iterations": sc.first_pass.iterations if sc.first_pass else 0,
                      "converged": s.converged, "solve_s": max(p["solve_s"] for p in per_rank),
                      "ranks": [{"rows": p["rows"], "halo_rows": p["halo_rows"],
                                 "bytes_total": p["bytes_total"],
                                 "bytes_per_iteration_mean": float(np.mean(
                                     p["bytes_per_iteration"])) if p["bytes_per_iteration"] else 0,
                                 "bytes_per_iteration_first": p["bytes_per_iteration"][:1]}
                                for p in per_rank]}
        prop[mode + "_scores"] = dist.gather_array(sc.scores)
    out["propagation"] = {m: prop[m] for m in ("halo", "allgather")}
    idx = dist.gather_array(part.graph.indices)
    sims = dist.gather_array(part.graph.sims)
    if me == 0:
        np.savez(work / f"world{world}.npz", idx=idx, sims=sims, halo=prop["halo_scores"],
                 allgather=prop["allgather_scores"], emb_time=emb.time)
        (work / f"world{world}.json").write_text(json.dumps(out))


def _run(world: int, work: Path, args: dict) -> dict:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank_main, args=(world, port, str(work), args), nprocs=world, join=True,
                       start_method="spawn")
    return json.loads((work / f"world{world}.json").read_text())


# --- the parent ------------------------------------------------------------------------------------
RECALL_MARGIN = 0.01  # the 2-process graph's recall may be this much below the single process's


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=20_000, help="samples for kNN and propagation")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--index", default="auto", choices=("auto", "flat", "ivf", "hnsw"),
                    help="GraphConfig.index of every kNN graph here (auto: exact up to "
                    "exact_max_n samples, approximate beyond, as a round does)")
    ap.add_argument("--classes", type=int, default=60)
    ap.add_argument("--embed-n", type=int, default=2048)
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--channels", type=int, default=16)
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--no-reorder", action="store_true",
                    help="keep the samples in random order (the halo is then almost everything)")
    ap.add_argument("--results", type=Path, default=RESULTS,
                    help="JSON file the entry is merged into (one entry per n and index)")
    a = ap.parse_args()
    args = dict(vars(a), results=str(a.results))  # JSON-able settings, handed to the ranks

    import torch

    from propagation import synthetic
    from speler.config import PropagationConfig
    from speler.graph.knn import KnnGraph, affinity, build_knn, same_up_to_ties
    from speler.graph.propagate import propagate

    torch.set_num_threads(1)
    cfg = _graph_config(args)
    x, y, labels = synthetic(a.n, classes=a.classes, dim=a.dim)
    order_knn_s = 0.0
    if not a.no_reorder:  # the locality order propagate uses from 20k samples, applied up front,
        # from the graph of the same index (approximate beyond exact_max_n, as in a round)
        from scipy.sparse.csgraph import reverse_cuthill_mckee

        t = time.perf_counter()
        g0 = build_knn(x, config=cfg)
        order_knn_s = time.perf_counter() - t
        order = np.asarray(reverse_cuthill_mckee(affinity(g0), symmetric_mode=True))
        x, y, labels = x[order], y[order], labels[order]
        del g0
    t = time.perf_counter()
    ref_graph = build_knn(x, config=cfg)
    plain_knn_s = time.perf_counter() - t
    exact = ref_graph.recall is None
    W = affinity(ref_graph)
    ref = propagate(W, labels, num_classes=a.classes,
                    config=PropagationConfig(reorder=False))
    entry: dict = {"n": a.n, "dim": a.dim, "k": a.k, "classes": a.classes, "index": a.index,
                   "method": ref_graph.method, "reordered": not a.no_reorder, "nnz": int(W.nnz),
                   "settings": args,
                   "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared)",
                   "plain": {"build_knn_s": plain_knn_s, "recall": ref_graph.recall,
                             "recall_s": ref_graph.recall_seconds,
                             "order_build_knn_s": order_knn_s,
                             "propagate_s": ref.solve.seconds,
                             "propagate_solve_s": ref.solve.solve_seconds,
                             "iterations": ref.solve.iterations}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        np.save(work / "x.npy", x)
        np.save(work / "labels.npy", labels)
        ds = _skeleton_set(a.embed_n, a.frames)
        torch.save(_model(args, ds).state_dict(), work / "model.pt")
        runs = {}
        for world in (1, 2):
            t = time.perf_counter()
            runs[world] = _run(world, work, args)
            runs[world]["wall_s"] = time.perf_counter() - t
        one, two = (np.load(work / f"world{w}.npz") for w in (1, 2))
        checks = {
            # one process builds the single process's index: its graph up to tie order
            "knn_equal_plain_up_to_tie_order_1": same_up_to_ties(
                one["idx"], one["sims"], ref_graph.indices, ref_graph.sims),
            "knn_sims_max_diff_vs_inner_products_2": _sims_error(x, two["idx"], two["sims"]),
            "scores_max_diff_1_vs_plain": float(np.abs(one["halo"] - ref.scores).max()),
            "embedding_equal_1_vs_2": bool(np.array_equal(one["emb_time"], two["emb_time"])),
        }
        if exact:  # the 2-process graph is the single process's too
            checks.update({
                "knn_ids_equal_1_vs_2": bool(np.array_equal(one["idx"], two["idx"])),
                "knn_rows_differing_from_plain": int((two["idx"] != ref_graph.indices)
                                                     .any(1).sum()),
                "knn_equal_plain_up_to_tie_order": same_up_to_ties(
                    two["idx"], two["sims"], ref_graph.indices, ref_graph.sims),
                "knn_sims_max_diff": float(np.abs(two["sims"] - ref_graph.sims).max()),
            })
            ref2 = ref
        else:  # an index per shard: another graph, at least about as good
            r1, r2 = runs[1]["knn_recall"], runs[2]["knn_recall"]
            checks.update({
                "recall_plain": ref_graph.recall, "recall_1": r1, "recall_2": r2,
                "recall_2_ok": bool(r2 >= ref_graph.recall - RECALL_MARGIN),
                "knn_rows_differing_2_vs_plain": int((two["idx"] != ref_graph.indices)
                                                     .any(1).sum()),
            })
            # the 2-process propagation against the single process's on the 2-process graph
            g2 = KnnGraph(indices=two["idx"], sims=two["sims"], method=ref_graph.method,
                          recall=r2, seconds=0.0)
            ref2 = propagate(affinity(g2), labels, num_classes=a.classes,
                             config=PropagationConfig(reorder=False))
        checks["scores_max_diff_halo_vs_plain"] = float(np.abs(two["halo"] - ref2.scores).max())
        checks["scores_max_diff_allgather_vs_plain"] = float(np.abs(two["allgather"]
                                                                    - ref2.scores).max())
        entry["checks"] = checks
    entry["runs"] = {str(w): r for w, r in runs.items()}
    _report(entry)
    a.results.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(a.results.read_text()) if a.results.exists() else {}
    data[str(a.n) if a.index == "auto" else f"{a.n}-{a.index}"] = entry
    a.results.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {a.results}")


def _sims_error(x: np.ndarray, idx: np.ndarray, sims: np.ndarray) -> float:
    """Largest |similarity - exact inner product of the L2-normalised pair| (re-ranked lists)."""
    xn = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)
    worst = 0.0
    for lo in range(0, len(x), 8192):
        i, s = idx[lo:lo + 8192], sims[lo:lo + 8192]
        dots = np.einsum("ij,ikj->ik", xn[lo:lo + 8192], xn[np.maximum(i, 0)])
        worst = max(worst, float(np.abs(np.where(i >= 0, dots - s, 0.0)).max(initial=0.0)))
    return worst


def _report(e: dict) -> None:
    r1, r2 = e["runs"]["1"], e["runs"]["2"]
    pl = e["plain"]
    print(f"n={e['n']} d={e['dim']} k={e['k']} C={e['classes']} nnz={e['nnz']} "
          f"index={e['index']} ({e['method']}) reordered={e['reordered']}; embedding on "
          f"{e['settings']['embed_n']} samples")
    print(f"{'stage':<24}{'1 proc s':>10}{'2 procs s':>11}{'speed-up':>10}")
    rows = [("embedding", r1["embed_s"], r2["embed_s"]),
            (f"kNN ({r1['knn_method']})", r1["knn_s"], r2["knn_s"]),
            ("  searches", r1["knn_search_s"], r2["knn_search_s"]),
            ("  recall check", r1["knn_recall_s"], r2["knn_recall_s"]),
            ("affinity rows", r1["affinity_s"], r2["affinity_s"])]
    for m in ("halo", "allgather"):
        rows.append((f"propagation ({m})", r1["propagation"][m]["seconds"],
                     r2["propagation"][m]["seconds"]))
        rows.append((f"  CG solve ({m})", r1["propagation"][m]["solve_s"],
                     r2["propagation"][m]["solve_s"]))
    for name, a, b in rows:
        print(f"{name:<24}{a:>10.2f}{b:>11.2f}{a / b if b else float('nan'):>10.2f}")
    rec = (lambda r: "-" if r is None else f"{r:.4f}")
    print(f"plain build_knn {pl['build_knn_s']:.2f} s (recall check {pl['recall_s']:.2f} s; "
          f"the locality order's graph {pl['order_build_knn_s']:.2f} s), plain propagate "
          f"{pl['propagate_s']:.2f} s ({pl['iterations']} iterations)")
    print(f"recall@k: plain {rec(pl['recall'])}, 1 process {rec(r1['knn_recall'])}, "
          f"2 processes {rec(r2['knn_recall'])}")
    print("kNN bytes sent per ring block, per rank:", r2["knn_block_bytes"])
    for m in ("halo", "allgather"):
        p = r2["propagation"][m]
        print(f"CG {m}: {p['iterations']} iterations; per rank: " + "; ".join(
            f"rows {q['rows']}, halo rows {q['halo_rows']}, mean bytes/iteration "
            f"{q['bytes_per_iteration_mean']:.0f} (first {q['bytes_per_iteration_first']})"
            for q in p["ranks"]))
    print("checks:", e["checks"])


if __name__ == "__main__":
    main()

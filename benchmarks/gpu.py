"""GPU against CPU, side by side from one run: training, embedding, kNN graph and propagation.

    python benchmarks/gpu.py [--quick] [--parts msr ntu graph] [--budget 360]
                             [--cpu-n 1000] [--cpu-graph-n 250000] [--out PATH] [--data DIR]

Parts (issue 12's targets in brackets, for one H100):

* msr: a default round (``speler.loop.build_state``) on MSRAction3D from ../shared/data (or
  ``--data``: a copy of it, on a machine where ../shared is not), on the
  protocol split (π = 10, γ = 10 %, seed 0): once on CUDA (cold, then again warm, then with 10
  more labels: new batch shapes in a warm process) and once on the CPU with all its cores. [the
  GPU round faster than the CPU's]
* ntu: a round on an NTU-60-sized synthetic set (40,000 × 3 × 64 × 25 × 2, 60 classes, 10 %
  labeled): ``fit`` with the default model and the device's default batch, ``embed`` of every
  sample, kNN graph of the embeddings, ``propagate``. Also the bare rates of the same networks
  measured in the same run: a training step (forward, backward, Adam) and a forward pass, and
  on the GPU the embedding again as it was before (its forward pass replayed from a CUDA
  graph), then once more as it is.
  [training >= 5,000 samples/s; embed >= 80 % of the bare forward rate, each timed after a call
  at its batch shape; round <= 120 s]
  CPU column: the same stages on the first ``--cpu-n`` samples (rates; the full-size seconds are
  estimated from them and marked so), graph and propagation on the same embeddings.
* graph: kNN graph + propagation of 1M × 256 synthetic embeddings (benchmarks/propagation.py's
  long-tailed clusters, 60 classes, 5 % labeled): GPU = exact torch search on CUDA
  (``GraphConfig(backend="torch")``), affinity, the block CG solve on CUDA (``_block_cg_torch``
  with ``device="cuda"``) and the full ``propagate()`` with ``PropagationConfig(device="cuda")``
  (balance pass, solve, energies), and the GPU search again with one torch.topk per block of
  scores as before ``knn._top_columns`` (its seconds, whether it found the same similarities,
  and in how many rows another neighbour at a tied similarity); CPU = the library's default
  (faiss; IVF-PCA beyond 50k) on ``--cpu-graph-n`` points, its CG solve and the full
  ``propagate()`` on the CPU.
  [graph + propagation <= 20 s with recall >= 0.99]

``--gpu-only`` leaves out the msr part's CPU round (a first GPU round in a fresh process, cheaply).
``--cudnn-benchmark on`` runs every fit with ``train.cudnn_benchmark`` on (cuDNN times its kernels
for each new batch shape instead of choosing by its heuristics, which is the library's default
since the timing cost a first trained round 48 s: compare the MSR rounds and the NTU training
rate with a default run); ``off`` sets the default explicitly. ``--profile`` runs the first MSR
round (on CUDA, else the CPU's) and one more
``embed`` of the NTU-sized set under torch.profiler and adds the ops that took the most host and
device time, and the convolution input shapes that cost the most host time (cuDNN's tuning shows
there), to the JSON and the output; their seconds then include the profiler's overhead. With the
graph part it also runs the 1M ``propagate()`` once more under cProfile: the host's seconds per
function (the GPU's share shows as waits inside the functions that read back from it).

Without CUDA the GPU column says "not measured" and only the CPU half runs; ``--quick`` shrinks
every part (msr: 2 epochs and 840 random kernels; ntu: 600 samples; graph: 20k points) to check the
script on a small machine. ``--budget`` (seconds) skips the CPU extras that would overrun it.
Prints a table and writes benchmarks/results/gpu.json (gpu_quick.json with --quick).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from propagation import synthetic  # noqa: E402
from speler.config import Config, GraphConfig, PropagationConfig, TrainConfig  # noqa: E402
from speler.data.layouts import get_layout  # noqa: E402
from speler.data.schema import SequenceSet  # noqa: E402
import speler.graph.knn as knn_module  # noqa: E402
from speler.graph.knn import (  # noqa: E402
    _normalize_rows, _recall, affinity, build_knn,
)
from speler.graph.propagate import (  # noqa: E402
    _block_cg_torch, normalized_operator, propagate, seed_matrix,
)
from speler.models import build_model  # noqa: E402
from speler.train import (  # noqa: E402
    EMBED_BATCH_CPU, EMBED_BATCH_CUDA, _autocast, batch_size_for, embed, fit,
)

DATA = ROOT.parent / "shared" / "data"  # --data replaces it
CUDA = torch.cuda.is_available()
NOT_MEASURED = "not measured (no CUDA device)"
TRAIN_OVERRIDES: dict = {}  # --cudnn-benchmark on / off: {"cudnn_benchmark": ...} for every fit
TOP = 12  # ops listed per profile


class Budget:
    def __init__(self, seconds: float) -> None:
        self.start, self.seconds = time.perf_counter(), seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)


@contextlib.contextmanager
def patched(owner, **values):
    """Attributes of a module or class set to ``values`` for a while (a baseline measured in the
    same run)."""
    old = {name: getattr(owner, name) for name in values}
    for name, value in values.items():
        setattr(owner, name, value)
    try:
        yield
    finally:
        for name, value in old.items():
            setattr(owner, name, value)


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def timed(fn):
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t


# --- data ---------------------------------------------------------------------------------------
def ntu_like(n: int, *, classes: int = 60, frames: int = 64, seed: int = 0) -> SequenceSet:
    """NTU-shaped synthetic skeletons (n, 3, frames, 25, 2): class c moves joint mover[c] along
    a direction at a frequency; half the samples have a second person, the rest an empty slot."""
    rng = np.random.default_rng(seed)
    lay = get_layout("ntu25")
    v = lay.num_joints
    y = (np.arange(n) % classes).astype(np.int64)
    mover = rng.integers(0, v, classes)
    direction = rng.normal(size=(classes, 3)).astype(np.float32)
    freq = rng.uniform(0.5, 3.0, classes).astype(np.float32)
    pose = rng.normal(0, 0.4, size=(3, 1, v)).astype(np.float32)
    t = np.linspace(0, 1, frames, dtype=np.float32)
    x = np.zeros((n, 3, frames, v, 2), dtype=np.float32)
    for lo in range(0, n, 2048):
        hi = min(n, lo + 2048)
        m, yc = hi - lo, y[lo:hi]
        a = pose + rng.normal(0, 0.05, size=(m, 3, frames, v)).astype(np.float32)
        wave = 0.4 * np.sin(2 * np.pi * freq[yc][:, None] * t + rng.uniform(0, 6.3, (m, 1)))
        a[np.arange(m), :, :, mover[yc]] += direction[yc][:, :, None] * wave[:, None, :]
        x[lo:hi, ..., 0] = a
        two = rng.random(m) < 0.5
        x[lo:hi][two, ..., 1] = 0.8 * a[two] + 0.3
    labels = np.full(n, -1, dtype=np.int64)
    pick = rng.random(n) < 0.1
    labels[pick] = y[pick]
    return SequenceSet(x=x, ids=np.array([f"s{i:06d}" for i in range(n)]),
                       classes=tuple(f"c{i}" for i in range(classes)), y=labels, layout=lay,
                       y_true=y, where="ntu-like synthetic")


def load_msr(quick: bool):
    from speler.data.protocol import make_partial
    from speler.data.transforms import preprocess
    from speler.formats import read

    if not (DATA / "MSRAction3D").exists():
        return None, None
    cfg = Config()
    if quick:
        cfg = dataclasses.replace(
            cfg, train=dataclasses.replace(cfg.train, epochs=2, warm_epochs=2),
            views=dataclasses.replace(cfg.views, rocket_features=840))
    full = preprocess(read(DATA / "MSRAction3D"), cfg.preprocess)
    return make_partial(full, imbalance=10, labeled_ratio=0.1, seed=0), cfg


# --- parts --------------------------------------------------------------------------------------
def more_labels(ds, count: int, seed: int = 1):
    """``ds`` with ``count`` more of its unlabeled samples labeled from their truth (seeded)."""
    y = ds.y.copy()
    pick = np.random.default_rng(seed).choice(np.flatnonzero(y < 0), count, replace=False)
    y[pick] = ds.y_true[pick]
    return dataclasses.replace(ds, y=y)


def msr_round(device: str, ds, cfg: Config, *, profiled: bool = False) -> dict:
    from speler.loop import build_state

    cfg = dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, device=device, **TRAIN_OVERRIDES),
        graph=dataclasses.replace(cfg.graph, use_gpu=device != "cpu"))
    run = lambda: build_state(ds, ds.y, no=0, config=cfg)  # noqa: E731
    out: dict = {}
    if profiled:
        (built, seconds), out["profile"] = profile_of(lambda: timed(run))
    else:
        built, seconds = timed(run)
    unl = ds.y < 0
    acc = float((built.state.result.labels[unl] == ds.y_true[unl]).mean())
    out.update({"seconds": seconds, "stages": built.stage_seconds, "n": ds.n,
                "labels": int((ds.y >= 0).sum()), "network_trained": built.fitted is not None,
                "accuracy_unlabeled": acc})
    return out


def profile_of(fn):
    """``fn()`` under torch.profiler: (its result, a summary: the ``TOP`` ops by host time and by
    device time spent in themselves, and the convolutions' input shapes by host time, where
    cuDNN's tuning of each new shape shows)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else [])
    with profile(activities=acts, record_shapes=True) as prof:
        out = fn()
        sync()
    ops = prof.key_averages()

    def row(e, shapes: bool = False) -> dict:
        r = {"op": e.key, "calls": e.count, "self_host_s": e.self_cpu_time_total / 1e6,
             "host_s": e.cpu_time_total / 1e6,
             "self_device_s": getattr(e, "self_device_time_total", 0.0) / 1e6}
        if shapes:
            r["input_shape"] = str(e.input_shapes[0]) if e.input_shapes else "?"
        return r

    conv = [e for e in prof.key_averages(group_by_input_shape=True)
            if e.key == "aten::convolution"]
    return out, {
        "top_self_host": [row(e) for e in sorted(ops, key=lambda e: -e.self_cpu_time_total)[:TOP]],
        "top_self_device": [row(e) for e in sorted(
            ops, key=lambda e: -getattr(e, "self_device_time_total", 0.0))[:TOP]],
        "conv_input_shapes": len({str(e.input_shapes[0]) for e in conv if e.input_shapes}),
        "top_conv_shapes_host": [row(e, True) for e in sorted(
            conv, key=lambda e: -e.cpu_time_total)[:TOP]],
    }


def host_profile(fn) -> list[dict]:
    """``fn()`` under cProfile: the 3 ``TOP`` functions with the most cumulative host seconds
    (waits for the GPU included, inside whichever function waits)."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.runcall(fn)
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (calls, primitive, self, cumulative,
    # callers)
    rows = sorted(stats.items(), key=lambda kv: -kv[1][3])
    return [{"function": f"{Path(f).name}:{line}({name})", "calls": v[1], "self_s": v[2],
             "cumulative_s": v[3]} for (f, line, name), v in rows[:3 * TOP]]


def print_profile(title: str, summary: dict) -> None:
    print(f"\nprofile: {title} ({summary['conv_input_shapes']} convolution input shapes)")
    for key, what in (("top_self_host", "self host s"), ("top_self_device", "self device s")):
        print(f"  ops by {what}:")
        for r in summary[key]:
            print(f"    {r['self_host_s']:8.3f} host {r['self_device_s']:8.3f} device"
                  f" {r['calls']:8d} calls  {r['op']}")
    print("  convolutions by host s (with what they called), by input shape:")
    for r in summary["top_conv_shapes_host"]:
        print(f"    {r['host_s']:8.3f} s {r['calls']:6d} calls  {r['input_shape']}")


def bare_rates(model, ds: SequenceSet, device: str, *, train_batch: int, embed_batch: int,
               steps: int) -> dict:
    """Samples/s of a bare training step and of a bare forward pass of ``model``'s network on
    data already on the device (the ceiling for fit and embed)."""
    net = build_model(ds.layout, in_channels=3, num_classes=ds.num_classes, frames=ds.x.shape[2],
                      persons=2, config=TrainConfig()).to(device)
    net.load_state_dict(model.state_dict())
    cuda = device.startswith("cuda")
    opt = torch.optim.Adam(net.parameters(), lr=1e-4, **({"fused": True} if cuda else {}))
    xb = torch.from_numpy(ds.x[:train_batch]).to(device)
    yb = torch.from_numpy(ds.y_true[:train_batch]).to(device)
    net.train()

    def step():
        with _autocast(device, cuda):
            out = net(xb)
        loss = (torch.nn.functional.cross_entropy(out.logits_time.float(), yb)
                + torch.nn.functional.cross_entropy(out.logits_freq.float(), yb))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up (cuDNN plans)
    _, t_train = timed(lambda: [step() for _ in range(steps)])
    net.eval()
    xe = torch.from_numpy(ds.x[:embed_batch]).to(device)

    def forward():
        with torch.inference_mode(), _autocast(device, cuda):
            net(xe)

    forward()
    _, t_fwd = timed(lambda: [forward() for _ in range(steps)])
    return {"train_step_sps": steps * len(xb) / t_train, "forward_sps": steps * len(xe) / t_fwd,
            "train_batch": len(xb), "embed_batch": len(xe)}


def train_rate(history: list[dict]) -> float:
    """Samples/s of a fit's epochs after the first (which pays for cuDNN's autotuning)."""
    later = history[1:] or history
    return sum(h["samples"] for h in later) / sum(h["seconds"] for h in later)


def ntu_round(device: str, ds: SequenceSet, *, epochs: int | None, steps: int,
              profiled: bool = False) -> dict:
    cfg = TrainConfig(device=device, **({"epochs": epochs} if epochs else {}), **TRAIN_OVERRIDES)
    out: dict = {"n": ds.n, "labels": int((ds.y >= 0).sum()), "device": device,
                 "batch": batch_size_for(cfg, device)}
    result, out["fit_s"] = timed(lambda: fit(ds, ds.y, config=cfg))
    hist = result.history
    out["epochs"] = len(hist)
    out["samples_per_epoch"] = float(np.mean([h["samples"] for h in hist]))
    out["first_epoch_s"] = hist[0]["seconds"]
    out["train_sps"] = train_rate(hist)
    if device != "cpu":  # the same fit with its step run as written, a few epochs
        eager = fit(ds, ds.y, config=dataclasses.replace(cfg, epochs=6, cuda_graph=False))
        out["train_sps_no_graph"] = train_rate(eager.history)
    emb, out["embed_s"] = timed(lambda: embed(result.model, ds))
    out["embed_sps"] = ds.n / out["embed_s"]
    if device != "cpu":  # before, in the same process: the forward pass replayed from a CUDA
        # graph; then the default once more (the first call pays for each new shape's set-up,
        # which bare_rates' forward pays in its untimed warm-up call)
        _, seconds = timed(lambda: embed(result.model, ds, cuda_graph=True))
        out["embed_sps_before"] = ds.n / seconds
        _, seconds = timed(lambda: embed(result.model, ds))
        out["embed_sps_again"] = ds.n / seconds
    if profiled:  # one more embed, under the profiler (the timed one above is not)
        _, out["embed_profile"] = profile_of(lambda: embed(result.model, ds))
    bare = bare_rates(result.model, ds, device, train_batch=out["batch"],
                      embed_batch=min(ds.n, EMBED_BATCH_CUDA if device != "cpu"
                                      else EMBED_BATCH_CPU), steps=steps)
    out.update(bare)
    out["embed_share_of_forward"] = out["embed_sps"] / bare["forward_sps"]
    for key in ("before", "again"):
        if f"embed_sps_{key}" in out:
            out[f"embed_share_{key}"] = out[f"embed_sps_{key}"] / bare["forward_sps"]
    out["embeddings"] = np.concatenate([emb.time, emb.freq], 1)
    return out


def graph_and_propagation(x: np.ndarray, labels: np.ndarray, y: np.ndarray, C: int,
                          device: str, *, library_propagate: bool, profiled: bool = False,
                          one_stage_baseline: bool = False) -> dict:
    """kNN graph (torch on CUDA, the library's default on the CPU), affinity, the block CG solve
    on ``device``, and with ``library_propagate`` the full ``propagate()`` solving there too
    (``profiled``: once more under cProfile, the host's time per function;
    ``one_stage_baseline``: on CUDA the kNN search again with one torch.topk per block of
    scores, as before ``knn._top_columns``, and whether it found the same neighbours)."""
    gcfg = GraphConfig(backend="torch") if device != "cpu" else GraphConfig(use_gpu=False)
    pcfg = PropagationConfig(device=device)
    out: dict = {"n": len(x), "dim": x.shape[1], "device": device}
    g, out["knn_s"] = timed(lambda: build_knn(x, config=gcfg))
    out["knn_method"] = g.method
    if g.recall is not None:
        out["recall"] = g.recall
    else:  # exact method: check it anyway on a few queries against faiss
        xn = np.array(x, dtype=np.float32, copy=True)
        _normalize_rows(xn)
        out["recall"] = _recall(xn, g.indices, g.sims, g.k, GraphConfig(recall_queries=200))
        del xn
    if device != "cpu" and one_stage_baseline:  # before: torch.topk over each block's row
        with patched(knn_module, TOPK_GROUPS_MIN=1 << 62):
            g0, out["knn_one_stage_s"] = timed(lambda: build_knn(x, config=gcfg))
        # the same similarities in every row; lists can still differ where two neighbours tie
        # at the k-th similarity (1 row in 4,000 queries at 200k on the CPU, similarities equal)
        out["knn_one_stage_same_sims"] = bool(np.array_equal(g.sims, g0.sims))
        out["knn_one_stage_rows_differ"] = int(
            (np.sort(g.indices, 1) != np.sort(g0.indices, 1)).any(1).sum())
        g0 = None
    W, out["affinity_s"] = timed(lambda: affinity(g, gamma=gcfg.gamma))
    g = None  # the lists are not needed any more
    S, out["operator_s"] = timed(lambda: normalized_operator(W))
    B = seed_matrix(labels, C, pcfg)
    lab = labels >= 0
    solve = lambda: _block_cg_torch(S, B, pcfg, None, None, "bench", pcfg.tol, None,  # noqa: E731
                                    device=device)
    (M, iters, conv, _, _), out["cg_s"] = timed(solve)
    out["cg_iterations"], out["cg_converged"] = iters, bool(conv)
    pred = np.where(lab, labels, M.argmax(1))
    out["cg_accuracy_unlabeled"] = float((pred[~lab] == y[~lab]).mean())
    out["graph_plus_cg_s"] = out["knn_s"] + out["affinity_s"] + out["operator_s"] + out["cg_s"]
    if library_propagate:
        r, out["propagate_s"] = timed(lambda: propagate(W, labels, num_classes=C, config=pcfg))
        out["propagate_iterations"] = r.solve.iterations
        out["graph_plus_propagate_s"] = (out["knn_s"] + out["affinity_s"]
                                         + out["propagate_s"])
        if profiled:
            out["propagate_host_profile"] = host_profile(
                lambda: propagate(W, labels, num_classes=C, config=pcfg))
    return out


# --- report -------------------------------------------------------------------------------------
def later_cell(side: dict | None, missing: str) -> str:
    """'seconds (training's seconds)' of a side's later MSR round."""
    if not side:
        return missing
    train = side["later_stages"].get("train")
    return f"{fmt(side['later_seconds'])} ({fmt(train) if train is not None else 'no training'})"


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}"


def table(rows: list[tuple]) -> None:
    head = ("part", "figure", "GPU", "CPU", "target")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(5)]
    for r in [head, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))


def main(argv: list[str] | None = None) -> int:
    global DATA
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, to check the script")
    ap.add_argument("--parts", nargs="+", default=["msr", "ntu", "graph"],
                    choices=["msr", "ntu", "graph"])
    ap.add_argument("--budget", type=float, default=360.0, help="seconds for the whole run")
    ap.add_argument("--cpu-n", type=int, default=None, help="ntu samples for the CPU column")
    ap.add_argument("--cpu-graph-n", type=int, default=None, help="graph points on the CPU")
    ap.add_argument("--out", default=None)
    ap.add_argument("--data", default=None, help=f"folder holding MSRAction3D (default {DATA})")
    ap.add_argument("--cudnn-benchmark", choices=["default", "on", "off"], default="default",
                    help="train.cudnn_benchmark for every fit (default: the library's, off)")
    ap.add_argument("--gpu-only", action="store_true",
                    help="msr: the GPU rounds alone, no CPU round (with CUDA)")
    ap.add_argument("--profile", action="store_true",
                    help="profile the first MSR round, one more NTU embed and 1M propagate()")
    args = ap.parse_args(argv)
    if args.cudnn_benchmark != "default":
        TRAIN_OVERRIDES["cudnn_benchmark"] = args.cudnn_benchmark == "on"
    if args.profile and CUDA:
        # the profiler started once before any CUDA graph is captured: capturing before its first
        # start, then profiling, has crashed or hung (pytorch/pytorch#75504; what torch's own
        # torch.profiler._utils._init_for_cuda_graphs does)
        with torch.autograd.profiler.profile():
            pass
    logging.basicConfig(level=logging.WARNING)
    if args.data:
        DATA = Path(args.data)
    q = args.quick
    ntu_n, graph_n = (600, 20_000) if q else (40_000, 1_000_000)
    cpu_n = args.cpu_n or (600 if q else 1_000)
    cpu_graph_n = args.cpu_graph_n or (20_000 if q else 250_000)
    budget = Budget(args.budget)
    gpu_name = torch.cuda.get_device_name(0) if CUDA else None
    info = {"gpu": gpu_name, "gpu_measured": CUDA, "quick": q, "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "machine": platform.machine(),
            "cudnn_benchmark": args.cudnn_benchmark, "profiled": args.profile}
    print(f"GPU: {gpu_name or NOT_MEASURED}; CPU: {os.cpu_count()} cores, torch threads "
          f"{torch.get_num_threads()}; torch {torch.__version__}; quick={q}; cudnn benchmark "
          f"{args.cudnn_benchmark}{'; profiled' if args.profile else ''}", flush=True)
    results: dict = {"info": info}
    rows: list[tuple] = []
    gpu_col = (lambda d, key: d.get(key) if d else NOT_MEASURED)

    if "msr" in args.parts:
        ds, cfg = load_msr(q)
        if ds is None:
            results["msr"] = {"skipped": f"no MSRAction3D under {DATA}"}
            rows.append(("msr", "round", "-", "-", f"skipped: no data under {DATA}"))
        else:
            gpu = None
            if CUDA:
                cold = msr_round("cuda", ds, cfg, profiled=args.profile)
                gpu = msr_round("cuda", ds, cfg)
                gpu["cold_seconds"], gpu["cold_stages"] = cold["seconds"], cold["stages"]
                if "profile" in cold:
                    gpu["cold_profile"] = cold["profile"]
                # a later round in the same process: 10 more labels, so new batch shapes (is
                # the first round's extra time CUDA starting, or cuDNN tuning each new shape?)
                more = more_labels(ds, 10)
                later = msr_round("cuda", more, cfg)
                gpu["later_seconds"], gpu["later_stages"] = later["seconds"], later["stages"]
            cpu = (None if args.gpu_only and CUDA else
                   msr_round("cpu", ds, cfg, profiled=args.profile and not CUDA))
            if cpu is not None:  # the same 10 more labels on the CPU (a round that trains)
                later = msr_round("cpu", more_labels(ds, 10), cfg)
                cpu["later_seconds"], cpu["later_stages"] = later["seconds"], later["stages"]
            results["msr"] = {"gpu": gpu, "cpu": cpu}
            cpu_col = (lambda d, key: d.get(key) if d else "skipped (--gpu-only)")  # noqa: E731
            labels = int((ds.y >= 0).sum())
            rows += [("msr", f"round s (n={ds.n}, {labels} labels)",
                      fmt(gpu_col(gpu, "seconds")), fmt(cpu_col(cpu, "seconds")), "GPU < CPU"),
                     ("msr", "round s, 10 more labels, same process (train s)",
                      later_cell(gpu, NOT_MEASURED), later_cell(cpu, "skipped (--gpu-only)"),
                      "GPU < CPU"),
                     ("msr", "round s, first on the GPU (cold)", fmt(gpu_col(gpu, "cold_seconds")),
                      "-", ""),
                     ("msr", "network trained", fmt(gpu_col(gpu, "network_trained")),
                      fmt(cpu_col(cpu, "network_trained")), ""),
                     ("msr", "accuracy, unlabeled", fmt(gpu_col(gpu, "accuracy_unlabeled")),
                      fmt(cpu_col(cpu, "accuracy_unlabeled")), "")]
            stages = (cpu or gpu)["stages"]
            for stage in stages:
                rows.append(("msr", f"  stage {stage} s",
                             fmt(gpu["stages"].get(stage) if gpu else NOT_MEASURED),
                             fmt(cpu["stages"][stage] if cpu else cpu_col(cpu, "")), ""))
            for stage in stages:
                rows.append(("msr", f"  stage {stage} s, cold", fmt(
                    gpu["cold_stages"].get(stage) if gpu else NOT_MEASURED), "-", ""))
        print(f"msr done ({budget.left():.0f} s of budget left)", flush=True)

    if "ntu" in args.parts:
        ds, t_gen = timed(lambda: ntu_like(ntu_n))
        gpu = None
        if CUDA:
            gpu = ntu_round("cuda", ds, epochs=None, steps=20, profiled=args.profile)
            emb = gpu.pop("embeddings")
            g = graph_and_propagation(emb, ds.y, ds.y_true, ds.num_classes, "cuda",
                                      library_propagate=True)
            gpu["graph_s"], gpu["propagate_s"] = g["knn_s"] + g["affinity_s"], g["propagate_s"]
            gpu["round_s"] = gpu["fit_s"] + gpu["embed_s"] + gpu["graph_s"] + gpu["propagate_s"]
        # CPU: fit and embed on the first cpu_n samples (rates), the graph and propagation on the
        # same embeddings as the GPU's (all samples) when there are any, else on the subset's
        sub = ds.subset(np.arange(min(cpu_n, ds.n)))
        cpu = ntu_round("cpu", sub, epochs=2, steps=2, profiled=args.profile and not CUDA)
        emb_cpu = cpu.pop("embeddings")
        on = ds if CUDA else sub
        g = graph_and_propagation(emb if CUDA else emb_cpu, on.y, on.y_true, ds.num_classes,
                                  "cpu", library_propagate=True)
        cpu["graph_s"], cpu["propagate_s"] = g["knn_s"] + g["affinity_s"], g["propagate_s"]
        # a full-size CPU round from the measured rates: the GPU run's epochs and samples per
        # epoch (else the defaults: 40 epochs of 80 % of the labels), every sample embedded
        per_epoch = gpu["samples_per_epoch"] if gpu else 0.8 * int((ds.y >= 0).sum())
        epochs_full = gpu["epochs"] if gpu else TrainConfig().epochs
        cpu["round_s_estimated_full"] = (epochs_full * per_epoch / cpu["train_sps"]
                                         + ds.n / cpu["embed_sps"] + cpu["graph_s"]
                                         + cpu["propagate_s"])
        results["ntu"] = {"generate_s": t_gen, "gpu": gpu, "cpu": cpu, "cpu_samples": sub.n,
                          "graph_samples": on.n}
        rows += [
            ("ntu", f"train samples/s (batch {gpu['batch'] if gpu else '-'} / {cpu['batch']})",
             fmt(gpu_col(gpu, "train_sps")), fmt(cpu["train_sps"]), ">= 5,000 on GPU"),
            ("ntu", "train samples/s, step not replayed from a CUDA graph (6 epochs)",
             fmt(gpu_col(gpu, "train_sps_no_graph")), "-", ""),
            ("ntu", "bare train step samples/s (as written)", fmt(gpu_col(gpu, "train_step_sps")),
             fmt(cpu["train_step_sps"]), ""),
            ("ntu", "first epoch s", fmt(gpu_col(gpu, "first_epoch_s")),
             fmt(cpu["first_epoch_s"]), ""),
            ("ntu", "embed samples/s", fmt(gpu_col(gpu, "embed_sps")), fmt(cpu["embed_sps"]), ""),
            ("ntu", "bare forward samples/s", fmt(gpu_col(gpu, "forward_sps")),
             fmt(cpu["forward_sps"]), ""),
            # the bare forward is timed after a call at its shape: so is embed's third call
            ("ntu", "embed / bare forward, each after a call at its shape",
             fmt(gpu_col(gpu, "embed_share_again")), "-", ">= 0.8 on GPU"),
            ("ntu", "  the first embed in the process (each new shape's set-up)",
             fmt(gpu_col(gpu, "embed_share_of_forward")), fmt(cpu["embed_share_of_forward"]), ""),
            ("ntu", "  before: forward replayed from a CUDA graph (second call)",
             fmt(gpu_col(gpu, "embed_share_before")), "-", ""),
            ("ntu", f"graph s (n={on.n})", fmt(gpu_col(gpu, "graph_s")),
             fmt(cpu["graph_s"]), ""),
            ("ntu", "propagate() s (library)", fmt(gpu_col(gpu, "propagate_s")),
             fmt(cpu["propagate_s"]), ""),
            ("ntu", f"round s (n={ds.n}; CPU: estimate from the rates on {sub.n})",
             fmt(gpu_col(gpu, "round_s")), fmt(cpu["round_s_estimated_full"]) + " (est.)",
             "<= 120 on GPU"),
        ]
        print(f"ntu done ({budget.left():.0f} s of budget left)", flush=True)

    if "graph" in args.parts:
        x, y, labels = synthetic(graph_n, seed=0)
        gpu = (graph_and_propagation(x, labels, y, 60, "cuda", library_propagate=True,
                                     profiled=args.profile, one_stage_baseline=True)
               if CUDA else None)
        n_cpu = min(cpu_graph_n, graph_n)
        if CUDA and budget.left() < 120:  # keep the run inside its budget
            n_cpu = min(n_cpu, 100_000)
        cpu = graph_and_propagation(x[:n_cpu], labels[:n_cpu], y[:n_cpu], 60, "cpu",
                                    library_propagate=True, profiled=args.profile and not CUDA)
        results["graph"] = {"gpu": gpu, "cpu": cpu}
        rows += [
            ("graph", f"n (GPU / CPU), dim {x.shape[1]}", fmt(graph_n) if CUDA else NOT_MEASURED,
             fmt(n_cpu), ""),
            ("graph", "kNN method", fmt(gpu_col(gpu, "knn_method")), cpu["knn_method"], ""),
            ("graph", "kNN s", fmt(gpu_col(gpu, "knn_s")), fmt(cpu["knn_s"]), ""),
            ("graph", "  before: one torch.topk per block (same sims; rows, lists differ)",
             f"{fmt(gpu['knn_one_stage_s'])} ({fmt(gpu['knn_one_stage_same_sims'])};"
             f" {fmt(gpu['knn_one_stage_rows_differ'])})"
             if gpu and "knn_one_stage_s" in gpu else "-", "-", ""),
            ("graph", "recall@k (200 queries)", fmt(gpu_col(gpu, "recall")), fmt(cpu["recall"]),
             ">= 0.99"),
            ("graph", "affinity s (scipy, CPU)", fmt(gpu_col(gpu, "affinity_s")),
             fmt(cpu["affinity_s"]), ""),
            ("graph", "operator D^-1/2 W D^-1/2 s (scipy, CPU)", fmt(gpu_col(gpu, "operator_s")),
             fmt(cpu["operator_s"]), ""),
            ("graph", "CG solve s (60 columns)", fmt(gpu_col(gpu, "cg_s")), fmt(cpu["cg_s"]), ""),
            ("graph", "CG iterations", fmt(gpu_col(gpu, "cg_iterations")),
             fmt(cpu["cg_iterations"]), ""),
            ("graph", "graph + CG s", fmt(gpu_col(gpu, "graph_plus_cg_s")),
             fmt(cpu["graph_plus_cg_s"]), ""),
            ("graph", "propagate() s (library: balance pass + solve)",
             fmt(gpu_col(gpu, "propagate_s")), fmt(cpu.get("propagate_s")), ""),
            ("graph", "graph + propagate() s", fmt(gpu_col(gpu, "graph_plus_propagate_s")),
             fmt(cpu.get("graph_plus_propagate_s")), "<= 20 on GPU at 1M"),
            ("graph", "accuracy, unlabeled (CG)", fmt(gpu_col(gpu, "cg_accuracy_unlabeled")),
             fmt(cpu["cg_accuracy_unlabeled"]), ""),
        ]

    results["seconds"] = time.perf_counter() - budget.start
    for title, where in (("first MSR round", ("msr", "gpu", "cold_profile")),
                         ("first MSR round (CPU)", ("msr", "cpu", "profile")),
                         ("embed, NTU-sized", ("ntu", "gpu", "embed_profile")),
                         ("embed, NTU-sized (CPU)", ("ntu", "cpu", "embed_profile"))):
        summary = results
        for key in where:
            summary = summary.get(key) if isinstance(summary, dict) else None
        if summary:
            print_profile(title, summary)
    for side in ("gpu", "cpu"):
        rows_ = ((results.get("graph") or {}).get(side) or {}).get("propagate_host_profile")
        if rows_:
            print(f"\nhost profile: propagate() at {results['graph'][side]['n']:,} ({side})")
            for r in rows_:
                print(f"  {r['cumulative_s']:8.3f} s cumulative {r['self_s']:8.3f} s self"
                      f" {r['calls']:7d} calls  {r['function']}")
    print()
    table(rows)
    if not CUDA:
        print(f"\nGPU column: {NOT_MEASURED}. Only the CPU half ran"
              f"{' at the --quick sizes' if q else ''}.")
    out = Path(args.out or ROOT / "benchmarks" / "results" / ("gpu_quick.json" if q else "gpu.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, sort_keys=True, default=float))
    print(f"total {results['seconds']:.0f} s; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Backbone benchmark: speed, memory and accuracy of fit/embed against a flat baseline.

    python benchmarks/train.py [--datasets synthetic_actions basicmotions natops ntu_size]
                               [--splits 3] [--threads 0] [--device auto]

Per dataset (preprocessed with the default PreprocessConfig, T = 48):

* round: ``fit`` on the labels the set comes with (the bundled samples' few labels), as one
  annotation round does, then ``embed`` of every sample: wall and CPU seconds, epochs, accuracy of
  the round model on the unlabeled samples.
* all labels: stratified 70/30 splits of the ground truth (``y_true``, else ``y``), ``fit`` on the
  70 % and accuracy / balanced accuracy on the 30 %, against logistic regression (and 1-NN) on the
  flattened, standardised joints trained on the same split in the same run.
* throughput: training samples/s (all samples processed by ``fit``, per second of fit, including
  its hold-out evaluation and BatchNorm recalibration), embedding samples/s, peak memory
  (process peak RSS so far; ``torch.cuda.max_memory_allocated`` on a GPU).

``ntu_size`` is a synthetic NTU-shaped batch (256 × (3, 64, 25, 2), 60 classes) for throughput
only, with the default CPU model and with the paper-size model (on 32 samples on a CPU).
Prints a table and writes benchmarks/results/train.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from sklearn.neighbors import KNeighborsClassifier  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

from speler.config import PreprocessConfig, TrainConfig  # noqa: E402
from speler.data.layouts import get_layout  # noqa: E402
from speler.data.schema import SequenceSet  # noqa: E402
from speler.data.transforms import preprocess  # noqa: E402
from speler.models import paper_config  # noqa: E402
from speler.train import embed, fit, select_device  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - w, time.process_time() - c


def load(name: str) -> SequenceSet | None:
    if name == "natops":
        if not (SHARED / "NATOPS").exists():
            return None
        from speler.formats import read

        return read(SHARED / "NATOPS")
    from speler.data.samples import load_sample

    return load_sample(name)


def fit_throughput(result) -> float:
    samples = sum(h["samples"] for h in result.history)
    return samples / max(result.seconds, 1e-9)


def balanced(pred: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean([(pred[y == c] == c).mean() for c in np.unique(y)]))


def bench_dataset(name: str, ds: SequenceSet, *, config: TrainConfig, splits: int, device: str) -> dict:
    row: dict = {"dataset": name, "shape": list(ds.shape), "layout": ds.layout.name,
                 "classes": ds.num_classes}
    truth = ds.y_true if ds.y_true is not None else ds.y
    # 1. one annotation round on the labels the set comes with
    if (ds.y >= 0).any() and (ds.y < 0).any():
        res, wall, cpu = timed(lambda: fit(ds, ds.y, config=config))
        emb, ewall, ecpu = timed(lambda: embed(res.model, ds))
        unl = (ds.y < 0) & (truth >= 0)
        row["round"] = {
            "labels": int((ds.y >= 0).sum()), "fit_wall_s": wall, "fit_cpu_s": cpu,
            "epochs": len(res.history), "best_epoch": res.best_epoch,
            "embed_wall_s": ewall, "embed_cpu_s": ecpu,
            "unlabeled_acc": float((emb.probs.argmax(1)[unl] == truth[unl]).mean()),
            "train_samples_per_s": fit_throughput(res),
        }
    # 2. all labels, stratified splits, against flat baselines
    labeled = np.flatnonzero(truth >= 0)
    accs, bals, lr_accs, lr_bals, nn_accs, fits = [], [], [], [], [], []
    flat = ds.x.reshape(ds.n, -1)
    for split in range(splits):
        tr, te = train_test_split(labeled, test_size=0.3, stratify=truth[labeled], random_state=split)
        lab = np.full(ds.n, -1, dtype=np.int64)
        lab[tr] = truth[tr]
        res, wall, cpu = timed(lambda: fit(ds, lab, config=dataclasses.replace(config, seed=split)))
        emb, ewall, _ = timed(lambda: embed(res.model, ds))
        pred = emb.probs.argmax(1)
        accs.append(float((pred[te] == truth[te]).mean()))
        bals.append(balanced(pred[te], truth[te]))
        fits.append({"wall_s": wall, "cpu_s": cpu, "epochs": len(res.history),
                     "best_epoch": res.best_epoch, "train_samples_per_s": fit_throughput(res),
                     "embed_wall_s": ewall, "embed_samples_per_s": ds.n / max(ewall, 1e-9)})
        scaler = StandardScaler().fit(flat[tr])
        a, b = scaler.transform(flat[tr]), scaler.transform(flat[te])
        lr = LogisticRegression(max_iter=5000).fit(a, truth[tr])
        lr_accs.append(float(lr.score(b, truth[te])))
        lr_bals.append(balanced(lr.predict(b), truth[te]))
        nn_accs.append(float(KNeighborsClassifier(1).fit(a, truth[tr]).score(b, truth[te])))
    row["all_labels"] = {
        "splits": splits, "test_size": len(te), "acc": accs, "balanced_acc": bals,
        "baseline_logreg_acc": lr_accs, "baseline_logreg_balanced_acc": lr_bals,
        "baseline_1nn_acc": nn_accs, "fits": fits,
        "mean_acc": float(np.mean(accs)), "mean_baseline_acc": float(np.mean(lr_accs)),
        "mean_balanced_acc": float(np.mean(bals)),
        "mean_baseline_balanced_acc": float(np.mean(lr_bals)),
    }
    row["train_samples_per_s"] = float(np.mean([f["train_samples_per_s"] for f in fits]))
    row["embed_samples_per_s"] = float(np.mean([f["embed_samples_per_s"] for f in fits]))
    row["peak_memory_mb"] = peak_memory_mb(device)
    return row


def bench_ntu_size(*, config: TrainConfig, device: str, n: int = 256) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for label, cfg, count in (("ntu_size small", config, n),
                              ("ntu_size paper", paper_config(device=config.device,
                                                              num_threads=config.num_threads),
                               n if device.startswith("cuda") else 32)):
        x = rng.normal(0, 0.3, size=(count, 3, 64, 25, 2)).astype(np.float32)
        y = (np.arange(count) % 60).astype(np.int64)
        ds = SequenceSet(x=x, ids=np.array([f"n{i}" for i in range(count)]),
                         classes=tuple(f"a{c}" for c in range(60)), y=y, layout=get_layout("ntu25"))
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        cfg = dataclasses.replace(cfg, epochs=2, holdout=0.0)
        res, wall, _ = timed(lambda: fit(ds, y, config=cfg))
        emb, ewall, _ = timed(lambda: embed(res.model, ds, batch_size=cfg.batch_size))
        rows.append({"dataset": label, "shape": list(ds.shape), "layout": "ntu25", "classes": 60,
                     "model": cfg.model, "params": sum(p.numel() for p in res.model.parameters()),
                     "train_samples_per_s": fit_throughput(res),
                     "embed_samples_per_s": count / max(ewall, 1e-9),
                     "peak_memory_mb": peak_memory_mb(device)})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+",
                    default=["synthetic_actions", "basicmotions", "natops", "ntu_size"])
    ap.add_argument("--splits", type=int, default=3, help="stratified splits per dataset")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train.json"))
    args = ap.parse_args(argv)

    device = select_device(args.device)
    config = TrainConfig(device=args.device, num_threads=args.threads)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name in args.datasets:
        if name == "ntu_size":
            rows += bench_ntu_size(config=config, device=device)
            continue
        raw = load(name)
        if raw is None:
            print(f"{name}: not found, skipped")
            continue
        ds = preprocess(raw, PreprocessConfig())
        rows.append(bench_dataset(name, ds, config=config, splits=args.splits, device=device))
        print(f"{name}: done", flush=True)

    print()
    print(f"device {device}, torch threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}")
    head = (f"{'dataset':<20} {'N':>5} {'acc':>6} {'LR':>6} {'bal':>6} {'LR bal':>6} {'1-NN':>6}"
            f" {'train/s':>8} {'embed/s':>8} {'peakMB':>7} {'round fit s':>11} {'embed s':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        al, rd = r.get("all_labels"), r.get("round")
        acc = lambda k: f"{al[k]:6.3f}" if al else f"{'':>6}"  # noqa: E731
        nn_acc = f"{np.mean(al['baseline_1nn_acc']):6.3f}" if al else f"{'':>6}"
        print(f"{r['dataset']:<20} {r['shape'][0]:>5} {acc('mean_acc')} {acc('mean_baseline_acc')}"
              f" {acc('mean_balanced_acc')} {acc('mean_baseline_balanced_acc')} {nn_acc}"
              f" {r['train_samples_per_s']:8.1f} {r['embed_samples_per_s']:8.1f}"
              f" {r['peak_memory_mb']:7.0f}"
              f" {rd['fit_wall_s'] if rd else float('nan'):11.1f} {rd['embed_wall_s'] if rd else float('nan'):8.2f}")
    checks = {}
    for r in rows:
        if r["dataset"] in ("synthetic_actions", "basicmotions"):
            al = r["all_labels"]
            checks[f"{r['dataset']}: model beats logistic regression"] = \
                al["mean_acc"] > al["mean_baseline_acc"]
            if "round" in r:
                checks[f"{r['dataset']}: embed whole sample < 10 s"] = r["round"]["embed_wall_s"] < 10
    for r in rows:
        if r["dataset"] == "natops":
            al = r["all_labels"]
            checks["natops: model beats logistic regression"] = al["mean_acc"] > al["mean_baseline_acc"]
    print()
    for k, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {k}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": device, "threads": torch.get_num_threads(),
                               "config": dataclasses.asdict(config), "rows": rows,
                               "checks": checks}, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

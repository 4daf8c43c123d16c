"""Ablation of the propagation engine on the real sets in ../shared/data (plain features).

Features: each set read with ``speler.formats.read``, preprocessed (``speler.data.transforms``:
resampled to --frames frames, skeletons centred, view-aligned and, since ``preprocess.scale``,
scaled; series z-scored), flattened and standardised per feature (optionally reduced by PCA). Protocol: ``speler.data.protocol.long_tail_split``
(N_c = n_1 π^-(c-1)/(C-1), a share γ of each class labeled, at least one), metrics on the unlabeled
samples. "Rare" classes are the last third of classes by kept size (at least one).

Rows (all on the same kNN graph per run, except LabelSpreading, which builds its own):
  paper LP          α = 0.99, one-hot seeds, no balance (the paper's α)
  naive balanced    α = 0.99, seeds divided by |L_c| (as Iscen et al.) and spectral balance with p
                    from labels + predictions: the straightforward implementation
  plain LP          the defaults (GraphConfig / PropagationConfig) with balance off
  + balance         the defaults (balance on)
  + energy          the defaults; the labels are those of "+ balance", the row adds the quality of the
                    reliable subset (coverage, precision, macro-F1) against the same number of samples
                    chosen by largest margin, and against the energy with the prior corrected twice
  LabelSpreading    scikit-learn LabelSpreading(kernel="knn", n_neighbors=10), defaults otherwise

``--sweep`` adds macro-F1 of plain vs balanced propagation over α and k (and γ = 1 vs 3).
Prints tables and writes benchmarks/results/ablation_propagation.json.

    .venv/bin/python benchmarks/ablation_propagation.py [--seeds 5] [--sweep]
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from sklearn.metrics import f1_score
from sklearn.semi_supervised import LabelSpreading

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from speler.config import GraphConfig, PreprocessConfig, PropagationConfig  # noqa: E402
from speler.data.protocol import long_tail_split  # noqa: E402
from speler.data.transforms import preprocess  # noqa: E402
from speler.formats import read  # noqa: E402
from speler.graph.knn import affinity, build_knn  # noqa: E402
from speler.graph.propagate import (  # noqa: E402
    balance_weights, estimate_prior, normalized_operator, propagate,
)

DATA = ROOT.parent / "shared" / "data"
SETS = {
    "MSRAction3D": "MSRAction3D",
    "UTKinect": "UTKinect-Action3D",
    "NATOPS": "NATOPS",
    "Epilepsy": "Epilepsy_UEA",
    "BasicMotions": "BasicMotions",
}
ROWS = ["paper LP", "naive balanced", "plain LP", "+ balance", "+ energy", "LabelSpreading"]


def features(folder: str, *, frames: int, pca: int) -> tuple[np.ndarray, np.ndarray]:
    ds = read(DATA / folder)
    truth = ds.y_true if ds.y_true is not None else ds.y
    ds = preprocess(ds, PreprocessConfig(frames=frames, persons=1))
    x = ds.x.reshape(ds.n, -1).astype(np.float64)
    x = (x - x.mean(0)) / (x.std(0) + 1e-8)
    if pca:
        u, s, _ = np.linalg.svd(x - x.mean(0), full_matrices=False)
        x = u[:, :pca] * s[:pca]
    return x.astype(np.float32), truth.astype(np.int64)


def metrics(pred: np.ndarray, y: np.ndarray, unl: np.ndarray, rare: np.ndarray) -> dict:
    yt, yp = y[unl], pred[unl]
    present = np.unique(yt)
    rec = [float(((yp == c) & (yt == c)).sum() / (yt == c).sum()) for c in rare if (yt == c).any()]
    return {
        "macro_f1": float(f1_score(yt, yp, labels=present, average="macro", zero_division=0)),
        "accuracy": float((yt == yp).mean()),
        "rare_recall": float(np.mean(rec)) if rec else float("nan"),
        "share_pred_rare": float(np.isin(yp, rare).mean()),
        "share_true_rare": float(np.isin(yt, rare).mean()),
    }


def subset_quality(pick: np.ndarray, pred: np.ndarray, y: np.ndarray, unl: np.ndarray) -> dict:
    sel = pick & unl
    if not sel.any():
        return {"coverage": 0.0, "precision": float("nan"), "macro_f1": float("nan")}
    present = np.unique(y[sel])
    return {
        "coverage": float(sel.sum() / unl.sum()),
        "precision": float((pred[sel] == y[sel]).mean()),
        "macro_f1": float(f1_score(y[sel], pred[sel], labels=present, average="macro",
                                   zero_division=0)),
    }


def naive_balanced(W: sp.csr_matrix, lab: np.ndarray, C: int, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Seeds / |L_c| plus spectral balance (p from labels + predictions), α as given.

    Returns (labels, scores); the scores feed the "prior corrected twice" energy."""
    n = len(lab)
    L = lab >= 0
    counts = np.bincount(lab[L], minlength=C).astype(np.float64)
    Y = np.zeros((n, C))
    Y[L, lab[L]] = 1.0 / counts[lab[L]]
    M0 = _solve(normalized_operator(W), Y, alpha)
    pred0 = np.where(L, lab, M0.argmax(1))
    p = estimate_prior(lab, pred0, C)
    S = normalized_operator(W, balance_weights(lab, p, predictions=pred0))
    M = _solve(S, Y, alpha)
    return np.where(L, lab, M.argmax(1)), M


def paper_energy(scores: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """-logsumexp_j(M_ij / p_j) with M scaled so the median top score is 10 (ranking only)."""
    u = scores / prior[None, :]
    top = u.max(1)
    s = float(np.median(top[top > 0])) if (top > 0).any() else 1.0
    z = 10.0 * u / s
    zmax = z.max(1, keepdims=True)
    return -(zmax[:, 0] + np.log(np.exp(z - zmax).sum(1)))


def _solve(S: sp.csr_matrix, Y: np.ndarray, alpha: float) -> np.ndarray:
    A = (sp.identity(S.shape[0], format="csr") - alpha * S.astype(np.float64)).tocsc()
    return sp.linalg.splu(A).solve((1 - alpha) * Y)


def label_spreading(x: np.ndarray, lab: np.ndarray) -> np.ndarray:
    xn = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LabelSpreading(kernel="knn", n_neighbors=10).fit(xn, lab)
    return model.transduction_.astype(np.int64)


def run_one(x, y, split, gcfg: GraphConfig, pcfg: PropagationConfig) -> dict:
    keep, labeled = split.keep, split.labeled
    xs, ys = x[keep], y[keep]
    C = int(y.max()) + 1
    lab = np.where(labeled, ys, -1)
    unl = ~labeled
    order = np.argsort(-split.class_sizes, kind="stable")
    rare = order[-max(1, C // 3):]
    W = affinity(build_knn(xs, config=gcfg), gamma=gcfg.gamma)
    out: dict[str, dict] = {}
    paper = propagate(W, lab, num_classes=C,
                      config=replace(pcfg, alpha=0.99, balance=False, seed_exponent=0.0))
    out["paper LP"] = metrics(paper.labels, ys, unl, rare)
    naive, naive_scores = naive_balanced(W, lab, C, 0.99)
    out["naive balanced"] = metrics(naive, ys, unl, rare)
    plain = propagate(W, lab, num_classes=C, config=replace(pcfg, balance=False))
    out["plain LP"] = metrics(plain.labels, ys, unl, rare)
    bal = propagate(W, lab, num_classes=C, config=pcfg)
    out["+ balance"] = metrics(bal.labels, ys, unl, rare)
    row = dict(out["+ balance"])
    rel = subset_quality(bal.reliable, bal.labels, ys, unl)
    m = int(rel["coverage"] * unl.sum() + 0.5)
    cand = np.flatnonzero(unl)

    def top(score: np.ndarray) -> np.ndarray:  # the m unlabeled samples with the lowest score
        pick = np.zeros(len(ys), dtype=bool)
        pick[cand[np.argsort(score[cand], kind="stable")[:m]]] = True
        return pick

    def precision(pick: np.ndarray, labels: np.ndarray) -> float:
        return subset_quality(pick, labels, ys, unl)["precision"]

    # The paper's energy -logsumexp(M / p), on one-hot seeds (prior corrected once) and on seeds
    # divided by |L_c| (twice); only its ranking matters here, and argmax(M / p) as a classifier.
    p_once = bal.prior.astype(np.float64)
    naive_p = estimate_prior(lab, naive, C)
    once_labels = np.where(labeled, ys, (bal.scores / p_once).argmax(1))
    twice_labels = np.where(labeled, ys, (naive_scores / naive_p).argmax(1))
    row.update({
        "reliable_coverage": rel["coverage"], "reliable_precision": rel["precision"],
        "reliable_macro_f1": rel["macro_f1"],
        "energy_rank_precision": precision(top(bal.energy), bal.labels),
        "margin_rank_precision": precision(top(-bal.margin), bal.labels),
        "margin_rank_macro_f1": subset_quality(top(-bal.margin), bal.labels, ys, unl)["macro_f1"],
        "paper_energy_once_rank_precision": precision(top(paper_energy(bal.scores, p_once)),
                                                      bal.labels),
        "paper_energy_twice_rank_precision": precision(top(paper_energy(naive_scores, naive_p)),
                                                       naive),
        "accuracy_labels": float((bal.labels[unl] == ys[unl]).mean()),
        "accuracy_argmax_M_over_p_once": float((once_labels[unl] == ys[unl]).mean()),
        "accuracy_argmax_M_over_p_twice": float((twice_labels[unl] == ys[unl]).mean()),
        "iterations": bal.solve.iterations,
        "first_pass_iterations": bal.solve.first_pass_iterations,
    })
    out["+ energy"] = row
    out["LabelSpreading"] = metrics(label_spreading(xs, lab), ys, unl, rare)
    return out


def sweep_one(x, y, split, gcfg: GraphConfig, pcfg: PropagationConfig, ks, alphas) -> dict:
    keep, labeled = split.keep, split.labeled
    xs, ys = x[keep], y[keep]
    C = int(y.max()) + 1
    lab = np.where(labeled, ys, -1)
    order = np.argsort(-split.class_sizes, kind="stable")
    rare = order[-max(1, C // 3):]
    out = {}
    for gamma in (1.0, 3.0):
        for k in ks:
            if gamma != gcfg.gamma and k != gcfg.k:
                continue
            W = affinity(build_knn(xs, config=replace(gcfg, k=k)), gamma=gamma)
            for a, bal in itertools.product(alphas, (False, True)):
                if gamma != gcfg.gamma and a != pcfg.alpha:
                    continue
                r = propagate(W, lab, num_classes=C, config=replace(pcfg, alpha=a, balance=bal))
                out[f"g{gamma:g}_k{k}_a{a:g}_{'bal' if bal else 'plain'}"] = metrics(
                    r.labels, ys, ~labeled, rare)["macro_f1"]
    return out


def rounded(obj, digits: int = 4):
    """The same structure with floats rounded (keeps the JSON small)."""
    if isinstance(obj, float):
        return round(obj, digits)
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [rounded(v, digits) for v in obj]
    return obj


def mean_of(runs: list[dict], key: str) -> float:
    vals = [r[key] for r in runs if key in r and r[key] == r[key]]
    return float(np.mean(vals)) if vals else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--imbalance", type=float, nargs="+", default=[10.0, 50.0])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.05, 0.10])
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--pca", type=int, default=0)
    ap.add_argument("--sets", nargs="+", default=list(SETS))
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ablation_propagation.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    missing = [s for s in args.sets if not (DATA / SETS[s]).exists()]
    if missing:
        print(f"skipping sets not found under {DATA}: {', '.join(missing)}")
    sets = [s for s in args.sets if s not in missing]
    gcfg, pcfg = GraphConfig(), PropagationConfig()
    ks, alphas = [10, 20, 40], [0.5, 0.7, 0.8, 0.9, 0.99]
    runs: dict[str, dict[str, list]] = {s: {r: [] for r in ROWS} for s in sets}
    sweeps: dict[str, list] = {s: [] for s in sets}
    settings = list(itertools.product(args.imbalance, args.ratios, range(args.seeds)))
    t0 = time.perf_counter()
    for s in sets:
        x, y = features(SETS[s], frames=args.frames, pca=args.pca)
        for imb, ratio, seed in settings:
            split = long_tail_split(y, imbalance=imb, labeled_ratio=ratio, seed=seed)
            res = run_one(x, y, split, gcfg, pcfg)
            for r in ROWS:
                runs[s][r].append({"imbalance": imb, "ratio": ratio, "seed": seed, **res[r]})
            if args.sweep:
                sweeps[s].append(sweep_one(x, y, split, gcfg, pcfg, ks, alphas))
        print(f"{s}: {len(settings)} runs, {time.perf_counter() - t0:.0f} s", flush=True)

    cols = ["macro_f1", "accuracy", "rare_recall", "share_pred_rare", "share_true_rare"]
    summary = {}
    print(f"\nDefaults: graph k={gcfg.k} gamma={gcfg.gamma}; propagation alpha={pcfg.alpha} "
          f"balance={pcfg.balance} tau_hat={pcfg.tau_hat}. Means over imbalance {args.imbalance} x "
          f"labeled {args.ratios} x {args.seeds} seeds.\n")
    print(f"{'macro-F1':16s}" + "".join(f"{s[:11]:>12s}" for s in sets) + f"{'mean':>8s}"
          + "".join(f"{c[:13]:>15s}" for c in cols[1:]))
    for r in ROWS:
        per = [mean_of(runs[s][r], "macro_f1") for s in sets]
        allr = [x for s in sets for x in runs[s][r]]
        summary[r] = {"macro_f1_per_set": dict(zip(sets, per)), "macro_f1": float(np.mean(per))}
        summary[r].update({c: mean_of(allr, c) for c in cols[1:]})
        print(f"{r:16s}" + "".join(f"{v:12.3f}" for v in per) + f"{np.mean(per):8.3f}"
              + "".join(f"{summary[r][c]:15.3f}" for c in cols[1:]))
    # paired differences of the defaults against the other rows
    diffs = {}
    for r in ["plain LP", "LabelSpreading", "paper LP", "naive balanced"]:
        d = np.array([a["macro_f1"] - b["macro_f1"] for s in sets
                      for a, b in zip(runs[s]["+ balance"], runs[s][r])])
        diffs[r] = {"mean": float(d.mean()), "stderr": float(d.std(ddof=1) / np.sqrt(len(d))),
                    "wins": int((d > 0).sum()), "losses": int((d < 0).sum()), "runs": len(d)}
        print(f"defaults - {r:15s}: {d.mean():+.4f} ± {diffs[r]['stderr']:.4f} macro-F1 "
              f"(wins {diffs[r]['wins']}, losses {diffs[r]['losses']} of {len(d)})")
    en = [x for s in sets for x in runs[s]["+ energy"]]
    keys = ["reliable_coverage", "reliable_precision", "reliable_macro_f1",
            "energy_rank_precision", "margin_rank_precision", "margin_rank_macro_f1",
            "paper_energy_once_rank_precision", "paper_energy_twice_rank_precision",
            "accuracy_labels", "accuracy_argmax_M_over_p_once", "accuracy_argmax_M_over_p_twice",
            "iterations", "first_pass_iterations"]
    energy = {k: mean_of(en, k) for k in keys}
    print("\nEnergy reliability (defaults; *_rank_precision: precision of the same number of "
          "samples ranked by that score):")
    for k in keys:
        print(f"  {k:38s} {energy[k]:.3f}")
    by_setting = {}
    print("\nmacro-F1 by setting (mean over sets):")
    for imb, ratio in itertools.product(args.imbalance, args.ratios):
        line = f"  pi={imb:g} labeled={ratio:g}:"
        for r in ROWS:
            v = np.mean([np.mean([x["macro_f1"] for x in runs[s][r]
                                  if x["imbalance"] == imb and x["ratio"] == ratio]) for s in sets])
            by_setting[f"{imb:g}/{ratio:g}/{r}"] = float(v)
            line += f"  {r} {v:.3f}"
        print(line)
    sweep_summary = {}
    if args.sweep:
        keys = sorted(sweeps[sets[0]][0])
        for k in keys:
            sweep_summary[k] = float(np.mean([np.mean([d[k] for d in sweeps[s]]) for s in sets]))
        print("\nSweep, macro-F1 (mean over sets): plain / balanced")
        for gamma in (1.0, 3.0):
            for k in ks:
                line = f"  gamma={gamma:g} k={k:3d}:"
                shown = False
                for a in alphas:
                    kp, kb = f"g{gamma:g}_k{k}_a{a:g}_plain", f"g{gamma:g}_k{k}_a{a:g}_bal"
                    if kp in sweep_summary:
                        shown = True
                        line += f"  a={a:g} {sweep_summary[kp]:.3f}/{sweep_summary[kb]:.3f}"
                if shown:
                    print(line)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rounded({
        "defaults": {"graph": gcfg.__dict__, "propagation": pcfg.__dict__},
        "protocol": {"imbalance": args.imbalance, "labeled_ratio": args.ratios,
                     "seeds": args.seeds, "frames": args.frames, "pca": args.pca},
        "summary": summary, "paired_vs_defaults": diffs, "energy": energy,
        "by_setting": by_setting, "sweep": sweep_summary, "runs": runs,
        "seconds": time.perf_counter() - t0,
    }), indent=1, default=float))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

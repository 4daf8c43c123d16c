"""Round quality on the real sets in ../shared/data: label-free views, round 0 and self-training.

    .venv/bin/python benchmarks/round_quality.py [--sets MSRAction3D NATOPS ...] [--seeds 5]
        [--imbalance 10 50] [--ratios 0.05 0.1] [--rounds 3] [--simulate] [--threads 1]

For each set, setting (long-tail protocol π, labeled share γ) and seed, on the same split:
  LabelSpreading   scikit-learn LabelSpreading(kernel="knn", n_neighbors=10) on the plain view
                   (the baseline a person gets from off-the-shelf tools)
  plain, rocket,   the library's propagation on one label-free view (``speler.features``)
  rocket_diff
  plain+rocket 1:1 both views' normalised graphs summed with equal weights
  floor            the round's floor: the views summed with the default weights (ViewsConfig)
  round 0          a default round end to end in memory (``speler.loop.build_state``: views,
                   network trained on the floor's pseudo-labels, cross-fitted judgement, final
                   propagation); "joined" counts the runs where the network joined the graph
  network forced   the same round's network always added to the floor (what the judge avoids)
  round 1..R       later rounds with no new human label: the network retrained (warm start) on
                   the previous round's reliable energy-weighted pseudo-labels
Every figure is on the samples without a human label: macro-F1, accuracy, rare-class recall
(rarest third of the classes) and share predicted rare against the true share. Also seconds per
round. ``--simulate`` adds the annotation simulation (every strategy, 6 rounds of 2 % of N,
scored on the samples still unlabeled; area under the macro-F1 curve over the label count).
Prints tables and writes benchmarks/results/round_quality.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from sklearn.semi_supervised import LabelSpreading  # noqa: E402

from speler.config import Config  # noqa: E402
from speler.data.protocol import make_partial  # noqa: E402
from speler.data.transforms import preprocess  # noqa: E402
from speler.features import VIEWS  # noqa: E402
from speler.formats import read  # noqa: E402
from speler.graph.knn import affinity, build_knn, combine_affinities  # noqa: E402
from speler.graph.propagate import propagate  # noqa: E402
from speler.loop import NETWORK, build_state, floor_weights, with_network  # noqa: E402
from speler.metrics import label_quality  # noqa: E402
from speler.selection import STRATEGIES  # noqa: E402
from speler.simulate import simulate  # noqa: E402
from speler.train import Checkpoint  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
SETS = ["MSRAction3D", "UTKinect-Action3D", "NATOPS", "Epilepsy_UEA", "BasicMotions"]
FIGURES = ("macro_f1", "accuracy", "tail_recall", "rare_share", "rare_true_share")


def quality(ds, labels) -> dict:
    q = label_quality(ds.y_true, labels, num_classes=ds.num_classes, mask=ds.y < 0)
    return {k: q[k] for k in FIGURES}


def label_spreading(view: np.ndarray, y: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LabelSpreading(kernel="knn", n_neighbors=10).fit(view, y).transduction_.astype(np.int64)


def run_one(ds, cfg: Config, rounds: int) -> dict:
    """Every row for one split ``ds`` (preprocessed, y = the few labels, y_true = truth)."""
    C, y = ds.num_classes, ds.y
    out: dict[str, dict] = {}
    t0 = time.perf_counter()
    built = build_state(ds, y, no=0, config=cfg)
    out["round 0"] = quality(ds, built.state.result.labels)
    out["round 0"].update(seconds=sum(built.stage_seconds.values()),
                          joined=float(built.judgement.joined),
                          judged=float(built.judgement.held_out > 0),
                          held_out=float(built.judgement.held_out),
                          judge_floor=built.judgement.floor,
                          judge_network=built.judgement.with_network)
    views = {v: built.state.embeddings[v] for v in VIEWS if v in built.state.embeddings}
    W = {v: affinity(build_knn(e, config=cfg.graph), gamma=cfg.graph.gamma) for v, e in views.items()}
    for v in W:
        out[v] = quality(ds, propagate(W[v], y, num_classes=C, config=cfg.propagation).labels)
    if {"plain", "rocket"} <= W.keys():
        both = combine_affinities([(W["plain"], 1.0), (W["rocket"], 1.0)])
        out["plain+rocket 1:1"] = quality(ds, propagate(both, y, num_classes=C,
                                                        config=cfg.propagation).labels)
    out["floor"] = quality(ds, built.floor.labels)
    if "plain" in views:
        out["LabelSpreading"] = quality(ds, label_spreading(views["plain"], y))
    if NETWORK in built.state.embeddings:
        vc = cfg.views
        parts = [(W[v], w) for v, w in floor_weights(cfg, views).items()]
        net_W = affinity(build_knn(built.state.embeddings[NETWORK], config=cfg.graph),
                         gamma=cfg.graph.gamma)
        forced = with_network(parts, net_W, vc.network_weight)
        out["network forced"] = quality(ds, propagate(forced, y, num_classes=C,
                                                      config=cfg.propagation).labels)
    state, fitted = built.state, built.fitted
    for r in range(1, rounds + 1):
        init = None if fitted is None else Checkpoint(
            model=fitted.model, config=cfg.train, classes=ds.classes, layout_name=ds.layout.name,
            fingerprint=ds.fingerprint(), extra={})
        t1 = time.perf_counter()
        nxt = build_state(ds, y, no=r, config=cfg, previous=state, init=init, views=views,
                          pretrained=built.pretrained)
        out[f"round {r}"] = quality(ds, nxt.state.result.labels)
        out[f"round {r}"].update(seconds=time.perf_counter() - t1,
                                 joined=float(nxt.judgement.joined))
        state, fitted = nxt.state, nxt.fitted
    out["_seconds"] = {"total": time.perf_counter() - t0}
    return out


def mean(values) -> float:
    v = [x for x in values if x == x]
    return float(np.mean(v)) if v else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sets", nargs="+", default=SETS)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--imbalance", type=float, nargs="+", default=[10.0, 50.0])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.05, 0.10])
    ap.add_argument("--rounds", type=int, default=3, help="rounds after round 0, no new labels")
    ap.add_argument("--simulate", action="store_true", help="also the annotation simulation")
    ap.add_argument("--sim-rounds", type=int, default=6)
    ap.add_argument("--sim-share", type=float, default=0.02, help="labels per round, share of N")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 on a 2-core box)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, e.g. views.network=never")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "round_quality.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(args.threads)
    from speler.config import apply_overrides

    cfg = apply_overrides(Config(), args.set)
    missing = [s for s in args.sets if not (DATA / s).exists()]
    if missing:
        print(f"skipping sets not found under {DATA}: {', '.join(missing)}")
    sets = [s for s in args.sets if s not in missing]
    load = os.getloadavg()
    print(f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; torch threads "
          f"{args.threads}", flush=True)
    settings = list(itertools.product(args.imbalance, args.ratios, range(args.seeds)))
    runs: dict[str, list[dict]] = {s: [] for s in sets}
    sims: dict[str, list[dict]] = {s: [] for s in sets}
    started = time.perf_counter()
    for s in sets:
        full = preprocess(read(DATA / s), cfg.preprocess)
        for imb, ratio, seed in settings:
            ds = make_partial(full, imbalance=imb, labeled_ratio=ratio, seed=seed)
            res = run_one(ds, cfg, args.rounds)
            runs[s].append({"imbalance": imb, "ratio": ratio, "seed": seed, "n": ds.n,
                            "labels": int((ds.y >= 0).sum()), **res})
            r0, fl = res["round 0"], res["floor"]
            print(f"{s} pi={imb:g} gamma={ratio:g} seed={seed}: n={ds.n} "
                  f"labels={int((ds.y >= 0).sum())} LS {res['LabelSpreading']['macro_f1']:.3f} "
                  f"plain {res['plain']['macro_f1']:.3f} floor {fl['macro_f1']:.3f} round0 "
                  f"{r0['macro_f1']:.3f} (joined {int(r0['joined'])}, {r0['seconds']:.0f} s)"
                  + "".join(f" r{r} {res[f'round {r}']['macro_f1']:.3f}"
                            for r in range(1, args.rounds + 1)), flush=True)
        if args.simulate:
            for seed in range(args.seeds):
                ds = make_partial(full, imbalance=args.imbalance[0], labeled_ratio=args.ratios[0],
                                  seed=seed)
                budget = max(1, round(args.sim_share * ds.n))
                sim = simulate(ds, strategies=list(STRATEGIES), rounds=args.sim_rounds,
                               budget=budget, seed=seed, config=cfg, name=s)
                sims[s].append({"seed": seed, "budget": budget, "auc": sim.auc,
                                "curves": sim.curves, "seconds": sim.seconds})
                print(f"{s} simulation seed={seed} budget={budget}: " + ", ".join(
                    f"{k} {v:.3f}" for k, v in sim.auc.items()), flush=True)

    rows = ["LabelSpreading", "plain", "rocket", "rocket_diff", "plain+rocket 1:1", "floor", "network forced",
            "round 0"] + [f"round {r}" for r in range(1, args.rounds + 1)]
    summary: dict = {"by_setting": {}, "rows": {}}
    print(f"\nmacro-F1 on unlabeled samples, mean over seeds (and settings for 'all'), "
          f"{time.perf_counter() - started:.0f} s in all")
    for imb, ratio in list(itertools.product(args.imbalance, args.ratios)) + [(None, None)]:
        label = "all settings" if imb is None else f"pi={imb:g} gamma={ratio:g}"
        print(f"\n[{label}]\n{'row':18s}" + "".join(f"{s[:11]:>12s}" for s in sets)
              + f"{'mean':>8s}{'acc':>7s}{'rareRec':>8s}{'rare':>7s}{'true':>7s}{'sec':>6s}")
        block = {}
        for r in rows:
            sel = {s: [x for x in runs[s] if r in x and (imb is None or (
                x["imbalance"] == imb and x["ratio"] == ratio))] for s in sets}
            if not any(sel.values()):
                continue
            per = [mean(x[r]["macro_f1"] for x in sel[s]) for s in sets]
            allx = [x[r] for s in sets for x in sel[s]]
            fig = {k: mean(x[k] for x in allx) for k in FIGURES}
            sec = mean(x.get("seconds", float("nan")) for x in allx)
            block[r] = {"macro_f1_per_set": dict(zip(sets, per)), "macro_f1": mean(per), **fig,
                        "seconds": sec}
            if "joined" in allx[0]:
                block[r]["joined_share"] = mean(x["joined"] for x in allx)
            print(f"{r:18s}" + "".join(f"{v:12.3f}" for v in per) + f"{mean(per):8.3f}"
                  + f"{fig['accuracy']:7.3f}{fig['tail_recall']:8.3f}{fig['rare_share']:7.3f}"
                  + f"{fig['rare_true_share']:7.3f}{sec:6.1f}")
        summary["by_setting" if imb is not None else "rows"][label] = block
    # the targets, paired over seeds
    targets = {}
    for imb, ratio in itertools.product(args.imbalance, args.ratios):
        key = f"pi={imb:g} gamma={ratio:g}"
        per_set = {}
        for s in sets:
            sel = [x for x in runs[s] if x["imbalance"] == imb and x["ratio"] == ratio]
            if not sel:
                continue
            base = max(mean(x["LabelSpreading"]["macro_f1"] for x in sel),
                       mean(x["plain"]["macro_f1"] for x in sel))
            d = np.array([x["round 0"]["macro_f1"] - x["floor"]["macro_f1"] for x in sel])
            per_set[s] = {
                "floor_gain": mean(x["floor"]["macro_f1"] for x in sel) - base,
                "round0_gain": mean(x["round 0"]["macro_f1"] for x in sel) - base,
                "round0_minus_floor": float(d.mean()),
                # n/a where the rare classes kept no unlabeled sample (π = 50 on small sets)
                "rare_share_ratio": (mean(x["round 0"]["rare_share"] for x in sel)
                                     / mean(x["round 0"]["rare_true_share"] for x in sel))
                if mean(x["round 0"]["rare_true_share"] for x in sel) > 0.01 else float("nan"),
            }
        targets[key] = per_set
        print(f"\n{key}: gain over max(LabelSpreading, plain), points (floor / round 0), "
              f"round 0 - floor (paired mean), predicted/true rare share")
        for s, t in per_set.items():
            print(f"  {s:18s} {100 * t['floor_gain']:+6.1f} / {100 * t['round0_gain']:+6.1f}   "
                  f"{100 * t['round0_minus_floor']:+5.1f}   {t['rare_share_ratio']:.2f}")
        if per_set:
            print(f"  {'mean':18s} {100 * mean(t['floor_gain'] for t in per_set.values()):+6.1f} / "
                  f"{100 * mean(t['round0_gain'] for t in per_set.values()):+6.1f}")
    sim_summary = {}
    if args.simulate:
        print("\nsimulation: area under the macro-F1 curve (unlabeled samples only), mean over seeds")
        print(f"{'strategy':12s}" + "".join(f"{s[:11]:>12s}" for s in sets) + f"{'mean':>8s}")
        for st in STRATEGIES:
            per = [mean(x["auc"][st] for x in sims[s]) for s in sets]
            sim_summary[st] = {"per_set": dict(zip(sets, per)), "mean": mean(per)}
            print(f"{st:12s}" + "".join(f"{v:12.3f}" for v in per) + f"{mean(per):8.3f}")
    load = os.getloadavg()
    print(f"\nload average at end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "config": cfg.to_dict(), "settings": {"imbalance": args.imbalance, "ratios": args.ratios,
                                              "seeds": args.seeds, "rounds": args.rounds},
        "summary": summary, "targets": targets, "simulation": sim_summary,
        "runs": runs, "simulations": sims, "seconds": time.perf_counter() - started,
    }, indent=1, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

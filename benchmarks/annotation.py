"""Simulated annotation on real and bundled sets: every query strategy, same seeds, same start.

    python benchmarks/annotation.py [--datasets msr natops synthetic_actions basicmotions]
                                    [--rounds 5] [--budget 10] [--seeds 0 1 2] [--retrain-every 0]

For each dataset and seed: the protocol split (imbalance π, labeled ratio γ) of the fully labeled
set (bundled samples already come split), one round-0 model shared by all strategies, then R rounds
of b labels answered from the truth. Prints macro-F1 / accuracy / tail recall after the last round
and the area under the macro-F1 curve per strategy (``random`` is the baseline in the same run),
writes benchmarks/results/annotation.json and one Plotly HTML of the curves per dataset.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from speler.config import Config  # noqa: E402
from speler.data.protocol import make_partial  # noqa: E402
from speler.data.samples import load_sample  # noqa: E402
from speler.data.transforms import preprocess  # noqa: E402
from speler.selection import STRATEGIES  # noqa: E402
from speler.simulate import simulate  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
REAL = {
    "msr": (SHARED / "MSRAction3D", dict(imbalance=10, labeled_ratio=0.1)),
    "natops": (SHARED / "NATOPS", dict(imbalance=10, labeled_ratio=0.05)),
    "utkinect": (SHARED / "UTKinect-Action3D", dict(imbalance=5, labeled_ratio=0.1)),
}


def load(name: str, seed: int, config: Config):
    if name in REAL:
        from speler.formats import read

        path, proto = REAL[name]
        if not path.exists():
            return None
        ds = read(path)
        ds = make_partial(ds, seed=seed, min_labeled_per_class=1, **proto)
    else:
        ds = load_sample(name)
    return preprocess(ds, config.preprocess)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["msr", "natops", "synthetic_actions", "basicmotions"])
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--budget", type=int, default=10)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--retrain-every", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    config = Config()
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"config": config.to_dict(), "rounds": args.rounds, "budget": args.budget,
                    "seeds": args.seeds, "retrain_every": args.retrain_every, "datasets": {}}
    for name in args.datasets:
        per_seed = []
        for seed in args.seeds:
            ds = load(name, seed, config)
            if ds is None:
                print(f"{name}: data folder missing, skipped")
                break
            t0 = time.perf_counter()
            res = simulate(ds, strategies=args.strategies, rounds=args.rounds, budget=args.budget,
                           seed=seed, config=config, retrain_every=args.retrain_every, name=name)
            print(f"{name} seed {seed}: n={ds.n} classes={ds.num_classes} "
                  f"labels={int((ds.y >= 0).sum())} train {res.train_seconds:.1f}s total {time.perf_counter() - t0:.1f}s")
            per_seed.append(res)
        if not per_seed:
            continue
        rows = {}
        for s in args.strategies:
            curves = np.array([[c["macro_f1"] for c in r.curves[s]] for r in per_seed])
            last = [r.curves[s][-1] for r in per_seed]
            rows[s] = {
                "auc_macro_f1": float(np.mean([r.auc[s] for r in per_seed])),
                "auc_std": float(np.std([r.auc[s] for r in per_seed])),
                "final_macro_f1": float(np.mean([c["macro_f1"] for c in last])),
                "final_accuracy": float(np.mean([c["accuracy"] for c in last])),
                "final_tail_recall": float(np.nanmean([c["tail_recall"] for c in last])),
                "start_macro_f1": float(np.mean([r.curves[s][0]["macro_f1"] for r in per_seed])),
                "labels": [c["labels"] for c in per_seed[0].curves[s]],
                "mean_curve": curves.mean(axis=0).tolist(),
            }
        best = max(rows, key=lambda s: rows[s]["auc_macro_f1"])
        report["datasets"][name] = {"strategies": rows, "best": best}
        print(f"\n{name}: {len(per_seed)} seeds, {args.rounds} rounds x {args.budget} labels")
        print(f"{'strategy':<10} {'AUC mF1':>9} {'±':>6} {'start':>7} {'final mF1':>10} {'final acc':>10} {'tail rec':>9}")
        for s, r in sorted(rows.items(), key=lambda kv: -kv[1]["auc_macro_f1"]):
            print(f"{s:<10} {r['auc_macro_f1']:9.4f} {r['auc_std']:6.4f} {r['start_macro_f1']:7.4f} "
                  f"{r['final_macro_f1']:10.4f} {r['final_accuracy']:10.4f} {r['final_tail_recall']:9.4f}")
        try:
            from speler.viz import curves_figure

            fig = curves_figure({s: (rows[s]["labels"], rows[s]["mean_curve"]) for s in rows},
                                y_title="macro-F1 of final labels")
            fig.update_layout(title=f"{name}: macro-F1 vs human labels (mean of {len(per_seed)} seeds)")
            fig.write_html(args.out / f"annotation_{name}.html", include_plotlyjs="cdn")
        except ImportError:
            pass
    (args.out / "annotation.json").write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out / 'annotation.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

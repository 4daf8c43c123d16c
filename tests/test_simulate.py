"""Simulated annotation: honest curves (samples without a human label only) and their area."""

from __future__ import annotations

import json

import numpy as np
import pytest

from speler.cli import main
from speler.config import Config, apply_overrides
from speler.data.transforms import preprocess
from speler.errors import DataFormatError
from speler.metrics import label_quality
from speler.simulate import curve_area, simulate
from factories import make_skeleton_set

FLOOR_ONLY = ["views.network=never", "views.rocket_features=500", "views.dim=16"]


def _config() -> Config:
    return apply_overrides(Config(), FLOOR_ONLY)


def test_curve_area_is_the_trapezoid_over_label_counts():
    curve = [{"labels": 10, "macro_f1": 0.5}, {"labels": 20, "macro_f1": 0.7},
             {"labels": 40, "macro_f1": 0.8}]
    # (10 · 0.6 + 20 · 0.75) / 30
    assert curve_area(curve) == pytest.approx((10 * 0.6 + 20 * 0.75) / 30)
    assert curve_area(curve[:1]) == pytest.approx(0.5)
    # unequal steps weigh by the labels they cost, not by the round
    assert curve_area(curve) != pytest.approx(np.mean([0.5, 0.7, 0.8]))


def test_simulation_scores_only_samples_without_a_human_label():
    ds = preprocess(make_skeleton_set(n=60, classes=3, labeled=0.1, seed=4), Config().preprocess)
    res = simulate(ds, strategies=["random", "speler"], rounds=3, budget=5, config=_config())
    start = int((ds.y >= 0).sum())
    for strategy, curve in res.curves.items():
        assert [c["round"] for c in curve] == [0, 1, 2, 3]
        assert [c["labels"] for c in curve] == [start + 5 * r for r in range(4)]
        # every point is scored on the samples still unlabeled at that point
        assert [c["n"] for c in curve] == [ds.n - c["labels"] for c in curve]
        assert res.auc[strategy] == pytest.approx(curve_area(curve))
    # round 0 is the same start for every strategy, scored like a round's own metrics
    assert res.curves["random"][0] == res.curves["speler"][0]


def test_simulation_round_zero_matches_the_honest_score_of_the_floor():
    from speler.loop import build_state

    ds = preprocess(make_skeleton_set(n=60, classes=3, labeled=0.1, seed=5), Config().preprocess)
    res = simulate(ds, strategies=["random"], rounds=0, budget=5, config=_config())
    state = build_state(ds, ds.y, no=0, config=_config()).state
    want = label_quality(ds.y_true, state.result.labels, num_classes=ds.num_classes,
                         mask=ds.y < 0)
    assert res.curves["random"][0]["macro_f1"] == pytest.approx(want["macro_f1"])


def test_simulation_needs_the_truth_and_known_strategies():
    ds = make_skeleton_set(n=20)
    with pytest.raises(DataFormatError, match="y_true"):
        simulate(ds.replace(y_true=None), config=_config())
    with pytest.raises(DataFormatError, match="unknown strategy 'oracle'"):
        simulate(ds, strategies=["oracle"], config=_config())


def test_cli_simulate_writes_the_curves(tmp_path, capsys):
    out = tmp_path / "sim.json"
    code = main(["simulate", "--sample", "basicmotions", "--rounds", "2", "--budget", "3",
                 "--strategies", "random", "lp-margin", "--out", str(out),
                 *sum((["--set", s] for s in FLOOR_ONLY), [])])
    assert code == 0, capsys.readouterr().err
    saved = json.loads(out.read_text())
    assert set(saved["curves"]) == {"random", "lp-margin"}
    for s, curve in saved["curves"].items():
        assert len(curve) == 3
        assert saved["auc"][s] == pytest.approx(curve_area(curve))
    assert out.with_suffix(".html").is_file()
    text = capsys.readouterr().out
    assert "AUC macro-F1" in text and "lp-margin" in text

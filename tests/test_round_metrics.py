"""Typed round metrics: what the store keeps (``to_json``) and reads back from any version."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from speler.round_metrics import (
    FoldScore, JudgementMetrics, KnnMetrics, LabelQuality, PropagationMetrics, QualityMetrics,
    RoundMetrics, TrainMetrics,
)


def _quality(acc: float) -> LabelQuality:
    return LabelQuality(n=40, accuracy=acc, macro_f1=acc - 0.1, tail_recall=acc - 0.2,
                        rare_share=0.1, rare_true_share=0.12)


def _full() -> RoundMetrics:
    return RoundMetrics(
        round=2, n=120, human_labels=22, human_per_class={"walk": 12, "wave": 10},
        predicted_per_class={"walk": 70, "wave": 50}, reliable=81,
        stage_seconds={"views": 1.5, "train": 9.25, "suggest": 0.01},
        views={"plain": 0.35, "rocket": 0.35, "network": 0.3},
        judgement=JudgementMetrics(
            mode="auto", joined=True, reason="joins: better", held_out=12, floor=0.5,
            with_network=0.75, folds=(FoldScore(6, 0.5, 0.75), FoldScore(6, 0.5, 0.75)),
            seconds=0.4, curve=(0.25, 0.5, 0.75), epochs=3),
        train=TrainMetrics(best_epoch=3, best_metric=0.75, device="cpu", seconds=8.0, epochs=3,
                           warm_started=False),
        propagation=PropagationMetrics(iterations=17, converged=True, residual=1e-7),
        knn={"plain": KnnMetrics("exact", None, 10), "network": KnnMetrics("ivf", 0.98, 10)},
        quality=QualityMetrics(propagated=_quality(0.8), floor=_quality(0.7), model=_quality(0.6)),
        seconds=12.5,
    )


# what a round of the version before typed metrics wrote (speler.loop._round_metrics' dict)
_SAVED = {
    "round": 1, "n": 80, "human_labels": 9,
    "human_per_class": {"a": 5, "b": 4}, "predicted_per_class": {"a": 50, "b": 30},
    "reliable": 33, "stage_seconds": {"views": 0.5, "knn": 0.1}, "views": {"plain": 0.5, "rocket": 0.5},
    "judgement": {"mode": "auto", "joined": False, "reason": "too few human labels",
                  "held_out": 0, "floor": float("nan"), "with_network": float("nan"), "folds": [],
                  "seconds": 0.0, "curve": [], "epochs": None},
    "train": None,
    "propagation": {"iterations": 12, "converged": True, "residual": 3e-7},
    "knn": {"plain": {"method": "exact", "recall": None, "k": 10},
            "rocket": {"method": "exact", "recall": None, "k": 10}},
    "quality": {"propagated": {"n": 71, "accuracy": 0.7, "macro_f1": 0.6, "tail_recall": 0.5,
                               "rare_share": 0.2, "rare_true_share": 0.25},
                "floor": {"n": 71, "accuracy": 0.7, "macro_f1": 0.6, "tail_recall": 0.5,
                          "rare_share": 0.2, "rare_true_share": 0.25}},
    "seconds": 1.25,
}


def test_round_trip_through_json_is_exact():
    m = _full()
    text = json.dumps(m.to_json())  # what the store and metrics.json keep: plain JSON
    assert RoundMetrics.from_json(json.loads(text)) == m
    bare = RoundMetrics(round=0, n=5, human_labels=2, reliable=0)
    assert RoundMetrics.from_json(json.loads(json.dumps(bare.to_json()))) == bare


def test_saved_dicts_keep_their_keys():
    """A round saved by the dict version reads and writes back the same JSON (NaN included)."""
    m = RoundMetrics.from_json(_SAVED)
    assert json.dumps(m.to_json(), sort_keys=True) == json.dumps(_SAVED, sort_keys=True)
    assert m.train is None and m.quality.model is None and m.quality.propagated.accuracy == 0.7
    assert math.isnan(m.judgement.floor) and not m.judgement.joined
    assert m.knn["rocket"] == KnnMetrics("exact", None, 10)
    assert set(_full().to_json()) == set(_SAVED)


def test_reads_a_round_saved_before_judgement_quality_and_train():
    old = {"round": 0, "n": 80, "human_labels": 9, "human_per_class": {"a": 5, "b": 4},
           "reliable": 12, "stage_seconds": {"train": 3.0}, "seconds": 4.0}
    m = RoundMetrics.from_json(old)
    assert (m.round, m.n, m.human_labels, m.reliable, m.seconds) == (0, 80, 9, 12, 4.0)
    assert m.judgement is None and m.train is None and m.quality is None and m.propagation is None
    assert m.knn == {} and m.views == {} and m.predicted_per_class == {}
    # a judgement from before cross-fitting curves: no curve, epochs or folds
    j = RoundMetrics.from_json({"judgement": {"mode": "always", "joined": True,
                                              "reason": "views.network is 'always'"}}).judgement
    assert j.joined and j.mode == "always" and j.curve == () and j.epochs is None and j.folds == ()
    # nothing at all (a round that measured nothing)
    assert RoundMetrics.from_json({}) == RoundMetrics() == RoundMetrics.from_json(None)


def test_unknown_and_odd_keys_are_tolerated():
    d = dict(_SAVED, future_figure={"x": 1}, judgement=dict(_SAVED["judgement"], new_field=3),
             quality=dict(_SAVED["quality"], propagated=dict(_SAVED["quality"]["propagated"],
                                                             balanced_accuracy=0.66)))
    m = RoundMetrics.from_json(d)
    assert m.quality.propagated.accuracy == 0.7 and not hasattr(m, "future_figure")
    assert "future_figure" not in m.to_json()
    # a part that is not an object (damaged or from some other writer) reads as missing
    m = RoundMetrics.from_json({"judgement": "joined", "train": 3, "knn": [1, 2], "views": None})
    assert m.judgement is None and m.train is None and m.knn == {} and m.views == {}


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        _full().round = 3  # type: ignore[misc]

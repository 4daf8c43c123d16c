"""What a round measured, typed: ``RoundMetrics`` and its parts.

A round (``speler.loop.run_round``) makes one ``RoundMetrics``; the store keeps its ``to_json()``
(the round's row) and so does ``rounds/NNN/metrics.json``. Readers get it back typed:
``RoundResult.metrics``, ``LoopState.metrics`` and ``RoundInfo.metrics`` (``speler.store``) are
all ``RoundMetrics``, so no reader picks a dict apart by string keys.

``RoundMetrics.from_json`` reads what any version wrote: a key it does not know is ignored, a
key an older version did not write (``judgement``, ``quality``, ``seconds``, the judgement's
``curve`` and ``epochs``, ...) reads as None or an empty default, never a KeyError. Numbers are
kept as saved: a figure that could not be computed is NaN, as the round wrote it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "FoldScore", "JudgementMetrics", "KnnMetrics", "LabelQuality", "PropagationMetrics",
    "QualityMetrics", "RoundMetrics", "TrainMetrics",
]


def _map(value: Any) -> Mapping:
    """``value`` when it is a mapping, else an empty one (an older or damaged entry)."""
    return value if isinstance(value, Mapping) else {}


def _seq(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else []


@dataclass(frozen=True)
class LabelQuality:
    """``speler.metrics.label_quality`` of one set of labels against the held-out truth, over
    the samples without a human label: n evaluated, accuracy, macro-F1, mean recall of the tail
    classes, the share predicted as a tail class and the share that truly is one."""

    n: int | None = None
    accuracy: float | None = None
    macro_f1: float | None = None
    tail_recall: float | None = None
    rare_share: float | None = None
    rare_true_share: float | None = None

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "LabelQuality":
        d = _map(d)
        return cls(n=d.get("n"), accuracy=d.get("accuracy"), macro_f1=d.get("macro_f1"),
                   tail_recall=d.get("tail_recall"), rare_share=d.get("rare_share"),
                   rare_true_share=d.get("rare_true_share"))

    def to_json(self) -> dict[str, Any]:
        return {"n": self.n, "accuracy": self.accuracy, "macro_f1": self.macro_f1,
                "tail_recall": self.tail_recall, "rare_share": self.rare_share,
                "rare_true_share": self.rare_true_share}


@dataclass(frozen=True)
class QualityMetrics:
    """Quality of the round's propagated labels, of the floor's (label-free views alone) and of
    the network's own predictions (None when no network was trained). Only for data that carry
    held-out truth."""

    propagated: LabelQuality | None = None
    floor: LabelQuality | None = None
    model: LabelQuality | None = None

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "QualityMetrics":
        d = _map(d)
        return cls(**{k: None if not isinstance(d.get(k), Mapping) else LabelQuality.from_json(d[k])
                      for k in ("propagated", "floor", "model")})

    def to_json(self) -> dict[str, Any]:
        out = {}
        for k in ("propagated", "floor", "model"):
            q = getattr(self, k)
            if q is not None:
                out[k] = q.to_json()
        return out


@dataclass(frozen=True)
class FoldScore:
    """One cross-fitting fold: its held-out human labels and the balanced accuracy on them of
    propagation on the floor and on floor + network."""

    held_out: int | None = None
    floor: float | None = None
    with_network: float | None = None

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "FoldScore":
        d = _map(d)
        return cls(held_out=d.get("held_out"), floor=d.get("floor"),
                   with_network=d.get("with_network"))

    def to_json(self) -> dict[str, Any]:
        return {"held_out": self.held_out, "floor": self.floor, "with_network": self.with_network}


@dataclass(frozen=True)
class JudgementMetrics:
    """Whether the network joined the graph (``speler.loop.Judgement``, as saved): mode
    (``views.network``), the decision and why, the pooled held-out figures, per fold, the seconds
    it took, the folds' mean learning curve and the epochs the final network trained for."""

    mode: str | None = None
    joined: bool = False
    reason: str = ""
    held_out: int | None = None
    floor: float | None = None
    with_network: float | None = None
    folds: tuple[FoldScore, ...] = ()
    seconds: float | None = None
    curve: tuple[float, ...] = ()
    epochs: int | None = None

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "JudgementMetrics":
        d = _map(d)
        return cls(mode=d.get("mode"), joined=bool(d.get("joined", False)),
                   reason=str(d.get("reason") or ""), held_out=d.get("held_out"),
                   floor=d.get("floor"), with_network=d.get("with_network"),
                   folds=tuple(FoldScore.from_json(f) for f in _seq(d.get("folds"))),
                   seconds=d.get("seconds"), curve=tuple(_seq(d.get("curve"))),
                   epochs=d.get("epochs"))

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "joined": self.joined, "reason": self.reason,
                "held_out": self.held_out, "floor": self.floor, "with_network": self.with_network,
                "folds": [f.to_json() for f in self.folds], "seconds": self.seconds,
                "curve": list(self.curve), "epochs": self.epochs}


@dataclass(frozen=True)
class TrainMetrics:
    """The round's final network: the epoch it kept and its held-out balanced accuracy (NaN when
    none could be measured), device, seconds, epochs run, and whether it was warm-started."""

    best_epoch: int | None = None
    best_metric: float | None = None
    device: str | None = None
    seconds: float | None = None
    epochs: int | None = None
    warm_started: bool | None = None

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "TrainMetrics":
        d = _map(d)
        return cls(best_epoch=d.get("best_epoch"), best_metric=d.get("best_metric"),
                   device=d.get("device"), seconds=d.get("seconds"), epochs=d.get("epochs"),
                   warm_started=d.get("warm_started"))

    def to_json(self) -> dict[str, Any]:
        return {"best_epoch": self.best_epoch, "best_metric": self.best_metric,
                "device": self.device, "seconds": self.seconds, "epochs": self.epochs,
                "warm_started": self.warm_started}


@dataclass(frozen=True)
class PropagationMetrics:
    """The final propagation's solver: iterations, whether it converged, its residual."""

    iterations: int | None = None
    converged: bool | None = None
    residual: float | None = None

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "PropagationMetrics":
        d = _map(d)
        return cls(iterations=d.get("iterations"), converged=d.get("converged"),
                   residual=d.get("residual"))

    def to_json(self) -> dict[str, Any]:
        return {"iterations": self.iterations, "converged": self.converged,
                "residual": self.residual}


@dataclass(frozen=True)
class KnnMetrics:
    """One view's kNN graph: how it was searched, its recall (None when not measured), k."""

    method: str | None = None
    recall: float | None = None
    k: int | None = None

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "KnnMetrics":
        d = _map(d)
        return cls(method=d.get("method"), recall=d.get("recall"), k=d.get("k"))

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "recall": self.recall, "k": self.k}


@dataclass(frozen=True)
class RoundMetrics:
    """What one round measured (``speler.loop._round_metrics``).

    round, n (samples), human_labels (how many the round saw), human_per_class and
    predicted_per_class ({class name: count}), reliable (reliable propagated labels),
    stage_seconds ({stage: seconds}), views ({view: weight in the final graph}), judgement,
    train (None when no network was trained), propagation, knn ({view: its graph}), quality
    (None without held-out truth), seconds (the whole round). ``RoundMetrics()`` is a round
    that measured nothing (e.g. a cancelled one): every figure None or empty.
    """

    round: int | None = None
    n: int | None = None
    human_labels: int | None = None
    human_per_class: dict[str, int] = field(default_factory=dict)
    predicted_per_class: dict[str, int] = field(default_factory=dict)
    reliable: int | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)
    views: dict[str, float] = field(default_factory=dict)
    judgement: JudgementMetrics | None = None
    train: TrainMetrics | None = None
    propagation: PropagationMetrics | None = None
    knn: dict[str, KnnMetrics] = field(default_factory=dict)
    quality: QualityMetrics | None = None
    seconds: float | None = None

    @classmethod
    def from_json(cls, d: Mapping[str, Any] | None) -> "RoundMetrics":
        """Read what the store or ``metrics.json`` holds, from this version or an older one."""
        d = _map(d)

        def part(key: str, kind):
            return kind.from_json(d[key]) if isinstance(d.get(key), Mapping) else None

        return cls(
            round=d.get("round"), n=d.get("n"), human_labels=d.get("human_labels"),
            human_per_class=dict(_map(d.get("human_per_class"))),
            predicted_per_class=dict(_map(d.get("predicted_per_class"))),
            reliable=d.get("reliable"), stage_seconds=dict(_map(d.get("stage_seconds"))),
            views=dict(_map(d.get("views"))),
            judgement=part("judgement", JudgementMetrics), train=part("train", TrainMetrics),
            propagation=part("propagation", PropagationMetrics),
            knn={str(v): KnnMetrics.from_json(g) for v, g in _map(d.get("knn")).items()},
            quality=part("quality", QualityMetrics), seconds=d.get("seconds"),
        )

    def to_json(self) -> dict[str, Any]:
        """The JSON object the store and ``metrics.json`` keep, with the keys every version used:
        ``train`` is null when no network was trained; ``judgement``, ``propagation``,
        ``quality`` and ``seconds`` are left out when there are none."""
        out: dict[str, Any] = {
            "round": self.round, "n": self.n, "human_labels": self.human_labels,
            "human_per_class": dict(self.human_per_class),
            "predicted_per_class": dict(self.predicted_per_class),
            "reliable": self.reliable, "stage_seconds": dict(self.stage_seconds),
            "views": dict(self.views),
        }
        if self.judgement is not None:
            out["judgement"] = self.judgement.to_json()
        out["train"] = None if self.train is None else self.train.to_json()
        if self.propagation is not None:
            out["propagation"] = self.propagation.to_json()
        out["knn"] = {v: g.to_json() for v, g in self.knn.items()}
        if self.quality is not None:
            out["quality"] = self.quality.to_json()
        if self.seconds is not None:
            out["seconds"] = self.seconds
        return out

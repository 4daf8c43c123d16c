"""Simulated annotation: a perfect annotator answers each strategy's suggestions from ``y_true``.

For one dataset (with ``y_true`` and a few labels in ``y``, e.g. from ``protocol.make_partial``):
train the backbone once on the initial labels (round 0, shared by every strategy so they start from
the same model and graph), then for each strategy and each of ``rounds`` rounds propagate, record
the quality of the propagated labels on the samples that have no human label yet (a human label
is the annotator's merit, not the graph's; counting it as correct would inflate every curve), and
label ``budget`` more samples from the strategy's suggestions. With ``retrain_every`` > 0 the
model is retrained (with energy-weighted pseudo-labels) every that many rounds, as a real project
does; 0 keeps the round-0 model, which isolates what the query strategy itself contributes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from speler.config import Config
from speler.data.schema import SequenceSet
from speler.errors import DataFormatError
from speler.loop import build_state, floor_views, suggest_for, update_state
from speler.metrics import label_quality, tail_classes
from speler.selection import STRATEGIES

logger = logging.getLogger(__name__)


@dataclass
class SimulationResult:
    """curves[strategy] = one dict per round: labels (human count), accuracy, macro_f1, tail_recall,
    rare_share, all on the samples without a human label; auc[strategy] = ``curve_area`` of the
    macro-F1 curve (trapezoids over the number of labels / their span)."""

    dataset: str
    curves: dict[str, list[dict]] = field(default_factory=dict)
    auc: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    train_seconds: float = 0.0


def simulate(
    ds: SequenceSet,
    *,
    strategies: list[str] | tuple[str, ...] = tuple(STRATEGIES),
    rounds: int = 5,
    budget: int = 10,
    seed: int = 0,
    config: Config = Config(),
    retrain_every: int = 0,
    name: str = "",
    progress: Callable[[int, int], None] | None = None,
) -> SimulationResult:
    """Run the simulation; see the module docstring."""
    if ds.y_true is None or (ds.y_true < 0).any():
        raise DataFormatError(f"{ds.where}: simulation needs y_true for every sample")
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise DataFormatError(f"unknown strategy {unknown[0]!r}; known: {', '.join(STRATEGIES)}")
    started = time.perf_counter()
    tail = tail_classes(np.bincount(ds.y_true, minlength=ds.num_classes))
    t0 = time.perf_counter()
    views = floor_views(ds, config)
    base_state = _train_state(ds, ds.y.copy(), config=config, pseudo=None, views=views)
    result = SimulationResult(dataset=name or ds.where, train_seconds=time.perf_counter() - t0)
    total = len(strategies) * (rounds + 1)
    done = 0
    for strategy in strategies:
        human = ds.y.copy()
        state = base_state
        curve = []
        for r in range(rounds + 1):
            if r > 0 and retrain_every and r % retrain_every == 0:
                state = _train_state(ds, human, config=config, pseudo=state, views=views)
            elif r > 0:
                state = update_state(state, human, num_classes=ds.num_classes, config=config)
            # scored on the samples nobody has labeled yet: human labels are not the graph's merit
            q = label_quality(ds.y_true, state.result.labels, num_classes=ds.num_classes,
                              mask=human < 0, tail=tail)
            q.update(round=r, labels=int((human >= 0).sum()))
            curve.append(q)
            done += 1
            if progress:
                progress(done, total)
            if r == rounds:
                break
            picks = suggest_for(state, human, ds, n=budget, strategy=strategy, seed=seed + r,
                                config=config)
            idx = np.array([s.index for s in picks], dtype=np.int64)
            if len(idx) == 0:
                break
            human[idx] = ds.y_true[idx]
        result.curves[strategy] = curve
        result.auc[strategy] = curve_area(curve)
        logger.info("%s %s: AUC %.4f", result.dataset, strategy, result.auc[strategy])
    result.seconds = time.perf_counter() - started
    return result


def curve_area(curve: list[dict], key: str = "macro_f1") -> float:
    """Area under ``key`` over the number of human labels (trapezoids), divided by the span of
    label counts: the curve's mean height, in the units of ``key``; a single point is its value."""
    x = np.array([c["labels"] for c in curve], dtype=np.float64)
    y = np.array([c[key] for c in curve], dtype=np.float64)
    if len(x) == 1 or x[-1] == x[0]:
        return float(y.mean())
    return float(np.trapezoid(y, x) / (x[-1] - x[0]))


def _train_state(ds: SequenceSet, human: np.ndarray, *, config: Config, pseudo, views=None):
    """A round's state for ``human`` labels (``pseudo``: the previous state, whose propagation
    supplies the pseudo-labels, as in a project's later rounds)."""
    return build_state(ds, human, no=0, config=config, previous=pseudo, views=views).state

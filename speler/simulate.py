"""Simulated annotation: a perfect annotator answers each strategy's suggestions from ``y_true``.

For one dataset (with ``y_true`` and a few labels in ``y``, e.g. from ``protocol.make_partial``):
train the backbone once on the initial labels (round 0, shared by every strategy so they start from
the same model and graph), then for each strategy and each of ``rounds`` rounds propagate, record
the quality of the propagated labels on the samples that have no human label yet (a human label
is the annotator's merit, not the graph's; counting it as correct would inflate every curve), and
label ``budget`` more samples from the strategy's suggestions. With ``retrain_every`` > 0 the
model is retrained (with energy-weighted pseudo-labels) every that many rounds, as a real project
does; 0 keeps the round-0 model, which isolates what the query strategy itself contributes.

Under torchrun (``python -m speler simulate`` launched by torchrun, more than one rank) every rank
calls ``simulate`` with the same data (checked: a rank whose data differ from rank 0's fails every
rank) and every rank takes part in the label-free views and each ``build_state`` (the views, graphs
and propagations row-sharded, the trainings with DDP, the embedding sharded); the rest, the
re-propagations, the scores and the choice of each round's samples, is rank 0's (it alone holds the
round's state), which hands the chosen samples to the others so that every rank reveals the same
labels and trains on the same ones. Each step is a ``distributed.together`` stage: a failure on any
rank fails every rank. Every rank returns rank 0's result.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from speler import distributed as dist
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
    with dist.together("simulation input"):
        if ds.y_true is None or (ds.y_true < 0).any():
            raise DataFormatError(f"{ds.where}: simulation needs y_true for every sample")
        unknown = [s for s in strategies if s not in STRATEGIES]
        if unknown:
            raise DataFormatError(f"unknown strategy {unknown[0]!r}; known: {', '.join(STRATEGIES)}")
    _check_same_inputs(ds, strategies=strategies, rounds=rounds, budget=budget, seed=seed,
                       config=config, retrain_every=retrain_every)
    main = dist.is_main()  # one process: always; under torchrun the state is rank 0's
    started = time.perf_counter()
    tail = tail_classes(np.bincount(ds.y_true, minlength=ds.num_classes))
    t0 = time.perf_counter()
    views = floor_views(ds, config)  # under torchrun: this rank's rows, each rank its share
    base_state, pretrained = _train_state(ds, ds.y.copy(), config=config, pseudo=None,
                                          views=views)
    result = SimulationResult(dataset=name or ds.where, train_seconds=time.perf_counter() - t0)
    total = len(strategies) * (rounds + 1)
    done = 0
    for strategy in strategies:
        human = ds.y.copy()
        state = base_state  # None on the ranks other than 0
        curve = []
        for r in range(rounds + 1):
            retrain = r > 0 and retrain_every and r % retrain_every == 0
            if retrain:  # every rank: the training is shared
                state, _ = _train_state(ds, human, config=config, pseudo=state, views=views,
                                        pretrained=pretrained)
            picked = None
            with dist.together("simulated round"):
                if main:
                    if r > 0 and not retrain:
                        state = update_state(state, human, num_classes=ds.num_classes,
                                             config=config)
                    # scored on the samples nobody has labeled yet: human labels are not the
                    # graph's merit
                    q = label_quality(ds.y_true, state.result.labels, num_classes=ds.num_classes,
                                      mask=human < 0, tail=tail)
                    q.update(round=r, labels=int((human >= 0).sum()))
                    curve.append(q)
                    if r < rounds:
                        picks = suggest_for(state, human, ds, n=budget, strategy=strategy,
                                            seed=seed + r, config=config)
                        picked = np.array([s.index for s in picks], dtype=np.int64)
            done += 1
            if progress:
                progress(done, total)
            if r == rounds:
                break
            # rank 0's choice on every rank: the same labels revealed, the same next training
            idx = dist.broadcast_object(picked)
            if len(idx) == 0:
                break
            human[idx] = ds.y_true[idx]
        if main:
            result.curves[strategy] = curve
            result.auc[strategy] = curve_area(curve)
            logger.info("%s %s: AUC %.4f", result.dataset, strategy, result.auc[strategy])
    result.seconds = time.perf_counter() - started
    return dist.broadcast_object(result)


def _check_same_inputs(ds: SequenceSet, **settings) -> None:
    """Under torchrun: every rank's data (values, labels, truth) and settings must be rank 0's,
    else the ranks would choose, reveal or train on different samples; a rank that differs fails
    every rank (DataFormatError). One process: nothing to check."""
    if dist.world_size() == 1:
        return
    h = hashlib.sha256(repr((ds.fingerprint(), sorted(settings.items()))).encode())
    for a in (ds.x, ds.y, ds.y_true):
        h.update(np.ascontiguousarray(a))  # the buffer itself, no copy when contiguous
    mine = h.hexdigest()
    theirs = dist.broadcast_object(mine)
    with dist.together("checking the data"):
        if mine != theirs:
            raise DataFormatError(f"{ds.where}: rank {dist.rank()}'s data or settings differ from"
                                  f" rank 0's; give every rank the same")


def curve_area(curve: list[dict], key: str = "macro_f1") -> float:
    """Area under ``key`` over the number of human labels (trapezoids), divided by the span of
    label counts: the curve's mean height, in the units of ``key``; a single point is its value."""
    x = np.array([c["labels"] for c in curve], dtype=np.float64)
    y = np.array([c[key] for c in curve], dtype=np.float64)
    if len(x) == 1 or x[-1] == x[0]:
        return float(y.mean())
    return float(np.trapezoid(y, x) / (x[-1] - x[0]))


def _train_state(ds: SequenceSet, human: np.ndarray, *, config: Config, pseudo, views=None,
                 pretrained=None):
    """(a round's state for ``human`` labels, the self-supervised weights its trainings started
    from or None); ``pseudo``: the previous state, whose propagation supplies the pseudo-labels,
    as in a project's later rounds; ``pretrained``: weights an earlier training pre-trained, as a
    project keeps them (``train.pretrain_epochs``)."""
    built = build_state(ds, human, no=0, config=config, previous=pseudo, views=views,
                        pretrained=pretrained)
    return built.state, built.pretrained

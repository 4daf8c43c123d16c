"""Simulated annotation: a perfect annotator answers each strategy's suggestions from ``y_true``.

For one dataset (with ``y_true`` and a few labels in ``y``, e.g. from ``protocol.make_partial``):
train the backbone once on the initial labels (round 0, shared by every strategy so they start from
the same model and graph), then for each strategy and each of ``rounds`` rounds propagate, record
the quality of the final labels (human where given, else propagated), and label ``budget`` more
samples from the strategy's suggestions. With ``retrain_every`` > 0 the model is retrained (with
energy-weighted pseudo-labels) every that many rounds, as a real project does; 0 keeps the
round-0 model, which isolates what the query strategy itself contributes.
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
from speler.loop import _propagate_all, _pseudo_labels, suggest_for, update_state
from speler.metrics import label_quality, tail_classes
from speler.selection import STRATEGIES
from speler.train import embed, fit

logger = logging.getLogger(__name__)


@dataclass
class SimulationResult:
    """curves[strategy] = one dict per round: labels (human count), accuracy, macro_f1, tail_recall,
    rare_share; auc[strategy] = mean macro-F1 over the rounds (area under the curve / rounds)."""

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
    base_state = _train_state(ds, ds.y.copy(), config=config, pseudo=None)
    result = SimulationResult(dataset=name or ds.where, train_seconds=time.perf_counter() - t0)
    total = len(strategies) * (rounds + 1)
    done = 0
    for strategy in strategies:
        human = ds.y.copy()
        state = base_state
        curve = []
        for r in range(rounds + 1):
            if r > 0 and retrain_every and r % retrain_every == 0:
                state = _train_state(ds, human, config=config, pseudo=state)
            elif r > 0:
                state = update_state(state, human, num_classes=ds.num_classes, config=config)
            final = np.where(human >= 0, human, state.result.labels)
            q = label_quality(ds.y_true, final, num_classes=ds.num_classes, tail=tail)
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
        result.auc[strategy] = float(np.mean([c["macro_f1"] for c in curve]))
        logger.info("%s %s: AUC %.4f", result.dataset, strategy, result.auc[strategy])
    result.seconds = time.perf_counter() - started
    return result


def _train_state(ds: SequenceSet, human: np.ndarray, *, config: Config, pseudo):
    pl = pw = None
    if pseudo is not None:
        pl, pw = _pseudo_labels(pseudo.result, human)
    fitted = fit(ds, human, config=config.train, pseudo_labels=pl, pseudo_weights=pw)
    emb = embed(fitted.model, ds)
    return _propagate_all(0, {"time": emb.time, "freq": emb.freq}, emb.probs, human,
                          num_classes=ds.num_classes, config=config)

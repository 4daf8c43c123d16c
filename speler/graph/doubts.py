"""Label doubts, the graph arithmetic: how strongly a labeled sample's neighbours disagree with it.

A sample's own seed must not vote on its own label, so the graph's opinion of sample i is read
from its neighbours: with an affinity W (CSR (n, n); a list of them is averaged), the opinion is
the W-weighted average of the neighbours' propagated class distributions, ``(D^-1 W) P`` row i,
where P is the propagation's scores, corrected by the class prior the way its labels are, and
normalised per row. Without W, P's own row is used, where the sample's own seed weighs heavily
((1 - α) · [(I - αS)^-1]_ii of it): on a 40-sample two-cluster set a wrong label read 0.52 / 0.48
from its own row and 0.81 / 0.19 from its neighbours. ``speler.export.doubts`` names the results.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import scipy.sparse as sp

from speler.errors import DataFormatError
from speler.graph.propagate import PropagationResult


@dataclass(frozen=True)
class Disagreement:
    """Per labeled sample (``rows``, int64 (m,)): its label, the other class its neighbours favour
    most (``best``), the opinion's mass on each (float64 (m,), in [0, 1]), and whether the opinion
    came from neighbours (``from_neighbours``) or from the sample's own row."""

    rows: np.ndarray
    label: np.ndarray
    best: np.ndarray
    label_mass: np.ndarray
    best_mass: np.ndarray
    from_neighbours: bool

    @property
    def score(self) -> np.ndarray:
        """mass(best other class) - mass(label): > 0 where the graph leans elsewhere."""
        return self.best_mass - self.label_mass


def disagreement(propagation: PropagationResult, human: np.ndarray, *,
                 affinity: sp.spmatrix | Sequence[sp.spmatrix] | None = None) -> Disagreement:
    """The graph's opinion of every sample with a label in ``human`` (int (n,), -1 = none); see
    the module docstring. Needs at least 2 classes. DataFormatError for an affinity of the wrong
    shape."""
    n, C = propagation.scores.shape
    mats = [] if affinity is None else ([affinity] if sp.issparse(affinity) else list(affinity))
    for W in mats:
        if not sp.issparse(W) or W.shape != (n, n):
            raise DataFormatError(
                f"doubts: affinity must be a sparse ({n}, {n}) matrix, got {getattr(W, 'shape', W)!r}")
    rows = np.flatnonzero(np.asarray(human) >= 0)
    P = class_distribution(propagation)
    if mats:
        opinion = np.zeros((len(rows), C))
        for W in mats:
            W = sp.csr_matrix(W, dtype=np.float64)
            W = W - sp.diags(W.diagonal())  # the sample itself never votes
            sub = W[rows]
            deg = np.asarray(sub.sum(axis=1)).ravel()
            view = np.asarray(sub @ P)
            opinion += np.where(deg[:, None] > 0, view / np.maximum(deg, 1e-300)[:, None], P[rows])
        opinion /= len(mats)
    else:
        opinion = P[rows]
    lab = np.asarray(human)[rows]
    label_mass = opinion[np.arange(len(rows)), lab]
    other = opinion.copy()
    other[np.arange(len(rows)), lab] = -np.inf
    best = np.argmax(other, axis=1)
    return Disagreement(rows=rows, label=lab, best=best, label_mass=label_mass,
                        best_mass=other[np.arange(len(rows)), best], from_neighbours=bool(mats))


def class_distribution(propagation: PropagationResult) -> np.ndarray:
    """Row-normalised class distribution from the propagation scores (float64 (n, C)).

    If the propagation's labels follow ``scores / prior`` (class-prior correction) better than the
    raw scores, the distribution is taken from the corrected scores, so doubts agree with labels.
    """
    M = np.clip(np.asarray(propagation.scores, dtype=np.float64), 0.0, None)
    prior = np.asarray([] if propagation.prior is None else propagation.prior, dtype=np.float64)
    labels = np.asarray(propagation.labels)
    if prior.shape == (M.shape[1],) and np.all(prior > 0):
        corrected = M / prior[None, :]
        if np.mean(np.argmax(corrected, axis=1) == labels) > np.mean(np.argmax(M, axis=1) == labels):
            M = corrected
    total = M.sum(axis=1, keepdims=True)
    uniform = np.full_like(M, 1.0 / M.shape[1])
    return np.where(total > 0, M / np.maximum(total, 1e-300), uniform)

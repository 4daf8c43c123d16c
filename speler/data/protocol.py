"""The paper's long-tailed, partially labeled protocol, made from a fully labeled set.

Class c (ordered from most to least frequent) keeps ``N_c = n_1 · π^(-(c-1)/(C-1))`` samples, where
``n_1`` is the size of the largest class that the data can supply and π the imbalance ratio; a
share γ of the kept samples (at least ``min_labeled_per_class`` per class) is labeled, the rest
unlabeled, with labeled and unlabeled following the same class distribution (per-class sampling).
Used by tests, benchmarks, simulations and the bundled samples; never by a real annotation run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from speler.data.schema import SequenceSet
from speler.errors import DataFormatError


@dataclass
class ProtocolSplit:
    """keep: int64 indices into the original samples (sorted); labeled: bool mask over ``keep``;
    class_sizes: int64 (C,) kept per class in the original class order."""

    keep: np.ndarray
    labeled: np.ndarray
    class_sizes: np.ndarray


def long_tail_sizes(available: np.ndarray, *, imbalance: float) -> np.ndarray:
    """Per-class target sizes for classes with ``available`` samples each (original order).

    The most populous class is class 1; the others follow in decreasing order of availability.
    ``n_1`` is lowered until every class can supply its share, so the curve stays exact.
    """
    available = np.asarray(available, dtype=np.int64)
    c = len(available)
    if c < 2:
        return available.copy()
    order = np.argsort(-available, kind="stable")
    ranks = np.empty(c, dtype=np.int64)
    ranks[order] = np.arange(c)
    frac = imbalance ** (-ranks / (c - 1))  # 1 for the head class, 1/π for the tail
    n1 = int(np.min(available / frac))  # largest head size every class can supply
    sizes = np.maximum(1, np.floor(n1 * frac + 1e-9)).astype(np.int64)
    return np.minimum(sizes, available)


def long_tail_split(
    y: np.ndarray,
    *,
    imbalance: float,
    labeled_ratio: float,
    seed: int,
    min_labeled_per_class: int = 1,
) -> ProtocolSplit:
    """Long-tailed subset and labeled mask for fully known labels ``y`` (int (N,), all >= 0)."""
    y = np.asarray(y)
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise DataFormatError(f"protocol: labels must be a 1-d integer array, got {y.dtype} {y.shape}")
    if (y < 0).any():
        raise DataFormatError(
            f"protocol: needs a fully labeled set, {int((y < 0).sum())} samples have no label"
        )
    if not imbalance >= 1:
        raise DataFormatError(f"protocol: imbalance must be >= 1, got {imbalance}")
    if not 0 < labeled_ratio <= 1:
        raise DataFormatError(f"protocol: labeled_ratio must be in (0, 1], got {labeled_ratio}")
    num_classes = int(y.max()) + 1 if len(y) else 0
    available = np.bincount(y, minlength=num_classes)
    present = np.flatnonzero(available > 0)
    sizes = np.zeros(num_classes, dtype=np.int64)
    sizes[present] = long_tail_sizes(available[present], imbalance=imbalance)
    rng = np.random.default_rng(seed)
    keep_parts, lab_parts = [], []
    for c in present:
        members = rng.permutation(np.flatnonzero(y == c))[: sizes[c]]
        n_lab = int(round(labeled_ratio * len(members)))
        n_lab = min(len(members), max(n_lab, min_labeled_per_class))
        keep_parts.append(members)
        lab_parts.append(np.arange(len(members)) < n_lab)
    keep = np.concatenate(keep_parts)
    labeled = np.concatenate(lab_parts)
    order = np.argsort(keep, kind="stable")
    return ProtocolSplit(keep=keep[order], labeled=labeled[order], class_sizes=sizes)


def make_partial(
    ds: SequenceSet,
    *,
    imbalance: float,
    labeled_ratio: float,
    seed: int,
    min_labeled_per_class: int = 1,
) -> SequenceSet:
    """Long-tailed subset of a fully labeled ``ds`` with ``y_true`` = all labels, ``y`` = the few.

    Uses ``ds.y_true`` as the truth when it is set, else ``ds.y``.
    """
    truth = ds.y_true if ds.y_true is not None else ds.y
    if (truth < 0).any():
        raise DataFormatError(
            f"{ds.where}: protocol needs every sample labeled; {int((truth < 0).sum())} are not"
        )
    split = long_tail_split(
        truth, imbalance=imbalance, labeled_ratio=labeled_ratio, seed=seed,
        min_labeled_per_class=min_labeled_per_class,
    )
    sub = ds.subset(split.keep)
    y_true = truth[split.keep].astype(np.int64)
    y = np.where(split.labeled, y_true, -1).astype(np.int64)
    return sub.replace(y=y, y_true=y_true)

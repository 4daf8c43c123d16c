"""Quality of a labelling against held-out truth: accuracy, macro-F1, tail recall, rare share.

Used by rounds (when the dataset carries ``y_true``), simulations and benchmarks, so every table
in the project computes these figures the same way.
"""

from __future__ import annotations

import numpy as np


def tail_classes(counts: np.ndarray, *, share: float = 1 / 3) -> np.ndarray:
    """Indices of the rarest ``share`` of classes by ``counts`` (at least one class)."""
    counts = np.asarray(counts)
    k = max(1, int(round(len(counts) * share)))
    return np.sort(np.argsort(counts, kind="stable")[:k])


def label_quality(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    *,
    num_classes: int,
    mask: np.ndarray | None = None,
    tail: np.ndarray | None = None,
) -> dict[str, float]:
    """Figures over the samples in ``mask`` (default all) whose truth is known (>= 0).

    macro_f1 averages over classes present in the truth of the evaluated samples; tail_recall is
    the mean recall of the ``tail`` classes (default: rarest third by truth counts over all
    samples); rare_share is the share of evaluated samples predicted as a tail class, to compare
    with ``rare_true_share``.
    """
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    sel = y_true >= 0
    if mask is not None:
        sel &= np.asarray(mask, dtype=bool)
    if tail is None:
        tail = tail_classes(np.bincount(y_true[y_true >= 0], minlength=num_classes))
    t, p = y_true[sel], y_pred[sel]
    if len(t) == 0:
        return {"n": 0, "accuracy": float("nan"), "macro_f1": float("nan"),
                "tail_recall": float("nan"), "rare_share": float("nan"), "rare_true_share": float("nan")}
    conf = np.zeros((num_classes, num_classes), dtype=np.int64)
    valid = (p >= 0) & (p < num_classes)
    np.add.at(conf, (t[valid], p[valid]), 1)
    support = np.bincount(t, minlength=num_classes)
    tp = np.diag(conf).astype(float)
    predicted = conf.sum(axis=0).astype(float)
    precision = np.divide(tp, predicted, out=np.zeros(num_classes), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(num_classes), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(num_classes),
                   where=(precision + recall) > 0)
    present = support > 0
    tail_present = [c for c in tail if support[c] > 0]
    return {
        "n": int(len(t)),
        "accuracy": float((t == p).mean()),
        "macro_f1": float(f1[present].mean()),
        "tail_recall": float(recall[tail_present].mean()) if tail_present else float("nan"),
        "rare_share": float(np.isin(p, tail).mean()),
        "rare_true_share": float(np.isin(t, tail).mean()),
    }

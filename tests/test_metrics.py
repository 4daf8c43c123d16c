import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, recall_score

from speler.metrics import label_quality, tail_classes


def test_matches_scikit_learn_on_random_labels():
    rng = np.random.default_rng(0)
    t = rng.integers(0, 5, 300)
    p = np.where(rng.random(300) < 0.6, t, rng.integers(0, 5, 300))
    q = label_quality(t, p, num_classes=5, tail=np.array([3, 4]))
    assert q["accuracy"] == pytest.approx(accuracy_score(t, p))
    assert q["macro_f1"] == pytest.approx(f1_score(t, p, average="macro"))
    rec = recall_score(t, p, average=None)
    assert q["tail_recall"] == pytest.approx(rec[[3, 4]].mean())
    assert q["rare_share"] == pytest.approx(np.isin(p, [3, 4]).mean())


def test_mask_and_unknown_truth_are_left_out():
    t = np.array([0, 0, 1, 1, -1])
    p = np.array([0, 1, 1, 1, 0])
    q = label_quality(t, p, num_classes=2, mask=np.array([True, False, True, True, True]))
    assert q["n"] == 3 and q["accuracy"] == 1.0


def test_tail_classes_are_the_rarest():
    assert tail_classes(np.array([50, 3, 20, 1, 9, 30])).tolist() == [1, 3]

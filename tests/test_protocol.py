import numpy as np
import pytest

from speler.data.layouts import NTU25
from speler.data.protocol import long_tail_sizes, long_tail_split, make_partial
from speler.data.schema import SequenceSet
from speler.errors import DataFormatError


def test_sizes_follow_the_exponential_curve():
    sizes = long_tail_sizes(np.array([100, 100, 100, 100, 100]), imbalance=10)
    expected = np.floor(100 * 10 ** (-np.arange(5) / 4) + 1e-9)
    np.testing.assert_array_equal(sizes, expected)
    assert sizes[0] / sizes[-1] == pytest.approx(10)


def test_head_shrinks_until_every_class_can_supply_its_share():
    # the rarest-available class can only give 20 but should hold 1/4 of n1 -> n1 <= 80
    sizes = long_tail_sizes(np.array([200, 150, 20]), imbalance=4)
    assert sizes.tolist() == [80, 40, 20]


def test_split_is_seeded_long_tailed_and_labels_every_class():
    y = np.repeat(np.arange(6), 50)
    a = long_tail_split(y, imbalance=20, labeled_ratio=0.1, seed=3, min_labeled_per_class=2)
    b = long_tail_split(y, imbalance=20, labeled_ratio=0.1, seed=3, min_labeled_per_class=2)
    np.testing.assert_array_equal(a.keep, b.keep)
    np.testing.assert_array_equal(a.labeled, b.labeled)
    kept = y[a.keep]
    counts = np.bincount(kept, minlength=6)
    assert counts[0] == 50 and counts[-1] == 2
    assert np.all(np.diff(counts) <= 0)
    lab_counts = np.bincount(kept[a.labeled], minlength=6)
    assert lab_counts.min() >= 2
    assert lab_counts.sum() == pytest.approx(0.1 * len(kept), abs=8)
    c = long_tail_split(y, imbalance=20, labeled_ratio=0.1, seed=4, min_labeled_per_class=2)
    assert not np.array_equal(a.keep, c.keep)


def test_split_rejects_unlabeled_and_bad_parameters():
    with pytest.raises(DataFormatError, match="fully labeled"):
        long_tail_split(np.array([0, 1, -1]), imbalance=2, labeled_ratio=0.5, seed=0)
    with pytest.raises(DataFormatError, match="imbalance"):
        long_tail_split(np.array([0, 1]), imbalance=0.5, labeled_ratio=0.5, seed=0)
    with pytest.raises(DataFormatError, match="labeled_ratio"):
        long_tail_split(np.array([0, 1]), imbalance=2, labeled_ratio=0, seed=0)


def test_make_partial_keeps_truth_and_hides_the_rest():
    n = 120
    y = np.repeat(np.arange(4), 30)
    ds = SequenceSet(
        x=np.random.default_rng(0).normal(size=(n, 3, 8, 25, 1)).astype(np.float32),
        ids=np.array([f"s{i}" for i in range(n)]), classes=("a", "b", "c", "d"), y=y,
        layout=NTU25,
    )
    part = make_partial(ds, imbalance=5, labeled_ratio=0.2, seed=1)
    assert part.y_true is not None
    assert (part.y >= 0).sum() < part.n
    known = part.y >= 0
    np.testing.assert_array_equal(part.y[known], part.y_true[known])
    # ids still map to the original samples' labels
    orig = dict(zip(ds.ids.tolist(), y.tolist()))
    assert all(orig[i] == t for i, t in zip(part.ids.tolist(), part.y_true.tolist()))

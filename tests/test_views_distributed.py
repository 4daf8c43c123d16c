"""Label-free views with rows sharded over 2 ranks (gloo, spawned here with a deadline) against the
single-process ``features.label_free_views``: bit-equal on the exact path, equal inner products on
the distributed randomized PCA; bad input fails both ranks with the same message; a world of one
is ``label_free_views`` itself. The ranks are spawned by tests/ranks.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ranks import spawn
from speler import distributed as dist
from speler import features
from speler.errors import ConfigError, DataFormatError
from speler.views_distributed import _pca_rows, label_free_views_sharded

WORLD = 2
N_SKEL = 41  # odd: shards of 21 and 20 rows
N_LOW, RANK_LOW, DIM_LOW, EXACT_MAX_N = 301, 6, 6, 50  # the randomized path: 301 > 50 samples


# --- data every process makes alike (seeded) ----------------------------------------------------
def _skeletons() -> np.ndarray:
    from factories import make_skeleton_set

    return make_skeleton_set(n=N_SKEL, frames=12, persons=2, seed=3).x


def _low_rank(n: int = N_LOW) -> np.ndarray:
    """(n, 3, 8, 5, 1): RANK_LOW latent factors (strengths 1 to 0.5) over 120 coordinates + noise
    0.1 + an offset: the standardised spectrum drops ~20-fold after the 6th singular value."""
    rng = np.random.default_rng(0)
    latent = rng.normal(size=(n, RANK_LOW)) * np.linspace(1.0, 0.5, RANK_LOW)
    x = latent @ rng.normal(size=(RANK_LOW, 120)) + 0.1 * rng.normal(size=(n, 120)) + 3.0
    return x.reshape(n, 3, 8, 5, 1).astype(np.float32)


def _gram(rows: np.ndarray) -> np.ndarray:
    rows = rows.astype(np.float64)
    return rows @ rows.T




# --- what the ranks run --------------------------------------------------------------------------
def _ranks_views(out: str) -> None:
    """Each rank saves its rows of the views (exact and randomized paths), its progress calls and
    the bytes it sent on the randomized path, into ``out``/rank<r>.npz."""
    me = dist.rank()
    x = _skeletons()
    calls: list[tuple[int, int]] = []
    res = {f"exact_{v}": a for v, a in label_free_views_sharded(
        x, progress=lambda done, total: calls.append((done, total))).items()}
    res.update({f"big_{v}": a for v, a in label_free_views_sharded(x, exact_max_n=10).items()})
    dist.traffic.reset()
    low = label_free_views_sharded(_low_rank(), views=("plain",), dim=DIM_LOW,
                                   exact_max_n=EXACT_MAX_N)
    np.savez(Path(out) / f"rank{me}.npz", **res, low=low["plain"], progress=np.array(calls),
             traffic=np.array([dist.traffic.bytes.get("all_reduce", 0),
                               dist.traffic.total]))


def _ranks_bad(out: str) -> None:
    """Bad input of several kinds and a rank failing in the middle of the randomized PCA; each
    RankFailedError's message goes to ``out``/<case><rank>.txt. Then the group still works."""
    from speler import views_distributed

    me = dist.rank()
    x = _skeletons()
    nan = x.copy()
    nan[7, 1, 3, 4, 0] = np.nan
    cases = {
        "nan": lambda: label_free_views_sharded(nan),
        "ndim": lambda: label_free_views_sharded(x[0]),
        "view": lambda: label_free_views_sharded(x, views=("plain", "fourier")),
        "differ": lambda: label_free_views_sharded(x[:-1] if me == 1 else x),
        "pca": lambda: label_free_views_sharded(x, views=("plain",), exact_max_n=10),
    }

    def broken(*args):
        raise MemoryError("no room for the standardised rows")

    for name, call in cases.items():
        if name == "pca" and me == 1:  # rank 1 fails between two all-reduces of the PCA
            views_distributed.features._standardise = broken
        try:
            call()
            text = "no error"
        except dist.RankFailedError as e:
            text = str(e)
        (Path(out) / f"{name}{me}.txt").write_text(text)
    assert dist.all_reduce_array(np.ones(1)).tolist() == [2.0]


def _ranks_two_samples(out: str) -> None:
    """3 ranks, 2 samples: rank 2's shard is empty; both paths; rows saved as in _ranks_views."""
    x = _skeletons()[:2]
    res = {f"exact_{v}": a for v, a in label_free_views_sharded(x).items()}
    res.update({f"big_{v}": a for v, a in label_free_views_sharded(x, exact_max_n=1).items()})
    np.savez(Path(out) / f"rank{dist.rank()}.npz", **res)


# --- the tests -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict[str, np.ndarray]]:
    out = tmp_path_factory.mktemp("views2")
    spawn(_ranks_views, str(out))
    return [dict(np.load(out / f"rank{r}.npz")) for r in range(WORLD)]


def test_sharded_views_on_the_exact_path_are_the_single_process_views_bit_for_bit(two_ranks):
    x = _skeletons()
    want = features.label_free_views(x)
    assert set(want) == set(features.VIEWS)
    for r, (lo, hi) in enumerate(dist.shard_ranges(N_SKEL, WORLD)):
        assert two_ranks[r]["exact_plain"].shape[0] == hi - lo  # 21 and 20 rows
    for v, a in want.items():
        got = np.concatenate([two_ranks[r][f"exact_{v}"] for r in range(WORLD)])
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, a, err_msg=v)
    # progress as label_free_views: before each view, then at the end
    assert two_ranks[0]["progress"].tolist() == [[0, 3], [1, 3], [2, 3], [3, 3]]


def test_randomized_pca_on_two_ranks_keeps_the_single_process_inner_products(two_ranks):
    # Skeletons, 41 samples, dim 128: r = N - 1 = 40 components keep the whole centred space, so
    # the rows' inner products are those of the standardised features whatever the basis (and
    # q = min(r + 10, N) = 41 exceeds the rank of Z: the Gram orthonormalisation drops a
    # direction). Left: float64 rounding, then float32 rows.
    x = _skeletons()
    want = features.label_free_views(x)
    for v, a in want.items():
        got = np.concatenate([two_ranks[r][f"big_{v}"] for r in range(WORLD)])
        assert got.shape == a.shape and got.dtype == np.float32
        np.testing.assert_allclose(_gram(got), _gram(a), rtol=0, atol=1e-6, err_msg=v)
    # Low rank + noise, 301 samples (151 + 150 rows), dim 6 = the rank: the 7th singular value is
    # ~20 times smaller than the 6th, so after 4 power iterations the range finder's subspace
    # error is ~ (1/20)^9 (nothing); what is left is the float32 rounding of the unit rows
    # (~6e-8 per entry, ≤ 1e-6 in a 6-term inner product).
    low = _low_rank()
    got = np.concatenate([two_ranks[r]["low"] for r in range(WORLD)])
    ref = features.pca(low.reshape(N_LOW, -1), DIM_LOW)
    assert got.shape == ref.shape == (N_LOW, DIM_LOW)
    np.testing.assert_allclose(_gram(got), _gram(ref), rtol=0, atol=1e-6)
    # the same algorithm on one rank differs only in the order of the float sums
    one = _pca_rows(low.reshape(N_LOW, -1), N_LOW, dim=DIM_LOW, seed=0, stage="PCA")
    np.testing.assert_allclose(got, one, rtol=0, atol=1e-6)


def test_three_ranks_one_of_them_empty_give_the_single_process_views(tmp_path):
    spawn(_ranks_two_samples, str(tmp_path), world=3)
    parts = [dict(np.load(tmp_path / f"rank{r}.npz")) for r in range(3)]
    assert [len(p["exact_plain"]) for p in parts] == [1, 1, 0]
    want = features.label_free_views(_skeletons()[:2])
    for v, a in want.items():
        exact = np.concatenate([p[f"exact_{v}"] for p in parts])
        np.testing.assert_array_equal(exact, a, err_msg=v)
        big = np.concatenate([p[f"big_{v}"] for p in parts])  # one component: the rows are ±u
        assert big.shape == a.shape == (2, 1)
        np.testing.assert_allclose(_gram(big), _gram(a), rtol=0, atol=1e-6, err_msg=v)


def test_randomized_pca_never_gathers_and_all_reduces_what_the_docstring_says(two_ranks):
    f, q = 120, DIM_LOW + 10
    payload = 8 * (2 * f + 5 * f * q + 10 * q * q)  # float64 sums, 5 × (F × q), 10 Grams q × q
    ring = 2 * (WORLD - 1) / WORLD
    for r in range(WORLD):
        all_reduce, total = two_ranks[r]["traffic"].tolist()
        assert all_reduce == total  # no all-gather, no point-to-point
        stages = (all_reduce - ring * payload) / (ring * 8)  # 8-byte failure-agreement flags
        assert stages == int(stages) and 0 < stages < 60, stages


def test_one_rank_is_label_free_views_itself_whatever_exact_max_n():
    assert not dist.active()
    x = _low_rank(60)
    want = features.label_free_views(x, rocket_features=500)
    for exact_max_n in (10, 4000):
        got = label_free_views_sharded(x, rocket_features=500, exact_max_n=exact_max_n)
        assert got.keys() == want.keys()
        for v in want:
            np.testing.assert_array_equal(got[v], want[v])
    with pytest.raises(ConfigError, match="unknown label-free view 'fourier'"):
        label_free_views_sharded(x, views=("fourier",))
    with pytest.raises(DataFormatError, match="expected x of shape"):
        label_free_views_sharded(x[0])


def test_randomized_pca_copes_with_duplicated_samples_and_constant_data():
    # 3 distinct samples, each 40 times: Z has rank 2 < q = 12, the Gram is singular (a Cholesky
    # factor would fail); the directions Y lacks are dropped and the extra components are zeros,
    # as the exact PCA's (zero eigenvalues) are.
    rng = np.random.default_rng(1)
    z = np.repeat(rng.normal(size=(3, 30)), 40, axis=0)
    got = _pca_rows(z, len(z), dim=2, seed=0, stage="PCA")
    ref = features.pca(z, 2)
    np.testing.assert_allclose(_gram(got), _gram(ref), rtol=0, atol=1e-6)
    got = _pca_rows(z, len(z), dim=8, seed=0, stage="PCA")
    assert got.shape == features.pca(z, 8).shape == (120, 8)
    np.testing.assert_allclose(_gram(got), _gram(ref), rtol=0, atol=1e-6)
    flat = _pca_rows(np.full((50, 4), 2.5), 50, dim=8, seed=0, stage="PCA")
    np.testing.assert_array_equal(flat, features.pca(np.full((50, 4), 2.5), 8))


def test_bad_input_fails_both_ranks_with_the_single_process_message(tmp_path):
    spawn(_ranks_bad, str(tmp_path))
    x = _skeletons()
    nan = x.copy()
    nan[7, 1, 3, 4, 0] = np.nan
    single = {}
    for name, call in {"nan": lambda: features.label_free_views(nan),
                       "ndim": lambda: features.label_free_views(x[0]),
                       "view": lambda: features.label_free_views(x, views=("plain", "fourier"))
                       }.items():
        with pytest.raises((ConfigError, DataFormatError)) as caught:
            call()
        single[name] = f"{type(caught.value).__name__}: {caught.value}"
    assert "sample 7 has non-finite values" in single["nan"]
    for r in range(WORLD):
        text = {name: (tmp_path / f"{name}{r}.txt").read_text()
                for name in ("nan", "ndim", "view", "differ", "pca")}
        for name, message in single.items():  # every rank's input is bad: rank 0 reports
            assert text[name] == f"rank 0 failed in label-free views input: {message}"
        assert text["differ"].startswith("rank 0 failed in label-free views input: "
                                         "DataFormatError: label-free views: the ranks differ in x")
        assert text["pca"] == ("rank 1 failed in plain view PCA: MemoryError: no room for the "
                               "standardised rows")

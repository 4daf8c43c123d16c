"""The approximate index per shard of ``knn_distributed.build_knn_sharded`` (IVF, HNSW): ranks
spawned here (gloo, 127.0.0.1, a free port, a deadline per spawn) build an index over their own
rows while the queries travel the ring; their recall, measured on the ring, is checked against
an independent recall from the exact single-process graph; failures of the index building and of
a search fail every rank together. (The exact ring is tested in tests/test_distributed.py.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ranks import spawn
from speler import distributed as dist
from speler.config import GraphConfig
from speler.graph.knn import build_knn
from speler.graph.knn_distributed import MIN_IVF_ROWS, build_knn_sharded, gather_graph

DIM, K, CLUSTERS, QUERIES = 24, 10, 30, 300
N_IVF, N_HNSW = 3000, 1000
# "auto" beyond exact_max_n: IVF (pca_dim 64 >= d: no projection); few cells probed, so that the
# recall is well below 1 and its check means something
IVF = GraphConfig(k=K, index="auto", exact_max_n=500, nprobe=2, recall_queries=QUERIES,
                  use_gpu=False)
HNSW = GraphConfig(k=K, index="hnsw", recall_queries=QUERIES, use_gpu=False)
CUTS3 = [0, 0, 300, N_IVF]  # 3 ranks: one empty, one small (searched exactly), one with an IVF


def _points(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(CLUSTERS, DIM))  # overlapping clusters
    return (centres[rng.integers(0, CLUSTERS, n)] + rng.normal(size=(n, DIM))).astype(np.float32)




# --- what the ranks run --------------------------------------------------------------------------
def _save(out: Path, name: str, part) -> None:
    graph = gather_graph(part)
    every = dist.all_gather_object((part.graph.recall, part.graph.method, part.block_bytes))
    if dist.rank() == 0:
        np.savez(out / f"{name}.npz", idx=graph.indices, sims=graph.sims,
                 recalls=np.array([e[0] for e in every]), methods=np.array([e[1] for e in every]),
                 block_bytes=np.array([e[2] for e in every]), recall=graph.recall,
                 recall_seconds=graph.recall_seconds)


def _ranks_two(out: str) -> None:
    """IVF and HNSW per shard, then rank 1's index building raises, then its search does."""
    from speler.graph import knn_distributed

    out = Path(out)
    me = dist.rank()
    for name, cfg, n in (("ivf", IVF, N_IVF), ("hnsw", HNSW, N_HNSW)):
        x = _points(n)
        lo, hi = dist.shard_range(n)
        _save(out, name, build_knn_sharded(x[lo:hi], config=cfg))
    x = _points(N_IVF)
    lo, hi = dist.shard_range(N_IVF)

    def broken(*args, **kwargs):
        raise MemoryError("no room for the index")

    def broken_search(*args, **kwargs):  # an index that builds but whose searches raise
        return broken

    for stage, attr, fake in (("index", "_approximate_index", broken),
                              ("search", "_local_index", broken_search)):
        saved = getattr(knn_distributed, attr)
        if me == 1:
            setattr(knn_distributed, attr, fake)
        try:
            build_knn_sharded(x[lo:hi], config=IVF)
        except dist.RankFailedError as e:
            (out / f"{stage}{me}.txt").write_text(str(e))
        setattr(knn_distributed, attr, saved)
    dist.all_reduce_array(np.zeros(1))  # the ranks are still in step


def _ranks_three(out: str) -> None:
    me = dist.rank()
    x = _points(N_IVF)
    _save(Path(out), "three", build_knn_sharded(x[CUTS3[me]:CUTS3[me + 1]], config=IVF))


# --- checks --------------------------------------------------------------------------------------
def _independent_recall(x: np.ndarray, idx: np.ndarray, sims: np.ndarray, cfg: GraphConfig):
    """Recall@k of (idx, sims) on build_knn's recall queries, against the exact single-process
    graph: a neighbour counts when its similarity reaches the exact k-th one."""
    n = len(x)
    queries = np.sort(np.random.default_rng(cfg.seed + 1).choice(n, size=min(n, cfg.recall_queries),
                                                                 replace=False))
    exact = build_knn(x, config=GraphConfig(k=K, index="flat", use_gpu=False))
    kth = exact.sims[queries, K - 1:K] - 1e-5
    found = ((sims[queries] >= kth) & (idx[queries] >= 0)).sum(axis=1)
    return float(np.minimum(found, K).mean() / K)


def _check_graph(x: np.ndarray, got: dict) -> None:
    idx, sims = got["idx"], got["sims"]
    n = len(x)
    assert idx.shape == sims.shape == (n, K)
    assert ((idx >= 0) & (idx < n)).all()  # every row has k neighbours, ids in range
    assert (idx != np.arange(n)[:, None]).all()  # never itself
    assert all(len(set(row)) == K for row in idx.tolist())
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    exact = np.einsum("ij,ikj->ik", xn.astype(np.float64), xn[idx].astype(np.float64))
    np.testing.assert_allclose(sims, exact, rtol=0, atol=1e-5)  # re-ranked: exact similarities
    assert (np.diff(sims, axis=1) <= 0).all()  # best first
    # the recall measured on the ring is the recall of the graph it returned, on every rank
    want = _independent_recall(x, idx, sims, IVF if got["methods"][0] == "ivf" else HNSW)
    assert got["recalls"].tolist() == [float(got["recall"])] * len(got["recalls"])
    # equal up to float64 rounding of the mean (the counts are integers)
    assert float(got["recall"]) == pytest.approx(want, abs=1e-12)


def _ring_bytes(rows: list[int], nq: list[int], world: int) -> list[list[int]]:
    """Bytes rank r sends at each step: the held block and lists, then the lists going home."""
    row, lists = DIM * 4 + (K + 1) * 12, (K + 1) * 12
    out = []
    for r in range(world):
        steps = [(rows[(r - s) % world] + nq[(r - s) % world]) * row for s in range(world - 1)]
        o = (r + 1) % world
        out.append(steps + [(rows[o] + nq[o]) * lists])
    return out


def _queries_per_rank(cuts: list[int]) -> list[int]:
    q = np.sort(np.random.default_rng(1).choice(cuts[-1], size=QUERIES, replace=False))
    return np.diff(np.searchsorted(q, cuts)).tolist()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("knn_ranks")
    spawn(_ranks_two, str(out))
    return out


def test_ivf_per_shard_gives_a_graph_whose_recall_is_measured_as_build_knn_measures_it(two_ranks):
    got = dict(np.load(two_ranks / "ivf.npz"))
    assert got["methods"].tolist() == ["ivf", "ivf"]
    x = _points(N_IVF)
    _check_graph(x, got)
    assert 0.3 < float(got["recall"]) < 1.0  # approximate: below 1 with nprobe 2
    cuts = [0, N_IVF // 2, N_IVF]
    assert got["block_bytes"].tolist() == _ring_bytes(np.diff(cuts).tolist(),
                                                      _queries_per_rank(cuts), 2)


def test_hnsw_per_shard_gives_a_graph_whose_recall_is_measured_as_build_knn_measures_it(two_ranks):
    got = dict(np.load(two_ranks / "hnsw.npz"))
    assert got["methods"].tolist() == ["hnsw", "hnsw"]
    _check_graph(_points(N_HNSW), got)
    assert float(got["recall"]) > 0.9


def test_a_rank_whose_index_or_search_raises_fails_every_rank_with_its_message(two_ranks):
    for r in range(2):
        text = (two_ranks / f"index{r}.txt").read_text()
        assert text == "rank 1 failed in kNN index: MemoryError: no room for the index", text
        text = (two_ranks / f"search{r}.txt").read_text()
        assert text == "rank 1 failed in kNN search: MemoryError: no room for the index", text


def test_three_uneven_ranks_one_empty_one_searched_exactly(tmp_path):
    assert CUTS3[2] - CUTS3[1] < MIN_IVF_ROWS <= CUTS3[3] - CUTS3[2]
    spawn(_ranks_three, str(tmp_path), world=3)
    got = dict(np.load(tmp_path / "three.npz"))
    assert got["methods"].tolist() == ["ivf"] * 3
    _check_graph(_points(N_IVF), got)
    assert got["block_bytes"].tolist() == _ring_bytes(np.diff(CUTS3).tolist(),
                                                      _queries_per_rank(CUTS3), 3)


def test_one_process_builds_the_index_and_measures_the_recall_of_build_knn():
    for cfg, n in ((IVF, N_IVF), (HNSW, N_HNSW), (GraphConfig(k=K, pca_dim=8, index="ivf",
                                                               use_gpu=False), N_IVF)):
        x = _points(n, seed=2)
        ref = build_knn(x, config=cfg)
        part = build_knn_sharded(x, config=cfg)
        got = part.graph
        assert got.method == ref.method != "flat"
        assert got.recall == ref.recall and got.recall_seconds > 0
        assert part.block_bytes == []
        # the same index and searches: equal lists up to the order of tied similarities, and the
        # same similarities up to float32 rounding (BLAS sums a batch of another size in another
        # order: a fresh CI run saw 27 of 30,000 differ by 1.8e-7)
        np.testing.assert_array_equal(np.sort(got.indices, axis=1), np.sort(ref.indices, axis=1))
        np.testing.assert_allclose(got.sims, ref.sims, rtol=0, atol=1e-6)
    part = build_knn_sharded(_points(200), config=GraphConfig(k=K, backend="torch",
                                                              exact_max_n=10, use_gpu=False))
    assert part.graph.method == "flat" and part.graph.recall is None  # torch: exact only

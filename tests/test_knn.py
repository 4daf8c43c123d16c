"""kNN graph (faiss) and affinity: exact references, approximate recall, edge cases."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import scipy.sparse as sp

from speler.config import GraphConfig
from speler.errors import ConfigError, DataFormatError
from speler.graph.knn import KnnGraph, affinity, build_knn, gpu_available


def _brute_force(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = xn @ xn.T
    np.fill_diagonal(sims, -np.inf)
    idx = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(sims, idx, axis=1)


def _clusters(n: int, d: int, seed: int = 0, centers: int = 8, latent: int = 0) -> np.ndarray:
    """Gaussian clusters; with ``latent`` > 0 they live in a latent space of that dimension
    embedded in d dimensions plus a little noise (as learned embeddings do)."""
    rng = np.random.default_rng(seed)
    m = latent or d
    means = rng.standard_normal((centers, m)) * 3
    z = means[rng.integers(0, centers, n)] + rng.standard_normal((n, m))
    if latent:
        q, _ = np.linalg.qr(rng.standard_normal((d, latent)))
        z = z @ q.T + 0.05 * rng.standard_normal((n, d))
    return z.astype(np.float32)


def test_exact_knn_equals_brute_force():
    x = np.random.default_rng(1).standard_normal((400, 12)).astype(np.float32) * 7.0
    g = build_knn(x, config=GraphConfig(index="flat", use_gpu=False), k=9)
    idx, sims = _brute_force(x.astype(np.float64), 9)
    assert g.method == "flat" and g.recall is None
    assert g.indices.dtype == np.int64 and g.sims.dtype == np.float32
    assert g.indices.shape == (400, 9)
    np.testing.assert_allclose(g.sims, sims, atol=1e-5)
    # same neighbour sets (order may differ only among exact ties, which random data does not have)
    assert (np.sort(g.indices, axis=1) == np.sort(idx, axis=1)).mean() == 1.0
    assert not (g.indices == np.arange(400)[:, None]).any()


def test_duplicates_never_list_themselves_and_zero_rows_are_isolated():
    rng = np.random.default_rng(2)
    base = rng.standard_normal((50, 6)).astype(np.float32)
    x = np.concatenate([base, base[:10], np.zeros((3, 6), np.float32)])  # 10 exact duplicates
    g = build_knn(x, config=GraphConfig(use_gpu=False), k=4)
    assert not (g.indices == np.arange(len(x))[:, None]).any()
    for i in range(10):  # each duplicate pair finds the other first, with similarity 1
        assert g.indices[i, 0] == 50 + i and g.indices[50 + i, 0] == i
        assert g.sims[i, 0] == pytest.approx(1.0, abs=1e-5)
    W = affinity(g)
    assert np.isfinite(W.data).all()
    deg = np.asarray(W.sum(axis=1)).ravel()
    assert (deg[-3:] == 0).all() and (deg[:-3] > 0).all()


def test_affinity_of_unsorted_lists_with_a_repeated_neighbour_matches_its_definition():
    """Lists in similarity order (columns unsorted), one neighbour listed twice, a self-loop, a -1:
    W is the dense definition, canonical CSR (sorted, no duplicates), symmetric bit for bit."""
    rng = np.random.default_rng(7)
    n, k = 40, 6
    idx = rng.integers(0, n, (n, k))
    idx[3, :2] = 5  # listed twice: both entries count
    idx[4, 0], idx[6, 1] = 4, -1
    sims = np.sort(rng.uniform(-0.3, 1.0, (n, k)), axis=1)[:, ::-1].astype(np.float32)
    W = affinity(KnnGraph(indices=idx, sims=sims, method="hand", recall=None, seconds=0.0))
    A = np.zeros((n, n))
    for i in range(n):
        for j, s in zip(idx[i], sims[i]):
            if j >= 0 and j != i and s > 0:
                A[i, j] += np.float32(s) ** 3 / 2
    np.testing.assert_allclose(W.toarray(), A + A.T, rtol=1e-6)
    assert W.has_canonical_format and W.dtype == np.float32
    assert (W != W.T).nnz == 0 and (W.diagonal() == 0).all()
    idx[9, 2] = n  # an id past the last sample: an error, not a write out of bounds
    with pytest.raises(DataFormatError, match=r"row 9 lists neighbour 40, but there are only 40"):
        affinity(KnnGraph(indices=idx, sims=sims, method="hand", recall=None, seconds=0.0))


def test_affinity_formula_on_hand_made_graph():
    g = KnnGraph(
        indices=np.array([[1, 2], [0, 3], [0, -1], [1, 0]], dtype=np.int64),
        sims=np.array([[0.5, -0.2], [0.5, 0.9], [0.8, 0.0], [0.9, 0.3]], dtype=np.float32),
        method="hand", recall=None, seconds=0.0,
    )
    W = affinity(g, gamma=2.0)
    expect = np.zeros((4, 4))
    expect[0, 1] = expect[1, 0] = 0.5 ** 2  # mutual: (a + a) / 2
    expect[0, 2] = expect[2, 0] = 0.8 ** 2 / 2  # only 2 -> 0 (0 -> 2 is negative: no edge)
    expect[1, 3] = expect[3, 1] = 0.9 ** 2  # mutual
    expect[3, 0] = expect[0, 3] = 0.3 ** 2 / 2
    assert sp.isspmatrix_csr(W) and W.dtype == np.float32
    np.testing.assert_allclose(W.toarray(), expect, rtol=1e-6)
    assert (W.diagonal() == 0).all()


def test_affinity_graph_is_taken_by_propagation_without_its_symmetry_check(monkeypatch):
    """affinity's graph is symmetric bit for bit and passes validated_graph; propagation takes
    it without that check (a transpose), until its contents change; a graph that fails one of
    the checks mark_validated makes is left to the full check and its clear error."""
    import speler.graph.propagate as P

    rng = np.random.default_rng(5)
    g = KnnGraph(indices=rng.integers(0, 300, (300, 6)), method="random", recall=None,
                 sims=rng.uniform(-0.2, 1.0, (300, 6)).astype(np.float32), seconds=0.0)
    W = affinity(g)
    assert (W != W.T).nnz == 0
    checked = P.validated_graph(W.copy())
    assert (checked != W).nnz == 0 and checked.has_canonical_format
    calls = []
    real = P.validated_graph
    monkeypatch.setattr(P, "validated_graph", lambda m: calls.append(1) or real(m))
    labels = np.where(np.arange(300) % 10 == 0, np.arange(300) % 3, -1)
    P.propagate(W, labels, num_classes=3)
    assert calls == []
    W.data[0] = -1.0  # changed after it was built: checked in full
    with pytest.raises(DataFormatError, match="non-negative"):
        P.propagate(W, labels, num_classes=3)
    assert calls == [1]
    g.sims[0, 0], g.indices[0, 0] = np.inf, 1
    with pytest.raises(DataFormatError, match="NaN or infinite"):
        P.propagate(affinity(g), labels, num_classes=3)


def test_k_at_least_n_is_lowered_with_a_warning(caplog):
    x = np.random.default_rng(3).standard_normal((6, 3))
    with caplog.at_level(logging.WARNING, logger="speler.graph.knn"):
        g = build_knn(x, config=GraphConfig(use_gpu=False), k=10)
    assert g.indices.shape == (6, 5)
    assert "k=10 >= n=6" in caplog.text
    assert all(set(row) == set(range(6)) - {i} for i, row in enumerate(g.indices.tolist()))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_embeddings_are_rejected(bad):
    x = np.ones((5, 3))
    x[3, 1] = bad
    with pytest.raises(DataFormatError,
                       match="1 embedding rows contain NaN or infinite values .*row 3"):
        build_knn(x, k=2)


def test_bad_shapes_and_settings():
    with pytest.raises(DataFormatError, match="2-d array"):
        build_knn(np.ones(5), k=2)
    with pytest.raises(DataFormatError, match="at least 2 samples"):
        build_knn(np.ones((1, 4)), k=1)
    with pytest.raises(ConfigError, match="k must be a positive integer"):
        build_knn(np.ones((5, 2)), k=0)
    with pytest.raises(ConfigError, match="graph.index must be one of"):
        build_knn(np.ones((5, 2)), config=GraphConfig(index="annoy"), k=2)
    g = build_knn(np.random.default_rng(0).standard_normal((5, 2)), k=2)
    with pytest.raises(ConfigError, match="gamma"):
        affinity(g, gamma=0.0)


@pytest.mark.parametrize("index,pca,method", [("ivf", 0, "ivf"), ("ivf", 12, "ivf-pca"),
                                              ("hnsw", 0, "hnsw")])
def test_approximate_index_reports_its_measured_recall(index, pca, method):
    x = _clusters(4000, 32, latent=8)
    cfg = GraphConfig(index=index, use_gpu=False, recall_queries=300, nprobe=16, pca_dim=pca)
    g = build_knn(x, config=cfg, k=10)
    assert g.method == method and g.indices.shape == (4000, 10)
    assert g.recall is not None and 0.85 <= g.recall <= 1.0
    # independent recall over all samples, against brute force
    idx, sims = _brute_force(x.astype(np.float64), 10)
    kth = sims[:, -1:] - 1e-5
    found = (g.sims >= kth) & (g.indices >= 0)
    assert abs(found.mean() - g.recall) < 0.03
    assert not (g.indices == np.arange(4000)[:, None]).any()


def test_auto_picks_exact_below_the_limit_and_approximate_above():
    x = _clusters(600, 8)
    assert build_knn(x, config=GraphConfig(use_gpu=False), k=5).method == "flat"
    g = build_knn(x, config=GraphConfig(use_gpu=False, exact_max_n=100, recall_queries=100), k=5)
    assert g.method == "ivf" and g.recall is not None  # d = 8 <= pca_dim: no PCA


@pytest.mark.skipif(not gpu_available(), reason="needs faiss with a CUDA GPU")
def test_gpu_flat_equals_cpu_flat():
    x = _clusters(3000, 32)
    gpu = build_knn(x, config=GraphConfig(index="flat", use_gpu=True), k=10)
    cpu = build_knn(x, config=GraphConfig(index="flat", use_gpu=False), k=10)
    assert gpu.method == "gpu-flat" and cpu.method == "flat"
    np.testing.assert_allclose(gpu.sims, cpu.sims, atol=1e-4)


# --- torch backend ------------------------------------------------------------------------------
def _same_sets(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.all(np.sort(a, axis=1) == np.sort(b, axis=1), axis=1)


def test_torch_knn_equals_faiss_exact_search_and_gives_the_same_affinity():
    x = _clusters(2500, 24, seed=4, latent=8)
    faiss_g = build_knn(x, config=GraphConfig(index="flat", use_gpu=False), k=12)
    torch_g = build_knn(x, config=GraphConfig(backend="torch", use_gpu=False), k=12)
    assert torch_g.method == "torch" and torch_g.recall is None
    assert torch_g.indices.dtype == np.int64 and torch_g.sims.dtype == np.float32
    assert _same_sets(torch_g.indices, faiss_g.indices).all()
    np.testing.assert_allclose(torch_g.sims, faiss_g.sims, atol=1e-6)
    assert not (torch_g.indices == np.arange(2500)[:, None]).any()
    a, b = affinity(torch_g), affinity(faiss_g)
    assert (a.indptr == b.indptr).all() and (a.indices == b.indices).all()
    np.testing.assert_allclose(a.data, b.data, rtol=1e-5, atol=1e-7)


def test_two_stage_top_k_gives_torch_topk_values():
    """_top_columns (group maxima, then the best groups' entries) against torch.topk: the same
    values in the same order and columns that hold them, on continuous scores, on integer scores
    with many ties at the cut, with a ragged last group and with padding columns masked."""
    import torch

    from speler.graph.knn import _top_columns

    gen = torch.Generator().manual_seed(0)
    cases = [(torch.randn(40, 5000, generator=gen), 10, 16),
             (torch.randn(9, 12345, generator=gen).half(), 21, 32),  # ragged: 12345 = 385·32 + 25
             (torch.randint(0, 5, (30, 4000), generator=gen).float(), 25, 8)]  # ties at the cut
    for scores, m, group in cases:
        vals, cols = _top_columns(scores.clone(), m, group=group)
        want = torch.topk(scores.float(), m, dim=1).values
        assert torch.equal(vals.float(), want)
        assert torch.equal(scores.gather(1, cols).float(), want)
        assert all(len(set(r.tolist())) == m for r in cols)  # m distinct columns per row
    # columns from `valid` on are padding: never returned even where they hold the largest values
    scores = torch.randn(12, 4096, generator=gen)
    scores[:, 4000:] = 100.0
    vals, cols = _top_columns(scores.clone(), 20, group=16, valid=4000)
    assert (cols < 4000).all()
    assert torch.equal(vals, torch.topk(scores[:, :4000], 20, dim=1).values)
    # too few groups for the two stages: plain torch.topk, whatever the group size
    vals, cols = _top_columns(scores[:, :200].clone(), 20, group=16)
    assert torch.equal(vals, torch.topk(scores[:, :200], 20, dim=1).values)


@pytest.mark.parametrize("group", [32, 7], ids=["one-stage", "two-stage-ragged"])
def test_torch_float16_search_with_float32_rerank_is_exact(caplog, monkeypatch, group):
    """The GPU scheme (float16 scores, float32 re-rank, rows it cannot vouch for searched again in
    float32) run on the CPU: same similarities as faiss, same neighbours outside exact ties; with
    the top-k of each block of scores in one pass (3,000 columns in groups of 32: too few
    groups for two) and in two stages (groups of 7: 3,000 rows padded to whole groups)."""
    from speler.graph import knn
    from speler.graph.knn import _normalize_rows, _torch_search, _drop_self

    faiss = pytest.importorskip("faiss")
    monkeypatch.setattr(knn, "TOPK_GROUP", group)
    grouped = []
    real = knn._top_columns
    monkeypatch.setattr(knn, "_top_columns", lambda s, m, **kw: grouped.append(
        -(-s.shape[1] // group) >= knn.TOPK_GROUPS_MIN * m) or real(s, m, **kw))
    rng = np.random.default_rng(5)
    x = _clusters(3000, 32, seed=5, latent=6)
    # 60 near-duplicates: their similarities differ by less than float16 can tell apart
    x[100:160] = x[100] + 1e-4 * rng.standard_normal((60, 32)).astype(np.float32)
    x[7] = 0.0  # an all-zero row
    _normalize_rows(x)
    with caplog.at_level(logging.INFO, logger="speler.graph.knn"):
        sims, idx = _torch_search(x, 11, "cpu", None, half=True)
    again = int(caplog.text.split("torch kNN on cpu: ")[1].split(" of ")[0])
    assert 60 <= again < 300  # the near-duplicates (and the zero row) are searched again
    s_ex, i_ex = faiss.knn(x, x, 11, metric=faiss.METRIC_INNER_PRODUCT)
    np.testing.assert_allclose(sims, s_ex, atol=1e-6)
    separate = np.setdiff1d(np.arange(3000), np.r_[7, 100:160])
    assert _same_sets(idx[separate], i_ex[separate]).all()
    i_t, _ = _drop_self(idx, sims, 10)
    assert not (i_t == np.arange(3000)[:, None]).any()
    assert grouped and all(g == (group == 7) for g in grouped[:1])  # the path the id names


def test_torch_backend_is_chosen_on_cuda_without_faiss_gpu(monkeypatch):
    from speler.graph import knn

    monkeypatch.setattr(knn, "gpu_available", lambda: False)
    monkeypatch.setattr(knn, "torch_gpu_available", lambda: True)
    choose = knn._choose_method
    assert choose(1000, 64, GraphConfig()) == "torch-gpu"
    assert choose(1000, 64, GraphConfig(index="flat")) == "torch-gpu"
    assert choose(1000, 64, GraphConfig(backend="torch")) == "torch-gpu"
    assert choose(knn.TORCH_EXACT_MAX_N + 1, 256, GraphConfig()) == "ivf-pca"
    assert choose(1000, 64, GraphConfig(index="hnsw")) == "hnsw"
    assert choose(1000, 64, GraphConfig(backend="faiss")) == "flat"
    assert choose(1000, 64, GraphConfig(use_gpu=False)) == "flat"
    with pytest.raises(ConfigError, match="graph.index must be auto or flat with graph.backend"):
        GraphConfig(backend="torch", index="ivf")
    with pytest.raises(ConfigError, match="graph.backend must be one of auto, faiss, torch"):
        GraphConfig(backend="cupy")
    assert choose(1000, 64, GraphConfig(backend="torch", use_gpu=False)) == "torch"
    monkeypatch.setattr(knn, "gpu_available", lambda: True)
    assert choose(1000, 64, GraphConfig()) == "gpu-flat"  # faiss's GPU index comes first
    monkeypatch.setattr(knn, "torch_gpu_available", lambda: False)
    monkeypatch.setattr(knn, "gpu_available", lambda: False)
    assert choose(1000, 64, GraphConfig()) == "flat"  # the CPU default is unchanged
    assert choose(1000, 64, GraphConfig(backend="torch")) == "torch"

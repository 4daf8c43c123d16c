"""k-nearest-neighbour graph of embeddings (faiss, and torch's matrix products) and its affinity.

``build_knn`` L2-normalises float32 embeddings and finds each sample's k most cosine-similar other
samples. The index is chosen by ``GraphConfig.index``:

- ``"flat"``: exact inner-product search (``IndexFlatIP``, BLAS); ``"auto"`` picks it up to
  ``GraphConfig.exact_max_n`` samples, where it is both fast enough and exact.
- ``"ivf"``: about 4·sqrt(n) k-means cells (``speler.graph.cells.CellIndex``, torch), each query
  searching the points of its ``nprobe`` most similar cells by exact inner products, cell by cell
  as dense matrix products; ``"auto"`` picks it beyond ``exact_max_n``. With ``0 <
  GraphConfig.pca_dim < d`` the cells are clustered and ranked on a projection on the top
  eigenvectors of X^T X (method ``"ivf-pca"``; uncentred, so inner products are kept). The
  similarities are exact, so a neighbour is found exactly when its cell is probed. ``nprobe`` 0
  (the default) probes the fewest cells, at most ``max_nprobe``, whose recall on a seeded sample
  of ``recall_queries`` indexed points reaches ``target_recall`` (``cells.nprobe_for_recall``);
  the graph's recall is then measured on another sample, as for every approximate graph. (Until
  2026-11 this was faiss's ``IndexIVFFlat`` with a re-rank, at a fixed nprobe of 32: at 1M
  samples on one thread 436 s at recall 0.926, against 189 s at 0.962, ``benchmarks/knn_index.py``.)
- ``"hnsw"``: a navigable small-world graph (``IndexHNSWFlat``), also re-ranked exactly.
- ``"gpu-flat"``: exact search on the GPU, used for every n when faiss sees a GPU and
  ``GraphConfig.use_gpu`` is set.
- ``"torch"``: exact search in torch, chunked matmul + top-k (``_torch_search``), chosen by
  ``GraphConfig.backend`` "torch", or by "auto" (the default) on CUDA (with ``use_gpu``) when
  faiss sees no GPU (the PyPI faiss-gpu wheels lag the CUDA releases): index "flat", and "auto"
  up to ``TORCH_EXACT_MAX_N`` samples (beyond it the CPU's approximate index). Method
  ``"torch-gpu"`` on CUDA: scores in float16, the ``2 (k + 1) + TORCH_EXTRA`` best candidates
  re-ranked in float32; a row whose float16 cut-off is
  not safely below its float32 (k+1)-th similarity (within the float16 error bound
  ``_fp16_error``) is searched again in float32, so the result is exact. Method ``"torch"``
  (float32 throughout) on the CPU, for tests and machines without faiss.

An approximate graph is checked against exact search on ``GraphConfig.recall_queries`` random
queries (exact search in torch, ``_torch_search``); ``KnnGraph.recall`` is the mean recall@k (a
neighbour found counts as correct when its similarity reaches the exact k-th similarity, so ties
among duplicates are not penalised). For exact methods ``recall`` is ``None``: it is 1 by
construction and is not measured.

Edge cases, by design: a sample never counts as its own neighbour (also with exact duplicates);
an all-zero embedding row has similarity 0 to everything and ends up isolated in the affinity; a
``k`` of n or more is lowered to n - 1 with a warning; non-finite values are an error.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import scipy.sparse as sp

from speler.config import GraphConfig
from speler.errors import ConfigError, DataFormatError
from speler.system import torch_threads

logger = logging.getLogger(__name__)

_BATCH = 16_384  # queries per faiss call (bounds the distance tiles faiss allocates)
EXACT_METHODS = ("flat", "gpu-flat", "torch", "torch-gpu")  # recall 1 by construction
TORCH_EXACT_MAX_N = 4_000_000  # "auto" on CUDA without faiss-gpu: exact torch search up to here
# (n² d work: 1M × 256 took 9.6 s on an H100), approximate faiss index on the CPU beyond
TORCH_EXTRA = 16  # float16 candidates re-ranked in float32 on the GPU: 2 (k + 1) + this many
TOPK_GROUP = 32  # columns per group in the two-stage top-k of a block of scores (_top_columns)
TOPK_GROUPS_MIN = 4  # the two stages from this many groups per wanted column, one topk below


@dataclass
class KnnGraph:
    """Directed kNN lists.

    indices: int64 (n, k), neighbour ids, best first; -1 where an approximate index found fewer.
    sims: float32 (n, k), cosine similarity of each neighbour (0 where ``indices`` is -1).
    method: index used: "flat", "gpu-flat", "torch", "torch-gpu", "ivf", "ivf-pca", "hnsw".
    recall: mean recall@k against exact search on a sample of queries; None for exact methods.
    seconds: wall time of index building and search (recall check excluded).
    recall_seconds: wall time of the recall check (0 for exact methods).
    """

    indices: np.ndarray
    sims: np.ndarray
    method: str
    recall: float | None
    seconds: float
    recall_seconds: float = 0.0

    @property
    def n(self) -> int:
        return int(self.indices.shape[0])

    @property
    def k(self) -> int:
        return int(self.indices.shape[1])


def build_knn(
    embeddings: np.ndarray,
    *,
    config: GraphConfig = GraphConfig(),
    k: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> KnnGraph:
    """kNN graph of ``embeddings`` (float array (n, d), any scale) by cosine similarity.

    ``k`` overrides ``config.k``. Raises DataFormatError for a non-2-d array, fewer than 2 samples
    or non-finite values, ConfigError for k < 1 or an unknown index name.
    """
    x = _validated(embeddings)
    n = x.shape[0]
    k = config.k if k is None else k
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"build_knn: k must be a positive integer, got {k!r}")
    k = int(k)
    if k >= n:
        logger.warning("build_knn: k=%d >= n=%d samples; using k=%d", k, n, n - 1)
        k = n - 1
    method = _choose_method(n, x.shape[1], config)
    start = time.perf_counter()
    _normalize_rows(x)
    if method in ("torch", "torch-gpu"):
        sims, idx = _torch_search(x, k + 1, "cuda" if method == "torch-gpu" else "cpu", progress)
    elif method in ("ivf", "ivf-pca"):  # a torch CellIndex, built and searched on the free cores
        with torch_threads(0):
            sims, idx = _approximate_index(x, method, k, config).search_indexed(k + 1, progress)
    else:
        if method == "flat":
            faiss = _faiss()  # exact search straight on x: no index, no copy of the data

            def search(q: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
                return faiss.knn(q, x, kk, metric=faiss.METRIC_INNER_PRODUCT)
        elif method == "gpu-flat":
            index = _flat_index(x.shape[1], gpu=True)
            index.add(x)
            search = index.search
        else:
            with torch_threads(0):
                search = _approximate_index(x, method, k, config).search
        sims, idx = _search_all(search, x, k + 1, progress)
        search = index = None  # the index's memory goes before the recall check
    idx, sims = _drop_self(idx, sims, k)
    seconds = time.perf_counter() - start
    recall = None
    recall_seconds = 0.0
    if method not in EXACT_METHODS:
        t0 = time.perf_counter()
        recall = _recall(x, idx, sims, k, config)
        recall_seconds = time.perf_counter() - t0
        logger.info("kNN %s n=%d k=%d: %.1f s, recall@k %.4f", method, n, k, seconds, recall)
    return KnnGraph(indices=idx, sims=sims, method=method, recall=recall, seconds=seconds,
                    recall_seconds=recall_seconds)


def affinity(graph: KnnGraph, *, gamma: float = 3.0) -> sp.csr_matrix:
    """Symmetric affinity W (float32 CSR (n, n), zero diagonal) of a kNN graph.

    ``A_ij = max(0, s_ij)^gamma`` for j among i's neighbours, ``W = (A + A^T) / 2``: a mutual pair
    keeps its weight, a one-sided one gets half. Self-loops and missing neighbours (-1) are dropped;
    negative similarities give no edge. Samples without any edge are isolated (zero rows), which
    propagation handles.
    """
    if not gamma > 0 or not math.isfinite(gamma):
        raise ConfigError(f"affinity: gamma must be a positive number, got {gamma!r}")
    n = graph.indices.shape[0]
    cols = graph.indices
    if cols.size and cols.max() >= n:  # the CSR below is built unchecked: bounds first
        row = int(np.argmax(cols.max(axis=1)))
        raise DataFormatError(f"affinity: row {row} lists neighbour {int(cols[row].max())}, but"
                              f" there are only {n} samples")
    vals = np.maximum(graph.sims.astype(np.float32, copy=False), 0.0) ** np.float32(gamma)
    keep = (cols >= 0) & (cols != np.arange(n)[:, None]) & (vals > 0)
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.count_nonzero(keep, axis=1), out=indptr[1:])
    itype = np.int32 if n < 2**31 - 1 and indptr[-1] < 2**31 - 1 else np.int64
    # each row's kept neighbours in list order, no coordinate arrays; transposing sorts a row's
    # columns, so a^T and (a^T)^T = a come out sorted and a + a^T takes scipy's fast path for
    # sorted operands. The same W bit for bit, but where a row lists one neighbour three times or
    # more (scipy summed such repeats in no fixed order, here in list order: the last bit may
    # differ). Faster where neighbours have nearby ids (1M samples, k = 20: 1.3 s against
    # 2.1 s), about as fast where they are spread at random (the 1M graph of
    # benchmarks/propagation.py: 3.05 s against 3.04 s; its 200k graph 0.33 against 0.38 s)
    a = sp.csr_matrix((vals[keep] * np.float32(0.5), cols[keep].astype(itype),
                       indptr.astype(itype)), shape=(n, n))
    at = a.T.tocsr()
    w = (at.T.tocsr() + at).tocsr()
    w.sum_duplicates()  # a no-op unless scipy left duplicates (it adds repeats on its general path)
    w.eliminate_zeros()
    w.sort_indices()
    w = w.astype(np.float32, copy=False)
    # a_ij + a_ji is a_ji + a_ij bit for bit: symmetric, and every other check holds by
    # construction, so propagation need not check this graph again
    from speler.graph.propagate import mark_validated  # propagate does not import this module

    return mark_validated(w)


def combine_affinities(parts: list[tuple[sp.spmatrix, float]], *, lo: int = 0,
                       gather: Callable[[np.ndarray], np.ndarray] | None = None,
                       ) -> sp.csr_matrix:
    """Weighted mean of degree-normalised affinities: ``Σ_v w_v D_v^-1/2 W_v D_v^-1/2 / Σ_v w_v``.

    parts: (W_v, w_v) pairs, each W_v a symmetric non-negative (n, n) affinity of the same samples
    (e.g. one per view), w_v > 0. Normalising each view first makes the views count by their
    weights, not by the scale of their similarities or their degrees. Returns float32 CSR with a
    zero diagonal, symmetric; a single part comes back normalised. Raises DataFormatError for
    mismatched shapes, ConfigError for a weight that is not positive.

    Row-sharded (``graph.sharded``): each W_v is this rank's rows [lo, lo + rows) of the affinity,
    (rows, n), and ``gather`` all-gathers the rows' degrees into every sample's; the same
    arithmetic gives the same float32 rows of the result.
    """
    if not parts:
        raise DataFormatError("combine_affinities: no affinity to combine")
    shape = parts[0][0].shape
    total = None
    weight_sum = 0.0
    for W, w in parts:
        if W.shape != shape or (gather is None and shape[0] != shape[1]):
            raise DataFormatError(f"combine_affinities: affinities of shapes {shape} "
                                  f"and {W.shape} do not describe the same samples")
        if not (isinstance(w, (int, float)) and math.isfinite(w) and w > 0):
            raise ConfigError(f"combine_affinities: view weight must be a positive number, got {w!r}")
        W = sp.csr_matrix(W, dtype=np.float64)
        deg = np.asarray(W.sum(axis=1)).ravel()
        if gather is not None:
            deg = gather(deg)
        inv = np.divide(1.0, np.sqrt(deg), out=np.zeros_like(deg), where=deg > 0)
        S = sp.diags(inv[lo:lo + W.shape[0]]) @ W @ sp.diags(inv)
        total = w * S if total is None else total + w * S
        weight_sum += w
    out = (total / weight_sum).tocsr()
    out.setdiag(0.0, k=lo)
    out.eliminate_zeros()
    out.sort_indices()
    return out.astype(np.float32)


def strongest_neighbours(W: sp.spmatrix, k: int) -> KnnGraph:
    """The ``k`` strongest edges of each row of the affinity W as a KnnGraph (sims = edge weights;
    -1 and 0 where a row has fewer edges), e.g. the neighbours of a combined graph."""
    W = sp.csr_matrix(W)
    n = W.shape[0]
    counts = np.diff(W.indptr)
    width = max(1, int(counts.max(initial=0)))
    vals = np.full((n, width), -np.inf, dtype=np.float64)
    cols = np.full((n, width), -1, dtype=np.int64)
    rows = np.repeat(np.arange(n), counts)
    pos = np.arange(W.nnz) - np.repeat(W.indptr[:-1], counts)
    vals[rows, pos] = W.data
    cols[rows, pos] = W.indices
    k = max(1, min(int(k), width))
    top = np.argsort(-vals, axis=1, kind="stable")[:, :k]
    sims = np.take_along_axis(vals, top, axis=1)
    idx = np.take_along_axis(cols, top, axis=1)
    missing = ~np.isfinite(sims)
    idx[missing] = -1
    sims[missing] = 0.0
    return KnnGraph(indices=idx, sims=sims.astype(np.float32), method="combined", recall=None,
                    seconds=0.0)


# ----------------------------------------------------------------------------------------------
def _validated(embeddings: np.ndarray) -> np.ndarray:
    x = np.asarray(embeddings)
    if x.ndim != 2:
        raise DataFormatError(
            f"build_knn: embeddings must be a 2-d array (n_samples, dim), got shape {x.shape}"
        )
    if x.dtype.kind not in "fiu":
        raise DataFormatError(f"build_knn: embeddings must be numeric, got dtype {x.dtype}")
    if x.shape[0] < 2 or x.shape[1] < 1:
        raise DataFormatError(
            f"build_knn: need at least 2 samples and 1 dimension, got shape {x.shape}"
        )
    x = np.array(x, dtype=np.float32, order="C", copy=True)
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise DataFormatError(
            f"build_knn: {bad.size} embedding rows contain NaN or infinite values "
            f"(first: row {int(bad[0])}); expected finite numbers"
        )
    return x


def _normalize_rows(x: np.ndarray) -> None:
    """In-place L2 normalisation; all-zero rows stay zero (similarity 0 to everything)."""
    for lo in range(0, x.shape[0], 262_144):
        blk = x[lo:lo + 262_144]
        norms = np.sqrt(np.einsum("ij,ij->i", blk, blk))
        scale = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
        blk *= scale[:, None]


def _faiss():
    import faiss  # imported lazily: importing faiss is slow and not every caller needs it

    return faiss


def gpu_available() -> bool:
    """True when faiss was built with GPU support and sees at least one GPU."""
    faiss = _faiss()
    try:
        return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    except Exception:  # a faiss build without CUDA raises on the query
        return False


def torch_gpu_available() -> bool:
    """True when torch is installed and sees a CUDA device."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def _choose_method(n: int, d: int, config: GraphConfig) -> str:
    choice, backend = config.index, config.backend
    if choice not in ("auto", "flat", "ivf", "hnsw"):
        raise ConfigError(
            f"graph.index must be one of auto, flat, ivf, hnsw; got {choice!r}"
        )
    if backend not in ("auto", "faiss", "torch"):
        raise ConfigError(f"graph.backend must be one of auto, faiss, torch; got {backend!r}")
    if backend == "torch":
        if choice not in ("auto", "flat"):
            raise ConfigError(f"graph.backend 'torch' does exact search only; graph.index must"
                              f" be auto or flat, got {choice!r}")
        return "torch-gpu" if config.use_gpu and torch_gpu_available() else "torch"
    faiss_gpu = config.use_gpu and gpu_available()
    torch_gpu = (backend == "auto" and config.use_gpu and not faiss_gpu
                 and choice in ("auto", "flat") and torch_gpu_available())
    if choice == "auto":
        if faiss_gpu:
            return "gpu-flat"
        if torch_gpu and n <= TORCH_EXACT_MAX_N:
            return "torch-gpu"
        choice = "flat" if n <= config.exact_max_n else "ivf"
    if choice == "flat" and faiss_gpu:
        return "gpu-flat"
    if choice == "flat" and torch_gpu:
        return "torch-gpu"
    if choice == "ivf" and 0 < config.pca_dim < d:
        return "ivf-pca"
    return choice


class _Owner:
    """A faiss index with the Python objects it points to (sub-indexes, GPU resources), which
    must stay alive as long as it does."""

    def __init__(self, index, *parts):
        self.index = index
        self.parts = parts

    def add(self, x: np.ndarray) -> None:
        self.index.add(x)

    def search(self, q: np.ndarray, k: int):
        return self.index.search(q, k)


def _flat_index(d: int, *, gpu: bool):
    faiss = _faiss()
    if gpu:
        res = faiss.StandardGpuResources()
        return _Owner(faiss.GpuIndexFlatIP(res, d), res)
    return faiss.IndexFlatIP(d)


def _ivf_cells(n: int) -> int:
    """Number of k-means cells: about 4·sqrt(n), at least 16, at most n / 39 (faiss's guidance)."""
    return int(max(16, min(4 * math.sqrt(n), n // 39)))


def _approximate_index(x: np.ndarray, method: str, k: int, config: GraphConfig):
    """An approximate index over the unit rows x whose similarities are exact.

    "ivf" / "ivf-pca": a ``cells.CellIndex`` probing ``config.nprobe`` cells, or for nprobe 0
    the fewest that reach ``config.target_recall`` on a seeded sample of the rows (another
    sample than the recall check's). "hnsw": faiss's ``IndexHNSWFlat`` whose ``refine_factor ·
    (k + 1)`` best candidates ``IndexRefineFlat`` re-ranks by their exact inner product."""
    n, d = x.shape
    if method in ("ivf", "ivf-pca"):
        from speler.graph.cells import CellIndex, nprobe_for_recall  # torch, only when needed

        dim = int(config.pca_dim) if method == "ivf-pca" else 0
        index = CellIndex(x, cells=_ivf_cells(n), dim=dim, seed=config.seed, nprobe=config.nprobe)
        if not config.nprobe:
            queries = _recall_queries(n, config, stream=2)
            index.nprobe, reached = nprobe_for_recall(index, x, queries, k, config.target_recall,
                                                      config.max_nprobe)
            if reached < config.target_recall:
                logger.warning("kNN %s: %d cells probed (graph.max_nprobe) reach a recall of %.3f"
                               " on sample queries, below graph.target_recall %.3f", method,
                               index.nprobe, reached, config.target_recall)
            logger.info("kNN %s: %d of %d cells probed, recall %.4f on sample queries", method,
                        index.nprobe, index.cells, reached)
        return index
    faiss = _faiss()
    base = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
    base.hnsw.efConstruction = 64
    base.hnsw.efSearch = max(64, 2 * (k + 1))
    index = faiss.IndexRefineFlat(base)
    index.k_factor = float(max(1, config.refine_factor))
    index.add(x)
    return _Owner(index, base)


def _search_all(search, x: np.ndarray, kk: int, progress: Callable[[int, int], None] | None):
    n = x.shape[0]
    sims = np.empty((n, kk), dtype=np.float32)
    idx = np.empty((n, kk), dtype=np.int64)
    for lo in range(0, n, _BATCH):
        hi = min(n, lo + _BATCH)
        s, i = search(x[lo:hi], kk)
        sims[lo:hi] = s
        idx[lo:hi] = i
        if progress is not None:
            progress(hi, n)
    return sims, idx


def _fp16_error(d: int) -> float:
    """Bound on |float16 score - float32 score| for two vectors of norm <= 1 and dimension d:
    rounding both inputs to float16 (unit roundoff 2^-11: ≤ 2^-10 by Cauchy-Schwarz, plus at most
    2^-25 · sqrt(d) per vector for subnormals), float32 accumulation (≤ d · 2^-24) and rounding
    the score to float16 (≤ 2^-12 for |s| ≤ 1); a quarter more for safety."""
    return 1.25 * (2.0 ** -10 + 2.0 ** -12 + d * 2.0 ** -23)


@contextlib.contextmanager
def _exact_matmuls(torch):
    """float32 matmuls in float32 (no TF32) and float16 ones accumulated in float32, for a while."""
    flags = torch.backends.cuda.matmul
    old = flags.allow_tf32, flags.allow_fp16_reduced_precision_reduction
    flags.allow_tf32, flags.allow_fp16_reduced_precision_reduction = False, False
    try:
        yield
    finally:
        flags.allow_tf32, flags.allow_fp16_reduced_precision_reduction = old


def _torch_search(x: np.ndarray, kk: int, device: str,
                  progress: Callable[[int, int], None] | None, *,
                  half: bool | None = None, queries: np.ndarray | None = None,
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``kk`` inner products of every row of ``queries`` (default: x itself; float32
    (m, d)) against all rows of x (float32 (n, d), rows of norm 1 or 0), in torch: (sims float32
    (m, kk), indices int64 (m, kk)), best first.

    Blocks of query rows × all rows, then top-k of each block (``_top_columns``). CPU: float32
    scores. CUDA: the data lives on the GPU in float16 and float32; float16 scores give
    ``2 kk + TORCH_EXTRA`` candidates, re-ranked by their float32 inner products; rows where a
    candidate outside could still be among the best (its float16 score within ``_fp16_error`` of
    the float32 kk-th) are searched again in float32. One copy back per block. ``half``
    (default: on CUDA) picks the float16 + re-rank scheme; tests run it on the CPU.
    """
    import torch

    n, d = x.shape
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    half = cuda if half is None else half
    full = torch.from_numpy(x).to(dev)
    low = full.half() if half else full
    m = min(n, 2 * kk + TORCH_EXTRA) if half else kk  # candidates per row
    if n % TOPK_GROUP and _two_stages(n, m, TOPK_GROUP):
        # rows of zeros up to whole groups of columns for _top_columns (whose scores it masks):
        # a copy of the data once instead of one of every block of scores
        low = torch.cat([low, low.new_zeros((TOPK_GROUP - n % TOPK_GROUP, d))])
    q_full = full if queries is None else torch.from_numpy(
        np.ascontiguousarray(queries, dtype=np.float32)).to(dev)
    q_low = q_full.half() if half else q_full
    nq = q_full.shape[0]
    if cuda:
        free, _ = torch.cuda.mem_get_info(dev)
        budget = min(4 << 30, free // 8)  # bytes per block of scores (and of re-rank gathers)
    else:
        budget = 256 << 20
    rows = int(max(1, min(nq, budget // (n * low.element_size()), budget // (4 * m * d + 1))))
    sims = np.empty((nq, kk), dtype=np.float32)
    idx = np.empty((nq, kk), dtype=np.int64)
    eps = _fp16_error(d)
    again = 0
    with _exact_matmuls(torch) if cuda else contextlib.nullcontext():
        for lo in range(0, nq, rows):
            hi = min(nq, lo + rows)
            top_s, top_i = _top_columns(q_low[lo:hi] @ low.T, m, valid=n)
            if half:
                # float32 re-rank of the candidates (elementwise: no TF32 whatever the settings)
                exact = (full[top_i] * q_full[lo:hi, None, :]).sum(-1)
                exact, order = torch.sort(exact, dim=1, descending=True)
                top_i = top_i.gather(1, order)
                if m < n:
                    unsure = torch.nonzero(top_s[:, -1].float() + eps >= exact[:, kk - 1])[:, 0]
                    again += unsure.numel()
                    if unsure.numel():  # rare: search those rows again in float32
                        again_s, again_i = _top_columns(q_full[lo + unsure] @ full.T, kk)
                        exact[unsure, :kk], top_i[unsure, :kk] = again_s, again_i
                top_s, top_i = exact[:, :kk], top_i[:, :kk]
            sims[lo:hi] = top_s.float().cpu().numpy()
            idx[lo:hi] = top_i.cpu().numpy()
            if progress is not None:
                progress(hi, nq)
    if half:
        logger.info("torch kNN on %s: %d of %d rows searched again in float32 (float16 margin"
                    " %.2e)", device, again, nq, eps)
    return sims, idx


def _top_columns(scores, m: int, group: int | None = None, valid: int | None = None):
    """The ``m`` largest entries of each row of ``scores`` (torch (rows, n)): (values, column
    ids), largest first, as ``torch.topk(scores, m, dim=1)`` gives them (which of several equal
    values is taken may differ). Columns from ``valid`` on (default: none) are padding, set to
    -inf in place and never returned while ``valid`` >= m.

    With at least ``TOPK_GROUPS_MIN · m`` groups of ``group`` (default ``TOPK_GROUP``) columns,
    in two stages: each group's maximum, the ``m`` groups with the largest maxima, then the top
    ``m`` of those groups' entries. Exact: an entry at least the m-th largest value t lies in a
    group whose maximum is at least t, every group with a maximum above t is among the m chosen
    (fewer than m entries exceed t, each group such a maximum needs one of its own), and the m
    chosen groups hold m entries of at least t. A group is every G-th column (g, g + G, ...,
    with G = n / group), so its maxima are a reduction across ``group`` slabs of the block, one
    read of it at the memory's rate. On an H200, per block of 2,048 × 1M float16 scores:
    torch.topk 14 ms (a radix select passes over the rows a few bits at a time; the matmul
    that made the block took 2 ms), maxima of 32 neighbouring columns instead 17.5 ms.
    """
    import torch

    group = TOPK_GROUP if group is None else group
    rows, n = scores.shape
    if valid is not None and valid < n:
        scores[:, valid:] = -math.inf
    if not _two_stages(n, m, group):
        return torch.topk(scores, m, dim=1)
    groups = -(-n // group)
    if groups * group != n:  # padded with -inf, which never beats a real entry
        scores = torch.nn.functional.pad(scores, (0, groups * group - n), value=-math.inf)
    best = scores.view(rows, group, groups).amax(1)  # group g: columns g, g + groups, ...
    chosen = torch.topk(best, m, dim=1).indices  # (rows, m) group ids
    cols = (chosen[:, :, None] + groups * torch.arange(group, device=scores.device)
            ).reshape(rows, m * group)
    vals, pos = torch.topk(scores.gather(1, cols), m, dim=1)
    return vals, cols.gather(1, pos)


def _two_stages(n: int, m: int, group: int) -> bool:
    """Whether ``_top_columns`` takes the top ``m`` of ``n`` columns in two stages: at least
    ``TOPK_GROUPS_MIN · m`` groups of ``group`` columns (the last one may be short)."""
    return -(-n // group) >= TOPK_GROUPS_MIN * m


def tie_ordered(indices: np.ndarray, sims: np.ndarray, keep: int | None = None,
                ) -> tuple[np.ndarray, np.ndarray]:
    """(indices, sims) with each row's entries ordered by similarity, highest first, and equal
    similarities by sample id (the first ``keep`` of them, or all): the order the sharded search
    merges in, so two searches' lists are equal in it exactly when they found the same neighbours
    at the same similarities."""
    order = np.lexsort((indices, -sims), axis=1)[:, :keep]
    return np.take_along_axis(indices, order, axis=1), np.take_along_axis(sims, order, axis=1)


def same_up_to_ties(i1: np.ndarray, s1: np.ndarray, i2: np.ndarray, s2: np.ndarray) -> bool:
    """Whether two kNN lists (indices, sims) hold the same neighbours at the same similarities in
    every row, whatever the order among tied similarities (``tie_ordered``)."""
    (a, b), (c, d) = tie_ordered(i1, s1), tie_ordered(i2, s2)
    return bool(np.array_equal(a, c) and np.array_equal(b, d))


def _drop_self(
    idx: np.ndarray, sims: np.ndarray, k: int, ids: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """From k+1 results per row keep k, without the query itself (first among duplicates or not).

    ids: int (rows,), the sample id of each query row (default: the row number)."""
    if ids is None:
        ids = np.arange(idx.shape[0], dtype=np.int64)
    is_self = idx == ids[:, None]
    order = np.argsort(is_self, axis=1, kind="stable")[:, :k]  # non-self entries first, in order
    out_i = np.take_along_axis(idx, order, axis=1)
    out_s = np.take_along_axis(sims, order, axis=1)
    missing = out_i < 0
    if missing.any():
        out_s[missing] = 0.0
    return np.ascontiguousarray(out_i), np.ascontiguousarray(out_s, dtype=np.float32)


def _recall(x: np.ndarray, idx: np.ndarray, sims: np.ndarray, k: int, config: GraphConfig) -> float:
    """Mean recall@k of (idx, sims) on a random sample of queries, against exact search."""
    queries = _recall_queries(x.shape[0], config)
    with torch_threads(0):
        s_ex, i_ex = _torch_search(x, k + 1, "cpu", None, queries=x[queries])
    found = _recall_found(idx[queries], sims[queries], i_ex, s_ex, queries, k)
    return float(found.mean() / k)


def _recall_queries(n: int, config: GraphConfig, stream: int = 1) -> np.ndarray:
    """The sorted sample ids whose neighbours the recall check compares (seeded by config.seed;
    another ``stream`` draws another sample, e.g. 2 for the choice of ``nprobe``)."""
    q = int(min(n, max(1, config.recall_queries)))
    rng = np.random.default_rng(config.seed + stream)
    return np.sort(rng.choice(n, size=q, replace=False))


def _recall_found(idx: np.ndarray, sims: np.ndarray, i_ex: np.ndarray, s_ex: np.ndarray,
                  queries: np.ndarray, k: int) -> np.ndarray:
    """Neighbours found per query (int (q,), at most k): idx/sims (q, k) are the graph's lists of
    the ``queries``, i_ex/s_ex (q, k + 1) their exact top k + 1 (the query itself included)."""
    i_ex, s_ex = _drop_self(i_ex, s_ex, k, ids=queries)
    kth = s_ex[:, -1:] - 1e-5  # ties at the k-th similarity count as found
    found = (sims >= kth) & (idx >= 0)
    return np.minimum(found.sum(axis=1), k)

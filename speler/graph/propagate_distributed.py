"""Label propagation with the rows of the graph partitioned over the ranks of a process group.

Rank r owns the rows [lo_r, hi_r) of the n × n affinity W and of every n × C block (B, X, R, P):
contiguous ranges in rank order (``distributed.shard_ranges``). It solves the same system as
``propagate.propagate``, ``(I - α S) M = (1 - α) B`` with ``S = D̂^-1/2 Ŵ D̂^-1/2``, by the same
block conjugate gradient (``propagate._block_cg_torch``: one product per iteration on the columns
still active, float32 blocks, column dot products accumulated in float64, a column leaves the block
when its residual is ≤ tol · ||b_c||, the warm start kept) and reaches the same solution to the
solver's tolerance.

What crosses the network per iteration:
- the product ``S P`` needs the rows of P on the columns that the local rows of S touch. With
  ``exchange="halo"`` (default) only those rows come, from their owners (``HaloPlan``, computed
  once per graph: a rank sends each peer the rows of its shard that the peer's rows reference);
  ``"allgather"`` gathers all of P on every rank instead (simpler, n × active × 4 bytes per rank).
- the column dot products ⟨P, AP⟩ and ⟨R, R⟩: two all-reduces of ``active`` float64 numbers.
``DistributedCG.bytes_per_iteration`` has the bytes this rank sent at each iteration.

``affinity_rows`` builds the local rows of ``knn.affinity``'s W from the sharded kNN lists
(``knn_distributed``) by sending each edge to the owner of its other end, so no rank ever holds the
whole graph. ``propagate_scores`` runs the steps of ``propagate`` up to M: the prior, the balance
weights (from the predictions, from a warm start or from a distributed unbalanced first pass),
the normalised operator and the solve. The rest of ``propagate`` (labels, margin, energy,
thresholds) needs all of M and runs on one rank after ``distributed.gather_array``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import scipy.sparse as sp

from speler import distributed as dist
from speler.config import PropagationConfig
from speler.errors import ConfigError, DataFormatError, LabelError
from speler.graph.knn_distributed import ShardedKnn
from speler.graph.propagate import (
    FIRST_PASS_TOL, _argmax_or, _balance_prior, _cg_loop, _torch_csr, _validated_prior,
    balance_weights, seed_matrix, solver_threads,
)

logger = logging.getLogger(__name__)


# --- the graph's rows ----------------------------------------------------------------------------
def affinity_rows(part: ShardedKnn, *, gamma: float = 3.0) -> sp.csr_matrix:
    """Rows [part.lo, part.hi) of ``knn.affinity(whole graph, gamma)`` (float32 CSR (rows, n)).

    ``A_ij = max(0, s_ij)^γ`` for j among i's neighbours and ``W = (A + A^T) / 2``: the local
    rows of A are here; those of A^T are the edges (j → i) of the other ranks, which each rank
    sends to the owner of i (one all-to-all of (i, j, value) triples). Every rank must call it.
    """
    if not gamma > 0 or not math.isfinite(gamma):
        raise ConfigError(f"affinity: gamma must be a positive number, got {gamma!r}")
    g = part.graph
    lo, hi, n = part.lo, part.hi, part.n
    rows_n, k = g.indices.shape
    rows = np.repeat(np.arange(lo, hi, dtype=np.int64), k)
    cols = g.indices.reshape(-1).astype(np.int64, copy=False)
    vals = np.maximum(g.sims.reshape(-1).astype(np.float32, copy=False), 0.0) ** np.float32(gamma)
    keep = (cols >= 0) & (cols != rows) & (vals > 0)
    rows, cols, vals = rows[keep], cols[keep], vals[keep] * np.float32(0.5)
    bounds = np.array([r[1] for r in dist.all_gather_object((lo, hi))], dtype=np.int64)
    owner = np.searchsorted(bounds, cols, side="right")  # rank holding row j of A^T's edge (j, i)
    order = np.argsort(owner, kind="stable")
    cut = np.searchsorted(owner[order], np.arange(dist.world_size() + 1))
    triples = np.stack([cols, rows, vals.view(np.int32).astype(np.int64)], axis=1)[order]
    got = dist.all_to_all_arrays([triples[cut[p]:cut[p + 1]] for p in range(dist.world_size())],
                                 kind="affinity")
    t = np.concatenate(got, axis=0)
    t_vals = t[:, 2].astype(np.int32).view(np.float32)
    shape = (hi - lo, n)
    a = sp.csr_matrix((vals, (rows - lo, cols)), shape=shape, dtype=np.float32)
    at = sp.csr_matrix((t_vals, (t[:, 0] - lo, t[:, 1])), shape=shape, dtype=np.float32)
    w = (a + at).tocsr()
    w.sum_duplicates()
    w.eliminate_zeros()
    w.sort_indices()
    return w.astype(np.float32, copy=False)


def row_block(W: sp.spmatrix, lo: int, hi: int) -> sp.csr_matrix:
    """Rows [lo, hi) of a whole affinity W as float32 CSR (rows, n), zero diagonal, sorted
    (for callers and tests that hold W; the rows ``propagate`` validates)."""
    W = sp.csr_matrix(W, dtype=np.float32)[lo:hi].tocsr()
    W.sum_duplicates()
    coo = W.tocoo()
    diag = coo.row + lo == coo.col
    if diag.any():
        W = sp.csr_matrix((coo.data[~diag], (coo.row[~diag], coo.col[~diag])), shape=W.shape,
                          dtype=np.float32)
    W.eliminate_zeros()
    W.sort_indices()
    return W


# --- the exchange of the rows a product reads ----------------------------------------------------
@dataclass
class HaloPlan:
    """Which rows of an n × m block this rank reads and who sends them.

    ext_ids: int64, sorted global row ids of the extended block (the own range whole, plus the
        halo rows of the other ranks); the local operator's columns index into it.
    send: per peer, the local row numbers (0-based in the own range) the peer reads from here.
    recv: per peer, how many rows come from it (their ext positions follow the peer's order).
    mode: "halo" or "allgather".
    """

    lo: int
    hi: int
    n: int
    ranges: list[tuple[int, int]]
    ext_ids: np.ndarray
    send: list[np.ndarray]
    recv: list[int]
    mode: str = "halo"

    @property
    def halo_rows(self) -> int:
        return int(sum(self.recv))

    def extend(self, P, kind: str = "cg_halo"):
        """The extended block (len(ext_ids), m) float32 tensor from this rank's rows P (rows, m)."""
        import torch

        world, me = len(self.ranges), dist.rank()
        if world == 1:
            return P
        dev = dist.device()
        m = P.shape[1]
        pending = []
        pieces: list = [None] * world
        pieces[me] = P
        for peer in range(world):
            if peer == me:
                continue
            rows = self.send[peer]
            if rows.size:
                src = P if self.mode == "allgather" else P[torch.from_numpy(rows)]
                t = src.contiguous().to(dev)
                pending.append((dist.isend(t, peer, kind), t, None))
            if self.recv[peer]:
                buf = torch.empty((self.recv[peer], m), dtype=torch.float32, device=dev)
                pending.append((dist.irecv(buf, peer), buf, peer))
            else:
                pieces[peer] = P.new_zeros((0, m))
        for work, t, peer in pending:
            work.wait()
            if peer is not None:
                pieces[peer] = t.cpu()
        return torch.cat(pieces, 0)


def halo_plan(S_rows: sp.csr_matrix, lo: int, hi: int, *, mode: str = "halo") -> HaloPlan:
    """The exchange plan for the local rows [lo, hi) of a square operator (CSR (rows, n)).

    Every rank must call it (one all-to-all of the row lists each rank needs from each other)."""
    if mode not in ("halo", "allgather"):
        raise ConfigError(f"exchange must be 'halo' or 'allgather', got {mode!r}")
    n = S_rows.shape[1]
    ranges = [tuple(r) for r in dist.all_gather_object((lo, hi))]
    world, me = len(ranges), dist.rank()
    if mode == "allgather":
        needed = [np.arange(a, b, dtype=np.int64) for a, b in ranges]
    else:
        cols = np.unique(S_rows.indices.astype(np.int64))
        needed = [cols[(cols >= a) & (cols < b)] for a, b in ranges]
    needed[me] = np.arange(lo, hi, dtype=np.int64)
    asks = [needed[p] if p != me else np.zeros(0, np.int64) for p in range(world)]
    asked = dist.all_to_all_arrays(asks, kind="cg_setup")  # the rows each peer reads from here
    send = [np.asarray(a, dtype=np.int64) - lo if p != me else np.zeros(0, np.int64)
            for p, a in enumerate(asked)]
    recv = [int(needed[p].size) if p != me else 0 for p in range(world)]
    return HaloPlan(lo=lo, hi=hi, n=n, ranges=ranges, ext_ids=np.concatenate(needed), send=send,
                    recv=recv, mode=mode)


def local_operator(S_rows: sp.csr_matrix, plan: HaloPlan) -> sp.csr_matrix:
    """S_rows with its columns renumbered into ``plan.ext_ids`` (monotone: entries keep their
    order in each row, so every row's sum is formed as in the single-process product)."""
    pos = np.searchsorted(plan.ext_ids, S_rows.indices)
    if S_rows.nnz and not np.array_equal(plan.ext_ids[np.minimum(pos, len(plan.ext_ids) - 1)],
                                         S_rows.indices):
        raise DataFormatError("propagation: the exchange plan misses columns of the operator")
    return sp.csr_matrix((S_rows.data, pos, S_rows.indptr), shape=(S_rows.shape[0],
                                                                    len(plan.ext_ids)))


# --- the solver ----------------------------------------------------------------------------------
@dataclass
class DistributedCG:
    """Local rows of the solution and the solver's figures (the same on every rank, except the
    bytes, which are this rank's).

    X: float32 (rows, C). iterations, converged, residual (largest ||r_c|| / ||b_c||), products
    (one per active column per iteration) as ``propagate._block_cg``. bytes_per_iteration: bytes
    this rank sent in each iteration (halo rows + all-reduces); setup_bytes: before the loop
    (plan, initial residual, norms). halo_rows: rows of the block received per product.
    """

    X: np.ndarray
    iterations: int
    converged: bool
    residual: float
    products: int
    bytes_per_iteration: list[int] = field(default_factory=list)
    setup_bytes: int = 0
    halo_rows: int = 0
    seconds: float = 0.0


def _dots(a, b) -> np.ndarray:
    """Column-wise dot products over all ranks' rows (float32 products summed in float64)."""
    local = np.einsum("ij,ij->j", a.numpy(), b.numpy(), dtype=np.float64)
    return dist.all_reduce_array(local, "sum")


def block_cg(
    S_rows: sp.csr_matrix,
    B: np.ndarray,
    *,
    lo: int,
    config: PropagationConfig = PropagationConfig(),
    X0: np.ndarray | None = None,
    tol: float | None = None,
    solved: np.ndarray | None = None,
    exchange: str = "halo",
    plan: HaloPlan | None = None,
    progress: Callable[[int, int], None] | None = None,
    what: str = "propagation",
) -> DistributedCG:
    """Solve (I - αS) X = B on the rows [lo, lo + len(B)) of S, B and X0 held by this rank.

    S_rows: float32 CSR (rows, n), this rank's rows of the (symmetric) operator, global column
    ids. B: float (rows, C). X0: the local rows of the warm start, or None (zeros). solved: bool
    (C,), columns the caller knows are solved at X0 (as ``propagate``'s warm start). Every rank
    must call it with the same C, config and tol. The algorithm, the stopping rule and the
    PropagationWarning at the iteration cap are those of ``propagate._block_cg``.
    """
    # threads 0 means one per rank here: the ranks on a machine share its cores already
    with solver_threads(config.threads or 1, S_rows.nnz):
        return _block_cg(S_rows, B, lo, config, X0, config.tol if tol is None else tol, solved,
                         exchange, plan, progress, what)


def _block_cg(S_rows, B, lo, config, X0, tol, solved, exchange, plan, progress, what):
    import torch

    start = time.perf_counter()
    before = dist.traffic.total
    hi = lo + B.shape[0]
    if plan is None:
        plan = halo_plan(S_rows, lo, hi, mode=exchange)
    St = _torch_csr(local_operator(S_rows, plan))

    def product(P):  # S P on the local rows, from the local rows of P
        return torch.sparse.mm(St, plan.extend(P))

    marks: list[int] = []
    solve = _cg_loop(product, _dots, B, X0, config, tol, solved, progress, what,
                     mark=lambda: marks.append(dist.traffic.total))
    setup = marks[0] - before
    per_iter = np.diff(marks).astype(int).tolist()
    return DistributedCG(X=solve.X, iterations=solve.iterations, converged=solve.converged,
                         residual=solve.residual, products=solve.products,
                         bytes_per_iteration=per_iter, setup_bytes=setup,
                         halo_rows=plan.halo_rows, seconds=time.perf_counter() - start)


# --- the steps of propagate up to the scores -----------------------------------------------------
def normalized_rows(W_rows: sp.csr_matrix, lo: int, node_weights: np.ndarray | None = None,
                    ) -> sp.csr_matrix:
    """Rows [lo, lo + rows) of ``propagate.normalized_operator(W, w)``; node_weights: the local
    rows' w. Two all-gathers of n float64 (w, then g = w / sqrt(D̂)); the same arithmetic as the
    single-process operator, so the same float32 entries."""
    rows, n = W_rows.shape
    w_loc = np.ones(rows) if node_weights is None else np.asarray(node_weights, dtype=np.float64)
    w = dist.all_gather_array(w_loc)
    if w.shape != (n,):
        raise DataFormatError(f"propagation: the ranks' rows add up to {w.shape[0]} samples, "
                              f"the graph has {n} columns")
    deg = w_loc * (W_rows @ w)
    g_loc = np.zeros(rows)
    pos = deg > 0
    g_loc[pos] = w_loc[pos] / np.sqrt(deg[pos])
    g = dist.all_gather_array(g_loc)
    S = W_rows.copy()
    r = np.repeat(np.arange(rows, dtype=np.int64), np.diff(W_rows.indptr))
    S.data = (W_rows.data.astype(np.float64) * g_loc[r] * g[W_rows.indices]).astype(np.float32)
    return S


@dataclass
class DistributedScores:
    """This rank's rows of ``propagate``'s scores M and what led to them.

    scores: float32 (rows, C); balance_weights: float32 (rows,); prior: float64 (C,) (every
    rank); solve / first_pass: the DistributedCG figures of the final solve and of the unbalanced
    first pass (None when none ran).
    """

    scores: np.ndarray
    balance_weights: np.ndarray
    prior: np.ndarray | None
    solve: DistributedCG
    first_pass: DistributedCG | None = None
    seconds: float = 0.0


def propagate_scores(
    W_rows: sp.csr_matrix,
    labels: np.ndarray,
    *,
    lo: int,
    num_classes: int,
    config: PropagationConfig = PropagationConfig(),
    prior: np.ndarray | None = None,
    predictions: np.ndarray | None = None,
    warm_start: np.ndarray | None = None,
    exchange: str = "halo",
    progress: Callable[[int, int], None] | None = None,
) -> DistributedScores:
    """``propagate(W, labels, ...).scores`` for this rank's rows [lo, lo + rows) of W.

    W_rows: float32 CSR (rows, n), the local rows of the symmetric affinity (``affinity_rows`` or
    ``row_block``). labels: int (n,), every sample's human label or -1, on every rank (small).
    predictions: int (n,) or None, as in ``propagate``. warm_start: float (rows, C), this rank's
    rows of an initial M, or None. Errors are raised on every rank together
    (distributed.RankFailedError).
    """
    start = time.perf_counter()
    C = int(num_classes)
    rows, n = W_rows.shape
    with dist.together("propagation input"):
        labels = np.asarray(labels)
        if labels.shape != (n,) or labels.dtype.kind not in "iu":
            raise LabelError(f"propagation: labels must be integers of shape ({n},), got "
                             f"{labels.dtype} {labels.shape}")
        labels = labels.astype(np.int64)
        if ((labels < -1) | (labels >= C)).any() or not (labels >= 0).any():
            raise LabelError(f"propagation: labels must be -1 or 0..{C - 1}, with at least one "
                             f"labeled sample")
        if warm_start is not None:
            warm_start = np.asarray(warm_start)
            if warm_start.shape != (rows, C) or not np.isfinite(warm_start).all():
                raise DataFormatError(f"propagation: warm_start rows must be a finite array of "
                                      f"shape {(rows, C)}, got {warm_start.shape}")
        if prior is not None:
            prior = _validated_prior(prior, C)
    mine = labels[lo:lo + rows]
    pred_mine = None if predictions is None else np.asarray(predictions, np.int64)[lo:lo + rows]
    B = seed_matrix(labels, C, config, rows=slice(lo, lo + rows))
    X0 = warm_start
    first = None
    w = None
    if config.balance:
        memberships = None
        if predictions is None and warm_start is not None:
            memberships = _row_normalize(warm_start)
        elif predictions is None:
            first = block_cg(normalized_rows(W_rows, lo), B, lo=lo, config=config,
                             tol=max(config.tol, FIRST_PASS_TOL), exchange=exchange,
                             what="first pass")
            memberships = _row_normalize(first.X)
            if X0 is None:
                X0 = first.X
        if prior is None:  # propagate's rule, the unlabeled rows' classes gathered from every rank
            gathered = None
            if config.balance_prior != "labels":
                hard = pred_mine if pred_mine is not None else _argmax_or(
                    memberships, memberships.sum(axis=1) > 0, None)
                gathered = dist.all_gather_array(hard)
            prior = _balance_prior(labels, C, config, gathered, None)
        w = balance_weights(mine, prior, predictions=pred_mine, memberships=memberships)
    S_rows = normalized_rows(W_rows, lo, w)
    solve = block_cg(S_rows, B, lo=lo, config=config, X0=X0, exchange=exchange,
                     progress=progress)
    return DistributedScores(
        scores=solve.X, balance_weights=(np.ones(rows) if w is None else w).astype(np.float32),
        prior=prior, solve=solve, first_pass=first, seconds=time.perf_counter() - start)


def _row_normalize(M: np.ndarray) -> np.ndarray:
    M = np.asarray(M, dtype=np.float32)
    tot = M.sum(axis=1, keepdims=True)
    return np.divide(M, tot, out=np.zeros_like(M), where=tot > 0)

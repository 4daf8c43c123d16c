"""The round's graph work in one process, or with its rows sharded over the ranks of a torchrun.

``loop.build_state`` calls these and runs the same steps either way: kNN graph of each view,
affinity, the views' combination, propagation, and the whole results on rank 0 for the round's
state. In one process (no process group, or a world of one) each is the plain function
(``knn.build_knn``, ``knn.affinity``, ``knn.combine_affinities``, ``propagate.propagate``) on whole
arrays. Under torchrun every array here is this rank's rows ``distributed.shard_range(n)`` of the
n samples (graphs: the rows' neighbour lists, affinities: CSR (rows, n) with global column ids),
every rank calls every function in the same order, and:

- ``knn``: ``knn_distributed.build_knn_sharded`` (the queries or shards travel a ring, the index
  chosen as ``build_knn`` chooses it);
- ``affinity_of``: ``propagate_distributed.affinity_rows`` (each edge sent to the owner of its
  other end);
- ``combine``: ``combine_affinities`` of the rows, each view's degrees all-gathered (n float64 per
  view): the same arithmetic, so the same float32 entries;
- ``propagate_on``: ``propagate_distributed.propagate_scores`` (block CG with halo exchange), then
  the scores and balance weights gathered on rank 0, which finishes the result
  (``propagate.result_from_scores``: labels, margin, energy, thresholds); None on the other ranks.
  The scores agree with the single process's to the solver's tolerance (the single process solves
  in a locality order from 20k samples; here the rows keep the dataset's order);
- ``whole_matrix`` / ``whole_graph`` / ``whole_rows``: the whole thing on rank 0 (the round's
  state is saved by rank 0 alone), None on the others.

What rank 0 then holds is what one process holds after a round (the views, kNN lists, affinity
and scores: O(n (d + k + C)) numbers); the work that grows faster than that (the random-kernel
transform, the searches, the solver's products) is shared out.
"""

from __future__ import annotations

import time

import numpy as np
import scipy.sparse as sp

from speler import distributed as dist
from speler.config import GraphConfig, PropagationConfig
from speler.graph.knn import KnnGraph, affinity, build_knn, combine_affinities
from speler.graph.knn_distributed import ShardedKnn, build_knn_sharded, gather_graph
from speler.graph.propagate import (
    PropagationResult, SolveInfo, _validated_labels, propagate, result_from_scores,
)


def active() -> bool:
    """True under torchrun with more than one rank: the arrays here are row shards."""
    return dist.active() and dist.world_size() > 1


def own_rows(a: np.ndarray) -> np.ndarray:
    """This rank's rows of an array every rank holds whole (``a`` itself in one process)."""
    if not active():
        return a
    lo, hi = dist.shard_range(len(a))
    return a[lo:hi]


def knn(x: np.ndarray, config: GraphConfig) -> KnnGraph | ShardedKnn:
    """The kNN lists of the rows ``x`` against all samples."""
    return build_knn_sharded(x, config=config) if active() else build_knn(x, config=config)


def affinity_of(graph: KnnGraph | ShardedKnn, *, gamma: float) -> sp.csr_matrix:
    """``knn.affinity`` of the graph (this rank's rows of it)."""
    if isinstance(graph, ShardedKnn):
        from speler.graph.propagate_distributed import affinity_rows

        return affinity_rows(graph, gamma=gamma)
    return affinity(graph, gamma=gamma)


def combine(parts: list[tuple[sp.spmatrix, float]]) -> sp.csr_matrix:
    """``knn.combine_affinities`` of (affinity, weight) pairs (this rank's rows of it)."""
    if not active():
        return combine_affinities(parts)
    n = parts[0][0].shape[1]
    lo, hi = dist.shard_range(n)
    with dist.together("combining the views"):  # before the degrees' exchange
        for W, w in parts:
            if W.shape != (hi - lo, n):
                raise ValueError(f"combine: a view's rows have shape {W.shape}, expected "
                                 f"{(hi - lo, n)}")
    return combine_affinities(parts, lo=lo, gather=dist.all_gather_array)


def propagate_on(W: sp.csr_matrix, labels: np.ndarray, *, num_classes: int,
                 config: PropagationConfig) -> PropagationResult | None:
    """``propagate.propagate(W, labels)``; under torchrun the result is rank 0's (None elsewhere),
    its ``solve.system`` None (``propagate.with_system`` names it once rank 0 holds all of W)."""
    if not active():
        return propagate(W, labels, num_classes=num_classes, config=config)
    from speler.graph.propagate_distributed import propagate_scores

    start = time.perf_counter()
    n = W.shape[1]
    lo, _ = dist.shard_range(n)
    sc = propagate_scores(W, labels, lo=lo, num_classes=num_classes, config=config)
    M = dist.gather_array(sc.scores)
    weights = dist.gather_array(sc.balance_weights)
    result = None
    with dist.together("finishing the propagation"):  # rank 0's work; its failure is everyone's
        if M is not None:
            info = SolveInfo(
                iterations=sc.solve.iterations, converged=sc.solve.converged,
                residual=sc.solve.residual, seconds=0.0,
                first_pass_iterations=sc.first_pass.iterations if sc.first_pass else 0,
                products=sc.solve.products, solve_seconds=sc.solve.seconds,
                balance_weights=weights.astype(np.float32), system=None)
            result = result_from_scores(M, _validated_labels(labels, n, num_classes),
                                        int(num_classes), config, prior=sc.prior, solve=info,
                                        start=start)
    return result


def whole_matrix(W: sp.csr_matrix) -> sp.csr_matrix | None:
    """The whole (n, n) matrix on rank 0 from every rank's rows (None elsewhere)."""
    if not active():
        return W
    W = sp.csr_matrix(W)
    counts = dist.gather_array(np.diff(W.indptr).astype(np.int64))
    cols = dist.gather_array(W.indices.astype(np.int64))
    data = dist.gather_array(W.data)
    if counts is None:
        return None
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    n = W.shape[1]
    return sp.csr_matrix((data, cols, indptr), shape=(n, n))


def whole_graph(graph: KnnGraph | ShardedKnn) -> KnnGraph | None:
    """The whole kNN lists on rank 0 (None elsewhere)."""
    if not isinstance(graph, ShardedKnn):
        return graph
    return gather_graph(graph, main_only=True)


def whole_rows(a: np.ndarray) -> np.ndarray | None:
    """The whole array on rank 0 from every rank's rows (None elsewhere)."""
    return dist.gather_array(a) if active() else a

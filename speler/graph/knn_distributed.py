"""Exact kNN graph of embeddings that are sharded by rows over the ranks of a process group.

Rank r holds rows [lo_r, hi_r) of the n × d embeddings (contiguous, in rank order, e.g.
``distributed.shard_ranges``). Each rank searches its own rows (the queries) against every shard:
the shards travel around the ranks in a ring (step s: rank r holds the shard of rank r - s, sends
it on to rank r + 1 and receives the next one from rank r - 1 while it searches), so a rank never
holds more than its queries and two shards. The k + 1 best of every block are merged into a
running top k + 1 (ordered by similarity, then by sample id), and the query itself is dropped as
``knn.build_knn`` does. The result equals the single-process exact graph (``GraphConfig.index``
"flat"): the same L2-normalised float32 rows, the same faiss inner-product search per block, the
same self-exclusion; neighbour ids are equal except for the order among tied similarities (ordered
by sample id here), similarities agree to float32 rounding (equal in the tests and benchmark).

Failing together: the input is checked on every rank before any block moves; a search that raises
on one rank keeps passing blocks around the ring (and searches no more), so every rank reaches the
end of the stage and raises the same ``distributed.RankFailedError``.

Traffic: each ring step sends one shard, rows × d × 4 bytes; a rank sends (world - 1) shards in
all, every rank n (world - 1) / world × d × 4 bytes on average. Only the exact search is sharded;
an approximate index per shard (IVF / HNSW, recall measured as today) is not built here.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from speler import distributed as dist
from speler.config import GraphConfig
from speler.errors import ConfigError, DataFormatError
from speler.graph.knn import KnnGraph, _drop_self, _faiss, _normalize_rows

logger = logging.getLogger(__name__)


@dataclass
class ShardedKnn:
    """kNN lists of this rank's rows [lo, hi) of n samples (neighbour ids are global).

    graph: KnnGraph of the hi - lo local rows (method "flat", recall None: exact).
    block_bytes: bytes this rank sent at each ring step (one shard per step; world - 1 steps).
    seconds: wall time of the search (validation excluded); search_seconds: of the faiss calls.
    """

    graph: KnnGraph
    lo: int
    hi: int
    n: int
    block_bytes: list[int] = field(default_factory=list)
    seconds: float = 0.0
    search_seconds: float = 0.0


def build_knn_sharded(
    local: np.ndarray,
    *,
    config: GraphConfig = GraphConfig(),
    k: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ShardedKnn:
    """Exact kNN lists of this rank's rows ``local`` (float (rows, d)) against all ranks' rows.

    Every rank of the group must call it (a rank may hold no rows). ``k`` overrides ``config.k``;
    a k of n or more is lowered to n - 1 as ``build_knn`` does. Errors (on every rank, naming the
    rank whose input is bad, as distributed.RankFailedError): DataFormatError for a non-2-d or
    non-finite shard, dimensions that differ between ranks or fewer than 2 samples in all,
    ConfigError for k < 1. Only the exact index: ``config.index`` is not consulted.
    progress(step, world) after each ring step.
    """
    with dist.together("kNN input"):
        x = _validated_shard(local)
    sizes = dist.all_gather_object((int(x.shape[0]), int(x.shape[1])))
    with dist.together("kNN input"):
        k = _checked_k(config.k if k is None else k, sizes)
    world, me = dist.world_size(), dist.rank()
    rows = [s[0] for s in sizes]
    offsets = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
    n, d = int(offsets[-1]), sizes[0][1]
    start = time.perf_counter()
    _normalize_rows(x)
    kk = k + 1
    best_s = np.full((x.shape[0], 0 if x.shape[0] else kk), -np.inf, dtype=np.float32)
    best_i = np.full(best_s.shape, -1, dtype=np.int64)  # an empty shard: (0, k + 1) lists
    block_bytes: list[int] = []
    searched = 0.0
    failed: Exception | None = None
    with dist.together("kNN search"):
        block = x
        for step in range(world):
            owner = (me - step) % world
            pending = []
            incoming = None
            if step + 1 < world:
                incoming, pending = _pass_on(block, rows, d, me, step, world, block_bytes)
            t0 = time.perf_counter()
            if x.shape[0] and block.shape[0] and failed is None:
                try:
                    s, i = _search(x, block, min(kk, block.shape[0]))
                    best_s, best_i = _merge(best_s, best_i, s, i + offsets[owner], kk)
                except Exception as exc:  # noqa: BLE001 - keep the ring going, fail at the end
                    failed = exc
            searched += time.perf_counter() - t0
            for work, _ in pending:  # the tensor stays referenced until its transfer is done
                work.wait()
            if incoming is not None:
                block = incoming.cpu().numpy()
            if progress is not None:
                progress(step + 1, world)
        if failed is not None:  # raised after the ring: the peers are not left waiting
            raise failed
        lo, hi = int(offsets[me]), int(offsets[me + 1])
        idx, sims = _drop_self(best_i, best_s, k, ids=np.arange(lo, hi, dtype=np.int64))
    seconds = time.perf_counter() - start
    graph = KnnGraph(indices=idx, sims=sims, method="flat", recall=None, seconds=seconds)
    return ShardedKnn(graph=graph, lo=lo, hi=hi, n=n, block_bytes=block_bytes, seconds=seconds,
                      search_seconds=searched)


def gather_graph(part: ShardedKnn) -> KnnGraph:
    """The whole graph (n rows, in sample order) on every rank, from every rank's part."""
    g = part.graph
    idx = dist.all_gather_array(g.indices)
    sims = dist.all_gather_array(g.sims)
    seconds = float(max(dist.all_gather_object(part.seconds)))
    return KnnGraph(indices=idx, sims=sims, method=g.method, recall=None, seconds=seconds)


# ----------------------------------------------------------------------------------------------
def _validated_shard(local: np.ndarray) -> np.ndarray:
    x = np.asarray(local)
    if x.ndim != 2:
        raise DataFormatError(f"kNN: the embeddings shard must be a 2-d array (rows, dim), got "
                              f"shape {x.shape}")
    if x.dtype.kind not in "fiu":
        raise DataFormatError(f"kNN: embeddings must be numeric, got dtype {x.dtype}")
    x = np.array(x, dtype=np.float32, order="C", copy=True)
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise DataFormatError(f"kNN: {bad.size} embedding rows of this shard contain NaN or "
                              f"infinite values (first: local row {int(bad[0])}); expected finite"
                              f" numbers")
    return x


def _checked_k(k, sizes: list[tuple[int, int]]) -> int:
    dims = {d for _, d in sizes}
    if len(dims) > 1:
        raise DataFormatError(f"kNN: the ranks' shards have different dimensions "
                              f"{[d for _, d in sizes]}")
    n = sum(r for r, _ in sizes)
    if n < 2 or min(dims) < 1:
        raise DataFormatError(f"kNN: need at least 2 samples and 1 dimension in all, got {n} "
                              f"samples of dimension {min(dims)}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"kNN: k must be a positive integer, got {k!r}")
    k = int(k)
    if k >= n:
        logger.warning("kNN: k=%d >= n=%d samples; using k=%d", k, n, n - 1)
        k = n - 1
    return k


def _search(q: np.ndarray, block: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
    faiss = _faiss()
    return faiss.knn(q, block, kk, metric=faiss.METRIC_INNER_PRODUCT)


def _merge(best_s, best_i, s, i, kk: int) -> tuple[np.ndarray, np.ndarray]:
    """The kk best of two candidate lists per row, by similarity (descending) then sample id."""
    cs = np.concatenate([best_s, s.astype(np.float32, copy=False)], axis=1)
    ci = np.concatenate([best_i, i.astype(np.int64, copy=False)], axis=1)
    order = np.lexsort((ci, -cs), axis=1)[:, :kk]
    return np.take_along_axis(cs, order, axis=1), np.take_along_axis(ci, order, axis=1)


def _pass_on(block: np.ndarray, rows: list[int], d: int, me: int, step: int, world: int,
             block_bytes: list[int]):
    """Start sending the held shard to rank me + 1 and receiving the next from rank me - 1."""
    import torch

    nxt, prv = (me + 1) % world, (me - 1) % world
    held = (me - step) % world  # owner of ``block``; the next one is rank prv's current shard
    coming = (me - step - 1) % world
    pending = []
    sent = 0
    if rows[held]:
        t = torch.from_numpy(np.ascontiguousarray(block)).to(dist.device())
        pending.append((dist.isend(t, nxt, "knn_block"), t))
        sent = t.numel() * t.element_size()
    block_bytes.append(int(sent))
    incoming = torch.empty((rows[coming], d), dtype=torch.float32, device=dist.device())
    if rows[coming]:
        pending.append((dist.irecv(incoming, prv), incoming))
    return incoming, pending

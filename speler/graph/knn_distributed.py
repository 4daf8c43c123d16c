"""kNN graph of embeddings that are sharded by rows over the ranks of a process group.

Rank r holds rows [lo_r, hi_r) of the n × d embeddings (contiguous, in rank order, e.g.
``distributed.shard_ranges``) and searches its own rows (the queries) against every shard. The
index is chosen as ``knn.build_knn`` chooses it on the CPU (``GraphConfig.index``: "auto" is exact
up to ``exact_max_n`` samples in all, approximate beyond; "flat" exact; "ivf" (``"ivf-pca"`` with
``0 < pca_dim < d``) or "hnsw" approximate; ``backend`` "torch" means exact). Every rank's blocks
of candidates are merged into a running top k + 1 per query (ordered by similarity, then by sample
id, ids global), and the query itself is dropped as ``build_knn`` does.

- Exact ("flat"): the shards travel around the ranks in a ring (step s: rank r holds the shard of
  rank r - s, sends it on to rank r + 1 and receives the next one from rank r - 1 while it
  searches it with faiss's exact inner-product search), so a rank never holds more than its
  queries and two shards. The result equals the single-process exact graph: the same
  L2-normalised float32 rows, the same faiss search per block, the same self-exclusion; neighbour
  ids are equal except for the order among tied similarities (ordered by sample id here),
  similarities agree to float32 rounding (equal in the tests and benchmark). Recall is None.
- Approximate ("ivf", "ivf-pca", "hnsw"): each rank builds ``knn._approximate_index`` (the
  single process's index, whose similarities are exact inner products) over its own shard,
  and the *queries* travel the ring instead: at step s rank r holds the query block of rank r - s
  with its running top-k + 1 lists, searches it against its local index, merges, and passes block
  and lists on to rank r + 1; after ``world`` steps (the last one sends the lists only) every block
  is home with complete lists. Indexes never move. A shard's index has ``_ivf_cells(rows)`` cells
  and probes ``nprobe`` of them (for nprobe 0, as many as reach ``target_recall`` on the shard's
  own rows), so a query scans more of the data than against one index of all n (recall at least
  about the single process's, search work per query up to ``world`` times more). An IVF shard of
  fewer than ``MIN_IVF_ROWS`` rows (too few to train 16 cells) is searched exactly instead; an
  empty shard has no index. With one rank the index and its results are those of ``build_knn``
  with the same config (up to the order of tied similarities).
  Recall is measured as ``build_knn`` measures it: the same ``GraphConfig.recall_queries`` seeded
  queries drawn over all n (``knn._recall_queries``), each rank taking the ones it owns; they ride
  the same ring and are searched exactly against each rank's raw shard rows, and a neighbour found
  counts when its similarity reaches the exact k-th (``knn._recall_found``). The counts are
  all-reduced, so ``KnnGraph.recall`` (and ``recall_seconds``, the slowest rank's) is the same on
  every rank.

Failing together: the input is checked on every rank before any block moves, the local index is
built in a stage of its own ("kNN index"); a search that raises on one rank keeps passing blocks
around the ring (and searches no more), so every rank reaches the end of the stage and raises the
same ``distributed.RankFailedError``.

Traffic (``ShardedKnn.block_bytes``, bytes this rank sent per ring step; in
``distributed.traffic`` as "knn_block"): exact, one shard per step, rows × d × 4 bytes, world - 1
steps, every rank n (world - 1) / world × d × 4 bytes on average. Approximate, the held query
block with its lists, (rows + q) × (4 d + 12 (k + 1)) bytes at each of the first world - 1 steps
(rows and q: the block owner's rows and recall queries; 4 d for the float32 row, 12 (k + 1) for
the float32 similarities and int64 ids), then (rows + q) × 12 (k + 1) bytes at the last step (the
lists going home): about (1 + 3 (k + 1) / d) times the exact ring's bytes, plus one last step.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np

from speler import distributed as dist
from speler.config import GraphConfig
from speler.errors import ConfigError, DataFormatError
from speler.graph.knn import (
    KnnGraph, _approximate_index, _choose_method, _drop_self, _faiss, _normalize_rows,
    _recall_found, _recall_queries, _search_all, tie_ordered,
)

logger = logging.getLogger(__name__)

MIN_IVF_ROWS = 16 * 39  # an IVF shard needs 16 cells (``_ivf_cells``) of 39 training rows each


@dataclass
class ShardedKnn:
    """kNN lists of this rank's rows [lo, hi) of n samples (neighbour ids are global).

    graph: KnnGraph of the hi - lo local rows: method "flat" (recall None) or the approximate
    index's ("ivf", "ivf-pca", "hnsw"; recall and recall_seconds the same on every rank).
    block_bytes: bytes this rank sent at each ring step (exact: one shard per step, world - 1
    steps; approximate: a query block with its lists, world steps, the last one the lists only).
    seconds: wall time of index building and search (validation and recall check excluded);
    search_seconds: of the searches (faiss calls) alone.
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
    """kNN lists of this rank's rows ``local`` (float (rows, d)) against all ranks' rows.

    Every rank of the group must call it, with the same config (a rank may hold no rows). ``k``
    overrides ``config.k``; a k of n or more is lowered to n - 1 as ``build_knn`` does. The index
    is ``config.index`` as ``build_knn`` chooses it on the CPU (see the module docstring). Errors
    (on every rank, naming the rank whose input is bad, as distributed.RankFailedError):
    DataFormatError for a non-2-d or non-finite shard, dimensions that differ between ranks or
    fewer than 2 samples in all, ConfigError for k < 1 or an unknown index. progress(step, world)
    after each ring step.
    """
    with dist.together("kNN input"):
        x = _validated_shard(local)
    sizes = dist.all_gather_object((int(x.shape[0]), int(x.shape[1])))
    with dist.together("kNN input"):
        k = _checked_k(config.k if k is None else k, sizes)
        method = _sharded_method(sum(s[0] for s in sizes), sizes[0][1], config)
    world, me = dist.world_size(), dist.rank()
    rows = [s[0] for s in sizes]
    offsets = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
    n = int(offsets[-1])
    lo, hi = int(offsets[me]), int(offsets[me + 1])
    start = time.perf_counter()
    _normalize_rows(x)
    kk = k + 1
    recall = None
    recall_seconds = 0.0
    ids = np.arange(lo, hi, dtype=np.int64)
    if method == "flat":
        with dist.together("kNN search"):  # a search that raised is raised after the ring
            best_s, best_i, block_bytes, searched = _shard_ring(x, rows, offsets, kk, progress)
            idx, sims = _drop_self(best_i, best_s, k, ids=ids)
        seconds = time.perf_counter() - start
    else:
        with dist.together("kNN index"):
            search = _local_index(x, method, k, config)
        queries = _recall_queries(n, config)
        nq = np.diff(np.searchsorted(queries, offsets)).tolist()  # recall queries of each rank
        mine = queries[(queries >= lo) & (queries < hi)]
        with dist.together("kNN search"):
            ring = _query_ring(x, search, mine, offsets, nq, kk, progress)
            best_s, best_i, ex_s, ex_i, block_bytes, searched, recall_seconds = ring
            idx, sims = _drop_self(best_i, best_s, k, ids=ids)
            t0 = time.perf_counter()
            found = _recall_found(idx[mine - lo], sims[mine - lo], ex_i, ex_s, mine, k)
        search = None
        seconds = t0 - start - recall_seconds  # recall searches excluded
        total = dist.all_reduce_array(np.array([int(found.sum()), len(mine)], dtype=np.int64))
        recall_seconds += time.perf_counter() - t0
        recall = float(int(total[0]) / int(total[1]) / k)
        recall_seconds = float(max(dist.all_gather_object(recall_seconds)))
        logger.info("kNN %s (sharded, %d ranks) n=%d k=%d: %.1f s, recall@k %.4f", method, world,
                    n, k, seconds, recall)
    graph = KnnGraph(indices=idx, sims=sims, method=method, recall=recall, seconds=seconds,
                     recall_seconds=recall_seconds)
    return ShardedKnn(graph=graph, lo=lo, hi=hi, n=n, block_bytes=block_bytes, seconds=seconds,
                      search_seconds=searched)


def gather_graph(part: ShardedKnn, *, main_only: bool = False) -> KnnGraph | None:
    """The whole graph (n rows, in sample order) from every rank's part: on every rank, or with
    ``main_only`` on rank 0 alone (None on the others). Every rank must call it."""
    g = part.graph
    gather = ((lambda a: dist.gather_array(a, dst=0)) if main_only else dist.all_gather_array)
    idx = gather(g.indices)
    sims = gather(g.sims)
    seconds = float(max(dist.all_gather_object(part.seconds)))
    if idx is None:
        return None
    return KnnGraph(indices=idx, sims=sims, method=g.method, recall=g.recall, seconds=seconds,
                    recall_seconds=g.recall_seconds)


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


def _sharded_method(n: int, d: int, config: GraphConfig) -> str:
    """``build_knn``'s choice of index for n samples on the CPU; exact torch search is "flat"."""
    method = _choose_method(n, d, replace(config, use_gpu=False))
    return "flat" if method == "torch" else method


def _local_index(x: np.ndarray, method: str, k: int, config: GraphConfig):
    """search(queries, kk) -> (sims, local ids) against this rank's rows x by their approximate
    index (exact search for an IVF shard of fewer than MIN_IVF_ROWS rows); None for no rows."""
    if not x.shape[0]:
        return None
    if method in ("ivf", "ivf-pca") and x.shape[0] < MIN_IVF_ROWS:
        return lambda q, kk: _search(q, x, min(kk, x.shape[0]))
    index = _approximate_index(x, method, k, config)
    if method in ("ivf", "ivf-pca"):
        return index.search  # a CellIndex blocks its queries itself
    return lambda q, kk: _search_all(index.search, q, kk, None)


def _search(q: np.ndarray, block: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
    faiss = _faiss()
    return faiss.knn(q, block, kk, metric=faiss.METRIC_INNER_PRODUCT)


def _merge(best_s, best_i, s, i, kk: int) -> tuple[np.ndarray, np.ndarray]:
    """The kk best of two candidate lists per row, by similarity (descending) then sample id."""
    cs = np.concatenate([best_s, s.astype(np.float32, copy=False)], axis=1)
    ci = np.concatenate([best_i, i.astype(np.int64, copy=False)], axis=1)
    ci, cs = tie_ordered(ci, cs, keep=kk)
    return cs, ci


def _empty_lists(rows: int, kk: int) -> tuple[np.ndarray, np.ndarray]:
    """Running top-kk lists of ``rows`` queries before any search: -inf similarities, ids -1."""
    return (np.full((rows, kk), -np.inf, dtype=np.float32),
            np.full((rows, kk), -1, dtype=np.int64))


def _global(s: np.ndarray, i: np.ndarray, lo: int) -> tuple[np.ndarray, np.ndarray]:
    """A shard's results with global ids; a missing result (id -1) gets similarity -inf."""
    missing = i < 0
    s = np.where(missing, np.float32(-np.inf), s).astype(np.float32, copy=False)
    return s, np.where(missing, -1, i + lo).astype(np.int64, copy=False)


def _shard_ring(x: np.ndarray, rows: list[int], offsets: np.ndarray, kk: int,
                progress: Callable[[int, int], None] | None):
    """Exact search of this rank's rows x against every shard, the shards travelling the ring.

    Returns the running top-kk (sims, global ids), the bytes sent per step and the search time.
    A search that raises is raised after the ring (the other ranks are not left waiting)."""
    world, me = dist.world_size(), dist.rank()
    d = x.shape[1]
    best_s = np.full((x.shape[0], 0 if x.shape[0] else kk), -np.inf, dtype=np.float32)
    best_i = np.full(best_s.shape, -1, dtype=np.int64)  # an empty shard: (0, k + 1) lists
    block_bytes: list[int] = []
    searched = 0.0
    failed: Exception | None = None
    block = x
    for step in range(world):
        owner = (me - step) % world
        receive = None
        if step + 1 < world:  # the held shard on to rank me + 1 while it is searched here
            coming = (me - step - 1) % world  # rank me - 1's current shard comes next
            receive = _ring_send([block], [((rows[coming], d), np.dtype(np.float32))],
                                 block_bytes)
        t0 = time.perf_counter()
        if x.shape[0] and block.shape[0] and failed is None:
            try:
                s, i = _search(x, block, min(kk, block.shape[0]))
                best_s, best_i = _merge(best_s, best_i, s, i + offsets[owner], kk)
            except Exception as exc:  # noqa: BLE001 - keep the ring going, fail at the end
                failed = exc
        searched += time.perf_counter() - t0
        if receive is not None:
            block = receive()[0]
        if progress is not None:
            progress(step + 1, world)
    if failed is not None:  # raised after the ring: the peers are not left waiting
        raise failed
    return best_s, best_i, block_bytes, searched


def _query_ring(x: np.ndarray, search, mine: np.ndarray, offsets: np.ndarray, nq: list[int],
                kk: int, progress: Callable[[int, int], None] | None):
    """This rank's rows x and recall queries (global ids ``mine``) searched against every rank's
    shard, the queries and their running top-kk lists travelling the ring, the indexes staying.

    At each step the held block (rows of rank ``owner``, their lists, the owner's recall queries
    and their exact lists) is searched: the rows with ``search`` (the local index), the recall
    queries exactly against the raw local rows x; merged; passed on to rank me + 1. After the last
    step (lists only) every rank holds its own complete lists. Returns (sims, ids) of the rows,
    (sims, ids) of the recall queries' exact search, the bytes sent per step, the index search
    time and the recall search time. A search that raises is raised after the ring."""
    world, me = dist.world_size(), dist.rank()
    rows = np.diff(offsets).tolist()
    d = x.shape[1]
    lo = int(offsets[me])
    held = [x, *_empty_lists(x.shape[0], kk), x[mine - lo], *_empty_lists(len(mine), kk)]
    block_bytes: list[int] = []
    searched = recall_s = 0.0
    failed: Exception | None = None
    for step in range(world):
        q, s_best, i_best, rq, rs_best, ri_best = held
        if search is not None and failed is None:
            try:
                t0 = time.perf_counter()
                if q.shape[0]:
                    s_best, i_best = _merge(s_best, i_best, *_global(*search(q, kk), lo), kk)
                t1 = time.perf_counter()
                searched += t1 - t0
                if rq.shape[0]:
                    s, i = _search(rq, x, min(kk, x.shape[0]))
                    rs_best, ri_best = _merge(rs_best, ri_best, *_global(s, i, lo), kk)
                recall_s += time.perf_counter() - t1
            except Exception as exc:  # noqa: BLE001 - keep the ring going, fail at the end
                failed = exc
        held = [q, s_best, i_best, rq, rs_best, ri_best]
        if step + 1 < world:  # the block and its lists on to rank me + 1
            coming = (me - step - 1) % world
            held = _ring_send(held, _specs(rows[coming], nq[coming], d, kk), block_bytes)()
        elif world > 1:  # the lists home: the owner of the held block is rank me + 1
            spec = _specs(rows[me], nq[me], d, kk)
            lists = _ring_send([s_best, i_best, rs_best, ri_best],
                               [spec[j] for j in (1, 2, 4, 5)], block_bytes)()
            held = [None, lists[0], lists[1], None, lists[2], lists[3]]
        if progress is not None:
            progress(step + 1, world)
    if failed is not None:  # raised after the ring: the peers are not left waiting
        raise failed
    _, s_best, i_best, _, rs_best, ri_best = held
    return s_best, i_best, rs_best, ri_best, block_bytes, searched, recall_s


def _specs(rows: int, nq: int, d: int, kk: int) -> list[tuple[tuple[int, int], np.dtype]]:
    """(shape, dtype) of a travelling block: rows, their sims and ids; recall queries, ditto."""
    f, i = np.dtype(np.float32), np.dtype(np.int64)
    return [((rows, d), f), ((rows, kk), f), ((rows, kk), i),
            ((nq, d), f), ((nq, kk), f), ((nq, kk), i)]


def _ring_send(arrays: list[np.ndarray], specs: list, block_bytes: list[int]):
    """Start sending ``arrays`` (one message of their bytes) to rank me + 1 and receiving arrays
    of the shapes and dtypes ``specs`` from rank me - 1; records the bytes sent in block_bytes.
    Returns ``receive()``, which waits for both transfers and returns the received arrays (the
    caller may work in between: the exact ring searches the held shard while it travels)."""
    import torch

    world, me = dist.world_size(), dist.rank()
    nxt, prv = (me + 1) % world, (me - 1) % world
    pending = []
    out = np.concatenate([np.ascontiguousarray(a).view(np.uint8).reshape(-1) for a in arrays])
    if out.size:
        t = torch.from_numpy(out).to(dist.device())
        pending.append((dist.isend(t, nxt, "knn_block"), t))
    block_bytes.append(int(out.size))
    sizes = [int(np.prod(shape)) * dt.itemsize for shape, dt in specs]
    incoming = torch.empty(sum(sizes), dtype=torch.uint8, device=dist.device())
    if sum(sizes):
        pending.append((dist.irecv(incoming, prv), incoming))

    def receive() -> list[np.ndarray]:
        for work, _ in pending:  # the tensors stay referenced until their transfers are done
            work.wait()
        raw = incoming.cpu().numpy()
        got, pos = [], 0
        for (shape, dt), size in zip(specs, sizes):
            a = np.empty(shape, dtype=dt)  # aligned, writable
            a.reshape(-1).view(np.uint8)[:] = raw[pos:pos + size]
            got.append(a)
            pos += size
        return got

    return receive

"""The process group of a run under ``torchrun`` and the few collectives SpeLER needs.

One job: who am I (``rank``, ``world_size``, ``is_main``), which items are mine (``shard_range``),
move numpy arrays and small objects between the ranks (``all_gather_array``, ``gather_array``,
``broadcast_object``, ``all_reduce_array``) and make the ranks fail together (``together``).

A process started by ``torchrun`` has RANK, WORLD_SIZE and LOCAL_RANK in its environment
(``launched``); ``init`` then joins the default process group (NCCL when CUDA is there, else gloo)
and ``destroy`` leaves it. Without torchrun nothing is initialised and every helper behaves as for
a world of one rank: ``rank() == 0``, ``world_size() == 1``, gathers return their input, ``together``
re-raises the original exception unchanged. So a plain ``python -m speler ...`` stays as it is.

Failing together: work between two collectives can raise on one rank while the others carry on
into the next collective and wait there for ever (or until the group's timeout). Wrap each stage in
``with together("stage name"):``; at its end every rank all-reduces one flag (the lowest failing
rank), and when some rank failed its message is broadcast and every rank raises the same
``RankFailedError("rank R failed in <stage>: <Type>: <message>")`` (chained to the original
exception on the failing rank). The stage's own collectives must not be left half done: validate
inputs in a stage of their own before the communication starts, and keep a rank whose computation
failed taking part in the stage's remaining exchanges (``knn_distributed`` does). A rank that dies
or stops in the middle of a collective leaves its peers waiting until the group's timeout
(``init``'s timeout_s, SPELER_DIST_TIMEOUT), after which their collective raises; under torchrun a
rank that exits with an error makes torchrun stop the others.

Traffic: every helper here, and the modules that send with ``send_tensor``/``recv_tensor``, add the
bytes this rank puts on the wire to ``traffic`` (a ``Traffic`` counter): point-to-point exactly,
an all-gather as this rank's payload × (world - 1) (every other rank needs it), an all-reduce as a
ring all-reduce, 2 (world - 1) / world × payload, a broadcast as payload × (world - 1) at the source.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import logging
import os
from dataclasses import dataclass, field

import numpy as np

from speler.errors import SpelerError

logger = logging.getLogger(__name__)

ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
DEFAULT_TIMEOUT_S = 1800.0  # a collective that waits longer than this fails (a dead peer)


class RankFailedError(SpelerError):
    """A rank of a distributed run raised; every rank raises this with the same message."""

    def __init__(self, rank: int, stage: str, message: str) -> None:
        super().__init__(f"rank {rank} failed in {stage}: {message}")
        self.rank = rank
        self.stage = stage
        self.message = message


@dataclass
class Traffic:
    """Bytes this rank sent, by kind of operation (see the module docstring for the counting)."""

    bytes: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, nbytes: float) -> None:
        self.bytes[kind] = self.bytes.get(kind, 0) + int(nbytes)

    @property
    def total(self) -> int:
        return int(sum(self.bytes.values()))

    def reset(self) -> None:
        self.bytes.clear()


traffic = Traffic()


# --- the process group ---------------------------------------------------------------------------
def _dist():
    import torch.distributed as dist

    return dist


def launched() -> bool:
    """True when this process was started by torchrun (RANK, WORLD_SIZE and LOCAL_RANK set)."""
    return all(k in os.environ for k in ENV_KEYS)


def active() -> bool:
    """True when the default process group is initialised (collectives go to other ranks)."""
    dist = _dist()
    return dist.is_available() and dist.is_initialized()


def default_backend() -> str:
    """NCCL when every rank of this node has a GPU of its own (NCCL refuses two ranks on one
    device), else gloo (CPU tensors; training still uses a GPU where there is one)."""
    import torch

    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= local else "gloo"


def init(*, backend: str | None = None, timeout_s: float | None = None) -> bool:
    """Join the default process group when launched by torchrun; returns whether one is active.

    backend: "nccl" or "gloo" (default: ``default_backend()``). With NCCL the
    CUDA device is LOCAL_RANK. timeout_s: how long a collective may wait for its peers
    (default ``DEFAULT_TIMEOUT_S``, or the SPELER_DIST_TIMEOUT environment variable). Calling it
    again, or without torchrun, does nothing.
    """
    if active():
        return True
    if not launched():
        return False
    import torch

    dist = _dist()
    if backend is None:
        backend = default_backend()
    if timeout_s is None:
        timeout_s = float(os.environ.get("SPELER_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    logger.info("rank %d of %d joined the process group (%s)", rank(), world_size(), backend)
    return True


def destroy() -> None:
    """Leave the default process group (no-op when none is active), all ranks together: a rank
    that tears its group down while another still finishes its last exchange can abort the
    process ("terminate called without an active exception"). Unreachable objects that hold the
    group (a DDP wrapper caught in a reference cycle keeps its reducer and the group's work) are
    collected first, while the group and the interpreter are whole: freed at interpreter exit
    instead, gloo's worker threads can abort the process the same way."""
    if active():
        gc.collect()
        try:
            _dist().barrier()
        except Exception:  # another rank is gone already: leave anyway
            pass
        _dist().destroy_process_group()


def rank() -> int:
    return _dist().get_rank() if active() else 0


def world_size() -> int:
    return _dist().get_world_size() if active() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0)) if active() else 0


def is_main() -> bool:
    """True on rank 0, the one rank that writes the store, the round folder and the exports."""
    return rank() == 0


def device():
    """The torch device collectives of this group use: the local GPU with NCCL, else the CPU."""
    import torch

    if active() and _dist().get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if active() and world_size() > 1:
        _dist().barrier()


# --- shards --------------------------------------------------------------------------------------
def shard_ranges(n: int, world: int | None = None, *, align: int = 1) -> list[tuple[int, int]]:
    """Contiguous [lo, hi) ranges of n items, one per rank, in rank order, covering 0..n.

    The ranges are made of units of ``align`` items (the last unit may be short) and their unit
    counts differ by at most one, so sizes differ by at most 1 for align 1 and by less than
    2 · align otherwise. With ``align = batch size`` every shard but the last is made of whole
    batches: the batches of a sharded pass are those of a single pass. A rank can get an empty
    range when n is small.
    """
    world = world_size() if world is None else int(world)
    if n < 0 or world < 1 or align < 1:
        raise ValueError(f"shard_ranges: need n >= 0, world >= 1, align >= 1; got {n}, {world}, "
                         f"{align}")
    units = -(-n // align)
    base, extra = divmod(units, world)
    out = []
    lo = 0
    for r in range(world):
        u = base + (1 if r < extra else 0)
        hi = min(n, lo + u * align)
        out.append((lo, hi))
        lo = hi
    return out


def shard_range(n: int, *, align: int = 1) -> tuple[int, int]:
    """This rank's [lo, hi) of n items (``shard_ranges``)."""
    return shard_ranges(n, align=align)[rank()]


# --- collectives ---------------------------------------------------------------------------------
def _as_bytes(a: np.ndarray):
    """A torch uint8 view (rows, row bytes) of a C-contiguous copy of a (ndim >= 1), on the
    group's device; row bytes from the trailing shape, also when there are no rows."""
    import torch

    a = np.ascontiguousarray(a)
    width = int(np.prod(a.shape[1:], dtype=np.int64)) * a.dtype.itemsize
    if a.size:
        flat = a.reshape(a.shape[0], -1).view(np.uint8)
    else:
        flat = np.zeros((a.shape[0], width), np.uint8)
    return torch.from_numpy(flat.copy() if not flat.flags.writeable else flat).to(device())


def _meta(a: np.ndarray) -> tuple:
    return (a.dtype.str, tuple(a.shape))


def all_gather_array(a: np.ndarray) -> np.ndarray:
    """Concatenate every rank's array along axis 0, in rank order, on every rank.

    The ranks' arrays may have different lengths but must agree on dtype and trailing shape
    (ValueError naming the ranks otherwise). Without a process group: ``a`` itself.
    """
    a = np.asarray(a)
    if not active() or world_size() == 1:
        return a
    parts = _exchange(a, dst=None)
    return np.concatenate(parts, axis=0)


def gather_array(a: np.ndarray, *, dst: int = 0) -> np.ndarray | None:
    """``all_gather_array`` delivered on rank ``dst`` only; None on the other ranks."""
    a = np.asarray(a)
    if not active() or world_size() == 1:
        return a
    parts = _exchange(a, dst=dst)
    return None if parts is None else np.concatenate(parts, axis=0)


def _exchange(a: np.ndarray, dst: int | None) -> list[np.ndarray] | None:
    import torch

    dist = _dist()
    world = world_size()
    metas = all_gather_object(_meta(a))
    dtypes = {m[0] for m in metas}
    trails = {m[1][1:] for m in metas}
    if len(dtypes) > 1 or len(trails) > 1 or a.ndim == 0:
        raise ValueError(f"gather: the ranks' arrays differ in dtype or trailing shape (or are "
                         f"scalars): {dict(enumerate(metas))}")
    rows = [m[1][0] for m in metas]
    mine = _as_bytes(a)
    width = mine.shape[1]
    top = max(rows)
    buf = torch.zeros((top, width), dtype=torch.uint8, device=mine.device)
    buf[:rows[rank()]] = mine
    if dst is None:
        out = [torch.empty_like(buf) for _ in range(world)]
        dist.all_gather(out, buf)
        traffic.add("all_gather", buf.numel() * (world - 1))
    else:
        out = [torch.empty_like(buf) for _ in range(world)] if rank() == dst else None
        dist.gather(buf, out, dst=dst)
        traffic.add("gather", 0 if rank() == dst else buf.numel())
        if out is None:
            return None
    dtype = np.dtype(metas[0][0])
    trail = metas[0][1][1:]
    return [o[:r].cpu().numpy().view(dtype).reshape((r,) + trail) for o, r in zip(out, rows)]


def all_gather_object(obj) -> list:
    """Every rank's picklable ``obj``, in rank order (small objects: metadata, messages)."""
    if not active() or world_size() == 1:
        return [obj]
    out = [None] * world_size()
    _dist().all_gather_object(out, obj)
    return out


def broadcast_object(obj, *, src: int = 0):
    """Rank ``src``'s picklable ``obj`` on every rank (the argument is ignored elsewhere)."""
    if not active() or world_size() == 1:
        return obj
    box = [obj if rank() == src else None]
    _dist().broadcast_object_list(box, src=src, device=device())
    return box[0]


def all_reduce_array(a: np.ndarray, op: str = "sum") -> np.ndarray:
    """Element-wise sum / max / min of every rank's array (same shape and dtype), on every rank."""
    a = np.asarray(a)
    if not active() or world_size() == 1:
        return a.copy()
    import torch

    dist = _dist()
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    t = torch.from_numpy(np.array(a, copy=True)).to(device())
    dist.all_reduce(t, op=ops[op])
    world = world_size()
    traffic.add("all_reduce", 2 * (world - 1) / world * t.numel() * t.element_size())
    return t.cpu().numpy()


def all_to_all_arrays(parts: list[np.ndarray], kind: str = "all_to_all") -> list[np.ndarray]:
    """Personalised exchange: ``parts[p]`` goes to rank p; returns what each rank sent here.

    parts: one array per rank (world of them), any lengths, all of one dtype and trailing shape
    on every rank. The lengths are all-gathered first, then the arrays go point to point (gloo
    and NCCL alike), empty ones not at all. ``parts[rank()]`` comes back as it is.
    """
    import torch

    world, me = world_size(), rank()
    if len(parts) != world:
        raise ValueError(f"all_to_all_arrays: need {world} parts (one per rank), got {len(parts)}")
    parts = [np.ascontiguousarray(p) for p in parts]
    if not active() or world == 1:
        return parts
    counts = all_gather_array(np.array([[len(p) for p in parts]], dtype=np.int64))  # (world, world)
    dtype, trail = parts[0].dtype, parts[0].shape[1:]
    out: list[np.ndarray | None] = [None] * world
    out[me] = parts[me]
    pending = []
    for peer in range(world):
        if peer == me:
            continue
        if counts[me, peer]:
            t = torch.from_numpy(parts[peer].reshape(len(parts[peer]), -1).view(np.uint8)
                                 .copy()).to(device())
            pending.append((isend(t, peer, kind), t, None))
        if counts[peer, me]:
            width = int(np.prod(trail, dtype=np.int64)) * dtype.itemsize
            buf = torch.empty((int(counts[peer, me]), width), dtype=torch.uint8, device=device())
            pending.append((irecv(buf, peer), buf, peer))
        else:
            out[peer] = np.zeros((0,) + trail, dtype=dtype)
    for work, t, peer in pending:
        work.wait()
        if peer is not None:
            out[peer] = t.cpu().numpy().view(dtype).reshape((t.shape[0],) + trail)
    return out  # type: ignore[return-value]


def reshard(a: np.ndarray, n: int, kind: str = "reshard") -> np.ndarray:
    """This rank's rows ``shard_range(n)`` of an n-row array that the ranks hold in another
    contiguous split (each rank ``a``: its rows, in rank order, any lengths summing to n).

    Only the rows that change owner travel (``all_to_all_arrays``): e.g. after a split aligned to
    batches, the few rows around each boundary. Without a process group: ``a`` itself.
    """
    a = np.asarray(a)
    if not active() or world_size() == 1:
        return a
    sizes = np.array(all_gather_object(len(a)), dtype=np.int64)
    if int(sizes.sum()) != n:
        raise ValueError(f"reshard: the ranks hold {int(sizes.sum())} rows in all, expected {n}")
    lo = int(sizes[:rank()].sum())
    hi = lo + len(a)
    parts = []
    for start, stop in shard_ranges(n):
        a0, b0 = max(lo, start), min(hi, stop)
        parts.append(a[a0 - lo:b0 - lo] if b0 > a0 else a[:0])
    return np.concatenate(all_to_all_arrays(parts, kind=kind), axis=0)


def isend(t, peer: int, kind: str = "p2p"):
    """Start sending tensor ``t`` to ``peer``; counted in ``traffic``; returns the work handle."""
    traffic.add(kind, t.numel() * t.element_size())
    return _dist().isend(t, peer)


def irecv(t, peer: int):
    """Start receiving into tensor ``t`` from ``peer``; returns the work handle."""
    return _dist().irecv(t, peer)


# --- failing together ----------------------------------------------------------------------------
@contextlib.contextmanager
def together(stage: str):
    """Run a stage that every rank runs; if any rank raises in it, every rank raises.

    Without a process group (or with one rank) an exception passes through unchanged. With one,
    at the end of the stage the ranks agree on the lowest failing rank (one all-reduce of an int),
    that rank broadcasts "<Type>: <message>", and every rank raises the same RankFailedError
    (the failing rank chains its original exception). A RankFailedError raised inside the stage
    (a nested stage already agreed) passes through as it is.
    """
    try:
        yield
    except RankFailedError:
        raise
    except Exception as exc:  # noqa: BLE001 - every failure must reach the other ranks
        if not active() or world_size() == 1:
            raise
        logger.error("rank %d failed in %s", rank(), stage, exc_info=exc)
        _agree(stage, exc)
        raise  # not reached: _agree raises
    else:
        if active() and world_size() > 1:
            _agree(stage, None)


def _agree(stage: str, exc: BaseException | None) -> None:
    world = world_size()
    me = rank()
    flag = np.array([world - me if exc is not None else 0], dtype=np.int64)
    worst = int(all_reduce_array(flag, "max")[0])
    if worst == 0:
        return
    failed = world - worst
    message = broadcast_object(f"{type(exc).__name__}: {exc}" if exc is not None else None,
                               src=failed)
    err = RankFailedError(failed, stage, str(message))
    if exc is not None:
        raise err from exc
    raise err

"""Embed a dataset with its samples sharded over the ranks of a process group.

Each rank runs ``train.embed`` on its contiguous shard of the samples (``distributed.shard_ranges``
aligned to the batch size, so every shard but the last is made of whole batches and the forward
passes are those of a single-process ``embed``), then the shards are gathered in sample order, on
every rank (``to="all"``), on rank 0 only (``to="main"``, None elsewhere), or left sharded
(``to="rows"``: this rank's rows ``distributed.shard_range(n)``, the split the round's graph
stages use, after moving the rows around the batch-aligned boundaries). Every rank must hold
the same model weights (e.g. loaded from the same checkpoint) and the same SequenceSet (each rank
reads only its shard of ``ds.x``). Without a process group it is ``train.embed``.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from torch import nn

from speler import distributed as dist
from speler.data.schema import SequenceSet
from speler.errors import ConfigError, DataFormatError
from speler.train import EMBED_BATCH_CPU, EMBED_BATCH_CUDA, Embeddings, embed

FIELDS = ("time", "freq", "probs", "probs_time", "probs_freq")


def embed_sharded(model: nn.Module, ds: SequenceSet, *, batch_size: int | None = None,
                  device: str | None = None, to: str = "all",
                  progress: Callable[[int, int], None] | None = None) -> Embeddings | None:
    """``train.embed(model, ds)`` computed by all ranks together (see the module docstring).

    progress(done, shard size) on each rank for its shard. Errors on any rank (bad input, a
    model that does not fit) are raised on every rank (distributed.RankFailedError).
    """
    if to not in ("all", "main", "rows"):
        raise ConfigError(f"embed_sharded: to must be 'all', 'main' or 'rows', got {to!r}")
    if not dist.active() or dist.world_size() == 1:
        return embed(model, ds, batch_size=batch_size, device=device, progress=progress)
    with dist.together("embedding"):
        if not isinstance(ds, SequenceSet):
            raise DataFormatError(f"embed expects a SequenceSet, got {type(ds).__name__}")
        if batch_size is None:
            cuda = str(device or next(model.parameters()).device).startswith("cuda")
            batch_size = EMBED_BATCH_CUDA if cuda else EMBED_BATCH_CPU
        lo, hi = dist.shard_range(ds.n, align=batch_size)
        # an empty shard still runs one sample so that it knows the output widths; dropped below
        part = ds.subset(np.arange(lo, hi) if hi > lo else np.arange(min(1, ds.n)))
        out = embed(model, part, batch_size=batch_size, device=device, progress=progress)
        keep = hi - lo
        block = np.concatenate([getattr(out, f)[:keep] for f in FIELDS], axis=1)
        widths = [getattr(out, f).shape[1] for f in FIELDS]
    if to == "rows":
        whole = dist.reshard(block, ds.n, kind="embedding")
    else:
        whole = dist.all_gather_array(block) if to == "all" else dist.gather_array(block, dst=0)
    if whole is None:
        return None
    cut = np.cumsum(widths)[:-1]
    parts = [np.ascontiguousarray(a, dtype=np.float32) for a in np.split(whole, cut, axis=1)]
    return Embeddings(**dict(zip(FIELDS, parts)))


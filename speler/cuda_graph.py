"""A step of fixed-shape tensor work run as it is written or replayed from a CUDA graph: fit's
training step and embed's forward pass on CUDA.

Both issue hundreds to thousands of small kernels per batch; on a GPU the host spends longer
launching them than the GPU spends running them (on one H100, a training step of the default
network at NTU shape, batch 256: about 43 ms a step against about 32 ms of GPU work, judged from
batch 512's rate; fit ran 3,462 samples/s as written and 8,389 replayed). A CUDA graph records the
kernels once and launches them all with one call.

``GraphStep(body, graph=True)`` runs ``body(*tensors)`` (it returns a tensor) as it is for the
first ``WARMUP`` calls with given input shapes, on a side stream as CUDA's graph capture asks;
then records one call with those shapes into a graph and from there on copies each such call's
inputs into the recorded ones and replays it. Each set of shapes gets its own graph (fit's
batches are smaller than a batch while only the few labels train, then full), up to
``MAX_GRAPHS``; further shapes run as written. The tensor a replay returns is the graph's own
output, overwritten by its next replay: read or copy it before then. ``body`` must not wait for
the device or change shapes with the data; a training body's optimizer must be capturable
(``torch.optim.Adam(..., capturable=True)`` with the learning rate a tensor on the device,
filled in place between replays). When a capture fails the step says why once (a warning) and
runs as it is from then on.
"""

from __future__ import annotations

import logging
import warnings
from typing import Callable

import torch

logger = logging.getLogger(__name__)

WARMUP = 3  # calls with the same input shapes run as written (on a side stream) before a capture
MAX_GRAPHS = 4  # graphs kept per step (each holds its own activations' memory)


class _Captured:
    """One recorded call: the graph, its input tensors (copied into before each replay) and the
    output it writes."""

    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: list[torch.Tensor],
                 out: torch.Tensor) -> None:
        self.graph, self.inputs, self.out = graph, inputs, out

    def __call__(self, tensors) -> torch.Tensor:
        for mine, new in zip(self.inputs, tensors):
            mine.copy_(new)
        self.graph.replay()
        return self.out


class GraphStep:
    def __init__(self, body: Callable[..., torch.Tensor], *, graph: bool,
                 what: str = "the step") -> None:
        self.body = body
        self.graph = graph
        self.what = what
        self.replays = 0
        self.failed: str | None = None
        self._seen: dict[tuple, int] = {}  # calls so far per set of input shapes
        self._graphs: dict[tuple, _Captured] = {}

    def __call__(self, *tensors: torch.Tensor) -> torch.Tensor:
        if not self.graph or self.failed is not None:
            return self.body(*tensors)
        shapes = tuple(tuple(t.shape) for t in tensors)
        captured = self._graphs.get(shapes)
        if captured is None:
            if len(self._graphs) >= MAX_GRAPHS:
                return self.body(*tensors)
            seen = self._seen[shapes] = self._seen.get(shapes, 0) + 1
            if seen <= WARMUP:
                return self._on_side_stream(tensors)
            captured = self._capture(tensors, shapes)
            if captured is None:
                return self.body(*tensors)
        self.replays += 1
        return captured(tensors)

    def _on_side_stream(self, tensors) -> torch.Tensor:
        device = tensors[0].device
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            out = self.body(*tensors)
        torch.cuda.current_stream(device).wait_stream(side)
        return out

    def _capture(self, tensors, shapes: tuple) -> _Captured | None:
        inputs = [t.clone() for t in tensors]
        try:
            graph = torch.cuda.CUDAGraph()
            # thread_local: CUDA does not refuse another thread's calls because of this capture
            # (the app trains in a background thread); should one of them still invalidate it,
            # the capture fails and the step runs as written from then on
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                out = self.body(*inputs)
        except Exception as exc:  # noqa: BLE001 - any failure: fall back to running it as is
            self.failed = f"{type(exc).__name__}: {exc}"
            self._graphs.clear()
            warnings.warn(f"{self.what} could not be captured as a CUDA graph ({self.failed});"
                          f" it runs as written instead", RuntimeWarning, stacklevel=3)
            return None
        captured = self._graphs[shapes] = _Captured(graph, inputs, out)
        logger.debug("%s captured as a CUDA graph for shapes %s", self.what, shapes)
        return captured

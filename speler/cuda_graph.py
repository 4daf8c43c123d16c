"""A step of fixed-shape tensor work run as it is written or replayed from a CUDA graph: fit's
training step and embed's forward pass on CUDA.

Both issue hundreds to thousands of small kernels per batch; on a GPU the host spends longer
launching them than the GPU spends running them (on one H100, a training step of the default
network at NTU shape, batch 256: about 43 ms a step against about 32 ms of GPU work, judged from
batch 512's rate; fit ran 3,462 samples/s as written and 8,389 replayed). A CUDA graph records the
kernels once and launches them all with one call.

``GraphStep(body, graph=True)`` runs ``body(*tensors)`` (it returns a tensor) as it is for the
first ``WARMUP`` calls, on a side stream as CUDA's graph capture asks; then records one call into
a graph and from there on copies each call's inputs into the recorded ones and replays it. The
tensor it returns is then the graph's own output, overwritten by the next replay: read or copy it
before the next call. A call whose input shapes differ from the recorded ones runs as it is.
``body`` must not wait for the device or change shapes with the data; a training body's optimizer
must be capturable (``torch.optim.Adam(..., capturable=True)`` with the learning rate a tensor on
the device, filled in place between replays). When the capture fails the step says why once (a
warning) and runs as it is from then on.
"""

from __future__ import annotations

import logging
import warnings
from typing import Callable

import torch

logger = logging.getLogger(__name__)

WARMUP = 3  # calls run as written (on a side stream) before the capture


class GraphStep:
    def __init__(self, body: Callable[..., torch.Tensor], *, graph: bool,
                 what: str = "the step") -> None:
        self.body = body
        self.graph = graph
        self.what = what
        self.calls = 0
        self.replays = 0
        self.failed: str | None = None
        self._shapes: tuple | None = None
        self._graph: torch.cuda.CUDAGraph | None = None
        self._inputs: list[torch.Tensor] | None = None
        self._out: torch.Tensor | None = None

    def __call__(self, *tensors: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if not self.graph or self.failed is not None:
            return self.body(*tensors)
        shapes = tuple(tuple(t.shape) for t in tensors)
        if self._shapes is None:
            self._shapes = shapes
        if shapes != self._shapes:
            return self.body(*tensors)
        if self._graph is None:
            if self.calls <= WARMUP:
                return self._on_side_stream(tensors)
            if not self._capture(tensors):
                return self.body(*tensors)
        for mine, new in zip(self._inputs, tensors):
            mine.copy_(new)
        self._graph.replay()
        self.replays += 1
        return self._out

    def _on_side_stream(self, tensors) -> torch.Tensor:
        device = tensors[0].device
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), warnings.catch_warnings():
            # a capturable optimizer warns when it steps outside a capture: these steps must
            warnings.filterwarnings("ignore", message=".*capturable.*")
            out = self.body(*tensors)
        torch.cuda.current_stream(device).wait_stream(side)
        return out

    def _capture(self, tensors) -> bool:
        self._inputs = [t.clone() for t in tensors]
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: a CUDA call another thread makes meanwhile (the app trains in a
            # background thread) neither fails nor breaks this capture
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self._out = self.body(*self._inputs)
        except Exception as exc:  # noqa: BLE001 - any failure: fall back to running it as is
            self.failed = f"{type(exc).__name__}: {exc}"
            self._inputs = self._out = None
            warnings.warn(f"{self.what} could not be captured as a CUDA graph ({self.failed});"
                          f" it runs as written instead", RuntimeWarning, stacklevel=3)
            return False
        self._graph = graph
        logger.debug("%s captured as a CUDA graph for shapes %s", self.what, self._shapes)
        return True

"""One training step of ``speler.train.fit``, run as it is written or replayed from a CUDA graph.

A training step of the default network at NTU shape issues a few thousand small kernels; on a GPU
the host spends longer launching them than the GPU spends running them (on one H100, batch 256:
about 43 ms a step against about 32 ms of GPU work, judged from batch 512's rate). A CUDA graph
records the step's kernels once and launches them all with one call.

``TrainStep(body, graph=True)`` runs ``body(x, rows)`` (forward, loss, backward, optimizer step;
it returns a tensor of figures) as it is for the first ``WARMUP`` calls, on a side stream as
CUDA's graph capture asks; then records one call into a graph and from there on copies each
call's inputs into the recorded ones and replays it. A call whose input shapes differ from the
recorded ones runs as it is. ``body`` must not wait for the device or change shapes with the
data, and its optimizer must be capturable (``torch.optim.Adam(..., capturable=True)`` with the
learning rate a tensor on the device, so that a scheduler can change it between replays). When
the capture fails the step says why once (a warning) and runs as it is from then on.
"""

from __future__ import annotations

import logging
import warnings
from typing import Callable

import torch

logger = logging.getLogger(__name__)

WARMUP = 3  # calls run as written (on a side stream) before the capture


class TrainStep:
    def __init__(self, body: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *,
                 graph: bool) -> None:
        self.body = body
        self.graph = graph
        self.calls = 0
        self.replays = 0
        self.failed: str | None = None
        self._shapes: tuple | None = None
        self._graph: torch.cuda.CUDAGraph | None = None
        self._x = self._rows = self._out = None

    def __call__(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if not self.graph or self.failed is not None:
            return self.body(x, rows)
        shapes = (tuple(x.shape), tuple(rows.shape))
        if self._shapes is None:
            self._shapes = shapes
        if shapes != self._shapes:
            return self.body(x, rows)
        if self._graph is None:
            if self.calls <= WARMUP:
                return self._on_side_stream(x, rows)
            if not self._capture(x, rows):
                return self.body(x, rows)
        self._x.copy_(x)
        self._rows.copy_(rows)
        self._graph.replay()
        self.replays += 1
        return self._out

    def _on_side_stream(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side), warnings.catch_warnings():
            # a capturable optimizer warns when it steps outside a capture: these steps must
            warnings.filterwarnings("ignore", message=".*capturable.*")
            out = self.body(x, rows)
        torch.cuda.current_stream(x.device).wait_stream(side)
        return out

    def _capture(self, x: torch.Tensor, rows: torch.Tensor) -> bool:
        self._x, self._rows = x.clone(), rows.clone()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._out = self.body(self._x, self._rows)
        except Exception as exc:  # noqa: BLE001 - any failure: fall back to running it as is
            self.failed = f"{type(exc).__name__}: {exc}"
            self._x = self._rows = self._out = None
            warnings.warn(f"fit: the training step could not be captured as a CUDA graph"
                          f" ({self.failed}); it runs step by step instead", RuntimeWarning,
                          stacklevel=3)
            return False
        self._graph = graph
        logger.debug("fit: training step captured as a CUDA graph for shapes %s", self._shapes)
        return True

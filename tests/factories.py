"""Small seeded SequenceSets for tests (a module with its own name, so tests can import it
while tests/e2e has a conftest.py of its own)."""

from __future__ import annotations

import numpy as np

from speler.data.layouts import get_layout
from speler.data.schema import SequenceSet


def make_skeleton_set(*, n: int = 40, classes: int = 4, frames: int = 16, persons: int = 2,
                      labeled: float = 0.25, seed: int = 0) -> SequenceSet:
    """A seeded ntu25 SequenceSet: class-dependent motion + noise; y partly known, y_true full."""
    rng = np.random.default_rng(seed)
    layout = get_layout("ntu25")
    v = layout.num_joints
    y_true = np.arange(n, dtype=np.int64) % classes
    t = np.linspace(0, 2 * np.pi, frames, dtype=np.float32)
    base = rng.normal(size=(1, 3, 1, v, 1)).astype(np.float32)
    wave = np.sin(t[None, None, :, None, None] * (1 + y_true[:, None, None, None, None]))
    x = (base + 0.3 * wave + 0.05 * rng.normal(size=(n, 3, frames, v, persons))).astype(np.float32)
    x[:, :, :, :, 1:] = 0.0  # second person absent
    lengths = rng.integers(frames // 2, frames + 1, size=n).astype(np.int64)
    for i, length in enumerate(lengths):
        x[i, :, length:] = 0.0
    y = np.where(rng.random(n) < labeled, y_true, -1).astype(np.int64)
    y[:classes] = y_true[:classes]  # every class has at least one label
    return SequenceSet(
        x=x, ids=np.array([f"skel_{i:03d}" for i in range(n)]),
        classes=tuple(f"action{c}" for c in range(classes)), y=y, layout=layout, fps=30.0,
        lengths=lengths, y_true=y_true, where="skeleton-fixture",
    )


def make_series_set(*, n: int = 30, classes: int = 3, channels: int = 3, frames: int = 32,
                    labeled: float = 0.3, seed: int = 1) -> SequenceSet:
    """A seeded series SequenceSet (V = M = 1): per-class frequencies + noise."""
    rng = np.random.default_rng(seed)
    y_true = np.arange(n, dtype=np.int64) % classes
    t = np.linspace(0, 1, frames, dtype=np.float32)
    x = np.sin(2 * np.pi * (1 + y_true)[:, None, None] * t[None, None, :])
    x = x + 0.1 * rng.normal(size=(n, channels, frames))
    x = x[..., None, None].astype(np.float32)
    y = np.where(rng.random(n) < labeled, y_true, -1).astype(np.int64)
    y[:classes] = y_true[:classes]
    return SequenceSet(
        x=x, ids=np.array([f"ser_{i:03d}" for i in range(n)]),
        classes=("walk", "run", "jump")[:classes] if classes <= 3 else tuple(map(str, range(classes))),
        y=y, layout=get_layout("series"), fps=50.0, y_true=y_true,
        channels=tuple(f"acc_{a}" for a in "xyz")[:channels] if channels <= 3 else (),
        where="series-fixture",
    )


def interrupt_rmtree(monkeypatch, marker: str) -> None:
    """Make ``shutil.rmtree`` raise KeyboardInterrupt (Ctrl-C) on any path containing ``marker``;
    undo with ``monkeypatch.undo()``."""
    import shutil

    real_rmtree = shutil.rmtree

    def rmtree_cut_short(path, *args, **kwargs):
        if marker in str(path):
            raise KeyboardInterrupt
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", rmtree_cut_short)

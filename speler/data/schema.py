"""The data contract every reader produces and every later step consumes: ``SequenceSet``.

``x`` is float32 of shape (N, C, T, V, M): channels (3 for xyz, 2-3 for 2D keypoints with score,
sensor channels for series), frames, joints (V = 1 for series), persons (M = 1 for series). Frames
at or beyond ``lengths[i]`` are zero padding. ``y`` holds the labels known to the user (-1 =
unknown); ``y_true`` optionally holds held-out ground truth used only for evaluation and simulation.

A SequenceSet is validated when created and when loaded; errors name the file, sample and field.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from speler.atomic_file import write_atomically
from speler.data.layouts import Layout
from speler.errors import DataFormatError

FORMAT_VERSION = 1


@dataclass
class SequenceSet:
    """Samples of one dataset in one tensor.

    x: float32 (N, C, T, V, M).
    ids: str (N,), unique, stable across re-imports of the same files.
    classes: class names; labels index into it.
    y: int64 (N,), -1 where the label is unknown.
    layout: skeleton layout (``layout.num_joints == V``) or the ``series`` layout (V = 1).
    fps: frames per second of the recording (0 if unknown).
    source_file: str (N,), file each sample came from (relative to the import root).
    source_index: int64 (N,), index of the sample inside that file.
    lengths: int64 (N,), valid frames per sample (1..T).
    y_true: int64 (N,) or None, held-out truth (-1 unknown); never used for training.
    channels: names of the C channels (``x``, ``y``, ``z``, ``score``, sensor names).
    where: where the data came from, used in error messages.
    """

    x: np.ndarray
    ids: np.ndarray
    classes: tuple[str, ...]
    y: np.ndarray
    layout: Layout
    fps: float = 0.0
    source_file: np.ndarray | None = None
    source_index: np.ndarray | None = None
    lengths: np.ndarray | None = None
    y_true: np.ndarray | None = None
    channels: tuple[str, ...] = ()
    where: str = field(default="<memory>", compare=False)

    def __post_init__(self) -> None:
        n = len(self.x) if isinstance(self.x, np.ndarray) and self.x.ndim >= 1 else 0
        if self.source_file is None:
            self.source_file = np.array([self.where] * n, dtype=str)
        if self.source_index is None:
            self.source_index = np.arange(n, dtype=np.int64)
        if self.lengths is None and isinstance(self.x, np.ndarray) and self.x.ndim == 5:
            self.lengths = np.full(n, self.x.shape[2], dtype=np.int64)
        self.classes = tuple(str(c) for c in self.classes)
        if not self.channels and isinstance(self.x, np.ndarray) and self.x.ndim == 5:
            c = self.x.shape[1]
            self.channels = ("x", "y", "z", "score")[:c] if c <= 4 and not self.layout.is_series \
                else tuple(f"ch{i}" for i in range(c))
        self.channels = tuple(str(c) for c in self.channels)
        self.validate()

    # -- shape helpers -------------------------------------------------------------------------
    @property
    def n(self) -> int:
        return int(self.x.shape[0])

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        return tuple(int(s) for s in self.x.shape)  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def class_counts(self, labels: np.ndarray | None = None) -> np.ndarray:
        """Count of each class among ``labels`` (default ``y``), ignoring -1; int64 (num_classes,)."""
        lab = self.y if labels is None else labels
        return np.bincount(lab[lab >= 0], minlength=self.num_classes).astype(np.int64)

    # -- validation ----------------------------------------------------------------------------
    def validate(self) -> None:
        """Check the contract; DataFormatError naming the file, sample and field otherwise."""
        w = self.where
        if not isinstance(self.x, np.ndarray) or self.x.ndim != 5:
            got = getattr(self.x, "shape", type(self.x).__name__)
            raise DataFormatError(f"{w}: field x must be an array of shape (N, C, T, V, M), got {got}")
        if self.x.dtype != np.float32:
            raise DataFormatError(f"{w}: field x must be float32, got {self.x.dtype}")
        n, c, t, v, m = self.x.shape
        if n == 0 or c == 0 or t == 0 or m == 0:
            raise DataFormatError(f"{w}: field x has an empty axis, shape {self.x.shape}")
        if v != self.layout.num_joints:
            raise DataFormatError(
                f"{w}: field x has {v} joints, layout {self.layout.name} needs {self.layout.num_joints}"
            )
        bad = ~np.isfinite(self.x).reshape(n, -1).all(axis=1)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataFormatError(
                f"{w}: sample {self._name(i)} has non-finite values (NaN or inf) in field x"
                f" ({int(bad.sum())} samples affected)"
            )
        for name in ("ids", "y", "source_file", "source_index", "lengths"):
            arr = getattr(self, name)
            if not isinstance(arr, np.ndarray) or arr.shape != (n,):
                got = getattr(arr, "shape", type(arr).__name__)
                raise DataFormatError(f"{w}: field {name} must have shape ({n},), got {got}")
        if self.ids.dtype.kind not in "US":
            raise DataFormatError(f"{w}: field ids must be strings, got {self.ids.dtype}")
        uniq, counts = np.unique(self.ids, return_counts=True)
        if len(uniq) != n:
            raise DataFormatError(f"{w}: field ids is not unique: {str(uniq[counts > 1][0])!r} repeats")
        if len(set(self.classes)) != len(self.classes):
            raise DataFormatError(f"{w}: field classes has duplicate names: {self.classes}")
        if any(not cname for cname in self.classes):
            raise DataFormatError(f"{w}: field classes has an empty class name")
        for name in ("y", "y_true"):
            lab = getattr(self, name)
            if lab is None:
                continue
            if not isinstance(lab, np.ndarray) or lab.shape != (n,) or lab.dtype.kind not in "iu":
                raise DataFormatError(f"{w}: field {name} must be integers of shape ({n},)")
            out = (lab < -1) | (lab >= len(self.classes))
            if out.any():
                i = int(np.flatnonzero(out)[0])
                raise DataFormatError(
                    f"{w}: sample {self._name(i)} has label {int(lab[i])} in field {name},"
                    f" expected -1..{len(self.classes) - 1}"
                )
        if (self.y >= 0).any() and not self.classes:
            raise DataFormatError(f"{w}: labels given but field classes is empty")
        if self.lengths.dtype.kind not in "iu" or (self.lengths < 1).any() or (self.lengths > t).any():
            i = int(np.flatnonzero((self.lengths < 1) | (self.lengths > t))[0]) \
                if self.lengths.dtype.kind in "iu" else 0
            raise DataFormatError(
                f"{w}: sample {self._name(i)} has length {self.lengths[i]} in field lengths,"
                f" expected 1..{t}"
            )
        if len(self.channels) != c:
            raise DataFormatError(f"{w}: field channels names {len(self.channels)} channels, x has {c}")
        if not np.isfinite(self.fps) or self.fps < 0:
            raise DataFormatError(f"{w}: field fps must be a finite number >= 0, got {self.fps}")

    def _name(self, i: int) -> str:
        ids = self.ids if isinstance(self.ids, np.ndarray) and len(self.ids) > i else None
        return f"{i} ({str(ids[i])!r})" if ids is not None else str(i)

    # -- derived sets --------------------------------------------------------------------------
    def subset(self, index: np.ndarray | list[int]) -> "SequenceSet":
        """A new SequenceSet with the samples at ``index`` (ints or a boolean mask)."""
        idx = np.asarray(index)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        return SequenceSet(
            x=self.x[idx], ids=self.ids[idx], classes=self.classes, y=self.y[idx],
            layout=self.layout, fps=self.fps, source_file=self.source_file[idx],
            source_index=self.source_index[idx], lengths=self.lengths[idx],
            y_true=None if self.y_true is None else self.y_true[idx], channels=self.channels,
            where=self.where,
        )

    def replace(self, **changes) -> "SequenceSet":
        """A copy with some fields changed (validated again)."""
        fields = dict(
            x=self.x, ids=self.ids, classes=self.classes, y=self.y, layout=self.layout, fps=self.fps,
            source_file=self.source_file, source_index=self.source_index, lengths=self.lengths,
            y_true=self.y_true, channels=self.channels, where=self.where,
        )
        fields.update(changes)
        return SequenceSet(**fields)

    def fingerprint(self) -> str:
        """Identity of the dataset: sha256 over ids, shape, class names and layout (not values)."""
        import hashlib

        h = hashlib.sha256()
        h.update(repr((self.shape[1:], self.classes, self.layout.to_json())).encode())
        h.update("\n".join(self.ids.tolist()).encode())
        return h.hexdigest()[:16]

    # -- persistence ---------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write one npz atomically (temp file in the same folder, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = dict(
            format_version=np.array(FORMAT_VERSION),
            x=self.x, ids=self.ids.astype(str), classes=np.array(self.classes, dtype=str),
            y=self.y.astype(np.int64), layout=np.array(self.layout.to_json()),
            fps=np.array(float(self.fps)), source_file=self.source_file.astype(str),
            source_index=self.source_index.astype(np.int64), lengths=self.lengths.astype(np.int64),
            channels=np.array(self.channels, dtype=str),
        )
        if self.y_true is not None:
            arrays["y_true"] = self.y_true.astype(np.int64)
        write_atomically(path, lambda fh: np.savez(fh, **arrays))

    @classmethod
    def load(cls, path: str | Path) -> "SequenceSet":
        """Read and validate an npz written by ``save``; never unpickles."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                d = {k: z[k] for k in z.files}
        except FileNotFoundError:
            raise DataFormatError(f"{path}: no such file") from None
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            raise DataFormatError(f"{path}: not a readable SequenceSet npz ({exc})") from exc
        missing = [k for k in ("x", "ids", "classes", "y", "layout") if k not in d]
        if missing:
            raise DataFormatError(f"{path}: field {missing[0]} is missing")
        version = int(d.get("format_version", np.array(1)))
        if version > FORMAT_VERSION:
            raise DataFormatError(
                f"{path}: format_version {version} is newer than this SpeLER reads ({FORMAT_VERSION})"
            )
        try:
            return cls(
                x=d["x"], ids=d["ids"], classes=tuple(d["classes"].tolist()), y=d["y"],
                layout=Layout.from_json(str(d["layout"])), fps=float(d.get("fps", 0.0)),
                source_file=d.get("source_file"), source_index=d.get("source_index"),
                lengths=d.get("lengths"), y_true=d.get("y_true"),
                channels=tuple(d["channels"].tolist()) if "channels" in d else (),
                where=str(path),
            )
        except DataFormatError:
            raise
        except (ValueError, TypeError) as exc:
            raise DataFormatError(f"{path}: invalid SequenceSet ({exc})") from exc

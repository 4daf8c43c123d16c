"""PYSKL / MMAction2 skeleton annotation pickles, read through a restricted unpickler.

The file is ``{"split": {name: [frame_dir, ...]}, "annotations": [anno, ...]}`` (or just the list
of annotations), each ``anno`` a dict with ``frame_dir`` (sample name), ``label`` (int, class
index), ``keypoint`` float (M, T, V, C) with C = 2 (x, y in pixels) or 3 (x, y, z), optionally
``keypoint_score`` float (M, T, V) and ``total_frames``. Other keys (``img_shape`` ...) are ignored.
The pickle is opened by ``safe_pickle.safe_loads``: a pickle that names any global other than
numpy's array machinery is refused and nothing in it runs, and one that stands for more array data
than a sixth of the free memory (an array shared by many annotations counting once per annotation)
is refused before it is loaded.

Layout from V: 17 ``coco17``, 18 ``openpose18``, 25 ``ntu25``; a pickle written by ``write_pyskl``
carries SpeLER's layout, class names and fps in the extra top-level keys ``speler_layout``,
``classes`` and ``fps`` (PYSKL ignores them). Scores, when present, become the last channel
``score``. Classes are the labels that occur, named by their number (``"0"``, ``"5"``) in numeric
order, or by ``classes`` when the file has it; a label of -1 or None is unknown. Ids are the
``frame_dir`` values (``<file stem>#<index>`` where a ``frame_dir`` is missing or repeats);
``source_index`` is the index in ``annotations``. A sample with no person (M = 0) is one all-zero
person. A folder is read as all its ``.pkl``/``.pickle`` files.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from speler.atomic_file import write_atomically
from speler.data.layouts import Layout, get_layout
from speler.data.schema import SequenceSet
from speler.errors import DataFormatError
from speler.formats._common import (
    Progress, Sample, boundary, build, existing, fail, list_files, memory_budget, read_bytes, rel,
    stem_of, tick,
)
from speler.formats.safe_pickle import MAX_TOTAL_BYTES, safe_loads

# Reading a pickle's arrays needs about six times their bytes at the peak (float16 keypoints become
# float64 per sample, then the padded float32 tensor), so a file may stand for a sixth of the memory
# free; an array shared by many annotations counts once per annotation.
PICKLE_MEMORY_SHARE = 1 / 6

LAYOUT_BY_JOINTS = {17: "coco17", 18: "openpose18", 25: "ntu25"}


def is_pickle_file(p: Path) -> bool:
    return p.suffix.lower() in (".pkl", ".pickle")


@boundary("PYSKL pickle")
def read_pyskl(path: str | Path, *, progress: Progress = None) -> SequenceSet:
    """Read a PYSKL/MMAction2 annotation pickle (or a folder of them); x float32 (N, C, T, V, M)."""
    root = existing(path)
    files = list_files(root, is_pickle_file)
    if not files:
        raise fail(root, "no .pkl files found")
    samples: list[Sample] = []
    layout: Layout | None = None
    coords = None
    has_score = None
    fps = 0.0
    class_names: list[str] | None = None
    numeric: dict[str, int] = {}
    for k, f in enumerate(files):
        r = rel(f, root)
        budget = memory_budget(PICKLE_MEMORY_SHARE)
        obj = safe_loads(read_bytes(f), where=str(f),
                         max_bytes=MAX_TOTAL_BYTES if budget is None else min(MAX_TOTAL_BYTES, budget))
        annos, meta = _annotations(obj, f)
        f_layout = meta.get("layout")
        if meta.get("classes") is not None:
            if class_names is not None and class_names != meta["classes"]:
                raise fail(f, "its 'classes' differ from those of the first file")
            class_names = meta["classes"]
        fps = meta.get("fps", fps)
        seen: set[str] = set()
        for i, anno in enumerate(annos):
            where = f"{f}: annotation {i}"
            data, label, v, c, score = _sample(anno, where)
            if layout is None:
                layout = f_layout or _layout_for(v, where)
                coords, has_score = c, score
            if v != layout.num_joints:
                raise fail(where, f"keypoint has {v} joints, layout {layout.name} needs"
                                  f" {layout.num_joints}")
            if c != coords or score != has_score:
                raise fail(where, f"keypoint has {c} coordinates{' and scores' if score else ''},"
                                  f" the first annotation {coords}{' and scores' if has_score else ''}")
            fd = anno.get("frame_dir")
            sid = str(fd) if isinstance(fd, (str, int)) and not isinstance(fd, bool) else ""
            if not sid or sid in seen:
                sid = f"{stem_of(r)}#{i}"
            seen.add(sid)
            name = None
            if label is not None:
                if class_names is not None:
                    if label >= len(class_names):
                        raise fail(where, f"label {label} is beyond the {len(class_names)} classes")
                    name = class_names[label]
                else:
                    name = str(label)
                    numeric[name] = label
            samples.append(Sample(data=data, id=sid, source_file=r, source_index=i, label=name))
        tick(progress, k + 1, len(files))
    if layout is None:
        raise fail(root, "no annotations found")
    if len(files) > 1 and len({s.id for s in samples}) != len(samples):
        for s in samples:  # frame_dir repeated across files: make ids unique by file
            s.id = f"{stem_of(s.source_file)}#{s.source_index}"
    classes = class_names if class_names is not None else sorted(numeric, key=numeric.__getitem__)
    channels = ("x", "y", "z")[:coords] + (("score",) if has_score else ())
    return build(samples, layout=layout, where=root, channels=channels, fps=fps, classes=classes)


def _annotations(obj: object, where: Path) -> tuple[list, dict]:
    meta: dict = {}
    if isinstance(obj, dict):
        if "annotations" not in obj:
            raise fail(where, f"the pickle is a dict without 'annotations' (keys:"
                              f" {[str(k)[:30] for k in list(obj)[:8]]})")
        annos = obj["annotations"]
        classes = obj.get("classes")
        if classes is not None:
            if not isinstance(classes, (list, tuple)) or \
                    not all(isinstance(c, str) and c for c in classes):
                raise fail(where, "field 'classes' must be a list of class names")
            meta["classes"] = list(classes)
        lay = obj.get("speler_layout")
        if lay is not None:
            if not isinstance(lay, str):
                raise fail(where, "field 'speler_layout' must be a layout JSON string")
            meta["layout"] = Layout.from_json(lay)
        fps = obj.get("fps")
        if fps is not None:
            if isinstance(fps, bool) or not isinstance(fps, (int, float, np.floating)) or \
                    not np.isfinite(fps) or fps < 0:
                raise fail(where, f"field 'fps' must be a number >= 0, got {str(fps)[:30]}")
            meta["fps"] = float(fps)
    elif isinstance(obj, list):
        annos = obj
    else:
        raise fail(where, f"expected a dict with 'annotations' or a list of annotations, got"
                          f" {type(obj).__name__}")
    if not isinstance(annos, (list, tuple)) or not annos:
        raise fail(where, "field 'annotations' must be a non-empty list")
    return list(annos), meta


def _layout_for(v: int, where: str) -> Layout:
    if v not in LAYOUT_BY_JOINTS:
        raise fail(where, f"keypoint has {v} joints; expected 17 (COCO), 18 (OpenPose) or 25 (NTU)")
    return get_layout(LAYOUT_BY_JOINTS[v])


def _array(value: object, where: str, field: str, ndim: int) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise fail(where, f"field '{field}' must be a numpy array, got {type(value).__name__}")
    if value.dtype.kind not in "fiub":
        raise fail(where, f"field '{field}' has dtype {value.dtype}, expected numbers")
    if value.ndim != ndim:
        raise fail(where, f"field '{field}' has shape {value.shape}, expected {ndim} axes")
    return value


def _sample(anno: object, where: str) -> tuple[np.ndarray, int | None, int, int, bool]:
    """(data float64 (C', T, V, M), label or None, V, C, has score)."""
    if not isinstance(anno, dict):
        raise fail(where, f"expected a dict, got {type(anno).__name__}")
    if "keypoint" not in anno:
        raise fail(where, "field 'keypoint' is missing")
    kp = _array(anno["keypoint"], where, "keypoint", 4)  # (M, T, V, C)
    m, t, v, c = kp.shape
    if t < 1:
        raise fail(where, "field 'keypoint' has no frames")
    if c not in (2, 3):
        raise fail(where, f"field 'keypoint' has {c} coordinates per joint, expected 2 or 3")
    score = anno.get("keypoint_score")
    if score is not None:
        score = _array(score, where, "keypoint_score", 3)
        if score.shape != (m, t, v):
            raise fail(where, f"field 'keypoint_score' has shape {score.shape}, keypoint needs"
                              f" {(m, t, v)}")
    parts = [kp.astype(np.float64)]
    if score is not None:
        parts.append(score.astype(np.float64)[..., None])
    full = np.concatenate(parts, axis=3) if len(parts) > 1 else parts[0]  # (M, T, V, C')
    if m == 0:
        full = np.zeros((1, t, v, full.shape[3]))
    bad = ~np.isfinite(full).all(axis=(0, 2, 3))
    if bad.any():
        raise fail(where, f"frame {int(np.flatnonzero(bad)[0])} has non-finite values (NaN or inf)")
    total = anno.get("total_frames")
    if total is not None and (isinstance(total, bool) or not isinstance(total, (int, np.integer))
                              or not 0 < int(total) <= t):
        raise fail(where, f"field 'total_frames' is {str(total)[:30]}, keypoint has {t} frames")
    label = anno.get("label")
    if label is not None:
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)):
            raise fail(where, f"field 'label' must be an integer, got {str(label)[:30]}")
        label = int(label)
        if label < -1:
            raise fail(where, f"field 'label' is {label}, expected a class index (>= 0) or -1")
        if label == -1:
            label = None
    if total is not None:
        full = full[:, : int(total)]
    return full.transpose(3, 1, 2, 0), label, v, c, score is not None


def write_pyskl(ds: SequenceSet, path: str | Path, *, labels: np.ndarray | None = None) -> None:
    """Write ``ds`` as a PYSKL annotation pickle that ``read`` loads back.

    labels: int (N,) class indices into ``ds.classes`` (-1 unknown); default ``ds.y``.
    Channels: the coordinates (2 or 3) then an optional last channel named ``score``. Labels are
    written as class indices 0..K-1 (what PYSKL trains on; -1 unknown) with the names in the extra
    key ``classes``, the layout in ``speler_layout``. Written atomically.
    """
    path = Path(path)
    lab = ds.y if labels is None else np.asarray(labels)
    if lab.shape != (ds.n,) or lab.dtype.kind not in "iu":
        raise DataFormatError(f"{path}: labels must be integers of shape ({ds.n},), got"
                              f" {lab.dtype} {lab.shape}")
    if ((lab < -1) | (lab >= ds.num_classes)).any():
        i = int(np.flatnonzero((lab < -1) | (lab >= ds.num_classes))[0])
        raise DataFormatError(f"{path}: label {int(lab[i])} of sample {str(ds.ids[i])!r} is outside"
                              f" -1..{ds.num_classes - 1}")
    if ds.layout.is_series:
        raise DataFormatError(f"{path}: layout series is not a skeleton; PYSKL pickles hold keypoints")
    has_score = bool(ds.channels) and ds.channels[-1] == "score"
    coords = ds.x.shape[1] - int(has_score)
    if coords not in (2, 3):
        raise DataFormatError(f"{path}: PYSKL keypoints need 2 or 3 coordinates, {ds.where} has"
                              f" channels {ds.channels}")
    annos = []
    for i in range(ds.n):
        t = int(ds.lengths[i])
        seq = ds.x[i, :, :t].transpose(3, 1, 2, 0)  # (M, T, V, C)
        anno = {
            "frame_dir": str(ds.ids[i]),
            "label": int(lab[i]),
            "keypoint": np.ascontiguousarray(seq[..., :coords], dtype=np.float32),
            "total_frames": t,
        }
        if has_score:
            anno["keypoint_score"] = np.ascontiguousarray(seq[..., coords], dtype=np.float32)
        annos.append(anno)
    obj = {
        "split": {"all": [str(s) for s in ds.ids]},
        "annotations": annos,
        "speler_layout": ds.layout.to_json(),
        "fps": float(ds.fps),
        "classes": list(ds.classes),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda fh: pickle.dump(obj, fh, protocol=4))

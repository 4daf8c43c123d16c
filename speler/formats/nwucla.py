"""NW-UCLA Multiview Action3D skeletons as JSON, the way CTR-GCN distributes them (``all_sqe``).

One file per sample: ``{"file_name": "a01_s01_e00_v01", "skeletons": [T][20][3], "label": 1}``,
Kinect v1 joints in the SDK order (layout ``kinect_v1``), x y z in metres. ``label`` is 1-based
(1..10); ``label`` 0 or a missing/null label means unknown. A file may also hold a list of such
objects. Class names come from the dataset's ten actions in action-code order (the order of
CTR-GCN's labels): 1 pick up with one hand, 2 pick up with two hands, 3 drop trash, 4 walk
around, 5 sit down, 6 stand up, 7 donning, 8 doffing, 9 throw, 10 carry; a label beyond 10 is
named by its number. Only classes that occur are kept, in label order.

Ids: the relative file path without ``.json`` (``a01_s01_e00_v01``), with ``#<index>`` for files
that hold a list. A folder is read recursively (every ``*.json``). fps 0 (unknown).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from speler.data.layouts import get_layout
from speler.data.schema import SequenceSet
from speler.formats._common import (
    Progress, Sample, boundary, build, existing, fail, list_files, read_text, rel, stem_of, tick,
)

NUM_JOINTS = 20
ACTIONS = (
    "pick up with one hand", "pick up with two hands", "drop trash", "walk around", "sit down",
    "stand up", "donning", "doffing", "throw", "carry",
)


def is_json_file(p: Path) -> bool:
    return p.suffix.lower() == ".json"


def class_name(label: int) -> str:
    return ACTIONS[label - 1] if 1 <= label <= len(ACTIONS) else str(label)


def looks_like_nwucla(obj: object) -> bool:
    if isinstance(obj, list) and obj:
        obj = obj[0]
    return isinstance(obj, dict) and "skeletons" in obj


@boundary("NW-UCLA JSON")
def read_nwucla(path: str | Path, *, progress: Progress = None) -> SequenceSet:
    """Read a CTR-GCN NW-UCLA JSON file or folder; x float32 (N, 3, T, 20, 1)."""
    root = existing(path)
    files = list_files(root, is_json_file)
    if not files:
        raise fail(root, "no .json files found")
    samples = []
    labels: dict[str, int] = {}
    for k, f in enumerate(files):
        r = rel(f, root)
        try:
            obj = json.loads(read_text(f))
        except json.JSONDecodeError as exc:
            raise fail(f, f"not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
        items = obj if isinstance(obj, list) else [obj]
        if not items:
            raise fail(f, "empty list; expected NW-UCLA samples")
        for i, item in enumerate(items):
            where = f"{f}" if len(items) == 1 and not isinstance(obj, list) else f"{f}: item {i}"
            data, label = _sample(item, where)
            name = None
            if label is not None:
                name = class_name(label)
                labels[name] = label
            sid = stem_of(r) if not isinstance(obj, list) else f"{stem_of(r)}#{i}"
            samples.append(Sample(data=data, id=sid, source_file=r, source_index=i, label=name))
        tick(progress, k + 1, len(files))
    classes = sorted(labels, key=labels.__getitem__)
    return build(samples, layout=get_layout("kinect_v1"), where=root, channels=("x", "y", "z"),
                 classes=classes)


def _sample(item: object, where: str) -> tuple[np.ndarray, int | None]:
    if not isinstance(item, dict):
        raise fail(where, f"expected an object with 'skeletons', got {type(item).__name__}")
    if "skeletons" not in item:
        raise fail(where, "field 'skeletons' is missing")
    sk = item["skeletons"]
    if not isinstance(sk, list) or not sk:
        raise fail(where, "field 'skeletons' must be a non-empty list of frames [T][20][3]")
    try:
        arr = np.array(sk, dtype=np.float64)  # (T, 20, 3)
        ok = arr.shape == (len(sk), NUM_JOINTS, 3)
    except (ValueError, TypeError, OverflowError):
        ok = False
    if not ok:
        _explain(sk, where)
    bad = ~np.isfinite(arr).all(axis=(1, 2))
    if bad.any():
        raise fail(where, f"frame {int(np.flatnonzero(bad)[0])} has non-finite values (NaN or inf)")
    label = item.get("label")
    if label is not None:
        if isinstance(label, bool) or not isinstance(label, (int, float)) or \
                not float(label).is_integer():
            raise fail(where, f"field 'label' must be a 1-based integer, got {str(label)[:40]}")
        label = int(label)
        if label < 0:
            raise fail(where, f"field 'label' is {label}, expected 1 or more (0 = unknown)")
        if label == 0:
            label = None
    return arr.transpose(2, 0, 1)[..., None], label


def _explain(sk: list, where: str) -> None:
    """Raise the DataFormatError that names the first malformed frame or joint."""
    for t, frame in enumerate(sk):
        if not isinstance(frame, list) or len(frame) != NUM_JOINTS:
            n = len(frame) if isinstance(frame, list) else type(frame).__name__
            raise fail(where, f"frame {t} has {n} joints, layout kinect_v1 needs {NUM_JOINTS}")
        for j, pt in enumerate(frame):
            if not isinstance(pt, list) or len(pt) != 3 or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in pt):
                raise fail(where, f"frame {t} joint {j}: expected 3 numbers [x, y, z], got"
                                  f" {str(pt)[:60]}")
    raise fail(where, "field 'skeletons' is not a [T][20][3] array of numbers")

"""OpenPose per-frame JSON output (``--write_json``): one folder of frame files per video.

Each frame file is ``{"people": [{"pose_keypoints_2d": [x0, y0, s0, x1, y1, s1, ...]}, ...]}``;
75 values are BODY-25 (layout ``openpose25``), 54 are COCO-18 (layout ``openpose18``). Channels
are x, y (pixels) and the detection score. Per frame the (up to) two people with the highest mean
score are kept, best first (OpenPose does not track people, so person slots follow the score, not
identity); frames without people stay zero.

Folders: every folder that directly holds ``.json`` frame files is one sample, its frames sorted by
the last number in the file name (``video_000000000012_keypoints.json`` -> 12), then by name. The
sample id is the folder's path relative to the path given (the folder's own name when the path is
a sample folder). Labels: a ``labels.csv`` (``id,label``) in the path given, else, when samples
sit in sub-sub-folders (``<class>/<video>/frames``), the first folder name is the class; otherwise
unknown. A single JSON file is a one-frame sample. fps 0 (unknown).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from speler.data.layouts import get_layout
from speler.data.schema import SequenceSet
from speler.formats._common import (
    Progress, Sample, boundary, build, existing, fail, find_labels_file, is_labels_file, list_files,
    read_id_labels, read_text, rel, tick,
)

MAX_PEOPLE = 2
LAYOUT_BY_VALUES = {75: "openpose25", 54: "openpose18"}
_DIGITS = re.compile(r"(\d+)")


def is_frame_file(p: Path) -> bool:
    return p.suffix.lower() == ".json" and not is_labels_file(p)


def frame_number(name: str) -> int:
    nums = _DIGITS.findall(Path(name).stem)
    return int(nums[-1][-18:]) if nums else -1


def looks_like_openpose(obj: object) -> bool:
    return isinstance(obj, dict) and "people" in obj


@boundary("OpenPose JSON")
def read_openpose(path: str | Path, *, progress: Progress = None) -> SequenceSet:
    """Read OpenPose frame folders; x float32 (N, 3, T, V, M<=2), V = 25 or 18."""
    root = existing(path)
    files = list_files(root, is_frame_file)
    if not files:
        raise fail(root, "no OpenPose .json frame files found")
    groups: dict[Path, list[Path]] = {}
    for f in files:
        groups.setdefault(f.parent, []).append(f)
    labels = {}
    lab_file = find_labels_file(root) if root.is_dir() else None
    if lab_file is not None:
        labels = read_id_labels(lab_file)
    samples = []
    n_values: int | None = None
    first_file: Path | None = None
    done = 0
    for k, folder in enumerate(sorted(groups, key=lambda p: rel(p, root) if p != root else "")):
        frames = sorted(groups[folder], key=lambda p: (frame_number(p.name), p.name))
        if root.is_file():
            sid = root.stem
        elif folder == root:
            sid = root.name or "sample"
        else:
            sid = rel(folder, root)
        per_frame = []
        for f in frames:
            people, nv = _read_frame(f)
            if nv is not None:
                if n_values is None:
                    n_values, first_file = nv, f
                elif nv != n_values:
                    raise fail(f, f"people have {nv} keypoint values, {first_file} has {n_values};"
                                  " BODY-25 and COCO-18 cannot be mixed")
            per_frame.append(people)
            done += 1
            tick(progress, done, len(files))
        if not any(per_frame):
            raise fail(folder, "no person in any frame")
        label = labels.get(sid)
        if label is None and not labels and sid.count("/") >= 1:
            label = sid.split("/")[0]
        samples.append((sid, folder, per_frame, label, k))
    if n_values is None:
        raise fail(root, "no person in any frame")
    v = n_values // 3
    if labels:
        unknown = sorted(set(labels) - {s[0] for s in samples})
        if unknown:
            raise fail(lab_file, f"{len(unknown)} ids name no sample folder, e.g. {unknown[:5]}")
    out = []
    for sid, folder, per_frame, label, k in samples:
        m = max(1, max(len(p) for p in per_frame))
        data = np.zeros((3, len(per_frame), v, m), dtype=np.float64)
        for t, people in enumerate(per_frame):
            for i, kp in enumerate(people):
                data[:, t, :, i] = kp.T
        r = rel(folder, root) if folder != root else (root.name if root.is_dir() else rel(root, root))
        out.append(Sample(data=data, id=sid, source_file=r, source_index=0, label=label))
    return build(out, layout=get_layout(LAYOUT_BY_VALUES[n_values]), where=root,
                 channels=("x", "y", "score"))


def _read_frame(f: Path) -> tuple[list[np.ndarray], int | None]:
    """Up to two people of one frame file, best mean score first: each float64 (V, 3)."""
    try:
        obj = json.loads(read_text(f))
    except json.JSONDecodeError as exc:
        raise fail(f, f"not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    if not looks_like_openpose(obj):
        raise fail(f, "no 'people' field; not an OpenPose frame file")
    people = obj["people"]
    if not isinstance(people, list):
        raise fail(f, "field 'people' must be a list")
    found = []
    n_values = None
    for i, person in enumerate(people):
        if not isinstance(person, dict):
            raise fail(f, f"person {i} is not an object")
        kp = person.get("pose_keypoints_2d", person.get("pose_keypoints"))
        if kp is None or (isinstance(kp, list) and not kp):
            continue
        if not isinstance(kp, list) or len(kp) not in LAYOUT_BY_VALUES:
            n = len(kp) if isinstance(kp, list) else type(kp).__name__
            raise fail(f, f"person {i}: pose_keypoints_2d has {n} values, expected 75 (BODY-25) or"
                          " 54 (COCO-18)")
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in kp):
            raise fail(f, f"person {i}: pose_keypoints_2d holds a value that is not a number")
        arr = np.array(kp, dtype=np.float64).reshape(-1, 3)
        if not np.isfinite(arr).all():
            raise fail(f, f"person {i}: pose_keypoints_2d has non-finite values (NaN or inf)")
        if n_values is not None and len(kp) != n_values:
            raise fail(f, f"person {i} has {len(kp)} keypoint values, person 0 has {n_values}")
        n_values = len(kp)
        found.append(arr)
    found.sort(key=lambda a: -float(a[:, 2].mean()))
    return found[:MAX_PEOPLE], n_values

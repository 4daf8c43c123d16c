"""Biovision BVH motion capture: hierarchy + motion -> joint positions by forward kinematics.

``HIERARCHY`` lists ``ROOT``/``JOINT`` blocks with ``OFFSET x y z``, ``CHANNELS n ...`` (any
subset and order of ``Xposition Yposition Zposition Xrotation Yrotation Zrotation``) and
``End Site`` blocks; ``MOTION`` gives ``Frames: n``, ``Frame Time: s`` and one line of channel
values per frame, in hierarchy order.

Forward kinematics, per frame: a joint's local transform is a translation then a rotation. The
translation is the joint's OFFSET plus its position channels for the root (as the BVH description
says) and, for a non-root joint with position channels, the position channels alone (exporters
that key every joint's translation write the offset there). The rotation is the product of the
axis rotations in the order the channels list them (``Zrotation Xrotation Yrotation`` ->
``Rz @ Rx @ Ry``), angles in degrees. A joint's global transform is its parent's times its local
one; its position is the global translation. End Sites become joints named ``<parent>_End``
at the parent's transform applied to their offset.

Output: channels x, y, z in the file's units, one person, layout from
``layout_from_hierarchy("bvh:<root>", ...)``, fps = 1 / Frame Time. One file is one sample (id:
relative path without ``.bvh``); a folder is read recursively and every file must have the same
hierarchy (joint names and parents). Class: a ``labels.csv`` (``id,label``) in the folder given,
else the first sub-folder name for files in sub-folders, else unknown.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from speler.data.layouts import layout_from_hierarchy
from speler.data.schema import SequenceSet
from speler.formats._common import (
    Progress, Sample, boundary, build, existing, fail, find_labels_file, list_files, parse_floats,
    read_id_labels, read_text, rel, stem_of, tick,
)

logger = logging.getLogger(__name__)

_CHANNELS = ("xposition", "yposition", "zposition", "xrotation", "yrotation", "zrotation")
MAX_JOINTS = 10_000
MAX_CHANNELS_PER_JOINT = 6


@dataclass
class _Joint:
    name: str
    parent: int
    offset: np.ndarray
    channels: list[str] = field(default_factory=list)  # lower-case names
    end_site: bool = False


def is_bvh_file(p: Path) -> bool:
    return p.suffix.lower() == ".bvh"


@boundary("BVH")
def read_bvh(path: str | Path, *, progress: Progress = None) -> SequenceSet:
    """Read a ``.bvh`` file or a folder of them; x float32 (N, 3, T, V, 1)."""
    root = existing(path)
    files = list_files(root, is_bvh_file)
    if not files:
        raise fail(root, "no .bvh files found")
    labels = {}
    lab_file = find_labels_file(root) if root.is_dir() else None
    if lab_file is not None:
        labels = read_id_labels(lab_file)
    samples = []
    names: list[str] | None = None
    parents: list[int] | None = None
    fps = None
    first = files[0]
    for k, f in enumerate(files):
        r = rel(f, root)
        joints, pos, frame_time = parse_bvh(read_text(f), f)
        j_names = [j.name for j in joints]
        j_par = [j.parent for j in joints]
        if names is None:
            names, parents = j_names, j_par
        elif j_names != names or j_par != parents:
            raise fail(f, f"its hierarchy ({len(j_names)} joints) differs from that of {first.name}"
                          f" ({len(names)} joints); a folder must hold one skeleton")
        f_fps = 1.0 / frame_time if frame_time > 0 else 0.0
        if fps is None:
            fps = f_fps
        elif abs(f_fps - fps) > 1e-6 * max(fps, 1.0):
            logger.warning("%s: %.4g fps differs from %s's %.4g fps; the set keeps %.4g", f, f_fps,
                           first.name, fps, fps)
        sid = stem_of(r)
        label = labels.get(sid) if labels else (sid.split("/")[0] if "/" in sid else None)
        samples.append(Sample(data=pos.transpose(2, 0, 1)[..., None], id=sid, source_file=r,
                              source_index=0, label=label))
        tick(progress, k + 1, len(files))
    if labels:
        unknown = sorted(set(labels) - {s.id for s in samples})
        if unknown:
            raise fail(lab_file, f"{len(unknown)} ids name no .bvh file, e.g. {unknown[:5]}")
    assert names is not None and parents is not None
    layout = layout_from_hierarchy(f"bvh:{names[0]}", names, parents)
    return build(samples, layout=layout, where=root, channels=("x", "y", "z"), fps=fps or 0.0)


def parse_bvh(text: str, where: Path | str) -> tuple[list[_Joint], np.ndarray, float]:
    """Joints, positions float64 (T, V, 3) and the frame time of one BVH text."""
    tokens = text.split()
    joints, i = _hierarchy(tokens, where)
    n_channels = sum(len(j.channels) for j in joints)
    # MOTION / Frames: n / Frame Time: s
    if i >= len(tokens) or tokens[i].upper() != "MOTION":
        raise fail(where, "expected MOTION after the hierarchy")
    i += 1
    if i + 1 >= len(tokens) or tokens[i].lower() != "frames:":
        raise fail(where, "expected 'Frames: <count>' after MOTION")
    try:
        n_frames = int(tokens[i + 1])
    except ValueError:
        raise fail(where, f"frame count {tokens[i + 1][:30]!r} is not an integer") from None
    i += 2
    if i + 2 >= len(tokens) or tokens[i].lower() != "frame" or tokens[i + 1].lower() != "time:":
        raise fail(where, "expected 'Frame Time: <seconds>' after the frame count")
    try:
        frame_time = float(tokens[i + 2])
    except ValueError:
        raise fail(where, f"frame time {tokens[i + 2][:30]!r} is not a number") from None
    if not np.isfinite(frame_time) or frame_time < 0:
        raise fail(where, f"frame time {frame_time} must be a finite number >= 0")
    i += 3
    values = tokens[i:]
    if n_frames < 1:
        raise fail(where, f"Frames: {n_frames}; expected at least one frame")
    if n_channels == 0:
        if values:
            raise fail(where, "motion values given but the hierarchy declares no channels")
        motion = np.zeros((n_frames, 0))
        if n_frames > 100_000:
            raise fail(where, f"Frames: {n_frames} without channels; too many frames")
    else:
        if len(values) != n_frames * n_channels:
            have = len(values) / n_channels
            raise fail(where, f"header says {n_frames} frames of {n_channels} channels but the motion"
                              f" holds {len(values)} values ({have:.6g} frames); the file is"
                              f" truncated or corrupt")
        motion = parse_floats(values, f"{where}: MOTION").reshape(n_frames, n_channels)
        bad = ~np.isfinite(motion).all(axis=1)
        if bad.any():
            raise fail(where, f"frame {int(np.flatnonzero(bad)[0])} has non-finite values (NaN or inf)")
    pos = _forward_kinematics(joints, motion)
    if not np.isfinite(pos).all():
        raise fail(where, "forward kinematics overflowed (values too large)")
    return joints, pos, frame_time


def _hierarchy(tokens: list[str], where) -> tuple[list[_Joint], int]:
    """Parse HIERARCHY from ``tokens``; (joints, index of the token after it)."""
    if not tokens or tokens[0].upper() != "HIERARCHY":
        raise fail(where, "does not start with HIERARCHY; not a BVH file")
    i = 1
    joints: list[_Joint] = []
    names: set[str] = set()
    stack: list[int] = []  # open joint indices
    pending: int | None = None  # joint whose '{' is expected next
    n = len(tokens)

    def need(k: int, what: str) -> None:
        if i + k > n:
            raise fail(where, f"file ends inside the hierarchy (expected {what})")

    while True:
        if i >= n:
            raise fail(where, "file ends inside the hierarchy")
        tok = tokens[i]
        up = tok.upper()
        if up in ("ROOT", "JOINT"):
            if (up == "ROOT") != (not joints):
                raise fail(where, f"token {i}: {tok} {'before ROOT' if not joints else 'after the root'}"
                                  " (one ROOT first, then JOINTs inside it)")
            if pending is not None:
                raise fail(where, f"token {i}: {tok} where '{{' was expected")
            need(2, "a joint name")
            name = tokens[i + 1]
            if name in names:
                raise fail(where, f"joint name {name[:40]!r} is used twice")
            names.add(name)
            joints.append(_Joint(name=name, parent=stack[-1] if stack else -1, offset=np.zeros(3)))
            if len(joints) > MAX_JOINTS:
                raise fail(where, f"more than {MAX_JOINTS} joints")
            pending = len(joints) - 1
            i += 2
        elif up == "END":
            need(2, "End Site")
            if tokens[i + 1].upper() != "SITE" or not stack or pending is not None:
                raise fail(where, f"token {i}: unexpected 'End {tokens[i + 1][:20]}'")
            parent = stack[-1]
            name = f"{joints[parent].name}_End"
            while name in names:
                name += "_"
            names.add(name)
            joints.append(_Joint(name=name, parent=parent, offset=np.zeros(3), end_site=True))
            pending = len(joints) - 1
            i += 2
        elif tok == "{":
            if pending is None:
                raise fail(where, f"token {i}: '{{' without a joint")
            stack.append(pending)
            pending = None
            i += 1
        elif tok == "}":
            if not stack or pending is not None:
                raise fail(where, f"token {i}: unbalanced '}}'")
            stack.pop()
            i += 1
            if not stack:
                return joints, i
        elif up == "OFFSET":
            if not stack or pending is not None:
                raise fail(where, f"token {i}: OFFSET outside a joint")
            need(4, "three OFFSET values")
            off = parse_floats(tokens[i + 1: i + 4], f"{where}: OFFSET of {joints[stack[-1]].name}")
            if not np.isfinite(off).all():
                raise fail(where, f"OFFSET of {joints[stack[-1]].name} is not finite")
            joints[stack[-1]].offset = off
            i += 4
        elif up == "CHANNELS":
            if not stack or pending is not None or joints[stack[-1]].end_site:
                raise fail(where, f"token {i}: CHANNELS outside a joint")
            need(2, "a channel count")
            try:
                k = int(tokens[i + 1])
            except ValueError:
                raise fail(where, f"channel count {tokens[i + 1][:20]!r} is not an integer") from None
            if not 0 <= k <= MAX_CHANNELS_PER_JOINT:
                raise fail(where, f"joint {joints[stack[-1]].name} declares {k} channels, expected"
                                  f" 0..{MAX_CHANNELS_PER_JOINT}")
            need(2 + k, f"{k} channel names")
            chans = [c.lower() for c in tokens[i + 2: i + 2 + k]]
            bad = [c for c in chans if c not in _CHANNELS]
            if bad:
                raise fail(where, f"joint {joints[stack[-1]].name}: unknown channel {bad[0][:30]!r}"
                                  " (expected X/Y/Z position or rotation)")
            if len(set(chans)) != len(chans):
                raise fail(where, f"joint {joints[stack[-1]].name} lists a channel twice")
            joints[stack[-1]].channels = chans
            i += 2 + k
        else:
            raise fail(where, f"token {i}: unexpected {tok[:30]!r} in the hierarchy")


def _axis_rotation(axis: str, deg: np.ndarray) -> np.ndarray:
    """(T, 3, 3) rotation matrices about ``axis`` by ``deg`` degrees."""
    a = np.deg2rad(deg)
    c, s = np.cos(a), np.sin(a)
    one, zero = np.ones_like(a), np.zeros_like(a)
    if axis == "x":
        rows = [[one, zero, zero], [zero, c, -s], [zero, s, c]]
    elif axis == "y":
        rows = [[c, zero, s], [zero, one, zero], [-s, zero, c]]
    else:
        rows = [[c, -s, zero], [s, c, zero], [zero, zero, one]]
    return np.stack([np.stack(r, axis=-1) for r in rows], axis=-2)


def _forward_kinematics(joints: list[_Joint], motion: np.ndarray, *, chunk: int = 8192) -> np.ndarray:
    """Global joint positions float64 (T, V, 3) from per-frame channel values (T, channels)."""
    t = motion.shape[0]
    out = np.empty((t, len(joints), 3))
    for a in range(0, t, chunk):
        out[a: a + chunk] = _fk_block(joints, motion[a: a + chunk])
    return out


def _fk_block(joints: list[_Joint], motion: np.ndarray) -> np.ndarray:
    t = motion.shape[0]
    rot = np.empty((len(joints), t, 3, 3))
    pos = np.empty((len(joints), t, 3))
    col = 0
    for j, jt in enumerate(joints):
        local_r = np.broadcast_to(np.eye(3), (t, 3, 3)).copy()
        trans = np.broadcast_to(jt.offset, (t, 3)).copy()
        for ch in jt.channels:
            v = motion[:, col]
            col += 1
            axis = "xyz".index(ch[0])
            if ch.endswith("position"):
                # root: offset + translation; other joints: the channel replaces the offset
                trans[:, axis] = (jt.offset[axis] + v) if jt.parent < 0 else v
            else:
                local_r = local_r @ _axis_rotation(ch[0], v)
        if jt.parent < 0:
            rot[j], pos[j] = local_r, trans
        else:
            p = jt.parent
            pos[j] = pos[p] + np.einsum("tij,tj->ti", rot[p], trans)
            rot[j] = rot[p] @ local_r
    return pos.transpose(1, 0, 2)

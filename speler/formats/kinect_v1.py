"""Kinect v1 skeleton text files (20 joints): MSR Action3D and UTKinect-Action3D.

MSR Action3D (format ``msr_action3d``, layout ``msr_action3d``)
    ``aAA_sSS_eEE_skeleton3D.txt`` (action, subject, take): 20 lines of ``x y z c`` per frame, in
    MSR Action3D's own joint order. The reader keeps x, y, z (the tracker's confidence column c is
    dropped) and leaves frames where the tracker failed (all joints at 0) as they are. One file is
    one sample, id = relative path without suffix (``a01_s01_e01_skeleton3D``); the class is the
    action, named by the dataset's action list (``high arm wave`` ...) in action-number order.
    15 fps (the depth camera's rate).

UTKinect-Action3D (format ``utkinect``, layout ``kinect_v1``)
    ``joints_sSS_eEE.txt``: one line per recorded frame, ``frame_id x1 y1 z1 ... x20 y20 z20`` in
    the Kinect SDK joint order. ``actionLabel.txt`` beside it lists, per ``sSS_eEE`` block, each
    action's first and last frame id (``walk: 252 390``). The reader cuts each file into one sample
    per action: the lines whose frame id lies in [first, last], kept as recorded (frame ids jump
    where the skeleton was not tracked). An action whose range is ``NaN`` is left out (the dataset
    has one: s10_e02 carry) and logged. Ids are ``joints_sSS_eEE#action``; classes in the order of
    the first block of actionLabel.txt. Without actionLabel.txt (or for a single file named
    otherwise) each file is one unlabelled sample.
    fps 15: the dataset's authors give 30 fps capture of which only tracked frames were kept,
    about 15 fps in the files.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import numpy as np

from speler.data.layouts import get_layout
from speler.data.schema import SequenceSet
from speler.formats._common import (
    Progress, Sample, boundary, build, existing, fail, list_files, parse_floats, read_text, rel,
    stem_of, tick,
)

logger = logging.getLogger(__name__)

NUM_JOINTS = 20
MSR_FPS = 15.0
UTK_FPS = 15.0
MSR_ACTIONS = (
    "high arm wave", "horizontal arm wave", "hammer", "hand catch", "forward punch", "high throw",
    "draw x", "draw tick", "draw circle", "hand clap", "two hand wave", "side boxing", "bend",
    "forward kick", "side kick", "jogging", "tennis swing", "tennis serve", "golf swing",
    "pick up and throw",
)
_MSR_NAME = re.compile(r"^a(\d+)_s(\d+)_e(\d+)", re.IGNORECASE)
_UTK_NAME = re.compile(r"^joints_(s\d+_e\d+)\.txt$", re.IGNORECASE)
UTK_LABELS = "actionLabel.txt"


# -- MSR Action3D ----------------------------------------------------------------------------------
def is_msr_file(p: Path) -> bool:
    return p.suffix.lower() == ".txt" and bool(_MSR_NAME.match(p.name))


def msr_class(action: int) -> str:
    return MSR_ACTIONS[action - 1] if 1 <= action <= len(MSR_ACTIONS) else f"a{action:02d}"


@boundary("MSR Action3D skeleton")
def read_msr_action3d(path: str | Path, *, progress: Progress = None) -> SequenceSet:
    """Read one ``aAA_sSS_eEE_skeleton3D.txt`` or a folder of them; x float32 (N, 3, T, 20, 1)."""
    root = existing(path)
    files = list_files(root, is_msr_file) if root.is_dir() else [root]
    if not files:
        raise fail(root, "no MSR Action3D files (aAA_sSS_eEE_skeleton3D.txt) found")
    samples = []
    actions: dict[str, int] = {}
    for k, f in enumerate(files):
        r = rel(f, root)
        data = _parse_msr(read_text(f), f)
        m = _MSR_NAME.match(f.name)
        label = None
        if m:
            label = msr_class(int(m.group(1)))
            actions[label] = int(m.group(1))
        samples.append(Sample(data=data, id=stem_of(r), source_file=r, source_index=0, label=label))
        tick(progress, k + 1, len(files))
    classes = sorted(actions, key=actions.__getitem__)
    return build(samples, layout=get_layout("msr_action3d"), where=root, channels=("x", "y", "z"),
                 fps=MSR_FPS, classes=classes)


def _parse_msr(text: str, where: Path) -> np.ndarray:
    """(3, T, 20, 1) float64 of one MSR file."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise fail(where, "file is empty")
    tokens = []
    for i, ln in enumerate(lines):
        tok = ln.split()
        if len(tok) != 4:
            raise fail(where, f"line {i + 1}: expected 4 values (x y z confidence), got {len(tok)}")
        tokens.extend(tok)
    if len(lines) % NUM_JOINTS:
        raise fail(where, f"{len(lines)} joint lines is not a multiple of {NUM_JOINTS} (joints per"
                          f" frame); the last frame has {len(lines) % NUM_JOINTS} joints")
    vals = parse_floats(tokens, str(where)).reshape(-1, NUM_JOINTS, 4)[:, :, :3]
    bad = ~np.isfinite(vals).all(axis=(1, 2))
    if bad.any():
        f = int(np.flatnonzero(bad)[0])
        raise fail(where, f"frame {f} (lines {f * NUM_JOINTS + 1}-{(f + 1) * NUM_JOINTS}) has"
                          " non-finite values (NaN or inf)")
    return vals.transpose(2, 0, 1)[..., None]


# -- UTKinect-Action3D -----------------------------------------------------------------------------
def is_utk_file(p: Path) -> bool:
    return bool(_UTK_NAME.match(p.name))


@boundary("UTKinect-Action3D")
def read_utkinect(path: str | Path, *, progress: Progress = None) -> SequenceSet:
    """Read UTKinect joints files cut by ``actionLabel.txt``; x float32 (N, 3, T, 20, 1).

    ``path``: the dataset folder (joints files and actionLabel.txt), one joints file (its folder's
    actionLabel.txt is used when present) or actionLabel.txt itself (its folder is read).
    """
    root = existing(path)
    if root.is_file() and root.name.lower() == UTK_LABELS.lower():
        root = root.parent
    if root.is_dir():
        files = list_files(root, is_utk_file)
        label_dirs = {f.parent for f in files}
    else:
        files = [root]
        label_dirs = {root.parent} if is_utk_file(root) else set()
    if not files:
        raise fail(root, "no UTKinect joints files (joints_sSS_eEE.txt) found")
    blocks: dict[Path, dict[str, list[tuple[str, float, float]]]] = {}
    for d in sorted(label_dirs):
        lab = next((p for p in sorted(d.iterdir()) if p.name.lower() == UTK_LABELS.lower()), None)
        if lab is not None:
            blocks[d] = _parse_action_labels(read_text(lab), lab)
    classes: list[str] = []
    for d in sorted(blocks):
        for acts in blocks[d].values():
            for name, _, _ in acts:
                if name not in classes:
                    classes.append(name)
    samples = []
    for k, f in enumerate(files):
        r = rel(f, root)
        sid = stem_of(r)
        rows = _parse_utk(read_text(f), f)
        m = _UTK_NAME.match(f.name)
        key = m.group(1).lower() if m else ""
        acts = blocks.get(f.parent) if m else None
        if acts is None:
            data = rows[:, 1:].reshape(-1, NUM_JOINTS, 3).transpose(2, 0, 1)[..., None]
            samples.append(Sample(data=data, id=sid, source_file=r, source_index=0))
        elif key not in acts:
            raise fail(f, f"no block {key!r} in {UTK_LABELS}, so its actions cannot be cut")
        else:
            seen: set[str] = set()
            for a, (name, lo, hi) in enumerate(acts[key]):
                if math.isnan(lo) or math.isnan(hi):
                    logger.info("%s: action %r has no frame range (NaN) and is left out", f, name)
                    continue
                sel = (rows[:, 0] >= lo) & (rows[:, 0] <= hi)
                if not sel.any():
                    raise fail(f, f"action {name!r} (frames {lo:g}-{hi:g} in {UTK_LABELS}) matches no"
                                  " line of the file")
                aid = f"{sid}#{name}" if name not in seen else f"{sid}#{name}{a}"
                seen.add(name)
                data = rows[sel, 1:].reshape(-1, NUM_JOINTS, 3).transpose(2, 0, 1)[..., None]
                samples.append(Sample(data=data, id=aid, source_file=r, source_index=a, label=name))
        tick(progress, k + 1, len(files))
    return build(samples, layout=get_layout("kinect_v1"), where=root, channels=("x", "y", "z"),
                 fps=UTK_FPS, classes=classes)


def _parse_utk(text: str, where: Path) -> np.ndarray:
    """(T, 61) float64: frame id then 60 coordinates per line."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise fail(where, "file is empty")
    width = 1 + NUM_JOINTS * 3
    tokens = []
    for i, ln in enumerate(lines):
        tok = ln.split()
        if len(tok) != width:
            raise fail(where, f"line {i + 1}: expected {width} values (frame id and 20 joints x, y,"
                              f" z), got {len(tok)}")
        tokens.extend(tok)
    rows = parse_floats(tokens, str(where)).reshape(-1, width)
    bad = ~np.isfinite(rows).all(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise fail(where, f"line {i + 1} (frame {i}) has non-finite values (NaN or inf)")
    return rows


def _parse_action_labels(text: str, where: Path) -> dict[str, list[tuple[str, float, float]]]:
    """``sSS_eEE -> [(action, first, last), ...]`` from actionLabel.txt (NaN kept as NaN)."""
    out: dict[str, list[tuple[str, float, float]]] = {}
    current: str | None = None
    for i, ln in enumerate(text.splitlines()):
        s = ln.strip()
        if not s:
            continue
        if ":" not in s:
            current = s.lower()
            if current in out:
                raise fail(where, f"line {i + 1}: block {s!r} appears twice")
            out[current] = []
            continue
        if current is None:
            raise fail(where, f"line {i + 1}: action line before the first sSS_eEE block name")
        name, _, rng = s.partition(":")
        parts = rng.split()
        name = name.strip()
        if not name or len(parts) != 2:
            raise fail(where, f"line {i + 1}: expected 'action: first last', got {s[:60]!r}")
        try:
            lo, hi = float(parts[0]), float(parts[1])
        except ValueError:
            raise fail(where, f"line {i + 1}: frame range {rng.strip()[:40]!r} is not two numbers") \
                from None
        if math.isinf(lo) or math.isinf(hi) or (lo > hi):
            raise fail(where, f"line {i + 1}: frame range {lo:g}-{hi:g} is not a valid range")
        out[current].append((name, lo, hi))
    if not out:
        raise fail(where, "no sSS_eEE blocks found")
    return out

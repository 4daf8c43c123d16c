"""NTU RGB+D / NTU RGB+D 120 ``.skeleton`` files (Kinect v2, 25 joints, layout ``ntu25``).

A file is text: the frame count, then per frame the body count and per body one line of 10 values
(body id, clipped edges, hand states, restriction, lean x/y, tracking state), the joint count (25)
and 25 rows of 12 values (x y z, depth x/y, colour x/y, orientation w x y z, tracking state).

What the reader keeps: the camera-space x, y, z of each joint (metres), for the two most active
bodies of the file. Bodies are followed by their body id; a body's activity is the variance of its
joint positions over the frames it appears in, summed over joints and axes (a body seen in one
frame has activity 0). The most active body is person 0. Frames where a kept body is absent stay
zero; M is the most bodies kept in any file of the set (1 or 2). Frame count and lengths are the
file's frames; fps is 30.

Labels come from the file name ``SsssCcccPpppRrrrAaaa`` (setup, camera, performer, replication,
action): the class is ``Aaaa`` (``A001`` ...); a name without that pattern gives an unknown label.
A folder is read recursively (every ``*.skeleton``); ids are the relative paths without suffix.
A file with no body in any frame (NTU lists such samples as missing) is an error naming it.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from speler.data.layouts import get_layout
from speler.data.schema import SequenceSet
from speler.formats._common import (
    Progress, Sample, boundary, build, existing, fail, list_files, parse_floats, read_text, rel,
    stem_of, tick,
)

NUM_JOINTS = 25
VALUES_PER_JOINT = 12
INFO_VALUES = 10
MAX_BODIES = 2
FPS = 30.0
_NAME = re.compile(r"S(\d{3})C(\d{3})P(\d{3})R(\d{3})A(\d{3})", re.IGNORECASE)


def is_ntu_file(p: Path) -> bool:
    return p.suffix.lower() == ".skeleton"


@boundary("NTU .skeleton")
def read_ntu(path: str | Path, *, progress: Progress = None) -> SequenceSet:
    """Read one ``.skeleton`` file or a folder of them; x float32 (N, 3, T, 25, M<=2)."""
    root = existing(path)
    files = list_files(root, is_ntu_file)
    if not files:
        raise fail(root, "no .skeleton files found")
    samples = []
    for k, f in enumerate(files):
        r = rel(f, root)
        data = _parse(read_text(f), f)
        m = _NAME.search(f.name)
        label = f"A{int(m.group(5)):03d}" if m else None
        samples.append(Sample(data=data, id=stem_of(r), source_file=r, source_index=0, label=label))
        tick(progress, k + 1, len(files))
    return build(samples, layout=get_layout("ntu25"), where=root, channels=("x", "y", "z"), fps=FPS)


def _parse(text: str, where: Path) -> np.ndarray:
    """(3, T, 25, M) float64 for the most active bodies of one file."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise fail(where, "file is empty")
    n_frames = _int(lines[0], where, 1, "frame count")
    if n_frames < 1:
        raise fail(where, f"frame count is {n_frames}, expected at least 1")
    if n_frames > len(lines) - 1:
        raise fail(where, f"header says {n_frames} frames but the file has only {len(lines)} lines")
    tracks: dict[str, dict[int, np.ndarray]] = {}
    first_seen: dict[str, int] = {}
    pos = 1
    for f in range(n_frames):
        if pos >= len(lines):
            raise fail(where, f"file ends at frame {f}, header says {n_frames} frames")
        n_bodies = _int(lines[pos], where, pos + 1, f"body count of frame {f}")
        pos += 1
        if n_bodies < 0 or pos + n_bodies * (2 + NUM_JOINTS) > len(lines):
            raise fail(where, f"frame {f}: body count {n_bodies} does not fit the"
                              f" {len(lines) - pos} lines left")
        for b in range(n_bodies):
            info = lines[pos].split()
            if len(info) != INFO_VALUES:
                raise fail(where, f"line {pos + 1} (frame {f}, body {b}): body info has {len(info)}"
                                  f" values, expected {INFO_VALUES}")
            n_joints = _int(lines[pos + 1], where, pos + 2, f"joint count of frame {f} body {b}")
            if n_joints != NUM_JOINTS:
                raise fail(where, f"frame {f} body {b} has {n_joints} joints, layout ntu25 needs"
                                  f" {NUM_JOINTS}")
            block = lines[pos + 2: pos + 2 + NUM_JOINTS]
            tokens = " ".join(block).split()
            if len(tokens) != NUM_JOINTS * VALUES_PER_JOINT:
                bad = next((i for i, ln in enumerate(block) if len(ln.split()) != VALUES_PER_JOINT), 0)
                raise fail(where, f"line {pos + 3 + bad} (frame {f}, body {b}, joint {bad}): expected"
                                  f" {VALUES_PER_JOINT} values per joint")
            vals = parse_floats(tokens, f"{where}: frame {f} body {b}")
            xyz = vals.reshape(NUM_JOINTS, VALUES_PER_JOINT)[:, :3]
            if not np.isfinite(xyz).all():
                raise fail(where, f"frame {f} body {b} has non-finite joint coordinates (NaN or inf)")
            key = info[0]
            while key in tracks and f in tracks[key]:  # the same id twice in one frame
                key += "'"
            tracks.setdefault(key, {})[f] = xyz
            first_seen.setdefault(key, f)
            pos += 2 + NUM_JOINTS
    if pos != len(lines):
        raise fail(where, f"line {pos + 1}: unexpected data after the last frame ({n_frames} frames)")
    if not tracks:
        raise fail(where, "no body in any frame (NTU's samples with missing skeletons must be left"
                          " out of the import)")

    def activity(key: str) -> tuple:
        frames = tracks[key]
        pts = np.stack(list(frames.values()))
        act = float(pts.var(axis=0).sum()) if len(pts) > 1 else 0.0
        return (-act, -len(frames), first_seen[key])

    kept = sorted(tracks, key=activity)[:MAX_BODIES]
    out = np.zeros((3, n_frames, NUM_JOINTS, len(kept)), dtype=np.float64)
    for m, key in enumerate(kept):
        for f, xyz in tracks[key].items():
            out[:, f, :, m] = xyz.T
    return out


def _int(line: str, where: Path, lineno: int, what: str) -> int:
    tok = line.split()
    if len(tok) != 1:
        raise fail(where, f"line {lineno}: expected the {what} (one integer), got {line.strip()[:60]!r}")
    try:
        return int(tok[0])
    except ValueError:
        raise fail(where, f"line {lineno}: {what} {tok[0][:40]!r} is not an integer") from None

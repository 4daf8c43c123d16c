"""Skeleton layouts as data: joint names, bones, centre, left/right pairs, alignment joints.

The GCN adjacency, the preprocessing (centring, view alignment) and the 3D plot all read a
``Layout``; nothing else in SpeLER hard-codes joint indices. Bones are ``(child, parent)`` pairs of
0-based joint indices. ``series`` (V = 1) is the layout of sensor time series.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from speler.errors import DataFormatError


@dataclass(frozen=True)
class Layout:
    """A named joint set.

    name: registry name (``ntu25``, ``kinect_v1``, ``msr_action3d``, ``coco17``, ``openpose18``,
        ``openpose25``, ``natops8``, ``series``) or ``bvh:<root>`` for hierarchies read from BVH.
    joints: joint names, one per joint index.
    bones: (child, parent) index pairs; the graph's edges.
    center: joints whose mean is the body centre (subtracted in preprocessing).
    pairs: (left, right) index pairs, used for mirroring augmentation and colouring.
    spine: (lower, upper) joints; view alignment turns lower→upper parallel to the up axis.
    shoulders: (left, right) joints; view alignment turns right→left parallel to the x axis.
    """

    name: str
    joints: tuple[str, ...]
    bones: tuple[tuple[int, int], ...] = ()
    center: tuple[int, ...] = (0,)
    pairs: tuple[tuple[int, int], ...] = ()
    spine: tuple[int, int] | None = None
    shoulders: tuple[int, int] | None = None
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        v = len(self.joints)
        if v == 0:
            raise DataFormatError(f"layout {self.name!r}: no joints")
        idx: list[int] = [i for b in self.bones for i in b] + list(self.center)
        idx += [i for p in self.pairs for i in p]
        idx += list(self.spine or ()) + list(self.shoulders or ())
        bad = [i for i in idx if not 0 <= i < v]
        if bad:
            raise DataFormatError(
                f"layout {self.name!r}: joint index {bad[0]} out of range for {v} joints"
            )

    @property
    def num_joints(self) -> int:
        return len(self.joints)

    @property
    def is_series(self) -> bool:
        return self.name == "series"

    def adjacency(self, *, self_loops: bool = True, normalize: bool = True) -> np.ndarray:
        """Symmetric bone adjacency, float32 (V, V); with self loops, D^-1/2 A D^-1/2 normalised."""
        v = self.num_joints
        a = np.zeros((v, v), dtype=np.float32)
        for i, j in self.bones:
            a[i, j] = a[j, i] = 1.0
        if self_loops:
            a += np.eye(v, dtype=np.float32)
        if normalize:
            d = a.sum(1)
            inv = np.where(d > 0, 1.0 / np.sqrt(np.maximum(d, 1e-12)), 0.0).astype(np.float32)
            a = inv[:, None] * a * inv[None, :]
        return a

    def to_json(self) -> str:
        return json.dumps(
            {
                "name": self.name,
                "joints": list(self.joints),
                "bones": [list(b) for b in self.bones],
                "center": list(self.center),
                "pairs": [list(p) for p in self.pairs],
                "spine": list(self.spine) if self.spine else None,
                "shoulders": list(self.shoulders) if self.shoulders else None,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> "Layout":
        try:
            d = json.loads(text)
            return cls(
                name=str(d["name"]),
                joints=tuple(str(j) for j in d["joints"]),
                bones=tuple((int(a), int(b)) for a, b in d["bones"]),
                center=tuple(int(i) for i in d["center"]),
                pairs=tuple((int(a), int(b)) for a, b in d["pairs"]),
                spine=tuple(int(i) for i in d["spine"]) if d.get("spine") else None,
                shoulders=tuple(int(i) for i in d["shoulders"]) if d.get("shoulders") else None,
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise DataFormatError(f"layout description is not valid JSON layout: {exc}") from exc


def _idx(names: tuple[str, ...], pairs: list[tuple[str, str]]) -> tuple[tuple[int, int], ...]:
    pos = {n: i for i, n in enumerate(names)}
    return tuple((pos[a], pos[b]) for a, b in pairs)


# --- NTU RGB+D / Kinect v2: 25 joints, order of the .skeleton files -------------------------------
_NTU = (
    "SpineBase", "SpineMid", "Neck", "Head", "ShoulderLeft", "ElbowLeft", "WristLeft", "HandLeft",
    "ShoulderRight", "ElbowRight", "WristRight", "HandRight", "HipLeft", "KneeLeft", "AnkleLeft",
    "FootLeft", "HipRight", "KneeRight", "AnkleRight", "FootRight", "SpineShoulder", "HandTipLeft",
    "ThumbLeft", "HandTipRight", "ThumbRight",
)
NTU25 = Layout(
    name="ntu25",
    joints=_NTU,
    bones=_idx(_NTU, [
        ("SpineMid", "SpineBase"), ("SpineShoulder", "SpineMid"), ("Neck", "SpineShoulder"),
        ("Head", "Neck"), ("ShoulderLeft", "SpineShoulder"), ("ElbowLeft", "ShoulderLeft"),
        ("WristLeft", "ElbowLeft"), ("HandLeft", "WristLeft"), ("ShoulderRight", "SpineShoulder"),
        ("ElbowRight", "ShoulderRight"), ("WristRight", "ElbowRight"), ("HandRight", "WristRight"),
        ("HipLeft", "SpineBase"), ("KneeLeft", "HipLeft"), ("AnkleLeft", "KneeLeft"),
        ("FootLeft", "AnkleLeft"), ("HipRight", "SpineBase"), ("KneeRight", "HipRight"),
        ("AnkleRight", "KneeRight"), ("FootRight", "AnkleRight"), ("HandTipLeft", "HandLeft"),
        ("ThumbLeft", "HandLeft"), ("HandTipRight", "HandRight"), ("ThumbRight", "HandRight"),
    ]),
    center=(1,),
    pairs=_idx(_NTU, [
        ("ShoulderLeft", "ShoulderRight"), ("ElbowLeft", "ElbowRight"), ("WristLeft", "WristRight"),
        ("HandLeft", "HandRight"), ("HipLeft", "HipRight"), ("KneeLeft", "KneeRight"),
        ("AnkleLeft", "AnkleRight"), ("FootLeft", "FootRight"), ("HandTipLeft", "HandTipRight"),
        ("ThumbLeft", "ThumbRight"),
    ]),
    spine=(0, 20),
    shoulders=(4, 8),
)

# --- Kinect v1 (SDK order): 20 joints; UTKinect-Action3D, NW-UCLA -------------------------------
_K1 = (
    "HipCenter", "Spine", "ShoulderCenter", "Head", "ShoulderLeft", "ElbowLeft", "WristLeft",
    "HandLeft", "ShoulderRight", "ElbowRight", "WristRight", "HandRight", "HipLeft", "KneeLeft",
    "AnkleLeft", "FootLeft", "HipRight", "KneeRight", "AnkleRight", "FootRight",
)
_K1_BONES = [
    ("Spine", "HipCenter"), ("ShoulderCenter", "Spine"), ("Head", "ShoulderCenter"),
    ("ShoulderLeft", "ShoulderCenter"), ("ElbowLeft", "ShoulderLeft"), ("WristLeft", "ElbowLeft"),
    ("HandLeft", "WristLeft"), ("ShoulderRight", "ShoulderCenter"), ("ElbowRight", "ShoulderRight"),
    ("WristRight", "ElbowRight"), ("HandRight", "WristRight"), ("HipLeft", "HipCenter"),
    ("KneeLeft", "HipLeft"), ("AnkleLeft", "KneeLeft"), ("FootLeft", "AnkleLeft"),
    ("HipRight", "HipCenter"), ("KneeRight", "HipRight"), ("AnkleRight", "KneeRight"),
    ("FootRight", "AnkleRight"),
]
_K1_PAIRS = [
    ("ShoulderLeft", "ShoulderRight"), ("ElbowLeft", "ElbowRight"), ("WristLeft", "WristRight"),
    ("HandLeft", "HandRight"), ("HipLeft", "HipRight"), ("KneeLeft", "KneeRight"),
    ("AnkleLeft", "AnkleRight"), ("FootLeft", "FootRight"),
]


def _kinect_v1(name: str, joints: tuple[str, ...]) -> Layout:
    pos = {n: i for i, n in enumerate(joints)}
    return Layout(
        name=name,
        joints=joints,
        bones=_idx(joints, _K1_BONES),
        center=(pos["Spine"],),
        pairs=_idx(joints, _K1_PAIRS),
        spine=(pos["HipCenter"], pos["ShoulderCenter"]),
        shoulders=(pos["ShoulderLeft"], pos["ShoulderRight"]),
    )


KINECT_V1 = _kinect_v1("kinect_v1", _K1)
# MSR Action3D stores the same 20 joints in its own order. Checked on the 567 real files: with this
# order the right hand moves most in 99% of one-arm takes and the right foot in 98% of kicks, and
# the right shoulder lies at +x as in UTKinect (tests/test_formats.py).
MSR_ACTION3D = _kinect_v1("msr_action3d", (
    "ShoulderLeft", "ShoulderRight", "ShoulderCenter", "Spine", "HipLeft", "HipRight", "HipCenter",
    "ElbowLeft", "ElbowRight", "WristLeft", "WristRight", "HandLeft", "HandRight", "KneeLeft",
    "KneeRight", "AnkleLeft", "AnkleRight", "FootLeft", "FootRight", "Head",
))

# --- COCO-17 keypoints --------------------------------------------------------------------------
_COCO = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee",
    "right_knee", "left_ankle", "right_ankle",
)
COCO17 = Layout(
    name="coco17",
    joints=_COCO,
    bones=((1, 0), (2, 0), (3, 1), (4, 2), (5, 0), (6, 0), (7, 5), (9, 7), (8, 6), (10, 8),
           (11, 5), (12, 6), (13, 11), (15, 13), (14, 12), (16, 14), (6, 5), (12, 11)),
    center=(11, 12),
    pairs=((1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16)),
    spine=None,
    shoulders=(5, 6),
)

# --- OpenPose COCO-18 (Kinetics-skeleton) ----------------------------------------------------------
_OP18 = (
    "Nose", "Neck", "RShoulder", "RElbow", "RWrist", "LShoulder", "LElbow", "LWrist", "RHip", "RKnee",
    "RAnkle", "LHip", "LKnee", "LAnkle", "REye", "LEye", "REar", "LEar",
)
OPENPOSE18 = Layout(
    name="openpose18",
    joints=_OP18,
    bones=((0, 1), (2, 1), (3, 2), (4, 3), (5, 1), (6, 5), (7, 6), (8, 1), (9, 8), (10, 9), (11, 1),
           (12, 11), (13, 12), (14, 0), (16, 14), (15, 0), (17, 15)),
    center=(1,),
    pairs=((5, 2), (6, 3), (7, 4), (11, 8), (12, 9), (13, 10), (15, 14), (17, 16)),
    spine=None,
    shoulders=(5, 2),
)

# --- OpenPose BODY-25 ------------------------------------------------------------------------------
_OP25 = (
    "Nose", "Neck", "RShoulder", "RElbow", "RWrist", "LShoulder", "LElbow", "LWrist", "MidHip",
    "RHip", "RKnee", "RAnkle", "LHip", "LKnee", "LAnkle", "REye", "LEye", "REar", "LEar", "LBigToe",
    "LSmallToe", "LHeel", "RBigToe", "RSmallToe", "RHeel",
)
OPENPOSE25 = Layout(
    name="openpose25",
    joints=_OP25,
    bones=((0, 1), (2, 1), (3, 2), (4, 3), (5, 1), (6, 5), (7, 6), (8, 1), (9, 8), (10, 9),
           (11, 10), (12, 8), (13, 12), (14, 13), (15, 0), (17, 15), (16, 0), (18, 16), (19, 14),
           (20, 19), (21, 14), (22, 11), (23, 22), (24, 11)),
    center=(8,),
    pairs=((5, 2), (6, 3), (7, 4), (12, 9), (13, 10), (14, 11), (16, 15), (18, 17), (19, 22),
           (20, 23), (21, 24)),
    spine=(8, 1),
    shoulders=(5, 2),
)

# --- NATOPS (UEA): 8 markers, channels in UEA order -------------------------------------------------
_NATOPS = (
    "HandTipLeft", "HandTipRight", "ElbowLeft", "ElbowRight", "WristLeft", "WristRight",
    "ThumbLeft", "ThumbRight",
)
NATOPS8 = Layout(
    name="natops8",
    joints=_NATOPS,
    # Arms are not linked to each other by a marker; the elbow-elbow edge keeps the graph connected.
    bones=_idx(_NATOPS, [
        ("WristLeft", "ElbowLeft"), ("HandTipLeft", "WristLeft"), ("ThumbLeft", "WristLeft"),
        ("WristRight", "ElbowRight"), ("HandTipRight", "WristRight"), ("ThumbRight", "WristRight"),
        ("ElbowRight", "ElbowLeft"),
    ]),
    center=(2, 3),
    pairs=((0, 1), (2, 3), (4, 5), (6, 7)),
    spine=None,
    shoulders=None,
)

SERIES = Layout(name="series", joints=("signal",), bones=(), center=(0,))

LAYOUTS: dict[str, Layout] = {
    l.name: l for l in (NTU25, KINECT_V1, MSR_ACTION3D, COCO17, OPENPOSE18, OPENPOSE25, NATOPS8,
                        SERIES)
}


def get_layout(name: str) -> Layout:
    """The registered layout called ``name``; DataFormatError naming the known ones otherwise."""
    try:
        return LAYOUTS[name]
    except KeyError:
        raise DataFormatError(
            f"unknown skeleton layout {name!r}; known: {', '.join(sorted(LAYOUTS))}"
        ) from None


def layout_from_hierarchy(name: str, joints: list[str], parents: list[int]) -> Layout:
    """Layout of a BVH-like hierarchy: ``parents[i]`` is the parent of joint i (-1 for the root).

    Left/right pairs are found by name (``Left``/``Right``, ``L``/``R`` prefixes); the spine runs
    from the root to the joint whose name contains ``neck`` (else ``spine``/``chest``) if any, and
    shoulders are the pair of joints named like shoulders or upper arms.
    """
    if len(joints) != len(parents):
        raise DataFormatError(f"layout {name!r}: {len(joints)} joints but {len(parents)} parents")
    bones = tuple((i, p) for i, p in enumerate(parents) if p >= 0)
    low = [j.lower() for j in joints]

    def mirror(n: str) -> str | None:
        for a, b in (("left", "right"), ("right", "left")):
            if a in n:
                return n.replace(a, b)
        for a, b in (("l", "r"), ("r", "l")):
            if n.startswith(a) and len(n) > 1:
                return b + n[1:]
        return None

    pairs: list[tuple[int, int]] = []
    for i, n in enumerate(low):
        m = mirror(n)
        if m and m in low and ("left" in n or n.startswith("l")):
            j = low.index(m)
            if i != j and (i, j) not in pairs:
                pairs.append((i, j))

    def find(*keys: str) -> int | None:
        for k in keys:
            for i, n in enumerate(low):
                if k in n:
                    return i
        return None

    root = parents.index(-1) if -1 in parents else 0
    top = find("neck", "chest", "spine")
    spine = (root, top) if top is not None and top != root else None
    shoulders = None
    for i, j in pairs:
        if any(k in low[i] for k in ("shoulder", "upperarm", "arm")) and "fore" not in low[i]:
            shoulders = (i, j)
            break
    return Layout(
        name=name, joints=tuple(joints), bones=bones, center=(root,), pairs=tuple(pairs),
        spine=spine, shoulders=shoulders,
    )

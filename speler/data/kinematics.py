"""A kinematic generator of skeleton action sequences: SpeLER's own, shippable skeleton sample.

Each action is a set of joint-angle trajectories on a hierarchical body with the ``ntu25`` joints
(Kinect v2 order, bones as in :mod:`speler.data.layouts`). Joint positions come from forward
kinematics over per-subject bone lengths, so every bone keeps its length within a sample. On top
of the motion each sample varies by

- subject: height 1.55-1.90 m and segment proportions (torso, arms, legs, shoulders, hips, head),
  and habits: handedness (about one in five is left-handed), slouch, how the elbows are carried,
  vigour (amplitude) and tempo (speed),
- speed: duration (1.5-4 s by default) and, for periodic actions, cycle frequency; the pace may
  also speed up and slow down within a clip (a monotone time warp),
- amplitude and phase, plus slow idle sway of every joint,
- viewpoint: body turned ±45° about the vertical axis, 2.5-3.5 m from the camera, sideways offset
  ±0.4 m, camera height 0.8-1.2 m and a camera tilt of ±4°; the person may also turn by up to ±25°
  and shuffle by up to ±15 cm during the clip,
- sensor noise: Kinect-like jitter of about 0.7-2.7 cm, growing with depth (larger at hands and
  feet, slightly correlated in time), and the odd flipped thumb / hand tip,
- tracking glitches (35% of the samples by default): an occluded arm whose inferred joints
  collapse beside the torso, legs that swap sides, a joint that jumps 8-30 cm for a few frames,
- nuisance posture: the arm that takes no part in a one-arm action may rest on the hip or lie
  across the belly, and a free hand may fidget (touch the face, scratch the head, look at a watch),
- dropped frames: a few frames where the skeleton is missing (all zero) or frozen (repeated).

``ambiguity`` (0-1, default 1) scales how often executions stray from the canonical one, the
way real recordings do: one-sided actions (wave, punch, kick, point) done with the left side, clips
that idle before the action, start late or stop before it is over, and lookalike styles that share
motion with another action: a wave with the arm forward or only a swing or two, a pointing hand
that beats, a punch without guard or as a slow push or a one-two, one or two claps or claps over
the head, arms raised only to shoulder height or one after the other, a shallow squat leaning
forward, a bow whose knees give, sitting down on something high or leaning far forward, a small
hop or a jump that reaches up, a low kick, a low march or a step or two. At 0 every sample is the
action's canonical execution (what the tests check each action by).

Coordinates are Kinect camera space in metres: y up, z the depth away from the camera, x to the
camera's left, i.e. a right-handed frame in which a person facing the camera has the right hand at
larger x. Everything is deterministic from ``seed``: subjects come from the seed, each sample from
``(seed, action, episode)``, so asking for more samples of one class leaves the others unchanged.

``python -m speler.data.kinematics --out sample_data/synthetic_actions/data.npz`` rebuilds the
bundled sample (see :func:`build_sample`).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from speler.data.layouts import NTU25
from speler.data.schema import SequenceSet
from speler.errors import DataFormatError

logger = logging.getLogger(__name__)

#: Action names, in the class order of the bundled sample (head class first).
ACTIONS: tuple[str, ...] = (
    "walk_in_place", "wave", "clap", "raise_arms", "squat", "bow", "punch", "kick", "jump",
    "sit_down", "point",
)

_JOINTS = NTU25.joints
_J = {name: i for i, name in enumerate(_JOINTS)}
_V = len(_JOINTS)
_PARENT = np.full(_V, -1, dtype=np.int64)
for _child, _par in NTU25.bones:
    _PARENT[_child] = _par
_ROOT = _J["SpineBase"]


def _topological_order() -> list[int]:
    order, frontier = [], [_ROOT]
    while frontier:
        j = frontier.pop(0)
        order.append(j)
        frontier += [int(c) for c in np.flatnonzero(_PARENT == j)]
    return order


_ORDER = _topological_order()

# Rest offsets of each joint from its parent, in the parent's frame, for the reference subject
# (1.75 m). Body frame: x = the person's left, y = up, z = the person's forward.
_REST: dict[str, tuple[float, float, float]] = {
    "SpineMid": (0.0, 0.28, -0.01), "SpineShoulder": (0.0, 0.23, 0.0), "Neck": (0.0, 0.07, 0.005),
    "Head": (0.0, 0.14, 0.02),
    "ShoulderLeft": (0.165, -0.035, -0.01), "ShoulderRight": (-0.165, -0.035, -0.01),
    "ElbowLeft": (0.0, -0.275, 0.0), "ElbowRight": (0.0, -0.275, 0.0),
    "WristLeft": (0.0, -0.25, 0.0), "WristRight": (0.0, -0.25, 0.0),
    "HandLeft": (0.0, -0.07, 0.0), "HandRight": (0.0, -0.07, 0.0),
    "HandTipLeft": (0.0, -0.075, 0.005), "HandTipRight": (0.0, -0.075, 0.005),
    "ThumbLeft": (-0.01, -0.03, 0.045), "ThumbRight": (0.01, -0.03, 0.045),
    "HipLeft": (0.08, -0.065, 0.0), "HipRight": (-0.08, -0.065, 0.0),
    "KneeLeft": (0.0, -0.42, 0.0), "KneeRight": (0.0, -0.42, 0.0),
    "AnkleLeft": (0.0, -0.40, 0.0), "AnkleRight": (0.0, -0.40, 0.0),
    "FootLeft": (0.0, -0.045, 0.10), "FootRight": (0.0, -0.045, 0.10),
}
_ANKLE_HEIGHT = 0.075  # ankle joint above the floor when standing, reference subject
_FOOT_HEIGHT = 0.025  # Kinect's foot joint above the floor
# Which proportion factor scales each bone.
_SEGMENT = {
    "SpineMid": "torso", "SpineShoulder": "torso", "Neck": "torso", "Head": "head",
    "ShoulderLeft": "shoulders", "ShoulderRight": "shoulders", "ElbowLeft": "upper_arm",
    "ElbowRight": "upper_arm", "WristLeft": "forearm", "WristRight": "forearm", "HandLeft": "hand",
    "HandRight": "hand", "HandTipLeft": "hand", "HandTipRight": "hand", "ThumbLeft": "hand",
    "ThumbRight": "hand", "HipLeft": "hips", "HipRight": "hips", "KneeLeft": "thigh",
    "KneeRight": "thigh", "AnkleLeft": "shank", "AnkleRight": "shank", "FootLeft": "foot",
    "FootRight": "foot",
}
_NOISE_GAIN = np.ones(_V)
for _name, _gain in (("HandTipLeft", 2.0), ("HandTipRight", 2.0), ("ThumbLeft", 2.0),
                     ("ThumbRight", 2.0), ("HandLeft", 1.5), ("HandRight", 1.5),
                     ("FootLeft", 1.6), ("FootRight", 1.6), ("WristLeft", 1.3),
                     ("WristRight", 1.3), ("AnkleLeft", 1.3), ("AnkleRight", 1.3)):
    _NOISE_GAIN[_J[_name]] = _gain


# ---------------------------------------------------------------------------------------------
# Subjects
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Subject:
    """One synthetic person.

    name: ``s01``, ``s02``, ...
    height: approximate standing height in metres.
    offsets: float64 (V, 3), each joint's offset from its parent in the parent's rest frame
        (zero row for the root); ``np.linalg.norm(offsets, axis=1)`` are the bone lengths.
    ankle_height, foot_height: heights of the ankle and foot joints above the floor when standing.
    left_handed, slouch, arm_carry, vigour, tempo: the person's habits (see :func:`make_subjects`);
        they show in a sample in proportion to the generator's ``ambiguity``.
    """

    name: str
    height: float
    offsets: np.ndarray
    ankle_height: float
    foot_height: float
    left_handed: bool = False
    slouch: float = 0.0  # degrees of habitual forward bend of the spine
    arm_carry: float = 0.0  # degrees of habitual elbow flexion on top of the rest pose
    vigour: float = 1.0  # this person's amplitude factor (scales every sample's amplitude)
    tempo: float = 1.0  # this person's speed factor (scales cycle frequencies)

    @property
    def bone_lengths(self) -> np.ndarray:
        """float64 (len(NTU25.bones),), in the order of ``NTU25.bones``."""
        return np.array([np.linalg.norm(self.offsets[c]) for c, _ in NTU25.bones])


def make_subjects(n: int, *, seed: int) -> list[Subject]:
    """``n`` subjects with seeded heights, proportions and habits (deterministic from ``seed``).

    Habits: about one person in five is left-handed (does one-sided actions with the left arm or
    leg most of the time); each person has a habitual slouch (-4..12°), elbow carry (0..20°),
    vigour (amplitude ×0.75..1.25) and tempo (speed ×0.8..1.25). They come from their own random
    stream, so the bodies do not depend on them.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7919]))
    habits = np.random.default_rng(np.random.SeedSequence([seed, 7927]))
    subjects = []
    for k in range(n):
        height = float(rng.uniform(1.55, 1.90))
        scale = height / 1.75
        factors = {seg: float(rng.normal(1.0, sd)) for seg, sd in (
            ("torso", 0.04), ("head", 0.05), ("shoulders", 0.07), ("upper_arm", 0.04),
            ("forearm", 0.04), ("hand", 0.06), ("hips", 0.08), ("thigh", 0.035),
            ("shank", 0.035), ("foot", 0.06))}
        offsets = np.zeros((_V, 3))
        for name, off in _REST.items():
            offsets[_J[name]] = np.asarray(off) * scale * np.clip(factors[_SEGMENT[name]], 0.8, 1.2)
        subjects.append(Subject(
            name=f"s{k + 1:02d}", height=height, offsets=offsets,
            ankle_height=_ANKLE_HEIGHT * scale, foot_height=_FOOT_HEIGHT * scale,
            left_handed=bool(habits.random() < 0.2), slouch=float(habits.uniform(-4.0, 12.0)),
            arm_carry=float(habits.uniform(0.0, 20.0)), vigour=float(habits.uniform(0.75, 1.25)),
            tempo=float(habits.uniform(0.8, 1.25)),
        ))
    return subjects


# ---------------------------------------------------------------------------------------------
# Rotations and forward kinematics (vectorised over frames)
# ---------------------------------------------------------------------------------------------
def _rx(deg: np.ndarray) -> np.ndarray:
    a = np.deg2rad(deg)
    c, s = np.cos(a), np.sin(a)
    o, z = np.ones_like(a), np.zeros_like(a)
    return np.stack([np.stack([o, z, z], -1), np.stack([z, c, -s], -1), np.stack([z, s, c], -1)], -2)


def _ry(deg: np.ndarray) -> np.ndarray:
    a = np.deg2rad(deg)
    c, s = np.cos(a), np.sin(a)
    o, z = np.ones_like(a), np.zeros_like(a)
    return np.stack([np.stack([c, z, s], -1), np.stack([z, o, z], -1), np.stack([-s, z, c], -1)], -2)


def _rz(deg: np.ndarray) -> np.ndarray:
    a = np.deg2rad(deg)
    c, s = np.cos(a), np.sin(a)
    o, z = np.ones_like(a), np.zeros_like(a)
    return np.stack([np.stack([c, -s, z], -1), np.stack([s, c, z], -1), np.stack([z, z, o], -1)], -2)


def _mm(*mats: np.ndarray) -> np.ndarray:
    out = mats[0]
    for m in mats[1:]:
        out = out @ m
    return out


# Pose parameters (degrees unless noted), arrays of shape (T,). Sides: L = +1, R = -1.
#   pelvis_pitch (+ = lean forward), pelvis_yaw, pelvis_roll; spine_bend, chest_bend (+ forward),
#   spine_twist (+ = turn left), spine_side; neck_bend, neck_yaw;
#   {L,R}_sh_flex (+ = arm forward/up), {L,R}_sh_abd (+ = arm out to the side), {L,R}_sh_plane
#   (turns the plane of sh_abd from the side (0) to the front (90)), {L,R}_sh_ext (+ = external
#   rotation), {L,R}_elbow (flexion), {L,R}_wrist;
#   {L,R}_hip_flex (thigh forward, relative to the upright body, not the pelvis), {L,R}_hip_abd,
#   {L,R}_knee (flexion), {L,R}_ankle (+ = toes down, on top of keeping the foot level);
#   flight: metres added to the height after the feet are put on the floor.
_POSE_KEYS = (
    "pelvis_pitch", "pelvis_yaw", "pelvis_roll", "spine_bend", "chest_bend", "spine_twist",
    "spine_side", "neck_bend", "neck_yaw", "flight",
    *(f"{s}_{k}" for s in "LR" for k in ("sh_flex", "sh_abd", "sh_plane", "sh_ext", "elbow", "wrist",
                                        "hip_flex", "hip_abd", "knee", "ankle")),
)
_REST_POSE = {"L_sh_abd": 8.0, "R_sh_abd": 8.0, "L_elbow": 12.0, "R_elbow": 12.0,
              "L_hip_abd": 3.0, "R_hip_abd": 3.0, "L_sh_flex": 3.0, "R_sh_flex": 3.0}


class _Pose(dict):
    """Pose parameters over T frames: missing keys read as the rest value."""

    def __init__(self, t: np.ndarray):
        super().__init__()
        self.t = t
        for key in _POSE_KEYS:
            self[key] = np.full(len(t), _REST_POSE.get(key, 0.0))


def _forward_kinematics(pose: _Pose, subject: Subject) -> np.ndarray:
    """Joint positions float64 (T, V, 3) in the body frame, feet on the floor (y = 0)."""
    t = len(pose.t)
    local = np.broadcast_to(np.eye(3), (_V, t, 3, 3)).copy()
    root = _mm(_ry(pose["pelvis_yaw"]), _rx(pose["pelvis_pitch"]), _rz(pose["pelvis_roll"]))
    local[_ROOT] = root
    local[_J["SpineMid"]] = _mm(_rx(pose["spine_bend"]), _ry(0.6 * pose["spine_twist"]),
                                _rz(pose["spine_side"]))
    local[_J["SpineShoulder"]] = _mm(_rx(pose["chest_bend"]), _ry(0.4 * pose["spine_twist"]))
    local[_J["Neck"]] = _mm(_rx(pose["neck_bend"]), _ry(pose["neck_yaw"]))
    root_inv = np.swapaxes(root, -1, -2)
    for side, s in (("Left", 1.0), ("Right", -1.0)):
        p = "L" if s > 0 else "R"
        plane = pose[f"{p}_sh_plane"]  # abduction in a plane turned this far towards the front
        local[_J[f"Shoulder{side}"]] = _mm(
            _ry(-s * plane), _rx(-pose[f"{p}_sh_flex"]), _rz(s * pose[f"{p}_sh_abd"]),
            _ry(s * (pose[f"{p}_sh_ext"] + plane)))
        local[_J[f"Elbow{side}"]] = _rx(-pose[f"{p}_elbow"])
        local[_J[f"Wrist{side}"]] = _rx(-pose[f"{p}_wrist"])
        # Legs are authored relative to the upright body; undo the pelvis rotation.
        local[_J[f"Hip{side}"]] = _mm(
            root_inv, _rx(-pose[f"{p}_hip_flex"]), _rz(s * pose[f"{p}_hip_abd"]))
        local[_J[f"Knee{side}"]] = _rx(pose[f"{p}_knee"])
        # Level foot: cancel the thigh and shank pitch, then add the requested ankle angle.
        local[_J[f"Ankle{side}"]] = _rx(pose[f"{p}_hip_flex"] - pose[f"{p}_knee"] + pose[f"{p}_ankle"])
    glob = np.zeros((_V, t, 3, 3))
    pos = np.zeros((_V, t, 3))
    for j in _ORDER:
        par = _PARENT[j]
        if par < 0:
            glob[j] = local[j]
            continue
        pos[j] = pos[par] + glob[par] @ subject.offsets[j]
        glob[j] = glob[par] @ local[j]
    pos = np.transpose(pos, (1, 0, 2))  # (T, V, 3)
    # Feet on the floor: the lowest foot touches y = 0 (plus flight), and the supporting foot
    # does not slide (soft-weighted by how low each foot is).
    feet = []
    for side in ("Left", "Right"):
        ankle, foot = pos[:, _J[f"Ankle{side}"]], pos[:, _J[f"Foot{side}"]]
        floor = np.minimum(ankle[:, 1] - subject.ankle_height, foot[:, 1] - subject.foot_height)
        feet.append((floor, ankle))
    floor = np.minimum(feet[0][0], feet[1][0])
    w = np.stack([np.exp(-(f - floor) / 0.02) for f, _ in feet])
    w /= w.sum(0)
    rest_x = np.array([subject.offsets[_J["HipLeft"], 0], subject.offsets[_J["HipRight"], 0]])
    drift_x = sum(w[k] * (feet[k][1][:, 0] - rest_x[k]) for k in range(2))
    drift_z = sum(w[k] * feet[k][1][:, 2] for k in range(2))
    pos[:, :, 0] -= drift_x[:, None]
    pos[:, :, 2] -= drift_z[:, None]
    pos[:, :, 1] += (pose["flight"] - floor)[:, None]
    return pos


# ---------------------------------------------------------------------------------------------
# Actions: each sets pose trajectories from the sample's timing, amplitude and phase
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Style:
    """Per-sample action parameters drawn from the sample's generator."""

    duration: float  # seconds
    amp: float  # amplitude factor (around 1)
    phase: float  # radians, periodic actions
    freq: float  # Hz, periodic actions (cycles per second)
    onset: float  # seconds of rest before a one-shot action starts
    speed: float  # > 1 for long clips, < 1 for short ones: scales the quick moves (jabs)
    t: np.ndarray  # float64 (T,), seconds
    rng: np.random.Generator
    ambiguity: float = 0.0  # the generator's ``ambiguity``: 0 = always the canonical execution

    def odd(self, p: float) -> bool:
        """True with probability ``p · ambiguity``: this sample does the action a less typical
        way (one that looks more like another action). Draws from the sample's generator."""
        return bool(self.rng.random() < p * self.ambiguity)


def _smooth(t: np.ndarray, t0: float, t1: float) -> np.ndarray:
    """0 before t0, 1 after t1, smoothstep in between."""
    if t1 <= t0:
        return (t >= t0).astype(float)
    u = np.clip((t - t0) / (t1 - t0), 0.0, 1.0)
    return u * u * (3 - 2 * u)


def _bump(t: np.ndarray, t0: float, t1: float, t2: float, t3: float) -> np.ndarray:
    """Rise over [t0, t1], hold, fall over [t2, t3]."""
    return _smooth(t, t0, t1) * (1.0 - _smooth(t, t2, t3))


def _blend(pose: _Pose, key: str, target, weight: np.ndarray) -> None:
    pose[key] = pose[key] + weight * (np.asarray(target, dtype=float) - pose[key])


def _window(st: _Style, rise: float, fall: float, *, ends: bool) -> np.ndarray:
    """Envelope of a sustained action: rises after the onset, falls at the end when ``ends``."""
    t_end = st.duration
    e = _smooth(st.t, st.onset, st.onset + rise)
    if ends:
        e = e * (1.0 - _smooth(st.t, t_end - fall - 0.05, t_end - 0.05))
    return e


def _idle_arm(pose: _Pose, side: str, st: _Style) -> None:
    """What the arm that takes no part does: hangs (60%), rests on the hip, or lies across the
    belly, from a moment after the onset on (a nuisance real recordings are full of)."""
    u = st.rng.random()
    if u < 0.6:
        return
    w = _smooth(st.t, st.onset, st.onset + 0.5)
    if u < 0.8:  # hand on the hip
        target = {"sh_abd": 40, "sh_flex": -5, "elbow": 105, "sh_ext": -75}
    else:  # forearm across the belly
        target = {"sh_abd": 12, "sh_flex": 12, "elbow": 95, "sh_ext": -65}
    for key, value in target.items():
        _blend(pose, f"{side}_{key}", value, w)


def _walk_in_place(pose: _Pose, st: _Style) -> None:
    t, a, rng = pose.t, st.amp, st.rng
    ramp = _smooth(t, st.onset, st.onset + 0.3)
    w = 2 * np.pi * st.freq * t + st.phase
    lift_amp = rng.uniform(0.35, 0.6) if st.odd(0.35) else 1.0  # a low march, feet barely up
    if st.odd(0.25):  # only a step or two in the clip (started late or stopped early)
        t0 = st.onset + rng.uniform(0.0, 0.3) * st.duration
        t1 = t0 + rng.uniform(1.0, 2.0) / st.freq
        ramp = ramp * _bump(t, t0, t0 + 0.2, t1, t1 + 0.4)
    lift_l = np.maximum(0.0, np.sin(w)) ** 1.3 * ramp * lift_amp
    lift_r = np.maximum(0.0, np.sin(w + np.pi)) ** 1.3 * ramp * lift_amp
    for p, lift in (("L", lift_l), ("R", lift_r)):
        pose[f"{p}_hip_flex"] += 60 * a * lift
        pose[f"{p}_knee"] += 80 * a * lift
        pose[f"{p}_ankle"] += 15 * lift
    arms = rng.uniform(0.1, 0.4) if st.odd(0.3) else (rng.uniform(1.3, 1.8) if st.odd(0.15) else 1.0)
    swing = np.sin(w) * ramp * arms
    pose["L_sh_flex"] += -22 * a * swing
    pose["R_sh_flex"] += 22 * a * swing
    pose["L_elbow"] += 25 + 10 * np.maximum(0, -swing)
    pose["R_elbow"] += 25 + 10 * np.maximum(0, swing)
    pose["pelvis_roll"] += 3 * (lift_r - lift_l)
    pose["spine_twist"] += 5 * a * swing


def _wave(pose: _Pose, st: _Style) -> None:
    t, a, rng = pose.t, st.amp, st.rng
    env = _window(st, rise=rng.uniform(0.35, 0.6), fall=rng.uniform(0.35, 0.6),
                  ends=bool(rng.random() < 0.6))
    high = rng.uniform(0.0, 1.0)  # low wave (hand at head height) .. high wave (above the head)
    plane = 0.0
    if st.odd(0.35):  # waving to someone in front: the upper arm forward rather than out
        plane, high = rng.uniform(45, 80), 0.5 * high
        _blend(pose, "R_sh_plane", plane, env)
    _blend(pose, "R_sh_abd", 80 + 40 * high, env)
    _blend(pose, "R_sh_flex", rng.uniform(5, 25), env)
    _blend(pose, "R_sh_ext", 90 - 1.25 * plane - 20 * high, env)  # keeps the forearm upright
    osc = np.sin(2 * np.pi * st.freq * t + st.phase) * _smooth(t, st.onset + 0.2, st.onset + 0.5)
    if st.odd(0.3):  # a short "hi": one or two swings, then the hand is just held up
        t1 = st.onset + 0.3 + rng.uniform(1.0, 2.0) / st.freq
        osc = osc * (1.0 - _smooth(t, t1, t1 + 0.25))
    swing = 28 * a * (rng.uniform(0.35, 0.6) if st.odd(0.3) else 1.0)  # a small hand wave
    _blend(pose, "R_elbow", (95 - 35 * high) + swing * osc, env)
    pose["R_wrist"] += 12 * osc * env
    pose["spine_side"] += 3 * env
    pose["neck_yaw"] += -5 * env
    _idle_arm(pose, "L", st)


def _clap(pose: _Pose, st: _Style) -> None:
    t, a, rng = pose.t, st.amp, st.rng
    env = _window(st, rise=rng.uniform(0.3, 0.5), fall=rng.uniform(0.3, 0.5),
                  ends=bool(rng.random() < 0.5))
    freq = st.freq * (rng.uniform(0.5, 0.75) if st.odd(0.25) else 1.0)  # slow applause
    # open (0) .. closed (1): hands meet briefly, rest apart
    closed = (0.5 + 0.5 * np.cos(2 * np.pi * freq * t + st.phase)) ** 2
    closed = closed * _smooth(t, st.onset + 0.15, st.onset + 0.4)
    if st.odd(0.3):  # one or two claps only, the hands stay up in front afterwards
        t1 = st.onset + 0.4 + rng.uniform(1.0, 2.0) / freq
        closed = closed * (1.0 - _smooth(t, t1, t1 + 0.2))
    high = st.odd(0.15)  # clapping over the head
    height = rng.uniform(100, 140) if high else rng.uniform(-10, 15)
    for p in "LR":
        if high:
            _blend(pose, f"{p}_sh_flex", height, env)
            _blend(pose, f"{p}_sh_abd", 15 - 20 * closed, env)
            _blend(pose, f"{p}_elbow", 70 - 10 * closed, env)
            _blend(pose, f"{p}_sh_ext", -(10 + 15 * closed), env)
        else:
            _blend(pose, f"{p}_sh_flex", 40 + height, env)
            _blend(pose, f"{p}_sh_abd", 12 - 18 * a * closed, env)
            _blend(pose, f"{p}_elbow", 85 - 10 * closed, env)
            _blend(pose, f"{p}_sh_ext", -(15 + 45 * a * closed), env)
        _blend(pose, f"{p}_wrist", 10, env)


def _raise_arms(pose: _Pose, st: _Style) -> None:
    t, a, rng = pose.t, st.amp, st.rng
    d = st.duration - st.onset
    up = rng.uniform(0.25, 0.35) * d
    hold = rng.uniform(0.15, 0.35) * d
    lag = rng.uniform(0.15, 0.45) if st.odd(0.25) else 0.0  # one arm after the other
    plane = rng.uniform(0.0, 80.0)  # 0: up through the sides .. 80: nearly through the front
    top = min(175.0, 155 + 20 * a)
    if st.odd(0.3):  # only half way: arms held out in front at shoulder height (or a bit above)
        plane, top = rng.uniform(75.0, 90.0), rng.uniform(85.0, 120.0)
    for k, p in enumerate("LR"):
        t0 = st.onset + k * lag
        env = _bump(t, t0, t0 + up, t0 + up + hold, min(st.duration + k * lag, t0 + 2 * up + hold))
        _blend(pose, f"{p}_sh_abd", top, env)
        _blend(pose, f"{p}_sh_flex", 0, env)
        _blend(pose, f"{p}_sh_plane", plane, env)
        _blend(pose, f"{p}_elbow", 8, env)
        pose["neck_bend"] += -5 * env * top / 175
        pose["chest_bend"] += -2 * env


def _squat(pose: _Pose, st: _Style) -> None:
    t, a, rng = pose.t, st.amp, st.rng
    d = st.duration - st.onset
    reps = 2 if d > 2.8 and rng.random() < 0.6 else 1
    depth = np.zeros_like(t)
    span = d / reps
    for r in range(reps):
        t0 = st.onset + r * span
        down = rng.uniform(0.3, 0.4) * span
        hold = rng.uniform(0.05, 0.2) * span
        depth = np.maximum(depth, _bump(t, t0, t0 + down, t0 + down + hold,
                                        min(st.duration, t0 + 2 * down + hold)))
    k = float(np.clip(0.8 + 0.57 * (a - 0.8), 0.8, 1.0))  # half (0.8) to deep (1.0) squats
    lean = 42.0
    if st.odd(0.3):  # a shallow squat with the trunk leaning well forward
        k, lean = rng.uniform(0.4, 0.6), rng.uniform(60.0, 80.0)
    arms = 80.0 if not st.odd(0.35) else rng.uniform(10.0, 30.0)  # arms forward, or kept low
    for p in "LR":
        pose[f"{p}_hip_flex"] += 95 * k * depth
        pose[f"{p}_knee"] += 120 * k * depth
        pose[f"{p}_hip_abd"] += 8 * depth
        _blend(pose, f"{p}_sh_flex", arms, depth * rng.uniform(0.6, 1.0))
        _blend(pose, f"{p}_elbow", 15, depth)
    pose["pelvis_pitch"] += lean * k * depth
    pose["spine_bend"] += 5 * depth
    pose["neck_bend"] += -25 * depth


def _bow(pose: _Pose, st: _Style) -> None:
    t, a, rng = pose.t, st.amp, st.rng
    d = st.duration - st.onset
    down = rng.uniform(0.25, 0.35) * d
    hold = rng.uniform(0.1, 0.3) * d
    env = _bump(t, st.onset, st.onset + down, st.onset + down + hold,
                min(st.duration, st.onset + 2 * down + hold))
    angle = np.clip(55 * a, 35, 75)
    if st.odd(0.3):  # a short nod of a bow
        angle = rng.uniform(20.0, 35.0)
    pose["pelvis_pitch"] += angle * env
    pose["spine_bend"] += 12 * env
    pose["chest_bend"] += 6 * env
    pose["neck_bend"] += 10 * env
    if st.odd(0.35):  # the knees give as well (a bow that sinks, like a shallow squat)
        knees = rng.uniform(25.0, 50.0)
        for p in "LR":
            pose[f"{p}_hip_flex"] += 0.75 * knees * env
            pose[f"{p}_knee"] += knees * env
    for p in "LR":  # arms keep hanging: counter the trunk pitch
        pose[f"{p}_sh_flex"] += (angle + 18) * 0.85 * env
        pose[f"{p}_sh_abd"] += -4 * env


def _punch(pose: _Pose, st: _Style) -> None:
    t, a, rng = pose.t, st.amp, st.rng
    guard = _window(st, rise=0.3, fall=0.3, ends=bool(rng.random() < 0.5))
    if st.odd(0.3):  # no boxing guard: the arms hang between the jabs
        guard = guard * rng.uniform(0.0, 0.3)
    for p in "LR":
        _blend(pose, f"{p}_sh_flex", 35, guard)
        _blend(pose, f"{p}_sh_abd", 5, guard)
        _blend(pose, f"{p}_elbow", 120, guard)
        _blend(pose, f"{p}_sh_ext", -10, guard)
    d = st.duration - st.onset - 0.4
    n = int(np.clip(round(d / rng.uniform(0.6, 0.9)), 1, 4))
    slow = rng.uniform(1.8, 2.8) if st.odd(0.3) else 1.0  # a slow push rather than a jab
    if slow > 1.0:
        n = max(1, n // 2)
    both = st.odd(0.3)  # one-two: the jabs alternate between the arms
    ext = {"L": np.zeros_like(t), "R": np.zeros_like(t)}
    for k in range(n):
        t0 = st.onset + 0.35 + (k + rng.uniform(0.1, 0.4)) * d / n
        out = rng.uniform(0.12, 0.2) * st.speed * slow
        side = "L" if both and k % 2 else "R"
        ext[side] = np.maximum(ext[side], _bump(t, t0, t0 + out, t0 + out + 0.05 * slow,
                                                t0 + 2.3 * out + 0.05))
    for p, o in (("R", "L"), ("L", "R")):
        e = ext[p]
        _blend(pose, f"{p}_sh_flex", 85 * min(1.0, a) + 5, e)
        _blend(pose, f"{p}_sh_abd", -8, e)
        _blend(pose, f"{p}_elbow", 5, e)
        _blend(pose, f"{p}_sh_ext", 0, e)
        pose["spine_twist"] += (18 if p == "R" else -18) * e * a
        pose[f"{o}_elbow"] += 10 * e


def _kick(pose: _Pose, st: _Style) -> None:
    t, a, rng = pose.t, st.amp, st.rng
    d = st.duration - st.onset
    n = 2 if d > 2.8 and rng.random() < 0.5 else 1
    chamber = np.zeros_like(t)
    extend = np.zeros_like(t)
    span = d / n
    for k in range(n):
        t0 = st.onset + k * span + 0.05 * span
        up = rng.uniform(0.2, 0.3) * span
        out = rng.uniform(0.1, 0.18) * span
        chamber = np.maximum(chamber, _bump(t, t0, t0 + up, t0 + up + 2 * out, t0 + 2 * up + 2 * out))
        extend = np.maximum(extend, _bump(t, t0 + up, t0 + up + out, t0 + up + out + 0.05,
                                          t0 + up + 2 * out))
    low = rng.uniform(0.45, 0.65) if st.odd(0.35) else 1.0  # a low kick, barely above the knee
    pose["R_hip_flex"] += low * (65 * chamber + 25 * a * extend)
    pose["R_knee"] += low * (95 * chamber - 85 * extend)
    pose["R_ankle"] += 25 * chamber
    pose["pelvis_pitch"] += low * (-12 * extend - 4 * chamber)
    pose["spine_bend"] += 4 * chamber
    arms = 0.0 if st.odd(0.3) else 1.0  # some keep the arms down
    for p in "LR":
        _blend(pose, f"{p}_sh_abd", 25, chamber * arms)
        _blend(pose, f"{p}_elbow", 60, chamber * arms)
        _blend(pose, f"{p}_sh_flex", 25, chamber * arms)
    pose["L_knee"] += 10 * chamber


def _jump(pose: _Pose, st: _Style) -> None:
    t, a, rng = pose.t, st.amp, st.rng
    d = st.duration - st.onset
    n = 2 if d > 3.0 and rng.random() < 0.5 else 1
    span = d / n
    crouch = np.zeros_like(t)
    flight = np.zeros_like(t)
    arms = np.zeros_like(t)
    height = rng.uniform(0.15, 0.32) * a
    dip, swing = 1.0, 1.0
    if st.odd(0.3):  # a little hop: shallow dip, low, barely any arm swing
        height, dip, swing = rng.uniform(0.06, 0.12), rng.uniform(0.4, 0.6), rng.uniform(0.0, 0.3)
    reach = st.odd(0.25)  # jumping to reach up: the arms stay up until after the landing
    airtime = float(np.clip(2 * np.sqrt(2 * height / 9.81), 0.3, 0.55))
    for k in range(n):
        t0 = st.onset + k * span + 0.05 * span
        prep = rng.uniform(0.3, 0.45)
        take = t0 + prep + 0.15  # leaves the floor
        land = take + airtime
        crouch = np.maximum(crouch, _bump(t, t0, t0 + prep, t0 + prep + 0.02, take))
        crouch = np.maximum(crouch, 0.8 * _bump(t, land - 0.02, land + 0.15, land + 0.2,
                                                min(st.duration, land + 0.6)))
        u = np.clip((t - take) / airtime, 0.0, 1.0)
        flight = np.maximum(flight, np.where((t > take) & (t < land), 4 * height * u * (1 - u), 0.0))
        stay = rng.uniform(0.6, 1.2) if reach else 0.0
        arms = np.maximum(arms, _bump(t, t0 + prep, take, land + stay, land + stay + 0.4))
        pose["L_ankle"] += 30 * _bump(t, take - 0.1, take, land - 0.1, land)
        pose["R_ankle"] += 30 * _bump(t, take - 0.1, take, land - 0.1, land)
    crouch = crouch * dip
    for p in "LR":
        pose[f"{p}_hip_flex"] += 60 * crouch
        pose[f"{p}_knee"] += 85 * crouch
        pose[f"{p}_sh_flex"] += swing * (-45 * crouch + 140 * arms * (1 - crouch))
        pose[f"{p}_elbow"] += 10 * arms
    pose["pelvis_pitch"] += 35 * crouch
    pose["neck_bend"] += -15 * crouch
    pose["flight"] += flight


def _sit_down(pose: _Pose, st: _Style) -> None:
    t, rng = pose.t, st.rng
    d = st.duration - st.onset
    go = rng.uniform(0.45, 0.7) * d  # duration of the descent
    seat = _smooth(t, st.onset, st.onset + go)
    lean = _bump(t, st.onset, st.onset + 0.45 * go, st.onset + 0.6 * go, st.onset + go + 0.4)
    low = rng.uniform(0.55, 0.8) if st.odd(0.3) else 1.0  # perches on something high
    forward = rng.uniform(55.0, 70.0) if st.odd(0.3) else 40.0  # leans well forward going down
    for p in "LR":
        pose[f"{p}_hip_flex"] += 88 * seat * low
        pose[f"{p}_knee"] += 88 * seat * low
        pose[f"{p}_hip_abd"] += 6 * seat
        _blend(pose, f"{p}_sh_flex", 45, seat * rng.uniform(0.6, 1.0))
        _blend(pose, f"{p}_elbow", 55, seat)
    pose["pelvis_pitch"] += forward * lean - 8 * seat
    pose["spine_bend"] += 8 * lean
    pose["neck_bend"] += -15 * lean


def _point(pose: _Pose, st: _Style) -> None:
    t, a, rng = pose.t, st.amp, st.rng
    d = st.duration - st.onset
    up = rng.uniform(0.2, 0.3) * d
    hold = rng.uniform(0.3, 0.5) * d
    env = _bump(t, st.onset, st.onset + up, st.onset + up + hold,
                min(st.duration + 1.0, st.onset + 2 * up + hold))
    flex = rng.uniform(120, 150) if st.odd(0.25) else rng.uniform(70, 110)  # up at something high
    elbow = rng.uniform(15, 40) if st.odd(0.3) else 5.0
    _blend(pose, "R_sh_flex", flex, env)
    abd = rng.uniform(35, 60) if st.odd(0.2) else rng.uniform(10, 35)  # off to the side
    _blend(pose, "R_sh_abd", abd, env)
    _blend(pose, "R_elbow", elbow, env)
    _blend(pose, "R_sh_ext", -20, env)
    _blend(pose, "R_wrist", -10, env)
    if st.odd(0.35):  # "over there!": the pointing hand beats a few times while held out
        beat = np.sin(2 * np.pi * rng.uniform(1.2, 2.4) * t + rng.uniform(0, 2 * np.pi))
        pose["R_elbow"] += rng.uniform(12, 30) * (0.5 + 0.5 * beat) * env
        pose["R_sh_flex"] += rng.uniform(4, 10) * beat * env
    pose["neck_yaw"] += -15 * env
    pose["spine_twist"] += -8 * env * a
    _idle_arm(pose, "L", st)


@dataclass(frozen=True)
class _ActionSpec:
    fn: Callable[[_Pose, _Style], None]
    duration: tuple[float, float]  # seconds
    freq: tuple[float, float] = (1.0, 1.0)  # Hz, periodic actions
    periodic: bool = False


_SPECS: dict[str, _ActionSpec] = {
    "walk_in_place": _ActionSpec(_walk_in_place, (2.0, 4.0), (0.75, 1.1), periodic=True),
    "wave": _ActionSpec(_wave, (2.0, 4.0), (1.4, 2.4), periodic=True),
    "clap": _ActionSpec(_clap, (1.8, 3.5), (1.6, 2.6), periodic=True),
    "raise_arms": _ActionSpec(_raise_arms, (2.0, 4.0)),
    "squat": _ActionSpec(_squat, (2.0, 4.0)),
    "bow": _ActionSpec(_bow, (2.0, 4.0)),
    "punch": _ActionSpec(_punch, (1.5, 3.5)),
    "kick": _ActionSpec(_kick, (1.5, 3.5)),
    "jump": _ActionSpec(_jump, (1.6, 3.5)),
    "sit_down": _ActionSpec(_sit_down, (2.0, 4.0)),
    "point": _ActionSpec(_point, (1.5, 3.5)),
}
assert tuple(_SPECS) == ACTIONS


def _idle(pose: _Pose, rng: np.random.Generator) -> None:
    """Slow random sway of every joint (sum of two sinusoids per angle), a few degrees."""
    t = pose.t
    for key in _POSE_KEYS:
        if key == "flight":
            continue
        big = key.endswith(("sh_abd", "elbow", "sh_plane")) or key.startswith("neck")
        amp = 3.0 if big else 1.5
        for _ in range(2):
            f = rng.uniform(0.1, 0.7)
            pose[key] = pose[key] + amp * rng.uniform(0.3, 1.0) * np.sin(
                2 * np.pi * f * t + rng.uniform(0, 2 * np.pi))


# Actions done with one arm or one leg: a left-handed person (or anyone, now and then) does them
# with the other side.
_ONE_SIDED = ("wave", "punch", "kick", "point")
# Actions during which a free hand may fidget (touch the face, scratch the head, check a watch).
_FIDGETY = ("walk_in_place", "wave", "squat", "bow", "kick", "sit_down", "point")
# Which arm is free in a one-arm action (before mirroring); other actions pick one at random.
_FREE_ARM = {"wave": "L", "point": "L"}
_MIRRORED_KEYS = ("pelvis_yaw", "pelvis_roll", "spine_twist", "spine_side", "neck_yaw")


def _mirror(pose: _Pose) -> None:
    """The same movement done with the other side of the body: swap left and right, and turn
    the rotations about the vertical and the depth axes the other way (in place)."""
    for key in _POSE_KEYS:
        if key.startswith("L_"):
            other = "R_" + key[2:]
            pose[key], pose[other] = pose[other], pose[key]
    for key in _MIRRORED_KEYS:
        pose[key] = -pose[key]


def _fidget(pose: _Pose, st: _Style, side: str) -> None:
    """One arm does something unrelated for 0.6-1.4 s: touches the face, scratches the head or
    looks at a watch (in place). Real recordings are full of these."""
    rng, t = st.rng, pose.t
    kind = int(rng.integers(3))
    length = rng.uniform(0.6, 1.4)
    t0 = rng.uniform(t[0], max(t[0], t[-1] - 0.5 * length))
    env = _bump(t, t0, t0 + 0.3, t0 + length, t0 + length + 0.3)
    if kind == 0:  # hand to the face or chin
        target = {"sh_flex": rng.uniform(35, 55), "sh_abd": 15, "elbow": 135, "sh_ext": -35}
    elif kind == 1:  # scratches the head, small quick strokes of the elbow
        target = {"sh_flex": 30, "sh_abd": rng.uniform(95, 120), "elbow": 125, "sh_ext": 60}
    else:  # looks at the watch: forearm raised across the chest
        target = {"sh_flex": rng.uniform(35, 50), "sh_abd": 10, "elbow": 100, "sh_ext": -70}
    for key, value in target.items():
        _blend(pose, f"{side}_{key}", value, env)
    if kind == 1:
        pose[f"{side}_elbow"] += 8 * np.sin(2 * np.pi * rng.uniform(2.5, 4.0) * t) * env


def _warp_time(t: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Monotone time warp of t (same first and last time): the movement speeds up and slows
    down within the clip (people do not move at a constant pace)."""
    if len(t) < 2 or strength <= 0:
        return t
    span = t[-1] - t[0]
    k = int(rng.integers(1, 3))
    amp = strength * rng.uniform(0.5, 1.0)  # < 1 keeps the warp monotone
    return t + amp * span / (2 * np.pi * k) * np.sin(2 * np.pi * k * (t - t[0]) / span)


# ---------------------------------------------------------------------------------------------
# Sensor model: viewpoint, jitter, tracking glitches, dropped frames
# ---------------------------------------------------------------------------------------------
def _to_camera(pos: np.ndarray, rng: np.random.Generator, *, max_yaw: float,
               turn: float = 0.0, step: float = 0.0) -> np.ndarray:
    """Body frame (x left, y up, z forward; floor y = 0) → Kinect camera space (T, V, 3).

    turn: the person turns up to ± this many degrees about the vertical during the clip;
    step: and shifts sideways and back/forth by up to ± this many metres (shuffling feet)."""
    t = len(pos)
    yaw = rng.uniform(-max_yaw, max_yaw)
    distance = rng.uniform(2.5, 3.5)
    offset = np.array([rng.uniform(-0.4, 0.4), -rng.uniform(0.8, 1.2), distance])
    tilt = _rx(np.array(rng.uniform(-4.0, 4.0)))
    # rotate about the body's starting position so the person stands at the sampled distance
    anchor = pos[0, _ROOT] * np.array([1.0, 0.0, 1.0])
    body = pos - anchor
    if turn > 0 or step > 0:
        u = np.linspace(0.0, 1.0, t)
        a, b = sorted(rng.uniform(0.0, 1.0, size=2))
        move = _smooth(u, a, b)  # one turn / shuffle, somewhere in the clip
        yaw = yaw + rng.uniform(-turn, turn) * move
        shift = np.array([rng.uniform(-step, step), 0.0, rng.uniform(-step, step)])
        body = body + move[:, None, None] * shift
    facing = _ry(180.0 + np.broadcast_to(yaw, (t,)))  # facing the camera: looking along -z
    world = np.einsum("tij,tvj->tvi", facing, body) + offset
    return world @ tilt.T


def _jitter(shape: tuple[int, int, int], rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Kinect-like jitter (T, V, 3): larger at extremities, AR(1)-correlated in time."""
    white = rng.normal(size=shape)
    out = np.empty(shape)
    out[0] = white[0]
    rho = 0.5
    for i in range(1, shape[0]):
        out[i] = rho * out[i - 1] + np.sqrt(1 - rho**2) * white[i]
    return sigma * out * _NOISE_GAIN[None, :, None]


def _glitch(pos: np.ndarray, rng: np.random.Generator) -> None:
    """A thumb or hand tip flips to the wrong side of the hand for a few frames (in place)."""
    t = len(pos)
    joint, hand = [("ThumbLeft", "HandLeft"), ("ThumbRight", "HandRight"),
                   ("HandTipLeft", "HandLeft"), ("HandTipRight", "HandRight")][rng.integers(4)]
    start = int(rng.integers(0, max(1, t - 4)))
    stop = min(t, start + int(rng.integers(2, 6)))
    j, h = _J[joint], _J[hand]
    pos[start:stop, j] = 2 * pos[start:stop, h] - pos[start:stop, j]


_ARM = {side: [_J[f"{j}{side}"] for j in ("Elbow", "Wrist", "Hand", "HandTip", "Thumb")]
        for side in ("Left", "Right")}
_ARM_REACH = np.array([0.45, 0.85, 0.95, 1.05, 0.95])  # share of the arm's length below the shoulder
_LEG = {side: [_J[f"{j}{side}"] for j in ("Knee", "Ankle", "Foot")] for side in ("Left", "Right")}
_JUMPY = np.array([_J[n] for n in (
    "HandLeft", "HandRight", "HandTipLeft", "HandTipRight", "ThumbLeft", "ThumbRight", "WristLeft",
    "WristRight", "ElbowLeft", "ElbowRight", "FootLeft", "FootRight", "AnkleLeft", "AnkleRight",
    "KneeLeft", "KneeRight", "Head")])


def _tracking_glitches(pos: np.ndarray, rng: np.random.Generator, fps: float) -> None:
    """1-3 Kinect tracking failures, in place on camera-space joints (T, V, 3):

    - an occluded arm (hidden behind the body or turned away): its joints are "inferred" and
      collapse towards a hanging arm beside the torso, shaky, for 0.3-1 s;
    - the legs swap: the knees, ankles and feet of the two sides trade places for 0.2-0.8 s
      (the classic Kinect confusion when the legs cross or the body turns);
    - a joint jumps 8-30 cm away for 1-4 frames (a hand or foot latches onto the background)."""
    t = len(pos)
    for _ in range(int(rng.integers(1, 4))):
        kind = rng.choice(3, p=[0.4, 0.25, 0.35])
        if kind == 0:
            length = max(1, int(round(rng.uniform(0.3, 1.0) * fps)))
            start = int(rng.integers(0, max(1, t - length)))
            sl = slice(start, min(t, start + length))
            side = ("Left", "Right")[rng.integers(2)]
            shoulder = pos[sl, _J[f"Shoulder{side}"]]
            spine = pos[sl, _J["SpineMid"]]
            arm = float(np.linalg.norm(pos[0, _J[f"Wrist{side}"]] - pos[0, _J[f"Elbow{side}"]])
                        + np.linalg.norm(pos[0, _J[f"Elbow{side}"]] - shoulder[0]))
            hang = shoulder[:, None, :] + 0.25 * (spine - shoulder)[:, None, :] \
                - arm * _ARM_REACH[None, :, None] * np.array([0.0, 1.0, 0.0])
            w = rng.uniform(0.6, 1.0)
            shake = rng.normal(scale=0.03, size=hang.shape)
            pos[sl, _ARM[side]] += w * (hang + shake - pos[sl, _ARM[side]])
        elif kind == 1:
            length = max(1, int(round(rng.uniform(0.2, 0.8) * fps)))
            start = int(rng.integers(0, max(1, t - length)))
            sl = slice(start, min(t, start + length))
            left, right = pos[sl][:, _LEG["Left"]].copy(), pos[sl][:, _LEG["Right"]].copy()
            pos[sl, _LEG["Left"]], pos[sl, _LEG["Right"]] = right, left
        else:
            length = int(rng.integers(1, 5))
            start = int(rng.integers(0, max(1, t - length)))
            joints = rng.choice(_JUMPY, size=int(rng.integers(1, 3)), replace=False)
            jump = rng.normal(size=(len(joints), 3))
            jump *= rng.uniform(0.08, 0.3, size=(len(joints), 1)) / np.linalg.norm(jump, axis=1,
                                                                               keepdims=True)
            pos[start:start + length, joints] += jump[None]


def _drop_frames(pos: np.ndarray, rng: np.random.Generator) -> None:
    """1-3 events of 1-3 frames each: skeleton missing (zeros) or frozen (repeated); in place."""
    t = len(pos)
    for _ in range(int(rng.integers(1, 4))):
        length = int(rng.integers(1, 4))
        start = int(rng.integers(1, max(2, t - length)))
        stop = min(t, start + length)
        if rng.random() < 0.5:
            pos[start:stop] = 0.0
        else:
            pos[start:stop] = pos[start - 1]


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------
def _sample(action: str, subject: Subject, rng: np.random.Generator, *, fps: float,
            max_frames: int, durations: tuple[float, float], max_yaw: float, noise: float,
            drop_rate: float, ambiguity: float, glitch_rate: float) -> np.ndarray:
    """One sample's joints, float32 (3, T_i, V)."""
    spec = _SPECS[action]
    lo = max(durations[0], spec.duration[0])
    hi = min(durations[1], spec.duration[1])
    if hi < lo:
        lo, hi = durations
    duration = float(rng.uniform(lo, hi))
    frames = int(np.clip(round(duration * fps), 2, max_frames))
    duration = frames / fps
    periodic = spec.periodic
    amb = float(ambiguity)

    def odd(p: float) -> bool:
        return bool(rng.random() < p * amb)

    t = np.arange(frames) / fps
    span = duration  # the action's own time span; longer than the clip when the clip cuts it
    onset = 0.0 if periodic else float(rng.uniform(0.0, 0.15) * duration)
    if odd(0.3):  # idles a while before starting
        onset = float(rng.uniform(0.1, 0.3) * duration) if periodic else float(
            rng.uniform(0.15, 0.35) * duration)
    if not periodic:
        if odd(0.25):  # the recording stops before the action is over
            span = duration * float(rng.uniform(1.15, 1.45))
        if odd(0.15):  # the recording starts late: the action is already under way
            t = t + float(rng.uniform(0.1, 0.25)) * span
    if odd(0.6):  # uneven pace within the clip
        t = _warp_time(t, rng, 0.5)
    vigour = 1.0 + amb * (subject.vigour - 1.0)
    tempo = 1.0 + amb * (subject.tempo - 1.0)
    style = _Style(
        duration=span,
        amp=float(rng.uniform(0.8, 1.15)) * vigour,
        phase=float(rng.uniform(0, 2 * np.pi)),
        freq=float(rng.uniform(*spec.freq)) * tempo,
        onset=onset,
        speed=float(np.clip(duration / 2.5, 0.7, 1.3)) / tempo,
        t=t,
        rng=rng,
        ambiguity=amb,
    )
    pose = _Pose(style.t)
    _idle(pose, rng)
    # the person's habits: posture and how they carry their arms
    pose["spine_bend"] += amb * subject.slouch
    pose["chest_bend"] += 0.5 * amb * subject.slouch
    for p in "LR":
        pose[f"{p}_elbow"] += amb * subject.arm_carry
    spec.fn(pose, style)
    if action in _FIDGETY and odd(0.3):
        _fidget(pose, style, _FREE_ARM.get(action, "LR"[int(rng.integers(2))]))
    if action in _ONE_SIDED and odd(0.8 if subject.left_handed else 0.12):
        _mirror(pose)
    pos = _forward_kinematics(pose, subject)
    pos = _to_camera(pos, rng, max_yaw=max_yaw, turn=25.0 * amb, step=0.15 * amb)
    if noise > 0:
        # Kinect depth noise grows with the square of the distance
        depth = float(np.mean(pos[:, _ROOT, 2]))
        sigma = noise * rng.uniform(0.010, 0.020) * (depth / 3.0) ** 2
        pos = pos + _jitter(pos.shape, rng, sigma)
        if rng.random() < 0.15:
            _glitch(pos, rng)
        if rng.random() < glitch_rate:
            _tracking_glitches(pos, rng, fps)
    if rng.random() < drop_rate:
        _drop_frames(pos, rng)
    return np.transpose(pos, (2, 0, 1)).astype(np.float32)


def generate(
    *,
    n_per_class: Mapping[str, int] | Sequence[int],
    seed: int,
    fps: float = 30.0,
    t_max: int | None = None,
    durations: tuple[float, float] = (1.5, 4.0),
    n_subjects: int = 10,
    max_yaw: float = 45.0,
    noise: float = 1.0,
    drop_rate: float = 0.3,
    ambiguity: float = 1.0,
    glitch_rate: float = 0.35,
    progress: Callable[[int, int], None] | None = None,
) -> SequenceSet:
    """Synthetic ntu25 skeleton sequences of the actions in :data:`ACTIONS`.

    n_per_class: samples per action, a mapping ``{action: count}`` (actions not named get none;
        the class list keeps only the named actions, in ACTIONS order) or a sequence of counts in
        ACTIONS order (length <= len(ACTIONS); its classes are the first actions).
    seed: everything (subjects, motions, views, noise) is a function of it.
    fps: frames per second. t_max: frames of the padded tensor; durations are capped at
        ``t_max / fps`` (default: ``durations[1] * fps``).
    durations: range of clip lengths in seconds (each action keeps its own natural range inside).
    n_subjects: number of people; sample i of an action is played by subject ``i mod n_subjects``
        shuffled per action.
    max_yaw: body turned by up to ± this many degrees from facing the camera.
    noise: scale of the sensor jitter (0 = exact forward kinematics, no glitches).
    drop_rate: share of samples with dropped or frozen frames (0 = none).
    ambiguity: how often executions stray from the canonical one, 0..1 (see the module
        docstring): left-side executions, cut or idle clips, lookalike styles, fidgets, uneven
        pace, turning, the subjects' habits. 0 = every sample is the action's canonical execution.
    glitch_rate: share of samples with Kinect tracking failures (occluded arm, swapped legs,
        jumping joints); only with ``noise > 0``.

    Returns a SequenceSet with x float32 (N, 3, T_max, 25, 1) zero-padded beyond ``lengths``,
    ids ``synth-<action>-sNN-eNNN``, ``y`` = ``y_true`` = the true action.
    """
    if isinstance(n_per_class, Mapping):
        unknown = [a for a in n_per_class if a not in _SPECS]
        if unknown:
            raise DataFormatError(
                f"kinematics: unknown action {unknown[0]!r} in n_per_class; known: {', '.join(ACTIONS)}")
        actions = [a for a in ACTIONS if a in n_per_class]
        counts = [int(n_per_class[a]) for a in actions]
    else:
        counts = [int(c) for c in n_per_class]
        if len(counts) > len(ACTIONS):
            raise DataFormatError(
                f"kinematics: n_per_class has {len(counts)} entries, there are {len(ACTIONS)} actions")
        actions = list(ACTIONS[: len(counts)])
    if not actions or any(c < 0 for c in counts) or sum(counts) == 0:
        raise DataFormatError(f"kinematics: n_per_class must give at least one sample, got {counts}")
    if not (np.isfinite(fps) and fps > 0):
        raise DataFormatError(f"kinematics: fps must be > 0, got {fps}")
    if not 0 < durations[0] <= durations[1]:
        raise DataFormatError(f"kinematics: durations must be 0 < lo <= hi, got {durations}")
    if n_subjects < 1:
        raise DataFormatError(f"kinematics: n_subjects must be >= 1, got {n_subjects}")
    if not 0.0 <= ambiguity <= 1.0:
        raise DataFormatError(f"kinematics: ambiguity must be in [0, 1], got {ambiguity}")
    if not 0.0 <= glitch_rate <= 1.0:
        raise DataFormatError(f"kinematics: glitch_rate must be in [0, 1], got {glitch_rate}")
    max_frames = int(t_max) if t_max is not None else int(round(durations[1] * fps))
    if max_frames < 2:
        raise DataFormatError(f"kinematics: t_max must be >= 2 frames, got {max_frames}")
    subjects = make_subjects(n_subjects, seed=seed)
    total = sum(counts)
    x = np.zeros((total, 3, max_frames, _V, 1), dtype=np.float32)
    ids, labels, lengths, sources, index = [], [], [], [], []
    done = 0
    for c, (action, count) in enumerate(zip(actions, counts)):
        a_idx = ACTIONS.index(action)
        order = np.random.default_rng(np.random.SeedSequence([seed, a_idx, 104729])).permutation(
            n_subjects)
        for e in range(count):
            subject = subjects[int(order[e % n_subjects])]
            rng = np.random.default_rng(np.random.SeedSequence([seed, a_idx, e]))
            seq = _sample(action, subject, rng, fps=fps, max_frames=max_frames, durations=durations,
                          max_yaw=max_yaw, noise=noise, drop_rate=drop_rate,
                          ambiguity=ambiguity, glitch_rate=glitch_rate)
            x[done, :, : seq.shape[1], :, 0] = seq
            ids.append(f"synth-{action}-{subject.name}-e{e + 1:03d}")
            labels.append(c)
            lengths.append(seq.shape[1])
            sources.append(f"kinematics:{action}")
            index.append(e)
            done += 1
            if progress is not None:
                progress(done, total)
    y = np.array(labels, dtype=np.int64)
    return SequenceSet(
        x=x, ids=np.array(ids), classes=tuple(actions), y=y, layout=NTU25, fps=float(fps),
        source_file=np.array(sources), source_index=np.array(index, dtype=np.int64),
        lengths=np.array(lengths, dtype=np.int64), y_true=y.copy(), channels=("x", "y", "z"),
        where="kinematics",
    )


# ---------------------------------------------------------------------------------------------
# The bundled sample
# ---------------------------------------------------------------------------------------------
SAMPLE_SEED = 2025
SAMPLE_FPS = 15.0
SAMPLE_HEAD = 200  # samples of the most frequent class
SAMPLE_IMBALANCE = 20.0
SAMPLE_LABELED_RATIO = 0.06
SAMPLE_MIN_LABELED = 2


def long_tail_counts(num_classes: int, *, head: int, imbalance: float) -> np.ndarray:
    """``N_c = floor(head · π^(-(c-1)/(C-1)))`` for c = 1..C, int64 (C,) (at least 1 each)."""
    if num_classes < 1 or head < 1 or not imbalance >= 1:
        raise DataFormatError(
            f"kinematics: need num_classes >= 1, head >= 1, imbalance >= 1; "
            f"got {num_classes}, {head}, {imbalance}")
    if num_classes == 1:
        return np.array([head], dtype=np.int64)
    frac = imbalance ** (-np.arange(num_classes) / (num_classes - 1))
    return np.maximum(1, np.floor(head * frac + 1e-9)).astype(np.int64)


def choose_labeled(y_true: np.ndarray, *, labeled_ratio: float, min_labeled: int, seed: int) -> np.ndarray:
    """The user's few labels: ``max(min_labeled, round(labeled_ratio · N_c))`` random samples of
    each class keep their label, the rest get -1. y_true: int (N,) all >= 0; returns int64 (N,)."""
    y_true = np.asarray(y_true)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 31337]))
    y = np.full(len(y_true), -1, dtype=np.int64)
    for c in range(int(y_true.max()) + 1 if len(y_true) else 0):
        members = np.flatnonzero(y_true == c)
        k = min(len(members), max(min_labeled, int(round(labeled_ratio * len(members)))))
        y[rng.choice(members, size=k, replace=False)] = c
    return y


def build_sample(
    *,
    seed: int = SAMPLE_SEED,
    fps: float = SAMPLE_FPS,
    head: int = SAMPLE_HEAD,
    imbalance: float = SAMPLE_IMBALANCE,
    labeled_ratio: float = SAMPLE_LABELED_RATIO,
    min_labeled: int = SAMPLE_MIN_LABELED,
    progress: Callable[[int, int], None] | None = None,
) -> SequenceSet:
    """The bundled ``synthetic_actions`` set: long-tailed over ACTIONS (head class first), with
    ``y_true`` = every label and ``y`` = a few labels per class (:func:`choose_labeled`). The
    samples come in a random order under ``seed`` with ids ``synth-sNN-NNNN`` (subject, position),
    so neither an id nor a sample's place gives its action away, as in data a person labels."""
    counts = long_tail_counts(len(ACTIONS), head=head, imbalance=imbalance)
    ds = generate(n_per_class=dict(zip(ACTIONS, counts.tolist())), seed=seed, fps=fps,
                  progress=progress)
    y = choose_labeled(ds.y_true, labeled_ratio=labeled_ratio, min_labeled=min_labeled, seed=seed)
    order = np.random.default_rng(np.random.SeedSequence([seed, 7919])).permutation(ds.n)
    ds = ds.replace(y=y, where="synthetic_actions").subset(order)
    subjects = [str(i).split("-")[-2] for i in ds.ids]  # generate's synth-<action>-sNN-eNNN
    ids = np.array([f"synth-{s}-{k + 1:04d}" for k, s in enumerate(subjects)])
    return ds.replace(ids=ids, source_file=np.full(ds.n, "kinematics"),
                      source_index=np.arange(ds.n, dtype=np.int64))


def main(argv: Sequence[str] | None = None) -> int:
    """Rebuild the bundled sample: ``python -m speler.data.kinematics --out PATH``."""
    parser = argparse.ArgumentParser(prog="python -m speler.data.kinematics",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("sample_data/synthetic_actions/data.npz"))
    parser.add_argument("--seed", type=int, default=SAMPLE_SEED)
    parser.add_argument("--fps", type=float, default=SAMPLE_FPS)
    parser.add_argument("--head", type=int, default=SAMPLE_HEAD)
    parser.add_argument("--imbalance", type=float, default=SAMPLE_IMBALANCE)
    parser.add_argument("--labeled-ratio", type=float, default=SAMPLE_LABELED_RATIO)
    parser.add_argument("--min-labeled", type=int, default=SAMPLE_MIN_LABELED)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ds = build_sample(seed=args.seed, fps=args.fps, head=args.head, imbalance=args.imbalance,
                      labeled_ratio=args.labeled_ratio, min_labeled=args.min_labeled)
    ds.save(args.out)
    total = ds.class_counts(ds.y_true)
    labeled = ds.class_counts()
    logger.info("wrote %s: %d sequences, x %s, %.1f MB", args.out, ds.n, ds.shape,
                args.out.stat().st_size / 1e6)
    for name, n_c, l_c in zip(ds.classes, total, labeled):
        logger.info("  %-14s %4d samples, %2d labeled", name, n_c, l_c)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

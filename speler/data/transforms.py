"""Preprocessing from raw reader output to the tensor every model sees.

Skeletons (PYSKL / CTR-GCN conventions): empty frames are filled by repeating the last valid one,
each sample is resampled to T frames over its valid length, at most M persons are kept (the most
active first), coordinates are centred on the layout's centre joint (first frame of person 0),
3D data is optionally rotated so the spine points up (+y) and the shoulders run along x, and each
sample's coordinates are divided by their root mean square (``scale``).
Series: resampled to T, then each channel standardised over the whole dataset
(``normalize_series``).
"""

from __future__ import annotations

import numpy as np

from speler.config import PreprocessConfig
from speler.data.schema import SequenceSet
from speler.errors import DataFormatError
from speler.system import check_fits

#: Most frames per sample ``preprocess`` resamples to: models see 32-300, and N x C x T x V x M
#: float32 grows with T (10,000 frames of 1,000 two-person NTU samples is 6 GB).
MAX_FRAMES = 10_000
SKELETON_FRAMES = 48  # ``frames`` 0: every skeleton clip brought to this many frames
SERIES_FRAMES = (48, 256)  # ``frames`` 0: a series keeps its median length within these bounds
SERIES_NORMS = ("dataset", "clip", "none")  # ``normalize_series``


def check_preprocess_config(config: PreprocessConfig) -> None:
    """DataFormatError unless ``config.frames`` is 0 (by the data) or ``2..MAX_FRAMES``, and
    ``config.persons >= 1``."""
    if isinstance(config.frames, bool) or not (
            config.frames == 0 or 2 <= config.frames <= MAX_FRAMES):
        raise DataFormatError(f"preprocess: frames must be 0 (by the data) or between 2 and"
                              f" {MAX_FRAMES}, got {config.frames}")
    if config.persons < 1:
        raise DataFormatError(f"preprocess: persons must be >= 1, got {config.persons}")
    if config.normalize_series not in SERIES_NORMS:
        raise DataFormatError(f"preprocess: normalize_series must be one of"
                              f" {', '.join(SERIES_NORMS)}, got {config.normalize_series!r}")


def frames_for(ds: SequenceSet, config: PreprocessConfig) -> int:
    """The frame count ``preprocess`` resamples ``ds`` to: ``config.frames``, or with 0 by the data.

    Skeleton clips of one action last longer or shorter with who performs it, and are all brought
    to ``SKELETON_FRAMES``. A sensor series' sampling rate carries its frequencies: resampled to
    fewer frames, whatever moves faster than half the new rate is lost (Epilepsy's 206-sample
    accelerometer windows at 48 frames keep a quarter of their band). So a series keeps its
    median length, within ``SERIES_FRAMES``. benchmarks/round_quality.py (π = 10 and 50, γ = 5 and
    10 %, 5 seeds), the native length against 48 frames: the floor's macro-F1 on Epilepsy 0.643 →
    0.709 (16 runs better, 4 worse), BasicMotions (100 samples) 0.781 → 0.804 (11 / 7); the
    annotation simulation (π = 10, γ = 5 %) with SpeLER's suggestions 0.653 → 0.756 and
    0.886 → 0.907, with random ones 0.617 → 0.716 and 0.748 → 0.800. Skeletons at their median
    length (39 and 29 frames) instead of 48, the floor in a scratch run: MSRAction3D 0.509 →
    0.513, UTKinect 0.711 → 0.700 (16 / 16 in all), no reason to change them.
    """
    if config.frames:
        return int(config.frames)
    if not ds.layout.is_series:
        return SKELETON_FRAMES
    lo, hi = SERIES_FRAMES
    return int(np.clip(np.median(ds.lengths), lo, hi)) if len(ds.lengths) else lo


def preprocess(ds: SequenceSet, config: PreprocessConfig = PreprocessConfig()) -> SequenceSet:
    """A new SequenceSet of shape (N, C, T, V, M') with T = ``frames_for(ds, config)`` and
    M' <= config.persons.

    DataFormatError for frames other than 0 or 2..MAX_FRAMES, and before allocating anything when
    the result (and the copies made on the way, about three of it) would not fit in free memory.
    """
    check_preprocess_config(config)
    frames = frames_for(ds, config)
    n, c, _, v, m = ds.x.shape
    m_out = m if ds.layout.is_series else min(m, config.persons)
    out_bytes = n * c * frames * v * m_out * 4
    check_fits(3 * out_bytes + ds.x.nbytes, where=ds.where or "preprocess",
               what=f"resampling {n} samples to {frames} frames ({n} x {c} x"
                    f" {frames} x {v} x {m_out} float32, with working copies)",
               error=DataFormatError, hint="; use fewer frames (preprocess.frames) or less data")
    x = ds.x
    lengths = ds.lengths
    if not ds.layout.is_series:
        x = _fill_empty_frames(x, lengths)
        x = _keep_persons(x, config.persons)
    x = resample(x, lengths, frames)
    if ds.layout.is_series:
        if config.normalize_series == "dataset":
            x = _standardise_channels(x)
        elif config.normalize_series == "clip":
            x = _zscore(x, axis=2)
    else:
        coord = _coordinate_channels(ds)
        tracked = _tracked(x, coord)  # told before centring moves the zeros of untracked joints
        seen = _seen_joints(tracked[..., 0], x[..., 0], coord) if config.scale else None
        if config.center:
            x = _center(x, ds.layout.center, coord, tracked)
        if config.align_view and len(coord) == 3:
            x = _align(x, ds.layout, coord)
        if config.scale:
            x = _rescale(x, coord, seen, ds.layout.center)
    x = np.ascontiguousarray(x, dtype=np.float32)
    # Resampling changes the frame rate per sample; keep the typical one so playback and time
    # axes show roughly real seconds.
    fps = float(ds.fps * frames / max(1.0, float(np.median(lengths)))) if ds.fps > 0 else 0.0
    return ds.replace(x=x, lengths=np.full(ds.n, frames, dtype=np.int64), fps=fps)


def resample(x: np.ndarray, lengths: np.ndarray, frames: int) -> np.ndarray:
    """Linear resampling of each sample's valid frames to ``frames``; (N, C, T, V, M) -> (N, C, frames, V, M)."""
    n, c, t, v, m = x.shape
    out = np.empty((n, c, frames, v, m), dtype=np.float32)
    grid = np.linspace(0.0, 1.0, frames)
    for i in range(n):
        length = int(lengths[i])
        if length == 1:
            out[i] = x[i, :, :1]
            continue
        pos = grid * (length - 1)
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, length - 1)
        w = (pos - lo).astype(np.float32)[None, :, None, None]
        xi = x[i]
        out[i] = xi[:, lo] * (1 - w) + xi[:, hi] * w
    return out


def _fill_empty_frames(x: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Frames where a person is all zero (dropped by the sensor) repeat that person's last valid frame."""
    x = x.copy()
    n, _, _, _, m = x.shape
    for i in range(n):
        length = int(lengths[i])
        for p in range(m):
            seq = x[i, :, :length, :, p]
            valid = np.abs(seq).reshape(seq.shape[0], length, -1).sum(axis=(0, 2)) > 0
            if valid.all() or not valid.any():
                continue
            idx = np.where(valid, np.arange(length), -1)
            idx = np.maximum.accumulate(idx)
            first = int(np.argmax(valid))
            idx[idx < 0] = first  # leading gaps take the first valid frame
            x[i, :, :length, :, p] = seq[:, idx]  # seq is (C, T, V): idx indexes time
    return x


def _keep_persons(x: np.ndarray, persons: int) -> np.ndarray:
    """Keep the ``persons`` most active persons of each sample, most active first."""
    m = x.shape[-1]
    if m <= 1 and persons >= m:
        return x
    motion = np.abs(np.diff(x, axis=2)).sum(axis=(1, 2, 3)) + 1e-6 * np.abs(x).sum(axis=(1, 2, 3))
    order = np.argsort(-motion, axis=1, kind="stable")[:, :persons]
    out = np.take_along_axis(x, order[:, None, None, None, :], axis=4)
    return out


def _coordinate_channels(ds: SequenceSet) -> list[int]:
    """Indices of spatial channels (everything but a confidence/score channel)."""
    return [i for i, name in enumerate(ds.channels) if name.lower() not in ("score", "c", "conf", "confidence")]


def _tracked(x: np.ndarray, coord: list[int]) -> np.ndarray:
    """bool (N, T, V, M) of x (N, C, T, V, M): joints with a coordinate other than 0 (a sensor
    writes an untracked joint, and an absent person, as zeros)."""
    return (x[:, coord] != 0).any(axis=1)


def _start_centre(first: np.ndarray, center: tuple[int, ...]) -> np.ndarray:
    """(N, C') the mean of the ``center`` joints in ``first`` (N, C', V): person 0's first frame."""
    return first[:, :, list(center)].mean(axis=2)


def _center(x: np.ndarray, center: tuple[int, ...], coord: list[int],
            tracked: np.ndarray) -> np.ndarray:
    """Subtract the centre (mean of the centre joints) of person 0 in the first frame. Joints
    not ``tracked`` (``_tracked``: all-zero coordinates, or an absent person) stay at 0: shifted,
    they would sit at minus the person's place in the room or image, far from every real joint."""
    x = x.copy()
    origin = _start_centre(x[:, coord, 0][..., 0], center)  # (N, len(coord))
    for j, ch in enumerate(coord):
        shifted = x[:, ch] - origin[:, j, None, None, None]
        x[:, ch] = np.where(tracked, shifted, 0.0)
    return x


def _align(x: np.ndarray, layout, coord: list[int]) -> np.ndarray:
    """Rotate each sample so spine (lower→upper) is +y and the right→left shoulder line is +x."""
    if layout.spine is None and layout.shoulders is None:
        return x
    x = x.copy()
    xyz = x[:, coord]  # (N, 3, T, V, M)
    for i in range(len(x)):
        first = xyz[i, :, 0, :, 0]  # (3, V)
        up = np.array([0.0, 1.0, 0.0])
        if layout.spine is not None:
            lo, hi = layout.spine
            v = first[:, hi] - first[:, lo]
            if np.linalg.norm(v) > 1e-6:
                up = v / np.linalg.norm(v)
        across = np.array([1.0, 0.0, 0.0])
        if layout.shoulders is not None:
            left, right = layout.shoulders
            v = first[:, left] - first[:, right]
            v = v - up * (v @ up)
            if np.linalg.norm(v) > 1e-6:
                across = v / np.linalg.norm(v)
        depth = np.cross(across, up)
        if np.linalg.norm(depth) < 1e-6:
            continue
        depth /= np.linalg.norm(depth)
        across = np.cross(up, depth)
        rot = np.stack([across, up, depth])  # rows: new x, y, z axes
        x[i][coord] = np.einsum("ab,btvm->atvm", rot, xyz[i]).astype(np.float32)
    return x


def _seen_joints(tracked: np.ndarray, x: np.ndarray, coord: list[int]) -> np.ndarray:
    """bool (N, T, V): the ``tracked`` joints (N, T, V) of x (N, C, T, V) that, where there is a
    score channel (any channel but ``coord``), have a positive score (a keypoint detector writes
    a joint it missed as zeros)."""
    score = [i for i in range(x.shape[1]) if i not in coord]
    return tracked & (x[:, score[0]] > 0) if score else tracked


def _rescale(x: np.ndarray, coord: list[int], seen: np.ndarray,
             center: tuple[int, ...]) -> np.ndarray:
    """Each sample's coordinate channels divided by the root mean square distance of person 0's
    seen joints (``seen``: bool (N, T, V)) from its centre in the first frame (the origin after
    centring): its extent and travel around the start. Samples with nothing seen stay as they are.

    Why: people differ in size, and in 2D keypoints by their distance to the camera; the
    random-kernel views compare every sample's responses with biases drawn from one sample's, so
    they read amplitudes as features. (A sensor's amplitude is the motion itself and is kept:
    ``_standardise_channels``.)
    benchmarks/round_quality.py (MSRAction3D, UTKinect and NATOPS; π = 10 and 50, γ = 5 and
    10 %; 3 seeds): the floor's macro-F1 0.614 → 0.633, better in 28 of 36 runs and worse in 8;
    its simulation (π = 10, γ = 5 %, 5 seeds, network off) 0.659 → 0.665 with SpeLER's
    suggestions. In a scratch run of the floor (5 seeds) dividing by body size alone (mean bone
    length, or the joints' spread around their centroid) gained less or lost: 0.624 → 0.637,
    0.629 and 0.621, where this scale gave 0.645.
    """
    pts = x[:, coord][..., 0].astype(np.float64)  # (N, C', T, V)
    origin = _start_centre(pts[:, :, 0], center)  # (N, C')
    d2 = ((pts - origin[:, :, None, None]) ** 2).sum(axis=1)  # (N, T, V)
    count = seen.sum(axis=(1, 2)) * len(coord)
    rms = np.sqrt(np.where(seen, d2, 0.0).sum(axis=(1, 2)) / np.maximum(count, 1))
    scale = np.where(rms > 1e-8, rms, 1.0).astype(np.float32)
    out = x.copy()
    out[:, coord] = x[:, coord] / scale[:, None, None, None, None]
    return out


def _standardise_channels(x: np.ndarray) -> np.ndarray:
    """Each channel of series x (N, C, T, V, M) minus its mean and over its standard deviation
    over every sample and frame (constant channels become 0).

    Why not each clip on its own: a sensor measures in fixed units whoever wears it, and its
    amplitude is the motion (running shakes a wrist more than walking, walking more than
    standing); a clip's z-score leaves only the shape of its curves. Channels still need one
    scale (accelerations in g beside angular rates in rad/s). benchmarks/round_quality.py
    (π = 10 and 50, γ = 5 and 10 %, 5 seeds), against each clip's z-score: the floor's macro-F1
    on Epilepsy 0.709 → 0.890 and BasicMotions 0.804 → 0.991, better in all 40 runs; the
    annotation simulation (π = 10, γ = 5 %) with SpeLER's suggestions 0.756 → 0.941 and 0.907 →
    0.960, with random ones 0.716 → 0.880 and 0.800 → 0.875. Without any normalisation the
    random-kernel features would compare g with rad/s.
    """
    return _zscore(x.astype(np.float64), axis=(0, 2, 3, 4))  # float64: sums over N x T values


def _zscore(x: np.ndarray, axis) -> np.ndarray:
    """float32 x minus its mean over ``axis``, over its standard deviation there (constant
    stretches become 0); ``axis`` 2 is each clip's channels on their own (``normalize_series``
    "clip")."""
    mean = x.mean(axis=axis, keepdims=True)
    std = x.std(axis=axis, keepdims=True)
    return ((x - mean) / np.where(std > 1e-8, std, 1.0)).astype(np.float32)

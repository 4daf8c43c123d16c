"""Plotly figures shared by the app and the CLI (which writes them as HTML).

Every figure colours classes with :func:`class_colors`, so a class has the same colour in the
skeleton view, the count bars and the energy histograms. Figures are sized for a 1280×800 screen.
Nothing here imports streamlit; nothing here computes what the figures show.
"""

from __future__ import annotations

import colorsys
from collections.abc import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from speler.data.layouts import Layout
from speler.errors import DataFormatError

#: Colour of samples without a label (bars, histograms).
UNLABELED_COLOR = "#9E9E9E"
# Qualitative palette (Tableau-10-like, grey left out for UNLABELED_COLOR, yellow darkened so it
# reads on white), then colours further apart from these; beyond it, golden-angle hues.
_PALETTE = (
    "#4E79A7", "#F28E2B", "#E15759", "#76B7B2", "#59A14F", "#C9A227", "#B07AA1", "#FF9DA7",
    "#9C755F", "#17BECF", "#7F3C8D", "#2F6B3A", "#D4622A", "#3B4CC0", "#A8336B", "#6B8E23",
)
_STRATEGY_COLORS = ("#1F3B73", "#D62728", "#2CA02C", "#FF7F0E", "#9467BD", "#8C564B", "#E377C2",
                    "#17BECF", "#7F7F7F", "#BCBD22")
_SERIES_COLORS = ("#1F77B4", "#FF7F0E", "#2CA02C", "#D62728", "#9467BD", "#8C564B", "#E377C2",
                  "#7F7F7F", "#BCBD22", "#17BECF")
_TEMPLATE = "plotly_white"
_FONT = dict(size=13)
_MAX_ANIMATION_FRAMES = 60
_PLAY_LOOPS = 60  # times "play" runs through the frames before it stops by itself
_THUMBNAIL_POSES = 4
_SCORE_NAMES = ("score", "c", "conf", "confidence")
_IMAGE_LAYOUTS = ("coco17", "openpose18", "openpose25")  # 2D keypoints in pixels, y down


# ---------------------------------------------------------------------------------------------
# Colours
# ---------------------------------------------------------------------------------------------
def _palette_color(i: int) -> str:
    if i < len(_PALETTE):
        return _PALETTE[i]
    hue = (0.11 + 0.618033988749895 * i) % 1.0
    r, g, b = colorsys.hls_to_rgb(hue, 0.45, 0.65)
    return "#{:02X}{:02X}{:02X}".format(int(r * 255), int(g * 255), int(b * 255))


def class_colors(classes: Sequence[str]) -> dict[str, str]:
    """A hex colour per class, fixed by the class's index (the same in every figure)."""
    return {str(c): _palette_color(i) for i, c in enumerate(classes)}


def _rgb(color: str) -> tuple[int, int, int]:
    h = color.lstrip("#")
    if len(h) != 6:
        raise DataFormatError(f"viz: colour {color!r} is not a #RRGGBB hex string")
    return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)


def _mix(color: str, other: tuple[int, int, int], amount: float) -> str:
    r, g, b = _rgb(color)
    o = other
    return "#{:02X}{:02X}{:02X}".format(*(int(round(c + (t - c) * amount)) for c, t in zip((r, g, b), o)))


def _tint(color: str, amount: float) -> str:
    return _mix(color, (255, 255, 255), amount)


def _shade(color: str, amount: float) -> str:
    return _mix(color, (0, 0, 0), amount)


def _rgba(color: str, alpha: float) -> str:
    r, g, b = _rgb(color)
    return f"rgba({r},{g},{b},{alpha})"


def _base_layout(fig: go.Figure, *, title: str, height: int) -> None:
    fig.update_layout(
        template=_TEMPLATE, font=_FONT, height=height,
        title=dict(text=title, x=0.01, xanchor="left") if title else None,
        margin=dict(l=60, r=20, t=50 if title else 20, b=50),
    )


# ---------------------------------------------------------------------------------------------
# Skeletons
# ---------------------------------------------------------------------------------------------
def _valid_length(x: np.ndarray) -> int:
    """Frames up to the last one with any non-zero value (x: (C, T, V, M))."""
    nonzero = np.abs(x).reshape(x.shape[0], x.shape[1], -1).sum(axis=(0, 2)) > 0
    idx = np.flatnonzero(nonzero)
    return int(idx[-1]) + 1 if len(idx) else x.shape[1]


def _frame_index(length: int, limit: int = _MAX_ANIMATION_FRAMES) -> np.ndarray:
    if length <= limit:
        return np.arange(length)
    return np.unique(np.linspace(0, length - 1, limit).round().astype(np.int64))


def _bone_index(bones: Sequence[tuple[int, int]]) -> np.ndarray:
    """Joint index per vertex of the bone line: child, parent, gap (-1) for each bone."""
    return np.array([[c, p, -1] for c, p in bones], dtype=np.int64).reshape(-1)


def _line(values: np.ndarray, present: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Coordinates along the bone line (NaN at gaps and at bones with a missing end).

    values, present: (V,) one coordinate and presence of each joint; index from _bone_index.
    """
    out = np.full(len(index), np.nan)
    ends = index.reshape(-1, 3)[:, :2]
    ok = present[ends].all(axis=1)
    vert = np.zeros((len(ends), 3), dtype=bool)
    vert[:, :2] = ok[:, None]
    vert = vert.reshape(-1)
    out[vert] = values[index[vert]]
    return out


def _checked_skeleton(x, layout: Layout, channels, length: int | None) -> tuple[np.ndarray, bool]:
    """(float64 (C, T', V, M) cut to the valid frames with NaN as 0, whether the coordinates are
    2D image ones (x, y[, score])) for a skeleton (C, T, V[, M]); DataFormatError for a shape
    that does not fit ``layout``."""
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise DataFormatError(f"viz: skeleton must have shape (C, T, V, M), got {x.shape}")
    c, t, v, m = x.shape
    if v != layout.num_joints:
        raise DataFormatError(f"viz: skeleton has {v} joints, layout {layout.name} needs {layout.num_joints}")
    if c < 2:
        raise DataFormatError(f"viz: skeleton needs at least 2 coordinate channels, got {c}")
    names = [str(n).lower() for n in channels] if channels else []
    flat = c == 2 or (c >= 3 and len(names) >= 3 and names[2] in _SCORE_NAMES) or (
        c == 3 and not names and layout.name in _IMAGE_LAYOUTS)
    length = _valid_length(x) if length is None else int(np.clip(length, 1, t))
    return np.nan_to_num(x[:, :length].astype(np.float64)), flat


def skeleton_animation(
    x: np.ndarray,
    layout: Layout,
    *,
    title: str = "",
    color: str | None = None,
    length: int | None = None,
    height: int = 420,
    fps: float = 30.0,
    channels: Sequence[str] | None = None,
) -> go.Figure:
    """Animated skeleton of one sample: Plotly frames, play/pause buttons and a frame slider.

    x: float array (C, T, V, M) — xyz in a y-up frame (Kinect, NTU) for 3D; for 2D keypoints
        C = 2 or channels (x, y, score) (drawn flat, image y pointing down for COCO/OpenPose).
    layout: the skeleton layout; its bones are drawn as lines, joints as markers (the person's
        left side light, right side dark, so it is clear which arm moves).
    color: the class colour (default: the first palette colour); a second person is drawn darker.
    length: valid frames (default: up to the last non-zero frame); at most 60 frames are animated.
    fps: frame rate of the recording, for the play speed.
    channels: channel names; used to spot a score channel.

    Persons and frames that are all zero (absent, or dropped by the sensor) are not drawn; joints
    exactly at the origin are treated as missing. Axes have equal scale and fixed ranges over the
    whole motion, and the camera looks at the person's front, upright.
    """
    x, flat = _checked_skeleton(x, layout, channels, length)
    c, length, v, m = x.shape
    coords = x[:2] if flat else x[:3]
    score = x[2] if flat and c >= 3 else None  # (T, V, M)
    present_joint = np.abs(coords).sum(axis=0) > 0  # (T, V, M)
    if score is not None:
        present_joint &= score > 0
    persons = [p for p in range(m) if present_joint[:, :, p].any()]
    frames = _frame_index(length)
    base = color or _PALETTE[0]
    person_colors = [base, _shade(base, 0.45), _tint(base, 0.35)]
    side = np.zeros(v, dtype=np.int64)  # 0 centre, 1 left, 2 right
    for left, right in layout.pairs:
        side[left], side[right] = 1, 2
    # coordinates as plotted: 3D (x, z, y) so that the data's y is up on screen
    if flat:
        px_, py_, pz_ = coords[0], coords[1], None
    else:
        px_, py_, pz_ = coords[0], coords[2], coords[1]
    sel = present_joint[frames][:, :, persons] if persons else np.zeros((1, v, 1), bool)
    lo, hi = [], []
    for arr in (px_, py_) + ((pz_,) if pz_ is not None else ()):
        vals = arr[frames][:, :, persons][sel] if persons else np.zeros(1)
        vals = vals if vals.size else np.zeros(1)
        lo.append(float(vals.min()))
        hi.append(float(vals.max()))
    lo_a, hi_a = np.array(lo), np.array(hi)
    span = max(float((hi_a - lo_a).max()), 1e-6)
    pad = 0.08 * span
    mid = (lo_a + hi_a) / 2
    ext = np.maximum(hi_a - lo_a + 2 * pad, 0.35 * span)
    ranges = [[float(mi - e / 2), float(mi + e / 2)] for mi, e in zip(mid, ext)]

    joint_names = list(layout.joints)
    bone_index = _bone_index(layout.bones)
    axes = (px_, py_) if flat else (px_, py_, pz_)
    keys = ("x", "y", "z")

    def coordinates(f: int, p: int) -> tuple[dict, dict]:
        """Bone-line and joint coordinates of person p in frame f (NaN where missing); float32,
        which is plenty on screen and halves what the browser receives."""
        pres = present_joint[f, :, p]
        bones = {k: _line(a[f, :, p], pres, bone_index).astype(np.float32) for k, a in zip(keys, axes)}
        joints = {k: np.where(pres, a[f, :, p], np.nan).astype(np.float32) for k, a in zip(keys, axes)}
        return bones, joints

    first = int(frames[0])
    traces = []
    for k, p in enumerate(persons):
        col = person_colors[k % len(person_colors)]
        marker_colors = [
            _tint(col, 0.55) if side[j] == 1 else _shade(col, 0.35) if side[j] == 2 else col
            for j in range(v)
        ]
        label = f"person {p + 1}"
        bones, joints = coordinates(first, p)
        kind = go.Scatter if flat else go.Scatter3d
        traces.append(kind(
            **bones, mode="lines", line=dict(color=col, width=4 if flat else 7), name=label,
            hoverinfo="skip", showlegend=False, connectgaps=False))
        traces.append(kind(
            **joints, mode="markers", text=joint_names, name=label,
            marker=dict(size=7 if flat else 4, color=marker_colors, line=dict(color=col, width=1)),
            hovertemplate="%{text}<extra>" + label + "</extra>", showlegend=False))

    fig = go.Figure(data=traces)
    step_ms = 1000.0 * (length / max(len(frames), 1)) / (fps if fps and fps > 0 else 30.0)
    _base_layout(fig, title=title, height=height)
    fig.update_layout(margin=dict(l=10, r=10, t=40 if title else 10, b=10), showlegend=False)
    if flat:
        image = layout.name in _IMAGE_LAYOUTS
        fig.update_xaxes(range=ranges[0], title="x", zeroline=False)
        fig.update_yaxes(range=ranges[1][::-1] if image else ranges[1], title="y", zeroline=False,
                         scaleanchor="x", scaleratio=1)
    else:
        aspect = np.array([r[1] - r[0] for r in ranges])
        aspect = aspect / aspect.max()
        eye = _front_camera(coords, present_joint, layout, persons, frames, aspect)
        axis = dict(showbackground=True, backgroundcolor="#F4F6F8", gridcolor="#DADFE5",
                    zeroline=False, showspikes=False, nticks=5, tickfont=dict(size=10),
                    title_font=dict(size=12))
        fig.update_layout(scene=dict(
            domain=dict(x=[0, 1], y=[0.1 if len(frames) > 1 else 0, 1]),
            # x is drawn reversed: with (x, z, y) on screen this keeps the data right-handed,
            # so a person's right hand stays their right hand (no mirror image).
            xaxis=dict(axis, range=ranges[0][::-1], title="x"),
            yaxis=dict(axis, range=ranges[1], title="z (depth)"),
            zaxis=dict(axis, range=ranges[2], title="y (up)"),
            aspectmode="manual", aspectratio=dict(x=aspect[0], y=aspect[1], z=aspect[2]),
            camera=dict(eye=eye, up=dict(x=0, y=0, z=1), center=dict(x=0, y=0, z=-0.05)),
            dragmode="turntable",
        ))
    if len(frames) > 1:
        _add_player(fig, frames, step_ms, fps)
        # Frames carry only coordinates; Plotly merges them into the traces above. Set last:
        # every layout update after them would cost a copy of them (3x slower figures).
        trace_type = "scatter" if flat else "scatter3d"
        frame_list = []
        for f in frames:
            data = []
            for p in persons:
                bones, joints = coordinates(int(f), p)
                data += [dict(type=trace_type, **bones), dict(type=trace_type, **joints)]
            frame_list.append(dict(name=str(int(f)), data=data))
        fig.frames = frame_list
    return fig


def _front_camera(coords: np.ndarray, present: np.ndarray, layout: Layout, persons: list[int],
                  frames: np.ndarray, aspect: np.ndarray) -> dict:
    """Camera eye (Plotly scene units) in front of the first person, a little to the side and up."""
    facing = np.array([0.0, -1.0])  # plotted (x, y=depth): Kinect people face the camera (-z)
    if persons and layout.shoulders is not None:
        left, right = layout.shoulders
        p = persons[0]
        ok = present[frames][:, left, p] & present[frames][:, right, p]
        if ok.any():
            f = int(frames[np.flatnonzero(ok)[0]])
            across = coords[:, f, left, p] - coords[:, f, right, p]  # data (x, y, z), right → left
            # person's forward = left × up; with y up: (x, z) components of across × (0, 1, 0)
            fwd = np.array([-across[2], across[0]])  # data (x, z)
            if np.linalg.norm(fwd) > 1e-9:
                facing = fwd / np.linalg.norm(fwd)
    # turn 40° towards the person's right side (viewer's left) for depth, look slightly down
    ang = np.deg2rad(40.0)
    rot = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
    d = rot @ facing
    # far enough that the whole box and its axis titles fit a column of the Label page (at 1.3
    # the floor's corners and the depth axis's title were cut off, at 1.7 still that title)
    dist = 1.9 * float(aspect.max())
    # the x axis is drawn reversed, so a data direction +x is -x in scene units
    return dict(x=float(-d[0] * dist), y=float(d[1] * dist), z=float(0.35 * aspect.max()))


def _add_player(fig: go.Figure, frames: np.ndarray, step_ms: float, fps: float) -> None:
    # Plotly plays a list of frames once and has no loop option: "play" queues the frames
    # _PLAY_LOOPS times over (a few minutes of motion), "pause" stops it.
    loop = [str(int(f)) for f in frames] * _PLAY_LOOPS
    play = dict(frame=dict(duration=step_ms, redraw=True), transition=dict(duration=0),
                mode="immediate")
    pause = dict(frame=dict(duration=0, redraw=False), transition=dict(duration=0), mode="immediate")
    fig.update_layout(
        updatemenus=[dict(
            type="buttons", direction="left", showactive=False, x=0.0, y=0.0, xanchor="left",
            yanchor="top", pad=dict(t=4, r=6),
            buttons=[dict(label="▶ play", method="animate", args=[loop, play]),
                     dict(label="❚❚ pause", method="animate", args=[[None], pause])],
        )],
        sliders=[dict(
            active=0, x=0.3, y=0.0, len=0.7, xanchor="left", yanchor="top", pad=dict(t=4, b=4),
            currentvalue=dict(prefix="frame ", font=dict(size=12, color="#444444"), xanchor="right"),
            font=dict(color="rgba(0,0,0,0)"),  # no label under every tick; currentvalue shows it
            ticklen=3, minorticklen=0,
            steps=[dict(method="animate", label=str(int(f)),
                        args=[[str(int(f))], dict(frame=dict(duration=0, redraw=True),
                                                  transition=dict(duration=0), mode="immediate")])
                   for f in frames],
        )],
        margin=dict(b=40),
    )


def thumbnail_svg(
    x: np.ndarray,
    layout: Layout,
    *,
    color: str | None = None,
    length: int | None = None,
    channels: Sequence[str] | None = None,
    poses: int = _THUMBNAIL_POSES,
    width: int = 400,
    height: int = 150,
) -> str:
    """A light, static picture of one sample as an inline ``<svg>`` string (scales to its box).

    Skeletons: ``poses`` moments of the motion side by side, seen from the front of the first
    person, earlier poses lighter, the last in ``color``. Series (``layout.is_series``): one line
    per channel over the valid frames, on one scale. For neighbours and lists, where a Plotly
    figure per sample (a WebGL context and megabytes of frames for a 3D animation, a Plotly
    render even in 2D) would hold up the page. x, layout, length, channels as in
    :func:`skeleton_animation` (series: (C, T, 1, 1) or (C, T)).
    """
    x = np.asarray(x, dtype=np.float64)
    if layout.is_series:
        if x.ndim == 4:
            x = x[:, :, 0, 0]
        if x.ndim != 2:
            raise DataFormatError(f"viz: series must have shape (C, T) or (C, T, 1, 1), got {x.shape}")
        n = x.shape[1] if length is None else int(np.clip(length, 1, x.shape[1]))
        vals = np.nan_to_num(x[:, :n])
        lo, hi = float(vals.min()), float(vals.max())
        span = hi - lo if hi > lo else 1.0
        pad = 4.0
        xs = pad + (width - 2 * pad) * np.arange(n) / max(n - 1, 1)
        paths = []
        for c in range(vals.shape[0]):
            ys = pad + (height - 2 * pad) * (hi - vals[c]) / span
            pts = " ".join(f"{a:.1f},{b:.1f}" for a, b in zip(xs, ys))
            paths.append(f'<polyline points="{pts}" fill="none" stroke-width="1.5" '
                         f'stroke="{_SERIES_COLORS[c % len(_SERIES_COLORS)]}"/>')
        return _svg(paths, width, height)

    x, flat = _checked_skeleton(x, layout, channels, length)
    c, _, v, m = x.shape
    present = np.abs(x[:2] if flat else x[:3]).sum(axis=0) > 0  # (T, V, M)
    if flat and c >= 3:
        present &= x[2] > 0
    persons = [p for p in range(m) if present[:, :, p].any()]
    # screen coordinates: across (the person's right → left, drawn left → right) and up
    if flat:
        across, up = x[0], (-x[1] if layout.name in _IMAGE_LAYOUTS else x[1])
    else:
        h = np.array([1.0, 0.0])  # data (x, z) direction drawn left → right
        if persons and layout.shoulders is not None:
            lft, rgt = layout.shoulders
            ok = np.flatnonzero(present[:, lft, persons[0]] & present[:, rgt, persons[0]])
            if len(ok):
                d = x[[0, 2], ok[0], lft, persons[0]] - x[[0, 2], ok[0], rgt, persons[0]]
                if np.linalg.norm(d) > 1e-9:
                    h = d / np.linalg.norm(d)
        across, up = h[0] * x[0] + h[1] * x[2], x[1]
    frames = _frame_index(length, max(1, int(poses)))
    sel = present[frames][:, :, persons] if persons else np.zeros((1, v, 1), bool)
    va = across[frames][:, :, persons][sel] if persons else np.zeros(1)
    vu = up[frames][:, :, persons][sel] if persons else np.zeros(1)
    va, vu = (va if va.size else np.zeros(1)), (vu if vu.size else np.zeros(1))
    w_pose = max(float(va.max() - va.min()), 1e-6)
    h_pose = max(float(vu.max() - vu.min()), 1e-6)
    step = max(w_pose, 0.45 * h_pose) * 1.25  # pose k is shifted right by k steps
    total_w = (len(frames) - 1) * step + w_pose
    pad = 6.0
    scale = min((width - 2 * pad) / total_w, (height - 2 * pad) / h_pose)
    off_x = (width - scale * total_w) / 2 - scale * float(va.min())
    off_y = (height + scale * h_pose) / 2 + scale * float(vu.min())
    base = color or _PALETTE[0]
    parts = []
    for k, f in enumerate(frames):
        fade = 0.6 * (1 - (k + 1) / len(frames))  # the last pose in full colour
        for q, p in enumerate(persons):
            col = _tint(base if q == 0 else _shade(base, 0.45), fade)
            sx = off_x + scale * (across[f, :, p] + k * step)
            sy = off_y - scale * up[f, :, p]
            segs = [f"M{sx[a]:.1f} {sy[a]:.1f}L{sx[b]:.1f} {sy[b]:.1f}" for a, b in layout.bones
                    if present[f, a, p] and present[f, b, p]]
            if segs:
                parts.append(f'<path d="{"".join(segs)}" fill="none" stroke="{col}" '
                             'stroke-width="2.2" stroke-linecap="round"/>')
    return _svg(parts, width, height)


def _svg(parts: list[str], width: int, height: int) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
            f'width="100%" preserveAspectRatio="xMidYMid meet" role="img" '
            f'style="background:#F7F8FA;border-radius:4px;display:block">'
            + "".join(parts) + "</svg>")


# ---------------------------------------------------------------------------------------------
# Series
# ---------------------------------------------------------------------------------------------
def series_figure(
    x: np.ndarray,
    channels: Sequence[str],
    *,
    title: str = "",
    length: int | None = None,
    height: int = 300,
    fps: float | None = None,
) -> go.Figure:
    """Sensor channels as lines. x: (C, T, 1, 1) or (C, T); time in seconds when ``fps`` > 0."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 4:
        x = x[:, :, 0, 0]
    if x.ndim != 2:
        raise DataFormatError(f"viz: series must have shape (C, T) or (C, T, 1, 1), got {x.shape}")
    c, t = x.shape
    if len(channels) != c:
        raise DataFormatError(f"viz: {len(channels)} channel names for {c} channels")
    length = t if length is None else int(np.clip(length, 1, t))
    time = np.arange(length) / fps if fps else np.arange(length)
    fig = go.Figure()
    for i, name in enumerate(channels):
        fig.add_trace(go.Scatter(x=time, y=x[i, :length], mode="lines", name=str(name),
                                 line=dict(color=_SERIES_COLORS[i % len(_SERIES_COLORS)], width=2)))
    _base_layout(fig, title=title, height=height)
    fig.update_layout(legend=dict(orientation="h", y=1.02, yanchor="bottom", x=1, xanchor="right"),
                      hovermode="x unified")
    fig.update_xaxes(title="time (s)" if fps else "frame")
    fig.update_yaxes(title="value")
    return fig


# ---------------------------------------------------------------------------------------------
# Counts, spectrum, energy, curves
# ---------------------------------------------------------------------------------------------
_SOURCE_STYLE = {  # source → (shape of the pattern, colour tint)
    "human": ("", 0.0), "imported": ("x", 0.0), "propagated": ("/", 0.45),
}
_NONE_NAMES = ("none", "unlabeled", "unknown")


def class_counts_figure(
    classes: Sequence[str],
    counts: Mapping[str, np.ndarray],
    *,
    log: bool = True,
    title: str = "Samples per class",
    height: int = 380,
) -> go.Figure:
    """Bars per class, one per label source (e.g. human, propagated, none): side by side on a
    log y axis (default; it keeps the long tail visible, and stacked segments would misstate
    every count above the bottom one there), stacked on a linear one.

    counts: source name → int array (num_classes,). Human labels are drawn in the class colour,
    propagated ones in a lighter hatched tint of it, samples without a label in grey.
    """
    classes = [str(c) for c in classes]
    colors = class_colors(classes)
    fig = go.Figure()
    for source, values in counts.items():
        vals = np.asarray(values, dtype=np.float64).ravel()
        if vals.shape != (len(classes),):
            raise DataFormatError(
                f"viz: counts[{source!r}] has {vals.size} values, expected one per class ({len(classes)})")
        key = str(source).lower()
        if key in _NONE_NAMES:
            bar_colors = [UNLABELED_COLOR] * len(classes)
            pattern = ""
        else:
            pattern, tint = _SOURCE_STYLE.get(key, (".", 0.25))
            bar_colors = [_tint(colors[c], tint) for c in classes]
        fig.add_trace(go.Bar(
            x=classes, y=vals, name=str(source),
            marker=dict(color=bar_colors, line=dict(color=[colors[c] for c in classes], width=1),
                        pattern=dict(shape=pattern, fgcolor="#FFFFFF", size=6, solidity=0.25)),
            hovertemplate="%{x}<br>" + str(source) + ": %{y:d}<extra></extra>",
        ))
    _base_layout(fig, title=title, height=height)
    fig.update_layout(barmode="group" if log else "stack", bargap=0.25, bargroupgap=0.05,
                      legend=dict(orientation="h", y=1.02, yanchor="bottom", x=1, xanchor="right"))
    fig.update_xaxes(title="class", tickangle=-30 if len(classes) > 8 else 0)
    if log:
        top = max(max((float(np.max(v)) for v in counts.values()), default=1.0), 1.0)
        ticks = [m * 10**e for e in range(int(np.log10(top)) + 2) for m in (1, 2, 5)
                 if m * 10**e <= top * 1.4]
        fig.update_yaxes(type="log", title="samples (log scale)", range=[-0.35, np.log10(top) + 0.15],
                         tickvals=ticks, ticktext=[str(t) for t in ticks])
    else:
        fig.update_yaxes(title="samples")
    return fig


def _density(item, *, grid: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(grid, density) from a (grid, density) pair, an object with them, or raw eigenvalues."""
    if hasattr(item, "grid") and hasattr(item, "density"):
        item = (item.grid, item.density)
    elif hasattr(item, "eigenvalues"):
        item = item.eigenvalues
    if isinstance(item, tuple) and len(item) == 2:
        g, d = (np.asarray(a, dtype=np.float64).ravel() for a in item)
        if g.shape != d.shape or g.size < 2:
            raise DataFormatError(
                f"viz: (grid, density) must be two arrays of one length, got {g.shape}, {d.shape}")
        return g, d
    vals = np.asarray(item, dtype=np.float64).ravel()
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        raise DataFormatError("viz: no finite eigenvalues to plot")
    if grid is None:
        lo = min(-1.0, float(vals.min()))
        hi = max(1.0, float(vals.max()))
        grid = np.linspace(lo, hi, 400)
    std = float(vals.std()) if vals.size > 1 else 0.0
    bw = max(1.06 * std * vals.size ** (-0.2), 0.01)  # Silverman's rule, floored
    z = (grid[:, None] - vals[None, :]) / bw
    dens = np.exp(-0.5 * z * z).sum(axis=1) / (vals.size * bw * np.sqrt(2 * np.pi))
    return grid, dens


def spectrum_figure(
    before,
    after,
    *,
    title: str = "Eigenvalue density of the normalised affinity S",
    labels: tuple[str, str] = ("before spectral balancing", "after spectral balancing"),
    height: int = 360,
) -> go.Figure:
    """Eigenvalue density before and after balancing, overlaid (paper Fig. 1 style).

    before, after: a ``(grid, density)`` pair of arrays, or a 1-D array of eigenvalues (turned into
    a Gaussian kernel density on a grid over [-1, 1]), or an object with ``grid``/``density`` or
    ``eigenvalues`` attributes. A dotted line marks each mean eigenvalue.
    """
    g0, d0 = _density(before, grid=None)
    g1, d1 = _density(after, grid=None)
    fig = go.Figure()
    for (g, d), name, col in (((g0, d0), labels[0], "#E15759"), ((g1, d1), labels[1], "#4E79A7")):
        fig.add_trace(go.Scatter(x=g, y=d, mode="lines", name=name, fill="tozeroy",
                                 line=dict(color=col, width=2.5), fillcolor=_rgba(col, 0.2)))
        mass = np.trapezoid(d, g) if d.sum() > 0 else 0.0
        if mass > 0:
            mean = float(np.trapezoid(g * d, g) / mass)
            fig.add_vline(x=mean, line=dict(color=col, dash="dot", width=1.5))
    _base_layout(fig, title=title, height=height)
    fig.update_layout(legend=dict(orientation="h", y=1.02, yanchor="bottom", x=1, xanchor="right"))
    fig.update_xaxes(title="eigenvalue λ of S")
    fig.update_yaxes(title="density")
    return fig


def energy_histogram(
    energy: np.ndarray,
    labels: np.ndarray,
    classes: Sequence[str],
    thresholds: np.ndarray | None = None,
    *,
    title: str = "Propagation energy per class (lower = more reliable)",
    bins: int = 30,
    columns: int = 4,
    human: np.ndarray | None = None,
    reliable: np.ndarray | None = None,
) -> go.Figure:
    """One energy histogram per class (small multiples, shared x axis), with the class threshold.

    energy: float (n,); labels: int (n,) class of each sample (-1 → an 'unlabeled' panel);
    thresholds: float (C,) per-class reliability thresholds (dashed lines), or None.
    human: bool (n,), samples left out (a human label's energy says nothing about its reliability,
    and its seed energy, far below the rest, would squeeze their histograms into one bin), or None.
    reliable: bool (n,), the propagated labels that count as reliable: each panel's title says how
    many of its samples are, or None.
    """
    energy = np.asarray(energy, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel()
    classes = [str(c) for c in classes]
    if energy.shape != labels.shape:
        raise DataFormatError(f"viz: energy has {energy.size} values but labels {labels.size}")
    for name, mask in (("human", human), ("reliable", reliable)):
        if mask is not None and np.shape(mask) != energy.shape:
            raise DataFormatError(f"viz: {name} has {np.size(mask)} values but energy {energy.size}")
    reliable = None if reliable is None else np.asarray(reliable, dtype=bool)
    if human is not None:
        keep = ~np.asarray(human, dtype=bool)
        energy, labels = energy[keep], labels[keep]
        reliable = None if reliable is None else reliable[keep]
    if thresholds is not None:
        thresholds = np.asarray(thresholds, dtype=np.float64).ravel()
        if thresholds.shape != (len(classes),):
            raise DataFormatError(f"viz: {thresholds.size} thresholds for {len(classes)} classes")
    colors = class_colors(classes)
    panels = [(c, classes[c]) for c in range(len(classes))]
    if (labels < 0).any():
        panels.append((-1, "unlabeled"))
    cols = max(1, min(columns, len(panels)))
    rows = int(np.ceil(len(panels) / cols))
    titles = [p[1] for p in panels]
    if reliable is not None:
        titles = [f"{name}<br><span style='font-size:10px'>{int(reliable[labels == c].sum())} of"
                  f" {int((labels == c).sum())} reliable</span>" for c, name in panels]
    row_px = 170 if reliable is None else 190  # a second title line
    height = max(260, 70 + row_px * rows)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles, horizontal_spacing=0.05,
                        vertical_spacing=min(0.12, (row_px - 120) / max(height - 90, 1)))
    finite = energy[np.isfinite(energy)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if thresholds is not None and np.isfinite(thresholds).any():
        lo = min(lo, float(np.nanmin(thresholds)))
        hi = max(hi, float(np.nanmax(thresholds)))
    size = (hi - lo) / bins if hi > lo else 1.0
    for k, (c, name) in enumerate(panels):
        r, cc = k // cols + 1, k % cols + 1
        col = colors[name] if c >= 0 else UNLABELED_COLOR
        fig.add_trace(go.Histogram(
            x=energy[labels == c], name=name, marker=dict(color=col, line=dict(color="white", width=0.5)),
            xbins=dict(start=lo, end=hi + size, size=size), showlegend=False,
            hovertemplate=name + "<br>energy %{x}<br>%{y} samples<extra></extra>"), row=r, col=cc)
        if thresholds is not None and c >= 0 and np.isfinite(thresholds[c]):
            fig.add_vline(x=float(thresholds[c]), line=dict(color=_shade(col, 0.3), dash="dash", width=2),
                          row=r, col=cc)
    fig.update_layout(template=_TEMPLATE, font=_FONT, height=height, bargap=0.05,
                      title=dict(text=title, x=0.01, xanchor="left") if title else None,
                      margin=dict(l=50, r=20, t=80 if title else 40, b=50))
    fig.update_annotations(font_size=12)
    fig.update_xaxes(matches="x", showticklabels=True, range=[lo - size, hi + size])
    for k in range(max(0, len(panels) - cols), len(panels)):  # the lowest panel of each column
        fig.update_xaxes(title_text="energy", row=k // cols + 1, col=k % cols + 1)
    return fig


def curves_figure(
    curves: Mapping[str, tuple[Sequence[int], Sequence[float]]],
    *,
    y_title: str = "macro-F1",
    x_title: str = "human labels",
    title: str = "",
    height: int = 380,
) -> go.Figure:
    """One line per strategy: score against the number of human labels (``speler`` drawn bold)."""
    fig = go.Figure()
    for i, (name, (xs, ys)) in enumerate(curves.items()):
        xs, ys = list(xs), list(ys)
        if len(xs) != len(ys):
            raise DataFormatError(f"viz: curve {name!r} has {len(xs)} x values but {len(ys)} y values")
        main = str(name).lower() == "speler"
        fig.add_trace(go.Scatter(
            x=xs, y=ys, mode="lines+markers", name=str(name),
            line=dict(color=_STRATEGY_COLORS[i % len(_STRATEGY_COLORS)], width=4 if main else 2),
            marker=dict(size=8 if main else 6),
            hovertemplate=str(name) + "<br>%{x} labels: %{y:.3f}<extra></extra>"))
    _base_layout(fig, title=title, height=height)
    fig.update_layout(legend=dict(orientation="h", y=1.02, yanchor="bottom", x=1, xanchor="right"),
                      hovermode="x unified")
    fig.update_xaxes(title=x_title)
    fig.update_yaxes(title=y_title)
    return fig

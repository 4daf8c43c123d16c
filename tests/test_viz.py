"""Plotly figures: structure (frames, traces, bones), colours, axes, and bad input."""

from __future__ import annotations

import json
import re

import numpy as np
import plotly.graph_objects as go
import pytest

from speler.data.kinematics import generate
from speler.data.layouts import get_layout
from speler.errors import DataFormatError
from speler.viz import (
    UNLABELED_COLOR, class_colors, class_counts_figure, curves_figure, energy_histogram,
    series_figure, skeleton_animation, spectrum_figure, thumbnail_svg,
)

NTU = get_layout("ntu25")


@pytest.fixture(scope="module")
def wave():
    """One noisy wave at 30 fps (longer than 60 frames) with no dropped frames."""
    ds = generate(n_per_class={"wave": 1}, seed=2, fps=30, drop_rate=0.0)
    return ds.x[0], int(ds.lengths[0])


def _points(values) -> int:
    """Drawn points: finite coordinates (NaN marks a gap or a missing joint)."""
    return int(np.isfinite(np.asarray(values, dtype=float)).sum())


# -- colours ----------------------------------------------------------------------------------
def test_class_colors_are_stable_by_index_and_distinct():
    classes = [f"c{i}" for i in range(40)]
    colors = class_colors(classes)
    assert list(colors) == classes
    assert class_colors(classes[:5]) == {c: colors[c] for c in classes[:5]}
    renamed = class_colors([f"other{i}" for i in range(40)])
    assert list(renamed.values()) == list(colors.values())  # by index, not by name
    assert len(set(colors.values())) == 40
    assert UNLABELED_COLOR not in colors.values()
    assert all(len(c) == 7 and c.startswith("#") for c in colors.values())


# -- skeleton animation -----------------------------------------------------------------------
def test_animation_frames_traces_and_bones(wave):
    x, length = wave
    assert length > 60
    fig = skeleton_animation(x, NTU, title="wave", color="#E15759", length=length, fps=30)
    assert len(fig.frames) == 60  # subsampled
    names = [int(f.name) for f in fig.frames]
    assert names[0] == 0 and names[-1] == length - 1 and names == sorted(set(names))
    for frame in (fig.data, fig.frames[0].data, fig.frames[-1].data):
        bones, joints = frame
        assert isinstance(bones, go.Scatter3d) and isinstance(joints, go.Scatter3d)
        assert len(bones.x) == 3 * len(NTU.bones) and _points(bones.x) == 2 * len(NTU.bones)
        assert len(joints.x) == NTU.num_joints and _points(joints.z) == NTU.num_joints
    # styles live on the traces; frames only move the coordinates
    assert list(fig.data[1].text) == list(NTU.joints)
    assert fig.data[0].line.color == "#E15759" and fig.frames[5].data[0].line.color is None
    np.testing.assert_allclose(fig.frames[0].data[1].z, fig.data[1].z)
    slider = fig.layout.sliders[0]
    assert len(slider.steps) == 60 and [s.args[0][0] for s in slider.steps] == [f.name for f in fig.frames]
    labels = [b.label for b in fig.layout.updatemenus[0].buttons]
    assert any("play" in lab for lab in labels) and any("pause" in lab for lab in labels)
    json.loads(fig.to_json())  # serialisable


def test_animation_shows_data_y_as_up_with_equal_scale(wave):
    x, length = wave
    fig = skeleton_animation(x, NTU, length=length)
    joints = fig.data[1]
    head, foot = NTU.joints.index("Head"), NTU.joints.index("FootLeft")
    assert joints.z[head] == pytest.approx(float(x[1, 0, head, 0]))  # data y on the plot's z
    assert joints.z[head] > joints.z[foot]
    scene = fig.layout.scene
    assert scene.camera.up.z == 1 and scene.aspectmode == "manual"
    spans = np.array([abs(a.range[1] - a.range[0]) for a in (scene.xaxis, scene.yaxis, scene.zaxis)])
    ratios = np.array([scene.aspectratio.x, scene.aspectratio.y, scene.aspectratio.z])
    np.testing.assert_allclose(ratios / ratios.max(), spans / spans.max(), rtol=1e-6)  # equal scale
    assert scene.xaxis.range[0] > scene.xaxis.range[1]  # drawn reversed: not a mirror image
    # every joint of every frame lies inside the fixed ranges
    for f in fig.frames:
        pts = f.data[1]
        for vals, ax in ((pts.x, scene.xaxis), (pts.y, scene.yaxis), (pts.z, scene.zaxis)):
            lo, hi = sorted(ax.range)
            vals = np.asarray(vals, dtype=float)
            assert ((vals[np.isfinite(vals)] >= lo) & (vals[np.isfinite(vals)] <= hi)).all()


def test_camera_faces_the_person_whatever_way_they_turn():
    ds = generate(n_per_class={"clap": 1}, seed=1, noise=0.0, drop_rate=0.0, max_yaw=0.0)
    x = ds.x[0]
    eye = skeleton_animation(x, NTU).layout.scene.camera.eye
    assert eye.y < 0  # Kinect people face the camera (-z): the eye is on the camera side
    # the same person turned to face away: the eye moves behind (+z side) to see the front
    turned = x.copy()
    turned[0] *= -1
    turned[2] = 6.0 - turned[2]
    assert skeleton_animation(turned, NTU).layout.scene.camera.eye.y > 0


def test_absent_person_and_dropped_frames_are_not_drawn(wave):
    x, length = wave
    two = np.zeros(x.shape[:3] + (2,), dtype=np.float32)
    two[..., 0] = x[..., 0]
    fig = skeleton_animation(two, NTU, length=length)
    assert len(fig.data) == 2  # second person all zero: no traces
    two[..., 1] = x[..., 0] + np.array([0.8, 0.0, 0.0], dtype=np.float32)[:, None, None]
    fig = skeleton_animation(two, NTU, length=length, color="#4E79A7")
    assert len(fig.data) == 4 and all(len(f.data) == 4 for f in fig.frames)
    assert fig.data[0].line.color != fig.data[2].line.color
    one = x.copy()
    one[:, 0] = 0.0  # the sensor lost the skeleton in the first frame
    fig = skeleton_animation(one, NTU, length=length)
    assert _points(fig.frames[0].data[0].x) == 0 and _points(fig.frames[0].data[1].x) == 0
    assert _points(fig.frames[1].data[1].x) == NTU.num_joints


def test_short_sample_keeps_every_frame_and_length_defaults_to_last_nonzero(wave):
    x, length = wave
    short = x.copy()
    short[:, 40:] = 0.0
    fig = skeleton_animation(short, NTU)
    assert len(fig.frames) == 40


def test_2d_keypoints_are_drawn_flat():
    coco = get_layout("coco17")
    rng = np.random.default_rng(0)
    x = np.zeros((3, 10, 17, 1), dtype=np.float32)
    x[:2] = rng.uniform(100, 400, size=(2, 10, 17, 1))
    x[2] = 0.9
    x[2, :, 3] = 0.0  # one keypoint not detected
    fig = skeleton_animation(x, coco, channels=("x", "y", "score"))
    assert isinstance(fig.data[0], go.Scatter) and len(fig.frames) == 10
    assert np.isnan(fig.data[1].x[3]) and _points(fig.data[1].x) == 16
    assert fig.layout.yaxis.range[0] > fig.layout.yaxis.range[1]  # image y points down
    assert fig.layout.yaxis.scaleanchor == "x"
    assert isinstance(skeleton_animation(x[:2], coco).data[0], go.Scatter)


def test_skeleton_bad_input():
    with pytest.raises(DataFormatError, match="20 joints, layout ntu25 needs 25"):
        skeleton_animation(np.ones((3, 5, 20, 1)), NTU)
    with pytest.raises(DataFormatError, match=r"\(C, T, V, M\)"):
        skeleton_animation(np.ones((3, 5)), NTU)


# -- series, counts, spectrum, energy, curves -------------------------------------------------
def test_series_figure_one_line_per_channel():
    x = np.random.default_rng(0).normal(size=(6, 100, 1, 1))
    names = ("acc_x", "acc_y", "acc_z", "gyro_x", "gyro_y", "gyro_z")
    fig = series_figure(x, names, length=80, fps=10)
    assert [t.name for t in fig.data] == list(names)
    assert all(len(t.y) == 80 for t in fig.data)
    assert fig.data[0].x[-1] == pytest.approx(7.9)
    assert fig.layout.xaxis.title.text == "time (s)"
    with pytest.raises(DataFormatError, match="2 channel names for 6 channels"):
        series_figure(x, ("a", "b"))


def test_class_counts_side_by_side_with_class_colours_on_a_log_axis():
    classes = ["walk", "wave", "clap"]
    counts = {"human": np.array([10, 3, 1]), "propagated": np.array([50, 20, 2]),
              "none": np.array([140, 30, 7])}
    fig = class_counts_figure(classes, counts)
    assert [t.name for t in fig.data] == ["human", "propagated", "none"]
    assert fig.layout.barmode == "group" and fig.layout.yaxis.type == "log"  # log: not stacked
    colors = class_colors(classes)
    assert list(fig.data[0].marker.color) == [colors[c] for c in classes]
    assert list(fig.data[2].marker.color) == [UNLABELED_COLOR] * 3
    assert fig.data[1].marker.pattern.shape == "/"
    assert np.log10(140) <= fig.layout.yaxis.range[1] < np.log10(200)  # the largest bar, not a sum
    linear = class_counts_figure(classes, counts, log=False).layout
    assert linear.yaxis.type != "log" and linear.barmode == "stack"
    with pytest.raises(DataFormatError, match="expected one per class"):
        class_counts_figure(classes, {"human": np.array([1, 2])})


def test_spectrum_from_eigenvalues_or_density_pairs():
    rng = np.random.default_rng(0)
    before = np.clip(rng.normal(-0.1, 0.2, 500), -1, 1)
    after = np.clip(rng.normal(0.4, 0.2, 500), -1, 1)
    fig = spectrum_figure(before, after)
    assert len(fig.data) == 2
    for trace, vals in zip(fig.data, (before, after)):
        g, d = np.asarray(trace.x), np.asarray(trace.y)
        assert np.trapezoid(d, g) == pytest.approx(1.0, abs=0.02)  # a density
        assert g[np.argmax(d)] == pytest.approx(np.median(vals), abs=0.1)
    assert len(fig.layout.shapes) == 2  # mean markers
    grid = np.linspace(-1, 1, 50)
    fig = spectrum_figure((grid, np.exp(-grid**2)), (grid, np.exp(-(grid - 0.5) ** 2)))
    np.testing.assert_allclose(fig.data[1].y, np.exp(-(grid - 0.5) ** 2))
    with pytest.raises(DataFormatError, match="one length"):
        spectrum_figure((grid, grid[:10]), after)


def test_energy_histogram_one_panel_per_class_with_thresholds():
    rng = np.random.default_rng(1)
    classes = ["a", "b", "c", "d", "e"]
    labels = rng.integers(-1, 5, size=300)
    energy = rng.normal(-5, 1, size=300)
    fig = energy_histogram(energy, labels, classes, np.array([-6.0, -5.5, -5.0, -4.5, -4.0]))
    assert len(fig.data) == 6  # five classes + unlabeled
    colors = class_colors(classes)
    assert [t.marker.color for t in fig.data] == [colors[c] for c in classes] + [UNLABELED_COLOR]
    assert [len(t.x) for t in fig.data[:5]] == [int((labels == c).sum()) for c in range(5)]
    lines = [s for s in fig.layout.shapes if s.type == "line"]
    assert sorted(s.x0 for s in lines) == [-6.0, -5.5, -5.0, -4.5, -4.0]
    assert len(energy_histogram(energy, labels, classes, None).layout.shapes) == 0
    with pytest.raises(DataFormatError, match="3 thresholds for 5 classes"):
        energy_histogram(energy, labels, classes, np.zeros(3))


def test_energy_histogram_leaves_human_labels_out_and_counts_reliable():
    classes = ["a", "b"]
    labels = np.array([0, 0, 0, 1, 1, 1, -1])
    energy = np.array([-150.0, -12.0, -8.0, -140.0, -11.0, -3.0, 0.0])
    human = np.array([True, False, False, True, False, False, False])
    reliable = np.array([False, True, False, False, True, True, False])
    fig = energy_histogram(energy, labels, classes, np.array([-10.0, -2.0]), human=human,
                           reliable=reliable)
    assert [list(t.x) for t in fig.data] == [[-12.0, -8.0], [-11.0, -3.0], [0.0]]
    titles = [re.sub("<[^>]+>", " ", a.text).split() for a in fig.layout.annotations]
    assert titles == [["a", "1", "of", "2", "reliable"], ["b", "2", "of", "2", "reliable"],
                      ["unlabeled", "0", "of", "1", "reliable"]]
    lo, hi = fig.layout.xaxis.range
    assert -13.0 < lo < -12.0 and 0.0 < hi < 1.0  # the seeds' -150 and -140 no longer set the range
    with pytest.raises(DataFormatError, match="human has 3 values but energy 7"):
        energy_histogram(energy, labels, classes, None, human=human[:3])


def test_curves_one_line_per_strategy():
    curves = {"speler": ([10, 20, 40], [0.4, 0.6, 0.7]), "random": ([10, 20, 40], [0.3, 0.5, 0.6])}
    fig = curves_figure(curves, y_title="accuracy")
    assert [t.name for t in fig.data] == ["speler", "random"]
    assert list(fig.data[0].y) == [0.4, 0.6, 0.7]
    assert fig.data[0].line.width > fig.data[1].line.width
    assert fig.layout.yaxis.title.text == "accuracy"
    with pytest.raises(DataFormatError, match="3 x values but 2 y values"):
        curves_figure({"x": ([1, 2, 3], [0.1, 0.2])})


def test_play_loops_until_paused(wave):
    """Plotly plays a frame list once; "play" queues the frames many times over, so the motion
    loops (for minutes) until "pause"."""
    x, length = wave
    fig = skeleton_animation(x, NTU, length=length, fps=30)
    names = [f.name for f in fig.frames]
    play = next(b for b in fig.layout.updatemenus[0].buttons if "play" in b.label)
    queued = play.args[0]
    assert isinstance(queued, (list, tuple)) and len(queued) >= 20 * len(names)
    assert list(queued[:len(names)]) == names and list(queued[len(names):2 * len(names)]) == names
    assert set(queued) == set(names)
    duration = play.args[1]["frame"]["duration"]
    assert len(queued) * duration / 1000 > 60  # loops for more than a minute


def test_animation_coordinates_travel_as_float32(wave):
    x, length = wave
    doc = json.loads(skeleton_animation(x, NTU, length=length, fps=30).to_json())
    assert doc["frames"][3]["data"][1]["x"]["dtype"] == "f4"


def test_thumbnail_is_a_small_svg_of_poses_side_by_side(wave):
    import re
    import xml.etree.ElementTree as ET

    x, length = wave
    svg = thumbnail_svg(x, NTU, color="#E15759", length=length, poses=4)
    root = ET.fromstring(svg)  # well-formed, one <svg>, nothing for Plotly or WebGL to do
    assert root.tag.endswith("svg") and root.get("viewBox") == "0 0 400 150"
    paths = [e for e in root if e.tag.endswith("path")]
    assert len(paths) == 4  # one per pose
    assert paths[-1].get("stroke") == "#E15759" and paths[0].get("stroke") != "#E15759"
    assert all(len(re.findall("M", p.get("d"))) == len(NTU.bones) for p in paths)
    first_x = [float(re.match(r"M([\d.-]+)", p.get("d")).group(1)) for p in paths]
    assert first_x == sorted(first_x)  # left to right in time
    coords = [float(v) for p in paths for v in re.findall(r"[\d.]+", p.get("d"))]
    assert min(coords) >= 0 and max(coords) <= 400  # inside the box
    assert len(svg) < 20_000


def test_thumbnail_of_a_series_is_one_line_per_channel():
    import xml.etree.ElementTree as ET

    x = np.sin(np.linspace(0, 6, 50))[None, :] * np.arange(1, 4)[:, None]
    svg = thumbnail_svg(x[:, :, None, None], get_layout("series"), length=40)
    lines = [e for e in ET.fromstring(svg) if e.tag.endswith("polyline")]
    assert len(lines) == 3 and all(len(e.get("points").split()) == 40 for e in lines)


def test_thumbnail_bad_input():
    with pytest.raises(DataFormatError, match="joints"):
        thumbnail_svg(np.zeros((3, 10, 5, 1)), NTU)

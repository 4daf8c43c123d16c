"""Readers on the real datasets in ../shared/data and on small files written from each format's spec."""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest

from speler.data.layouts import get_layout
from speler.data.schema import SequenceSet
from speler.errors import DataFormatError
from speler.formats import FORMATS, LabelImport, detect, read, read_label_csv, write_pyskl
from speler.formats.bvh import parse_bvh
from speler.formats.safe_pickle import safe_loads

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
SAMPLE = REPO / "sample_data" / "basicmotions"


def need(name: str) -> Path:
    p = DATA / name
    if not p.is_dir():
        pytest.skip(f"real dataset folder {p} is absent (research data, not in the repository)")
    return p


# ================================================================================================
# Real datasets
# ================================================================================================
@pytest.fixture(scope="module")
def msr() -> SequenceSet:
    return read(need("MSRAction3D"))


@pytest.fixture(scope="module")
def utk() -> SequenceSet:
    return read(need("UTKinect-Action3D"))


def _bone_cv(ds: SequenceSet) -> dict[tuple[str, str], float]:
    """Median over samples of the coefficient of variation of each bone's length over time."""
    out = {}
    for c, p in ds.layout.bones:
        cvs = []
        for i in range(ds.n):
            s = ds.x[i, :, : ds.lengths[i], :, 0]
            tracked = np.abs(s).sum(axis=(0, 2)) > 0  # MSR has frames with every joint at 0
            length = np.linalg.norm(s[:, tracked, c] - s[:, tracked, p], axis=0)
            if len(length) > 1:
                cvs.append(length.std() / length.mean())
        out[(ds.layout.joints[c], ds.layout.joints[p])] = float(np.median(cvs))
    return out


def _symmetry(ds: SequenceSet) -> float:
    """Largest relative difference between the mean lengths of mirrored bones."""
    j = {n: i for i, n in enumerate(ds.layout.joints)}
    mean_len = {}
    for c, p in ds.layout.bones:
        d = [np.linalg.norm(ds.x[i, :, : ds.lengths[i], c, 0] - ds.x[i, :, : ds.lengths[i], p, 0],
                            axis=0).mean() for i in range(ds.n)]
        mean_len[(ds.layout.joints[c], ds.layout.joints[p])] = float(np.mean(d))
    worst = 0.0
    for (c, p), v in mean_len.items():
        if "Left" in c:
            mirror = (c.replace("Left", "Right"), p.replace("Left", "Right"))
            if mirror in mean_len:
                worst = max(worst, abs(v - mean_len[mirror]) / max(v, mean_len[mirror]))
    assert j  # layout has names
    return worst


def _highest_is_head(ds: SequenceSet) -> float:
    """Fraction of tracked frames whose highest joint (largest y) is the head."""
    head = ds.layout.joints.index("Head")
    hits = total = 0
    for i in range(ds.n):
        s = ds.x[i, :, : ds.lengths[i], :, 0]
        tracked = np.abs(s).sum(axis=(0, 2)) > 0
        top = s[1, tracked].argmax(axis=1)
        hits += int((top == head).sum())
        total += int(tracked.sum())
    return hits / total


def test_msr_action3d_facts(msr: SequenceSet) -> None:
    assert detect(DATA / "MSRAction3D") == "msr_action3d"
    assert msr.n == 567 and msr.num_classes == 20
    assert msr.layout.name == "msr_action3d" and msr.shape[1:] == (3, 936, 20, 1)
    assert msr.classes[0] == "high arm wave" and msr.classes[-1] == "pick up and throw"
    subjects = {re.match(r"a\d+_s(\d+)_e\d+", s).group(1) for s in msr.ids}
    assert len(subjects) == 10
    counts = dict(zip(msr.classes, msr.class_counts().tolist()))
    assert counts["side kick"] == 20  # a15
    assert [counts[c] for c in msr.classes[:7]] == [27, 27, 27, 26, 26, 26, 28]
    assert all(v == 30 for c, v in counts.items() if msr.classes.index(c) >= 7 and c != "side kick")
    long = msr.ids.tolist().index("a13_s09_e03_skeleton3D")
    assert msr.lengths[long] == 936
    rest = np.delete(msr.lengths, long)
    assert rest.min() == 13 and rest.max() == 100
    assert msr.fps == 15.0
    # first joint of the first frame of a01_s01_e01, exactly as written in the file
    first = (DATA / "MSRAction3D" / "a01_s01_e01_skeleton3D.txt").read_text().split()[:3]
    np.testing.assert_allclose(msr.x[0, :, 0, 0, 0], np.array(first, dtype=np.float32))
    assert msr.source_file[0] == "a01_s01_e01_skeleton3D.txt"
    assert (msr.x[np.arange(msr.n), :, msr.lengths - 1] != 0).any()


def test_msr_action3d_joint_order_is_anatomical(msr: SequenceSet) -> None:
    """The layout's bones hold still (bone lengths stable over time), mirror each other, head on top."""
    cv = _bone_cv(msr)
    assert max(cv.values()) < 0.1, sorted(cv.items(), key=lambda kv: -kv[1])[:3]
    assert _symmetry(msr) < 0.05
    assert _highest_is_head(msr) > 0.75


def test_msr_action3d_right_is_the_right_side(msr: SequenceSet) -> None:
    """MSR subjects used the right arm/leg for one-limb actions; the named right hand must move more."""
    j = {n: i for i, n in enumerate(msr.layout.joints)}

    def moves(i: int, name: str) -> float:
        return float(msr.x[i, :, : msr.lengths[i], j[name], 0].std(axis=1).sum())

    one_arm = np.flatnonzero(msr.y < 9)  # a01..a09: high arm wave .. draw circle
    right = np.mean([moves(i, "HandRight") > moves(i, "HandLeft") for i in one_arm])
    kicks = np.flatnonzero(np.isin(msr.y, [13, 14]))  # a14 forward kick, a15 side kick
    right_leg = np.mean([moves(i, "FootRight") > moves(i, "FootLeft") for i in kicks])
    assert right > 0.9 and right_leg > 0.9


def test_utkinect_facts(utk: SequenceSet) -> None:
    assert detect(DATA / "UTKinect-Action3D") == "utkinect"
    assert utk.n == 199 and utk.num_classes == 10
    assert utk.classes == ("walk", "sitDown", "standUp", "pickUp", "carry", "throw", "push", "pull",
                           "waveHands", "clapHands")
    counts = dict(zip(utk.classes, utk.class_counts().tolist()))
    assert counts["carry"] == 19 and all(v == 20 for c, v in counts.items() if c != "carry")
    assert "joints_s10_e02#carry" not in set(utk.ids)  # NaN range in actionLabel.txt
    assert utk.lengths.min() == 5 and utk.lengths.max() == 174
    assert len({s.split("_")[1] for s in utk.ids}) == 10
    assert utk.layout.name == "kinect_v1" and utk.shape[1:] == (3, 174, 20, 1)
    # walk of s01_e01 spans frame ids 252..390: count those lines in the file by hand
    rows = np.loadtxt(DATA / "UTKinect-Action3D" / "joints_s01_e01.txt")
    sel = rows[(rows[:, 0] >= 252) & (rows[:, 0] <= 390)]
    i = utk.ids.tolist().index("joints_s01_e01#walk")
    assert utk.lengths[i] == len(sel)
    np.testing.assert_allclose(utk.x[i, :, : len(sel), :, 0].transpose(1, 2, 0),
                               sel[:, 1:].reshape(-1, 20, 3).astype(np.float32))


def test_utkinect_joint_order_is_anatomical(utk: SequenceSet) -> None:
    cv = _bone_cv(utk)
    assert max(cv.values()) < 0.25
    assert _symmetry(utk) < 0.1
    assert _highest_is_head(utk) > 0.8
    j = {n: i for i, n in enumerate(utk.layout.joints)}
    throw_push_pull = np.flatnonzero(np.isin(utk.y, [5, 6, 7]))
    moves = [utk.x[i, :, : utk.lengths[i], j["HandRight"], 0].std(1).sum()
             > utk.x[i, :, : utk.lengths[i], j["HandLeft"], 0].std(1).sum() for i in throw_push_pull]
    assert np.mean(moves) > 0.85


def test_utkinect_single_file_uses_its_folder_labels() -> None:
    f = need("UTKinect-Action3D") / "joints_s01_e01.txt"
    ds = read(f)
    assert ds.n == 10 and ds.ids[0] == "joints_s01_e01#walk"
    assert ds.source_file[0] == "joints_s01_e01.txt"


def test_natops_facts() -> None:
    ds = read(need("NATOPS"))
    assert ds.n == 360 and ds.num_classes == 6 and ds.shape[1:] == (3, 51, 8, 1)
    assert ds.layout.name == "natops8" and ds.classes == ("1.0", "2.0", "3.0", "4.0", "5.0", "6.0")
    assert ds.class_counts().tolist() == [60] * 6
    assert (ds.lengths == 51).all()
    # dimension 3*marker+axis: marker 1 (hand tip right), axis y = dimension 4 of the first case
    line = next(ln for ln in (DATA / "NATOPS" / "NATOPS_TEST.ts").read_text(errors="replace")
                .splitlines() if ln and ln[0] not in "#@")
    dim4 = np.array(line.split(":")[4].split(","), dtype=np.float32)
    np.testing.assert_allclose(ds.x[0, 1, :, 1, 0], dim4)


def test_epilepsy_facts() -> None:
    ds = read(need("Epilepsy_UEA"))
    assert ds.n == 275 and ds.shape[1:] == (3, 206, 1, 1) and ds.layout.name == "series"
    assert ds.classes == ("EPILEPSY", "WALKING", "RUNNING", "SAWING")
    assert ds.class_counts().tolist() == [68, 74, 73, 60]
    assert ds.fps == 16.0


def test_basicmotions_facts_and_bundled_copy() -> None:
    ds = read(need("BasicMotions"))
    assert ds.n == 80 and ds.shape[1:] == (6, 100, 1, 1)
    assert ds.classes == ("Standing", "Running", "Walking", "Badminton")
    assert ds.class_counts().tolist() == [20, 20, 20, 20]
    assert {"BasicMotions_TRAIN#12", "BasicMotions_TEST#39"} <= set(ds.ids)
    bundled = read(SAMPLE)
    np.testing.assert_array_equal(bundled.x, ds.x)
    np.testing.assert_array_equal(bundled.ids, ds.ids)
    for name in ("BasicMotions_TRAIN.ts", "BasicMotions_TEST.ts"):
        assert (SAMPLE / name).read_bytes() == (DATA / "BasicMotions" / name).read_bytes()


def test_bundled_sample_has_licence_and_readme() -> None:
    assert "BSD 3-Clause" in (SAMPLE / "LICENSE").read_text()
    readme = (SAMPLE / "README.md").read_text()
    assert "aeon-1.6.0" in readme and "aeon/datasets/data/BasicMotions" in readme
    ds = read(SAMPLE)
    assert ds.n == 80 and ds.fps == 10.0


def test_ids_stable_and_progress_per_file() -> None:
    root = need("UTKinect-Action3D")
    calls: list[tuple[int, int]] = []
    a = read(root, progress=lambda d, t: calls.append((d, t)))
    b = read(root, format="utkinect")
    np.testing.assert_array_equal(a.ids, b.ids)
    assert a.fingerprint() == b.fingerprint()
    assert calls == [(k, 20) for k in range(1, 21)]


# ================================================================================================
# NTU RGB+D .skeleton
# ================================================================================================
def ntu_text(frames: list[list[tuple[str, np.ndarray]]]) -> str:
    """A .skeleton file: per frame a list of (body id, joints (25, 3))."""
    out = [str(len(frames))]
    for bodies in frames:
        out.append(str(len(bodies)))
        for bid, xyz in bodies:
            out.append(f"{bid} 0 1 1 1 1 0 0.1 0.2 2")
            out.append(str(len(xyz)))
            for x, y, z in xyz:
                out.append(f"{x} {y} {z} 250.1 200.2 900.3 500.4 0.1 0.2 0.3 0.4 2")
    return "\n".join(out) + "\n"


def _body(rng: np.random.Generator, scale: float) -> np.ndarray:
    return np.round(rng.normal(size=(25, 3)) * scale, 4)


def test_ntu_keeps_two_most_active_bodies(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    base = _body(rng, 0.3)
    frames = []
    for t in range(6):
        still = base + 1.0  # never moves
        big = base + np.round(0.5 * np.sin(t), 4)  # moves most
        small = base + np.round(0.05 * t, 4)  # moves a little, absent in frame 0
        bodies = [("111", still), ("333", big)] + ([("222", small)] if t else [])
        frames.append(bodies)
    f = tmp_path / "S001C002P003R001A012.skeleton"
    f.write_text(ntu_text(frames))
    assert detect(f) == "ntu"
    ds = read(f)
    assert ds.shape == (1, 3, 6, 25, 2) and ds.layout.name == "ntu25" and ds.fps == 30.0
    assert ds.classes == ("A012",) and ds.y.tolist() == [0]
    assert ds.ids.tolist() == ["S001C002P003R001A012"]
    for t in range(6):
        np.testing.assert_allclose(ds.x[0, :, t, :, 0], (base + np.round(0.5 * np.sin(t), 4)).T,
                                   rtol=1e-6)
    np.testing.assert_array_equal(ds.x[0, :, 0, :, 1], 0)  # body 222 absent in frame 0
    np.testing.assert_allclose(ds.x[0, :, 3, :, 1], (base + 0.15).T, rtol=1e-6)


def test_ntu_folder_classes_in_numeric_order(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    for name, t in (("S001C001P001R001A010", 3), ("S001C001P001R001A002", 5),
                    ("sub/S002C001P001R002A002", 4), ("noname", 2)):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f"{name}.skeleton").write_text(
            ntu_text([[("1", _body(rng, 1))] for _ in range(t)]))
    calls = []
    ds = read(tmp_path, progress=lambda d, n: calls.append(d))
    assert ds.classes == ("A002", "A010")
    # natural, case-insensitive order of the relative paths
    assert ds.ids.tolist() == ["noname", "S001C001P001R001A002", "S001C001P001R001A010",
                               "sub/S002C001P001R002A002"]
    assert ds.y.tolist() == [-1, 0, 1, 0] and ds.lengths.tolist() == [2, 5, 3, 4]
    assert ds.shape == (4, 3, 5, 25, 1) and calls == [1, 2, 3, 4]
    np.testing.assert_array_equal(ds.x[2, :, 3:], 0)


@pytest.mark.parametrize("mutate, message", [
    (lambda s: s.replace("\n25\n", "\n24\n", 1), "has 24 joints, layout ntu25 needs 25"),
    (lambda s: "\n".join(s.splitlines()[:40]), "does not fit|ends at frame|lines"),
    (lambda s: "999999999999\n" + s.split("\n", 1)[1], "header says 999999999999 frames"),
    (lambda s: s.replace("250.1", "250,1", 1), "value '250,1'"),
    (lambda s: s.replace("0 1 1 1 1 0 0.1 0.2 2", "0 1 1", 1), "body info has 4 values"),
    (lambda s: "two\n" + s.split("\n", 1)[1], "frame count 'two' is not an integer"),
    (lambda s: s + "1\n", "unexpected data after the last frame"),
])
def test_ntu_bad_files(tmp_path: Path, mutate, message) -> None:
    rng = np.random.default_rng(2)
    good = ntu_text([[("7", _body(rng, 1))] for _ in range(3)])
    f = tmp_path / "bad.skeleton"
    f.write_text(mutate(good))
    with pytest.raises(DataFormatError, match=message) as err:
        read(f)
    assert "bad.skeleton" in str(err.value)


def test_ntu_nan_coordinate_names_the_frame(tmp_path: Path) -> None:
    xyz = np.ones((25, 3))
    text = ntu_text([[("7", xyz)], [("7", xyz)], [("7", xyz)]]).splitlines()
    # frame 2's first joint line: header 1 + per frame (1 + 2 + 25)
    line = 1 + 2 * 28 + 3
    text[line] = "nan " + text[line].split(" ", 1)[1]
    f = tmp_path / "n.skeleton"
    f.write_text("\n".join(text))
    with pytest.raises(DataFormatError, match=r"n\.skeleton: frame 2 body 0 has non-finite"):
        read(f)


def test_ntu_no_body_is_an_error(tmp_path: Path) -> None:
    f = tmp_path / "empty.skeleton"
    f.write_text("2\n0\n0\n")
    with pytest.raises(DataFormatError, match="no body in any frame"):
        read(f)


# ================================================================================================
# MSR Action3D and UTKinect from the spec
# ================================================================================================
def test_msr_spec_file_and_wrong_joint_count(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    vals = np.round(rng.normal(size=(3, 20, 4)), 5)
    f = tmp_path / "a07_s02_e01_skeleton3D.txt"
    f.write_text("\n".join(" ".join(f"{v:.5f}" for v in row) for row in vals.reshape(-1, 4)))
    ds = read(f)
    assert ds.classes == ("draw x",) and ds.shape == (1, 3, 3, 20, 1)
    np.testing.assert_allclose(ds.x[0, :, :, :, 0], vals[:, :, :3].transpose(2, 0, 1), rtol=1e-5)
    f.write_text("\n".join(f.read_text().splitlines()[:-1]))  # 59 lines
    with pytest.raises(DataFormatError, match="59 joint lines is not a multiple of 20"):
        read(f)
    f.write_text("1 2 3\n" * 20)
    with pytest.raises(DataFormatError, match="line 1: expected 4 values"):
        read(f, format="msr_action3d")


def test_utkinect_spec_cutting(tmp_path: Path) -> None:
    ids = [10, 12, 12, 16, 20, 24, 30]
    lines = [" ".join([str(i)] + [f"{i + j / 100:.2f}" for j in range(60)]) for i in ids]
    (tmp_path / "joints_s03_e02.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "actionLabel.txt").write_text(
        "s03_e02\nwalk: 10 12\nthrow: 16 24 \ncarry:  NaN NaN\n")
    ds = read(tmp_path)
    assert ds.ids.tolist() == ["joints_s03_e02#walk", "joints_s03_e02#throw"]
    assert ds.lengths.tolist() == [3, 3] and ds.classes == ("walk", "throw", "carry")
    assert ds.source_index.tolist() == [0, 1]
    np.testing.assert_allclose(ds.x[1, 0, :, 0, 0], [16.0, 20.0, 24.0])  # joint 0, x
    np.testing.assert_allclose(ds.x[1, 2, 0, 19, 0], 16.59, rtol=1e-6)  # last joint, z
    (tmp_path / "actionLabel.txt").write_text("s03_e02\nwalk: 40 50\n")
    with pytest.raises(DataFormatError, match="walk.*matches no line"):
        read(tmp_path)
    (tmp_path / "actionLabel.txt").write_text("s01_e01\nwalk: 10 12\n")
    with pytest.raises(DataFormatError, match="no block 's03_e02'"):
        read(tmp_path)


# ================================================================================================
# NW-UCLA JSON
# ================================================================================================
def test_nwucla_file_and_folder(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    sk = np.round(rng.normal(size=(4, 20, 3)), 4)
    (tmp_path / "a02_s01_e00_v01.json").write_text(json.dumps(
        {"file_name": "a02_s01_e00_v01", "skeletons": sk.tolist(), "label": 2}))
    (tmp_path / "a12_s02_e01_v03.json").write_text(json.dumps(
        {"file_name": "a12_s02_e01_v03", "skeletons": sk[:2].tolist(), "label": 10}))
    assert detect(tmp_path) == "nwucla"
    ds = read(tmp_path)
    assert ds.classes == ("pick up with two hands", "carry") and ds.y.tolist() == [0, 1]
    assert ds.layout.name == "kinect_v1" and ds.lengths.tolist() == [4, 2]
    np.testing.assert_allclose(ds.x[0, :, :, :, 0], sk.transpose(2, 0, 1), rtol=1e-6)
    single = read(tmp_path / "a12_s02_e01_v03.json")
    assert single.ids.tolist() == ["a12_s02_e01_v03"] and single.classes == ("carry",)


@pytest.mark.parametrize("obj, message", [
    ({"skeletons": [[[0, 0, 0]] * 19], "label": 1}, "frame 0 has 19 joints"),
    ({"skeletons": [[[0, 0]] * 20], "label": 1}, "frame 0 joint 0: expected 3 numbers"),
    ({"skeletons": [], "label": 1}, "non-empty list"),
    ({"label": 1}, "'skeletons' is missing"),
    ({"skeletons": [[[0, 0, 0]] * 20], "label": 1.5}, "label"),
])
def test_nwucla_bad(tmp_path: Path, obj, message) -> None:
    f = tmp_path / "x.json"
    f.write_text(json.dumps(obj))
    with pytest.raises(DataFormatError, match=message):
        read(f, format="nwucla")


def test_nwucla_nan_and_broken_json(tmp_path: Path) -> None:
    f = tmp_path / "x.json"
    f.write_text('{"skeletons": [' + ",".join(["[" + ",".join(["[1,2,3]"] * 20) + "]"] * 2)
                 .replace("[1,2,3]]", "[1,2,NaN]]", 1) + '], "label": 3}')
    with pytest.raises(DataFormatError, match=r"x\.json: frame 0 has non-finite"):
        read(f)
    f.write_text('{"skeletons": [[[1,2,3]')
    with pytest.raises(DataFormatError, match="not valid JSON"):
        read(f, format="nwucla")


# ================================================================================================
# OpenPose JSON
# ================================================================================================
def _person(rng: np.random.Generator, v: int, score: float) -> dict:
    kp = np.column_stack([np.round(rng.uniform(0, 640, v), 2), np.round(rng.uniform(0, 480, v), 2),
                          np.full(v, score)])
    return {"person_id": [-1], "pose_keypoints_2d": kp.ravel().tolist(), "face_keypoints_2d": []}


def test_openpose_sample_folders(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    people = {}
    for cls, vid, n in (("wave", "v1", 3), ("wave", "v2", 2), ("jump", "v3", 12)):
        d = tmp_path / cls / vid
        d.mkdir(parents=True)
        for t in range(n):
            ps = [_person(rng, 25, s) for s in (0.2, 0.9, 0.5)] if t == 1 else [_person(rng, 25, 0.7)]
            people[(vid, t)] = ps
            (d / f"{vid}_{t:d}_keypoints.json").write_text(json.dumps({"version": 1.3, "people": ps}))
    assert detect(tmp_path) == "openpose"
    ds = read(tmp_path)
    assert ds.layout.name == "openpose25" and ds.channels == ("x", "y", "score")
    assert ds.ids.tolist() == ["jump/v3", "wave/v1", "wave/v2"] and ds.classes == ("jump", "wave")
    assert ds.lengths.tolist() == [12, 3, 2] and ds.shape == (3, 3, 12, 25, 2)
    # frames sorted by number (v3_10 after v3_9), people by mean score (0.9 then 0.5; 0.2 dropped)
    kp10 = np.array(people[("v3", 10)][0]["pose_keypoints_2d"]).reshape(25, 3)
    np.testing.assert_allclose(ds.x[0, :, 10, :, 0], kp10.T, rtol=1e-6)
    t1 = [np.array(p["pose_keypoints_2d"]).reshape(25, 3) for p in people[("v1", 1)]]
    np.testing.assert_allclose(ds.x[1, :, 1, :, 0], t1[1].T, rtol=1e-6)
    np.testing.assert_allclose(ds.x[1, :, 1, :, 1], t1[2].T, rtol=1e-6)
    np.testing.assert_array_equal(ds.x[1, :, 0, :, 1], 0)
    # a labels file overrides the folder names
    (tmp_path / "labels.csv").write_text("id,label\nwave/v1,hello\njump/v3,hop\n")
    ds2 = read(tmp_path, format="openpose")
    assert ds2.classes == ("hello", "hop") and ds2.y.tolist() == [1, 0, -1]
    (tmp_path / "labels.csv").write_text("id,label\nwave/v9,hello\n")
    with pytest.raises(DataFormatError, match=r"labels\.csv: 1 ids name no sample folder"):
        read(tmp_path)


def test_openpose_coco18_single_folder_and_errors(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    d = tmp_path / "clip"
    d.mkdir()
    for t in range(3):
        (d / f"clip_{t:012d}_keypoints.json").write_text(json.dumps(
            {"people": [_person(rng, 18, 0.5)] if t != 1 else []}))
    ds = read(d)
    assert ds.layout.name == "openpose18" and ds.ids.tolist() == ["clip"] and ds.y.tolist() == [-1]
    np.testing.assert_array_equal(ds.x[0, :, 1], 0)
    (d / "clip_000000000003_keypoints.json").write_text(json.dumps({"people": [_person(rng, 25, 1)]}))
    with pytest.raises(DataFormatError, match="cannot be mixed"):
        read(d)
    (d / "clip_000000000003_keypoints.json").write_text(
        json.dumps({"people": [{"pose_keypoints_2d": [1.0] * 60}]}))
    with pytest.raises(DataFormatError, match="has 60 values, expected 75"):
        read(d, format="openpose")
    (d / "clip_000000000003_keypoints.json").write_text(
        '{"people": [{"pose_keypoints_2d": [' + ",".join(["1"] * 53 + ["NaN"]) + "]}]}")
    with pytest.raises(DataFormatError, match="clip_000000000003_keypoints.json: person 0.*non-finite"):
        read(d, format="openpose")


# ================================================================================================
# PYSKL pickles and the restricted unpickler
# ================================================================================================
def _pyskl_obj(rng: np.random.Generator, v: int = 17) -> dict:
    annos = []
    for i, (m, t, label) in enumerate(((2, 5, 3), (1, 7, 0), (1, 3, 3))):
        annos.append({
            "frame_dir": f"S001C001P001R001A{i:03d}",
            "label": np.int64(label) if i == 0 else label,
            "img_shape": (1080, 1920), "original_shape": (1080, 1920), "total_frames": t,
            "keypoint": rng.uniform(0, 1000, (m, t, v, 2)).astype(np.float16),
            "keypoint_score": rng.uniform(0, 1, (m, t, v)).astype(np.float16),
        })
    return {"split": {"xsub_train": [a["frame_dir"] for a in annos[:2]],
                      "xsub_val": [annos[2]["frame_dir"]]}, "annotations": annos}


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_pyskl_read(tmp_path: Path, protocol: int) -> None:
    rng = np.random.default_rng(7)
    obj = _pyskl_obj(rng)
    f = tmp_path / "ntu60_2d.pkl"
    f.write_bytes(pickle.dumps(obj, protocol=protocol))
    assert detect(f) == "pyskl"
    ds = read(f)
    assert ds.layout.name == "coco17" and ds.channels == ("x", "y", "score")
    assert ds.classes == ("0", "3") and ds.y.tolist() == [1, 0, 1]
    assert ds.shape == (3, 3, 7, 17, 2) and ds.lengths.tolist() == [5, 7, 3]
    a = obj["annotations"][0]
    np.testing.assert_array_equal(ds.x[0, :2, :5, :, 1],
                                  a["keypoint"][1].astype(np.float32).transpose(2, 0, 1))
    np.testing.assert_array_equal(ds.x[0, 2, :5, :, 0], a["keypoint_score"][0].astype(np.float32))
    np.testing.assert_array_equal(ds.x[1, :, :, :, 1], 0)  # one person only
    assert ds.ids.tolist() == [a["frame_dir"] for a in obj["annotations"]]


def test_pyskl_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    x = rng.normal(size=(3, 4, 6, 25, 2)).astype(np.float32)
    x[1, :, 4:] = 0
    ds = SequenceSet(x=x, ids=np.array(["a", "b", "c"]), classes=("walk", "run", "sit"),
                     y=np.array([2, -1, 0]), layout=get_layout("ntu25"), fps=30.0,
                     lengths=np.array([6, 4, 6]), channels=("x", "y", "z", "score"))
    f = tmp_path / "out" / "export.pkl"
    write_pyskl(ds, f)
    back = read(f)
    np.testing.assert_array_equal(back.x, ds.x)
    assert back.ids.tolist() == ["a", "b", "c"] and back.classes == ds.classes
    assert back.y.tolist() == [2, -1, 0] and back.lengths.tolist() == [6, 4, 6]
    assert back.layout == ds.layout and back.channels == ds.channels and back.fps == 30.0
    # the pickle is a plain PYSKL file
    obj = safe_loads(f.read_bytes())
    assert obj["annotations"][0]["keypoint"].shape == (2, 6, 25, 3)
    assert obj["annotations"][0]["keypoint_score"].shape == (2, 6, 25)
    # explicit labels, and a layout PYSKL does not know (kinect_v1, V = 20) round trips too
    k1 = ds.replace(x=x[:, :3, :, :20], layout=get_layout("kinect_v1"), channels=("x", "y", "z"))
    write_pyskl(k1, f, labels=np.array([1, 1, -1]))
    back = read(f)
    assert back.layout.name == "kinect_v1" and back.y.tolist() == [1, 1, -1]
    np.testing.assert_array_equal(back.x, k1.x)
    with pytest.raises(DataFormatError, match="label 5 of sample 'a'"):
        write_pyskl(ds, f, labels=np.array([5, 0, 0]))


class _Hostile:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


class _HostileEval:
    def __reduce__(self):
        return (eval, ("__import__('os').getcwd()",))


def test_restricted_unpickler_refuses_and_runs_nothing(tmp_path: Path) -> None:
    target = tmp_path / "pwned"
    f = tmp_path / "evil.pkl"
    f.write_bytes(pickle.dumps({"annotations": [_Hostile(target)]}))
    with pytest.raises(DataFormatError, match=r"evil\.pkl: refused to unpickle the global"
                                              r" (posix|os|nt)\.system"):
        read(f)
    assert not target.exists()
    with pytest.raises(DataFormatError, match="refused"):
        read(f, format="pyskl")
    assert not target.exists()
    f.write_bytes(pickle.dumps([_HostileEval()]))
    with pytest.raises(DataFormatError, match=r"builtins\.eval"):
        read(f)
    # a pickle asking numpy for a 10^14-element array is refused before allocation
    import numpy._core.multiarray as ma  # noqa: PLC0415

    class Huge:
        def __reduce__(self):
            return (ma._reconstruct, (np.ndarray, (10**7, 10**7), b"b"))

    f.write_bytes(pickle.dumps({"annotations": [Huge()]}))
    with pytest.raises(DataFormatError, match="larger than"):
        read(f)

    class DirectNdarray:  # numpy.ndarray((10**5, 10**5)) would map 80 GB from a few bytes
        def __reduce__(self):
            return (np.ndarray, ((10**5, 10**5), "f8"))

    class Bytes:
        def __reduce__(self):
            return (bytearray, (10**11,))

    for bomb in (DirectNdarray(), Bytes()):
        f.write_bytes(pickle.dumps({"annotations": [bomb]}))
        with pytest.raises(DataFormatError, match=r"evil\.pkl: not a readable pickle"):
            read(f)


def test_restricted_unpickler_reads_numpy1_pickles() -> None:
    """Pickles written by numpy 1.x name numpy.core.multiarray; they load the same."""
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    data = pickle.dumps({"a": arr, "s": np.float64(2.5)}, protocol=2)
    old = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert old != data
    back = safe_loads(old)
    np.testing.assert_array_equal(back["a"], arr)
    assert back["s"] == 2.5


@pytest.mark.parametrize("change, message", [
    (lambda o: o["annotations"][1].update(keypoint=np.zeros((1, 7, 16, 2)),
                                          keypoint_score=np.zeros((1, 7, 16))),
     "annotation 1: keypoint has 16 joints, layout coco17 needs 17"),
    (lambda o: o["annotations"][1].update(keypoint_score=np.zeros((1, 6, 17))), "keypoint_score"),
    (lambda o: o["annotations"][0]["keypoint"].__setitem__((0, 2, 3, 0), np.nan),
     "annotation 0: frame 2 has non-finite"),
    (lambda o: o["annotations"][2].update(label="walk"), "'label' must be an integer"),
    (lambda o: o["annotations"][1].pop("keypoint"), "'keypoint' is missing"),
    (lambda o: o.pop("annotations"), "without 'annotations'"),
    (lambda o: o["annotations"][0].update(keypoint=np.zeros((1, 5, 17, 4))), "4 coordinates"),
])
def test_pyskl_bad(tmp_path: Path, change, message) -> None:
    obj = _pyskl_obj(np.random.default_rng(9))
    change(obj)
    f = tmp_path / "bad.pkl"
    f.write_bytes(pickle.dumps(obj))
    with pytest.raises(DataFormatError, match=message):
        read(f)


def test_pyskl_truncated(tmp_path: Path) -> None:
    data = pickle.dumps(_pyskl_obj(np.random.default_rng(10)))
    f = tmp_path / "cut.pkl"
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataFormatError, match=r"cut\.pkl: not a readable pickle"):
        read(f)


# ================================================================================================
# BVH
# ================================================================================================
BVH = """HIERARCHY
ROOT Hips
{
  OFFSET 0 0 0
  CHANNELS 6 Xposition Yposition Zposition Zrotation Xrotation Yrotation
  JOINT Chest
  {
    OFFSET 0 10 0
    CHANNELS 3 Zrotation Xrotation Yrotation
    End Site
    {
      OFFSET 0 5 0
    }
  }
  JOINT LeftArm
  {
    OFFSET 3 0 0
    CHANNELS 2 Xrotation Yrotation
    End Site
    {
      OFFSET 4 0 0
    }
  }
  JOINT RightArm
  {
    OFFSET -3 0 0
    CHANNELS 2 Yrotation Xrotation
    End Site
    {
      OFFSET 4 0 0
    }
  }
}
MOTION
Frames: 3
Frame Time: 0.04
0 0 0 0 0 0 0 0 0 0 0 0 0
1 2 3 90 0 0 0 90 0 0 0 0 0
0 0 0 0 0 0 0 0 0 90 90 90 90
"""


def test_bvh_forward_kinematics_by_hand(tmp_path: Path) -> None:
    f = tmp_path / "take.bvh"
    f.write_text(BVH)
    assert detect(f) == "bvh"
    ds = read(f)
    names = ["Hips", "Chest", "Chest_End", "LeftArm", "LeftArm_End", "RightArm", "RightArm_End"]
    assert ds.layout.joints == tuple(names) and ds.layout.name == "bvh:Hips"
    assert ds.fps == pytest.approx(25.0) and ds.shape == (1, 3, 3, 7, 1)
    pos = ds.x[0, :, :, :, 0].transpose(1, 2, 0)  # (T, V, 3)
    # frame 0: rest pose = accumulated offsets
    np.testing.assert_allclose(pos[0], [[0, 0, 0], [0, 10, 0], [0, 15, 0], [3, 0, 0], [7, 0, 0],
                                        [-3, 0, 0], [1, 0, 0]], atol=1e-5)
    # frame 1: root at (1, 2, 3) turned 90 deg about z, so (0, 10, 0) -> (-10, 0, 0); the chest
    # turns 90 deg about x, so its end site (0, 5, 0) -> (0, 0, 5) before the root's turn (which
    # leaves z alone)
    np.testing.assert_allclose(pos[1, :3], [[1, 2, 3], [-9, 2, 3], [-9, 2, 8]], atol=1e-5)
    np.testing.assert_allclose(pos[1, 3], [1, 5, 3], atol=1e-5)  # (3, 0, 0) turned about z
    # frame 2: LeftArm "Xrotation Yrotation" = Rx(90) Ry(90): (4,0,0) -> Ry -> (0,0,-4) -> Rx ->
    # (0,4,0); RightArm "Yrotation Xrotation" = Ry(90) Rx(90): (4,0,0) -> Rx -> (4,0,0) -> Ry ->
    # (0,0,-4)
    np.testing.assert_allclose(pos[2, 4], [3, 4, 0], atol=1e-5)
    np.testing.assert_allclose(pos[2, 6], [-3, 0, -4], atol=1e-5)
    assert ds.layout.pairs == ((3, 5), (4, 6))


def test_bvh_folder_classes_and_hierarchy_check(tmp_path: Path) -> None:
    for cls in ("jump", "walk"):
        (tmp_path / cls).mkdir()
        (tmp_path / cls / "t1.bvh").write_text(BVH)
    ds = read(tmp_path)
    assert ds.ids.tolist() == ["jump/t1", "walk/t1"] and ds.classes == ("jump", "walk")
    (tmp_path / "walk" / "t2.bvh").write_text(BVH.replace("LeftArm", "LeftShoulder"))
    with pytest.raises(DataFormatError, match=r"t2\.bvh: its hierarchy"):
        read(tmp_path)


@pytest.mark.parametrize("mutate, message", [
    (lambda s: s.replace("Frames: 3", "Frames: 1000000000000"), "header says 1000000000000 frames"),
    (lambda s: s[: s.rindex("0 0 0 0 0 0 0 0 0 90")], "truncated or corrupt"),
    (lambda s: s.replace("1 2 3 90", "1 2 nan 90"), "frame 1 has non-finite"),
    (lambda s: s.replace("CHANNELS 2 Xrotation Yrotation", "CHANNELS 2 Xrotation Wrotation"),
     "unknown channel 'wrotation'"),
    (lambda s: s.replace("HIERARCHY", "HIERARCHX"), "does not start with HIERARCHY"),
    (lambda s: s.split("MOTION")[0][:-4], "file ends inside the hierarchy"),
    (lambda s: s.replace("Frame Time: 0.04", "Frame Time: -1"), "frame time"),
    (lambda s: s.replace("OFFSET 3 0 0", "OFFSET 3 zero 0"), "value 'zero'"),
])
def test_bvh_bad(tmp_path: Path, mutate, message) -> None:
    f = tmp_path / "bad.bvh"
    f.write_text(mutate(BVH))
    with pytest.raises(DataFormatError, match=message) as err:
        read(f)
    assert "bad.bvh" in str(err.value)


def test_bvh_parse_returns_frame_time() -> None:
    joints, pos, frame_time = parse_bvh(BVH, "mem.bvh")
    assert frame_time == 0.04 and pos.shape == (3, 7, 3) and joints[2].end_site


# ================================================================================================
# UEA .ts from the spec
# ================================================================================================
TS = """# comment
@problemName Toy
@timeStamps false
@missing true
@univariate false
@dimensions 2
@equalLength false
@classLabel true up down
@data
1,?,3,4:10,20,30,40:up
?,2,?:5,5,?:down
1,2:3,4:up
"""


def test_uea_missing_and_unequal(tmp_path: Path) -> None:
    f = tmp_path / "Toy_TRAIN.ts"
    f.write_text(TS)
    ds = read(f)
    assert ds.shape == (3, 2, 4, 1, 1) and ds.lengths.tolist() == [4, 3, 2]
    assert ds.classes == ("up", "down") and ds.y.tolist() == [0, 1, 0]
    np.testing.assert_allclose(ds.x[0, 0, :, 0, 0], [1, 2, 3, 4])  # interpolated
    np.testing.assert_allclose(ds.x[1, 0, :3, 0, 0], [2, 2, 2])  # edges by the nearest value
    np.testing.assert_allclose(ds.x[1, 1, :3, 0, 0], [5, 5, 5])
    np.testing.assert_array_equal(ds.x[2, :, 2:], 0)
    assert ds.ids.tolist() == ["Toy_TRAIN#0", "Toy_TRAIN#1", "Toy_TRAIN#2"]


@pytest.mark.parametrize("line, message", [
    ("?,?:1,2:up", "line 13, dimension 0: every value is missing"),
    ("1,2:3,4:sideways", "line 13: class label 'sideways' is not one of"),
    ("1,2:up", "line 13: case has 1 dimensions, expected 2"),
    ("1,2:3,4,5:up", "line 13: dimension 1 has 3 values"),
    ("1,x:3,4:up", "line 13, dimension 0: value 'x'"),
    ("1,inf:3,4:up", "infinite"),
    # a file cut inside a case: its values where the label belongs, not an "unknown class"
    ("1,2:3,4", r"line 13: the case ends in values where its class label should be, after 1 "
                r"dimension\(s\) of the 2 expected: the line looks cut short"),
    ("1,2:3,4,", "line 13: the case ends in values where its class label should be"),
    ("1,2,3", r"line 13: case has no class label after the last ':' \(it ends in values: the "
              r"line looks cut short\)"),
    ("1,2:3,4:7", "line 13: class label '7' is not one of"),  # one number: a wrong label
])
def test_uea_bad_cases(tmp_path: Path, line: str, message: str) -> None:
    f = tmp_path / "Toy_TEST.ts"
    f.write_text(TS + line + "\n")
    with pytest.raises(DataFormatError, match=message):
        read(f)


def test_uea_folder_pairs_and_natops_layout(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    header = ("@problemName NATOPS\n@timeStamps false\n@missing false\n@univariate false\n"
              "@dimensions 24\n@equalLength true\n@seriesLength 5\n@classLabel true 1.0 2.0\n@data\n")
    cases = rng.normal(size=(3, 24, 5)).round(4)
    body = "".join(":".join(",".join(str(v) for v in d) for d in c) + f":{1 + k % 2}.0\n"
                   for k, c in enumerate(cases))
    (tmp_path / "NATOPS_TRAIN.ts").write_text(header + body)
    (tmp_path / "NATOPS_TEST.ts").write_text(header + body.split("\n")[0] + "\n")
    ds = read(tmp_path)
    assert ds.layout.name == "natops8" and ds.shape == (4, 3, 5, 8, 1)
    assert ds.ids.tolist() == ["NATOPS_TEST#0", "NATOPS_TRAIN#0", "NATOPS_TRAIN#1", "NATOPS_TRAIN#2"]
    # marker 5 (wrist right), axis z is dimension 17
    np.testing.assert_allclose(ds.x[2, 2, :, 5, 0], cases[1, 17], rtol=1e-6)
    (tmp_path / "Other_TEST.ts").write_text(TS)
    with pytest.raises(DataFormatError, match="is problem 'Toy'"):
        read(tmp_path)


def test_uea_timestamps(tmp_path: Path) -> None:
    f = tmp_path / "stamped.ts"
    f.write_text("@problemName S\n@timeStamps true\n@univariate true\n@classLabel true a b\n@data\n"
                 "(0,1.5),(1,2.5),(2,?):b\n")
    ds = read(f)
    np.testing.assert_allclose(ds.x[0, 0, :, 0, 0], [1.5, 2.5, 2.5])
    assert ds.classes == ("a", "b") and ds.y.tolist() == [1]


# ================================================================================================
# .npy windows and long CSV
# ================================================================================================
def test_npy_axes_and_sidecar_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(12)
    ntc = rng.normal(size=(4, 50, 3))
    np.save(tmp_path / "windows.npy", ntc)
    (tmp_path / "windows_labels.csv").write_text("id,label\nwindows#0,walk\n1,run\n3,walk\n")
    assert detect(tmp_path / "windows.npy") == "npy"
    ds = read(tmp_path / "windows.npy")
    assert ds.shape == (4, 3, 50, 1, 1) and ds.layout.name == "series"
    np.testing.assert_allclose(ds.x[2, :, :, 0, 0], ntc[2].T.astype(np.float32))
    assert ds.classes == ("run", "walk") and ds.y.tolist() == [1, 0, -1, 1]
    # (N, C, T) by the axis rule, labels one per line
    d2 = tmp_path / "nct"
    d2.mkdir()
    np.save(d2 / "acc.npy", ntc.transpose(0, 2, 1))
    (d2 / "labels.txt").write_text("a\n?\nb\n-1\n")
    ds2 = read(d2)
    np.testing.assert_array_equal(ds2.x, ds.x)
    assert ds2.classes == ("a", "b") and ds2.y.tolist() == [0, -1, 1, -1]
    (d2 / "labels.txt").write_text("a\nb\n")
    with pytest.raises(DataFormatError, match="2 label lines for 4 windows"):
        read(d2)
    (tmp_path / "windows_labels.csv").write_text("id,label\nwindows#7,walk\n")
    with pytest.raises(DataFormatError, match=r"windows_labels\.csv: 1 ids match no window"):
        read(tmp_path / "windows.npy")


def test_npy_nan_fill_and_bad_files(tmp_path: Path) -> None:
    a = np.arange(2 * 6 * 2, dtype=float).reshape(2, 6, 2)
    a[0, 2, 1] = np.nan
    f = tmp_path / "w.npy"
    np.save(f, a)
    ds = read(f)
    assert ds.x[0, 1, 2, 0, 0] == pytest.approx((a[0, 1, 1] + a[0, 3, 1]) / 2)
    a[1, :, 0] = np.nan
    np.save(f, a)
    with pytest.raises(DataFormatError, match=r"w\.npy: window 1: channel 0 has no value"):
        read(f)
    np.save(f, np.array([[1, None]], dtype=object), allow_pickle=True)
    with pytest.raises(DataFormatError, match="pickle"):
        read(f)
    np.save(f, np.zeros((10, 20, 3)))
    f.write_bytes(f.read_bytes()[:300])
    with pytest.raises(DataFormatError, match="truncated"):
        read(f)
    # a header claiming a huge shape is refused before anything is allocated
    header = f.read_bytes()[:128].replace(b"(10, 20, 3)", b"(10000000000, 2000, 3)"[:11])
    f.write_bytes(np.lib.format.MAGIC_PREFIX + b"\x01\x00" + _npy_header("(100000000000, 20, 3)"))
    with pytest.raises(DataFormatError, match="truncated"):
        read(f)
    assert header  # the original header was present


def _npy_header(shape: str) -> bytes:
    d = "{'descr': '<f8', 'fortran_order': False, 'shape': %s, }" % shape
    d = d + " " * (118 - len(d)) + "\n"
    return len(d).to_bytes(2, "little") + d.encode()


def test_csv_long_format(tmp_path: Path) -> None:
    f = tmp_path / "sensors.csv"
    f.write_text("id,t,ax,ay,label\n"
                 "w2,1,0.5,1.5,\n"
                 "w1,2,3,30,jump\n"
                 "w1,0,1,10,jump\n"
                 "w1,1,,20,\n"
                 "w2,0,0.25,?,\n")
    assert detect(f) == "csv"
    ds = read(f)
    assert ds.ids.tolist() == ["w2", "w1"] and ds.channels == ("ax", "ay")
    assert ds.classes == ("jump",) and ds.y.tolist() == [-1, 0] and ds.lengths.tolist() == [2, 3]
    np.testing.assert_allclose(ds.x[1, :, :, 0, 0], [[1, 2, 3], [10, 20, 30]])
    np.testing.assert_allclose(ds.x[0, :, :2, 0, 0], [[0.25, 0.5], [1.5, 1.5]])
    f.write_text("id,t,ax,label\nw1,0,1,a\nw1,1,2,b\n")
    with pytest.raises(DataFormatError, match="line 3: id 'w1' has label 'b' here but 'a' on line 2"):
        read(f)
    f.write_text("id,t,ax\nw1,0,1\nw1,0,2\n")
    with pytest.raises(DataFormatError, match="lines 2 and 3: id 'w1' has t = 0 twice"):
        read(f)
    f.write_text("id,ax\nw1,1\n")
    with pytest.raises(DataFormatError, match="no time column"):
        read(f)
    f.write_text("id,t,ax\nw1,0,1\nw1,1\n")
    with pytest.raises(DataFormatError, match="line 3: 2 fields, the header has 3"):
        read(f)


# ================================================================================================
# A user's own labels
# ================================================================================================
@pytest.fixture
def small() -> SequenceSet:
    return SequenceSet(x=np.zeros((4, 1, 3, 1, 1), np.float32), ids=np.array(["s0", "s1", "s2", "s3"]),
                       classes=("cat", "dog"), y=np.full(4, -1), layout=get_layout("series"))


def test_label_csv_places_rows(tmp_path: Path, small: SequenceSet) -> None:
    f = tmp_path / "mine.csv"
    f.write_text("id,label\ns2,dog\ns0,cat\ns2,dog\ns3,\n")
    imp = read_label_csv(f, small)
    assert isinstance(imp, LabelImport)
    assert imp.index.tolist() == [0, 2] and imp.labels.tolist() == [0, 1] and imp.new_classes == ()
    assert any("line 4" in p and "repeats line 2" in p for p in imp.problems)
    assert any("line 5" in p and "empty label" in p for p in imp.problems)


def test_label_csv_reports_unknown_ids_and_classes(tmp_path: Path, small: SequenceSet) -> None:
    f = tmp_path / "mine.csv"
    f.write_text("s1,cat\ns9,dog\ns2,bird\n")
    with pytest.raises(DataFormatError, match=r"2 rows cannot be placed: line 2: unknown id 's9';"
                                              r" line 3: unknown class 'bird'"):
        read_label_csv(f, small)
    f.write_text("s1,cat\ns2,bird\ns3,bird\n")
    imp = read_label_csv(f, small, allow_new_classes=True)
    assert imp.new_classes == ("bird",) and imp.labels.tolist() == [0, 2, 2]
    f.write_text("id,label\ns1,cat\ns1,dog\n")
    with pytest.raises(DataFormatError, match="line 3: id 's1' labelled 'dog' here but 'cat' on line 2"):
        read_label_csv(f, small)
    f.write_text("id;label\ns1;dog\n")
    assert read_label_csv(f, small).labels.tolist() == [1]


# ================================================================================================
# Detection and the registry
# ================================================================================================
def test_detection_errors_and_forcing(tmp_path: Path) -> None:
    assert set(FORMATS) == {"ntu", "msr_action3d", "utkinect", "nwucla", "openpose", "pyskl", "bvh",
                            "uea", "npy", "csv"}
    f = tmp_path / "notes.dat"
    f.write_text("hello")
    with pytest.raises(DataFormatError, match=r"notes\.dat: cannot tell the format.*ntu, msr_action3d"):
        read(f)
    with pytest.raises(DataFormatError, match="unknown format 'xml'; formats: ntu"):
        read(f, format="xml")
    with pytest.raises(DataFormatError, match="no such file"):
        read(tmp_path / "missing.ts")
    g = tmp_path / "motion.dat"
    g.write_text(BVH)
    assert detect(g) == "bvh"  # by content
    (tmp_path / "a.ts").write_text(TS)
    (tmp_path / "b.bvh").write_text(BVH)
    with pytest.raises(DataFormatError, match="several formats: bvh .*uea"):
        read(tmp_path)
    assert read(tmp_path, format="uea").n == 3
    with pytest.raises(DataFormatError, match="not a readable|does not start with HIERARCHY"):
        read(tmp_path / "a.ts", format="bvh")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataFormatError, match="no file of a known format"):
        read(empty)


def test_padding_bomb_is_refused_before_allocation(tmp_path: Path, monkeypatch) -> None:
    """Many short ids plus one long one would pad to N x T_max; the budget is checked first."""
    import speler.formats._common as common

    monkeypatch.setattr(common, "MAX_TENSOR_BYTES", 10_000)
    f = tmp_path / "bomb.csv"
    f.write_text("id,t,v\n" + "".join(f"s{i},0,1\n" for i in range(100))
                 + "".join(f"long,{t},1\n" for t in range(100)))
    with pytest.raises(DataFormatError, match=r"101 samples x 1 channels x 100 frames.*more than"):
        read(f)


def test_detection_by_content_for_renamed_text_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(13)
    msr_like = tmp_path / "take1.txt"
    rows = rng.normal(size=(40, 4))
    msr_like.write_text("".join(" ".join(f"{v:.4f}" for v in r) + "\n" for r in rows))
    assert detect(msr_like) == "msr_action3d" and read(msr_like).shape == (1, 3, 2, 20, 1)
    utk_like = tmp_path / "person.txt"
    utk_like.write_text("".join(" ".join([str(t)] + [f"{v:.3f}" for v in rng.normal(size=60)]) + "\n"
                                for t in range(5)))
    assert detect(utk_like) == "utkinect"
    ds = read(utk_like)
    assert ds.ids.tolist() == ["person"] and ds.y.tolist() == [-1] and ds.lengths.tolist() == [5]
    ntu_like = tmp_path / "clip.txt"
    ntu_like.write_text(ntu_text([[("5", _body(rng, 1))]]))
    assert detect(ntu_like) == "ntu"
    assert read(ntu_like, format="ntu").n == 1


# ================================================================================================
# Text is UTF-8: other bytes are an error naming the line, never merged labels
# ================================================================================================
def test_label_csv_in_latin1_is_refused_naming_the_line(tmp_path: Path, small: SequenceSet) -> None:
    # café and cafè in Latin-1 both became 'caf\ufffd': two classes merged into one
    f = tmp_path / "mine.csv"
    f.write_bytes("id,label\ns0,café\ns1,cafè\n".encode("latin-1"))
    with pytest.raises(DataFormatError, match=r"mine\.csv: line 2 is not UTF-8 text \(byte 0xe9 at"
                                              r" column 7\); save the file as UTF-8"):
        read_label_csv(f, small, allow_new_classes=True)
    # UTF-8, with or without a BOM, keeps the two classes apart
    for bom in (b"", b"\xef\xbb\xbf"):
        f.write_bytes(bom + "id,label\ns0,café\ns1,cafè\n".encode("utf-8"))
        imp = read_label_csv(f, small, allow_new_classes=True)
        assert imp.new_classes == ("café", "cafè") and imp.labels.tolist() == [2, 3]


def test_uea_ts_in_latin1_is_refused_naming_the_line(tmp_path: Path) -> None:
    f = tmp_path / "Toy_TRAIN.ts"
    text = TS.replace("@classLabel true up down", "@classLabel true café cafè")
    text = text.replace(":up\n", ":café\n").replace(":down\n", ":cafè\n")
    f.write_bytes(text.encode("latin-1"))
    with pytest.raises(DataFormatError, match=r"Toy_TRAIN\.ts: line \d+ is not UTF-8 text"):
        read(f)
    f.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    ds = read(f)
    assert ds.classes == ("café", "cafè") and ds.y.tolist() == [0, 1, 0]

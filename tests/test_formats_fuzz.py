"""Fuzzing every reader: random bytes and mutated spec/real files give a SequenceSet or a
DataFormatError, never another exception or a hang. Sized to run in well under a minute."""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from speler.data.schema import SequenceSet
from speler.errors import DataFormatError
from speler.formats import FORMATS, read

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"

pytestmark = pytest.mark.timeout(120)

FUZZ = settings(
    max_examples=int(os.environ.get("SPELER_FUZZ_EXAMPLES", "60")), deadline=5000, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.function_scoped_fixture],
)


# -- seeds: (relative path of the file to mutate, {relative path: bytes}) --------------------------
def _ntu() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    lines = ["3"]
    for t in range(3):
        lines.append("2" if t == 1 else "1")
        for b in range(2 if t == 1 else 1):
            lines += [f"{72057594037931101 + b} 0 1 1 1 1 0 0.1 0.2 2", "25"]
            lines += [" ".join(f"{v:.4f}" for v in rng.normal(size=12)) for _ in range(25)]
    return {"S001C001P001R001A007.skeleton": ("\n".join(lines) + "\n").encode()}


def _msr() -> dict[str, bytes]:
    real = DATA / "MSRAction3D" / "a02_s03_e01_skeleton3D.txt"
    if real.is_file():
        text = "\n".join(real.read_text().splitlines()[:60]) + "\n"
    else:
        rng = np.random.default_rng(1)
        text = "".join(" ".join(f"{v:.6f}" for v in row) + "\n" for row in rng.normal(size=(60, 4)))
    return {"a02_s03_e01_skeleton3D.txt": text.encode()}


def _utk() -> dict[str, bytes]:
    real = DATA / "UTKinect-Action3D" / "joints_s02_e01.txt"
    if real.is_file():
        lines = real.read_text().splitlines()[:12]
    else:
        rng = np.random.default_rng(2)
        lines = [" ".join([str(100 + 2 * i)] + [f"{v:.6f}" for v in rng.normal(size=60)])
                 for i in range(12)]
    first = int(float(lines[0].split()[0]))
    last = int(float(lines[-1].split()[0]))
    labels = f"s02_e01\nwalk: {first} {first + 6}\nsitDown: {first + 8} {last}\ncarry:  NaN NaN\n"
    return {"joints_s02_e01.txt": ("\n".join(lines) + "\n").encode(),
            "actionLabel.txt": labels.encode()}


def _nwucla() -> dict[str, bytes]:
    rng = np.random.default_rng(3)
    obj = {"file_name": "a05_s02_e01_v02", "skeletons": rng.normal(size=(3, 20, 3)).round(3).tolist(),
           "label": 5}
    return {"a05_s02_e01_v02.json": json.dumps(obj).encode()}


def _openpose() -> dict[str, bytes]:
    rng = np.random.default_rng(4)
    out = {}
    for t in range(3):
        people = [{"person_id": [-1], "pose_keypoints_2d": rng.uniform(0, 9, 75).round(2).tolist()}
                  for _ in range(t % 3)]
        frame = {"version": 1.3, "people": people}
        out[f"clip/clip_{t:012d}_keypoints.json"] = json.dumps(frame).encode()
    return out


def _pyskl() -> dict[str, bytes]:
    rng = np.random.default_rng(5)
    annos = [{"frame_dir": f"v{i}", "label": i % 2, "total_frames": 4, "img_shape": (10, 10),
              "keypoint": rng.uniform(0, 9, (2, 4, 17, 2)).astype(np.float16),
              "keypoint_score": rng.uniform(0, 1, (2, 4, 17)).astype(np.float16)} for i in range(2)]
    return {"anno.pkl": pickle.dumps({"split": {"all": ["v0", "v1"]}, "annotations": annos}, protocol=4)}


BVH = """HIERARCHY
ROOT Hips
{
 OFFSET 0 0 0
 CHANNELS 6 Xposition Yposition Zposition Zrotation Xrotation Yrotation
 JOINT LeftUpLeg
 {
  OFFSET 1 -1 0
  CHANNELS 3 Zrotation Xrotation Yrotation
  End Site
  {
   OFFSET 0 -4 0
  }
 }
 JOINT RightUpLeg
 {
  OFFSET -1 -1 0
  CHANNELS 3 Zrotation Xrotation Yrotation
  End Site
  {
   OFFSET 0 -4 0
  }
 }
}
MOTION
Frames: 2
Frame Time: 0.0333333
0 9 0 0 0 0 10 20 30 -10 5 0
0.5 9 0.1 5 0 0 12 22 30 -11 5 1
"""


def _bvh() -> dict[str, bytes]:
    return {"walk.bvh": BVH.encode()}


def _uea() -> dict[str, bytes]:
    real = DATA / "NATOPS" / "NATOPS_TEST.ts"
    if real.is_file():
        lines = real.read_text(errors="replace").splitlines()
        start = next(i for i, ln in enumerate(lines) if ln.lower().startswith("@problemname"))
        data = next(i for i, ln in enumerate(lines) if ln.lower().startswith("@data"))
        text = "\n".join(lines[start: data + 3]) + "\n"
        return {"NATOPS_TEST.ts": text.encode()}
    text = ("@problemName Toy\n@missing true\n@dimensions 2\n@equalLength false\n"
            "@classLabel true a b\n@data\n1,?,3:4,5,6:a\n1,2:3,4:b\n")
    return {"Toy_TRAIN.ts": text.encode()}


def _basicmotions() -> dict[str, bytes]:
    lines = (REPO / "sample_data" / "basicmotions" / "BasicMotions_TRAIN.ts").read_text().splitlines()
    data = next(i for i, ln in enumerate(lines) if ln.lower().startswith("@data"))
    return {"BasicMotions_TRAIN.ts": ("\n".join(lines[: data + 3]) + "\n").encode()}


def _npy() -> dict[str, bytes]:
    import io

    buf = io.BytesIO()
    np.save(buf, np.random.default_rng(6).normal(size=(3, 8, 2)))
    return {"win.npy": buf.getvalue(), "win_labels.csv": b"id,label\nwin#0,a\n1,b\n"}


def _csv() -> dict[str, bytes]:
    return {"long.csv": b"id,t,ax,ay,label\nw1,0,1,2,a\nw1,1,,3,a\nw2,0,4,5,\nw2,1,6,?,b\n"}


SEEDS: dict[str, tuple[Callable[[], dict[str, bytes]], str]] = {
    "ntu": (_ntu, "S001C001P001R001A007.skeleton"),
    "msr_action3d": (_msr, "a02_s03_e01_skeleton3D.txt"),
    "utkinect": (_utk, "joints_s02_e01.txt"),
    "nwucla": (_nwucla, "a05_s02_e01_v02.json"),
    "openpose": (_openpose, "clip/clip_000000000001_keypoints.json"),
    "pyskl": (_pyskl, "anno.pkl"),
    "bvh": (_bvh, "walk.bvh"),
    "uea": (_uea, ""),
    "npy": (_npy, "win.npy"),
    "csv": (_csv, "long.csv"),
}
_CACHE: dict[str, dict[str, bytes]] = {}


def seed(fmt: str) -> tuple[dict[str, bytes], str]:
    make, target = SEEDS[fmt]
    if fmt not in _CACHE:
        _CACHE[fmt] = make()
    files = _CACHE[fmt]
    return files, target or next(iter(files))


def _write(root: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def _read_path(root: Path, fmt: str, target: str) -> Path:
    """What a user would point at: the folder for folder formats, else the file."""
    return root if fmt in ("utkinect", "openpose") else root / target


def check(path: Path, fmt: str) -> None:
    """A SequenceSet or a DataFormatError naming the file/folder, with the format forced and detected."""
    for kwargs in ({"format": fmt}, {}):
        try:
            out = read(path, **kwargs)
        except DataFormatError as exc:
            assert str(path) in str(exc), str(exc)  # the message names the file or folder
            continue
        assert isinstance(out, SequenceSet)
        assert np.isfinite(out.x).all() and out.x.dtype == np.float32


def test_seeds_are_valid() -> None:
    for fmt in FORMATS:
        files, target = seed(fmt)
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            _write(root, files)
            ds = read(_read_path(root, fmt, target), format=fmt)
            assert ds.n >= 1
    with tempfile.TemporaryDirectory() as tmp:
        _write(Path(tmp), _basicmotions())
        assert read(Path(tmp)).n == 2


# -- random bytes ----------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", list(FORMATS))
@FUZZ
@given(data=st.binary(max_size=600))
def test_random_bytes(fmt: str, data: bytes) -> None:
    files, target = seed(fmt)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _write(root, {**files, target: data})
        check(_read_path(root, fmt, target), fmt)


# -- mutations of valid files ----------------------------------------------------------------------
_OPS = st.one_of(
    st.tuples(st.just("flip"), st.floats(0, 1), st.integers(0, 255)),
    st.tuples(st.just("truncate"), st.floats(0, 1), st.just(0)),
    st.tuples(st.just("delete_line"), st.floats(0, 1), st.just(0)),
    st.tuples(st.just("duplicate_line"), st.floats(0, 1), st.just(0)),
    st.tuples(st.just("insert"), st.floats(0, 1),
              st.sampled_from([b" ", b"\n", b"nan", b"-", b"?", b":", b",", b"{", b"}", b"0",
                               b"999999999999", b"1e309", b"\xff\xfe", b"\x00", b'"', b"]"])),
    st.tuples(st.just("big_number"), st.floats(0, 1),
              st.sampled_from([b"99999999999", b"-1", b"0", b"1e308", b"nan", b"inf", b"4294967296"])),
)


def mutate(data: bytes, ops: list[tuple]) -> bytes:
    b = bytearray(data)
    for op, where, arg in ops:
        pos = int(where * len(b)) if b else 0
        if op == "flip" and b:
            b[min(pos, len(b) - 1)] ^= arg or 1
        elif op == "truncate":
            del b[pos:]
        elif op in ("delete_line", "duplicate_line"):
            lines = bytes(b).split(b"\n")
            i = min(int(where * len(lines)), len(lines) - 1)
            if op == "delete_line":
                del lines[i]
            else:
                lines.insert(i, lines[i])
            b = bytearray(b"\n".join(lines))
        elif op == "insert":
            b[pos:pos] = arg
        elif op == "big_number":
            # replace the first run of digits at or after pos
            j = pos
            while j < len(b) and not chr(b[j]).isdigit():
                j += 1
            k = j
            while k < len(b) and chr(b[k]).isdigit():
                k += 1
            if j < len(b):
                b[j:k] = arg
    return bytes(b)


@pytest.mark.parametrize("fmt", list(FORMATS) + ["basicmotions", "utkinect_labels"])
@FUZZ
@given(ops=st.lists(_OPS, min_size=1, max_size=4))
def test_mutated_files(fmt: str, ops: list[tuple]) -> None:
    if fmt == "basicmotions":
        files, target, real_fmt = _basicmotions(), "BasicMotions_TRAIN.ts", "uea"
    elif fmt == "utkinect_labels":
        (files, _), target, real_fmt = seed("utkinect"), "actionLabel.txt", "utkinect"
    else:
        (files, target), real_fmt = seed(fmt), fmt
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _write(root, {**files, target: mutate(files[target], ops)})
        check(_read_path(root, real_fmt, target), real_fmt)

"""SequenceSet: validation errors name the file, the sample and the field; npz round trip."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest

from speler.data.layouts import get_layout
from speler.data.schema import SequenceSet
from speler.errors import DataFormatError

W = "skeleton-fixture"


@pytest.mark.parametrize("change, message", [
    (lambda d: {"x": d.x[0]}, rf"{W}: field x must be an array of shape \(N, C, T, V, M\)"),
    (lambda d: {"x": d.x.astype(np.float64)}, rf"{W}: field x must be float32, got float64"),
    (lambda d: {"x": d.x[:, :, :, :24]}, rf"{W}: field x has 24 joints, layout ntu25 needs 25"),
    (lambda d: {"ids": np.array(["a"] * 40)}, rf"{W}: field ids is not unique: 'a' repeats"),
    (lambda d: {"ids": np.arange(40)}, rf"{W}: field ids must be strings"),
    (lambda d: {"y": d.y[:-1]}, rf"{W}: field y must have shape \(40,\)"),
    (lambda d: {"y": np.where(np.arange(40) == 5, 7, d.y)},
     rf"{W}: sample 5 \('skel_005'\) has label 7 in field y, expected -1..3"),
    (lambda d: {"y_true": np.where(np.arange(40) == 9, -2, d.y_true)},
     rf"{W}: sample 9 \('skel_009'\) has label -2 in field y_true, expected -1..3"),
    (lambda d: {"y": d.y.astype(np.float64)}, rf"{W}: field y must be integers"),
    (lambda d: {"lengths": np.where(np.arange(40) == 2, 0, d.lengths)},
     rf"{W}: sample 2 \('skel_002'\) has length 0 in field lengths, expected 1..16"),
    (lambda d: {"classes": ("a", "b", "a", "c")}, rf"{W}: field classes has duplicate names"),
    (lambda d: {"classes": ("a", "", "b", "c")}, rf"{W}: field classes has an empty class name"),
    (lambda d: {"channels": ("x", "y")}, rf"{W}: field channels names 2 channels, x has 3"),
    (lambda d: {"fps": -1.0}, rf"{W}: field fps must be a finite number >= 0"),
    (lambda d: {"source_file": d.source_file[:3]}, rf"{W}: field source_file must have shape"),
    (lambda d: {"x": d.x[:0]}, rf"{W}: field x has an empty axis"),
])
def test_validation_names_where_sample_and_field(skeleton_set, change, message):
    with pytest.raises(DataFormatError, match=message):
        skeleton_set.replace(**change(skeleton_set))


def test_non_finite_values_name_the_first_sample(skeleton_set):
    x = skeleton_set.x.copy()
    x[3, 1, 2, 4, 0] = np.nan
    x[8, 0, 0, 0, 0] = np.inf
    with pytest.raises(DataFormatError,
                       match=rf"{W}: sample 3 \('skel_003'\) has non-finite values .* field x"
                             r" \(2 samples affected\)"):
        skeleton_set.replace(x=x)


def test_series_defaults_and_counts(series_set):
    assert series_set.shape == (30, 3, 32, 1, 1)
    assert series_set.channels == ("acc_x", "acc_y", "acc_z")
    assert series_set.source_index.tolist() == list(range(30))
    assert (series_set.lengths == 32).all()
    y = series_set.y
    assert series_set.class_counts().tolist() == [int((y == c).sum()) for c in range(3)]
    assert series_set.class_counts(series_set.y_true).tolist() == [10, 10, 10]


def _assert_same(a: SequenceSet, b: SequenceSet) -> None:
    for name in ("x", "ids", "y", "source_file", "source_index", "lengths"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
        assert getattr(a, name).dtype.kind == getattr(b, name).dtype.kind, name
    if a.y_true is None:
        assert b.y_true is None
    else:
        np.testing.assert_array_equal(a.y_true, b.y_true)
    assert (a.classes, a.layout, a.fps, a.channels) == (b.classes, b.layout, b.fps, b.channels)
    assert a.fingerprint() == b.fingerprint()


@pytest.mark.parametrize("which", ["skeleton", "series", "no_truth"])
def test_save_load_round_trip(tmp_path, skeleton_set, series_set, which):
    ds = {"skeleton": skeleton_set, "series": series_set,
          "no_truth": skeleton_set.replace(y_true=None, source_file=np.array(["f.txt"] * 40))}[which]
    path = tmp_path / "sub" / "data.npz"
    ds.save(path)
    back = SequenceSet.load(path)
    _assert_same(ds, back)
    assert back.where == str(path)
    assert [p.name for p in path.parent.iterdir()] == ["data.npz"], "temp file left behind"


def test_subset_replace_and_fingerprint(skeleton_set):
    sub = skeleton_set.subset(np.array([3, 1]))
    assert sub.ids.tolist() == ["skel_003", "skel_001"] and sub.y_true.tolist() == [3, 1]
    mask = np.zeros(40, dtype=bool)
    mask[[1, 3]] = True
    assert skeleton_set.subset(mask).ids.tolist() == ["skel_001", "skel_003"]
    assert skeleton_set.fingerprint() == skeleton_set.replace(x=skeleton_set.x * 2).fingerprint()
    assert sub.fingerprint() != skeleton_set.fingerprint()
    assert skeleton_set.replace(classes=("a", "b", "c", "d")).fingerprint() != \
        skeleton_set.fingerprint()


def _npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_corrupt_npz_is_a_data_format_error(tmp_path, skeleton_set):
    good = tmp_path / "good.npz"
    skeleton_set.save(good)
    data = good.read_bytes()

    cases = {
        "random.npz": b"\x93NUMPY not really" + bytes(range(256)),
        "truncated.npz": data[: len(data) // 2],
        "empty.npz": b"",
    }
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(DataFormatError, match=rf"{name}: not a readable SequenceSet npz"):
            SequenceSet.load(path)

    with pytest.raises(DataFormatError, match=r"absent.npz: no such file"):
        SequenceSet.load(tmp_path / "absent.npz")

    # A member damaged inside an intact zip directory.
    damaged = tmp_path / "damaged.npz"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(damaged, "w") as zout:
        for item in zin.infolist():
            content = zin.read(item.filename)
            if item.filename == "y.npy":
                content = content[:20]
            zout.writestr(item, content)
    with pytest.raises(DataFormatError, match=r"damaged.npz"):
        SequenceSet.load(damaged)


def test_npz_with_missing_field_newer_version_or_pickle(tmp_path, skeleton_set):
    ds = skeleton_set
    base = dict(x=ds.x, ids=ds.ids, classes=np.array(ds.classes), y=ds.y,
                layout=np.array(ds.layout.to_json()))
    p = tmp_path / "missing.npz"
    p.write_bytes(_npz_bytes(**{k: v for k, v in base.items() if k != "y"}))
    with pytest.raises(DataFormatError, match=r"missing.npz: field y is missing"):
        SequenceSet.load(p)

    p = tmp_path / "newer.npz"
    p.write_bytes(_npz_bytes(**base, format_version=np.array(99)))
    with pytest.raises(DataFormatError, match=r"newer.npz: format_version 99 is newer"):
        SequenceSet.load(p)

    p = tmp_path / "pickled.npz"
    p.write_bytes(_npz_bytes(**{**base, "ids": np.array(list(ds.ids), dtype=object)}))
    with pytest.raises(DataFormatError, match=r"pickled.npz"):
        SequenceSet.load(p)

    p = tmp_path / "badlabel.npz"
    y = ds.y.copy()
    y[11] = 12
    p.write_bytes(_npz_bytes(**{**base, "y": y}))
    with pytest.raises(DataFormatError,
                       match=r"badlabel.npz: sample 11 \('skel_011'\) has label 12 in field y"):
        SequenceSet.load(p)

    p = tmp_path / "badlayout.npz"
    p.write_bytes(_npz_bytes(**{**base, "layout": np.array("{not json")}))
    with pytest.raises(DataFormatError, match=r"layout"):
        SequenceSet.load(p)


def test_layout_must_match_joints():
    x = np.zeros((2, 3, 4, 20, 1), dtype=np.float32)
    with pytest.raises(DataFormatError, match=r"mine: field x has 20 joints, layout coco17 needs 17"):
        SequenceSet(x=x, ids=np.array(["a", "b"]), classes=("c",), y=np.array([0, -1]),
                    layout=get_layout("coco17"), where="mine")

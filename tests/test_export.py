"""Label table, exports (CSV / JSON / npz / PYSKL) and label doubts, on real projects in tmp_path."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from factories import make_series_set, make_skeleton_set
from speler import formats
from speler.config import GraphConfig, PropagationConfig
from speler.errors import ConfigError
from speler.export import (
    FORMATS, TRUE_COLUMN, Doubt, doubts, export_format, export_labels, label_table, read_export,
)
from speler.graph.knn import affinity, build_knn
from speler.graph.propagate import propagate
from speler.project import Project


@pytest.fixture
def project(tmp_path):
    """Series project: imported labels from the file, one human label, round 0 propagated."""
    ds = make_series_set(n=30, classes=3)
    p = Project.create(tmp_path, "demo", ds, preprocess=False)
    store = p.store
    unl = np.flatnonzero(ds.y < 0)
    store.add_label(ds.ids[unl[0]], "jump", source="human", annotator="alice")
    no = store.begin_round()
    labels = np.arange(ds.n, dtype=np.int64) % 3
    labels[unl[1]] = -1  # no propagated label for this one
    energy = -np.linspace(1.0, 3.0, ds.n)
    margin = np.linspace(0.0, 0.5, ds.n)
    energy[unl[1]] = margin[unl[1]] = np.nan  # stored as NULL: must come back as NaN
    store.write_round_propagation(no, labels, energy, margin, metrics={}, config={})
    yield p, ds, dict(human=unl[0], nolabel=unl[1], propagated=unl[2:], labels=labels,
                      energy=energy, margin=margin)
    p.close()


def test_label_table_shows_provenance(project):
    p, ds, info = project
    t = label_table(p)
    assert len(t) == ds.n
    assert t["id"].tolist() == ds.ids.tolist()
    assert t["index"].tolist() == list(range(ds.n))
    imported = np.flatnonzero(ds.y >= 0)
    assert (t.loc[imported, "source"] == "imported").all()
    assert t.loc[imported, "label"].tolist() == [ds.classes[c] for c in ds.y[imported]]
    assert (t.loc[imported, "annotator"] == "import").all()
    h = info["human"]
    assert t.loc[h, ["label", "source", "annotator"]].tolist() == ["jump", "human", "alice"]
    assert t.loc[h, "round"] is pd.NA  # no round gave it
    assert t["round"].dtype == "Int64"
    prop = info["propagated"]
    assert (t.loc[prop, "source"] == "propagated").all()
    assert (t.loc[prop, "round"] == 0).all()
    assert t.loc[prop, "label"].tolist() == [ds.classes[c] for c in info["labels"][prop]]
    np.testing.assert_allclose(t.loc[prop, "energy"], info["energy"][prop])
    np.testing.assert_allclose(t.loc[prop, "margin"], info["margin"][prop])
    assert (t.loc[prop, "time"] != "").all()
    nl = info["nolabel"]
    assert t.loc[nl, ["label", "source", "annotator"]].tolist() == ["", "none", ""]
    assert t.loc[nl, "round"] is pd.NA
    assert t.loc[imported, "round"].isna().all()
    assert np.isnan(t.loc[nl, "energy"]) and np.isnan(t.loc[nl, "margin"])
    # no round folder: no propagated label counts as reliable; what people gave always does
    assert not t.loc[prop, "reliable"].any() and not t.loc[nl, "reliable"]
    assert t.loc[imported, "reliable"].all() and t.loc[h, "reliable"]
    assert t[TRUE_COLUMN].tolist() == [ds.classes[c] for c in ds.y_true]
    assert t.attrs["evaluation_only"] == [TRUE_COLUMN]
    # a human label later overrides the propagated one
    p.store.add_label(ds.ids[prop[0]], "walk", source="human", annotator="bob")
    t = label_table(p)
    assert t.loc[prop[0], ["label", "source", "annotator"]].tolist() == ["walk", "human", "bob"]


def test_label_table_takes_a_live_propagation(project):
    p, ds, info = project
    n = ds.n
    res, _ = _propagation_for(p, np.random.default_rng(0).normal(size=(n, 4)).astype(np.float32))
    t = label_table(p, propagation=res)
    given = t["source"].isin(["human", "imported"]).to_numpy()
    np.testing.assert_array_equal(t["reliable"].to_numpy(),
                                  given | (res.reliable & (t["source"] == "propagated").to_numpy()))
    np.testing.assert_allclose(t["energy"], res.energy)
    np.testing.assert_allclose(t["margin"], res.margin)


@pytest.mark.parametrize("fmt", ["csv", "json", "npz"])
def test_exports_round_trip(project, fmt):
    p, ds, info = project
    path = export_labels(p, format=fmt)
    assert path.parent == p.exports_dir and path.suffix == f".{fmt}"
    back = read_export(path)
    expected = label_table(p)
    pd.testing.assert_frame_equal(back, expected, check_like=False)
    assert back["round"].dtype == "Int64" and back["round"].isna().any()
    assert back.loc[back["source"] == "human", "reliable"].all()
    assert not list(p.exports_dir.glob(".*tmp*"))


def test_json_header(project):
    p, ds, info = project
    doc = json.loads(export_labels(p, format="json").read_text())
    head = doc["header"]
    assert head["project"] == "demo"
    assert head["classes"] == list(ds.classes)
    assert head["round"] == 0
    assert head["n"] == ds.n == len(doc["samples"])
    assert head["counts"]["human"] == {"walk": 0, "run": 0, "jump": 1}
    imported = np.bincount(ds.y[ds.y >= 0], minlength=3)
    assert head["counts"]["imported"] == dict(zip(ds.classes, imported.tolist()))
    assert head["counts"]["none"] == 1
    assert head["evaluation_only"] == [TRUE_COLUMN]
    assert head["time"]


def test_npz_holds_plain_arrays(project):
    p, ds, info = project
    with np.load(export_labels(p, format="npz"), allow_pickle=False) as z:
        assert z["classes"].tolist() == list(ds.classes)
        assert z["label_index"].dtype == np.int64
        cur = p.store.current_labels()
        np.testing.assert_array_equal(z["label_index"], cur.label)


def test_pyskl_export_loads_back_through_our_reader(tmp_path):
    ds = make_skeleton_set(n=20, classes=4)
    with Project.create(tmp_path, "skel", ds, preprocess=False) as p:
        unl = np.flatnonzero(ds.y < 0)
        p.store.add_label(ds.ids[unl[0]], "action3", source="human")
        path = export_labels(p, format="pyskl")
        assert path.suffix == ".pkl"
        back = formats.read(path, format="pyskl")
        final = p.store.current_labels().label
    assert back.ids.tolist() == ds.ids.tolist()
    assert back.classes == ds.classes
    np.testing.assert_array_equal(back.y, final)
    assert back.y[unl[0]] == 3
    t = int(ds.lengths.max())  # the reader pads to the longest sample
    assert back.x.shape == ds.x[:, :, :t].shape
    np.testing.assert_array_equal(back.lengths, ds.lengths)
    np.testing.assert_allclose(back.x, ds.x[:, :, :t], atol=1e-6)


def test_unknown_format_lists_formats(project):
    p, ds, info = project
    with pytest.raises(ConfigError, match="unknown export format 'xlsx'; known: csv, json, npz, pyskl"):
        export_labels(p, format="xlsx")
    assert FORMATS == ("csv", "json", "npz", "pyskl")


def test_the_format_comes_from_the_file_name_unless_given(project, tmp_path):
    """``--out labels.json`` writes JSON (it wrote CSV under that name); a format that the name
    contradicts, or a name that says none, is refused before anything is written."""
    p, ds, info = project
    for name, fmt in (("a.json", "json"), ("b.NPZ", "npz"), ("c.csv", "csv")):
        path = export_labels(p, path=tmp_path / name)
        pd.testing.assert_frame_equal(read_export(path), read_export(
            export_labels(p, format=fmt, path=tmp_path / f"ref{path.suffix.lower()}")))
    assert json.loads((tmp_path / "a.json").read_text())["header"]["columns"]
    assert export_labels(p).name == f"{p.name}-labels.csv"  # no name, no format: csv
    assert export_format(None, tmp_path / "x.pkl") == "pyskl"
    assert export_format("csv", tmp_path / "labels.txt") == "csv"  # a name that says no format
    before = sorted(tmp_path.iterdir())
    with pytest.raises(ConfigError, match=r"d.json: the extension .json says json, but the format "
                                          r"asked for is csv; name the file .csv or ask for json"):
        export_labels(p, format="csv", path=tmp_path / "d.json")
    with pytest.raises(ConfigError, match=r"e.txt: cannot tell the export format from the "
                                          r"extension '.txt'; name the file .csv, .json, .npz, .pkl"):
        export_labels(p, path=tmp_path / "e.txt")
    assert sorted(tmp_path.iterdir()) == before


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_a_failure_while_writing_leaves_no_partial_file(project, monkeypatch, fmt):
    p, ds, info = project
    target = p.exports_dir / f"labels.{fmt}"
    fresh = p.exports_dir / f"other.{fmt}"
    target.write_text("an older export\n")

    def broken(obj, f):
        f.write("half a file")
        raise OSError("disk full")

    if fmt == "csv":
        monkeypatch.setattr(pd.DataFrame, "to_csv", lambda self, f, **kw: broken(self, f))
    else:
        monkeypatch.setattr(json, "dump", lambda doc, f, **kw: broken(doc, f))
    for path in (target, fresh):
        with pytest.raises(OSError, match="disk full"):
            export_labels(p, format=fmt, path=path)
    assert target.read_text() == "an older export\n"
    assert not fresh.exists()
    assert sorted(x.name for x in p.exports_dir.iterdir()) == [target.name]


# -- doubts ---------------------------------------------------------------------------------------

def _propagation_for(p: Project, emb: np.ndarray, *, k: int = 6):
    graph = build_knn(emb, config=GraphConfig(k=k, use_gpu=False))
    W = affinity(graph)
    human = p.store.human_labels()
    return propagate(W, human, num_classes=len(p.store.classes), config=PropagationConfig()), W


def _two_clusters(tmp_path, *, wrong: bool):
    ds = make_series_set(n=40, classes=2, seed=3)
    ds = ds.replace(y=np.full(ds.n, -1, dtype=np.int64))
    p = Project.create(tmp_path, f"two{int(wrong)}", ds, preprocess=False, labels_from=None)
    rng = np.random.default_rng(2)
    centres = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    emb = (centres[ds.y_true] + 0.15 * rng.normal(size=(ds.n, 3))).astype(np.float32)
    seeds = [i for c in (0, 1) for i in np.flatnonzero(ds.y_true == c)[:6]]
    p.store.add_labels([(ds.ids[i], int(ds.y_true[i])) for i in seeds], source="human",
                       annotator="alice")
    bad = int(np.flatnonzero(ds.y_true == 0)[10])
    if wrong:
        p.store.add_label(ds.ids[bad], "run", source="human", annotator="bob")  # truth: walk
    return p, ds, emb, bad


def test_doubts_find_a_wrong_human_label(tmp_path):
    p, ds, emb, bad = _two_clusters(tmp_path, wrong=True)
    with p:
        res, W = _propagation_for(p, emb)
        found = doubts(p, res, affinity=W)
        assert found and isinstance(found[0], Doubt)
        top = found[0]
        assert (top.index, top.id) == (bad, ds.ids[bad])
        assert (top.label_name, top.suggested_name, top.annotator) == ("run", "walk", "bob")
        assert top.suggested_mass > 0.5 > top.label_mass
        assert top.score == pytest.approx(top.suggested_mass - top.label_mass)
        assert "labeled run by bob" in top.reason and "walk" in top.reason
        assert [d.score for d in found] == sorted((d.score for d in found), reverse=True)
        assert len(doubts(p, res, affinity=W, top=0)) == 0
        # from its own row (no W) the sample's own seed hides most of the disagreement
        plain = doubts(p, res)
        assert plain[0].index == bad and "the propagation says walk" in plain[0].reason
        assert top.score > plain[0].score
        # the same W per branch twice gives the same answer as once
        again = doubts(p, res, affinity=[W, W])
        assert [d.index for d in again] == [d.index for d in found]


def test_no_doubts_when_labels_agree_with_the_graph(tmp_path):
    p, ds, emb, bad = _two_clusters(tmp_path, wrong=False)
    with p:
        res, W = _propagation_for(p, emb)
        assert doubts(p, res, affinity=W) == []


def test_pyskl_of_a_series_project_is_refused_up_front_naming_the_target(project, tmp_path):
    from speler.export import check_export

    p, ds, info = project
    with pytest.raises(ConfigError, match="PYSKL pickles hold skeleton keypoints") as exc:
        check_export(p, format="pyskl")
    assert "csv, json or npz" in str(exc.value)
    target = tmp_path / "mine.pkl"
    with pytest.raises(ConfigError, match="PYSKL") as exc:
        export_labels(p, format="pyskl", path=target)
    assert str(exc.value).startswith(f"{target}: ") and ".tmp" not in str(exc.value)
    assert not list(tmp_path.glob("*.pkl")) and not list(tmp_path.glob(".mine*"))
    check_export(p, format="csv")  # the other formats are fine

"""Project folders: atomic creation, opening, imported labels, rounds folders, default root."""

from __future__ import annotations

import json

import numpy as np
import pytest

from speler.config import Config, PreprocessConfig
from speler.data.schema import SequenceSet
from speler.errors import ProjectError, StoreError
from speler.project import Project, default_root, list_projects
from speler.store import LabelStore


def _entries(root):
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_create_writes_the_folder_and_imports_file_labels(tmp_path, skeleton_set):
    root = tmp_path / "annotations"
    with Project.create(root, "demo", skeleton_set, preprocess=False,
                        meta={"source": "/data/x", "protocol": {"imbalance": 10}}) as p:
        assert p.path == root / "demo"
        names = sorted(x.name for x in p.path.iterdir() if not x.name.endswith(("-wal", "-shm")))
        assert names == ["config.json", "data.npz", "exports", "rounds", "store.sqlite"]
        assert p.rounds_dir.is_dir() and p.exports_dir.is_dir()
        d = p.data
        np.testing.assert_array_equal(d.x, skeleton_set.x)
        np.testing.assert_array_equal(d.y_true, skeleton_set.y_true)  # kept for evaluation
        cur = p.store.current_labels()
        known = skeleton_set.y >= 0
        np.testing.assert_array_equal(cur.label, np.where(known, skeleton_set.y, -1))
        assert set(cur.source[known]) == {"imported"} and set(cur.source[~known]) == {"none"}
        assert p.store.meta["source"] == "/data/x"
        assert json.loads(p.store.meta["protocol"]) == {"imbalance": 10}
        assert p.store.meta["layout"] == "ntu25"
        assert p.config == Config()
    assert _entries(root) == ["demo"], "temporary folders left behind"
    assert list_projects(root) == ["demo"]


def test_labels_from_none_imports_no_labels(tmp_path, series_set):
    with Project.create(tmp_path, "s", series_set, preprocess=False, labels_from=None) as p:
        assert (p.store.human_labels() == -1).all()
        assert p.store.events() == []
    with pytest.raises(ProjectError, match="labels_from"):
        Project.create(tmp_path, "t", series_set, preprocess=False, labels_from="csv")


def test_create_preprocesses_with_the_config(tmp_path, skeleton_set):
    cfg = Config(preprocess=PreprocessConfig(frames=10, persons=1))
    with Project.create(tmp_path, "pre", skeleton_set, config=cfg) as p:
        assert p.data.shape == (skeleton_set.n, 3, 10, 25, 1)
        assert (p.data.lengths == 10).all()
        assert p.config.preprocess.frames == 10
        assert Config.load(p.path / "config.json") == cfg
        assert p.data.ids.tolist() == skeleton_set.ids.tolist()


def test_existing_project_is_refused_unless_overwrite(tmp_path, skeleton_set, series_set):
    Project.create(tmp_path, "p", skeleton_set, preprocess=False).close()
    with pytest.raises(ProjectError, match=r"project 'p' already exists"):
        Project.create(tmp_path, "p", series_set, preprocess=False)
    with Project.open(tmp_path, "p") as p:
        assert p.data.layout.name == "ntu25"
    with Project.create(tmp_path, "p", series_set, preprocess=False, overwrite=True) as p:
        assert p.data.layout.name == "series" and p.store.n == series_set.n
    assert _entries(tmp_path) == ["p"]


def test_failure_midway_leaves_no_folder(tmp_path, skeleton_set):
    """The store refuses an empty sample id after data.npz and config.json were written."""
    ids = skeleton_set.ids.copy()
    ids[3] = ""
    bad = skeleton_set.replace(ids=ids)
    with pytest.raises(StoreError, match="empty sample id"):
        Project.create(tmp_path, "broken", bad, preprocess=False)
    assert _entries(tmp_path) == []


def test_interrupt_midway_leaves_no_folder_and_keeps_the_old_project(tmp_path, skeleton_set):
    class CtrlC:
        def __str__(self):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Project.create(tmp_path, "p", skeleton_set, preprocess=False, meta={"x": CtrlC()})
    assert _entries(tmp_path) == []

    Project.create(tmp_path, "p", skeleton_set, preprocess=False).close()
    with pytest.raises(KeyboardInterrupt):
        Project.create(tmp_path, "p", skeleton_set.subset(np.arange(5)), preprocess=False,
                       overwrite=True, meta={"x": CtrlC()})
    assert _entries(tmp_path) == ["p"]
    with Project.open(tmp_path, "p") as p:
        assert p.data.n == skeleton_set.n, "the old project was damaged"


def test_open_errors_name_what_and_where(tmp_path, skeleton_set):
    with pytest.raises(ProjectError, match=r"no project 'ghost' in .*there are no projects"):
        Project.open(tmp_path, "ghost")
    Project.create(tmp_path, "real", skeleton_set, preprocess=False).close()
    with pytest.raises(ProjectError, match=r"no project 'ghost' in .*projects there: real"):
        Project.open(tmp_path, "ghost")
    (tmp_path / "real" / "config.json").unlink()
    with pytest.raises(ProjectError, match=r"real: project is incomplete, config.json is missing"):
        Project.open(tmp_path, "real")
    assert list_projects(tmp_path) == ["real"]
    (tmp_path / "real" / "config.json").write_text('{"train": {"lr": "fast"}}')
    with pytest.raises(ProjectError, match=r"config.json: invalid project config .*train.lr"):
        Project.open(tmp_path, "real")
    for name in ("../up", ".hidden", "a/b", "", "x" * 65):
        with pytest.raises(ProjectError, match="invalid project name"):
            Project.create(tmp_path, name, skeleton_set, preprocess=False)


def test_data_must_match_the_store(tmp_path, skeleton_set, series_set):
    Project.create(tmp_path, "p", skeleton_set, preprocess=False).close()
    series_set.save(tmp_path / "p" / "data.npz")
    with Project.open(tmp_path, "p") as p:
        with pytest.raises(ProjectError, match="fingerprint .* does not match"):
            _ = p.data


def test_round_folders_appear_only_when_finished(tmp_path, skeleton_set):
    with Project.create(tmp_path, "p", skeleton_set, preprocess=False) as p:
        assert p.latest_round() is None
        tmp = p.begin_round_dir(0)
        (tmp / "metrics.json").write_text("{}")
        assert tmp.name == ".tmp-000" and p.latest_round() is None
        assert p.finish_round_dir(0) == p.round_dir(0) == p.rounds_dir / "000"
        assert (p.round_dir(0) / "metrics.json").is_file() and not tmp.exists()
        tmp = p.begin_round_dir(1)
        (tmp / "partial").write_text("x")
        assert p.latest_round() == 0
        tmp = p.begin_round_dir(1)  # a stale attempt is cleared
        assert list(tmp.iterdir()) == []
        p.finish_round_dir(1)
        assert p.latest_round() == 1
        p.begin_round_dir(1)
        p.finish_round_dir(1)  # redoing a round replaces its folder
        assert p.latest_round() == 1 and list(p.round_dir(1).iterdir()) == []
        with pytest.raises(ProjectError, match="no round folder in progress"):
            p.finish_round_dir(5)


def test_save_config_replaces_config_json(tmp_path, skeleton_set):
    with Project.create(tmp_path, "p", skeleton_set, preprocess=False) as p:
        cfg = Config(preprocess=PreprocessConfig(frames=20))
        p.save_config(cfg)
    with Project.open(tmp_path, "p") as p:
        assert p.config.preprocess.frames == 20


def test_default_root_and_spelerhome(tmp_path, monkeypatch, skeleton_set):
    monkeypatch.delenv("SPELER_HOME", raising=False)
    assert default_root().name == "annotations" and (default_root().parent / "speler").is_dir()
    monkeypatch.setenv("SPELER_HOME", str(tmp_path / "home"))
    assert default_root() == tmp_path / "home"
    Project.create(None, "envproj", skeleton_set, preprocess=False).close()
    assert list_projects() == ["envproj"]
    with Project.open(None, "envproj") as p:
        assert isinstance(p.store, LabelStore) and isinstance(p.data, SequenceSet)

"""Project folders: atomic creation, opening, imported labels, rounds folders, default root."""

from __future__ import annotations

import json

import numpy as np
import pytest
from factories import interrupt_rmtree

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
    from speler.project import ROUND_FILES

    with Project.create(tmp_path, "p", skeleton_set, preprocess=False) as p:
        assert p.latest_round() is None
        tmp = p.begin_round_dir(0)
        for f in ROUND_FILES:
            (tmp / f).write_text("{}")
        assert tmp.name == ".tmp-000" and not p.round_dir(0).exists()
        assert p.finish_round_dir(0) == p.round_dir(0) == p.rounds_dir / "000"
        assert (p.round_dir(0) / "metrics.json").is_file() and not tmp.exists()
        # a complete folder is not a finished round until the store says the round is done
        assert p.latest_round() is None
        tmp = p.begin_round_dir(1)
        (tmp / "partial").write_text("x")
        tmp = p.begin_round_dir(1)  # a stale attempt is cleared
        assert list(tmp.iterdir()) == []
        p.finish_round_dir(1)
        assert p.round_dir(1).is_dir()
        p.begin_round_dir(1)
        p.finish_round_dir(1)  # redoing a round replaces its folder
        assert list(p.round_dir(1).iterdir()) == []
        with pytest.raises(ProjectError, match="no round folder in progress"):
            p.finish_round_dir(5)


def test_save_config_replaces_config_json(tmp_path, skeleton_set):
    with Project.create(tmp_path, "p", skeleton_set, preprocess=False) as p:
        cfg = Config(preprocess=PreprocessConfig(frames=20))
        p.save_config(cfg)
    with Project.open(tmp_path, "p") as p:
        assert p.config.preprocess.frames == 20


def test_a_config_from_before_the_scale_and_the_series_choice_says_how_its_data_was_made(tmp_path, skeleton_set):
    with Project.create(tmp_path, "p", skeleton_set, preprocess=False) as p:
        assert p.config.preprocess.scale  # a new project: scaled by default
        raw = json.loads((p.path / "config.json").read_text())
    del raw["preprocess"]["scale"]  # as a project made before preprocess.scale wrote it
    raw["preprocess"]["normalize_series"] = True  # and before the series' choice: a clip's z-score
    (tmp_path / "p" / "config.json").write_text(json.dumps(raw))
    with Project.open(tmp_path, "p") as p:
        assert p.config.preprocess.scale is False
        assert p.config.preprocess.normalize_series == "clip"
        assert p.config.preprocess.frames == raw["preprocess"]["frames"]
    raw["preprocess"]["normalize_series"] = False
    (tmp_path / "p" / "config.json").write_text(json.dumps(raw))
    with Project.open(tmp_path, "p") as p:
        assert p.config.preprocess.normalize_series == "none"


def test_default_root_and_spelerhome(tmp_path, monkeypatch, skeleton_set):
    monkeypatch.delenv("SPELER_HOME", raising=False)
    assert default_root().name == "annotations" and (default_root().parent / "speler").is_dir()
    monkeypatch.setenv("SPELER_HOME", str(tmp_path / "home"))
    assert default_root() == tmp_path / "home"
    Project.create(None, "envproj", skeleton_set, preprocess=False).close()
    assert list_projects() == ["envproj"]
    with Project.open(None, "envproj") as p:
        assert isinstance(p.store, LabelStore) and isinstance(p.data, SequenceSet)


# -- overwrite never loses human labels; stale folders of killed imports --------------------------
def test_ctrl_c_while_deleting_the_replaced_project_keeps_its_labels(tmp_path, skeleton_set,
                                                                    monkeypatch):
    """Ctrl-C after the new project is in place, while the old one is being deleted: the error
    says where the old folder went, and its label store (human labels) is still whole there."""
    with Project.create(tmp_path, "p", skeleton_set, preprocess=False) as p:
        p.store.add_label("skel_005", "action3", source="human", annotator="ann")
    interrupt_rmtree(monkeypatch, ".old-p-")
    with pytest.raises(KeyboardInterrupt) as info:
        Project.create(tmp_path, "p", skeleton_set.subset(np.arange(5)), preprocess=False,
                       overwrite=True)
    monkeypatch.undo()
    said = str(info.value)
    old = [q for q in tmp_path.iterdir() if q.name.startswith(".old-p-")]
    assert len(old) == 1 and str(old[0]) in said and "is still there" in said, said
    with Project.open(tmp_path, "p") as p:
        assert p.data.n == 5, "the new project is in place"
    with LabelStore.open(old[0] / "store.sqlite") as s:
        assert s.label_of("skel_005") == (3, "human")


def test_overwrite_deletes_the_replaced_folder_completely(tmp_path, skeleton_set):
    Project.create(tmp_path, "p", skeleton_set, preprocess=False).close()
    (tmp_path / "p" / "rounds" / "000").mkdir()
    (tmp_path / "p" / "rounds" / "000" / "x.npz").write_bytes(b"x")
    Project.create(tmp_path, "p", skeleton_set, preprocess=False, overwrite=True).close()
    assert _entries(tmp_path) == ["p"]


def test_clean_stale_removes_dead_imports_and_restores_a_project_left_aside(tmp_path, skeleton_set):
    import os
    import time

    from speler.project import clean_stale

    dead = tmp_path / ".tmp-a-999999999-0123abcd"  # beyond pid_max: no such process
    alive = tmp_path / f".tmp-b-{os.getpid()}-0123abcd"
    legacy_old = tmp_path / ".tmp-c-0123abcd"  # no pid in the name, two hours old
    legacy_new = tmp_path / ".tmp-d-0123abcd"
    for d in (dead, alive, legacy_old, legacy_new):
        d.mkdir()
        (d / "data.npz").write_bytes(b"partial")
    two_hours_ago = time.time() - 7200
    os.utime(legacy_old, (two_hours_ago, two_hours_ago))
    # a crash between the two renames of an overwrite: the project is only in its .old-* folder
    Project.create(tmp_path, "gone", skeleton_set, preprocess=False).close()
    os.rename(tmp_path / "gone", tmp_path / ".old-gone-89abcdef")
    Project.create(tmp_path, "new", skeleton_set, preprocess=False).close()  # cleans on start
    assert _entries(tmp_path) == [alive.name, legacy_new.name, "gone", "new"]
    assert list_projects(tmp_path) == ["gone", "new"]
    assert clean_stale(tmp_path) == []


# -- every way to open a project checks the name -----------------------------------------------------
def test_open_refuses_paths_as_names(tmp_path, skeleton_set):
    Project.create(tmp_path / "other", "p", skeleton_set, preprocess=False).close()
    root = tmp_path / "root"
    root.mkdir()
    for name in ("../other/p", str(tmp_path / "other" / "p"), ".", "..", "p/../../other/p"):
        with pytest.raises(ProjectError, match="invalid project name"):
            Project.open(root, name)


# -- a damaged config.json is a ProjectError naming it -------------------------------------------------
@pytest.mark.parametrize("content, message", [
    (b"[]", r"a JSON array, expected an object"),
    (b"\xff\xfe\x00\x01garbage\x80", r"byte 0 is not UTF-8"),
    (b"{not json", r"not JSON"),
    (b'{"train": []}', r"section 'train' must be a mapping"),
    (b'{"train": {"lr": [1]}}', r"train.lr"),
    (b"null", r"JSON null, expected an object"),
])
def test_damaged_config_json_is_one_project_error(tmp_path, skeleton_set, content, message):
    Project.create(tmp_path, "p", skeleton_set, preprocess=False).close()
    (tmp_path / "p" / "config.json").write_bytes(content)
    with pytest.raises(ProjectError, match=rf"p/config.json: invalid project config.*{message}"):
        Project.open(tmp_path, "p")

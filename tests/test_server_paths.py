"""The app's server-path import is limited to configured data folders; the app listens locally."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest

from speler.errors import AccessError
from speler.server_paths import check_data_path, data_dirs

REPO = Path(__file__).resolve().parents[1]


def test_default_data_folders_are_sample_data_and_shared_data(monkeypatch):
    monkeypatch.delenv("SPELER_DATA_DIRS", raising=False)
    dirs = data_dirs()
    assert dirs[0] == (REPO / "sample_data").resolve()
    shared = REPO.parent / "shared" / "data"
    assert dirs[1:] == ([shared.resolve()] if shared.is_dir() else [])
    f = REPO / "sample_data" / "basicmotions" / "BasicMotions_TRAIN.ts"
    assert check_data_path(str(f)) == f.resolve()
    for outside in ("/etc/passwd", str(REPO / "annotations"), str(REPO / "sample_data" / ".." /
                                                                   "speler" / "cli.py"), "~"):
        with pytest.raises(AccessError, match=r"the app imports only from its data folders \("):
            check_data_path(outside)


def test_speler_data_dirs_replaces_the_defaults(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (tmp_path / "secret.txt").write_text("x")
    (a / "escape").symlink_to(tmp_path / "secret.txt")
    monkeypatch.setenv("SPELER_DATA_DIRS", os.pathsep.join([str(a), str(b), str(tmp_path / "gone")]))
    assert data_dirs() == [a.resolve(), b.resolve()]
    assert check_data_path(a / "x" / "y.ts") == (a / "x" / "y.ts").resolve()  # need not exist
    assert check_data_path(f"  {b}  ") == b.resolve()
    for outside in (tmp_path / "secret.txt", a / "escape", a / ".." / "secret.txt",
                    REPO / "sample_data"):
        with pytest.raises(AccessError, match="set SPELER_DATA_DIRS"):
            check_data_path(outside)
    monkeypatch.setenv("SPELER_DATA_DIRS", "")
    assert data_dirs() == []
    with pytest.raises(AccessError, match="none are configured"):
        check_data_path(a)
    with pytest.raises(AccessError, match="not a path"):
        check_data_path("  ")


def test_a_relative_path_is_read_from_the_data_folders(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b / "sets"):
        d.mkdir(parents=True)
    (b / "sets" / "x.ts").write_text("x")
    (tmp_path / "secret.txt").write_text("x")
    monkeypatch.setenv("SPELER_DATA_DIRS", os.pathsep.join([str(a), str(b)]))
    monkeypatch.chdir(tmp_path)  # not where the app's working folder decides
    assert check_data_path("sets/x.ts") == (b / "sets" / "x.ts").resolve()  # where it exists
    assert check_data_path("sets/new.ts") == (a / "sets" / "new.ts").resolve()  # else the first
    for outside in ("../secret.txt", "secret.txt/../../secret.txt"):
        with pytest.raises(AccessError, match="the app imports only from its data folders"):
            check_data_path(outside)
    assert check_data_path("secret.txt") == (a / "secret.txt").resolve()  # not the cwd's file


def test_streamlit_config_binds_localhost_from_the_repo_root():
    cfg = tomllib.loads((REPO / ".streamlit" / "config.toml").read_text())
    assert cfg["server"]["address"] == "localhost"
    # what `streamlit run app/main.py` started in the repository root reads
    from streamlit import config as st_config

    cwd = os.getcwd()
    try:
        os.chdir(REPO)
        st_config.get_config_options(force_reparse=True)
        assert st_config.get_option("server.address") == "localhost"
    finally:
        os.chdir(cwd)
        st_config.get_config_options(force_reparse=True)

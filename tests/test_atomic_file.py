"""Files written through ``speler.atomic_file``: the usual permissions, all or nothing."""

from __future__ import annotations

import os
import stat

import pytest

from speler.atomic_file import write_atomically
from speler.config import TrainConfig
from speler.formats.pyskl import write_pyskl
from speler.models import build_model
from speler.train import save_checkpoint


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_project_files_get_the_umask_permissions_not_owner_only(tmp_path, skeleton_set, umask_022):
    """Data, checkpoints and PYSKL pickles are readable by the group and others under umask 022,
    like every other file of a project (mkstemp's 0600 made checkpoints private)."""
    ds = skeleton_set
    ds.save(tmp_path / "data.npz")
    write_pyskl(ds, tmp_path / "labels.pkl")
    model = build_model(ds.layout, in_channels=ds.shape[1], num_classes=ds.num_classes,
                        frames=ds.shape[2], persons=ds.shape[4], config=TrainConfig())
    save_checkpoint(tmp_path / "model.pt", model, config=TrainConfig(), ds=ds)
    write_atomically(tmp_path / "plain.txt", lambda fh: fh.write(b"x"))
    for name in ("data.npz", "labels.pkl", "model.pt", "plain.txt"):
        assert _mode(tmp_path / name) == 0o644, name
    os.umask(0o077)
    write_atomically(tmp_path / "private.txt", lambda fh: fh.write(b"x"))
    assert _mode(tmp_path / "private.txt") == 0o600  # a stricter umask is kept
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "data.npz", "labels.pkl", "model.pt", "plain.txt", "private.txt"]  # no temporary left


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "kept.json"
    write_atomically(target, lambda fh: fh.write(b"old"))

    def half(fh):
        fh.write(b"new, then")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(target, half)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["kept.json"]

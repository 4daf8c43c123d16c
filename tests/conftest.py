"""Shared fixtures: small seeded datasets, a real label store in tmp_path, the shared real data."""

from __future__ import annotations

from pathlib import Path

import pytest

from speler.data.schema import SequenceSet
from speler.store import LabelStore

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


from factories import make_series_set, make_skeleton_set  # noqa: E402


@pytest.fixture
def skeleton_set() -> SequenceSet:
    return make_skeleton_set()


@pytest.fixture
def series_set() -> SequenceSet:
    return make_series_set()


@pytest.fixture
def store(tmp_path, skeleton_set):
    """A real LabelStore file in tmp_path over ``skeleton_set`` (no events yet)."""
    s = LabelStore.create(tmp_path / "store.sqlite", ids=skeleton_set.ids.tolist(),
                          classes=skeleton_set.classes, fingerprint=skeleton_set.fingerprint())
    yield s
    s.close()


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data`` beside the repository (real datasets, never copied in), or skip."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real datasets not present at {SHARED_DATA} (fresh clone without ../shared/data)")
    return SHARED_DATA

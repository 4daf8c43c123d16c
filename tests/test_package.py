"""The installed package carries the bundled samples and finds them (pyproject.toml maps the
repository's sample_data/ to the data package speler.sample_data; speler.data.samples looks there
first, then in the source checkout)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import shutil
import subprocess
import sys
import tomllib
import zipfile
from fnmatch import fnmatch
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
SAMPLE_FILES = sorted(p.relative_to(REPO / "sample_data").as_posix()
                      for p in (REPO / "sample_data").rglob("*") if p.is_file())
_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc")

# run in a fresh interpreter whose `speler` is the one under test (not the checkout's)
_LOAD = """
import json, sys
from pathlib import Path
import speler
from speler.data import samples
ds = samples.load_sample("basicmotions")
print(json.dumps({"speler": speler.__file__, "sample_dir": str(samples.SAMPLE_DIR),
                  "paths": [str(i.path) for i in samples.list_samples()],
                  "exist": all(i.path.exists() for i in samples.list_samples()),
                  "n": ds.n, "classes": list(ds.classes)}))
"""


def _load_from(site: Path, cwd: Path) -> dict:
    """What ``_LOAD`` reports when ``speler`` is imported from ``site`` and run from ``cwd``."""
    res = subprocess.run([sys.executable, "-c", _LOAD], cwd=cwd, capture_output=True, text=True,
                         env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
                         timeout=120)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def _assert_installed_layout(site: Path, out: dict) -> None:
    assert Path(out["speler"]).is_relative_to(site), out
    assert Path(out["sample_dir"]) == site / "speler" / "sample_data", out
    assert all(Path(p).is_relative_to(site) for p in out["paths"]) and out["exist"], out
    assert out["n"] > 0 and out["classes"] == ["Standing", "Running", "Walking", "Badminton"]


def test_every_subpackage_is_listed_and_the_samples_are_mapped():
    """The packages are listed, not found (the samples' package lives outside speler/): a new
    subpackage must be added to pyproject.toml, or the wheel ships without it."""
    subpackages = {".".join(p.parent.relative_to(REPO).parts)
                   for p in (REPO / "speler").rglob("__init__.py")}
    assert subpackages <= set(PYPROJECT["packages"]), sorted(subpackages - set(PYPROJECT["packages"]))
    assert "speler.sample_data" in PYPROJECT["packages"]
    assert PYPROJECT["package-dir"]["speler.sample_data"] == "sample_data"
    patterns = PYPROJECT["package-data"]["speler.sample_data"]
    assert {"synthetic_actions/data.npz", "basicmotions/BasicMotions_TRAIN.ts"} <= set(SAMPLE_FILES)
    unshipped = [f for f in SAMPLE_FILES if not any(fnmatch(f, p) for p in patterns)]
    assert not unshipped, unshipped


def test_an_installed_layout_finds_its_own_samples(tmp_path):
    """speler installed as a wheel lays it out (speler/sample_data/ beside the code), imported
    from outside the repository: the samples come from there, not from a checkout."""
    site = tmp_path / "site"
    shutil.copytree(REPO / "speler", site / "speler", ignore=_IGNORE)
    (site / "speler" / "sample_data").symlink_to(REPO / "sample_data", target_is_directory=True)
    _assert_installed_layout(site, _load_from(site, tmp_path))


def test_the_checkout_falls_back_to_its_sample_data(tmp_path):
    """Run from the source tree (speler/ has no sample_data package): the top-level folder."""
    out = _load_from(REPO, tmp_path)
    assert Path(out["sample_dir"]) == REPO / "sample_data" and out["exist"], out


def _can_build_a_wheel() -> str | None:
    """Why a wheel cannot be built here without the network, or None."""
    if importlib.util.find_spec("setuptools") is None:
        return "setuptools is not installed"
    version = tuple(int(x) for x in importlib.metadata.version("setuptools").split(".")[:2])
    if version < (68, 0):
        return f"setuptools {version} is older than pyproject.toml's build requirement (68)"
    if version < (70, 1) and importlib.util.find_spec("wheel") is None:
        return "setuptools before 70.1 needs the wheel package to build wheels"
    return None


@pytest.mark.skipif(_can_build_a_wheel() is not None, reason=str(_can_build_a_wheel()))
def test_the_wheel_ships_the_samples_and_finds_them(tmp_path):
    """``pip wheel .`` (a copy of the sources, so nothing is written into the checkout) lists
    every sample file under speler/sample_data/ and every module; unpacked as pip installs it,
    the samples load from outside the repository."""
    src = tmp_path / "src"
    src.mkdir()
    for f in ("pyproject.toml", "README.md", "requirements.txt"):
        shutil.copy2(REPO / f, src / f)
    for d in ("speler", "sample_data"):
        shutil.copytree(REPO / d, src / d, ignore=_IGNORE)
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-index",
                          "--no-build-isolation", "-q", "-w", str(tmp_path / "dist")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    (wheel,) = (tmp_path / "dist").glob("speler-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        site = tmp_path / "site"
        z.extractall(site)
    assert {f"speler/sample_data/{f}" for f in SAMPLE_FILES} <= names
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "speler").rglob("*.py")}
    assert modules <= names, sorted(modules - names)
    _assert_installed_layout(site, _load_from(site, tmp_path))

"""The bundled datasets the app opens with nothing to configure.

Two samples live in ``sample_data/`` (each folder's README says where it came from and its licence),
installed with the package as the data package ``speler.sample_data`` (see ``SAMPLE_DIR``):

- ``synthetic_actions`` (default): skeleton sequences made by SpeLER's own kinematic generator
  (:mod:`speler.data.kinematics`), long-tailed over 11 actions with a few labels per class.
- ``basicmotions``: the UEA BasicMotions smartwatch set (BSD-3 in the aeon wheel), read with
  :func:`speler.formats.read` and cut to the paper's long-tailed, partially labeled protocol.

Both come back with ``y`` = the few known labels and ``y_true`` = the held-out truth (for
evaluation and simulated annotation only).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from speler.data.schema import SequenceSet
from speler.errors import DataFormatError

SAMPLE_PACKAGE = "speler.sample_data"  # pyproject.toml maps it to the repository's sample_data/
_CHECKOUT_SAMPLES = Path(__file__).resolve().parents[2] / "sample_data"


def _sample_dir() -> Path:
    """The folder of the bundled samples: the package ``speler.sample_data`` wherever the
    imported ``speler`` has it (installed from a wheel: site-packages/speler/sample_data; an
    editable install: the checkout's sample_data/), else the source checkout's sample_data/
    (running from the repository, where ``speler/`` has no such package).

    Found through the import system, not ``importlib.resources.files``: sample_data/ has no
    ``__init__.py``, so the package is a namespace package, for which ``files()`` answers a
    ``MultiplexedPath`` rather than a folder, and the loaders need real files (``np.load``, the
    ``.ts`` reader globbing a folder); a wheel installs as files on disk."""
    try:
        spec = importlib.util.find_spec(SAMPLE_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    for place in (spec.submodule_search_locations or []) if spec is not None else []:
        if Path(place).is_dir():
            return Path(place)
    return _CHECKOUT_SAMPLES


SAMPLE_DIR = _sample_dir()
DEFAULT_SAMPLE = "synthetic_actions"

# basicmotions: the long-tail protocol applied to the 80 cases (20 per class)
BASICMOTIONS_IMBALANCE = 5.0
BASICMOTIONS_LABELED_RATIO = 0.15
BASICMOTIONS_MIN_LABELED = 2
BASICMOTIONS_SEED = 0
# Channel order of the UEA file: three accelerometer axes, then three gyroscope axes.
BASICMOTIONS_CHANNELS = ("acc_x", "acc_y", "acc_z", "gyro_x", "gyro_y", "gyro_z")


@dataclass(frozen=True)
class SampleInfo:
    """A bundled dataset.

    name: registry key (``load_sample(name)``); title: a short human name;
    kind: ``"skeleton"`` or ``"series"``; description: one or two sentences for the app;
    path: the file or folder in ``sample_data/`` it is read from.
    """

    name: str
    title: str
    kind: str
    description: str
    path: Path


def _load_synthetic(info: SampleInfo) -> SequenceSet:
    if not info.path.is_file():
        raise DataFormatError(
            f"{info.path}: bundled sample {info.name!r} is missing; rebuild it with "
            f"`python -m speler.data.kinematics --out {info.path}`")
    return SequenceSet.load(info.path)


def _load_basicmotions(info: SampleInfo) -> SequenceSet:
    from speler.data.protocol import make_partial
    from speler.formats import read

    files = sorted(info.path.glob("BasicMotions_*.ts")) if info.path.is_dir() else []
    if not files:
        raise DataFormatError(
            f"{info.path}: bundled sample {info.name!r} is missing (expected BasicMotions_TRAIN.ts"
            f" and BasicMotions_TEST.ts there)")
    ds = read(info.path)
    if ds.num_classes < 2 or len(ds.channels) != len(BASICMOTIONS_CHANNELS):
        raise DataFormatError(
            f"{info.path}: expected BasicMotions' 6 channels and 4 classes, got "
            f"{len(ds.channels)} channels and {ds.num_classes} classes")
    ds = ds.replace(channels=BASICMOTIONS_CHANNELS)
    return make_partial(
        ds, imbalance=BASICMOTIONS_IMBALANCE, labeled_ratio=BASICMOTIONS_LABELED_RATIO,
        seed=BASICMOTIONS_SEED, min_labeled_per_class=BASICMOTIONS_MIN_LABELED,
    )


SAMPLES: dict[str, SampleInfo] = {
    "synthetic_actions": SampleInfo(
        name="synthetic_actions",
        title="Synthetic skeleton actions (NTU-25 joints)",
        kind="skeleton",
        description=(
            "Kinect-like 3D skeletons of 11 actions (walk in place, wave, clap, raise arms, squat, "
            "bow, punch, kick, jump, sit down, point) from SpeLER's kinematic generator: 10 "
            "subjects with their own habits (some left-handed), action variants that share "
            "motion, uneven timing, view drift, sensor noise and tracking failures; long-tailed "
            "(imbalance 20) with about 6% of the sequences labeled."
        ),
        path=SAMPLE_DIR / "synthetic_actions" / "data.npz",
    ),
    "basicmotions": SampleInfo(
        name="basicmotions",
        title="BasicMotions smartwatch (UEA)",
        kind="series",
        description=(
            "Smartwatch accelerometer and gyroscope (6 channels, 10 s at 10 Hz) of four activities "
            "(standing, running, walking, badminton), cut to a long tail (imbalance 5) with two or "
            "three labels per class."
        ),
        path=SAMPLE_DIR / "basicmotions",
    ),
}
_LOADERS: dict[str, Callable[[SampleInfo], SequenceSet]] = {
    "synthetic_actions": _load_synthetic,
    "basicmotions": _load_basicmotions,
}


def list_samples() -> list[SampleInfo]:
    """The bundled datasets, the default (``synthetic_actions``) first."""
    return list(SAMPLES.values())


def load_sample(name: str = DEFAULT_SAMPLE) -> SequenceSet:
    """The bundled dataset ``name``: partially labeled (``y``) with held-out truth (``y_true``)."""
    info = SAMPLES.get(name)
    if info is None:
        raise DataFormatError(f"unknown sample {name!r}; bundled samples: {', '.join(SAMPLES)}")
    return _LOADERS[name](info)

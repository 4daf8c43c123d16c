"""Readers for skeleton and sensor formats, and automatic format detection.

``read(path)`` detects the format of a file or folder and returns a ``SequenceSet`` of the raw data
(not preprocessed: raw coordinates, zero padding to the longest sample, ``lengths`` the real frame
counts). ``read(path, format="ntu")`` forces a reader; ``FORMATS`` maps each format name to its
reader ``f(path, *, progress=None) -> SequenceSet``. Every failure on bad input is a
``DataFormatError`` naming the file (and line, frame, sample or field where it applies).

Detection looks at file names and suffixes first (``.skeleton``, ``aAA_sSS_eEE_*.txt``,
``joints_sSS_eEE.txt`` / ``actionLabel.txt``, ``.bvh``, ``.ts``, ``.pkl``, ``.npy``, ``.csv``) and at
the content where the suffix is not enough (``.json``: ``"skeletons"`` -> NW-UCLA, ``"people"`` ->
OpenPose; other files by their first bytes). A folder whose files point to more than one format is
an error asking for ``format=``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from speler.data.schema import SequenceSet
from speler.errors import DataFormatError
from speler.formats.bvh import is_bvh_file, read_bvh
from speler.formats.kinect_v1 import (
    UTK_LABELS, is_msr_file, is_utk_file, read_msr_action3d, read_utkinect,
)
from speler.formats.ntu import is_ntu_file, read_ntu
from speler.formats.nwucla import read_nwucla
from speler.formats.openpose import read_openpose
from speler.formats.pyskl import is_pickle_file, read_pyskl, write_pyskl
from speler.formats.tabular import (
    LabelImport, is_csv_data_file, is_npy_file, read_csv, read_label_csv, read_npy,
)
from speler.formats.uea import is_ts_file, read_uea

Reader = Callable[..., SequenceSet]

FORMATS: dict[str, Reader] = {
    "ntu": read_ntu,
    "msr_action3d": read_msr_action3d,
    "utkinect": read_utkinect,
    "nwucla": read_nwucla,
    "openpose": read_openpose,
    "pyskl": read_pyskl,
    "bvh": read_bvh,
    "uea": read_uea,
    "npy": read_npy,
    "csv": read_csv,
}
DESCRIPTIONS: dict[str, str] = {
    "ntu": "NTU RGB+D .skeleton (Kinect v2, 25 joints)",
    "msr_action3d": "MSR Action3D aAA_sSS_eEE_skeleton3D.txt (Kinect v1, 20 joints)",
    "utkinect": "UTKinect-Action3D joints_sSS_eEE.txt + actionLabel.txt",
    "nwucla": "NW-UCLA JSON as distributed with CTR-GCN",
    "openpose": "OpenPose per-frame JSON folders (BODY-25 / COCO-18)",
    "pyskl": "PYSKL / MMAction2 annotation pickle",
    "bvh": "BVH motion capture",
    "uea": "UEA/UCR .ts time series",
    "npy": "NumPy .npy windows (N, T, C) with a labels file",
    "csv": "long-format CSV (id, t, channels..., label)",
}
MAX_SCAN = 200_000  # files looked at when detecting a folder's format

__all__ = [
    "FORMATS", "DESCRIPTIONS", "LabelImport", "detect", "read", "read_label_csv", "write_pyskl",
]


def _known() -> str:
    return ", ".join(FORMATS)


def _sniff_json(p: Path) -> str | None:
    try:
        with open(p, "rb") as fh:
            head = fh.read(1 << 16)
    except OSError:
        return None
    if b'"skeletons"' in head:
        return "nwucla"
    if b'"people"' in head:
        return "openpose"
    return None


def _sniff_content(p: Path) -> str | None:
    try:
        with open(p, "rb") as fh:
            head = fh.read(1 << 16)
    except OSError:
        return None
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    if head[:1] == b"\x80":  # pickle protocol 2 and later
        return "pyskl"
    text = head.decode("utf-8", errors="replace").lstrip("\ufeff").lstrip()
    if text.upper().startswith("HIERARCHY"):
        return "bvh"
    low = text.lower()
    if "@data" in low and ("@problemname" in low or "@classlabel" in low):
        return "uea"
    if text.startswith(("{", "[")):
        return _sniff_json(p)
    lines = [ln.split() for ln in text.splitlines()[:4] if ln.strip()]
    if lines and all(_numbers(tok) for tok in lines):
        widths = [len(tok) for tok in lines]
        if widths[0] == 4:
            return "msr_action3d"
        if widths[0] == 61:
            return "utkinect"
        if widths[:3] == [1, 1, 10]:
            return "ntu"
    return None


def _numbers(tokens: list[str]) -> bool:
    try:
        [float(t) for t in tokens]
    except ValueError:
        return False
    return True


def _file_format(p: Path) -> str | None:
    suf = p.suffix.lower()
    if is_ntu_file(p):
        return "ntu"
    if is_bvh_file(p):
        return "bvh"
    if is_ts_file(p):
        return "uea"
    if is_pickle_file(p):
        return "pyskl"
    if is_npy_file(p):
        return "npy"
    if suf == ".json":
        return _sniff_json(p)
    if suf == ".txt":
        if is_utk_file(p) or p.name.lower() == UTK_LABELS.lower():
            return "utkinect"
        if is_msr_file(p):
            return "msr_action3d"
        return None
    if suf == ".csv":
        return "csv" if is_csv_data_file(p) else None
    return None


def detect(path: str | Path) -> str:
    """The format name of a file or folder (a key of ``FORMATS``); DataFormatError if unknown."""
    p = Path(path)
    if not p.exists():
        raise DataFormatError(f"{p}: no such file or folder")
    if p.is_file():
        fmt = _file_format(p)
        if fmt is None and p.suffix.lower() not in (".json", ".csv"):
            fmt = _sniff_content(p)
        if fmt is None:
            raise DataFormatError(f"{p}: cannot tell the format of this file; give one of: {_known()}")
        return fmt
    found: dict[str, Path] = {}
    json_file: Path | None = None
    seen = 0
    for folder, dirs, files in os.walk(p):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            seen += 1
            f = Path(folder) / name
            if f.suffix.lower() == ".json":
                if json_file is None:
                    json_file = f
                continue
            fmt = _file_format(f)
            if fmt is not None:
                found.setdefault(fmt, f)
        if seen > MAX_SCAN:
            break
    if json_file is not None:
        fmt = _sniff_json(json_file)
        if fmt is None:
            raise DataFormatError(f"{p}: {json_file.name} is JSON with neither 'skeletons' (NW-UCLA)"
                                  f" nor 'people' (OpenPose); give one of: {_known()}")
        found.setdefault(fmt, json_file)
    if not found:
        raise DataFormatError(f"{p}: no file of a known format in this folder; formats: {_known()}")
    if len(found) > 1:
        which = ", ".join(f"{k} ({v.relative_to(p).as_posix()})" for k, v in sorted(found.items()))
        raise DataFormatError(f"{p}: files of several formats: {which}; choose one (--format on "
                              "the command line, Format in the app)")
    return next(iter(found))


def read(
    path: str | Path, *, format: str | None = None,  # noqa: A002 - the CLI's --format
    progress: Callable[[int, int], None] | None = None,
) -> SequenceSet:
    """Read a file or folder into a SequenceSet; ``format`` forces a reader (see ``FORMATS``).

    progress: called as ``progress(done, total)`` after each file.
    """
    if format is None:
        fmt = detect(path)
    else:
        fmt = str(format).strip().lower()
        if fmt not in FORMATS:
            raise DataFormatError(f"{path}: unknown format {format!r}; formats: {_known()}")
        if not Path(path).exists():
            raise DataFormatError(f"{path}: no such file or folder")
    return FORMATS[fmt](Path(path), progress=progress)

"""Helpers shared by the readers: file listing, text decoding, padding into one tensor, labels files.

Private to ``speler.formats``. Every helper raises ``DataFormatError`` naming the file.
"""

from __future__ import annotations

import codecs
import csv
import functools
import io
import logging
import os
import pickle
import re
import struct
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from speler.data.layouts import Layout
from speler.data.schema import SequenceSet
from speler.errors import DataFormatError
from speler.system import available_bytes, check_fits

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None] | None

# Largest tensor a reader builds (N*C*T*V*M float32 bytes); override with SPELER_MAX_TENSOR_BYTES.
MAX_TENSOR_BYTES = int(os.environ.get("SPELER_MAX_TENSOR_BYTES", 8 << 30))
# Largest single input file a reader loads into memory.
MAX_FILE_BYTES = int(os.environ.get("SPELER_MAX_FILE_BYTES", 16 << 30))
# Names of the labels files readers look for beside the data (``id,label`` CSV).
LABEL_FILES = ("labels.csv", "labels.txt")

# Exceptions a malformed file can provoke deep inside parsing; turned into DataFormatError.
PARSE_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, IndexError, KeyError, TypeError, UnicodeError, struct.error, OverflowError,
    MemoryError, RecursionError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile,
    csv.Error, OSError, AttributeError, ZeroDivisionError,
)


def boundary(fmt: str):
    """Decorate a reader ``f(path, ...)``: any parse error becomes a DataFormatError naming the path."""

    def wrap(func):
        @functools.wraps(func)
        def inner(path, *args, **kwargs):
            try:
                return func(path, *args, **kwargs)
            except DataFormatError:
                raise
            except FileNotFoundError as exc:
                raise DataFormatError(f"{path}: no such file or folder ({exc.filename})") from None
            except PARSE_ERRORS as exc:
                raise DataFormatError(
                    f"{path}: not a readable {fmt} file ({type(exc).__name__}: {_short(exc)})"
                ) from exc

        return inner

    return wrap


def _short(exc: BaseException, limit: int = 200) -> str:
    text = str(exc)
    return text if len(text) <= limit else text[:limit] + "..."


def fail(where: object, msg: str) -> DataFormatError:
    """A DataFormatError ``"<where>: <msg>"`` (to ``raise``)."""
    return DataFormatError(f"{where}: {msg}")


# -- files -----------------------------------------------------------------------------------------
def existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise DataFormatError(f"{path}: no such file or folder")
    return path


def rel(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` (a folder, or a file whose folder is the root), POSIX style."""
    base = root if root.is_dir() else root.parent
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return path.name


def stem_of(relpath: str) -> str:
    """Relative path without its last suffix: ``sub/a01_s01.txt`` -> ``sub/a01_s01``."""
    p = Path(relpath)
    return (p.parent / p.stem).as_posix() if p.parent != Path(".") else p.stem


def list_files(root: Path, accept: Callable[[Path], bool], *, recursive: bool = True) -> list[Path]:
    """Files under ``root`` (or ``root`` itself) that ``accept`` keeps, sorted by relative path.

    Hidden files and folders (name starting with ``.``) are skipped. The order never depends on
    the order the file system lists entries in.
    """
    if root.is_file():
        return [root]
    out: list[Path] = []
    walker = os.walk(root) if recursive else [(str(root), [], os.listdir(root))]
    for folder, dirs, files in walker:
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if name.startswith("."):
                continue
            p = Path(folder) / name
            if p.is_file() and accept(p):
                out.append(p)
    out.sort(key=lambda p: natural_key(rel(p, root)))
    return out


def memory_budget(share: float) -> int | None:
    """``share`` of the memory free now (``speler.system.available_bytes``), None if unknown."""
    free = available_bytes()
    return None if free is None else int(free * share)


def read_bytes(path: Path) -> bytes:
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise fail(path, f"file is {size} bytes, more than the {MAX_FILE_BYTES} bytes SpeLER reads"
                         " (set SPELER_MAX_FILE_BYTES to allow it)")
    return path.read_bytes()


def read_text(path: Path) -> str:
    """The file decoded strictly as UTF-8 (a leading BOM is dropped).

    Bytes that are not UTF-8 (a Latin-1 ``cafè``, say) are a DataFormatError naming the line:
    replacing them would silently merge different labels (``café`` and ``cafè``) into one.
    """
    data = read_bytes(path)
    if b"\x00" in data[:65536]:
        raise fail(path, "contains NUL bytes; expected a text file")
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        col = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise fail(path, f"line {line} is not UTF-8 text (byte 0x{data[exc.start]:02x} at column"
                         f" {col}); save the file as UTF-8") from None


_NUM = re.compile(r"(\d+)")


def natural_key(s: str) -> tuple:
    """Sort key that puts ``a2`` before ``a10`` and numbers in numeric order."""
    parts = _NUM.split(s)
    return tuple((0, int(p), p) if p.isdigit() else (1, 0, p.lower()) for p in parts if p != "") + (s,)


def class_order(names: Iterable[str]) -> tuple[str, ...]:
    """Unique class names: numeric names in numeric order, others in natural order."""
    uniq = set(names)

    def key(n: str):
        try:
            return (0, float(n), n)
        except ValueError:
            return (1, natural_key(n), n)

    return tuple(sorted(uniq, key=key))


def parse_floats(tokens: Sequence[str], where: str) -> np.ndarray:
    """float64 array of ``tokens``; DataFormatError naming ``where`` and the first bad token."""
    try:
        return np.array(tokens, dtype=np.float64)
    except (ValueError, TypeError, OverflowError):
        for i, t in enumerate(tokens):
            try:
                float(t)
            except (ValueError, TypeError, OverflowError):
                raise DataFormatError(f"{where}: value {t[:40]!r} (item {i}) is not a number") from None
        raise DataFormatError(f"{where}: values are not numbers") from None


def first_nonfinite(arr: np.ndarray, axis_frames: int = 0) -> int | None:
    """Index along ``axis_frames`` of the first frame holding NaN/inf, else None."""
    bad = ~np.isfinite(arr)
    if not bad.any():
        return None
    other = tuple(a for a in range(arr.ndim) if a != axis_frames)
    return int(np.flatnonzero(bad.any(axis=other))[0])


def check_finite(arr: np.ndarray, where: str, *, axis_frames: int = 0, what: str = "frame") -> None:
    """DataFormatError naming ``where`` and the first frame with NaN/inf values."""
    f = first_nonfinite(arr, axis_frames)
    if f is not None:
        raise DataFormatError(f"{where}: {what} {f} has non-finite values (NaN or inf)")


# -- building the SequenceSet ----------------------------------------------------------------------
@dataclass
class Sample:
    """One sample before padding: ``data`` float (C, T, V, M)."""

    data: np.ndarray
    id: str
    source_file: str
    source_index: int
    label: str | None = None  # class name, None = unknown


def check_budget(n: int, c: int, t: int, v: int, m: int, where: object) -> None:
    need = int(n) * int(c) * int(t) * int(v) * int(m) * 4
    if need > MAX_TENSOR_BYTES:
        raise fail(where, f"{n} samples x {c} channels x {t} frames x {v} joints x {m} persons would"
                          f" take {need / 2**30:.1f} GiB, more than the {MAX_TENSOR_BYTES / 2**30:.1f}"
                          " GiB SpeLER allocates (set SPELER_MAX_TENSOR_BYTES, or split the data)")
    check_fits(need, where=where, error=DataFormatError,
               what=f"the {n} x {c} x {t} x {v} x {m} float32 tensor of the samples",
               hint="; split the data or free memory")


def build(
    samples: list[Sample], *, layout: Layout, where: object, channels: Sequence[str], fps: float = 0.0,
    classes: Sequence[str] | None = None,
) -> SequenceSet:
    """Pad ``samples`` to the longest and assemble the SequenceSet.

    Each ``Sample.data`` is (C, T, V, M) with the same C and V; shorter M are padded with zeros.
    ``classes`` fixes the class order; by default the labels seen, numeric ones in numeric order.
    """
    if not samples:
        raise fail(where, "no samples found")
    c, _, v, _ = samples[0].data.shape
    t_max = max(s.data.shape[1] for s in samples)
    m_max = max(s.data.shape[3] for s in samples)
    for s in samples:
        if s.data.shape[0] != c or s.data.shape[2] != v:
            raise fail(where, f"{s.source_file}: sample {s.id!r} has {s.data.shape[0]} channels"
                              f" and {s.data.shape[2]} joints, the first sample has {c} and {v}")
        if s.data.shape[1] < 1:
            raise fail(where, f"sample {s.id!r} has no frames")
    check_budget(len(samples), c, t_max, v, m_max, where)
    x = np.zeros((len(samples), c, t_max, v, m_max), dtype=np.float32)
    lengths = np.empty(len(samples), dtype=np.int64)
    with np.errstate(over="ignore", invalid="ignore"):  # overflow to inf is reported just below
        for i, s in enumerate(samples):
            _, t, _, m = s.data.shape
            x[i, :, :t, :, :m] = s.data
            lengths[i] = t
    if not np.isfinite(x).all():  # finite float64 values can overflow float32
        i = int(np.flatnonzero(~np.isfinite(x).reshape(len(samples), -1).all(1))[0])
        raise fail(where, f"sample {samples[i].id!r} ({samples[i].source_file}) has values too large"
                          " for float32")
    if classes is None:
        classes = class_order(s.label for s in samples if s.label is not None)
    pos = {name: k for k, name in enumerate(classes)}
    y = np.array([pos[s.label] if s.label is not None else -1 for s in samples], dtype=np.int64)
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dup = next(i for i in ids if i in seen or seen.add(i))  # type: ignore[func-returns-value]
        raise fail(where, f"sample id {dup!r} occurs twice")
    return SequenceSet(
        x=x, ids=np.array(ids, dtype=str), classes=tuple(classes), y=y, layout=layout,
        fps=float(fps), source_file=np.array([s.source_file for s in samples], dtype=str),
        source_index=np.array([s.source_index for s in samples], dtype=np.int64), lengths=lengths,
        channels=tuple(channels), where=str(where),
    )


def tick(progress: Progress, done: int, total: int) -> None:
    if progress is not None:
        progress(done, total)


# -- missing values --------------------------------------------------------------------------------
def fill_missing(series: np.ndarray) -> np.ndarray:
    """Fill NaN in a 1-D series by linear interpolation, edges by the nearest value.

    The caller has checked that at least one value is finite.
    """
    bad = ~np.isfinite(series)
    if not bad.any():
        return series
    idx = np.arange(len(series))
    out = series.copy()
    out[bad] = np.interp(idx[bad], idx[~bad], series[~bad])
    return out


# -- labels files (id,label) -----------------------------------------------------------------------
def find_labels_file(folder: Path) -> Path | None:
    for name in LABEL_FILES:
        p = folder / name
        if p.is_file():
            return p
    return None


def is_labels_file(p: Path) -> bool:
    n = p.name.lower()
    return n in LABEL_FILES or n.endswith(("_labels.csv", "_labels.txt"))


def read_id_labels(path: Path) -> dict[str, str]:
    """``id -> label`` from a CSV ``id,label`` (header optional; comma, tab or semicolon).

    Empty labels mean unknown and are left out. Conflicting repeats are errors naming the lines.
    """
    out: dict[str, str] = {}
    line_of: dict[str, int] = {}
    for line, sid, lab in id_label_rows(read_text(path), path):
        if not sid:
            raise fail(path, f"line {line}: empty id")
        if not lab:
            continue
        if sid in out and out[sid] != lab:
            raise fail(path, f"line {line}: id {sid!r} labelled {lab!r} here but {out[sid]!r} on"
                             f" line {line_of[sid]}")
        out[sid] = lab
        line_of[sid] = line
    return out


def id_label_rows(text: str, path: Path):
    """``(line, id, label)`` for each row of an ``id,label`` CSV text (an optional header skipped);
    a row with fewer than two fields is an error naming its line."""
    rows = csv_rows(text, path)
    for line, row in rows:
        if line == rows[0][0] and is_header(row):
            continue
        if len(row) < 2:
            raise fail(path, f"line {line}: expected 'id,label', got {','.join(row)[:60]!r}")
        yield line, row[0].strip(), row[1].strip()


def is_header(row: list[str]) -> bool:
    return len(row) >= 2 and row[0].strip().lower() in ("id", "sample", "sample_id") and \
        row[1].strip().lower() in ("label", "class", "y")


def csv_rows(text: str, path: Path) -> list[tuple[int, list[str]]]:
    """Non-empty CSV rows with their 1-based line numbers; the delimiter is sniffed (, ; tab)."""
    first = next((ln for ln in text.splitlines() if ln.strip()), "")
    delim = max((",", "\t", ";"), key=first.count) if first else ","
    reader = csv.reader(io.StringIO(text), delimiter=delim)
    rows: list[tuple[int, list[str]]] = []
    try:
        for row in reader:
            if row and any(cell.strip() for cell in row):
                rows.append((reader.line_num, row))
    except csv.Error as exc:
        raise fail(path, f"line {reader.line_num}: {exc}") from None
    return rows

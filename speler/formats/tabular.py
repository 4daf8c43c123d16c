"""Sensor windows as ``.npy`` arrays or long-format CSV, and a user's own ``id,label`` CSV.

``.npy`` (format ``npy``)
    A float/int array of shape (N, T, C) or (N, C, T) (or (N, T) for one channel), never an object
    array (no pickles). Axis rule: the shorter of the last two axes is the channel axis (windows
    have more steps than channels); when they are equal the array is (N, T, C). Ids are
    ``<file stem>#<index>``. Labels come from a sidecar file, looked for in this order:
    ``<stem>_labels.csv``, ``<stem>_labels.txt`` beside the array, then ``labels.csv`` /
    ``labels.txt`` in its folder. A sidecar is either ``id,label`` rows (header optional; the id
    is ``<stem>#<index>`` or, in the array's own sidecar or when the folder has one array, the bare
    index) or one label per line for all N windows (empty, ``?`` and ``-1`` mean unknown).

CSV long format (format ``csv``)
    A header with the columns ``id`` and ``t`` (or ``time``/``timestamp``/``step``/``frame``), an
    optional ``label`` (or ``class``) column, and the channel columns, one row per id and step.
    Rows are grouped by id (in order of first appearance) and sorted by t; a repeated (id, t) is an
    error. The label must be the same on all rows of an id (empty = unknown). Ids are the ``id``
    values for one file, ``<file stem>/<id>`` when a folder of CSV files is read.

Both: layout ``series`` (V = 1, M = 1), missing values (NaN, empty cells, ``?``) are filled per
window and channel by linear interpolation, edges by the nearest value; a channel with no value
in a window is an error, as is an infinite value. fps 0 (unknown).

``read_label_csv`` reads a user's labels (``id,label``) for an existing SequenceSet and reports
every id or class it cannot place.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from speler.data.layouts import get_layout
from speler.data.schema import SequenceSet
from speler.errors import DataFormatError
from speler.formats._common import (
    LABEL_FILES, Progress, Sample, csv_rows, id_label_rows, is_header, boundary, build, check_budget,
    existing, fail, fill_missing, is_labels_file, list_files, read_text, rel, stem_of, tick,
)

T_COLUMNS = ("t", "time", "timestamp", "step", "frame")
LABEL_COLUMNS = ("label", "class")
UNKNOWN = ("", "?", "-1")
MAX_REPORTED = 5


def is_npy_file(p: Path) -> bool:
    return p.suffix.lower() == ".npy"


def is_csv_data_file(p: Path) -> bool:
    return p.suffix.lower() == ".csv" and not is_labels_file(p)


# -- .npy ------------------------------------------------------------------------------------------
@boundary("NumPy .npy")
def read_npy(path: str | Path, *, progress: Progress = None) -> SequenceSet:
    """Read ``.npy`` windows (one file or a folder); x float32 (N, C, T, 1, 1)."""
    root = existing(path)
    files = list_files(root, is_npy_file)
    if not files:
        raise fail(root, "no .npy files found")
    samples: list[Sample] = []
    shared_used: dict[Path, set[str]] = {}
    shared: dict[Path, dict[str, tuple[int, str]]] = {}
    for k, f in enumerate(files):
        r = rel(f, root)
        stem = stem_of(r)
        arr = _load_npy(f)  # (N, C, T)
        n = arr.shape[0]
        labels: list[str | None] = [None] * n
        own = next((f.parent / f"{f.stem}_labels{e}" for e in (".csv", ".txt")
                    if (f.parent / f"{f.stem}_labels{e}").is_file()), None)
        if own is not None:
            labels = _sidecar_labels(own, n, f.stem, bare_ok=True)
        else:
            folder_file = next((f.parent / nm for nm in LABEL_FILES if (f.parent / nm).is_file()), None)
            if folder_file is not None:
                single = sum(1 for g in files if g.parent == f.parent) == 1
                if folder_file not in shared:
                    shared[folder_file] = _read_pairs_or_lines(folder_file)
                    shared_used[folder_file] = set()
                labels = _labels_from_shared(shared[folder_file], folder_file, n, f.stem, single,
                                             shared_used[folder_file])
        for i in range(n):
            data = arr[i]  # (C, T)
            if not np.isfinite(data).all():
                data = _fill(data, f"{f}: window {i}")
            samples.append(Sample(data=data[:, :, None, None], id=f"{stem}#{i}", source_file=r,
                                  source_index=i, label=labels[i]))
        tick(progress, k + 1, len(files))
    for lf, pairs in shared.items():
        if "__lines__" in pairs:
            continue
        unused = [key for key in pairs if key not in shared_used[lf]]
        if unused:
            lines = [pairs[u][0] for u in unused[:MAX_REPORTED]]
            raise fail(lf, f"{len(unused)} ids match no window, e.g. {unused[:MAX_REPORTED]}"
                           f" (lines {lines})")
    c = samples[0].data.shape[0]
    return build(samples, layout=get_layout("series"), where=root,
                 channels=tuple(f"dim{d}" for d in range(c)))


def _load_npy(f: Path) -> np.ndarray:
    """float64 (N, C, T) after checking the header against the file size (no pickles)."""
    size = f.stat().st_size
    with open(f, "rb") as fh, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpy warns about Python 2 style headers
        try:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
            else:
                shape, fortran, dtype = np.lib.format._read_array_header(fh, version)
        except Exception as exc:  # noqa: BLE001 - numpy's header parser raises many kinds
            raise fail(f, f"not a .npy array file ({type(exc).__name__}: {str(exc)[:120]})") from None
        offset = fh.tell()
    if dtype.hasobject:
        raise fail(f, "holds Python objects (a pickle); SpeLER reads only numeric arrays")
    if dtype.kind not in "fiub" or dtype.fields is not None:
        raise fail(f, f"dtype {dtype} is not numeric")
    if len(shape) not in (2, 3):
        raise fail(f, f"array of shape {shape}; expected (N, T, C), (N, C, T) or (N, T)")
    count = int(np.prod(shape, dtype=object))
    if count * dtype.itemsize > size - offset:
        raise fail(f, f"header says shape {shape} ({count * dtype.itemsize} bytes) but the file has"
                      f" {size - offset} bytes of data; truncated")
    n = shape[0]
    if n < 1 or any(s < 1 for s in shape[1:]):
        raise fail(f, f"array of shape {shape} has an empty axis")
    if len(shape) == 2:
        c, t = 1, shape[1]
    else:
        c, t = (shape[1], shape[2]) if shape[1] < shape[2] else (shape[2], shape[1])
    check_budget(n, c, t, 1, 1, f)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        arr = np.load(f, allow_pickle=False).astype(np.float64)
    if arr.ndim == 2:
        return arr[:, None, :]
    return arr if shape[1] < shape[2] else arr.transpose(0, 2, 1)


def _fill(data: np.ndarray, where: str) -> np.ndarray:
    """Fill NaN per channel of (C, T); inf or an all-missing channel is an error."""
    if np.isinf(data).any():
        c, t = np.argwhere(np.isinf(data))[0]
        raise fail(where, f"channel {c} step {t} is infinite")
    out = data.copy()
    for c in range(out.shape[0]):
        if np.isnan(out[c]).all():
            raise fail(where, f"channel {c} has no value; cannot fill")
        out[c] = fill_missing(out[c])
    return out


def _read_pairs_or_lines(path: Path) -> dict[str, tuple[int, str]]:
    """``id -> (line, label)`` for an id,label file, or ``{"__lines__": ...}`` for one label a line."""
    text = read_text(path)
    first = next((ln for ln in text.splitlines() if ln.strip()), "")
    if not any(d in first for d in (",", "\t", ";")):
        lines = text.splitlines()
        while lines and not lines[-1].strip():
            lines.pop()
        return {"__lines__": (0, "\n".join(lines))}
    out: dict[str, tuple[int, str]] = {}
    for line, sid, lab in id_label_rows(text, path):
        if sid in out and out[sid][1] != lab:
            raise fail(path, f"line {line}: id {sid!r} labelled {lab!r} here but {out[sid][1]!r} on"
                             f" line {out[sid][0]}")
        out[sid] = (line, lab)
    return out


def _labels_from_lines(text: str, path: Path, n: int) -> list[str | None]:
    lines = text.split("\n") if text else []
    if len(lines) != n:
        raise fail(path, f"has {len(lines)} label lines for {n} windows")
    return [None if ln.strip() in UNKNOWN else ln.strip() for ln in lines]


def _sidecar_labels(path: Path, n: int, stem: str, *, bare_ok: bool) -> list[str | None]:
    pairs = _read_pairs_or_lines(path)
    used: set[str] = set()
    labels = _labels_from_shared(pairs, path, n, stem, bare_ok, used)
    if "__lines__" not in pairs:
        unused = [k for k in pairs if k not in used]
        if unused:
            raise fail(path, f"{len(unused)} ids match no window, e.g. {unused[:MAX_REPORTED]}"
                             f" (lines {[pairs[u][0] for u in unused[:MAX_REPORTED]]})")
    return labels


def _labels_from_shared(pairs: dict[str, tuple[int, str]], path: Path, n: int, stem: str,
                        bare_ok: bool, used: set[str]) -> list[str | None]:
    if "__lines__" in pairs:
        if not bare_ok:
            raise fail(path, "one label per line fits only one array; the folder has several"
                             " .npy files (use 'id,label' rows with ids <stem>#<index>)")
        return _labels_from_lines(pairs["__lines__"][1], path, n)
    labels: list[str | None] = [None] * n
    for i in range(n):
        for key in (f"{stem}#{i}",) + ((str(i),) if bare_ok else ()):
            if key in pairs:
                used.add(key)
                lab = pairs[key][1]
                labels[i] = None if lab in UNKNOWN else lab
    return labels


# -- CSV long format -------------------------------------------------------------------------------
@boundary("CSV")
def read_csv(path: str | Path, *, progress: Progress = None) -> SequenceSet:
    """Read long-format CSV (one file or a folder of files); x float32 (N, C, T, 1, 1)."""
    root = existing(path)
    files = list_files(root, is_csv_data_file) if root.is_dir() else [root]
    if not files:
        raise fail(root, "no .csv data files found")
    samples: list[Sample] = []
    channels: tuple[str, ...] | None = None
    for k, f in enumerate(files):
        r = rel(f, root)
        ch, items = _parse_long_csv(read_text(f), f)
        if channels is None:
            channels = ch
        elif ch != channels:
            raise fail(f, f"channel columns {list(ch)[:8]} differ from the first file's"
                          f" {list(channels)[:8]}")
        for i, (sid, data, label) in enumerate(items):
            full = f"{stem_of(r)}/{sid}" if root.is_dir() else sid
            samples.append(Sample(data=data[:, :, None, None], id=full, source_file=r,
                                  source_index=i, label=label))
        tick(progress, k + 1, len(files))
    assert channels is not None
    return build(samples, layout=get_layout("series"), where=root, channels=channels)


def _parse_long_csv(text: str, where: Path):
    rows = csv_rows(text, where)
    if not rows:
        raise fail(where, "file is empty")
    head_line, header = rows[0]
    names = [h.strip() for h in header]
    low = [h.lower() for h in names]
    if "id" not in low:
        raise fail(where, f"line {head_line}: no 'id' column in the header {names[:10]}")
    t_col = next((low.index(c) for c in T_COLUMNS if c in low), None)
    if t_col is None:
        raise fail(where, f"line {head_line}: no time column ('t') in the header {names[:10]}")
    if len(set(low)) != len(low):
        raise fail(where, f"line {head_line}: a column name repeats in the header {names[:10]}")
    id_col = low.index("id")
    lab_col = next((low.index(c) for c in LABEL_COLUMNS if c in low), None)
    ch_cols = [i for i in range(len(names)) if i not in (id_col, t_col, lab_col)]
    if not ch_cols:
        raise fail(where, "no channel columns besides id, t and label")
    groups: dict[str, list[tuple[float, int, list[str]]]] = {}
    labels: dict[str, tuple[str, int]] = {}
    for line, row in rows[1:]:
        if len(row) != len(names):
            raise fail(where, f"line {line}: {len(row)} fields, the header has {len(names)}")
        sid = row[id_col].strip()
        if not sid:
            raise fail(where, f"line {line}: empty id")
        try:
            t = float(row[t_col])
        except ValueError:
            raise fail(where, f"line {line}: t value {row[t_col][:30]!r} is not a number") from None
        if not np.isfinite(t):
            raise fail(where, f"line {line}: t value {row[t_col][:30]!r} is not finite")
        groups.setdefault(sid, []).append((t, line, [row[c] for c in ch_cols]))
        if lab_col is not None:
            lab = row[lab_col].strip()
            if lab:
                if sid in labels and labels[sid][0] != lab:
                    raise fail(where, f"line {line}: id {sid!r} has label {lab!r} here but"
                                      f" {labels[sid][0]!r} on line {labels[sid][1]}")
                labels.setdefault(sid, (lab, line))
    if not groups:
        raise fail(where, "no data rows after the header")
    items = []
    for sid, recs in groups.items():
        recs.sort(key=lambda r: r[0])
        for a, b in zip(recs, recs[1:]):
            if a[0] == b[0]:
                raise fail(where, f"lines {a[1]} and {b[1]}: id {sid!r} has t = {a[0]:g} twice")
        tokens = [["nan" if v.strip() in ("", "?") else v.strip() for v in r[2]] for r in recs]
        try:
            arr = np.array(tokens, dtype=np.float64).T  # (C, T)
        except ValueError:
            for r, tok in zip(recs, tokens):
                for c, v in zip(ch_cols, tok):
                    try:
                        float(v)
                    except ValueError:
                        raise fail(where, f"line {r[1]}: column {names[c]!r} value {v[:30]!r} is"
                                          " not a number") from None
            raise
        if not np.isfinite(arr).all():
            if np.isinf(arr).any():
                c, t = np.argwhere(np.isinf(arr))[0]
                raise fail(where, f"line {recs[t][1]}: column {names[ch_cols[c]]!r} is infinite")
            for c in range(arr.shape[0]):
                if np.isnan(arr[c]).all():
                    raise fail(where, f"id {sid!r}: column {names[ch_cols[c]]!r} has no value;"
                                      " cannot fill")
                arr[c] = fill_missing(arr[c])
        items.append((sid, arr, labels[sid][0] if sid in labels else None))
    return tuple(names[c] for c in ch_cols), items


# -- a user's own labels ---------------------------------------------------------------------------
@dataclass
class LabelImport:
    """Labels read from a user's ``id,label`` CSV, placed in a SequenceSet.

    index: int64 (K,) sample indices into the SequenceSet.
    labels: int64 (K,) class indices into ``ds.classes + new_classes``.
    new_classes: class names the file added (only with ``allow_new_classes=True``).
    problems: readable notes on rows that were read but not used as given (repeats that agree,
        empty labels); rows that cannot be placed are errors, never notes.
    """

    index: np.ndarray
    labels: np.ndarray
    new_classes: tuple[str, ...] = ()
    problems: list[str] = field(default_factory=list)


def read_label_csv(path: str | Path, ds: SequenceSet, *, allow_new_classes: bool = False) -> LabelImport:
    """Place the ``id,label`` rows of ``path`` in ``ds``.

    The header ``id,label`` is optional; comma, tab or semicolon separate. Ids must be ``ds.ids``
    exactly; labels must be names in ``ds.classes`` (or are added, in order of first appearance,
    with ``allow_new_classes``). Unknown ids, unknown classes, rows without two fields and an id
    given two different labels raise DataFormatError listing the first few with line numbers.
    """
    path = Path(path)
    try:
        text = read_text(existing(path))
        rows = csv_rows(text, path)
    except DataFormatError:
        raise
    except (OSError, ValueError) as exc:
        raise fail(path, f"cannot be read ({exc})") from None
    if not rows:
        raise fail(path, "no rows; expected 'id,label' lines")
    pos = {str(s): i for i, s in enumerate(ds.ids.tolist())}
    cls = {c: i for i, c in enumerate(ds.classes)}
    new: list[str] = []
    errors: list[str] = []
    problems: list[str] = []
    chosen: dict[int, tuple[int, str, int]] = {}  # sample -> (class, name, line)
    unknown_ids = unknown_classes = 0
    for line, row in rows:
        if line == rows[0][0] and is_header(row):
            continue
        if len(row) < 2:
            errors.append(f"line {line}: expected 'id,label', got {','.join(row)[:60]!r}")
            continue
        if len(row) > 2 and any(c.strip() for c in row[2:]):
            problems.append(f"line {line}: columns after the second are ignored")
        sid, name = row[0].strip(), row[1].strip()
        if sid not in pos:
            unknown_ids += 1
            errors.append(f"line {line}: unknown id {sid[:60]!r}")
            continue
        if not name:
            problems.append(f"line {line}: id {sid!r} has an empty label; left unlabelled")
            continue
        if name not in cls:
            if allow_new_classes:
                cls[name] = len(cls)
                new.append(name)
            else:
                unknown_classes += 1
                errors.append(f"line {line}: unknown class {name[:60]!r}")
                continue
        i = pos[sid]
        if i in chosen:
            prev_c, prev_name, prev_line = chosen[i]
            if prev_c != cls[name]:
                errors.append(f"line {line}: id {sid!r} labelled {name!r} here but {prev_name!r} on"
                              f" line {prev_line}")
            else:
                problems.append(f"line {line}: id {sid!r} repeats line {prev_line} (same label)")
            continue
        chosen[i] = (cls[name], name, line)
    if errors:
        hint = ""
        if unknown_classes:
            hint = f"; known classes: {list(ds.classes)[:20]}"
        if unknown_ids:
            hint += f"; ids look like {[str(s) for s in ds.ids[:3]]}"
        raise fail(path, f"{len(errors)} rows cannot be placed: " + "; ".join(errors[:MAX_REPORTED])
                   + (" ..." if len(errors) > MAX_REPORTED else "") + hint)
    order = sorted(chosen)
    return LabelImport(
        index=np.array(order, dtype=np.int64),
        labels=np.array([chosen[i][0] for i in order], dtype=np.int64),
        new_classes=tuple(new),
        problems=problems,
    )

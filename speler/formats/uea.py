"""UEA / UCR time series classification archive ``.ts`` files (sktime / aeon text format).

Header lines start with ``@`` (``@problemName``, ``@timeStamps``, ``@missing``, ``@univariate``,
``@dimensions``, ``@equalLength``, ``@seriesLength``, ``@classLabel true a b c``, ``@targetLabel``)
and end at ``@data``; ``#`` lines are comments. Each data line is one case: the dimensions
separated by ``:``, values within a dimension by ``,``, the class label last when
``@classLabel true``. With ``@timeStamps true`` values are ``(time,value)`` pairs; the values are
kept in file order and the times dropped. Cases may differ in length (``@equalLength false``);
the dimensions of one case must have the same length.

Missing values (``?`` or ``NaN``) are filled per case and dimension by linear interpolation between
the nearest present values, and with the nearest present value at the ends. A dimension of a case
with no value at all is an error naming the line and dimension.

Layout: the problem ``NATOPS`` with 24 dimensions is read as a pose, layout ``natops8`` with
C = 3 (x, y, z) and V = 8 markers, dimension ``3 * marker + axis`` in the archive's order (hand tip
L/R, elbow L/R, wrist L/R, thumb L/R). Every other problem is layout ``series``: C = dimensions
(channels ``dim0`` ...), V = 1, M = 1. fps is known for BasicMotions (10 Hz) and Epilepsy (16 Hz),
else 0.

Ids are ``<file stem>#<case index>`` (``BasicMotions_TRAIN#12``). A folder is read as all its
``.ts`` files of one problem (e.g. ``_TRAIN`` and ``_TEST``) combined; classes keep the header's
order, extended by labels first seen in later files.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from speler.data.layouts import get_layout
from speler.data.schema import SequenceSet
from speler.formats._common import (
    Progress, Sample, boundary, build, existing, fail, fill_missing, list_files, parse_floats,
    read_text, rel, stem_of, tick,
)

logger = logging.getLogger(__name__)

KNOWN_FPS = {"basicmotions": 10.0, "epilepsy": 16.0}
NATOPS_DIMS = 24
_PAIR = re.compile(r"\(([^(),]*),([^(),]*)\)")
_TRUE = ("true", "1", "yes")


def is_ts_file(p: Path) -> bool:
    return p.suffix.lower() == ".ts"


@dataclass
class _TsFile:
    problem: str = ""
    labels: list[str] = field(default_factory=list)
    has_labels: bool = False
    has_target: bool = False
    timestamps: bool = False
    dims: int | None = None
    cases: list[tuple[int, list[np.ndarray], str | None]] = field(default_factory=list)


@boundary("UEA .ts")
def read_uea(path: str | Path, *, progress: Progress = None) -> SequenceSet:
    """Read a ``.ts`` file or a folder of one problem's ``.ts`` files.

    x float32 (N, C, T, V, M): (N, dims, T, 1, 1) for series, (N, 3, T, 8, 1) for NATOPS.
    """
    root = existing(path)
    files = list_files(root, is_ts_file)
    if not files:
        raise fail(root, "no .ts files found")
    parsed: list[tuple[Path, _TsFile]] = []
    for k, f in enumerate(files):
        parsed.append((f, _parse(read_text(f), f)))
        tick(progress, k + 1, len(files))
    problem = parsed[0][1].problem
    dims = parsed[0][1].dims
    for f, ts in parsed[1:]:
        if ts.problem.lower() != problem.lower():
            raise fail(root, f"{rel(f, root)} is problem {ts.problem!r} but {rel(parsed[0][0], root)}"
                             f" is {problem!r}; read one problem at a time")
        if ts.dims != dims:
            raise fail(root, f"{rel(f, root)} has {ts.dims} dimensions, {rel(parsed[0][0], root)}"
                             f" has {dims}")
    natops = problem.lower() == "natops" and dims == NATOPS_DIMS
    classes: list[str] = []
    for _, ts in parsed:
        for lab in ts.labels + [c[2] for c in ts.cases if c[2] is not None]:
            if lab not in classes:
                classes.append(lab)
    samples = []
    for f, ts in parsed:
        r = rel(f, root)
        stem = stem_of(r)
        for i, (_, series, label) in enumerate(ts.cases):
            arr = np.stack(series)  # (dims, T)
            if natops:
                data = arr.reshape(8, 3, -1).transpose(1, 2, 0)[..., None]  # (3, T, 8, 1)
            else:
                data = arr[:, :, None, None]
            samples.append(Sample(data=data, id=f"{stem}#{i}", source_file=r, source_index=i,
                                  label=label))
    if natops:
        layout, channels = get_layout("natops8"), ("x", "y", "z")
    else:
        layout, channels = get_layout("series"), tuple(f"dim{d}" for d in range(dims or 0))
    return build(samples, layout=layout, where=root, channels=channels,
                 fps=KNOWN_FPS.get(problem.lower(), 0.0), classes=classes)


def _parse(text: str, where: Path) -> _TsFile:
    ts = _TsFile()
    lines = text.splitlines()
    in_data = False
    missing_declared = None
    for i, raw in enumerate(lines):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not in_data:
            if not line.startswith("@"):
                raise fail(where, f"line {i + 1}: expected a @ header line before @data, got"
                                  f" {line[:60]!r}")
            key, _, rest = line[1:].partition(" ")
            key, rest = key.lower(), rest.strip()
            words = rest.split()
            if key == "data":
                in_data = True
            elif key == "problemname":
                ts.problem = rest
            elif key == "timestamps":
                ts.timestamps = rest.lower() in _TRUE
            elif key == "missing":
                missing_declared = rest.lower() in _TRUE
            elif key == "univariate":
                if rest.lower() in _TRUE:
                    ts.dims = 1
            elif key in ("dimensions", "dimension"):
                try:
                    ts.dims = int(rest)
                except ValueError:
                    raise fail(where, f"line {i + 1}: @dimensions {rest[:40]!r} is not an integer") \
                        from None
                if ts.dims < 1:
                    raise fail(where, f"line {i + 1}: @dimensions {ts.dims} must be at least 1")
            elif key == "classlabel":
                if not words or words[0].lower() not in ("true", "false"):
                    raise fail(where, f"line {i + 1}: @classLabel must be 'true <labels>' or 'false'")
                ts.has_labels = words[0].lower() == "true"
                ts.labels = words[1:] if ts.has_labels else []
                if ts.has_labels and not ts.labels:
                    raise fail(where, f"line {i + 1}: @classLabel true lists no class labels")
                if len(set(ts.labels)) != len(ts.labels):
                    raise fail(where, f"line {i + 1}: @classLabel lists a label twice")
            elif key == "targetlabel":
                ts.has_target = bool(words) and words[0].lower() in _TRUE
            # other keys (equalLength, seriesLength, ...) are informative only
            continue
        ts.cases.append(_parse_case(line, i + 1, ts, where))
    if not in_data:
        raise fail(where, "no @data line; not a .ts file")
    if not ts.cases:
        raise fail(where, "no cases after @data")
    if missing_declared is False and any(c[0] < 0 for c in ts.cases):
        logger.info("%s: values are missing although the header says @missing false", where)
    ts.cases = [(abs(n), s, lab) for n, s, lab in ts.cases]
    return ts


def _values_only(text: str) -> bool:
    """Whether ``text`` is a comma-separated list of two or more numbers (or '?'), the last part
    possibly empty (a line cut right after a comma)."""
    parts = [p.strip() for p in text.split(",")]
    cut = parts[-1] == ""
    if cut:
        parts.pop()
    if len(parts) < (1 if cut else 2):
        return False
    for p in parts:
        try:
            float(p)
        except ValueError:
            if p != "?":
                return False
    return True


def _parse_case(line: str, lineno: int, ts: _TsFile, where: Path):
    """(line number, negative if values were missing; [per-dimension float64 (T,)]; label)."""
    fields = line.split(":")
    label = None
    if ts.has_labels:
        if len(fields) < 2:
            cut = " (it ends in values: the line looks cut short)" if _values_only(line) else ""
            raise fail(where, f"line {lineno}: case has no class label after the last ':'{cut}")
        label = fields.pop().strip()
        if label not in ts.labels and _values_only(label):
            # values where the label belongs: the line stops inside a dimension (a cut file)
            expected = "" if ts.dims is None else f" of the {ts.dims} expected"
            raise fail(where, f"line {lineno}: the case ends in values where its class label "
                              f"should be, after {len(fields)} dimension(s){expected}: the line "
                              "looks cut short (a truncated or damaged file?)")
        if label not in ts.labels:
            raise fail(where, f"line {lineno}: class label {label[:40]!r} is not one of the header's"
                              f" @classLabel list {ts.labels[:10]}")
    elif ts.has_target:
        if len(fields) < 2:
            raise fail(where, f"line {lineno}: case has no target value after the last ':'")
        fields.pop()
    if ts.dims is None:
        ts.dims = len(fields)
    if len(fields) != ts.dims:
        raise fail(where, f"line {lineno}: case has {len(fields)} dimensions, expected {ts.dims}")
    series = []
    any_missing = False
    length = None
    for d, text in enumerate(fields):
        if ts.timestamps:
            pairs = _PAIR.findall(text)
            tokens = [v.strip() for _, v in pairs]
            if not tokens and text.strip():
                raise fail(where, f"line {lineno}, dimension {d}: expected (time,value) pairs")
        else:
            tokens = [t.strip() for t in text.split(",")]
            if tokens and tokens[-1] == "" and len(tokens) > 1:
                tokens.pop()  # trailing comma
        if not tokens or tokens == [""]:
            raise fail(where, f"line {lineno}, dimension {d}: no values")
        vals_txt = ["nan" if t == "?" else t for t in tokens]
        if "" in vals_txt:
            raise fail(where, f"line {lineno}, dimension {d}: empty value at position"
                              f" {vals_txt.index('')}")
        vals = parse_floats(vals_txt, f"{where}: line {lineno}, dimension {d}")
        if np.isinf(vals).any():
            raise fail(where, f"line {lineno}, dimension {d}: infinite value at position"
                              f" {int(np.flatnonzero(np.isinf(vals))[0])}")
        nan = np.isnan(vals)
        if nan.all():
            raise fail(where, f"line {lineno}, dimension {d}: every value is missing; cannot fill")
        if nan.any():
            any_missing = True
            vals = fill_missing(vals)
        if length is None:
            length = len(vals)
        elif len(vals) != length:
            raise fail(where, f"line {lineno}: dimension {d} has {len(vals)} values, dimension 0 has"
                              f" {length}; a case's dimensions must have the same length")
        series.append(vals)
    return (-lineno if any_missing else lineno, series, label)

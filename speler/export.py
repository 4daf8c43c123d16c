"""Labels out of a project: one table with provenance, exports to files, and label doubts.

``label_table(project)`` has one row per sample (in data.npz order):

======================  =========================================================================
id, index               the sample's id and row in data.npz
label                   current label (class name; '' = none): latest human/imported, else propagated
source                  'human' | 'imported' | 'propagated' | 'none'
energy, margin          the propagation's view of the sample (NaN where there is none); lower
                        energy = better connected to the labeled set
reliable                bool: True for human and imported labels (the ground truth people gave) and
                        where the propagation counts a propagated label as reliable; False else
round                   pandas nullable Int64: the round that propagated the current label; <NA>
                        for human and imported labels and samples without a label (no round gave
                        them). CSV: an empty cell; JSON: null; npz: int64 with -1 for <NA>
annotator, time         who gave the current label and when (ISO 8601, UTC; '' where none)
true_label_eval_only    only when the dataset carries held-out truth (``y_true``): for evaluation
                        and simulation only, never a label anyone gave
======================  =========================================================================

``energy``, ``margin`` and the reliability of propagated labels come from ``propagation`` when one
is passed (the live view, e.g. after instant re-propagation); otherwise energy and margin come from
the store (latest propagated event per sample) and reliability from the latest round folder's
``propagation.npz`` (False where there is none).

``export_labels`` writes that table as CSV, JSON (with a header), npz (arrays) or a PYSKL pickle
(through ``speler.formats.pyskl.write_pyskl``, loadable by ``speler.formats.read``), always to a
temporary file in the target folder renamed into place, so a failure leaves no partial file and an
older export of the same name intact. ``read_export`` reads CSV / JSON / npz back into the table.

``doubts`` lists human labels that the graph strongly disagrees with (the arithmetic is in
``speler.graph.doubts``; this names the samples and classes).
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from speler.errors import ConfigError, DataFormatError, SpelerError
from speler.graph.doubts import disagreement
from speler.graph.propagate import PropagationResult
from speler.project import Project

logger = logging.getLogger(__name__)

FORMATS = ("csv", "json", "npz", "pyskl")
EXTENSIONS = {"csv": ".csv", "json": ".json", "npz": ".npz", "pyskl": ".pkl"}
TRUE_COLUMN = "true_label_eval_only"
COLUMNS = ("id", "index", "label", "source", "energy", "margin", "reliable", "round", "annotator",
           "time")
_DTYPES = {"id": str, "index": np.int64, "label": str, "source": str, "energy": np.float64,
           "margin": np.float64, "reliable": bool, "round": "Int64", "annotator": str, "time": str,
           TRUE_COLUMN: str}
_ROUND_PROPAGATION = ("propagation.npz", "combined.reliable")  # written by speler.loop


# -- the table -----------------------------------------------------------------------------------

def label_table(project: Project, *, propagation: PropagationResult | None = None) -> pd.DataFrame:
    """One row per sample with its current label and provenance (columns in the module docstring).

    propagation: the live propagation (n samples); when given, energy, margin and reliable are
        taken from it instead of the store and the latest round folder.
    """
    store = project.store
    cur = store.current_labels()
    n = store.n
    classes = np.array(store.classes, dtype=object)
    label = np.where(cur.label >= 0, classes[np.clip(cur.label, 0, None)], "").astype(str)
    if propagation is not None:
        _check_propagation(propagation, n, len(store.classes))
        energy = np.asarray(propagation.energy, dtype=np.float64)
        margin = np.asarray(propagation.margin, dtype=np.float64)
        reliable = np.asarray(propagation.reliable, dtype=bool)
    else:
        energy = np.asarray(cur.energy, dtype=np.float64)
        margin = np.asarray(cur.margin, dtype=np.float64)
        reliable = _saved_reliable(project, n)
    source = np.asarray(cur.source).astype(str)
    given = np.isin(source, ("human", "imported"))
    reliable = given | (reliable & (source == "propagated"))
    rounds = np.asarray(cur.round, dtype=np.int64)
    from_round = (source == "propagated") & (rounds >= 0)
    round_col = pd.array(rounds, dtype="Int64")
    round_col[~from_round] = pd.NA  # human, imported, none: no round gave the label
    table = pd.DataFrame({
        "id": np.asarray(store.ids).astype(str),
        "index": np.arange(n, dtype=np.int64),
        "label": label,
        "source": source,
        "energy": energy,
        "margin": margin,
        "reliable": reliable,
        "round": round_col,
        "annotator": np.asarray(cur.annotator).astype(str),
        "time": np.asarray(cur.time).astype(str),
    })
    y_true = project.data.y_true
    if y_true is not None:
        y_true = np.asarray(y_true)
        table[TRUE_COLUMN] = np.where(y_true >= 0, classes[np.clip(y_true, 0, None)], "").astype(str)
        table.attrs["evaluation_only"] = [TRUE_COLUMN]
    return table


def _check_propagation(propagation: PropagationResult, n: int, num_classes: int) -> None:
    for field in ("energy", "margin", "reliable", "labels"):
        shape = np.asarray(getattr(propagation, field)).shape
        if shape != (n,):
            raise DataFormatError(f"propagation.{field} has shape {shape}, the project has {n} samples")
    shape = np.asarray(propagation.scores).shape
    if shape != (n, num_classes):
        raise DataFormatError(
            f"propagation.scores has shape {shape}, expected ({n}, {num_classes}) for this project")


def _saved_reliable(project: Project, n: int) -> np.ndarray:
    """Reliability saved with the latest round folder, False where there is none."""
    no = project.latest_round()
    if no is None:
        return np.zeros(n, dtype=bool)
    path = project.round_dir(no) / _ROUND_PROPAGATION[0]
    try:
        with np.load(path) as z:
            rel = np.asarray(z[_ROUND_PROPAGATION[1]], dtype=bool)
    except (OSError, KeyError, ValueError) as exc:
        logger.warning("%s: no reliability to export (%s)", path, exc)
        return np.zeros(n, dtype=bool)
    if rel.shape != (n,):
        logger.warning("%s: reliability has shape %s, project has %d samples", path, rel.shape, n)
        return np.zeros(n, dtype=bool)
    return rel


# -- exports ----------------------------------------------------------------------------------

def export_format(format: str | None, path: str | Path | None) -> str:
    """The format of an export: ``format`` when given, else the one that ``path``'s extension
    names (.csv, .json, .npz, .pkl), csv without a path. ConfigError when the extension names no
    format and none is given, or names another format than the one given (a file called
    labels.json holding CSV)."""
    if format is not None and format not in FORMATS:
        raise ConfigError(f"unknown export format {format!r}; known: {', '.join(FORMATS)}")
    if path is None:
        return format or "csv"
    suffix = Path(path).suffix.lower()
    named = next((f for f, ext in EXTENSIONS.items() if ext == suffix), None)
    if format is None and named is None:
        raise ConfigError(
            f"{path}: cannot tell the export format from the extension {suffix or '(none)'!r}; "
            f"name the file {', '.join(EXTENSIONS.values())} or choose a format "
            f"({', '.join(FORMATS)})")
    if format is not None and named is not None and named != format:
        raise ConfigError(f"{path}: the extension {suffix} says {named}, but the format asked "
                          f"for is {format}; name the file {EXTENSIONS[format]} or ask for {named}")
    return format or named


def check_export(project: Project, *, format: str, path: str | Path | None = None) -> None:
    """ConfigError when ``project`` cannot be exported as ``format`` (unknown format, or PYSKL for
    a project of sensor series: PYSKL pickles hold skeleton keypoints). ``path`` names the
    target in the message."""
    if format not in FORMATS:
        raise ConfigError(f"unknown export format {format!r}; known: {', '.join(FORMATS)}")
    if format == "pyskl" and project.data.layout.is_series:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(
            f"{where}PYSKL pickles hold skeleton keypoints and project {project.name} holds "
            f"sensor series ({len(project.data.channels)} channels): export csv, json or npz "
            "instead")


def export_labels(project: Project, *, format: str | None = None, path: str | Path | None = None,
                  propagation: PropagationResult | None = None) -> Path:
    """Write the label table of ``project`` and return the file written.

    format: 'csv' | 'json' | 'npz' | 'pyskl', or None: the one ``path``'s extension names (csv
        without a path); see ``export_format`` for the ConfigErrors, and ``check_export`` for
        'pyskl' on a series project; each before anything is written.
    path: target file; default ``project.exports_dir / f"{project.name}-labels{ext}"``.
    propagation: passed to ``label_table`` (live energy / margin / reliability).
    The file is written to a temporary name beside ``path`` and renamed into place.
    """
    format = export_format(format, path)
    target = Path(path) if path is not None else \
        project.exports_dir / f"{project.name}-labels{EXTENSIONS[format]}"
    check_export(project, format=format, path=target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{target.parent}: cannot create the export folder ({exc})") from exc
    table = label_table(project, propagation=propagation)
    writer = {"csv": _write_csv, "json": _write_json, "npz": _write_npz, "pyskl": _write_pyskl}[format]
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        writer(project, table, tmp)
        os.replace(tmp, target)
    except SpelerError as exc:  # a writer names the file it wrote: the hidden temporary one
        tmp.unlink(missing_ok=True)
        raise type(exc)(str(exc).replace(str(tmp), str(target))) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    logger.info("exported %d labels of %s to %s", len(table), project.name, target)
    return target


def _write_csv(project: Project, table: pd.DataFrame, path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        table.to_csv(f, index=False)
        f.flush()
        os.fsync(f.fileno())


def _header(project: Project, table: pd.DataFrame) -> dict:
    classes = list(project.store.classes)
    counts = {}
    for source in ("human", "imported", "propagated"):
        sel = table["label"][table["source"] == source]
        counts[source] = {c: int((sel == c).sum()) for c in classes}
    counts["none"] = int((table["source"] == "none").sum())
    header = {
        "project": project.name,
        "classes": classes,
        "n": int(len(table)),
        "counts": counts,
        "round": project.store.last_done_round(),
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "columns": list(table.columns),
    }
    if TRUE_COLUMN in table.columns:
        header["evaluation_only"] = [TRUE_COLUMN]
    return header


def _write_json(project: Project, table: pd.DataFrame, path: Path) -> None:
    rows = table.astype(object).where(table.notna(), None).to_dict(orient="records")
    for row in rows:  # numpy scalars → plain Python for json
        for k, v in row.items():
            if isinstance(v, np.generic):
                row[k] = v.item()
    doc = {"header": _header(project, table), "samples": rows}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1, allow_nan=False)
        f.flush()
        os.fsync(f.fileno())


def _write_npz(project: Project, table: pd.DataFrame, path: Path) -> None:
    classes = np.array(project.store.classes, dtype=str)
    arrays = {col: table[col].to_numpy().astype(_DTYPES[col]) for col in table.columns
              if col != "round"}
    arrays["round"] = table["round"].fillna(-1).to_numpy(dtype=np.int64)  # -1 = <NA>
    lookup = {c: i for i, c in enumerate(classes.tolist())}
    arrays["label_index"] = np.array([lookup.get(v, -1) for v in arrays["label"]], dtype=np.int64)
    arrays["classes"] = classes
    arrays["project"] = np.array(project.name)
    with open(path, "wb") as f:  # a file object: np.savez would append .npz to a bare name
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())


def _write_pyskl(project: Project, table: pd.DataFrame, path: Path) -> None:
    from speler.formats.pyskl import write_pyskl

    labels = project.store.current_labels().label.astype(np.int64)
    write_pyskl(project.data, path, labels=labels)


def read_export(path: str | Path) -> pd.DataFrame:
    """Read a CSV, JSON or npz written by ``export_labels`` back into the label table."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            table = pd.read_csv(path, dtype={c: t for c, t in _DTYPES.items()
                                             if t is str}, keep_default_na=False,
                                na_values={"energy": [""], "margin": [""], "round": [""]})
        elif suffix == ".json":
            doc = json.loads(path.read_text(encoding="utf-8"))
            table = pd.DataFrame(doc["samples"], columns=doc["header"]["columns"])
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                cols = [c for c in COLUMNS + (TRUE_COLUMN,) if c in z.files]
                table = pd.DataFrame({c: z[c] for c in cols})
            if "round" in table.columns:  # -1 stands for <NA> in npz
                table["round"] = table["round"].astype("Int64").mask(table["round"] < 0)
        else:
            raise DataFormatError(f"{path}: cannot read back a {suffix or 'suffix-less'} export; "
                                  "expected .csv, .json or .npz")
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        raise DataFormatError(f"{path}: not a readable label export ({exc})") from exc
    for col in table.columns:
        if col in _DTYPES:
            if _DTYPES[col] is np.float64:
                table[col] = pd.to_numeric(table[col], errors="coerce").astype(np.float64)
            elif _DTYPES[col] is str:
                table[col] = table[col].fillna("").astype(str)
            elif _DTYPES[col] == "Int64":
                table[col] = pd.to_numeric(table[col], errors="coerce").astype("Int64")
            else:
                table[col] = table[col].astype(_DTYPES[col])
    return table


# -- doubts ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Doubt:
    """A human (or imported) label that the graph disagrees with.

    index, id: the sample. label / label_name: its human label. suggested / suggested_name: the
    class its neighbours put the most mass on. label_mass, suggested_mass: shares of the
    neighbours' propagated mass on those two classes (each in [0, 1]). score: suggested_mass -
    label_mass (higher = stronger disagreement). source: 'human' or 'imported'.
    """

    index: int
    id: str
    label: int
    label_name: str
    suggested: int
    suggested_name: str
    label_mass: float
    suggested_mass: float
    score: float
    source: str
    annotator: str
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def doubts(
    project: Project,
    propagation: PropagationResult,
    *,
    top: int = 20,
    affinity: sp.spmatrix | Sequence[sp.spmatrix] | None = None,
    min_score: float = 0.0,
) -> list[Doubt]:
    """Human labels the graph strongly disagrees with, strongest first (at most ``top``).

    The graph's opinion of a labeled sample comes from its neighbours in ``affinity`` (the graph
    W, or a list of graphs, averaged; see ``speler.graph.doubts``); without it, from the sample's
    own propagated row, where its own seed weighs heavily: pass W wherever there is one. A doubt
    is a labeled sample whose opinion puts more mass on another class than on its label by more
    than ``min_score``; score = mass(best other class) - mass(label).
    """
    store = project.store
    n, C = store.n, len(store.classes)
    _check_propagation(propagation, n, C)
    if isinstance(top, bool) or not isinstance(top, (int, np.integer)) or top < 0:
        raise ConfigError(f"doubts: top must be an integer >= 0, got {top!r}")
    human = store.human_labels()
    if top == 0 or not (human >= 0).any() or C < 2:
        if affinity is not None:  # still refuse a malformed graph
            disagreement(propagation, np.full(n, -1), affinity=affinity)
        return []
    d = disagreement(propagation, human, affinity=affinity)
    score = d.score
    keep = np.flatnonzero(score > min_score)
    keep = keep[np.lexsort((d.rows[keep], -score[keep]))][:int(top)]
    if len(keep) == 0:
        return []
    cur = store.current_labels()
    ids, classes = store.ids, store.classes
    out = []
    where = "its graph neighbours say" if d.from_neighbours else "the propagation says"
    for k in keep.tolist():
        i = int(d.rows[k])
        h, b = int(d.label[k]), int(d.best[k])
        who = str(cur.annotator[i])
        by = f" by {who}" if who else ""
        out.append(Doubt(
            index=i, id=str(ids[i]), label=h, label_name=classes[h], suggested=b,
            suggested_name=classes[b], label_mass=float(d.label_mass[k]),
            suggested_mass=float(d.best_mass[k]), score=float(score[k]),
            source=str(cur.source[i]), annotator=who,
            reason=(f"labeled {classes[h]}{by}; {where} {classes[b]} "
                    f"({d.best_mass[k]:.2f}) rather than {classes[h]} ({d.label_mass[k]:.2f})"),
        ))
    return out

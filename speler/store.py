"""The label store: one SQLite file per project, label events appended and never overwritten.

Tables (see ``SCHEMA``): ``meta`` (dataset fingerprint, class list, creation time), ``samples``
(``idx`` = row of the sample in data.npz, ``id``), ``classes``, ``label_events`` and ``rounds``.
A label event says: this sample got this label (or NULL: an undo) from this source (``human``,
``imported`` or ``propagated``), in this round, with this energy and margin, by this annotator, at
this time (ISO 8601, UTC). Undo appends an event whose ``undoes`` points at the event it cancels.

Current label of a sample: its latest human or imported event that has not been undone; where
there is none, its latest propagated event. Propagated events are written only together with
marking their round done (one transaction), so a crash mid-round leaves the store as it was.

Habits: stdlib ``sqlite3``, schema as one SQL constant, ``PRAGMA user_version`` with numbered
migrations, WAL, foreign keys on, ``with conn:`` around every write (with ``BEGIN IMMEDIATE``, so two
processes never interleave a read-then-write).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from speler.errors import LabelError, StoreError
from speler.round_metrics import RoundMetrics
from speler.system import pid_alive, this_host

logger = logging.getLogger(__name__)

SOURCES = ("human", "imported", "propagated")
#: Statuses stored in ``rounds``. ``rounds()`` reports a stored 'running' round as 'interrupted'
#: when the process that started it (``pid`` on ``host``, this machine) no longer exists.
ROUND_STATUSES = ("running", "done", "failed")

#: Version of ``SCHEMA``; files with a lower ``user_version`` are migrated with ``MIGRATIONS``.
SCHEMA_VERSION = 3

#: The current schema, executed on a new, empty file.
SCHEMA = """
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE samples (
    idx INTEGER PRIMARY KEY,          -- row of the sample in data.npz
    id  TEXT NOT NULL UNIQUE
);
CREATE TABLE classes (
    idx  INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE
);
CREATE TABLE label_events (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    sample    INTEGER NOT NULL REFERENCES samples(idx),
    label     INTEGER REFERENCES classes(idx),      -- NULL: an undo or a clear
    source    TEXT NOT NULL CHECK (source IN ('human', 'propagated', 'imported')),
    round     INTEGER,
    energy    REAL,
    margin    REAL,
    annotator TEXT NOT NULL DEFAULT '',
    time      TEXT NOT NULL,                          -- ISO 8601, UTC
    undoes    INTEGER REFERENCES label_events(id)
);
CREATE TABLE rounds (
    no       INTEGER PRIMARY KEY,
    status   TEXT NOT NULL CHECK (status IN ('running', 'done', 'failed')),
    started  TEXT NOT NULL,
    finished TEXT,
    metrics  TEXT,                                    -- JSON
    config   TEXT,                                    -- JSON
    reason   TEXT,                                    -- why a round failed
    pid      INTEGER,                                 -- process that started the round
    host     TEXT                                     -- and the machine it ran on
);
CREATE INDEX label_events_by_sample ON label_events(source, sample, id);
CREATE INDEX label_events_undoes ON label_events(undoes) WHERE undoes IS NOT NULL;
CREATE TRIGGER label_events_no_update BEFORE UPDATE ON label_events
BEGIN SELECT RAISE(ABORT, 'label events are append-only'); END;
CREATE TRIGGER label_events_no_delete BEFORE DELETE ON label_events
BEGIN SELECT RAISE(ABORT, 'label events are append-only'); END;
"""

#: ``MIGRATIONS[v]`` upgrades a file from ``user_version`` v to v + 1.
#: Version 1 had no ``rounds.reason`` column and no indexes or append-only triggers on events;
#: version 2 no ``rounds.pid`` and ``rounds.host`` (its running rounds stay 'running').
MIGRATIONS: dict[int, str] = {
    1: """
ALTER TABLE rounds ADD COLUMN reason TEXT;
CREATE INDEX label_events_by_sample ON label_events(source, sample, id);
CREATE INDEX label_events_undoes ON label_events(undoes) WHERE undoes IS NOT NULL;
CREATE TRIGGER label_events_no_update BEFORE UPDATE ON label_events
BEGIN SELECT RAISE(ABORT, 'label events are append-only'); END;
CREATE TRIGGER label_events_no_delete BEFORE DELETE ON label_events
BEGIN SELECT RAISE(ABORT, 'label events are append-only'); END;
""",
    2: """
ALTER TABLE rounds ADD COLUMN pid INTEGER;
ALTER TABLE rounds ADD COLUMN host TEXT;
""",
}

# Latest effective human/imported event and latest propagated event per sample, one row per
# sample in idx order. "Effective" = not an undo itself and not undone by a later event. Each
# MAX(id) is an index seek per sample, so the cost grows with n, not with the number of rounds.
_CURRENT_SQL = """
WITH cur AS (
    SELECT s.idx AS idx,
        (SELECT MAX(e.id) FROM label_events AS e
         WHERE e.source IN ('human', 'imported') AND e.sample = s.idx AND e.undoes IS NULL
           AND NOT EXISTS (SELECT 1 FROM label_events AS u WHERE u.undoes = e.id)) AS hid,
        (SELECT MAX(p.id) FROM label_events AS p
         WHERE p.source = 'propagated' AND p.sample = s.idx) AS pid
    FROM samples AS s
)
SELECT COALESCE(he.label, -1), COALESCE(he.source, ''), COALESCE(he.round, -1),
       COALESCE(he.annotator, ''), COALESCE(he.time, ''),
       COALESCE(pe.label, -1), COALESCE(pe.round, -1), pe.energy, pe.margin, COALESCE(pe.time, '')
FROM cur LEFT JOIN label_events AS he ON he.id = cur.hid
LEFT JOIN label_events AS pe ON pe.id = cur.pid
ORDER BY cur.idx
"""

_HUMAN_SQL = """
SELECT e.sample, e.label FROM label_events AS e
JOIN (
    SELECT sample, MAX(id) AS id FROM label_events AS e
    WHERE source IN ('human', 'imported') AND undoes IS NULL
      AND NOT EXISTS (SELECT 1 FROM label_events AS u WHERE u.undoes = e.id)
    GROUP BY sample
) AS h ON h.id = e.id
WHERE e.label IS NOT NULL
"""


# -- results ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LabelEvent:
    """One row of ``label_events``; ``label`` is a class name, None for an undo or a clear."""

    id: int
    sample_id: str
    label: str | None
    source: str
    round: int | None
    energy: float | None
    margin: float | None
    annotator: str
    time: str
    undoes: int | None


@dataclass(frozen=True)
class UndoResult:
    """What ``undo`` did: the appended event, the event it cancelled, and the label now in force.

    label: class name the undone event had given (None if it was a clear).
    restored: the sample's current label after the undo (class name, None = no label);
    restored_source: where that label comes from ('human', 'imported', 'propagated' or 'none').
    """

    event_id: int
    undone_id: int
    sample_id: str
    label: str | None
    restored: str | None
    restored_source: str
    annotator: str


@dataclass(frozen=True)
class RoundInfo:
    """One row of ``rounds``; metrics_json and config are the decoded JSON (None until written),
    ``metrics`` is metrics_json read as ``RoundMetrics`` (any version's; None until written).

    status: 'running', 'done', 'failed', or 'interrupted' for a round stored as running whose
    process (``pid`` on ``host``) is gone; ``reason`` then says so. Nothing is written for that:
    the next round takes the number over, as for any round that did not finish.
    """

    no: int
    status: str
    started: str
    finished: str | None
    metrics_json: dict[str, Any] | None
    config: dict[str, Any] | None
    reason: str | None
    pid: int | None = None
    host: str | None = None

    @property
    def metrics(self) -> RoundMetrics | None:
        return RoundMetrics.from_json(self.metrics_json) if self.metrics_json else None


@dataclass
class CurrentLabels:
    """Current label state of every sample, arrays of length n in sample (idx) order.

    label: int64, class index, -1 = no label.
    source: str, 'human' | 'imported' | 'propagated' | 'none'.
    energy, margin: float64, of the sample's latest propagated event (NaN where none) — the latest
        round's view of the sample, also for samples whose current label is human.
    round: int64, round of the event that gave the current label (-1 where none or not given).
    annotator, time: str, of the event that gave the current label ('' where none).
    propagated: int64, label of the latest propagated event (-1 where none).
    """

    label: np.ndarray
    source: np.ndarray
    energy: np.ndarray
    margin: np.ndarray
    round: np.ndarray
    annotator: np.ndarray
    time: np.ndarray
    propagated: np.ndarray


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _json(value: Any, what: str) -> str:
    def default(o: Any) -> Any:
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, Path):
            return str(o)
        raise TypeError(f"{type(o).__name__} is not JSON serialisable")

    try:
        return json.dumps(value, default=default, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise StoreError(f"{what} cannot be saved as JSON ({exc})") from exc


def _float_or_none(v: Any) -> float | None:
    if v is None:
        return None
    f = float(v)
    return None if math.isnan(f) else f


# -- the store ----------------------------------------------------------------------------------
class LabelStore:
    """Label events and rounds of one project, in one SQLite file.

    Open with ``LabelStore.open(path)`` or build with ``LabelStore.create(...)``; use as a context
    manager or call ``close()``. Several ``LabelStore`` objects (threads or processes) may share a
    file: WAL lets readers run beside a writer, and writers wait up to ``timeout`` seconds.
    """

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        # Use open() or create(); this trusts an already validated connection.
        self.path = path
        self._conn = conn
        self._lock = threading.RLock()
        self._load_header()

    # -- opening ---------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | Path,
        *,
        ids: Sequence[str],
        classes: Sequence[str],
        fingerprint: str,
        meta: dict[str, str] | None = None,
        timeout: float = 10.0,
    ) -> "LabelStore":
        """A new store at ``path`` (which must not exist) for samples ``ids`` (in data.npz row order).

        The file is built beside ``path`` and renamed into place, so it appears complete or not at
        all. ``meta``: extra key/value strings for the ``meta`` table (e.g. import provenance).
        """
        path = Path(path)
        ids = [str(i) for i in ids]
        classes = [str(c) for c in classes]
        if path.exists():
            raise StoreError(f"{path}: a file already exists there; refusing to overwrite it")
        if not ids:
            raise StoreError(f"{path}: cannot create a label store without samples")
        if len(set(ids)) != len(ids):
            seen: set[str] = set()
            dup = next(i for i in ids if i in seen or seen.add(i))  # type: ignore[func-returns-value]
            raise StoreError(f"{path}: sample id {dup!r} repeats; ids must be unique")
        if any(not i for i in ids):
            raise StoreError(f"{path}: empty sample id; ids must be non-empty strings")
        if len(set(classes)) != len(classes) or any(not c for c in classes):
            raise StoreError(f"{path}: class names must be unique and non-empty, got {classes}")
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            for p in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm"), Path(f"{tmp}-journal")):
                p.unlink(missing_ok=True)
            conn = sqlite3.connect(tmp, isolation_level=None)
            try:
                conn.execute("PRAGMA foreign_keys = ON")
                conn.executescript(
                    f"BEGIN;\n{SCHEMA}\nPRAGMA user_version = {SCHEMA_VERSION};\nCOMMIT;")
                rows = {"fingerprint": str(fingerprint), "classes": json.dumps(classes),
                        "created": _now(), **{str(k): str(v) for k, v in (meta or {}).items()}}
                with conn:
                    conn.execute("BEGIN")
                    conn.executemany("INSERT INTO meta(key, value) VALUES (?, ?)", rows.items())
                    conn.executemany("INSERT INTO classes(idx, name) VALUES (?, ?)",
                                     enumerate(classes))
                    conn.executemany("INSERT INTO samples(idx, id) VALUES (?, ?)", enumerate(ids))
                conn.execute("PRAGMA journal_mode = WAL")
            finally:
                conn.close()
            os.replace(tmp, path)
        except sqlite3.Error as exc:
            raise StoreError(f"{path}: cannot create the label store ({exc})") from exc
        except OSError as exc:
            raise StoreError(f"{path}: cannot write the label store ({exc})") from exc
        finally:
            for p in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm"), Path(f"{tmp}-journal")):
                p.unlink(missing_ok=True)
        logger.info("created label store %s: %d samples, %d classes", path, len(ids), len(classes))
        return cls.open(path, timeout=timeout)

    @classmethod
    def open(cls, path: str | Path, *, timeout: float = 10.0) -> "LabelStore":
        """Open an existing store, migrating an older schema; StoreError if missing, not SQLite,
        not a SpeLER store, corrupt, or written by a newer SpeLER."""
        path = Path(path)
        if not path.is_file():
            raise StoreError(f"{path}: no label store there (file missing)")
        try:
            conn = sqlite3.connect(path, timeout=timeout, isolation_level=None,
                                   check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreError(f"{path}: cannot open the label store ({exc})") from exc
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                raise StoreError(f"{path}: not a SpeLER label store (SQLite file without its schema)")
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{path}: label store schema version {version} is newer than this SpeLER "
                    f"understands ({SCHEMA_VERSION}); upgrade SpeLER"
                )
            conn.execute("PRAGMA foreign_keys = ON")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":
                logger.warning("%s: journal mode is %s, not WAL", path, mode)
            conn.execute("PRAGMA synchronous = NORMAL")
            if version < SCHEMA_VERSION:
                _migrate(conn, path, version)
            return cls(path, conn)
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise StoreError(f"{path}: not a readable SQLite label store ({exc})") from exc
        except BaseException:
            conn.close()
            raise

    def _load_header(self) -> None:
        try:
            meta = dict(self._conn.execute("SELECT key, value FROM meta").fetchall())
            classes = [r[0] for r in self._conn.execute("SELECT name FROM classes ORDER BY idx")]
            ids = [r[0] for r in self._conn.execute("SELECT id FROM samples ORDER BY idx")]
            idxs = self._conn.execute("SELECT MIN(idx), MAX(idx), COUNT(*) FROM samples").fetchone()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path}: label store is corrupt ({exc})") from exc
        if "fingerprint" not in meta:
            raise StoreError(f"{self.path}: label store has no dataset fingerprint in table meta")
        try:
            meta_classes = json.loads(meta.get("classes", "null"))
        except ValueError:
            meta_classes = "unreadable"
        if meta_classes is not None and meta_classes != classes:
            raise StoreError(f"{self.path}: table classes disagrees with meta.classes")
        if not ids or idxs[0] != 0 or idxs[1] != len(ids) - 1:
            raise StoreError(f"{self.path}: table samples must number its rows 0..n-1, got {idxs}")
        self._meta = meta
        self._classes = tuple(classes)
        self._class_index = {c: i for i, c in enumerate(classes)}
        self._ids = np.array(ids, dtype=str)
        self._id_index = {s: i for i, s in enumerate(ids)}

    def close(self) -> None:
        """Close the connection (idempotent)."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None  # type: ignore[assignment]

    def __enter__(self) -> "LabelStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LabelStore({str(self.path)!r}, n={self.n}, classes={len(self._classes)})"

    # -- header ----------------------------------------------------------------------------------
    @property
    def classes(self) -> tuple[str, ...]:
        return self._classes

    @property
    def ids(self) -> np.ndarray:
        """str (n,), sample ids in data.npz row order."""
        return self._ids

    @property
    def n(self) -> int:
        return len(self._ids)

    @property
    def fingerprint(self) -> str:
        return self._meta["fingerprint"]

    @property
    def meta(self) -> dict[str, str]:
        """All key/value rows of the meta table (a copy)."""
        return dict(self._meta)

    def sample_index(self, sample_id: str) -> int:
        """Row of ``sample_id`` in data.npz; LabelError naming the id if unknown."""
        try:
            return self._id_index[str(sample_id)]
        except KeyError:
            raise LabelError(f"{self.path}: unknown sample id {sample_id!r}") from None

    def class_index(self, label: str | int) -> int:
        """Index of class ``label`` (a name, or an index in range); LabelError if unknown."""
        if isinstance(label, (int, np.integer)) and not isinstance(label, (bool, np.bool_)):
            if 0 <= int(label) < len(self._classes):
                return int(label)
            raise LabelError(
                f"{self.path}: class index {int(label)} out of range 0..{len(self._classes) - 1}"
            )
        try:
            return self._class_index[str(label)]
        except KeyError:
            raise LabelError(
                f"{self.path}: unknown class {label!r}; known: {', '.join(self._classes)}"
            ) from None

    # -- internals -------------------------------------------------------------------------------
    @property
    def _c(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"{self.path}: label store is closed")
        return self._conn

    def _fail(self, what: str, exc: sqlite3.Error) -> StoreError:
        msg = str(exc)
        if "locked" in msg or "busy" in msg:
            msg += "; another process is writing to this store, try again"
        return StoreError(f"{self.path}: {what} failed ({msg})")

    def _check_source(self, source: str) -> None:
        if source not in SOURCES:
            raise LabelError(f"label source must be one of {', '.join(SOURCES)}, got {source!r}")

    # -- labels ----------------------------------------------------------------------------------
    def add_label(
        self,
        sample_id: str,
        label: str | int,
        *,
        source: str = "human",
        annotator: str = "",
        round: int | None = None,
        energy: float | None = None,
        margin: float | None = None,
    ) -> int:
        """Append one label event; returns its id. LabelError naming the id or class if unknown."""
        self._check_source(source)
        row = (self.sample_index(sample_id), self.class_index(label), source,
               None if round is None else int(round), _float_or_none(energy),
               _float_or_none(margin), str(annotator), _now())
        with self._lock:
            conn = self._c
            try:
                with conn:
                    conn.execute("BEGIN IMMEDIATE")
                    cur = conn.execute(
                        "INSERT INTO label_events(sample, label, source, round, energy, margin,"
                        " annotator, time) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", row)
                    return int(cur.lastrowid)
            except sqlite3.Error as exc:
                raise self._fail(f"adding label {label!r} to sample {sample_id!r}", exc) from exc

    def add_labels(
        self,
        rows: Iterable[tuple[str, str | int]],
        *,
        source: str,
        annotator: str = "",
        round: int | None = None,
        energies: Sequence[float] | np.ndarray | None = None,
        margins: Sequence[float] | np.ndarray | None = None,
    ) -> int:
        """Append many ``(sample_id, label)`` events in one transaction: all or nothing.

        energies / margins: optional, one per row. Every row is checked before anything is written;
        LabelError names the row, the id and the class. Returns the number of events written.
        """
        self._check_source(source)
        rows = list(rows)
        for name, extra in (("energies", energies), ("margins", margins)):
            if extra is not None and len(extra) != len(rows):
                raise LabelError(f"{name} has {len(extra)} values for {len(rows)} rows")
        t = _now()
        rnd = None if round is None else int(round)
        data = []
        for k, item in enumerate(rows):
            try:
                sample_id, label = item
            except (TypeError, ValueError):
                raise LabelError(f"row {k}: expected (sample_id, label), got {item!r}") from None
            try:
                s, c = self.sample_index(sample_id), self.class_index(label)
            except LabelError as exc:
                raise LabelError(f"row {k}: {exc}") from None
            data.append((s, c, source, rnd,
                         None if energies is None else _float_or_none(energies[k]),
                         None if margins is None else _float_or_none(margins[k]),
                         str(annotator), t))
        with self._lock:
            conn = self._c
            try:
                with conn:
                    conn.execute("BEGIN IMMEDIATE")
                    conn.executemany(
                        "INSERT INTO label_events(sample, label, source, round, energy, margin,"
                        " annotator, time) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", data)
            except sqlite3.Error as exc:
                raise self._fail(f"adding {len(data)} labels", exc) from exc
        return len(data)

    def undo(self, *, annotator: str | None = None) -> UndoResult | None:
        """Cancel the latest human event not yet undone (of ``annotator`` when given) by appending
        an undo event; the sample's label reverts to what it was before. None if nothing to undo."""
        with self._lock:
            conn = self._c
            try:
                with conn:
                    conn.execute("BEGIN IMMEDIATE")
                    where = "" if annotator is None else " AND e.annotator = ?"
                    params = () if annotator is None else (str(annotator),)
                    found = conn.execute(
                        "SELECT e.id, e.sample, e.label, e.annotator FROM label_events AS e"
                        " WHERE e.source = 'human' AND e.undoes IS NULL" + where +
                        " AND NOT EXISTS (SELECT 1 FROM label_events AS u WHERE u.undoes = e.id)"
                        " ORDER BY e.id DESC LIMIT 1", params).fetchone()
                    if found is None:
                        return None
                    undone, sample, label, who = found
                    who = who if annotator is None else str(annotator)
                    cur = conn.execute(
                        "INSERT INTO label_events(sample, label, source, annotator, time, undoes)"
                        " VALUES (?, NULL, 'human', ?, ?, ?)", (sample, who, _now(), undone))
                    event_id = int(cur.lastrowid)
                    restored, rsource = self._current_one(conn, sample)
            except sqlite3.Error as exc:
                raise self._fail("undo", exc) from exc
        return UndoResult(
            event_id=event_id, undone_id=int(undone), sample_id=str(self._ids[sample]),
            label=None if label is None else self._classes[label],
            restored=None if restored is None else self._classes[restored],
            restored_source=rsource, annotator=who,
        )

    def _current_one(self, conn: sqlite3.Connection, sample: int) -> tuple[int | None, str]:
        h = conn.execute(
            "SELECT e.label, e.source FROM label_events AS e WHERE e.sample = ?"
            " AND e.source IN ('human', 'imported') AND e.undoes IS NULL"
            " AND NOT EXISTS (SELECT 1 FROM label_events AS u WHERE u.undoes = e.id)"
            " ORDER BY e.id DESC LIMIT 1", (sample,)).fetchone()
        if h is not None and h[0] is not None:
            return int(h[0]), h[1]
        p = conn.execute(
            "SELECT label FROM label_events WHERE sample = ? AND source = 'propagated'"
            " ORDER BY id DESC LIMIT 1", (sample,)).fetchone()
        if p is not None and p[0] is not None:
            return int(p[0]), "propagated"
        return None, "none"

    def label_of(self, sample_id: str) -> tuple[int, str]:
        """Current label of one sample: (class index or -1, source 'human' | 'imported' |
        'propagated' | 'none'); the single-sample form of ``current_labels``."""
        i = self.sample_index(sample_id)
        with self._lock:
            try:
                label, source = self._current_one(self._c, i)
            except sqlite3.Error as exc:
                raise self._fail(f"reading the label of sample {sample_id!r}", exc) from exc
        return (-1 if label is None else label), source

    def current_labels(self) -> CurrentLabels:
        """Current label of every sample (see ``CurrentLabels``), from one SQL query."""
        with self._lock:
            try:
                rows = self._c.execute(_CURRENT_SQL).fetchall()
            except sqlite3.Error as exc:
                raise self._fail("reading current labels", exc) from exc
        n = self.n
        if len(rows) != n:
            raise StoreError(f"{self.path}: expected {n} samples, read {len(rows)}")
        if n == 0:  # pragma: no cover - create() refuses empty stores
            cols: list[tuple] = [()] * 10
        else:
            cols = list(zip(*rows))
        h_label = np.array(cols[0], dtype=np.int64)
        h_source = np.array(cols[1], dtype=object)
        h_round = np.array(cols[2], dtype=np.int64)
        p_label = np.array(cols[5], dtype=np.int64)
        p_round = np.array(cols[6], dtype=np.int64)
        energy = np.array(cols[7], dtype=np.float64)
        margin = np.array(cols[8], dtype=np.float64)
        human = h_label >= 0
        prop = ~human & (p_label >= 0)
        source = np.full(n, "none", dtype=object)
        source[human] = h_source[human]
        source[prop] = "propagated"
        annotator = np.where(human, np.array(cols[3], dtype=object), "")
        time = np.where(human, np.array(cols[4], dtype=object),
                        np.where(prop, np.array(cols[9], dtype=object), ""))
        return CurrentLabels(
            label=np.where(human, h_label, p_label),
            source=source.astype(str),
            energy=energy,
            margin=margin,
            round=np.where(human, h_round, np.where(prop, p_round, -1)).astype(np.int64),
            annotator=annotator.astype(str),
            time=time.astype(str),
            propagated=p_label,
        )

    def human_labels(self) -> np.ndarray:
        """int64 (n,): current human or imported label per sample, -1 where none."""
        with self._lock:
            try:
                rows = self._c.execute(_HUMAN_SQL).fetchall()
            except sqlite3.Error as exc:
                raise self._fail("reading human labels", exc) from exc
        out = np.full(self.n, -1, dtype=np.int64)
        if rows:
            idx, lab = np.array(rows, dtype=np.int64).T
            out[idx] = lab
        return out

    def events(self, sample_id: str | None = None) -> list[LabelEvent]:
        """All label events in order, or only those of ``sample_id``."""
        sql = ("SELECT id, sample, label, source, round, energy, margin, annotator, time, undoes"
               " FROM label_events")
        params: tuple = ()
        if sample_id is not None:
            sql += " WHERE sample = ?"
            params = (self.sample_index(sample_id),)
        with self._lock:
            try:
                rows = self._c.execute(sql + " ORDER BY id", params).fetchall()
            except sqlite3.Error as exc:
                raise self._fail("reading label events", exc) from exc
        return [
            LabelEvent(id=r[0], sample_id=str(self._ids[r[1]]),
                       label=None if r[2] is None else self._classes[r[2]], source=r[3],
                       round=r[4], energy=r[5], margin=r[6], annotator=r[7], time=r[8], undoes=r[9])
            for r in rows
        ]

    # -- rounds ----------------------------------------------------------------------------------
    def begin_round(self) -> int:
        """Record a new round as 'running' and return its number.

        The number is one after the last done round (0 for the first). A round left 'running' or
        'failed' under that number (crash, Ctrl-C) is taken over: it never wrote any labels.
        """
        with self._lock:
            conn = self._c
            try:
                with conn:
                    conn.execute("BEGIN IMMEDIATE")
                    last = conn.execute(
                        "SELECT MAX(no) FROM rounds WHERE status = 'done'").fetchone()[0]
                    no = 0 if last is None else int(last) + 1
                    old = conn.execute("SELECT status FROM rounds WHERE no = ?", (no,)).fetchone()
                    if old is not None:
                        logger.warning("%s: round %d was left %s; starting it again", self.path, no,
                                       old[0])
                    conn.execute("DELETE FROM rounds WHERE no >= ?", (no,))
                    conn.execute("INSERT INTO rounds(no, status, started, pid, host)"
                                 " VALUES (?, 'running', ?, ?, ?)",
                                 (no, _now(), os.getpid(), this_host()))
            except sqlite3.Error as exc:
                raise self._fail("starting a round", exc) from exc
        return no

    def fail_round(self, no: int, reason: str) -> None:
        """Mark running round ``no`` as failed with ``reason``; StoreError if not running."""
        with self._lock:
            conn = self._c
            try:
                with conn:
                    conn.execute("BEGIN IMMEDIATE")
                    self._require_running(conn, no)
                    conn.execute("UPDATE rounds SET status = 'failed', finished = ?, reason = ?"
                                 " WHERE no = ?", (_now(), str(reason), int(no)))
            except sqlite3.Error as exc:
                raise self._fail(f"marking round {no} failed", exc) from exc

    def _require_running(self, conn: sqlite3.Connection, no: int) -> None:
        row = conn.execute("SELECT status FROM rounds WHERE no = ?", (int(no),)).fetchone()
        if row is None:
            raise StoreError(f"{self.path}: round {no} was never started (call begin_round first)")
        if row[0] != "running":
            raise StoreError(f"{self.path}: round {no} is {row[0]}, expected running")

    def write_round_propagation(
        self,
        round: int,
        labels: np.ndarray,
        energy: np.ndarray,
        margin: np.ndarray,
        *,
        metrics: dict[str, Any],
        config: dict[str, Any],
    ) -> int:
        """Append the propagated events of running round ``round`` and mark it done, in ONE
        transaction: on any failure nothing is written and the round stays running.

        labels: int (n,), class index per sample, -1 = no propagated label this round.
        energy, margin: float (n,), per sample (NaN stored as NULL).
        Returns the number of events written (n).
        """
        n = self.n
        labels = np.asarray(labels)
        energy = np.asarray(energy, dtype=np.float64)
        margin = np.asarray(margin, dtype=np.float64)
        if labels.shape != (n,) or labels.dtype.kind not in "iu":
            raise LabelError(f"propagated labels must be integers of shape ({n},), got "
                             f"{labels.dtype} {labels.shape}")
        for name, arr in (("energy", energy), ("margin", margin)):
            if arr.shape != (n,):
                raise LabelError(f"propagated {name} must have shape ({n},), got {arr.shape}")
        bad = (labels < -1) | (labels >= len(self._classes))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise LabelError(f"propagated label {int(labels[i])} of sample {str(self._ids[i])!r}"
                             f" out of range -1..{len(self._classes) - 1}")
        metrics_json, config_json = _json(metrics, "round metrics"), _json(config, "round config")
        t = _now()
        lab = [None if v < 0 else v for v in labels.tolist()]
        en = [None if math.isnan(v) else v for v in energy.tolist()]
        ma = [None if math.isnan(v) else v for v in margin.tolist()]
        data = zip(range(n), lab, [int(round)] * n, en, ma, [t] * n)
        with self._lock:
            conn = self._c
            try:
                with conn:
                    conn.execute("BEGIN IMMEDIATE")
                    self._require_running(conn, round)
                    conn.executemany(
                        "INSERT INTO label_events(sample, label, source, round, energy, margin, time)"
                        " VALUES (?, ?, 'propagated', ?, ?, ?, ?)", data)
                    conn.execute("UPDATE rounds SET status = 'done', finished = ?, metrics = ?,"
                                 " config = ?, reason = NULL WHERE no = ?",
                                 (_now(), metrics_json, config_json, int(round)))
            except sqlite3.Error as exc:
                raise self._fail(f"writing the propagated labels of round {round}", exc) from exc
        return n

    def rounds(self) -> list[RoundInfo]:
        """All rounds, by number; a running round whose process is gone is 'interrupted'."""
        with self._lock:
            try:
                rows = self._c.execute("SELECT no, status, started, finished, metrics, config,"
                                       " reason, pid, host FROM rounds ORDER BY no").fetchall()
            except sqlite3.Error as exc:
                raise self._fail("reading rounds", exc) from exc
        host = this_host()
        out = []
        for r in rows:
            status, reason, pid = r[1], r[6], r[7]
            if status == "running" and pid is not None and r[8] == host and not pid_alive(pid):
                status = "interrupted"
                reason = (f"process {pid} that ran it has ended (killed or crashed); the next round"
                          " starts it again")
            out.append(RoundInfo(no=r[0], status=status, started=r[2], finished=r[3],
                                 metrics_json=None if r[4] is None else json.loads(r[4]),
                                 config=None if r[5] is None else json.loads(r[5]), reason=reason,
                                 pid=pid, host=r[8]))
        return out

    def last_done_round(self) -> int | None:
        """Number of the last round marked done, None before the first."""
        with self._lock:
            try:
                v = self._c.execute("SELECT MAX(no) FROM rounds WHERE status = 'done'").fetchone()[0]
            except sqlite3.Error as exc:
                raise self._fail("reading rounds", exc) from exc
        return None if v is None else int(v)


def checkpoint_file(path: str | Path) -> bool:
    """Fold the write-ahead log of the store file ``path`` into the file (best effort, no
    migration), so the file alone holds every label; False when that did not fully succeed."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        conn = sqlite3.connect(path, timeout=2.0, isolation_level=None)
        try:
            busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error:
        return False
    return busy == 0


def _migrate(conn: sqlite3.Connection, path: Path, version: int) -> None:
    """Apply MIGRATIONS[version], [version + 1], ... in one transaction each."""
    while version < SCHEMA_VERSION:
        sql = MIGRATIONS.get(version)
        if sql is None:
            raise StoreError(f"{path}: no migration from label store schema version {version}")
        try:
            conn.executescript(
                f"BEGIN IMMEDIATE;\n{sql}\nPRAGMA user_version = {version + 1};\nCOMMIT;")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.rollback()
            raise StoreError(
                f"{path}: migrating the label store from schema version {version} failed ({exc})"
            ) from exc
        logger.info("%s: migrated label store schema %d -> %d", path, version, version + 1)
        version += 1

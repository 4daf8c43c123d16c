"""The SQLite label store, on real files: transactions, undo, precedence, migrations, concurrency."""

from __future__ import annotations

import sqlite3
import time

import numpy as np
import pytest

from speler.errors import LabelError, StoreError
from speler.store import SCHEMA_VERSION, LabelStore


def _big_store(tmp_path, n=1000, classes=("a", "b", "c"), name="big.sqlite", **kw):
    return LabelStore.create(tmp_path / name, ids=[f"id{i:05d}" for i in range(n)],
                             classes=list(classes), fingerprint="fp-test", **kw)


def _count_events(path) -> int:
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT COUNT(*) FROM label_events").fetchone()[0]


# -- create / open -------------------------------------------------------------------------------
def test_create_and_reopen_keep_ids_classes_fingerprint(tmp_path, skeleton_set):
    path = tmp_path / "s.sqlite"
    with LabelStore.create(path, ids=skeleton_set.ids.tolist(), classes=skeleton_set.classes,
                           fingerprint=skeleton_set.fingerprint(), meta={"source": "here"}) as s:
        s.add_label("skel_005", "action2", annotator="ann")
    with LabelStore.open(path) as s:
        assert s.ids.tolist() == skeleton_set.ids.tolist()
        assert s.classes == skeleton_set.classes
        assert s.fingerprint == skeleton_set.fingerprint()
        assert s.meta["source"] == "here"
        assert s.human_labels()[5] == 2
        with sqlite3.connect(path) as raw:
            assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
            assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert not list(tmp_path.glob(".*tmp*")), "temporary build file left behind"


def test_create_refuses_existing_file_and_bad_ids(tmp_path):
    (tmp_path / "x.sqlite").write_text("keep me")
    with pytest.raises(StoreError, match="already exists"):
        LabelStore.create(tmp_path / "x.sqlite", ids=["a"], classes=["c"], fingerprint="f")
    assert (tmp_path / "x.sqlite").read_text() == "keep me"
    with pytest.raises(StoreError, match="'a' repeats"):
        LabelStore.create(tmp_path / "y.sqlite", ids=["a", "b", "a"], classes=["c"], fingerprint="f")
    with pytest.raises(StoreError, match="class names must be unique"):
        LabelStore.create(tmp_path / "y.sqlite", ids=["a"], classes=["c", "c"], fingerprint="f")
    assert not (tmp_path / "y.sqlite").exists()


def test_open_missing_file(tmp_path):
    with pytest.raises(StoreError, match=r"nope\.sqlite.*missing"):
        LabelStore.open(tmp_path / "nope.sqlite")


def test_open_non_sqlite_file_names_the_path(tmp_path):
    path = tmp_path / "notes.sqlite"
    path.write_bytes(b"this is a text file, not a database\n" * 40)
    with pytest.raises(StoreError, match=r"notes\.sqlite.*not a readable SQLite"):
        LabelStore.open(path)


def test_open_sqlite_without_schema_and_newer_schema(tmp_path):
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE t (x)")
    with pytest.raises(StoreError, match=r"other\.sqlite.*not a SpeLER label store"):
        LabelStore.open(other)
    path = tmp_path / "s.sqlite"
    LabelStore.create(path, ids=["a"], classes=["c"], fingerprint="f").close()
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match=f"version {SCHEMA_VERSION + 1} is newer"):
        LabelStore.open(path)


def test_open_store_with_inconsistent_header(tmp_path):
    path = tmp_path / "s.sqlite"
    LabelStore.create(path, ids=["a", "b"], classes=["x", "y"], fingerprint="f").close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value = '[\"x\", \"z\"]' WHERE key = 'classes'")
    with pytest.raises(StoreError, match=r"s\.sqlite: table classes disagrees with meta.classes"):
        LabelStore.open(path)
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value = '{broken' WHERE key = 'classes'")
    with pytest.raises(StoreError, match="disagrees"):
        LabelStore.open(path)
    with sqlite3.connect(path) as conn:
        conn.execute("DELETE FROM meta WHERE key = 'fingerprint'")
    with pytest.raises(StoreError, match="no dataset fingerprint"):
        LabelStore.open(path)


def test_open_truncated_store_is_a_store_error(tmp_path):
    path = tmp_path / "s.sqlite"
    s = _big_store(tmp_path, n=3000, name="s.sqlite")
    s.close()
    data = path.read_bytes()
    assert len(data) > 8192
    path.write_bytes(data[:4096] + b"\xff" * 4096)
    with pytest.raises(StoreError, match=r"s\.sqlite"):
        LabelStore.open(path)


# -- labels --------------------------------------------------------------------------------------
def test_unknown_id_or_class_names_it(store):
    with pytest.raises(LabelError, match="unknown sample id 'no_such'"):
        store.add_label("no_such", "action0")
    with pytest.raises(LabelError, match=r"unknown class 'dance'; known: action0, action1"):
        store.add_label("skel_000", "dance")
    with pytest.raises(LabelError, match="class index 9 out of range"):
        store.add_label("skel_000", 9)
    with pytest.raises(LabelError, match="label source"):
        store.add_label("skel_000", "action0", source="guess")
    assert store.events() == []


def test_add_label_records_every_field(store):
    eid = store.add_label("skel_003", "action1", annotator="ann", round=2, energy=-9.5, margin=0.25)
    (ev,) = store.events("skel_003")
    assert (ev.id, ev.sample_id, ev.label, ev.source) == (eid, "skel_003", "action1", "human")
    assert (ev.round, ev.energy, ev.margin, ev.annotator, ev.undoes) == (2, -9.5, 0.25, "ann", None)
    assert ev.time.endswith("+00:00") and ev.time[:4].isdigit()


def test_bulk_insert_is_all_or_nothing_on_bad_row(tmp_path):
    s = _big_store(tmp_path)
    rows = [(f"id{i:05d}", "b") for i in range(1000)]
    rows[500] = ("id00500", "zebra")
    with pytest.raises(LabelError, match=r"row 500: .*unknown class 'zebra'"):
        s.add_labels(rows, source="imported")
    rows[500] = ("ghost", "a")
    with pytest.raises(LabelError, match=r"row 500: .*unknown sample id 'ghost'"):
        s.add_labels(rows, source="imported")
    assert _count_events(s.path) == 0
    rows[500] = ("id00500", "a")
    written = s.add_labels(rows, source="imported", energies=np.zeros(1000), margins=np.ones(1000))
    assert written == 1000
    assert (s.human_labels() == np.where(np.arange(1000) == 500, 0, 1)).all()
    s.close()


def test_interrupt_while_rows_are_produced_writes_nothing(tmp_path):
    s = _big_store(tmp_path)

    def rows():
        for i in range(1000):
            if i == 500:
                raise KeyboardInterrupt
            yield f"id{i:05d}", "a"

    with pytest.raises(KeyboardInterrupt):
        s.add_labels(rows(), source="human")
    assert _count_events(s.path) == 0
    s.close()


def test_failure_inside_sqlite_mid_insert_rolls_back(tmp_path):
    """A constraint fails at row 500, inside the transaction: the first 500 rows vanish too."""
    s = _big_store(tmp_path)
    with sqlite3.connect(s.path) as raw:
        raw.execute("CREATE TRIGGER boom BEFORE INSERT ON label_events WHEN NEW.sample = 500"
                    " BEGIN SELECT RAISE(ABORT, 'injected failure'); END")
    with pytest.raises(StoreError, match="injected failure"):
        s.add_labels([(f"id{i:05d}", "a") for i in range(1000)], source="imported")
    assert _count_events(s.path) == 0

    r = s.begin_round()
    with pytest.raises(StoreError, match=r"round 0.*injected failure"):
        s.write_round_propagation(r, np.zeros(1000, dtype=np.int64), np.zeros(1000), np.zeros(1000),
                                  metrics={"f1": 0.5}, config={})
    assert _count_events(s.path) == 0
    assert [(x.no, x.status) for x in s.rounds()] == [(0, "running")]
    assert s.last_done_round() is None
    assert (s.current_labels().label == -1).all()

    with sqlite3.connect(s.path) as raw:
        raw.execute("DROP TRIGGER boom")
    s.write_round_propagation(r, np.zeros(1000, dtype=np.int64), np.zeros(1000), np.zeros(1000),
                              metrics={"f1": 0.5}, config={})
    assert _count_events(s.path) == 1000
    assert s.last_done_round() == 0
    s.close()


def test_events_are_append_only(store):
    store.add_label("skel_000", "action1")
    with sqlite3.connect(store.path) as raw:
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            raw.execute("UPDATE label_events SET label = 0")
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            raw.execute("DELETE FROM label_events")


# -- undo ----------------------------------------------------------------------------------------
def test_undo_reverts_to_previous_label_and_keeps_history(store):
    store.add_labels([("skel_001", "action0")], source="imported", annotator="import")
    store.add_label("skel_001", "action2", annotator="ann")
    store.add_label("skel_001", "action3", annotator="ann")
    assert store.current_labels().label[1] == 3

    res = store.undo()
    assert (res.sample_id, res.label, res.restored, res.restored_source) == \
        ("skel_001", "action3", "action2", "human")
    assert store.current_labels().label[1] == 2
    res = store.undo()
    assert (res.label, res.restored, res.restored_source) == ("action2", "action0", "imported")
    cur = store.current_labels()
    assert (cur.label[1], cur.source[1]) == (0, "imported")
    assert store.undo() is None, "imported labels are not undone"

    events = store.events("skel_001")
    assert [e.label for e in events] == ["action0", "action2", "action3", None, None]
    assert [e.undoes for e in events] == [None, None, None, events[2].id, events[1].id]


def test_undo_goes_back_across_samples_in_order(store):
    store.add_label("skel_010", "action1")
    store.add_label("skel_011", "action2")
    store.add_label("skel_010", "action3")
    assert store.undo().sample_id == "skel_010"
    assert store.undo().sample_id == "skel_011"
    assert store.undo().sample_id == "skel_010"
    assert store.undo() is None
    assert (store.human_labels()[10:12] == -1).all()


def test_undo_by_annotator_only_touches_their_labels(store):
    store.add_label("skel_020", "action1", annotator="alice")
    store.add_label("skel_021", "action2", annotator="bob")
    res = store.undo(annotator="alice")
    assert (res.sample_id, res.annotator) == ("skel_020", "alice")
    assert store.undo(annotator="alice") is None
    assert store.human_labels()[21] == 2


def test_undo_falls_back_to_propagated(store):
    n = store.n
    r = store.begin_round()
    prop = np.arange(n, dtype=np.int64) % 4
    store.write_round_propagation(r, prop, np.full(n, -9.0), np.full(n, 0.5), metrics={}, config={})
    store.add_label("skel_002", "action0")
    assert store.current_labels().source[2] == "human"
    res = store.undo()
    assert (res.restored, res.restored_source) == ("action2", "propagated")
    cur = store.current_labels()
    assert (cur.label[2], cur.source[2]) == (2, "propagated")


# -- current label precedence --------------------------------------------------------------------
def test_current_label_precedence(store):
    n = store.n
    store.add_labels([("skel_000", "action1"), ("skel_001", "action1")], source="imported",
                     annotator="import")
    store.add_label("skel_001", "action3", annotator="ann")  # human after imported wins
    store.add_label("skel_004", "action2", annotator="ann")  # human before the round still wins
    r0 = store.begin_round()
    labels = np.full(n, 0, dtype=np.int64)
    labels[5] = -1
    energy = -np.arange(n, dtype=np.float64)
    margin = np.linspace(0, 1, n)
    margin[6] = np.nan
    store.write_round_propagation(r0, labels, energy, margin, metrics={}, config={})
    store.add_labels([("skel_000", "action2")], source="imported")  # later import wins over older

    cur = store.current_labels()
    assert cur.label[:7].tolist() == [2, 3, 0, 0, 2, -1, 0]
    assert cur.source[:7].tolist() == ["imported", "human", "propagated", "propagated", "human",
                                       "none", "propagated"]
    assert cur.annotator[:3].tolist() == ["", "ann", ""]
    assert cur.round[:6].tolist() == [-1, -1, 0, 0, -1, -1]
    np.testing.assert_array_equal(cur.energy, energy)  # latest round's view, also where human
    assert np.isnan(cur.margin[6]) and cur.margin[7] == margin[7]
    assert cur.propagated[:6].tolist() == [0, 0, 0, 0, 0, -1]
    assert (cur.time[cur.source != "none"] != "").all() and cur.time[5] == ""
    np.testing.assert_array_equal(store.human_labels()[:5], [2, 3, -1, -1, 2])

    # A later round replaces the propagated view; human labels stay.
    r1 = store.begin_round()
    assert r1 == 1
    store.write_round_propagation(r1, np.full(n, 1, dtype=np.int64), np.zeros(n), np.zeros(n),
                                  metrics={}, config={})
    cur = store.current_labels()
    assert cur.label[:7].tolist() == [2, 3, 1, 1, 2, 1, 1]
    assert cur.round[2] == 1 and cur.round[1] == -1


def test_current_labels_match_a_python_replay(store):
    """Random mix of events; current labels equal a plain replay of the event log."""
    rng = np.random.default_rng(3)
    n = store.n
    for step in range(60):
        kind = rng.integers(0, 4)
        if kind == 0:
            store.add_label(f"skel_{rng.integers(n):03d}", int(rng.integers(4)), annotator="a")
        elif kind == 1:
            store.undo()
        elif kind == 2:
            store.add_labels([(f"skel_{rng.integers(n):03d}", int(rng.integers(4)))],
                             source="imported")
        elif step % 3 == 0:
            r = store.begin_round()
            store.write_round_propagation(r, rng.integers(-1, 4, n), rng.random(n), rng.random(n),
                                          metrics={}, config={})
    events = store.events()
    undone = {e.undoes for e in events if e.undoes is not None}
    human = {}
    prop = {}
    for e in events:
        if e.source == "propagated":
            prop[e.sample_id] = e.label
        elif e.undoes is None and e.id not in undone:
            human[e.sample_id] = e.label
    expect = [store.classes.index(human[i]) if human.get(i) is not None
              else store.classes.index(prop[i]) if prop.get(i) is not None else -1
              for i in store.ids]
    cur = store.current_labels()
    assert cur.label.tolist() == expect
    for i, sample_id in enumerate(store.ids):
        assert store.label_of(sample_id) == (cur.label[i], cur.source[i])


# -- rounds --------------------------------------------------------------------------------------
def test_rounds_lifecycle(store):
    n = store.n
    assert store.rounds() == [] and store.last_done_round() is None
    r = store.begin_round()
    assert r == 0
    store.fail_round(r, "out of memory")
    (info,) = store.rounds()
    assert (info.status, info.reason) == ("failed", "out of memory") and info.finished
    with pytest.raises(StoreError, match="round 0 is failed, expected running"):
        store.write_round_propagation(0, np.zeros(n, dtype=np.int64), np.zeros(n), np.zeros(n),
                                      metrics={}, config={})
    assert store.begin_round() == 0, "a failed round is started again under its number"
    store.write_round_propagation(0, np.zeros(n, dtype=np.int64), np.zeros(n), np.zeros(n),
                                  metrics={"f1": np.float32(0.5), "per_class": np.arange(2)},
                                  config={"train": {"lr": 1e-3}})
    (info,) = store.rounds()
    assert info.status == "done" and info.metrics_json == {"f1": 0.5, "per_class": [0, 1]}
    assert info.config == {"train": {"lr": 1e-3}}
    assert store.begin_round() == 1
    assert store.begin_round() == 1, "a round left running (crash) is taken over"
    assert [x.status for x in store.rounds()] == ["done", "running"]
    assert store.last_done_round() == 0
    with pytest.raises(StoreError, match="round 7 was never started"):
        store.fail_round(7, "x")


def test_write_round_propagation_validates_before_writing(store):
    n = store.n
    r = store.begin_round()
    with pytest.raises(LabelError, match=r"shape \(40,\)"):
        store.write_round_propagation(r, np.zeros(n - 1, dtype=np.int64), np.zeros(n), np.zeros(n),
                                      metrics={}, config={})
    bad = np.zeros(n, dtype=np.int64)
    bad[7] = 4
    with pytest.raises(LabelError, match=r"label 4 of sample 'skel_007' out of range -1..3"):
        store.write_round_propagation(r, bad, np.zeros(n), np.zeros(n), metrics={}, config={})
    with pytest.raises(StoreError, match="metrics cannot be saved as JSON"):
        store.write_round_propagation(r, np.zeros(n, dtype=np.int64), np.zeros(n), np.zeros(n),
                                      metrics={"x": object()}, config={})
    assert store.events() == [] and store.rounds()[0].status == "running"


# -- migrations ----------------------------------------------------------------------------------
_SCHEMA_V1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE samples (idx INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE);
CREATE TABLE classes (idx INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
CREATE TABLE label_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, sample INTEGER NOT NULL REFERENCES samples(idx),
    label INTEGER REFERENCES classes(idx),
    source TEXT NOT NULL CHECK (source IN ('human', 'propagated', 'imported')),
    round INTEGER, energy REAL, margin REAL, annotator TEXT NOT NULL DEFAULT '',
    time TEXT NOT NULL, undoes INTEGER REFERENCES label_events(id));
CREATE TABLE rounds (no INTEGER PRIMARY KEY,
    status TEXT NOT NULL CHECK (status IN ('running', 'done', 'failed')),
    started TEXT NOT NULL, finished TEXT, metrics TEXT, config TEXT);
INSERT INTO meta VALUES ('fingerprint', 'old-fp'), ('classes', '["x", "y"]'),
    ('created', '2025-01-01T00:00:00+00:00');
INSERT INTO classes VALUES (0, 'x'), (1, 'y');
INSERT INTO samples VALUES (0, 's0'), (1, 's1'), (2, 's2');
INSERT INTO rounds VALUES (0, 'done', '2025-01-01T00:00:00+00:00', '2025-01-01T00:01:00+00:00',
    '{"f1": 0.4}', '{}');
INSERT INTO label_events(sample, label, source, round, energy, margin, time) VALUES
    (0, 1, 'propagated', 0, -9.0, 0.1, '2025-01-01T00:01:00+00:00'),
    (1, 1, 'propagated', 0, -9.0, 0.1, '2025-01-01T00:01:00+00:00'),
    (2, NULL, 'propagated', 0, -1.0, 0.0, '2025-01-01T00:01:00+00:00');
INSERT INTO label_events(sample, label, source, annotator, time) VALUES
    (1, 0, 'human', 'ann', '2025-01-02T00:00:00+00:00');
PRAGMA user_version = 1;
"""


def test_migrates_a_version_1_file(tmp_path):
    path = tmp_path / "v1.sqlite"
    with sqlite3.connect(path) as conn:
        conn.executescript(_SCHEMA_V1)
    with LabelStore.open(path) as s:
        assert s.classes == ("x", "y") and s.fingerprint == "old-fp"
        cur = s.current_labels()
        assert cur.label.tolist() == [1, 0, -1]
        assert cur.source.tolist() == ["propagated", "human", "none"]
        assert s.rounds()[0].reason is None and s.rounds()[0].metrics_json == {"f1": 0.4}
        assert s.undo().restored == "y"
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("DELETE FROM label_events")
    with LabelStore.open(path) as s:  # reopening a migrated file is a no-op
        assert len(s.events()) == 5


def test_failed_migration_leaves_the_file_at_its_version(tmp_path):
    path = tmp_path / "v1.sqlite"
    with sqlite3.connect(path) as conn:
        conn.executescript(_SCHEMA_V1)
        conn.execute("CREATE INDEX label_events_undoes ON label_events(undoes)")  # clashes
    with pytest.raises(StoreError, match=r"migrating the label store from schema version 1 failed"):
        LabelStore.open(path)
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
        cols = [r[1] for r in conn.execute("PRAGMA table_info(rounds)")]
        assert "reason" not in cols, "half of the migration was kept"


# -- concurrency ---------------------------------------------------------------------------------
def test_two_stores_on_one_file_see_each_other(tmp_path):
    a = _big_store(tmp_path, n=50)
    b = LabelStore.open(a.path)
    a.add_label("id00001", "b", annotator="alice")
    b.add_label("id00002", "c", annotator="bob")
    assert a.human_labels()[:3].tolist() == [-1, 1, 2]
    assert b.human_labels()[:3].tolist() == [-1, 1, 2]
    r = b.begin_round()
    assert a.rounds()[0].status == "running"
    res = a.undo()
    assert (res.sample_id, res.annotator) == ("id00002", "bob")
    b.write_round_propagation(r, np.zeros(50, dtype=np.int64), np.zeros(50), np.zeros(50),
                              metrics={}, config={})
    assert a.current_labels().label[:3].tolist() == [0, 1, 0]
    a.close()
    b.close()


def test_writer_holding_the_lock(tmp_path):
    """Another connection holds the write lock: reads still work (WAL), a write waits, then fails
    cleanly without writing anything; once the lock is released, writing works again."""
    s = _big_store(tmp_path, n=50)
    s.add_label("id00000", "a")
    s.close()
    s = LabelStore.open(tmp_path / "big.sqlite", timeout=0.2)
    other = sqlite3.connect(s.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO label_events(sample, label, source, time) VALUES (3, 1, 'human', 't')")
    try:
        assert s.human_labels()[:4].tolist() == [0, -1, -1, -1]  # uncommitted write invisible
        t0 = time.perf_counter()
        with pytest.raises(StoreError, match=r"big\.sqlite.*locked.*another process"):
            s.add_labels([(f"id{i:05d}", "b") for i in range(50)], source="human")
        assert time.perf_counter() - t0 >= 0.15, "the writer did not wait for the lock"
        with pytest.raises(StoreError, match="locked"):
            s.begin_round()
    finally:
        other.execute("COMMIT")
        other.close()
    assert s.human_labels()[:4].tolist() == [0, -1, -1, 1]
    assert len(s.events()) == 2 and s.rounds() == []
    s.add_label("id00001", "c")
    assert s.human_labels()[1] == 2
    s.close()


# -- scale ---------------------------------------------------------------------------------------
def test_hundred_thousand_samples(tmp_path):
    n = 100_000
    rng = np.random.default_rng(0)
    s = _big_store(tmp_path, n=n, classes=[f"c{i}" for i in range(20)])
    ids = s.ids
    known = rng.choice(n, 2000, replace=False)
    s.add_labels(zip(ids[known].tolist(), rng.integers(0, 20, 2000).tolist()), source="imported")
    prop = rng.integers(-1, 20, n)
    for _ in range(2):
        r = s.begin_round()
        prop = rng.integers(-1, 20, n)
        s.write_round_propagation(r, prop, rng.random(n), rng.random(n), metrics={}, config={})
    for k in range(20):
        s.add_label(str(ids[k]), k % 20)
    cur = s.current_labels()
    human = s.human_labels()
    expect = np.where(human >= 0, human, prop)
    np.testing.assert_array_equal(cur.label, expect)
    assert (human >= 0).sum() == len(set(known.tolist()) | set(range(20)))
    s.close()


# -- rounds whose process is gone -------------------------------------------------------------------
_KILLED_ROUND = """
import os, signal, sys
from speler.store import LabelStore
s = LabelStore.open(sys.argv[1])
print(s.begin_round(), os.getpid(), flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # killed mid-round: nothing gets to mark it failed
"""


def test_a_round_whose_process_was_killed_reads_as_interrupted(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    s = _big_store(tmp_path, n=20)
    s.add_label("id00003", "b", annotator="ann")
    events = s.events()
    res = subprocess.run([sys.executable, "-c", _KILLED_ROUND, str(s.path)], capture_output=True,
                         text=True, timeout=120, cwd=repo,
                         env=dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS="1"))
    assert res.returncode == -9, res.stderr
    no, pid = map(int, res.stdout.split())
    (r,) = s.rounds()
    assert (r.no, r.status, r.pid) == (no, "interrupted", pid)
    assert f"process {pid} that ran it has ended" in r.reason
    assert s.events() == events and s.last_done_round() is None, "reading wrote nothing"
    with sqlite3.connect(s.path) as raw:
        assert raw.execute("SELECT status FROM rounds").fetchall() == [("running",)]
    # a round of a live process stays running; the next round takes the number over
    assert s.begin_round() == no
    (r,) = s.rounds()
    assert (r.status, r.pid, r.reason) == ("running", os.getpid(), None)
    s.close()


def test_migrates_a_version_2_file_keeping_running_rounds_running(tmp_path):
    path = tmp_path / "v2.sqlite"
    with sqlite3.connect(path) as conn:
        conn.executescript(_SCHEMA_V1)
    with LabelStore.open(path) as s:  # now current; rebuild a version 2 rounds table by hand
        pass
    with sqlite3.connect(path) as conn:
        conn.executescript("""
            ALTER TABLE rounds DROP COLUMN pid; ALTER TABLE rounds DROP COLUMN host;
            INSERT INTO rounds(no, status, started) VALUES (1, 'running', '2025-01-03T00:00:00');
            PRAGMA user_version = 2;""")
    with LabelStore.open(path) as s:
        assert [(r.no, r.status, r.pid) for r in s.rounds()] == [(0, "done", None),
                                                                  (1, "running", None)]
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3

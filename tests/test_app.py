"""The Streamlit app through AppTest, against real projects in a temporary SPELER_HOME.

One round of the bundled sample is trained once per module (through the Round page, with few
epochs); the tests after it label, skip and undo through the Label page's widgets and check the
events in the real SQLite store.
"""

from __future__ import annotations

import base64
import json
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from speler.project import Project, list_projects
from speler.store import LabelStore

REPO = Path(__file__).resolve().parents[1]
MAIN = str(REPO / "app" / "main.py")
SAMPLE = "synthetic_actions"
EPOCHS = 2  # a small model is enough to exercise the pages


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """SPELER_HOME for this module (the app reads it on every run)."""
    path = tmp_path_factory.mktemp("speler_home")
    old = os.environ.get("SPELER_HOME")
    os.environ["SPELER_HOME"] = str(path)
    yield path
    if old is None:
        os.environ.pop("SPELER_HOME", None)
    else:
        os.environ["SPELER_HOME"] = old


def _app() -> AppTest:
    at = AppTest.from_file(MAIN, default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    return at


def _page(at: AppTest, page: str) -> AppTest:
    at.switch_page(f"views/{page}.py").run()
    assert not at.exception, [e.message for e in at.exception]
    return at


def _texts(at: AppTest) -> str:
    parts = [m.value for m in at.markdown] + [c.value for c in at.caption]
    parts += [e.value for e in at.error] + [e.value for e in at.success] + [e.value for e in at.info]
    parts += [e.value for e in at.warning]
    return "\n".join(str(p) for p in parts)


@pytest.fixture(scope="module")
def trained(home):
    """Open the app (creates the sample project), run round 0 from the Round page, wait for it."""
    at = _app()
    assert SAMPLE in list_projects(home)
    _page(at, "round")
    at.number_input(key="set_epochs").set_value(EPOCHS)
    at.button(key="run_round").click().run()
    assert not at.exception
    deadline = time.time() + 240
    with Project.open(home, SAMPLE) as project:
        while time.time() < deadline:
            rounds = project.store.rounds()
            if rounds and rounds[-1].status in ("done", "failed") and _round_job_finished(at):
                break
            time.sleep(0.5)
        rounds = project.store.rounds()
    at.run()
    assert rounds and rounds[-1].status == "done", (rounds, _texts(at))
    return at


def _app_state():
    """The app's own ``state`` module, imported under the name the app uses: `streamlit run`
    and AppTest put app/ on the path, and the pages import ``state`` from there."""
    import importlib
    import sys

    app_dir = str(Path(MAIN).parent)
    if app_dir not in sys.path:  # a test that runs before any AppTest
        sys.path.insert(0, app_dir)
    return importlib.import_module("state")


def _round_job_finished(at: AppTest) -> bool:
    """The worker thread has returned (the store may say done a moment before)."""
    jobs, _ = _app_state()._jobs()
    return all(not job.running for job in jobs.values())


def _human_events(home: Path):
    with LabelStore.open(home / SAMPLE / "store.sqlite") as store:
        return [e for e in store.events() if e.source == "human"]


def _keyed_button(at: AppTest, prefix: str):
    """The one button whose key starts with ``prefix``: the Label page's label buttons carry the
    sample they label in their keys."""
    found = [b for b in at.button if b.key and b.key.startswith(prefix)]
    assert len(found) == 1, [b.key for b in at.button]
    return found[0]


def _label_button(at: AppTest, k: int):
    """Label button ``k`` (1-based) of the sample shown."""
    return _keyed_button(at, f"label_{k}_")


def _other_go(at: AppTest):
    return _keyed_button(at, "other_go_")


def _current_id(at: AppTest) -> str:
    heads = [m.value for m in at.markdown if str(m.value).startswith("#### ")]
    assert heads, _texts(at)
    return heads[0][5:]


# -- before any round ------------------------------------------------------------------------------
def test_opens_on_bundled_sample_and_every_page_runs(home):
    at = _app()
    assert SAMPLE in list_projects(home)
    assert any(m.label == "Samples" for m in at.metric)
    assert len(at.get("plotly_chart")) >= 1  # class counts
    for page in ("round", "label", "diagnostics", "export"):
        _page(at, page)
    _page(at, "label")  # no round yet: typical samples to label, and the way to round 0
    assert "Every class has a label: run round 0 for suggestions" in _texts(at)
    assert "similar samples" in _texts(at)
    _page(at, "round")
    assert at.button(key="run_round").label == "Run round 0"


def test_bad_upload_shows_error_and_creates_nothing(home):
    at = _page(_app(), "project")
    before = list_projects(home)
    at.file_uploader(key="upload").set_value(("garbage.npz", b"this is not a zip file", "application/zip"))
    at.run()
    at.text_input(key="upload_name").input("garbage")
    at.button(key="upload_go").click().run()
    assert not at.exception
    assert at.error, _texts(at)
    assert "garbage" in at.error[0].value
    assert list_projects(home) == before


def test_upload_over_the_cap_is_refused(home, monkeypatch):
    monkeypatch.setenv("SPELER_MAX_UPLOAD_MB", "0.001")
    at = _page(_app(), "project")
    at.file_uploader(key="upload").set_value(("big.ts", b"#" * 5000, "text/plain"))
    at.run()
    at.button(key="upload_go").click().run()
    assert not at.exception
    assert at.error and "capped at 0.001 MB" in at.error[0].value
    assert "big" not in list_projects(home)


def test_bad_server_path_shows_error(home, monkeypatch):
    monkeypatch.setenv("SPELER_DATA_DIRS", str(home))
    at = _page(_app(), "project")
    at.text_input(key="server_path").input(str(home / "no" / "such" / "file.skeleton"))
    at.run()
    at.button(key="path_go").click().run()
    assert not at.exception
    assert at.error and "no such file" in at.error[0].value


def test_server_path_outside_the_data_folders_is_refused(home, tmp_path, monkeypatch):
    """A browser user may import only from the configured data folders (SPELER_DATA_DIRS)."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "BasicMotions_TRAIN.ts").write_bytes(
        (REPO / "sample_data" / "basicmotions" / "BasicMotions_TRAIN.ts").read_bytes())
    monkeypatch.setenv("SPELER_DATA_DIRS", str(data))
    at = _page(_app(), "project")
    assert f"Data folders: `{data.resolve()}`" in _texts(at)
    before = list_projects(home)
    for outside in (REPO / "sample_data" / "basicmotions" / "BasicMotions_TRAIN.ts",
                    data / ".." / "data" / ".." / "x.ts", "/etc/passwd"):
        at.text_input(key="server_path").input(str(outside))
        at.run()
        at.text_input(key="path_name").input("outside")
        at.button(key="path_go").click().run()
        assert not at.exception
        assert at.error and "the app imports only from its data folders" in at.error[0].value, outside
        assert "no such file" not in at.error[0].value
    assert list_projects(home) == before
    at.text_input(key="server_path").input(str(data / "BasicMotions_TRAIN.ts"))
    at.run()
    at.text_input(key="path_name").input("inside")
    at.button(key="path_go").click().run()
    assert not at.exception and not at.error, at.error[0].value
    assert "inside" in list_projects(home)


def test_import_from_server_path(home):
    path = REPO / "sample_data" / "basicmotions" / "BasicMotions_TRAIN.ts"
    at = _page(_app(), "project")
    at.text_input(key="server_path").input(str(path))
    at.run()
    at.text_input(key="path_name").input("mine")
    at.button(key="path_go").click().run()
    assert not at.exception
    assert not at.error, at.error[0].value
    assert "mine" in list_projects(home)
    assert at.session_state["project"] == "mine"
    # switching back to the sample through the picker
    at.selectbox(key="pick_project").select(SAMPLE).run()
    assert at.session_state["project"] == SAMPLE


def test_project_whose_data_belongs_to_another_dataset_shows_error(home):
    from speler.data.layouts import get_layout
    from speler.data.schema import SequenceSet

    def small(prefix: str) -> SequenceSet:
        rng = np.random.default_rng(1)
        return SequenceSet(x=rng.normal(size=(12, 3, 8, 1, 1)).astype(np.float32),
                           ids=np.array([f"{prefix}{i}" for i in range(12)]), classes=("a", "b"),
                           y=np.where(np.arange(12) < 4, np.arange(12) % 2, -1),
                           layout=get_layout("series"))

    Project.create(home, "swapped", small("s"), preprocess=False).close()
    small("other").save(home / "swapped" / "data.npz")  # data of another dataset
    at = _app()
    at.selectbox(key="pick_project").select("swapped").run()
    assert not at.exception
    assert at.error and "fingerprint" in at.error[0].value
    for page in ("round", "label", "diagnostics", "export"):
        _page(at, page)
        assert not at.exception
    _page(at, "label")
    assert at.error and "fingerprint" in at.error[0].value
    _page(at, "project").selectbox(key="pick_project").select(SAMPLE).run()
    assert not at.error and at.session_state["project"] == SAMPLE


# -- after round 0 --------------------------------------------------------------------------------
def test_round_page_shows_the_finished_round(trained):
    at = _page(trained, "round")
    assert at.button(key="run_round").label == "Run round 1"
    assert any("Round 0 done" in s.value for s in at.success), _texts(at)
    assert len(at.dataframe) == 1
    table = at.dataframe[0].value
    assert table.loc[0, "status"] == "done"
    assert re.fullmatch(r"\d\d-\d\d \d\d:\d\d", table.loc[0, "finished"])  # short enough to show


def test_label_click_writes_event_then_undo(trained, home):
    at = _page(trained, "label")
    before = _human_events(home)
    sample = _current_id(at)
    button = _label_button(at, 1)
    chosen = button.label
    button.click().run()
    assert not at.exception
    events = _human_events(home)
    assert len(events) == len(before) + 1
    assert (events[-1].sample_id, events[-1].label) == (sample, chosen)
    assert _current_id(at) != sample  # the next suggestion is shown at once
    with LabelStore.open(home / SAMPLE / "store.sqlite") as store:
        assert store.human_labels()[store.sample_index(sample)] == store.class_index(chosen)

    at.button(key="undo").click().run()
    assert not at.exception
    with LabelStore.open(home / SAMPLE / "store.sqlite") as store:
        assert store.human_labels()[store.sample_index(sample)] == -1
        assert any(e.undoes == events[-1].id for e in store.events(sample))
    assert _current_id(at) == sample  # the undone sample comes back first


def test_label_buttons_are_keyed_by_the_sample_they_label(trained, home):
    """A click sent while the browser still showed the previous sample names that sample's
    button; the next run has no such button, so the click cannot label the new sample."""
    at = _page(trained, "label")
    sample = _current_id(at)
    before = _label_button(at, 1).key
    _label_button(at, 1).click().run()
    assert _current_id(at) != sample and _label_button(at, 1).key != before
    assert not any(b.key == before for b in at.button)
    at.button(key="undo").click().run()
    assert _current_id(at) == sample and _label_button(at, 1).key == before


def test_label_second_class_and_skip(trained, home):
    at = _page(trained, "label")
    sample = _current_id(at)
    at.button(key="skip").click().run()
    assert _current_id(at) != sample
    sample = _current_id(at)
    chosen = _label_button(at, 2).label
    _label_button(at, 2).click().run()
    last = _human_events(home)[-1]
    assert (last.sample_id, last.label) == (sample, chosen)


def _values(x) -> np.ndarray:
    """A plotly JSON array: a list, or a typed array ({"dtype": ..., "bdata": base64})."""
    if isinstance(x, dict):
        return np.frombuffer(base64.b64decode(x["bdata"]), dtype=np.dtype(x["dtype"]))
    return np.asarray(x)


def test_diagnostics_and_export_pages(trained):
    at = _page(trained, "diagnostics")
    charts = at.get("plotly_chart")
    assert len(charts) >= 2
    # the energy histograms draw the propagated labels only: one bar value per unlabeled sample
    energy = [json.loads(c.proto.spec) for c in charts if "reliable" in c.proto.spec]
    assert len(energy) == 1
    drawn = sum(_values(t["x"]).size for t in energy[0]["data"])
    with LabelStore.open(Path(os.environ["SPELER_HOME"]) / SAMPLE / "store.sqlite") as store:
        assert drawn == int((store.human_labels() < 0).sum()) > 0
    at = _page(trained, "export")
    keys = {b.key for b in at.get("download_button")}
    assert {"download_csv", "download_json", "download_npz", "download_pyskl",
            "download_checkpoint"} <= keys
    assert len(at.dataframe) == 1
    n = len(np.asarray(at.dataframe[0].value))
    shown = at.dataframe[0].value
    people = shown["source"].isin(["human", "imported"])
    assert shown.loc[people, "reliable"].all()  # what people gave is the ground truth
    assert (shown.loc[people, "round"] == "").all()  # no round gave it: an empty cell
    assert not shown["round"].astype(str).isin(["None", "<NA>", "nan", "-1"]).any()
    with LabelStore.open(Path(os.environ["SPELER_HOME"]) / SAMPLE / "store.sqlite") as store:
        assert n == store.n


def test_export_page_writes_what_the_annotator_writes(trained, home, tmp_path, monkeypatch):
    """The Export page's CSV (made when its button is clicked) is, byte for byte, the file
    ``Annotator.export`` writes for the CLI (the CSV has no timestamp of its own: its ``time``
    column holds the label events' times, the same in both)."""
    from streamlit.runtime.media_file_manager import MediaFileManager

    from speler.annotator import Annotator

    made = {}  # file name -> the callable the download button runs when clicked
    add = MediaFileManager.add_deferred

    def record(self, data, mimetype, coordinates, file_name=None, element_id=""):
        made[file_name] = data
        return add(self, data, mimetype, coordinates, file_name=file_name,
                   element_id=element_id)

    monkeypatch.setattr(MediaFileManager, "add_deferred", record)
    at = _page(trained, "label")  # a label first, so the live state differs from the round's
    _label_button(at, 1).click().run()
    at = _page(at, "export")
    assert not at.error, _texts(at)
    page_csv = made[f"{SAMPLE}-labels.csv"]()  # what a click on CSV sends to the browser
    assert (home / SAMPLE / "exports" / f"{SAMPLE}-labels.csv").read_bytes() == page_csv
    with Annotator.open(home, SAMPLE) as ann:
        cli_csv = ann.export(format="csv", path=tmp_path / "cli.csv").read_bytes()
    assert page_csv == cli_csv
    assert page_csv.startswith(b"id,index,label,source,energy,margin,reliable,round,")
    _page(at, "label").button(key="undo").click().run()  # leave no extra label behind
    assert not at.exception


def test_cancel_round_keeps_the_previous_one(trained, home):
    at = _page(trained, "round")
    at.button(key="run_round").click().run()
    assert not at.exception
    at.button(key="cancel_round").click().run()
    deadline = time.time() + 120
    while not _round_job_finished(at) and time.time() < deadline:
        time.sleep(0.3)
    at.run()
    assert any("cancelled" in w.value for w in at.warning), _texts(at)
    with Project.open(home, SAMPLE) as project:
        assert project.store.last_done_round() == 0
        assert project.latest_round() == 0
        assert project.store.rounds()[-1].status == "failed"
        assert project.store.rounds()[-1].reason.startswith("CancelledError")
    assert at.button(key="run_round").label == "Run round 1"
    # the past rounds say "cancelled", not "failed", and have no None cells
    table = at.dataframe[0].value
    assert table["status"].tolist()[-1] == "cancelled"
    assert "failed" not in table["status"].tolist()
    cells = table.astype(str).to_numpy().ravel().tolist()
    assert not any(c in ("None", "nan", "NaN", "<NA>") for c in cells), table


def test_simulation_from_diagnostics(trained, home):
    at = _page(trained, "diagnostics")
    at.button(key="sim_run").click().run()
    assert not at.exception
    assert at.button(key="sim_cancel")  # running: the page offers to cancel
    deadline = time.time() + 240
    while not _round_job_finished(at) and time.time() < deadline:
        time.sleep(0.5)
    at.run()
    assert not at.exception and not at.error, _texts(at)
    import json

    saved = json.loads((home / SAMPLE / "simulation.json").read_text())  # Annotator.simulate's
    from speler.annotator import Annotator
    from speler.selection import STRATEGIES

    with Annotator.open(home, SAMPLE) as ann:
        assert ann.saved_simulation() == saved

    assert set(saved["curves"]) == set(STRATEGIES)
    assert all(rows[-1]["labels"] > rows[0]["labels"] for rows in saved["curves"].values())
    assert "Area under the curve" in _texts(at) and "samples nobody has labeled yet" in _texts(at)


# -- issue 13: the labeling experience ------------------------------------------------------------
BASICMOTIONS_TS = REPO / "sample_data" / "basicmotions" / "BasicMotions_TRAIN.ts"


def test_upload_prefills_the_name_and_refuses_an_empty_one(home):
    at = _page(_app(), "project")
    before = list_projects(home)
    at.file_uploader(key="upload").set_value(
        ("BasicMotions_TRAIN.ts", BASICMOTIONS_TS.read_bytes(), "text/plain"))
    at.run()
    assert at.text_input(key="upload_name").value == "BasicMotions_TRAIN"
    at.text_input(key="upload_name").input("")
    at.button(key="upload_go").click().run()
    assert not at.exception
    assert at.error and "Give the project a name" in at.error[0].value, _texts(at)
    assert "invalid project name" not in _texts(at)
    assert list_projects(home) == before


def test_import_can_hide_the_labels_of_a_labeled_dataset(home):
    """A fully labeled file leaves nothing to suggest: the pages say so up front, and the import
    can hide the labels (all, or the long-tailed split) like the CLI's options."""
    at = _page(_app(), "project")
    at.text_input(key="server_path").input(str(BASICMOTIONS_TS))
    at.run()
    assert at.text_input(key="path_name").value == "BasicMotions_TRAIN"  # prefilled
    at.text_input(key="path_name").input("bm_all")
    at.button(key="path_go").click().run()
    assert not at.exception and not at.error, _texts(at)
    assert at.session_state["project"] == "bm_all"
    assert any("Every sample already has a human label" in w.value for w in at.warning), _texts(at)
    _page(at, "round")
    assert any("Every sample already has a human label" in w.value for w in at.warning), _texts(at)

    _page(at, "project")
    at.text_input(key="server_path").input(str(BASICMOTIONS_TS))
    at.run()
    at.text_input(key="path_name").input("bm_hidden")
    at.selectbox(key="path_labels").select("hide").run()
    at.button(key="path_go").click().run()
    assert not at.exception and not at.error, _texts(at)
    assert not any("Every sample already" in w.value for w in at.warning)
    assert any("No human labels yet" in w.value for w in at.warning), _texts(at)
    with Project.open(home, "bm_hidden") as p:
        assert (p.store.human_labels() == -1).all()
        assert p.data.y_true is not None and (p.data.y_true >= 0).all()

    at.text_input(key="path_name").input("bm_protocol")
    at.selectbox(key="path_labels").select("protocol").run()
    at.number_input(key="path_pi").set_value(5.0)
    at.number_input(key="path_gamma").set_value(0.2)
    at.run()
    at.button(key="path_go").click().run()
    assert not at.exception and not at.error, _texts(at)
    from speler.data.protocol import make_partial
    from speler.formats import read

    expected = make_partial(read(BASICMOTIONS_TS), imbalance=5.0, labeled_ratio=0.2, seed=0)
    with Project.open(home, "bm_protocol") as p:
        assert p.data.ids.tolist() == expected.ids.tolist()
        np.testing.assert_array_equal(p.store.human_labels(), expected.y)
        assert 0 < (p.store.human_labels() >= 0).sum() < p.store.n
        assert p.store.meta.get("protocol")


def test_export_page_refuses_pyskl_for_series_with_the_reason(home):
    at = _app()
    at.selectbox(key="pick_project").select("bm_hidden").run()
    at = _page(at, "export")
    pyskl = [b for b in at.get("download_button") if b.key == "download_pyskl"][0]
    assert pyskl.proto.disabled
    assert at.error and "PYSKL pickles hold skeleton keypoints" in at.error[0].value
    assert "csv, json or npz" in at.error[0].value
    _page(at, "project").selectbox(key="pick_project").select(SAMPLE).run()


def test_round_page_says_what_training_did_without_nan(trained, home):
    at = _page(trained, "round")
    help_ = at.number_input(key="set_epochs").help
    assert "cross-fitting" in help_ and "at least 20 held-out human labels" in help_
    assert "stops early when held-out accuracy stalls" not in help_
    assert "Round 0: The network trained" in _texts(at), _texts(at)
    # rounds of a project with few labels: no network (too few to judge it), and a network forced
    # in (views.network 'always') that had no labels to hold out, so best_metric is NaN
    from factories import make_series_set

    too_few = {"mode": "auto", "joined": False, "held_out": 0, "floor": float("nan"),
               "with_network": float("nan"),
               "reason": "too few human labels to judge the network (fewer than 6 could be held "
                         "out from at least 2 classes)"}
    forced = {"mode": "always", "joined": True, "reason": "views.network is 'always'",
              "floor": float("nan"), "with_network": float("nan")}
    with Project.create(home, "fewlabels", make_series_set(), preprocess=False) as p:
        n = p.store.n
        for train, judgement in ((None, too_few),
                                 ({"best_epoch": 3, "best_metric": float("nan"), "epochs": 3},
                                  forced)):
            no = p.store.begin_round()
            metrics = {"human_labels": 9, "reliable": 3, "seconds": 1.0, "train": train,
                       "judgement": judgement}
            p.store.write_round_propagation(no, np.zeros(n, dtype=np.int64), np.zeros(n),
                                            np.zeros(n), metrics=metrics, config={})
        assert np.isnan(p.store.rounds()[-1].metrics.train.best_metric)
    at = _page(_app(), "project")
    at.selectbox(key="pick_project").select("fewlabels").run()
    at = _page(at, "round")
    text = _texts(at)
    assert ("Round 1: The network trained all 3 epochs: early stopping needs at least 20 held-out "
            "human labels. It joins the graph: views.network is 'always'.") in text, text
    assert "nan" not in text.lower()
    table = at.dataframe[0].value
    assert table["network"].tolist() == ["not trained", "joined"]
    cells = table.astype(str).to_numpy().ravel().tolist()
    assert not any(c.lower() in ("none", "nan", "<na>") for c in cells)
    _page(at, "project").selectbox(key="pick_project").select(SAMPLE).run()


def test_skips_survive_a_reload_and_can_be_undone(trained):
    # a session of its own: the trained one may show an earlier test's undone sample first
    at = _page(_app(), "label")
    if any(b.key == "unskip" for b in at.button):  # an earlier test's skips: shown again first
        at.button(key="unskip").click().run()
    sample = _current_id(at)
    at.button(key="skip").click().run()
    assert _current_id(at) != sample
    fresh = _page(_app(), "label")  # a new session: a reload of the page
    assert _current_id(fresh) != sample
    assert "skipped" in _texts(fresh)
    fresh.button(key="unskip").click().run()
    assert not fresh.exception
    assert _current_id(fresh) == sample


def test_label_keys_stay_with_their_class_up_to_ten_classes():
    state = _app_state()
    four = ("a", "b", "c", "d")
    for order in ([2, 0, 1, 3], [3, 1, 0, 2]):  # two samples with other guesses: the same keys
        assert state.label_keys(four, np.array(order)) == (list(four), "1234")
    ten = tuple("abcdefghij")
    assert state.label_keys(ten, np.arange(10)[::-1]) == (list(ten), "1234567890")
    eleven = tuple("abcdefghijk")  # beyond ten: the nine most likely, the guess on 1
    order = np.array([10, 3, 5, 0, 1, 2, 4, 6, 7, 8, 9])
    assert state.label_keys(eleven, order) == ([eleven[k] for k in order[:9]], "123456789")


def test_the_label_page_keys_and_neighbours(trained, home):
    at = _page(trained, "label")
    with Project.open(home, SAMPLE) as project:
        assert len(project.data.classes) > 10  # the bundled sample: keys follow the likelihood
    assert "1 = the guess, then the next most likely" in _texts(at)
    guess = next(m.value for m in at.markdown if "Propagated guess" in str(m.value))
    first = f">{_label_button(at, 1).label}</span>"
    assert first in guess.split("runner-up")[0]  # key 1 is the guess
    # the neighbours start with a labeled example of the guess
    heads = [str(m.value) for m in at.markdown if "&nbsp; `" in str(m.value)]
    assert heads and first in heads[0], heads


def test_a_label_from_a_page_someone_else_labeled_meanwhile_is_refused(trained, home):
    from speler.annotator import Annotator

    at = _page(trained, "label")
    sample = _current_id(at)
    with Annotator.open(home, SAMPLE) as other:  # another tab or the command line
        other.label(sample, other.data.classes[0], annotator="bob")
    before = _human_events(home)
    _label_button(at, 2).click().run()
    assert not at.exception
    assert any("last changed by bob" in e.value and "but this page showed it unlabeled; nothing "
               "was saved" in e.value for e in at.error), _texts(at)
    assert _human_events(home) == before  # bob's label stands
    with Annotator.open(home, SAMPLE) as other:
        other.undo(annotator="bob")


def test_open_a_sample_by_id_shows_it_first_even_when_labeled(trained, home):
    at = _page(trained, "label")
    with LabelStore.open(home / SAMPLE / "store.sqlite") as store:
        labeled = np.flatnonzero(store.human_labels() >= 0)
        sid, cls = store.ids[labeled[0]], store.classes[store.human_labels()[labeled[0]]]
    at.text_input(key="open_id").input("no-such-sample").run()
    assert any("no-such-sample" in e.value for e in at.error), _texts(at)
    at.text_input(key="open_id").input(sid).run()
    assert not at.exception
    assert _current_id(at) == sid
    assert f"you opened it: labeled {cls} by people" in _texts(at)
    at.button(key="skip").click().run()  # skipping closes it
    assert _current_id(at) != sid
    at.button(key="unskip").click().run()


def test_the_annotator_name_survives_a_reload_in_the_address(trained):
    at = _page(trained, "label")
    at.text_input(key="annotator_input").input("alice").run()
    assert at.query_params.get("annotator") in ("alice", ["alice"])
    at.query_params.pop("annotator", None)  # a page change drops the address's parameters
    _page(at, "export")
    assert at.query_params.get("annotator") in ("alice", ["alice"])  # written back on any page
    fresh = AppTest.from_file(MAIN, default_timeout=120)
    fresh.query_params["annotator"] = "alice"
    fresh.run()
    _page(fresh, "label")
    assert any(e.label == "Annotator: alice" for e in fresh.expander), [e.label for e in fresh.expander]


def test_a_label_doubt_opens_on_the_label_page(trained, home):
    from speler.annotator import Annotator

    with Annotator.open(home, SAMPLE) as ann:  # a confident sample labeled as another class
        live = ann.state()
        unl = np.flatnonzero(live.human < 0)
        i = int(unl[np.argmax(live.result.margin[unl])])
        sid = str(ann.data.ids[i])
        wrong = ann.data.classes[(int(live.result.labels[i]) + 1) % ann.data.num_classes]
        ann.label(sid, wrong, annotator="tester")
    try:
        at = _page(trained, "diagnostics")
        pick = at.selectbox(key="doubt_pick")
        assert sid in pick.options, pick.options
        pick.select(sid).run()
        at.button(key="doubt_open").click().run()
        assert not at.exception, [e.message for e in at.exception]
        assert _current_id(at) == sid, _texts(at)
        assert f"you opened it: labeled {wrong} by people" in _texts(at)
        # its own seed dominates its scores; key 1 is still the guess shown (its neighbours')
        guess = next(m.value for m in at.markdown if "Propagated guess" in str(m.value))
        assert f">{_label_button(at, 1).label}</span>" in guess.split("runner-up")[0]
        assert _label_button(at, 1).label != wrong
    finally:
        with Annotator.open(home, SAMPLE) as ann:
            ann.undo(annotator="tester")


def test_before_any_round_the_label_page_offers_first_labels(home):
    """A project without labels (the files' labels hidden) is labeled from the app alone: the
    Label page shows typical samples, and the round starts once there is a label."""
    from speler.annotator import import_project

    import_project(home, "bm_first", path=BASICMOTIONS_TS, no_file_labels=True).annotator.close()
    at = AppTest.from_file(MAIN, default_timeout=120)
    at.query_params["project"] = "bm_first"
    at.run()
    _page(at, "round")
    assert at.button(key="run_round").disabled
    assert any("No human labels yet" in w.value for w in at.warning), _texts(at)
    _page(at, "label")
    assert "no round yet" in _texts(at) and "0 of 4 classes have a label" in _texts(at)
    assert "each class keeps its key" in _texts(at)
    sample = _current_id(at)
    assert "similar samples" in _texts(at)
    with LabelStore.open(home / "bm_first" / "store.sqlite") as store:
        classes = store.classes
    assert [_label_button(at, k).label for k in range(1, 5)] == list(classes)
    _label_button(at, 3).click().run()
    assert not at.exception
    with LabelStore.open(home / "bm_first" / "store.sqlite") as store:
        events = [e for e in store.events() if e.source == "human"]
        assert [(e.sample_id, e.label) for e in events] == [(sample, classes[2])]
    assert _current_id(at) != sample and "1 of 4 classes have a label" in _texts(at)
    _page(at, "round")
    assert not at.button(key="run_round").disabled


def test_a_class_without_a_key_is_picked_then_confirmed(trained, home):
    at = _page(trained, "label")
    sample = _current_id(at)
    before = _human_events(home)
    other = at.selectbox(key="other_class")
    assert _other_go(at).disabled
    other.select(other.options[-1]).run()  # picking alone writes nothing
    assert _human_events(home) == before and _current_id(at) == sample
    chosen = at.selectbox(key="other_class").value
    _other_go(at).click().run()
    assert not at.exception
    last = _human_events(home)[-1]
    assert (last.sample_id, last.label) == (sample, chosen) and _current_id(at) != sample
    assert at.selectbox(key="other_class").value is None  # cleared for the next sample
    at.button(key="undo").click().run()


def test_an_outcome_older_than_the_latest_round_gives_way(trained, home):
    """A round cancelled here, then one finished elsewhere (the command line): the Round page no
    longer says 'Round cancelled' as if it were news."""
    from datetime import datetime

    app_state = _app_state()
    jobs, _ = app_state._jobs()
    key = (str(home), SAMPLE, "round")
    kept = jobs.get(key)
    fake = app_state.Job(kind="round", root=str(home), name=SAMPLE, cancelled=True)
    fake.finished = time.time()
    jobs[key] = fake
    try:
        at = _page(trained, "round")
        assert any("Round cancelled" in w.value for w in at.warning), _texts(at)
        with LabelStore.open(home / SAMPLE / "store.sqlite") as store:
            latest = max(datetime.fromisoformat(r.finished).timestamp()
                         for r in store.rounds() if r.finished)
        fake.finished = latest - 60.0  # the latest round finished after it
        at.run()
        assert not any("Round cancelled" in w.value for w in at.warning), _texts(at)
    finally:
        if kept is None:
            jobs.pop(key, None)
        else:
            jobs[key] = kept

"""Session and caching glue between the Streamlit pages and ``speler`` (no logic the CLI would need).

- Which project is open: ``st.session_state["project"]`` (a name under ``speler.project.default_root()``).
- One ``speler.annotator.Annotator`` per open project, shared by every session and worker thread
  (``st.cache_resource``, keyed so that a replaced project folder gets a new one). Every workflow
  (import, label, undo, suggest, round, simulate, diagnostics, export) is a call on it; the pages
  read ``annotator.project`` only to display it.
- Cached figures, keyed on project and round (``st.cache_resource``); ``prefetch`` builds figures
  the Label page will show next in a worker thread.
- Skipped samples, per project and person, kept by the server (``skipped``).
- The round runner: a round trains in a worker thread so the page stays responsive and shows a
  progress bar per stage; Cancel sets an event that ``Annotator.run_round``'s ``cancel`` reads.
  Jobs (rounds, simulations) live in a process-wide registry, one per project and kind, so a round
  keeps running when the person switches pages, and every session sees it.
- ``user_error``: a ``SpelerError`` becomes ``st.error`` with what to do; nothing is lost.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import streamlit as st

from speler import loop
from speler.annotator import Annotator, import_project
from speler.config import Config
from speler.errors import CancelledError, ProjectError, SpelerError
from speler.project import DATA_FILE, default_root, list_projects

logger = logging.getLogger("speler.app")

DEFAULT_SAMPLE = "synthetic_actions"  # the bundled sample the app opens on, nothing to configure
STAGES = loop.STAGES  # a round reports these, in this order
STAGE_TITLES = {"views": "Label-free views", "train": "Training", "embed": "Embedding", "knn": "kNN graph",
                "propagate": "Propagation", "suggest": "Suggestions"}

# session key: the id of a sample the person asked to see (the Label page shows it first, until
# it is labeled or skipped; the Diagnostics page's label doubts set it too)
OPENED_SAMPLE = "opened_sample"

_create_lock = threading.Lock()


# -- where projects live ------------------------------------------------------------------------
def root() -> Path:
    """The projects folder (``$SPELER_HOME`` or ``annotations/``), read on every run so tests can set it."""
    return default_root()


def _stamp(root_dir: Path, name: str) -> int:
    """Changes when a project is (re)created, so a replaced project is never served from cache."""
    try:
        return (root_dir / name / DATA_FILE).stat().st_mtime_ns
    except OSError:
        return 0


@st.cache_resource(max_entries=16, show_spinner=False)
def _open(root_dir: str, name: str, stamp: int) -> Annotator:
    # One Annotator per (root, name, version) serves every session and the worker threads: it
    # holds the live state and the lock that keeps a label and a re-propagation from interleaving
    # (the store's connection is thread-safe: check_same_thread=False plus a lock).
    return Annotator.open(Path(root_dir), name)


def open_annotator(name: str) -> Annotator:
    """The shared Annotator of project ``name``; ProjectError if there is no such project."""
    r = root()
    stamp = _stamp(r, name)
    if stamp == 0:
        raise ProjectError(f"no project {name!r} in {r}; pick another one on the Project page")
    return _open(str(r), name, stamp)


def ensure_default_project() -> None:
    """On first start, create the bundled sample's project if it is missing (once per session).
    A failure is shown with st.error; the pages still run, so data can be imported instead."""
    if st.session_state.get("_default_checked"):
        return
    st.session_state["_default_checked"] = True
    if DEFAULT_SAMPLE in list_projects(root()):
        return
    try:
        with st.spinner(f"Creating project {DEFAULT_SAMPLE} from the bundled sample…"):
            open_sample(DEFAULT_SAMPLE)
    except SpelerError as exc:
        show_error(exc, "The bundled sample could not be set up (check the installation); "
                        "you can still import your own data on the Project page.")


def open_sample(name: str) -> None:
    """Import the bundled sample ``name`` into a project of that name unless one exists."""
    r = root()
    with _create_lock:  # two sessions starting at once create it once
        if name not in list_projects(r):
            import_project(r, name, sample=name).annotator.close()


def current_name() -> str | None:
    """Name of the project this session works on: the session's choice, else the one in the URL
    (``?project=``, so a reload or a shared link keeps it), else the default or the first one."""
    known = list_projects(root())
    name = st.session_state.get("project")
    if name not in known:
        asked = st.query_params.get("project")
        name = asked if asked in known else (
            DEFAULT_SAMPLE if DEFAULT_SAMPLE in known else (known[0] if known else None))
        st.session_state["project"] = name
    if name is not None and st.query_params.get("project") != name:
        st.query_params["project"] = name
    return name


def person() -> str:
    """Who labels in this session (saved with every label): kept in the session, so it survives
    page changes, and in the page's address (``?annotator=``, written back on every page, since
    Streamlit drops the address's parameters when the page changes), so it survives a reload."""
    if "annotator" not in st.session_state:
        st.session_state["annotator"] = (st.query_params.get("annotator", "").strip()
                                         or os.environ.get("SPELER_ANNOTATOR", ""))
    name = st.session_state["annotator"]
    if name and st.query_params.get("annotator") != name:
        st.query_params["annotator"] = name
    return name


def set_person(name: str) -> None:
    """This session's annotator is now ``name`` (stripped; empty: none), in the address too."""
    name = name.strip()
    st.session_state["annotator"] = name
    if name:
        st.query_params["annotator"] = name
    else:
        st.query_params.pop("annotator", None)


def current_annotator() -> Annotator:
    """The session's project's Annotator; stops the page with st.error when there is none."""
    name = current_name()
    if name is None:
        st.error(f"There are no projects in {root()}. Create one on the Project page "
                 "(open a bundled sample or import your data).")
        st.stop()
    with user_error("Pick another project on the Project page."):
        return open_annotator(name)
    raise AssertionError("unreachable")  # user_error stops the page on failure


def select_project(name: str) -> None:
    """Switch this session to project ``name`` and forget per-project session state (skipped
    samples are kept per project by ``skipped``)."""
    if st.session_state.get("project") != name:
        st.session_state["project"] = name
        st.query_params["project"] = name
        for key in ("queue", "front", "reasons", OPENED_SAMPLE):
            st.session_state.pop(key, None)


def title(text: str, annotator: Annotator | None = None) -> None:
    """The page title, with the open project and its last round underneath."""
    st.title(text)
    if annotator is not None:
        project = annotator.project
        last = project.store.last_done_round()
        rounds = "no round yet" if last is None else f"last round {last}"
        st.caption(f"Project **{project.name}** · {project.store.n:,} samples · "
                   f"{len(project.store.classes)} classes · {rounds}")


# -- errors -------------------------------------------------------------------------------------
class user_error:
    """``with user_error("what to do"):`` turns a SpelerError into st.error and stops the page."""

    def __init__(self, hint: str = "", *, stop: bool = True) -> None:
        self.hint = hint
        self.stop = stop
        self.failed = False

    def __enter__(self) -> "user_error":
        return self

    def __exit__(self, typ, exc, tb) -> bool:
        if exc is None or not isinstance(exc, SpelerError):
            return False
        self.failed = True
        show_error(exc, self.hint)
        if self.stop:
            st.stop()
        return True


def show_error(exc: BaseException, hint: str = "") -> None:
    st.error(f"{exc}" + (f"\n\n{hint}" if hint else ""), icon=":material/error:")


def flash(kind: str, message: str) -> None:
    """Remember a message for the next run of the page (callbacks run before the page draws)."""
    st.session_state.setdefault("flash", []).append((kind, message))


def show_flash() -> None:
    for kind, message in st.session_state.pop("flash", []):
        if kind == "toast":
            st.toast(message, duration="long")
        else:
            {"error": st.error, "warning": st.warning, "success": st.success}.get(kind, st.info)(message)


# -- suggestions ----------------------------------------------------------------------------------
@st.cache_resource(show_spinner=False)
def _skips() -> tuple[dict[tuple[str, str], set[str]], threading.Lock]:
    return {}, threading.Lock()


def skipped(annotator: Annotator, person: str) -> set[str]:
    """Ids skipped on the Label page in the project by ``person`` (a set to add to and discard
    from). Kept by the server per project and person, not per session, so a reload of the page
    or a switch to another project and back keeps them; a server restart forgets them."""
    registry, lock = _skips()
    with lock:
        return registry.setdefault((str(annotator.project.path), person), set())


def suggestions(annotator: Annotator, state, *, n: int, strategy: str,
                skipped: set[str]) -> list:
    """``annotator.suggest`` without the ``skipped`` ids, kept for this session and asked again
    only when the state (round or labels) or the skips change."""
    key = (str(annotator.project.path), state.round, labels_hash(state.human), n, strategy,
           hash(frozenset(skipped)))
    cached = st.session_state.get("queue")
    if cached is not None and cached[0] == key:
        return cached[1]
    queue = annotator.suggest(n=n, strategy=strategy, exclude=tuple(skipped))
    st.session_state["queue"] = (key, queue)
    return queue


# -- the Label page's keys ----------------------------------------------------------------------
FIXED_KEYS = "1234567890"  # up to ten classes: each has its own key, the same on every sample
TOP_KEYS = 9  # more classes: keys 1-9 label a sample's nine most likely; a search box the rest


def label_keys(classes: tuple[str, ...], order) -> tuple[list[str], str]:
    """The Label page's keyboard: (the classes that get a button and a key, in key order; their
    keys). Up to ten classes each keep their own key on every sample, so the hand learns them
    (the guess is marked by colour, not by place); beyond that keys 1-9 go to this sample's nine
    most likely classes (``order``: class indices, most likely first; 1 = the guess) and a search
    box holds the rest."""
    if len(classes) <= len(FIXED_KEYS):
        return list(classes), FIXED_KEYS[:len(classes)]
    return [classes[int(k)] for k in order[:TOP_KEYS]], FIXED_KEYS[:TOP_KEYS]


# -- cached views -------------------------------------------------------------------------------
def project_key(annotator: Annotator) -> tuple[str, int]:
    project = annotator.project
    return str(project.path), _stamp(project.path.parent, project.name)


@st.cache_resource(max_entries=4, show_spinner=False)
def class_colors(classes: tuple[str, ...]) -> dict[str, str]:
    """One colour per class name, the same in every plot and on every page."""
    from speler.viz import class_colors as _colors

    colors = _colors(list(classes))
    if isinstance(colors, dict):
        return {str(k): str(v) for k, v in colors.items()}
    return {c: str(col) for c, col in zip(classes, colors)}


@st.cache_resource(max_entries=96, show_spinner=False)
def _sample_figure(key: tuple[str, int], index: int, title: str, color: str, height: int):
    from speler.viz import series_figure, skeleton_animation

    ds = _open(str(Path(key[0]).parent), Path(key[0]).name, key[1]).data
    x = ds.x[index]
    length = int(ds.lengths[index])
    if ds.layout.is_series:
        # x axis in frames: after resampling to config.preprocess.frames, ds.fps no longer
        # matches the frame spacing, so seconds would be wrong
        return series_figure(x, list(ds.channels), title=title, length=length, height=height)
    return skeleton_animation(x, ds.layout, title=title, color=color, length=length, height=height,
                              fps=ds.fps or 30.0, channels=list(ds.channels))


def sample_figure(annotator: Annotator, index: int, *, title: str, color: str, height: int = 420):
    """Animated 3D skeleton (or series lines) of sample ``index``, cached per project and sample."""
    return _sample_figure(project_key(annotator), int(index), title, color, int(height))


@st.cache_resource(max_entries=512, show_spinner=False)
def _thumbnail(key: tuple[str, int], index: int, color: str) -> str:
    from speler.viz import thumbnail_svg

    ds = _open(str(Path(key[0]).parent), Path(key[0]).name, key[1]).data
    return thumbnail_svg(ds.x[index], ds.layout, color=color, length=int(ds.lengths[index]),
                         channels=list(ds.channels))


def thumbnail(annotator: Annotator, index: int, *, color: str) -> str:
    """A light static picture of sample ``index``: an inline SVG string for ``st.markdown(...,
    unsafe_allow_html=True)`` (no Plotly, no WebGL, nothing for the browser to compute), cached."""
    return _thumbnail(project_key(annotator), int(index), color)


@st.cache_resource(show_spinner=False)
def _prefetcher():
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="speler-prefetch")


def prefetch(*makers: Callable[[], Any]) -> None:
    """Build figures the next run will probably show (the next suggestion's) in a worker thread,
    so they come from the cache when the person gets there. A later call from the same session
    drops what this one queued and has not started (the person has moved on). Failures are only
    logged: the page builds what it needs anyway."""
    latest = st.session_state.setdefault("_prefetch_generation", [0])
    latest[0] += 1
    mine = latest[0]

    def run(make: Callable[[], Any]) -> None:
        if latest[0] != mine:
            return
        try:
            make()
        except Exception:  # only a guess about what comes next
            logger.debug("prefetch failed", exc_info=True)

    pool = _prefetcher()
    for make in makers:
        pool.submit(run, make)


def class_counts_figure(classes: tuple[str, ...], counts: dict[str, np.ndarray]):
    """Stacked per-class bars (log scale) of the label sources in ``counts``."""
    from speler.viz import class_counts_figure as _figure

    fig = _figure(list(classes), counts, log=True, title="")
    fig.update_layout(showlegend=True)  # name the source even when there is only one
    return fig


@st.cache_resource(max_entries=8, show_spinner=False)
def energy_figure(key: tuple[str, int], round_no: int, labels_key: str, _result, classes):
    """Energy histograms per class with thresholds (cached per project, round and labels)."""
    from speler.viz import energy_histogram

    return energy_histogram(_result.energy, _result.labels, list(classes), _result.thresholds,
                            title="", columns=4, human=_result.labeled, reliable=_result.reliable)


@st.cache_resource(max_entries=8, show_spinner="Computing the spectrum…")
def _spectrum_figure(key: tuple[str, int], round_no: int, labels_key: str, _annotator: Annotator):
    from speler.viz import spectrum_figure

    before, after = _annotator.spectrum()
    return spectrum_figure(before, after, title=""), before.extremes, after.extremes


def spectrum_figure(annotator: Annotator, state_):
    """(figure, extremes before, extremes after): ``annotator.spectrum()`` (eigenvalue density of
    S before/after balancing on the graph the propagation ran on) drawn, cached per project, round
    and labels of ``state_``, the live state the page shows."""
    return _spectrum_figure(project_key(annotator), state_.round, labels_hash(state_.human),
                            annotator)


def curves_figure(curves: dict[str, tuple[np.ndarray, np.ndarray]], *,
                  y_title: str = "score on unlabeled samples"):
    from speler.viz import curves_figure as _figure

    fig = _figure(curves, y_title=y_title, x_title="human labels", title="")
    xs = [x for v in curves.values() for x in v[0]]
    if xs and max(xs) - min(xs) < 10:  # label counts are whole numbers: no 50.5 ticks
        fig.update_xaxes(dtick=1)
    return fig


def labels_hash(labels: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(labels).tobytes()).hexdigest()[:16]


# -- long work in a worker thread ---------------------------------------------------------------
@dataclass
class Job:
    """Long work (a round, a simulation) running in a worker thread; the pages read it, the worker
    writes it. ``progress[stage] = (done, total)``; ``stage`` is the stage reported last."""

    kind: str
    root: str
    name: str
    started: float = field(default_factory=time.time)
    finished: float | None = None
    stage: str | None = None
    progress: dict[str, tuple[int, int]] = field(default_factory=dict)
    stage_started: dict[str, float] = field(default_factory=dict)
    result: Any = None
    error: str | None = None
    cancelled: bool = False
    cancel_event: threading.Event = field(default_factory=threading.Event)

    @property
    def running(self) -> bool:
        return self.finished is None

    def update(self, stage: str, done: int, total: int) -> None:
        """A ``progress(stage, done, total)`` callback (called in the worker)."""
        if stage != self.stage:
            self.stage = stage
            self.stage_started[stage] = time.time()
        self.progress[stage] = (int(done), int(total))


@st.cache_resource(show_spinner=False)
def _jobs() -> tuple[dict[tuple[str, str, str], Job], threading.Lock]:
    return {}, threading.Lock()


def _job_key(annotator: Annotator, kind: str) -> tuple[str, str, str]:
    return str(annotator.project.path.parent), annotator.name, kind


def job(annotator: Annotator, kind: str) -> Job | None:
    """The latest job of ``kind`` for the project started by this server (running or finished)."""
    jobs, _ = _jobs()
    return jobs.get(_job_key(annotator, kind))


def round_job(annotator: Annotator) -> Job | None:
    return job(annotator, "round")


def start_job(annotator: Annotator, kind: str, work: Callable[[Job], Any]) -> Job:
    """Run ``work(job)`` in a worker thread; ProjectError if a job of that kind is running already.
    ``work`` reports through ``job.update`` and should stop when ``job.cancel_event`` is set."""
    jobs, lock = _jobs()
    key = _job_key(annotator, kind)
    with lock:
        old = jobs.get(key)
        if old is not None and old.running:
            raise ProjectError(f"a {kind} of {annotator.name} is running already; wait or cancel it")
        new = Job(kind=kind, root=key[0], name=key[1])
        jobs[key] = new
    threading.Thread(target=_work, args=(new, work), name=f"speler-{kind}-{annotator.name}",
                     daemon=True).start()
    return new


def start_round(annotator: Annotator, *, config: Config) -> Job:
    """``annotator.run_round`` in a worker thread, with progress per stage and a cancel flag.
    ``config`` (the settings of the Round page) is first saved as the project's settings, so the
    Label page's suggestions and the next visit use them too."""
    annotator.set_config(config)
    return start_job(annotator, "round", lambda j: annotator.run_round(
        config=config, progress=j.update, cancel=j.cancel_event.is_set))


def _work(job: Job, work: Callable[[Job], Any]) -> None:
    try:
        job.result = work(job)
    except CancelledError as exc:
        job.cancelled = True
        job.error = str(exc)
    except SpelerError as exc:
        job.error = str(exc)
    except Exception as exc:  # a bug, not bad input: keep the traceback in the log
        logger.error("%s of %s failed:\n%s", job.kind, job.name, traceback.format_exc())
        job.error = f"{type(exc).__name__}: {exc}"
    finally:
        job.finished = time.time()


# -- simulated annotation -----------------------------------------------------------------------
SIM_ROUNDS = 5  # rounds of simulated labeling per strategy
SIM_BUDGET = 10  # labels per simulated round


def start_simulation(annotator: Annotator) -> Job:
    """``annotator.simulate`` (every strategy, the same seeds) in a worker thread; the curves are
    written to the project folder and read back with ``annotator.saved_simulation()``."""

    def work(j: Job) -> Any:
        def progress(done: int, total: int) -> None:
            j.update("simulate", done, total)
            if j.cancel_event.is_set():
                raise CancelledError("simulation cancelled; the previous curves are kept")

        j.update("train", 0, 1)
        return annotator.simulate(rounds=SIM_ROUNDS, budget=SIM_BUDGET, progress=progress)

    return start_job(annotator, "simulation", work)

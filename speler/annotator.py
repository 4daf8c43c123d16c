"""``Annotator``: the one object that owns a project's work; the CLI and the app call only it.

It holds the project (folder, store, data), the live state of the latest complete round (kept in
the object, never in a module global) and a lock, so several app sessions or threads that share
one Annotator never interleave a label with a re-propagation. Reading never writes: ``state``
brings the round's propagation up to date with the store's human labels in memory. Only the
methods that say so write to the store: ``label`` and ``undo`` (a human event, then the
propagated labels that changed), ``propagate`` (the propagated labels that differ from the
store's) and ``run_round`` (a round). Everything a front end shows or exports comes from here, so
the CLI and the app cannot drift apart: an export from either is the same file.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from speler import loop, selection
from speler.atomic_file import write_atomically
from speler.config import Config
from speler.selection import Suggestion
from speler.data.schema import SequenceSet
from speler.errors import LabelError, ProjectError
from speler.graph.doubts import disagreement
from speler.project import Project, check_name, default_root

SIMULATION_FILE = "simulation.json"


@dataclass
class ImportResult:
    """What ``import_project`` made: the annotator of the new project, notes about the label file
    (agreeing repeats, empty labels; a person should see them) and classes it added."""

    annotator: "Annotator"
    notes: list[str] = field(default_factory=list)
    new_classes: list[str] = field(default_factory=list)


def import_project(
    root: str | Path | None, name: str, *, path: str | Path | None = None,
    sample: str | None = None, format: str | None = None, labels: str | Path | None = None,
    allow_new_classes: bool = False, no_file_labels: bool = False,
    protocol: tuple[float, float, int] | None = None, config: Config | None = None,
    overwrite: bool = False, progress: Callable[[int, int], None] | None = None,
    source: str | None = None,
) -> ImportResult:
    """Read ``path`` (a file or folder, any known format; ``format`` forces a reader) or the
    bundled ``sample`` into a new project ``name`` under ``root``, and open it.

    labels: an ``id,label`` CSV of the user's own labels. no_file_labels: the files' labels become
    hidden truth (evaluation only), so the project starts unlabeled. protocol: (imbalance π,
    labeled share γ, seed): the paper's long-tailed partial-label split of a fully labeled set.
    source: where the project says its data came from (default: the resolved path; the app names
    an upload ``upload:FILE``, since its temporary path means nothing later).
    The project appears complete or not at all (``Project.create``). Raises ProjectError when it
    exists and ``overwrite`` is False (before reading anything), DataFormatError for bad data.
    """
    from speler.data.transforms import check_preprocess_config

    check_name(name)
    if (path is None) == (sample is None):
        raise ProjectError("import: give exactly one of a path or a bundled sample")
    config = config or Config()
    check_preprocess_config(config.preprocess)  # before the (possibly long) read
    target = Path(root or default_root()) / name
    if not overwrite and target.exists():
        raise ProjectError(f"{target}: project {name!r} already exists (use --overwrite to "
                           f"replace it)")
    meta: dict[str, Any] = {}
    if sample is not None:
        from speler.data.samples import load_sample

        ds = load_sample(sample)
        meta["source"] = f"sample:{sample}"
    else:
        from speler.formats import read

        ds = read(path, format=format, progress=progress)
        meta["source"] = source or str(Path(path).resolve())
        if format:
            meta["format"] = format
    if protocol is not None:
        from speler.data.protocol import make_partial

        imbalance, labeled, seed = protocol
        ds = make_partial(ds, imbalance=imbalance, labeled_ratio=labeled, seed=seed)
        meta["protocol"] = {"imbalance": imbalance, "labeled_ratio": labeled, "seed": seed}
    if no_file_labels:  # the files' labels stay only as hidden truth for evaluation
        truth = ds.y if ds.y_true is None else ds.y_true
        ds = ds.replace(y=np.full(ds.n, -1, dtype=np.int64), y_true=truth)
    notes: list[str] = []
    new_classes: list[str] = []
    if labels is not None:
        ds, notes, new_classes = _apply_label_csv(ds, labels, allow_new_classes=allow_new_classes)
        meta["labels_file"] = str(Path(labels).resolve())
    project = Project.create(root, name, ds, config=config, overwrite=overwrite, meta=meta)
    return ImportResult(annotator=Annotator(project), notes=notes, new_classes=new_classes)


def _apply_label_csv(ds: SequenceSet, path: str | Path, *, allow_new_classes: bool):
    """(ds with the CSV's labels in ``y``, notes, new classes). Rows that cannot be placed are
    errors raised by the reader; a class the data does not name says how to allow it."""
    from speler.errors import DataFormatError
    from speler.formats import read_label_csv

    try:
        imp = read_label_csv(path, ds, allow_new_classes=allow_new_classes)
    except DataFormatError as exc:
        if allow_new_classes or "known classes" not in str(exc):
            raise
        what = ("the data name no classes, so every class comes from the CSV" if not ds.classes
                else "if these are new classes")
        raise DataFormatError(f"{exc}; {what}: add --allow-new-classes to let {path} add them"
                              ) from None
    classes = tuple(ds.classes) + tuple(imp.new_classes)
    idx = np.asarray(imp.index, dtype=np.int64)
    new = np.asarray(imp.labels, dtype=np.int64)
    notes = [str(p) for p in imp.problems]
    old = ds.y[idx]
    differ = np.flatnonzero((old >= 0) & (old != new))
    if differ.size:  # the person's CSV wins, but not silently
        shown = "; ".join(f"{ds.ids[idx[k]]}: {classes[old[k]]} -> {classes[new[k]]}"
                          for k in differ[:3])
        notes.insert(0, f"{differ.size} of its labels replace a different label that the data "
                        f"files give (the CSV's are kept): {shown}"
                        f"{'; ...' if differ.size > 3 else ''}")
    y = ds.y.copy()
    y[idx] = new
    return ds.replace(classes=classes, y=y), notes, list(imp.new_classes)


class Annotator:
    """A project's work. Open with ``Annotator.open(root, name)`` or ``import_project``; close
    (or use as a context manager) to release the store."""

    def __init__(self, project: Project) -> None:
        self.project = project
        self._lock = threading.RLock()
        self._base: loop.LoopState | None = None  # the latest round as it ended
        self._state: loop.LoopState | None = None  # the base brought to the store's labels
        self._first_groups: tuple | None = None  # for first labels, before any round

    @classmethod
    def open(cls, root: str | Path | None, name: str) -> "Annotator":
        return cls(Project.open(root, name))

    def close(self) -> None:
        self.project.close()

    def __enter__(self) -> "Annotator":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Annotator({self.project!r})"

    @property
    def name(self) -> str:
        return self.project.name

    @property
    def data(self) -> SequenceSet:
        return self.project.data

    @property
    def config(self) -> Config:
        return self.project.config

    # -- reading (never writes) ----------------------------------------------------------------
    def latest_round(self) -> int | None:
        """The latest finished round: done in the store and complete on disk."""
        return loop.latest_complete_round(self.project)

    def state(self) -> loop.LoopState | None:
        """The latest finished round's state, re-propagated in memory for the store's current
        human labels; None before the first round. Always propagated from the round's own
        solution (warm start), never from an earlier live state, so it depends only on the round
        and the labels, not on the order they came in: a long-lived Annotator (the app's) and a
        fresh one (the CLI's) give the same numbers."""
        with self._lock:
            no = self.latest_round()
            if no is None:
                self._base = self._state = None
                return None
            if self._base is None or self._base.round != no:
                self._base = loop.read_state(self.project, no)
                self._state = self._base
                if self._base is None:
                    return None
            human = self.project.store.human_labels()
            if not np.array_equal(human, self._state.human):
                self._state = self._live(human)
            return self._state

    def _live(self, human: np.ndarray) -> loop.LoopState:
        if np.array_equal(human, self._base.human):
            return self._base
        return loop.update_state(self._base, human, num_classes=self.data.num_classes,
                                 config=self.config)

    def require_state(self, what: str = "this") -> loop.LoopState:
        state = self.state()
        if state is None:
            raise ProjectError(f"project {self.name}: run a round first; {what} needs the graph "
                               f"and embeddings a round makes")
        return state

    def suggest(self, *, n: int | None = None, strategy: str | None = None, seed: int = 0,
                exclude: tuple[str, ...] | list[str] = ()) -> list:
        """Ranked samples to label next (``selection.batch`` / ``selection.strategy`` by default),
        leaving out the ids in ``exclude`` (e.g. the ones a person skipped)."""
        with self._lock:
            state = self.require_state("suggesting")
            cfg = self.config.selection
            human = self.project.store.human_labels()
            skip = set(exclude)
            n = cfg.batch if n is None else n
            picks = loop.suggest_for(state, human, self.data, n=n + len(skip),
                                     strategy=strategy or cfg.strategy, seed=seed,
                                     config=self.config)
            return [s for s in picks if s.id not in skip][:n]

    def first_labels(self, *, n: int | None = None,
                     exclude: tuple[str, ...] | list[str] = ()) -> list[Suggestion]:
        """Samples to label first, for a project without a round (``suggest`` needs one): the
        most typical samples of the data's main groups (``selection.first_labels``; groups of the
        random-kernel label-free view, ``3 × classes`` of them, at least ``selection.batch``),
        largest and unlabeled groups first; labeled samples and the ids in ``exclude``
        (skipped) are passed over. The groups depend on no label: they are made once per
        Annotator, outside its lock (1.6 s for the view of the bundled sample's 740 clips), and
        each call only filters them. Classes the first 2 × C picks cover (the five real sets,
        labels hidden): all of them on the whole sets against 79 % for random picks; 85 %
        against 80 % on their long-tailed subsets (π = 10, 5 seeds), where the rare classes
        hold a few samples each."""
        groups = self._first_groups
        if groups is None:
            from speler.features import label_free_views

            ds, vc = self.data, self.config.views
            view = label_free_views(ds.x, views=("rocket",), dim=vc.dim,
                                    rocket_features=vc.rocket_features, seed=vc.seed)["rocket"]
            groups = selection.typical_groups(
                view, groups=max(3 * ds.num_classes, self.config.selection.batch), seed=vc.seed)
            self._first_groups = groups  # two sessions at once make the same groups: no lock
        with self._lock:
            ds, store = self.data, self.project.store
            n = self.config.selection.batch if n is None else n
            skip = np.zeros(ds.n, dtype=bool)
            for sid in exclude:
                skip[store.sample_index(sid)] = True
            return selection.first_labels(groups, store.human_labels() >= 0, budget=n,
                                          ids=ds.ids.tolist(), skipped=skip)

    def suggestion_for(self, sample_id: str, *, reason: str) -> Suggestion:
        """Sample ``sample_id`` as a suggestion (the live state's guess, runner-up, energy and
        margin, no score), e.g. to show a sample again after its label was undone, or one a
        person asked for. A sample with a human label has its own seed in the scores, so its
        guess and runner-up are read from its graph neighbours instead (as label doubts are:
        ``speler.graph.doubts``): the label and the class they favour most besides it, the
        stronger first."""
        with self._lock:
            state = self.require_state("describing a sample")
            i = self.project.store.sample_index(sample_id)
            res = state.result
            if state.human[i] >= 0 and res.scores.shape[1] > 1:
                one = np.full_like(state.human, -1)
                one[i] = state.human[i]
                d = disagreement(res, one, affinity=state.affinity)
                pair = (int(d.label[0]), int(d.best[0]))
                guess, runner = pair if d.label_mass[0] >= d.best_mass[0] else pair[::-1]
            else:
                order = np.argsort(-np.asarray(res.scores[i]), kind="stable")
                guess, runner = int(res.labels[i]), int(order[1]) if len(order) > 1 else -1
            return Suggestion(index=i, id=sample_id, score=float("nan"), reason=reason,
                              predicted=guess, runner_up=runner,
                              energy=float(res.energy[i]), margin=float(res.margin[i]))

    def suggest_after(self, sample_id: str, label_name: str, *, n: int | None = None,
                      strategy: str | None = None, seed: int = 0,
                      exclude: tuple[str, ...] | list[str] = ()) -> list:
        """What ``suggest`` would answer once ``label(sample_id, label_name)`` is given, computed
        in memory and written nowhere, so a front end can prepare the next sample while a person
        still looks at this one."""
        with self._lock:
            state = self.require_state("suggesting")
            store, cfg = self.project.store, self.config.selection
            human = state.human.copy()
            human[store.sample_index(sample_id)] = store.class_index(label_name)
            guess = self._live(human)
        skip = set(exclude)
        n = cfg.batch if n is None else n
        picks = loop.suggest_for(guess, human, self.data, n=n + len(skip),
                                 strategy=strategy or cfg.strategy, seed=seed, config=self.config)
        return [s for s in picks if s.id not in skip][:n]

    def neighbours(self, index: int, *, k: int = 3, first_of: tuple[int, ...] = ()) -> list[int]:
        """Up to ``k`` nearest human-labeled samples of sample ``index``; the nearest of each
        class in ``first_of`` first (``loop.neighbours``)."""
        return loop.neighbours(self.require_state("showing neighbours"), index, k=k,
                               first_of=first_of)

    def doubts(self, *, top: int = 20) -> list:
        """Human labels the graph strongly disagrees with, strongest first."""
        with self._lock:
            return loop.doubts(self.project, self.require_state("finding doubts"), top=top)

    def label_table(self):
        """The export table (pandas) from the live state: human labels, else propagated ones."""
        from speler.export import label_table

        with self._lock:
            state = self.state()
            return label_table(self.project, propagation=None if state is None else state.result)

    def spectrum(self):
        """(before, after): eigenvalue spectra of the live graph's normalised affinity without and
        with the spectral balance of the live propagation."""
        from speler.graph.spectrum import spectrum_before_after

        state = self.require_state("the spectrum")
        return spectrum_before_after(state.affinity, state.human, num_classes=self.data.num_classes,
                                     config=self.config.propagation, prior=state.result.prior,
                                     predictions=state.result.labels)

    def quality_curve(self) -> dict[int, dict]:
        """{human labels: quality of the propagated labels of the samples without one} after each
        finished round and now (needs held-out truth in the data; {} without it)."""
        from speler.metrics import label_quality

        ds = self.data
        if ds.y_true is None:
            return {}
        points: dict[int, dict] = {}
        for r in self.project.store.rounds():
            m = r.metrics
            q = None if m is None or m.quality is None else m.quality.propagated
            if r.status == "done" and q is not None and m.human_labels is not None:
                points[int(m.human_labels)] = q.to_json()
        state = self.state()
        if state is not None:
            points[int((state.human >= 0).sum())] = label_quality(
                ds.y_true, state.result.labels, num_classes=ds.num_classes, mask=state.human < 0)
        return dict(sorted(points.items()))

    def check_export(self, *, format: str) -> None:
        """ConfigError when this project cannot be exported as ``format`` (an unknown format, or
        PYSKL for sensor series), so a front end can refuse it before anyone asks; writes nothing."""
        from speler.export import check_export

        check_export(self.project, format=format)

    def saved_simulation(self) -> dict | None:
        path = self.project.path / SIMULATION_FILE
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    # -- writing -------------------------------------------------------------------------------
    def label(self, sample_id: str, label_name: str, *, annotator: str = "",
              seen: int | None = None) -> loop.LoopState | None:
        """Writes a human label, then the propagated labels it changed (no retraining).

        ``seen``: the sample's human label (class index, -1 for none) as the caller showed it to
        the person (e.g. a page opened before someone else labeled it in another tab or from the
        command line). When the store holds another by now, nothing is written and LabelError
        says who labeled it what, and when; None: no check (the command line's ``label``, which
        names the sample on purpose)."""
        with self._lock:
            if seen is not None:
                self._check_unchanged(sample_id, int(seen))
            before = self.state()
            self.project.store.add_label(sample_id, label_name, source="human",
                                         annotator=annotator)
            return self._repropagate(before)

    def _check_unchanged(self, sample_id: str, seen: int) -> None:
        store = self.project.store
        now = int(store.human_labels()[store.sample_index(sample_id)])
        if now == seen:
            return
        classes = self.data.classes
        shown = "unlabeled" if seen < 0 else f"labeled {classes[seen]}"
        last = next((e for e in reversed(store.events(sample_id))
                     if e.source in ("human", "imported")), None)
        what = "it has no label now" if now < 0 else f"it is labeled {classes[now]} now"
        if last is not None:  # a label or an undo: whoever changed it last
            who = last.annotator or "someone without a name"
            what += f" (last changed by {who} at {last.time})"
        raise LabelError(f"{sample_id}: {what}, but this page showed it {shown}; nothing was "
                         f"saved. Look at it again and label it if you still want to change it.")

    def undo(self, *, annotator: str | None = None):
        """Writes an undo of the latest human label (of ``annotator`` when given), then the
        propagated labels that changed; returns (the undone event or None, the new state)."""
        with self._lock:
            before = self.state()
            undone = self.project.store.undo(annotator=annotator)
            return undone, self._repropagate(before)

    def propagate(self) -> loop.LoopState:
        """Writes the live propagated labels that differ from the store's current ones."""
        with self._lock:
            state = self.require_state("propagation")
            self._write_changes(state, self.project.store.current_labels().label)
            return state

    def set_config(self, config: Config) -> None:
        """Saves ``config`` as the project's settings (config.json, atomically). The live state
        is then propagated again from the round's own solution with the new settings (as a fresh
        Annotator would) on the next ``state()``."""
        if not isinstance(config, Config):
            raise TypeError(f"set_config needs a speler.config.Config, got {type(config).__name__}")
        with self._lock:
            if config == self.config:
                return
            self.project.save_config(config)
            self._state = self._base

    def run_round(self, *, config: Config | None = None,
                  progress: loop.StageProgress | None = None,
                  cancel: Callable[[], bool] | None = None) -> loop.RoundResult:
        """Runs and writes one round (see ``speler.loop.run_round``); the live state follows it.
        The lock is not held while the round trains, so labeling goes on meanwhile; labels given
        during the round are picked up by the next ``state()``."""
        res = loop.run_round(self.project, config=config, progress=progress, cancel=cancel)
        with self._lock:
            # read back from its folder on the next state(), as a fresh Annotator would: the
            # in-memory result carries solver bookkeeping the saved one does not
            self._base = self._state = None
        return res

    def export(self, *, format: str | None = None, path: str | Path | None = None) -> Path:
        """Writes the label table from the live state to ``path`` (default: the project's
        exports folder) as ``format`` (default: the one ``path``'s extension names, else csv)
        and returns the file."""
        from speler.export import export_labels

        with self._lock:
            state = self.state()
            return export_labels(self.project, format=format, path=path,
                                 propagation=None if state is None else state.result)

    def simulate(self, *, strategies=None, rounds: int = 5, budget: int = 10, seed: int = 0,
                 retrain_every: int = 0, progress=None, config: Config | None = None):
        """Simulated annotation on this project's data (needs held-out truth for every sample);
        writes the curves to the project folder (``saved_simulation``) and returns them."""
        from speler.selection import STRATEGIES
        from speler.simulate import simulate

        res = simulate(self.data, strategies=strategies or tuple(STRATEGIES), rounds=rounds,
                       budget=budget, seed=seed, config=config or self.config,
                       retrain_every=retrain_every, name=self.name, progress=progress)
        write_simulation(self.project.path / SIMULATION_FILE, res, budget=budget)
        return res

    # -- internals -----------------------------------------------------------------------------
    def _repropagate(self, before: loop.LoopState | None) -> loop.LoopState | None:
        """Brings the live state to the store's human labels and writes the propagated labels
        that changed against ``before``."""
        if before is None:
            return None
        now = self.state()
        self._write_changes(now, before.result.labels)
        return now

    def _write_changes(self, state: loop.LoopState, previous: np.ndarray) -> None:
        res, human = state.result, state.human
        changed = np.flatnonzero((res.labels != previous) & (human < 0))
        if len(changed):
            ids, classes = self.project.store.ids, self.project.store.classes
            self.project.store.add_labels(
                [(ids[i], classes[res.labels[i]]) for i in changed], source="propagated",
                round=state.round, energies=res.energy[changed].tolist(),
                margins=res.margin[changed].tolist(),
            )


def write_simulation(path: str | Path, res, *, budget: int) -> Path:
    """The simulation's curves as JSON (the one writer the CLI and the app share)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"dataset": res.dataset, "budget": budget, "auc": res.auc,
                       "curves": res.curves, "seconds": res.seconds}, indent=2,
                      default=lambda o: o.item() if hasattr(o, "item") else str(o))
    return write_atomically(path, lambda fh: fh.write(text.encode()))

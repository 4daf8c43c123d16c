"""``python -m speler``: argparse sub-commands over the library; the only module that prints.

Each sub-command is two functions, ``_add_<name>(parser)`` declaring its options and
``_run_<name>(args) -> int`` doing the work, registered in ``COMMANDS``. Errors are translated here
and only here: a SpelerError (bad input) becomes one line ``error: ...`` on stderr and exit code 2;
Ctrl-C exits 130 (the library leaves nothing half-written).

Under ``torchrun --nproc_per_node N [--nnodes M ...] -m speler COMMAND`` (``RANK_COMMANDS``: round,
train, propagate, simulate) every rank runs the command in one process group (``_run_command``):
rank 0 alone opens the project's store, writes and prints; the others get what they need from it
(``simulate``: every rank reads the data itself) and share a round's every stage (views, graphs
and propagations row-sharded, training with DDP, the embedding); ``propagate`` (a warm-started
re-propagation) is rank 0's; a failure on any rank ends every rank with the same ``error: rank R
failed in STAGE: ...`` (printed by rank 0) and exit code 2. A plain ``python -m speler`` is
untouched by this.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import getpass
import logging
import os
import sys
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from speler import __version__
from speler import distributed as dist
from speler.config import Config, apply_overrides
from speler.errors import LabelError, SpelerError

logger = logging.getLogger("speler")

EXIT_OK, EXIT_ERROR, EXIT_INTERRUPTED = 0, 2, 130


class _UsageError(Exception):
    """argparse found bad arguments; reported as one line like any other bad input."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(f"{self.prog}: {message}")


def _at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum`` (the usage error names the option)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


# -- output helpers ------------------------------------------------------------------------------
def _out(*lines: str) -> None:
    for line in lines:
        print(line)


def _err(message: str) -> None:
    text = " ".join(str(message).split("\n")).strip()
    print(f"error: {text}", file=sys.stderr)


class _Progress:
    """A ``progress(done, total)`` callback drawing a tqdm bar on stderr (hidden when not a TTY)."""

    def __init__(self, desc: str) -> None:
        self.desc = desc
        self.bar: Any = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=self.desc, unit="item", leave=False, disable=None,
                            file=sys.stderr)
        if total != self.bar.total:
            self.bar.total = total
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "_Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _root(args: argparse.Namespace) -> Path | None:
    return None if args.root is None else Path(args.root)


def _open_project(args: argparse.Namespace, name: str):
    """The project's ``Annotator``: every sub-command works through it, as the app does."""
    from speler.annotator import Annotator

    return Annotator.open(_root(args), name)


def _fps(fps: float) -> str:
    """A frame rate as people write it: 30, 4.8, 18.9 (three significant digits at most)."""
    return f"{fps:.3g}" if fps < 1000 else f"{fps:.0f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    cells = [[str(h) for h in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    fmt = lambda r: "  ".join(  # noqa: E731
        c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))
    )
    return [fmt(cells[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in cells[1:]]


# -- import --------------------------------------------------------------------------------------
def _add_import(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", nargs="?", help="file or folder to read (or use --sample)")
    p.add_argument("--project", required=True, help="name of the project to create")
    p.add_argument("--sample", help="import a bundled sample instead of PATH (see `samples`)")
    p.add_argument("--format", help="force a reader instead of detecting the format: "
                                    + ", ".join(_reader_names()))
    p.add_argument("--labels", help="CSV of id,label rows: your own labels for some samples")
    p.add_argument("--allow-new-classes", action="store_true",
                   help="let --labels add classes the data does not name")
    p.add_argument("--frames", type=int,
                   help="frames per sample after resampling, 2 to 10000; 0 (the default) by the"
                        " data: 48 for skeletons, a series its median length within 48-256"
                        " (preprocess.frames)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override such as train.lr=3e-4 (repeatable)")
    p.add_argument("--no-file-labels", action="store_true",
                   help="start unlabeled: the data files' labels are kept only as hidden"
                        " truth for evaluation")
    p.add_argument("--overwrite", action="store_true", help="replace an existing project")
    g = p.add_argument_group("long-tailed partial-label protocol (for experiments)")
    g.add_argument("--protocol-imbalance", type=float, metavar="PI",
                   help="imbalance ratio π: class sizes n_1·π^(-(c-1)/(C-1))")
    g.add_argument("--protocol-labeled", type=float, metavar="GAMMA",
                   help="share γ of the kept samples whose labels stay visible")
    g.add_argument("--protocol-seed", type=int, default=0, metavar="S", help="seed (default 0)")


def _reader_names() -> list[str]:
    from speler.formats import FORMATS

    return sorted(FORMATS)


def _run_import(args: argparse.Namespace) -> int:
    from speler.annotator import import_project

    if (args.path is None) == (args.sample is None):
        raise _UsageError("import: give exactly one of PATH or --sample NAME")
    if (args.protocol_imbalance is None) != (args.protocol_labeled is None):
        raise _UsageError("import: --protocol-imbalance and --protocol-labeled go together")
    overrides = list(args.set)
    if args.frames is not None:
        overrides.append(f"preprocess.frames={args.frames}")
    config = apply_overrides(Config(), overrides)
    protocol = (None if args.protocol_imbalance is None else
                (args.protocol_imbalance, args.protocol_labeled, args.protocol_seed))
    what = args.sample or Path(args.path).name
    with _Progress(f"reading {what}") as bar:
        res = import_project(
            _root(args), args.project, path=args.path, sample=args.sample, format=args.format,
            labels=args.labels, allow_new_classes=args.allow_new_classes,
            no_file_labels=args.no_file_labels, protocol=protocol, config=config,
            overwrite=args.overwrite, progress=bar)
    for note in res.notes[:5]:
        print(f"note: {args.labels}: {note}", file=sys.stderr)
    if len(res.notes) > 5:
        print(f"note: {args.labels}: ... and {len(res.notes) - 5} more notes", file=sys.stderr)
    if res.new_classes:
        print(f"note: {args.labels}: new classes {', '.join(res.new_classes)}", file=sys.stderr)
    with res.annotator as ann:
        project = ann.project
        n_lab = int((project.store.current_labels().label >= 0).sum())
        d = ann.data
        _out(f"created project {ann.name} at {project.path}",
             f"  {d.n} samples, {d.num_classes} classes, {n_lab} labeled, layout {d.layout.name},"
             f" x shape {tuple(d.x.shape)} (N, C, T, V, M)")
    return EXIT_OK


# -- info ----------------------------------------------------------------------------------------
def _add_info(p: argparse.ArgumentParser) -> None:
    p.add_argument("project", help="project name")


def _run_info(args: argparse.Namespace) -> int:
    with _open_project(args, args.project) as ann:
        project = ann.project
        d = project.data
        store = project.store
        cur = store.current_labels()
        n_c = d.num_classes
        src = cur.source
        count = lambda mask: np.bincount(cur.label[mask], minlength=n_c)  # noqa: E731
        human, imported = count(src == "human"), count(src == "imported")
        prop = count(src == "propagated")
        unlabeled_mask = (src != "human") & (src != "imported")
        header = ["class", "human", "imported", "propagated"]
        truth_col = d.y_true is not None
        if truth_col:
            header.append("others by truth")
            truth = d.y_true[unlabeled_mask]
            unl = np.bincount(truth[truth >= 0], minlength=n_c)
        rows = []
        for c, name in enumerate(d.classes):
            row = [name, human[c], imported[c], prop[c]]
            if truth_col:
                row.append(unl[c])
            rows.append(row)
        total = ["total", int(human.sum()), int(imported.sum()), int(prop.sum())]
        if truth_col:
            total.append(int(unlabeled_mask.sum()))
        rows.append(total)
        n, c, t, v, m = d.shape
        rounds = store.rounds()
        meta = store.meta
        _out(f"project   {project.name}  ({project.path})")
        if "source" in meta:
            _out(f"source    {meta['source']}")
        what = (f"series, {len(d.channels)} channel{'s' if len(d.channels) != 1 else ''}"
                if d.layout.is_series else f"{d.layout.name} ({d.layout.num_joints} joints)")
        _out(f"layout    {what}" + (f", {_fps(d.fps)} fps" if d.fps else ""),
             f"shape     N={n} C={c} T={t} V={v} M={m}  (channels {', '.join(d.channels)})",
             f"samples   {n}: {int((src == 'human').sum())} human, "
             f"{int((src == 'imported').sum())} imported, {int((src == 'propagated').sum())} "
             f"propagated, {int((src == 'none').sum())} without any label",
             f"classes   {n_c}", "")
        _out(*_table(header, rows))
        if truth_col:
            _out("(others by truth: the samples no person labeled, propagated or not, counted by "
                 "the true class the data holds for evaluation only)")
        _out("")
        if not rounds:
            _out("rounds    none yet")
        else:
            _out(f"rounds    {len(rounds)} (last done: {store.last_done_round()})")
            for r in rounds:
                extra = f" — {r.reason}" if r.reason else ""
                _out(f"  {r.no:03d}  {r.status:<11}  started {r.started}{extra}")
    return EXIT_OK


# -- label / undo --------------------------------------------------------------------------------
def _default_annotator() -> str:
    """$SPELER_ANNOTATOR, else the login name (``getpass.getuser``: $LOGNAME, $USER, ... then the
    password database, so a shell without $USER, as root in a container, still names someone)."""
    if os.environ.get("SPELER_ANNOTATOR"):
        return os.environ["SPELER_ANNOTATOR"]
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a uid with no entry in the password database
        return ""


def _add_label(p: argparse.ArgumentParser) -> None:
    p.add_argument("project", help="project name")
    p.add_argument("id", help="sample id")
    p.add_argument("label", help="class name")
    p.add_argument("--annotator", default=None,
                   help="who labels (default $SPELER_ANNOTATOR, else your login name)")


def _run_label(args: argparse.Namespace) -> int:
    with _open_project(args, args.project) as ann:
        store = ann.project.store
        was, source = store.label_of(args.id)
        annotator = args.annotator if args.annotator is not None else _default_annotator()
        ann.label(args.id, args.label, annotator=annotator)
        old = f"{store.classes[was]} ({source})" if was >= 0 else "no label"
        _out(f"{args.id}: {args.label} (was {old})")
    return EXIT_OK


def _add_undo(p: argparse.ArgumentParser) -> None:
    p.add_argument("project", help="project name")
    p.add_argument("--annotator", default=None, help="undo only this annotator's latest label")


def _run_undo(args: argparse.Namespace) -> int:
    with _open_project(args, args.project) as ann:
        res, _ = ann.undo(annotator=args.annotator)
        if res is None:
            _out("nothing to undo")
            return EXIT_OK
        now = f"{res.restored} ({res.restored_source})" if res.restored is not None else "no label"
        _out(f"undid {res.sample_id}: {res.label}; now {now}")
    return EXIT_OK


# -- samples -------------------------------------------------------------------------------------
def _add_samples(p: argparse.ArgumentParser) -> None:
    pass


def _run_samples(args: argparse.Namespace) -> int:
    from speler.data.samples import list_samples

    items = list_samples()
    if not items:
        _out("no bundled samples")
        return EXIT_OK
    width = max(len(i.name) for i in items)
    for k, info in enumerate(items):
        default = "  (default)" if k == 0 else ""
        _out(f"{info.name:<{width}}  {info.kind:<8}  {info.title}{default}",
             *textwrap.wrap(info.description, width=98, initial_indent=" " * (width + 2),
                            subsequent_indent=" " * (width + 2)))
    _out("", "import one with: python -m speler import --sample NAME --project PROJECT")
    return EXIT_OK


# -- rounds, propagation, suggestions -------------------------------------------------------------
class _StageProgress:
    """``progress(stage, done, total)`` for rounds: one tqdm bar per stage."""

    def __init__(self) -> None:
        self.stage: str | None = None
        self.bar = _Progress("")

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage != self.stage:
            self.bar.close()
            self.bar = _Progress(stage)
            self.stage = stage
        self.bar(done, total)

    def close(self) -> None:
        self.bar.close()


def _project_config(args: argparse.Namespace, project) -> Config:
    return apply_overrides(project.config, list(getattr(args, "set", []) or []))


def _add_round(p: argparse.ArgumentParser) -> None:
    p.add_argument("project", help="project name")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for this round, e.g. train.epochs=20 (repeatable)")


def _run_round(args: argparse.Namespace) -> int:
    if not dist.is_main():  # another rank of a torchrun: rank 0 runs the round with it, and prints
        from speler.loop import join_round

        join_round()
        return EXIT_OK
    with _open_project(args, args.project) as ann:
        project = ann.project
        cfg = _project_config(args, project)
        bar = _StageProgress()
        try:
            res = ann.run_round(config=cfg, progress=bar)
        finally:
            bar.close()
        m = res.metrics
        _out(f"round {res.round:03d} done in {res.seconds:.1f} s "
             f"({', '.join(f'{k} {v:.1f} s' for k, v in res.stage_seconds.items())})",
             f"labels from people {m.human_labels} (given here or imported), reliable "
             f"pseudo-labels {m.reliable} of {m.n}")
        j = m.judgement
        if j is not None:
            if m.train is None:
                said = f"not trained ({j.reason})"
            elif j.mode == "auto":  # the judgement's reason starts with its verdict
                said = j.reason
            else:  # a setting decided it: views.network is 'always'
                said = f"{'joins' if j.joined else 'stays out'} ({j.reason})"
            _out(f"network: {said}")
        q = m.quality.propagated if m.quality is not None else None
        if q is not None:
            _out(f"on held-out truth (unlabeled samples): accuracy {q.accuracy:.3f}, "
                 f"macro-F1 {q.macro_f1:.3f}, tail recall {q.tail_recall:.3f}")
        _print_suggestions(project, res.suggestions)
    return EXIT_OK


def _print_suggestions(project, suggestions) -> None:
    classes = project.data.classes
    rows = [(k + 1, s.id, f"{s.score:.3g}", classes[s.predicted] if s.predicted >= 0 else "-",
             s.reason) for k, s in enumerate(suggestions)]
    if not rows:
        _out("no suggestions: every sample has a human label")
        return
    _out("suggestions:", *_table(["#", "id", "score", "guess", "why"], rows))


def _add_suggest(p: argparse.ArgumentParser) -> None:
    from speler.selection import STRATEGIES

    p.add_argument("project", help="project name")
    p.add_argument("-n", type=_at_least(1), default=10,
                   help="how many suggestions (default 10): a batch chosen together, where a "
                        "sample next to one already chosen in the graph waits unless the batch "
                        "would be short, so not the first N of a longer list")
    p.add_argument("--strategy", default="speler", choices=list(STRATEGIES),
                   help="how to choose (default speler: low-energy boundary samples, rare classes "
                        "first; the others are baselines for comparison)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the strategies that draw at random (default 0)")


def _run_suggest(args: argparse.Namespace) -> int:
    with _open_project(args, args.project) as ann:
        if ann.latest_round() is None:  # no graph yet: the first labels (Annotator.first_labels)
            _out(f"no round yet in {args.project}: typical samples of the data's main groups, "
                 f"largest first, to give the first labels to (then run `round`)")
            _print_suggestions(ann.project, ann.first_labels(n=args.n))
            return EXIT_OK
        _print_suggestions(ann.project, ann.suggest(n=args.n, strategy=args.strategy,
                                                    seed=args.seed))
    return EXIT_OK


def _add_propagate(p: argparse.ArgumentParser) -> None:
    p.add_argument("project", help="project name")


def _run_propagate(args: argparse.Namespace) -> int:
    if not dist.is_main():  # another rank of a torchrun: the warm-started re-propagation is rank 0's
        return EXIT_OK
    with _open_project(args, args.project) as ann:
        # the live state re-propagates (warm-started from the round's solution) when the human
        # labels changed since; propagate() stores the propagated labels that differ from it
        state = ann.propagate()
        res, classes = state.result, ann.data.classes
        pred = np.bincount(res.labels, minlength=len(classes))
        human = np.bincount(state.human[state.human >= 0], minlength=len(classes))
        rel = np.bincount(res.labels[res.reliable], minlength=len(classes))
        views = " + ".join(f"{v} {w:.2f}" for v, w in state.weights.items())
        _out(f"propagation on round {state.round:03d}'s graph ({views}), up to date with "
             f"{int((state.human >= 0).sum())} human labels: the last solve took "
             f"{res.solve.iterations} conjugate-gradient iterations"
             f"{'' if res.solve.converged else ' (NOT converged)'}",
             *_table(["class", "human", "predicted", "reliable", "tau"],
                     [(c, human[i], pred[i], rel[i], f"{res.thresholds[i]:.2f}")
                      for i, c in enumerate(classes)]))
    return EXIT_OK


def _add_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("project", help="project name")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. train.epochs=20 (repeatable)")
    p.add_argument("--out", help="checkpoint path (default PROJECT/checkpoints/train-TIME.pt)")


def _run_train(args: argparse.Namespace) -> int:
    from speler.train import fit, save_checkpoint

    if dist.world_size() > 1:
        return _run_train_ranks(args)
    with _open_project(args, args.project) as ann:
        project = ann.project
        cfg = _project_config(args, project)
        human = _labels_to_train_on(project)
        with _Progress("epochs") as bar:
            res = fit(project.data, human, config=cfg.train, progress=bar)
        out = _checkpoint_path(args, project)
        save_checkpoint(out, res, config=cfg.train, ds=project.data)
        _print_trained(res, human, out)
    return EXIT_OK


def _labels_to_train_on(project) -> np.ndarray:
    """The project's human labels; LabelError naming the project when there are none."""
    human = project.store.human_labels()
    if not (human >= 0).any():
        raise LabelError(f"project {project.name}: no labels yet to train on; label a few "
                         "samples first")
    return human


def _run_train_ranks(args: argparse.Namespace) -> int:
    """``train`` under torchrun: rank 0 reads the project and its human labels and hands them to
    the others (``loop.share_inputs``), every rank trains (DDP), rank 0 alone saves and prints."""
    from speler.loop import RankInputs, share_inputs
    from speler.project import DATA_FILE
    from speler.train import fit, save_checkpoint

    main = dist.is_main()
    with _open_project(args, args.project) if main else contextlib.nullcontext() as ann:
        def read() -> RankInputs:
            project = ann.project
            return RankInputs(data=project.path / DATA_FILE, fingerprint=project.data.fingerprint(),
                              human=_labels_to_train_on(project),
                              config=_project_config(args, project))

        inputs = share_inputs(read)
        with dist.together("reading the data"):
            ds = ann.project.data if main else inputs.load_data()
        with _Progress("epochs") if main else contextlib.nullcontext() as bar:
            res = fit(ds, inputs.human, config=inputs.config.train, progress=bar)
        with dist.together("saving the checkpoint"):
            if main:
                out = _checkpoint_path(args, ann.project)
                save_checkpoint(out, res, config=inputs.config.train, ds=ds)
        if main:
            _print_trained(res, inputs.human, out)
    return EXIT_OK


def _checkpoint_path(args: argparse.Namespace, project) -> Path:
    import time as _time

    out = Path(args.out) if args.out else (
        project.path / "checkpoints" / f"train-{_time.strftime('%Y%m%d-%H%M%S')}.pt")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _print_trained(res, human: np.ndarray, out: Path) -> None:
    from speler.train import MIN_HOLDOUT

    if np.isfinite(res.best_metric):
        how = (f"best epoch {res.best_epoch} of {len(res.history)} by balanced accuracy "
               f"{res.best_metric:.3f} on held-out human labels")
    else:  # too few labels to hold some out (speler.train.MIN_HOLDOUT): no early stopping
        how = (f"all {len(res.history)} epochs (no early stopping: it needs at least "
               f"{MIN_HOLDOUT} held-out human labels)")
    _out(f"trained on {int((human >= 0).sum())} human labels in {res.seconds:.1f} s on "
         f"{res.device}; {how}",
         f"checkpoint: {out}")


# -- export / doubts --------------------------------------------------------------------------------
def _add_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("project", help="project name")
    p.add_argument("--format", default=None, choices=["csv", "json", "npz", "pyskl"],
                   help="file format (default: the one --out's extension names, .csv .json .npz "
                        "or .pkl; csv without --out)")
    p.add_argument("--out", help="output path (default PROJECT/exports/PROJECT-labels.<ext>)")


def _run_export(args: argparse.Namespace) -> int:
    with _open_project(args, args.project) as ann:
        path = ann.export(format=args.format, path=Path(args.out) if args.out else None)
        _out(f"wrote {path}")
    return EXIT_OK


def _add_doubts(p: argparse.ArgumentParser) -> None:
    p.add_argument("project", help="project name")
    p.add_argument("--top", type=_at_least(1), default=20,
                   help="how many doubtful human labels to list at most (default 20)")


def _run_doubts(args: argparse.Namespace) -> int:
    with _open_project(args, args.project) as ann:
        found = ann.doubts(top=args.top)
        if not found:
            _out("no doubts: the graph agrees with every human label")
            return EXIT_OK
        _out(*_table(["id", "human", "graph says", "score", "why"],
                     [(d.id, d.label_name, d.suggested_name, f"{d.score:.3f}", d.reason) for d in found]))
    return EXIT_OK


# -- simulate ---------------------------------------------------------------------------------------
def _add_simulate(p: argparse.ArgumentParser) -> None:
    from speler.selection import STRATEGIES

    source = p.add_mutually_exclusive_group(required=True)  # checked before any rank starts
    source.add_argument("path", nargs="?", help="fully labeled file or folder (or use --sample)")
    source.add_argument("--sample",
                        help="a bundled sample (already long-tailed and partially labeled)")
    p.add_argument("--format", help="force a reader: " + ", ".join(_reader_names()))
    p.add_argument("--imbalance", type=float, default=10.0,
                   help="protocol imbalance π for PATH (default 10)")
    p.add_argument("--labeled", type=float, default=0.1,
                   help="protocol labeled ratio γ for PATH (default 0.1)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the protocol split and of the random strategies (default 0)")
    p.add_argument("--rounds", type=_at_least(1), default=5,
                   help="rounds of simulated labeling (default 5)")
    p.add_argument("--budget", type=_at_least(1), default=10,
                   help="labels the simulated annotator gives per round (default 10)")
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES),
                   help="strategies to compare (default all)")
    p.add_argument("--retrain-every", type=_at_least(0), default=0,
                   help="retrain the model every K rounds (0: round-0 model throughout)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. views.network=never (repeatable)")
    p.add_argument("--out", help="write the curves as JSON here, and a Plotly HTML beside it")


def _run_simulate(args: argparse.Namespace) -> int:
    """Under torchrun every rank reads the data itself (a PATH must be on a filesystem every node
    sees) and runs the simulation (``speler.simulate``: it checks that the ranks' data agree);
    rank 0 alone prints and writes."""
    from speler.simulate import simulate

    cfg = apply_overrides(Config(), args.set)
    main = dist.is_main()
    with dist.together("reading the data"):
        ds, name = _simulation_data(args, cfg, show=main)
    with _Progress("simulating") if main else contextlib.nullcontext() as bar:
        res = simulate(ds, strategies=args.strategies, rounds=args.rounds, budget=args.budget,
                       seed=args.seed, config=cfg, retrain_every=args.retrain_every, name=name,
                       progress=bar)
    if main:
        rows = []
        for s, curve in sorted(res.curves.items(), key=lambda kv: -res.auc[kv[0]]):
            rows.append((s, f"{res.auc[s]:.4f}", f"{curve[0]['macro_f1']:.4f}",
                         f"{curve[-1]['macro_f1']:.4f}", f"{curve[-1]['accuracy']:.4f}",
                         f"{curve[-1]['tail_recall']:.4f}", curve[-1]["labels"]))
        _out(f"{name}: n={ds.n}, {ds.num_classes} classes, {int((ds.y >= 0).sum())} labels to "
             f"start, {args.rounds} rounds x {args.budget}",
             *_table(["strategy", "AUC macro-F1", "start", "final macro-F1", "final acc",
                      "tail recall", "labels"], rows))
    out = None
    with dist.together("writing the curves"):
        if main and args.out:
            from speler.annotator import write_simulation
            from speler.viz import curves_figure

            out = write_simulation(args.out, res, budget=args.budget)
            fig = curves_figure({s: ([c["labels"] for c in cv], [c["macro_f1"] for c in cv])
                                 for s, cv in res.curves.items()}, y_title="macro-F1")
            fig.write_html(out.with_suffix(".html"), include_plotlyjs="cdn")
    if out is not None:
        _out(f"wrote {out} and {out.with_suffix('.html')}")
    return EXIT_OK


def _simulation_data(args: argparse.Namespace, cfg: Config, *, show: bool) -> tuple:
    """(the preprocessed dataset, its name) from --sample or PATH (made long-tailed and partially
    labeled by the protocol); ``show``: draw the reading progress bar."""
    from speler.data.transforms import preprocess

    if args.sample:
        from speler.data.samples import load_sample

        ds, name = load_sample(args.sample), args.sample
    else:
        from speler.data.protocol import make_partial
        from speler.formats import read

        with _Progress("reading") if show else contextlib.nullcontext() as bar:
            ds = read(args.path, format=args.format, progress=bar)
        ds = make_partial(ds, imbalance=args.imbalance, labeled_ratio=args.labeled, seed=args.seed)
        name = Path(args.path).name
    return preprocess(ds, cfg.preprocess), name


# -- registry ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: list[Command] = [
    Command("import", "read data into a new project", _add_import, _run_import),
    Command("info", "show a project's classes, label counts, layout, shapes and rounds",
            _add_info, _run_info),
    Command("label", "give a sample a human label", _add_label, _run_label),
    Command("undo", "undo the latest human label", _add_undo, _run_undo),
    Command("samples", "list the bundled samples", _add_samples, _run_samples),
    Command("train", "train the backbone on the human labels and save a checkpoint",
            _add_train, _run_train),
    Command("round", "run one annotation round (train, embed, propagate, suggest)",
            _add_round, _run_round),
    Command("propagate", "re-run propagation with the current labels (no retraining)",
            _add_propagate, _run_propagate),
    Command("suggest", "list samples to label next", _add_suggest, _run_suggest),
    Command("export", "write the labels with provenance and reliability", _add_export, _run_export),
    Command("doubts", "human labels the graph strongly disagrees with", _add_doubts, _run_doubts),
    Command("simulate", "simulate annotation with every query strategy on labeled data",
            _add_simulate, _run_simulate),
]


RANK_COMMANDS = ("round", "train", "propagate", "simulate")  # those that run under torchrun


def _no_traceback_for_bad_input(record: logging.LogRecord) -> bool:
    """A logging filter: drops the record of a rank's failure when that is bad input (a
    SpelerError), which every rank then reports in one line; other failures keep their traceback."""
    return not (record.exc_info and isinstance(record.exc_info[1], SpelerError))


def _run_command(args: argparse.Namespace) -> int:
    """Run the sub-command. Under torchrun (``distributed.launched``): only ``RANK_COMMANDS``;
    join the process group, run the command on every rank inside one ``together`` stage (so a
    failure anywhere, even outside the library's own stages, fails every rank: every stage ends
    with the same exchange) and leave the group at the end."""
    if not dist.launched():
        return int(args._run(args))
    if args.command not in RANK_COMMANDS:
        raise _UsageError(f"{args.command} does not run under torchrun (only "
                          f"{', '.join(RANK_COMMANDS)} do); run it with python -m speler")
    if not args.verbose:  # bad input on a rank: the one error line says it (-v: the traceback)
        logging.getLogger("speler.distributed").addFilter(_no_traceback_for_bad_input)
    dist.init()
    try:
        stopped = None
        with dist.together(args.command):
            try:
                return int(args._run(args))
            except BrokenPipeError as exc:  # the reader stopped reading: no failure (see main)
                stopped = exc
        raise stopped
    finally:
        dist.destroy()


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m speler",
                     description="SpeLER: annotate skeleton and sensor sequences with spectral-"
                                 "balanced energy propagation.")
    root_help = "folder holding the projects (default $SPELER_HOME or ./annotations)"
    parser.add_argument("--root", default=None, help=root_help)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser.add_argument("--version", action="version", version=f"speler {__version__}")
    # the same two options after the command too (``info basic --root DIR``); SUPPRESS: a
    # sub-command without them keeps what was given before it
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--root", default=argparse.SUPPRESS, help=root_help)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log progress details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for cmd in COMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help, parents=[common])
        cmd.add(p)
        p.set_defaults(_run=cmd.run)
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each record (tests swap it)."""

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _setup_logging(verbose: bool) -> None:
    log = logging.getLogger("speler")
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        h = _StderrHandler()
        h.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        log.addHandler(h)
    log.setLevel(logging.INFO if verbose else logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    """Run one sub-command; returns the exit code (0 ok, 2 bad input, 130 interrupted)."""
    hook = sys.unraisablehook
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except _UsageError as exc:
            _err(f"{exc} (see --help)")
            return EXIT_ERROR
        except SystemExit as exc:  # --help, --version
            return int(exc.code or 0) if not isinstance(exc.code, str) else EXIT_ERROR
        _setup_logging(args.verbose)
        code = _run_command(args)
        sys.stdout.flush()  # here, so that a reader who stopped reading is handled below
        return code
    except _UsageError as exc:
        _err(f"{exc} (see --help)")
        return EXIT_ERROR
    except SpelerError as exc:
        if not (isinstance(exc, dist.RankFailedError) and os.environ.get("RANK", "0") != "0"):
            _err(str(exc))  # under torchrun rank 0 alone says that a rank failed
        return EXIT_ERROR
    except BrokenPipeError:
        # the reader stopped reading (`info x | head`): not an error; keep the interpreter from
        # complaining when it flushes stdout at exit
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):  # stdout without a file descriptor (tests)
            pass
        return EXIT_OK
    except OSError as exc:
        _err(f"{exc.filename}: {exc.strerror}" if exc.filename and exc.strerror else str(exc))
        return EXIT_ERROR
    except KeyboardInterrupt as exc:
        # The library says what an interruption left behind when it left anything (an overwrite
        # cut off while deleting the replaced project); otherwise it cleaned up.
        said = " ".join(str(a) for a in exc.args).strip()
        # Objects cut off mid-construction (a half-opened ZipFile, say) complain from __del__
        # when the traceback is dropped; the library already cleaned up, so keep that quiet.
        sys.unraisablehook = lambda unraisable: None
    try:
        gc.collect()
    finally:
        sys.unraisablehook = hook
    _err(f"interrupted; {said}" if said else "interrupted; nothing was half-written")
    return EXIT_INTERRUPTED

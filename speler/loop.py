"""One annotation round, and the instant updates between rounds: the only module that chains the others.

A round (``build_state``): label-free views (plain and random-kernel features, ``speler.features``)
→ a kNN graph each → the floor: their normalised affinities summed, propagated from the human
labels → the network trained on the human labels plus the floor's reliable pseudo-labels
(weighted by ω from propagation energy; the previous round's in later rounds), embedded → it joins
the graph only when cross-fitting says so (``judge``: networks trained without some human labels
must predict those better through the graph than the floor does) → spectral-balanced propagation
on the final graph → write propagated labels (with energy and margin) to the store → suggestions
→ ``rounds/NNN/``.

Crash safety: everything a round produces is written to ``rounds/.tmp-NNN`` first, renamed to
``rounds/NNN`` when complete, and only then are the round's propagated labels committed to the
store in one transaction that also marks the round done. A round is complete when both hold;
``_recover`` (run before every round) deletes the leftovers of a round that died half-way, so
the store and the previous round stay exactly as they were. Human labels are written by their own
transactions and never touched by a round.

Under torchrun (``python -m speler`` launched by ``torchrun``, more than one rank) rank 0 runs
``run_round`` and the other ranks ``join_round``: they share every stage (the views, kNN graphs
and propagations row-sharded by ``graph.sharded``, the training with DDP, the embedding sharded),
rank 0 alone holds the round's whole state and alone reads and writes the store, and it starts
writing only once every stage succeeded on every rank (``_run_round_ranks``).

Between rounds, ``read_state`` reads a finished round back and ``update_state`` re-runs only the
propagation for new human labels (warm-started conjugate gradient on the kept graph, no
retraining; the round's balance is kept until the new labels move a class's share past
``propagation.rebalance_tolerance``). Nothing here keeps state between calls or writes outside a round: the live state and
the writes that follow a label belong to ``speler.annotator.Annotator``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import scipy.sparse as sp

from speler import distributed as dist
from speler import selection
from speler.config import Config
from speler.data.schema import SequenceSet
from speler.embed_distributed import embed_sharded
from speler.errors import CancelledError, ConfigError, LabelError, ProjectError
from speler.features import label_free_views
from speler.graph import sharded
from speler.graph.knn import (
    KnnGraph, affinity, combine_affinities, strongest_neighbours,
)
from speler.graph.propagate import (
    PropagationResult, SolveInfo, balance_drift, propagate, with_system,
)
from speler.metrics import label_quality
from speler.project import DATA_FILE, Project
from speler.round_metrics import (
    FoldScore, JudgementMetrics, KnnMetrics, LabelQuality, PropagationMetrics, QualityMetrics,
    RoundMetrics, TrainMetrics,
)
from speler.pretrain import pretrain
from speler.train import Checkpoint, _check_init, fit, load_checkpoint, save_checkpoint

logger = logging.getLogger(__name__)

STAGES = ("views", "train", "embed", "knn", "propagate", "suggest")
StageProgress = Callable[[str, int, int], None]
NETWORK = "network"  # name of the trained network's view
PRETRAINED_FILE = "pretrained.pt"  # a round's self-supervised weights (train.pretrain_epochs)


@dataclass
class LoopState:
    """What the latest complete round left, kept in memory between labels.

    embeddings: {view: float32 (n, d)}: the label-free views (``plain``, ``rocket``), the trained
        network's (``network``, both branches) when one was trained, and ``combined`` (each view in
        the graph L2-normalised and scaled by √weight, concatenated: its cosine similarity is the
        weighted mean of the views'), which selection uses.
    probs: float32 (n, C), the network's softmax, or the propagation's normalised scores when no
        network was trained. graphs: kNN graph per view, and ``combined``: the strongest edges of
        the graph propagation ran on. weights: {view: weight} of the views in that graph (summing
        to 1). affinity: that graph, ``combine_affinities`` of the views' W (CSR (n, n)).
    result: the propagation on it; human: int64 (n,) human labels it reflects.
    """

    round: int
    embeddings: dict[str, np.ndarray]
    probs: np.ndarray
    graphs: dict[str, KnnGraph]
    weights: dict[str, float]
    affinity: sp.csr_matrix
    result: PropagationResult
    human: np.ndarray
    metrics: RoundMetrics | None = None  # the round's, as it saved them

    @property
    def model_predictions(self) -> np.ndarray:
        return self.probs.argmax(axis=1)


@dataclass
class Judgement:
    """Whether the network's graph joins the floor's, decided on human labels it never saw.

    folds: per fold, the balanced accuracy on that fold's held-out human labels of propagation
    from the other labels, on the floor and on floor + network (the network trained without the
    held-out labels). joined: the decision; reason: why, in words.
    """

    mode: str
    joined: bool
    reason: str
    held_out: int = 0
    floor: float = float("nan")
    with_network: float = float("nan")
    folds: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    curve: list[float] = field(default_factory=list)  # held-out balanced accuracy of the fold
    # networks' own predictions after each epoch, mean over the folds
    epochs: int | None = None  # epochs the final network trained for, chosen from ``curve``


@dataclass
class RoundResult:
    round: int
    metrics: RoundMetrics
    suggestions: list
    seconds: float
    stage_seconds: dict[str, float]
    state: LoopState


# --- rounds ------------------------------------------------------------------------------------

def run_round(
    project: Project,
    *,
    config: Config | None = None,
    progress: StageProgress | None = None,
    cancel: Callable[[], bool] | None = None,
) -> RoundResult:
    """Run one full round on ``project``; see the module docstring for what is written where.

    Under torchrun (more than one rank) this is rank 0's part and the other ranks run
    ``join_round`` beside it: see ``_run_round_ranks``.
    """
    cfg = config or project.config
    if dist.world_size() > 1:
        return _run_round_ranks(project, cfg, progress=progress, cancel=cancel)
    ds, human, previous = _round_inputs(project, cfg)
    store = project.store
    no = store.begin_round()
    started = time.perf_counter()

    def report(stage: str, done: int, total: int) -> None:
        if progress is not None:
            progress(stage, done, total)
        if cancel is not None and cancel():
            raise CancelledError(f"round {no} cancelled during {stage}; nothing was saved")

    tmp = project.begin_round_dir(no)
    try:
        init, pretrained = _start_weights(ds, _previous_checkpoint(project, previous),
                                          _previous_checkpoint(project, previous, PRETRAINED_FILE))
        built = build_state(ds, human, no=no, config=cfg, previous=previous, init=init,
                            pretrained=pretrained, report=report, cancel=cancel)
        metrics, suggestions = _write_round(project, tmp, no, built, ds=ds, human=human, cfg=cfg,
                                            started=started, report=report, cancel=cancel)
    except BaseException as exc:
        _abandon_round(project, no, tmp, exc)
        raise
    return RoundResult(
        round=no, metrics=metrics, suggestions=suggestions,
        seconds=time.perf_counter() - started, stage_seconds=built.stage_seconds,
        state=built.state,
    )


def _round_inputs(project: Project, cfg: Config) -> tuple:
    """(data, human labels, the previous round's state brought to them or None) for a new round,
    after removing what crashed rounds left (``_recover``); LabelError without human labels."""
    _recover(project)
    store = project.store
    ds = project.data
    last = latest_complete_round(project)
    previous = None if last is None else read_state(project, last)
    human = store.human_labels()
    if previous is not None and not np.array_equal(previous.human, human):
        # labels given since that round: its pseudo-labels come from the propagation of all of them
        previous = update_state(previous, human, num_classes=ds.num_classes, config=cfg)
    if not (human >= 0).any():
        raise LabelError(f"project {project.name}: no human labels yet; label a few samples first")
    return ds, human, previous


def _start_weights(ds, init: Path | None, pretrained: Path | None) -> tuple:
    """(the checkpoint a round warm-starts from, the self-supervised weights an earlier round
    kept), each loaded from its path with the dataset check; None where there is no path."""
    return tuple(None if p is None else load_checkpoint(p, ds) for p in (init, pretrained))


def _previous_checkpoint(project: Project, previous: LoopState | None,
                         name: str = "checkpoint.pt") -> Path | None:
    """The network the round starts from: the previous round's checkpoint, when it saved one
    (``name``: or the pre-trained weights it kept, ``PRETRAINED_FILE``)."""
    if previous is None:
        return None
    ckpt = project.round_dir(previous.round) / name
    return ckpt if ckpt.exists() else None


def _write_round(project: Project, tmp: Path, no: int, built: BuiltState, *, ds, human, cfg,
                 started: float, report: StageProgress, cancel) -> tuple:
    """Suggestions, then round ``no`` into ``tmp`` (checkpoint, state, metrics, config,
    suggestions), renamed to ``rounds/NNN`` and committed to the store; (metrics, suggestions)."""
    store = project.store
    state, fitted = built.state, built.fitted
    if fitted is not None:
        save_checkpoint(tmp / "checkpoint.pt", fitted, config=cfg.train, ds=ds,
                        extra={"round": no})
    if built.pretrained is not None:  # kept for the next rounds' trainings to start from
        save_checkpoint(tmp / PRETRAINED_FILE, built.pretrained.model, config=cfg.train, ds=ds,
                        extra={"round": no, "pretrained": True})
    _save_state(tmp, state)

    t0 = time.perf_counter()
    report("suggest", 0, 1)
    suggestions = suggest_for(state, human, ds, n=cfg.selection.batch,
                              strategy=cfg.selection.strategy, seed=0, config=cfg)
    built.stage_seconds["suggest"] = time.perf_counter() - t0
    report("suggest", 1, 1)

    metrics = dataclasses.replace(_round_metrics(ds, human, built),
                                  seconds=time.perf_counter() - started)
    state.metrics = metrics
    (tmp / "metrics.json").write_text(
        json.dumps(metrics.to_json(), indent=2, default=_json_default))
    (tmp / "config.json").write_text(cfg.to_json())
    (tmp / "suggestions.json").write_text(json.dumps(
        [s.__dict__ for s in suggestions], indent=2, default=_json_default))
    if cancel is not None and cancel():
        raise CancelledError(f"round {no} cancelled; nothing was saved")
    project.finish_round_dir(no)
    res = state.result
    store.write_round_propagation(
        no, res.labels, res.energy, res.margin, metrics=metrics.to_json(),
        config=cfg.to_dict(),
    )
    return metrics, suggestions


def _abandon_round(project: Project, no: int, tmp: Path, exc: BaseException) -> None:
    """Undo what round ``no`` wrote (its folders) and mark it failed in the store."""
    shutil.rmtree(tmp, ignore_errors=True)
    final = project.round_dir(no)
    if final.exists() and not _round_done(project, no):
        shutil.rmtree(final, ignore_errors=True)
    try:
        why = ("interrupted (Ctrl-C)" if isinstance(exc, KeyboardInterrupt)
               else f"{type(exc).__name__}: {exc}")
        project.store.fail_round(no, why)
    except Exception:  # the store may itself be the failure; recovery happens next time
        logger.exception("could not mark round %d failed", no)


# --- a round under torchrun ----------------------------------------------------------------------

@dataclass
class RankInputs:
    """What rank 0 of a torchrun reads from the project and hands to the other ranks, which never
    open the store: the data file (each rank reads it itself, so it must be on a filesystem every
    node sees) and its fingerprint, the human labels, the config; for a round also its number and
    the checkpoint it starts from."""

    data: Path
    fingerprint: str
    human: np.ndarray
    config: Config
    no: int | None = None
    init: Path | None = None
    pretrained: Path | None = None

    def load_data(self) -> SequenceSet:
        """The project's data as rank 0 has it; ProjectError when the file is another dataset."""
        ds = SequenceSet.load(self.data)
        if ds.fingerprint() != self.fingerprint:
            raise ProjectError(f"{self.data}: dataset fingerprint {ds.fingerprint()}, rank 0 read"
                               f" {self.fingerprint}")
        return ds


def share_inputs(read: Callable[[], RankInputs] | None) -> RankInputs:
    """``read()`` on rank 0 (the argument is ignored elsewhere), in a ``together`` stage so that its
    failure fails every rank, then broadcast: rank 0's RankInputs on every rank."""
    with dist.together("reading the project"):
        inputs = read() if dist.is_main() else None
    return dist.broadcast_object(inputs)


def _run_round_ranks(project: Project, cfg: Config, *, progress: StageProgress | None,
                     cancel) -> RoundResult:
    """``run_round`` on rank 0 of a torchrun, the other ranks running ``join_round`` beside it.

    Rank 0 alone reads and writes the store and the round folder. It reads the project and hands the
    others what they need (``share_inputs``), every rank runs ``build_state`` (every stage shared
    over the ranks, rank 0 finishing with the whole state), and only when every stage succeeded on
    every rank does rank 0 start the round in the store and write it as one process does
    (``_write_round``, the same crash-safe folder and commit). Every stage is a
    ``distributed.together`` stage: a failure on any rank raises the same RankFailedError on every
    rank, and before the writing it leaves the store and the rounds folder as they were. ``cancel``
    is refused: one rank stopping alone would leave the others waiting (Ctrl-C reaches every rank
    through torchrun).
    """
    if cancel is not None:
        raise ConfigError("run_round: cancel is not supported under torchrun; stop every rank"
                          " with Ctrl-C")
    ds = previous = None

    def read() -> RankInputs:
        nonlocal ds, previous
        ds, human, previous = _round_inputs(project, cfg)
        last = project.store.last_done_round()
        return RankInputs(data=project.path / DATA_FILE, fingerprint=ds.fingerprint(),
                          human=human, config=cfg, no=0 if last is None else last + 1,
                          init=_previous_checkpoint(project, previous),
                          pretrained=_previous_checkpoint(project, previous, PRETRAINED_FILE))

    inputs = share_inputs(read)
    started = time.perf_counter()
    report = progress or (lambda *_: None)
    ds, built = _build_on_ranks(inputs, ds, previous=previous, report=report)
    no, human = inputs.no, inputs.human
    with dist.together("writing the round"):
        begun = project.store.begin_round()
        if begun != no:  # another process finished a round meanwhile
            project.store.fail_round(begun, f"round {no} under torchrun was overtaken")
            raise ProjectError(f"project {project.name}: a round finished while round {no} ran"
                               f" under torchrun; run it again")
        tmp = project.begin_round_dir(no)
        try:
            metrics, suggestions = _write_round(project, tmp, no, built, ds=ds, human=human,
                                                cfg=cfg, started=started, report=report,
                                                cancel=None)
        except BaseException as exc:
            _abandon_round(project, no, tmp, exc)
            raise
    return RoundResult(
        round=no, metrics=metrics, suggestions=suggestions,
        seconds=time.perf_counter() - started, stage_seconds=built.stage_seconds,
        state=built.state,
    )


def join_round() -> BuiltState:
    """A rank other than 0 of a torchrun round, while rank 0 runs ``run_round``: it gets the
    round's inputs from rank 0, shares every stage of ``build_state`` with it and writes nothing.
    Returns its BuiltState (the final network in ``fitted``; no state: the round is rank 0's)."""
    inputs = share_inputs(None)
    _, built = _build_on_ranks(inputs, None)
    with dist.together("writing the round"):
        pass  # rank 0 writes; its failure there is this rank's too
    return built


def _build_on_ranks(inputs: RankInputs, ds, *, previous: LoopState | None = None,
                    report: StageProgress | None = None) -> tuple:
    """(data, ``build_state``) on every rank: the ranks other than 0 (``ds`` None) read the data,
    every rank the checkpoint the round starts from, then all build the round together."""
    with dist.together("reading the data"):
        ds = inputs.load_data() if ds is None else ds
        init, pretrained = _start_weights(ds, inputs.init, inputs.pretrained)
    return ds, build_state(ds, inputs.human, no=inputs.no, config=inputs.config,
                           previous=previous, init=init, pretrained=pretrained, report=report)


@dataclass
class BuiltState:
    """What ``build_state`` made: the state, the final network (None when none was trained), the
    floor's propagation, the judgement, seconds per stage, and the self-supervised weights the
    trainings started from (a ``Checkpoint``; None without ``train.pretrain_epochs``)."""

    state: LoopState
    fitted: object
    floor: PropagationResult
    judgement: Judgement
    stage_seconds: dict[str, float]
    pretrained: object = None


def build_state(
    ds, human: np.ndarray, *, no: int, config: Config, previous: LoopState | None = None,
    init=None, views: dict[str, np.ndarray] | None = None,
    report: StageProgress | None = None, cancel: Callable[[], bool] | None = None,
    pretrained=None,
) -> BuiltState:
    """Everything a round computes before suggestions, in memory (rounds and simulations share it).

    1. label-free views → kNN graph each → the floor: their normalised affinities summed with
       ``views.plain_weight`` / ``rocket_weight`` / ``rocket_diff_weight``, propagated from the
       human labels;
    2. unless ``views.network`` is "never", or "auto" with too few labels to judge it (then it
       could never join, and is not trained): the network is trained on the human labels plus the
       reliable, energy-weighted pseudo-labels of the floor (of ``previous``'s result in later
       rounds: the paper's loop), warm-started from ``init``, and embedded; with
       ``train.pretrain_epochs`` every training (the folds' too) starts from self-supervised
       weights: ``pretrained`` (a Checkpoint, kept by an earlier round) or pre-trained here;
    3. it joins the graph (weight ``views.network_weight``) when ``judge`` says it helps ("auto")
       or always ("always"); the final propagation runs on that graph.
    ``views``: precomputed label-free views (same samples), else computed here.

    Under torchrun every rank calls it with the same ``ds``, ``human``, ``config`` and ``init``
    (``previous`` and ``report`` count on rank 0 only; ``views``, when given, are this rank's rows
    of them, as ``floor_views`` returns them): every stage is shared, the views, kNN graphs,
    combinations and propagations row-sharded (``graph.sharded``), the trainings with DDP, the
    embeddings sharded; rank 0 finishes each propagation, judges, hands each training its
    pseudo-labels and alone gets the whole state. The other ranks return the final network only
    (``state`` and ``floor`` None).
    """
    vc, gc = config.views, config.graph
    stage_seconds: dict[str, float] = {}
    report = report or (lambda *_: None)
    C = ds.num_classes
    main = dist.is_main()  # one process: always; under torchrun the round's state is rank 0's

    t0 = time.perf_counter()
    if views is None:
        views = floor_views(ds, config, progress=lambda d, t: report("views", d, t))
    with dist.together("views"):
        wanted = floor_weights(config, views)
    embeddings = {v: sharded.whole_rows(e) for v, e in views.items()}  # None on ranks but 0
    stage_seconds["views"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    graphs = {v: sharded.knn(views[v], gc) for v in wanted}
    floor_parts = [(sharded.affinity_of(graphs[v], gamma=gc.gamma), w) for v, w in wanted.items()]
    floor_W = sharded.combine(floor_parts)
    knn_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    floor = sharded.propagate_on(floor_W, human, num_classes=C, config=config.propagation)
    propagate_seconds = time.perf_counter() - t0

    fitted = start = None
    probs = None if floor is None else floor.normalized
    judgement = Judgement(mode=vc.network, joined=False, reason="views.network is 'never'")
    weights = dict(wanted)
    W = floor_W
    folds = _judge_folds(human, vc) if vc.network == "auto" else []
    if vc.network == "auto" and not folds:
        # it could not earn its place, so it is not trained: the round is the floor, in seconds
        judgement = judge([], floor_parts, human, num_classes=C, config=config)
    elif vc.network != "never":
        t0 = time.perf_counter()
        epochs = config.train.epochs
        if config.train.pretrain_epochs > 0 and pretrained is not None \
                and _check_init(pretrained, ds, config.train):
            start = pretrained.model
        pre_epochs = config.train.pretrain_epochs if start is None else 0
        total = pre_epochs + epochs * (len(folds) + 1)
        done = [0]

        def train_progress(e: int, _total: int) -> None:
            report("train", min(total, done[0] + e), total)

        report("train", 0, total)
        if pre_epochs:  # every rank the same weights: same seed, same data (DDP then syncs them)
            start = pretrain(ds, config=config.train, progress=train_progress,
                             cancel=cancel).model
            done[0] += pre_epochs
            pretrained = Checkpoint(model=start, config=config.train, classes=tuple(ds.classes),
                                    layout_name=ds.layout.name, fingerprint=ds.fingerprint(),
                                    extra={})
        fold_nets = []
        curves = []
        for held in folds:
            human_a = human.copy()
            human_a[held] = -1
            floor_a = sharded.propagate_on(floor_W, human_a, num_classes=C,
                                           config=config.propagation)  # rank 0's
            pl, pw = _shared_pseudo_labels(floor_a, human_a)
            net = fit(ds, human, config=config.train, pseudo_labels=pl, pseudo_weights=pw,
                      holdout=held, progress=train_progress, cancel=cancel, start=start)
            done[0] += epochs
            curves.append([row["holdout_acc"] for row in net.history])
            emb = embed_sharded(net.model, ds, to="rows")
            fold_nets.append((held, human_a, floor_a, _network_view(emb)))
        pl, pw = _shared_pseudo_labels(
            previous.result if main and previous is not None else floor, human)
        train_cfg, chosen = config.train, None
        if curves and vc.judge_epochs:
            chosen, _ = crossfit_epochs(curves, minimum=config.train.supervised_epochs + 1)
            train_cfg = dataclasses.replace(train_cfg, epochs=chosen)
        fitted = fit(ds, human, config=train_cfg, pseudo_labels=pl, pseudo_weights=pw,
                     init=init, progress=train_progress, cancel=cancel, start=start)
        if curves:
            # the network's own held-out figure: mean over the folds at the epoch it trained to
            at = min(len(fitted.history), len(curves[0])) - 1 if chosen is None else chosen - 1
            fitted.best_epoch, fitted.best_metric = at + 1, float(np.mean([c[at] for c in curves]))
        report("train", total, total)
        stage_seconds["train"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        report("embed", 0, ds.n)
        emb = embed_sharded(fitted.model, ds, to="rows",
                            progress=lambda d, t: report("embed", d, t))
        net_view = _network_view(emb)
        embeddings[NETWORK] = sharded.whole_rows(net_view)
        probs = sharded.whole_rows(emb.probs)
        stage_seconds["embed"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        report("knn", 0, 1)
        judgement = judge(fold_nets, floor_parts, human, num_classes=C, config=config) \
            if vc.network == "auto" \
            else Judgement(mode="always", joined=True, reason="views.network is 'always'")
        if judgement.joined:
            graphs[NETWORK] = sharded.knn(net_view, gc)
            net_W = sharded.affinity_of(graphs[NETWORK], gamma=gc.gamma)
            W = with_network(floor_parts, net_W, vc.network_weight)
            weights = {v: w * (1 - vc.network_weight) for v, w in weights.items()}
            weights[NETWORK] = vc.network_weight
        judgement.seconds = time.perf_counter() - t0
        if curves:
            judgement.curve = np.mean(np.asarray(curves), axis=0).tolist()
            judgement.epochs = chosen
        knn_seconds += judgement.seconds
    report("knn", 1, 1)
    stage_seconds["knn"] = knn_seconds

    t0 = time.perf_counter()
    report("propagate", 0, 1)
    result = floor if W is floor_W else sharded.propagate_on(W, human, num_classes=C,
                                                             config=config.propagation)
    whole_W = sharded.whole_matrix(W)
    graphs = {v: sharded.whole_graph(g) for v, g in graphs.items()}
    report("propagate", 1, 1)
    stage_seconds["propagate"] = propagate_seconds + time.perf_counter() - t0
    # the weights pre-trained here or given, handed on even by a round that trained nothing
    kept = pretrained if config.train.pretrain_epochs > 0 else None
    state = None
    with dist.together("the round's state"):
        if main:
            result = with_system(result, whole_W, config.propagation)
            embeddings["combined"] = _combined_embedding(embeddings, weights)
            graphs["combined"] = strongest_neighbours(whole_W, gc.k)
            state = LoopState(round=no, embeddings=embeddings,
                              probs=np.asarray(probs, dtype=np.float32), graphs=graphs,
                              weights=weights, affinity=whole_W, result=result,
                              human=human.copy())
    # rank 0 holds the round's state; the other ranks shared its work and get the network only
    return BuiltState(state=state, fitted=fitted, floor=floor if main else None,
                      judgement=judgement, stage_seconds=stage_seconds, pretrained=kept)


def _shared_pseudo_labels(result: PropagationResult | None,
                          human: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``pseudo_labels(result, human)`` from rank 0's result, on every rank (one process: as is)."""
    shared = None
    with dist.together("pseudo-labels"):
        if dist.is_main():
            shared = pseudo_labels(result, human)
    return dist.broadcast_object(shared)


def floor_views(ds, config: Config, *,
                progress: Callable[[int, int], None] | None = None) -> dict[str, np.ndarray]:
    """The label-free views the floor uses (``views.floor_weights``) of ``ds``; label-free, so a
    simulation or a benchmark computes them once for many label sets. Under torchrun: this rank's
    rows of them (``graph.sharded``), every rank computing its share."""
    vc = config.views
    settings = dict(views=tuple(vc.floor_weights), dim=vc.dim,
                    rocket_features=vc.rocket_features, seed=vc.seed, progress=progress)
    if sharded.active():  # this rank's rows
        from speler.views_distributed import label_free_views_sharded

        return label_free_views_sharded(ds.x, **settings)
    return label_free_views(ds.x, **settings)


def floor_weights(config: Config, views: dict[str, np.ndarray]) -> dict[str, float]:
    """{view: share of the floor} over the views of ``views.floor_weights`` that ``views`` holds
    (a view can be left out, e.g. differences of single-frame samples), summing to 1."""
    wanted = {v: w for v, w in config.views.floor_weights.items() if v in views}
    if not wanted:
        raise LabelError(f"no label-free view to build the floor from: the config asks for "
                         f"{', '.join(config.views.floor_weights)}, the data gave "
                         f"{', '.join(views) or 'none'}")
    total = sum(wanted.values())
    return {v: w / total for v, w in wanted.items()}


def crossfit_epochs(curves: list[list[float]], *, minimum: int = 1) -> tuple[int, float]:
    """(epochs, score): the epoch count whose held-out balanced accuracy, averaged over the folds'
    learning curves and smoothed over 3 epochs, is highest (the latest of equals: training longer
    is the default), at least ``minimum``; score is that smoothed mean."""
    mean = np.mean(np.asarray(curves, dtype=np.float64), axis=0)
    smooth = np.convolve(np.pad(mean, 1, mode="edge"), np.ones(3) / 3, mode="valid")
    lo = min(max(1, minimum), len(smooth)) - 1
    best = lo + int(np.flatnonzero(smooth[lo:] >= smooth[lo:].max() - 1e-12)[-1])
    return best + 1, float(smooth[best])


def _network_view(emb) -> np.ndarray:
    """Both branches' embeddings, each L2-normalised, side by side: one view of the network."""
    parts = [e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
             for e in (emb.time, emb.freq)]
    return np.concatenate(parts, axis=1).astype(np.float32)


def _combined_embedding(embeddings: dict[str, np.ndarray], weights: dict[str, float]) -> np.ndarray:
    parts = [np.sqrt(w) * embeddings[v] / np.maximum(
        np.linalg.norm(embeddings[v], axis=1, keepdims=True), 1e-12) for v, w in weights.items()]
    return np.concatenate(parts, axis=1).astype(np.float32)


def _judge_folds(human: np.ndarray, vc) -> list[np.ndarray]:
    """Held-out human labels per fold: the labels of each class with at least two are dealt
    round-robin (in a seeded random order) over ``judge_folds`` folds, so every class keeps at
    least one label in training; a class with a single label is never held out. No folds when
    fewer than ``judge_min_labels`` labels could be held out or they cover fewer than 2 classes."""
    rng = np.random.default_rng(vc.seed)
    k = vc.judge_folds
    assign = np.full(len(human), -1)
    classes_held = 0
    for c in np.unique(human[human >= 0]):
        idx = rng.permutation(np.flatnonzero(human == c))
        if len(idx) < 2:
            continue
        classes_held += 1
        offset = int(rng.integers(k))
        assign[idx] = (np.arange(len(idx)) + offset) % k
    held = int((assign >= 0).sum())
    if held < vc.judge_min_labels or classes_held < 2:
        return []
    return [np.flatnonzero(assign == f) for f in range(k) if (assign == f).any()]


def with_network(floor_parts: list, net_W: sp.csr_matrix, weight: float) -> sp.csr_matrix:
    """The graph with the network: every view's normalised affinity once, the floor's views at
    (1 - weight) times their floor weights, the network's at ``weight`` (the same combination
    ``read_state`` rebuilds from the saved weights). Under torchrun: this rank's rows of it."""
    return sharded.combine([(W, w * (1 - weight)) for W, w in floor_parts] + [(net_W, weight)])


def judge(fold_nets: list, floor_parts: list, human: np.ndarray, *, num_classes: int,
          config: Config) -> Judgement:
    """Does adding the network's graph to the floor help? ``fold_nets``: per fold (held-out
    indices, the fold's training labels, the floor's propagation of them, the view of a network
    trained without the held-out labels). Per fold, propagate the training labels on floor +
    network as well, and score both graphs by balanced accuracy (mean recall over classes) on the
    held-out human labels, pooled over the folds: the network joins when it scores at least as
    high and is worse in no fold. A tie joins: the held-out labels often cannot tell the two
    graphs apart, and where they could not (benchmarks/round_quality.py, π = 10, γ = 30 %: 3 ties
    in 20 judged runs on 4 sets) the network added 1 to 10 points of macro-F1; what the labels
    can see is harm, and any sign of it keeps the network out. With no folds (fewer than
    ``views.judge_min_labels`` held-out labels, where the verdict was worse than none: see
    ViewsConfig) it stays out. Under torchrun every rank calls it (the views and
    ``floor_parts`` this rank's rows, the fold results rank 0's), rank 0 scores and every rank
    gets its Judgement."""
    vc = config.views
    if not fold_nets:
        return Judgement(mode="auto", joined=False,
                         reason=f"too few human labels to judge the network (fewer than "
                                f"{vc.judge_min_labels} could be held out from at least 2 classes)")
    scored = []
    for held, human_a, floor_a, view in fold_nets:
        W_net = sharded.affinity_of(sharded.knn(view, config.graph), gamma=config.graph.gamma)
        W = with_network(floor_parts, W_net, vc.network_weight)
        with_net = sharded.propagate_on(W, human_a, num_classes=num_classes,
                                        config=config.propagation)  # rank 0's
        scored.append((held, floor_a, with_net))
    verdict = None
    with dist.together("judgement"):
        if dist.is_main():
            verdict = _verdict(scored, human)
    return dist.broadcast_object(verdict)


def _verdict(scored: list, human: np.ndarray) -> Judgement:
    """``judge``'s scores and decision from (held-out indices, floor result, floor + network
    result) per fold."""
    folds, truth, pred_floor, pred_net = [], [], [], []
    for held, floor_a, with_net in scored:
        t, f, g = human[held], floor_a.labels[held], with_net.labels[held]
        folds.append({"held_out": int(len(held)), "floor": _balanced_accuracy(t, f),
                      "with_network": _balanced_accuracy(t, g)})
        truth.append(t)
        pred_floor.append(f)
        pred_net.append(g)
    t = np.concatenate(truth)
    floor_score = _balanced_accuracy(t, np.concatenate(pred_floor))
    net_score = _balanced_accuracy(t, np.concatenate(pred_net))
    lost = [i + 1 for i, f in enumerate(folds) if f["with_network"] < f["floor"]]
    joined = net_score >= floor_score and not lost
    reason = (f"{'joins' if joined else 'stays out'}: balanced accuracy on {len(t)} held-out human "
              f"labels {net_score:.3f} with the network vs {floor_score:.3f} on the floor alone"
              + (f"; worse in fold {', '.join(map(str, lost))}" if lost else "")
              + ("; a tie: the held-out labels see no harm" if joined and net_score == floor_score
                 else ""))
    return Judgement(mode="auto", joined=joined, reason=reason, held_out=int(len(t)),
                     floor=floor_score, with_network=net_score, folds=folds)


def _balanced_accuracy(truth: np.ndarray, pred: np.ndarray) -> float:
    return float(np.mean([np.mean(pred[truth == c] == c) for c in np.unique(truth)]))


def pseudo_labels(result: PropagationResult, human: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reliable propagated labels of unlabeled samples and their ω (0 for everything else)."""
    use = result.reliable & (human < 0)
    pseudo = np.where(use, result.labels, -1).astype(np.int64)
    weights = np.where(use, result.weights, 0.0).astype(np.float32)
    return pseudo, weights


def _round_metrics(ds, human, built: BuiltState) -> RoundMetrics:
    """What the round measured (its ``seconds`` are set by ``run_round``, which times it all)."""
    state, fitted, j = built.state, built.fitted, built.judgement
    res = state.result
    counts = np.bincount(human[human >= 0], minlength=ds.num_classes)
    quality = None
    if ds.y_true is not None:
        unlabeled = human < 0

        def q(pred: np.ndarray) -> LabelQuality:
            return LabelQuality.from_json(label_quality(ds.y_true, pred, num_classes=ds.num_classes,
                                                        mask=unlabeled))

        quality = QualityMetrics(
            propagated=q(res.labels), floor=q(built.floor.labels),
            model=None if fitted is None else q(state.model_predictions))
    return RoundMetrics(
        round=state.round,
        n=ds.n,
        human_labels=int((human >= 0).sum()),
        human_per_class=dict(zip(ds.classes, counts.tolist())),
        predicted_per_class=dict(zip(ds.classes, np.bincount(res.labels, minlength=ds.num_classes).tolist())),
        reliable=int(res.reliable.sum()),
        stage_seconds=dict(built.stage_seconds),
        views=dict(state.weights),
        judgement=JudgementMetrics(
            mode=j.mode, joined=j.joined, reason=j.reason, held_out=j.held_out, floor=j.floor,
            with_network=j.with_network,
            folds=tuple(FoldScore.from_json(f) for f in j.folds), seconds=j.seconds,
            curve=tuple(j.curve), epochs=j.epochs),
        train=None if fitted is None else TrainMetrics(
            best_epoch=fitted.best_epoch, best_metric=fitted.best_metric, device=fitted.device,
            seconds=fitted.seconds, epochs=len(fitted.history), warm_started=fitted.warm_started),
        propagation=PropagationMetrics(iterations=res.solve.iterations,
                                       converged=bool(res.solve.converged),
                                       residual=float(res.solve.residual)),
        knn={v: KnnMetrics(method=g.method, recall=g.recall, k=int(g.indices.shape[1]))
             for v, g in state.graphs.items() if v != "combined"},
        quality=quality,
    )


def _save_state(folder: Path, state: LoopState) -> None:
    """embeddings.npz (every view and probs) and propagation.npz (the result's array and number
    fields, the human labels, each view's kNN lists and weight in the graph). The fields of the
    result's ``solve`` are stored flat, under their own names (``combined.iterations``, ...), as
    before they moved into ``SolveInfo``."""
    np.savez(folder / "embeddings.npz", probs=state.probs,
             **{f"view.{v}": e for v, e in state.embeddings.items() if v != "combined"})
    arrays = {"human": state.human}
    for obj in (state.result, state.result.solve):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            # arrays and plain numbers only: unset optional fields and in-memory bookkeeping
            # (e.g. the solved system's fingerprint, the ``solve`` object itself) are not
            # stored, so no object arrays
            if isinstance(value, (np.ndarray, np.generic, int, float, bool)):
                arrays[f"combined.{f.name}"] = np.asarray(value)
    for v, w in state.weights.items():
        arrays[f"{v}.weight"] = np.asarray(w)
        arrays[f"{v}.knn_indices"] = state.graphs[v].indices
        arrays[f"{v}.knn_sims"] = state.graphs[v].sims
    np.savez(folder / "propagation.npz", **arrays)


def _load_result(z, name: str) -> PropagationResult:
    """The result saved by ``_save_state``; the ``solve`` fields are stored flat (the names the
    result's own fields had before ``SolveInfo``), so rounds of any version load."""
    def values(cls, skip=()):
        out = {}
        for f in dataclasses.fields(cls):
            key = f"{name}.{f.name}"
            if f.name in skip or key not in z.files:
                continue
            v = z[key]
            out[f.name] = v.item() if v.ndim == 0 else v
        return out

    return PropagationResult(**values(PropagationResult, skip=("solve",)),
                             solve=SolveInfo(**values(SolveInfo)))


# --- state between rounds ------------------------------------------------------------------------

def _round_done(project: Project, no: int) -> bool:
    return any(r.no == no and r.status == "done" for r in project.store.rounds())


def _recover(project: Project) -> None:
    """Remove leftovers of rounds that did not finish: temp folders and folders never committed."""
    done = {r.no for r in project.store.rounds() if r.status == "done"}
    if not project.rounds_dir.exists():
        return
    for path in project.rounds_dir.iterdir():
        if path.name.startswith(".tmp-"):
            shutil.rmtree(path, ignore_errors=True)
        elif path.is_dir() and path.name.isdigit() and int(path.name) not in done:
            logger.warning("removing %s: its round never finished", path)
            shutil.rmtree(path, ignore_errors=True)
    for r in project.store.rounds():
        if r.status == "running":
            project.store.fail_round(r.no, "interrupted")


def latest_complete_round(project: Project) -> int | None:
    """The latest finished round (``Project.latest_round``: done in the store, complete on disk)."""
    return project.latest_round()


def read_state(project: Project, no: int) -> LoopState | None:
    """Round ``no``'s state as the round left it (its human labels, its propagation), read from
    its folder; nothing is written. None for round files of an older version (no views)."""
    d = project.round_dir(no)
    cfg = Config.load(d / "config.json")
    with np.load(d / "embeddings.npz") as z:
        embeddings = {f[len("view."):]: z[f] for f in z.files if f.startswith("view.")}
        probs = z["probs"]
    with np.load(d / "propagation.npz") as z:
        result = _load_result(z, "combined")
        human = z["human"]
        weights = {f[:-len(".weight")]: float(z[f]) for f in z.files if f.endswith(".weight")}
        graphs = {
            v: KnnGraph(indices=z[f"{v}.knn_indices"], sims=z[f"{v}.knn_sims"], method="saved",
                        recall=None, seconds=0.0)
            for v in weights
        }
    if not weights or any(v not in embeddings for v in weights):
        # written before rounds had views: nothing to re-propagate on; the next round starts over
        logger.warning("%s: round files of an older SpeLER version (no views); run a new round", d)
        return None
    W = combine_affinities([(affinity(graphs[v], gamma=cfg.graph.gamma), w)
                            for v, w in weights.items()])
    embeddings["combined"] = _combined_embedding(embeddings, weights)
    graphs["combined"] = strongest_neighbours(W, cfg.graph.k)
    metrics = RoundMetrics.from_json(json.loads((d / "metrics.json").read_text()))
    return LoopState(
        round=no, embeddings=embeddings, probs=probs, graphs=graphs, weights=weights, affinity=W,
        result=result, human=human, metrics=metrics,
    )


def update_state(state: LoopState, human: np.ndarray, *, num_classes: int, config: Config) -> LoopState:
    """A new state with propagation re-run for ``human`` labels on the state's graph, warm-started
    from its result. Its prior and balance weights are kept (only the classes whose seeds changed
    are solved again) while no class's p_c moves by more than ``rebalance_tolerance``; past that
    the balance is made again for ``human`` from the result's scores (every class solved again).

    Keeping it after the first labels of a rare class boosts that class as if it had fewer, and
    the live labels drift from what the next round's propagation of the same labels gives: after
    1, 2 or 5 random labels on the five real sets (π = 10, γ = 5 %, 5 seeds, the floor graph)
    1.9 % of the unlabeled samples disagreed with a fresh propagation kept, 0.12 % re-balanced.
    benchmarks/round_quality.py --simulate (network off, 5 seeds), area under the macro-F1 curve
    kept → re-balanced past 0.1: π = 10, γ = 5 %: 0.691 → 0.703 with SpeLER's suggestions (15
    runs of 25 better, 10 worse; BasicMotions 0.901 → 0.886), 0.636 → 0.651 with random ones; at
    π = 50, γ = 10 %: 0.722 → 0.728 and 0.718 → 0.716, within the seeds' noise (0.25, or every
    label, scored about the same in a scratch run). On 200k samples, 60 classes, one label
    re-propagates in 0.9 s kept and 2.9 s re-balanced (2 cores; a full propagation 5.5 s)."""
    pcfg = config.propagation
    warm: PropagationResult | np.ndarray = state.result
    if balance_drift(state.result, human, pcfg) > pcfg.rebalance_tolerance:
        warm = state.result.scores
    result = propagate(state.affinity, human, num_classes=num_classes, config=pcfg,
                       warm_start=warm)
    return dataclasses.replace(state, result=result, human=human.copy())


def suggest_for(state: LoopState, human: np.ndarray, ds, *, n: int, strategy: str, seed: int,
                config: Config) -> list:
    """Suggestions from an in-memory state and human labels (used by rounds and simulations)."""
    return selection.suggest(
        strategy, propagation=state.result, embeddings=state.embeddings["combined"],
        labeled=human >= 0, budget=n, seed=seed, probs=state.probs, graph=state.graphs["combined"],
        classes=ds.classes, ids=ds.ids.tolist(),
        human_counts=np.bincount(human[human >= 0], minlength=ds.num_classes),
        config=config.selection,
    )


def doubts(project: Project, state: LoopState, *, top: int = 20) -> list:
    """Human labels the graph strongly disagrees with (see speler.export.doubts)."""
    from speler.export import doubts as _doubts

    # read each human label's support from its neighbours' scores in the graph, so a sample's own
    # seed does not outvote them
    return _doubts(project, state.result, top=top, affinity=state.affinity)


def neighbours(state: LoopState, index: int, *, k: int = 3, view: str = "combined",
               first_of: tuple[int, ...] = ()) -> list[int]:
    """Up to ``k`` nearest human-labeled samples of sample ``index`` by embedding similarity,
    nearest first; with ``first_of`` (classes, e.g. the guess and the runner-up), the nearest
    labeled sample of each of those classes comes first, in that order (a class without a label
    is passed over), so the person can compare the sample with an example of each candidate."""
    labeled = np.flatnonzero(state.human >= 0)
    labeled = labeled[labeled != index]
    if len(labeled) == 0:
        return []
    emb = state.embeddings[view]
    q = emb[index] / (np.linalg.norm(emb[index]) + 1e-12)
    e = emb[labeled] / (np.linalg.norm(emb[labeled], axis=1, keepdims=True) + 1e-12)
    ranked = labeled[np.argsort(-(e @ q), kind="stable")]
    picked: list[int] = []
    for c in first_of:
        of_c = ranked[state.human[ranked] == c]
        if len(of_c) and len(picked) < k and int(of_c[0]) not in picked:
            picked.append(int(of_c[0]))
    picked += [int(j) for j in ranked if int(j) not in picked][:k - len(picked)]
    return picked


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)

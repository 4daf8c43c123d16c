"""One annotation round, and the instant updates between rounds: the only module that chains the others.

A round: train the backbone on human labels plus the previous round's reliable pseudo-labels
(weighted by ω from propagation energy) → embed every sample (time and frequency branch) → kNN
graph per branch → spectral-balanced propagation per branch → combine → write propagated labels
(with energy and margin) to the store → suggestions → ``rounds/NNN/``.

Crash safety: everything a round produces is written to ``rounds/.tmp-NNN`` first, renamed to
``rounds/NNN`` when complete, and only then are the round's propagated labels committed to the
store in one transaction that also marks the round done. A round is complete when both hold;
``_recover`` (run before every round and when state is loaded) deletes the leftovers of a round
that died half-way, so the store and the previous round stay exactly as they were. Human labels
are written by their own transactions and never touched by a round.

Between rounds, ``label``/``undo`` write the human event and re-run propagation only (warm-started
conjugate gradient on the kept graphs, no retraining); propagated labels that changed are appended
to the store so exports always show the live state.
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

from speler import selection
from speler.config import Config
from speler.errors import CancelledError, LabelError, ProjectError
from speler.graph.knn import KnnGraph, affinity, build_knn
from speler.graph.propagate import PropagationResult, combine, propagate
from speler.metrics import label_quality
from speler.project import Project
from speler.train import embed, fit, load_checkpoint, save_checkpoint

logger = logging.getLogger(__name__)

STAGES = ("train", "embed", "knn", "propagate", "suggest")
BRANCHES = ("time", "freq")
StageProgress = Callable[[str, int, int], None]


@dataclass
class LoopState:
    """What the latest complete round left, kept in memory between labels.

    embeddings: {"time": float32 (n, d_t), "freq": float32 (n, d_f)}; probs: float32 (n, C) model
    softmax; graphs: kNN graph per branch; affinities: W per branch (CSR); branch_results: the
    propagation per branch; result: their combination; human: int64 (n,) human labels it reflects.
    """

    round: int
    embeddings: dict[str, np.ndarray]
    probs: np.ndarray
    graphs: dict[str, KnnGraph]
    affinities: dict[str, sp.csr_matrix]
    branch_results: dict[str, PropagationResult]
    result: PropagationResult
    human: np.ndarray
    metrics: dict = field(default_factory=dict)

    @property
    def model_predictions(self) -> np.ndarray:
        return self.probs.argmax(axis=1)


@dataclass
class RoundResult:
    round: int
    metrics: dict
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
    """Run one full round on ``project``; see the module docstring for what is written where."""
    cfg = config or project.config
    _recover(project)
    store = project.store
    ds = project.data
    previous = load_state(project)
    human = store.human_labels()
    if not (human >= 0).any():
        raise LabelError(f"project {project.name}: no human labels yet; label a few samples first")
    no = store.begin_round()
    stage_seconds: dict[str, float] = {}
    started = time.perf_counter()

    def report(stage: str, done: int, total: int) -> None:
        if progress is not None:
            progress(stage, done, total)
        if cancel is not None and cancel():
            raise CancelledError(f"round {no} cancelled during {stage}; nothing was saved")

    tmp = project.begin_round_dir(no)
    try:
        # 1. train: human labels + reliable pseudo-labels of the previous round, weighted by ω
        t0 = time.perf_counter()
        pseudo = weights = None
        init = None
        if previous is not None:
            pseudo, weights = _pseudo_labels(previous.result, human)
            ckpt = project.round_dir(previous.round) / "checkpoint.pt"
            if ckpt.exists():
                init = load_checkpoint(ckpt, ds)
        report("train", 0, cfg.train.epochs)
        fitted = fit(
            ds, human, config=cfg.train, pseudo_labels=pseudo, pseudo_weights=weights, init=init,
            progress=lambda e, total: report("train", e, total), cancel=cancel,
        )
        stage_seconds["train"] = time.perf_counter() - t0
        save_checkpoint(tmp / "checkpoint.pt", fitted, config=cfg.train, ds=ds, extra={"round": no})

        # 2. embed
        t0 = time.perf_counter()
        report("embed", 0, ds.n)
        emb = embed(fitted.model, ds, progress=lambda d, total: report("embed", d, total))
        stage_seconds["embed"] = time.perf_counter() - t0
        embeddings = {"time": emb.time, "freq": emb.freq}
        np.savez(tmp / "embeddings.npz", time=emb.time, freq=emb.freq, probs=emb.probs)

        # 3. graphs, 4. propagation
        state = _propagate_all(
            no, embeddings, emb.probs, human, num_classes=ds.num_classes, config=cfg,
            report=report, stage_seconds=stage_seconds,
        )
        _save_propagation(tmp / "propagation.npz", state)

        # 5. suggestions
        t0 = time.perf_counter()
        report("suggest", 0, 1)
        suggestions = suggest(project, state, n=cfg.selection.batch, strategy=cfg.selection.strategy)
        stage_seconds["suggest"] = time.perf_counter() - t0
        report("suggest", 1, 1)

        metrics = _round_metrics(ds, human, state, fitted, stage_seconds)
        metrics["seconds"] = time.perf_counter() - started
        state.metrics = metrics
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, default=_json_default))
        (tmp / "config.json").write_text(cfg.to_json())
        (tmp / "suggestions.json").write_text(json.dumps(
            [s.__dict__ for s in suggestions], indent=2, default=_json_default))
        if cancel is not None and cancel():
            raise CancelledError(f"round {no} cancelled; nothing was saved")
        project.finish_round_dir(no)
        res = state.result
        store.write_round_propagation(
            no, res.labels, res.energy, res.margin, metrics=metrics, config=cfg.to_dict(),
        )
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        final = project.round_dir(no)
        if final.exists() and not _round_done(project, no):
            shutil.rmtree(final, ignore_errors=True)
        try:
            store.fail_round(no, f"{type(exc).__name__}: {exc}")
        except Exception:  # the store may itself be the failure; recovery happens next time
            logger.exception("could not mark round %d failed", no)
        raise
    _STATE_CACHE.pop(str(project.path), None)
    return RoundResult(
        round=no, metrics=metrics, suggestions=suggestions,
        seconds=time.perf_counter() - started, stage_seconds=stage_seconds, state=state,
    )


def _pseudo_labels(result: PropagationResult, human: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reliable propagated labels of unlabeled samples and their ω (0 for everything else)."""
    use = result.reliable & (human < 0)
    pseudo = np.where(use, result.labels, -1).astype(np.int64)
    weights = np.where(use, result.weights, 0.0).astype(np.float32)
    return pseudo, weights


def _propagate_all(
    no: int,
    embeddings: dict[str, np.ndarray],
    probs: np.ndarray,
    human: np.ndarray,
    *,
    num_classes: int,
    config: Config,
    report: StageProgress | None = None,
    stage_seconds: dict[str, float] | None = None,
) -> LoopState:
    """kNN graph and propagation for both branches, combined; model predictions feed p_c(i)."""
    stage_seconds = stage_seconds if stage_seconds is not None else {}
    graphs, affinities, results = {}, {}, {}
    t0 = time.perf_counter()
    for i, branch in enumerate(BRANCHES):
        if report:
            report("knn", i, len(BRANCHES))
        graphs[branch] = build_knn(embeddings[branch], config=config.graph)
        affinities[branch] = affinity(graphs[branch], gamma=config.graph.gamma)
    stage_seconds["knn"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    predictions = probs.argmax(axis=1)
    for i, branch in enumerate(BRANCHES):
        if report:
            report("propagate", i, len(BRANCHES))
        results[branch] = propagate(
            affinities[branch], human, num_classes=num_classes, config=config.propagation,
            predictions=predictions,
        )
    if report:
        report("propagate", len(BRANCHES), len(BRANCHES))
    stage_seconds["propagate"] = time.perf_counter() - t0
    return LoopState(
        round=no, embeddings=embeddings, probs=probs, graphs=graphs, affinities=affinities,
        branch_results=results, result=combine(results["time"], results["freq"]), human=human.copy(),
    )


def _round_metrics(ds, human, state: LoopState, fitted, stage_seconds) -> dict:
    res = state.result
    counts = np.bincount(human[human >= 0], minlength=ds.num_classes)
    metrics: dict = {
        "round": state.round,
        "n": ds.n,
        "human_labels": int((human >= 0).sum()),
        "human_per_class": dict(zip(ds.classes, counts.tolist())),
        "predicted_per_class": dict(zip(ds.classes, np.bincount(res.labels, minlength=ds.num_classes).tolist())),
        "reliable": int(res.reliable.sum()),
        "stage_seconds": dict(stage_seconds),
        "train": {"best_epoch": fitted.best_epoch, "best_metric": fitted.best_metric,
                  "device": fitted.device, "seconds": fitted.seconds},
        "propagation": {
            b: {"iterations": r.iterations, "converged": bool(r.converged), "residual": float(r.residual)}
            for b, r in state.branch_results.items()
        },
        "knn": {b: {"method": g.method, "recall": g.recall, "k": int(g.indices.shape[1])}
                for b, g in state.graphs.items()},
    }
    if ds.y_true is not None:
        unlabeled = human < 0
        metrics["quality"] = {
            "propagated": label_quality(ds.y_true, res.labels, num_classes=ds.num_classes, mask=unlabeled),
            "model": label_quality(ds.y_true, state.model_predictions, num_classes=ds.num_classes,
                                   mask=unlabeled),
        }
    return metrics


def _save_propagation(path: Path, state: LoopState) -> None:
    """Every field of the combined and per-branch results, the human labels and the kNN graphs."""
    arrays = {"human": state.human}
    for name, r in [("combined", state.result)] + [(b, state.branch_results[b]) for b in BRANCHES]:
        for f in dataclasses.fields(r):
            value = getattr(r, f.name)
            # arrays and plain numbers only: unset optional fields and in-memory bookkeeping
            # (e.g. the solved system's fingerprint) are not stored, so no object arrays
            if isinstance(value, (np.ndarray, np.generic, int, float, bool)):
                arrays[f"{name}.{f.name}"] = np.asarray(value)
    for b in BRANCHES:
        arrays[f"{b}.knn_indices"] = state.graphs[b].indices
        arrays[f"{b}.knn_sims"] = state.graphs[b].sims
    np.savez(path, **arrays)


def _load_result(z, name: str) -> PropagationResult:
    values = {}
    for f in dataclasses.fields(PropagationResult):
        key = f"{name}.{f.name}"
        if key not in z.files:
            continue
        v = z[key]
        values[f.name] = v.item() if v.ndim == 0 else v
    return PropagationResult(**values)


# --- state between rounds ------------------------------------------------------------------------

_STATE_CACHE: dict[str, LoopState] = {}


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
    """Number of the latest round that is both committed in the store and complete on disk."""
    done = sorted((r.no for r in project.store.rounds() if r.status == "done"), reverse=True)
    for no in done:
        d = project.round_dir(no)
        if all((d / f).exists() for f in ("embeddings.npz", "propagation.npz", "metrics.json")):
            return no
    return None


def load_state(project: Project) -> LoopState | None:
    """The latest complete round's state, brought up to date with human labels given since."""
    key = str(project.path)
    no = latest_complete_round(project)
    if no is None:
        _STATE_CACHE.pop(key, None)
        return None
    cached = _STATE_CACHE.get(key)
    if cached is not None and cached.round == no:
        return _refresh(project, cached)
    d = project.round_dir(no)
    cfg = Config.load(d / "config.json")
    with np.load(d / "embeddings.npz") as z:
        embeddings = {"time": z["time"], "freq": z["freq"]}
        probs = z["probs"]
    with np.load(d / "propagation.npz") as z:
        branch = {b: _load_result(z, b) for b in BRANCHES}
        combined = _load_result(z, "combined")
        human = z["human"]
        graphs = {
            b: KnnGraph(indices=z[f"{b}.knn_indices"], sims=z[f"{b}.knn_sims"], method="saved",
                        recall=None, seconds=0.0)
            for b in BRANCHES
        }
    affinities = {b: affinity(graphs[b], gamma=cfg.graph.gamma) for b in BRANCHES}
    metrics = json.loads((d / "metrics.json").read_text())
    state = LoopState(
        round=no, embeddings=embeddings, probs=probs, graphs=graphs, affinities=affinities,
        branch_results=branch, result=combined, human=human, metrics=metrics,
    )
    _STATE_CACHE[key] = state
    return _refresh(project, state)


def _refresh(project: Project, state: LoopState) -> LoopState:
    """Re-propagate (warm start) if the store's human labels differ from the state's."""
    human = project.store.human_labels()
    if np.array_equal(human, state.human):
        return state
    return repropagate(project, state, human)


def repropagate(project: Project, state: LoopState, human: np.ndarray | None = None) -> LoopState:
    """Propagation only, warm-started from the state's scores, on the kept graphs; no retraining.

    Propagated labels that changed are appended to the store (source ``propagated``, the state's
    round) so that the store, the exports and the app all show the live result.
    """
    human = project.store.human_labels() if human is None else human
    new = update_state(state, human, num_classes=project.data.num_classes, config=project.config)
    changed = np.flatnonzero((new.result.labels != state.result.labels) & (human < 0))
    if len(changed):
        ids, classes, res = project.store.ids, project.store.classes, new.result
        project.store.add_labels(
            [(ids[i], classes[res.labels[i]]) for i in changed], source="propagated",
            round=state.round, energies=res.energy[changed].tolist(),
            margins=res.margin[changed].tolist(),
        )
    _STATE_CACHE[str(project.path)] = new
    return new


def update_state(state: LoopState, human: np.ndarray, *, num_classes: int, config: Config) -> LoopState:
    """A new state with propagation re-run for ``human`` labels, warm-started from ``state``."""
    predictions = state.model_predictions
    results = {
        b: propagate(
            state.affinities[b], human, num_classes=num_classes, config=config.propagation,
            predictions=predictions, warm_start=state.branch_results[b].scores,
        )
        for b in BRANCHES
    }
    return LoopState(
        round=state.round, embeddings=state.embeddings, probs=state.probs, graphs=state.graphs,
        affinities=state.affinities, branch_results=results,
        result=combine(results["time"], results["freq"]), human=human.copy(), metrics=state.metrics,
    )


def label(project: Project, state: LoopState | None, sample_id: str, label_name: str, *,
          annotator: str = "") -> LoopState | None:
    """Record a human label and update the propagation at once (no retraining)."""
    project.store.add_label(sample_id, label_name, source="human", annotator=annotator)
    return repropagate(project, state) if state is not None else None


def undo(project: Project, state: LoopState | None, *, annotator: str | None = None):
    """Undo the latest human label (appends an undo event) and update the propagation."""
    undone = project.store.undo(annotator=annotator)
    new = repropagate(project, state) if state is not None else None
    return undone, new


def suggest(project: Project, state: LoopState, *, n: int = 10, strategy: str = "speler",
            seed: int = 0) -> list:
    """Ranked samples for a person to label next (see speler.selection)."""
    if state is None:
        raise ProjectError(f"project {project.name}: run a round first; suggestions need a model")
    return suggest_for(state, project.store.human_labels(), project.data, n=n, strategy=strategy,
                       seed=seed, config=project.config)


def suggest_for(state: LoopState, human: np.ndarray, ds, *, n: int, strategy: str, seed: int,
                config: Config) -> list:
    """Suggestions from an in-memory state and human labels (used by rounds and simulations)."""
    return selection.suggest(
        strategy, propagation=state.result, embeddings=state.embeddings["time"],
        labeled=human >= 0, budget=n, seed=seed, probs=state.probs, graph=state.graphs["time"],
        classes=ds.classes, ids=ds.ids.tolist(),
        human_counts=np.bincount(human[human >= 0], minlength=ds.num_classes),
        config=config.selection,
    )


def doubts(project: Project, state: LoopState, *, top: int = 20) -> list:
    """Human labels the graph strongly disagrees with (see speler.export.doubts)."""
    from speler.export import doubts as _doubts

    # read each human label's support from its neighbours' scores in both branches' graphs, so a
    # sample's own seed does not outvote them
    return _doubts(project, state.result, top=top,
                   affinity=[state.affinities[b] for b in BRANCHES])


def neighbours(state: LoopState, index: int, *, k: int = 3, branch: str = "time") -> list[int]:
    """Up to ``k`` nearest human-labeled samples of sample ``index`` by embedding similarity."""
    labeled = np.flatnonzero(state.human >= 0)
    labeled = labeled[labeled != index]
    if len(labeled) == 0:
        return []
    emb = state.embeddings[branch]
    q = emb[index] / (np.linalg.norm(emb[index]) + 1e-12)
    e = emb[labeled] / (np.linalg.norm(emb[labeled], axis=1, keepdims=True) + 1e-12)
    order = np.argsort(-(e @ q), kind="stable")[:k]
    return labeled[order].tolist()


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)

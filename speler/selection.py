"""What a person should label next: query strategies behind one signature.

Every strategy is called through ``suggest(strategy, propagation=..., embeddings=..., labeled=...,
budget=..., seed=...)`` and returns a ranked list of ``Suggestion`` (best first), each with a score
and a reason a person can read. Samples marked ``labeled`` are never suggested; at most ``budget``
suggestions come back (fewer when fewer unlabeled samples remain).

Strategies (``STRATEGIES``):

- ``speler`` (default). Boundary samples connected to the labels (outliers gated out), minority
  first, far from the labels, diverse:
  * boundary: ``b = 1 - margin`` (the propagation's margin is top-1 minus top-2 of the row-normalised
    scores, in [0, 1]; a larger scale is divided by its maximum). The margin itself, not its rank
    among the candidates: a rank would put a margin of 0.3 next to one of 0.8 whenever few samples
    lie in between;
  * connected: lower energy = stronger holistic connection to the labeled set. The propagation's
    energy is ≤ 0 with 0 = reached by no seed, so ``κ = -E / median(-E)`` over the unlabeled samples
    says how connected a sample is compared with the typical one (1 = typical, 0 = not at all),
    whatever the scale of the energy. It acts as a soft gate against outliers,
    ``c = κ² / (κ² + outlier_ratio²)`` (0.5 at ``κ = outlier_ratio``, ≈ 1 for ten times that, → 0
    below), not as a preference for the lowest energies: boundary samples are naturally a little
    less connected than cluster cores, and a rank or z-score cut on energy (tried) removed them
    with the outliers;
  * minority: rarity of the two classes the sample sits between, ``r = max(r[pred], r[runner_up])``
    with ``r_c = sqrt((h_min + 1) / (h_c + 1) · (q_min + 1) / (q_c + 1))`` from the human label counts
    ``h`` and the propagated class counts ``q`` (1 for the rarest class, towards 0 for the largest);
  * coverage: the cosine distance to the nearest labeled sample over the candidates' median
    (``_ranked_with_coverage``), ``v`` (1 = typical, 0 = next to a label, at most
    ``COVERAGE_CAP``), so of two equally uncertain samples the one in ground no label covers yet
    comes first. In simulated annotation
    (benchmarks/round_quality.py's: the five real sets, π = 10 / γ = 5 %, π = 50 / 5 %,
    π = 10 / 10 %, 5 seeds, network off, area under the macro-F1 curve) 0.783 → 0.791, better in
    40 of 75 runs and worse in 27, higher on every set's mean; coreset, coverage alone, 0.792;
    ``v`` capped at 1 (closeness penalised, no bonus for distance) 0.784;
  * score ``b · c · (1 + minority_weight · r) · v^coverage_exponent``; every factor is free of the
    scale of the propagation scores and embeddings (a margin of normalised scores, ratios of
    energies, of counts and of distances);
  * diversity: walking down the ranking, a sample is skipped when it is a kNN-graph neighbour (either
    direction) of one already chosen, or a near-duplicate (cosine ≥ ``duplicate_similarity``) of one.
    If that leaves the batch short, skipped graph neighbours fill it in ranking order; near-duplicates
    never do, so the batch can be shorter than the budget only when the rest are duplicates.
- ``random``: uniform without replacement under ``seed``.
- ``entropy``: largest entropy of the model's softmax ``probs`` first.
- ``margin``: smallest gap between the model's two most probable classes first.
- ``lp-margin``: smallest propagation margin first (the propagation alone, no energy, no diversity).
- ``coreset``: k-centre greedy on L2-normalised embeddings, starting from the labeled set: each pick
  is the candidate farthest from everything labeled or already picked; distances are kept as a
  running minimum updated with one matrix-vector product per pick. Above ``coreset_pool`` unlabeled
  samples the candidates are a random pool of that size, and above ``coreset_centres`` labeled
  samples the starting centres a random subset of that size (both under ``seed``), which keeps a
  batch at 100k samples well under a second (the first step costs pool × centres × d).

Before any round there is no propagation to rank by: ``first_labels`` offers the most typical
sample of each of the data's main groups (clusters of a label-free view) for the first labels.

``score`` is always "higher = suggested earlier"; ``predicted`` and ``runner_up`` are the
propagation's two best classes for every strategy, ``energy`` and ``margin`` the propagation's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from speler.config import SelectionConfig
from speler.errors import ConfigError, DataFormatError
from speler.graph.knn import KnnGraph
from speler.graph.propagate import PropagationResult

logger = logging.getLogger(__name__)

_CHUNK = 4096  # rows per block in the distance computations (coreset, speler's coverage)
COVERAGE_SAMPLE = 2_000  # speler: candidates whose median distance to a label is the typical one
COVERAGE_POOL = 2_000  # speler: first pool of candidates whose distance to a label is computed
COVERAGE_CAP = 2.0  # speler: distances to the nearest label beyond this many times the typical
# one earn no more: past it a sample is as likely an outlier as uncovered ground, which the energy
# gate judges (uncapped, a far outlier outranked a connected boundary sample; on the real sets the
# cap changed no simulated run)


@dataclass(frozen=True)
class Suggestion:
    """One sample to label next.

    index: row of the sample in the dataset.
    id: the sample's id.
    score: the strategy's priority (higher = earlier); comparable only within one call.
    reason: one line a person can read.
    predicted, runner_up: the propagation's best and second-best class (-1 if there is none).
    energy, margin: the propagation's energy and margin of the sample.
    """

    index: int
    id: str
    score: float
    reason: str
    predicted: int
    runner_up: int
    energy: float
    margin: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Inputs:
    """Validated inputs shared by the strategies (trusted from here on)."""

    propagation: PropagationResult
    embeddings: np.ndarray  # float32 (n, d)
    labeled: np.ndarray  # bool (n,)
    probs: np.ndarray | None  # float (n, C)
    graph: KnnGraph | None
    classes: tuple[str, ...]
    ids: Sequence[str] | None
    human_counts: np.ndarray  # int64 (C,)
    config: SelectionConfig
    seed: int

    @property
    def n(self) -> int:
        return int(self.labeled.shape[0])

    def candidates(self) -> np.ndarray:
        return np.flatnonzero(~self.labeled)

    def id_of(self, i: int) -> str:
        return str(i) if self.ids is None else str(self.ids[i])

    def name(self, c: int) -> str:
        return self.classes[c] if 0 <= c < len(self.classes) else "?"


# -- public entry point ------------------------------------------------------------------------------

def suggest(
    strategy: str,
    *,
    propagation: PropagationResult,
    embeddings: np.ndarray,
    labeled: np.ndarray,
    budget: int,
    seed: int = 0,
    probs: np.ndarray | None = None,
    graph: KnnGraph | None = None,
    classes: Sequence[str] = (),
    ids: Sequence[str] | None = None,
    human_counts: np.ndarray | None = None,
    config: SelectionConfig = SelectionConfig(),
) -> list[Suggestion]:
    """Rank up to ``budget`` unlabeled samples for a person to label next, best first.

    strategy: one of ``STRATEGIES`` (ConfigError listing them otherwise).
    propagation: the current propagation (scores (n, C), labels, margin, energy, ...).
    embeddings: float array (n, d), the embeddings the graph was built on.
    labeled: bool (n,), samples with a human or imported label; never suggested.
    budget: most suggestions wanted (>= 0).
    seed: for ``random`` and the ``coreset`` pool; every strategy is deterministic under it.
    probs: float (n, C), the model's softmax; needed by ``entropy`` and ``margin``.
    graph: the kNN graph of ``embeddings``; ``speler`` uses it for diversity when given.
    classes: class names for the reasons (default "class 0", ...).
    ids: sample ids (default the row numbers as strings).
    human_counts: int (C,), human labels per class (default: counted from ``labeled`` and the
        propagation's labels of those samples).
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown selection strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
    inputs = _validate(propagation, embeddings, labeled, budget, seed, probs, graph, classes, ids,
                       human_counts, config, strategy)
    budget = int(budget)
    if budget == 0 or not np.any(~inputs.labeled):
        return []
    rng = np.random.default_rng(int(seed))
    out = STRATEGIES[strategy](inputs, budget, rng)
    logger.debug("%s: %d suggestions from %d unlabeled samples", strategy, len(out),
                 int(np.sum(~inputs.labeled)))
    return out


def _validate(propagation, embeddings, labeled, budget, seed, probs, graph, classes, ids,
              human_counts, config, strategy) -> _Inputs:
    scores = np.asarray(propagation.scores)
    if scores.ndim != 2 or scores.shape[1] < 1:
        raise DataFormatError(f"selection: propagation.scores must be (n, C), got shape {scores.shape}")
    n, C = scores.shape
    for field in ("labels", "margin", "energy"):
        arr = np.asarray(getattr(propagation, field))
        if arr.shape != (n,):
            raise DataFormatError(
                f"selection: propagation.{field} has shape {arr.shape}, expected ({n},)")
    emb = np.asarray(embeddings)
    if emb.ndim != 2 or emb.shape[0] != n:
        raise DataFormatError(
            f"selection: embeddings have shape {emb.shape}, expected ({n}, d) like propagation.scores")
    if not np.all(np.isfinite(emb)):
        bad = int(np.flatnonzero(~np.all(np.isfinite(emb), axis=1))[0])
        raise DataFormatError(f"selection: embeddings row {bad} is not finite")
    lab = np.asarray(labeled)
    if lab.dtype != bool or lab.shape != (n,):
        raise DataFormatError(
            f"selection: labeled must be a bool array of shape ({n},), got {lab.dtype} {lab.shape}")
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 0:
        raise ConfigError(f"selection: budget must be an integer >= 0, got {budget!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ConfigError(f"selection: seed must be an integer, got {seed!r}")
    if probs is not None:
        probs = np.asarray(probs)
        if probs.dtype.kind != "f":
            probs = probs.astype(np.float64)
        if probs.ndim != 2 or probs.shape[0] != n:
            raise DataFormatError(f"selection: probs have shape {probs.shape}, expected ({n}, C)")
        if not np.all(np.isfinite(probs)):
            raise DataFormatError("selection: probs contain NaN or infinite values")
    elif strategy in ("entropy", "margin"):
        raise ConfigError(
            f"selection strategy {strategy!r} needs probs (the model's softmax, shape ({n}, C)); "
            f"strategies without a model: speler, random, lp-margin, coreset")
    if graph is not None:
        gi = np.asarray(graph.indices)
        if gi.ndim != 2 or gi.shape[0] != n:
            raise DataFormatError(
                f"selection: graph.indices have shape {gi.shape}, expected ({n}, k)")
    classes = tuple(str(c) for c in classes) or tuple(f"class {c}" for c in range(C))
    if len(classes) != C:
        raise DataFormatError(
            f"selection: {len(classes)} class names for propagation scores with {C} columns")
    if ids is not None and len(ids) != n:
        raise DataFormatError(f"selection: {len(ids)} ids for {n} samples")
    if human_counts is None:
        pl = np.asarray(propagation.labels)[lab]
        human_counts = np.bincount(pl[(pl >= 0) & (pl < C)], minlength=C)
    human_counts = np.asarray(human_counts)
    if human_counts.shape != (C,) or np.any(human_counts < 0):
        raise DataFormatError(
            f"selection: human_counts must be {C} non-negative counts, got {human_counts!r}")
    if not 0.0 <= config.outlier_ratio < np.inf:
        raise ConfigError(f"selection.outlier_ratio must be >= 0, got {config.outlier_ratio}")
    if not 0.0 < config.duplicate_similarity <= 1.0:
        raise ConfigError(
            f"selection.duplicate_similarity must be in (0, 1], got {config.duplicate_similarity}")
    if config.minority_weight < 0:
        raise ConfigError(f"selection.minority_weight must be >= 0, got {config.minority_weight}")
    if config.coreset_pool < 0 or config.coreset_centres < 0:
        raise ConfigError(f"selection.coreset_pool and coreset_centres must be >= 0, got "
                          f"{config.coreset_pool} and {config.coreset_centres}")
    return _Inputs(propagation=propagation, embeddings=emb, labeled=lab, probs=probs, graph=graph,
                   classes=classes, ids=ids, human_counts=human_counts.astype(np.int64),
                   config=config, seed=int(seed))


# -- shared helpers ------------------------------------------------------------------------------

def _top2(scores: np.ndarray, rows: np.ndarray, predicted: np.ndarray | None = None):
    """Best and second-best class of ``scores[rows]`` (second = -1 with one class).

    With ``predicted`` given, the best is taken from it and the runner-up is the best other class.
    """
    s = np.asarray(scores[rows], dtype=np.float64)
    if predicted is None:
        predicted = np.argmax(s, axis=1)
    if s.shape[1] < 2:
        return predicted.astype(np.int64), np.full(len(rows), -1, dtype=np.int64)
    masked = s.copy()
    ok = (predicted >= 0) & (predicted < s.shape[1])
    masked[np.flatnonzero(ok), predicted[ok]] = -np.inf
    runner = np.argmax(masked, axis=1)
    return predicted.astype(np.int64), runner.astype(np.int64)


def _connectivity(energy: np.ndarray) -> np.ndarray:
    """κ = -E / median(-E) (float64, >= 0): 1 for the typical sample, 0 for one no seed reaches.

    Energies above 0 count as 0 (no connection); non-finite ones as 0. If the median is 0 (most
    samples unreached), the largest value sets the scale; all zero gives all zero."""
    ell = np.where(np.isfinite(energy), np.maximum(-energy, 0.0), 0.0)
    if len(ell) == 0:
        return ell
    ref = float(np.median(ell))
    if not ref > 0:
        ref = float(ell.max())
    return ell / ref if ref > 0 else np.zeros_like(ell)


def _unit_rows(emb: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """float32 copies of ``emb[rows]`` scaled to norm 1 (all-zero rows stay zero)."""
    X = emb[rows].astype(np.float32)
    X /= np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    return X


def _centres(inputs: _Inputs, rng: np.random.Generator) -> np.ndarray:
    """The labeled samples distances are measured from: all of them, or a random subset of
    ``coreset_centres`` (under ``rng``) where there are more."""
    centres = np.flatnonzero(inputs.labeled)
    cap = inputs.config.coreset_centres
    if cap and len(centres) > cap:
        centres = np.sort(rng.choice(centres, size=cap, replace=False))
    return centres


def _nearest_distance(X: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Squared distance of each unit row of ``X`` to the nearest unit row of ``centres``
    (2 - 2 cos, float32; inf for every row when there are no centres), in blocks of rows."""
    if not len(centres):
        return np.full(len(X), np.inf, dtype=np.float32)
    best_cos = np.empty(len(X), dtype=np.float32)
    for s in range(0, len(X), _CHUNK):
        best_cos[s:s + _CHUNK] = np.max(X[s:s + _CHUNK] @ centres.T, axis=1)
    return np.maximum(2.0 - 2.0 * best_cos, 0.0)


def _ranked_with_coverage(inputs: _Inputs, cand: np.ndarray, base: np.ndarray, budget: int,
                          rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """speler's final ranking: ``base · v^coverage_exponent`` with ``v`` each candidate's cosine
    distance to the nearest labeled sample over the typical one (the median over all candidates,
    or over ``COVERAGE_SAMPLE`` of them drawn with ``rng``), at most ``COVERAGE_CAP``; then the
    diversity walk. Returns (score, v, chosen positions into ``cand`` in ranking order); where
    nothing is labeled or the exponent is 0, ``v`` is 1.

    Distances are computed best ``base`` first, for a pool that doubles until the walk fills the
    batch from candidates whose final score beats any the rest could reach (their ``base`` times
    ``COVERAGE_CAP``): the same batch as with every distance computed. benchmarks/
    selection_speed.py (100k samples, 5,000 labels, 2 cores): a batch in 70 ms, against 0.92 s
    with every distance and 37 ms without coverage. Scores of candidates outside the pool are
    -inf, their ``v`` NaN."""
    n, e = len(cand), inputs.config.coverage_exponent
    centres = _centres(inputs, rng) if e > 0 else np.zeros(0, dtype=np.int64)
    if not len(centres):
        return base, np.ones(n), _diverse(inputs, cand, np.lexsort((cand, -base)), budget)
    unit_centres = _unit_rows(inputs.embeddings, centres)

    def distance(pos: np.ndarray) -> np.ndarray:
        X = _unit_rows(inputs.embeddings, cand[pos])
        return np.sqrt(_nearest_distance(X, unit_centres)).astype(np.float64)

    typical = (np.arange(n) if n <= COVERAGE_SAMPLE
               else np.sort(rng.choice(n, size=COVERAGE_SAMPLE, replace=False)))
    med = float(np.median(distance(typical)))
    by_base = np.lexsort((cand, -base))
    cov = np.full(n, np.nan)
    score = np.full(n, -np.inf)
    done, m = 0, min(n, max(COVERAGE_POOL, 20 * budget))
    while True:
        new = by_base[done:m]
        cov[new] = np.minimum(distance(new) / med, COVERAGE_CAP) if med > 0 else 1.0
        score[new] = base[new] * cov[new] ** e
        done = m
        reach = base[by_base[m]] * COVERAGE_CAP ** e if m < n else -np.inf
        pool = by_base[:m]
        safe = pool[score[pool] > reach]
        order = safe[np.lexsort((cand[safe], -score[safe]))]
        sel = _diverse(inputs, cand, order, budget, fill=m == n)
        if m == n or len(sel) == min(budget, n):
            return score, cov, sel
        m = min(n, 2 * m)


def _fmt(x: float) -> str:
    return f"{x:.3g}" if np.isfinite(x) else str(x)


def _make(inputs: _Inputs, order: np.ndarray, scores: np.ndarray,
          reason: Callable[[int, int, int], str]) -> list[Suggestion]:
    """Suggestions for the rows ``order`` (already ranked) with their ``scores``."""
    prop = inputs.propagation
    order = np.asarray(order, dtype=np.int64)
    pred = np.asarray(prop.labels)[order].astype(np.int64)
    _, runner = _top2(np.asarray(prop.scores), order, pred)
    energy = np.asarray(prop.energy, dtype=np.float64)[order]
    margin = np.asarray(prop.margin, dtype=np.float64)[order]
    out = []
    for j, i in enumerate(order.tolist()):
        out.append(Suggestion(
            index=i, id=inputs.id_of(i), score=float(scores[j]),
            reason=reason(i, int(pred[j]), int(runner[j])),
            predicted=int(pred[j]), runner_up=int(runner[j]),
            energy=float(energy[j]), margin=float(margin[j])))
    return out


def _rank(candidates: np.ndarray, priority: np.ndarray, budget: int) -> np.ndarray:
    """Positions (into ``candidates``) of the ``budget`` highest priorities, ties by lower index."""
    m = len(candidates)
    k = min(budget, m)
    if k < m:
        part = np.argpartition(-priority, k - 1)[:k]
        # include every tie with the k-th value so the tie-break by index is exact
        kth = priority[part].min()
        part = np.flatnonzero(priority >= kth)
    else:
        part = np.arange(m)
    order = part[np.lexsort((candidates[part], -priority[part]))]
    return order[:k]


# -- strategies ----------------------------------------------------------------------------------

def _speler(inputs: _Inputs, budget: int, rng: np.random.Generator) -> list[Suggestion]:
    cfg = inputs.config
    prop = inputs.propagation
    cand = inputs.candidates()
    C = len(inputs.classes)
    margin = np.asarray(prop.margin, dtype=np.float64)[cand]
    energy = np.asarray(prop.energy, dtype=np.float64)[cand]
    margin = np.where(np.isfinite(margin), np.maximum(margin, 0.0), 1.0)
    boundary = 1.0 - margin / max(1.0, float(margin.max()) if len(margin) else 1.0)
    kappa = _connectivity(energy)
    connected = kappa ** 2 / np.maximum(kappa ** 2 + cfg.outlier_ratio ** 2, 1e-300)

    pred = np.asarray(prop.labels)[cand].astype(np.int64)
    _, runner = _top2(np.asarray(prop.scores), cand, pred)
    q = np.bincount(np.asarray(prop.labels)[(np.asarray(prop.labels) >= 0)
                                           & (np.asarray(prop.labels) < C)], minlength=C)
    h = inputs.human_counts
    rarity_c = np.sqrt((h.min() + 1.0) / (h + 1.0) * (q.min() + 1.0) / (q + 1.0))
    r_pred = np.where((pred >= 0) & (pred < C), rarity_c[np.clip(pred, 0, C - 1)], 0.0)
    r_run = np.where(runner >= 0, rarity_c[np.clip(runner, 0, C - 1)], 0.0)
    rarity = np.maximum(r_pred, r_run)
    base = boundary * connected * (1.0 + cfg.minority_weight * rarity)
    score, coverage, sel = _ranked_with_coverage(inputs, cand, base, budget, rng)
    rows = cand[sel]
    # for the reasons only: where each energy ranks among the unlabeled samples (0 = lowest =
    # best connected; mean rank of ties), and how many candidates share each chosen score
    energy = np.where(np.isfinite(energy), energy, np.inf)
    srt = np.sort(energy)
    below = np.searchsorted(srt, energy[sel], side="left")
    upto = np.searchsorted(srt, energy[sel], side="right")
    e_pct = ((below + upto - 1) / 2.0) / max(len(srt) - 1, 1)
    by_score = np.sort(score)  # (candidates whose distance was never needed: -inf, no tie)
    ties = (np.searchsorted(by_score, score[sel], side="right")
            - np.searchsorted(by_score, score[sel], side="left"))
    info = {int(cand[p]): (float(margin[p]), float(boundary[p]), float(e_pct[j]), float(kappa[p]),
                           float(score[p]), int(ties[j]), float(coverage[p]))
            for j, p in enumerate(sel.tolist())}

    def reason(i: int, pc: int, rc: int) -> str:
        m, b, ep, k, s, tied, cov = info[i]
        a = inputs.name(pc)
        if rc < 0:
            parts = [f"predicted {a}, no other class (margin {_fmt(m)})"]
        elif b >= 0.5:
            parts = [f"boundary between {a} and {inputs.name(rc)} (margin {_fmt(m)})"]
        elif b > 0:
            parts = [f"leans to {a} over {inputs.name(rc)} (margin {_fmt(m)}, not a close call)"]
        else:
            parts = [f"no boundary: only {a} reaches it (margin {_fmt(m)})"]
        parts.append(_connection(ep, k, cfg.outlier_ratio))
        far = _distance_in_words(cov) if cfg.coverage_exponent > 0 and cov == cov else None
        if far:
            parts.append(far)
        rare = [c for c in (pc, rc) if 0 <= c < C]
        if rare:
            c = max(rare, key=lambda c: (rarity_c[c], -c))
            parts.append(f"class {inputs.name(c)} has {int(h[c])} "
                         f"label{'s' if int(h[c]) != 1 else ''}")
        if tied > 1:
            parts.append(f"score {_fmt(s)} tied with {tied - 1:,} other sample"
                         f"{'s' if tied > 2 else ''}, which come in data order")
        return ", ".join(parts)

    return _make(inputs, rows, score[sel], reason)


def _connection(rank: float, kappa: float, outlier_ratio: float) -> str:
    """How well a sample is connected to the labels, in words, from its energy's rank among the
    unlabeled samples (0 = lowest energy = best connected, 1 = highest) and its κ."""
    if not kappa > 0:
        return "not reached by any label (energy 0)"
    low = int(np.clip(np.ceil(100 * rank), 1, 100))
    high = int(np.clip(np.ceil(100 * (1 - rank)), 1, 100))
    if kappa < outlier_ratio:
        return f"weakly connected, likely an outlier (energy in the highest {high} %)"
    if rank <= 1 / 3:
        return f"well connected (energy in the lowest {low} %)"
    if rank < 2 / 3:
        return "typically connected (energy in the middle third)"
    return f"weakly connected (energy in the highest {high} %)"


def _distance_in_words(ratio: float) -> str | None:
    """How far a sample lies from the nearest labeled one against the typical candidate, in
    words where it is unusual (None in between: the reason stays short)."""
    if ratio >= 1.5:
        return f"far from any label ({_fmt(ratio)}x the typical distance)"
    if ratio <= 0.5:
        return f"close to a labeled sample ({_fmt(ratio)}x the typical distance)"
    return None


def _diverse(inputs: _Inputs, cand: np.ndarray, order: np.ndarray, budget: int, *,
             fill: bool = True) -> np.ndarray:
    """Walk ``cand[order]`` and keep samples that are neither graph neighbours nor near-duplicates
    of one kept before; with ``fill``, fill a short batch with skipped graph neighbours (never
    duplicates). Returns positions into ``cand``, in ranking order."""
    emb = inputs.embeddings
    thr = inputs.config.duplicate_similarity
    nbrs = None if inputs.graph is None else np.asarray(inputs.graph.indices)
    kept: list[tuple[int, int]] = []  # (rank, position into cand)
    kept_rows: set[int] = set()
    blocked: set[int] = set()
    kept_vecs = np.zeros((budget, emb.shape[1]), dtype=np.float64)
    skipped: list[int] = []  # ranks

    def unit(i: int) -> np.ndarray:
        v = emb[i].astype(np.float64)
        norm = np.linalg.norm(v)
        return v / norm if norm > 0 else v

    def duplicate(v: np.ndarray) -> bool:
        return bool(kept) and bool(np.max(kept_vecs[:len(kept)] @ v) >= thr)

    def keep(r: int, i: int, v: np.ndarray) -> None:
        kept_vecs[len(kept)] = v
        kept.append((r, int(order[r])))
        kept_rows.add(i)
        if nbrs is not None:
            blocked.update(int(j) for j in nbrs[i] if j >= 0)

    for r in range(len(order)):
        if len(kept) >= budget:
            break
        i = int(cand[order[r]])
        if i in blocked or (nbrs is not None and any(int(j) in kept_rows for j in nbrs[i])):
            skipped.append(r)
            continue
        v = unit(i)
        if not duplicate(v):
            keep(r, i, v)
    for r in skipped if fill else ():
        if len(kept) >= budget:
            break
        i = int(cand[order[r]])
        v = unit(i)
        if not duplicate(v):
            keep(r, i, v)
    kept.sort()
    return np.array([p for _, p in kept], dtype=np.int64)


def _random(inputs: _Inputs, budget: int, rng: np.random.Generator) -> list[Suggestion]:
    cand = inputs.candidates()
    key = rng.random(len(cand))
    pos = _rank(cand, key, budget)
    return _make(inputs, cand[pos], key[pos],
                 lambda i, pc, rc: f"random pick (seed {inputs.seed})")


def _entropy(inputs: _Inputs, budget: int, rng: np.random.Generator) -> list[Suggestion]:
    cand = inputs.candidates()
    p = np.clip(inputs.probs[cand], 0.0, None)
    p /= np.maximum(p.sum(axis=1, keepdims=True), 1e-12)
    ent = -np.einsum("ij,ij->i", p, np.log(np.maximum(p, np.finfo(p.dtype).tiny))).astype(np.float64)
    pos = _rank(cand, ent, budget)
    rows = cand[pos]
    top, second = _top2(inputs.probs, rows)
    info = {int(i): (float(ent[q]), int(a), int(b)) for i, q, a, b in
            zip(rows.tolist(), pos.tolist(), top.tolist(), second.tolist())}

    def reason(i: int, pc: int, rc: int) -> str:
        e, a, b = info[i]
        pr = inputs.probs[i]
        text = f"model entropy {_fmt(e)} (predicted {inputs.name(a)} {pr[a]:.2f}"
        return text + (f", {inputs.name(b)} {pr[b]:.2f})" if b >= 0 else ")")

    return _make(inputs, rows, ent[pos], reason)


def _margin(inputs: _Inputs, budget: int, rng: np.random.Generator) -> list[Suggestion]:
    cand = inputs.candidates()
    p = inputs.probs[cand]
    C = p.shape[1]
    if C >= 2:
        two = np.partition(p, C - 2, axis=1)[:, C - 2:]
        gap = (two[:, 1] - two[:, 0]).astype(np.float64)
    else:
        gap = p[:, 0].astype(np.float64)
    pos = _rank(cand, -gap, budget)
    top, second = _top2(inputs.probs, cand[pos])
    info = {int(cand[q]): (float(gap[q]), int(a), int(b))
            for q, a, b in zip(pos.tolist(), top.tolist(), second.tolist())}

    def reason(i: int, pc: int, rc: int) -> str:
        g, a, b = info[i]
        between = f"between {inputs.name(a)} and {inputs.name(b)}" if b >= 0 \
            else f"for {inputs.name(a)}"
        return f"model margin {_fmt(g)} {between}"

    return _make(inputs, cand[pos], -gap[pos], reason)


def _lp_margin(inputs: _Inputs, budget: int, rng: np.random.Generator) -> list[Suggestion]:
    cand = inputs.candidates()
    margin = np.asarray(inputs.propagation.margin, dtype=np.float64)[cand]
    margin = np.where(np.isfinite(margin), margin, np.inf)
    pos = _rank(cand, -margin, budget)

    def reason(i: int, pc: int, rc: int) -> str:
        m = float(inputs.propagation.margin[i])
        between = f"between {inputs.name(pc)} and {inputs.name(rc)}" if rc >= 0 \
            else f"for {inputs.name(pc)}"
        return f"propagation margin {_fmt(m)} {between}"

    return _make(inputs, cand[pos], -margin[pos], reason)


def _coreset(inputs: _Inputs, budget: int, rng: np.random.Generator) -> list[Suggestion]:
    cand = inputs.candidates()
    pool_size = inputs.config.coreset_pool
    if pool_size and len(cand) > pool_size:
        cand = np.sort(rng.choice(cand, size=pool_size, replace=False))
    X = _unit_rows(inputs.embeddings, cand)
    centres = _centres(inputs, rng)
    # squared distance between unit vectors = 2 - 2 cos, to the nearest centre
    mind = _nearest_distance(X, _unit_rows(inputs.embeddings, centres))
    picks: list[int] = []
    dists: list[float] = []
    k = min(budget, len(cand))
    taken = np.zeros(len(cand), dtype=bool)
    for _ in range(k):
        if np.isinf(mind).all():
            # nothing labeled yet: start from the sample farthest from the pool's mean
            centre = X.mean(axis=0)
            p = int(np.argmax(np.sum((X - centre) ** 2, axis=1)))
        else:
            masked = np.where(taken, -1.0, mind)
            p = int(np.argmax(masked))  # first maximum: ties by lower index
        picks.append(p)
        dists.append(float(np.sqrt(mind[p])) if np.isfinite(mind[p]) else float("inf"))
        taken[p] = True
        d_new = np.maximum(2.0 - 2.0 * (X @ X[p]), 0.0)
        mind = np.minimum(mind, d_new)
    pos = np.array(picks, dtype=np.int64)
    info = dict(zip(cand[pos].tolist(), dists))

    def reason(i: int, pc: int, rc: int) -> str:
        d = info[i]
        what = "labeled set and earlier picks" if len(centres) else "earlier picks"
        if not np.isfinite(d):
            return "first coreset centre (nothing labeled yet)"
        return f"farthest from the {what}: distance {_fmt(d)}"

    # the k-centre order is the ranking; the score is the covering distance at the time of the pick
    scores = np.array([d if np.isfinite(d) else np.finfo(np.float64).max for d in dists])
    return _make(inputs, cand[pos], scores, reason)


def typical_groups(embeddings: np.ndarray, *, groups: int,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(the group of each row, int64 (n,); its cosine similarity to its group's centre, float32
    (n,)) of the label-free ``embeddings``: ``groups`` clusters by spherical k-means
    (``speler.graph.cells``) from k-means++ starting points drawn under ``seed``. They do not
    depend on any label, so a caller computes them once for ``first_labels``."""
    import torch

    from speler.graph.cells import KMEANS_ITERS, spherical_kmeans

    X = np.asarray(embeddings, dtype=np.float32)
    n = len(X)
    if n == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    X = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    k = int(max(1, min(groups, n)))
    rng = np.random.default_rng(seed)
    xt = torch.from_numpy(np.ascontiguousarray(X))
    centres = spherical_kmeans(xt, torch.from_numpy(_kmeans_pp(X, k, rng)), KMEANS_ITERS).numpy()
    sim = X @ centres.T
    cluster = np.argmax(sim, axis=1).astype(np.int64)
    return cluster, sim[np.arange(n), cluster].astype(np.float32)


def first_labels(groups: tuple[np.ndarray, np.ndarray], labeled: np.ndarray, *, budget: int,
                 ids: Sequence[str], skipped: np.ndarray | None = None) -> list[Suggestion]:
    """Before any round, when there is no graph or propagation to ask: samples to label first.

    ``groups``: ``typical_groups`` of a label-free view. Each group offers its unlabeled samples
    nearest its centre (typical, not outliers as k-centre picks would be): first every group's
    most typical one, the largest groups first (a group that holds a labeled sample counts as
    having offered one already), then every group's next, and so on, so the first labels cover
    the data's main modes before their corners. ``labeled``, ``skipped``: bool (n,); a skipped sample is passed
    over like a labeled one, but its group still counts as unlabeled. ``predicted`` and
    ``runner_up`` are -1, ``energy`` and ``margin`` NaN (nothing is propagated yet); ``score``
    is the group's size."""
    cluster, own = (np.asarray(a) for a in groups)
    labeled = np.asarray(labeled, dtype=bool)
    n = len(cluster)
    if len(own) != n or len(labeled) != n or len(ids) != n or (
            skipped is not None and len(skipped) != n):
        raise DataFormatError(f"first_labels: {n} groups, {len(own)} similarities, "
                              f"{len(labeled)} labeled flags and {len(ids)} ids; they must be "
                              f"one per sample")
    if budget < 1:
        raise ConfigError(f"first_labels: budget must be >= 1, got {budget}")
    skipped = np.zeros(n, dtype=bool) if skipped is None else np.asarray(skipped, dtype=bool)
    free = np.flatnonzero(~labeled & ~skipped)
    if len(free) == 0:
        return []
    k = int(cluster.max()) + 1
    size = np.bincount(cluster, minlength=k)
    has_label = np.bincount(cluster[labeled], minlength=k) > 0
    # rank of each free sample within its group, most typical first (ties by index)
    order = free[np.lexsort((free, -own[free], cluster[free]))]
    first_of_group = np.r_[True, cluster[order][1:] != cluster[order][:-1]]
    starts = np.flatnonzero(first_of_group)
    rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    c = cluster[order]
    # a group with a label counts as if its most typical sample had been offered already
    chosen = order[np.lexsort((order, -size[c], rank + has_label[c]))][:budget]
    out = []
    for i in chosen.tolist():
        g = int(cluster[i])
        also = ("; it holds a labeled sample already" if has_label[g]
                else ", none of them labeled yet")
        out.append(Suggestion(
            index=i, id=str(ids[i]), score=float(size[g]),
            reason=f"typical of a group of {int(size[g]):,} similar samples "
                   f"({size[g] / n:.0%} of the data){also}",
            predicted=-1, runner_up=-1, energy=float("nan"), margin=float("nan")))
    return out


def _kmeans_pp(X: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k distinct starting rows of unit rows X by k-means++ seeding (each next one drawn with
    probability ∝ its squared distance to the nearest chosen), so a small group far from the
    rest gets a centre of its own more often than under a uniform draw."""
    first = int(rng.integers(len(X)))
    chosen = [first]
    d2 = np.maximum(2.0 - 2.0 * (X @ X[first]), 0.0).astype(np.float64)
    for _ in range(k - 1):
        total = d2.sum()
        nxt = int(rng.choice(len(X), p=d2 / total)) if total > 0 else int(
            rng.choice(np.setdiff1d(np.arange(len(X)), chosen)))
        chosen.append(nxt)
        d2 = np.minimum(d2, np.maximum(2.0 - 2.0 * (X @ X[nxt]), 0.0))
    return np.asarray(chosen, dtype=np.int64)


STRATEGIES: dict[str, Callable[[_Inputs, int, np.random.Generator], list[Suggestion]]] = {
    "speler": _speler,
    "random": _random,
    "entropy": _entropy,
    "margin": _margin,
    "lp-margin": _lp_margin,
    "coreset": _coreset,
}

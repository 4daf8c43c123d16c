"""Spectral-balanced label propagation, propagation energy and pseudo-label reliability.

Pipeline (``propagate``), all on a sparse affinity W (``knn.affinity``), never an n×n dense matrix:

1. Seeds ``Y`` (``seed_matrix``): a human label of class c seeds ``n_c^-β`` in its class's
   column (n_c: c's labels, β = ``config.seed_exponent``, 0.5 by default), zero rows elsewhere,
   so class c's seeds hold a mass that grows as ``n_c^(1-β)``. β = 0 is the paper's one-hot Y:
   every label adds a full unit of mass, and a label added to a class that has some already
   floods its neighbours. In simulated annotation (benchmarks/round_quality.py --simulate: the
   five real sets, π = 10, γ = 5 %, 5 seeds, 6 rounds of 2 % of N, network off) a round lost
   more than 0.1 macro-F1 in 18 of 150 rounds with SpeLER's suggestions, and random labels
   ended about where they began (0.637 → 0.598; below it in 14 of 25 runs). β = 1 divides by
   |L_c| (Iscen et al.): with the balance of the label counts on top that corrects the prior
   twice (25 % of the samples put into classes that hold 3 % of them), so the balance below
   evens out the mass the seeds do hold, ``n_c^(1-β)``. β = 0.5 against 0, same runs: area
   under the macro-F1 curve 0.649 → 0.691 with SpeLER's suggestions (better in 22 of 25 runs,
   on all five sets; 7 rounds losing more than 0.1) and 0.594 → 0.636 with random ones (19 of
   25); on the protocol splits (one label set each, the floor, all four settings below) 0.661
   → 0.659, better in 29 of 100 runs and worse in 48 (NATOPS π=10 γ=10 % 0.593 → 0.728,
   BasicMotions π=10 γ=10 % 0.829 → 0.774); a full round at π = 10 (network, round 1) 0.637 →
   0.633 at γ = 5 % and 0.659 → 0.666 at γ = 10 %.
2. Class proportions ``p`` (``prior``), by ``config.balance_prior``:
   - "labels" (default): each class's share of the seed mass, ``p_c ∝ n_c^(1-β)`` (the share of
     the human labels at β = 0). The propagation's mass follows the seeds, so this is what
     the balance must even out: a class with few seeds gets boosted, one that the annotator
     labeled generously (the rare classes, under a minimum of one label per class or when
     suggestions favour them) does not get boosted again. At β = 0, with labels drawn in
     proportion to the classes as in the paper's protocol, it is the paper's ``p_c`` in
     expectation.
   - "predictions": ``p_c = (#human labels of c + #unlabeled samples predicted c) / n``.
     Predictions are the caller's (``predictions``, e.g. the model's), else those of
     ``warm_start``, else those of a first, unbalanced propagation (solved to
     ``FIRST_PASS_TOL``: only its classes are used).
   True labels of unlabeled samples never enter; each count enters once. A class with no count
   gets half of what one label (one sample) holds.
3. Spectral balance ``ŵ_ij = w_ij (p_c(i) p_c(j))^-1/2``, then ``S = D̂^-1/2 Ŵ D̂^-1/2`` (a sample
   without edges keeps a zero row). ``p_c(i)``: the human label's p, else the predicted class's;
   a prediction that comes from a propagation is taken softly, ``p_c(i) = exp(Σ_c P_ic log p_c)``
   with P the row-normalised scores, so a sample the first pass cannot place gets a neutral
   weight rather than a confidently wrong one.
4. ``(I - α S) M = (1 - α) Y`` for all classes at once: conjugate gradient on the block of C
   columns, one sparse × dense-block product per iteration, converged columns leave the block;
   from ``warm_start`` when given. From 20k samples everything runs on the graph renumbered in
   reverse Cuthill-McKee order (computed once per graph object and cached): about 2x faster
   products, and the single-column products of a warm start stop being latency-bound. Not
   reaching ``tol`` within ``max_iter`` is a warning and ``solve.converged=False``. Labels:
   ``argmax_c M_ic`` (human label where given); a sample no seed reaches gets the most frequent
   class of p, margin 0, energy 0 and is never reliable.
5. Energy, scale-robust, prior removed once. The paper's ``E_i = -logsumexp_j(M_ij / p_j)``
   depends on the scale of M (α, the graph: its τ̂ = -9.5 has no fixed meaning) and on how the
   seeds were scaled. Here each column is divided by its own typical value, ``s_j`` = median of
   ``M_ij`` over the unlabeled samples predicted j (over j's human labels when there are none):
   ``u_ij = M_ij / s_j`` is 1 for a typical member of any class, whatever its prior, its seed
   count or seed scaling, so the prior is removed exactly once and cannot be removed again. Then
   ``ℓ_i = logsumexp_j(10 u_ij) - log C`` (≥ 0; 0 for a sample no seed reaches) and
   ``E_i = -10 ℓ_i / median ℓ`` over the reached unlabeled samples: E = 0 means no connection,
   E = -10 is the median unlabeled sample, lower = more reliable. Multiplying the embeddings, W,
   M or any column of M by a positive number changes no energy; τ̂ = -9.5 then asks a sample of
   the largest class to be about as well connected as the median sample.
6. Thresholds ``τ_c = τ̂ · I(n_c / max_k n_k)``, ``I(v) = v / (2 - v)``, n_c = samples labeled or
   predicted c; reliable = unlabeled, reached and ``E_i ≤ τ_{label_i}``; loss weights
   ``ω_i = max(0, -E_i) / max_{reliable} max(0, -E)`` on reliable samples, else 0 (the trainer
   may renormalise per batch, as the paper does).

Why these choices (measured with one unit of seed mass per label, β = 0, except step 1's;
benchmarks/ablation_propagation.py: MSR Action3D, UTKinect, NATOPS, Epilepsy, BasicMotions, plain
features, π ∈ {10, 50}, 5 / 10 % labels, 5 seeds; macro-F1 on unlabeled):
- Plain LP with the paper's α = 0.99 (0.26) loses to LabelSpreading (0.41) because at α → 1 the
  solution is dominated by the top eigenvector of S, whose weight per class is the seed count:
  every weakly connected sample goes to the class with most seeds (rare share 1 % for 3 % true).
  α = 0.8 keeps propagation local enough (0.44 plain); γ = 3 beats γ = 1 (0.44 vs 0.41); k = 20.
- The balance boosts the classes the propagation predicts less often. It helps where the
  propagation under-predicts them (α ≥ 0.8, and on the synthetic long tail of
  benchmarks/propagation.py), and is neutral to slightly harmful at α ≤ 0.7 here, because with a
  minimum of one label per class these small sets give the rare classes 2-10x their share of
  seeds, so plain LP already over-predicts them. Default (α = 0.8, balanced) 0.453 vs plain 0.443
  vs LabelSpreading 0.407 (with ``balance_prior`` "predictions", the rule of that time).
- ``balance_prior`` "labels" vs "predictions" (the label-free floor graph of speler.loop, the
  same splits; macro-F1 on unlabeled, mean of the five sets, 5 seeds; π=10 γ=5 % / π=10 10 % /
  π=50 5 % / π=50 10 %): 0.624 / 0.649 / 0.642 / 0.674 against 0.591 / 0.635 / 0.576 / 0.648,
  better in 66 of the 100 set × setting × seed cases and worse in 27; no balance 0.616 / 0.634 /
  0.628 / 0.659. The prior from the true class sizes was worse than both (0.578 / 0.607 / 0.527
  / 0.606): what the balance has to even out is the seeds, not the class sizes. On one view
  alone it is mixed (plain view -1.4 / -0.7 / +1.7 / +0.6, rocket view +1.2 / -3.2 / +5.6
  / +4.8), and on the synthetic set above, where labels are drawn in proportion and the
  propagation under-predicts the tail, "predictions" is about 1 point better (0.745 vs 0.734 at
  20k, 5 % labels), both beating no balance (0.702).
- Energy ranking: M / p puts samples near rare seeds first; picking pseudo-labels by it was no
  better than taking all of them (precision 0.52 for 0.53 overall), with seeds divided by |L_c| as
  well 0.31. The per-class scale does better (0.56); the margin better still (0.58).

``combine`` merges the time- and frequency-branch results (see its docstring).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from dataclasses import dataclass, replace
from typing import Callable, NamedTuple

import numpy as np
import scipy.sparse as sp

from speler.config import PropagationConfig
from speler.errors import ConfigError, DataFormatError, LabelError
from speler.system import torch_threads

logger = logging.getLogger(__name__)

ENERGY_MEDIAN = -10.0  # energy of the median unlabeled sample (the scale of τ̂)
_SHARPNESS = 10.0  # u is multiplied by this inside logsumexp: close to a max, not a plain sum
FIRST_PASS_TOL = 1e-2  # relative residual of the unbalanced pass that supplies predictions:
# it only gives each unlabeled sample its soft class. 1e-2 rather than 1e-3: on the five real
# sets' 100 protocol runs the same mean macro-F1 (0.661), 99.98 % of the labels unchanged; on 1M
# synthetic points 195 labels of 1M changed, accuracy 0.9419 -> 0.9418, 5 iterations instead of 8
_REORDER_MIN_N = 20_000  # below this the dense block fits in cache anyway
_ENERGY_CHUNK = 16_384  # rows per block of the energy's float64 temporaries


class PropagationWarning(UserWarning):
    """Conjugate gradient stopped at its iteration cap before reaching the tolerance."""


@dataclass(frozen=True)
class SolveInfo:
    """How a propagation was solved (``PropagationResult.solve``): the solver's figures and what a
    warm start from the result needs, as opposed to the propagation's outputs.

    iterations, converged, residual: CG iterations, whether every column met ``tol``, and the
        largest relative residual ||r_c|| / ||b_c||; first_pass_iterations for the unbalanced
        pass that supplied the predictions (0 when none ran).
    seconds: wall time of the whole call.
    products: sparse matrix-vector products of the final solve (one per active column per
        iteration): the work, which a warm start after a few new labels cuts to the few columns
        whose seeds changed.
    solve_seconds: wall time of the conjugate-gradient loop of the final solve (from S made;
        on CUDA from S made on the device, its upload left out).
    balance_weights: float32 (n,), node weights p_c(i)^-1/2 of the balance (1 without balance);
        passing the result as ``warm_start`` reuses them.
    system: fingerprint of the solved system (graph, α, tol, balance, sum of the scores); a warm
        start from the result on the same system skips the classes whose seeds did not change
        (any change to the result's scores voids it).
    """

    iterations: int
    converged: bool
    residual: float
    seconds: float
    first_pass_iterations: int = 0
    products: int = 0
    solve_seconds: float = 0.0
    balance_weights: np.ndarray | None = None
    system: tuple | None = None


@dataclass
class PropagationResult:
    """Output of one propagation (n samples, C classes).

    scores: float32 (n, C), M, the solution of (I - αS) M = (1 - α) Y.
    labels: int64 (n,), human label where given, else argmax of M (see module docstring).
    margin: float32 (n,), top-1 minus top-2 of the row-normalised scores (in [0, 1]).
    energy: float32 (n,), scale-robust propagation energy, ≤ 0, lower = more reliable.
    reliable: bool (n,), pseudo-label trusted (always False for human-labeled samples).
    weights: float32 (n,), ω in [0, 1] for the pseudo-label loss, 0 where not reliable.
    thresholds: float32 (C,), τ_c.
    prior: float32 (C,), class proportions p used by the balance and the energy.
    connected: bool (n,), reached by at least one seed (non-zero score row).
    labeled: bool (n,), human-labeled (the seeds).
    solve: the solver's bookkeeping (``SolveInfo``: iterations, convergence, timings, and the
        balance weights and system fingerprint that a warm start reuses).
    tau_hat: τ̂ used for the thresholds (with them: ``combine`` recomputes τ_c from it).
    """

    scores: np.ndarray
    labels: np.ndarray
    margin: np.ndarray
    energy: np.ndarray
    reliable: np.ndarray
    weights: np.ndarray
    thresholds: np.ndarray
    prior: np.ndarray
    connected: np.ndarray
    labeled: np.ndarray
    solve: SolveInfo
    tau_hat: float = -9.5

    @property
    def normalized(self) -> np.ndarray:
        """float32 (n, C): scores divided by their row sum (zero rows stay zero)."""
        return _row_normalize(self.scores)


def propagate(
    W: sp.spmatrix,
    labels: np.ndarray,
    *,
    num_classes: int,
    config: PropagationConfig = PropagationConfig(),
    prior: np.ndarray | None = None,
    predictions: np.ndarray | None = None,
    warm_start: "np.ndarray | PropagationResult | None" = None,
    progress: Callable[[int, int], None] | None = None,
) -> PropagationResult:
    """Propagate human labels over the graph W.

    W: symmetric non-negative sparse (n, n) affinity (float32 CSR from ``knn.affinity``).
    labels: int (n,), class index for human-labeled samples, -1 elsewhere.
    num_classes: C ≥ 1. With C = 1 every sample gets class 0 (margin = its normalised score, 1
        where reached); a class without any labeled sample is allowed: it is never predicted.
    prior: float (C,), class proportions to use instead of estimating them (normalised here).
    predictions: int (n,), current predicted classes (e.g. the model's) used for p and for the
        balance weights of unlabeled samples; -1 or the human label where labeled is fine.
    warm_start: initial guess for M. A float array (n, C) (e.g. a previous ``scores``): without
        ``predictions`` its row-normalised scores also supply the classes for p and the balance,
        so no unbalanced first pass runs. A previous PropagationResult (instant feedback after a
        few new labels): its scores, and its balance weights and prior are kept as they were,
        so the classes whose seeds did not change are solved already and only the others
        iterate (``solve.products`` counts the work).
    progress: called with (iteration, max_iter) during the solve.

    Raises DataFormatError for a malformed W, LabelError for bad labels / no labeled sample,
    ConfigError for invalid settings.
    """
    start = time.perf_counter()
    original = W
    W = _validated_once(W)
    n = W.shape[0]
    labels = _validated_labels(labels, n, num_classes)
    C = int(num_classes)
    if prior is not None:
        prior = _validated_prior(prior, C)
    if predictions is not None:
        predictions = _validated_predictions(predictions, n, C)
    if isinstance(warm_start, PropagationResult):
        if warm_start.scores.shape != (n, C) or warm_start.solve.balance_weights is None:
            raise DataFormatError(
                f"propagate: warm_start result has scores {warm_start.scores.shape}, expected "
                f"{(n, C)} from a propagate() call on the same samples"
            )
    elif warm_start is not None:
        warm_start = np.asarray(warm_start)
        if warm_start.shape != (n, C) or not np.isfinite(warm_start).all():
            raise DataFormatError(
                f"propagate: warm_start must be a finite array of shape {(n, C)}, got "
                f"{warm_start.shape}"
            )
    system = _system(W, config)
    graph_stamp = system[0]
    # the CPU's caches gain from the locality order; on a GPU the order costs more than it saves
    # (1M nodes: the order ~2 s on the host, the whole CUDA solve 0.5 s)
    if not (config.reorder and n >= _REORDER_MIN_N and solver_device(config.device) == "cpu"):
        return _propagate(W, labels, C, config, prior, predictions, warm_start, progress, start,
                          system)
    # everything runs on the graph renumbered for locality; the answer is numbered back
    order, Wp = _cached_order(original, W, graph_stamp)
    del W
    if isinstance(warm_start, PropagationResult):
        warm_start = replace(warm_start, scores=warm_start.scores[order],
                             solve=replace(warm_start.solve,
                                           balance_weights=warm_start.solve.balance_weights[order]),
                             labels=warm_start.labels[order], labeled=warm_start.labeled[order])
    elif warm_start is not None:
        warm_start = warm_start[order]
    result = _propagate(Wp, labels[order], C, config, prior,
                        None if predictions is None else predictions[order], warm_start,
                        progress, start, system)
    result = _numbered_back(result, order)
    result.solve = replace(result.solve, seconds=time.perf_counter() - start)
    return result


def combine(time_result: PropagationResult, freq_result: PropagationResult) -> PropagationResult:
    """Merge the time- and frequency-branch propagations of the same samples (paper, ER).

    - scores: mean of the two row-normalised score matrices (each branch's M has its own scale);
      labels: argmax of those mean scores (human labels kept); margin: top-1 minus top-2 of them;
    - energy: the lower of the two branch energies (both are on the common scale, -10 = median
      sample); thresholds: ``τ_c = τ̂ · I(n_c / max n)`` recomputed from the combined labels;
      reliable: ``E^t_i ≤ τ_{q_i}`` or ``E^f_i ≤ τ_{q_i}`` (the paper's OR, with q the combined
      pseudo-label), i.e. ``min(E^t_i, E^f_i) ≤ τ_{q_i}``; weights: ω from that energy;
    - prior: mean of the two; solve: iterations / residual the larger, converged both, seconds
      and products the sum; no balance weights or system (it cannot warm-start a propagation).
    """
    a, b = time_result, freq_result
    if a.scores.shape != b.scores.shape:
        raise DataFormatError(
            f"combine: the branches disagree on shape: {a.scores.shape} vs {b.scores.shape}"
        )
    if not np.array_equal(a.labeled, b.labeled) or not np.array_equal(
            a.labels[a.labeled], b.labels[b.labeled]):
        raise LabelError("combine: the branches were propagated from different human labels")
    if a.tau_hat != b.tau_hat:
        raise ConfigError(
            f"combine: the branches used different tau_hat ({a.tau_hat}, {b.tau_hat})")
    C = a.scores.shape[1]
    scores = 0.5 * (_row_normalize(a.scores) + _row_normalize(b.scores))
    human = a.labeled
    connected = a.connected | b.connected
    prior = 0.5 * (a.prior.astype(np.float64) + b.prior.astype(np.float64))
    labels = np.where(human, a.labels, _argmax_or(scores, connected, prior)).astype(np.int64)
    energy = np.minimum(a.energy, b.energy).astype(np.float32)
    thresholds = class_thresholds(a.tau_hat, np.bincount(labels, minlength=C))
    reliable = (~human) & connected & (energy <= thresholds[labels]) & (energy < 0)
    sa, sb = a.solve, b.solve
    return PropagationResult(
        scores=scores.astype(np.float32), labels=labels, margin=_margin(scores), energy=energy,
        reliable=reliable, weights=_loss_weights(energy, reliable), thresholds=thresholds,
        prior=prior.astype(np.float32), connected=connected, labeled=human.copy(),
        solve=SolveInfo(
            iterations=max(sa.iterations, sb.iterations), converged=sa.converged and sb.converged,
            residual=max(sa.residual, sb.residual), seconds=sa.seconds + sb.seconds,
            first_pass_iterations=max(sa.first_pass_iterations, sb.first_pass_iterations),
            products=sa.products + sb.products, balance_weights=None, system=None,
        ),
        tau_hat=a.tau_hat,
    )


def label_prior(labels: np.ndarray, num_classes: int, seed_exponent: float = 0.0) -> np.ndarray:
    """p_c ∝ n_c^(1 - β), n_c = #human labels of c, β = ``seed_exponent``: the share of the seed
    mass class c holds (``seed_matrix``), what the balance evens out; a class without labels
    gets half of what one label holds, 0.5, at every β (float64 (C,), sums to 1; uniform without
    labels; β = 0: the share of the labels). ``labels``: int (n,), -1 where unlabeled."""
    counts = np.bincount(labels[labels >= 0], minlength=num_classes).astype(np.float64)
    mass = np.where(counts > 0, np.maximum(counts, 1.0) ** (1.0 - seed_exponent), 0.5)
    return mass / mass.sum()


def seed_matrix(labels: np.ndarray, num_classes: int, config: PropagationConfig, *,
                rows: slice = slice(None)) -> np.ndarray:
    """B = (1 - α) Y of the solve (float32 (n, C), or the ``rows`` of it): a human label of class
    c seeds ``(1 - α) n_c^-β`` (β = ``config.seed_exponent``), so class c's seeds hold a mass
    that grows as n_c^(1-β) with its label count n_c (over all of ``labels``). ``labels``: int (n,),
    -1 where unlabeled."""
    counts = np.bincount(labels[labels >= 0], minlength=num_classes).astype(np.float64)
    per = ((1.0 - config.alpha) * np.maximum(counts, 1.0) ** -config.seed_exponent
           ).astype(np.float32)
    mine = labels[rows]
    lab = mine >= 0
    B = np.zeros((len(mine), num_classes), dtype=np.float32)
    B[lab, mine[lab]] = per[mine[lab]]
    return B


def estimate_prior(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """p_c = (#human labels of c + #unlabeled samples predicted c) / n, floored at half a sample.

    labels: int (n,), -1 where unlabeled; predictions: int (n,), used where labels is -1.
    Returns float64 (C,) summing to 1.
    """
    n = len(labels)
    who = np.where(labels >= 0, labels, predictions)
    counts = np.bincount(who[who >= 0], minlength=num_classes).astype(np.float64)
    counts = np.maximum(counts, 0.5)
    return counts / counts.sum() if n else np.full(num_classes, 1.0 / num_classes)


def balance_weights(
    labels: np.ndarray,
    prior: np.ndarray,
    *,
    predictions: np.ndarray | None = None,
    memberships: np.ndarray | None = None,
) -> np.ndarray:
    """Node weights ``p_c(i)^-1/2`` of the spectral balance (float64 (n,)).

    Human-labeled samples use their label's p; the others use ``predictions`` (hard) or
    ``memberships`` (float (n, C), row-normalised scores: soft class, ``exp(Σ_c P_ic log p_c)``);
    a sample with neither (or an all-zero membership row) gets the geometric mean of p.
    """
    logp = np.log(prior)
    node_logp = np.full(len(labels), float(np.mean(logp)))
    if memberships is not None:
        rows = memberships.sum(axis=1) > 0
        node_logp[rows] = memberships[rows] @ logp
    if predictions is not None:
        has = predictions >= 0
        node_logp[has] = logp[predictions[has]]
    lab = labels >= 0
    node_logp[lab] = logp[labels[lab]]
    return np.exp(-0.5 * node_logp)


def normalized_operator(W: sp.csr_matrix, node_weights: np.ndarray | None = None) -> sp.csr_matrix:
    """S = D̂^-1/2 Ŵ D̂^-1/2 with Ŵ = diag(w) W diag(w) (float32 CSR, same pattern as W).

    Computed as diag(g) W diag(g), g_i = w_i / sqrt(D̂_i), D̂_i = w_i Σ_j W_ij w_j; rows without
    edges (D̂_i = 0) stay zero, so isolated samples produce no NaN.
    """
    g = _operator_scale(W, node_weights)
    S = W.copy()
    S.data = (W.data.astype(np.float64) * np.repeat(g, np.diff(W.indptr))
              * g[W.indices]).astype(np.float32)
    return S


def _operator_scale(W: sp.csr_matrix, node_weights: np.ndarray | None) -> np.ndarray:
    """g of ``normalized_operator`` (float64 (n,)): w_i / sqrt(D̂_i), 0 where D̂_i = 0."""
    n = W.shape[0]
    w = np.ones(n) if node_weights is None else np.asarray(node_weights, dtype=np.float64)
    deg = w * (W @ w)
    g = np.zeros(n)
    pos = deg > 0
    g[pos] = w[pos] / np.sqrt(deg[pos])
    return g


def energy_from_scores(
    scores: np.ndarray, labels: np.ndarray, *, labeled: np.ndarray
) -> np.ndarray:
    """Scale-robust propagation energy (float32 (n,)); see the module docstring, step 5.

    scores: M (n, C); labels: int (n,) human or predicted class (-1 = none); labeled: bool (n,).
    ``s_c`` is the median of ``M_ic`` over the unlabeled samples labeled c (else over the human
    labels of c; a class with neither is left out, u_ic = 0), ``u = M / s``,
    ``ℓ_i = logsumexp_j(10 u_ij) - log C`` and ``E_i = -10 ℓ_i / median ℓ`` over the unlabeled
    samples with ℓ > 0. Invariant to multiplying M, or any of its columns, by a positive number.
    """
    M = np.asarray(scores)  # float64 only in row blocks: a full copy is 8 bytes × n × C
    n, C = M.shape
    energy = np.zeros(n, dtype=np.float64)
    if C == 0 or n == 0:
        return energy.astype(np.float32)
    inv = np.zeros(C)
    valid = labels >= 0
    picked = np.zeros(C, dtype=bool)
    for group in (valid & ~labeled, valid & labeled):  # unlabeled members first, else human
        rows = np.flatnonzero(group)
        vals = M[rows, labels[rows]].astype(np.float64)
        cls = labels[rows]
        keep = (vals > 0) & ~picked[cls]
        vals, cls = vals[keep], cls[keep]
        order = np.lexsort((vals, cls))
        vals, cls = vals[order], cls[order]
        bounds = np.searchsorted(cls, np.arange(C + 1))
        for c in np.flatnonzero(bounds[1:] > bounds[:-1]):
            inv[c] = 1.0 / float(np.median(vals[bounds[c]:bounds[c + 1]]))
            picked[c] = True
    live = np.zeros(n, dtype=bool)
    ell_all = np.zeros(n)
    for lo in range(0, n, _ENERGY_CHUNK):  # row blocks: the temporaries stay in cache
        z = M[lo:lo + _ENERGY_CHUNK].astype(np.float64)
        z *= inv[None, :]  # u
        rows = z.max(axis=1) > 0
        live[lo:lo + _ENERGY_CHUNK] = rows
        z = z[rows]
        z *= _SHARPNESS
        zmax = z.max(axis=1)
        z -= zmax[:, None]
        np.exp(z, out=z)  # in place: one temporary per block instead of four
        lse = zmax + np.log(z.sum(axis=1))
        ell_all[lo:lo + _ENERGY_CHUNK][rows] = np.maximum(lse - math.log(C), 0.0)
    if not live.any():
        return energy.astype(np.float32)
    ell = ell_all[live]
    ref = ell[~labeled[live] & (ell > 0)]
    if ref.size == 0:
        ref = ell[ell > 0]
    med = float(np.median(ref)) if ref.size else 0.0
    if med > 0:
        energy[live] = ENERGY_MEDIAN * ell / med
    return energy.astype(np.float32)


def class_thresholds(tau_hat: float, counts: np.ndarray) -> np.ndarray:
    """τ_c = τ̂ · I(n_c / max n), I(v) = v / (2 - v); float32 (C,). Empty classes get 0."""
    counts = np.asarray(counts, dtype=np.float64)
    top = counts.max() if counts.size else 0.0
    v = counts / top if top > 0 else np.zeros_like(counts)
    return (tau_hat * v / (2.0 - v)).astype(np.float32)


# ----------------------------------------------------------------------------------------------
def _propagate(W, labels, C, config, prior, predictions, warm_start, progress, start, system):
    n = W.shape[0]
    lab = labels >= 0
    B = seed_matrix(labels, C, config)
    first_iters = 0
    X0 = warm_start.scores if isinstance(warm_start, PropagationResult) else warm_start
    w = None
    uploaded: dict = {}  # W on the solver's device (CUDA), uploaded once for both passes
    if config.balance:
        if isinstance(warm_start, PropagationResult):
            # instant feedback: the graph weights stay those of the previous full propagation,
            # so only the classes whose seeds changed are solved again
            w = warm_start.solve.balance_weights.astype(np.float64)
            if prior is None:
                prior = warm_start.prior.astype(np.float64)
        else:
            w, prior, M0, first_iters = _balance(W, labels, C, config, prior, predictions, X0, B,
                                                 uploaded)
            if X0 is None:
                X0 = M0
            del M0
    solved = None
    if (isinstance(warm_start, PropagationResult) and warm_start.solve.system is not None
            and warm_start.solve.system == (*system, _checksum(warm_start.scores))):
        # same graph, weights, α and tol: a class whose seeds are unchanged is solved already
        prev_lab = warm_start.labeled
        moved = (lab != prev_lab) | (lab & prev_lab & (labels != warm_start.labels))
        solved = np.ones(C, dtype=bool)
        solved[labels[moved & lab]] = False
        solved[warm_start.labels[moved & prev_lab]] = False
    solve, t_solve = _block_cg(W, w, B, config, X0, progress, "propagation", solved=solved,
                               uploaded=uploaded)
    residual = solve.residual
    if solved is not None and solved.any():
        residual = max(residual, float(warm_start.solve.residual))
    del uploaded
    info = SolveInfo(iterations=solve.iterations, converged=solve.converged, residual=residual,
                     seconds=0.0, first_pass_iterations=first_iters, products=solve.products,
                     solve_seconds=t_solve,
                     balance_weights=(np.ones(n) if w is None else w).astype(np.float32),
                     system=system)
    return result_from_scores(solve.X, labels, C, config, prior=prior, solve=info, start=start)


def result_from_scores(M: np.ndarray, labels: np.ndarray, C: int, config: PropagationConfig, *,
                       prior: np.ndarray | None, solve: SolveInfo,
                       start: float) -> PropagationResult:
    """The PropagationResult of the solved scores M (n, C) of the validated ``labels``: labels,
    margin, energy, thresholds, reliability and loss weights, which need every row of M (a
    row-sharded solve gathers M first: ``graph.sharded``). ``solve``: the solver's figures; its
    ``system`` is the solved system without the scores' checksum (added here) or None; its
    ``seconds`` is set from ``start`` (perf_counter) to now."""
    n = M.shape[0]
    lab = labels >= 0
    connected = M.max(axis=1) > 0 if C else np.zeros(n, dtype=bool)
    connected |= lab
    if prior is None and config.balance_prior == "labels":
        prior = label_prior(labels, C, config.seed_exponent)
    elif prior is None:
        prior = estimate_prior(labels, _argmax_or(M, connected, None), C)
    out_labels = np.where(lab, labels, _argmax_or(M, connected, prior)).astype(np.int64)
    margin = _margin(_row_normalize(M))
    energy = energy_from_scores(M, out_labels, labeled=lab)
    counts = np.bincount(out_labels, minlength=C)
    thresholds = class_thresholds(config.tau_hat, counts)
    reliable = (~lab) & connected & (energy <= thresholds[out_labels]) & (energy < 0)
    weights = _loss_weights(energy, reliable)
    system = None if solve.system is None else (*solve.system, _checksum(M))
    return PropagationResult(
        scores=M, labels=out_labels, margin=margin, energy=energy, reliable=reliable,
        weights=weights, thresholds=thresholds, prior=np.asarray(prior, dtype=np.float32),
        connected=connected, labeled=lab,
        solve=replace(solve, seconds=time.perf_counter() - start, system=system),
        tau_hat=float(config.tau_hat),
    )


def balance_drift(result: PropagationResult, labels: np.ndarray,
                  config: PropagationConfig) -> float:
    """How far the balance kept in ``result`` is from the one ``labels`` call for: the largest
    relative change of a class's proportion p_c (0 without the balance). With the prior of the
    labels, from the prior the balance was made with (``result.prior``, which warm starts that
    keep the balance carry on, so the drift of a chain of them adds up); with the prior of the
    predictions, from ``result``'s human labels to ``labels``, both counted with the classes of
    ``result``'s scores as a re-balance from them would count them.

    A warm start from a PropagationResult keeps its balance (instant feedback, step 4), which is
    right while the labels given since hold a small share of their classes. The first labels of a
    rare class move its seed mass a lot (1 → 2 labels: ×√2 at β = 0.5) and the kept p_c then
    boosts that class as if it still had one: the same flooding as an unscaled seed. ``loop``
    re-balances from ``result``'s scores once this exceeds ``config.rebalance_tolerance``."""
    if not config.balance:
        return 0.0
    C = result.scores.shape[1]
    if config.balance_prior == "labels":  # no memberships needed: the labels alone say
        p0 = np.asarray(result.prior, dtype=np.float64)
        p1 = _balance_prior(labels, C, config, None, None)
    else:
        memberships = _row_normalize(result.scores)
        guess = _argmax_or(memberships, memberships.sum(axis=1) > 0, None)
        before = np.where(result.labeled, result.labels, -1)
        p0, p1 = (_balance_prior(y, C, config, guess, None) for y in (before, labels))
    return float(np.max(np.abs(p1 / p0 - 1.0))) if C else 0.0


def spectral_balance(
    W: sp.spmatrix,
    labels: np.ndarray,
    *,
    num_classes: int,
    config: PropagationConfig = PropagationConfig(),
    prior: np.ndarray | None = None,
    predictions: np.ndarray | None = None,
    warm_start: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The node weights ``p_c(i)^-1/2`` (float64 (n,)) and class proportions p (float64 (C,)) that
    ``propagate`` would use for the balance with the same arguments (steps 2-3 of the module
    docstring); for the spectrum plot and for inspection."""
    W = validated_graph(W)
    labels = _validated_labels(labels, W.shape[0], num_classes)
    C = int(num_classes)
    prior = None if prior is None else _validated_prior(prior, C)
    predictions = None if predictions is None else _validated_predictions(
        predictions, W.shape[0], C)
    B = seed_matrix(labels, C, config)
    w, p, _, _ = _balance(W, labels, C, config, prior, predictions, warm_start, B)
    return w, p


def _balance(W, labels, C, config, prior, predictions, warm_start, B, uploaded=None):
    """Node weights of the balance, the prior, and the first-pass solution (or None);
    ``uploaded``: as for ``_block_cg``."""
    first_iters = 0
    M0 = None
    memberships = None
    if predictions is None and warm_start is not None:
        memberships = _row_normalize(np.asarray(warm_start, dtype=np.float32))
    elif predictions is None:
        # only the argmax / soft class of the first pass is used: a loose tolerance is enough
        first, _ = _block_cg(W, None, B, config, None, None, "first pass",
                             tol=max(config.tol, FIRST_PASS_TOL), uploaded=uploaded)
        M0, first_iters = first.X, first.iterations
        memberships = _row_normalize(M0)
    if prior is None:
        prior = _balance_prior(labels, C, config, predictions, memberships)
    w = balance_weights(labels, prior, predictions=predictions, memberships=memberships)
    return w, prior, M0, first_iters


def _balance_prior(labels: np.ndarray, C: int, config: PropagationConfig,
                   predictions: np.ndarray | None, memberships: np.ndarray | None) -> np.ndarray:
    """The prior the balance evens out (step 2 of the module docstring), float64 (C,): the seed
    mass of ``labels``, or with ``balance_prior="predictions"`` the counts of the labels and of
    the unlabeled samples' classes (``predictions``, else the argmax of ``memberships``)."""
    if config.balance_prior == "labels":
        return label_prior(labels, C, config.seed_exponent)
    hard = predictions
    if hard is None:
        hard = _argmax_or(memberships, memberships.sum(axis=1) > 0, None)
    return estimate_prior(labels, hard, C)


_ORDER_ATTR = "_speler_locality_order"  # kept on the caller's graph object, not in this module
_VALID_ATTR = "_speler_validated"  # likewise: the checked graph, for the re-propagations


def _checksum(M: np.ndarray) -> float:
    """Sum of the scores: ties a result's ``solve.system`` to the scores it was computed with."""
    return float(np.asarray(M).sum(dtype=np.float64))


def _fingerprint(W: sp.csr_matrix) -> tuple:
    """Cheap O(nnz) identity of a CSR graph (shape, pattern and weights sums)."""
    return (W.shape[0], W.nnz, float(W.data.sum(dtype=np.float64)),
            int(W.indices.sum(dtype=np.int64)))


def with_system(result: PropagationResult, W, config: PropagationConfig) -> PropagationResult:
    """``result`` with ``solve.system`` naming the graph W as ``propagate`` names it, for scores
    solved elsewhere (row-sharded) on that graph, so that a warm start from the result skips the
    classes whose seeds did not change; a result that names its system already is returned."""
    if result.solve.system is not None:
        return result
    system = (*_system(_validated_once(W), config), _checksum(result.scores))
    return replace(result, solve=replace(result.solve, system=system))


def _system(W: sp.csr_matrix, config: PropagationConfig) -> tuple:
    """The solved system of a validated W, less the scores' checksum: its fingerprint, α, tol,
    balance and seed exponent (each class's seed scale)."""
    return (_fingerprint(W), float(config.alpha), float(config.tol), bool(config.balance),
            float(config.seed_exponent))


def _kept_on(owner, attr: str, stamp: Callable[[], tuple], make: Callable[[], object]):
    """``make()``, computed once per graph object: kept as attribute ``attr`` of the caller's
    matrix ``owner`` (so it lives and dies with that graph and no state is shared between callers)
    together with ``stamp()``, and made again when the stamp changed (the graph's contents did).
    The stamp is taken after ``make``, which may tidy ``owner`` itself. An object that takes no
    attributes gets no cache."""
    hit = getattr(owner, attr, None)
    if hit is not None and hit[0] == stamp():
        return hit[1]
    value = make()
    try:
        setattr(owner, attr, (stamp(), value))
    except AttributeError:
        pass
    return value


def _cached_order(original, W: sp.csr_matrix, stamp: tuple) -> tuple[np.ndarray, sp.csr_matrix]:
    """The locality order of W and W renumbered by it, computed once per graph object (the
    re-propagations after each new label reuse them; ``_kept_on``); ``stamp``: W's
    ``_fingerprint``."""
    def make():
        order = _locality_order(W)
        Wp = W[order][:, order].tocsr()
        Wp.sort_indices()
        return order, Wp

    return _kept_on(original, _ORDER_ATTR, lambda: stamp, make)


def _locality_order(W: sp.csr_matrix) -> np.ndarray:
    """Reverse Cuthill-McKee order of the graph: neighbours get nearby row numbers, so the rows of
    the dense block that one sparse product reads are mostly in cache."""
    from scipy.sparse.csgraph import reverse_cuthill_mckee

    return np.asarray(reverse_cuthill_mckee(W, symmetric_mode=True), dtype=np.int64)


def _numbered_back(r: PropagationResult, order: np.ndarray) -> PropagationResult:
    """The result of a propagation on the renumbered graph, in the caller's sample order."""
    def back(a):
        out = np.empty_like(a)
        out[order] = a
        return out

    return replace(
        r, scores=back(r.scores), labels=back(r.labels), margin=back(r.margin),
        energy=back(r.energy), reliable=back(r.reliable), weights=back(r.weights),
        connected=back(r.connected), labeled=back(r.labeled),
        solve=replace(r.solve, balance_weights=back(r.solve.balance_weights)),
    )


class CGSolve(NamedTuple):
    """What a block conjugate-gradient solve returns."""

    X: np.ndarray  # float32 (n, C), the solution
    iterations: int
    converged: bool  # every column met the tolerance
    residual: float  # largest relative residual ||b - A x|| / ||b|| over the columns
    products: int  # sparse matrix-vector products (one per active column per iteration)


def _block_cg(W, node_weights, B, config, X0, progress, what, tol=None, solved=None,
              uploaded=None) -> tuple[CGSolve, float]:
    """Solve (I - αS) X = B, S = ``normalized_operator(W, node_weights)``, for all C columns of B
    at once (float32 torch kernels, on the CPU or, by ``config.device``, on CUDA:
    ``solver_device``). On CUDA S is made there (``_device_operator``; ``uploaded``: a dict that
    keeps W there for the next solve on the same graph).

    Conjugate gradient run independently per column but in one loop: each iteration does one
    sparse × dense-block product S @ P on the columns still active, plus a few fused in-place
    vector updates. A column stops when its residual norm is ≤ tol · ||b_c|| (a zero column is
    solved by 0 at once); stopped columns leave the block, so later products get narrower.
    Returns the ``CGSolve`` and the solve's wall time in seconds, making S left out (on CUDA its
    upload too).
    """
    tol = config.tol if tol is None else tol
    device = solver_device(config.device)
    if device != "cpu":  # no thread setting: the host only waits for the device
        S = _device_operator(W, node_weights, device, uploaded)
        start = time.perf_counter()
        solve = _block_cg_on_device(S, B, config, X0, progress, what, tol, solved, device)
    else:
        S = normalized_operator(W, node_weights)
        start = time.perf_counter()
        with solver_threads(config.threads, S.nnz):
            solve = _block_cg_torch(S, B, config, X0, progress, what, tol, solved)
    return solve, time.perf_counter() - start


#: Non-zeros of S from which ``propagation.threads`` = 0 asks how many cores are free: a product
#: there takes ~30 ms per 60 columns, so the 40-ms look at the load is noise; below, 1 thread.
THREADS_MIN_NNZ = 1_000_000


@contextlib.contextmanager
def solver_threads(setting: int, nnz: int):
    """torch's CPU threads while a solve runs: ``setting`` when > 0; for 0, 1 below
    ``THREADS_MIN_NNZ`` non-zeros, else the cores no other task is busy on
    (``speler.system.torch_threads``, at most torch's own setting). The products are memory-bound,
    yet a second thread helps when its core is free: the 1M-node graph's product (36M non-zeros ×
    60 columns, 2 cores, one thread each otherwise idle) 1.18 s with 1 thread, 0.82 s with 2;
    with the other core busy training, 1.7 s with 1 and 1.4 s with 2 (then 1 is taken, leaving
    the trainer its core)."""
    with torch_threads(1 if setting == 0 and nnz < THREADS_MIN_NNZ else setting) as n:
        yield n


def solver_device(preference: str) -> str:
    """Where the CG runs: ``PropagationConfig.device``, "auto" meaning CUDA when torch sees a
    device (the same answers within float32 rounding, tests/test_gpu.py), else the CPU."""
    import torch

    if preference == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if preference.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"propagation.device is {preference!r} but torch sees no CUDA device;"
                          " use 'auto' or 'cpu'")
    return preference


def _dots(a, b) -> np.ndarray:
    """Column-wise dot products of two (n, m) float32 tensors, accumulated in float64."""
    return np.einsum("ij,ij->j", a.numpy(), b.numpy(), dtype=np.float64)


def _block_cg_torch(S, B, config, X0, progress, what, tol, solved, device="cpu"):
    """The block CG of ``_block_cg``; ``device`` "cuda"/"cuda:N" runs it there
    (``_block_cg_on_device``), the CPU path below is unchanged."""
    import torch

    if torch.device(device).type != "cpu":
        return _block_cg_on_device(S, B, config, X0, progress, what, tol, solved, device)
    St = _torch_csr(S)
    return _cg_loop(lambda P: torch.sparse.mm(St, P), _dots, B, X0, config, tol, solved,
                    progress, what)


def _cg_loop(product, dots, B, X0, config, tol, solved, progress, what, *, mark=None,
             stacklevel=5) -> CGSolve:
    """The block CG loop on float32 torch CPU tensors: ``product(P)`` = S P for a block P of the
    rows at hand, ``dots(a, b)`` = column-wise dot products (float64 numpy). One process passes
    S's product and ``_dots``; ``propagate_distributed`` its halo product and all-reduced dots,
    and ``mark()``, called at the start of each iteration and once after the loop (to count the
    bytes each iteration sends). ``stacklevel`` points the PropagationWarning at the caller."""
    import torch

    alpha = float(config.alpha)
    n, C = B.shape
    Bt = torch.from_numpy(np.ascontiguousarray(B, dtype=np.float32))
    bnorm = np.sqrt(dots(Bt, Bt))
    if X0 is None:
        X = torch.zeros((n, C), dtype=torch.float32)
        R = Bt.clone()
    else:
        X = torch.from_numpy(np.array(X0, dtype=np.float32, order="C", copy=True))
        if solved is None or not solved.any():
            R = Bt - X + alpha * product(X)
        else:  # residuals only where needed: columns the caller knows are solved stay as they are
            R = torch.zeros((n, C), dtype=torch.float32)
            todo = torch.from_numpy(np.flatnonzero(~solved))
            Xt = X[:, todo].contiguous()
            R[:, todo] = Bt[:, todo] - Xt + alpha * product(Xt)
    zero = torch.from_numpy(bnorm == 0)
    X[:, zero] = 0.0
    R[:, zero] = 0.0
    thr = tol * bnorm
    rs = dots(R, R)
    active = np.flatnonzero((bnorm > 0) & (np.sqrt(rs) > thr))
    act = torch.from_numpy(active)
    Xa, Ra = X[:, act].contiguous(), R[:, act].contiguous()
    P = Ra.clone()
    rsa = rs[active]
    iters = 0
    products = 0
    while active.size and iters < config.max_iter:
        if mark is not None:
            mark()
        iters += 1
        products += int(active.size)
        AP = product(P)
        AP.mul_(-alpha).add_(P)  # AP = P - α S P
        pap = dots(P, AP)
        a = np.where(pap > 0, rsa / np.where(pap > 0, pap, 1.0), 0.0)
        a32 = torch.from_numpy(a.astype(np.float32))
        Xa.addcmul_(P, a32)
        Ra.addcmul_(AP, -a32)
        del AP
        rs_new = dots(Ra, Ra)
        beta = np.where(rsa > 0, rs_new / np.where(rsa > 0, rsa, 1.0), 0.0)
        rsa = rs_new
        if progress is not None:
            progress(iters, config.max_iter)
        still = np.sqrt(rs_new) > thr[active]
        if not still.all():
            done = torch.from_numpy(~still)
            X[:, torch.from_numpy(active[~still])] = Xa[:, done]
            rs[active[~still]] = rs_new[~still]
            keep = torch.from_numpy(still)
            active = active[still]
            Xa, Ra, P = Xa[:, keep].contiguous(), Ra[:, keep].contiguous(), P[:, keep].contiguous()
            rsa, beta = rsa[still], beta[still]
        P.mul_(torch.from_numpy(beta.astype(np.float32))).add_(Ra)  # P = R + β P
    if mark is not None:
        mark()
    if active.size:
        X[:, torch.from_numpy(active)] = Xa
        rs[active] = rsa
    rel = np.sqrt(rs) / np.where(bnorm > 0, bnorm, 1.0)
    residual = float(rel.max()) if C else 0.0
    converged = active.size == 0
    if not converged:
        msg = (f"{what}: conjugate gradient stopped after {iters} iterations with relative "
               f"residual {residual:.2e} > tol {tol:.1e} in {active.size} of {C} classes")
        logger.warning(msg)
        warnings.warn(msg, PropagationWarning, stacklevel=stacklevel)
    return CGSolve(X.numpy(), iters, converged, residual, products)


def _block_cg_on_device(S, B, config, X0, progress, what, tol, solved, device):
    """``_block_cg_torch`` with every array on ``device`` (CUDA; also runs on "cpu", which the
    tests use): S (scipy CSR, or a sparse CSR tensor on ``device`` already) as a sparse CSR
    tensor there, the scalars of each column as float64 tensors.
    The host waits for the device once per iteration, to read which columns converged (the
    columns that did leave the block, as on the CPU); one copy back at the end."""
    import torch

    dev = torch.device(device)
    alpha = float(config.alpha)
    n, C = B.shape
    St = S if isinstance(S, torch.Tensor) else _torch_csr(S, dev)
    Bt = torch.from_numpy(np.ascontiguousarray(B, dtype=np.float32)).to(dev)

    def dots(a, b):  # column-wise, float32 products summed in float64
        return (a * b).sum(0, dtype=torch.float64)

    def index(arr):
        return torch.from_numpy(np.asarray(arr, dtype=np.int64)).to(dev)

    bnorm = dots(Bt, Bt).sqrt()
    if X0 is None:
        X = torch.zeros((n, C), dtype=torch.float32, device=dev)
        R = Bt.clone()
    else:
        X = torch.from_numpy(np.array(X0, dtype=np.float32, order="C", copy=True)).to(dev)
        if solved is None or not solved.any():
            R = Bt - X + alpha * torch.sparse.mm(St, X)
        else:  # residuals only where needed: columns the caller knows are solved stay as they are
            R = torch.zeros((n, C), dtype=torch.float32, device=dev)
            todo = index(np.flatnonzero(~solved))
            Xt = X.index_select(1, todo)
            R.index_copy_(1, todo, Bt.index_select(1, todo) - Xt + alpha * torch.sparse.mm(St, Xt))
    zero = (bnorm == 0)[None, :]
    X.masked_fill_(zero, 0.0)
    R.masked_fill_(zero, 0.0)
    thr = tol * bnorm
    rs = dots(R, R)
    active = np.flatnonzero(((bnorm > 0) & (rs.sqrt() > thr)).cpu().numpy())
    act = index(active)
    Xa, Ra = X.index_select(1, act), R.index_select(1, act)
    P = Ra.clone()
    rsa, thra = rs.index_select(0, act), thr.index_select(0, act)
    iters = 0
    products = 0
    while active.size and iters < config.max_iter:
        iters += 1
        products += int(active.size)
        AP = torch.sparse.mm(St, P)
        AP.mul_(-alpha).add_(P)  # AP = P - α S P
        pap = dots(P, AP)
        a = torch.where(pap > 0, rsa / torch.where(pap > 0, pap, 1.0), 0.0).float()
        Xa.addcmul_(P, a)
        Ra.addcmul_(AP, -a)
        del AP
        rs_new = dots(Ra, Ra)
        beta = torch.where(rsa > 0, rs_new / torch.where(rsa > 0, rsa, 1.0), 0.0)
        rsa = rs_new
        if progress is not None:
            progress(iters, config.max_iter)
        still = (rs_new.sqrt() > thra).cpu().numpy()  # the one wait per iteration
        if not still.all():
            done, keep = index(np.flatnonzero(~still)), index(np.flatnonzero(still))
            X.index_copy_(1, act.index_select(0, done), Xa.index_select(1, done))
            rs.index_copy_(0, act.index_select(0, done), rs_new.index_select(0, done))
            active, act = active[still], act.index_select(0, keep)
            Xa, Ra, P = Xa.index_select(1, keep), Ra.index_select(1, keep), P.index_select(1, keep)
            rsa, beta, thra = rsa[keep], beta[keep], thra[keep]
        P.mul_(beta.float()).add_(Ra)  # P = R + β P
    if active.size:
        X.index_copy_(1, act, Xa)
        rs.index_copy_(0, act, rsa)
    bnorm_h, rs_h = bnorm.cpu().numpy(), rs.cpu().numpy()
    rel = np.sqrt(rs_h) / np.where(bnorm_h > 0, bnorm_h, 1.0)
    residual = float(rel.max()) if C else 0.0
    converged = active.size == 0
    if not converged:
        msg = (f"{what}: conjugate gradient stopped after {iters} iterations with relative "
               f"residual {residual:.2e} > tol {tol:.1e} in {active.size} of {C} classes")
        logger.warning(msg)
        warnings.warn(msg, PropagationWarning, stacklevel=4)
    return CGSolve(X.cpu().numpy(), iters, converged, residual, products)


def _torch_csr(S: sp.csr_matrix, device="cpu"):
    """S as a torch sparse CSR float32 tensor on ``device`` (int64 indices on the CPU, as its
    kernels want; int32 on CUDA when they fit, half the index traffic for cuSPARSE)."""
    import torch

    dev = torch.device(device)
    small = dev.type == "cuda" and max(S.nnz, S.shape[0]) < 2**31 - 1
    itype = np.int32 if small else np.int64
    with warnings.catch_warnings():  # "CSR support is in beta": it is what we want here
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(
            torch.from_numpy(S.indptr.astype(itype)),
            torch.from_numpy(S.indices.astype(itype)),
            torch.from_numpy(np.ascontiguousarray(S.data, dtype=np.float32)),
            size=S.shape,
            check_invariants=False,  # built from a valid scipy CSR matrix
        ).to(dev)


def _device_operator(W: sp.csr_matrix, node_weights, device, uploaded: dict | None = None):
    """``normalized_operator(W, node_weights)`` as a sparse CSR float32 tensor on ``device``, bit
    for bit: g (``_operator_scale``, one O(nnz) product) comes from the host, S's weights are the
    same float64 products, in the same order, computed on the device from W's. W is uploaded once
    into ``uploaded`` (when given), for the next operator on the same graph: a propagation's two
    passes. On the host these products took longer than the whole CUDA solve (40M non-zeros: 0.9
    to 1.8 s per operator on this project's 2-core machine). Device memory: W's weights, indices
    and row counts stay there for both passes; making S takes about 24 more bytes per non-zero
    while it runs."""
    import torch

    dev = torch.device(device)
    if uploaded is None:
        uploaded = {}
    if "W" not in uploaded:
        Wt = _torch_csr(W, dev)
        crow = Wt.crow_indices()
        uploaded["W"] = (crow, Wt.col_indices(), Wt.values(), crow.diff().long())
    crow, col, data, counts = uploaded["W"]
    g = torch.from_numpy(_operator_scale(W, node_weights)).to(dev)
    vals = data.double() * torch.repeat_interleave(g, counts, output_size=W.nnz)
    vals *= g.index_select(0, col)
    with warnings.catch_warnings():  # "CSR support is in beta", as in _torch_csr
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, vals.float(), size=W.shape,
                                       check_invariants=False)


def _row_normalize(M: np.ndarray) -> np.ndarray:
    M = np.asarray(M, dtype=np.float32)
    tot = M.sum(axis=1, keepdims=True)
    return np.divide(M, tot, out=np.zeros_like(M), where=tot > 0)


def _argmax_or(M: np.ndarray, connected: np.ndarray, prior: np.ndarray | None) -> np.ndarray:
    """argmax per row; rows not connected get argmax of prior (or -1 without one)."""
    out = np.argmax(M, axis=1).astype(np.int64) if M.shape[1] else np.zeros(len(M), np.int64)
    fallback = int(np.argmax(prior)) if prior is not None else -1
    out[~connected] = fallback
    return out


def _margin(P: np.ndarray) -> np.ndarray:
    n, C = P.shape
    if C == 0:
        return np.zeros(n, dtype=np.float32)
    if C == 1:
        return P[:, 0].astype(np.float32)
    top2 = np.partition(P, C - 2, axis=1)[:, C - 2:]
    return (top2[:, 1] - top2[:, 0]).astype(np.float32)


def _loss_weights(energy: np.ndarray, reliable: np.ndarray) -> np.ndarray:
    w = np.zeros(energy.shape, dtype=np.float32)
    if reliable.any():
        neg = np.maximum(-energy[reliable], 0.0)
        top = float(neg.max())
        if top > 0:
            w[reliable] = neg / top
    return w


def _validated_once(W) -> sp.csr_matrix:
    """``validated_graph(W)``, remembered on the caller's CSR matrix like the locality order
    (``_kept_on``): the re-propagation after each new label hands the same graph again, and
    checking its symmetry costs a transpose (2.2 s of a 40-s propagation at 1M nodes). Checked
    again when the matrix's contents changed; other inputs are checked every time."""
    if not (sp.issparse(W) and W.format == "csr" and W.ndim == 2):
        return validated_graph(W)
    return _kept_on(W, _VALID_ATTR, lambda: _valid_stamp(W), lambda: validated_graph(W))


def _valid_stamp(W: sp.csr_matrix) -> tuple:
    return (*_fingerprint(W), W.shape[1], W.dtype.str, int(W.indptr.sum(dtype=np.int64)))


def mark_validated(W: sp.csr_matrix) -> sp.csr_matrix:
    """Record on W that it is a graph ``propagate`` takes as it is, so that the first
    propagation on it skips ``validated_graph``'s transpose (the symmetry check); checked in full
    as usual once W's contents change. For builders whose graphs are symmetric bit for bit by
    construction (``knn.affinity``): the checks that cost one pass over W are made here, and W
    is left unmarked (to be checked in full) when one fails. Returns W."""
    if (sp.issparse(W) and W.format == "csr" and W.dtype == np.float32
            and W.shape[0] == W.shape[1] and W.has_canonical_format
            and (W.nnz == 0 or (np.isfinite(W.data).all() and W.data.min() > 0))
            and not W.diagonal().any()):
        _kept_on(W, _VALID_ATTR, lambda: _valid_stamp(W), lambda: W)
    return W


def validated_graph(W) -> sp.csr_matrix:
    if not sp.issparse(W):
        raise DataFormatError(
            f"propagate: W must be a scipy sparse matrix (n, n), got {type(W).__name__}"
        )
    if W.ndim != 2 or W.shape[0] != W.shape[1]:
        raise DataFormatError(f"propagate: W must be square, got shape {W.shape}")
    W = sp.csr_matrix(W, dtype=np.float32)
    W.sum_duplicates()
    if W.nnz and not np.isfinite(W.data).all():
        raise DataFormatError("propagate: W has NaN or infinite weights")
    if W.nnz and W.data.min() < 0:
        raise DataFormatError(
            f"propagate: W must be non-negative, found weight {float(W.data.min()):.3g}"
        )
    if W.diagonal().any():
        W.setdiag(0)
    W.eliminate_zeros()
    W.sort_indices()
    T = W.T.tocsr()
    T.sort_indices()
    scale = max(float(W.data.max()), 1e-30) if W.nnz else 1.0
    if not (np.array_equal(W.indptr, T.indptr) and np.array_equal(W.indices, T.indices)
            and np.allclose(W.data, T.data, rtol=1e-5, atol=1e-6 * scale)):
        raise DataFormatError(
            "propagate: W must be symmetric (use knn.affinity, which symmetrises the kNN graph)"
        )
    return W


def _validated_labels(labels, n: int, num_classes) -> np.ndarray:
    if (isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer))
            or num_classes < 1):
        raise LabelError(f"propagate: num_classes must be an integer >= 1, got {num_classes!r}")
    y = np.asarray(labels)
    if y.shape != (n,):
        raise LabelError(f"propagate: labels must have shape ({n},) like W, got {y.shape}")
    if y.dtype.kind not in "iu":
        if y.dtype.kind == "f" and np.isfinite(y).all() and (y == np.round(y)).all():
            y = y.astype(np.int64)
        else:
            raise LabelError(f"propagate: labels must be integers (-1 = unlabeled), got {y.dtype}")
    y = y.astype(np.int64)
    bad = (y < -1) | (y >= num_classes)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise LabelError(
            f"propagate: label {int(y[i])} of sample {i} is out of range; expected -1 (unlabeled) "
            f"or 0..{num_classes - 1} ({int(bad.sum())} such samples)"
        )
    if not (y >= 0).any():
        raise LabelError("propagate: no labeled sample; label at least one sample first")
    return y


def _validated_prior(prior, C: int) -> np.ndarray:
    p = np.asarray(prior, dtype=np.float64)
    if p.shape != (C,) or not np.isfinite(p).all() or (p < 0).any() or p.sum() <= 0:
        raise DataFormatError(
            f"propagate: prior must be {C} finite non-negative numbers with a positive sum"
        )
    p = np.maximum(p / p.sum(), 1e-12)
    return p / p.sum()


def _validated_predictions(pred, n: int, C: int) -> np.ndarray:
    q = np.asarray(pred)
    if q.shape != (n,) or q.dtype.kind not in "iu":
        raise LabelError(f"propagate: predictions must be integers of shape ({n},), got "
                         f"{q.dtype} {q.shape}")
    q = q.astype(np.int64)
    if ((q < -1) | (q >= C)).any():
        i = int(np.flatnonzero((q < -1) | (q >= C))[0])
        raise LabelError(f"propagate: prediction {int(q[i])} of sample {i} is not in -1..{C - 1}")
    return q

"""Balanced propagation, energy, thresholds: exact references, warm start, edge cases."""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pytest
import scipy.sparse as sp

from speler.config import GraphConfig, PropagationConfig
from speler.errors import ConfigError, DataFormatError, LabelError
from speler.graph.knn import affinity, build_knn
from speler.graph.propagate import (
    PropagationWarning, balance_drift, balance_weights, class_thresholds, combine,
    energy_from_scores,
    estimate_prior, label_prior, normalized_operator, propagate, seed_matrix, spectral_balance,
    with_system,
)

def _problem(n=300, C=4, seed=0, spread=1.2, labeled=24):
    """Overlapping Gaussian classes (a connected kNN graph) with a few labels per class."""
    rng = np.random.default_rng(seed)
    sizes = np.maximum(5, (n * np.array([0.5, 0.25, 0.15, 0.1, 0.05, 0.05])[:C]).astype(int))
    y = np.repeat(np.arange(C), sizes)[:n]
    y = np.concatenate([y, rng.integers(0, C, n - len(y))]) if len(y) < n else y
    x = rng.standard_normal((C, 10))[y] * spread + rng.standard_normal((n, 10))
    W = affinity(build_knn(x, config=GraphConfig(use_gpu=False), k=10))
    labels = np.full(n, -1)
    for c in range(C):
        members = np.flatnonzero(y == c)
        labels[members[: max(1, labeled * len(members) // n)]] = c
    return x, y, W, labels


def _dense_solution(S_dense: np.ndarray, labels: np.ndarray, C: int, alpha: float,
                    beta: float = PropagationConfig().seed_exponent) -> np.ndarray:
    """(I - αS)^-1 (1 - α) Y, each label of class c seeding n_c^-β (n_c: c's labels)."""
    n = len(labels)
    Y = np.zeros((n, C))
    for i in np.flatnonzero(labels >= 0):
        Y[i, labels[i]] = float((labels == labels[i]).sum()) ** -beta
    return np.linalg.solve(np.eye(n) - alpha * S_dense, (1 - alpha) * Y)


def _prior_by_hand(labels: np.ndarray, C: int, beta: float) -> np.ndarray:
    """p_c ∝ max(n_c, 1/2)^(1 - β): class c's share of the seed mass."""
    mass = np.array([max(float((labels == c).sum()), 0.5) ** (1 - beta) for c in range(C)])
    return mass / mass.sum()


def _dense_normalized(W: sp.csr_matrix, w: np.ndarray | None = None) -> np.ndarray:
    Wd = W.toarray().astype(np.float64)
    if w is not None:
        Wd = Wd * w[:, None] * w[None, :]
    d = Wd.sum(axis=1)
    g = np.where(d > 0, 1 / np.sqrt(np.where(d > 0, d, 1)), 0)
    return Wd * g[:, None] * g[None, :]


@pytest.mark.parametrize("alpha, beta", [(0.5, 0.5), (0.9, 0.5), (0.99, 0.5), (0.9, 0.0),
                                         (0.9, 1.0)])
def test_plain_propagation_equals_dense_closed_form(alpha, beta):
    _, _, W, labels = _problem(seed=1)
    assert len(set(np.bincount(labels[labels >= 0]))) > 1  # unequal label counts: β matters
    cfg = PropagationConfig(alpha=alpha, balance=False, tol=1e-8, max_iter=1000,
                            seed_exponent=beta)
    r = propagate(W, labels, num_classes=4, config=cfg)
    M = _dense_solution(_dense_normalized(W), labels, 4, alpha, beta)
    assert r.solve.converged and r.scores.dtype == np.float32 and r.scores.shape == (300, 4)
    assert np.abs(r.scores - M).max() <= 1e-5 * np.abs(M).max()


@pytest.mark.parametrize("balance_prior", ["labels", "predictions"])
def test_balanced_propagation_equals_dense_closed_form(balance_prior):
    _, y, W, labels = _problem(seed=2)
    labels = np.where((labels == 0) & (np.arange(300) % 2 == 0), -1, labels)  # class 0 under-seeded
    pred = np.where(labels >= 0, -1, (y + (np.arange(300) % 7 == 0)) % 4)  # imperfect predictions
    cfg = PropagationConfig(alpha=0.9, tol=1e-8, max_iter=1000, balance_prior=balance_prior)
    r = propagate(W, labels, num_classes=4, config=cfg, predictions=pred)
    beta = cfg.seed_exponent
    p = _prior_by_hand(labels, 4, beta) if balance_prior == "labels" \
        else estimate_prior(labels, pred, 4)
    np.testing.assert_allclose(label_prior(labels, 4, beta), _prior_by_hand(labels, 4, beta))
    assert not np.allclose(label_prior(labels, 4, beta), estimate_prior(labels, pred, 4), atol=0.02)
    who = np.where(labels >= 0, labels, pred)
    M = _dense_solution(_dense_normalized(W, p[who] ** -0.5), labels, 4, 0.9)
    np.testing.assert_allclose(r.prior, p, rtol=1e-6)
    assert r.solve.first_pass_iterations == 0  # predictions given: no unbalanced pass
    assert np.abs(r.scores - M).max() <= 1e-5 * np.abs(M).max()
    lab = labels >= 0
    assert (r.labels[lab] == labels[lab]).all()
    assert (r.labels[~lab] == M[~lab].argmax(axis=1)).all()


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_a_class_seed_mass_grows_as_its_label_count_to_one_minus_beta(beta):
    """Each label of class c seeds (1 - α) n_c^-β: 9 labels hold 9^(1-β) times the mass of 1, the
    share ``label_prior`` gives the balance; the rows of a shard are the whole matrix's rows."""
    labels = np.array([0] * 9 + [1] + [-1] * 5 + [2] * 4)
    cfg = PropagationConfig(alpha=0.8, seed_exponent=beta)
    B = seed_matrix(labels, 4, cfg)
    mass = B.sum(axis=0)
    np.testing.assert_allclose(mass, 0.2 * np.array([9 ** (1 - beta), 1, 4 ** (1 - beta), 0]),
                               rtol=1e-6)
    assert (B[labels < 0] == 0).all() and (np.count_nonzero(B, axis=1) == (labels >= 0)).all()
    p = label_prior(labels, 4, beta)  # the labeled classes in the ratios of their seed mass
    np.testing.assert_allclose(p[:3] / p[1], mass[:3] / mass[1], rtol=1e-6)
    np.testing.assert_array_equal(seed_matrix(labels, 4, cfg, rows=slice(8, 16)), B[8:16])


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_a_class_without_labels_weighs_half_of_one_label_and_is_never_the_fallback(beta):
    labels = np.array([-1, 2, 2, 2, -1, 1, -1])
    p = label_prior(labels, 4, beta)
    mass = np.array([0.5, 1.0, 3.0 ** (1 - beta), 0.5])
    np.testing.assert_allclose(p, mass / mass.sum())
    # two samples no label reaches: they take the most likely labeled class, never class 0 or 3
    W = sp.csr_matrix(np.array([[0, 1, 0, 0, 0, 0, 0], [1, 0, 1, 0, 0, 0, 0],
                                [0, 1, 0, 1, 0, 0, 0], [0, 0, 1, 0, 0, 0, 0],
                                [0, 0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 1, 0, 0],
                                [0, 0, 0, 0, 0, 0, 0]], float))
    r = propagate(W, labels, num_classes=4, config=PropagationConfig(seed_exponent=beta))
    assert r.labels[6] in (1, 2) and not r.connected[6]
    assert set(r.labels.tolist()) <= {1, 2}


def test_balance_formula_on_hand_made_graph():
    # path 0 - 1 - 2 - 3 with weights 1, 2, 3; classes 0, 0, 1, 1 with p = (0.8, 0.2)
    W = sp.csr_matrix(np.array([[0, 1, 0, 0], [1, 0, 2, 0], [0, 2, 0, 3], [0, 0, 3, 0]], float))
    labels = np.array([0, -1, 1, -1])
    p = np.array([0.8, 0.2])
    w = balance_weights(labels, p, predictions=np.array([-1, 0, -1, 1]))
    np.testing.assert_allclose(w, [0.8 ** -0.5, 0.8 ** -0.5, 0.2 ** -0.5, 0.2 ** -0.5])
    # w_hat_ij = w_ij (p_i p_j)^-1/2 by hand, then D^-1/2 W_hat D^-1/2
    wh = np.array([[0, 1 / 0.8, 0, 0],
                   [1 / 0.8, 0, 2 / math.sqrt(0.16), 0],
                   [0, 2 / math.sqrt(0.16), 0, 3 / 0.2],
                   [0, 0, 3 / 0.2, 0]])
    d = wh.sum(axis=1)
    expect = wh / np.sqrt(np.outer(d, d))
    np.testing.assert_allclose(normalized_operator(W, w).toarray(), expect, rtol=1e-6)
    # soft membership: exp(sum_c P_ic log p_c); a row of zeros gets the geometric mean of p
    P = np.array([[0, 0], [0.5, 0.5], [0, 0], [0, 0]])
    w2 = balance_weights(np.array([-1, -1, -1, 1]), p, memberships=P)
    gm = math.sqrt(0.8 * 0.2)
    np.testing.assert_allclose(w2, [gm ** -0.5, gm ** -0.5, gm ** -0.5, 0.2 ** -0.5])


def test_prior_counts_labels_and_predictions_once():
    labels = np.array([0, 0, 1, -1, -1, -1, -1, -1])
    pred = np.array([1, 1, 1, 0, 0, 0, 2, -1])  # predictions of labeled samples are ignored
    p = estimate_prior(labels, pred, 4)
    # class 0: 2 labels + 3 predicted, class 1: 1 label, class 2: 1 predicted, class 3: 0 -> 0.5
    np.testing.assert_allclose(p, np.array([5, 1, 1, 0.5]) / 7.5)


def test_label_prior_is_the_share_of_human_labels():
    labels = np.array([0, 0, 0, 1, -1, -1, -1, -1])
    np.testing.assert_allclose(label_prior(labels, 3), np.array([3, 1, 0.5]) / 4.5)
    np.testing.assert_allclose(label_prior(np.full(5, -1), 4), np.full(4, 0.25))


def test_balance_prior_choice_sets_the_node_weights():
    # class 1 gets as many labels as class 0 though it has half its samples: by the label share
    # both weigh the same; by the predictions (class sizes) class 1 is boosted
    _, y, W, _ = _problem(seed=3, C=2)
    labels = np.full(len(y), -1)
    for c in (0, 1):
        labels[np.flatnonzero(y == c)[:6]] = c
    by_labels = spectral_balance(W, labels, num_classes=2,
                                 config=PropagationConfig(balance_prior="labels"))[0]
    by_pred = spectral_balance(W, labels, num_classes=2,
                               config=PropagationConfig(balance_prior="predictions"))[0]
    lab0, lab1 = labels == 0, labels == 1
    np.testing.assert_allclose(by_labels[lab1], by_labels[lab0])
    assert by_pred[lab1].mean() > 1.2 * by_pred[lab0].mean()
    with pytest.raises(ConfigError, match="balance_prior"):
        PropagationConfig(balance_prior="truth")


def test_energy_matches_direct_computation():
    rng = np.random.default_rng(4)
    M = rng.random((40, 3)) ** 3
    M[5] = 0.0  # a sample no seed reaches
    labels = rng.integers(0, 3, 40)
    labeled = np.zeros(40, bool)
    labeled[:6] = True
    labels[2] = 2
    e = energy_from_scores(M, labels, labeled=labeled)
    s = []
    for c in range(3):
        vals = [M[i, c] for i in range(40) if labels[i] == c and not labeled[i] and M[i, c] > 0]
        s.append(np.median(vals))
    ell = np.zeros(40)
    for i in range(40):
        if M[i].max() > 0:
            ell[i] = math.log(sum(math.exp(10 * M[i, c] / s[c]) for c in range(3))) - math.log(3)
    ref = [ell[i] for i in range(40) if not labeled[i] and ell[i] > 0]
    expect = -10 * ell / np.median(ref)
    np.testing.assert_allclose(e, expect, rtol=1e-5, atol=1e-6)
    assert e[5] == 0.0 and (e <= 0).all()
    # scale-robust: a global factor, or a factor per column, changes nothing
    np.testing.assert_allclose(energy_from_scores(M * 1e4, labels, labeled=labeled), e, rtol=1e-5)
    np.testing.assert_allclose(
        energy_from_scores(M * np.array([3.0, 0.01, 70.0]), labels, labeled=labeled), e, rtol=1e-5)


def test_thresholds_formula():
    t = class_thresholds(-9.5, np.array([100, 50, 10, 0]))
    v = np.array([1.0, 0.5, 0.1, 0.0])
    np.testing.assert_allclose(t, -9.5 * v / (2 - v), rtol=1e-6)


def test_reliability_and_weights_follow_the_thresholds():
    _, _, W, labels = _problem(seed=5)
    r = propagate(W, labels, num_classes=4)
    lab = labels >= 0
    counts = np.bincount(r.labels, minlength=4)
    np.testing.assert_allclose(r.thresholds, class_thresholds(-9.5, counts))
    expect = (~lab) & (r.energy <= r.thresholds[r.labels]) & (r.energy < 0)
    assert (r.reliable == expect).all() and 0 < r.reliable.sum() < (~lab).sum()
    assert (r.weights[~r.reliable] == 0).all() and r.weights.max() == pytest.approx(1.0)
    np.testing.assert_allclose(r.weights[r.reliable],
                               -r.energy[r.reliable] / (-r.energy[r.reliable]).max(), rtol=1e-6)
    assert r.margin.min() >= 0 and r.margin.max() <= 1 + 1e-6
    assert np.median(r.energy[~lab]) == pytest.approx(-10.0, rel=1e-3)


def test_rescaling_embeddings_or_graph_keeps_the_reliable_set():
    x, _, W, labels = _problem(seed=6)
    base = propagate(W, labels, num_classes=4)
    W_big = affinity(build_knn(x * 1000.0, config=GraphConfig(use_gpu=False), k=10))
    for W2 in (W_big, W * 0.001, W * 37.0):
        r = propagate(W2, labels, num_classes=4)
        assert (r.reliable == base.reliable).all()
        assert (r.labels == base.labels).all()
        np.testing.assert_allclose(r.energy, base.energy, rtol=1e-3, atol=1e-3)


def test_warm_start_gives_the_same_answer_with_less_work():
    _, y, W, labels = _problem(n=400, seed=7)
    pred = np.where(labels >= 0, -1, y)
    cfg = PropagationConfig(alpha=0.95, tol=1e-7, max_iter=1000)
    first = propagate(W, labels, num_classes=4, config=cfg, predictions=pred)
    node = np.flatnonzero((labels < 0) & (y == 2))[0]
    for new_label in (2, 0):  # agrees with the prediction (same graph weights), then not
        new = labels.copy()
        new[node] = new_label
        kw = dict(num_classes=4, config=cfg, predictions=pred, prior=first.prior)
        cold = propagate(W, new, **kw)
        warm = propagate(W, new, warm_start=first.scores, **kw)
        assert np.abs(warm.scores - cold.scores).max() <= 1e-5 * np.abs(cold.scores).max()
        assert (warm.labels == cold.labels).all()
        assert warm.solve.iterations <= cold.solve.iterations
        assert warm.solve.products < cold.solve.products
    # with unchanged balance weights only the new label's column is not solved yet
    new = labels.copy()
    new[node] = 2
    warm = propagate(W, new, num_classes=4, config=cfg, predictions=pred, prior=first.prior,
                     warm_start=first.scores)
    assert warm.solve.products < 2 * warm.solve.iterations  # about one column active throughout


def test_warm_start_from_a_result_keeps_its_balance():
    _, y, W, labels = _problem(n=400, seed=17)
    cfg = PropagationConfig(tol=1e-7)
    first = propagate(W, labels, num_classes=4, config=cfg)
    node = np.flatnonzero(labels < 0)[3]
    new = labels.copy()
    new[node] = 1
    warm = propagate(W, new, num_classes=4, config=cfg, warm_start=first)
    assert warm.solve.first_pass_iterations == 0 and warm.solve.products < 2 * warm.solve.iterations
    np.testing.assert_array_equal(warm.solve.balance_weights, first.solve.balance_weights)
    np.testing.assert_array_equal(warm.prior, first.prior)
    p = first.prior.astype(np.float64)
    w = first.solve.balance_weights.astype(np.float64)
    M = _dense_solution(_dense_normalized(W, w), new, 4, cfg.alpha)
    assert np.abs(warm.scores - M).max() <= 1e-5 * np.abs(M).max()
    assert warm.labels[node] == 1 and p.shape == (4,)
    # edited scores void the fingerprint: nothing is taken as solved, the answer stays exact
    zero = propagate(W, new, num_classes=4, config=cfg,
                     warm_start=dataclasses.replace(first, scores=np.zeros_like(first.scores)))
    assert np.abs(zero.scores - M).max() <= 1e-5 * np.abs(M).max()
    # another α is another system: nothing may be skipped
    other = PropagationConfig(tol=1e-7, alpha=0.9)
    warm9 = propagate(W, new, num_classes=4, config=other, warm_start=first)
    M9 = _dense_solution(_dense_normalized(W, w), new, 4, 0.9)
    assert np.abs(warm9.scores - M9).max() <= 1e-5 * np.abs(M9).max()
    assert warm9.solve.products > 2 * warm9.solve.iterations
    # so is another seed exponent: every class's seeds have another scale
    one = PropagationConfig(tol=1e-7, seed_exponent=0.0)
    warm0 = propagate(W, new, num_classes=4, config=one, warm_start=first)
    M0 = _dense_solution(_dense_normalized(W, w), new, 4, cfg.alpha, 0.0)
    assert np.abs(warm0.scores - M0).max() <= 1e-5 * np.abs(M0).max()
    assert warm0.solve.products > 2 * warm0.solve.iterations


def test_balance_drift_is_the_largest_relative_move_of_a_class_share():
    _, y, W, labels = _problem(n=400, seed=17)
    labels[np.flatnonzero(labels == 3)[1:]] = -1  # class 3 keeps one label, class 0 has 12
    cfg = PropagationConfig(tol=1e-7)
    first = propagate(W, labels, num_classes=4, config=cfg)
    assert balance_drift(first, labels, cfg) == pytest.approx(0.0, abs=1e-6)  # float32 prior
    unlabeled = np.flatnonzero(labels < 0)
    second = labels.copy()
    second[unlabeled[(y[unlabeled] == 3)][0]] = 3  # 1 → 2 labels: its mass × √2
    before, after = _prior_by_hand(labels, 4, 0.5), _prior_by_hand(second, 4, 0.5)
    assert balance_drift(first, second, cfg) == pytest.approx(np.max(np.abs(after / before - 1)))
    assert balance_drift(first, second, cfg) > 0.3
    big = labels.copy()
    big[unlabeled[(y[unlabeled] == 0)][0]] = 0  # 12 → 13 labels: every share moves < 10 %
    assert 0 < balance_drift(first, big, cfg) < 0.1
    assert balance_drift(first, second, dataclasses.replace(cfg, balance=False)) == 0.0
    # with the prior of the predictions, a label that agrees with the prediction moves no count
    pcfg = dataclasses.replace(cfg, balance_prior="predictions")
    pfirst = propagate(W, labels, num_classes=4, config=pcfg)
    node = unlabeled[0]
    agree, disagree = labels.copy(), labels.copy()
    agree[node] = pfirst.labels[node]
    disagree[node] = (pfirst.labels[node] + 1) % 4
    assert balance_drift(pfirst, agree, pcfg) == 0.0
    assert balance_drift(pfirst, disagree, pcfg) > 0.0


def test_a_result_solved_elsewhere_names_its_graph_and_warm_starts_as_one_from_propagate():
    _, y, W, labels = _problem(n=400, seed=17)
    cfg = PropagationConfig(tol=1e-7)
    first = propagate(W, labels, num_classes=4, config=cfg)
    # scores solved by row shards come without the system (graph.sharded); rank 0 names it
    bare = dataclasses.replace(first, solve=dataclasses.replace(first.solve, system=None))
    named = with_system(bare, W, cfg)
    assert named.solve.system == first.solve.system and bare.solve.system is None
    assert with_system(first, W, cfg) is first
    new = labels.copy()
    new[np.flatnonzero(labels < 0)[3]] = 1
    from_named = propagate(W, new, num_classes=4, config=cfg, warm_start=named)
    from_first = propagate(W, new, num_classes=4, config=cfg, warm_start=first)
    assert from_named.solve.products == from_first.solve.products < 2 * from_first.solve.iterations
    np.testing.assert_array_equal(from_named.scores, from_first.scores)
    # named after another graph, the result is another system: propagate on W skips nothing
    other = with_system(bare, W * 2.0, cfg)
    assert other.solve.system[0] != first.solve.system[0]
    assert other.solve.system[1:] == first.solve.system[1:]


def test_locality_order_gives_the_same_answer(monkeypatch):
    import speler.graph.propagate as prop

    _, _, W, labels = _problem(n=300, seed=18)
    cfg = PropagationConfig(tol=1e-8, device="cpu")  # the order is the CPU solver's
    plain = propagate(W, labels, num_classes=4, config=dataclasses.replace(cfg, reorder=False))
    monkeypatch.setattr(prop, "_REORDER_MIN_N", 0)
    ordered = propagate(W, labels, num_classes=4, config=dataclasses.replace(cfg, reorder=True))
    assert np.abs(ordered.scores - plain.scores).max() <= 1e-5 * np.abs(plain.scores).max()
    assert (ordered.labels == plain.labels).all() and (ordered.reliable == plain.reliable).all()


def test_solver_threads_follow_the_setting_the_graph_size_and_the_free_cores(monkeypatch):
    import torch

    import speler.graph.propagate as prop
    import speler.system as system

    before = torch.get_num_threads()
    torch.set_num_threads(2)  # torch's own setting, as on an idle 2-core machine
    try:
        monkeypatch.setattr(system, "free_cores", lambda: 64)
        with prop.solver_threads(3, 10) as n:
            assert n == 3 and torch.get_num_threads() == 3  # an explicit setting, as it is
        with prop.solver_threads(0, prop.THREADS_MIN_NNZ - 1) as n:
            assert n == 1 and torch.get_num_threads() == 1  # a small graph: one thread
        with prop.solver_threads(0, prop.THREADS_MIN_NNZ) as n:
            assert n == 2  # never more than torch's own setting
        monkeypatch.setattr(system, "free_cores", lambda: 1)  # another task busy on a core
        with prop.solver_threads(0, prop.THREADS_MIN_NNZ) as n:
            assert n == 1
        with pytest.raises(RuntimeError), prop.solver_threads(3, 10):
            raise RuntimeError("a failed solve")
        assert torch.get_num_threads() == 2  # restored after every solve, failed ones too
    finally:
        torch.set_num_threads(before)


def test_two_solver_threads_give_the_answer_of_one():
    _, _, W, labels = _problem(n=300, seed=18)
    one = propagate(W, labels, num_classes=4, config=PropagationConfig(threads=1, tol=1e-8))
    two = propagate(W, labels, num_classes=4, config=PropagationConfig(threads=2, tol=1e-8))
    assert np.abs(two.scores - one.scores).max() <= 1e-6 * np.abs(one.scores).max()
    assert (two.labels == one.labels).all() and (two.reliable == one.reliable).all()


def test_locality_order_is_kept_with_its_graph_and_redone_when_the_graph_changes(monkeypatch):
    import speler.graph.propagate as prop

    _, _, W, labels = _problem(n=300, seed=18)
    monkeypatch.setattr(prop, "_REORDER_MIN_N", 0)
    calls = []
    order_of = prop._locality_order
    monkeypatch.setattr(prop, "_locality_order", lambda G: calls.append(1) or order_of(G))
    cfg = PropagationConfig(reorder=True, device="cpu")  # a GPU solve needs no locality order
    first = propagate(W, labels, num_classes=4, config=cfg)
    propagate(W, np.where(np.arange(300) == 7, 0, labels), num_classes=4, config=cfg)
    assert len(calls) == 1  # the second propagation on the same graph reused the order
    other = W.copy()  # another graph object: its own order, nothing shared through the module
    propagate(other, labels, num_classes=4, config=cfg)
    assert len(calls) == 2
    W.data *= 2.0  # the same object with other weights: the order is computed again
    again = propagate(W, labels, num_classes=4, config=cfg)
    assert len(calls) == 3
    np.testing.assert_array_equal(again.labels, first.labels)  # S is scale-free


def test_a_graph_is_checked_once_and_again_when_its_contents_change(monkeypatch):
    """The re-propagation after each label hands the same graph: its (transpose) symmetry check
    runs once per graph object and again when the matrix changed, so an edit that breaks it is
    still refused."""
    import speler.graph.propagate as prop

    _, _, W, labels = _problem(n=300, seed=19)
    W = W.copy()  # a copy does not carry knn.affinity's mark (test_knn): checked like any input
    checks = []
    check = prop.validated_graph
    monkeypatch.setattr(prop, "validated_graph", lambda G: checks.append(1) or check(G))
    first = propagate(W, labels, num_classes=4)
    new = labels.copy()
    new[np.flatnonzero(labels < 0)[0]] = 1  # one more human label
    again = propagate(W, new, num_classes=4)
    assert len(checks) == 1 and not np.array_equal(again.scores, first.scores)
    propagate(W.copy(), labels, num_classes=4)  # another object: checked on its own
    assert len(checks) == 2
    i = int(np.flatnonzero(W.indptr[1:] > W.indptr[:-1])[0])
    W.data[W.indptr[i]] *= 3.0  # one direction of one edge: no longer symmetric
    with pytest.raises(DataFormatError, match="symmetric"):
        propagate(W, labels, num_classes=4)
    assert len(checks) == 3


def test_non_convergence_is_a_warning_and_a_flag():
    _, _, W, labels = _problem(seed=8)
    with pytest.warns(PropagationWarning, match="stopped after 2 iterations"):
        r = propagate(W, labels, num_classes=4,
                      config=PropagationConfig(alpha=0.99, balance=False, max_iter=2))
    assert not r.solve.converged and r.solve.iterations == 2 and r.solve.residual > 1e-6
    assert np.isfinite(r.scores).all()


def test_isolated_samples_and_unlabeled_components():
    _, _, W, labels = _problem(n=200, seed=9)
    W = sp.block_diag([W, sp.csr_matrix((3, 3)), sp.csr_matrix(np.array([[0, 1.0], [1.0, 0]]))],
                      format="csr")
    labels = np.concatenate([labels, [-1, -1, -1, -1, -1]])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no division by zero anywhere
        r = propagate(W, labels, num_classes=4)
    for arr in (r.scores, r.energy, r.margin, r.weights):
        assert np.isfinite(arr).all()
    tail = slice(200, 205)
    assert not r.connected[tail].any() and not r.reliable[tail].any()
    assert (r.energy[tail] == 0).all() and (r.margin[tail] == 0).all()
    assert (r.labels[tail] == int(np.argmax(r.prior))).all()


def test_class_without_labels_is_never_predicted():
    _, _, W, labels = _problem(seed=10)
    labels = np.where(labels == 3, -1, labels)
    r = propagate(W, labels, num_classes=5)  # classes 3 and 4 have no labeled sample
    assert not np.isin(r.labels, [3, 4]).any()
    assert (r.scores[:, 3:] == 0).all() and np.isfinite(r.energy).all()
    assert r.prior[3] > 0 and r.thresholds[3] == 0 and r.thresholds[4] == 0


def test_single_class():
    _, _, W, labels = _problem(seed=11)
    ones = np.where(labels >= 0, 0, -1)
    r = propagate(W, ones, num_classes=1)
    assert (r.labels == 0).all() and r.scores.shape == (300, 1)
    assert np.allclose(r.margin[r.connected], 1.0) and np.isfinite(r.energy).all()


def test_bad_inputs():
    _, _, W, labels = _problem(n=120, seed=12)
    with pytest.raises(LabelError, match="label 7 of sample 3 is out of range; expected -1"):
        propagate(W, np.where(np.arange(120) == 3, 7, labels), num_classes=4)
    with pytest.raises(LabelError, match="label -2 of sample 0"):
        propagate(W, np.where(np.arange(120) == 0, -2, labels), num_classes=4)
    with pytest.raises(LabelError, match="no labeled sample"):
        propagate(W, np.full(120, -1), num_classes=4)
    with pytest.raises(LabelError, match=r"labels must have shape \(120,\)"):
        propagate(W, labels[:-1], num_classes=4)
    with pytest.raises(LabelError, match="num_classes must be an integer >= 1"):
        propagate(W, labels, num_classes=0)
    with pytest.raises(DataFormatError, match="scipy sparse"):
        propagate(W.toarray(), labels, num_classes=4)
    A = W.tolil()
    A[0, 5] = 3.0
    with pytest.raises(DataFormatError, match="symmetric"):
        propagate(A.tocsr(), labels, num_classes=4)
    B = W.copy()
    B.data[0] = np.nan
    with pytest.raises(DataFormatError, match="NaN or infinite"):
        propagate(B, labels, num_classes=4)
    with pytest.raises(LabelError, match="prediction 9 of sample"):
        propagate(W, labels, num_classes=4, predictions=np.full(120, 9))
    with pytest.raises(DataFormatError, match="warm_start must be a finite array"):
        propagate(W, labels, num_classes=4, warm_start=np.zeros((120, 3)))


def test_combine_takes_the_mean_scores_and_the_or_of_the_branches():
    x, y, W, labels = _problem(seed=13)
    W2 = affinity(build_knn(x[:, ::-1] ** 3, config=GraphConfig(use_gpu=False), k=8))
    a = propagate(W, labels, num_classes=4)
    b = propagate(W2, labels, num_classes=4)
    c = combine(a, b)
    mean = 0.5 * (a.normalized + b.normalized)
    lab = labels >= 0
    assert (c.labels[~lab] == mean[~lab].argmax(axis=1)).all()
    assert (c.labels[lab] == labels[lab]).all()
    np.testing.assert_allclose(c.energy, np.minimum(a.energy, b.energy))
    thr = class_thresholds(-9.5, np.bincount(c.labels, minlength=4))
    either = (a.energy <= thr[c.labels]) | (b.energy <= thr[c.labels])
    assert (c.reliable == (either & ~lab & (c.energy < 0))).all()
    with pytest.raises(LabelError, match="different human labels"):
        combine(a, propagate(W2, np.where(np.arange(300) == 299, 1, labels), num_classes=4))


def test_spectral_balance_matches_what_propagate_uses():
    _, _, W, labels = _problem(seed=14)
    w, p = spectral_balance(W, labels, num_classes=4)
    r = propagate(W, labels, num_classes=4)
    np.testing.assert_allclose(r.prior, p, rtol=1e-6)
    assert w.shape == (300,) and (w > 0).all()

"""Query strategies: the shared contract, exact references for the baselines, and what makes
``speler`` different (boundary over outlier, diversity, minority first) on real graphs."""

from __future__ import annotations

import numpy as np
import pytest

from speler.config import GraphConfig, PropagationConfig, SelectionConfig
from speler.errors import ConfigError, DataFormatError
from speler.graph.knn import KnnGraph, affinity, build_knn
from speler.graph.propagate import PropagationResult, SolveInfo, propagate
from speler.selection import STRATEGIES, Suggestion, suggest

ALL = sorted(STRATEGIES)


def _result(scores, *, labels=None, margin=None, energy=None) -> PropagationResult:
    """A PropagationResult from hand-made arrays (for tests that need exact control)."""
    scores = np.asarray(scores, dtype=np.float32)
    n, c = scores.shape
    srt = np.sort(scores, axis=1)
    return PropagationResult(
        scores=scores,
        labels=np.argmax(scores, axis=1).astype(np.int64) if labels is None else labels,
        margin=(srt[:, -1] - srt[:, -2]).astype(np.float32) if margin is None else margin,
        energy=(-np.log(np.exp(scores).sum(axis=1))).astype(np.float32) if energy is None else energy,
        reliable=np.zeros(n, dtype=bool), weights=np.zeros(n, dtype=np.float32),
        thresholds=np.zeros(c, dtype=np.float32), prior=np.full(c, 1.0 / c, dtype=np.float32),
        connected=np.ones(n, dtype=bool), labeled=np.zeros(n, dtype=bool),
        solve=SolveInfo(iterations=0, converged=True, residual=0.0, seconds=0.0),
    )


@pytest.fixture(scope="module")
def problem():
    """300 samples in 4 gaussian blobs (d = 8), 30 labeled, a real kNN graph and propagation."""
    rng = np.random.default_rng(0)
    n, c = 300, 4
    y = np.arange(n) % c
    centres = rng.normal(size=(c, 8)) * 2.0
    emb = (centres[y] + rng.normal(size=(n, 8))).astype(np.float32)
    human = np.full(n, -1, dtype=np.int64)
    human[:30] = y[:30]
    graph = build_knn(emb, config=GraphConfig(k=8, use_gpu=False))
    res = propagate(affinity(graph), human, num_classes=c, config=PropagationConfig())
    logits = rng.normal(size=(n, c))
    probs = (np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)).astype(np.float32)
    return dict(propagation=res, embeddings=emb, labeled=human >= 0, probs=probs, graph=graph,
                classes=("wave", "clap", "kick", "sit"), ids=[f"s{i}" for i in range(n)],
                human_counts=np.bincount(human[human >= 0], minlength=c))


# -- the contract, every strategy -------------------------------------------------------------------

@pytest.mark.parametrize("strategy", ALL)
def test_contract_ranked_unlabeled_within_budget(problem, strategy):
    out = suggest(strategy, budget=12, seed=3, **problem)
    assert len(out) == 12
    assert all(isinstance(s, Suggestion) for s in out)
    idx = [s.index for s in out]
    assert len(set(idx)) == 12
    assert not problem["labeled"][idx].any()
    assert [s.id for s in out] == [problem["ids"][i] for i in idx]
    scores = [s.score for s in out]
    assert scores == sorted(scores, reverse=True)
    res = problem["propagation"]
    for s in out:
        assert s.reason and isinstance(s.reason, str)
        assert s.predicted == res.labels[s.index]
        assert s.runner_up != s.predicted and 0 <= s.runner_up < 4
        assert s.energy == pytest.approx(float(res.energy[s.index]))
        assert s.margin == pytest.approx(float(res.margin[s.index]))


@pytest.mark.parametrize("strategy", ALL)
def test_contract_deterministic_under_a_seed(problem, strategy):
    a = suggest(strategy, budget=10, seed=7, **problem)
    b = suggest(strategy, budget=10, seed=7, **problem)
    assert a == b


@pytest.mark.parametrize("strategy", ALL)
def test_contract_small_pools(problem, strategy):
    labeled = np.ones(300, dtype=bool)
    few = [5, 77, 150, 299]
    labeled[few] = False
    args = dict(problem, labeled=labeled)
    out = suggest(strategy, budget=10, **args)
    assert sorted(s.index for s in out) == few  # fewer than the budget: all that is left
    assert suggest(strategy, budget=0, **problem) == []
    assert suggest(strategy, budget=5, **dict(problem, labeled=np.ones(300, dtype=bool))) == []


def test_random_depends_on_the_seed(problem):
    a = [s.index for s in suggest("random", budget=10, seed=1, **problem)]
    b = [s.index for s in suggest("random", budget=10, seed=2, **problem)]
    assert a != b
    assert "seed 1" in suggest("random", budget=1, seed=1, **problem)[0].reason


def test_ids_default_to_row_numbers(problem):
    args = dict(problem)
    del args["ids"]
    out = suggest("lp-margin", budget=3, **args)
    assert [s.id for s in out] == [str(s.index) for s in out]


# -- exact references for the baselines -------------------------------------------------------------

def _unlabeled_order(values, labeled, *, descending):
    cand = np.flatnonzero(~labeled)
    v = values[cand]
    return cand[np.lexsort((cand, -v if descending else v))]


def test_entropy_and_margin_follow_the_model(problem):
    p = problem["probs"].astype(np.float64)
    ent = -(p * np.log(p)).sum(axis=1)
    expect = _unlabeled_order(ent, problem["labeled"], descending=True)[:10]
    got = suggest("entropy", budget=10, **problem)
    assert [s.index for s in got] == expect.tolist()
    assert got[0].score == pytest.approx(ent[expect[0]])
    assert got[0].reason.startswith("model entropy")

    srt = np.sort(p, axis=1)
    gap = srt[:, -1] - srt[:, -2]
    expect = _unlabeled_order(gap, problem["labeled"], descending=False)[:10]
    got = suggest("margin", budget=10, **problem)
    assert [s.index for s in got] == expect.tolist()
    assert got[0].reason.startswith("model margin")


def test_lp_margin_follows_the_propagation(problem):
    margin = np.asarray(problem["propagation"].margin, dtype=np.float64)
    expect = _unlabeled_order(margin, problem["labeled"], descending=False)[:10]
    got = suggest("lp-margin", budget=10, **problem)
    assert [s.index for s in got] == expect.tolist()
    assert "propagation margin" in got[0].reason


def test_coreset_is_k_centre_greedy_from_the_labeled_set(problem):
    x = problem["embeddings"].astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labeled = problem["labeled"]
    d = ((x[:, None, :] - x[None, labeled, :]) ** 2).sum(-1).min(axis=1)
    d[labeled] = -1
    expect = []
    for _ in range(8):
        i = int(np.argmax(d))
        expect.append(i)
        d = np.minimum(d, ((x - x[i]) ** 2).sum(-1))
        d[expect] = -1
        d[labeled] = -1
    got = suggest("coreset", budget=8, config=SelectionConfig(coreset_pool=0, coreset_centres=0),
                  **problem)
    assert [s.index for s in got] == expect
    assert "farthest from the labeled set" in got[0].reason


def test_coreset_pool_is_seeded(problem):
    cfg = SelectionConfig(coreset_pool=50)
    a = suggest("coreset", budget=5, seed=1, config=cfg, **problem)
    assert a == suggest("coreset", budget=5, seed=1, config=cfg, **problem)
    assert [s.index for s in a] != [s.index for s in suggest("coreset", budget=5, seed=2,
                                                             config=cfg, **problem)]


# -- bad input --------------------------------------------------------------------------------------

def test_unknown_strategy_lists_the_names(problem):
    with pytest.raises(ConfigError, match="unknown selection strategy 'best'.*speler, random, "
                                          "entropy, margin, lp-margin, coreset"):
        suggest("best", budget=3, **problem)


@pytest.mark.parametrize("strategy", ["entropy", "margin"])
def test_model_strategies_need_probs(problem, strategy):
    with pytest.raises(ConfigError, match=f"{strategy}.*needs probs"):
        suggest(strategy, budget=3, **dict(problem, probs=None))


def test_bad_shapes_and_budget(problem):
    with pytest.raises(DataFormatError, match=r"labeled must be a bool array of shape \(300,\)"):
        suggest("speler", budget=3, **dict(problem, labeled=problem["labeled"][:10]))
    with pytest.raises(DataFormatError, match="embeddings have shape"):
        suggest("speler", budget=3, **dict(problem, embeddings=problem["embeddings"][:5]))
    bad = problem["embeddings"].copy()
    bad[4, 2] = np.nan
    with pytest.raises(DataFormatError, match="embeddings row 4"):
        suggest("speler", budget=3, **dict(problem, embeddings=bad))
    with pytest.raises(ConfigError, match="budget must be an integer >= 0, got -1"):
        suggest("speler", budget=-1, **problem)
    with pytest.raises(DataFormatError, match="2 class names"):
        suggest("speler", budget=3, **dict(problem, classes=("a", "b")))
    with pytest.raises(ConfigError, match="outlier_ratio must be >= 0, got -1"):
        suggest("speler", budget=3, config=SelectionConfig(outlier_ratio=-1.0), **problem)


# -- what speler adds -------------------------------------------------------------------------------

def _arc_problem(duplicate_boundary: bool = False):
    """Two clusters on an arc of the unit circle (A at 0-35°, B at 55-90°), one boundary point at
    47° with neighbours on both sides, one far outlier off the plane (small margin too)."""
    ang_a = np.deg2rad(np.linspace(0, 35, 15))
    ang_b = np.deg2rad(np.linspace(55, 90, 15))
    pts = [np.stack([np.cos(a), np.sin(a), np.zeros_like(a)], axis=1) for a in (ang_a, ang_b)]
    tilt = np.deg2rad(47)  # a little off the middle: small margin, but the outlier's is smaller
    boundary = np.array([[np.cos(tilt), np.sin(tilt), 0.0]])
    outlier = np.array([[0.12, 0.12, 1.0]])
    rows = [pts[0], pts[1], boundary, outlier] + ([boundary] if duplicate_boundary else [])
    emb = np.concatenate(rows).astype(np.float32)
    n = len(emb)
    human = np.full(n, -1, dtype=np.int64)
    human[[0, 7, 14]] = 0  # spread over A, 14 at its edge next to the gap
    human[[15, 22, 29]] = 1  # spread over B, 15 at its edge next to the gap
    graph = build_knn(emb, config=GraphConfig(k=6, use_gpu=False))
    res = propagate(affinity(graph), human, num_classes=2, config=PropagationConfig())
    return dict(propagation=res, embeddings=emb, labeled=human >= 0, graph=graph,
                classes=("Wave", "Clap"), human_counts=np.array([3, 3]))


def test_speler_prefers_a_boundary_sample_over_an_outlier():
    prob = _arc_problem()
    boundary, outlier = 30, 31
    res = prob["propagation"]
    unl = np.flatnonzero(~prob["labeled"])
    # the set-up is what it claims: both have small margins, the outlier the smallest and the worst energy
    assert res.margin[outlier] <= np.sort(res.margin[unl])[1]
    assert res.margin[boundary] <= np.quantile(res.margin[unl], 0.25)
    assert res.energy[outlier] == res.energy[unl].max()
    assert res.energy[boundary] < 0.5 * np.median(res.energy[unl])  # well connected (E <= 0)
    order = [s.index for s in suggest("lp-margin", budget=len(unl), **prob)]
    assert order.index(outlier) < order.index(boundary)  # margin alone falls for the outlier
    out = suggest("speler", budget=len(unl), **prob)
    order = [s.index for s in out]
    assert order[0] == boundary
    assert order.index(boundary) < order.index(outlier)
    first = out[0].reason
    assert "boundary between" in first and "Wave" in first and "Clap" in first
    # boundary samples are less connected than cluster cores (κ ≈ 0.5 here), not outliers
    assert "margin" in first and "weakly connected (energy in the highest" in first
    assert "outlier" not in first and "labels" in first
    assert "percentile" not in first and "energy high" not in first
    assert "likely an outlier (energy in the highest" in out[order.index(outlier)].reason


def test_speler_batch_has_no_near_duplicates_or_graph_neighbours(problem):
    prob = _arc_problem(duplicate_boundary=True)
    boundary, dup = 30, 32
    out = [s.index for s in suggest("speler", budget=5, **prob)]
    assert len({boundary, dup} & set(out)) == 1
    assert {boundary, dup} <= set(s.index for s in suggest("lp-margin", budget=5, **prob))
    # without a graph the duplicate is still caught by cosine similarity
    out = [s.index for s in suggest("speler", budget=5, **dict(prob, graph=None))]
    assert len({boundary, dup} & set(out)) == 1
    # on the blobs: no two suggestions are kNN neighbours of each other
    out = [s.index for s in suggest("speler", budget=15, **problem)]
    nbrs = problem["graph"].indices
    for i in out:
        assert not set(nbrs[i].tolist()) & (set(out) - {i})


def test_speler_puts_predicted_minority_classes_first():
    n, rng = 60, np.random.default_rng(5)
    scores = np.zeros((n, 3), dtype=np.float32)
    labels = np.zeros(n, dtype=np.int64)
    labels[:40] = np.arange(40) % 2  # 40 labeled samples of the two large classes
    scores[np.arange(40), labels[:40]] = 1.0
    # unlabeled: 40-49 between class 0 and 1, 50-59 between class 2 (rare) and 0; same margin/energy
    scores[40:50] = [0.5, 0.45, 0.0]
    scores[50:60] = [0.45, 0.0, 0.5]
    labels[40:50], labels[50:60] = 0, 2
    margin = np.full(n, 0.05, dtype=np.float32)
    energy = np.full(n, -1.0, dtype=np.float32)
    res = _result(scores, labels=labels, margin=margin, energy=energy)
    labeled = np.zeros(n, dtype=bool)
    labeled[:40] = True
    args = dict(propagation=res, embeddings=rng.normal(size=(n, 16)).astype(np.float32),
                labeled=labeled, classes=("Wave", "Clap", "Kick"), human_counts=np.array([20, 20, 2]))
    out = suggest("speler", budget=10, **args)
    assert {s.index for s in out} == set(range(50, 60))  # in an order their distances set
    assert "class Kick has 2 labels" in out[0].reason
    assert "boundary between Kick and Wave" in out[0].reason
    plain = suggest("speler", budget=10, config=SelectionConfig(
        minority_weight=0.0, coverage_exponent=0.0), **args)
    assert [s.index for s in plain] == list(range(40, 50))  # equal scores: ties by index
    assert "tied with 19 other samples, which come in data order" in plain[0].reason


def test_speler_prefers_boundary_samples_far_from_the_labels():
    """Two groups of unlabeled samples with the same margin, energy and classes: the group whose
    nearest label is far comes first (coverage), and the reasons say how far; with
    coverage_exponent 0 the scores tie and the data order decides."""
    n = 40
    scores = np.zeros((n, 2), dtype=np.float32)
    labels = np.arange(n) % 2
    scores[np.arange(n), labels] = 1.0
    scores[20:40] = [0.5, 0.45]
    labels[20:40] = 0
    res = _result(scores, labels=labels, margin=np.full(n, 0.05, dtype=np.float32),
                  energy=np.full(n, -1.0, dtype=np.float32))
    rng = np.random.default_rng(3)
    emb = np.zeros((n, 8), dtype=np.float32)
    emb[:, 0] = 1.0  # labeled samples 0-19 and the near group 20-29 point one way
    emb[30:40, 0], emb[30:40, 1] = 0.6, 0.8  # the far group 30-39 another
    emb += 0.05 * rng.standard_normal(emb.shape).astype(np.float32)  # no near-duplicates
    labeled = np.arange(n) < 20
    args = dict(propagation=res, embeddings=emb, labeled=labeled, classes=("Wave", "Clap"),
                human_counts=np.array([10, 10]))
    out = suggest("speler", budget=20, **args)
    idx = [s.index for s in out]
    assert idx == sorted(idx, key=lambda i: i < 30)  # every far one before every near one
    assert sum(i >= 30 for i in idx) >= 6  # (a few are near-duplicates of one another)
    assert "far from any label" in out[0].reason
    assert "close to a labeled sample" in out[-1].reason
    plain = suggest("speler", budget=20, config=SelectionConfig(coverage_exponent=0.0), **args)
    idx = [s.index for s in plain]
    assert idx == sorted(idx) and idx[0] == 20  # equal scores: data order
    assert "typical distance" not in plain[0].reason
    with pytest.raises(ConfigError, match="coverage_exponent must be >= 0"):
        SelectionConfig(coverage_exponent=-1.0)


@pytest.mark.parametrize("boundary", [300, 5], ids=["pool-suffices", "pool-grows-to-all"])
def test_speler_computes_distances_for_a_growing_pool_with_the_same_batch(monkeypatch, boundary):
    """The distance to the nearest label is computed best score first, for a pool that grows
    until the batch is certain: the same suggestions, scores and reasons as with every distance
    computed, whether the first pool holds the batch (many boundary samples, the rest far from a
    boundary) or must grow to every candidate (fewer boundary samples than the batch)."""
    import speler.selection as selection

    rng = np.random.default_rng(11)
    n, c = 3000, 5
    top = rng.integers(0, c, n)
    scores = np.eye(c, dtype=np.float32)[top] + 0.02 * rng.random((n, c), dtype=np.float32)
    scores[:boundary, (top[:boundary] + 1) % c] = 0.95  # small margins: these lead
    res = _result(scores)
    emb = rng.normal(size=(n, 12)).astype(np.float32)
    labeled = rng.random(n) < 0.1
    graph = build_knn(emb, config=GraphConfig(k=5, use_gpu=False))
    args = dict(propagation=res, embeddings=emb, labeled=labeled, graph=graph, budget=40,
                human_counts=np.bincount(rng.integers(0, c, 300), minlength=c))
    monkeypatch.setattr(selection, "COVERAGE_SAMPLE", n)  # the exact median both ways
    monkeypatch.setattr(selection, "COVERAGE_POOL", n)  # every distance at once
    everything = suggest("speler", **args)
    computed = []
    real = selection._nearest_distance
    monkeypatch.setattr(selection, "_nearest_distance",
                        lambda X, centres: computed.append(len(X)) or real(X, centres))
    monkeypatch.setattr(selection, "COVERAGE_POOL", 100)
    pooled = suggest("speler", **args)
    assert [(s.index, s.score, s.reason) for s in pooled] == \
        [(s.index, s.score, s.reason) for s in everything]
    unlabeled = int((~labeled).sum())
    assert computed[0] == unlabeled  # the typical distance (every candidate here)
    if boundary > 40:
        assert sum(computed[1:]) == 800  # the first pool: 20 x the batch
    else:
        assert sum(computed[1:]) == unlabeled  # grew to every candidate


def test_speler_reasons_match_the_scores_when_nothing_is_on_a_boundary():
    """Every unlabeled sample reached by one class only (margin 1): all scores are 0, and the
    reasons say so instead of 'boundary between ...'; the equal scores are named as a tie."""
    n, rng = 50, np.random.default_rng(2)
    labels = np.arange(n) % 2
    scores = np.zeros((n, 2), dtype=np.float32)
    scores[np.arange(n), labels] = 1.0
    energy = -rng.uniform(1.0, 2.0, size=n).astype(np.float32)
    res = _result(scores, labels=labels, energy=energy)
    labeled = np.zeros(n, dtype=bool)
    labeled[:4] = True
    out = suggest("speler", propagation=res, embeddings=rng.normal(size=(n, 8)).astype(np.float32),
                  labeled=labeled, budget=10, classes=("Wave", "Clap"))
    assert all(s.score == 0.0 for s in out)
    for s in out:
        assert "boundary between" not in s.reason, s.reason
        assert "no boundary: only" in s.reason and "(margin 1)" in s.reason, s.reason
        assert "score 0 tied with 45 other samples, which come in data order" in s.reason, s.reason


@pytest.mark.parametrize("rank, kappa, words", [
    (0.0, 1.0, "well connected (energy in the lowest 1 %)"),
    (0.18, 1.0, "well connected (energy in the lowest 18 %)"),
    (0.5, 1.0, "typically connected (energy in the middle third)"),
    (0.9, 1.0, "weakly connected (energy in the highest 10 %)"),
    (1.0, 0.05, "weakly connected, likely an outlier (energy in the highest 1 %)"),
    (1.0, 0.0, "not reached by any label (energy 0)"),
])
def test_connection_in_words(rank, kappa, words):
    from speler.selection import _connection

    assert _connection(rank, kappa, 0.1) == words


@pytest.mark.parametrize("strategy", ALL)
def test_a_large_batch_respects_the_contract(strategy):
    # 12k samples: coreset's candidate pool (5,000) spans two of its 4,096-row distance blocks, so
    # the chunked path runs; speed at 100k is measured by benchmarks/selection_speed.py
    rng = np.random.default_rng(0)
    n, c, d, k = 12_000, 20, 64, 10
    scores = rng.random((n, c), dtype=np.float32)
    res = _result(scores)
    graph = KnnGraph(indices=rng.integers(0, n, size=(n, k)), sims=rng.random((n, k), dtype=np.float32),
                     method="random", recall=None, seconds=0.0)
    labeled = rng.random(n) < 0.05
    args = dict(propagation=res, embeddings=rng.normal(size=(n, d)).astype(np.float32),
                labeled=labeled, graph=graph, probs=scores / scores.sum(axis=1, keepdims=True),
                human_counts=np.bincount(rng.integers(0, c, 5000), minlength=c))
    out = suggest(strategy, budget=50, **args)
    assert len(out) == 50
    assert not labeled[[s.index for s in out]].any()
    assert len({s.index for s in out}) == 50


def _blobs(sizes, *, d=16, seed=0):
    """Well separated unit-vector clusters of the given sizes, rows shuffled; (x, cluster)."""
    rng = np.random.default_rng(seed)
    centres = np.linalg.qr(rng.standard_normal((d, len(sizes))))[0].T * 4.0
    cluster = rng.permutation(np.repeat(np.arange(len(sizes)), sizes))
    x = centres[cluster] + 0.05 * rng.standard_normal((len(cluster), d))
    return x.astype(np.float32), cluster


def test_first_labels_offer_one_typical_sample_per_group_largest_first():
    from speler.selection import first_labels, typical_groups

    sizes = [60, 30, 15, 6]
    x, cluster = _blobs(sizes)
    ids = [f"s{i}" for i in range(len(x))]
    none = np.zeros(len(x), dtype=bool)
    groups = typical_groups(x, groups=4)
    picks = first_labels(groups, none, budget=4, ids=ids)
    assert [int(cluster[p.index]) for p in picks] == [0, 1, 2, 3]  # every group, largest first
    assert [p.score for p in picks] == [60.0, 30.0, 15.0, 6.0]
    for p in picks:  # the member nearest its group's centre: typical, not an outlier
        members = np.flatnonzero(cluster == cluster[p.index])
        unit = x / np.linalg.norm(x, axis=1, keepdims=True)
        centre = unit[members].mean(axis=0)
        assert p.index == members[np.argmax(unit[members] @ centre)]
        assert p.id == ids[p.index] and p.predicted == p.runner_up == -1
        assert np.isnan(p.energy) and np.isnan(p.margin)
        assert f"a group of {int(p.score)} similar samples" in p.reason
    # a group with a label counts as offered; a skipped sample is passed over, its group's next
    labeled = none.copy()
    labeled[picks[0].index] = True
    skipped = none.copy()
    skipped[picks[1].index] = True
    again = first_labels(groups, labeled, budget=4, ids=ids, skipped=skipped)
    assert [int(cluster[p.index]) for p in again] == [1, 2, 3, 0]
    assert picks[1].index not in [p.index for p in again] and "labeled sample already" in again[3].reason
    # more than one per group: every group's next most typical, in the same order
    more = first_labels(groups, none, budget=10, ids=ids)
    assert [int(cluster[p.index]) for p in more] == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    assert len({p.index for p in more}) == 10
    assert first_labels(groups, np.ones(len(x), dtype=bool), budget=3, ids=ids) == []
    with pytest.raises(DataFormatError, match="one per sample"):
        first_labels(groups, none[:-1], budget=3, ids=ids)
    with pytest.raises(ConfigError, match="budget must be >= 1"):
        first_labels(groups, none, budget=0, ids=ids)

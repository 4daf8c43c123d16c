"""Annotation rounds end to end: real torch, faiss and SQLite on small real data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from speler.config import Config, apply_overrides
from speler.data.protocol import make_partial
from speler.data.samples import load_sample
from speler.errors import CancelledError, LabelError, ProjectError
from speler.annotator import Annotator
from speler.loop import latest_complete_round, read_state, run_round
from speler.project import Project
from speler.round_metrics import RoundMetrics

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
FAST = ["train.epochs=6", "train.patience=3", "train.supervised_epochs=2", "views.judge_min_labels=4"]


def _config() -> Config:
    return apply_overrides(Config(), FAST)


def _small_sample(n_keep: int = 160):
    ds = load_sample("synthetic_actions")
    rng = np.random.default_rng(0)
    keep = np.sort(np.concatenate([
        rng.permutation(np.flatnonzero(ds.y_true == c))[: max(4, n_keep // ds.num_classes)]
        for c in range(ds.num_classes)
    ]))
    sub = ds.subset(keep)
    y = np.full(sub.n, -1, dtype=np.int64)
    for c in range(sub.num_classes):  # two labels per class
        y[np.flatnonzero(sub.y_true == c)[:2]] = c
    return sub.replace(y=y)


def _events(project: Project) -> int:
    return len(project.store.events())


@pytest.fixture(scope="module")
def natops_round(tmp_path_factory):
    path = SHARED / "NATOPS"
    if not path.exists():
        pytest.skip(f"{path} is absent (real data lives beside the project, not in it)")
    from speler.formats import read

    ds = make_partial(read(path), imbalance=10, labeled_ratio=0.08, seed=0, min_labeled_per_class=2)
    root = tmp_path_factory.mktemp("projects")
    project = Project.create(root, "natops", ds, config=_config())
    stages = []
    res = run_round(project, progress=lambda s, d, t: stages.append(s))
    return project, res, stages


@pytest.mark.slow
def test_round_on_real_data_writes_everything(natops_round):
    project, res, stages = natops_round
    assert res.round == 0
    assert [s for i, s in enumerate(stages) if i == 0 or stages[i - 1] != s] == \
        ["views", "train", "embed", "knn", "propagate", "suggest"]
    d = project.round_dir(0)
    for f in ("checkpoint.pt", "embeddings.npz", "propagation.npz", "metrics.json", "config.json"):
        assert (d / f).is_file(), f
    assert latest_complete_round(project) == 0
    cur = project.store.current_labels()
    human = project.store.human_labels()
    # every unlabeled sample got a propagated label with energy and margin
    assert (cur.source[human < 0] == "propagated").all()
    assert np.isfinite(cur.energy[human < 0]).all()
    np.testing.assert_array_equal(cur.label[human >= 0], human[human >= 0])
    # quality on the held-out truth is far above chance (6 classes)
    q = res.metrics.quality.propagated
    assert q.accuracy > 0.5, q
    # suggestions: ranked, unlabeled, with a reason
    assert 0 < len(res.suggestions) <= project.config.selection.batch
    assert all(human[s.index] < 0 and s.reason for s in res.suggestions)
    scores = [s.score for s in res.suggestions]
    assert len(set(s.index for s in res.suggestions)) == len(scores)
    assert scores == sorted(scores, reverse=True), scores  # best first


@pytest.mark.slow
def test_label_updates_propagation_without_retraining(natops_round):
    project, res, _ = natops_round
    ann = Annotator(project)
    state = ann.state()
    s = res.suggestions[0]
    truth = project.data.y_true[s.index]
    cls = project.data.classes[truth]
    before = _events(project)
    new = ann.label(s.id, cls, annotator="tester")
    assert new.human[s.index] == truth
    assert new.round == state.round and new.probs is state.probs  # no retraining
    assert new.result.labels[s.index] == truth
    assert _events(project) >= before + 1
    # the next suggestions never include the labeled sample
    assert s.index not in [x.index for x in ann.suggest(n=10)]
    # undo appends an event and brings the sample back to its propagated label
    undone, after = ann.undo(annotator="tester")
    assert undone.sample_id == s.id
    assert after.human[s.index] == -1
    assert project.store.human_labels()[s.index] == -1


def test_a_live_update_keeps_the_rounds_balance_until_a_class_share_moves_past_the_tolerance():
    import dataclasses

    from speler.config import GraphConfig, PropagationConfig
    from speler.graph.knn import affinity, build_knn
    from speler.graph.propagate import label_prior, propagate, spectral_balance
    from speler.loop import LoopState, update_state

    rng = np.random.default_rng(3)
    y = np.repeat(np.arange(3), [150, 100, 50])
    x = rng.standard_normal((3, 8))[y] * 1.5 + rng.standard_normal((300, 8))
    W = affinity(build_knn(x, config=GraphConfig(use_gpu=False), k=10))
    labels = np.full(300, -1)
    for c, k in enumerate([12, 6, 1]):
        labels[np.flatnonzero(y == c)[:k]] = c
    cfg = Config(propagation=PropagationConfig(tol=1e-7))
    first = propagate(W, labels, num_classes=3, config=cfg.propagation)
    state = LoopState(round=0, embeddings={}, probs=np.zeros((300, 3), np.float32), graphs={},
                      weights={}, affinity=W, result=first, human=labels)
    big, rare = labels.copy(), labels.copy()
    big[np.flatnonzero(y == 0)[20]] = 0  # 12 → 13: shares move < 10 %
    rare[np.flatnonzero(y == 2)[20]] = 2  # 1 → 2: the class's share × √2 less the others' growth
    kept = update_state(state, big, num_classes=3, config=cfg).result
    np.testing.assert_array_equal(kept.solve.balance_weights, first.solve.balance_weights)
    np.testing.assert_array_equal(kept.prior, first.prior)
    assert kept.solve.products < 2 * kept.solve.iterations  # the new label's column alone
    moved = update_state(state, rare, num_classes=3, config=cfg).result
    np.testing.assert_allclose(moved.prior, label_prior(rare, 3, 0.5), rtol=1e-6)
    w, _ = spectral_balance(W, rare, num_classes=3, config=cfg.propagation,
                            warm_start=first.scores)
    np.testing.assert_allclose(moved.solve.balance_weights, w, rtol=1e-6)
    again = propagate(W, rare, num_classes=3, config=cfg.propagation, warm_start=first.scores)
    np.testing.assert_allclose(moved.scores, again.scores, atol=1e-5 * np.abs(again.scores).max())
    assert (moved.labels == again.labels).all()
    # kept balances chain: small steps add up against the balance they keep (class 0: 12 → 22
    # labels one at a time, each under 10 %, together past it)
    chained, steps = state, []
    zeros = np.flatnonzero((y == 0) & (labels < 0))
    for k in range(10):
        human = chained.human.copy()
        human[zeros[k]] = 0
        chained = update_state(chained, human, num_classes=3, config=cfg)
        steps.append(not np.array_equal(chained.result.solve.balance_weights,
                                        first.solve.balance_weights))
    assert not steps[0] and steps[-1], steps
    drift = label_prior(chained.human, 3, 0.5) / chained.result.prior - 1  # never past 10 %
    assert np.abs(drift).max() <= 0.1
    # the tolerance decides: 0 re-balances for any label, a large one never
    always = dataclasses.replace(cfg, propagation=dataclasses.replace(
        cfg.propagation, rebalance_tolerance=0.0))
    never = dataclasses.replace(cfg, propagation=dataclasses.replace(
        cfg.propagation, rebalance_tolerance=10.0))
    assert not np.array_equal(update_state(state, big, num_classes=3, config=always)
                              .result.solve.balance_weights, first.solve.balance_weights)
    np.testing.assert_array_equal(update_state(state, rare, num_classes=3, config=never)
                                  .result.solve.balance_weights, first.solve.balance_weights)


def _project(tmp_path, name="p") -> Project:
    return Project.create(tmp_path, name, _small_sample(), config=_config())


def test_failed_round_leaves_store_and_folders_as_they_were(tmp_path):
    project = _project(tmp_path)
    before = _events(project)
    human = project.store.human_labels().copy()
    stage = [""]
    with pytest.raises(CancelledError, match="propagate"):
        run_round(project, cancel=lambda: stage[0] == "propagate",
                  progress=lambda s, d, t: stage.__setitem__(0, s))
    assert _events(project) == before
    np.testing.assert_array_equal(project.store.human_labels(), human)
    assert latest_complete_round(project) is None
    leftovers = list(project.rounds_dir.iterdir()) if project.rounds_dir.exists() else []
    assert not [p.name for p in leftovers if p.name.startswith((".tmp", "0"))]
    assert [r.status for r in project.store.rounds()] == ["failed"]
    # the next round starts cleanly
    res = run_round(project)
    assert latest_complete_round(project) == res.round
    assert project.round_dir(res.round).is_dir()
    # what it measured, typed; the store and the round's folder hand back the same
    m = res.metrics
    assert isinstance(m, RoundMetrics) and m.round == res.round and m.n == project.data.n
    assert m.human_labels == int((human >= 0).sum()) and m.seconds > 0
    assert m.judgement is not None and m.propagation is not None and set(m.knn) <= set(m.views)
    assert m.quality is not None and 0 <= m.quality.propagated.accuracy <= 1
    saved = json.dumps(json.loads((project.round_dir(res.round) / "metrics.json").read_text()),
                       sort_keys=True)
    for typed in (project.store.rounds()[-1].metrics, read_state(project, res.round).metrics):
        assert isinstance(typed, RoundMetrics)
        assert json.dumps(typed.to_json(), sort_keys=True) == saved


def test_a_round_stopped_by_ctrl_c_says_so(tmp_path):
    project = _project(tmp_path)

    def interrupt(stage, done, total):
        if stage == "propagate":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_round(project, progress=interrupt)
    [r] = project.store.rounds()
    assert (r.status, r.reason) == ("failed", "interrupted (Ctrl-C)")


def test_round_needs_human_labels(tmp_path):
    ds = _small_sample()
    project = Project.create(tmp_path, "empty", ds.replace(y=np.full(ds.n, -1)), config=_config())
    with pytest.raises(LabelError, match="no human labels"):
        run_round(project)
    with pytest.raises(ProjectError, match="run a round first"):
        Annotator(project).suggest()


@pytest.mark.slow
def test_kill_during_round_loses_nothing(tmp_path):
    project = _project(tmp_path, "killme")
    project.store.add_label(project.store.ids[5], project.store.classes[0], annotator="a")
    before_events = _events(project)
    human = project.store.human_labels().copy()
    project.close()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "speler", "--root", str(tmp_path), "round", "killme",
         "--set", "train.epochs=200", "--set", "train.patience=200"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    tmp_dir = tmp_path / "killme" / "rounds" / ".tmp-000"
    deadline = time.monotonic() + 120
    while not tmp_dir.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, proc.stderr.read().decode()
    time.sleep(1.0)  # well inside training
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    project = Project.open(tmp_path, "killme")
    assert _events(project) == before_events
    np.testing.assert_array_equal(project.store.human_labels(), human)
    assert latest_complete_round(project) is None
    assert Annotator(project).state() is None
    res = run_round(project)  # starts again cleanly, leftovers removed
    assert res.round == 0 and not tmp_dir.exists()
    assert [r.status for r in project.store.rounds()] == ["done"]


def test_crossfit_epochs_picks_the_best_smoothed_epoch_and_respects_the_minimum():
    from speler.loop import crossfit_epochs

    curves = [[0.2, 0.4, 0.6, 0.7, 0.7, 0.5], [0.2, 0.5, 0.6, 0.6, 0.8, 0.4]]
    epochs, score = crossfit_epochs(curves)
    mean = np.mean(curves, axis=0)
    smooth = [np.mean(mean[max(0, i - 1):i + 2].tolist() + ([mean[0]] if i == 0 else [])
                      + ([mean[-1]] if i == len(mean) - 1 else [])) for i in range(len(mean))]
    assert epochs == int(np.argmax(smooth)) + 1 == 4
    assert score == pytest.approx(max(smooth))
    # a flat curve keeps the full training (the latest of equals), the minimum holds
    assert crossfit_epochs([[0.5] * 5])[0] == 5
    assert crossfit_epochs([[0.9, 0.1, 0.3, 0.1, 0.0]], minimum=3)[0] == 3


def test_judge_folds_hold_out_only_classes_with_two_labels():
    from speler.config import ViewsConfig
    from speler.loop import _judge_folds

    human = np.full(40, -1)
    human[:6] = [0, 0, 0, 1, 1, 2]  # class 2 has one label: never held out
    human[10:14] = [3, 3, 3, 3]
    folds = _judge_folds(human, ViewsConfig(judge_min_labels=4, judge_folds=2))
    held = np.concatenate(folds)
    assert len(folds) == 2 and len(np.unique(held)) == len(held)
    assert 5 not in held
    for c in (0, 1, 3):  # every class keeps a label for training in every fold
        for f in folds:
            assert ((human == c) & ~np.isin(np.arange(40), f)).any()
    assert sorted(held.tolist()) == [i for i in range(40) if human[i] in (0, 1, 3)]
    # too few to judge: no folds at all
    assert _judge_folds(human, ViewsConfig(judge_min_labels=20)) == []


@pytest.mark.slow
def test_network_judgement_never_reads_the_truth(tmp_path):
    """The same labels give the same round whatever y_true says: the judge and the training use
    human labels only."""
    from speler.loop import build_state

    ds = _small_sample(120)
    cfg = apply_overrides(_config(), ["views.judge_min_labels=4", "views.rocket_features=500"])
    a = build_state(ds, ds.y, no=0, config=cfg)
    b = build_state(ds.replace(y_true=np.roll(ds.y_true, 7)), ds.y, no=0, config=cfg)
    assert a.judgement.held_out > 0 and a.judgement.folds
    assert a.judgement.joined == b.judgement.joined
    assert a.judgement.with_network == b.judgement.with_network
    np.testing.assert_array_equal(a.state.result.labels, b.state.result.labels)
    assert np.isfinite(a.fitted.best_metric) and a.fitted.best_epoch == a.judgement.epochs


def test_a_network_that_cannot_be_judged_is_not_trained():
    """One label per class: nothing can be held out, so the network could never join the graph;
    the round is the floor and spends no time training."""
    from speler.loop import build_state

    ds = _small_sample(120)
    y = np.full(ds.n, -1)
    for c in range(ds.num_classes):
        y[np.flatnonzero(ds.y_true == c)[0]] = c
    cfg = apply_overrides(_config(), ["views.rocket_features=500"])
    built = build_state(ds, y, no=0, config=cfg)
    assert built.fitted is None and "train" not in built.stage_seconds
    assert not built.judgement.joined and "too few human labels" in built.judgement.reason
    assert set(built.state.weights) == {"plain", "rocket", "rocket_diff"}
    np.testing.assert_array_equal(built.state.result.labels, built.floor.labels)


def test_the_judge_admits_a_network_the_held_out_labels_cannot_fault_and_refuses_one_they_can():
    """Balanced accuracy on held-out human labels decides: a network view that changes nothing
    there (a tie) joins, one that predicts them worse stays out, one that predicts them better
    joins; the scores and folds it saw are kept."""
    from speler.config import ViewsConfig
    from speler.graph.knn import affinity, build_knn, combine_affinities
    from speler.graph.propagate import propagate
    from speler.loop import _judge_folds, judge

    rng = np.random.default_rng(0)
    C, n = 4, 240
    y = np.repeat(np.arange(C), n // C)
    means = rng.standard_normal((C, 16)) * 3
    clean = (means[y] + rng.standard_normal((n, 16))).astype(np.float32)
    blurred = (clean + 4.0 * rng.standard_normal((n, 16))).astype(np.float32)  # the floor's view
    groups = rng.permutation(y)  # clusters as tight as the classes', blind to them
    mixed = (means[groups] + rng.standard_normal((n, 16))).astype(np.float32)
    human = np.full(n, -1)
    for c in range(C):
        human[rng.choice(np.flatnonzero(y == c), 6, replace=False)] = c
    cfg = apply_overrides(Config(), ["views.judge_min_labels=4", "views.judge_folds=2"])
    graph = lambda x: affinity(build_knn(x, config=cfg.graph), gamma=cfg.graph.gamma)  # noqa: E731
    floor_parts = [(graph(blurred), 1.0)]
    floor_W = combine_affinities(floor_parts)
    folds = _judge_folds(human, ViewsConfig(judge_min_labels=4, judge_folds=2))
    assert len(folds) == 2

    def verdict(view):
        nets = []
        for held in folds:
            human_a = human.copy()
            human_a[held] = -1
            floor_a = propagate(floor_W, human_a, num_classes=C, config=cfg.propagation)
            nets.append((held, human_a, floor_a, view))
        return judge(nets, floor_parts, human, num_classes=C, config=cfg)

    tie = verdict(blurred)  # the floor's own view: the same graph, the same held-out predictions
    assert tie.with_network == pytest.approx(tie.floor) and tie.joined, tie.reason
    assert "a tie" in tie.reason
    worse = verdict(mixed)  # every cluster a mix of all classes
    assert worse.with_network < worse.floor and not worse.joined, worse.reason
    assert "stays out" in worse.reason and worse.held_out == len(np.concatenate(folds))
    better = verdict(clean)
    assert better.with_network > better.floor and better.joined, better.reason
    assert [f["held_out"] for f in better.folds] == [len(f) for f in folds]

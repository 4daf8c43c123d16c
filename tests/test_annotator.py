"""The owner object: one Annotator per project; reading never writes, the writers say so."""

from __future__ import annotations

import numpy as np
import pytest

from speler.annotator import Annotator, import_project
from speler.config import Config, apply_overrides
from speler.errors import LabelError, ProjectError
from speler.export import read_export

FAST = ["train.epochs=4", "train.supervised_epochs=1", "views.rocket_features=500", "views.dim=16",
        "views.judge_min_labels=4"]


@pytest.fixture(scope="module")
def annotated(tmp_path_factory):
    """A small project imported through the library, with one finished round."""
    root = tmp_path_factory.mktemp("projects")
    res = import_project(root, "basic", sample="basicmotions",
                         config=apply_overrides(Config(), FAST))
    ann = res.annotator
    ann.run_round()
    return root, ann


def test_reading_never_writes(annotated):
    _, ann = annotated
    events = len(ann.project.store.events())
    state = ann.state()
    assert state is not None and state.round == ann.latest_round() == 0
    ann.suggest(n=3)
    ann.label_table()
    ann.doubts()
    ann.spectrum()
    assert len(ann.project.store.events()) == events


def test_label_and_undo_write_the_human_event_then_the_propagation(annotated):
    _, ann = annotated
    state = ann.state()
    pick = ann.suggest(n=1)[0]
    truth = ann.data.y_true[pick.index]
    cls = ann.data.classes[truth]
    new = ann.label(pick.id, cls, annotator="tester")
    assert new.human[pick.index] == truth and new.round == state.round
    cur = ann.project.store.current_labels()
    assert cur.label[pick.index] == truth and cur.source[pick.index] == "human"
    # the store's propagated labels follow the live state
    unl = new.human < 0
    np.testing.assert_array_equal(cur.label[unl], new.result.labels[unl])
    assert pick.id not in [s.id for s in ann.suggest(n=10)]
    undone, after = ann.undo(annotator="tester")
    assert undone.sample_id == pick.id and after.human[pick.index] == -1


def test_a_second_annotator_sees_labels_given_through_the_first(annotated):
    root, ann = annotated
    other = Annotator.open(root, "basic")
    try:
        sid = ann.suggest(n=1)[0]
        ann.label(sid.id, ann.data.classes[0])
        assert other.state().human[sid.index] == 0  # re-propagated in memory on read
        other.undo()
        assert ann.state().human[sid.index] == -1
    finally:
        other.close()


def test_export_comes_from_the_live_state(annotated, tmp_path):
    _, ann = annotated
    path = ann.export(format="csv", path=tmp_path / "labels.csv")
    table = read_export(path)
    state = ann.state()
    unl = state.human < 0
    np.testing.assert_allclose(table["energy"].to_numpy()[unl], state.result.energy[unl],
                               rtol=1e-5)


def test_suggest_leaves_out_skipped_samples(annotated):
    _, ann = annotated
    first = ann.suggest(n=3)
    again = ann.suggest(n=3, exclude=[first[0].id])
    assert first[0].id not in [s.id for s in again] and len(again) == 3


def test_before_a_round_there_is_nothing_to_suggest_but_first_labels(tmp_path):
    ann = import_project(tmp_path, "fresh", sample="basicmotions").annotator
    with ann:
        assert ann.state() is None and ann.latest_round() is None
        with pytest.raises(ProjectError, match="run a round first"):
            ann.suggest()
    ann = import_project(tmp_path, "hidden", sample="basicmotions", no_file_labels=True).annotator
    with ann:  # the files' labels hidden: nobody has labeled anything yet
        first = ann.first_labels(n=4)
        assert len(first) == 4 and len({s.id for s in first}) == 4
        assert all(ann.project.store.human_labels()[s.index] < 0 for s in first)
        assert all(s.predicted == -1 and "similar samples" in s.reason for s in first)
        # the truth the sample's files carry (kept hidden): the first 2 x C picks cover every
        # class (the figure Annotator.first_labels gives for the real sets)
        eight = ann.first_labels(n=8)
        assert len({int(ann.data.y_true[s.index]) for s in eight}) == ann.data.num_classes == 4
        assert [s.id for s in eight[:4]] == [s.id for s in first]
        # a skipped one is passed over (its group offers its next most typical sample); a
        # labeled one leaves the list
        later = ann.first_labels(n=4, exclude=[first[0].id])
        assert first[0].id not in [s.id for s in later] and first[1].id in [s.id for s in later]
        assert later[0].score == first[0].score  # the same group, still without a label
        ann.label(first[1].id, ann.data.classes[0], annotator="t")
        assert first[1].id not in [s.id for s in ann.first_labels(n=4)]
        with pytest.raises(ProjectError, match="already exists"):
            import_project(tmp_path, "fresh", sample="basicmotions")


def test_suggest_after_is_what_suggest_answers_after_that_label(annotated):
    _, ann = annotated
    pick = ann.suggest(n=1)[0]
    cls = ann.data.classes[ann.data.y_true[pick.index]]
    events = len(ann.project.store.events())
    ahead = ann.suggest_after(pick.id, cls, n=3)
    assert len(ann.project.store.events()) == events  # nothing written
    ann.label(pick.id, cls)
    try:
        assert [s.id for s in ahead] == [s.id for s in ann.suggest(n=3)]
    finally:
        ann.undo()


def test_check_export_refuses_pyskl_for_series(annotated):
    from speler.errors import ConfigError

    _, ann = annotated
    ann.check_export(format="csv")
    with pytest.raises(ConfigError, match="PYSKL pickles hold skeleton keypoints"):
        ann.check_export(format="pyskl")
    with pytest.raises(ConfigError, match="unknown export format"):
        ann.check_export(format="xlsx")


def test_live_state_does_not_depend_on_the_label_order(annotated):
    root, ann = annotated
    for _ in range(3):
        pick = ann.suggest(n=1)[0]
        ann.label(pick.id, ann.data.classes[ann.data.y_true[pick.index]])
    ann.undo()
    with Annotator.open(root, "basic") as fresh:
        np.testing.assert_array_equal(fresh.state().human, ann.state().human)
        np.testing.assert_array_equal(fresh.state().result.energy, ann.state().result.energy)


def test_a_round_written_by_an_older_version_does_not_block_the_next(tmp_path):
    """Round files without views (an older SpeLER) are not re-propagated; the next round runs."""
    fast = apply_overrides(Config(), FAST + ["views.network=never"])
    ann = import_project(tmp_path, "old", sample="basicmotions", config=fast).annotator
    with ann:
        ann.run_round()
        path = ann.project.round_dir(0) / "propagation.npz"
        with np.load(path) as z:
            kept = {k: z[k] for k in z.files if not k.endswith((".weight", ".knn_indices",
                                                                ".knn_sims"))}
        np.savez(path, **kept)
        fresh = Annotator(ann.project)
        assert fresh.latest_round() == 0 and fresh.state() is None
        res = fresh.run_round()
        assert res.round == 1 and fresh.state().round == 1


def test_set_config_saves_and_the_live_state_follows_as_a_fresh_annotator_would(annotated):
    root, ann = annotated
    before = ann.config
    sid = ann.suggest(n=1)[0]
    ann.label(sid.id, ann.data.classes[0])
    try:
        old_live = ann.state()
        changed = apply_overrides(before, ["propagation.alpha=0.5"])
        ann.set_config(changed)
        fresh = Annotator.open(root, "basic")
        try:
            assert fresh.config == changed  # saved to config.json
            np.testing.assert_array_equal(ann.state().result.scores, fresh.state().result.scores)
            assert not np.allclose(ann.state().result.scores, old_live.result.scores)
        finally:
            fresh.close()
        with pytest.raises(TypeError, match="speler.config.Config"):
            ann.set_config({"propagation": {"alpha": 0.5}})
    finally:
        ann.set_config(before)
        ann.undo()


def test_suggestion_for_describes_a_sample_from_the_live_state(annotated):
    _, ann = annotated
    pick = ann.suggest(n=1)[0]
    again = ann.suggestion_for(pick.id, reason="you undid its label")
    assert (again.index, again.id, again.predicted) == (pick.index, pick.id, pick.predicted)
    assert again.reason == "you undid its label" and again.score != again.score  # NaN: no rank
    assert again.energy == pytest.approx(pick.energy) and again.margin == pytest.approx(pick.margin)
    with pytest.raises(Exception, match="no-such-id"):
        ann.suggestion_for("no-such-id", reason="x")


def test_a_label_given_from_a_stale_view_is_refused_and_writes_nothing(annotated):
    root, ann = annotated
    pick = ann.suggest(n=1)[0]
    classes = ann.data.classes
    other = Annotator.open(root, "basic")  # another tab, or the command line
    other.label(pick.id, classes[0], annotator="bob")
    events = len(ann.project.store.events())
    with pytest.raises(LabelError, match=rf"{pick.id}: it is labeled {classes[0]} now \(last "
                                          r"changed by bob at .*\), but this page showed it "
                                          r"unlabeled; nothing was saved"):
        ann.label(pick.id, classes[1], annotator="alice", seen=-1)
    assert len(ann.project.store.events()) == events
    assert ann.project.store.human_labels()[pick.index] == 0
    # the view that saw bob's label may change it; without ``seen`` nothing is checked
    ann.label(pick.id, classes[1], annotator="alice", seen=0)
    assert ann.project.store.human_labels()[pick.index] == 1
    other.undo(annotator="bob")  # bob's label is no longer in force either way: only alice's
    ann.undo(annotator="alice")
    with pytest.raises(LabelError, match=r"it has no label now \(last changed by alice"):
        ann.label(pick.id, classes[2], annotator="alice", seen=1)
    assert ann.project.store.human_labels()[pick.index] == -1


def test_neighbours_show_an_example_of_each_candidate_class_first(annotated):
    _, ann = annotated
    state = ann.state()
    human = state.human
    pick = ann.suggest(n=1)[0]
    plain = ann.neighbours(pick.index, k=3)
    first = ann.neighbours(pick.index, k=3, first_of=(pick.predicted, pick.runner_up))
    assert len(first) == 3 and pick.index not in first and (human[first] >= 0).all()
    nearest_of = {c: next(j for j in _by_similarity(state, pick.index) if human[j] == c)
                  for c in (pick.predicted, pick.runner_up)}
    assert first[:2] == [nearest_of[pick.predicted], nearest_of[pick.runner_up]]
    assert first[2] == next(j for j in plain if j not in first[:2])
    # a class nobody labeled is passed over
    missing = ann.neighbours(pick.index, k=2, first_of=(99,))
    assert missing == plain[:2]


def _by_similarity(state, index):
    emb = state.embeddings["combined"]
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    order = np.argsort(-(unit @ unit[index]), kind="stable")
    return [int(j) for j in order if j != index and state.human[j] >= 0]


def test_suggestion_for_a_labeled_sample_reads_its_neighbours(annotated):
    _, ann = annotated
    state = ann.state()
    # a confident sample of one class, labeled as another: its neighbours favour the first
    unl = np.flatnonzero(state.human < 0)
    i = int(unl[np.argmax(state.result.margin[unl])])
    own = int(state.result.labels[i])
    wrong = (own + 1) % ann.data.num_classes
    sid = str(ann.data.ids[i])
    ann.label(sid, ann.data.classes[wrong], annotator="tester")
    try:
        s = ann.suggestion_for(sid, reason="you opened it")
        assert (s.predicted, s.runner_up) == (own, wrong)
    finally:
        ann.undo(annotator="tester")

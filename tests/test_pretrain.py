"""Self-supervised pre-training: the loss, the training, and rounds that keep and reuse it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import speler.loop as loop
from speler.config import Config, TrainConfig, apply_overrides
from speler.errors import CheckpointError, ConfigError
from speler.loop import PRETRAINED_FILE, latest_complete_round, run_round
from speler.pretrain import nt_xent, pretrain
from speler.project import Project
from speler.train import fit, load_checkpoint
from tests.factories import make_series_set, make_skeleton_set

SMALL = dict(channels=8, freq_channels=8, embed_dim=16, blocks=1, num_threads=1, device="cpu")


def test_nt_xent_matches_its_formula_and_rewards_matching_pairs():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 3, generator=gen), torch.randn(4, 3, generator=gen)
    # by hand: rows of [a; b] normalised, each row's partner against the 7 other rows
    z = np.concatenate([a.numpy(), b.numpy()])
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    sim = z @ z.T / 0.5
    losses = []
    for i in range(8):
        partner = (i + 4) % 8
        others = [j for j in range(8) if j != i]
        losses.append(-sim[i, partner] + math.log(sum(math.exp(sim[i, j]) for j in others)))
    assert float(nt_xent(a, b, 0.5)) == pytest.approx(np.mean(losses), rel=1e-5)
    # a pair that is the same sample twice is told apart from the rest far better
    assert float(nt_xent(a, a + 0.01 * b, 0.1)) < float(nt_xent(a, b, 0.1)) - 1.0


@pytest.mark.parametrize("make", [make_skeleton_set, make_series_set])
def test_pretraining_lowers_its_loss_and_repeats_itself(make):
    ds = make(n=24)
    cfg = TrainConfig(pretrain_epochs=6, **SMALL)
    one = pretrain(ds, config=cfg)
    assert len(one.history) == 6 and all(np.isfinite(one.history))
    assert one.history[-1] < one.history[0]
    two = pretrain(ds, config=cfg)
    assert one.history == two.history
    for k, v in one.model.state_dict().items():
        assert torch.equal(v, two.model.state_dict()[k]), k
    assert not one.model.training


def test_fit_starts_from_pretrained_weights_and_refuses_ones_that_do_not_fit():
    ds = make_skeleton_set(n=24)
    cfg = TrainConfig(pretrain_epochs=2, epochs=2, supervised_epochs=1, holdout=0, **SMALL)
    pre = pretrain(ds, config=cfg).model
    scratch = fit(ds, ds.y, config=cfg)
    started = fit(ds, ds.y, config=cfg, start=pre)
    assert len(started.history) == cfg.epochs  # a first training, not a warm start's epochs
    assert started.history[0]["loss"] != scratch.history[0]["loss"]
    other = pretrain(ds, config=TrainConfig(pretrain_epochs=1, **{**SMALL, "embed_dim": 8})).model
    with pytest.raises(CheckpointError, match="start weights do not fit"):
        fit(ds, ds.y, config=cfg, start=other)


def test_pretrain_epochs_must_not_be_negative():
    with pytest.raises(ConfigError, match="train.pretrain_epochs"):
        apply_overrides(Config(), ["train.pretrain_epochs=-1"])


def _project(tmp_path) -> Project:
    ds = make_skeleton_set(n=48, classes=4, labeled=0.4)
    cfg = apply_overrides(Config(), [
        "train.pretrain_epochs=2", "train.epochs=3", "train.supervised_epochs=1",
        "train.channels=8", "train.freq_channels=8", "train.embed_dim=16", "train.blocks=1",
        "train.num_threads=1", "views.network=always", "views.rocket_features=840"])
    return Project.create(tmp_path, "pre", ds, config=cfg)


def test_a_round_keeps_its_pretrained_weights_and_the_next_round_reuses_them(tmp_path,
                                                                             monkeypatch):
    project = _project(tmp_path)
    calls = []
    real = loop.pretrain
    monkeypatch.setattr(loop, "pretrain", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = run_round(project)
    kept = project.round_dir(first.round) / PRETRAINED_FILE
    assert calls == [1] and kept.is_file()
    weights = load_checkpoint(kept, project.data).model.state_dict()
    second = run_round(project)
    assert calls == [1]  # not pre-trained again
    again = load_checkpoint(project.round_dir(second.round) / PRETRAINED_FILE, project.data)
    for k, v in weights.items():
        assert torch.equal(v, again.model.state_dict()[k]), k


def test_a_corrupt_pretrained_file_fails_the_round_and_loses_nothing(tmp_path):
    project = _project(tmp_path)
    first = run_round(project)
    (project.round_dir(first.round) / PRETRAINED_FILE).write_bytes(b"not a checkpoint")
    events = len(project.store.events())
    labels = project.store.human_labels().copy()
    with pytest.raises(CheckpointError, match=PRETRAINED_FILE):
        run_round(project)
    assert latest_complete_round(project) == first.round
    assert len(project.store.events()) == events
    np.testing.assert_array_equal(project.store.human_labels(), labels)

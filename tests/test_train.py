"""fit / embed / checkpoints with real torch on small synthetic skeleton and series sets."""

from __future__ import annotations

import dataclasses
import logging
import re

import numpy as np
import pytest
import torch

from speler.config import TrainConfig
from speler.data.layouts import get_layout
from speler.data.schema import SequenceSet
from speler.errors import CancelledError, CheckpointError, ConfigError, DataFormatError, LabelError
from speler.train import (
    Checkpoint, _Augment, _holdout_split, embed, fit, load_checkpoint, save_checkpoint,
    select_device,
)

# Pinned to the CPU: these tests check exact equalities (determinism, a checkpoint's round trip,
# batch-size invariance) that cuDNN and bf16 autocast do not keep; CUDA runs are compared with the
# CPU within tolerances in the GPU tests.
FAST = TrainConfig(channels=12, blocks=2, freq_channels=12, embed_dim=24, epochs=6, batch_size=16,
                   supervised_epochs=1, patience=3, num_threads=1, holdout=0.5, device="cpu")

# class c: joint MOVERS[c] moves along DIRS[c] at FREQS[c] cycles per sequence
MOVERS = (7, 11, 7, 15)  # kinect_v1: HandLeft, HandRight, HandLeft, FootLeft
DIRS = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (1.0, 0.0, 0.0), (0.0, 0.0, 1.0))
FREQS = (1.0, 1.0, 3.0, 2.0)


def make_actions(*, per_class: int = 12, frames: int = 24, persons: int = 1, seed: int = 0,
                 layout: str = "kinect_v1", labeled_per_class: int = 4) -> SequenceSet:
    """4 separable classes that differ in which joint moves, its direction and its frequency."""
    rng = np.random.default_rng(seed)
    lay = get_layout(layout)
    v, k = lay.num_joints, len(MOVERS)
    n = per_class * k
    y_true = np.arange(n, dtype=np.int64) % k
    pose = rng.normal(0, 0.4, size=(3, 1, v)).astype(np.float32)
    t = np.linspace(0, 1, frames, dtype=np.float32)
    x = np.zeros((n, 3, frames, v, persons), dtype=np.float32)
    for i, c in enumerate(y_true):
        wave = 0.4 * np.sin(2 * np.pi * FREQS[c] * t + rng.uniform(0, 2 * np.pi))
        sample = pose + rng.normal(0, 0.05, size=(3, frames, v))
        sample[:, :, MOVERS[c]] += np.array(DIRS[c])[:, None] * wave[None, :]
        x[i, :, :, :, 0] = sample
    y = np.full(n, -1, dtype=np.int64)
    for c in range(k):
        y[np.flatnonzero(y_true == c)[:labeled_per_class]] = c
    return SequenceSet(
        x=x, ids=np.array([f"act_{i:03d}" for i in range(n)]), classes=("a", "b", "c", "d"),
        y=y, layout=lay, y_true=y_true, where="actions-fixture",
    )


def make_series(*, n: int = 24, seed: int = 1) -> SequenceSet:
    rng = np.random.default_rng(seed)
    y_true = np.arange(n, dtype=np.int64) % 3
    t = np.linspace(0, 1, 32, dtype=np.float32)
    x = np.sin(2 * np.pi * (1 + 2 * y_true)[:, None, None] * t) + 0.1 * rng.normal(size=(n, 2, 32))
    y = np.where(np.arange(n) < 9, y_true, -1).astype(np.int64)
    return SequenceSet(x=x[..., None, None].astype(np.float32),
                       ids=np.array([f"s{i}" for i in range(n)]), classes=("x", "y", "z"), y=y,
                       layout=get_layout("series"), y_true=y_true)


@pytest.fixture(scope="module")
def actions() -> SequenceSet:
    return make_actions(labeled_per_class=10)  # 40 labels: a hold-out of 20 with FAST


@pytest.fixture(scope="module")
def trained(actions):
    return fit(actions, actions.y, config=FAST)


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_weights(a, b) -> bool:
    sa, sb = _state(a), _state(b)
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- fit ------------------------------------------------------------------------------------
def test_fit_learns_separable_classes_well_above_chance():
    ds = make_actions(per_class=16, seed=3, labeled_per_class=6)
    cfg = dataclasses.replace(FAST, epochs=15, holdout=0.0)
    result = fit(ds, ds.y, config=cfg)
    emb = embed(result.model, ds)
    unl = ds.y < 0
    acc = float((emb.probs.argmax(1)[unl] == ds.y_true[unl]).mean())
    assert acc >= 0.7, f"accuracy {acc:.2f} on unlabeled samples, chance is 0.25"
    assert result.history[-1]["train_acc"] > result.history[0]["train_acc"]
    assert len(result.history) == 15 and result.best_epoch == 15 and np.isnan(result.best_metric)
    assert result.device == "cpu" and not result.model.training


def test_fit_result_and_early_stopping_keep_the_best_weights(actions, trained):
    assert 1 <= trained.best_epoch <= len(trained.history) <= FAST.epochs
    assert len(trained.holdout) == 20  # half the 10 labels of each class
    assert set(actions.y[trained.holdout]) == {0, 1, 2, 3}
    best = trained.history[trained.best_epoch - 1]
    assert trained.best_metric == best["holdout_acc"]
    assert trained.best_metric == max(h["holdout_acc"] for h in trained.history)
    # the returned weights are the best epoch's: the hold-out accuracy is reproduced exactly
    emb = embed(trained.model, actions)
    hold = trained.holdout
    pred = emb.probs.argmax(1)[hold]
    recall = np.mean([(pred[actions.y[hold] == c] == c).mean() for c in np.unique(actions.y[hold])])
    assert recall == pytest.approx(trained.best_metric)
    for key in ("loss", "ce", "contrastive", "pseudo", "train_acc", "holdout_loss", "seconds"):
        assert key in best


def test_holdout_split_is_stratified_and_keeps_a_label_per_class():
    labels = np.array([0] * 15 + [1] * 5 + [2] * 2 + [3] * 1 + [-1] * 7)
    train, hold = _holdout_split(labels, 0.2, seed=0, min_size=4)
    assert np.bincount(labels[hold], minlength=4).tolist() == [3, 1, 0, 0]
    assert np.bincount(labels[train], minlength=4).tolist() == [12, 4, 2, 1]
    assert not set(train) & set(hold) and (labels[train] >= 0).all()
    # too few labels for a meaningful hold-out (default minimum 20): train on all, fixed epochs
    train, hold = _holdout_split(labels, 0.2, seed=0)
    assert len(hold) == 0 and np.array_equal(train, np.flatnonzero(labels >= 0))
    many = np.repeat(np.arange(5), 20)
    train, hold = _holdout_split(many, 0.2, seed=0)
    assert np.bincount(many[hold]).tolist() == [4] * 5 and len(train) == 80


def test_fit_with_one_label_and_classes_without_labels():
    ds = make_actions(per_class=6, labeled_per_class=0)
    labels = np.full(ds.n, -1)
    labels[0], labels[1] = 0, 1  # classes 2 and 3 have no label at all
    result = fit(ds, labels, config=dataclasses.replace(FAST, epochs=2))
    emb = embed(result.model, ds)
    assert emb.probs.shape == (ds.n, 4) and np.isfinite(emb.probs).all()
    assert len(result.holdout) == 0


def test_fit_with_pseudo_labels_only(actions):
    pseudo = actions.y_true.copy()
    result = fit(actions, np.full(actions.n, -1), config=dataclasses.replace(FAST, epochs=2),
                 pseudo_labels=pseudo, pseudo_weights=np.linspace(0.1, 1.0, actions.n))
    assert all(h["samples"] > 0 and h["pseudo"] > 0 for h in result.history)


def test_fit_is_deterministic(actions):
    cfg = dataclasses.replace(FAST, epochs=2)
    a = fit(actions, actions.y, config=cfg)
    b = fit(actions, actions.y, config=cfg)
    assert _same_weights(a.model, b.model)
    c = fit(actions, actions.y, config=dataclasses.replace(cfg, seed=1))
    assert not _same_weights(a.model, c.model)


def test_zero_pseudo_weights_are_the_same_as_no_pseudo_labels(actions):
    cfg = dataclasses.replace(FAST, epochs=3)
    plain = fit(actions, actions.y, config=cfg)
    pseudo = np.where(actions.y < 0, actions.y_true, -1)
    zero = fit(actions, actions.y, config=cfg, pseudo_labels=pseudo,
               pseudo_weights=np.zeros(actions.n))
    assert _same_weights(plain.model, zero.model)
    weighted = fit(actions, actions.y, config=cfg, pseudo_labels=pseudo,
                   pseudo_weights=np.full(actions.n, 0.5))
    assert not _same_weights(plain.model, weighted.model)
    assert weighted.history[-1]["pseudo_samples"] > 0 and weighted.history[-1]["pseudo"] > 0
    assert weighted.history[0]["pseudo_samples"] == 0  # supervised warm-up epoch


def test_fit_refuses_non_finite_input_naming_the_sample(actions):
    ds = actions.subset(np.arange(actions.n))
    ds.x[5, 1, 3, 2, 0] = np.nan  # corrupted after validation
    with pytest.raises(DataFormatError, match=r"sample 5 \(id 'act_005'\).*NaN"):
        fit(ds, ds.y, config=FAST)
    with pytest.raises(DataFormatError, match=r"embed: sample 5 \(id 'act_005'\)"):
        embed(_model_for(ds), ds)


def _model_for(ds):
    from speler.models import build_model

    return build_model(ds.layout, in_channels=3, num_classes=4, frames=ds.x.shape[2], persons=1,
                       config=FAST)


def test_fit_rejects_bad_labels_and_settings(actions):
    with pytest.raises(LabelError, match="no human labels"):
        fit(actions, np.full(actions.n, -1), config=FAST)
    bad = actions.y.copy()
    bad[2] = 4
    with pytest.raises(LabelError, match=r"labels\[2\] = 4 is out of range, expected -1..3"):
        fit(actions, bad, config=FAST)
    with pytest.raises(LabelError, match="shape"):
        fit(actions, actions.y[:-1], config=FAST)
    with pytest.raises(LabelError, match="pseudo_weights"):
        fit(actions, actions.y, config=FAST, pseudo_labels=actions.y,
            pseudo_weights=np.full(actions.n, -1.0))
    with pytest.raises(ConfigError, match="train.lr must be > 0"):
        fit(actions, actions.y, config=dataclasses.replace(FAST, lr=0.0))


def test_cancel_and_progress(actions):
    calls = []
    with pytest.raises(CancelledError, match="before epoch 3/6"):
        fit(actions, actions.y, config=dataclasses.replace(FAST, holdout=0.0),
            progress=lambda e, total: calls.append((e, total)), cancel=lambda: len(calls) >= 2)
    assert calls == [(1, 6), (2, 6)]
    with pytest.raises(CancelledError):
        fit(actions, actions.y, config=FAST, cancel=lambda: True)


def test_warm_start_from_checkpoint(actions, trained, tmp_path, caplog):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, trained, config=FAST, ds=actions)
    ckpt = load_checkpoint(path, actions)
    cfg = dataclasses.replace(FAST, epochs=1, lr=1e-12, augment=False)
    again = fit(actions, actions.y, config=cfg, init=ckpt)
    before, after = _state(trained.model), _state(again.model)
    for key in before:
        if "running" not in key and "num_batches" not in key:
            torch.testing.assert_close(after[key], before[key], atol=1e-6, rtol=0)
    assert again.warm_started and again.history[0]["pseudo_samples"] == 0
    pseudo = np.where(actions.y < 0, actions.y_true, -1)
    calls = []
    tuned = fit(actions, actions.y, config=dataclasses.replace(FAST, warm_epochs=2), init=ckpt,
                pseudo_labels=pseudo, progress=lambda e, t: calls.append((e, t)))
    assert calls[-1] == (2, 2) and tuned.history[0]["pseudo_samples"] > 0  # no warm-up
    # another architecture: a warning, and training from scratch
    with caplog.at_level(logging.WARNING, logger="speler.train"):
        scratch = fit(actions, actions.y, config=dataclasses.replace(cfg, channels=16), init=ckpt)
    assert not scratch.warm_started
    assert "train.channels: 12 -> 16" in caplog.text


# --- embed and checkpoints --------------------------------------------------------------------
def test_embed_shapes_batches_and_progress(actions, trained):
    seen = []
    emb = embed(trained.model, actions, batch_size=10, progress=lambda d, t: seen.append((d, t)))
    assert emb.time.shape == (actions.n, 24) and emb.freq.shape == (actions.n, 24)
    assert emb.time.dtype == np.float32 and emb.probs.dtype == np.float32
    np.testing.assert_allclose(emb.probs, 0.5 * (emb.probs_time + emb.probs_freq), rtol=1e-6)
    np.testing.assert_allclose(emb.probs.sum(1), 1.0, rtol=1e-5)
    assert seen == [(10, 48), (20, 48), (30, 48), (40, 48), (48, 48)]
    whole = embed(trained.model, actions, batch_size=64)
    np.testing.assert_allclose(whole.time, emb.time, rtol=1e-4, atol=1e-5)


def test_checkpoint_round_trip_gives_identical_outputs(actions, trained, tmp_path):
    path = tmp_path / "round" / "checkpoint.pt"
    save_checkpoint(path, trained, config=FAST, ds=actions, extra={"round": 3, "note": "x"})
    ckpt = load_checkpoint(path, actions)
    assert isinstance(ckpt, Checkpoint)
    assert ckpt.config == FAST and ckpt.classes == actions.classes
    assert ckpt.layout_name == "kinect_v1" and ckpt.fingerprint == actions.fingerprint()
    assert ckpt.extra == {"round": 3, "note": "x"}
    a, b = embed(trained.model, actions), embed(ckpt.model, actions)
    np.testing.assert_array_equal(a.time, b.time)
    np.testing.assert_array_equal(a.freq, b.freq)
    np.testing.assert_array_equal(a.probs, b.probs)
    save_checkpoint(tmp_path / "model.pt", trained.model, config=FAST, ds=actions)
    np.testing.assert_array_equal(embed(load_checkpoint(tmp_path / "model.pt", actions).model,
                                        actions).probs, a.probs)


def test_mismatched_checkpoint_is_refused(actions, trained, tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, trained, config=FAST, ds=actions)
    other_ids = actions.replace(ids=np.array([f"other_{i}" for i in range(actions.n)]))
    with pytest.raises(CheckpointError, match="fingerprint"):
        load_checkpoint(path, other_ids)
    renamed = actions.replace(classes=("a", "b", "c", "e"))
    with pytest.raises(CheckpointError, match=r"missing here: \['d'\], new here: \['e'\]"):
        load_checkpoint(path, renamed)
    # MSR Action3D has the same 20 joints as Kinect v1 in another order
    msr = actions.replace(layout=get_layout("msr_action3d"))
    with pytest.raises(CheckpointError, match="layout 'kinect_v1'.*uses layout 'msr_action3d'"):
        load_checkpoint(path, msr)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pt", actions)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable SpeLER checkpoint"):
        load_checkpoint(junk, actions)
    with pytest.raises(CheckpointError, match="init checkpoint belongs to dataset"):
        ckpt = load_checkpoint(path, actions)
        fit(other_ids, other_ids.y, config=FAST, init=ckpt)


def test_checkpoint_is_loaded_without_pickle(actions, trained, tmp_path):
    # weights_only=True: an object that needs unpickling is refused
    path = tmp_path / "evil.pt"
    torch.save({"format": "speler-checkpoint", "obj": object()}, path)
    with pytest.raises(CheckpointError, match="not a readable SpeLER checkpoint"):
        load_checkpoint(path, actions)


# --- series, augmentation, devices -------------------------------------------------------------
def test_series_fit_and_embed():
    ds = make_series()
    result = fit(ds, ds.y, config=dataclasses.replace(FAST, epochs=8, holdout=0.0))
    emb = embed(result.model, ds)
    assert emb.time.shape == (24, 24)
    unl = ds.y < 0
    assert float((emb.probs.argmax(1)[unl] == ds.y_true[unl]).mean()) >= 0.6


def test_skeleton_augmentation_rotates_about_up_axis_and_keeps_padding():
    ds = make_actions(per_class=2, persons=2)
    aug = _Augment(ds)
    assert aug.coords == [0, 1, 2] and not aug.series
    x = torch.from_numpy(ds.x.copy())
    lengths = torch.full((ds.n,), 24)
    lengths[0] = 12
    x[0, :, 12:] = 0.0
    out = aug(x, lengths, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and not torch.equal(out, x)
    assert out[..., 1].abs().max() == 0  # absent person stays absent
    assert out[0, :, 12:].abs().max() == 0  # padding stays padding
    assert torch.isfinite(out).all()


def test_up_axis_is_found_from_the_spine():
    ds = make_actions(per_class=2)
    x = ds.x.copy()
    lo, hi = ds.layout.spine
    x[:, 2, :, hi] = x[:, 2, :, lo] + 1.0  # spine along z
    assert _Augment(ds.replace(x=x)).up == 2


def test_series_augmentation_is_jitter_and_scaling():
    ds = make_series()
    aug = _Augment(ds)
    assert aug.series
    x = torch.from_numpy(ds.x)
    out = aug(x, torch.full((ds.n,), 32), torch.Generator().manual_seed(0))
    assert out.shape == x.shape and 0 < (out - x).abs().mean() < 0.5


def test_select_device():
    assert select_device("cpu") == "cpu"
    assert select_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="train.device"):
        select_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            select_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fit_on_gpu_with_amp(actions):
    result = fit(actions, actions.y, config=dataclasses.replace(FAST, device="cuda", epochs=2))
    assert result.device == "cuda"
    emb = embed(result.model, actions)
    assert np.isfinite(emb.time).all()


@pytest.mark.parametrize("change, message", [
    (lambda p: p.pop("layout_name"), r"checkpoint has no 'layout_name' field"),
    (lambda p: p.update(version="abc"), r"checkpoint field 'version' is 'abc', expected an integer"),
    (lambda p: p.update(classes="abc"), r"checkpoint field 'classes' is 'abc'"),
    (lambda p: p.update(model_args=[]), r"checkpoint field 'model_args' is '\[\]', expected a dict"),
], ids=["no-layout-name", "version-abc", "classes-str", "model-args-list"])
def test_malformed_round_checkpoint_says_which_file_and_how_to_recover(actions, tmp_path, change,
                                                                      message):
    """A round's checkpoint with the format marker but a missing or mistyped field: one
    CheckpointError naming the file and saying that deleting the round folder gets past it."""
    from speler.train import CHECKPOINT_FORMAT, CHECKPOINT_VERSION

    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "state_dict": {},
               "config": {}, "classes": list(actions.classes), "layout": actions.layout.to_json(),
               "layout_name": actions.layout.name, "fingerprint": actions.fingerprint(),
               "model_args": {}, "extra": {}}
    change(payload)
    path = tmp_path / "rounds" / "003" / "checkpoint.pt"
    path.parent.mkdir(parents=True)
    torch.save(payload, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, actions)
    said = str(info.value)
    assert re.search(message, said), said
    assert said.startswith(f"{path}: ")
    assert f"delete the round folder {path.parent} and run the round again" in said


def test_batch_size_zero_is_chosen_by_device():
    from speler.train import CPU_BATCH, CUDA_BATCH, batch_size_for

    assert TrainConfig().batch_size == 0
    assert batch_size_for(TrainConfig(), "cpu") == CPU_BATCH == 32
    assert batch_size_for(TrainConfig(), "cuda:0") == CUDA_BATCH == 256
    assert batch_size_for(TrainConfig(batch_size=48), "cuda") == 48
    with pytest.raises(ConfigError, match=r"train.batch_size must be 0 \(by device\) or >= 2"):
        TrainConfig(batch_size=1)


def test_device_default_batch_trains_exactly_as_the_cpu_batch(actions):
    cfg = dataclasses.replace(FAST, epochs=2, batch_size=0)
    a = fit(actions, actions.y, config=cfg)
    b = fit(actions, actions.y, config=dataclasses.replace(cfg, batch_size=32))
    assert _same_weights(a.model, b.model)
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]


def test_thread_count_zero_follows_the_free_cores(monkeypatch):
    import speler.system as system
    import speler.train as train_mod

    before = torch.get_num_threads()
    monkeypatch.setattr(system, "free_cores", lambda: 1)
    with train_mod._threads(0):
        assert torch.get_num_threads() == 1  # another task is busy: one thread
    assert torch.get_num_threads() == before
    monkeypatch.setattr(system, "free_cores", lambda: 64)
    with train_mod._threads(0):
        assert torch.get_num_threads() == before  # never above torch's own setting
    with train_mod._threads(3):
        assert torch.get_num_threads() == 3  # an explicit count is kept
    assert torch.get_num_threads() == before


def test_fit_leaves_no_process_wide_setting_behind(actions):
    before = (torch.get_num_threads(), torch.backends.cudnn.benchmark)
    fit(actions, actions.y, config=dataclasses.replace(FAST, epochs=1, num_threads=0))
    assert (torch.get_num_threads(), torch.backends.cudnn.benchmark) == before


def test_fixed_batches_have_one_shape_and_cover_every_sample():
    """On CUDA every batch has the same size (one cuDNN plan): the last one is filled up with the
    epoch's first samples; a set smaller than a batch stays one batch of its own size."""
    from speler.train import _batches

    order = np.random.default_rng(0).permutation(100)
    fixed = _batches(order, 32, fixed=True)
    assert [len(b) for b in fixed] == [32] * 4
    np.testing.assert_array_equal(np.concatenate(fixed)[:100], order)
    np.testing.assert_array_equal(fixed[-1][4:], order[:28])
    assert [len(b) for b in _batches(order, 25, fixed=True)] == [25] * 4  # no padding needed
    assert [len(b) for b in _batches(order[:20], 32, fixed=True)] == [20]
    assert [len(b) for b in _batches(order, 32)] == [32, 32, 36]  # the CPU's rule: remainder joins

"""The bundled datasets: registry, loading, long tail and few labels."""

from __future__ import annotations

import numpy as np
import pytest

from speler.data.samples import DEFAULT_SAMPLE, SAMPLES, list_samples, load_sample
from speler.errors import DataFormatError


def test_registry_lists_both_samples_default_first():
    infos = list_samples()
    assert [i.name for i in infos] == ["synthetic_actions", "basicmotions"]
    assert infos[0].name == DEFAULT_SAMPLE
    assert {i.kind for i in infos} == {"skeleton", "series"}
    for info in infos:
        assert info.path.exists(), info.path
        assert info.title and info.description
        assert (info.path if info.path.is_dir() else info.path.parent).joinpath("README.md").is_file()


def test_default_sample_is_the_synthetic_skeletons():
    ds = load_sample()
    assert ds.layout.name == "ntu25" and ds.shape[1] == 3
    assert ds.y_true is not None and (ds.y_true >= 0).all()
    known = ds.y >= 0
    assert 0 < known.sum() < ds.n
    np.testing.assert_array_equal(ds.y[known], ds.y_true[known])


def test_basicmotions_is_long_tailed_and_partially_labeled():
    ds = load_sample("basicmotions")
    assert ds.layout.is_series and ds.shape[1:] == (6, 100, 1, 1)
    assert ds.channels == ("acc_x", "acc_y", "acc_z", "gyro_x", "gyro_y", "gyro_z")
    assert ds.classes == ("Standing", "Running", "Walking", "Badminton")
    counts = ds.class_counts(ds.y_true)
    # 20 cases per class in the UEA files; imbalance 5 over 4 classes
    np.testing.assert_array_equal(counts, np.floor(20 * 5.0 ** (-np.arange(4) / 3) + 1e-9))
    labeled = ds.class_counts()
    assert (labeled >= 2).all() and labeled.sum() < ds.n / 2
    known = ds.y >= 0
    np.testing.assert_array_equal(ds.y[known], ds.y_true[known])
    again = load_sample("basicmotions")
    np.testing.assert_array_equal(again.ids, ds.ids)
    np.testing.assert_array_equal(again.y, ds.y)


def test_unknown_sample_lists_the_names():
    with pytest.raises(DataFormatError, match="unknown sample 'ntu60'.*synthetic_actions, basicmotions"):
        load_sample("ntu60")


def test_missing_files_say_how_to_get_them(tmp_path, monkeypatch):
    from dataclasses import replace

    monkeypatch.setitem(SAMPLES, "synthetic_actions",
                        replace(SAMPLES["synthetic_actions"], path=tmp_path / "data.npz"))
    monkeypatch.setitem(SAMPLES, "basicmotions", replace(SAMPLES["basicmotions"], path=tmp_path))
    with pytest.raises(DataFormatError, match="python -m speler.data.kinematics --out"):
        load_sample("synthetic_actions")
    with pytest.raises(DataFormatError, match="BasicMotions_TRAIN.ts"):
        load_sample("basicmotions")


def test_default_sample_is_not_saturated():
    """Round 0's floor (label-free views and propagation, no training; a few seconds) leaves room
    for labeling to help: the product asks for macro-F1 0.6-0.85 on the unlabeled samples of the
    bundled skeletons (their README gives the measured value). Outside that band, retune the
    generator's ``ambiguity`` (speler/data/kinematics.py) and rebuild the sample."""
    from dataclasses import replace

    from speler.config import Config
    from speler.data.transforms import preprocess
    from speler.loop import build_state
    from speler.metrics import label_quality

    cfg = Config()
    if not hasattr(cfg, "views"):
        pytest.skip("this checkout's Config has no label-free views section")
    cfg = replace(cfg, views=replace(cfg.views, network="never"))
    ds = preprocess(load_sample(), cfg.preprocess)
    built = build_state(ds, ds.y, no=0, config=cfg)
    q = label_quality(ds.y_true, built.state.result.labels, num_classes=ds.num_classes,
                      mask=ds.y < 0)
    assert 0.6 <= q["macro_f1"] <= 0.85, q

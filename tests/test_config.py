"""Config: overrides reject unknown keys and wrong types; JSON round trip."""

from __future__ import annotations

import dataclasses
import json

import pytest

from speler.config import Config, GraphConfig, TrainConfig, apply_overrides
from speler.errors import ConfigError


def test_overrides_set_typed_values():
    cfg = apply_overrides(Config(), ["train.lr=3e-4", "graph.k=20", "train.amp=false",
                                     "selection.strategy=random", " preprocess.frames = 32 "])
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.graph.k == 20 and isinstance(cfg.graph.k, int)
    assert cfg.train.amp is False
    assert cfg.selection.strategy == "random"
    assert cfg.preprocess.frames == 32
    # untouched fields keep their defaults; the input config is not changed (frozen)
    assert cfg.train.epochs == TrainConfig().epochs and Config().graph.k == GraphConfig().k
    assert apply_overrides(Config(), ["graph.k=20.0"]).graph.k == 20


@pytest.mark.parametrize("override, message", [
    ("train.learning_rate=1", r"unknown config key train.learning_rate; known: model, "),
    ("training.lr=1", r"unknown config section 'training'; known: preprocess, train"),
    ("train.lr", r"override 'train.lr' must look like section.key=value"),
    ("lr=1", r"override 'lr=1' must look like section.key=value"),
    ("graph.k=ten", r"graph.k: expected an integer, got 'ten'"),
    ("graph.k=2.5", r"graph.k: expected an integer, got '2.5'"),
    ("train.lr=fast", r"train.lr: expected a number, got 'fast'"),
    ("train.amp=maybe", r"train.amp: expected true/false, got 'maybe'"),
])
def test_overrides_reject_unknown_keys_and_wrong_types(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(Config(), [override])


def test_from_dict_rejects_bad_sections_and_types():
    with pytest.raises(ConfigError, match="unknown config section 'extra'"):
        Config.from_dict({"extra": {}})
    with pytest.raises(ConfigError, match="config section 'train' must be a mapping"):
        Config.from_dict({"train": 3})
    with pytest.raises(ConfigError, match="train.epochs: expected an integer, got True"):
        Config.from_dict({"train": {"epochs": True}})
    with pytest.raises(ConfigError, match="selection.strategy: expected a string, got 3"):
        Config.from_dict({"selection": {"strategy": 3}})


def test_json_round_trip(tmp_path):
    cfg = apply_overrides(Config(), ["train.lr=0.01", "graph.gamma=2", "train.augment=no",
                                     "selection.batch=7"])
    assert Config.from_dict(json.loads(cfg.to_json())) == cfg
    path = tmp_path / "config.json"
    cfg.save(path)
    loaded = Config.load(path)
    assert loaded == cfg and loaded != Config()
    for section in dataclasses.fields(Config):
        assert dataclasses.is_dataclass(getattr(loaded, section.name))
    # a partial file fills in defaults
    path.write_text('{"graph": {"k": 5}}')
    assert Config.load(path) == dataclasses.replace(Config(), graph=GraphConfig(k=5))


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"missing.json: cannot read config"):
        Config.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match=r"bad.json: cannot read config"):
        Config.load(bad)


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().train.lr = 1.0  # type: ignore[misc]


@pytest.mark.parametrize("override, message", [
    ("selection.strategy=foo", r"selection.strategy must be one of speler, random, entropy, "
                               r"margin, lp-margin, coreset, got 'foo'"),
    ("train.epochs=0", r"train.epochs must be >= 1, got 0"),
    ("train.device=tpu", r"train.device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'tpu'"),
    ("graph.index=annoy", r"graph.index must be one of auto, flat, ivf, hnsw, got 'annoy'"),
    ("propagation.alpha=1", r"propagation.alpha must be in \(0, 1\), got 1.0"),
    ("views.judge_folds=1", r"views.judge_folds must be >= 2, got 1"),
])
def test_overrides_are_range_checked_before_any_work(override, message):
    """A bad value is refused where the config is built: `--set` fails at once, not after a
    training run."""
    with pytest.raises(ConfigError, match=message):
        apply_overrides(Config(), [override])


def test_config_lists_match_the_implementations():
    from speler.config import MODEL_KINDS, STRATEGIES
    from speler.models.net import MODEL_KINDS as BUILT
    from speler.selection import STRATEGIES as RANKERS

    assert tuple(RANKERS) == STRATEGIES
    assert BUILT == MODEL_KINDS

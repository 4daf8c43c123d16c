"""Configuration: nested frozen dataclasses whose defaults work on the bundled samples on a CPU.

``Config`` is saved as JSON in each project and each round. ``apply_overrides`` takes strings such as
``train.lr=3e-4`` and rejects unknown keys and wrong types; nothing is ever evaluated as code.
Each section belongs to one module: preprocess → data/transforms.py, train → train.py,
graph/propagation → graph/, views → features.py and loop.py, selection → selection.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from speler.errors import ConfigError

MODEL_KINDS = ("small", "paper")  # train.model: "small" for CPUs, "paper" (CTR-GCN size) for GPUs
STRATEGIES = ("speler", "random", "entropy", "margin", "lp-margin", "coreset")  # selection.strategy
BALANCE_PRIORS = ("labels", "predictions")  # propagation.balance_prior


@dataclass(frozen=True)
class PreprocessConfig:
    frames: int = 0  # T: every sample is resampled to this many frames; 0 = by the data
    # (speler.data.transforms.frames_for): 48 for skeletons, a series its median length in 48-256
    persons: int = 2  # M: keep at most this many persons (skeletons)
    center: bool = True  # subtract the layout's centre joint (first valid frame)
    align_view: bool = True  # rotate spine to the up axis and shoulders to x (3D only)
    scale: bool = True  # skeletons: divide each sample's coordinates by the root mean square
    # distance of person 0's seen joints from its first-frame centre, so every sample is on one
    # scale (speler.data.transforms._rescale; figures there)
    normalize_series: str = "dataset"  # series: "dataset" (each channel standardised over all
    # samples and frames, so a clip's amplitude stays: running shakes a wrist more than standing),
    # "clip" (each clip's channels z-scored on their own), "none" (transforms._standardise_channels)


@dataclass(frozen=True)
class TrainConfig:
    model: str = "small"  # "small" (CPU default) or "paper" (CTR-GCN size, for GPUs)
    channels: int = 32  # base width of the time branch
    blocks: int = 3  # GCN+TCN blocks (skeletons) or conv blocks (series)
    freq_channels: int = 32  # base width of the frequency branch
    embed_dim: int = 64  # size of each branch's embedding
    epochs: int = 40  # max epochs per round
    supervised_epochs: int = 5  # epochs on human labels only before pseudo-labels join
    batch_size: int = 0  # 0 = by device: 32 on a CPU, 256 on CUDA (train.batch_size_for)
    lr: float = 1e-3  # Adam learning rate
    weight_decay: float = 1e-4
    patience: int = 10  # early stopping on the held-out slice of human labels
    holdout: float = 0.2  # share of human labels held out for early stopping (0 = none)
    contrastive_weight: float = 0.3  # μ, cross-domain supervised contrastive loss
    pseudo_weight: float = 1.0  # weight of the energy-weighted pseudo-label loss
    balanced_loss: bool = True  # logit-adjusted cross-entropy for the long tail
    augment: bool = True
    amp: bool = True  # mixed precision on CUDA (ignored on CPU)
    cuda_graph: bool = True  # on CUDA, replay fit's step from a CUDA graph (speler.cuda_graph)
    cudnn_benchmark: bool = False  # on CUDA, cuDNN times its kernels for each new batch shape
    # in fit. Off: on an H200 (benchmarks/gpu.py) the first trained MSR round in a process took
    # 57.8 s with it, 9.8 s without; at NTU shape it gained 5 % a step (9,220 against 8,796
    # samples/s) and cost 6.7 s more in the first epoch, the same 24 s for a 40k round
    device: str = "auto"  # "auto", "cpu" or "cuda"
    seed: int = 0
    num_threads: int = 0  # torch CPU threads; 0 = the cores no other task is busy on when
    # training starts (speler.system.free_cores; 2.2x faster than 2 threads with one core busy)
    dropout: float = 0.2  # before each classifier head
    pseudo_ratio: float = 1.0  # pseudo-labeled samples drawn per human label each epoch (0 = all)
    temperature: float = 0.2  # of the cross-domain supervised contrastive loss
    logit_tau: float = 1.0  # strength of the logit adjustment when balanced_loss is on
    segments: int = 3  # time branch pools over all frames and over this many stretches of time
    bones: bool = True  # skeleton time branch also sees bone vectors (joint - parent)
    lr_schedule: str = "cosine"  # "cosine" (decay to 0 over epochs) or "constant"
    warm_epochs: int = 20  # max epochs when warm-starting from the previous round (0 = epochs)
    pretrain_epochs: int = 0  # self-supervised epochs on every sample before a project's first
    # training (speler.pretrain; 0 = none): no gain on the five real sets, 3x a CPU round (README)

    def __post_init__(self) -> None:
        device = self.device.strip().lower()
        _check(self, "train", [
            ("model", self.model in MODEL_KINDS, f"one of {', '.join(MODEL_KINDS)}"),
            ("channels", self.channels >= 1, ">= 1"), ("blocks", self.blocks >= 1, ">= 1"),
            ("freq_channels", self.freq_channels >= 1, ">= 1"),
            ("embed_dim", self.embed_dim >= 1, ">= 1"),
            ("epochs", self.epochs >= 1, ">= 1"), ("warm_epochs", self.warm_epochs >= 0, ">= 0"),
            ("pretrain_epochs", self.pretrain_epochs >= 0, ">= 0"),
            ("supervised_epochs", self.supervised_epochs >= 0, ">= 0"),
            ("batch_size", self.batch_size == 0 or self.batch_size >= 2, "0 (by device) or >= 2"),
            ("lr", self.lr > 0, "> 0"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("patience", self.patience >= 1, ">= 1"),
            ("holdout", 0 <= self.holdout < 1, "in [0, 1)"),
            ("contrastive_weight", self.contrastive_weight >= 0, ">= 0"),
            ("pseudo_weight", self.pseudo_weight >= 0, ">= 0"),
            ("pseudo_ratio", self.pseudo_ratio >= 0, ">= 0"),
            ("temperature", self.temperature > 0, "> 0"),
            ("logit_tau", self.logit_tau >= 0, ">= 0"),
            ("segments", self.segments >= 1, ">= 1"),
            ("dropout", 0 <= self.dropout < 1, "in [0, 1)"),
            ("num_threads", self.num_threads >= 0, ">= 0"),
            ("lr_schedule", self.lr_schedule in ("cosine", "constant"), "'cosine' or 'constant'"),
            ("device", device in ("auto", "cpu", "cuda") or (
                device.startswith("cuda:") and device[5:].isdigit()),
             "'auto', 'cpu', 'cuda' or 'cuda:N'"),
        ])


@dataclass(frozen=True)
class ViewsConfig:
    plain_weight: float = 0.25  # weight of the plain-feature graph in the floor (0 = left out)
    rocket_weight: float = 1.0  # weight of the random-kernel graph in the floor (0 = left out)
    rocket_diff_weight: float = 0.5  # weight of the random-kernel graph of the first differences
    dim: int = 128  # PCA dimensions of each label-free view
    rocket_features: int = 10_000  # random-kernel PPV features before PCA
    network: str = "auto"  # "auto": joins the graph when cross-fitted labels say it helps;
    # "always", "never" (no training at all: rounds propagate on the floor only)
    network_weight: float = 0.5  # weight of the network's graph beside the floor's (sum 1)
    judge_folds: int = 2  # cross-fitting folds of the human labels for the network's judgement
    judge_min_labels: int = 20  # fewer held-out human labels than this: the network stays out
    # (and is not trained). At 12-14 (round_quality, π = 10, γ = 10 %, three sets, 5 seeds) the
    # held-out labels favoured the network in 7 runs and it lost macro-F1 in all 7 (0.002-0.141);
    # joined, it lost 0.019 on average. At 20-64 (γ = 30 %, four sets) its joins gained 0.033
    judge_epochs: bool = True  # the final network trains for the epoch count that did best on
    # the held-out labels across the folds (early stopping that works with a few labels)
    seed: int = 0  # random kernels and randomised PCA

    @property
    def floor_weights(self) -> dict[str, float]:
        """{label-free view: its share of the floor} for the views with a weight > 0 (sums to 1)."""
        wanted = {"plain": self.plain_weight, "rocket": self.rocket_weight,
                  "rocket_diff": self.rocket_diff_weight}
        total = sum(w for w in wanted.values() if w > 0)
        return {v: w / total for v, w in wanted.items() if w > 0}

    def __post_init__(self) -> None:
        _check(self, "views", [
            ("plain_weight", self.plain_weight >= 0, ">= 0"),
            ("rocket_weight", self.rocket_weight >= 0, ">= 0"),
            ("rocket_diff_weight", self.rocket_diff_weight >= 0, ">= 0"),
            ("rocket_weight", self.plain_weight + self.rocket_weight + self.rocket_diff_weight > 0,
             "> 0 when the other view weights are 0 (the floor needs a view)"),
            ("dim", self.dim >= 2, ">= 2"),
            ("rocket_features", self.rocket_features >= 84, ">= 84 (one per kernel)"),
            ("network", self.network in ("auto", "always", "never"), "'auto', 'always' or 'never'"),
            ("network_weight", 0 < self.network_weight < 1, "in (0, 1)"),
            ("judge_folds", self.judge_folds >= 2, ">= 2"),
            ("judge_min_labels", self.judge_min_labels >= 1, ">= 1"),
        ])


def _check(section: object, name: str, checks: list[tuple[str, bool, str]]) -> None:
    """ConfigError naming the first failing ``name.key``, its value and what is allowed."""
    for key, ok, allowed in checks:
        if not ok:
            raise ConfigError(f"{name}.{key} must be {allowed}, got {getattr(section, key)!r}")


@dataclass(frozen=True)
class GraphConfig:
    k: int = 20  # neighbours per node
    gamma: float = 3.0  # affinity max(0, s)^gamma
    exact_max_n: int = 50_000  # exact flat search up to this n, approximate (IVF) beyond
    index: str = "auto"  # "auto", "flat", "ivf", "hnsw"
    pca_dim: int = 64  # IVF cells clustered and ranked on a PCA projection (0 = no PCA)
    nprobe: int = 0  # IVF cells searched per query; 0: the fewest that reach target_recall
    target_recall: float = 0.96  # recall@k that nprobe 0 aims at, measured on sample queries
    # (0.95 is the product's target; 0.96 leaves two standard errors of a 1,000-query sample)
    max_nprobe: int = 128  # nprobe 0 never probes more cells than this
    refine_factor: int = 4  # HNSW candidates per neighbour, re-ranked exactly
    recall_queries: int = 1000  # queries used to check recall of an approximate graph
    use_gpu: bool = True  # search on the GPU: faiss's when faiss sees one, else exact torch on CUDA
    backend: str = "auto"  # "auto" (faiss; torch on CUDA when faiss has no GPU), "faiss", "torch"
    # (exact search only; on CUDA with use_gpu, else on the CPU)
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self, "graph", [
            ("k", self.k >= 1, ">= 1"),
            ("gamma", math.isfinite(self.gamma) and self.gamma > 0, "a positive number"),
            ("exact_max_n", self.exact_max_n >= 0, ">= 0"),
            ("index", self.index in ("auto", "flat", "ivf", "hnsw"),
             "one of auto, flat, ivf, hnsw"),
            ("backend", self.backend in ("auto", "faiss", "torch"), "one of auto, faiss, torch"),
            ("index", self.backend != "torch" or self.index in ("auto", "flat"),
             "auto or flat with graph.backend 'torch' (exact search only)"),
            ("pca_dim", self.pca_dim >= 0, ">= 0"),
            ("nprobe", self.nprobe >= 0, ">= 0 (0: chosen for target_recall)"),
            ("target_recall", 0 < self.target_recall <= 1, "in (0, 1]"),
            ("max_nprobe", self.max_nprobe >= 1, ">= 1"),
            ("refine_factor", self.refine_factor >= 1, ">= 1"),
            ("recall_queries", self.recall_queries >= 1, ">= 1"),
        ])


@dataclass(frozen=True)
class PropagationConfig:
    alpha: float = 0.8  # (I - alpha S) M = (1 - alpha) Y
    seed_exponent: float = 0.5  # β: a human label of class c seeds n_c^-β (n_c: c's labels), so a
    # class's seed mass grows as n_c^(1-β) and the balance evens out p_c ∝ n_c^(1-β); 0 = every
    # label seeds 1 (the paper). 0.5: a label added to a class that has some already no longer
    # floods its neighbours (benchmarks/round_quality.py --simulate, five real sets, 5 seeds:
    # area under the macro-F1 curve 0.649 → 0.691 with SpeLER's suggestions, 0.594 → 0.636 with
    # random ones; protocol splits 0.661 → 0.659; speler/graph/propagate.py)
    balance: bool = True  # spectral balance w_ij (p_c(i) p_c(j))^-1/2
    balance_prior: str = "labels"  # p_c: share of the human labels ("labels") or of the labels
    # and the first pass's predictions ("predictions"); see speler/graph/propagate.py
    tol: float = 1e-4  # CG relative residual tolerance. 1e-4 rather than 1e-6: the same labels
    # for all 10,630 samples of 100 runs on the five real sets (protocol splits, the floor
    # graph), 2 samples changing reliability, and the final solve in 7.3 iterations, not 12.2
    max_iter: int = 200  # CG iteration cap
    tau_hat: float = -9.5  # base energy threshold; energies are scaled so the median sample is -10
    rebalance_tolerance: float = 0.1  # between rounds a new label keeps the round's balance
    # until some class's p_c would move by more than this share; then the live propagation is
    # re-balanced (speler.graph.propagate.balance_drift; figures in speler.loop.update_state).
    # 0 = re-balance on every label
    reorder: bool = True  # solve in reverse Cuthill-McKee order (cache locality) from 20k samples
    threads: int = 0  # torch threads for the solver; 0 = 1 on graphs under 1M non-zeros, else
    # the cores no other task is busy on (speler.graph.propagate.solver_threads, measured there)
    device: str = "auto"  # the CG solve: "auto" (CUDA when torch sees one), "cpu", "cuda[:N]"

    def __post_init__(self) -> None:
        _check(self, "propagation", [
            ("alpha", 0.0 < self.alpha < 1.0, "in (0, 1)"),
            ("seed_exponent", 0.0 <= self.seed_exponent <= 1.0, "in [0, 1]"),
            ("balance_prior", self.balance_prior in BALANCE_PRIORS,
             f"one of {', '.join(BALANCE_PRIORS)}"),
            ("tol", self.tol > 0, "> 0"), ("max_iter", self.max_iter >= 1, ">= 1"),
            ("tau_hat", self.tau_hat <= 0, "<= 0 (energies are negative)"),
            ("rebalance_tolerance", self.rebalance_tolerance >= 0, ">= 0"),
            ("threads", self.threads >= 0, ">= 0"),
            ("device", self.device in ("auto", "cpu", "cuda") or (
                self.device.startswith("cuda:") and self.device[5:].isdigit()),
             "'auto', 'cpu', 'cuda' or 'cuda:N'"),
        ])


@dataclass(frozen=True)
class SelectionConfig:
    strategy: str = "speler"  # speler | random | entropy | margin | lp-margin | coreset
    batch: int = 10  # suggestions per request
    minority_weight: float = 1.0  # speler: score × (1 + weight · rarity of the boundary's classes)
    outlier_ratio: float = 0.05  # speler: outlier if -energy < this × median -energy of unlabeled
    duplicate_similarity: float = 0.995  # cosine above which two samples are near-duplicates
    coverage_exponent: float = 1.0  # speler: score × (distance to the nearest label / median)^this
    coreset_pool: int = 5_000  # coreset: random pool of unlabeled candidates (0 = all of them)
    coreset_centres: int = 10_000  # coreset: random subset of the labeled set as centres (0 = all)

    def __post_init__(self) -> None:
        _check(self, "selection", [
            ("strategy", self.strategy in STRATEGIES, f"one of {', '.join(STRATEGIES)}"),
            ("batch", self.batch >= 1, ">= 1"),
            ("minority_weight", self.minority_weight >= 0, ">= 0"),
            ("outlier_ratio", self.outlier_ratio >= 0, ">= 0"),
            ("duplicate_similarity", 0 < self.duplicate_similarity <= 1, "in (0, 1]"),
            ("coverage_exponent", self.coverage_exponent >= 0, ">= 0"),
            ("coreset_pool", self.coreset_pool >= 0, ">= 0"),
            ("coreset_centres", self.coreset_centres >= 0, ">= 0"),
        ])


@dataclass(frozen=True)
class Config:
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    graph: GraphConfig = field(default_factory=GraphConfig)
    propagation: PropagationConfig = field(default_factory=PropagationConfig)
    views: ViewsConfig = field(default_factory=ViewsConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        sections = {}
        hints = typing.get_type_hints(cls)
        for key, value in d.items():
            if key not in hints:
                raise ConfigError(f"unknown config section {key!r}; known: {', '.join(hints)}")
            sub = hints[key]
            if not isinstance(value, dict):
                raise ConfigError(f"config section {key!r} must be a mapping, got {value!r}")
            sections[key] = _section(sub, value, key)
        return cls(**sections)

    @classmethod
    def load(cls, path: str | Path) -> "Config":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read config ({exc})") from exc

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())


def _coerce(value: Any, typ: Any, where: str) -> Any:
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
        if not f.is_integer():
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(f)
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {typ}")


def _section(cls: type, values: dict[str, Any], name: str) -> Any:
    hints = typing.get_type_hints(cls)
    out = {}
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"unknown config key {name}.{key}; known: {', '.join(hints)}")
        out[key] = _coerce(value, hints[key], f"{name}.{key}")
    return cls(**out)


def apply_overrides(config: Config, overrides: list[str]) -> Config:
    """``["train.lr=3e-4", "graph.k=20"]`` applied to ``config``; ConfigError on bad keys/values."""
    d = config.to_dict()
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        path, raw = item.split("=", 1)
        section, key = path.strip().split(".", 1)
        if section not in d:
            raise ConfigError(f"unknown config section {section!r}; known: {', '.join(d)}")
        if key not in d[section]:
            raise ConfigError(f"unknown config key {section}.{key}; known: {', '.join(d[section])}")
        d[section][key] = raw.strip()
    return Config.from_dict(d)

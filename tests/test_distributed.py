"""Rounds under torchrun, on the CPU: 2 ranks (and once 3) spawned here (gloo, 127.0.0.1, a free port) against
the single-process results: helpers, kNN (exactly), propagation (1e-5), embedding, failing together,
DDP training; then ``torchrun -m speler`` itself: a round, propagate and train, and a failing rank.
Every spawn has a deadline; a hang fails the test instead of blocking the suite."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ranks import free_port, spawn
from speler import distributed as dist
from speler.config import GraphConfig, PropagationConfig, TrainConfig
from speler.errors import DataFormatError
from speler.graph.knn import affinity, build_knn, same_up_to_ties
from speler.graph.knn_distributed import build_knn_sharded, gather_graph
from speler.graph.propagate import propagate
from speler.graph import propagate_distributed as pdist

WORLD = 2
N, DIM, K, CLASSES = 601, 16, 10, 4  # odd n: shards of unequal size
TINY = TrainConfig(channels=8, blocks=1, freq_channels=8, embed_dim=12, epochs=1, batch_size=8,
                   num_threads=1, device="cpu")
FIT = TrainConfig(channels=8, blocks=1, freq_channels=8, embed_dim=12, epochs=6, batch_size=8,
                  supervised_epochs=1, patience=10, holdout=0.4, num_threads=1, device="cpu")
EMBED_BATCH = 16


# --- data shared by the parent and the ranks (seeded, so each process makes the same) ----------
def _points(n: int = N, seed: int = 0):
    """Clustered points, sorted by cluster (as a locality order would put them: small halos)."""
    rng = np.random.default_rng(seed)
    y = np.sort(rng.integers(0, CLASSES, n))
    centres = rng.normal(size=(CLASSES, DIM)) * 1.5
    x = (centres[y] + rng.normal(size=(n, DIM))).astype(np.float32)
    labels = np.where(rng.random(n) < 0.1, y, -1).astype(np.int64)
    labels[np.searchsorted(y, np.arange(CLASSES))] = np.arange(CLASSES)
    return x, labels


def _skeletons():
    from factories import make_skeleton_set

    return make_skeleton_set(n=40, classes=CLASSES, frames=12, persons=1, seed=3)


def _model(ds):
    from speler.models import build_model

    torch.manual_seed(0)
    return build_model(ds.layout, in_channels=3, num_classes=CLASSES, frames=ds.x.shape[2],
                       persons=1, config=TINY)




# --- what the ranks run --------------------------------------------------------------------------
def _ranks_compute(out: str) -> None:
    """Everything a 2-rank run is compared on, saved by rank 0 into ``out``/result.npz."""
    me, world = dist.rank(), dist.world_size()
    # helpers
    assert world == WORLD and dist.is_main() == (me == 0)
    gathered = dist.all_gather_array(np.full((me + 1, 3), me, dtype=np.int32))
    assert gathered.shape == (3, 3) and gathered[:, 0].tolist() == [0, 1, 1]
    only_main = dist.gather_array(np.arange(me + 2, dtype=np.float64), dst=0)
    assert (only_main is None) == (me != 0)
    said = dist.broadcast_object({"from": me, "text": "ß"}, src=1)
    assert said == {"from": 1, "text": "ß"}
    got = dist.all_to_all_arrays([np.full(p + me, 10 * me + p) for p in range(world)])
    assert [g.tolist() for g in got] == [[10 * p + me] * (p + me) for p in range(world)]
    total = dist.all_reduce_array(np.array([me + 1.0]))
    assert total.tolist() == [3.0]
    # rows held 4 + 3 → the standard split of 7 (4 + 3) and from 1 + 6 (the boundary moves)
    mine = dist.reshard(np.arange(4)[:, None] if me == 0 else np.arange(4, 7)[:, None], 7)
    assert mine.ravel().tolist() == ([0, 1, 2, 3] if me == 0 else [4, 5, 6])
    mine = dist.reshard(np.arange(1) if me == 0 else np.arange(1, 7), 7)
    assert mine.tolist() == ([0, 1, 2, 3] if me == 0 else [4, 5, 6])

    # kNN on row shards, then the affinity rows and the propagation on row shards
    x, labels = _points()
    lo, hi = dist.shard_range(len(x))
    part = build_knn_sharded(x[lo:hi], config=GraphConfig(k=K))
    graph = gather_graph(part)
    W_rows = pdist.affinity_rows(part)
    res = {}
    for mode in ("halo", "allgather"):
        sc = pdist.propagate_scores(W_rows, labels, lo=lo, num_classes=CLASSES,
                                    config=PropagationConfig(), exchange=mode)
        res[mode] = sc
        res[mode + "_scores"] = dist.gather_array(sc.scores)
    warm = pdist.propagate_scores(W_rows, labels, lo=lo, num_classes=CLASSES,
                                  warm_start=0.5 * res["halo"].scores)
    warm_scores = dist.gather_array(warm.scores)
    w_all = dist.gather_array(W_rows.toarray())
    # the round's steps (graph.sharded): two views combined by rows, propagated, finished on rank 0
    from speler.graph import sharded

    W2_rows = pdist.affinity_rows(build_knn_sharded(x[lo:hi] ** 2, config=GraphConfig(k=K)))
    combined = sharded.combine([(W_rows, 1.0), (W2_rows, 0.5)])
    whole = sharded.whole_matrix(combined)
    finished = sharded.propagate_on(combined, labels, num_classes=CLASSES,
                                    config=PropagationConfig())
    assert (whole is None) == (finished is None) == (me != 0)

    # sharded embedding, gathered everywhere and on rank 0 only
    from speler.embed_distributed import embed_sharded

    ds = _skeletons()
    model = _model(ds)
    model.load_state_dict(torch.load(Path(out) / "model.pt", weights_only=True))
    emb = embed_sharded(model, ds, batch_size=EMBED_BATCH)
    emb_main = embed_sharded(model, ds, batch_size=EMBED_BATCH, to="main")
    assert (emb_main is None) == (me != 0)
    rows = embed_sharded(model, ds, batch_size=EMBED_BATCH, to="rows")  # batches: 32 + 8 rows
    e_lo, e_hi = dist.shard_range(ds.n)  # the graph's split: 20 + 20
    assert len(rows.time) == e_hi - e_lo
    np.testing.assert_array_equal(rows.freq, emb.freq[e_lo:e_hi])
    if me == 0:
        np.testing.assert_array_equal(emb_main.time, emb.time)
        np.savez(Path(out) / "sharded.npz", combined=whole.toarray(), scores=finished.scores,
                 labels=finished.labels, energy=finished.energy, reliable=finished.reliable,
                 weights=finished.solve.balance_weights)
        halo, full = res["halo"].solve, res["allgather"].solve
        np.savez(
            Path(out) / "result.npz", knn_idx=graph.indices, knn_sims=graph.sims,
            part_lo=part.lo, part_hi=part.hi, block_bytes=np.array(part.block_bytes),
            W=w_all, halo=res["halo_scores"], allgather=res["allgather_scores"],
            warm=warm_scores, iters=[halo.iterations, full.iterations, warm.solve.iterations],
            halo_bytes=np.array(halo.bytes_per_iteration), full_bytes=np.array(
                full.bytes_per_iteration), halo_rows=halo.halo_rows,
            emb_time=emb.time, emb_freq=emb.freq, emb_probs=emb.probs,
            emb_probs_time=emb.probs_time, emb_probs_freq=emb.probs_freq,
        )


def _ranks_fail(out: str) -> None:
    """Rank 1 has a NaN in its shard, then its search raises (both caught and recorded), then it
    raises in a stage of its own (not caught: the processes end with that error)."""
    me = dist.rank()
    x, _ = _points(40)
    lo, hi = dist.shard_range(len(x))
    shard = x[lo:hi].copy()
    if me == 1:
        shard[2, 0] = np.nan
    try:
        build_knn_sharded(shard, k=3)
    except dist.RankFailedError as e:
        (Path(out) / f"rank{me}.txt").write_text(str(e))
    if me == 1:  # a search that raises in the middle of the ring: no rank is left waiting
        from speler.graph import knn_distributed

        def broken(*args):
            raise MemoryError("no room for the scores")

        knn_distributed._search = broken
    try:
        build_knn_sharded(x[lo:hi], k=3)
    except dist.RankFailedError as e:
        (Path(out) / f"search{me}.txt").write_text(str(e))
    with dist.together("the test's own stage"):
        if me == 1:
            raise ValueError("boom on purpose")
    dist.all_reduce_array(np.zeros(1))  # rank 0 must not get here
    (Path(out) / "rank0_went_on.txt").write_text("yes")


def _ranks_uneven(out: str, cuts: list[int]) -> None:
    """kNN and propagation with rank r holding rows cuts[r]..cuts[r+1] (one of them empty)."""
    me = dist.rank()
    x, labels = _points()
    lo, hi = cuts[me], cuts[me + 1]
    part = build_knn_sharded(x[lo:hi], k=K)
    graph = gather_graph(part)
    sc = pdist.propagate_scores(pdist.affinity_rows(part), labels, lo=lo, num_classes=CLASSES)
    scores = dist.gather_array(sc.scores)
    if me == 0:
        np.savez(Path(out) / "uneven.npz", idx=graph.indices, sims=graph.sims, scores=scores)


def _fit_set():
    from factories import make_skeleton_set

    return make_skeleton_set(n=96, classes=CLASSES, frames=12, persons=2, labeled=0.6, seed=3)


def _fit_inputs(ds):
    """Human labels, and the true class as an ω-weighted pseudo-label of every other sample."""
    pseudo = np.where(ds.y < 0, ds.y_true, -1)
    return ds.y, pseudo, np.where(pseudo >= 0, 0.8, 0.0).astype(np.float32)


def _state_digest(model) -> str:
    import hashlib

    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode() + v.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def _ranks_fit(out: str) -> None:
    """DDP fit on 2 ranks: each saves its history, its state after every epoch (a digest taken
    when the epoch's BatchNorm statistics are recomputed, i.e. every epoch's end) and its final
    state; rank 0 also the checkpoint and its model's embeddings."""
    from speler import train

    me = dist.rank()
    digests = []
    original = train._recalibrate_batch_norm

    def recalibrate(model, *args, **kwargs):
        original(model, *args, **kwargs)
        digests.append(_state_digest(model))

    train._recalibrate_batch_norm = recalibrate
    ds = _fit_set()
    labels, pseudo, weights = _fit_inputs(ds)
    res = train.fit(ds, labels, config=FIT, pseudo_labels=pseudo, pseudo_weights=weights)
    assert isinstance(res.model, train.SpelerNet)  # the plain module, not the DDP wrapper
    history = [{k: v for k, v in row.items() if k != "seconds"} for row in res.history]
    torch.save({"history": history, "digests": digests, "best_epoch": res.best_epoch,
                "state": res.model.state_dict()}, Path(out) / f"fit{me}.pt")
    if me == 0:
        train.save_checkpoint(Path(out) / "checkpoint.pt", res, config=FIT, ds=ds)
        emb = train.embed(res.model, ds, batch_size=EMBED_BATCH)
        np.savez(Path(out) / "fit_embed.npz", time=emb.time, freq=emb.freq, probs=emb.probs)


# --- the tests -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    ds = _skeletons()
    torch.save(_model(ds).state_dict(), out / "model.pt")
    spawn(_ranks_compute, str(out))
    return {**np.load(out / "result.npz"), "sharded": dict(np.load(out / "sharded.npz"))}


def test_knn_on_two_ranks_equals_single_process_exactly(two_ranks):
    x, _ = _points()
    ref = build_knn(x, config=GraphConfig(k=K, index="flat", use_gpu=False))
    assert ref.method == "flat"
    np.testing.assert_array_equal(two_ranks["knn_idx"], ref.indices)
    np.testing.assert_allclose(two_ranks["knn_sims"], ref.sims, rtol=0, atol=1e-6)
    # rank 0 holds rows 0..300 and sends its shard once: 301 rows × 16 float32
    assert (int(two_ranks["part_lo"]), int(two_ranks["part_hi"])) == (0, 301)
    assert two_ranks["block_bytes"].tolist() == [301 * DIM * 4]
    np.testing.assert_array_equal(two_ranks["W"], affinity(ref).toarray())


def test_propagation_on_two_ranks_equals_single_process(two_ranks):
    x, labels = _points()
    W = affinity(build_knn(x, config=GraphConfig(k=K, index="flat", use_gpu=False)))
    ref = propagate(W, labels, num_classes=CLASSES, config=PropagationConfig())
    for mode in ("halo", "allgather"):
        np.testing.assert_allclose(two_ranks[mode], ref.scores, rtol=0, atol=1e-5)
    assert two_ranks["iters"][0] == two_ranks["iters"][1] == ref.solve.iterations
    warm = propagate(W, labels, num_classes=CLASSES, warm_start=0.5 * ref.scores)
    np.testing.assert_allclose(two_ranks["warm"], warm.scores, rtol=0, atol=1e-5)
    # the halo sends fewer bytes than gathering all of P, and both were counted each iteration
    halo, full = two_ranks["halo_bytes"], two_ranks["full_bytes"]
    assert len(halo) == len(full) == ref.solve.iterations and (halo > 0).all()
    assert halo.sum() < full.sum()
    assert 0 < int(two_ranks["halo_rows"]) <= N - 301


def test_the_rounds_sharded_steps_equal_the_single_process_functions(two_ranks):
    from speler.graph.knn import combine_affinities

    x, labels = _points()
    cfg = GraphConfig(k=K, index="flat", use_gpu=False)
    W = affinity(build_knn(x, config=cfg))
    W2 = affinity(build_knn(x ** 2, config=cfg))
    combined = combine_affinities([(W, 1.0), (W2, 0.5)])
    got = two_ranks["sharded"]
    np.testing.assert_array_equal(got["combined"], combined.toarray())  # the same arithmetic
    ref = propagate(combined, labels, num_classes=CLASSES, config=PropagationConfig())
    np.testing.assert_allclose(got["scores"], ref.scores, rtol=0, atol=1e-5)
    np.testing.assert_allclose(got["energy"], ref.energy, rtol=0, atol=1e-3)
    np.testing.assert_allclose(got["weights"], ref.solve.balance_weights, rtol=1e-6)
    np.testing.assert_array_equal(got["labels"], ref.labels)
    np.testing.assert_array_equal(got["reliable"], ref.reliable)


def test_embedding_on_two_ranks_equals_single_process(two_ranks):
    from speler.train import embed

    ds = _skeletons()
    model = _model(ds)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks run: another thread count sums in another order
    try:
        ref = embed(model, ds, batch_size=EMBED_BATCH)
    finally:
        torch.set_num_threads(threads)
    # shards of whole batches: each rank runs the very batches of the single pass, bit for bit
    for f in ("time", "freq", "probs", "probs_time", "probs_freq"):
        np.testing.assert_array_equal(two_ranks["emb_" + f], getattr(ref, f))


def test_three_ranks_one_of_them_empty_give_the_same_graph_and_scores(tmp_path):
    x, labels = _points()
    ref = build_knn(x, config=GraphConfig(k=K, index="flat", use_gpu=False))
    want = propagate(affinity(ref), labels, num_classes=CLASSES)
    spawn(_ranks_uneven, str(tmp_path), [0, 0, 10, N], world=3)
    got = np.load(tmp_path / "uneven.npz")
    np.testing.assert_array_equal(got["idx"], ref.indices)
    np.testing.assert_allclose(got["sims"], ref.sims, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got["scores"], want.scores, rtol=0, atol=1e-5)


def test_a_rank_that_raises_fails_every_rank_with_its_message(tmp_path):
    with pytest.raises(Exception) as caught:
        spawn(_ranks_fail, str(tmp_path))
    assert "rank 1 failed in the test's own stage: ValueError: boom on purpose" in str(caught.value)
    assert not (tmp_path / "rank0_went_on.txt").exists()
    for r in range(WORLD):  # the NaN shard of rank 1 was reported on both ranks, naming rank 1
        text = (tmp_path / f"rank{r}.txt").read_text()
        assert text.startswith("rank 1 failed in kNN input: DataFormatError:"), text
        assert "NaN" in text
        text = (tmp_path / f"search{r}.txt").read_text()
        assert text == "rank 1 failed in kNN search: MemoryError: no room for the scores", text


def test_ddp_fit_keeps_every_rank_identical_and_its_checkpoint_loads_in_one_process(tmp_path):
    from speler.train import embed, fit, load_checkpoint

    spawn(_ranks_fit, str(tmp_path))
    got = [torch.load(tmp_path / f"fit{r}.pt", weights_only=True) for r in range(WORLD)]
    # the same model on both ranks after every epoch and at the end, and the same history
    assert len(got[0]["digests"]) == FIT.epochs and got[0]["digests"] == got[1]["digests"]
    assert got[0]["state"].keys() == got[1]["state"].keys()
    for k, v in got[0]["state"].items():
        assert torch.equal(v, got[1]["state"][k]), k
    assert got[0]["history"] == got[1]["history"] and got[0]["best_epoch"] == got[1]["best_epoch"]
    history = got[0]["history"]
    assert len(history) == FIT.epochs and "holdout_acc" in history[0]
    # the loss falls: the human-label terms from the start, the whole loss once the pseudo-labels
    # joined (epoch 2, after FIT.supervised_epochs)
    assert history[-1]["ce"] < history[0]["ce"] and history[-1]["loss"] < history[1]["loss"]
    # the epochs drew the members a single process draws (the class-balanced pseudo-label draw)
    ds = _fit_set()
    labels, pseudo, weights = _fit_inputs(ds)
    one = fit(ds, labels, config=FIT, pseudo_labels=pseudo, pseudo_weights=weights)
    assert [(r["samples"], r["pseudo_samples"]) for r in history] == \
        [(r["samples"], r["pseudo_samples"]) for r in one.history]
    assert history[-1]["pseudo_samples"] > 0
    # rank 0's checkpoint loads here, without torchrun, and embeds as rank 0's model did
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt", ds)
    for k, v in got[0]["state"].items():
        assert torch.equal(ckpt.model.state_dict()[k], v), k
    emb = embed(ckpt.model, ds, batch_size=EMBED_BATCH)
    want = np.load(tmp_path / "fit_embed.npz")
    for f in ("time", "freq", "probs"):
        np.testing.assert_allclose(getattr(emb, f), want[f], rtol=1e-5, atol=1e-6)


def test_rank_steps_cover_the_epoch_once_with_equal_step_counts():
    from speler.train import _batches, _rank_steps

    order = np.arange(77)
    for size in (8, 16, 100):
        batches = _batches(order, size)
        assert _rank_steps(batches, 0, 1) == [(b, True) for b in batches]
        for world in (2, 3, 4):
            steps = [_rank_steps(batches, r, world) for r in range(world)]
            assert len({len(s) for s in steps}) == 1  # DDP: the same number of steps everywhere
            counted = np.concatenate([b for s in steps for b, c in s if c])
            assert sorted(counted.tolist()) == order.tolist()
            assert sum(c for s in steps for _, c in s) == len(batches)
    assert _rank_steps([], 1, 2) == []


# --- rounds under torchrun ----------------------------------------------------------------------
REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
# the default bundled sample, small settings; 50 human labels: the network is judged on 2 folds,
# so a round trains 3 networks (DDP) and embeds them (sharded)
SMALL = ["views.rocket_features=500", "views.judge_min_labels=4", "train.epochs=3",
         "train.supervised_epochs=1", "train.channels=8", "train.blocks=1",
         "train.freq_channels=8", "train.embed_dim=12", "train.warm_epochs=2"]
RANK1_CORRUPT = """\
# torchrun runs this as rank 0 and rank 1; rank 1's copy of the data has a NaN (a node whose disk
# returned bad bytes), the rest is ``python -m speler``
import os
import sys

import numpy as np

from speler.data.schema import SequenceSet

if os.environ["RANK"] == "1":
    load = SequenceSet.load.__func__

    def corrupt(cls, path):
        ds = load(cls, path)
        ds.x[3, 0, 0, 0, 0] = np.nan
        return ds

    SequenceSet.load = classmethod(corrupt)

from speler.cli import main

sys.exit(main())
"""


def _import_small(root: Path, name: str) -> None:
    from speler.cli import main

    sets = [a for kv in SMALL for a in ("--set", kv)]
    assert main(["--root", str(root), "import", "--sample", "synthetic_actions", "--project",
                 name, *sets]) == 0


def _torchrun(*argv, script: Path | None = None, world: int = WORLD) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node WORLD -m speler ARGV`` (or SCRIPT ARGV) on 127.0.0.1, a free
    port."""
    what = [str(script)] if script is not None else ["-m", "speler"]
    cmd = [str(TORCHRUN), "--nnodes", "1", "--nproc_per_node", str(world), "--rdzv-backend",
           "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", *what, *map(str, argv)]
    return subprocess.run(cmd, cwd=REPO, env=_rank_env(), capture_output=True, text=True,
                          timeout=300)


def _rank_env() -> dict:
    """The environment of a rank (one thread: the sums run in one order), without torchrun's."""
    env = {k: v for k, v in os.environ.items() if k not in dist.ENV_KEYS}
    env.update(OMP_NUM_THREADS="1", SPELER_DIST_TIMEOUT="60",
               PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
    return env


def _keys(tree):
    """The shape of a JSON tree: its keys, recursively (values left out)."""
    if isinstance(tree, dict):
        return {k: _keys(v) for k, v in tree.items()}
    return type(tree).__name__ if tree is None or isinstance(tree, (str, bool)) else "value"


@pytest.mark.slow
def test_a_round_under_torchrun_writes_what_a_single_process_round_writes(tmp_path):
    from speler.cli import main
    from speler.project import Project
    from speler.train import load_checkpoint

    assert TORCHRUN.is_file()
    for name in ("ranks", "one"):
        _import_small(tmp_path, name)
    done = _torchrun("--root", tmp_path, "round", "ranks")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("round 000 done") == 1  # rank 0 alone prints
    assert "suggestions:" in done.stdout and "error" not in done.stderr.lower()
    assert main(["--root", str(tmp_path), "round", "one"]) == 0

    folders = {n: tmp_path / n / "rounds" / "000" for n in ("ranks", "one")}
    assert sorted(p.name for p in folders["ranks"].iterdir()) == \
        sorted(p.name for p in folders["one"].iterdir())
    assert not [p for p in (tmp_path / "ranks" / "rounds").iterdir() if p.name != "000"]
    metrics = {n: json.loads((f / "metrics.json").read_text()) for n, f in folders.items()}
    assert _keys(metrics["ranks"]) == _keys(metrics["one"])
    for key in ("n", "human_labels", "human_per_class"):
        assert metrics["ranks"][key] == metrics["one"][key]
    assert len(metrics["ranks"]["judgement"]["folds"]) == 2  # the cross-fitted networks ran
    for n, f in folders.items():
        with np.load(f / "propagation.npz") as a, np.load(folders["one"] / "propagation.npz") as b:
            assert a.files == b.files
        with np.load(f / "embeddings.npz") as a, np.load(folders["one"] / "embeddings.npz") as b:
            assert a.files == b.files and a["probs"].shape == b["probs"].shape
        with Project.open(tmp_path, n) as project:
            assert [(r.no, r.status) for r in project.store.rounds()] == [(0, "done")]
            load_checkpoint(f / "checkpoint.pt", project.data)  # loads without torchrun
    # the same exports: same columns, same samples, a propagated label for every unlabeled one
    tables = {}
    for n in ("ranks", "one"):
        assert main(["--root", str(tmp_path), "export", n, "--out",
                     str(tmp_path / f"{n}.csv")]) == 0
        with open(tmp_path / f"{n}.csv", newline="") as fh:
            tables[n] = list(csv.DictReader(fh))
    assert tables["ranks"][0].keys() == tables["one"][0].keys()
    assert [r["id"] for r in tables["ranks"]] == [r["id"] for r in tables["one"]]
    assert [r["source"] for r in tables["ranks"]] == [r["source"] for r in tables["one"]]

    # a second round (warm-started from the first's checkpoint), then propagate and train
    done = _torchrun("--root", tmp_path, "round", "ranks")
    assert done.returncode == 0 and "round 001 done" in done.stdout, done.stderr[-3000:]
    done = _torchrun("--root", tmp_path, "propagate", "ranks")
    assert done.returncode == 0 and done.stdout.count("propagation on round 001") == 1, \
        done.stderr[-3000:]
    done = _torchrun("--root", tmp_path, "train", "ranks", "--out", tmp_path / "t.pt")
    assert done.returncode == 0 and done.stdout.count("checkpoint:") == 1, done.stderr[-3000:]
    with Project.open(tmp_path, "ranks") as project:
        assert [(r.no, r.status) for r in project.store.rounds()] == [(0, "done"), (1, "done")]
        load_checkpoint(tmp_path / "t.pt", project.data)


@pytest.mark.slow
def test_a_floor_round_under_torchrun_equals_the_single_process_round(tmp_path):
    """With ``views.network=never`` a round is the label-free views, their kNN graphs, their
    combination and the propagation, every one row-sharded over the ranks (``graph.sharded``):
    the same views bit for bit (exact PCA at this size), the same kNN lists, the scores to the
    solver's tolerance, the same labels, energies and reliable samples as one process (run with
    the ranks' thread count)."""
    for name in ("ranks", "one"):
        _import_small(tmp_path, name)
    floor = ["--set", "views.network=never"]
    done = _torchrun("--root", tmp_path, "round", "ranks", *floor)
    assert done.returncode == 0, done.stderr[-3000:]
    # the single process with the ranks' one thread: BLAS sums in another order with two (CI
    # does not set OMP_NUM_THREADS), which moved 2 of 94,720 view values by one float32 ulp
    done = subprocess.run([sys.executable, "-m", "speler", "--root", str(tmp_path), "round",
                           "one", *floor], cwd=REPO, env=_rank_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = {}
    for n in ("ranks", "one"):
        folder = tmp_path / n / "rounds" / "000"
        with np.load(folder / "embeddings.npz") as e, np.load(folder / "propagation.npz") as p:
            got[n] = {**{k: e[k] for k in e.files}, **{k: p[k] for k in p.files}}
    ranks, one = got["ranks"], got["one"]
    assert sorted(ranks) == sorted(one)
    views = [k for k in one if k.startswith("view.")]
    assert len(views) == 3
    for k in views:
        np.testing.assert_array_equal(ranks[k], one[k], err_msg=k)
    lists = [k for k in one if k.endswith(".knn_indices")]
    assert len(lists) == 3
    for k in lists:
        sims = k.replace("indices", "sims")
        assert same_up_to_ties(ranks[k], ranks[sims], one[k], one[sims]), k
    scale = float(np.abs(one["combined.scores"]).max())
    np.testing.assert_allclose(ranks["combined.scores"], one["combined.scores"], rtol=0,
                               atol=1e-4 * scale)
    for k in ("combined.labels", "combined.reliable", "combined.labeled", "human"):
        np.testing.assert_array_equal(ranks[k], one[k], err_msg=k)
    np.testing.assert_allclose(ranks["combined.energy"], one["combined.energy"], atol=1e-3)
    np.testing.assert_allclose(ranks["probs"], one["probs"], atol=1e-4)


NCCL_ROUND = """\
# torchrun runs this as the one rank of a CUDA machine: the group must be NCCL, its collectives
# must work on the GPU, then a round runs as ``python -m speler`` would
import sys

import numpy as np
import torch

from speler import distributed as dist
from speler.cli import main

assert dist.init(timeout_s=60)
assert torch.distributed.get_backend() == "nccl", torch.distributed.get_backend()
assert dist.all_reduce_array(np.array([2.0, 3.0])).tolist() == [2.0, 3.0]
print("backend nccl ok", flush=True)
dist.destroy()
sys.exit(main())
"""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_one_rank_on_a_gpu_runs_a_round_over_nccl(tmp_path):
    """Only one GPU is lent here: NCCL can be checked with one rank (two ranks on one device
    fall back to gloo, ``dist.default_backend``)."""
    from speler.project import Project

    _import_small(tmp_path, "gpu")
    script = tmp_path / "nccl_round.py"
    script.write_text(NCCL_ROUND)
    done = _torchrun("--root", tmp_path, "round", "gpu", script=script, world=1)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "backend nccl ok" in done.stdout and "round 000 done" in done.stdout
    with Project.open(tmp_path, "gpu") as project:
        assert [(r.no, r.status) for r in project.store.rounds()] == [(0, "done")]


def test_the_default_backend_is_gloo_when_ranks_would_share_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert dist.default_backend() == "gloo"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert dist.default_backend() == "nccl"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dist.default_backend() == "gloo"


def test_a_rank_that_fails_under_torchrun_fails_the_run_and_leaves_the_store_untouched(tmp_path):
    from speler.project import Project

    _import_small(tmp_path, "p")
    project_dir = tmp_path / "p"
    with Project.open(tmp_path, "p") as project:
        labels_before = project.store.current_labels().label.copy()
    store_before = (project_dir / "store.sqlite").read_bytes()
    script = tmp_path / "rank1_corrupt.py"
    script.write_text(RANK1_CORRUPT)
    done = _torchrun("--root", tmp_path, "round", "p", script=script)
    assert done.returncode != 0
    line = [ln for ln in done.stderr.splitlines() if ln.startswith("error: ")]
    assert len(line) == 1, done.stderr[-3000:]  # one error line, from rank 0, naming rank 1
    # the views are the round's first shared stage: rank 1 meets its NaN there
    assert line[0].startswith("error: rank 1 failed in label-free views input: DataFormatError: "
                              "plain view: sample 3 has non-finite values"), line
    assert "round 000 done" not in done.stdout
    # nothing written: no round in the store, no round folder, the same labels, the same bytes
    assert (project_dir / "store.sqlite").read_bytes() == store_before
    assert list((project_dir / "rounds").iterdir()) == []
    with Project.open(tmp_path, "p") as project:
        assert project.store.rounds() == []
        np.testing.assert_array_equal(project.store.current_labels().label, labels_before)
    # a command that does not run under torchrun is refused on every rank
    done = _torchrun("--root", tmp_path, "info", "p")
    assert done.returncode != 0 and "info does not run under torchrun" in done.stderr


# --- one process, no torchrun: world of one, nothing initialised -------------------------------
def test_without_torchrun_everything_is_a_world_of_one(monkeypatch):
    for key in dist.ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    assert not dist.launched() and not dist.init() and not dist.active()
    assert (dist.rank(), dist.world_size(), dist.is_main()) == (0, 1, True)
    a = np.arange(6).reshape(3, 2)
    assert dist.all_gather_array(a) is a and dist.gather_array(a) is a
    assert dist.broadcast_object({"x": 1}) == {"x": 1}
    with pytest.raises(KeyError, match="unchanged"):  # the original exception, not a wrapper
        with dist.together("stage"):
            raise KeyError("unchanged")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not dist.launched()  # LOCAL_RANK missing: not torchrun


def test_shard_ranges_cover_everything_in_order():
    for n in (0, 1, 5, 601):
        for world in (1, 2, 3, 8):
            for align in (1, 16):
                r = dist.shard_ranges(n, world, align=align)
                assert len(r) == world and r[0][0] == 0 and r[-1][1] == n
                assert all(a[1] == b[0] for a, b in zip(r, r[1:]))
                sizes = [hi - lo for lo, hi in r]
                assert max(sizes) - min(sizes) <= (1 if align == 1 else 2 * align - 1)
                assert all(lo % align == 0 for lo, _ in r if lo < n)
    assert dist.shard_ranges(601, 2) == [(0, 301), (301, 601)]
    assert dist.shard_ranges(40, 2, align=16) == [(0, 32), (32, 40)]


def test_single_process_knn_propagation_and_embedding_match_the_plain_functions():
    from speler.embed_distributed import embed_sharded
    from speler.train import embed

    x, labels = _points(200, seed=5)
    ref = build_knn(x, config=GraphConfig(k=7, index="flat", use_gpu=False))
    part = build_knn_sharded(x, k=7)
    np.testing.assert_array_equal(part.graph.indices, ref.indices)
    np.testing.assert_array_equal(part.graph.sims, ref.sims)
    assert part.block_bytes == []
    W = affinity(ref)
    W_rows = pdist.affinity_rows(part)
    assert (W_rows != W).nnz == 0
    for cfg, kw in ((PropagationConfig(), {}), (PropagationConfig(balance_prior="predictions"), {}),
                    (PropagationConfig(balance=False), {}),
                    (PropagationConfig(), {"predictions": np.arange(200) % CLASSES}),
                    (PropagationConfig(balance_prior="predictions"),
                     {"predictions": np.arange(200) % CLASSES})):
        want = propagate(W, labels, num_classes=CLASSES, config=cfg, **kw)
        got = pdist.propagate_scores(W_rows, labels, lo=0, num_classes=CLASSES, config=cfg, **kw)
        np.testing.assert_allclose(got.scores, want.scores, rtol=0, atol=1e-6)
        assert got.solve.iterations == want.solve.iterations
        np.testing.assert_allclose(got.balance_weights, want.solve.balance_weights, rtol=1e-6)
    ds = _skeletons()
    model = _model(ds)
    a, b = embed_sharded(model, ds, batch_size=EMBED_BATCH), embed(model, ds, batch_size=EMBED_BATCH)
    np.testing.assert_array_equal(a.time, b.time)


def test_bad_inputs_are_refused_with_a_clear_message():
    with pytest.raises(DataFormatError, match="NaN"):
        build_knn_sharded(np.array([[0.0, 1.0], [np.nan, 1.0], [1.0, 0.0]]), k=1)
    with pytest.raises(DataFormatError, match="at least 2 samples"):
        build_knn_sharded(np.ones((1, 3)), k=1)
    with pytest.raises(ValueError, match="one per rank"):
        dist.all_to_all_arrays([np.zeros(1), np.zeros(1)])


# --- simulations under torchrun -------------------------------------------------------------------
# two strategies that read only the graph (random, speler) and one that reads the network's softmax
# (entropy); 2 rounds of 5 labels from the 50 the sample starts with
SIMULATE = ["simulate", "--sample", "synthetic_actions", "--rounds", "2", "--budget", "5",
            "--strategies", "random", "speler", "entropy", *[a for kv in SMALL for a in ("--set", kv)]]
RANK0_SUGGEST_FAILS = """\
# torchrun runs this as rank 0 and rank 1; rank 0's second choice of samples fails in the middle
# of the simulation (rank 1 is then waiting for it), the rest is ``python -m speler``
import os
import sys

from speler import simulate

if os.environ["RANK"] == "0":
    suggest_for = simulate.suggest_for
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("no room for the suggestions")
        return suggest_for(*args, **kwargs)

    simulate.suggest_for = failing

from speler.cli import main

sys.exit(main())
"""


@pytest.mark.slow
def test_a_simulation_under_torchrun_draws_the_curves_of_a_single_process_one(tmp_path):
    from speler.cli import main

    done = _torchrun(*SIMULATE, "--out", tmp_path / "ranks.json")
    assert done.returncode == 0, done.stderr[-3000:]
    # rank 0 alone prints the table and writes the curves
    assert done.stdout.count("AUC macro-F1") == 1 and done.stdout.count("wrote ") == 1
    assert done.stdout.count("synthetic_actions: n=740, 11 classes, 50 labels to start") == 1
    assert "error" not in done.stderr.lower()
    assert (tmp_path / "ranks.html").is_file()
    assert main([*SIMULATE, "--out", str(tmp_path / "one.json")]) == 0
    got, want = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("ranks", "one"))
    assert set(got["curves"]) == set(want["curves"]) == {"random", "speler", "entropy"}
    for curves in (got["curves"], want["curves"]):
        for curve in curves.values():  # the same rounds, the same labels revealed
            assert [(c["round"], c["labels"], c["n"]) for c in curve] == \
                [(r, 50 + 5 * r, 740 - 50 - 5 * r) for r in range(3)]
    # round 0 is the floor (the network stays out of the graph at this size: its cross-fitted
    # score is far below the floor's), so it is the same for every strategy in both runs, and
    # the strategies that read only the graph choose the same samples: the same curves, exactly
    for s in ("random", "speler"):
        assert got["curves"][s] == want["curves"][s], s
        assert got["auc"][s] == want["auc"][s], s
    # entropy ranks by the network's softmax, which DDP changes (each rank augments its own part
    # of every batch): the same start, then its own picks
    assert got["curves"]["entropy"][0] == want["curves"]["entropy"][0] == want["curves"]["random"][0]
    assert got["dataset"] == want["dataset"] and got["budget"] == want["budget"] == 5


def test_a_simulation_with_a_failing_rank_under_torchrun_fails_every_rank_in_one_line(tmp_path):
    # rank 1's copy of the data has a NaN: refused before any work, naming rank 1
    script = tmp_path / "rank1_corrupt.py"
    script.write_text(RANK1_CORRUPT)
    done = _torchrun(*SIMULATE, "--out", tmp_path / "sim.json", script=script)
    assert done.returncode != 0
    line = [ln for ln in done.stderr.splitlines() if ln.startswith("error: ")]
    assert len(line) == 1, done.stderr[-3000:]  # one error line, from rank 0, naming rank 1
    assert line[0].startswith("error: rank 1 failed in checking the data: DataFormatError: "), line
    assert line[0].endswith("rank 1's data or settings differ from rank 0's; give every rank "
                            "the same"), line
    assert "AUC" not in done.stdout and not (tmp_path / "sim.json").exists()
    # rank 0 fails in the middle of the simulation, while rank 1 waits for its choice of samples
    script = tmp_path / "rank0_suggest_fails.py"
    script.write_text(RANK0_SUGGEST_FAILS)
    done = _torchrun("simulate", "--sample", "synthetic_actions", "--rounds", "2", "--budget", "5",
                     "--strategies", "random", "--set", "views.network=never", "--set",
                     "views.rocket_features=500", "--out", tmp_path / "sim.json", script=script)
    assert done.returncode != 0
    line = [ln for ln in done.stderr.splitlines() if ln.startswith("error: ")]
    assert line == ["error: rank 0 failed in simulated round: RuntimeError: no room for the "
                    "suggestions"], done.stderr[-3000:]
    assert "AUC" not in done.stdout and not (tmp_path / "sim.json").exists()

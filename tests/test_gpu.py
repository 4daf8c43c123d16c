"""The device code paths: fit, embed, kNN and propagation on CUDA checked against the CPU.

Tests that need CUDA are marked ``gpu`` and skipped without a CUDA device. The device-only code
that also runs on CPU torch (the block CG with every array on the device, the float16 kNN scheme
in tests/test_knn.py) is run here on the CPU too, so CI without a GPU still tests it.

Tolerances on CUDA, and why:
- propagation: float32 CG on both sides, only the summation order differs: scores within
  1e-4 relative (+ 1e-6 absolute), iteration counts within 2;
- kNN: the torch search is exact by construction (float16 candidates re-ranked in float32 and
  vouched for): similarities within 1e-5 of faiss on the CPU, neighbour sets equal outside ties;
- embed: bf16 autocast keeps about 3 significant digits per layer: embeddings within 5 % (relative
  Frobenius norm), probabilities within 0.05, the predicted class the same on >= 95 % of samples;
- fit: cuDNN and bf16 give other rounding, so training paths drift apart; from the same
  initial weights and augmentation draws the first epoch's loss agrees within 5 % and both
  reach the separable set's accuracy;
- CUDA graphs: a replay launches the kernels the step ran as written, so a small float32 step
  follows its run-as-written twin within 1e-5, embed's forward within 1e-4; fit with and without
  its graph (bf16) keeps each epoch's loss within 5 %.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from speler.config import GraphConfig, PropagationConfig
from speler.errors import DataFormatError
from speler.graph.knn import affinity, build_knn
from speler.graph.propagate import (
    PropagationWarning, _block_cg_on_device, _block_cg_torch, normalized_operator,
)

from test_knn import _clusters
from test_train import FAST, make_actions

HAS_CUDA = torch.cuda.is_available()
needs_cuda = [pytest.mark.gpu,
              pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]


def _cg(device: str, S, B, config, X0=None, solved=None):
    """The device CG: on "cpu" the device implementation itself (it would otherwise only run on
    CUDA), on "cuda" through ``_block_cg_torch`` as a caller would."""
    if device == "cpu":
        return _block_cg_on_device(S, B, config, X0, None, "test", config.tol, solved, "cpu")
    return _block_cg_torch(S, B, config, X0, None, "test", config.tol, solved, device=device)


def _system(n: int = 1500, C: int = 6, seed: int = 0):
    x = _clusters(n, 16, seed=seed, centers=C)
    W = affinity(build_knn(x, config=GraphConfig(index="flat", use_gpu=False), k=10))
    S = normalized_operator(W)
    rng = np.random.default_rng(seed)
    B = np.zeros((n, C), dtype=np.float32)
    seeds = rng.choice(n, size=40, replace=False)
    B[seeds, rng.integers(0, C - 1, size=40)] = 0.2  # the last class has no seed: a zero column
    return S, B


@pytest.mark.parametrize("device", DEVICES)
def test_block_cg_on_device_equals_the_cpu_solver(device):
    S, B = _system()
    config = PropagationConfig(tol=1e-6)
    want, it_cpu, conv_cpu, res_cpu, prod_cpu = _block_cg_torch(S, B, config, None, None, "t",
                                                                config.tol, None)
    got, it, conv, res, prod = _cg(device, S, B, config)
    assert conv and conv_cpu and res <= config.tol
    assert abs(it - it_cpu) <= 2 and abs(prod - prod_cpu) <= 2 * B.shape[1]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    assert not got[:, -1].any()  # zero column solved by 0
    # warm start where the caller knows some columns are solved: they are left as they are
    X0 = want.copy()
    X0[:, 1] = 0.0
    solved = np.ones(B.shape[1], dtype=bool)
    solved[1] = False
    again, it2, conv2, _, prod2 = _cg(device, S, B, config, X0=X0, solved=solved)
    assert conv2 and prod2 <= it2
    np.testing.assert_array_equal(np.delete(again, 1, axis=1), np.delete(X0, 1, axis=1))
    np.testing.assert_allclose(again[:, 1], want[:, 1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_block_cg_on_device_warns_when_it_stops_early(device):
    S, B = _system(n=600)
    config = PropagationConfig(tol=1e-9, max_iter=3)
    with pytest.warns(PropagationWarning, match="stopped after 3 iterations"):
        X, iters, converged, residual, _ = _cg(device, S, B, config)
    assert iters == 3 and not converged and residual > config.tol
    assert X.shape == B.shape and X.dtype == np.float32


def test_csr_on_device_keeps_the_matrix():
    from speler.graph.propagate import _torch_csr

    S = sp.random(50, 50, density=0.1, format="csr", random_state=0, dtype=np.float32)
    dense = _torch_csr(S, "cpu").to_dense().numpy()
    np.testing.assert_array_equal(dense, S.toarray())
    if HAS_CUDA:
        on_gpu = _torch_csr(S, "cuda")
        assert on_gpu.is_cuda and on_gpu.crow_indices().dtype == torch.int32
        np.testing.assert_array_equal(on_gpu.to_dense().cpu().numpy(), S.toarray())


# --- CUDA only ----------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_torch_knn_on_cuda_equals_faiss_on_the_cpu():
    x = _clusters(6000, 64, seed=2, latent=12)
    gpu = build_knn(x, config=GraphConfig(backend="torch"), k=15)
    cpu = build_knn(x, config=GraphConfig(index="flat", use_gpu=False), k=15)
    assert gpu.method == "torch-gpu" and gpu.recall is None
    np.testing.assert_allclose(gpu.sims, cpu.sims, atol=1e-5)
    same = np.all(np.sort(gpu.indices, 1) == np.sort(cpu.indices, 1), axis=1)
    assert same.mean() >= 0.999  # the rest: exact ties at the k-th neighbour
    a, b = affinity(gpu), affinity(cpu)
    assert abs(a.nnz - b.nnz) <= 0.001 * b.nnz
    assert abs(a.sum() - b.sum()) <= 1e-4 * b.sum()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_embed_on_cuda_matches_the_cpu_and_pads_the_last_batch():
    import speler.train as train

    ds = make_actions(per_class=13, persons=2)  # 52 samples, second person slot empty
    ds.x[::4, ..., 1] = 0.7 * ds.x[::4, ..., 0]
    model = train.fit(ds, ds.y, config=dataclasses.replace(FAST, epochs=2)).model
    cpu = train.embed(model, ds, device="cpu")
    gpu = train.embed(model, ds, device="cuda", batch_size=16)  # 52 = 3 × 16 + 4 padded to 16
    for a, b in ((gpu.time, cpu.time), (gpu.freq, cpu.freq)):
        assert np.linalg.norm(a - b) <= 0.05 * np.linalg.norm(b)
    assert np.abs(gpu.probs - cpu.probs).max() <= 0.05
    assert (gpu.probs.argmax(1) == cpu.probs.argmax(1)).mean() >= 0.95
    # the samples are checked on the GPU: a NaN in the last, padded batch is named
    ds.x[50, 1, 3, 4, 0] = np.nan
    with pytest.raises(DataFormatError, match=r"embed: sample 50 \(id 'act_050'\)"):
        train.embed(model, ds, device="cuda", batch_size=16)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_embed_replays_its_forward_pass_from_a_cuda_graph_when_asked(caplog):
    """Replayed (cuda_graph=True) and as written (the default) give the same embeddings."""
    import logging

    import speler.train as train

    ds = make_actions(per_class=13, persons=2)  # 52 samples: 7 batches of 8, the last padded
    ds.x[::4, ..., 1] = 0.7 * ds.x[::4, ..., 0]
    model = train.fit(ds, ds.y, config=dataclasses.replace(FAST, epochs=2)).model
    with caplog.at_level(logging.DEBUG, logger="speler.cuda_graph"):
        graphed = train.embed(model, ds, device="cuda", batch_size=8, cuda_graph=True)
    assert "embed's forward pass captured as a CUDA graph" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="speler.cuda_graph"):
        plain = train.embed(model, ds, device="cuda", batch_size=8)
    assert "captured" not in caplog.text
    for a, b in ((graphed.time, plain.time), (graphed.freq, plain.freq),
                 (graphed.probs, plain.probs)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_fit_on_cuda_follows_the_cpu():
    from speler.train import embed, fit

    ds = make_actions(per_class=16, seed=3, labeled_per_class=6)
    cfg = dataclasses.replace(FAST, epochs=12, holdout=0.0, dropout=0.0)
    cpu = fit(ds, ds.y, config=cfg)
    gpu = fit(ds, ds.y, config=dataclasses.replace(cfg, device="cuda"))
    assert gpu.device == "cuda" and len(gpu.history) == len(cpu.history) == 12
    assert abs(gpu.history[0]["loss"] - cpu.history[0]["loss"]) <= 0.05 * cpu.history[0]["loss"]
    unl = ds.y < 0
    for result in (cpu, gpu):
        acc = float((embed(result.model, ds).probs.argmax(1)[unl] == ds.y_true[unl]).mean())
        assert acc >= 0.7, f"{result.device}: accuracy {acc:.2f}"


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("tune", [True, False])
def test_fit_on_cuda_tunes_cudnn_only_when_asked(tune):
    from speler.train import fit

    ds = make_actions(per_class=8, seed=3, labeled_per_class=4)
    before = torch.backends.cudnn.benchmark
    seen = []
    fit(ds, ds.y, config=dataclasses.replace(FAST, epochs=2, device="cuda", cudnn_benchmark=tune),
        progress=lambda *_: seen.append(torch.backends.cudnn.benchmark))
    assert seen and all(s == (tune or before) for s in seen)
    assert torch.backends.cudnn.benchmark == before  # restored after the fit


def test_graph_step_keeps_a_graph_per_set_of_input_shapes(monkeypatch):
    """GraphStep's bookkeeping, with CUDA's side stream and recording stood in for: each set of
    input shapes runs as written WARMUP times, then is captured and replayed (fit's batches are
    the few labels alone first, full batches once pseudo-labels join), up to MAX_GRAPHS graphs."""
    import speler.cuda_graph as cg

    replayed = []

    def fake_capture(self, tensors, shapes):
        def replay(ts):
            replayed.append(ts[0].shape[0])
            return self.body(*ts)
        self._graphs[shapes] = replay
        return replay

    monkeypatch.setattr(cg.GraphStep, "_on_side_stream", lambda self, ts: self.body(*ts))
    monkeypatch.setattr(cg.GraphStep, "_capture", fake_capture)
    step = cg.GraphStep(lambda x: x.sum().view(1), graph=True)
    sizes = [100] * 5 + [256] * 6 + [100] * 2
    assert [float(step(torch.ones(b))) for b in sizes] == [float(b) for b in sizes]
    assert replayed == [100] * 2 + [256] * 3 + [100] * 2 and step.replays == 7
    many = cg.GraphStep(lambda x: x.sum().view(1), graph=True)
    for b in range(1, cg.MAX_GRAPHS + 3):
        for _ in range(cg.WARMUP + 2):
            many(torch.ones(b))
    assert sorted(many._graphs) == [((b,),) for b in range(1, cg.MAX_GRAPHS + 1)]


def test_graph_step_whose_capture_fails_warns_once_and_runs_as_written(monkeypatch):
    """Without CUDA the recording itself fails: a warning, then every call as written."""
    import warnings

    import speler.cuda_graph as cg

    if HAS_CUDA:
        pytest.skip("the capture succeeds here; test_train_step_that_cannot_be_captured covers it")
    monkeypatch.setattr(cg.GraphStep, "_on_side_stream", lambda self, ts: self.body(*ts))
    step = cg.GraphStep(lambda x: x.sum().view(1), graph=True, what="the test step")
    with pytest.warns(RuntimeWarning, match="the test step could not be captured") as caught:
        first = [float(step(torch.ones(3))) for _ in range(cg.WARMUP + 1)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        later = [float(step(torch.ones(b))) for b in (3, 3, 5)]
    assert len(caught) == 1 and step.failed and step.replays == 0
    assert first == [3.0] * (cg.WARMUP + 1) and later == [3.0, 3.0, 5.0]


def _linear_step():
    """A small deterministic training step on CUDA for ``GraphStep``: (net, opt, data, body)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    net = net.cuda()
    opt = torch.optim.Adam(net.parameters(), lr=torch.tensor(1e-2, device="cuda"), fused=True,
                           capturable=True)
    data = torch.randn(40, 6, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    labels = torch.arange(40, device="cuda") % 3

    def body(x, rows):
        loss = torch.nn.functional.cross_entropy(net(x), labels[rows])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach().view(1)
    return net, opt, data, body


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.filterwarnings("ignore:.*capturable.*:UserWarning")
def test_train_step_replayed_from_a_cuda_graph_follows_the_steps_run_as_written():
    """After WARMUP steps as written the step is captured and replayed: the losses and weights
    follow the same steps run as written, a learning rate filled in between replays takes
    effect, and a batch of another shape runs as written."""
    from speler.cuda_graph import WARMUP, GraphStep

    runs = []
    for graph in (False, True):
        net, opt, data, body = _linear_step()
        step = GraphStep(body, graph=graph)
        seen = []
        for i in range(10):
            rows = torch.arange(8 * (i % 5), 8 * (i % 5) + 8, device="cuda")
            if i == 6:
                opt.param_groups[0]["lr"].fill_(2e-3)
            seen.append(float(step(data[rows], rows)))
        rows = torch.arange(5, device="cuda")
        seen.append(float(step(data[rows], rows)))
        runs.append((seen, [p.detach().clone() for p in net.parameters()], step))
    (eager, w_eager, s_eager), (graphed, w_graph, s_graph) = runs
    assert s_eager.replays == 0 and s_graph.replays == 10 - WARMUP and s_graph.failed is None
    np.testing.assert_allclose(graphed, eager, rtol=1e-5, atol=1e-6)
    for a, b in zip(w_graph, w_eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert eager[-1] < eager[0]  # it trains


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_train_step_that_cannot_be_captured_warns_and_runs_as_written():
    from speler.cuda_graph import WARMUP, GraphStep

    def body(x, rows):  # .item() waits for the GPU: not allowed in a capture
        return (x.sum() + float(x.sum().item())).view(1)

    step = GraphStep(body, graph=True)
    x, rows = torch.ones(4, device="cuda"), torch.arange(4, device="cuda")
    with pytest.warns(RuntimeWarning, match="could not be captured as a CUDA graph"):
        out = [float(step(x, rows)) for _ in range(WARMUP + 3)]
    assert out == [8.0] * (WARMUP + 3) and step.failed and step.replays == 0


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_fit_on_cuda_replays_its_step_and_learns_as_without_the_graph(caplog):
    import logging
    import warnings

    from speler.train import embed, fit

    ds = make_actions(per_class=16, seed=3, labeled_per_class=10, persons=2)
    ds.x[::3, ..., 1] = 0.5 * ds.x[::3, ..., 0]  # a second person in some clips
    cfg = dataclasses.replace(FAST, epochs=8, holdout=0.0, dropout=0.0, device="cuda")
    with warnings.catch_warnings(), caplog.at_level(logging.DEBUG, logger="speler.cuda_graph"):
        warnings.filterwarnings("error", message=".*could not be captured.*")
        graphed = fit(ds, ds.y, config=cfg)
    assert "captured as a CUDA graph" in caplog.text
    eager = fit(ds, ds.y, config=dataclasses.replace(cfg, cuda_graph=False))
    assert len(graphed.history) == len(eager.history) == 8
    for a, b in zip(graphed.history, eager.history):
        assert abs(a["loss"] - b["loss"]) <= 0.05 * b["loss"] + 1e-3, (a, b)
    unl = ds.y < 0
    for result in (graphed, eager):
        acc = float((embed(result.model, ds).probs.argmax(1)[unl] == ds.y_true[unl]).mean())
        assert acc >= 0.7, f"accuracy {acc:.2f}"


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_a_training_step_never_waits_for_the_gpu():
    """Forward (train and eval, empty person slots included), loss, backward and the fused Adam
    step queue work without a host sync (torch's sync debug mode raises on one)."""
    from speler.data.layouts import get_layout
    from speler.models import build_model
    from speler.train import _autocast, _batch_loss

    torch.manual_seed(0)
    model = build_model(get_layout("ntu25"), in_channels=3, num_classes=5, frames=16, persons=2,
                        config=FAST).cuda()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    x = torch.randn(8, 3, 16, 25, 2, device="cuda")
    x[:4, ..., 1] = 0.0
    target = torch.arange(8, device="cuda") % 5
    human = torch.arange(8, device="cuda") < 6
    weight = torch.full((8,), 0.5, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        model.train()
        with _autocast("cuda", True):
            out = model(x)
        terms = _batch_loss(out, target, human, weight, prior=None, config=FAST)
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        opt.step()
        model.eval()
        with torch.no_grad(), _autocast("cuda", True):
            model(x)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(terms["loss"]).item()


def test_propagation_device_is_checked():
    from speler.errors import ConfigError
    from speler.graph.propagate import solver_device

    with pytest.raises(ConfigError, match="propagation.device"):
        PropagationConfig(device="gpu")
    assert solver_device("cpu") == "cpu"
    assert solver_device("auto") == ("cuda" if HAS_CUDA else "cpu")
    if not HAS_CUDA:
        with pytest.raises(ConfigError, match="sees no CUDA device"):
            solver_device("cuda")


@pytest.mark.parametrize("device", DEVICES)
def test_operator_made_on_the_device_is_the_hosts_bit_for_bit(device):
    from speler.graph.propagate import _device_operator

    x = _clusters(800, 16, seed=5, centers=4)
    W = affinity(build_knn(x, config=GraphConfig(index="flat", use_gpu=False), k=8))
    W = sp.block_diag([W, sp.csr_matrix((1, 1), dtype=np.float32)], format="csr")  # isolated
    w = np.random.default_rng(5).uniform(0.2, 3.0, W.shape[0])
    uploaded: dict = {}
    S = _device_operator(W, w, device, uploaded)
    assert S.layout == torch.sparse_csr and S.dtype == torch.float32
    assert S.device.type == torch.device(device).type
    np.testing.assert_array_equal(S.to_dense().cpu().numpy(), normalized_operator(W, w).toarray())
    held = uploaded["W"]
    plain = _device_operator(W, None, device, uploaded)  # the next pass: W is not uploaded again
    assert uploaded["W"] is held and plain.col_indices().data_ptr() == held[1].data_ptr()
    np.testing.assert_array_equal(plain.to_dense().cpu().numpy(), normalized_operator(W).toarray())
    assert not plain.to_dense()[-1].any()  # the isolated row stays zero, no NaN


@pytest.mark.parametrize("device", DEVICES)
def test_propagate_on_the_device_path_equals_the_cpu(device, monkeypatch):
    """The whole propagation (balance pass, solve, energies) with its operators and CG on the
    device. On "cpu" the device path itself runs on the CPU: ``solver_device`` is stood in for to
    name the CPU as a device ("cpu:0"); on CUDA for real."""
    import speler.graph.propagate as prop

    x = _clusters(3000, 16, seed=4, centers=5)
    W = affinity(build_knn(x, config=GraphConfig(index="flat", use_gpu=False), k=10))
    rng = np.random.default_rng(4)
    labels = np.full(len(x), -1)
    seeds = rng.choice(len(x), size=60, replace=False)
    labels[seeds] = rng.integers(0, 5, size=60)
    cpu = prop.propagate(W, labels, num_classes=5, config=PropagationConfig(device="cpu",
                                                                             tol=1e-6))
    made = []
    real = prop._device_operator
    monkeypatch.setattr(prop, "_device_operator", lambda *a: made.append(a) or real(*a))
    if device == "cpu":
        monkeypatch.setattr(prop, "solver_device", lambda preference: "cpu:0")
    gpu = prop.propagate(W, labels, num_classes=5, config=PropagationConfig(device=device,
                                                                             tol=1e-6))
    # both passes (plain, then balanced) made their operator on the device from one upload
    assert len(made) == 2 and made[0][3] is made[1][3] and "W" in made[1][3]
    assert made[0][1] is None and made[1][1] is not None
    np.testing.assert_allclose(gpu.scores, cpu.scores, rtol=1e-4, atol=1e-6)
    assert (gpu.labels == cpu.labels).mean() >= 0.999
    np.testing.assert_allclose(gpu.energy, cpu.energy, rtol=1e-3, atol=1e-4)

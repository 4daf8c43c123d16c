"""The backbone: shapes for every layout, the layout's graph, gradients, person pooling, losses."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from speler.config import TrainConfig
from speler.data.layouts import LAYOUTS, get_layout
from speler.errors import ConfigError, DataFormatError
from speler.models import build_model, paper_config
from speler.models import losses
from speler.models.fcn import fcn_plan
from speler.models.fourier import spectrum
from speler.models.gcn import GraphConv, layout_partitions
from speler.models.net import GraphTimeBranch, SeriesTimeBranch, skeleton_plan
from speler.models.tcn import MultiScaleTCN

TINY = TrainConfig(channels=8, blocks=2, freq_channels=8, embed_dim=16)


def _model(layout_name: str, *, channels: int = 3, classes: int = 5, persons: int = 2,
           config: TrainConfig = TINY, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(get_layout(layout_name), in_channels=channels, num_classes=classes,
                       frames=16, persons=persons, config=config)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_forward_shapes_for_every_layout(name):
    layout = get_layout(name)
    c, m = (4, 1) if layout.is_series else (3, 2)
    model = _model(name, channels=c, classes=5, persons=m)
    x = torch.randn(3, c, 16, layout.num_joints, m)
    if m == 2:
        x[0, ..., 1] = 0.0  # sample 0 has one person
    out = model(x)
    assert out.logits_time.shape == (3, 5) and out.logits_freq.shape == (3, 5)
    assert out.emb_time.shape == (3, 16) and out.emb_freq.shape == (3, 16)
    assert out.probs.shape == (3, 5)
    torch.testing.assert_close(out.probs.sum(1), torch.ones(3))
    expected = SeriesTimeBranch if layout.is_series else GraphTimeBranch
    assert isinstance(model.time_branch, expected)


def test_series_branch_is_chosen_by_layout_not_by_flag():
    model = _model("series", channels=6, persons=1)
    assert model.is_series and isinstance(model.time_branch, SeriesTimeBranch)
    assert not _model("natops8").is_series


def test_forward_rejects_wrong_input_shape():
    model = _model("ntu25")
    with pytest.raises(DataFormatError, match=r"C=2 channels and V=25 joints.*expects C=3, V=25"):
        model(torch.randn(2, 2, 16, 25, 1))
    with pytest.raises(DataFormatError, match=r"\(N, C, T, V, M\)"):
        model(torch.randn(2, 3, 16, 25))


@pytest.mark.parametrize("name", [n for n in sorted(LAYOUTS) if n != "series"])
def test_adjacency_matches_layout_bones(name):
    layout = get_layout(name)
    v = layout.num_joints
    expected = np.eye(v, dtype=bool)
    for a, b in layout.bones:
        expected[a, b] = expected[b, a] = True
    parts = layout_partitions(layout)
    assert parts.shape == (3, v, v)
    np.testing.assert_array_equal(parts[0], np.eye(v))
    np.testing.assert_array_equal(parts[1] > 0, parts[2].T > 0)  # outward = inward reversed
    # every joint with a parent gathers from exactly its parent(s), rows sum to 1
    rows = parts[1].sum(1)
    assert np.allclose(rows[rows > 0], 1.0)
    model = _model(name)
    for block in model.time_branch.blocks:
        np.testing.assert_array_equal(block.gcn.adjacency.numpy() > 0, expected)
        np.testing.assert_array_equal(block.gcn.A.numpy(), parts)


def test_graph_conv_aggregates_along_bones_at_initialisation():
    # With the learned offset and refinement at zero, a signal on one joint reaches only itself
    # and its bone neighbours.
    layout = get_layout("kinect_v1")
    parts = layout_partitions(layout)
    torch.manual_seed(0)
    gcn = GraphConv(2, 4, parts, groups=2).eval()
    x = torch.zeros(1, 2, 3, layout.num_joints)
    joint = 5  # ElbowLeft: neighbours ShoulderLeft (4) and WristLeft (6)
    x[0, :, :, joint] = 1.0
    base = gcn(torch.zeros_like(x))
    moved = (gcn(x) - base).abs().sum(dim=(0, 1, 2)) > 1e-6
    assert set(np.flatnonzero(moved.numpy())) == {4, 5, 6}


def test_topology_refinement_learns_per_group():
    gcn = GraphConv(8, 8, layout_partitions(get_layout("ntu25")), groups=4)
    x = torch.randn(2, 8, 6, 25)
    adj = gcn.topology(x)
    assert adj.shape == (2, 3, 4, 25, 25)
    gcn(x).square().sum().backward()
    assert gcn.alpha.grad is not None and gcn.alpha.grad.abs().item() > 0
    assert gcn.B.grad is not None and gcn.B.grad.abs().sum().item() > 0
    with torch.no_grad():
        gcn.alpha.fill_(1.0)
    adj = gcn.topology(x)
    assert not torch.allclose(adj[:, :, 0], adj[:, :, 1])  # groups get different topologies


def test_multiscale_tcn_shapes_and_stride():
    tcn = MultiScaleTCN(8, 16, stride=2, dilations=(1, 2))
    assert tcn(torch.randn(2, 8, 25, 5)).shape == (2, 16, 13, 5)
    assert MultiScaleTCN(12, 12)(torch.randn(2, 12, 10, 3)).shape == (2, 12, 10, 3)


def test_skeleton_plans():
    assert skeleton_plan(32, 3) == [(32, 2), (64, 2), (64, 1)]
    paper = skeleton_plan(64, 10, "paper")
    assert [w for w, _ in paper] == [64] * 4 + [128] * 3 + [256] * 3
    assert [i for i, (_, s) in enumerate(paper) if s == 2] == [4, 7]
    assert fcn_plan(128, 3) == [(128, 7), (256, 5), (128, 3)]
    with pytest.raises(ConfigError, match="blocks"):
        skeleton_plan(32, 0)


def test_spectrum_is_log_amplitude_and_amplitude_weighted_phase():
    t = torch.arange(16, dtype=torch.float32)
    x = torch.stack([torch.cos(2 * math.pi * 2 * t / 16),  # 2 cycles, phase 0
                     torch.sin(2 * math.pi * 3 * t / 16)], dim=1)  # 3 cycles, phase -pi/2
    s = spectrum(x.view(1, 1, 16, 2))  # (B, C, T, V): joint 0 the cosine, joint 1 the sine
    assert s.shape == (1, 6, 9)  # (amp, cos, sin) x (C=1 x V=2) channels, 9 bins
    amp, cos, sin = s[0, 0:2], s[0, 2:4], s[0, 4:6]
    a = math.log1p(16 / 2 / 4)  # |X_k| = (16 / 2) / sqrt(16) with the orthonormal FFT
    assert int(amp[0].argmax()) == 2 and int(amp[1].argmax()) == 3
    assert amp[0, 2].item() == pytest.approx(a, rel=1e-5)
    assert cos[0, 2].item() == pytest.approx(a, rel=1e-5)
    assert sin[0, 2].item() == pytest.approx(0, abs=1e-5)
    assert cos[1, 3].item() == pytest.approx(0, abs=1e-5)
    assert sin[1, 3].item() == pytest.approx(-a, rel=1e-5)
    # silent bins carry no phase
    assert cos[0, 5].abs().item() < 1e-5 and sin[0, 5].abs().item() < 1e-5


def test_gradients_reach_both_branches():
    model = _model("ntu25")
    x = torch.randn(6, 3, 16, 25, 2)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    out = model(x)
    loss = (F.cross_entropy(out.logits_time, y) + F.cross_entropy(out.logits_freq, y)
            + 0.3 * losses.cross_domain_supcon(out.pre_time, out.pre_freq, y))
    loss.backward()
    for branch in (model.time_branch, model.freq_branch, model.fusion):
        grads = [p.grad.abs().sum().item() for p in branch.parameters() if p.grad is not None]
        assert grads and sum(grads) > 0
    # the time head alone also trains the frequency branch through the cross-domain fusion
    model.zero_grad()
    F.cross_entropy(model(x).logits_time, y).backward()
    assert sum(p.grad.abs().sum().item() for p in model.freq_branch.parameters()
               if p.grad is not None) > 0


def test_absent_person_slot_changes_nothing_and_person_order_does_not_matter():
    model = _model("ntu25").eval()
    one = torch.randn(3, 3, 16, 25, 1)
    two = torch.cat([one, torch.zeros_like(one)], dim=-1)
    with torch.no_grad():
        a, b = model(one), model(two)
        torch.testing.assert_close(a.emb_time, b.emb_time)
        torch.testing.assert_close(a.logits_freq, b.logits_freq)
        both = torch.randn(2, 3, 16, 25, 2)
        c, d = model(both), model(both.flip(-1))
        torch.testing.assert_close(c.logits_time, d.logits_time)


def test_build_model_rejects_bad_sizes():
    with pytest.raises(ConfigError, match="train.model"):
        build_model(get_layout("ntu25"), in_channels=3, num_classes=2, frames=16, persons=1,
                    config=dataclasses.replace(TINY, model="huge"))
    with pytest.raises(ConfigError, match="num_classes=0"):
        build_model(get_layout("ntu25"), in_channels=3, num_classes=0, frames=16, persons=1,
                    config=TINY)


def test_paper_config_builds_ctr_gcn_size_network():
    cfg = paper_config()
    assert (cfg.model, cfg.channels, cfg.blocks, cfg.batch_size, cfg.lr, cfg.epochs) == \
        ("paper", 64, 10, 128, 5e-4, 300)
    assert paper_config("series").lr == 1e-3
    model = _model("ntu25", config=cfg, classes=60)
    widths = [b.gcn.out_channels for b in model.time_branch.blocks]
    assert widths == [64] * 4 + [128] * 3 + [256] * 3
    with torch.no_grad():
        out = model.eval()(torch.randn(1, 3, 16, 25, 2))
    assert out.logits_time.shape == (1, 60) and out.emb_time.shape == (1, 256)
    with pytest.raises(ConfigError, match="kind"):
        paper_config("video")


# --- losses ------------------------------------------------------------------------------------
def test_logit_adjusted_cross_entropy_shifts_logits_by_log_prior():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
    target = torch.tensor([0, 2])
    prior = losses.log_prior(np.array([8, 2, 0]))
    np.testing.assert_allclose(prior.exp().numpy(), np.array([9, 3, 1]) / 13, rtol=1e-6)
    got = losses.cross_entropy(logits, target, prior=prior, tau=0.5)
    want = F.cross_entropy(logits + 0.5 * prior, target, reduction="none")
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(losses.cross_entropy(logits, target),
                               F.cross_entropy(logits, target, reduction="none"))


def test_cross_domain_supcon_matches_reference():
    g = torch.Generator().manual_seed(0)
    zt, zf = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    y = torch.tensor([0, 1, 0, 2, 1])
    got = losses.cross_domain_supcon(zt, zf, y, temperature=0.5)
    a, b = F.normalize(zt, dim=1), F.normalize(zf, dim=1)

    def one_way(p, q):
        total = 0.0
        for i in range(5):
            logits = torch.tensor([float(p[i] @ q[j]) / 0.5 for j in range(5)])
            logp = logits - torch.logsumexp(logits, 0)
            pos = [j for j in range(5) if y[j] == y[i]]
            total += -float(sum(logp[j] for j in pos)) / len(pos)
        return total / 5

    assert got.item() == pytest.approx(0.5 * (one_way(a, b) + one_way(b, a)), rel=1e-5)
    # aligned, class-separated embeddings give a lower loss than shuffled ones
    aligned = F.one_hot(y, 3).float()
    shuffled = aligned[torch.tensor([1, 3, 4, 0, 2])]
    assert losses.cross_domain_supcon(aligned, aligned, y, temperature=0.1) < \
        losses.cross_domain_supcon(aligned, shuffled, y, temperature=0.1)


def test_pseudo_label_ce_is_energy_weighted():
    logits = torch.tensor([[3.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    pseudo = torch.tensor([0, 1, 0])
    w = torch.tensor([1.0, 0.5, 0.0])
    ce = F.cross_entropy(logits, pseudo, reduction="none")
    got = losses.pseudo_label_ce(logits, pseudo, w)
    assert got.item() == pytest.approx(float((ce[0] + 0.5 * ce[1]) / 3))
    assert losses.pseudo_label_ce(logits, pseudo, torch.zeros(3)).item() == 0.0
    assert losses.pseudo_label_ce(logits[:0], pseudo[:0], w[:0]).item() == 0.0


def test_omega_from_energy():
    np.testing.assert_allclose(losses.omega(np.array([-4.0, -1.0, 2.0, 0.0])),
                               [1.0, 0.25, 0.0, 0.0])
    np.testing.assert_array_equal(losses.omega(np.array([1.0, 3.0])), [0.0, 0.0])


def _forward_running_present_slots_only(model, x):
    """The forward pass as it was before it became shape-static: only the person slots that hold
    someone are run (boolean indexing, which waits for the device), then averaged per sample."""
    n, c, t, v, m = x.shape
    present = x.abs().amax(dim=(1, 2, 3)) > 0
    present = present | ~present.any(1, keepdim=True)
    weight = present.float() / present.float().sum(1, keepdim=True)
    keep = present.reshape(-1)
    xp = x.permute(0, 4, 1, 2, 3).reshape(n * m, c, t, v)[keep]
    h_t = model.time_branch(model.data_bn(xp))
    h_f = model.freq_branch(xp)

    def pool(h):
        full = h.new_zeros(n * m, h.shape[1])
        full[keep] = h
        return (full.view(n, m, -1) * weight.unsqueeze(-1)).sum(1)

    h_time, h_freq = pool(h_t), pool(h_f)
    e_time, e_freq = model.fusion(h_time, h_freq)
    return {"logits_time": model.head_time(e_time), "logits_freq": model.head_freq(e_freq),
            "emb_time": e_time, "emb_freq": e_freq, "pre_time": h_time, "pre_freq": h_freq}


@pytest.mark.parametrize("static", [True, False], ids=["static", "cpu-default"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_static_forward_equals_running_only_the_present_person_slots(training, static):
    """Empty slots are run and masked instead of dropped: same outputs, same BatchNorm running
    statistics and same gradients as running the present slots alone (train and eval mode).

    In float64: the biases just before a BatchNorm have a gradient of exactly 0, which float32
    leaves as rounding noise of about 1e-5 that depends on the order of the sums (the number of
    threads); float64 lets the check be tight everywhere."""
    import copy

    model = _model("ntu25", config=dataclasses.replace(TINY, dropout=0.0), seed=3).double()
    model.train()
    with torch.no_grad():  # running statistics that are not the initial ones, for eval mode
        model(torch.randn(6, 3, 16, 25, 2, dtype=torch.float64))
    model.train(training)
    model.static_persons = static or None  # the accelerators' path, forced on the CPU
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 16, 25, 2, generator=g, dtype=torch.float64)
    x[0, ..., 1] = 0.0  # one person in slot 0
    x[1, ..., 0] = 0.0  # one person in slot 1
    x[2] = 0.0  # nobody: the sample keeps both slots
    x[4, ..., 1] = 0.0
    out = model(x)
    ref = _forward_running_present_slots_only(reference, x)
    for key, want in ref.items():
        torch.testing.assert_close(getattr(out, key), want, rtol=1e-10, atol=1e-12, msg=key)
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
    if training:
        (out.logits_time.square().sum() + out.logits_freq.square().sum()).backward()
        (ref["logits_time"].square().sum() + ref["logits_freq"].square().sum()).backward()
        for (name, a), b in zip(model.named_parameters(), reference.parameters()):
            if b.grad is None:
                assert a.grad is None or not a.grad.any(), name
            else:
                torch.testing.assert_close(a.grad, b.grad, rtol=1e-8, atol=1e-11, msg=name)


@pytest.mark.parametrize("shape", [(6, 4, 5, 3), (6, 4), (6, 4, 7)], ids=["2d", "1d-flat", "1d"])
def test_masked_batch_norm_matches_its_definition_and_gradcheck(shape):
    """The masked BatchNorm's own forward and backward (``_MaskedBatchNorm``) against the plain
    formula in float64: statistics over the masked-in rows only, every row normalised, and
    gradients that torch's finite differences confirm, also where the masked-out rows' outputs
    carry gradient."""
    from speler.models.net import _MaskedBatchNorm

    g = torch.Generator().manual_seed(1)
    x = (3 * torch.randn(*shape, generator=g, dtype=torch.float64) + 1).requires_grad_()
    w = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.float32)
    gamma = torch.randn(shape[1], generator=g, dtype=torch.float64).requires_grad_()
    beta = torch.randn(shape[1], generator=g, dtype=torch.float64).requires_grad_()
    dims = [0, *range(2, len(shape))]
    view = (1, -1) + (1,) * (len(shape) - 2)
    rows = x.detach()[w.bool()]
    mean = rows.mean(dims)
    var = (rows - mean.view(view)).square().mean(dims)
    want = (x.detach() - mean.view(view)) / torch.sqrt(var + 1e-5).view(view)
    want = want * gamma.detach().view(view) + beta.detach().view(view)
    y, m, v, count = _MaskedBatchNorm.apply(x, w, gamma, beta, 1e-5)
    assert y.dtype == torch.float64 and float(count) == 4 * x[0, 0].numel()
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(v, var, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda a, b, c: _MaskedBatchNorm.apply(a, w, b, c, 1e-5)[0], (x, gamma, beta))


def _loss_on_index_subsets(out, target, human, weight, config):
    """The batch loss as it was written before it was masked: each term on the rows it covers."""
    lt, lf = out.logits_time.float(), out.logits_freq.float()
    hi, oi = human.nonzero()[:, 0], (~human).nonzero()[:, 0]
    zero = lt.new_zeros(())
    ce = con = pl = zero
    if hi.numel():
        th = target[hi]
        ce = (losses.cross_entropy(lt[hi], th).mean() + losses.cross_entropy(lf[hi], th).mean())
        con = losses.cross_domain_supcon(out.pre_time[hi], out.pre_freq[hi], th,
                                         temperature=config.temperature)
    if oi.numel():
        tp, wp = target[oi], weight[oi]
        pl = losses.pseudo_label_ce(lt[oi], tp, wp) + losses.pseudo_label_ce(lf[oi], tp, wp)
    return {"ce": ce, "contrastive": con, "pseudo": pl,
            "loss": ce + config.contrastive_weight * con + config.pseudo_weight * pl}


@pytest.mark.parametrize("humans", ["some", "none", "all"])
def test_masked_batch_loss_equals_the_loss_on_the_rows_each_term_covers(humans):
    """fit's batch loss is computed over the whole batch and masked (static shapes for a CUDA
    graph): every term and its gradient equal the same term computed on its own rows."""
    from speler.models.net import SpelerOutput
    from speler.train import _batch_loss

    g = torch.Generator().manual_seed(4)
    b, k, d = 10, 5, 6
    leaves = [torch.randn(b, k, generator=g).requires_grad_() for _ in range(2)]
    pre = [torch.randn(b, d, generator=g).requires_grad_() for _ in range(2)]
    target = torch.randint(0, k, (b,), generator=g)
    human = {"some": torch.arange(b) % 3 != 0, "none": torch.zeros(b, dtype=torch.bool),
             "all": torch.ones(b, dtype=torch.bool)}[humans]
    weight = torch.rand(b, generator=g)
    config = TrainConfig(balanced_loss=False)

    def output():
        return SpelerOutput(logits_time=leaves[0], logits_freq=leaves[1], emb_time=pre[0],
                            emb_freq=pre[1], pre_time=pre[0], pre_freq=pre[1])

    got = _batch_loss(output(), target, human, weight, prior=None, config=config)
    want = _loss_on_index_subsets(output(), target, human, weight, config)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-7, msg=key)
    grads = torch.autograd.grad(got["loss"], leaves + pre)
    wants = torch.autograd.grad(want["loss"], leaves + pre, allow_unused=True)
    for a, w in zip(grads, wants):
        torch.testing.assert_close(a, torch.zeros_like(a) if w is None else w, rtol=1e-5,
                                   atol=1e-7)


def test_masked_contrastive_loss_holds_at_a_low_temperature():
    """Masked-out pairs stay out at any temperature (their filler scales with 1/temperature):
    the masked loss equals the loss on the masked-in rows alone."""
    g = torch.Generator().manual_seed(2)
    zt, zf = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    y = torch.tensor([0, 1, 0, 1, 2, 2, 0, 1])
    mask = torch.tensor([1, 1, 0, 1, 0, 1, 1, 0], dtype=torch.bool)
    for t in (0.2, 1e-3, 1e-5):
        got = losses.cross_domain_supcon(zt, zf, y, temperature=t, mask=mask)
        want = losses.cross_domain_supcon(zt[mask], zf[mask], y[mask], temperature=t)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_masked_batch_norm_refuses_a_second_derivative():
    from speler.models.net import _MaskedBatchNorm

    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    y = _MaskedBatchNorm.apply(x, torch.tensor([1.0, 1.0, 0.0, 1.0]), None, None, 1e-5)[0]
    (grad,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)  # dy depends on x
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad.sum().backward()

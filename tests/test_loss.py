"""The PPAP loss: positives / ambiguity zone / negatives, propagation, edge cases, agreement with a reference."""
import math

import pytest
import torch
import torch.nn.functional as F

import ppap
from reference_loss import ppap_loss_at, propagate, reference_ppap_loss

COCO = dict(phi0=0.55, psi0=0.20, prop_iter=0, sigma_pos=3, sigma_amb=3, tau=0.8)


def unit(*cos_and_rest):
    """A 4-d unit vector whose first coordinate (cosine with e1) is given; the rest fills the norm."""
    c, axis = cos_and_rest
    v = torch.zeros(4)
    v[0] = c
    v[axis] = math.sqrt(max(0.0, 1 - c * c)) * (1 if axis > 0 else -1)
    return v


def hand_features():
    """Row 0 is the anchor e1. Cosines to it: rows 1,2 positive (0.9), 3 and 7 ambiguous (0.4, 0.3),
    4,5,6 confident negatives (0.0, 0.0, 0.1). With Phi0=0.55, Psi0=0.2 and T=0 the sets are known."""
    return torch.stack([unit(1.0, 1), unit(0.9, 1), unit(0.9, 2), unit(0.4, 2),
                        unit(0.0, 3), unit(0.0, 2), unit(0.1, 3), unit(0.3, 3)])


def test_hand_built_sets_and_loss():
    f = hand_features()
    torch.manual_seed(0)
    z = F.normalize(torch.randn(8, 5), dim=1).requires_grad_()
    anchors = torch.tensor([[0]])
    loss, stats = ppap_loss_at(z, f, anchors, group=8, **COCO)
    assert stats == {"positives": 2.0, "negatives": 3.0}
    l = [(z[0] @ z[j]).item() / 0.8 for j in range(8)]
    log_denom = math.log(sum(math.exp(l[k]) for k in (1, 2, 4, 5, 6)))    # ambiguous 3, 7 left out
    expected = -(0.8 / 0.07) * sum(l[j] - log_denom for j in (1, 2)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_no_ambiguity_makes_every_non_positive_a_negative():
    f = hand_features()
    z = F.normalize(torch.randn(8, 5), dim=1)
    loss, stats = ppap_loss_at(z, f, torch.tensor([[0]]), group=8, no_ambiguity=True, **COCO)
    assert stats == {"positives": 2.0, "negatives": 5.0}
    l = [(z[0] @ z[j]).item() / 0.8 for j in range(8)]
    log_denom = math.log(sum(math.exp(l[k]) for k in range(1, 8)))
    assert loss.item() == pytest.approx(-(0.8 / 0.07) * sum(l[j] - log_denom for j in (1, 2)) / 2, rel=1e-6)


def test_propagation_moves_proxy_and_boundaries():
    # The positives sit on one side of the anchor, so the proxy moves toward them; the boundary Phi loosens
    # enough that row 3 (cos 0.5 with the anchor: not positive at T=0) becomes positive, and Psi rises
    # above row 6's similarity so it turns from negative to ambiguous.
    f = F.normalize(torch.tensor([[1.0, 0.0, 0.0, 0.0],
                                  [0.8, 0.6, 0.0, 0.0],
                                  [0.75, 0.66, 0.0, 0.0],
                                  [0.5, 0.86, 0.1, 0.0],
                                  [0.0, 0.0, 1.0, 0.0],
                                  [0.0, 0.0, 0.0, 1.0],
                                  [0.0, 0.68, -0.733, 0.0],
                                  [-1.0, 0.0, 0.0, 0.0]]), dim=1)
    kw = dict(phi0=0.55, psi0=0.2, sigma_pos=3, sigma_amb=3)
    pos0, neg0, _, _ = propagate(f, torch.tensor([0]), prop_iter=0, **kw)
    pos1, neg1, _, _ = propagate(f, torch.tensor([0]), prop_iter=1, **kw)
    # by hand: proxy = normalise(mean of rows {0,1,2}); moved = 1 - cos(anchor, proxy)
    v = F.normalize(f[[0, 1, 2]].mean(0), dim=0)
    moved = 1 - (v @ f[0]).item()
    phi = float(torch.tensor(0.55, dtype=torch.float16)) - moved / 3
    psi = float(torch.tensor(0.2, dtype=torch.float16)) + moved / 3
    sim = f @ v
    assert moved > 0.05                                       # the proxy did move
    assert pos0[0].tolist() == [False, True, True, False, False, False, False, False]
    assert pos1[0].tolist() == [bool(s > phi) and j != 0 for j, s in enumerate(sim.tolist())]
    assert neg1[0].tolist() == [bool(s < psi) and j != 0 for j, s in enumerate(sim.tolist())]
    assert pos1[0, 3] and not pos0[0, 3]                      # looser positiveness boundary
    assert neg0[0, 6] and not neg1[0, 6] and not pos1[0, 6]   # wider ambiguity zone


def test_anchor_without_positives_contributes_nothing():
    f = torch.eye(8)                                          # every pair orthogonal: no positives at all
    z = F.normalize(torch.randn(8, 8), dim=1).requires_grad_()
    loss, stats = ppap_loss_at(z, f, torch.tensor([[0, 3]]), group=8, **COCO)
    loss.backward()
    assert loss.item() == 0 and stats["positives"] == 0
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() == 0
    # one anchor with positives, one without: the mean is over the anchor that has them
    f2 = hand_features().clone()
    f2[5] = torch.tensor([0.0, 0.0, 0.0, -1.0])
    l_both, _ = ppap_loss_at(z, f2, torch.tensor([[0, 5]]), group=8, **COCO)
    l_one, _ = ppap_loss_at(z, f2, torch.tensor([[0]]), group=8, **COCO)
    assert l_both.item() == pytest.approx(l_one.item(), rel=1e-6)


def test_gradients_reach_z_only():
    torch.manual_seed(1)
    f = torch.randn(3 * 16, 8, requires_grad=True)
    z = F.normalize(torch.randn(3 * 16, 8), dim=1).requires_grad_()
    loss, _ = ppap_loss_at(z, f, ppap.draw_anchors(48, 16, 4), group=16, **{**COCO, "phi0": 0.3})
    loss.backward()
    assert f.grad is None and z.grad is not None and z.grad.abs().sum() > 0


def clustered(N, D, k=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, D, generator=g)
    return centres[torch.randint(0, k, (N,), generator=g)] + 0.7 * torch.randn(N, D, generator=g)


@pytest.mark.parametrize("preset", [k for k in ppap.PRESETS if k[0] != "synthetic"], ids=str)
def test_matches_reference_for_every_preset(preset):
    p = ppap.PRESETS[preset]
    hp = {k: p[k] for k in ("phi0", "psi0", "prop_iter", "sigma_pos", "sigma_amb", "tau")}
    N = 784 * 2 + 37                                          # a partial group: contrast rows, never anchors
    f = clustered(N, 32)
    z = F.normalize(torch.randn(N, 32, generator=torch.Generator().manual_seed(3)), dim=1).requires_grad_()
    anchors = ppap.draw_anchors(N, 784, 784 // p["trainpatchsplit"], torch.Generator().manual_seed(4))
    ours, s1 = ppap_loss_at(z, f, anchors, **hp)
    g1, = torch.autograd.grad(ours, z)
    ref, s2 = reference_ppap_loss(z, f, anchors, **hp)
    g2, = torch.autograd.grad(ref, z)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    assert (g1 - g2).abs().max() <= 1e-6 * g2.abs().max()
    assert s1["positives"] == pytest.approx(s2["positives"]) and s1["negatives"] == pytest.approx(s2["negatives"])
    assert s1["positives"] > 1 and s1["negatives"] > 1       # the sets are not degenerate


@pytest.mark.parametrize("no_ambiguity", [False, True])
def test_chunking_changes_nothing(no_ambiguity):
    N = 784 * 3
    f = clustered(N, 16, seed=5)
    z = F.normalize(torch.randn(N, 16), dim=1).requires_grad_()
    anchors = ppap.draw_anchors(N, 784, 49)
    kw = dict(phi0=0.55, psi0=0.2, prop_iter=2, sigma_pos=3, sigma_amb=3, tau=0.8, no_ambiguity=no_ambiguity)
    big, _ = ppap_loss_at(z, f, anchors, **kw)
    small, _ = ppap_loss_at(z, f, anchors, chunk_elems=7 * N, **kw)    # 7 anchors per chunk
    gb, = torch.autograd.grad(big, z)
    gs, = torch.autograd.grad(small, z)
    assert big.item() == pytest.approx(small.item(), rel=1e-6)
    assert torch.allclose(gb, gs, atol=1e-7)
    ref, _ = reference_ppap_loss(z, f, anchors, **kw)
    assert big.item() == pytest.approx(ref.item(), rel=1e-6)


def test_phi_psi_start_from_float16_like_the_authors():
    # A similarity between fp16(0.55)=0.5498 and 0.55: not positive at T=0 (exact Phi0 compare), but after
    # one propagation step with zero movement it is compared against the fp16 boundary and becomes positive.
    s = 0.5499
    f = torch.tensor([[1.0, 0.0], [s, math.sqrt(1 - s * s)]])
    kw = dict(phi0=0.55, psi0=0.2, sigma_pos=3, sigma_amb=3)
    pos0, *_ = propagate(f, torch.tensor([0]), prop_iter=0, **kw)
    pos1, *_ = propagate(f, torch.tensor([0]), prop_iter=1, **kw)   # proxy = anchor: nothing moves
    assert not pos0[0, 1] and pos1[0, 1]


def test_draw_anchors_one_randperm_per_group():
    a = ppap.draw_anchors(784 * 3 + 5, 784, 49, torch.Generator().manual_seed(0))
    assert a.shape == (3, 49) and a.max() < 784
    assert all(len(set(row.tolist())) == 49 for row in a)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(a[1], (torch.randperm(784, generator=g), torch.randperm(784, generator=g))[1][:49])


def test_custom_backward_equals_plain_autograd():
    """The loss keeps one byte per anchor and sample for its backward pass; its gradient equals the plain
    autograd computation (which keeps the logits) to 1e-6, also when the boundaries cross (Phi < Psi)."""
    from reference_loss import autograd_ppap_loss
    N = 784 * 3
    f = clustered(N, 24)
    z = F.normalize(torch.randn(N, 24, generator=torch.Generator().manual_seed(5)), dim=1).requires_grad_()
    anchors = ppap.draw_anchors(N, 784, 49, torch.Generator().manual_seed(6))
    for hp in (dict(COCO, prop_iter=2), dict(phi0=0.5, psi0=0.45, prop_iter=3, sigma_pos=0.3, sigma_amb=0.3, tau=0.1)):
        ours, _ = ppap_loss_at(z, f, anchors, chunk_elems=40 * N, **hp)
        ref, _ = autograd_ppap_loss(z, f, anchors, chunk_elems=40 * N, **hp)
        g1, = torch.autograd.grad(ours, z)
        g2, = torch.autograd.grad(ref, z)
        assert ours.item() == ref.item()
        assert (g1 - g2).abs().max() <= 1e-6 * g2.abs().max()
    # the crossing case really crosses: some sample is both above Phi and below Psi
    pos, neg, _, _ = propagate(F.normalize(f, dim=1), anchors[0], phi0=0.5, psi0=0.45, prop_iter=3,
                                    sigma_pos=0.3, sigma_amb=0.3)
    assert (pos & neg).any()


def test_groups_split_across_processes_sum_to_the_whole():
    """A distributed job gives each process some groups and the job's group count: the parts add up to
    the single-process loss and gradient."""
    N = 784 * 4
    f = clustered(N, 16)
    z = F.normalize(torch.randn(N, 16, generator=torch.Generator().manual_seed(7)), dim=1).requires_grad_()
    anchors = ppap.draw_anchors(N, 784, 49, torch.Generator().manual_seed(8))
    hp = dict(COCO, prop_iter=2)
    whole, s = ppap_loss_at(z, f, anchors, **hp)
    g, = torch.autograd.grad(whole, z)
    parts = [ppap_loss_at(z, f, anchors[k:k + 2], groups=torch.arange(k, k + 2), n_groups_total=4, **hp)
             for k in (0, 2)]
    total = parts[0][0] + parts[1][0]
    g2, = torch.autograd.grad(total, z)
    assert total.item() == pytest.approx(whole.item(), rel=1e-6)
    assert (g - g2).abs().max() <= 1e-6 * g.abs().max()
    assert parts[0][1]["positives"] + parts[1][1]["positives"] == pytest.approx(s["positives"])   # shares

"""Audit kit (issue 14): propagate's trace hook, the propagation report, the k-means diagnostic and the
audit table of the authors' released checkpoints.

    .venv/bin/python -m pytest -q tests/test_audit.py

The brute-force helpers below re-derive the method from the paper's definitions with Python loops over
anchors and samples; they share no code with ppap.propagate.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import ppap

COCO = dict(phi0=0.55, psi0=0.20, sigma_pos=3.0, sigma_amb=3.0)


def _fp16(x):
    return float(torch.tensor(x, dtype=torch.float16))


def brute_force_sets(f, anchor, *, phi0, psi0, prop_iter, sigma_pos, sigma_amb, no_ambiguity=False):
    """One anchor, loops only -> per step t = 0..T a dict of Python sets 'pos', 'amb', 'neg' (anchor excluded)
    and the floats 'phi', 'psi'. Proxy v_t = normalised mean of every sample above the previous boundary,
    the anchor too when it is above it (always at t = 0); Phi_t = Phi_{t-1} - (1 - cos(v_{t-1}, v_t)) / sigma_pos, Psi_t likewise
    upwards with sigma_amb; Phi and Psi start from their fp16 roundings, P_0 uses the exact Phi_0."""
    N = len(f)
    rows = [f[j].double() for j in range(N)]
    v = rows[anchor]
    sims = [float(v @ rows[j]) for j in range(N)]
    inside = [j for j in range(N) if sims[j] > phi0]
    phi_used, phi, psi = phi0, _fp16(phi0), _fp16(psi0)
    steps = []

    def record():
        pos = {j for j in inside if j != anchor}
        if no_ambiguity:
            neg = {j for j in range(N) if j not in inside and j != anchor}
        else:
            neg = {j for j in range(N) if sims[j] < psi and j != anchor}
        amb = {j for j in range(N) if j != anchor and j not in pos and j not in neg}
        steps.append({"pos": pos, "amb": amb, "neg": neg, "phi": phi_used, "psi": psi})

    record()
    for _ in range(prop_iter):
        total = sum((rows[j] for j in inside), torch.zeros_like(v))
        v_new = total / total.norm()
        moved = 1.0 - float(v @ v_new) / float(v.norm() * v_new.norm())
        psi += moved / sigma_amb
        phi -= moved / sigma_pos
        phi_used = phi
        v = v_new
        sims = [float(v @ rows[j]) for j in range(N)]
        inside = [j for j in range(N) if sims[j] > phi]
        record()
    return steps


def cluster_features(seed=0, n_per=6, dim=6, spread=0.35):
    """Three noisy clusters of unit vectors (rows grouped by cluster) and their labels 0, 1, 2; every
    fourth row of cluster 2 is unlabelled (-1)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(dim)[:3]
    f = torch.cat([centres[c] + spread * torch.randn(n_per, dim, generator=g) for c in range(3)])
    labels = torch.arange(3).repeat_interleave(n_per)
    labels[2 * n_per::4] = -1
    return F.normalize(f, dim=1), labels


# ---------------------------------------------------------------------------
# ppap.propagate's trace hook

def test_propagate_trace_matches_brute_force_and_leaves_results_unchanged():
    f, _ = cluster_features()
    rows = torch.tensor([0, 5, 7, 13, 17])
    for T in (0, 1, 3):
        for no_amb in (False, True):
            kw = dict(COCO, prop_iter=T, no_ambiguity=no_amb)
            plain = ppap.propagate(f, rows, **kw)
            trace = []
            traced = ppap.propagate(f, rows, trace=trace, **kw)
            for a, b in zip(plain, traced):                       # the hook changes nothing
                assert torch.equal(a, b)
            assert len(trace) == T + 1
            assert torch.equal(trace[-1]["pos"], plain[0]) and torch.equal(trace[-1]["neg"], plain[1])
            for i, r in enumerate(rows.tolist()):
                ref = brute_force_sets(f, r, **kw)
                for t in range(T + 1):
                    st = trace[t]
                    pos = set(torch.nonzero(st["pos"][i]).flatten().tolist())
                    neg = set(torch.nonzero(st["neg"][i]).flatten().tolist())
                    assert pos == ref[t]["pos"] and neg == ref[t]["neg"], (T, no_amb, r, t)
                    assert st["phi"][i, 0].item() == pytest.approx(ref[t]["phi"], abs=1e-6)
                    assert st["psi"][i, 0].item() == pytest.approx(ref[t]["psi"], abs=1e-6)
                    assert st["sim"].shape == (len(rows), len(f))


def test_ppap_loss_does_not_use_the_hook(monkeypatch):
    """Training passes no trace: _trace_step is never called from ppap_loss."""
    calls = []
    monkeypatch.setattr(ppap, "_trace_step", lambda *a, **k: calls.append(1))
    f, _ = cluster_features()
    z = F.normalize(torch.randn(len(f), 5, generator=torch.Generator().manual_seed(1)), dim=1)
    ppap.ppap_loss(z, f, torch.tensor([[0, 3, 9]]), group=len(f), tau=0.8, prop_iter=2, **COCO)
    assert calls == []

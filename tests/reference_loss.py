"""A plain, per-group PPAP loss that follows the authors' algorithm step by step (their loss.py,
SupConLoss.forward).

It materialises every proxy from an [A, N, D] product, loops over groups in Python and keeps Phi/Psi in
float16 tensors as the authors' code does. Used by the tests as the independent reference and by
tests/benchmarks.py as the memory-hungry baseline. Not used by ppap.py.
"""
import torch
import torch.nn.functional as F


def reference_ppap_loss(z, f, anchors, *, phi0, psi0, prop_iter, sigma_pos, sigma_amb, tau, group=784,
                        no_ambiguity=False):
    N, device = z.shape[0], z.device
    f = F.normalize(f.detach(), dim=-1)
    n_groups, A = anchors.shape
    total = torch.zeros((), device=device)
    pos_count, neg_count = 0.0, 0.0
    for g in range(n_groups):
        rows = g * group + anchors[g].to(device)
        not_self = torch.ones(A, N, device=device)
        not_self[torch.arange(A), rows] = 0
        sim = f[rows] @ f.T
        positive = (sim > phi0).half()
        Phi = torch.ones(A, 1, dtype=torch.float16, device=device) * phi0
        Psi = torch.ones(A, 1, dtype=torch.float16, device=device) * psi0
        before = f[rows]
        for _ in range(prop_iter):
            proxy = F.normalize((f.unsqueeze(0) * positive.unsqueeze(-1)).mean(dim=1), dim=1)   # [A,N,D] -> [A,D]
            sim = proxy @ f.T
            moved = F.cosine_similarity(before, proxy).unsqueeze(-1)
            Psi = Psi + (1.0 - moved) / sigma_amb
            Phi = Phi - (1.0 - moved) / sigma_pos
            positive = (Phi < sim).half()
            before = proxy
        negative = 1 - positive if no_ambiguity else (Psi > sim).half()
        pmask = positive * not_self
        in_denominator = torch.logical_or(pmask, negative).half() * not_self
        logits = (z[rows] @ z.T) / tau
        logits = logits - logits.max(dim=1, keepdim=True).values.detach()
        log_prob = logits - torch.log((torch.exp(logits) * in_denominator).sum(1, keepdim=True))
        pmask = pmask.float()
        keep = pmask.sum(1) != 0
        if keep.any():
            mean_log_prob = (pmask[keep] * log_prob[keep]).sum(1) / pmask[keep].sum(1)
            total = total - torch.mean((tau / 0.07) * mean_log_prob)
        pos_count += pmask.sum().item() / A
        neg_count += negative.float().sum().item() / A
    return total / n_groups, {"positives": pos_count / n_groups, "negatives": neg_count / n_groups}


def autograd_ppap_loss(z, f, anchors, *, phi0, psi0, prop_iter, sigma_pos, sigma_amb, tau, group=784,
                       no_ambiguity=False, chunk_elems=None):
    """ppap.ppap_loss as it was before its custom backward: the same chunked computation with plain autograd,
    which keeps every chunk's [a,N] logits for the backward pass. The gradient reference of the custom
    backward and the "before" of the B=64 memory benchmark."""
    import ppap
    N = z.shape[0]
    n_groups, A = anchors.shape
    f = F.normalize(f.detach().float(), dim=-1)
    z = z.float()
    rows = (anchors.to(z.device) + torch.arange(n_groups, device=z.device)[:, None] * group).reshape(-1)
    per_chunk = max(1, (chunk_elems or (2 ** 26 if z.is_cuda else 2 ** 20)) // N)
    anchor_loss = torch.zeros(len(rows), device=z.device)
    has_pos = torch.zeros(len(rows), dtype=torch.bool, device=z.device)
    n_pos = torch.zeros(len(rows), device=z.device)
    n_neg = torch.zeros(len(rows), device=z.device)
    for s in range(0, len(rows), per_chunk):
        r = rows[s:s + per_chunk]
        with torch.no_grad():
            pos, neg, n_pos[s:s + len(r)], n_neg[s:s + len(r)] = ppap.propagate(
                f, r, phi0=phi0, psi0=psi0, prop_iter=prop_iter, sigma_pos=sigma_pos, sigma_amb=sigma_amb,
                no_ambiguity=no_ambiguity)
            valid = pos.any(1)
        if not valid.any():
            continue
        pos, denom = pos[valid], (pos | neg)[valid]
        logits = (z[r[valid]] @ z.T) / tau
        log_denom = torch.logsumexp(logits.masked_fill(~denom, float("-inf")), dim=1)
        mean_log_prob = (logits * pos).sum(1) / pos.sum(1) - log_denom
        idx = torch.arange(s, s + len(r), device=z.device)[valid]
        anchor_loss = anchor_loss.index_put((idx,), -(tau / 0.07) * mean_log_prob)
        has_pos[idx] = True
    per_group = anchor_loss.view(n_groups, A).sum(1) / has_pos.view(n_groups, A).sum(1).clamp(min=1)
    return per_group.mean(), {"positives": n_pos.mean().item(), "negatives": n_neg.mean().item()}

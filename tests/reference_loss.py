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


def plain_anchor_log_prob(z, rows, code, tau):
    """ppap's per-anchor mean log-probability with plain autograd, which keeps the [a,N] logits (and a masked
    copy) for the backward pass: what ppap.ppap_loss did before its custom backward."""
    logits = (z[rows] @ z.T) / tau
    pos, denom = code == 2, code > 0
    log_denom = torch.logsumexp(logits.masked_fill(~denom, float("-inf")), dim=1)
    return (logits * pos).sum(1) / pos.sum(1) - log_denom


def autograd_ppap_loss(z, f, anchors, **kw):
    """ppap's loss with plain_anchor_log_prob: the gradient reference of the custom backward and the
    "before" of the B=64 memory benchmark."""
    import ppap
    saved = ppap.anchor_log_prob
    ppap.anchor_log_prob = plain_anchor_log_prob
    try:
        return ppap_loss_at(z, f, anchors, **kw)
    finally:
        ppap.anchor_log_prob = saved


def ppap_loss_at(z, f, anchors, *, group=784, groups=None, n_groups_total=None, chunk_elems=None, **hp):
    """ppap's loss object on within-group anchor positions [G, A] of the groups `groups` (default: the first
    G), the calling convention of reference_ppap_loss. hp: the loss's Config fields (phi0, tau, ...)."""
    import ppap
    groups = torch.arange(len(anchors)) if groups is None else torch.as_tensor(groups)
    rows = anchors + groups[:, None] * group
    return ppap.PPAPLoss(ppap.Config(group=group, **hp)).anchored(z, f, rows, n_groups=n_groups_total,
                                                                   chunk_elems=chunk_elems)


def propagate(f, rows, trace=None, **hp):
    """ppap's loss object's propagation -> (positives, negatives, their sizes per anchor)."""
    import ppap
    pos, neg = ppap.PPAPLoss(ppap.Config(**hp)).propagate(f, rows, trace=trace)
    return pos, neg, pos.sum(1), neg.sum(1)

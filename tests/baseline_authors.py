"""The authors' implementation choices, as the baseline of tests/benchmarks.py (not used by ppap.py).

Everything except the two parts below is ppap.py's own code (model, probes, optimisers, GradScaler,
train_step), so a benchmark against this baseline measures exactly these two choices:

* attention as an explicit softmax(q k^T * scale) @ v, as in the DINO code the authors build on,
  instead of ppap.py's fused F.scaled_dot_product_attention;
* the PPAP loss of tests/reference_loss.py: a Python loop over anchor groups that materialises the
  proxies from an [A, N, D] tensor, instead of ppap.PPAPLoss.

Mixed precision is the preset's (fp16 autocast + GradScaler on CUDA), as in the authors' runs.
"""
from __future__ import annotations

import torch

import ppap  # imported by tests/benchmarks.py, which puts the repository and tests/ on sys.path
from reference_loss import reference_ppap_loss


class ExplicitSoftmaxAttention(ppap.Attention):
    """ppap.Attention with the attention matrix formed explicitly (same parameters, same result)."""

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1)) * (D // self.num_heads) ** -0.5
        attn = attn.softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, T, D))


def use_explicit_attention(model) -> int:
    """Switch every ppap.Attention in model (backbone and head) to the explicit form -> how many."""
    n = 0
    for m in model.modules():
        if type(m) is ppap.Attention:
            m.__class__ = ExplicitSoftmaxAttention
            n += 1
    return n


class ReferenceLoss(ppap.PPAPLoss):
    """ppap.PPAPLoss with its anchors' loss computed by reference_ppap_loss (one process)."""

    def anchored(self, z, f, rows, n_groups=None, chunk_elems=None):
        group = self.cfg.group
        positions = rows - torch.arange(len(rows))[:, None] * group
        hp = ppap.loss_hyper(self.cfg)
        hp.pop("trainpatchsplit")
        return reference_ppap_loss(z, f, positions, **hp)


def authors_train_step(model, batch, opts, scaler, cfg, device):
    """ppap.train_step with the reference loss (call use_explicit_attention(model) once beforehand)."""
    return ppap.train_step(model, batch, opts, scaler, cfg, device, ReferenceLoss(cfg))

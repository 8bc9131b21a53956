"""Plain-PyTorch reference implementations of the ext ops.

They define what the compiled kernels compute and are used by the tests and,
with ``PPAP_EXT_REFERENCE=1``, for debugging.  The CRF reference filters with
the exact dense Gaussian (O(P^2) memory and time), so it is only usable on
tiny images; the compiled kernels approximate it with the permutohedral
lattice exactly as pydensecrf does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def topk_neighbors_reference(q: torch.Tensor, keys: torch.Tensor, k: int, cosine: bool = True):
    """torch.topk of the full similarity matrix (sorted, descending).

    cosine=True normalises and compares in float32 (values returned in q's
    dtype), as ext.topk_neighbors does.
    """
    dtype = q.dtype
    if cosine:
        q = F.normalize(q.float(), dim=-1)
        keys = F.normalize(keys.float(), dim=-1)
    sims = q @ keys.transpose(-1, -2)
    values, indices = torch.topk(sims, k, dim=-1, largest=True, sorted=True)
    return values.to(dtype), indices


def _pixel_features(height: int, width: int, sxy: float, image: torch.Tensor | None,
                    srgb: float) -> torch.Tensor:
    """[P, d] features in lattice order: (col/sxy, row/sxy[, c_i/srgb])."""
    rows, cols = torch.meshgrid(torch.arange(height, dtype=torch.float64),
                                torch.arange(width, dtype=torch.float64), indexing="ij")
    parts = [cols.reshape(-1, 1) / sxy, rows.reshape(-1, 1) / sxy]
    if image is not None:
        parts.append(image.reshape(height * width, -1).to(torch.float64) / srgb)
    return torch.cat(parts, dim=1)


def _normalised_kernel(features: torch.Tensor):
    """Dense Gaussian K_ij = exp(-|f_i - f_j|^2 / 2) and 1/sqrt(K 1 + 1e-20)."""
    kernel = torch.exp(-0.5 * torch.cdist(features, features).square())
    norm = 1.0 / torch.sqrt(kernel.sum(dim=1) + 1e-20)
    return kernel, norm


def _crf_one_image(image: torch.Tensor, probs: torch.Tensor, iters: int, pos_xy: float,
                   pos_w: float, bi_xy: float, bi_rgb: float, bi_w: float) -> torch.Tensor:
    num_classes, height, width = probs.shape
    kernels = []
    for weight, feats in ((pos_w, _pixel_features(height, width, pos_xy, None, 1.0)),
                          (bi_w, _pixel_features(height, width, bi_xy, image, bi_rgb))):
        if weight != 0:
            kernels.append((weight, *_normalised_kernel(feats)))
    neg_unary = torch.log(probs.reshape(num_classes, -1).T.to(torch.float64).clamp(1e-5, 1.0))
    q = torch.softmax(neg_unary, dim=1)
    for _ in range(iters):
        logits = neg_unary.clone()
        for weight, kernel, norm in kernels:
            # Symmetric normalisation n * K(n * Q); Potts raises agreeing logits.
            logits += weight * norm[:, None] * (kernel @ (norm[:, None] * q))
        q = torch.softmax(logits, dim=1)
    return q.T.reshape(num_classes, height, width).to(torch.float32)


def dense_crf_reference(image: torch.Tensor, probs: torch.Tensor, iters: int = 10,
                        pos_xy: float = 1.0, pos_w: float = 3.0, bi_xy: float = 67.0,
                        bi_rgb: float = 3.0, bi_w: float = 4.0) -> torch.Tensor:
    """Exact mean field with dense Gaussian kernels (tiny images only).

    image: uint8 [B, H, W, Ci] or [H, W, Ci]; probs: [B, C, H, W] or [C, H, W].
    Computed in float64 on the CPU, returned as float32 on probs' device.
    """
    batched = probs.dim() == 4
    images = image if batched else image[None]
    prob_batch = probs if batched else probs[None]
    height, width = prob_batch.shape[-2:]
    if height * width > 10_000:
        raise ValueError(f"dense_crf_reference is O(P^2); {height}x{width} is too large")
    out = torch.stack([
        _crf_one_image(img.cpu(), p.cpu(), iters, pos_xy, pos_w, bi_xy, bi_rgb, bi_w)
        for img, p in zip(images, prob_batch)
    ]).to(probs.device)
    return out if batched else out[0]

"""Compiled kernels for PPAP: batched top-k neighbours and the dense CRF.

    from ext import dense_crf, topk_neighbors

The C++/CUDA libraries are built on first use (see ``ext/_build.py``; call
``ext.load()`` to build eagerly).  Ops run on the device of their inputs: CPU
always, CUDA when the CUDA library could be built.  ``PPAP_EXT_REFERENCE=1``
switches both functions to the plain-PyTorch references (debugging only; the
CRF reference is O(P^2)).  A failed build raises ``BuildError``; there is no
silent fallback.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ._build import BuildError, cuda_buildable, load_cpu, load_cuda
from .reference import dense_crf_reference, topk_neighbors_reference

__all__ = [
    "BuildError",
    "dense_crf",
    "dense_crf_reference",
    "load",
    "topk_neighbors",
    "topk_neighbors_reference",
]

DEFAULT_KEY_TILE = 4096
# Similarity scratch per block of queries (query_block * key_tile floats).
DEFAULT_TILE_BYTES = {False: 64 << 20, True: 256 << 20}  # keyed by "is CUDA"


def load(device: torch.device | str | None = None) -> None:
    """Builds/loads the libraries for `device` (default: every usable device)."""
    load_cpu()
    if device is None:
        if cuda_buildable():
            load_cuda()
    elif torch.device(device).type != "cpu":
        _ensure_loaded_for(torch.empty(0, device=device))


def _ensure_loaded_for(t: torch.Tensor) -> None:
    """Loads the library serving t's device (CPU always first)."""
    load_cpu()
    if t.is_cuda:
        load_cuda()
    elif t.device.type != "cpu":
        raise ValueError(f"ext ops support CPU and CUDA tensors, got a tensor on {t.device}")


def _use_reference() -> bool:
    return os.environ.get("PPAP_EXT_REFERENCE", "") not in ("", "0")


# --------------------------------------------------------------------------- top-k


def topk_neighbors(q: torch.Tensor, keys: torch.Tensor, k: int, cosine: bool = True, *,
                   key_tile: int = DEFAULT_KEY_TILE, query_block: int | None = None):
    """The k most similar keys of every query, without forming all similarities.

    q: [B, M, D] or [M, D]; keys: [B, K, D] or [K, D] (same dtype and device).
    cosine=True compares L2-normalised vectors, False raw dot products.
    Returns (values, indices), each [B, M, k] (or [M, k]), sorted descending;
    values have q's dtype, indices are int64 key positions.  Values equal
    torch.topk(q @ keys^T) up to GEMM rounding (blocked products may round
    differently); indices may differ only among equal similarities.
    key_tile / query_block set the tile shape (defaults keep the similarity
    scratch at 64 MiB on CPU, 256 MiB on CUDA).
    """
    _check_topk_inputs(q, keys, k)
    if cosine:
        q = F.normalize(q, dim=-1)
        keys = F.normalize(keys, dim=-1)
    if _use_reference():
        return topk_neighbors_reference(q, keys, k, cosine=False)
    if not isinstance(key_tile, int) or key_tile < 1:
        raise ValueError(f"topk_neighbors: key_tile must be a positive int, got {key_tile!r}")
    if query_block is None:
        query_block = max(1, DEFAULT_TILE_BYTES[q.is_cuda] // (4 * key_tile))
    elif not isinstance(query_block, int) or query_block < 1:
        raise ValueError(f"topk_neighbors: query_block must be a positive int, got {query_block!r}")

    _ensure_loaded_for(q)
    batched = q.dim() == 3
    qb = (q if batched else q[None]).contiguous()
    kb = (keys if batched else keys[None]).contiguous()
    values, indices = torch.ops.ppap_ext.topk_neighbors(qb, kb, k, key_tile, query_block)
    return (values, indices) if batched else (values[0], indices[0])


def _check_topk_inputs(q, keys, k) -> None:
    if not isinstance(q, torch.Tensor) or not isinstance(keys, torch.Tensor):
        raise ValueError("topk_neighbors: q and keys must be torch tensors")
    if q.dim() not in (2, 3) or keys.dim() != q.dim():
        raise ValueError(f"topk_neighbors: expected q [M,D] & keys [K,D] or q [B,M,D] & keys "
                         f"[B,K,D], got {tuple(q.shape)} and {tuple(keys.shape)}")
    if q.shape[-1] != keys.shape[-1] or (q.dim() == 3 and q.shape[0] != keys.shape[0]):
        raise ValueError(f"topk_neighbors: q {tuple(q.shape)} and keys {tuple(keys.shape)} "
                         "differ in batch or feature size")
    if not q.is_floating_point() or q.dtype != keys.dtype:
        raise ValueError(f"topk_neighbors: q and keys must share a floating dtype, got "
                         f"{q.dtype} and {keys.dtype}")
    if q.device != keys.device:
        raise ValueError(f"topk_neighbors: q is on {q.device} but keys on {keys.device}")
    num_keys = keys.shape[-2]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_keys:
        raise ValueError(f"topk_neighbors: k must be an int in [1, K={num_keys}], got {k!r}")


# ----------------------------------------------------------------------- dense CRF


def dense_crf(image: torch.Tensor, probs: torch.Tensor, iters: int = 10, pos_xy: float = 1.0,
              pos_w: float = 3.0, bi_xy: float = 67.0, bi_rgb: float = 3.0,
              bi_w: float = 4.0) -> torch.Tensor:
    """Mean-field inference of the fully connected Potts CRF (as pydensecrf).

    image: uint8 [B, H, W, 3] or [H, W, 3], channels in the order the bilateral
    features should use (PPAP passes BGR, like the original code); probs:
    class probabilities [B, C, H, W] or [C, H, W] (any float dtype; the unary
    is -log(clip(p, 1e-5, 1))).  Kernels: Gaussian on position (pos_xy,
    weight pos_w) and bilateral on position and colour (bi_xy, bi_rgb,
    weight bi_w).  Returns Q, float32, shaped like probs.
    """
    _check_crf_inputs(image, probs, iters, (pos_xy, bi_xy, bi_rgb), (pos_w, bi_w))
    args = (int(iters), float(pos_xy), float(pos_w), float(bi_xy), float(bi_rgb), float(bi_w))
    if _use_reference():
        return dense_crf_reference(image, probs, *args)
    _ensure_loaded_for(probs)
    batched = probs.dim() == 4
    img = (image if batched else image[None]).contiguous()
    prb = (probs if batched else probs[None]).to(torch.float32).contiguous()
    q = torch.ops.ppap_ext.dense_crf(img, prb, *args)
    return q if batched else q[0]


def _check_crf_inputs(image, probs, iters, sigmas, weights) -> None:
    if not isinstance(image, torch.Tensor) or not isinstance(probs, torch.Tensor):
        raise ValueError("dense_crf: image and probs must be torch tensors")
    if image.dtype != torch.uint8:
        raise ValueError(f"dense_crf: image must be uint8, got {image.dtype}")
    if not probs.is_floating_point():
        raise ValueError(f"dense_crf: probs must be floating point, got {probs.dtype}")
    if probs.dim() not in (3, 4) or image.dim() != probs.dim() or image.shape[-1] != 3:
        raise ValueError(f"dense_crf: expected image [B,H,W,3] & probs [B,C,H,W] (or unbatched "
                         f"[H,W,3] & [C,H,W]), got {tuple(image.shape)} and {tuple(probs.shape)}")
    if image.shape[:-1] != probs.shape[:-3] + probs.shape[-2:]:
        raise ValueError(f"dense_crf: image {tuple(image.shape)} and probs {tuple(probs.shape)} "
                         "disagree on batch/height/width")
    if image.device != probs.device:
        raise ValueError(f"dense_crf: image is on {image.device} but probs on {probs.device}")
    if probs.shape[-3] < 1 or probs.shape[-1] < 1 or probs.shape[-2] < 1:
        raise ValueError(f"dense_crf: empty probs {tuple(probs.shape)}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"dense_crf: iters must be a non-negative int, got {iters!r}")
    if any(not float(s) > 0 for s in sigmas):
        raise ValueError(f"dense_crf: pos_xy, bi_xy, bi_rgb must be > 0, got {sigmas}")
    if any(float(w) != float(w) for w in weights):
        raise ValueError(f"dense_crf: weights must be numbers, got {weights}")


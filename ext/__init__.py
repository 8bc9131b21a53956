"""Compiled kernels for PPAP: batched top-k neighbours and the dense CRF.

    from ext import dense_crf, topk_neighbors

The C++/CUDA libraries are built on first use (see ``ext/_build.py``; call
``ext.load()`` to build eagerly).  Ops run on the device of their inputs: CPU
always, CUDA when the CUDA library could be built (``ext.cuda_usable()`` says
whether it can be, without building; ``ext.usable_device(device)`` picks the
CPU instead, with the reason, where it cannot).  ``PPAP_EXT_REFERENCE=1`` switches both
functions to the plain-PyTorch references (debugging only; the CRF reference
is O(P^2)).  A failed build raises ``BuildError``; there is no silent fallback.

The first CUDA call of each op on each device compares the CUDA kernel with
the CPU kernel on a small fixed input and raises ``SelfCheckError`` if they
disagree (``ext.self_check``; ``PPAP_EXT_SKIP_SELFCHECK=1`` skips it).
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from ._build import (BuildError, cuda_buildable, cuda_unusable_reason, cuda_usable, load_cpu,
                     load_cuda)
from ._selfcheck import SelfCheckError, maybe_self_check, self_check
from .reference import dense_crf_reference, topk_neighbors_reference

__all__ = [
    "BuildError",
    "MAX_LATTICE_FEATURE",
    "SelfCheckError",
    "cuda_usable",
    "dense_crf",
    "dense_crf_reference",
    "load",
    "self_check",
    "topk_neighbors",
    "topk_neighbors_reference",
    "usable_device",
]

DEFAULT_KEY_TILE = 4096
# Similarity scratch per block of queries (query_block * key_tile floats).
DEFAULT_TILE_BYTES = {False: 64 << 20, True: 256 << 20}  # keyed by "is CUDA"


def load(device: torch.device | str | None = None) -> None:
    """Builds/loads the libraries for `device` (default: every usable device).

    load("cpu") builds only the CPU library and never needs nvcc.
    """
    load_cpu()
    if device is None:
        if cuda_buildable():
            load_cuda()
    elif torch.device(device).type != "cpu":
        _ensure_loaded_for(torch.empty(0, device=device))


def usable_device(device: torch.device | str) -> tuple[torch.device, str | None]:
    """Where the ops can run work that lives on `device`, without building.

    Returns (`device`, None) for the CPU and for a GPU the CUDA kernels can be
    built for (cuda_usable()); otherwise (cpu, reason), the reason one line
    such as "the CUDA kernels cannot be built here: nvcc was not found
    (install the CUDA toolkit or set CUDA_HOME)", for the caller to print
    before running the op on the CPU.  A build that fails anyway still raises
    BuildError: there is no silent fallback.
    """
    device = torch.device(device)
    if device.type == "cpu":
        return device, None
    if device.type != "cuda":
        return torch.device("cpu"), f"the ext kernels support CPU and CUDA, not {device.type}"
    reason = cuda_unusable_reason()
    if reason is None:
        return device, None
    return torch.device("cpu"), f"the CUDA kernels cannot be built here: {reason}"


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
    cosine=True compares L2-normalised vectors (normalised and compared in
    float32 whatever the input dtype, so that half-precision zero rows give 0,
    not NaN), False raw dot products (in the input dtype).
    What is computed does not depend on the caller's precision settings:
    float32 similarities are IEEE float32 products under torch.autocast and
    with TF32 allowed (torch.backends.cuda.matmul.allow_tf32,
    torch.set_float32_matmul_precision("high"/"medium")); on the CPU, where
    those settings would let oneDNN use bf16 / TF32, the products are formed
    in float64 and rounded to float32 instead.
    Returns (values, indices), each [B, M, k] (or [M, k]), sorted descending
    as torch.topk sorts: NaN above every number, equal similarities lowest key
    index first (on CPU and CUDA alike); values have q's dtype, indices are
    int64 key positions.  Values equal torch.topk(q @ keys^T) up to GEMM
    rounding (blocked products may round differently); indices may differ only
    among equal similarities.
    key_tile / query_block set the tile shape (defaults keep the similarity
    scratch at 64 MiB on CPU, 256 MiB on CUDA); tiles hold max(key_tile, k)
    keys on both devices.
    """
    _check_topk_inputs(q, keys, k)
    out_dtype = q.dtype
    if cosine:
        # In float32: F.normalize's eps (1e-12) underflows to 0 in half
        # precision, and 0 / 0 would make a zero row NaN.
        q = F.normalize(q.float(), dim=-1)
        keys = F.normalize(keys.float(), dim=-1)
    if _use_reference():
        values, indices = topk_neighbors_reference(q, keys, k, cosine=False)
        return values.to(out_dtype), indices
    if not isinstance(key_tile, int) or key_tile < 1:
        raise ValueError(f"topk_neighbors: key_tile must be a positive int, got {key_tile!r}")
    if query_block is None:
        query_block = max(1, DEFAULT_TILE_BYTES[q.is_cuda] // (4 * key_tile))
    elif not isinstance(query_block, int) or query_block < 1:
        raise ValueError(f"topk_neighbors: query_block must be a positive int, got {query_block!r}")

    _ensure_loaded_for(q)
    if q.is_cuda:
        maybe_self_check("topk_neighbors", q.device)
    batched = q.dim() == 3
    qb = (q if batched else q[None]).contiguous()
    kb = (keys if batched else keys[None]).contiguous()
    values, indices = torch.ops.ppap_ext.topk_neighbors(qb, kb, k, key_tile, query_block)
    values = values.to(out_dtype)
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
    class probabilities [B, C, H, W] or [C, H, W] (any float dtype, finite; the
    unary is -log(clip(p, 1e-5, 1))).  Kernels: Gaussian on position (pos_xy,
    weight pos_w) and bilateral on position and colour (bi_xy, bi_rgb,
    weight bi_w).  Returns Q, float32, shaped like probs.

    Raises ValueError for NaN/inf probabilities and for standard deviations
    so small that the lattice features (pixel coordinate / pos_xy or bi_xy,
    channel value / bi_rgb) would exceed MAX_LATTICE_FEATURE = 2^17:
    pos_xy, bi_xy >= max(H, W) / 2^17 and bi_rgb >= 255 / 2^17 (~0.002).
    """
    _check_crf_inputs(image, probs, iters, (pos_xy, bi_xy, bi_rgb), (pos_w, bi_w))
    args = (int(iters), float(pos_xy), float(pos_w), float(bi_xy), float(bi_rgb), float(bi_w))
    _check_crf_features(probs, *args[1:])
    _check_finite_probs(probs)
    if _use_reference():
        return dense_crf_reference(image, probs, *args)
    _ensure_loaded_for(probs)
    if probs.is_cuda:
        maybe_self_check("dense_crf", probs.device)
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
    if any(not math.isfinite(float(w)) for w in weights):
        raise ValueError(f"dense_crf: weights pos_w, bi_w must be finite numbers, got {weights}")


# Largest lattice feature magnitude (csrc/lattice_geometry.h, kMaxFeature):
# beyond it float rounding scatters the permutohedral lattice computation.
MAX_LATTICE_FEATURE = 2.0 ** 17


def _check_crf_features(probs, pos_xy, pos_w, bi_xy, bi_rgb, bi_w) -> None:
    """Refuses standard deviations that push lattice features past the limit
    (kernels with weight 0 are not built, so theirs are not checked)."""
    height, width = probs.shape[-2:]
    extent = max(height, width)  # bounds |coordinate| / sxy by extent / sxy
    limit = MAX_LATTICE_FEATURE
    checks = []  # (name, sigma, largest numerator, feature)
    if pos_w != 0:
        checks.append(("pos_xy", pos_xy, extent, "pixel coordinate"))
    if bi_w != 0:
        checks.append(("bi_xy", bi_xy, extent, "pixel coordinate"))
        checks.append(("bi_rgb", bi_rgb, 255, "channel value"))
    for name, sigma, top, what in checks:
        if top / sigma > limit:
            raise ValueError(
                f"dense_crf: {name}={sigma:g} is too small for a {height}x{width} image: the "
                f"lattice features ({what} / {name}, up to {top} / {name} = {top / sigma:.3g}) "
                f"must stay <= 2^17 = {limit:.0f}; use {name} >= {top / limit:.3g} (or a weight "
                "of 0 to drop the kernel)")


def _check_finite_probs(probs: torch.Tensor) -> None:
    finite = torch.isfinite(probs)
    if bool(finite.all()):
        return
    bad = (~finite).nonzero()[0].tolist()
    count = int((~finite).sum())
    where = ", ".join(str(i) for i in bad)
    raise ValueError(f"dense_crf: probs contain {count} NaN/inf value(s) (first at index "
                     f"[{where}]: {probs[tuple(bad)].item()}); the CRF would spread them over the "
                     "whole image")


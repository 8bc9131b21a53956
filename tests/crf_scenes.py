"""Test-only CRF inputs, shared by tests/test_ext.py and tests/bench_ext.py (not used by PPAP).

* synthetic_scene: a natural-looking image (piecewise regions with smooth
  shading, sharp edges and sensor noise) with noisy, spatially correlated class
  probabilities whose argmax is wrong on a sizeable fraction of pixels, so the
  CRF has real work to do.
* pydensecrf_inference: the per-image pydensecrf protocol of the PPAP authors.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def synthetic_scene(height: int, width: int, num_classes: int, seed: int = 0,
                    regions: int = 14):
    """Returns (image uint8 [H, W, 3], probs float32 [C, H, W]) as numpy arrays."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    # Voronoi regions with jittered boundaries.
    cy = rng.uniform(0, height, regions)
    cx = rng.uniform(0, width, regions)
    jitter = 3.0 * np.sin(xx / 7.0 + yy / 11.0)
    dist = (yy[None] - cy[:, None, None]) ** 2 + (xx[None] - cx[:, None, None] + jitter) ** 2
    label = dist.argmin(0)
    colours = rng.uniform(20, 235, (regions, 3))
    image = colours[label]
    image += 18 * np.sin(xx / 19.0)[..., None] + 12 * np.cos(yy / 27.0)[..., None]  # shading
    image += rng.normal(0, 5, image.shape)  # noise
    image = np.clip(image, 0, 255).astype(np.uint8)

    # Class evidence: the true class gets a boost, buried in correlated noise.
    truth = rng.integers(0, num_classes, regions)[label]
    logits = rng.normal(0, 1.0, (num_classes, height, width)).astype(np.float32)
    logits[truth, yy.astype(int), xx.astype(int)] += 1.2
    logits = F.avg_pool2d(torch.from_numpy(logits)[None], 3, 1, 1, count_include_pad=False)[0]
    probs = torch.softmax(logits * 2.5, dim=0).numpy().astype(np.float32)
    return image, np.ascontiguousarray(probs)


def pydensecrf_inference(image: np.ndarray, probs: np.ndarray, iters: int = 10, pos_xy=1.0,
                         pos_w=3.0, bi_xy=67.0, bi_rgb=3.0, bi_w=4.0) -> np.ndarray:
    """Q [C, H, W] from pydensecrf (pip package pydensecrf2)."""
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    num_classes, height, width = probs.shape
    crf = dcrf.DenseCRF2D(width, height, num_classes)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    crf.addPairwiseGaussian(sxy=pos_xy, compat=pos_w)
    crf.addPairwiseBilateral(sxy=bi_xy, srgb=bi_rgb, rgbim=np.ascontiguousarray(image),
                             compat=bi_w)
    return np.array(crf.inference(iters)).reshape(num_classes, height, width)

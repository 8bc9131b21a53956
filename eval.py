"""Evaluation of PPAP runs and of the authors' released checkpoints, on top of ppap.py.

ppap.py holds what training needs to validate (confusion matrices, Hungarian scores, the evaluation
loop); this script adds the dense CRF, the authors' checkpoints, reports, plots, seed summaries, the
kNN image table, and the audit kit: the released checkpoints against the paper's numbers (--audit), the
propagation statistics behind the paper's claim (--propagation), the Phi_0/Psi_0 threshold sweep on a frozen
backbone's features before any training (--propagation --sweep) and a k-means view of the code (--kmeans).

Command line
------------
    python eval.py --run runs/x [--data ...] [--data-dir ...] [--crf] [--out DIR]
                   [--device auto] [--batch-size 8] [--limit N]
    python eval.py --official ckpt.pth --data cocostuff --arch vit_small --patch 8 [--crf]
    python eval.py --run runs/x --kmeans [--kmeans-restarts 5] [--kmeans-samples 100000] [--kmeans-seed 0]
    python eval.py --summarize runs/a runs/b runs/c [--out DIR]
    python eval.py --propagation --run runs/x [--limit N] [--batch-size B] [--anchors-seed 0] [--trained-features z]
    python eval.py --propagation --official ckpt.pth --data cocostuff --arch vit_small --patch 8 [...]
    python eval.py --propagation --sweep --data cocostuff --arch dinov2_vits14 [--weights FILE] [--per-class]
                   [--phi0-grid 0.3:0.95:0.05] [--gap 0.35] [--size 320] [--limit N] [--batch-size B]
    python eval.py --propagation --sweep --run runs/x        (or --official ckpt.pth --data ... --arch ... --patch ...)
    python eval.py --audit [--checkpoints DIR] [--data-dir DIR] [--crf] [--out DIR] [--limit N] [--device ...]
    python eval.py --knn --data synthetic [--k 7] [--split train]

Each mode has its own flags (`python eval.py --knn --help`); the functions below are importable without side
effects (ppap.py's metrics are re-exported: `from eval import scores` works).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import hashlib
import json
import math
import os
import shlex
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import ppap
from ppap import PPAPError, confusion_update, fcntl, scores  # noqa: F401  (`from eval import scores` works)


# Dense-CRF hyper-parameters of the authors (utils/seg_utils.py).
CRF_ITERS = 10
CRF_POS_XY, CRF_POS_W = 1, 3
CRF_BI_XY, CRF_BI_RGB, CRF_BI_W = 67, 3, 4
CLUSTER_CRF_ALPHA = 2.0  # cluster probs for the CRF: softmax(2 * inner products)

OFFICIAL_KEYS = ("net_model_state_dict", "linear_model_state_dict", "cluster_model_state_dict")
# authors' prefix -> our prefix, per sub-dict
_OFFICIAL_PREFIXES = {
    "net_model_state_dict": (("model.", "backbone."), ("decoder.", "head."), ("project_head.", "proj.")),
    "linear_model_state_dict": (("", "linear_probe."),),
    "cluster_model_state_dict": (("", "cluster_probe."),),
}


# ==== CRF ====

def image_to_uint8_bgr(img: torch.Tensor, bgr: bool = True) -> torch.Tensor:
    """Normalised [B,3,H,W] float -> uint8 [B,H,W,3] (BGR by default), the authors' dense_crf conversion:
    un-normalised in float32, times 255, truncated (ppap.to_uint8_rgb), channels reversed."""
    x = ppap.to_uint8_rgb(img)
    return (x.flip(-1) if bgr else x).contiguous()


def load_crf(device=None):
    """ext.dense_crf, imported lazily and built/loaded for ``device`` now (ext.load), so that a
    build problem shows up before the evaluation starts.  Raises PPAPError('CRF unavailable: ...')."""
    try:
        import ext  # noqa: WPS433
        dense_crf = ext.dense_crf
        if hasattr(ext, "load"):
            ext.load(torch.device(device) if device is not None else "cpu")
    except BaseException as e:  # ImportError, BuildError, OSError, CalledProcessError, ...
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        reason = " ".join(str(e).split())[:300]
        raise PPAPError(f"CRF unavailable: {type(e).__name__}" + (f": {reason}" if reason else "")) from None
    if not callable(dense_crf):
        raise PPAPError("CRF unavailable: ext.dense_crf is not callable")
    return dense_crf


def crf_device(requested: str, device: torch.device) -> torch.device:
    """--crf-device: cpu, cuda, or auto = the evaluation's device when it is a GPU the CUDA kernels can be
    built for, else the CPU (a GPU machine without nvcc still gets the CRF, on the CPU, and is told so)."""
    if requested != "auto":
        return ppap.pick_device(requested, flag="--crf-device")
    return kernels_on(device, "the CRF")


def kernels_on(device: torch.device, what: str) -> torch.device:
    """Where ext's kernels run work that lives on `device`: there, or on the CPU where the CUDA kernels cannot
    be built (a GPU machine without nvcc), which is said in one line."""
    if device.type == "cpu":
        return device
    try:
        import ext
    except ImportError:                           # load_crf / topk_neighbors report it, as one line
        return torch.device("cpu")
    run_on, note = ext.usable_device(device)
    if note:
        print(f"note: {note}: {what} runs on the CPU", file=sys.stderr)
    return run_on


def _crf_argmax(dense_crf, img_u8, logits):
    """softmax -> dense CRF (authors' parameters, on img_u8's device) -> argmax on logits' device.
    logits [B,C,H,W] at image size."""
    # The authors pass log_softmax(logits) and softmax it again inside dense_crf.
    probs = torch.softmax(torch.log_softmax(logits.float(), dim=1), dim=1).to(img_u8.device)
    q = dense_crf(img_u8, probs.contiguous(), iters=CRF_ITERS, pos_xy=CRF_POS_XY, pos_w=CRF_POS_W,
                  bi_xy=CRF_BI_XY, bi_rgb=CRF_BI_RGB, bi_w=CRF_BI_W)
    q = torch.as_tensor(q)
    if tuple(q.shape) != tuple(probs.shape):
        raise RuntimeError(f"dense_crf returned shape {tuple(q.shape)}, expected {tuple(probs.shape)}")
    return q.argmax(1).to(logits.device)


# ==== EVALUATION ====

PROBES = ("cluster", "cluster_sel", "linear", "kmeans", "cluster_crf", "linear_crf")


def crf_refiner(dense_crf, device=None):
    """ppap.evaluate's refine hook: dense CRF on softmax(linear logits) and on softmax(2 * cosine scores),
    image as BGR uint8 (the authors' batched_crf), computed on `device` (default: the image's)."""
    def refine(img, linear_logits, inner, code=None):
        img_u8 = image_to_uint8_bgr(img).to(device or img.device)
        out = {} if linear_logits is None else {"linear_crf": _crf_argmax(dense_crf, img_u8, linear_logits)}
        return {"cluster_crf": _crf_argmax(dense_crf, img_u8, CLUSTER_CRF_ALPHA * inner.float()), **out}
    return refine


def _chain(refiners):
    """Several refine hooks as one (None if there are none): their predictions merged."""
    refiners = [r for r in refiners if r is not None]
    if not refiners:
        return None

    def refine(img, linear_logits, inner, code):
        out = {}
        for r in refiners:
            out.update(r(img, linear_logits, inner, code))
        return out
    return refine


def evaluate_model(model, loader, device, crf=False, amp: torch.dtype | None = None, n_examples: int = 0,
                   progress: bool = True, desc: str = "eval", dense_crf=None, kmeans_centroids=None,
                   crf_on=None, linear: bool = True) -> dict:
    """ppap.evaluate (no CRF, cluster and linear probes; linear=False: the cluster probe only) plus, with crf=True, the CRF-refined predictions
    of both probes from the same pass, so "no CRF" and "CRF" scores come back together, and with
    ``kmeans_centroids`` [K,D] (see fit_kmeans) the 'kmeans' probe, scored like the cluster probe. ``amp``:
    autocast dtype or None (fp32); ``crf_on``: the CRF's device (default: the evaluation's). See
    ppap.evaluate for the returned dict."""
    if crf and dense_crf is None:
        dense_crf = load_crf(crf_on or device)
    refine = _chain([crf_refiner(dense_crf, crf_on) if crf else None,
                     kmeans_refiner(kmeans_centroids) if kmeans_centroids is not None else None])
    return ppap.evaluate(model, loader, device, amp=amp, refine=refine, n_examples=n_examples,
                         progress=progress, desc=desc, linear=linear)


# ==== K-MEANS DIAGNOSTIC ====
# The cluster probe's unsupervised score depends on its random initialisation (the authors' ClusterLookup
# starts from torch.randn centroids and is trained by SGD alongside the head). Spherical k-means with fixed
# seeds on the same code scores the learned code without labels and without that randomness: K = n_classes
# clusters on L2-normalised code vectors (cosine distance, as the cluster probe scores), k-means++ seeding,
# a fixed number of restarts, the lowest-inertia restart kept; then every val pixel is assigned to the
# closest centroid by the cluster probe's own scoring (ClusterProbe.inner) and Hungarian-matched over one
# confusion matrix, exactly as the cluster probe.

KMEANS_RESTARTS = 5          # restarts r = 0..4 use seeds seed + r
KMEANS_ITERS = 100           # Lloyd iterations at most (stops when no assignment changes)
KMEANS_SAMPLES = 100_000     # code vectors the centroids are fitted on (a fixed per-image patch subsample)


def _kmeanspp(x: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    """k-means++ seeding with distance 1 - cos: x [M,D] unit rows -> k starting centroids [k,D]."""
    M = x.shape[0]
    idx = [int(torch.randint(M, (1,), generator=g))]
    d = (1 - x @ x[idx[0]]).clamp_(min=0)
    for _ in range(1, k):
        w = d.double().cpu()
        # all remaining points coincide with a centroid (fewer distinct points than k): any point will do
        i = int(torch.multinomial(w, 1, generator=g)) if w.sum() > 0 else int(torch.randint(M, (1,), generator=g))
        idx.append(i)
        d = torch.minimum(d, (1 - x @ x[i]).clamp_(min=0))
    return x[idx].clone()


def spherical_kmeans(x: torch.Tensor, k: int, restarts: int = KMEANS_RESTARTS, iters: int = KMEANS_ITERS,
                     seed: int = 0) -> tuple[torch.Tensor, float, int]:
    """x [M,D] (normalised here) -> (centroids [k,D] unit rows, inertia = sum over rows of 1 - cos to the
    closest centroid, index of the kept restart). Restart r draws from torch.Generator seeded seed + r
    (k-means++), then Lloyd steps: assign by cosine, centroid = normalised mean (an empty cluster keeps
    its centroid). The lowest-inertia restart is kept, the first one on ties: same inputs, same result."""
    if x.shape[0] < k:
        raise PPAPError(f"k-means needs at least {k} samples, got {x.shape[0]}")
    x = F.normalize(x.float(), dim=1)
    best = None
    for r in range(restarts):
        g = torch.Generator().manual_seed(seed + r)
        c = _kmeanspp(x, k, g)
        assign = None
        for _ in range(iters):
            new_assign = (x @ c.T).argmax(1)
            if assign is not None and torch.equal(new_assign, assign):
                break
            assign = new_assign
            sums = torch.zeros_like(c).index_add_(0, assign, x)
            filled = torch.bincount(assign, minlength=k) > 0
            c = torch.where(filled[:, None], F.normalize(sums, dim=1), c)
        inertia = float((1 - (x @ c.T).max(1).values).sum())
        if best is None or inertia < best[1]:
            best = (c, inertia, r)
    return best


@torch.no_grad()
def collect_code(model, loader, device, amp: torch.dtype | None = None, samples: int = KMEANS_SAMPLES,
                 seed: int = 0, progress: bool = True) -> torch.Tensor:
    """The code k-means is fitted on: for each val image the same number of patch-grid code vectors,
    ceil(samples / images) of them (all when the grid is smaller), at positions drawn from one generator
    seeded `seed` -> [M,D] float32 unit rows. A subsample, so memory stays bounded on the full val sets."""
    device = torch.device(device)
    per_image = max(1, math.ceil(samples / max(1, len(loader.dataset))))
    g = torch.Generator().manual_seed(seed)
    rows = []
    with ppap.evaluating(model):
        for batch in tqdm(loader, desc="k-means code", leave=False, dynamic_ncols=True, disable=not progress):
            img = ppap._unpack_batch(batch)[0].to(device, non_blocking=True)
            with ppap.autocast(device, amp):
                code = model(img)["code"]                         # as ppap.evaluate computes it
            B, D, h, w = code.shape
            flat = code.float().permute(0, 2, 3, 1).reshape(B, h * w, D)
            for i in range(B):
                keep = torch.randperm(h * w, generator=g)[:per_image] if per_image < h * w else torch.arange(h * w)
                rows.append(flat[i, keep.to(flat.device)])
    return F.normalize(torch.cat(rows), dim=1)


def fit_kmeans(model, loader, device, amp=None, restarts: int = KMEANS_RESTARTS, samples: int = KMEANS_SAMPLES,
               seed: int = 0, progress: bool = True) -> tuple[torch.Tensor, dict]:
    """K = model.n_classes centroids of the model's code on the loader's images -> (centroids [K,D],
    settings and fit statistics for metrics.json)."""
    t0 = time.time()
    x = collect_code(model, loader, device, amp=amp, samples=samples, seed=seed, progress=progress)
    c, inertia, kept = spherical_kmeans(x, int(model.n_classes), restarts=restarts, seed=seed)
    return c, {"k": int(model.n_classes), "restarts": restarts, "max_iters": KMEANS_ITERS, "seed": seed,
               "init": "k-means++ (cosine)", "samples": int(x.shape[0]), "kept_restart": kept,
               "mean_inertia": inertia / x.shape[0], "seconds": round(time.time() - t0, 2)}


def kmeans_refiner(centroids: torch.Tensor):
    """ppap.evaluate's refine hook for the 'kmeans' probe: each pixel's closest centroid by the cluster
    probe's scoring (cosine of the upsampled code with the centroids), in fp32."""
    probe = ppap.ClusterProbe(centroids.shape[1], centroids.shape[0])
    with torch.no_grad():
        probe.clusters.copy_(centroids)

    def refine(img, linear_logits, inner, code):
        return {"kmeans": probe.to(code.device).inner(code.float()).argmax(1)}
    return refine


def probe_results(res: dict, probe: str) -> dict | None:
    """The entries of one probe in an evaluate_model result, without the prefix (None if absent)."""
    if f"{probe}_mIoU" not in res:
        return None
    pre = probe + "_"
    return {k[len(pre):]: v for k, v in res.items()
            if k.startswith(pre) and (probe.endswith("_crf") or not k[len(pre):].startswith("crf_"))}


# ==== CHECKPOINTS ====

def _strip_module(sd: dict) -> dict:
    if sd and all(isinstance(k, str) and k.startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}
    return sd


def map_official_keys(ckpt: dict) -> dict:
    """Authors' checkpoint dict -> our PPAP state_dict (flat, our key names).

    net_model_state_dict: model.* -> backbone.*, decoder.* -> head.*,
    project_head.* -> proj.*; linear_model_state_dict -> linear_probe.*;
    cluster_model_state_dict -> cluster_probe.*.  A leading 'module.' (DDP) is
    stripped.  Raises PPAPError naming keys with no mapping.
    """
    if not isinstance(ckpt, dict):
        raise PPAPError(f"not an authors' PPAP checkpoint: expected a dict, got {type(ckpt).__name__}")
    missing = [k for k in OFFICIAL_KEYS if k not in ckpt]
    if missing:
        have = ", ".join(sorted(map(str, ckpt.keys()))[:8]) or "nothing"
        raise PPAPError(f"not an authors' PPAP checkpoint: missing {', '.join(missing)} (has: {have})")
    out, unmapped = {}, []
    for part in OFFICIAL_KEYS:
        sd = ckpt[part]
        if not isinstance(sd, dict):
            raise PPAPError(f"corrupt authors' checkpoint: {part} is a {type(sd).__name__}, not a dict")
        for k, v in _strip_module(sd).items():
            for src, dst in _OFFICIAL_PREFIXES[part]:
                if k.startswith(src):
                    out[dst + k[len(src):]] = v
                    break
            else:
                unmapped.append(f"{part}:{k}")
    if unmapped:
        raise PPAPError("authors' checkpoint has unexpected key(s): " + ", ".join(unmapped[:10])
                        + (f" (+{len(unmapped) - 10} more)" if len(unmapped) > 10 else ""))
    return out


def _to_official_name(key: str) -> str:
    for part in OFFICIAL_KEYS:
        for src, dst in _OFFICIAL_PREFIXES[part]:
            if dst and key.startswith(dst):
                return f"{part}:{src}{key[len(dst):]}"
    return key


def official_state_dict(model) -> dict:
    """Our PPAP model -> a dict in the authors' checkpoint format (inverse of map_official_keys)."""
    sd = model.state_dict()
    out = {part: {} for part in OFFICIAL_KEYS}
    for k, v in sd.items():
        for part in OFFICIAL_KEYS:
            hit = [(s, d) for s, d in _OFFICIAL_PREFIXES[part] if k.startswith(d)]
            if hit:
                src, dst = hit[0]
                out[part][src + k[len(dst):]] = v.detach().clone()
                break
        else:
            raise PPAPError(f"model key {k!r} has no counterpart in the authors' format")
    return out


def _torch_load(path: str, trust: bool = False):
    if not os.path.exists(path):
        raise PPAPError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        raise PPAPError(f"expected a checkpoint file, got a directory: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust)
    except Exception as e:  # truncated / not a torch file / disallowed pickle
        msg = " ".join(str(e).split())[:200]
        hint = "" if trust or "weights_only" not in msg.lower() else \
            " (it holds non-tensor objects; rerun with --trust-pickle if you trust the file)"
        raise PPAPError(f"cannot read checkpoint {path}: {type(e).__name__}: {msg}{hint}") from None


def load_official(path: str, arch: str = "vit_small", patch: int = 8, n_classes: int | None = None,
                  trust: bool = False):
    """Load an authors' released checkpoint (.pth) into our PPAP model (strict).

    ``n_classes`` defaults to the number of rows of the linear probe.  Errors
    (missing file, not a dict, corrupt/truncated file, missing or unexpected
    keys, shape mismatch) raise a one-line PPAPError (= ppap.PPAPError).
    """
    ckpt = _torch_load(path, trust=trust)
    try:
        sd = map_official_keys(ckpt)
    except PPAPError as e:
        raise PPAPError(f"{path}: {e}") from None
    w = sd.get("linear_probe.weight")
    if w is None or not hasattr(w, "shape") or len(w.shape) != 4:
        raise PPAPError(f"{path}: linear_model_state_dict.weight missing or not [C, D, 1, 1]")
    ck_classes = int(w.shape[0])
    if n_classes is None:
        n_classes = ck_classes
    elif int(n_classes) != ck_classes:
        raise PPAPError(f"{path}: checkpoint has {ck_classes} classes, the data set has {n_classes}")
    model = ppap.PPAP(ppap.new_backbone(arch, patch), n_classes)  # random init: no weight download
    pe = sd.get("backbone.pos_embed")
    if hasattr(pe, "shape") and pe.ndim == 3 and pe.shape[0] == 1 and pe.shape[2] == model.dim:
        model.backbone.adopt_pos_grid(pe)     # a grid of another resolution; other shapes fail strictly below
    missing, unexpected, wrong = ppap.key_mismatch(model.state_dict(), sd)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append("missing key(s): " + ", ".join(_to_official_name(k) for k in missing[:8])
                         + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else ""))
        if unexpected:
            parts.append("unexpected key(s): " + ", ".join(_to_official_name(k) for k in unexpected[:8])
                         + (f" (+{len(unexpected) - 8} more)" if len(unexpected) > 8 else ""))
        raise PPAPError(f"{path} does not match {arch}/{patch}: " + "; ".join(parts) + " (check --arch/--patch)")
    if wrong:
        own = model.state_dict()
        bad = [f"{_to_official_name(k)} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in wrong]
        raise PPAPError(f"{path} does not match {arch}/{patch}: shape mismatch: " + ", ".join(bad[:4])
                        + (f" (+{len(bad) - 4} more)" if len(bad) > 4 else "") + " (check --arch/--patch)")
    ppap.check_finite(sd, path)
    try:
        model.load_state_dict(sd, strict=True)
    except Exception as e:
        raise PPAPError(f"{path}: cannot load weights: " + " ".join(str(e).split())[:300]) from None
    model.eval()
    return model


# ==== PLOTS (PIL only) ====

def palette(n: int) -> np.ndarray:
    """Fixed, deterministic palette: [n, 3] uint8, well-separated hues (golden-ratio steps)."""
    import colorsys
    cols = []
    for i in range(n):
        h = (i * 0.618033988749895) % 1.0
        s = (0.95, 0.55, 0.8)[(i // 3) % 3] if i >= 3 else 0.9
        v = (0.95, 0.7, 0.5)[(i // 9) % 3] if i >= 9 else 0.95
        cols.append([int(round(255 * c)) for c in colorsys.hsv_to_rgb(h, s, v)])
    return np.asarray(cols, dtype=np.uint8).reshape(n, 3)


def class_palette(class_names) -> np.ndarray:
    """The colours of a dataset's classes: the synthetic demo's own (its "green stripes" are green), the
    fixed palette otherwise."""
    if list(class_names) == list(ppap.SYNTH_CLASSES):
        return ppap.SYNTH_PALETTE
    return palette(len(class_names))


def _font(size: int):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # old Pillow: bitmap font only
        return ImageFont.load_default()


def _text_size(draw, text, font):
    l, t, r, b = draw.textbbox((0, 0), text, font=font)
    return r - l, b - t


def plot_confusion(conf, row_names, col_names, path, title=""):
    """Row-normalised confusion matrix as a heatmap PNG with class names on both axes.

    conf[r, c]: pixels of true class r predicted as column c (already reordered).
    """
    from PIL import Image, ImageDraw
    conf = np.asarray(conf, dtype=np.float64)
    R, Cc = conf.shape
    norm = conf / np.maximum(conf.sum(axis=1, keepdims=True), 1)
    cell = int(max(14, min(40, 720 // max(R, Cc, 1))))
    font = _font(max(10, min(14, cell - 3)))
    tfont = _font(16)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    rw = max([_text_size(probe, n, font)[0] for n in row_names] + [10])
    cw = max([_text_size(probe, n, font)[0] for n in col_names] + [10])
    th = _text_size(probe, title or "X", tfont)[1]
    axis_h = _text_size(probe, "X", font)[1]
    left = rw + 14 + axis_h + 6
    top = 10 + th + 10 + axis_h + 6 + cw + 8
    W = max(left + Cc * cell + 20, _text_size(probe, title, tfont)[0] + 20 if title else 0)
    H = top + R * cell + 20
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    if title:
        d.text((10, 8), title, fill="black", font=tfont)
    d.text((left, 10 + th + 10), "predicted", fill=(60, 60, 60), font=font)
    # rotated y axis title
    lab = Image.new("RGB", _text_size(probe, "true class", font), "white")
    ImageDraw.Draw(lab).text((0, -probe.textbbox((0, 0), "true class", font=font)[1]), "true class",
                             fill=(60, 60, 60), font=font)
    lab = lab.rotate(90, expand=True)
    img.paste(lab, (6, top + max(0, (R * cell - lab.height) // 2)))
    for r in range(R):
        for c in range(Cc):
            v = float(norm[r, c])
            col = (int(255 - v * (255 - 8)), int(255 - v * (255 - 48)), int(255 - v * (255 - 107)))
            x0, y0 = left + c * cell, top + r * cell
            d.rectangle([x0, y0, x0 + cell, y0 + cell], fill=col, outline=(190, 190, 190))
            if cell >= 30 and v > 0:
                t = f"{100 * v:.0f}" if 100 * v >= 0.5 else "<1"
                tw, tht = _text_size(d, t, font)
                d.text((x0 + (cell - tw) / 2, y0 + (cell - tht) / 2 - 2), t,
                       fill="white" if v > 0.5 else "black", font=font)
    for r, n in enumerate(row_names):
        tw, tht = _text_size(d, n, font)
        d.text((left - 6 - tw, top + r * cell + (cell - tht) / 2 - 2), n, fill="black", font=font)
    for c, n in enumerate(col_names):
        tw, tht = _text_size(probe, n, font)
        lab = Image.new("RGB", (tw + 2, tht + 6), "white")
        ImageDraw.Draw(lab).text((0, -probe.textbbox((0, 0), n, font=font)[1] + 1), n, fill="black", font=font)
        lab = lab.rotate(90, expand=True)
        img.paste(lab, (left + c * cell + (cell - lab.width) // 2, top - 6 - lab.height))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path)
    return path


def _colorize(lbl: np.ndarray, pal: np.ndarray) -> np.ndarray:
    out = np.zeros(lbl.shape + (3,), dtype=np.uint8)  # ignore / unmatched: black
    ok = (lbl >= 0) & (lbl < len(pal))
    out[ok] = pal[lbl[ok]]
    return out


def plot_examples(examples, class_names, cluster_assignment, path, tile=160, crf=False):
    """Grid PNG: one row per example; columns image / ground truth / cluster (Hungarian
    mapped to classes) / linear [/ cluster+CRF / linear+CRF]; fixed palette, legend below.

    cluster_assignment: cluster -> class list, or {probe: list} to map 'cluster' and
    'cluster_crf' each with its own matching."""
    from PIL import Image, ImageDraw
    C = len(class_names)
    pal = class_palette(class_names)
    if not isinstance(cluster_assignment, dict):
        cluster_assignment = {"cluster": cluster_assignment, "cluster_crf": cluster_assignment}
    amaps = {k: np.asarray(list(v), dtype=np.int64) for k, v in cluster_assignment.items()}
    amap = amaps["cluster"]
    cols = [("image", None), ("ground truth", "label"), ("cluster (matched)", "cluster"), ("linear", "linear")]
    if crf and examples and "cluster_crf" in examples[0]:
        cols += [("cluster + CRF", "cluster_crf"), ("linear + CRF", "linear_crf")]
    cols = [c for c in cols if c[1] is None or not examples or c[1] in examples[0]]     # the probes evaluated
    font = _font(13)
    head = 24
    n = len(examples)
    pad = 4
    W = len(cols) * (tile + pad) + pad
    present = {int(v) for ex in examples for v in np.unique(ex["label"]) if 0 <= v < C}
    for _, key in cols[2:]:
        am = amaps.get(key, amap) if key.startswith("cluster") else np.arange(C)
        present |= {int(am[v]) for ex in examples for v in np.unique(ex[key]) if 0 <= v < len(am) and am[v] >= 0}
    present = sorted(present)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    entries = [(pal[c], class_names[c]) for c in present] + [((0, 0, 0), "ignore / unmatched")]
    ew = [18 + _text_size(probe, name, font)[0] + 14 for _, name in entries]
    lines, x = 1, pad
    for w in ew:
        if x + w > W - pad:
            lines, x = lines + 1, pad
        x += w
    legend_h = lines * 20 + 8
    H = head + n * (tile + pad) + pad + legend_h
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    for j, (name, _) in enumerate(cols):
        d.text((pad + j * (tile + pad) + 2, 5), name, fill="black", font=font)
    for i, ex in enumerate(examples):
        y = head + i * (tile + pad)
        for j, (_, key) in enumerate(cols):
            if key is None:
                arr = ex["image"]
                im = Image.fromarray(arr).resize((tile, tile), Image.BILINEAR)
            else:
                lbl = np.asarray(ex[key]).astype(np.int64)
                if key.startswith("cluster"):
                    am = amaps.get(key, amap)
                    m = np.full(lbl.shape, -1, dtype=np.int64)
                    ok = (lbl >= 0) & (lbl < len(am))
                    m[ok] = am[lbl[ok]]
                    lbl = m
                im = Image.fromarray(_colorize(lbl, pal)).resize((tile, tile), Image.NEAREST)
            img.paste(im, (pad + j * (tile + pad), y))
    x, y = pad, head + n * (tile + pad) + pad
    for (colr, name), w in zip(entries, ew):
        if x + w > W - pad:
            x, y = pad, y + 20
        d.rectangle([x, y + 3, x + 13, y + 16], fill=tuple(int(c) for c in colr), outline=(120, 120, 120))
        d.text((x + 18, y + 2), name, fill="black", font=font)
        x += w
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path)
    return path


# ==== REPORTING ====

def _nan_to_none(x):
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_nan_to_none(v) for v in x]
    return x


def _fmt(v, w=7):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a".rjust(w)
    return f"{v:{w}.2f}"


def format_table(res: dict, class_names) -> str:
    """Printed table: mIoU/Acc per probe (and CRF), then per-class IoU."""
    probes = {k: probe_results(res, k) for k in PROBES if probe_results(res, k) is not None}
    lines = [f"{'probe':<10}{'CRF':<5}{'mIoU':>8}{'Acc':>8}"]
    for k, r in probes.items():
        lines.append(f"{k.split('_')[0]:<10}{'yes' if k.endswith('crf') else 'no':<5}"
                     f"{_fmt(r['mIoU'], 8)}{_fmt(r['Acc'], 8)}")
    w = max([len(n) for n in class_names] + [13]) + 2
    lines.append("")
    lines.append("per-class IoU".ljust(w) + "".join(f"{k:>13}" for k in probes))
    for c, n in enumerate(class_names):
        lines.append(f"{n:<{w}}" + "".join(f"{_fmt(r['IoU'][c], 13)}" for r in probes.values()))
    if any("IoU_extra" in r for r in probes.values()):
        lines.append(f"{'(extra)':<{w}}" + "".join(
            _fmt(r["IoU_extra"], 13) if "IoU_extra" in r else " " * 13 for r in probes.values()))
    return "\n".join(lines)


def _selection_label(ckpt: dict, path: str) -> str:
    """ckpt['selection'] ('last' / 'best-on-val'); older checkpoints without it: from the file name."""
    if ckpt.get("selection"):
        return ckpt["selection"]
    return "best-on-val" if os.path.basename(str(path)).lower().startswith("best") else "last"


def write_outputs(res: dict, class_names, out_dir: str, meta: dict, crf: bool) -> dict:
    """<out>/metrics.json + confusion_<probe>.png + examples.png; returns the JSON dict."""
    os.makedirs(out_dir, exist_ok=True)
    C = len(class_names)
    metrics, pngs = {}, {}
    for k in PROBES:
        r = probe_results(res, k)
        if r is None:
            continue
        metrics[k] = {
            "mIoU": r["mIoU"], "Acc": r["Acc"],
            "IoU": {class_names[c]: r["IoU"][c] for c in range(C)},
            "assignment": r["assignment"],
            "confusion": r["confusion"],
        }
        if "IoU_extra" in r:
            metrics[k]["IoU_extra"] = r["IoU_extra"]
        matched = np.asarray(r["matched"])[:C]  # drop the all-zero "extra" row, if any
        col_names = list(class_names) + (["extra"] if matched.shape[1] > C else [])
        kind = {"cluster": "cluster (Hungarian-matched)", "kmeans": "k-means (Hungarian-matched)"}.get(
            k.split("_")[0], "linear")
        title = (f"{kind}{' + CRF' if k.endswith('crf') else ''}: mIoU {_fmt(r['mIoU'], 0).strip()}, "
                 f"Acc {_fmt(r['Acc'], 0).strip()}  (rows normalised, %)")
        pngs[k] = os.path.basename(plot_confusion(matched, list(class_names), col_names,
                                                  os.path.join(out_dir, f"confusion_{k}.png"), title))
    if res.get("examples"):
        pngs["examples"] = os.path.basename(plot_examples(
            res["examples"], class_names,
            {k: res[f"{k}_assignment"] for k in ("cluster", "cluster_crf") if f"{k}_assignment" in res},
            os.path.join(out_dir, "examples.png"), crf=crf))
    doc = dict(meta)
    doc.update({"crf": bool(crf), "n_images": res["n_images"], "class_names": list(class_names),
                "summary": {f"{k}/{m}": metrics[k][m] for k in metrics for m in ("mIoU", "Acc")},
                "metrics": metrics, "pngs": pngs})
    doc = _nan_to_none(doc)
    ppap.atomic_write(os.path.join(out_dir, "metrics.json"), lambda p: ppap.write_json(p, doc, indent=1))
    return doc


# ==== SUMMARIZE ====

def _flatten(d, prefix="", out=None):
    """Numeric leaves of a nested dict as {'a/b/c': float} (bools and None skipped)."""
    out = {} if out is None else out
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            _flatten(v, key + "/", out)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = float(v)
    return out


def _metrics_doc(p: str) -> dict:
    try:
        with open(p) as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        raise PPAPError(f"cannot read {p}: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("metrics"), dict):
        raise PPAPError(f"{p} is not a metrics.json of eval.py (no 'metrics' object)")
    return doc


def _flat_metrics(doc: dict, p: str) -> dict:
    flat = {}
    for probe, m in doc["metrics"].items():
        if not isinstance(m, dict):
            continue
        for key in ("mIoU", "Acc", "IoU_extra"):
            if key in m:
                flat[f"{probe}/{key}"] = float("nan") if m[key] is None else float(m[key])
        for cname, v in (m.get("IoU") or {}).items():
            flat[f"{probe}/IoU/{cname}"] = float("nan") if v is None else float(v)
    if not flat:
        raise PPAPError(f"{p} holds no metrics")
    return flat


def _run_metrics(run: str, skipped: list) -> tuple:
    """(source path, flat {metric: value}) of one run: a metrics.json given itself; else the run's complete
    evaluations of its last.pt on its own full val set (<run>/eval/*/metrics.json, the one with most probes,
    then the newest); else the final full validation in log.jsonl. What it passes over is added to `skipped`
    (one line each); (None, None) when nothing can stand for the run."""
    if run.endswith(".json"):
        return run, _flat_metrics(_metrics_doc(run), run)
    if not os.path.exists(run):
        raise PPAPError(f"run not found: {run}")
    try:
        ckpt = ppap.read_checkpoint(run)
        step, data = ckpt.get("step"), ckpt["config"].get("data")
    except PPAPError:
        step = data = None
    found, last = [], os.path.join(run, "last.pt")
    for p in [os.path.join(run, "metrics.json"), os.path.join(run, "eval", "metrics.json"),
              *sorted(glob.glob(os.path.join(run, "eval", "*", "metrics.json")))]:
        if not os.path.isfile(p):
            continue
        doc, where = _metrics_doc(p), os.path.relpath(os.path.dirname(p), run)
        if doc.get("limit"):
            skipped.append(f"{run}: {where} scores the first {doc['limit']} val images only")
        elif data is not None and doc.get("data", data) != data:
            skipped.append(f"{run}: {where} scores {doc.get('data')}, not the run's {data}")
        elif doc.get("selection", "last") != "last" or None not in (step, doc.get("step")) and doc["step"] != step:
            skipped.append(f"{run}: {where} scores {doc.get('selection')} at step {doc.get('step')}, not last.pt "
                           f"(step {step})")
        elif "step" not in doc and os.path.exists(last) and os.path.getmtime(last) > os.path.getmtime(p):
            skipped.append(f"{run}: {where} is older than last.pt: it scores an earlier checkpoint; refresh it "
                           f"with: python eval.py --run {shlex.quote(run)}")
        else:
            found.append((len(doc["metrics"]), os.path.getmtime(p), p, doc))
    if found:
        _, _, p, doc = max(found, key=lambda f: f[:2])
        return p, _flat_metrics(doc, p)
    log = os.path.join(run, "log.jsonl")
    entries = []
    if os.path.isfile(log):
        with open(log) as f:
            for line in f:
                try:
                    entries.append(json.loads(line))
                except ValueError:
                    continue  # a half-written last line
    full = [e for e in entries if isinstance(e, dict) and e.get("full") and step in (None, e.get("step"))]
    if not full:
        skipped.append(f"{run}: no full evaluation of last.pt (the periodic validations score a subset); "
                       f"evaluate it with: python eval.py --run {shlex.quote(run)}")
        return None, None
    flat = {}
    for k, v in _flatten(full[-1]).items():   # ppap.py logs 'cluster_mIoU'; metrics.json gives 'cluster/mIoU'
        for probe in sorted(PROBES, key=len, reverse=True):
            if k.startswith(probe + "_") and k[len(probe) + 1:] in ("mIoU", "Acc", "IoU_extra"):
                flat[probe + "/" + k[len(probe) + 1:]] = v
    return log, flat


def summarize(runs) -> dict:
    """Mean and sample std (ddof=1; 0 for a single run) over runs of every metric; 'skipped' says what was
    passed over and why (runs without a full evaluation of their last checkpoint count in no metric)."""
    skipped = []
    per_run = [(r, *_run_metrics(r, skipped)) for r in runs]
    per_run = [(r, src, flat) for r, src, flat in per_run if flat is not None]
    if not per_run:
        raise PPAPError("nothing to summarize: " + "; ".join(skipped))
    keys = []
    for _, _, flat in per_run:
        keys += [k for k in flat if k not in keys]
    out = {}
    for k in keys:
        vals = np.array([flat[k] for _, _, flat in per_run if k in flat], dtype=np.float64)
        vals = vals[~np.isnan(vals)]
        n = int(vals.size)
        out[k] = {"mean": float(vals.mean()) if n else float("nan"),
                  "std": float(vals.std(ddof=1)) if n > 1 else (0.0 if n == 1 else float("nan")),
                  "n": n}
    return {"runs": [r for r, _, _ in per_run], "sources": [s for _, s, _ in per_run], "skipped": skipped,
            "std": "sample standard deviation (ddof=1) over runs", "metrics": out}


def format_summary(summary: dict) -> str:
    w = max([len(k) for k in summary["metrics"]] + [6]) + 2
    lines = [f"skipped {line}" for line in summary.get("skipped", [])]
    lines += [f"{len(summary['runs'])} run(s): " + ", ".join(f"{r} ({os.path.relpath(src, r) if not r.endswith('.json') else 'itself'})"
                                                      for r, src in zip(summary["runs"], summary["sources"])),
             f"{'metric':<{w}}{'mean':>8}   {'std':>6}  n"]
    for k, v in summary["metrics"].items():
        lines.append(f"{k:<{w}}{_fmt(v['mean'], 8)} ± {_fmt(v['std'], 6)}  {v['n']}")
    return "\n".join(lines)


# ==== kNN IMAGE TABLE (STEGO-style nearest-neighbour images) ====

def _weights_tag(cfg) -> str:
    """Names the backbone weights in the cache key: the released file, or a --weights file by path,
    size and modification time (a retrained backbone under the same name gets a new table)."""
    if not cfg.weights:
        return "released" if ppap.BACKBONES[cfg.arch].weights else "random"
    if not os.path.isfile(cfg.weights):
        raise PPAPError(f"weights file not found: {cfg.weights}")
    st = os.stat(cfg.weights)
    key = f"{os.path.abspath(cfg.weights)}|{st.st_size}|{st.st_mtime_ns}"
    return "w" + hashlib.sha1(key.encode()).hexdigest()[:10]


def knn_table(cfg, split: str = "train", k: int = 7, device=None) -> str:
    """For every image of the split, its k most similar images (itself first) by the frozen backbone's
    mean-pooled, normalised final patch features; computed with ext.topk_neighbors (never the full
    similarity matrix) and cached at <data_dir>/nns/. Returns the cache path ({'indices', 'values'})."""
    size = cfg.img_size if split == "train" else cfg.val_size
    dataset = ppap.build_dataset(cfg, split)
    # the key names the images too (a changed file list or file is a new table; the demo's by its size)
    files = ppap._sources_digest(dataset.pairs) if hasattr(dataset, "pairs") else f"{type(dataset).__name__}{len(dataset)}"
    files = hashlib.sha1(files.encode()).hexdigest()[:10]
    name = f"nns_{cfg.data}_{split}_{cfg.arch}{cfg.patch}_{size}_{_weights_tag(cfg)}_{files}.pt"
    path = os.path.join(cfg.data_dir, "nns", name)
    if os.path.exists(path):
        try:
            table = torch.load(path, weights_only=True)
            if table["indices"].shape[0] == len(dataset) and table["indices"].shape[1] >= min(k + 1, len(dataset)):
                return path
        except Exception:                         # a damaged table is computed again
            pass
    from ext import topk_neighbors
    device = device or ppap.pick_device(cfg.device)
    vit = ppap.build_backbone(cfg).to(device).eval()
    amp = ppap.amp_dtype(cfg, device)
    feats = []
    with torch.no_grad(), ppap.autocast(device, amp):
        for batch in tqdm(ppap.make_loader(cfg, dataset, train=False), desc=f"kNN features ({split})",
                          dynamic_ncols=True, disable=not cfg.progress):
            img = ppap.fit_to_patch(batch["img"].to(device, non_blocking=True), vit.patch_size)
            crit = vit.features(img)[1]                  # the final patch features [B,D,h,w]
            feats.append(F.normalize(crit.permute(0, 2, 3, 1).flatten(1, 2).float().mean(1), dim=1))
    feats = torch.cat(feats)
    feats = feats.to(kernels_on(feats.device, "the kNN search"))
    values, indices = topk_neighbors(feats, feats, min(k + 1, len(feats)))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    ppap.atomic_write(path, lambda p: torch.save({"indices": indices.cpu(), "values": values.cpu()}, p))
    return path


def plot_knn(dataset, indices, path, n_queries: int = 6, k: int = 5, tile: int = 112):
    """Grid PNG: each row a query image followed by its k nearest images (similarity under each)."""
    from PIL import Image, ImageDraw
    idx, vals = indices["indices"], indices["values"]
    queries = np.linspace(0, len(idx) - 1, min(n_queries, len(idx))).round().astype(int)
    k = min(k, idx.shape[1] - 1)
    pad, head = 4, 18
    font = _font(12)
    img = Image.new("RGB", (pad + (k + 1) * (tile + pad), head + len(queries) * (tile + head)), "white")
    d = ImageDraw.Draw(img)
    d.text((pad, 3), "query", fill="black", font=font)
    d.text((pad + tile + pad, 3), f"its {k} nearest images (cosine similarity of mean DINO features)",
           fill="black", font=font)
    for r, q in enumerate(queries):
        y = head + r * (tile + head)
        for c, j in enumerate([int(q)] + idx[q, 1:k + 1].tolist()):
            rgb = ppap.to_uint8_rgb(dataset[j]["img"][None])[0].numpy()
            img.paste(Image.fromarray(rgb).resize((tile, tile), Image.BILINEAR), (pad + c * (tile + pad), y))
            if c:
                d.text((pad + c * (tile + pad) + 2, y + tile + 2), f"{float(vals[q, c]):.3f}", fill="black",
                       font=font)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path)
    return path


# ==== PROPAGATION REPORT: the paper's central claim, measured with labels ====
# The paper claims that moving the proxy anchor "gradually identifies more trustworthy positives" and that
# the ambiguity zone keeps unreliable samples out of the negatives. On labelled val images we run the loss's
# own propagation (the propagate method of the run's loss, ppap.build_loss, with its trace hook; no second
# implementation) for anchors drawn as in training (its anchors(), from a seeded generator) and count, at every step t = 0..T, how many positives,
# ambiguous samples and negatives an anchor gets and how many of them share its ground-truth label.

PATCH_LABEL_RULE = ("patch (i, j) covers the pixels [i*p, (i+1)*p) x [j*p, (j+1)*p) of the image the ViT embeds: "
                    "the val crop itself, or, where a side is not a multiple of p, the crop resized to the nearest "
                    "multiple (ppap.fit_to_patch: 320 -> 322 px at p = 14), the labels then resized alike "
                    "(each pixel takes the label under its centre); its label is the class of more "
                    "than half of those p*p pixels, else -1 (mixed or mostly unlabelled, left out of every purity)")


def patch_labels(label: torch.Tensor, patch: int, n_classes: int) -> torch.Tensor:
    """[B,H,W] pixel labels (-1 or >= n_classes: unlabelled) -> [B,h,w] patch labels by PATCH_LABEL_RULE on the
    grid the backbone sees (h = ppap.patch_grid(H, patch), for any patch and size): the class holding more than
    half of the patch's p*p pixels, else -1."""
    B, H, W = label.shape
    h, w = ppap.patch_grid(H, patch), ppap.patch_grid(W, patch)
    if (h * patch, w * patch) != (H, W):
        # the labels follow the image to the size the ViT sees (fit_to_patch): each pixel takes the label under
        # its centre, the source pixel floor((y + 1/2) * H / (h p)), in integers
        rows = (2 * torch.arange(h * patch, device=label.device) + 1) * H // (2 * h * patch)
        cols = (2 * torch.arange(w * patch, device=label.device) + 1) * W // (2 * w * patch)
        label = label[:, rows][:, :, cols]
    x = label.reshape(B, h, patch, w, patch).permute(0, 1, 3, 2, 4)
    x = x.reshape(B * h * w, patch * patch).long()
    x = torch.where((x >= 0) & (x < n_classes), x, n_classes)             # one bin for unlabelled pixels
    key = torch.arange(B * h * w, device=x.device)[:, None] * (n_classes + 1) + x
    counts = torch.bincount(key.reshape(-1), minlength=B * h * w * (n_classes + 1))
    best, cls = counts.view(B * h * w, n_classes + 1)[:, :n_classes].max(1)
    return torch.where(2 * best > patch * patch, cls, torch.full_like(cls, -1)).view(B, h, w)


# Per-step sums over anchors (float64); propagation_summary turns them into means and purities.
#   anchors, labelled_anchors      anchors, and those with a label
#   no_positive                    anchors with an empty positive set (the loss skips them)
#   pos / amb / neg                set sizes, every sample counted (the anchor itself is in none)
#   *_labelled                     pairs in the set where anchor and sample both have a label
#   pos_same, amb_same, neg_diff   of those, pairs with the same label (positives, ambiguous) or a different one
#   phi, psi                       sums of the boundaries Phi_t, Psi_t
#   pairs_labelled, pairs_same     every labelled (anchor, other sample) pair, and those with the same label:
#                                  the purity a random set would have
PROP_SUMS = ("anchors", "labelled_anchors", "no_positive", "pos", "pos_labelled", "pos_same", "amb",
             "amb_labelled", "amb_same", "neg", "neg_labelled", "neg_diff", "phi", "psi", "pairs_labelled",
             "pairs_same")


@torch.no_grad()
def propagation_sums(f: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor, criterion,
                     chunk_elems: int = 2 ** 24, groups: torch.Tensor | None = None) -> dict:
    """f [N,D] features (normalised here, as the loss does), labels [N] patch labels (-1: none), rows [a]
    anchor rows, criterion: the loss (ppap.build_loss) whose propagate() decides the sets -> {name in PROP_SUMS:
    float64 tensor [T+1]} over the anchors, one entry per step the trace records. groups [a] (ids 0..G-1):
    the sums of each group of anchors instead, [G, T+1] (the threshold sweep's per-class view). Anchors go
    through the criterion in chunks of about chunk_elems similarities (memory O(chunk))."""
    f = F.normalize(f.detach().float(), dim=1)
    labels = labels.to(f.device).long()
    grouped = groups is not None
    groups = groups.cpu().long() if grouped else torch.zeros(len(rows), dtype=torch.long)
    n_groups = int(groups.max()) + 1 if grouped and len(groups) else 1
    sums = None
    has_label = labels >= 0
    per_chunk = max(1, chunk_elems // max(1, f.shape[0]))
    for s in range(0, len(rows), per_chunk):
        r = rows[s:s + per_chunk].to(f.device)
        group = groups[s:s + per_chunk]
        trace = []
        criterion.propagate(f, r, trace=trace)
        if sums is None:
            sums = {k: torch.zeros(n_groups, len(trace), dtype=torch.float64) for k in PROP_SUMS}
        la = labels[r]
        others = ppap.not_anchor(r, f.shape[0])
        labelled = has_label[None, :] & (la >= 0)[:, None] & others              # [a,N]
        same = labelled & (labels[None, :] == la[:, None])
        for t, st in enumerate(trace):
            pos, neg = st["pos"], st["neg"]
            amb = others & ~pos & ~neg
            per_anchor = {"anchors": torch.ones_like(la), "labelled_anchors": la >= 0, "no_positive": ~pos.any(1),
                          "pos": pos.sum(1), "pos_labelled": (pos & labelled).sum(1), "pos_same": (pos & same).sum(1),
                          "amb": amb.sum(1), "amb_labelled": (amb & labelled).sum(1), "amb_same": (amb & same).sum(1),
                          "neg": neg.sum(1), "neg_labelled": (neg & labelled).sum(1),
                          "neg_diff": (neg & labelled & ~same).sum(1), "phi": st["phi"][:, 0], "psi": st["psi"][:, 0],
                          "pairs_labelled": labelled.sum(1), "pairs_same": same.sum(1)}
            for k, v in per_anchor.items():
                sums[k][:, t].index_add_(0, group, v.double().cpu())
    if sums is None:
        sums = {k: torch.zeros(n_groups, 0, dtype=torch.float64) for k in PROP_SUMS}
    return sums if grouped else {k: v[0] for k, v in sums.items()}


def _pct(num: float, den: float):
    return 100.0 * num / den if den > 0 else None


def propagation_summary(sums: dict) -> dict:
    """PROP_SUMS sums -> {'chance_purity': %, 'steps': [per t: Phi_t, Psi_t (means), positives, ambiguous,
    negatives (mean set sizes per anchor), positive_purity, ambiguous_purity (% of labelled members sharing
    the anchor's label), negative_purity (% of labelled negatives with another label), no_positive_anchors
    (%)]}. Purities pool all labelled (anchor, sample) pairs; None where a set has no labelled member."""
    s = {k: v.tolist() for k, v in sums.items()}
    steps = []
    for t in range(len(s["anchors"])):
        n = s["anchors"][t]
        mean = (lambda k: s[k][t] / n) if n else (lambda k: None)
        steps.append({"t": t, "phi": mean("phi"), "psi": mean("psi"), "positives": mean("pos"),
                      "positive_purity": _pct(s["pos_same"][t], s["pos_labelled"][t]),
                      "ambiguous": mean("amb"), "ambiguous_purity": _pct(s["amb_same"][t], s["amb_labelled"][t]),
                      "negatives": mean("neg"), "negative_purity": _pct(s["neg_diff"][t], s["neg_labelled"][t]),
                      "no_positive_anchors": _pct(s["no_positive"][t], n)})
    return {"chance_purity": _pct(s["pairs_same"][0], s["pairs_labelled"][0]) if s["anchors"] else None,
            "steps": steps}


FEATURE_SETS = {
    "criterion": "the criterion branch: the frozen backbone's final-block features, normalised, exactly what "
                 "Phi_0/Psi_0 act on in training; it does not depend on training, so it is the same for every "
                 "run with this backbone (eval mode: without the training's Dropout2d)",
    "z": "the run's trained projection z (unit rows), the space the contrastive loss pulls positives together "
         "in: the same boundaries applied there show what training changed where the loss acts (they were "
         "set for the criterion's similarities, so set sizes differ too)",
    "code": "the run's trained code (head output, normalised): what the probes and k-means segment",
}


def _rows_of(out: dict, name: str) -> torch.Tensor:
    """One feature set of a forward pass as [N,D] rows in the loss's order (image, then row-major patches)."""
    if name == "z":
        return out["z"]
    x = out["crit" if name == "criterion" else name]
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


@torch.no_grad()
def propagation_report(model, loader, device, criterion, *, seed: int = 0, trained: str = "z",
                       amp: torch.dtype | None = None, n_shown: int = 4, progress: bool = True) -> tuple[dict, dict | None]:
    """Propagation statistics over the loader's batches for the criterion features and the trained ones.

    Each batch is one set of contrast samples (N = B*h*w rows, as a training batch); its anchors are drawn
    by criterion.anchors (the loss's own draw) from one torch.Generator seeded `seed` (the same rows for both
    feature sets), and criterion.propagate decides the sets. -> (report dict, figure data from the first
    batch for plot_propagation)."""
    device = torch.device(device)
    g = torch.Generator().manual_seed(seed)
    names = ("criterion", trained)
    sums = {k: None for k in names}
    n_images = n_skipped = n_batches = n_anchors = 0
    grid, figure = None, None
    with ppap.evaluating(model):                  # no Dropout2d on the criterion features
        for batch in tqdm(loader, desc="propagation", leave=False, dynamic_ncols=True, disable=not progress):
            img, label = ppap._unpack_batch(batch)
            img = img.to(device, non_blocking=True)
            with ppap.autocast(device, amp):
                out = model(img)
            out = {k: v.float() for k, v in out.items()}
            B, _, h, w = out["crit"].shape
            rows = criterion.anchors(B * h * w, g)
            if rows.numel() == 0:                 # a short last batch has no full anchor group
                n_skipped += B
                continue
            grid, n_anchors = (h, w), rows.shape[1]
            rows = rows.reshape(-1).to(device)
            labels = patch_labels(label.to(device).long(), model.patch_size, int(model.n_classes)).reshape(-1)
            for k in names:
                got = propagation_sums(_rows_of(out, k), labels, rows, criterion)
                sums[k] = got if sums[k] is None else {q: sums[k][q] + v for q, v in got.items()}
            if figure is None:
                figure = _figure_data(img, labels.view(B, h, w), rows, _rows_of(out, "criterion"), criterion, n_shown)
            n_images += B
            n_batches += 1
    if n_batches == 0:
        raise PPAPError("no batch has a full anchor group; raise --batch-size")
    report = {"n_images": n_images, "skipped_images": n_skipped, "batches": n_batches, "grid": list(grid),
              "anchors_seed": seed, "anchors_per_group": n_anchors,
              "n_anchors": int(sums["criterion"]["anchors"][0]),
              "n_labelled_anchors": int(sums["criterion"]["labelled_anchors"][0]),
              "hyper": ppap.loss_hyper(criterion.cfg), "patch_label_rule": PATCH_LABEL_RULE,
              "feature_sets": {k: {"description": FEATURE_SETS[k], **propagation_summary(sums[k]),
                                   "sums": {q: v.tolist() for q, v in sums[k].items()}} for k in names}}
    return report, figure


def _figure_data(img, labels, rows, f, criterion, n_shown, max_images=6):
    """The first batch's picture: up to n_shown labelled anchors among the first images, in the drawn order,
    preferring anchors with positives at T and distinct classes, with their positives at t = 0 and t = T and
    their ambiguity zone at T, from the criterion features through the loss's propagate trace."""
    B, h, w = labels.shape
    shown_images = min(B, max_images)
    flat = labels.reshape(-1)
    cand = [int(r) for r in rows.tolist() if int(r) // (h * w) < shown_images and int(flat[r]) >= 0]
    if not cand:
        return None
    trace = []
    criterion.propagate(F.normalize(f.float(), dim=1), torch.tensor(cand, device=f.device), trace=trace)
    has_pos = trace[-1]["pos"].any(1).tolist()
    picked, classes = [], set()
    for want_new_class in (True, False):
        for i, r in enumerate(cand):
            if len(picked) < n_shown and has_pos[i] and i not in picked and \
                    (int(flat[r]) not in classes or not want_new_class):
                picked.append(i)
                classes.add(int(flat[r]))
    picked += [i for i in range(len(cand)) if i not in picked][:n_shown - len(picked)]
    first, last = trace[0], trace[-1]
    sel = torch.tensor(picked, device=first["pos"].device)
    return {"images": ppap.to_uint8_rgb(img[:shown_images]).cpu().numpy(), "labels": labels[:shown_images].cpu(),
            "anchors": [cand[i] for i in picked], "grid": (h, w), "T": len(trace) - 1,
            "pos0": first["pos"][sel].cpu(), "posT": last["pos"][sel].cpu(),
            "ambT": (~last["pos"] & ~last["neg"])[sel].cpu(), "labels_all": flat.cpu()}


_PROP_COLOURS = {"kept": (40, 200, 60), "gained": (30, 120, 255), "lost": (235, 40, 200),
                 "ambiguous": (255, 200, 0), "anchor": (255, 0, 0)}


def plot_propagation(fig: dict, class_names, path: str, tile: int = 120) -> str:
    """PNG: for each shown anchor two rows over the first images of the batch: (1) the image dimmed, with
    the anchor's positives kept from t = 0 to T (green), gained by propagation (blue), lost (magenta), its
    ambiguity zone at T (yellow) and the anchor (red box); (2) the patch labels: patches with the anchor's
    label bright, other labels dark, patches without a label black. Criterion features, eval mode."""
    from PIL import Image, ImageDraw
    images, (h, w), n_img, T = fig["images"], fig["grid"], len(fig["images"]), fig["T"]
    font = _font(12)
    pad, left, head = 4, 230, 40
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    title = (f"Proxy anchor propagation on the criterion features (frozen backbone, eval mode): positives at "
             f"t = 0 and t = T = {T}, ambiguity zone at T")
    foot = ("Top row per anchor: the batch's first images, dimmed, with the anchor's sets. Bottom row: patch "
            "labels (bright = the anchor's label, dark = another, black = no label).")
    legend = (("kept", "positive at t = 0 and T"), ("gained", f"gained by t = {T}"), ("lost", "positive at t = 0 only"),
              ("ambiguous", "ambiguity zone at T"), ("anchor", "anchor"))
    legend_w = sum(22 + _text_size(probe, label, font)[0] for _, label in legend)
    W = max(left + n_img * (tile + pad) + pad, 2 * pad + max(_text_size(probe, t, font)[0] for t in (title, foot)),
            2 * pad + legend_w)
    H = head + len(fig["anchors"]) * (2 * (tile + pad) + 10) + 24
    canvas = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(canvas)
    d.text((pad, 4), title, fill="black", font=font)
    x = pad
    for key, label in legend:
        d.rectangle([x, 22, x + 11, 33], fill=_PROP_COLOURS[key])
        d.text((x + 15, 21), label, fill="black", font=font)
        x += 22 + _text_size(d, label, font)[0]
    labels_all, hw = fig["labels_all"], h * w
    Hi, Wi = images.shape[1:3]
    # patch grid -> pixels: the patch under each pixel's centre (y // p when Hi = h * p; 320 px on 23 patches too)
    up = lambda a: a[(2 * np.arange(Hi) + 1) * h // (2 * Hi)][:, (2 * np.arange(Wi) + 1) * w // (2 * Wi)]
    for ai, r in enumerate(fig["anchors"]):
        y0 = head + ai * (2 * (tile + pad) + 10)
        lab = int(labels_all[r])
        name = class_names[lab] if 0 <= lab < len(class_names) else str(lab)
        p0, pT, zT = fig["pos0"][ai], fig["posT"][ai], fig["ambT"][ai]

        def purity(m):
            m = m & (labels_all >= 0)
            return f"{100.0 * float((labels_all[m] == lab).sum()) / int(m.sum()):.0f}% same label" if m.any() else "n/a"
        text = [f"anchor {ai + 1}: '{name}'", f"image {r // hw + 1}, patch ({(r % hw) // w}, {r % w})",
                f"t = 0: {int(p0.sum())} positives ({purity(p0)})", f"t = {T}: {int(pT.sum())} positives ({purity(pT)})",
                f"ambiguity zone: {int(zT.sum())} ({purity(zT)})", "(counts over the whole batch)"]
        for i, t in enumerate(text):
            d.text((pad, y0 + 4 + 15 * i), t, fill="black", font=font)
        d.text((pad, y0 + tile + pad + 4), "patch labels", fill=(80, 80, 80), font=font)
        for b in range(n_img):
            sl = slice(b * hw, (b + 1) * hw)
            over = np.zeros((h, w, 3), np.float32)
            alpha = np.zeros((h, w, 1), np.float32)
            for m, key in ((zT[sl], "ambiguous"), (p0[sl] & ~pT[sl], "lost"), (~p0[sl] & pT[sl], "gained"),
                           (p0[sl] & pT[sl], "kept")):
                m = m.view(h, w).numpy()
                over[m], alpha[m] = _PROP_COLOURS[key], 0.65
            sets = images[b] * 0.45 * (1 - up(alpha)) + up(over) * up(alpha)
            lab_grid = fig["labels"][b].numpy()
            bright = np.where(lab_grid == lab, 1.0, np.where(lab_grid >= 0, 0.25, 0.0))[..., None]
            xb = left + b * (tile + pad)
            for yy, arr in ((y0, sets), (y0 + tile + pad, images[b] * up(bright))):
                canvas.paste(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).resize((tile, tile), Image.NEAREST),
                             (xb, yy))
            if r // hw == b:                          # the anchor: a red box with a white rim
                py, px = (r % hw) // w, r % w
                sy, sx = tile / h, tile / w
                box = [xb + px * sx - 2, y0 + py * sy - 2, xb + (px + 1) * sx + 1, y0 + (py + 1) * sy + 1]
                d.rectangle([box[0] - 1, box[1] - 1, box[2] + 1, box[3] + 1], outline="white", width=1)
                d.rectangle(box, outline=_PROP_COLOURS["anchor"], width=2)
    d.text((pad, H - 18), foot, fill=(80, 80, 80), font=font)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path)
    return path


def format_propagation(report: dict) -> str:
    """The printed table: one block per feature set, one line per step t."""
    lines = [f"{report['n_images']} val images in {report['batches']} batch(es) of {report['batch_size']} "
             f"({report['grid'][0]}x{report['grid'][1]} patches each), {report['n_anchors']} anchors "
             f"({report['n_labelled_anchors']} labelled; {report['anchors_per_group']} per group, seed "
             f"{report['anchors_seed']})",
             "  ".join(f"{k} {v}" for k, v in report["hyper"].items()) + f"  ({report['hyper_source']})",
             "set sizes: mean per anchor over the batch's patches; purity: % of labelled members with the "
             "anchor's label (negatives: with another label)"]
    for name, fs in report["feature_sets"].items():
        lines += ["", f"[{name}] {fs['description']}",
                  f"  chance purity (a random set): {_fmt(fs['chance_purity'], 0).strip()}%",
                  f"  {'t':>2} {'Phi_t':>7} {'Psi_t':>7} {'positives':>10} {'purity':>7} {'ambiguous':>10} "
                  f"{'purity':>7} {'negatives':>10} {'purity':>7} {'no pos.':>8}"]
        for st in fs["steps"]:
            lines.append(f"  {st['t']:>2} {st['phi']:>7.3f} {st['psi']:>7.3f} "
                         f"{_fmt(st['positives'], 10)} {_fmt(st['positive_purity'], 7)} "
                         f"{_fmt(st['ambiguous'], 10)} {_fmt(st['ambiguous_purity'], 7)} "
                         f"{_fmt(st['negatives'], 10)} {_fmt(st['negative_purity'], 7)} "
                         f"{_fmt(st['no_positive_anchors'], 7)}%")
    return "\n".join(lines)


def _check_a_group_fits(args, cfg, loader) -> None:
    """Before any forward pass: a batch of val images must hold one anchor group."""
    images = min(args.batch_size, len(loader.dataset))
    per_batch = images * ppap.patch_grid(cfg.val_size, cfg.patch) ** 2
    if per_batch < cfg.group:
        raise PPAPError(f"a batch of {images} val images has {per_batch} patches, fewer than one anchor group "
                        f"({cfg.group}); raise --batch-size (or --limit)")


def _propagation_cli(args) -> int:
    t0 = time.time()
    device = ppap.pick_device(args.device)
    model, cfg, info, loader, names = _target_and_data(args)
    _check_a_group_fits(args, cfg, loader)
    out_dir = _out_dir(args, info, "propagation", cfg, f"seed{args.anchors_seed}", args.trained_features)
    with output_folder(out_dir) as tmp:
        report, png = _propagation_into(tmp, args, t0, device, model, cfg, info, loader, names)
    print(f"{info['kind']} {info['checkpoint']} ({info['selection']}) on {cfg.data} val, device {device}")
    print(format_propagation(report))
    path = os.path.join(out_dir, "propagation.json")
    print(f"wrote {path}" + (f" and {os.path.join(out_dir, png)}" if png else ""))
    return 0


def _propagation_into(tmp, args, t0, device, model, cfg, info, loader, names):
    """_propagation_cli's work, its files written into `tmp` -> (report, figure file name or None)."""
    report, fig = propagation_report(model.to(device), loader, device, ppap.build_loss(cfg), seed=args.anchors_seed,
                                     trained=args.trained_features, amp=ppap.amp_dtype(cfg, device))
    png = os.path.basename(plot_propagation(fig, names, os.path.join(tmp, "propagation.png"))) if fig else None
    report.update({
        "checkpoint": os.path.abspath(info["checkpoint"]), "kind": info["kind"], "selection": info["selection"],
        "data": cfg.data, "limit": args.limit or None, "batch_size": args.batch_size,
        "hyper_source": "the run's config" if info["kind"] == "run"
        else f"the {cfg.data} preset for {cfg.arch}/{cfg.patch} (ppap.PRESETS)",
        "mode": "eval (no Dropout2d on the criterion features)",
        "figure": png, "git_commit": ppap.git_commit(), "device": str(device),
        "torch": torch.__version__, "seconds": round(time.time() - t0, 2)})
    ppap.atomic_write(os.path.join(tmp, "propagation.json"), lambda p: ppap.write_json(p, _nan_to_none(report), indent=1))
    return report, png


# ==== THRESHOLD SWEEP: Phi_0 and Psi_0 on the frozen features, before any training ====
# Phi_0 and Psi_0 are absolute cosine thresholds on the criterion features, and those come from the frozen
# backbone alone: the positive sets a threshold pair produces, and how pure they are, can be measured before
# a run, from a weights file, and put next to another backbone's on one scale (the similarity quantiles). The
# sweep computes each batch's criterion features once, draws its anchors once (the loss's anchors()), and runs
# the loss's own propagate through propagation_sums for every grid value: ppap.build_loss of the config with
# the swept Phi_0/Psi_0 substituted, so a fork's rule is swept by its own code.

SWEEP_PHI0 = "0.3:0.95:0.05"      # the default grid of Phi_0 (start:stop:step, stop included)
SIM_QUANTILES = (0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)
SIM_BINS = 4000                   # the cosine histogram's bins on [-1, 1]: quantiles to within 0.0005


def float_list(text: str) -> list[float]:
    """An argparse type: 'a,b,c' or 'start:stop:step' (stop included) -> finite floats rounded to 4 decimals,
    sorted, without repeats."""
    try:
        if ":" in text:
            start, stop, step = (float(v) for v in text.split(":"))
            if not step > 0:
                raise argparse.ArgumentTypeError(f"the step of {text!r} must be positive")
            values = [start + i * step for i in range(int(math.floor((stop - start) / step + 1e-9)) + 1)]
        else:
            values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers as a,b,c or start:stop:step, got {text!r}") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected finite numbers as a,b,c or start:stop:step, got {text!r}")
    return sorted({round(v, 4) for v in values})


float_list.__name__ = "list of numbers"


def sweep_grid(cfg, phi0s, gaps) -> list[dict]:
    """The sweep's rows: every (Phi_0, gap) pair of the grid with Psi_0 = Phi_0 - gap, and the config's own pair
    (marked 'preset', with the values exactly as the config holds them), sorted by gap, then Phi_0."""
    own = (round(cfg.phi0, 4), round(cfg.phi0 - cfg.psi0, 4))
    pairs = {(round(g, 4), round(p, 4)) for p in phi0s for g in gaps} | {own[::-1]}
    return [{"phi0": cfg.phi0 if (p, g) == own else p, "psi0": cfg.psi0 if (p, g) == own else round(p - g, 4),
             "gap": g, "preset": (p, g) == own} for g, p in sorted(pairs)]


def criterion_rows(backbone, img: torch.Tensor, device, amp: torch.dtype | None = None):
    """Normalised images [B,3,H,W] -> (the criterion features as the loss receives them: [B*h*w, D] rows, image
    by image, patches row-major, float32, not yet normalised (the loss normalises them); (h, w)). As in
    PPAP.forward, the image is resized to the patch grid (ppap.fit_to_patch) and the frozen backbone's features
    are taken, in eval mode: no criterion dropout."""
    x = ppap.fit_to_patch(img.to(device, non_blocking=True), backbone.patch_size)
    with torch.no_grad(), ppap.autocast(device, amp):
        crit = backbone.features(x)[1]
    crit = crit.float()
    return crit.permute(0, 2, 3, 1).reshape(-1, crit.shape[1]), tuple(crit.shape[-2:])


def similarity_histogram(f: torch.Tensor, rows: torch.Tensor, bins: int = SIM_BINS,
                         chunk_elems: int = 2 ** 24) -> torch.Tensor:
    """The cosines between each anchor row and every other row of f (unit rows), counted in `bins` equal bins
    on [-1, 1] -> float64 [bins]."""
    hist = torch.zeros(bins, dtype=torch.float64)
    per_chunk = max(1, chunk_elems // max(1, f.shape[0]))
    for s in range(0, len(rows), per_chunk):
        r = rows[s:s + per_chunk]
        sim = (f[r] @ f.T)[ppap.not_anchor(r, f.shape[0])]
        hist += torch.histc(sim.clamp(-1, 1), bins=bins, min=-1, max=1).double().cpu()
    return hist


def histogram_quantiles(hist: torch.Tensor, qs=SIM_QUANTILES) -> dict:
    """Quantiles of the values counted by a histogram of equal bins on [-1, 1], linear within a bin ->
    {'q50': value, ...} (None for an empty histogram)."""
    total = float(hist.sum())
    cdf = hist.cumsum(0).tolist()
    width = 2.0 / len(hist)
    out = {}
    for q in qs:
        if total <= 0:
            out[f"q{round(100 * q)}"] = None
            continue
        target = q * total
        i = next(i for i, c in enumerate(cdf) if c >= target)
        before = cdf[i - 1] if i else 0.0
        out[f"q{round(100 * q)}"] = -1.0 + width * (i + (target - before) / max(float(hist[i]), 1e-300))
    return out


def sweep_sums(f: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor, criteria, per_class: bool = False) -> list:
    """propagation_sums of each criterion for the same features f (the rows of one batch), patch labels and
    anchor rows, with 'pos_share', 'amb_share', 'neg_share' added: the set sizes divided by the batch's rows
    (summed over anchors, as the sizes are). per_class: also the sums of the anchors of each label (-1: the
    unlabelled ones) -> per criterion {'all': sums, 'by_class': {label: sums}} ('by_class' empty without
    per_class; 'all' is their sum)."""
    anchor_labels = labels.to(rows.device)[rows].cpu() if per_class else None
    out = []
    for criterion in criteria:
        if per_class:                             # group g = label + 1: group 0 holds the unlabelled anchors
            grouped = propagation_sums(f, labels, rows, criterion, groups=anchor_labels + 1)
            parts = {g - 1: {k: v[g] for k, v in grouped.items()} for g in range(len(grouped["anchors"]))
                     if grouped["anchors"][g].sum() > 0}
            total = {k: v.sum(0) for k, v in grouped.items()}
        else:
            parts, total = {}, propagation_sums(f, labels, rows, criterion)
        for sums in (total, *parts.values()):
            for k in ("pos", "amb", "neg"):
                sums[f"{k}_share"] = sums[k] / f.shape[0]
        out.append({"all": total, "by_class": parts})
    return out


def sweep_row(sums: dict) -> dict:
    """Sweep sums of one grid row (sweep_sums, added over batches) -> its reported values after the last step
    T, and the positive share at t = 0 (the share of anchor-patch pairs above Phi_0): shares in % of the batch's
    patches; no_positive in % of anchors; purities in % (None where no member is labelled)."""
    steps = propagation_summary(sums)["steps"]
    n = float(sums["anchors"][-1]) if len(sums["anchors"]) else 0.0
    share = lambda k, t: 100.0 * float(sums[k][t]) / n if n else None
    first, last = steps[0] if steps else {}, steps[-1] if steps else {}
    pairs = float(sums["pairs_labelled"][0]) if n else 0.0
    return {"anchors": int(n), "labelled_anchors": int(sums["labelled_anchors"][-1]) if n else 0,
            "positive_share_t0": share("pos_share", 0), "positive_share": share("pos_share", -1),
            "ambiguous_share": share("amb_share", -1), "negative_share": share("neg_share", -1),
            "no_positive": last.get("no_positive_anchors"), "positives": last.get("positives"),
            "ambiguous": last.get("ambiguous"), "negatives": last.get("negatives"), "phi_T": last.get("phi"),
            "psi_T": last.get("psi"), "positive_purity_t0": first.get("positive_purity"),
            "positive_purity": last.get("positive_purity"), "ambiguous_purity": last.get("ambiguous_purity"),
            "negative_purity": last.get("negative_purity"),
            "chance_purity": _pct(float(sums["pairs_same"][0]), pairs) if n else None}


@torch.no_grad()
def threshold_sweep(backbone, loader, device, cfg, grid: list, n_classes: int, *, seed: int = 0,
                    amp: torch.dtype | None = None, per_class: bool = False, progress: bool = True) -> dict:
    """The sets every grid row (sweep_grid) gives on the loader's batches, from the frozen backbone's criterion
    features alone. Each batch is one set of contrast samples, as a training batch is; its anchors are drawn
    once by the loss's anchors() from one generator seeded `seed` and shared by every row, as are its features.
    -> {'n_images', 'batches', 'grid', 'patches_per_batch', 'n_anchors', 'n_labelled_anchors',
    'similarity_quantiles', 'chance_purity', 'rows': grid rows with sweep_row's values and their 'sums',
    'by_class': {label: [sweep_row per grid row]} (per_class)}."""
    device = torch.device(device)
    base = ppap.build_loss(cfg)
    criteria = [ppap.build_loss(dataclasses.replace(cfg, phi0=r["phi0"], psi0=r["psi0"])) for r in grid]
    g = torch.Generator().manual_seed(seed)
    totals, hist = None, torch.zeros(SIM_BINS, dtype=torch.float64)
    n_images = n_skipped = n_batches = 0
    patches, hw = [], None
    with ppap.evaluating(backbone):
        for batch in tqdm(loader, desc="threshold sweep", leave=False, dynamic_ncols=True, disable=not progress):
            img, label = ppap._unpack_batch(batch)
            f, hw = criterion_rows(backbone, img, device, amp)
            rows = base.anchors(f.shape[0], g)
            if rows.numel() == 0:                     # a short last batch has no full anchor group
                n_skipped += img.shape[0]
                continue
            rows = rows.reshape(-1).to(device)
            labels = patch_labels(label.to(device).long(), backbone.patch_size, n_classes).reshape(-1)
            hist += similarity_histogram(F.normalize(f, dim=1), rows)
            got = sweep_sums(f, labels, rows, criteria, per_class)
            if totals is None:
                totals = got
            else:
                for tot, new in zip(totals, got):
                    tot["all"] = {k: tot["all"][k] + v for k, v in new["all"].items()}
                    for c, sums in new["by_class"].items():
                        old = tot["by_class"].get(c)
                        tot["by_class"][c] = sums if old is None else {k: old[k] + v for k, v in sums.items()}
            patches.append(f.shape[0])
            n_images += img.shape[0]
            n_batches += 1
    if n_batches == 0:
        raise PPAPError("no batch has a full anchor group; raise --batch-size")
    rows_out = [{**r, **sweep_row(t["all"]), "sums": {k: v.tolist() for k, v in t["all"].items()}}
                for r, t in zip(grid, totals)]
    report = {"n_images": n_images, "skipped_images": n_skipped, "batches": n_batches, "grid": list(hw),
              "patches_per_batch": max(patches), "anchors_per_group": cfg.group // cfg.trainpatchsplit,
              "n_anchors": rows_out[0]["anchors"], "n_labelled_anchors": rows_out[0]["labelled_anchors"],
              "similarity_quantiles": histogram_quantiles(hist), "chance_purity": rows_out[0]["chance_purity"],
              "rows": rows_out}
    if per_class:
        labels_seen = sorted({c for t in totals for c in t["by_class"]})
        report["by_class"] = {c: [sweep_row(t["by_class"][c]) if c in t["by_class"] else None for t in totals]
                              for c in labels_seen}
    return report


def _pct_cell(v, digits: int = 1, unit: str = " %") -> str:
    return "—" if v is None else f"{v:.{digits}f}{unit}"


SWEEP_COLUMNS = (("positive_share_t0", "positives t=0", 2), ("positive_share", "positives t=T", 2),
                 ("no_positive", "no positive", 1), ("ambiguous_share", "ambiguous t=T", 2),
                 ("positive_purity", "positive purity", 1), ("ambiguous_purity", "ambiguous purity", 1),
                 ("negative_purity", "negative purity", 1))


def format_sweep(report: dict, class_names=None) -> str:
    """The sweep as Markdown (printed, and written to sweep.md): what was measured, the similarity quantiles,
    one table row per grid row (the preset's marked), and with per-class sums the positives' purity and share
    per class of the anchor."""
    q = report["similarity_quantiles"]
    T = report["hyper"]["prop_iter"]
    lines = [f"# Threshold sweep: {report['backbone']} on {report['data']} val",
             "",
             f"Criterion features of the frozen backbone ({report['weights']}; eval mode), {report['n_images']} val "
             f"images at {report['val_size']} px ({report['grid'][0]}x{report['grid'][1]} patches), in "
             f"{report['batches']} batch(es) of up to {report['patches_per_batch']} patches; {report['n_anchors']} "
             f"anchors ({report['n_labelled_anchors']} labelled), drawn as in training (seed "
             f"{report['anchors_seed']}). The loss's own propagation, T = {T}: "
             + ", ".join(f"{k} {v}" for k, v in report["hyper"].items() if k not in ("phi0", "psi0")) + ".",
             f"Thresholds of {report['thresholds_from']}: Phi0 {report['preset']['phi0']}, Psi0 "
             f"{report['preset']['psi0']} (the row marked **preset**).",
             "",
             "Patch-pair cosine quantiles (each anchor against every other patch of its batch): "
             + " | ".join(f"{k[1:]}% {'—' if v is None else f'{v:.3f}'}" for k, v in q.items()),
             "",
             "Shares are % of the batch's patches (positives, ambiguous) or of the anchors (no positive); purity: "
             "% of the labelled members with the anchor's label (negatives: with another label). Chance purity "
             f"(a random set): {_pct_cell(report['chance_purity'])}.",
             "",
             "| Phi0 | Psi0 | " + " | ".join(c[1] for c in SWEEP_COLUMNS) + " |",
             "|---" * (2 + len(SWEEP_COLUMNS)) + "|"]
    for r in report["rows"]:
        phi = f"**{r['phi0']:g}** preset" if r["preset"] else f"{r['phi0']:g}"
        lines.append(f"| {phi} | {r['psi0']:g} | " + " | ".join(_pct_cell(r[k], d) for k, _, d in SWEEP_COLUMNS) + " |")
    if report.get("by_class"):
        first_gap = report["rows"][0]["gap"]
        cols = [i for i, r in enumerate(report["rows"]) if r["gap"] == first_gap]
        lines += ["", f"Per class of the anchor, t = T (gap Phi0 - Psi0 = {first_gap:g}): positive purity, and in "
                      "brackets the positive share (% of the batch's patches); chance: the class's share of the "
                      "labelled patches.", "",
                  "| class | anchors | chance | " + " | ".join(
                      f"Phi0 {report['rows'][i]['phi0']:g}" + (" (preset)" if report["rows"][i]["preset"] else "")
                      for i in cols) + " |",
                  "|---" * (3 + len(cols)) + "|"]
        for c, per_row in report["by_class"].items():
            c = int(c)
            if c < 0:                                 # unlabelled anchors: in the JSON only
                continue
            name = class_names[c] if class_names and c < len(class_names) else str(c)
            first = next(r for r in per_row if r is not None)
            lines.append(f"| {name} | {first['anchors']} | {_pct_cell(first['chance_purity'])} | " + " | ".join(
                f"{_pct_cell(per_row[i]['positive_purity'])} ({_pct_cell(per_row[i]['positive_share'], 2, '')})"
                if per_row[i] is not None else "—" for i in cols) + " |")
    return "\n".join(lines)


_SWEEP_COLOURS = {"positives": (30, 160, 60), "positives t=0": (150, 210, 150), "ambiguous": (230, 150, 0),
                  "negatives": (40, 90, 220), "no positive": (220, 40, 40), "chance": (130, 130, 130),
                  "preset": (200, 0, 160)}


def plot_sweep(report: dict, path: str, width: int = 820, panel_h: int = 230) -> str:
    """PNG, two panels against Phi0 (the rows of the first gap): the purities after T steps (positives,
    ambiguity zone, negatives, and chance as a dashed line) and the shares (positives at t = 0 and at T and
    the ambiguity zone in % of the batch's patches, anchors without a positive in % of anchors); the preset's
    Phi0 as a dashed vertical line."""
    from PIL import Image, ImageDraw
    gap = report["rows"][0]["gap"]
    rows = [r for r in report["rows"] if r["gap"] == gap]
    xs = [r["phi0"] for r in rows]
    font, tfont = _font(12), _font(14)
    left, right, top, between, bottom = 60, 190, 46, 56, 44
    H = top + 2 * panel_h + between + bottom
    img = Image.new("RGB", (width, H), "white")
    d = ImageDraw.Draw(img)
    title = (f"Threshold sweep: {report['backbone']} on {report['data']} val, criterion features, T = "
             f"{report['hyper']['prop_iter']}, Psi0 = Phi0 - {gap:g}")
    d.text((left, 8), title, fill="black", font=tfont)
    x0, x1 = left, width - right
    lo, hi = min(xs), max(xs)
    pad = 0.03 * (hi - lo) if hi > lo else 0.05
    lo, hi = lo - pad, hi + pad
    X = lambda v: x0 + (v - lo) / (hi - lo) * (x1 - x0)
    shares = [v for r in rows for v in (r["positive_share_t0"], r["positive_share"], r["ambiguous_share"],
                                        r["no_positive"]) if v is not None]
    top_share = max(shares + [1e-9]) * 1.08
    nice = next(m * 10 ** e for e in range(-4, 4) for m in (1, 2, 2.5, 5) if m * 10 ** e >= top_share)
    panels = [("purity after T steps (%)", 0.0, 100.0,
               [("positives", "positive_purity"), ("ambiguous", "ambiguous_purity"), ("negatives", "negative_purity")]),
              ("share (%): positives and ambiguity zone of the batch's patches (t = T unless marked), anchors "
               "without a positive", 0.0, nice,
               [("positives t=0", "positive_share_t0"), ("positives", "positive_share"),
                ("ambiguous", "ambiguous_share"), ("no positive", "no_positive")])]
    for k, (name, ylo, yhi, series) in enumerate(panels):
        y0 = top + k * (panel_h + between)
        y1 = y0 + panel_h
        Y = lambda v: y1 - (v - ylo) / (yhi - ylo) * (y1 - y0)
        d.text((x0, y0 - 18), name, fill="black", font=font)
        d.rectangle([x0, y0, x1, y1], outline=(120, 120, 120))
        for i in range(6):
            v = ylo + i * (yhi - ylo) / 5
            d.line([x0, Y(v), x1, Y(v)], fill=(232, 232, 232))
            label = f"{v:g}"
            d.text((x0 - 8 - _text_size(d, label, font)[0], Y(v) - 7), label, fill=(60, 60, 60), font=font)
        step = max(1, math.ceil(len(xs) / 14))
        for v in xs[::step]:
            d.line([X(v), y1, X(v), y1 + 4], fill=(60, 60, 60))
            if k == 1:
                label = f"{v:g}"
                d.text((X(v) - _text_size(d, label, font)[0] / 2, y1 + 6), label, fill=(60, 60, 60), font=font)
        if k == 0 and report["chance_purity"] is not None:
            c = report["chance_purity"]
            for xa in range(int(x0), int(x1), 10):
                d.line([xa, Y(c), min(xa + 5, x1), Y(c)], fill=_SWEEP_COLOURS["chance"], width=2)
        preset = report["preset"]["phi0"]
        if lo <= preset <= hi:
            for ya in range(int(y0), int(y1), 8):
                d.line([X(preset), ya, X(preset), min(ya + 4, y1)], fill=_SWEEP_COLOURS["preset"], width=2)
        drawn = 0
        for label, key in series:
            pts = [(X(r["phi0"]), Y(min(max(r[key], ylo), yhi))) for r in rows if r[key] is not None]
            if not pts:
                continue
            colour = _SWEEP_COLOURS[label]
            label = label + (" (% of anchors)" if key == "no_positive" else "")
            if len(pts) > 1:
                d.line(pts, fill=colour, width=2)
            for px, py in pts:
                d.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
            d.rectangle([x1 + 12, y0 + 6 + 18 * drawn, x1 + 24, y0 + 18 + 18 * drawn], fill=colour)
            d.text((x1 + 30, y0 + 5 + 18 * drawn), label, fill="black", font=font)
            drawn += 1
        if k == 0:
            if drawn == 0:
                d.text((x0 + 10, y0 + 10), "no labels: purities not measured", fill=(120, 120, 120), font=font)
            elif report["chance_purity"] is not None:
                d.line([x1 + 12, y0 + 12 + 18 * drawn, x1 + 24, y0 + 12 + 18 * drawn], fill=_SWEEP_COLOURS["chance"],
                       width=2)
                d.text((x1 + 30, y0 + 5 + 18 * drawn), "chance", fill="black", font=font)
                drawn += 1
        d.line([x1 + 12, y0 + 12 + 18 * drawn, x1 + 24, y0 + 12 + 18 * drawn], fill=_SWEEP_COLOURS["preset"], width=2)
        d.text((x1 + 30, y0 + 5 + 18 * drawn), f"preset Phi0 {preset:g}", fill="black", font=font)
    label = "Phi0 (initial positiveness boundary)"
    d.text(((x0 + x1 - _text_size(d, label, font)[0]) / 2, H - 20), label, fill="black", font=font)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    ppap.atomic_write(path, lambda p: img.save(p, format="PNG"))
    return path


def _sweep_target(args) -> tuple:
    """--run / --official, or --data/--arch/--patch/--weights alone -> (frozen backbone on the CPU, cfg, info)."""
    if args.run or args.official:
        if args.weights:
            raise PPAPError("--weights is for a sweep without --run/--official (their backbone is in the checkpoint)")
        model, cfg, info = _load_target(args)
        return model.backbone, cfg, info
    if args.data is None:
        raise PPAPError("--sweep without --run/--official needs --data (and --arch/--patch/--weights, unless the "
                        "dataset's default backbone with its released weights)")
    over = {k: v for k, v in (("data", args.data), ("data_dir", args.data_dir), ("arch", args.arch),
                              ("patch", args.patch), ("weights", args.weights)) if v is not None}
    cfg = ppap.make_config(over)
    backbone = ppap.build_backbone(cfg)
    info = {"kind": "backbone", "checkpoint": cfg.weights or None, "selection": None, "class_names": None,
            "out": os.path.join("runs", f"{cfg.data}_{ppap.backbone_name(cfg)}"), "stem": ""}
    return backbone, cfg, info


def _sweep_cli(args) -> int:
    t0 = time.time()
    device = ppap.pick_device(args.device)
    backbone, cfg, info = _sweep_target(args)
    cfg = _eval_cfg(cfg, args)
    if args.size:
        cfg = dataclasses.replace(cfg, val_size=args.size)
    ppap.check_config(cfg)
    loader, names, n_classes = _val_loader(cfg, args.limit, args.batch_size)
    _check_a_group_fits(args, cfg, loader)
    grid = sweep_grid(cfg, args.phi0_grid or float_list(SWEEP_PHI0), args.gap or [cfg.phi0 - cfg.psi0])
    out_dir = _out_dir(args, info, "sweep", cfg, f"{cfg.val_size}px" if args.size else "")
    with output_folder(out_dir) as tmp:
        report, text = _sweep_into(tmp, args, t0, device, backbone, cfg, info, loader, names, n_classes, grid)
    print(text)
    print(f"wrote {os.path.join(out_dir, 'sweep.md')}, sweep.json and sweep.png")
    return 0


def _sweep_into(tmp, args, t0, device, backbone, cfg, info, loader, names, n_classes, grid):
    """_sweep_cli's work, its files written into `tmp` -> (report, its table as text)."""
    key = ppap.preset_key(cfg.data, cfg.arch, cfg.patch)
    thresholds_from = "the run's config" if info["kind"] == "run" else \
        f"the preset row {key} (ppap.PRESETS)" if key else "the Config defaults"
    report = threshold_sweep(backbone.to(device), loader, device, cfg, grid, n_classes, seed=args.anchors_seed,
                             amp=ppap.amp_dtype(cfg, device), per_class=args.per_class)
    weights = {"run": f"from {info['checkpoint']}", "official": f"from {info['checkpoint']}"}.get(
        info["kind"], f"weights {cfg.weights}" if cfg.weights else
        "released weights" if ppap.BACKBONES[cfg.arch].weights.get(cfg.patch) else "random init")
    report.update({
        "data": cfg.data, "backbone": f"{cfg.arch}/{cfg.patch}", "arch": cfg.arch, "patch": cfg.patch,
        "weights": weights, "kind": info["kind"], "checkpoint": info["checkpoint"], "val_size": cfg.val_size,
        "limit": args.limit or None, "batch_size": args.batch_size, "anchors_seed": args.anchors_seed,
        "hyper": ppap.loss_hyper(cfg), "thresholds_from": thresholds_from,
        "preset": {"phi0": cfg.phi0, "psi0": cfg.psi0, "row": list(key) if key else None,
                   "own_row": key == (cfg.data, cfg.arch, cfg.patch), "note": ppap.threshold_note(cfg)},
        "class_names": names, "patch_label_rule": PATCH_LABEL_RULE,
        "mode": "eval (no Dropout2d on the criterion features)"})
    text = format_sweep(report, names)
    png = plot_sweep(report, os.path.join(tmp, "sweep.png"))
    report.update({"figure": os.path.basename(png), "git_commit": ppap.git_commit(), "device": str(device),
                   "torch": torch.__version__, "seconds": round(time.time() - t0, 2)})
    ppap.atomic_write(os.path.join(tmp, "sweep.md"), lambda p: _write_text(p, text + "\n"))
    ppap.atomic_write(os.path.join(tmp, "sweep.json"), lambda p: ppap.write_json(p, _nan_to_none(report), indent=1))
    return report, text


# ==== AUDIT: the authors' released checkpoints against the paper ====

# The paper's numbers (Seong, Moon, Lee, Heo, "Progressive Proxy Anchor Propagation for Unsupervised Semantic
# Segmentation", ECCV 2024, arXiv 2407.12463) for the released checkpoints, keyed like checkpoints.tsv rows
# (dataset, arch, patch). 'numbers' uses metrics.json's names ('cluster' = unsupervised, Hungarian-matched;
# 'linear' = linear probe; x100); 'source' says where each number was read and what it does not state.
# Only numbers read in a named source belong here: an absent number is an empty cell, never a guess.
# Not filled in: the paper's Table 1 (every dataset and backbone), which this project has not yet read in
# a copy of the paper it can cite; add each number with its table and row when someone has.
PAPER_NUMBERS = {
    ("cocostuff", "vit_small", 16): {
        "numbers": {"cluster/mIoU": 26.5},
        # COCO-Stuff-27, ViT-S/16, unsupervised mIoU: the paper's number as quoted in the authors' issue
        # tracker (github.com/hynnsk/PPAP/issues); the quote does not say whether CRF was applied.
        "source": "paper, as quoted in the authors' issue tracker (github.com/hynnsk/PPAP/issues); "
                  "CRF setting not stated there",
    },
}

MANIFEST_HEADER = ("name", "file_id", "dataset", "arch", "patch")   # download.sh's checkpoints.tsv


def read_manifest(ck_dir: str) -> list[dict]:
    """DIR/checkpoints.tsv (written by `bash download.sh checkpoints DIR`) -> its rows as dicts with the
    header's keys (patch as int). Problems are one PPAPError line."""
    path = os.path.join(ck_dir, "checkpoints.tsv")
    if not os.path.isfile(path):
        raise PPAPError(f"no {path} — run: bash download.sh checkpoints {ck_dir}")
    with open(path) as f:
        lines = [ln.rstrip("\n").rstrip("\r") for ln in f]
    lines = [ln for ln in lines if ln.strip()]
    if not lines or tuple(lines[0].split("\t")) != MANIFEST_HEADER:
        raise PPAPError(f"{path}: expected the header {chr(9).join(MANIFEST_HEADER)!r} (tab-separated) — "
                        f"run: bash download.sh checkpoints {ck_dir}")
    rows = []
    for i, ln in enumerate(lines[1:], start=2):
        cells = ln.split("\t")
        if len(cells) != len(MANIFEST_HEADER) or not cells[4].strip().isdigit():
            raise PPAPError(f"{path}:{i}: expected {len(MANIFEST_HEADER)} tab-separated fields with an "
                            f"integer patch, got {ln!r}")
        row = dict(zip(MANIFEST_HEADER, (c.strip() for c in cells)))
        row["patch"] = int(row["patch"])
        rows.append(row)
    return rows


def _data_missing(row: dict, data_dir: str) -> str | None:
    """Why the row's val data cannot be used (one line naming the download command), or None."""
    try:
        cfg = ppap.make_config({"data": row["dataset"], "arch": row["arch"], "patch": row["patch"],
                                "data_dir": data_dir, "progress": False})
        ppap.build_dataset(cfg, "val")
    except PPAPError as e:
        msg = " ".join(str(e).split())
        if msg.startswith("unknown"):
            return msg
        return f"{row['dataset']} val data missing ({msg})"
    except OSError as e:
        return f"{row['dataset']} val data unreadable under {data_dir} ({e}) — run: bash download.sh {row['dataset']} {data_dir}"
    return None


# measured columns of the audit table, in this order, when some checkpoint has them
AUDIT_PROBES = (("cluster", "unsup."), ("linear", "linear"), ("kmeans", "k-means"),
                ("cluster_crf", "unsup. +CRF"), ("linear_crf", "linear +CRF"))


def audit(args, progress: bool = True) -> dict:
    """Evaluate every released checkpoint listed in <checkpoints>/checkpoints.tsv whose file and val data are
    present (through evaluate_target, as --official does: same loading, loader, evaluation and CRF) and
    write <out>/audit.json and <out>/audit.md; each checkpoint's full report goes to <out>/<name>/.
    Rows without their file or data are listed with the reason and the command that fetches them."""
    t0 = time.time()
    ck_dir = args.checkpoints or os.environ.get("PPAP_CHECKPOINTS", "./checkpoints")
    data_dir = args.data_dir or os.environ.get("PPAP_DATA", "./data")
    out_dir = args.out or os.path.join("runs", "audit")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise PPAPError(f"cannot write the audit to {out_dir}: it is a file; give a folder")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise PPAPError(f"cannot write the audit to {out_dir}: {e.strerror or e}") from None
    if not os.access(out_dir, os.W_OK):
        raise PPAPError(f"cannot write the audit to {out_dir}: not writable; choose another --out")
    manifest = read_manifest(ck_dir)
    device = ppap.pick_device(args.device)
    dense_crf = load_crf(crf_device(args.crf_device, device)) if args.crf else None   # fail fast
    rows = []
    for m in manifest:
        file = os.path.join(ck_dir, m["name"])
        stem = os.path.splitext(m["name"])[0]
        paper = PAPER_NUMBERS.get((m["dataset"], m["arch"], m["patch"]), {})
        row = {**m, "file": os.path.abspath(file), "paper": dict(paper.get("numbers", {})),
               "paper_source": paper.get("source")}
        reason = None
        if not os.path.isfile(file):
            reason = f"file missing — run: bash download.sh checkpoints {ck_dir}"
        else:
            reason = _data_missing(m, data_dir)
        if reason:
            rows.append({**row, "status": "skipped", "reason": reason})
            print(f"skip {m['name']}: {reason}")
            continue
        sub = argparse.Namespace(**{**vars(args), "run": None, "official": file, "data": m["dataset"],
                                    "arch": m["arch"], "patch": m["patch"], "data_dir": data_dir,
                                    "out": os.path.join(out_dir, stem)})
        print(f"evaluating {m['name']} ({m['dataset']}, {m['arch']}/{m['patch']})", flush=True)
        try:
            doc, res, _ = evaluate_target(sub, dense_crf=dense_crf, progress=progress)
        except PPAPError as e:
            msg = " ".join(str(e).split())
            rows.append({**row, "status": "error", "reason": msg})
            print(f"error in {m['name']}: {msg}")
            continue
        measured = {k: {"Acc": doc["metrics"][k]["Acc"], "mIoU": doc["metrics"][k]["mIoU"]}
                    for k, _ in AUDIT_PROBES if k in doc["metrics"]}
        rows.append({**row, "status": "evaluated", "n_images": doc["n_images"], "measured": measured,
                     "metrics_json": os.path.join(stem, "metrics.json"), "seconds": doc["seconds"]})
    result = {"checkpoints_tsv": os.path.abspath(os.path.join(ck_dir, "checkpoints.tsv")),
              "data_dir": os.path.abspath(data_dir), "crf": bool(args.crf), "kmeans": bool(args.kmeans),
              "limit": args.limit or None, "device": str(device), "git_commit": ppap.git_commit(),
              "torch": torch.__version__, "seconds": round(time.time() - t0, 2), "rows": rows}
    os.makedirs(out_dir, exist_ok=True)
    result = _nan_to_none(result)
    ppap.atomic_write(os.path.join(out_dir, "audit.json"), lambda p: ppap.write_json(p, result, indent=1))
    md = format_audit(result)
    ppap.atomic_write(os.path.join(out_dir, "audit.md"), lambda p: _write_text(p, md))
    result["out_dir"] = out_dir
    return result


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _cell(v, digits=2) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def format_audit(result: dict) -> str:
    """audit.json -> audit.md: one table row per evaluated checkpoint, then the skipped ones."""
    rows = result["rows"]
    done = [r for r in rows if r["status"] == "evaluated"]
    probes = [(k, name) for k, name in AUDIT_PROBES if any(k in r["measured"] for r in done)] or \
        [("cluster", "unsup."), ("linear", "linear")]
    head = ["checkpoint", "data", "backbone", "val images"]
    head += [f"{name} {m}" for _, name in probes for m in ("Acc", "mIoU")]
    head += [f"paper {name} {m}" for name in ("unsup.", "linear") for m in ("Acc", "mIoU")]
    sources = []
    lines = ["# Audit: the authors' released PPAP checkpoints", "",
             "Measured with `python eval.py --audit` (the authors' evaluation protocol: shorter side resized to "
             "the preset's val size with nearest, centre crop, one confusion matrix over the val set); "
             "unsup. = cluster probe after Hungarian matching, linear = linear probe"
             + (", k-means = spherical k-means on the code (K = classes, fixed seeds), Hungarian-matched"
                if any(k == "kmeans" for k, _ in probes) else "")
             + (", +CRF = after the dense CRF" if result["crf"] else "")
             + ". Acc and mIoU in %. "
             + (f"**Only the first {result['limit']} val images** (`--limit`): not the paper's protocol. "
                if result["limit"] else "All val images. ")
             + "Paper columns: the paper's numbers where this project has read them (sources below); "
               "an empty cell means not known, not zero.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in done:
        cells = [f"`{r['name']}`", r["dataset"], f"{r['arch']}/{r['patch']}", str(r["n_images"])]
        for k, _ in probes:
            m = r["measured"].get(k, {})
            cells += [_cell(m.get("Acc")), _cell(m.get("mIoU"))]
        mark = ""
        if r["paper"]:
            sources.append(r["paper_source"])
            mark = f" [{len(sources)}]"
        for p in ("cluster", "linear"):
            for metric in ("Acc", "mIoU"):
                v = r["paper"].get(f"{p}/{metric}")
                cells.append("" if v is None else f"{v}{mark}")
        lines.append("| " + " | ".join(cells) + " |")
    other = [r for r in rows if r["status"] != "evaluated"]
    if other:
        lines += ["", "Not evaluated:", ""]
        lines += [f"- `{r['name']}` ({r['dataset']}, {r['arch']}/{r['patch']}): {r['status']}: {r['reason']}"
                  for r in other]
    if sources:
        lines += ["", "Sources of the paper columns:", ""]
        lines += [f"[{i}] {src}" for i, src in enumerate(sources, start=1)]
    lines += ["", f"Device {result['device']}, torch {result['torch']}, git {result['git_commit']}, "
                  f"checkpoints from `{result['checkpoints_tsv']}`, data from `{result['data_dir']}`; "
                  "per-checkpoint reports (per-class IoU, confusion matrices) in `<name>/metrics.json`.", ""]
    return "\n".join(lines)


def _audit_cli(args) -> int:
    result = audit(args)
    print(format_audit(result))
    print(f"wrote {os.path.join(result['out_dir'], 'audit.md')} and audit.json")
    return 1 if any(r["status"] == "error" for r in result["rows"]) else 0


# ==== CLI ====

def _val_loader(cfg, limit: int, batch_size: int):
    try:
        ds = ppap.build_dataset(cfg, "val")
    except (FileNotFoundError, NotADirectoryError, OSError) as e:
        raise PPAPError(f"cannot load {cfg.data} val data from {cfg.data_dir}: {e}") from None
    if len(ds) == 0:
        raise PPAPError(f"no val images found for {cfg.data} in {cfg.data_dir}")
    if not getattr(ds, "labelled", True):
        raise PPAPError(f"the {cfg.data} val images in {cfg.data_dir} have no labels: nothing can be scored")
    names = list(getattr(ds, "class_names", None) or [str(i) for i in range(ds.n_classes)])
    if limit and limit > 0:
        ds = ppap.subset(ds, range(min(limit, len(ds))))
    return ppap.make_loader(cfg, ds, train=False, batch_size=batch_size), names, int(ds.n_classes)


def _load_target(args) -> tuple:
    """--run RUN or --official FILE -> (model on the CPU, cfg, info): info holds kind, checkpoint, selection,
    class names, git and step of the checkpoint, and 'out' (the output folder unless --out, without a
    suffix: <run>, <run folder>/<stem> or runs/<stem>)."""
    if args.run:
        if not os.path.exists(args.run):
            raise PPAPError(f"run not found: {args.run}")
        ckpt_path = ppap.checkpoint_file(args.run)
        model, cfg, ckpt = ppap.load_run(args.run)
        over = {k: v for k, v in (("data", args.data), ("data_dir", args.data_dir)) if v is not None}
        cfg = dataclasses.replace(cfg, **over)
        info = {"kind": "run", "checkpoint": ckpt_path, "selection": _selection_label(ckpt, ckpt_path),
                "class_names": ckpt.get("class_names"), "checkpoint_git": ckpt.get("git"), "step": ckpt.get("step"),
                "linear": ckpt.get("linear_trained", True)}
        if os.path.isdir(args.run):
            info["out"], info["stem"] = args.run, ""
        else:
            stem = os.path.splitext(os.path.basename(args.run))[0]
            info["out"] = os.path.dirname(os.path.abspath(args.run))
            info["stem"] = "" if stem == "last" else stem
        return model, cfg, info
    # the checkpoint first: its errors do not depend on the data being there
    arch, patch = args.arch or "vit_small", args.patch or 8
    model = load_official(args.official, arch, patch, n_classes=None, trust=args.trust_pickle)
    over = {"data": args.data or "cocostuff", "arch": arch, "patch": patch, "amp_dtype": "fp16"}
    if args.data_dir:
        over["data_dir"] = args.data_dir
    cfg = ppap.make_config(over)
    info = {"kind": "official", "checkpoint": args.official, "selection": "authors-release", "class_names": None,
            "checkpoint_git": None, "step": None, "out": os.path.join("runs", os.path.splitext(
                os.path.basename(args.official))[0]), "stem": ""}
    return model, cfg, info


def _out_dir(args, info, what: str, cfg, *details) -> str:
    """--out, or the folder named by what was evaluated, so that no evaluation replaces a different one:
    <run>/<what>/[<checkpoint stem>-]<data>-<full|firstN>[-<detail>...] (an authors' checkpoint: runs/<its stem>/...),
    e.g. runs/x/eval/cocostuff-full-crf or runs/x/eval/cocostuff-first2."""
    if args.out:
        return args.out
    tag = [info["stem"], cfg.data, f"first{args.limit}" if args.limit else "full", *details]
    return os.path.join(info["out"], what, "-".join(t for t in tag if t))


@contextlib.contextmanager
def output_folder(out_dir: str):
    """-> a fresh folder beside out_dir to write an evaluation's files into, made before the evaluation starts
    (a read-only run directory, a full disk or an --out that names a file is one line before any work). At the
    end it replaces out_dir whole (under a lock on the parent folder, so concurrent evaluations of the same
    thing leave one complete result, never a mix); on any failure out_dir keeps what it held."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise PPAPError(f"cannot write the report to {out_dir}: it is a file; give a folder")
    if os.path.isdir(out_dir):               # replaced whole: only an earlier report of ours, or nothing
        held = list(os.scandir(out_dir))
        if held and not (all(e.is_file() for e in held) and {"metrics.json", "propagation.json", "sweep.json"} & {e.name for e in held}):
            raise PPAPError(f"cannot write the report to {out_dir}: it holds other files than an earlier report, "
                            f"which the report would replace; give a new or empty folder")
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".tmp-", dir=parent)
    except OSError as e:
        raise PPAPError(f"cannot write the report to {out_dir}: {e.strerror or e} (read-only or full? choose "
                        f"another --out)") from None
    try:
        try:
            yield tmp
        except OSError as e:                     # an error writing into tmp is the report's; others are not
            if not str(e.filename or "").startswith(tmp):
                raise PPAPError(f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}") from None
            raise
        fd = os.open(parent, os.O_RDONLY)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            ppap.replace_folder(tmp, out_dir)
        finally:
            os.close(fd)
    except OSError as e:
        raise PPAPError(f"cannot write the report to {out_dir}: {e.strerror or e} (disk full?); "
                        f"it keeps what it held") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _eval_cfg(cfg, args):
    """Data loading: this command's workers; precision: the run's own (the authors evaluate under autocast),
    unless --amp/--no-amp says otherwise."""
    return dataclasses.replace(cfg, num_workers=args.num_workers if args.num_workers is not None
                               else min(4, os.cpu_count() or 1), **({} if args.amp is None else {"amp": args.amp}))


def _target_and_data(args) -> tuple:
    """--run/--official and the val data it is scored on -> (model on the CPU, cfg for this command, info
    (see _load_target), val loader, class names); one line if the checkpoint and the data disagree."""
    model, cfg, info = _load_target(args)
    cfg = _eval_cfg(cfg, args)
    loader, names, n_classes = _val_loader(cfg, args.limit, args.batch_size)
    if int(model.n_classes) != n_classes:
        raise PPAPError(f"the checkpoint has {model.n_classes} classes but {cfg.data} has {n_classes}")
    if info["class_names"] and list(info["class_names"]) != list(names):
        raise PPAPError(f"the checkpoint's classes ({', '.join(info['class_names'][:3])}, ...) are not those of "
                        f"{cfg.data} ({', '.join(names[:3])}, ...): its probes cannot be scored on this data")
    return model, cfg, info, loader, names


def evaluate_target(args, dense_crf=None, progress: bool = True) -> tuple[dict, dict, list]:
    """The evaluation of --run / --official as the flags in ``args`` ask (CRF, k-means, limit, ...):
    -> (the metrics.json document, written to its folder; ppap.evaluate's result; class names).
    ``dense_crf``: the loaded CRF op when args.crf (loaded here if None)."""
    t0 = time.time()
    device = ppap.setup_distributed(args.device)      # under torchrun: this process's device, val shard
    progress = progress and ppap.dist_rank() == 0
    crf_on = crf_device(args.crf_device, device) if args.crf else None
    if args.crf and dense_crf is None:
        dense_crf = load_crf(crf_on)  # fail fast, before loading anything
    model, cfg, info, loader, names = _target_and_data(args)
    out_dir = _out_dir(args, info, "eval", cfg, "crf" if args.crf else "", "kmeans" if args.kmeans else "")
    if args.run and os.path.isdir(args.run) and os.path.exists(os.path.join(args.run, "best_on_val.pt")):
        print(f"note: evaluating last.pt; the best-on-val checkpoint is "
              f"{os.path.join(args.run, 'best_on_val.pt')} (--run {os.path.join(args.run, 'best_on_val.pt')})")
    with output_folder(out_dir) if ppap.dist_rank() == 0 else contextlib.nullcontext() as tmp:
        doc, res = _evaluate_into(tmp, args, t0, device, model, cfg, info, loader, names, dense_crf, crf_on, progress)
    doc["out_dir"] = out_dir
    return doc, res, names


def _evaluate_into(tmp, args, t0, device, model, cfg, info, loader, names, dense_crf, crf_on, progress):
    """evaluate_target's work, its files written into `tmp` (rank 0; None in the other processes)."""
    model = model.to(device)
    amp = ppap.amp_dtype(cfg, device)
    centroids, km = None, None
    if getattr(args, "kmeans", False):
        centroids, km = fit_kmeans(model, loader, device, amp=amp, restarts=args.kmeans_restarts,
                                   samples=args.kmeans_samples, seed=args.kmeans_seed, progress=progress)
    res = evaluate_model(model, loader, device, crf=args.crf, amp=amp, n_examples=args.n_examples,
                         dense_crf=dense_crf, crf_on=crf_on, desc=f"eval {cfg.data}",
                         kmeans_centroids=centroids, progress=progress, linear=info.get("linear", True))
    meta = {
        "checkpoint": os.path.abspath(info["checkpoint"]), "kind": info["kind"], "selection": info["selection"],
        "step": info["step"], "config": dataclasses.asdict(cfg), "data": cfg.data, "limit": args.limit or None,
        "git_commit": ppap.git_commit(), "checkpoint_git": info["checkpoint_git"], "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "amp": str(amp).removeprefix("torch.") if amp else False,
        "crf_device": str(crf_on) if crf_on is not None else None,
        "batch_size": args.batch_size, "seconds": round(time.time() - t0, 2),
    }
    if km is not None:
        meta["kmeans"] = km
    if tmp is not None:                           # the counts are the job's: rank 0 writes them
        return write_outputs(res, names, tmp, meta, crf=args.crf), res
    return {**meta, "pngs": {}}, res


def _evaluate_cli(args) -> int:
    doc, res, names = evaluate_target(args)
    print(f"{doc['kind']} {doc['checkpoint']} ({doc['selection']}) on {doc['data']} val, {res['n_images']} images, "
          f"device {doc['device']}")
    print(format_table(res, names))
    if "kmeans" in doc:
        km = doc["kmeans"]
        print(f"k-means: K = {km['k']}, {km['restarts']} restarts (seeds {km['seed']}..{km['seed'] + km['restarts'] - 1}), "
              f"fitted on {km['samples']} code vectors, mean 1 - cos {km['mean_inertia']:.4f}")
    print(f"wrote {os.path.join(doc['out_dir'], 'metrics.json')} and " + ", ".join(doc["pngs"].values()))
    return 0


def _knn_cli(args) -> int:
    over = {k: v for k, v in (("data", args.data), ("data_dir", args.data_dir), ("arch", args.arch),
                              ("patch", args.patch), ("weights", args.weights), ("device", args.device),
                              ("num_workers", args.num_workers)) if v is not None}
    cfg = dataclasses.replace(ppap.make_config(over), batch_size=args.batch_size)
    path = knn_table(cfg, args.split, args.k)
    table = torch.load(path, weights_only=True)
    png = plot_knn(ppap.build_dataset(cfg, args.split), table,
                   os.path.join(args.out or os.path.join("runs", f"knn_{cfg.data}_{args.split}"), "knn.png"),
                   k=min(args.k, 5))
    print(f"kNN table ({args.k} neighbours per image, {len(table['indices'])} images): {path}")
    print(f"picture: {png}")
    return 0


# ---- command line: one parser per mode, so that argparse checks each mode's flags

def _count(minimum: int):
    """An argparse type: an integer >= minimum."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, not {value}")
        return value
    parse.__name__ = "integer"
    return parse


# every flag once: name -> (option strings, argparse keywords); MODES says which mode takes which
FLAGS = {
    "run": (("--run-dir", "--run"), dict(dest="run", help="run directory or checkpoint .pt of ours (--run-dir under "
                                                        "torchrun, which reads --run as its own --run-path)")),
    "official": (("--official",), dict(help="authors' released checkpoint (.pth)")),
    "propagation": (("--propagation",), dict(action="store_true", required=True, help="this mode")),
    "sweep": (("--sweep",), dict(action="store_true", required=True, help="this mode: the threshold sweep of the "
                                 "propagation report")),
    "of_propagation": (("--propagation",), dict(dest="propagation", action="store_true", help="(optional: "
                       "`--propagation --sweep` reads as `--sweep`)")),
    "summarize": (("--summarize",), dict(nargs="+", metavar="RUN", required=True, help="runs (or metrics.json "
                                                                                        "files) to summarise")),
    "knn": (("--knn",), dict(action="store_true", required=True, help="this mode")),
    "audit": (("--audit",), dict(action="store_true", required=True, help="this mode")),
    "checkpoints": (("--checkpoints",), dict(default=None, help="folder of `bash download.sh checkpoints` (default "
                                                                "$PPAP_CHECKPOINTS or ./checkpoints)")),
    "data": (("--data",), dict(default=None, help="data set (default: the run's; cocostuff for --official)")),
    "data_dir": (("--data-dir",), dict(default=None, help="data root (default: the run's / $PPAP_DATA)")),
    "arch": (("--arch",), dict(default=None, help="backbone for --official/--knn/--sweep (default vit_small / the "
                                                      "dataset's)")),
    "patch": (("--patch",), dict(type=_count(1), default=None, help="patch size for --official/--knn/--sweep (default "
                                                                     "8 / the dataset's)")),
    "weights": (("--weights",), dict(default=None, help="backbone weights (default: the released ones)")),
    "k": (("--k",), dict(type=_count(1), default=7, help="neighbours per image")),
    "split": (("--split",), dict(default="train", choices=("train", "val"), help="the split")),
    "crf": (("--crf",), dict(action="store_true", help="also report dense-CRF refined scores")),
    "crf_device": (("--crf-device",), dict(default="auto", help="where the CRF runs: auto (the evaluation's GPU when "
                                           "the CUDA kernels build there, else the CPU) | cpu | cuda | cuda:N")),
    "out": (("--out",), dict(default=None, help="output directory")),
    "device": (("--device",), dict(default="auto", help="auto | cpu | cuda | cuda:N")),
    "batch_size": (("--batch-size",), dict(type=_count(1), default=8, help="images per batch")),
    "limit": (("--limit",), dict(type=_count(0), default=0, help="only the first N val images (0: all; the run's "
                                                                 "--val-limit is not used)")),
    "num_workers": (("--num-workers",), dict(type=_count(0), default=None, help="data loader workers (default: "
                                                                                "min(4, cores))")),
    "n_examples": (("--n-examples",), dict(type=_count(0), default=4, help="images in examples.png")),
    "amp": (("--amp",), dict(action=argparse.BooleanOptionalAction, default=None,
                             help="autocast (default: the run's setting, i.e. on CUDA unless it said otherwise; "
                                  "on CUDA for --official, as the authors)")),
    "kmeans": (("--kmeans",), dict(action="store_true", help="also score spherical k-means (K = classes) on the "
               "code: a label-free diagnostic that does not depend on the cluster probe's initialisation")),
    "kmeans_restarts": (("--kmeans-restarts",), dict(type=_count(1), default=KMEANS_RESTARTS, help="k-means "
                        "restarts (seeds kmeans-seed + r); the lowest inertia is kept")),
    "kmeans_samples": (("--kmeans-samples",), dict(type=_count(1), default=KMEANS_SAMPLES, help="code vectors "
                       "k-means is fitted on (a fixed per-image patch subsample)")),
    "kmeans_seed": (("--kmeans-seed",), dict(type=_count(0), default=0, help="first k-means seed (and the "
                                                                            "subsample's)")),
    "anchors_seed": (("--anchors-seed",), dict(type=_count(0), default=0, help="seed of the anchors")),
    "trained_features": (("--trained-features",), dict(default="z", choices=("z", "code"), help="the trained "
                         "feature set reported next to the criterion's")),
    "trust_pickle": (("--trust-pickle",), dict(action="store_true", help="allow arbitrary pickled objects in "
                                                                         "--official checkpoints (trusted files only)")),
    "phi0_grid": (("--phi0-grid",), dict(type=float_list, default=None, metavar="GRID", help="the Phi0 values: "
                  f"a,b,c or start:stop:step (default {SWEEP_PHI0}; the config's own Phi0 is always added)")),
    "gap": (("--gap",), dict(type=float_list, default=None, metavar="GAPS", help="Phi0 - Psi0, one value or a "
            "list as --phi0-grid (default: the config's, e.g. 0.55 - 0.20 = 0.35 for COCO ViT-S/8)")),
    "per_class": (("--per-class",), dict(action="store_true", help="also the positives' purity and share per "
                                                                   "class of the anchor")),
    "size": (("--size",), dict(type=_count(1), default=None, help="val crop size in px (default: the config's "
                                                                  "--val-size, 320 on the real presets)")),
}
_SCORING = ("device", "batch_size", "limit", "num_workers", "amp")
_TARGET_DATA = ("data", "data_dir", "arch", "patch", "trust_pickle")
_CRF_KMEANS = ("crf", "crf_device", "n_examples", "kmeans", "kmeans_restarts", "kmeans_samples", "kmeans_seed")
# mode -> (what it does, its flags; "target" = exactly one of --run/--official, "target?" = at most one)
MODES = {
    "evaluate": ("score a run (--run) or an authors' checkpoint (--official) on its val set: metrics.json, "
                 "confusion matrices, examples.png", ("target", *_TARGET_DATA, *_SCORING, *_CRF_KMEANS, "out")),
    "propagation": ("with --run/--official: proxy anchor propagation statistics per step t = 0..T on labelled val "
                    "images (propagation.json + .png); with --sweep: the threshold sweep", ("propagation", "target", *_TARGET_DATA, *_SCORING,
                                                          "anchors_seed", "trained_features", "out")),
    "sweep": ("Phi0/Psi0 threshold sweep on the frozen backbone's features, before any training: from --data "
              "--arch --patch --weights alone, or --run/--official (sweep.md, .json, .png)",
              ("sweep", "of_propagation", "target?", *_TARGET_DATA, "weights", *_SCORING, "anchors_seed", "phi0_grid",
               "gap", "per_class", "size", "out")),
    "summarize": ("mean ± std over runs (seeds)", ("summarize", "out")),
    "knn": ("each image's nearest images by backbone features (table + knn.png)",
            ("knn", "data", "data_dir", "arch", "patch", "weights", "k", "split", "out", "device", "batch_size",
             "num_workers")),
    "audit": ("evaluate every released checkpoint listed in --checkpoints/checkpoints.tsv whose file and data are "
              "present; audit.md + audit.json", ("audit", "checkpoints", "data_dir", "trust_pickle", *_SCORING,
                                                 *_CRF_KMEANS, "out")),
}


def mode_of(argv) -> str:
    """The mode a command line asks for: the first of --summarize, --knn, --audit, --sweep, --propagation it holds,
    else evaluate (argparse then rejects a second mode's flag as a flag this mode does not take)."""
    for mode in ("summarize", "knn", "audit", "sweep", "propagation"):
        if any(a == f"--{mode}" or a.startswith(f"--{mode}=") for a in argv):
            return mode
    return "evaluate"


def build_parser(mode: str = "evaluate") -> argparse.ArgumentParser:
    """The parser of one mode: its flags only."""
    about, names = MODES[mode]
    others = "; ".join(f"{MODES[m][1][0] if m != 'evaluate' else '--run/--official'}: {MODES[m][0]}"
                       for m in MODES if m != mode)
    p = ppap._Parser(prog="eval.py" + ("" if mode == "evaluate" else f" --{mode}"), description=about,
                     epilog=f"Other modes (each with its own --help): {others}.")
    p.hint = f"python eval.py{'' if mode == 'evaluate' else ' --' + mode} --help lists this mode's flags"
    for name in names:
        if name in ("target", "target?"):
            g = p.add_mutually_exclusive_group(required=name == "target")
            for key in ("run", "official"):
                g.add_argument(*FLAGS[key][0], **FLAGS[key][1])
        else:
            p.add_argument(*FLAGS[name][0], **FLAGS[name][1])
    return p


def parse_args(argv) -> argparse.Namespace:
    """argv -> the namespace of its mode (args.mode), every flag of the other modes at its default."""
    mode = mode_of(argv)
    args = build_parser(mode).parse_args(argv)
    defaults = {dest: kw.get("default", False if kw.get("action") == "store_true" else None)
                for name, (_, kw) in FLAGS.items() for dest in [kw.get("dest", name)]}
    return argparse.Namespace(**{**defaults, **vars(args), "mode": mode})


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    with ppap.job_output():
        try:
            args = parse_args(argv)
            return _main(args)
        except PPAPError as e:
            msg = ppap.one_line(e)
            if msg.startswith("CRF unavailable"):
                print(msg, file=sys.stderr)
            else:
                ppap.report_error(e)
            return 2
        except KeyboardInterrupt:                  # an evaluation writes nothing until it is complete
            print("\ninterrupted: nothing was written", file=sys.stderr)
            return 130
        except OSError as e:                       # the file system's, where no place above names it better
            ppap.report_error(PPAPError(f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}"))
            return 2
        except RuntimeError as e:
            if not ppap.out_of_memory(e):
                raise
            ppap.report_error(PPAPError(f"out of memory with --batch-size {args.batch_size} on {args.device}: "
                                        f"lower --batch-size"))
            return 2


def _main(args) -> int:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and (args.mode != "evaluate" or args.kmeans):
        raise PPAPError("under torchrun, eval.py evaluates --run/--official (the val set is shared out); "
                        "run --summarize, --knn, --audit, --kmeans, --propagation and --sweep as one process")
    if args.mode == "summarize":
        s = summarize(args.summarize)
        print(format_summary(s))
        if args.out:
            if os.path.exists(args.out) and not os.path.isdir(args.out):
                raise PPAPError(f"--out {args.out} is a file; give a directory")
            os.makedirs(args.out, exist_ok=True)
            path = os.path.join(args.out, "summary.json")
            ppap.atomic_write(path, lambda p: ppap.write_json(p, _nan_to_none(s), indent=1))
            print(f"wrote {path}")
        return 0
    return {"audit": _audit_cli, "propagation": _propagation_cli, "sweep": _sweep_cli, "knn": _knn_cli,
            "evaluate": _evaluate_cli}[args.mode](args)


if __name__ == "__main__":
    sys.exit(main())

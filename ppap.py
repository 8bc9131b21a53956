"""PPAP: Progressive Proxy Anchor Propagation for Unsupervised Semantic Segmentation (ECCV 2024).

One file, read top to bottom: the method first, the machinery after it.

    METHOD      config and presets -> the backbone contract and DINO's ViT -> the two branches and the probes
                -> proxy anchor propagation and the PPAP loss -> the train step -> the training loop
                -> the evaluation protocol (metrics, evaluate)
    MACHINERY   DINOv2 details -> backbone registry and weights -> datasets and the five-crop set
                -> checkpoints and run directories -> several processes (torchrun) -> the feature cache -> CLI

    python ppap.py --data synthetic            # offline demo on CPU, a few minutes
    python ppap.py --data cocostuff            # the paper's default preset (ViT-S/8), one GPU
    python ppap.py --data cityscapes --help    # every flag, with the value this preset uses

To fork:
    a new loss or positives rule    subclass PPAPLoss (its __call__ is all the step uses), return it from
                                    build_loss; eval.py --propagation then measures your sets
    a loss hyper-parameter          one Config field with loss=True, read in your loss as self.cfg.<name>
    another backbone                any nn.Module with the backbone contract (patch_size, embed_dim,
                                    features, make_head, code), registered in BACKBONES
    another dataset                 one DATASETS entry and its reader
README "Forking" has a worked example of each, backed by tests.

Numbers follow the authors' code (github.com/hynnsk/PPAP) on the same inputs; every deviation is a flag.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import glob
import hashlib
import json
import math
import multiprocessing
import os
import random
import shutil
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from scipy.io import loadmat
from scipy.optimize import linear_sum_assignment
from tqdm import tqdm

try:
    import fcntl                      # POSIX file locks (five-crop build, run directories); absent on Windows
except ImportError:                   # pragma: no cover
    fcntl = None


class PPAPError(Exception):
    """A user-facing problem (missing data, wrong weights, bad flag): printed as one line, exit code 2."""


# ===================================================================================================== METHOD
# ==== CONFIG AND PRESETS ====

def _f(default, help: str, loss: bool = False):
    """A Config field: its default, the one line `--help` shows for it, and whether it is a hyper-parameter
    of the loss (the loss reads it; eval.py --propagation reports it)."""
    return field(default=default, metadata={"help": help, "loss": loss})


@dataclass
class Config:
    # -- what to train on, and with which frozen backbone
    data: str = _f("cocostuff", "the dataset (DATASETS)")
    data_dir: str = _f(os.environ.get("PPAP_DATA", "./data"), "dataset root as download.sh lays it out "
                       "($PPAP_DATA)")
    imagenet_s_classes: int = _f(50, "ImageNet-S variant: 50 | 300 | 919")
    n_classes: int = _f(0, "--data folder without DIR/classes.txt: the number of classes (named class0, class1, ...)")
    five_crop: bool | None = _f(None, "train on the five-crop set (corners + centre at half size, built once); "
                                "unset = the dataset's choice: COCO-Stuff and Cityscapes yes (the authors'), others no")
    arch: str = _f("vit_small", "the frozen backbone (BACKBONES)")
    patch: int = _f(8, "ViT patch size: 8 | 16 for DINO; 14 for DINOv2 (implied by its --arch)")
    weights: str = _f("", "backbone checkpoint file; empty = the released DINO/DINOv2 one via the torch hub "
                      "cache")
    crop_quality: int = _f(0, "five-crop JPEGs: 0 = Pillow's defaults (quality 75, 4:2:0), as the authors' "
                           "crop script; 1-100 = that quality with 4:4:4 chroma (opt-in, other training data)")
    # -- the PPAP loss (the authors' loss.py, SupConLoss)
    phi0: float = _f(0.55, "initial positiveness boundary Phi_0", loss=True)
    psi0: float = _f(0.20, "initial ambiguity boundary Psi_0", loss=True)
    prop_iter: int = _f(2, "T, proxy anchor propagation steps (0 = ablation: no propagation)", loss=True)
    sigma_pos: float = _f(3.0, "sigma_pos: Phi_t = Phi_{t-1} - (1 - cos(v_{t-1}, v_t)) / sigma_pos", loss=True)
    sigma_amb: float = _f(3.0, "sigma_amb: Psi_t = Psi_{t-1} + (1 - cos(v_{t-1}, v_t)) / sigma_amb", loss=True)
    tau: float = _f(0.8, "temperature of the contrastive logits z_a . z_j / tau", loss=True)
    trainpatchsplit: int = _f(16, "anchors per group = group / trainpatchsplit", loss=True)
    group: int = _f(784, "rows per anchor group (the authors' split: one /8 image at 224 px)", loss=True)
    no_ambiguity: bool = _f(False, "ablation: Psi = Phi, every non-positive is a negative", loss=True)
    ppap_weight: float = _f(1.0, "weight of the PPAP loss (0 = ablation: probes on the unchanged head)")
    cluster_probes: int = _f(1, "cluster probes trained side by side from their own random inits (1 = the "
                             "authors'); >1 adds probe 'cluster_sel': the lowest clustering loss, no labels")
    # -- optimisation (the authors' run.py and json/server/*.json)
    optimizer: str = _f("adamw", "adamw | adam, for head + projection")
    lr: float = _f(1e-3, "learning rate of head + projection")
    weight_decay: float = _f(0.1, "weight decay of head + projection")
    linear_lr: float = _f(1e-3, "learning rate of the linear probe (Adam)")
    cluster_lr: float = _f(5e-3, "learning rate of the cluster probe (Adam)")
    grad_clip: float = _f(10.0, "gradient-norm clip on head + projection")
    epochs: int = _f(5, "epochs over the train set")
    max_steps: int = _f(0, "stop after this many steps (0 = run all epochs)")
    batch_size: int = _f(64, "images per step")
    img_size: int = _f(224, "train crop size (px)")
    seed: int = _f(0, "seed of data order, anchors, dropout and the probes' initialisation")
    amp: bool | None = _f(None, "mixed precision: --amp on, --no-amp off; unset = on CUDA only (CPU autocast "
                          "is slower than fp32 there)")
    amp_dtype: str = _f("fp16", "fp16 (the authors', with a GradScaler) | bf16")
    # -- evaluation protocol
    val_size: int = _f(320, "validation crop size (px)")
    val_every: int = _f(100, "steps between validations (0 = only at the end)")
    val_limit: int = _f(0, "validate on at most this many images (0 = all)")
    val_subset: int = _f(300, "images of the periodic validations: a fixed, evenly spaced subset of val (the "
                         "full set at the end; 0 = the full set every time; --select-on-val: always the full set)")
    select_on_val: bool = _f(False, "also keep best_on_val.pt, chosen on the labelled val set (the authors' "
                             "practice; off by default)")
    # -- machinery: where and how the run executes, never what it computes
    device: str = _f("auto", "auto | cpu | cuda | cuda:1")
    num_workers: int = _f(-1, "DataLoader worker processes (-1 = from the machine's cores, at most "
                          "MAX_LOADER_WORKERS; 0 = in the main process)")
    crop_workers: int = _f(0, "processes building the five-crop cache (0 = all cores)")
    run: str = _f("", "run directory (--run-dir; --run with plain python); empty = runs/<data>_<arch><patch>_<time>")
    resume: str = _f("", "a run directory (or its last.pt) to continue exactly")
    progress: bool = _f(True, "progress bars")
    feature_cache: str = _f("", "a folder for the frozen backbone's output of every train crop: computed once, "
                            "then read by every later epoch and run with the same backbone, data and size "
                            "(empty = off; README, Feature cache)")
    feature_cache_dtype: str = _f("exact", "exact (the head's input as the live path has it: fp32, also under "
                                  "autocast) | fp16 | bf16 (half the space; changes the results slightly)")
    feature_cache_crit: bool = _f(False, "the feature cache also stores the criterion features: twice the space, "
                                  "and a step runs no frozen block at all (the last one otherwise)")


# The authors' presets (their json/server/*.json), by (--data, --arch, --patch). A dataset or backbone without
# its own rows borrows them (DATASETS[...].presets, BACKBONES[...].presets).
PRESETS = {
    ("cocostuff", "vit_small", 8): dict(phi0=0.55, psi0=0.20, prop_iter=2, sigma_pos=3, sigma_amb=3, tau=0.8,
                                        trainpatchsplit=16, optimizer="adamw", lr=1e-3, weight_decay=0.1,
                                        cluster_lr=5e-3, epochs=5, val_every=100),
    ("cocostuff", "vit_small", 16): dict(phi0=0.55, psi0=0.15, prop_iter=2, sigma_pos=3, sigma_amb=4, tau=0.8,
                                         trainpatchsplit=4, optimizer="adamw", lr=1e-3, weight_decay=0.01,
                                         cluster_lr=1e-3, epochs=5, val_every=100),
    ("cityscapes", "vit_base", 8): dict(phi0=0.60, psi0=0.20, prop_iter=3, sigma_pos=3, sigma_amb=2, tau=0.1,
                                        trainpatchsplit=16, optimizer="adam", lr=1e-3, weight_decay=0.0,
                                        cluster_lr=1e-3, epochs=30, val_every=50),
    ("cityscapes", "vit_small", 8): dict(phi0=0.60, psi0=0.20, prop_iter=3, sigma_pos=3, sigma_amb=3, tau=0.8,
                                         trainpatchsplit=16, optimizer="adam", lr=1e-3, weight_decay=0.0,
                                         cluster_lr=1e-3, epochs=30, val_every=50),
    ("potsdam", "vit_base", 8): dict(phi0=0.55, psi0=0.15, prop_iter=1, sigma_pos=5, sigma_amb=3, tau=0.07,
                                     trainpatchsplit=16, optimizer="adam", lr=5e-4, weight_decay=0.0,
                                     cluster_lr=1e-3, epochs=40, val_every=20),
    # Offline demo: a small randomly initialised frozen ViT on procedural images (no download, CPU minutes).
    # Random features are less similar overall than DINO's, so the boundaries sit higher (positives that
    # are ~90% same-class at Phi0 = 0.75, as measured on the demo data).
    ("synthetic", "vit_tiny_demo", 8): dict(phi0=0.75, psi0=0.35, prop_iter=2, sigma_pos=3, sigma_amb=3, tau=0.8,
                                            trainpatchsplit=16, optimizer="adamw", lr=1e-3, weight_decay=0.1,
                                            cluster_lr=5e-3, epochs=4, max_steps=400, batch_size=16,
                                            img_size=112, val_size=112, val_every=100, num_workers=0),
}


def flag(name: str) -> str:
    """A Config field's command-line spelling: batch_size -> --batch-size."""
    return "--" + name.replace("_", "-")


def preset_key(data: str, arch: str, patch: int) -> tuple | None:
    """The PRESETS row that (data, arch, patch) takes: its own; a dataset may take another's rows
    (DATASETS[data].presets), a backbone another's at patch 8 (DINOv2: the DINO ViT of its width); otherwise
    the dataset's default row (None: no row, the Config defaults)."""
    data = DATASETS[data].presets or data
    borrowed = BACKBONES[arch].presets if arch in BACKBONES else ""
    for key in ((data, arch, patch), (data, borrowed, 8), (data, *DATASETS[data].backbone)):
        if key in PRESETS:
            return key
    return None


def preset_for(data: str, arch: str, patch: int) -> dict:
    """The values of (data, arch, patch)'s PRESETS row (preset_key)."""
    key = preset_key(data, arch, patch)
    return PRESETS[key] if key else {}


def threshold_note(cfg: Config) -> str | None:
    """One line when the run's Phi_0/Psi_0 come from a PRESETS row that is not its own (a borrowing backbone or
    dataset, or a combination without a row) and were not set by hand: absolute cosine thresholds tuned on
    one backbone's features need not fit another's. It names the sweep that checks them (eval.py --sweep)."""
    key = preset_key(cfg.data, cfg.arch, cfg.patch)
    if key == (cfg.data, cfg.arch, cfg.patch):
        return None
    row = PRESETS.get(key, {})
    if (cfg.phi0, cfg.psi0) != (row.get("phi0", Config.phi0), row.get("psi0", Config.psi0)):
        return None                                 # chosen for this run
    source = f"{key[1]}/{key[2]} on {key[0]}" if key else "the defaults (vit_small/8 on cocostuff)"
    sweep = ["python", "eval.py", "--propagation", "--sweep", "--data", cfg.data, "--arch", cfg.arch, "--patch",
             str(cfg.patch)] + (["--weights", cfg.weights] if cfg.weights else []) + \
        (["--data-dir", cfg.data_dir] if cfg.data_dir != Config.data_dir else [])
    return (f"note: --phi0 {cfg.phi0} / --psi0 {cfg.psi0} were tuned for {source}, not for {cfg.arch}/{cfg.patch} "
            f"on {cfg.data}; check them on these features before trusting the run: {shlex.join(sweep)} "
            f"(README: Choosing Phi0 and Psi0)")


def make_config(overrides: dict) -> Config:
    """Defaults <- preset of (data, arch, patch) <- explicit overrides. Without --patch the dataset's default
    patch is used when the arch has it, else the arch's own (14 for DINOv2)."""
    data = overrides.get("data", Config.data)
    if data not in DATASETS:
        raise PPAPError(f"unknown --data {data!r}; choose one of {', '.join(DATASETS)}")
    default_arch, default_patch = DATASETS[data].backbone
    arch = overrides.get("arch", default_arch)
    patches = BACKBONES[arch].patches if arch in BACKBONES else (default_patch,)
    patch = overrides.get("patch", default_patch if default_patch in patches else patches[0])
    values = {**preset_for(data, arch, patch), "data": data, "arch": arch, "patch": patch, **overrides}
    unknown = set(values) - {f.name for f in fields(Config)}
    if unknown:
        raise PPAPError(f"unknown config field(s): {', '.join(sorted(unknown))}")
    cfg = Config(**values)
    check_config(cfg)
    return cfg


def check_config(cfg: Config) -> None:
    """One-line errors for values no run can use."""
    if cfg.arch not in BACKBONES:
        raise PPAPError(f"unknown --arch {cfg.arch!r}; choose one of {', '.join(BACKBONES)}")
    positive = ("trainpatchsplit", "group", "batch_size", "img_size", "val_size", "epochs", "imagenet_s_classes",
                "cluster_probes")
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise PPAPError(f"{flag(name)} must be positive, not {getattr(cfg, name)}")
    if cfg.num_workers < -1:
        raise PPAPError(f"--num-workers must be -1 (automatic), 0 or more, not {cfg.num_workers}")
    for name in ("max_steps", "seed", "crop_workers", "val_every", "val_limit", "val_subset", "n_classes"):
        if getattr(cfg, name) < 0:
            raise PPAPError(f"{flag(name)} must be >= 0, not {getattr(cfg, name)}")
    if cfg.seed >= 2 ** 32:                              # numpy's seeds (the authors' seed_everything) stop there
        raise PPAPError(f"--seed must be below 2^32, not {cfg.seed}")
    for name in ("phi0", "psi0", "sigma_pos", "sigma_amb", "tau", "ppap_weight", "lr", "weight_decay",
                 "linear_lr", "cluster_lr", "grad_clip"):
        if not math.isfinite(getattr(cfg, name)):
            raise PPAPError(f"{flag(name)} must be a finite number, not {getattr(cfg, name)}")
    for name in ("tau", "sigma_pos", "sigma_amb", "grad_clip"):
        if getattr(cfg, name) <= 0:
            raise PPAPError(f"{flag(name)} must be positive, not {getattr(cfg, name)}")
    for name in ("lr", "weight_decay", "linear_lr", "cluster_lr", "ppap_weight"):
        if getattr(cfg, name) < 0:
            raise PPAPError(f"{flag(name)} must be >= 0, not {getattr(cfg, name)}")
    patches = BACKBONES[cfg.arch].patches
    if cfg.patch not in patches:
        raise PPAPError(f"--patch {cfg.patch} does not exist for --arch {cfg.arch}; its patch size is "
                        f"{' or '.join(map(str, patches))}")
    # Train crops must tile into patches; --val-size need not (the evaluation protocol's 320 px is not a
    # multiple of 14): PPAP.forward resizes such inputs to the nearest multiple, labels keep their size.
    if cfg.img_size % cfg.patch:
        raise PPAPError(f"--img-size must be a multiple of the patch size {cfg.patch}, not {cfg.img_size}")
    if cfg.val_size < cfg.patch:
        raise PPAPError(f"--val-size {cfg.val_size} is smaller than one patch ({cfg.patch} px)")
    if cfg.optimizer not in ("adam", "adamw"):
        raise PPAPError(f"--optimizer must be adam or adamw, not {cfg.optimizer!r}")
    if cfg.amp_dtype not in ("fp16", "bf16"):
        raise PPAPError(f"--amp-dtype must be fp16 or bf16, not {cfg.amp_dtype!r}")
    if cfg.group % cfg.trainpatchsplit:
        raise PPAPError(f"--group {cfg.group} is not divisible by --trainpatchsplit {cfg.trainpatchsplit}")
    if not 0 <= cfg.crop_quality <= 100:
        raise PPAPError(f"--crop-quality must be 0 (Pillow's defaults) or 1-100, not {cfg.crop_quality}")
    if cfg.feature_cache_dtype not in FEATURE_CACHE_DTYPES:
        raise PPAPError(f"--feature-cache-dtype must be {' | '.join(FEATURE_CACHE_DTYPES)}, not "
                        f"{cfg.feature_cache_dtype!r}")
    if cfg.feature_cache_dtype != "exact" and not cfg.feature_cache:
        raise PPAPError(f"--feature-cache-dtype {cfg.feature_cache_dtype} changes what the head receives, which "
                        f"only a --feature-cache DIR stores; add one, or use --feature-cache-dtype exact")

# ==== THE BACKBONE CONTRACT, AND DINO's ViT (frozen) ====
# PPAP needs four things of a frozen backbone, and touches nothing else of it:
#   patch_size, embed_dim        the stride of its feature grid and the width D of its features
#   features(x) -> (head_in, crit)
#                                x [B,3,H,W] normalised (sides multiples of patch_size) -> the input of the
#                                trainable head (any shape) and the criterion features crit [B,D,h,w]; called
#                                under torch.no_grad()
#   optional: trunk(x) -> head_in and crit_features(head_in, (h, w)) -> crit, the two halves of features
#                                (the same operations); --feature-cache needs them: it stores trunk(x) (and
#                                crit) once per train crop, and PPAP.forward takes them precomputed
#   make_head() -> nn.Module     the trainable head, initialised from the backbone (DINO: a copy of its last block)
#   code(head_out, (h, w)) -> [B,D,h,w]
#                                the training branch's code from the head's output (DINO: the frozen final
#                                LayerNorm, patch tokens only)
# DINO's ViT below keeps the key names and numerics of the released checkpoints (DINO's vision_transformer.py,
# which the authors' model/dino/vision_transformer.py copies), so that they load with strict=True. DINOv2's
# ViTs (support code) are the same blocks plus LayerScale, register tokens and their own positional resize.

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(img01: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] in [0,1] -> ImageNet-normalised (the backbone's input)."""
    mean = img01.new_tensor(IMAGENET_MEAN).view(-1, 3, 1, 1)
    std = img01.new_tensor(IMAGENET_STD).view(-1, 3, 1, 1)
    return (img01 - mean) / std


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Inverse of normalize: [B,3,H,W] -> [0,1] (not clipped)."""
    mean = x.new_tensor(IMAGENET_MEAN).view(-1, 3, 1, 1)
    std = x.new_tensor(IMAGENET_STD).view(-1, 3, 1, 1)
    return x * std + mean


def to_uint8_rgb(img: torch.Tensor) -> torch.Tensor:
    """Normalised [B,3,H,W] -> uint8 [B,H,W,3]: un-normalised in float32, times 255, truncated (not rounded)
    as torchvision's to_pil_image does in the authors' CRF code, so 255 may come back as 254."""
    return (denormalize(img.detach().float()) * 255).clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        """[B,T,D] -> [B,T,D]; softmax(q k^T / sqrt(d_head)) v through the fused SDPA kernel."""
        B, T, D = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    """Pre-norm transformer block. layerscale=True is DINOv2's block (dinov2/layers/block.py, Block):
    x + ls1(attn(norm1 x)), then + ls2(mlp(norm2 x)); DINO has no scale (Identity: same keys, same bits)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, layerscale: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim) if layerscale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim) if layerscale else nn.Identity()

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


def trunc_normal_(t: torch.Tensor, std: float = 0.02, a: float = -2.0, b: float = 2.0) -> torch.Tensor:
    """DINO's utils.trunc_normal_ (mean 0): inverse-CDF sampling from one uniform_ draw. Recent
    torch.nn.init.trunc_normal_ samples by rejection instead, which would change what a seed initialises."""
    cdf = lambda x: (1.0 + math.erf(x / math.sqrt(2.0))) / 2.0
    with torch.no_grad():
        t.uniform_(2 * cdf(a / std) - 1, 2 * cdf(b / std) - 1).erfinv_()
        return t.mul_(std * math.sqrt(2.0)).clamp_(min=a, max=b)


class VisionTransformer(nn.Module):
    """DINO's ViT. tokens(x) -> [B, n_prefix + h*w, D]: n_prefix tokens (CLS; DINOv2 adds registers), then
    the h*w patch tokens in row-major order."""
    n_prefix = 1                  # tokens before the patches
    interp_offset = 0.1           # positional resize: DINO's +0.1 on the target grid (interpolate_pos_encoding)
    interp_antialias = False

    def __init__(self, patch_size: int, embed_dim: int, depth: int, num_heads: int, img_size: int = 224,
                 layerscale: bool = False):
        super().__init__()
        self.patch_size, self.embed_dim = patch_size, embed_dim
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (img_size // patch_size) ** 2, embed_dim))
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, layerscale=layerscale) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        # DINO's initialisation, in DINO's order: the random draws match the authors' model under one seed
        trunc_normal_(self.pos_embed)
        trunc_normal_(self.cls_token)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def adopt_pos_grid(self, pos_embed: torch.Tensor) -> None:
        """Resize the pos_embed parameter to a checkpoint's grid (trained at another resolution) before
        load_state_dict; interpolate_pos_encoding adapts it to each input size as DINO does."""
        if pos_embed.shape != self.pos_embed.shape:
            self.pos_embed = nn.Parameter(torch.zeros_like(pos_embed), requires_grad=self.pos_embed.requires_grad)

    def interpolate_pos_encoding(self, n_patches: int, H: int, W: int) -> torch.Tensor:
        """The positional embedding [1,1+N,D] (CLS, g x g grid) resized bicubically to the (H/p, W/p) grid
        -> float32 [1,1+(H/p)(W/p),D]; unchanged for a square input of the native grid.

        DINO (vision_transformer.py, interpolate_pos_encoding) and DINOv2's plain models pass
        scale_factor = (H/p + 0.1) / g: the +0.1 keeps floor(g * scale) at H/p, and torch then samples with
        that scale, not with (H/p)/g. DINOv2's register models (hub/backbones.py: interpolate_offset=0,
        interpolate_antialias=True) pass the size itself, with antialiasing. DINOv2 resizes in float32
        (dinov2/models/vision_transformer.py); its (w, h) are our (H, W), i.e. rows first, as here."""
        N = self.pos_embed.shape[1] - 1
        if n_patches == N and H == W:
            return self.pos_embed
        g = int(math.sqrt(N))
        pos = self.pos_embed.float()
        h0, w0 = H // self.patch_size, W // self.patch_size
        if self.interp_offset:
            resize = dict(scale_factor=((h0 + self.interp_offset) / g, (w0 + self.interp_offset) / g))
        else:
            resize = dict(size=(h0, w0))
        patch_pos = F.interpolate(pos[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2), mode="bicubic",
                                  antialias=self.interp_antialias, **resize)
        assert patch_pos.shape[-2:] == (h0, w0)
        return torch.cat((pos[:, :1], patch_pos.permute(0, 2, 3, 1).reshape(1, -1, self.embed_dim)), dim=1)

    def prepare_tokens(self, x):
        """[B,3,H,W] -> [B,1+h*w,D]: patch embedding, CLS token, positional embedding."""
        B, _, H, W = x.shape
        t = self.patch_embed(x)
        t = torch.cat((self.cls_token.expand(B, -1, -1), t), dim=1)
        return t + self.interpolate_pos_encoding(t.shape[1] - 1, H, W).to(t.dtype)

    def tokens(self, x):
        """[B,3,H,W] -> (t after the penultimate block, norm(t after the last block)), both
        [B, n_prefix + h*w, D]."""
        t = self.trunk(x)
        return t, self.norm(self.blocks[-1](t))

    def forward(self, x):
        return self.tokens(x)[1]

    # -- the backbone contract
    def features(self, x):
        """-> (tokens before the last block [B, n_prefix + h*w, D]: the head's input; the criterion features,
        norm(last block) of the patch tokens [B,D,h,w]). The head sees every token, CLS and registers
        included, as the last block does; code and crit keep the patch tokens only."""
        t = self.trunk(x)
        return t, self.crit_features(t, (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size))

    def trunk(self, x):
        """features' first half: [B,3,H,W] -> the head's input, the tokens after the penultimate block (what
        --feature-cache stores: every frozen block but the last)."""
        t = self.prepare_tokens(x)
        for blk in self.blocks[:-1]:
            t = blk(t)
        return t

    def crit_features(self, t, grid):
        """features' second half: the head's input -> the criterion features [B,D,h,w] (the frozen last
        block and final norm, patch tokens only)."""
        return self._grid(self.norm(self.blocks[-1](t)), grid)

    def make_head(self) -> nn.Module:
        """The trainable head: a copy of the last block, starting from its pretrained weights (no random draw)."""
        return copy.deepcopy(self.blocks[-1])

    def code(self, t, grid):
        """Head output [B, n_prefix + h*w, D] -> the frozen final LayerNorm, patch tokens as a grid [B,D,h,w]."""
        return self._grid(self.norm(t), grid)

    def _grid(self, t, grid):
        return t[:, self.n_prefix:].reshape(t.shape[0], *grid, -1).permute(0, 3, 1, 2)


def vit_small(patch_size: int = 16) -> VisionTransformer:
    return VisionTransformer(patch_size, embed_dim=384, depth=12, num_heads=6)


def vit_base(patch_size: int = 16) -> VisionTransformer:
    return VisionTransformer(patch_size, embed_dim=768, depth=12, num_heads=12)


def vit_tiny_demo(patch_size: int = 8) -> VisionTransformer:
    """The offline demo's backbone: 4 blocks of width 192, randomly initialised from a fixed seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        return VisionTransformer(patch_size, embed_dim=192, depth=4, num_heads=3)


def patch_grid(size: int, patch: int) -> int:
    """Patches along a side of `size` px as the backbone sees it: size/patch rounded to the nearest integer
    (halves up), at least 1; size/patch itself when patch divides size."""
    return max(1, (2 * size + patch) // (2 * patch))


def fit_to_patch(x: torch.Tensor, patch: int) -> torch.Tensor:
    """[B,3,H,W] -> [B,3,patch_grid(H)*p,patch_grid(W)*p], bilinear (align_corners=False); x itself when
    H and W are multiples of the patch (DINO at 224/320 px, DINOv2 at 224 px). The rule for evaluation at
    320 px with patch 14: the backbone sees 322 px (23x23 patches); labels keep 320 px and `code` is
    upsampled to them as always, so the evaluation protocol is unchanged."""
    H, W = x.shape[-2:]
    size = (patch_grid(H, patch) * patch, patch_grid(W, patch) * patch)
    if size == (H, W):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


# ==== BRANCHES: criterion branch, training branch, probes ====
# The authors' model/dino/DinoFeaturizer.py (the branches) and model/STEGO.py (the probes).

CRIT_DROPOUT = 0.1        # Dropout2d on the criterion features: DinoFeaturizer's nn.Dropout2d(p=.1)


class ClusterProbe(nn.Module):
    """n_classes learnable centroids (the authors' ClusterLookup); cosine scores against normalised code."""

    def __init__(self, dim: int, n_classes: int):
        super().__init__()
        self.clusters = nn.Parameter(torch.randn(n_classes, dim))

    def inner(self, code):
        """[B,D,H,W] -> cosine scores [B,K,H,W]."""
        return torch.einsum("bdhw,kd->bkhw", F.normalize(code, dim=1), F.normalize(self.clusters, dim=1))

    @staticmethod
    def loss(scores):
        """The authors' cluster loss on scores [B,K,H,W]: minus the mean of each pixel's best score."""
        return -scores.max(1).values.mean()

    def forward(self, code, alpha: float | None = None):
        """-> (loss, probs [B,K,H,W]): one-hot argmax (alpha None) or softmax(alpha * scores)."""
        s = self.inner(code)
        if alpha is None:
            probs = F.one_hot(s.argmax(1), s.shape[1]).permute(0, 3, 1, 2).to(s.dtype)
        else:
            probs = torch.softmax(alpha * s, dim=1)
        return -(probs * s).sum(1).mean(), probs


class PPAP(nn.Module):
    """Frozen backbone; criterion branch crit (decides positives/negatives); training branch code -> z; probes.

    The backbone is used through its contract only (features, make_head, code; see above). Built in the
    authors' order (DinoFeaturizer, then STEGOmodel): head (a copy, no random draw), projection, cluster probe,
    linear probe, so that one seed gives the authors' initial projection and probes."""

    def __init__(self, backbone: nn.Module, n_classes: int, cluster_probes: int = 1):
        super().__init__()
        self.backbone = backbone.requires_grad_(False)
        self.head = backbone.make_head().requires_grad_(True)
        D = backbone.embed_dim
        self.proj = nn.Linear(D, D)
        self.cluster_probe = ClusterProbe(D, n_classes)
        self.linear_probe = nn.Conv2d(D, n_classes, 1)
        self.n_classes, self.patch_size, self.dim = n_classes, backbone.patch_size, D
        if cluster_probes > 1:     # drawn after the authors' modules, which keep their initial values
            self.extra_cluster_probes = nn.ModuleList(ClusterProbe(D, n_classes) for _ in range(cluster_probes - 1))
            self.register_buffer("cluster_loss_ema", torch.full((cluster_probes,), float("nan")))

    def cluster_probes(self) -> list:
        """The authors' cluster probe, then the extra ones (--cluster-probes)."""
        return [self.cluster_probe, *getattr(self, "extra_cluster_probes", [])]

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()           # frozen: never in training mode (it has no dropout, but be explicit)
        return self

    def forward(self, x, crit_keep: torch.Tensor | None = None, probes: bool = False,
                head_in: torch.Tensor | None = None, crit: torch.Tensor | None = None):
        """x normalised [B,3,H,W] -> {'code' [B,D,h,w], 'z' [B*h*w,D] unit rows, 'crit' [B,D,h,w]};
        h = patch_grid(H, p): a side that is not a multiple of the patch is resized first (fit_to_patch).

        crit_keep [B,D]: the criterion dropout in training (crit_dropout_mask); None leaves crit as is.
        probes: also the probes' outputs on the detached code (training: the probes learn inside the same
        forward call, as DistributedDataParallel needs): 'linear_logits' [B,C,h,w], 'cluster_scores' a list
        of [B,K,h,w], one per cluster probe.
        head_in, crit: the backbone's trunk(x) and crit_features, already computed (--feature-cache); with
        head_in alone the frozen backbone runs only crit_features, with both nothing."""
        x = fit_to_patch(x, self.patch_size)
        with torch.no_grad():
            if head_in is None:
                head_in, crit = self.backbone.features(x)
            elif crit is None:
                crit = self.backbone.crit_features(head_in, (x.shape[-2] // self.patch_size,
                                                             x.shape[-1] // self.patch_size))
        if crit_keep is not None:
            crit = crit * crit_keep.to(crit.device, crit.dtype)[:, :, None, None]
        code = self.backbone.code(self.head(head_in), crit.shape[-2:])
        B, D, h, w = code.shape
        z = F.normalize(self.proj(code.permute(0, 2, 3, 1).reshape(B * h * w, D)), dim=1)
        out = {"code": code, "z": z, "crit": crit}
        if probes:
            out["linear_logits"] = self.linear_probe(code.detach())
            out["cluster_scores"] = [p.inner(code.detach()) for p in self.cluster_probes()]
        return out

    def head_parameters(self):
        return list(self.head.parameters()) + list(self.proj.parameters())


def crit_dropout_mask(batch: int, dim: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Dropout2d(p=CRIT_DROPOUT) on the criterion features as a [B,D] mask: whole channels dropped, the rest
    scaled by 1/(1-p). Drawn on the CPU from the run's step generator, so the draw is the same on every
    device and resumes exactly."""
    keep = torch.empty(batch, dim).bernoulli_(1 - CRIT_DROPOUT, generator=generator)
    return keep / (1 - CRIT_DROPOUT)


def build_model(cfg: Config, n_classes: int, weights: bool = True) -> PPAP:
    """PPAP on the configured backbone; weights=False leaves the backbone randomly initialised (a checkpoint's
    state dict replaces it)."""
    return PPAP(build_backbone(cfg) if weights else new_backbone(cfg.arch, cfg.patch), n_classes,
                cfg.cluster_probes)

# ==== PROPAGATION AND LOSS: progressive proxy anchor propagation with an ambiguity zone ====
# The paper's method section; the authors' loss.py, SupConLoss.forward. For each anchor, positives start
# as the samples above the positiveness boundary Phi_0; the proxy anchor then moves T times to the mean of
# its positives, and the further it moves, the looser Phi (more positives) and the higher the ambiguity
# boundary Psi (samples between Psi and Phi leave the negatives). A supervised-contrastive loss follows.

TAU_BASE = 0.07           # SupCon's base temperature, which the authors left at SupConLoss's default


def draw_anchors(n_rows: int, group: int, n_anchors: int, generator=None) -> torch.Tensor:
    """One torch.randperm per group, as the authors do -> within-group positions [n_rows // group, A]."""
    perms = [torch.randperm(group, generator=generator)[:n_anchors] for _ in range(n_rows // group)]
    return torch.stack(perms) if perms else torch.empty(0, n_anchors, dtype=torch.long)


def not_anchor(rows: torch.Tensor, n: int) -> torch.Tensor:
    """[a,N] bool, False where sample j is anchor i itself: no anchor is its own positive or negative."""
    others = torch.ones(len(rows), n, dtype=torch.bool, device=rows.device)
    others[torch.arange(len(rows), device=rows.device), rows] = False
    return others


def _fp16(x: float) -> float:
    # The authors keep Phi and Psi in float16 tensors: their boundaries start from the fp16-rounded values.
    return float(torch.tensor(x, dtype=torch.float16))


class PPAPLoss:
    """The PPAP loss, built once from the config (build_loss) and called once per step by train_step:

        share, stats = criterion(z, f, generator, part)

    Its hyper-parameters are the Config fields marked loss=True, read here as self.cfg.<name> and nowhere else.
    A fork subclasses it (sets() is the positive / negative rule, propagate() the proxy's moves) or writes any
    class with the same __call__, and returns it from build_loss; eval.py --propagation measures the sets of
    whatever loss build_loss returns (it needs anchors() and propagate())."""

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def __call__(self, z, f, generator: torch.Generator | None = None, part: tuple[int, int] = (0, 1)):
        """z [N,D] unit rows (with gradient), f [N,D] criterion features (no gradient) of the whole batch (in a
        job of several processes: every process's rows, gathered). The anchors of every group are drawn (the
        same draws in every process); part = (k, n): compute the k-th of n consecutive shares of the groups.
        -> (this share of the loss, {statistic: this share of its mean over the groups}): the shares of the
        processes add up to the one-process values."""
        rows = self.anchors(f.shape[0], generator)
        mine = torch.tensor_split(torch.arange(len(rows)), part[1])[part[0]]
        return self.anchored(z, f, rows[mine], n_groups=len(rows))

    def anchors(self, n_rows: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """The anchors of every full group of `group` rows (the authors' split: rows past the last full group
        are contrast samples, never anchors): group / trainpatchsplit per group, drawn by draw_anchors ->
        global row ids [n_rows // group, A]."""
        group = self.cfg.group
        positions = draw_anchors(n_rows, group, group // self.cfg.trainpatchsplit, generator)
        return positions + torch.arange(len(positions))[:, None] * group

    def sets(self, sim, pos, psi, rows):
        """One step's sets: positives `pos` (above Phi), confident negatives below Psi (every non-positive
        with --no-ambiguity), the anchor itself in neither; the rest is the ambiguity zone, which leaves the
        loss's denominator. -> (positives, negatives) [a,N] bool; both may hold a sample where Phi < Psi."""
        neg = ~pos if self.cfg.no_ambiguity else sim < psi
        others = not_anchor(rows, sim.shape[1])
        return pos & others, neg & others

    def propagate(self, f: torch.Tensor, rows: torch.Tensor, trace: list | None = None):
        """Move each anchor's proxy toward the dense region of its positives.

        f [N,D] unit rows, rows [a] anchor row ids -> (positives, negatives) [a,N] (sets()). Proxies are
        mask @ f products: no [a,N,D] tensor is ever built (the authors' code builds one).

        trace: None (training: nothing recorded, nothing extra computed), or a list that receives one dict per
        step t = 0..T (eval.py --propagation measures the paper's claim with it): 'pos', 'neg' [a,N] bool, the
        sets had propagation stopped after step t; 'sim' [a,N], the similarity to the step's proxy (t = 0: the
        anchor itself); 'phi', 'psi' [a,1], the boundaries Phi_t and Psi_t that defined them (t = 0: the exact
        Phi_0, as the positives use it)."""
        c = self.cfg
        N = f.shape[0]
        fa = f[rows]
        sim = fa @ f.T                                              # [a,N]
        pos = sim > c.phi0                                          # P0 = {j : s_j > Phi0}
        phi = torch.full((len(rows), 1), _fp16(c.phi0), device=f.device)
        psi = torch.full((len(rows), 1), _fp16(c.psi0), device=f.device)
        if trace is not None:
            trace.append({"sim": sim, "phi": torch.full_like(phi, c.phi0), "psi": psi,
                          **dict(zip(("pos", "neg"), self.sets(sim, pos, psi, rows)))})
        v_prev = fa
        for _ in range(c.prop_iter):
            # proxy: the mean of the positives, re-normalised (the /N keeps the authors' mean; it cancels)
            v = F.normalize((pos.to(f.dtype) @ f) / N, dim=1)
            sim = v @ f.T
            moved = 1.0 - F.cosine_similarity(v_prev, v, dim=1)[:, None]
            psi = psi + moved / c.sigma_amb                         # further move -> wider ambiguity zone
            phi = phi - moved / c.sigma_pos                         #             -> looser positive boundary
            pos = sim > phi
            v_prev = v
            if trace is not None:
                trace.append({"sim": sim, "phi": phi, "psi": psi,
                              **dict(zip(("pos", "neg"), self.sets(sim, pos, psi, rows)))})
        return self.sets(sim, pos, psi, rows)

    def anchored(self, z, f, rows, n_groups: int | None = None, chunk_elems: int | None = None):
        """The loss of given anchors: rows [G, A] global row ids, one line per group (anchors()).

        Every row of z/f is a contrast sample. An anchor's loss is -(tau / TAU_BASE) * mean over its positives
        of log p, with the ambiguous samples left out of p's denominator; anchors without positives are skipped;
        group loss = mean over its anchors; the result = sum over these groups / n_groups (default G, the mean).
        Anchors of several groups are processed together in chunks of about chunk_elems similarity entries
        (default 2^20 on CPU, where caches favour small blocks, and 2^26 on GPUs, where large products pay), so
        memory is O(chunk) plus one byte per anchor and sample for the backward pass, whatever the batch.
        -> (loss scalar, {'positives', 'negatives'}: mean per anchor, as a share of the n_groups groups)."""
        c = self.cfg
        N = z.shape[0]
        G, A = rows.shape
        assert G > 0 and int(rows.max()) < (N // c.group) * c.group, "anchors must lie in full groups"
        f = F.normalize(f.detach().float(), dim=-1)
        z = z.float()
        rows = rows.to(z.device).reshape(-1)
        per_chunk = max(1, (chunk_elems or (2 ** 26 if z.is_cuda else 2 ** 20)) // N)
        anchor_loss = torch.zeros(len(rows), device=z.device)
        has_pos = torch.zeros(len(rows), dtype=torch.bool, device=z.device)
        n_pos = torch.zeros(len(rows), device=z.device)
        n_neg = torch.zeros(len(rows), device=z.device)
        for s in range(0, len(rows), per_chunk):
            r = rows[s:s + per_chunk]
            with torch.no_grad():
                pos, neg = self.propagate(f, r)
                n_pos[s:s + len(r)], n_neg[s:s + len(r)] = pos.sum(1), neg.sum(1)
                valid = pos.any(1)                              # anchors without positives are skipped
            if not valid.any():
                continue
            # ambiguous samples (neither positive nor negative) leave the denominator
            member = torch.where(pos, 2, neg.to(torch.uint8))[valid]   # positive wins where Phi fell below Psi
            mean_log_prob = anchor_log_prob(z, r[valid], member, c.tau)
            idx = torch.arange(s, s + len(r), device=z.device)[valid]
            anchor_loss = anchor_loss.index_put((idx,), -(c.tau / TAU_BASE) * mean_log_prob)
            has_pos[idx] = True
        n_groups = n_groups or G
        per_group = anchor_loss.view(G, A).sum(1) / has_pos.view(G, A).sum(1).clamp(min=1)
        stats = {"positives": (n_pos.view(G, A).mean(1).sum() / n_groups).item(),
                 "negatives": (n_neg.view(G, A).mean(1).sum() / n_groups).item()}
        loss = per_group.sum() / n_groups
        if z.requires_grad and not loss.requires_grad:     # no anchor had a positive: a zero that still backprops
            loss = loss + 0 * z.sum()
        return loss, stats


def build_loss(cfg: Config) -> PPAPLoss:
    """The training objective's contrastive term, built once per run. A fork returns its own loss here."""
    return PPAPLoss(cfg)


class _AnchorLogProb(torch.autograd.Function):
    """mean over P of log p_aj for a block of anchors, -> [a]. Autograd would keep the [a,N] logits (and a
    masked copy) of every block for the backward pass; this keeps one byte per entry (the positive /
    negative / ambiguous mask) and recomputes the logits with one more matrix product."""

    @staticmethod
    def forward(ctx, z, rows, member, tau):
        """z [N,D], rows [a] anchor rows, member [a,N] uint8 (2 positive, 1 negative, 0 ambiguous or self)."""
        logits = (z[rows] @ z.T).div_(tau)
        pos = member == 2
        n_pos = pos.sum(1)
        pos_sum = (logits * pos).sum(1)
        log_denom = torch.logsumexp(logits.masked_fill_(member == 0, float("-inf")), dim=1)
        ctx.save_for_backward(z, rows, member, log_denom, n_pos)
        ctx.tau = tau
        return pos_sum / n_pos - log_denom

    @staticmethod
    def backward(ctx, grad):
        z, rows, member, log_denom, n_pos = ctx.saved_tensors
        za = z[rows]
        # d out / d(za @ z.T) = grad * (1[positive] / |P| - softmax over the denominator) / tau
        g = (za @ z.T).div_(ctx.tau).sub_(log_denom[:, None]).exp_().masked_fill_(member == 0, 0).neg_()
        g.add_((member == 2) * (1.0 / n_pos)[:, None]).mul_((grad / ctx.tau)[:, None])
        dz = g.T @ za
        dz.index_add_(0, rows, g @ z)
        return dz, None, None, None


anchor_log_prob = _AnchorLogProb.apply


def loss_hyper(cfg: Config) -> dict:
    """The loss's hyper-parameters (the Config fields marked loss=True) and their values, for reports."""
    return {f.name: getattr(cfg, f.name) for f in fields(Config) if f.metadata.get("loss")}

# ==== TRAIN STEP ====
# The authors' run.py: three optimisers (head + projection, linear probe, cluster probe), one GradScaler,
# gradient clipping on head + projection, probes trained on the detached code.

GRAD_SCALER_INIT, GRAD_SCALER_GROWTH = 2048, 1000   # run.py: GradScaler(init_scale=2048, growth_interval=1000)
CLUSTER_EMA = 0.98        # --cluster-probes: each probe's clustering loss is averaged over the last ~50 steps


def amp_dtype(cfg: Config, device) -> torch.dtype | None:
    """The precision policy, decided here only: the autocast dtype for cfg on device, or None for fp32.
    Unset --amp means on for CUDA (the authors train and evaluate under autocast) and off on the CPU."""
    on = cfg.amp if cfg.amp is not None else torch.device(device).type == "cuda"
    if not on:
        return None
    return torch.bfloat16 if cfg.amp_dtype == "bf16" else torch.float16


def autocast(device, dtype: torch.dtype | None):
    """The context every forward pass runs in: autocast to `dtype` (amp_dtype), or fp32 when it is None."""
    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None)


def make_scaler(cfg: Config, device) -> torch.amp.GradScaler:
    """Loss scaling for fp16 autocast (the authors' settings); a no-op otherwise."""
    return torch.amp.GradScaler(torch.device(device).type, init_scale=GRAD_SCALER_INIT,
                                growth_interval=GRAD_SCALER_GROWTH,
                                enabled=amp_dtype(cfg, device) == torch.float16)


def build_optimizers(cfg: Config, model: PPAP):
    net_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    net_kw = dict(weight_decay=cfg.weight_decay) if cfg.optimizer == "adamw" or cfg.weight_decay else {}
    return {"net": net_cls(model.head_parameters(), lr=cfg.lr, **net_kw),
            "linear": torch.optim.Adam(model.linear_probe.parameters(), lr=cfg.linear_lr),
            "cluster": torch.optim.Adam([p for c in model.cluster_probes() for p in c.parameters()], lr=cfg.cluster_lr)}


def probe_losses(out: dict, label, n_classes: int):
    """The probes' losses from PPAP.forward(..., probes=True) -> (sum of the linear-probe cross-entropy over
    the labelled pixels (logits upsampled to the label size), number of those pixels, the cluster probes'
    losses [K], the authors' probe first)."""
    logits = F.interpolate(out["linear_logits"], label.shape[-2:], mode="bilinear", align_corners=False)
    logits = logits.permute(0, 2, 3, 1).reshape(-1, n_classes)
    flat = label.reshape(-1)
    keep = (flat >= 0) & (flat < n_classes)
    linear_sum = F.cross_entropy(logits[keep].float(), flat[keep], reduction="sum")
    return linear_sum, keep.sum(), torch.stack([ClusterProbe.loss(s) for s in out["cluster_scores"]])


class Diverged(PPAPError):
    """The loss is not a finite number: training cannot continue from here."""


def _has_grad(opt) -> bool:
    return any(p.grad is not None for group in opt.param_groups for p in group["params"])


def train_step(model, batch, opts, scaler, cfg: Config, device, criterion, generator: torch.Generator | None = None) -> dict:
    """One step: forward, contrastive loss (criterion, see build_loss) + probe losses, backward, clip, the three
    optimisers. `generator` draws the step's randomness (criterion dropout, anchors).

    Written for one process; under torchrun the helpers of the last support section take part: `batch` is this
    process's share of the global batch, my_rows() its slice of each global random draw, gather_rows() every
    process's rows for the loss, all_sum() the global sums. Each term of the objective is this process's share
    of the one-process loss; backward() runs on the shares times the world size, so that the average that
    DistributedDataParallel takes is the one-process gradient.
    -> stats of the global batch: the losses, the gradient norm, whatever statistics the criterion reports, and
    'skipped' (1 when some gradients were not finite: the optimisers holding them did not step, as GradScaler
    does per optimiser, and fp16 loss scaling halved its scale)."""
    core = unwrap(model)
    img = batch["img"].to(device, non_blocking=True)
    label = batch["label"].to(device, non_blocking=True)
    for o in opts.values():
        o.zero_grad(set_to_none=True)
    dtype = amp_dtype(cfg, device)
    keep = my_rows(crit_dropout_mask(img.shape[0] * world_size(), core.dim, generator))
    # --feature-cache: the frozen backbone's output for these crops, read from the cache (CachedTrunkSet)
    cached = {k: batch[k].to(device, non_blocking=True) for k in ("head_in", "crit") if k in batch}
    with autocast(device, dtype):
        out = model(img, crit_keep=keep, probes=True, **cached)
        linear_sum, n_labelled, clusters = probe_losses(out, label, core.n_classes)
    linear = linear_sum / all_sum(n_labelled.float()).clamp(min=1)
    clusters = clusters / world_size()
    # what is logged (and averaged for --cluster-probes) is the cluster loss's mean taken in fp32: under autocast
    # the loss itself is rounded to fp16/bf16. The objective keeps the loss as it is (the same gradient).
    logged_clusters = torch.stack([ClusterProbe.loss(s.detach().float()) for s in out["cluster_scores"]]) / world_size()
    objective, shares, loss_stats = linear + clusters.sum(), {"linear": linear, "cluster": logged_clusters}, {}
    if cfg.ppap_weight:    # weight 0 is the baseline: no gradient reaches head/projection
        crit = out["crit"]
        f = crit.permute(0, 2, 3, 1).reshape(-1, crit.shape[1]).detach()
        shares["ppap"], loss_stats = criterion(gather_rows(out["z"]), gather_rows(f), generator,
                                               (dist_rank(), world_size()))
        objective = objective + cfg.ppap_weight * shares["ppap"]
    logged = all_sum_dict({**shares, **loss_stats}, device)          # one collective for everything logged
    linear_v, cluster_vs = logged.pop("linear"), logged.pop("cluster")
    cluster_v = cluster_vs[0]                            # the authors' probe; extra probes are not their loss
    if len(cluster_vs) > 1:                              # the label-free choice among the probes
        ema = core.cluster_loss_ema
        new = torch.tensor(cluster_vs, device=ema.device)
        ema.copy_(torch.where(torch.isnan(ema), new, CLUSTER_EMA * ema + (1 - CLUSTER_EMA) * new))
    loss_v = linear_v + cluster_v + (cfg.ppap_weight * logged["ppap"] if cfg.ppap_weight else 0.0)
    if not math.isfinite(loss_v):
        raise Diverged(f"the loss is {loss_v} (" + ", ".join(f"{k} {v:.4g}" for k, v in
                                                             [("linear", linear_v), ("cluster", cluster_v),
                                                              *logged.items()]) + ")")
    scaler.scale(objective * world_size()).backward()
    # Only optimisers whose parameters received a gradient step (with --ppap-weight 0 the head gets none, and
    # GradScaler.step refuses an optimiser it has recorded no inf check for).
    stepping = [o for o in opts.values() if _has_grad(o)]
    gnorm = 0.0
    if opts["net"] in stepping:
        scaler.unscale_(opts["net"])
        gnorm = float(nn.utils.clip_grad_norm_(core.head_parameters(), cfg.grad_clip))
    with signals_deferred():                     # a stop waits until every optimiser has stepped
        if scaler.is_enabled():
            scale = scaler.get_scale()
            for o in stepping:
                scaler.step(o)                   # skips the step itself when the gradients hold inf/NaN
            scaler.update()
            skipped = scaler.get_scale() < scale
        else:                                    # the same rule without a scaler: skip what is not finite
            finite = [bool(torch.stack([torch.isfinite(p.grad).all() for g in o.param_groups for p in g["params"]
                                        if p.grad is not None]).all()) for o in stepping]
            for o, ok in zip(stepping, finite):
                if ok:
                    o.step()
            skipped = not all(finite)
    return {"loss": loss_v, "linear": linear_v, "cluster": cluster_v, "grad_norm": gnorm, **logged,
            "skipped": int(skipped)}

# ==== TRAINING LOOP: setup, steps, validation ====

def banner(title: str) -> None:
    print(f"\n{'=' * 20} {title} {'=' * (60 - len(title))}", flush=True)


def validation_due(cfg: Config, step: int, steps_per_epoch: int, total: int) -> bool:
    """Validate after this step? Every val_every steps and at the end; with --select-on-val the authors'
    schedule instead (run.py: every val_every steps counted from each epoch start, and at every epoch end)."""
    if step == total:
        return True
    if cfg.select_on_val:
        in_epoch = (step - 1) % steps_per_epoch + 1
        return in_epoch == steps_per_epoch or bool(cfg.val_every and in_epoch % cfg.val_every == 0)
    return bool(cfg.val_every and step % cfg.val_every == 0)


def _format_stats(st: dict) -> dict:
    return {k: f"{v:.3g}" if isinstance(v, float) else v for k, v in st.items()}


def train(cfg: Config, ckpt: dict | None = None) -> dict:
    """Train PPAP as configured (continuing ``ckpt`` when given); returns the final validation metrics.
    Everything goes to cfg.run, which this process (rank 0 of a job) holds locked while it trains."""
    device = setup_distributed(cfg.device, cfg.batch_size)
    cfg.run = from_rank0(cfg.run or default_run_dir(cfg))     # the processes' clocks may straddle a second
    check_same_config(cfg)
    continuing = ckpt is not None and ckpt["_file"] == os.path.abspath(os.path.join(cfg.run, "last.pt"))
    with stop_signals(), claim_run_dir(cfg.run, continuing) if dist_rank() == 0 else contextlib.nullcontext():
        barrier()                                               # rank 0 has checked the run directory
        return train_loop(start_run(cfg, ckpt, device))


@dataclass
class Run:
    """A training run between two steps: what it trains, where it stands, where it writes."""
    cfg: Config
    device: torch.device
    core: PPAP                              # the model
    model: nn.Module                        # what the step calls: core, or its DistributedDataParallel wrapper
    criterion: PPAPLoss
    opts: dict
    scaler: torch.amp.GradScaler
    train_set: torch.utils.data.Dataset
    full_loader: torch.utils.data.DataLoader       # the whole val set (the end of training)
    periodic_loader: torch.utils.data.DataLoader   # the fixed subset of the periodic validations
    log: RunLog | None                      # log.jsonl (rank 0 only)
    step_gen: torch.Generator               # anchors and criterion dropout, step after step
    steps_per_epoch: int
    total: int                              # the step training ends at
    resumed: bool = False
    linear: bool = True                     # the train set has labels: the linear probe learns and is scored
    scored: bool = True                     # the val set has labels: validations score the probes
    step: int = 0
    best: dict | None = None                # --select-on-val: {'score', 'step'} of best_on_val.pt
    skipped: int = 0                        # steps whose non-finite gradients were not applied
    saved: int | None = None                # the step last.pt holds
    step_rng: torch.Tensor | None = None    # step_gen's state as the next step starts


def start_run(cfg: Config, ckpt: dict | None, device: torch.device) -> Run:
    """Print the configuration, build data, model, loss and optimisers, and restore ``ckpt`` when given."""
    banner("config")
    print(f"git {git_commit()} | torch {torch.__version__} | device {device}")
    for k, v in asdict(cfg).items():
        print(f"  {k:18s} {v}")
    note = threshold_note(cfg)
    if note:
        print(note)

    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)          # the model's initialisation (the authors' seed_everything)
    banner("data")
    if int(os.environ.get("LOCAL_RANK", "0")):
        time.sleep(2)       # let local rank 0 build a missing five-crop set (and show its progress); we wait
    train_set, val_set = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    if cfg.val_limit:
        val_set = subset(val_set, range(min(cfg.val_limit, len(val_set))))
    print(f"train {len(train_set)} images ({cfg.img_size}px), val {len(val_set)} images ({cfg.val_size}px), "
          f"{train_set.n_classes} classes")
    linear, scored = getattr(train_set, "labelled", True), getattr(val_set, "labelled", True)
    if not linear:
        print("the train images have no labels: PPAP and the cluster probe train as usual; the linear probe (which "
              "the authors train on train labels) is not trained and not reported")
    if not scored:
        print("the val images have no labels: the run trains and saves, and nothing can be scored")
    if len(train_set) < cfg.batch_size:
        raise PPAPError(f"the train set has {len(train_set)} images, fewer than --batch-size {cfg.batch_size}")
    if len(val_set) == 0:
        raise PPAPError(f"the {cfg.data} val set under {cfg.data_dir} has no images: nothing could ever be scored")
    h = cfg.img_size // cfg.patch
    if cfg.ppap_weight and cfg.batch_size * h * h < cfg.group * world_size():
        raise PPAPError(f"a batch of {cfg.batch_size} has {cfg.batch_size * h * h} patches, fewer than one "
                        f"anchor group ({cfg.group}) per process; raise --batch-size or lower --group")

    banner("model")
    core = build_model(cfg, train_set.n_classes).to(device)
    opts = build_optimizers(cfg, core)
    scaler = make_scaler(cfg, device)
    step_gen = torch.Generator().manual_seed(cfg.seed)
    step, best, skipped = 0, None, 0
    if ckpt is not None:
        restore(ckpt, core, opts, scaler, step_gen)
        step, best, skipped = ckpt["step"], ckpt.get("best"), ckpt.get("skipped_steps", 0)
        print(f"resumed {cfg.run} at step {step}")
    n_train = sum(p.numel() for p in core.head_parameters())
    print(f"{cfg.arch}/{cfg.patch}: {sum(p.numel() for p in core.backbone.parameters()) / 1e6:.1f}M frozen, "
          f"{n_train / 1e6:.2f}M trained (head + projection)" + (
              f"; {world_size()} processes, {cfg.batch_size // world_size()} images each per step"
              if world_size() > 1 else ""))

    if cfg.feature_cache:        # every train crop's frozen trunk output, computed once (open_feature_cache)
        train_set = open_feature_cache(cfg, core.backbone, train_set, device)
    steps_per_epoch = len(train_set) // cfg.batch_size
    total = cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    val_bs = max(1, min(cfg.batch_size, 8))
    periodic_set = val_set
    if cfg.val_subset and cfg.val_subset < len(val_set) and not cfg.select_on_val:
        periodic_set = subset(val_set, np.linspace(0, len(val_set) - 1, cfg.val_subset).round().astype(int))
    full_loader = make_loader(cfg, val_set, train=False, batch_size=val_bs, persistent=periodic_set is val_set)
    periodic_loader = full_loader if periodic_set is val_set else \
        make_loader(cfg, periodic_set, train=False, batch_size=val_bs, persistent=True)
    log = RunLog(os.path.join(cfg.run, "log.jsonl"), after=step if ckpt is not None else 0) \
        if dist_rank() == 0 else None
    return Run(cfg=cfg, device=device, core=core, model=distributed(core, device, cfg), criterion=build_loss(cfg),
               opts=opts, scaler=scaler, train_set=train_set, full_loader=full_loader,
               periodic_loader=periodic_loader, log=log, step_gen=step_gen, steps_per_epoch=steps_per_epoch,
               total=total, resumed=ckpt is not None, linear=linear, scored=scored, step=step, best=best,
               skipped=skipped,
               saved=step if ckpt is not None else None, step_rng=step_gen.get_state())


def restore(ckpt: dict, core: PPAP, opts: dict, scaler, step_gen: torch.Generator) -> None:
    """Put a checkpoint's weights, optimiser, scaler and generator states back, each checked first."""
    file = ckpt["_file"]
    if not {"optim", "scaler", "step"} <= set(ckpt) or "step" not in ckpt.get("rng", {}):
        raise PPAPError(f"{file} was written by an older version of ppap.py and cannot be resumed exactly; "
                        f"evaluate it with eval.py, or start a new run")
    check_weights(core, ckpt["model"], file)
    core.load_state_dict(ckpt["model"])
    for k, o in opts.items():
        theirs, params = ckpt["optim"][k], [p for g in o.param_groups for p in g["params"]]
        ids = [i for g in theirs["param_groups"] for i in g.get("params", [])]
        if len(ids) != len(params) or any(
                torch.is_tensor(t) and t.dim() and t.shape != p.shape
                for i, p in zip(ids, params) for t in theirs["state"].get(i, {}).values()):
            raise PPAPError(f"{file}: the state of optimiser '{k}' does not fit its {len(params)} parameters (a "
                            f"damaged checkpoint)")
        o.load_state_dict(theirs)
    if scaler.is_enabled() and ckpt["scaler"]:            # a CPU or bf16 run has no scaler state to restore
        scaler.load_state_dict(ckpt["scaler"])
    try:
        step_gen.set_state(ckpt["rng"]["step"])
    except RuntimeError:
        raise PPAPError(f"{file}: 'rng' holds no generator state (a damaged checkpoint)") from None


def save(run: Run, selection: str = "last") -> None:
    """Write last.pt (or best_on_val.pt): the weights must be finite, and alike in every process."""
    bad = [k for k, v in run.core.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise Diverged(f"non-finite weights ({', '.join(bad[:3])})")
    check_same_weights(run.core, run.step)
    if dist_rank() == 0:
        save_checkpoint(run.core, run.opts, run.scaler, run.cfg, run.step, run.train_set, run.best, selection,
                        rng={"step": run.step_rng}, skipped_steps=run.skipped)
    if selection == "last":
        run.saved = run.step


def validate(run: Run) -> dict:
    """The full val set at the end (and under --select-on-val, the authors' schedule); the fixed subset in
    between, which only draws the curve. -> the log record."""
    cfg = run.cfg
    if not run.scored:
        return {"step": run.step}
    loader = run.full_loader if run.step == run.total else run.periodic_loader
    metrics = evaluate(run.core, loader, run.device, amp=amp_dtype(cfg, run.device), progress=cfg.progress,
                       linear=run.linear)
    record = {"step": run.step, **{k: v for k, v in metrics.items() if isinstance(v, float)},
              "val_images": metrics["n_images"], "full": loader is run.full_loader, "skipped_steps": run.skipped}
    if run.scaler.is_enabled():
        record["loss_scale"] = run.scaler.get_scale()
    if run.log is not None:
        run.log.append(record)
    print(f"[val step {run.step}, {metrics['n_images']} images] " + "  ".join(
        f"{k} {v:.2f}" for k, v in record.items() if k.endswith(("_mIoU", "_Acc"))), flush=True)
    if cfg.select_on_val:
        score = sum(record.get(k, 0) for k in ("cluster_mIoU", "cluster_Acc", "linear_mIoU", "linear_Acc"))
        if run.best is None or score >= run.best["score"]:
            run.best = {"score": score, "step": run.step}
            save(run, "best-on-val")
            save(run)                                    # last.pt records the new best too
    run.model.train()
    return record


def train_loop(run: Run) -> dict:
    """Step until run.total, validating on schedule; -> the final validation metrics."""
    cfg = run.cfg
    banner("train")
    run.model.train()
    metrics = None
    if run.resumed:
        metrics = from_rank0(run.log.record(run.step) if run.log is not None else None)
        if metrics is None and run.step and validation_due(cfg, run.step, run.steps_per_epoch, run.total):
            metrics = validate(run)                      # the interrupted run saved, then failed to validate
    bar = tqdm(total=run.total, initial=run.step, dynamic_ncols=True, desc="train", disable=not cfg.progress)
    try:
        while run.step < run.total:
            epoch, skip = divmod(run.step, run.steps_per_epoch)
            for batch in make_loader(cfg, run.train_set, train=True, epoch=epoch, skip=skip):
                t0 = time.time()
                # a stop signal waits until the step is applied and recorded: never a step half done, or done
                # and not counted (last.pt would label the new weights with the old step)
                with signals_deferred():
                    st = train_step(run.model, batch, run.opts, run.scaler, cfg, run.device, run.criterion,
                                    run.step_gen)
                    run.step, run.skipped, run.step_rng = run.step + 1, run.skipped + st.pop("skipped"), \
                        run.step_gen.get_state()
                bar.update(1)
                extra = {"skipped": run.skipped} if run.skipped else {}
                if run.scaler.is_enabled():
                    extra["scale"] = f"{run.scaler.get_scale():g}"
                bar.set_postfix(_format_stats(st), **extra, ips=f"{cfg.batch_size / (time.time() - t0):.1f}")
                if validation_due(cfg, run.step, run.steps_per_epoch, run.total):
                    bar.clear()
                    with signals_deferred():
                        save(run)                        # first: a failing validation must not lose the steps
                    metrics = validate(run)
                if run.step == run.total:
                    break
    except BaseException as e:
        bar.close()
        raise stopping(run, e) from None
    bar.close()
    if metrics is None:            # resumed a finished run whose last validation is not in the log
        metrics = validate(run)
    banner("result")
    selection = "last checkpoint" + (f" (best-on-val kept separately at step {run.best['step']})" if run.best else "")
    if "cluster_mIoU" not in metrics:
        print(f"{selection}: nothing scored (the val images have no labels)")
    else:
        print(f"{selection}: unsupervised mIoU {metrics['cluster_mIoU']:.2f}  Acc {metrics['cluster_Acc']:.2f}"
              + (f" | linear mIoU {metrics['linear_mIoU']:.2f}  Acc {metrics['linear_Acc']:.2f}" if run.linear else ""))
    if run.skipped:
        print(f"{run.skipped} step(s) were skipped for non-finite gradients")
    print(f"run: {cfg.run}  (evaluate with: python eval.py --run {shlex.quote(cfg.run)})")
    return metrics


def out_of_memory(e: BaseException) -> bool:
    """torch's CUDA OOM, or the CPU allocator's RuntimeError."""
    return isinstance(e, torch.OutOfMemoryError) or isinstance(e, RuntimeError) and (
        "out of memory" in str(e) or "can't allocate memory" in str(e))


def stopping(run: Run, e: BaseException) -> BaseException:
    """The one exit path of a training process, whatever ended the loop (a stop signal, a data error, an
    exception from the step, divergence, lack of memory): save the last finished step when last.pt does not
    hold it yet and its weights are finite (no signal interrupts that save), then -> the exception to raise,
    whose one line says which step last.pt holds and how to continue. An unexpected error keeps its
    traceback (that line goes to stderr first)."""
    note = ""
    if run.step and run.saved != run.step:
        try:
            with signals_deferred(reraise=False):
                save(run)
        except Diverged as d:
            note = f"step {run.step} was not saved: {d}; "
        except PPAPError as d:
            note = f"saving step {run.step} failed: {d}; "
    last = os.path.join(run.cfg.run, "last.pt")
    where = note + (f"{last} holds step {run.saved}; continue with: python ppap.py --resume "
                    f"{shlex.quote(run.cfg.run)}" if run.saved is not None else "nothing was saved")
    signum = e.signum if isinstance(e, Stopped) else signal.SIGINT if isinstance(e, KeyboardInterrupt) else \
        _stop.received[0] if _stop.received else None
    if signum is not None:                   # also a loader error that a stop signal to the workers caused
        return Stopped(signum, f"stopped by {signal.Signals(signum).name} at step {run.step}: {where}")
    if isinstance(e, Diverged):
        return Diverged(f"training diverged at step {run.step + 1}: {e}; stopped ({where})")
    if isinstance(e, PPAPError):
        return PPAPError(f"{one_line(e)} (stopped at step {run.step}: {where})")
    if out_of_memory(e):
        return PPAPError(f"out of memory in step {run.step + 1} on {run.device} with --batch-size "
                         f"{run.cfg.batch_size}: lower --batch-size (or use several GPUs) ({where})")
    print(f"error: stopped at step {run.step} by an unexpected error (traceback below): {where}", file=sys.stderr)
    return e

# ==== THE EVALUATION PROTOCOL: metrics and evaluate ====
# The authors' utils/seg_utils.py UnsupervisedMetrics and run.py's evaluation.
# confusion[c, k] counts val pixels of ground-truth class c predicted as k (cluster id or linear class);
# C rows, K >= C columns; labels outside [0, C) and predictions outside [0, K) are not counted; one matrix
# over the whole val set. The cluster probe is scored after the Hungarian matching of clusters to classes
# (linear_sum_assignment(maximize=True) on the authors' [clusters, classes] layout, i.e. maximising matched
# pixels); then IoU_c = TP/(TP+FP+FN) (NaN for 0/0, skipped), mIoU = 100 nanmean(IoU), Acc = 100 TP/all.
# More clusters than classes (K > C), as the authors: every class gets its own cluster and the pixels of
# unmatched clusters are pooled into one extra pseudo-class whose IoU (0 when it holds pixels) is part of
# the mean. The linear probe uses the identity mapping. All in float64 (the authors: float32, ~1e-7 apart).

def confusion_update(conf, pred, label, n_classes: int, n_preds: int | None = None):
    """Add the pixels of ``pred``/``label`` (same shape, integer) to ``conf``.

    ``conf`` is a [n_classes, n_preds] int64 tensor (or None: a new one is made on pred's device).
    Labels outside [0, n_classes) and predictions outside [0, n_preds) are ignored. Returns conf.
    """
    n_preds = n_classes if n_preds is None else int(n_preds)
    if n_preds < n_classes:
        raise ValueError(f"n_preds ({n_preds}) < n_classes ({n_classes})")
    pred = torch.as_tensor(pred)
    label = torch.as_tensor(label, device=pred.device)
    if pred.shape != label.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and label {tuple(label.shape)} differ in shape")
    if conf is None:
        conf = torch.zeros(n_classes, n_preds, dtype=torch.int64, device=pred.device)
    elif tuple(conf.shape) != (n_classes, n_preds):
        raise ValueError(f"confusion has shape {tuple(conf.shape)}, expected {(n_classes, n_preds)}")
    p = pred.reshape(-1).long()
    t = label.reshape(-1).long()
    keep = (t >= 0) & (t < n_classes) & (p >= 0) & (p < n_preds)
    counts = torch.bincount(t[keep] * n_preds + p[keep], minlength=n_classes * n_preds)
    conf += counts.reshape(n_classes, n_preds).to(device=conf.device, dtype=conf.dtype)
    return conf


def _as_numpy_counts(confusion) -> np.ndarray:
    if isinstance(confusion, torch.Tensor):
        confusion = confusion.detach().cpu().numpy()
    a = np.asarray(confusion)
    if a.ndim != 2:
        raise ValueError(f"confusion must be 2-D, got shape {a.shape}")
    if np.issubdtype(a.dtype, np.integer) or a.dtype == bool:
        return a.astype(np.int64)
    return a.astype(np.float64)


def _iou_acc(hist: np.ndarray):
    """hist[true, pred] square -> (IoU array with NaN for 0/0, Acc in [0,1] or NaN)."""
    hist = hist.astype(np.float64)
    tp = np.diag(hist)
    denom = hist.sum(axis=0) + hist.sum(axis=1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(denom > 0, tp / np.where(denom > 0, denom, 1.0), np.nan)
    total = hist.sum()
    return iou, (tp.sum() / total if total > 0 else float("nan"))


def scores(confusion, hungarian: bool) -> dict:
    """Scores of one confusion matrix (``confusion[c, k]``: class c predicted as k).

    hungarian=True (cluster probe): clusters matched to classes as the authors do (see above, incl. K > C);
    hungarian=False (linear probe): identity mapping, the matrix must be square. Returns a dict:
      mIoU, Acc        float, x100 (NaN if no pixel was counted)
      IoU              list of C floats, x100, NaN where undefined
      IoU_extra        (K > C only) IoU of the pooled unmatched clusters, x100
      assignment       list of K ints: class of each cluster/prediction (-1: unmatched)
      class_to_cluster list of C ints: cluster shown in column c of ``matched``
      matched          [C(+1), C(+1)] nested list: confusion after the matching (rows = true class)
      n_pixels         int, pixels counted
    """
    conf = _as_numpy_counts(confusion)
    C, K = conf.shape
    if C == 0:
        raise ValueError("confusion has no classes")
    if K < C:
        raise ValueError(f"confusion has fewer columns ({K}) than classes ({C})")
    extra = False
    if not hungarian:
        if K != C:
            raise ValueError("identity mapping (hungarian=False) needs a square confusion matrix")
        class_to_cluster = assignment = np.arange(C)
        hist = conf
    else:
        rows, cols = linear_sum_assignment(conf.T, maximize=True)     # authors' layout: [clusters, classes]
        assignment = np.full(K, -1, dtype=np.int64)
        assignment[rows] = cols
        if K == C:
            class_to_cluster = np.argsort(assignment, kind="stable")
            hist = conf[:, class_to_cluster]
        else:   # one cluster per class, and the clusters the cluster-side matching left out pooled as "extra"
            _, class_to_cluster = linear_sum_assignment(conf, maximize=True)
            missing = sorted(set(range(K)) - set(rows.tolist()))
            hist = np.zeros((C + 1, C + 1), dtype=conf.dtype)
            hist[:C, :C] = conf[:, class_to_cluster]
            hist[:C, C] = conf[:, missing].sum(axis=1)
            extra = True
    iou, acc = _iou_acc(hist)
    valid = ~np.isnan(iou)
    out = {
        "mIoU": float(iou[valid].mean()) * 100.0 if valid.any() else float("nan"),
        "Acc": float(acc) * 100.0,
        "IoU": [float(v) * 100.0 for v in iou[:C]],
        "assignment": [int(v) for v in assignment],
        "class_to_cluster": [int(v) for v in class_to_cluster],
        "matched": hist.tolist(),
        "n_pixels": int(conf.sum()) if np.issubdtype(conf.dtype, np.integer) else float(conf.sum()),
    }
    if extra:
        out["IoU_extra"] = float(iou[C]) * 100.0
    return out


# Probes whose predictions are cluster ids (scored after the Hungarian matching), by name prefix: the cluster
# probe (and its CRF) and eval.py's k-means diagnostic. Every other probe predicts classes.
MATCHED_PROBES = ("cluster", "kmeans")


def _unpack_batch(batch):
    return (batch["img"], batch["label"]) if isinstance(batch, dict) else (batch[0], batch[1])


@torch.no_grad()
def evaluate(model: PPAP, loader, device, amp: torch.dtype | None = None, refine=None, n_examples: int = 0,
             progress: bool = True, desc: str = "val", linear: bool = True) -> dict:
    """The evaluation protocol on val items {'img','label'} (the authors' run.py evaluate).

    Per batch: code = model(img)['code'] upsampled bilinearly (align_corners=False) to the label size;
    linear prediction = argmax(linear_probe(code)); cluster prediction = argmax of the cosine scores with
    the centroids. ``refine(img, linear_logits, cluster_scores, code) -> {probe: pred}`` (code: the upsampled
    code [B,D,H,W]) adds predictions (eval.py's CRF and k-means); a probe whose name starts with one of
    MATCHED_PROBES predicts cluster ids and is Hungarian-matched, the others predict classes. One confusion
    matrix per probe over the loader. ``amp``: autocast dtype or None (fp32). linear=False leaves out the linear
    probe (a run without train labels never trained it; refine then gets linear_logits None).

    Returns a flat dict; for each probe P: P_mIoU, P_Acc (x100), P_IoU (per class), P_IoU_extra (K > C),
    P_confusion [C,K], P_assignment, P_matched (see ``scores``); plus n_images and examples (dicts of uint8
    RGB 'image', 'label' and each probe's raw prediction, for eval.plot_examples). Scalars are floats/ints and
    everything else a list, so the dict goes straight into a JSON log after dropping lists. The model's
    train/eval mode is restored afterwards.
    """
    device = torch.device(device)
    n_classes, n_clusters = int(model.n_classes), int(model.cluster_probe.clusters.shape[0])
    confs, examples, n_images = {}, [], 0
    new_confusion = lambda k: torch.zeros(n_classes, n_clusters if k.startswith("cluster") else n_classes,
                                          dtype=torch.int64, device=device)
    chosen = None                        # --cluster-probes: the one with the lowest clustering loss
    if hasattr(model, "extra_cluster_probes"):
        chosen = model.cluster_probes()[int(torch.nan_to_num(model.cluster_loss_ema, float("inf")).argmin())]
    with evaluating(model):
        for batch in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=not progress):
            img, label = _unpack_batch(batch)
            img = img.to(device, non_blocking=True)
            label = label.to(device, non_blocking=True).long()
            # as the authors: featurizer and probes under autocast, the upsampling outside it
            with autocast(device, amp):
                code = model(img)["code"]
            code = F.interpolate(code, size=label.shape[-2:], mode="bilinear", align_corners=False)
            with autocast(device, amp):
                linear_logits = model.linear_probe(code)
                inner = model.cluster_probe.inner(code)
                preds = {"cluster": inner.argmax(1), **({"linear": linear_logits.argmax(1)} if linear else {})}
                if chosen is not None:
                    preds["cluster_sel"] = chosen.inner(code).argmax(1)
            if refine is not None:
                preds.update(refine(img, linear_logits if linear else None, inner, code))
            for k, p in preds.items():
                if k not in confs:
                    confs[k] = new_confusion(k)
                confusion_update(confs[k], p, label, n_classes, confs[k].shape[1])
            if len(examples) < n_examples:
                rgb = to_uint8_rgb(img).cpu()
                for i in range(min(img.shape[0], n_examples - len(examples))):
                    examples.append({"image": rgb[i].numpy(), "label": label[i].cpu().numpy(),
                                     **{k: p[i].cpu().numpy() for k, p in preds.items()}})
            n_images += img.shape[0]
    if world_size() > 1:                        # each process saw its share of the images: add the counts up
        for k in all_names(confs):
            confs[k] = all_sum(confs[k] if k in confs else new_confusion(k))
        confs = {k: confs[k] for k in sorted(confs, key=lambda k: (k not in ("cluster", "linear"), k))}
        n_images = int(all_sum(torch.tensor(n_images, device=device)))
    out = {}
    for k, conf in confs.items():
        conf = conf.cpu()
        sc = scores(conf, hungarian=k.startswith(MATCHED_PROBES))
        out[f"{k}_mIoU"], out[f"{k}_Acc"] = sc["mIoU"], sc["Acc"]
        if "IoU_extra" in sc:
            out[f"{k}_IoU_extra"] = sc["IoU_extra"]
        out[f"{k}_IoU"] = sc["IoU"]
        out[f"{k}_confusion"] = conf.tolist()
        out[f"{k}_assignment"] = sc["assignment"]
        out[f"{k}_matched"] = sc["matched"]
    out["n_images"] = n_images
    out["examples"] = examples
    return out




@contextlib.contextmanager
def evaluating(model: nn.Module):
    """model.eval() for the block, then the train/eval mode it had."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)

# =================================================================================================== MACHINERY
# ==== SUPPORT: DINOv2's ViT (dinov2/models/vision_transformer.py) on the blocks above ====

class LayerScale(nn.Module):
    """DINOv2's learned per-channel scale of each residual branch (dinov2/layers/layer_scale.py): x * gamma."""

    def __init__(self, dim: int, init: float = 1.0):       # DINOv2's hub models use init_values=1.0
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x):
        return x * self.gamma


class DinoV2ViT(VisionTransformer):
    """DINOv2's ViT (dinov2/models/vision_transformer.py, DinoVisionTransformer, as dinov2/hub/backbones.py
    builds it: 518 px, i.e. a 37x37 positional grid at patch 14, LayerScale, no block chunks) on the blocks
    above. Tokens are CLS, the registers (reg models: 4 learned tokens without a position), then the
    patches. mask_token is only used by DINOv2's masked training; it is kept so the released state dicts
    load with strict=True. Key names and their order are those of DinoVisionTransformer.state_dict()."""

    def __init__(self, embed_dim: int, depth: int, num_heads: int, n_registers: int = 0,
                 interp_offset: float = 0.1, interp_antialias: bool = False, patch_size: int = 14,
                 img_size: int = 518):
        super().__init__(patch_size, embed_dim, depth, num_heads, img_size=img_size, layerscale=True)
        self.n_registers, self.n_prefix = n_registers, 1 + n_registers
        self.interp_offset, self.interp_antialias = interp_offset, interp_antialias
        # drawn as the CLS token is (the released weights replace both; DINOv2's own init is N(0, 1e-6))
        self.register_tokens = nn.Parameter(trunc_normal_(torch.zeros(1, n_registers, embed_dim))) \
            if n_registers else None
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))

    def prepare_tokens(self, x):
        """[B,3,H,W] -> [B,1+R+h*w,D]: CLS and patches with their positions, then the R registers inserted
        after CLS (DinoVisionTransformer.prepare_tokens_with_masks)."""
        t = super().prepare_tokens(x)
        if self.register_tokens is None:
            return t
        return torch.cat((t[:, :1], self.register_tokens.expand(t.shape[0], -1, -1).to(t.dtype), t[:, 1:]), dim=1)


# dinov2/hub/backbones.py: the plain models keep DINO's resize (offset 0.1, no antialias); the register
# models (4 registers) resize to the exact size with antialiasing. name -> (width, depth, heads, registers)
DINOV2_SHAPES = {"dinov2_vits14": (384, 12, 6, 0), "dinov2_vitb14": (768, 12, 12, 0),
                 "dinov2_vits14_reg": (384, 12, 6, 4), "dinov2_vitb14_reg": (768, 12, 12, 4)}


def dinov2(name: str, patch_size: int = 14) -> DinoV2ViT:
    if patch_size != 14:
        raise PPAPError(f"{name} has patch size 14, not {patch_size}")
    dim, depth, heads, registers = DINOV2_SHAPES[name]
    return DinoV2ViT(dim, depth, heads, n_registers=registers, interp_offset=0.0 if registers else 0.1,
                     interp_antialias=bool(registers))



# ==== SUPPORT: the backbone registry and its weights ====

@dataclass(frozen=True)
class BackboneSpec:
    """--arch NAME: how the backbone is built, its patch sizes, its released weights, the presets it borrows."""
    build: Callable[[int], nn.Module]       # patch size -> the backbone (random init; weights are loaded after)
    patches: tuple[int, ...]                # the --patch values it exists for (the first is its own)
    weights: dict = field(default_factory=dict)   # patch -> URL of the released weights ({}: none, random init)
    presets: str = ""                       # borrow the PRESETS rows of this arch at patch 8 ('' = its own)
    about: str = ""                         # what --help says of it


DINO_URL = "https://dl.fbaipublicfiles.com/dino/"
# DINOv2's released backbones (dinov2/hub/backbones.py: <base>/<model>/<model>[_reg4]_pretrain.pth)
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/"


def _dinov2_spec(name: str, width: str, file: str) -> BackboneSpec:
    return BackboneSpec(functools.partial(dinov2, name), (14,), {14: DINOV2_URL + file}, presets=width,
                        about="DINOv2" + (", 4 registers" if "reg" in name else ""))


# `bash download.sh weights` fetches every released file below into the torch hub cache, under its basename.
BACKBONES = {
    "vit_small": BackboneSpec(vit_small, (8, 16), {16: DINO_URL + "dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth",
                                                   8: DINO_URL + "dino_deitsmall8_300ep_pretrain/dino_deitsmall8_300ep_pretrain.pth"},
                              about="DINO ViT-S"),
    "vit_base": BackboneSpec(vit_base, (8, 16), {16: DINO_URL + "dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",
                                                 8: DINO_URL + "dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth"},
                             about="DINO ViT-B"),
    "dinov2_vits14": _dinov2_spec("dinov2_vits14", "vit_small", "dinov2_vits14/dinov2_vits14_pretrain.pth"),
    "dinov2_vitb14": _dinov2_spec("dinov2_vitb14", "vit_base", "dinov2_vitb14/dinov2_vitb14_pretrain.pth"),
    "dinov2_vits14_reg": _dinov2_spec("dinov2_vits14_reg", "vit_small", "dinov2_vits14/dinov2_vits14_reg4_pretrain.pth"),
    "dinov2_vitb14_reg": _dinov2_spec("dinov2_vitb14_reg", "vit_base", "dinov2_vitb14/dinov2_vitb14_reg4_pretrain.pth"),
    "vit_tiny_demo": BackboneSpec(vit_tiny_demo, (8, 16), about="random init, the offline demo's"),
}


def released_weights() -> list[str]:
    """The URL of every released backbone file in BACKBONES (`bash download.sh weights` fetches these)."""
    return [url for spec in BACKBONES.values() for url in spec.weights.values()]


def new_backbone(arch: str, patch: int) -> nn.Module:
    """BACKBONES[arch] at `patch`, randomly initialised."""
    if arch not in BACKBONES:
        raise PPAPError(f"unknown --arch {arch!r}; choose one of {', '.join(BACKBONES)}")
    return BACKBONES[arch].build(patch)


def dino_state_dict(obj) -> dict:
    """Released DINO or DINOv2 weights (plain state dicts), or a DINO training checkpoint ({'teacher': ...}
    with module./backbone. prefixes)."""
    if isinstance(obj, dict) and "teacher" in obj:
        obj = obj["teacher"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise PPAPError("not a DINO state dict (expected tensors, or a checkpoint with a 'teacher' entry)")
    out = {}
    for k, v in obj.items():
        k = k.removeprefix("module.").removeprefix("backbone.")
        if not k.startswith("head."):          # the DINO projection head is not part of the backbone
            out[k] = v
    return out


def key_mismatch(own: dict, theirs: dict, free_shape=()) -> tuple[list, list, list]:
    """The strict-loading check: (missing keys, unexpected keys, keys whose shapes differ), in own's order;
    keys in free_shape may differ in shape (a positional grid of another resolution)."""
    missing = [k for k in own if k not in theirs]
    unexpected = [k for k in theirs if k not in own]
    wrong = [k for k in own if k in theirs and k not in free_shape
             and tuple(getattr(theirs[k], "shape", ())) != tuple(own[k].shape)]
    return missing, unexpected, wrong


def load_backbone_weights(vit: VisionTransformer, path: str) -> None:
    """Load a DINO- or DINOv2-format file into vit with strict=True; any mismatch is one clear PPAPError."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise PPAPError(f"weights file not found: {path}") from None
    except Exception as e:
        reason = " ".join(str(e).split())[:120] or "empty or cut short"
        cached = os.path.dirname(os.path.abspath(path)) == os.path.abspath(os.path.join(torch.hub.get_dir(), "checkpoints"))
        raise PPAPError(f"cannot read weights {path}: {type(e).__name__}: {reason}" + (
            " — a download cut short? delete it and run: bash download.sh weights" if cached else "")) from None
    sd = dino_state_dict(obj)
    missing, unexpected, wrong = key_mismatch(vit.state_dict(), sd, free_shape=("pos_embed",))
    if missing or unexpected or wrong:
        what = (f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}" if unexpected
                else f"shape mismatch at {wrong[:3]}")
        kind = "DINOv2 ViT" if isinstance(vit, DinoV2ViT) else "ViT"
        regs = f" with {vit.n_prefix - 1} registers" if vit.n_prefix > 1 else ""
        raise PPAPError(f"{path} does not fit {vit.embed_dim}-wide {kind}/{vit.patch_size}{regs} ({what}); "
                        f"check --arch/--patch, or run: bash download.sh weights")
    pe = sd["pos_embed"]
    g = math.isqrt(max(pe.shape[1] - 1, 0)) if pe.dim() == 3 else 0
    if pe.dim() != 3 or pe.shape[0] != 1 or pe.shape[2] != vit.embed_dim or g < 1 or g * g != pe.shape[1] - 1:
        raise PPAPError(f"{path}: pos_embed {tuple(pe.shape)} is not a square grid [1, 1+g*g, {vit.embed_dim}]")
    vit.adopt_pos_grid(pe)
    vit.load_state_dict(sd, strict=True)


def build_backbone(cfg: Config) -> nn.Module:
    """The frozen backbone for cfg.arch/cfg.patch, with weights from --weights, else the released ones (via the
    torch hub cache), else none (an arch without released weights keeps its random init)."""
    backbone = new_backbone(cfg.arch, cfg.patch)
    url = BACKBONES[cfg.arch].weights.get(cfg.patch)
    path = cfg.weights
    if not path and url is None:
        return backbone
    if not path:
        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
        if not os.path.exists(path):
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)     # a fresh TORCH_HOME has none
                torch.hub.download_url_to_file(url, path, progress=cfg.progress)
            except Exception as e:
                raise PPAPError(f"cannot fetch backbone weights {url} ({type(e).__name__}); run: "
                                f"bash download.sh weights, or pass --weights FILE") from None
    load_backbone_weights(backbone, path)
    return backbone


# ==== SUPPORT: datasets, their registry and the five-crop set ====

# ---- the offline demo's synthetic dataset
# A deterministic procedural dataset for the offline demo and the tests. Each image is a random Voronoi
# layout of regions; each region belongs to one of SYNTH_CLASSES classes that differ in colour and texture
# (stripe orientation and frequency, grain). A per-image colour cast, brightness and contrast change make the
# raw features informative but not cleanly clustered, as DINO features are on real scenes.

SYNTH_CLASSES = ["red grain", "green stripes", "blue checks", "yellow smooth", "purple waves", "grey noise"]
_SYNTH_COLOURS = np.array([[0.75, 0.30, 0.25], [0.35, 0.65, 0.30], [0.25, 0.35, 0.80],
                           [0.80, 0.75, 0.30], [0.70, 0.30, 0.70], [0.35, 0.35, 0.35]], dtype=np.float32)
SYNTH_PALETTE = np.round(255 * _SYNTH_COLOURS / _SYNTH_COLOURS.max(1, keepdims=True) * [[0.9], [0.8], [0.9], [0.95],
                                                                                        [0.85], [0.5]]).astype(np.uint8)


def synthetic_sample(index: int, size: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    """One procedural image: (image [size,size,3] float32 in [0,1], label [size,size] int64)."""
    rng = np.random.default_rng([index, 0 if split == "train" else 1])
    n_regions = rng.integers(3, 7)
    seeds = rng.uniform(0, size, (n_regions, 2))
    classes = rng.choice(len(SYNTH_CLASSES), n_regions, replace=n_regions > len(SYNTH_CLASSES))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    # warped distances give curved region borders
    warp = 6 * np.sin(yy / 9 + rng.uniform(0, 6)) + 6 * np.cos(xx / 11 + rng.uniform(0, 6))
    dist = ((yy[None] + warp - seeds[:, 0, None, None]) ** 2 + (xx[None] - seeds[:, 1, None, None]) ** 2)
    region = dist.argmin(0)
    label = classes[region].astype(np.int64)
    img = np.zeros((size, size, 3), np.float32)
    for r, c in enumerate(classes):
        m = region == r
        angle = rng.uniform(0, np.pi) if c != 1 else rng.uniform(-0.3, 0.3)
        x, y = xx[m], yy[m]                    # the region's pixels only: every texture is drawn there
        u = x * np.cos(angle) + y * np.sin(angle)
        v = -x * np.sin(angle) + y * np.cos(angle)
        if c == 0:
            texture = rng.normal(0, 0.18, x.shape)
        elif c == 1:
            texture = 0.25 * np.sign(np.sin(u / 2.0))
        elif c == 2:
            texture = 0.22 * np.sign(np.sin(u / 3.0)) * np.sign(np.sin(v / 3.0))
        elif c == 3:
            texture = np.zeros(x.shape)
        elif c == 4:
            texture = 0.2 * np.sin(u / 4.0 + 2 * np.sin(v / 7.0))
        else:
            texture = rng.normal(0, 0.3, x.shape)
        colour = _SYNTH_COLOURS[c] + rng.normal(0, 0.06, 3)
        img[m] = colour + texture[:, None].astype(np.float32)
    cast = rng.normal(0, 0.08, 3).astype(np.float32)
    contrast = rng.uniform(0.6, 1.3)
    img = (img - 0.5) * contrast + 0.5 + cast + rng.normal(0, 0.04, img.shape).astype(np.float32)
    return np.clip(img, 0, 1).astype(np.float32), label


class SyntheticDataset(torch.utils.data.Dataset):
    """Procedural segmentation data; items {'img': normalised [3,S,S], 'label': [S,S]} (no ignore pixels)."""
    class_names = SYNTH_CLASSES
    n_classes = len(SYNTH_CLASSES)

    def __init__(self, split: str, size: int, length: int | None = None):
        self.split, self.size = split, size
        self.length = length or (2000 if split == "train" else 64)

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        img, label = synthetic_sample(i, self.size, self.split)
        img = normalize(torch.from_numpy(img).permute(2, 0, 1)[None])[0]
        return {"img": img, "label": torch.from_numpy(label)}


# ---- real datasets
# Real benchmarks: COCO-Stuff-27, Cityscapes-27, Potsdam-3, ImageNet-S (50/300/919).
# Layout under --data-dir is what `bash download.sh <name> DATA_DIR` produces:
#   cocostuff/{images,annotations}/{train2017,val2017}/<id>.{jpg,png}, cocostuff/curated/<split>/<list>.txt
#   cityscapes/leftImg8bit/<split>/<city>/*_leftImg8bit.png, cityscapes/gtFine/<split>/<city>/*_gtFine_labelIds.png
#   potsdam/{imgs,gt}/<id>.mat, potsdam/labelled_{train,test}.txt
#   imagenet-s/ImageNetS<K>/{validation,train-semi}/<wnid>/<name>.JPEG + {validation,train-semi}-segmentation/<wnid>/<name>.png
# Train splits of COCO and Cityscapes are the five-crop sets, built once (and automatically)
# under DATA_DIR/cropped/<dataset>_five_crop_0.5/{img,label}/train/<5i+k>.{jpg,png}.
# COCO-Stuff 164k fine id (0..181, index into the tuple) -> COCO-Stuff-27 coarse id.
# Coarse ids 0-11 are the thing supercategories, 12-26 the stuff supercategories; 'food' and
# 'furniture' occur once as thing and once as stuff.  Fine id 255 (unlabelled) -> -1.
COCOSTUFF27_CLASS_NAMES = (
    "electronic", "appliance", "food", "furniture", "indoor", "kitchen", "accessory", "animal",
    "outdoor", "person", "sports", "vehicle", "ceiling", "floor", "food", "furniture",
    "rawmaterial", "textile", "wall", "window", "building", "ground", "plant", "sky", "solid",
    "structural", "water")
COCOSTUFF27_FINE_TO_COARSE = (
    9, 11, 11, 11, 11, 11, 11, 11, 11, 8, 8, 8, 8, 8, 8, 7, 7, 7, 7, 7,            # 0-19
    7, 7, 7, 7, 7, 6, 6, 6, 6, 6, 6, 6, 6, 10, 10, 10, 10, 10, 10, 10,             # 20-39
    10, 10, 10, 5, 5, 5, 5, 5, 5, 5, 5, 2, 2, 2, 2, 2, 2, 2, 2, 2,                 # 40-59
    2, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 0, 0, 0, 0, 0, 0, 1, 1, 1,                    # 60-79
    1, 1, 1, 4, 4, 4, 4, 4, 4, 4, 4, 17, 17, 22, 20, 20, 22, 15, 25, 16,           # 80-99
    13, 12, 12, 17, 17, 23, 15, 15, 17, 15, 21, 15, 25, 13, 13, 13, 13, 13, 22, 26,  # 100-119
    14, 14, 15, 22, 21, 21, 24, 20, 22, 15, 17, 16, 15, 22, 24, 21, 17, 25, 16, 21,  # 120-139
    17, 22, 16, 21, 21, 25, 21, 26, 21, 24, 20, 17, 14, 21, 26, 15, 23, 20, 21, 24,  # 140-159
    15, 24, 22, 25, 15, 20, 17, 17, 22, 14, 18, 18, 18, 18, 18, 18, 18, 26, 26, 19,  # 160-179
    19, 24)                                                                         # 180-181

# Cityscapes labelIds 7..33 -> 0..26 (labelId - 7); ids 0..6 (void) and anything else -> -1.
CITYSCAPES27_CLASS_NAMES = (
    "road", "sidewalk", "parking", "rail track", "building", "wall", "fence", "guard rail",
    "bridge", "tunnel", "pole", "polegroup", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "caravan", "trailer", "train",
    "motorcycle", "bicycle")

# Potsdam fine 0..5 -> 3 classes; 255 (and anything else) -> -1.
POTSDAM3_CLASS_NAMES = ("roads and cars", "buildings and clutter", "trees and vegetation")
POTSDAM3_FINE_TO_COARSE = {0: 0, 4: 0, 1: 1, 5: 1, 2: 2, 3: 2}

IMAGENET_S_IGNORE = 1000       # mask value R + 256*G; 0 = background/other, 1..K classes
FIVE_CROP_RATIO = 0.5
_FIVE_CROP_VERSION = 2          # 1: JPEG quality 95, 4:4:4 (before the authors' encoding became the default)
# Version 2 caches built while crops still carried a source's JPEG comment segment are kept: they differ from a
# new build by that segment alone, never by a decoded pixel, so training on them is identical; a rebuild (hours
# for COCO-Stuff) would buy nothing but the bytes. Delete the folder to get byte-identical files.


def _lut(mapping, size=256):
    """int64 look-up table: index -> coarse id, -1 for ids not in `mapping`."""
    lut = np.full(size, -1, dtype=np.int64)
    for fine, coarse in (mapping.items() if isinstance(mapping, dict) else enumerate(mapping)):
        lut[fine] = coarse
    return lut


def _apply_lut(lut, arr):
    arr = np.asarray(arr).astype(np.int64)
    return np.where((arr >= 0) & (arr < len(lut)), lut[np.clip(arr, 0, len(lut) - 1)], -1)


_COCO_LUT = _lut(COCOSTUFF27_FINE_TO_COARSE)
_CITYSCAPES_LUT = _lut({i: i - 7 for i in range(7, 34)})
_POTSDAM_LUT = _lut(POTSDAM3_FINE_TO_COARSE)


def _missing(path, dataset, data_dir, hint=""):
    target = DATASETS[dataset].download if dataset in DATASETS else ""
    return PPAPError(f"missing {path}" + (f" — run: bash download.sh {target} {data_dir}{hint}" if target else hint))


def _damaged(e: Unreadable, dataset, data_dir):
    """An unreadable file of a dataset download.sh fetches: deleting it makes download.sh restore it."""
    target = DATASETS[dataset].download if dataset in DATASETS else ""
    return PPAPError(f"{e} — delete it, then run: bash download.sh {target} {data_dir} (it restores missing "
                     f"files)" if target else f"{e} — replace or remove that file")


def _require(paths, dataset, data_dir, hint=""):
    for p in paths:
        if not os.path.exists(p):
            raise _missing(p, dataset, data_dir, hint)


def _read_list(path):
    """The non-empty lines of a list file, each once (a repeated id would count its image twice)."""
    with open(path) as f:
        lines = [ln.strip() for ln in f if ln.strip()]
    unique = list(dict.fromkeys(lines))
    if len(unique) < len(lines):
        print(f"note: {path} lists {len(lines) - len(unique)} id(s) twice; each is used once", file=sys.stderr)
    return unique


def resized_size(w, h, size):
    """(new_w, new_h) with the shorter side = size (torchvision.transforms.Resize(int) rule)."""
    if w <= h:
        return size, int(size * h / w)
    return int(size * w / h), size


def center_box(w, h, cw, ch):
    """(left, top) of a centred cw x ch box; round-half-even like torchvision's center_crop."""
    return int(round((w - cw) / 2.0)), int(round((h - ch) / 2.0))


def resize_center_crop(img, size):
    """PIL image -> shorter side resized to `size` with NEAREST, then centre crop size x size.
    Used for images and labels alike (NEAREST never mixes label values); labels may be mode
    'L' or 'I'."""
    w, h = img.size
    nw, nh = resized_size(w, h, size)
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.NEAREST)
    left, top = center_box(nw, nh, size, size)
    return img.crop((left, top, left + size, top + size))


def five_crop_boxes(w, h, ratio=FIVE_CROP_RATIO):
    """(left, top, right, bottom) of the crops k = 0..4: top-left, top-right, bottom-left,
    bottom-right, centre; each int(h*ratio) x int(w*ratio) -- the boxes of
    torchvision.transforms.functional.five_crop(img, (int(h*ratio), int(w*ratio)))."""
    ch, cw = int(h * ratio), int(w * ratio)
    cl, ct = center_box(w, h, cw, ch)
    tops_lefts = [(0, 0), (0, w - cw), (h - ch, 0), (h - ch, w - cw), (ct, cl)]
    return [(left, top, left + cw, top + ch) for top, left in tops_lefts]


def to_item(img, label):
    """PIL RGB image [S,S] + int label array [S,S] -> {'img': normalised float [3,S,S], 'label': long}."""
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)
    return {"img": normalize(x[None])[0], "label": torch.from_numpy(np.asarray(label, dtype=np.int64).copy())}


def _label_image(arr):
    """int array -> PIL image that NEAREST-resizes without loss ('L' if it fits, else 'I')."""
    arr = np.asarray(arr)
    if arr.min(initial=0) >= 0 and arr.max(initial=0) <= 255:
        return Image.fromarray(arr.astype(np.uint8))          # mode L
    return Image.fromarray(arr.astype(np.int32))              # mode I


# ---- raw loaders: (image path, label path) -> (PIL RGB full resolution, int64 coarse label, -1 ignore)

class Unreadable(PPAPError):
    """A data file that is there but cannot be decoded (truncated, not an image, unreadable)."""


@contextlib.contextmanager
def _reading(path):
    """Turns a file that cannot be decoded into one Unreadable line naming it; a missing file stays
    FileNotFoundError. The dataset that reads it adds what brings it back (_missing, _damaged)."""
    try:
        yield
    except (FileNotFoundError, PPAPError):
        raise
    except Exception as e:                     # PIL, scipy.io and OS errors alike
        reason = " ".join(str(e).replace(f"'{path}'", "").replace(str(path), "").split())[:200]
        reason = reason.rstrip(" :") or type(e).__name__
        raise Unreadable(f"cannot read {path}: {reason}") from None


def open_rgb(path) -> Image.Image:
    """An image file -> PIL RGB, 8 bits per channel. 16-bit and float grey images are scaled to 8 bits
    (Pillow's convert('RGB') would clip them to white)."""
    with _reading(path):
        img = Image.open(path)
        img.load()
        if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            arr = np.asarray(img, dtype=np.float64)
            if img.mode.startswith("I;16") or arr.max(initial=0) > 255:
                arr = arr * (255.0 / 65535.0)
            img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
        return img.convert("RGB")


def open_label(path) -> np.ndarray:
    """A single-channel label file -> int64 [H,W] of the stored ids."""
    with _reading(path):
        lab = np.asarray(Image.open(path))
    if lab.ndim != 2:
        raise PPAPError(f"label {path} has {lab.shape[-1]} channels (an RGB picture?); expected a "
                        f"single-channel map of class ids")
    return lab.astype(np.int64)


def read_cocostuff(img_path, lab_path):
    return open_rgb(img_path), _apply_lut(_COCO_LUT, open_label(lab_path))   # fine 0..181, 255 unlabelled


def read_cityscapes(img_path, lab_path):
    return open_rgb(img_path), _apply_lut(_CITYSCAPES_LUT, open_label(lab_path))   # labelIds 0..33


def _potsdam_image(arr):
    """STEGO's potsdam .mat 'img' is [H,W,4] (RGB + IR).  Keep RGB.  uint8 is used as is; 16-bit integers
    are scaled by 255/65535 (as 16-bit PNGs, open_rgb); float data in [0,1] is scaled by 255, float data with
    values above 1.5 is taken as 0..255; rounded and clipped to uint8."""
    arr = np.asarray(arr)[..., :3]
    if arr.dtype != np.uint8:
        wide = arr.dtype in (np.uint16, np.int32, np.uint32, np.int64) and arr.max(initial=0) > 255
        arr = arr.astype(np.float64)
        if wide:
            arr = arr * (255.0 / 65535.0)
        elif np.nanmax(arr, initial=0.0) <= 1.5:
            arr = arr * 255.0
        arr = np.clip(np.rint(np.nan_to_num(arr)), 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(arr))          # mode RGB


def read_potsdam(img_path, lab_path):
    with _reading(img_path):
        img = _potsdam_image(loadmat(img_path)["img"])
    with _reading(lab_path):
        lab = np.asarray(loadmat(lab_path)["gt"])
        lab = lab.reshape(lab.shape[:2])
    return img, _apply_lut(_POTSDAM_LUT, lab)                  # fine 0..5, 255 ignore


def read_imagenet_s(img_path, lab_path):
    with _reading(lab_path):
        rgb = np.asarray(Image.open(lab_path).convert("RGB")).astype(np.int64)
    lab = rgb[..., 0] + 256 * rgb[..., 1]                     # class id = R + 256*G
    return open_rgb(img_path), np.where(lab == IMAGENET_S_IGNORE, -1, lab)


def read_folder(img_path, lab_path):
    """--data folder: any image Pillow reads (as open_rgb reads the benchmarks'), a label PNG of uint8 class
    ids with 255 = ignore; no label file (an unlabelled split) = every pixel ignored."""
    img = open_rgb(img_path)
    if lab_path is None:
        return img, np.full((img.height, img.width), -1, dtype=np.int64)
    lab = open_label(lab_path)
    return img, np.where(lab == 255, -1, lab)


def read_five_crop(img_path, lab_path):
    return open_rgb(img_path), open_label(lab_path) - 1       # stored as label + 1


def load_pair(read, img_path, lab_path, n_classes: int | None = None):
    """One (image, label) pair through its dataset's reader, at its stored resolution -> (PIL RGB, int64
    label, -1 = ignore); a label of another size than its image is an error (resizing it would silently move
    every boundary), and so is a class id of n_classes or more."""
    img, lab = read(img_path, lab_path)
    if n_classes is not None and lab.size and lab.max() >= n_classes:
        raise PPAPError(f"label {lab_path} holds class {int(lab.max())}, but the dataset has {n_classes} classes "
                        f"(0-{n_classes - 1}; 255 = ignore)")
    if lab.shape != (img.height, img.width):
        raise PPAPError(f"label {lab_path} is {lab.shape[1]}x{lab.shape[0]} but image {img_path} "
                        f"is {img.width}x{img.height}")
    return img, lab


class RealSegDataset(torch.utils.data.Dataset):
    """Pairs (image, label) of files read by `read` (the dataset's reader; five-crop sets: read_five_crop),
    resized (shorter side, NEAREST) and centre-cropped to `size`."""

    def __init__(self, name, read, pairs, size, class_names, data_dir="data", labelled=True):
        self.name, self.read, self.pairs, self.size = name, read, list(pairs), int(size)
        self.n_classes, self.class_names, self.data_dir = len(class_names), list(class_names), data_dir
        self.labelled = labelled            # False: no label files (every pixel is ignored)

    def __len__(self):
        return len(self.pairs)

    def load_raw(self, i):
        """-> (PIL RGB image, int64 label array with -1 = ignore), at the stored resolution."""
        try:
            img, lab = load_pair(self.read, *self.pairs[i], n_classes=self.n_classes)
        except FileNotFoundError as e:
            if self.read is read_five_crop:
                raise PPAPError(f"missing {e.filename} — delete {self._crops(i)} to rebuild the five-crop set") from None
            raise _missing(e.filename, self.name, self.data_dir) from None
        except Unreadable as e:
            if self.read is read_five_crop:
                raise PPAPError(f"{e} — delete {self._crops(i)} to rebuild the five-crop set") from None
            raise _damaged(e, self.name, self.data_dir) from None
        return img, lab

    def _crops(self, i):
        return os.path.dirname(os.path.dirname(os.path.dirname(self.pairs[i][0])))

    def __getitem__(self, i):
        img, lab = self.load_raw(i)
        img = resize_center_crop(img, self.size)
        lab = np.asarray(resize_center_crop(_label_image(lab + 1), self.size), dtype=np.int64) - 1
        return to_item(img, lab)


# ---- five-crop cache (the authors' crop_datasets.py, which does not run as shipped; ours does)

def _five_crop_one(task):
    """Worker: crop source pair i into 5 (image, label+1) files; skips files already present."""
    read, i, img_path, lab_path, out, quality, n_classes, name, data_dir = task
    names = [(os.path.join(out, "img", "train", f"{5 * i + k}.jpg"),
              os.path.join(out, "label", "train", f"{5 * i + k}.png")) for k in range(5)]
    if all(os.path.exists(p) for pair in names for p in pair):
        return i
    try:
        img, lab = load_pair(read, img_path, lab_path, n_classes)
    except FileNotFoundError as e:
        raise _missing(e.filename, name, data_dir) from None
    except Unreadable as e:
        raise _damaged(e, name, data_dir) from None
    # Pillow's defaults (quality 75, 4:2:0 chroma) are what the authors' and STEGO's crop scripts wrote
    jpeg = dict(quality=quality, subsampling=0) if quality else {}
    stored = Image.fromarray((lab + 1).clip(0, 255).astype(np.uint8))     # mode L
    for (ip, lp), box in zip(names, five_crop_boxes(img.width, img.height)):
        # pixels only, as the authors' script saves Image.fromarray(array): img.crop keeps the source's info,
        # and Pillow writes its JPEG comment back into every crop
        atomic_write(ip, lambda p, c=Image.fromarray(np.asarray(img.crop(box))): c.save(p, format="JPEG", **jpeg))
        atomic_write(lp, lambda p, c=stored.crop(box): c.save(p, format="PNG"))
    return i


def _sources_digest(pairs):
    """Names and sizes of the source files: a replaced image or label changes it, so its stale crops are rebuilt
    instead of silently reused, while a copy of the data (cp -r, rsync: new modification times) keeps it."""
    h = hashlib.sha1()
    for pair in pairs:
        for p in filter(None, pair):
            try:
                st = os.stat(p)
                h.update(f"{os.path.basename(p)}|{st.st_size}\n".encode())
            except OSError:
                h.update(f"{os.path.basename(p)}|missing\n".encode())
    return h.hexdigest()


def five_crop_dir(data_dir, name, ratio=FIVE_CROP_RATIO, quality=0):
    """Our cache: <data_dir>/cropped/<name>_five_crop_<ratio>; a non-default JPEG quality gets a folder of its
    own. (The authors' crop script writes elsewhere and under another name: authors_five_crop_dir.)"""
    return os.path.join(data_dir, "cropped", f"{name}_five_crop_{ratio}" + (f"_q{quality}" if quality else ""))


# The dataset name in the folder of the authors' crop script (their json's "data_type"), for the datasets whose
# crops they number in our order (COCO-Stuff: the curated train list; Cityscapes: their loader's file order is
# the filesystem's, so its crops are not ours, index for index).
_AUTHORS_CROP_NAME = {"cocostuff": "cocostuff27"}


def authors_five_crop_dir(data_dir, name, n_sources, ratio=FIVE_CROP_RATIO) -> str | None:
    """A five-crop set built by the authors' crop script, where their configs' data_path (the dataset's own
    root) puts it: <data_dir>/<name>/cropped/<their name>_five_crop_<ratio>/{img,label}/train/<5i+k>.{jpg,png}
    (STEGO's layout; labels stored as label + 1). -> its folder when it holds exactly the 5 * n_sources crops of
    our source list, else None. Its pixels are those of our own crops (the source's pixels cropped, Pillow's
    default JPEG encoding, no metadata)."""
    if name not in _AUTHORS_CROP_NAME:
        return None
    root = os.path.join(data_dir, name, "cropped", f"{_AUTHORS_CROP_NAME[name]}_five_crop_{ratio}")
    n = 5 * n_sources
    for sub, ext in (("img", ".jpg"), ("label", ".png")):
        try:
            found = {e.name for e in os.scandir(os.path.join(root, sub, "train")) if e.name.endswith(ext)}
        except OSError:
            return None
        if len(found) != n or not all(f"{j}{ext}" in found for j in range(n)):
            return None
    return root


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def build_five_crop(name, read, pairs, data_dir, workers=0, progress=True, quality=0, n_classes=None):
    """Build (once) the five-crop training set of `pairs` and return its directory.

    Crop 5i+k of source pair i is box k of five_crop_boxes (tl, tr, bl, br, centre; half height x
    half width, the geometry of torchvision's five_crop). Images are JPEGs with Pillow's default encoding
    (quality 75, 4:2:0 chroma: the authors' training data) unless `quality` (1-100, with 4:4:4 chroma) asks
    for better; labels are already mapped to the coarse classes and stored as label + 1 in an 8-bit PNG
    (0 = ignore). The set is built in '<dir>.incomplete' (every file written to a temporary name and renamed,
    so an interrupted build resumes from whole files), then 'DONE.json' (source-list digest, counts, encoding)
    is written and the folder renamed to <dir>: a folder without a matching DONE.json (e.g. one built with
    another encoding) is rebuilt, never used. Multi-process (`workers` processes, 0 = all cores), with a
    progress bar; a second call returns at once; concurrent callers wait for one builder."""
    out = five_crop_dir(data_dir, name, quality=quality)
    manifest = {"dataset": name, "version": _FIVE_CROP_VERSION, "ratio": FIVE_CROP_RATIO,
                "jpeg": {"quality": quality, "subsampling": "4:4:4"} if quality else "pillow-default",
                "n_images": len(pairs), "n_crops": 5 * len(pairs), "sources_sha1": _sources_digest(pairs)}
    if _read_json(os.path.join(out, "DONE.json")) == manifest:
        return out
    try:
        os.makedirs(os.path.dirname(out), exist_ok=True)
        lock = open(out + ".lock", "w")
    except OSError as e:
        raise PPAPError(f"cannot create the five-crop cache in {os.path.dirname(out)} ({e.strerror}); its "
                        f"first use needs a writable --data-dir (a copy, or build it once where it is)") from None
    with lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)      # one builder at a time; the others wait, then reuse
        if _read_json(os.path.join(out, "DONE.json")) == manifest:
            return out
        tmp = out + ".incomplete"
        tasks = [(read, i, a, b, tmp, quality, n_classes, name, data_dir) for i, (a, b) in enumerate(pairs)]
        workers = int(workers) if workers and workers > 0 else (os.cpu_count() or 1)
        workers = max(1, min(workers, len(tasks)))
        bar = tqdm(total=len(tasks), desc=f"five-crop {name} -> {out}", unit="img", disable=not progress)
        try:                                      # every write below may meet a full or read-only disk
            if os.path.exists(tmp) and _read_json(os.path.join(tmp, "sources.json")) != manifest:
                shutil.rmtree(tmp)                # leftover of a build from other sources or encoding
            for sub in ("img", "label"):
                d = os.path.join(tmp, sub, "train")
                os.makedirs(d, exist_ok=True)
                for e in os.scandir(d):           # temporaries of a killed builder
                    if ".tmp" in e.name:
                        os.remove(e.path)
            atomic_write(os.path.join(tmp, "sources.json"), lambda p: write_json(p, manifest))
            if workers == 1:
                for t in tasks:
                    _five_crop_one(t)
                    bar.update(1)
            else:
                methods = multiprocessing.get_all_start_methods()
                ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
                with ctx.Pool(workers) as pool:
                    for _ in pool.imap_unordered(_five_crop_one, tasks, chunksize=8):
                        bar.update(1)
            atomic_write(os.path.join(tmp, "DONE.json"), lambda p: write_json(p, manifest))
            replace_folder(tmp, out)              # a stale set (other sources / encoding) goes
        except OSError as e:
            raise PPAPError(f"cannot write the five-crop cache {tmp}: {e.strerror or type(e).__name__} (disk full or "
                            f"read-only?); the next run resumes it") from None
        finally:
            bar.close()
    return out


def five_crop_dataset(name, read, pairs, data_dir, size, class_names, workers=0, progress=True, quality=0):
    """The five-crop training set: the authors' own crop set when it is there (and the default encoding is
    asked for), else our cache, built on first use."""
    out = authors_five_crop_dir(data_dir, name, len(pairs)) if not quality else None
    if out is not None:
        print(f"five-crop: using the authors' crop set {out} ({5 * len(pairs)} crops, built by their crop script; "
              f"the same pixels as our own crops would have)")
    else:
        out = build_five_crop(name, read, pairs, data_dir, workers=workers, progress=progress, quality=quality,
                              n_classes=len(class_names))
    crops = [(os.path.join(out, "img", "train", f"{j}.jpg"),
              os.path.join(out, "label", "train", f"{j}.png")) for j in range(5 * len(pairs))]
    return RealSegDataset(name, read_five_crop, crops, size, class_names, data_dir,
                          labelled=all(lab is not None for _, lab in pairs))


# ---- per-dataset file lists (each checks its layout first)

def cocostuff_pairs(data_dir, split):
    root = os.path.join(data_dir, "cocostuff")
    sub = {"train": "train2017", "val": "val2017"}[split]
    lst = os.path.join(root, "curated", sub, "Coco164kFull_Stuff_Coarse.txt" if split == "train"
                       else "Coco164kFull_Stuff_Coarse_7.txt")
    img_dir, lab_dir = os.path.join(root, "images", sub), os.path.join(root, "annotations", sub)
    _require([img_dir, lab_dir, lst], "cocostuff", data_dir)
    ids = _read_list(lst)
    return [(os.path.join(img_dir, f"{i}.jpg"), os.path.join(lab_dir, f"{i}.png")) for i in ids]


def cityscapes_pairs(data_dir, split):
    root = os.path.join(data_dir, "cityscapes")
    img_dir, lab_dir = os.path.join(root, "leftImg8bit", split), os.path.join(root, "gtFine", split)
    hint = " (or download leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip from cityscapes-dataset.com)"
    _require([img_dir, lab_dir], "cityscapes", data_dir, hint)
    imgs = sorted(glob.glob(os.path.join(img_dir, "*", "*_leftImg8bit.png")))
    if not imgs:
        raise _missing(os.path.join(img_dir, "<city>", "*_leftImg8bit.png"), "cityscapes", data_dir, hint)
    pairs = []
    for p in imgs:
        rel = os.path.relpath(p, img_dir)[:-len("_leftImg8bit.png")]
        lab = os.path.join(lab_dir, rel + "_gtFine_labelIds.png")
        if not os.path.exists(lab):
            raise _missing(lab, "cityscapes", data_dir, hint)
        pairs.append((p, lab))
    return pairs


def potsdam_pairs(data_dir, split):
    root = os.path.join(data_dir, "potsdam")
    lst = os.path.join(root, {"train": "labelled_train.txt", "val": "labelled_test.txt"}[split])
    img_dir, gt_dir = os.path.join(root, "imgs"), os.path.join(root, "gt")
    _require([img_dir, gt_dir, lst], "potsdam", data_dir)
    return [(os.path.join(img_dir, f"{i}.mat"), os.path.join(gt_dir, f"{i}.mat")) for i in _read_list(lst)]


def imagenet_s_pairs(data_dir, split, n=50):
    """ImageNet-S<n>: split 'val' = validation/ + validation-segmentation/, 'train' = train-semi/ +
    train-semi-segmentation/ (the 10 labelled images per class).  Class ids are the mask values
    R + 256*G: 0 = background ('other'), 1..n the classes in sorted-wnid order, 1000 = ignore."""
    root = os.path.join(data_dir, "imagenet-s", f"ImageNetS{n}")
    sub = {"val": "validation", "train": "train-semi"}[split]
    img_dir, seg_dir = os.path.join(root, sub), os.path.join(root, sub + "-segmentation")
    hint = " (with IMAGENET_DIR=<ImageNet-1k root holding train/ and val/> to link the images)"
    _require([seg_dir, img_dir], "imagenet-s", data_dir, hint)
    wnids = sorted(d for d in os.listdir(seg_dir) if os.path.isdir(os.path.join(seg_dir, d)))
    if len(wnids) != n:
        raise PPAPError(f"{seg_dir} has {len(wnids)} class folders, expected {n} — "
                        f"run: bash download.sh imagenet-s {data_dir}")
    pairs = []
    for wnid in wnids:
        for seg in sorted(glob.glob(os.path.join(seg_dir, wnid, "*.png"))):
            stem = os.path.splitext(os.path.basename(seg))[0]
            cands = [os.path.join(img_dir, wnid, stem + e) for e in (".JPEG", ".jpg", ".jpeg", ".png")]
            img = next((c for c in cands if os.path.exists(c)), None)
            if img is None:
                raise _missing(cands[0], "imagenet-s", data_dir, hint)
            pairs.append((img, seg))
    if not pairs:
        raise _missing(os.path.join(seg_dir, "<wnid>", "*.png"), "imagenet-s", data_dir, hint)
    return pairs, ["background"] + wnids


FOLDER_LAYOUT = ("DIR/imgs/{train,val}/NAME.jpg|png and DIR/labels/{train,val}/NAME.png (uint8 class ids, 255 = "
                 "ignore), class names in DIR/classes.txt or --n-classes K (STEGO's directory layout)")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def folder_classes(cfg) -> list:
    """--data folder: the lines of DIR/classes.txt, else class0..class{K-1} for --n-classes K."""
    path = os.path.join(cfg.data_dir, "classes.txt")
    if os.path.isfile(path):
        names = _read_list(path)
        if cfg.n_classes and cfg.n_classes != len(names):
            raise PPAPError(f"{path} names {len(names)} classes but --n-classes is {cfg.n_classes}")
        if not 1 <= len(names) <= 255:
            raise PPAPError(f"{path} names {len(names)} classes; a folder dataset has 1 to 255")
        return names
    if not 1 <= cfg.n_classes <= 255:
        raise PPAPError(f"--data folder needs {path} (one class name per line) or --n-classes K (1-255)")
    return [f"class{k}" for k in range(cfg.n_classes)]


def folder_pairs(data_dir, split):
    """--data folder: (image, label or None) per image of DIR/imgs/<split>, the label DIR/labels/<split>/<stem>.png;
    a split without its labels folder is unlabelled (every label None)."""
    img_dir, lab_dir = os.path.join(data_dir, "imgs", split), os.path.join(data_dir, "labels", split)
    if not os.path.isdir(img_dir):
        raise PPAPError(f"missing {img_dir} — --data folder reads {FOLDER_LAYOUT}")
    imgs = sorted(e.name for e in os.scandir(img_dir) if e.name.lower().endswith(IMAGE_SUFFIXES) and e.is_file())
    if not imgs:
        raise PPAPError(f"{img_dir} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    stems = [os.path.splitext(n)[0] for n in imgs]
    twice = sorted({st for st in stems if stems.count(st) > 1})
    if twice:
        raise PPAPError(f"{img_dir}: {', '.join(twice[:3])} stand there with two image types; one label per stem")
    if not os.path.isdir(lab_dir):
        return [(os.path.join(img_dir, n), None) for n in imgs]
    pairs = [(os.path.join(img_dir, n), os.path.join(lab_dir, st + ".png")) for n, st in zip(imgs, stems)]
    for img, lab in pairs:
        if not os.path.isfile(lab):
            raise PPAPError(f"missing {lab}, the label of {img} ({lab_dir} labels every image of its split)")
    return pairs


def _imagenet_s_variant(cfg):
    """50, 300 or 919 (--imagenet-s-classes)."""
    n = cfg.imagenet_s_classes
    if str(n) not in ("50", "300", "919"):
        raise PPAPError(f"ImageNet-S has 50, 300 or 919 classes, not {n}")
    return int(n)


@dataclass(frozen=True)
class DatasetSpec:
    """--data NAME: its files and classes, how one pair is read, the paper's backbone for it, its presets."""
    files: Callable | None                  # (cfg, split) -> ([(image path, label path)], class names), the
                                            # layout checked first
    read: Callable | None                   # (image path, label path) -> (PIL RGB, int64 label, -1 = ignore)
    backbone: tuple[str, int]               # (--arch, --patch) when they are not given: the paper's
    five_crop: bool = False                 # train on the five-crop set (the authors': COCO-Stuff, Cityscapes)
    presets: str = ""                       # take the PRESETS rows of this dataset ('' = its own)
    download: str = ""                      # the `bash download.sh` target that fetches it ('' = none)
    build: Callable | None = None           # (cfg, split) -> Dataset, for data that are not files (the demo)
    about: str = ""                         # what --help says of it


DATASETS = {
    "synthetic": DatasetSpec(None, None, ("vit_tiny_demo", 8), about="procedural images, the offline demo",
                             build=lambda cfg, split: SyntheticDataset(
                                 split, cfg.img_size if split == "train" else cfg.val_size)),
    "cocostuff": DatasetSpec(lambda cfg, split: (cocostuff_pairs(cfg.data_dir, split), COCOSTUFF27_CLASS_NAMES),
                             read_cocostuff, ("vit_small", 8), five_crop=True, download="cocostuff",
                             about="COCO-Stuff-27"),
    "cityscapes": DatasetSpec(lambda cfg, split: (cityscapes_pairs(cfg.data_dir, split), CITYSCAPES27_CLASS_NAMES),
                              read_cityscapes, ("vit_base", 8), five_crop=True, download="cityscapes",
                              about="Cityscapes-27"),
    "potsdam": DatasetSpec(lambda cfg, split: (potsdam_pairs(cfg.data_dir, split), POTSDAM3_CLASS_NAMES),
                           read_potsdam, ("vit_base", 8), download="potsdam", about="Potsdam-3"),
    "imagenet-s": DatasetSpec(lambda cfg, split: imagenet_s_pairs(cfg.data_dir, split, _imagenet_s_variant(cfg)),
                              read_imagenet_s, ("vit_small", 8), download="imagenet-s",
                              about="ImageNet-S 50/300/919 (--imagenet-s-classes)"),
    "folder": DatasetSpec(lambda cfg, split: (folder_pairs(cfg.data_dir, split), folder_classes(cfg)),
                          read_folder, ("vit_small", 8), presets="cocostuff",
                          about="your own images, --data-dir DIR: " + FOLDER_LAYOUT + "; labels/train may be "
                                "absent (unlabelled training); the COCO-Stuff presets of the backbone"),
}


def build_dataset(cfg: Config, split: str):
    """cfg.data's split 'train' (img_size crops; the five-crop set where the dataset trains on it, built on
    first use with every available core) or 'val' (val_size: shorter side resized to it with NEAREST, centre
    crop, as the authors' val transform)."""
    if split not in ("train", "val"):
        raise PPAPError(f"split must be 'train' or 'val', not {split!r}")
    if cfg.data not in DATASETS:
        raise PPAPError(f"unknown --data {cfg.data!r}; choose one of {', '.join(DATASETS)}")
    spec = DATASETS[cfg.data]
    if spec.build is not None:
        return spec.build(cfg, split)
    pairs, names = spec.files(cfg, split)
    size, data_dir = int(cfg.img_size if split == "train" else cfg.val_size), str(cfg.data_dir)
    if split == "train" and (spec.five_crop if cfg.five_crop is None else cfg.five_crop):
        workers = cfg.crop_workers or (
            len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
        return five_crop_dataset(cfg.data, spec.read, pairs, data_dir, size, names, workers=workers,
                                 progress=cfg.progress, quality=cfg.crop_quality)
    return RealSegDataset(cfg.data, spec.read, pairs, size, names, data_dir,
                          labelled=all(lab is not None for _, lab in pairs))


def subset(dataset, indices):
    """torch Subset that keeps the dataset's n_classes and class_names."""
    sub = torch.utils.data.Subset(dataset, list(indices))
    sub.n_classes, sub.class_names = dataset.n_classes, dataset.class_names
    return sub


SEED_STRIDE = 100003      # a prime: the data-order seeds seed*SEED_STRIDE + epoch never collide in practice


MAX_LOADER_WORKERS = 10    # ~1000 decoded 224-px crops/s on a GPU box; more only adds start-up time and memory


def loader_workers(cfg: Config) -> int:
    if cfg.num_workers >= 0:
        return cfg.num_workers
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(MAX_LOADER_WORKERS, cores - 1))


def make_loader(cfg: Config, dataset, train: bool, epoch: int = 0, skip: int = 0, batch_size: int | None = None,
                persistent: bool = False):
    """The DataLoader of every split. Training order is a permutation seeded by (seed, epoch) from a private
    generator; `skip` drops the (global) batches a resumed run has already seen. Evaluation is in file order.
    In a job of several processes every one draws the same permutation and takes its slice of each global
    batch (training: batch_size / world consecutive images; evaluation: every world-th image).
    Pinned memory on CUDA; `persistent` keeps the workers between passes (the periodic validation)."""
    rank, world = dist_rank(), world_size()
    bs = batch_size or cfg.batch_size
    # A private generator: iterating a DataLoader must not draw from the global RNG, and the same seed gives
    # the same order in every process and in a resumed run.
    g = torch.Generator().manual_seed(cfg.seed * SEED_STRIDE + epoch)
    if train:
        order = torch.randperm(len(dataset), generator=g)[skip * bs:(len(dataset) // bs) * bs]
        local = bs // world
        sampler = order.view(-1, world, local)[:, rank].reshape(-1).tolist()
        bs = local
    else:
        sampler = range(rank, len(dataset), world)
    workers = loader_workers(cfg)
    return torch.utils.data.DataLoader(dataset, batch_size=bs, sampler=sampler, num_workers=workers,
                                       drop_last=train, pin_memory=pick_device(cfg.device).type == "cuda",
                                       generator=g, persistent_workers=persistent and workers > 0,
                                       prefetch_factor=4 if workers else None,
                                       worker_init_fn=_worker_signals if workers else None)


# ==== SUPPORT: checkpoints, run directories and files ====

def atomic_write(path: str, write) -> None:
    """write(tmp) to a temporary name in the same folder, then rename it over path: a crash, a full disk or
    Ctrl-C never leaves a half-written file under path (and the temporary is removed on failure)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def replace_folder(src: str, dst: str) -> None:
    """The finished folder src becomes dst whole; a dst already there is renamed away first, then deleted (a
    run still reading its files keeps them: open files outlive their name)."""
    stale = f"{dst}.stale-{os.getpid()}"
    if os.path.exists(dst):
        os.rename(dst, stale)
    os.rename(src, dst)
    shutil.rmtree(stale, ignore_errors=True)


def write_json(path, obj, indent=None):
    with open(path, "w") as f:
        json.dump(obj, f, indent=indent)


def write_lines(path, lines):
    with open(path, "w") as f:
        f.writelines(line + "\n" for line in lines)


def git_commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return (sha + ("+dirty" if dirty else "")) if sha else "unknown"
    except Exception:
        return "unknown"


def save_checkpoint(model, opts, scaler, cfg: Config, step: int, dataset, best=None, selection="last",
                    rng=None, skipped_steps=0) -> str:
    """Everything a run needs to continue or be evaluated, as tensors, numbers and strings only (it loads
    with weights_only=True): last.pt, or best_on_val.pt for selection 'best-on-val'. A full disk leaves the
    previous file intact and is one PPAPError."""
    state = {"selection": selection, "model": model.state_dict(),
             "optim": {k: o.state_dict() for k, o in opts.items()}, "scaler": scaler.state_dict(),
             "step": step, "config": asdict(cfg), "n_classes": dataset.n_classes,
             "class_names": list(dataset.class_names), "git": git_commit(), "best": best,
             "rng": rng or {}, "skipped_steps": skipped_steps}
    if not getattr(dataset, "labelled", True):      # no train labels: the linear probe never learned
        state["linear_trained"] = False
    path = os.path.join(cfg.run, "best_on_val.pt" if selection == "best-on-val" else "last.pt")
    try:
        atomic_write(path, lambda p: torch.save(state, p))
    except OSError as e:
        raise PPAPError(f"cannot write {path}: {e.strerror or e} (disk full?); the previous "
                        f"{os.path.basename(path)} is intact") from None
    return path


def backbone_name(cfg: Config) -> str:
    """<arch><patch> for folder names; an arch of one patch size names it already (dinov2_vits14)."""
    return cfg.arch if len(BACKBONES[cfg.arch].patches) == 1 else f"{cfg.arch}{cfg.patch}"


def default_run_dir(cfg: Config) -> str:
    """runs/<data>_<backbone_name>_<time>."""
    return os.path.join("runs", f"{cfg.data}_{backbone_name(cfg)}_{time.strftime('%Y%m%d-%H%M%S')}")


class RunLog:
    """log.jsonl: one JSON record per validation. Opening it for a run that continues from `after` drops
    the records of steps past it (a fresh run: after = 0, an empty log), so a resumed run never repeats a
    step."""

    def __init__(self, path: str, after: int):
        self.path, self.records = path, []
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        continue                    # a half-written last line
                    if isinstance(rec, dict) and _is(rec.get("step", 0), int) and rec.get("step", 0) <= after:
                        self.records.append(rec)
        with self._writing():
            atomic_write(path, lambda p: write_lines(p, [json.dumps(r) for r in self.records]))

    def append(self, record: dict) -> None:
        with self._writing(), open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.records.append(record)

    @contextlib.contextmanager
    def _writing(self):
        try:
            yield
        except OSError as e:
            raise PPAPError(f"cannot write {self.path}: {e.strerror or e} (disk full?)") from None

    def record(self, step: int) -> dict | None:
        return next((r for r in reversed(self.records) if r.get("step") == step), None)


@contextlib.contextmanager
def claim_run_dir(run: str, continuing: bool):
    """Create and lock the run directory for this process. A new run never writes into a directory that
    holds a run (its last.pt), and two processes never train in one directory."""
    try:
        os.makedirs(run, exist_ok=True)
        lock = open(os.path.join(run, ".lock"), "a")
    except OSError as e:
        raise PPAPError(f"cannot write to the run directory {run}: {e.strerror or e}") from None
    with lock:
        if fcntl is not None:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise PPAPError(f"another process is training in {run}; wait for it, or choose another "
                                f"--run") from None
        held = [f for f in ("last.pt", "best_on_val.pt") if os.path.exists(os.path.join(run, f))]
        if held and not continuing:
            raise PPAPError(f"{run} already holds a run ({held[0]}); continue it with: python ppap.py --resume "
                            f"{shlex.quote(run)}, or choose another --run")
        yield


def checkpoint_file(path: str) -> str:
    """A run directory means its last.pt; a file is itself."""
    return os.path.join(path, "last.pt") if os.path.isdir(path) else path


def read_checkpoint(path: str) -> dict:
    """A checkpoint of ours (run directory or file) -> its dict. Loaded with weights_only=True: a file
    someone sent is data, never code. Every problem is one PPAPError."""
    file = checkpoint_file(path)
    if not os.path.exists(file):
        raise PPAPError(f"no checkpoint at {file}")
    try:
        ckpt = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        msg = " ".join(str(e).split())[:160]
        raise PPAPError(f"cannot read checkpoint {file}: {type(e).__name__}: {msg}") from None
    if not isinstance(ckpt, dict) or not {"model", "config", "n_classes"} <= set(ckpt):
        raise PPAPError(f"{file} is not a PPAP checkpoint (no model/config/n_classes entries)")
    check_checkpoint(ckpt, file)
    return ckpt


def _is(value, kind) -> bool:
    """isinstance for the checkpoint schema: a bool is no int, an int is a float."""
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def check_checkpoint(ckpt: dict, file: str) -> None:
    """The schema save_checkpoint writes, checked before anything is built from it: one line naming the first
    field that does not fit (a checkpoint loads as data only, so a damaged or foreign one is still data)."""
    def field(name, ok, expected):
        if name in ckpt and not ok(ckpt[name]):
            got = ckpt[name]
            shown = f"a tensor of shape {tuple(got.shape)}" if torch.is_tensor(got) else f"{got!r}"[:60]
            raise PPAPError(f"{file}: '{name}' is {shown}, expected {expected} (a damaged checkpoint, or not one "
                            f"of ppap.py's)")
    field("model", lambda v: isinstance(v, dict) and all(isinstance(k, str) and torch.is_tensor(t) for k, t in v.items()),
          "a dict of tensors")
    field("config", lambda v: isinstance(v, dict), "a dict of the run's flags")
    field("n_classes", lambda v: _is(v, int) and v >= 1, "a positive integer")
    field("class_names", lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v)
          and len(v) == ckpt["n_classes"], f"a list of {ckpt['n_classes']} class names")
    field("step", lambda v: _is(v, int) and v >= 0, "a step number")
    field("skipped_steps", lambda v: _is(v, int) and v >= 0, "a count of steps")
    field("optim", lambda v: isinstance(v, dict) and all(isinstance(v.get(k), dict) and {"state", "param_groups"}
                                                         <= set(v[k]) for k in ("net", "linear", "cluster")),
          "the states of the optimisers net, linear and cluster")
    field("scaler", lambda v: isinstance(v, dict), "a GradScaler state (a dict)")
    field("rng", lambda v: isinstance(v, dict) and all(torch.is_tensor(t) and t.dtype == torch.uint8 and t.dim() == 1
                                                       for t in v.values()), "generator states (uint8 tensors)")
    field("best", lambda v: v is None or isinstance(v, dict) and _is(v.get("score"), float) and _is(v.get("step"), int),
          "None or {'score', 'step'}")
    types = {f.name: f.type for f in fields(Config)}
    for k, v in ckpt["config"].items():
        kind = types.get(k)
        want = {"str": str, "int": int, "float": float, "bool": bool, "bool | None": bool}.get(kind)
        if want is not None and not (_is(v, want) or kind == "bool | None" and v is None):
            raise PPAPError(f"{file}: config '{k}' is {v!r}"[:120] + f", expected a {kind} (a damaged checkpoint, or "
                            f"not one of ppap.py's)")


def check_weights(model: nn.Module, sd: dict, file: str) -> None:
    """A state dict that fits the model strictly and holds finite numbers only, else one line."""
    missing, unexpected, wrong = key_mismatch(model.state_dict(), sd)
    if missing or unexpected or wrong:
        raise PPAPError(f"{file} does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}, shapes "
                        f"differ at {wrong[:3]}")
    check_finite(sd, file)


def check_finite(sd: dict, file: str) -> None:
    """Weights that hold NaN or infinity score a meaningless argmax: one line instead."""
    bad = [k for k, v in sd.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise PPAPError(f"{file} holds non-finite weights ({', '.join(bad[:3])}): nothing can be scored or "
                        f"continued from it")


def config_from_checkpoint(ckpt: dict, **overrides) -> Config:
    known = {f.name for f in fields(Config)}
    return Config(**{k: v for k, v in {**ckpt["config"], **overrides}.items() if k in known})


def model_from_checkpoint(ckpt: dict, file: str = "checkpoint") -> tuple[PPAP, Config]:
    """A checkpoint dict -> (PPAP model on the CPU with its weights, strict; its Config)."""
    cfg = config_from_checkpoint(ckpt)
    if cfg.arch not in BACKBONES:
        raise PPAPError(f"{file}: unknown arch {cfg.arch!r}")
    if cfg.patch not in BACKBONES[cfg.arch].patches:
        raise PPAPError(f"{file}: --arch {cfg.arch} has no patch size {cfg.patch}")
    model = build_model(cfg, int(ckpt["n_classes"]), weights=False)
    sd = ckpt["model"]
    if "backbone.pos_embed" in sd and hasattr(model.backbone, "adopt_pos_grid"):    # a ViT of another resolution
        model.backbone.adopt_pos_grid(sd["backbone.pos_embed"])
    check_weights(model, sd, file)
    model.load_state_dict(sd, strict=True)
    return model, cfg


def load_run(path: str, device="cpu"):
    """A run directory (its last.pt) or a checkpoint file -> (model, cfg, checkpoint dict)."""
    ckpt = read_checkpoint(path)
    model, cfg = model_from_checkpoint(ckpt, checkpoint_file(path))
    return model.to(device), cfg, ckpt


# ==== SUPPORT: stopping cleanly (signals) ====
# A scheduler ends a job with SIGTERM (SLURM at its time limit, scancel), a dropped ssh session with SIGHUP, a
# user with Ctrl-C (SIGINT). While a run trains, each raises Stopped in the main thread, which leaves the loop
# through its one exit path (stopping: save, then one line); the exit code stays the shell's 128 + signal
# (130, 143, 129), which requeue scripts test. A signal that arrives during a step waits until the step is
# applied and counted, one during a checkpoint's write until it is written; after the first signal the others
# are ignored (a second Ctrl-C never interrupts the save).

class Stopped(BaseException):
    """A stop signal (a BaseException, as KeyboardInterrupt: no `except Exception` swallows it)."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message or f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


STOP_SIGNALS = [getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)]


class _StopState:
    received: list = []         # the stop signals this process received, in order
    deferring: int = 0          # > 0 inside signals_deferred: signals are recorded, raised at its end
    previous: dict = {}         # the handlers before stop_signals, while later stops are only recorded


_stop = _StopState()


def _on_stop(signum, frame):
    _stop.received.append(signum)
    if len(_stop.received) == 1 and not _stop.deferring:
        raise Stopped(signum)


@contextlib.contextmanager
def stop_signals():
    """Within: SIGINT, SIGTERM and SIGHUP raise Stopped in the main thread (the first; later ones are only
    recorded); the previous handlers afterwards. Loader workers reset them (_worker_signals)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _stop.received, _stop.deferring = [], 0
    previous = {s: signal.signal(s, _on_stop) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        if _stop.received:       # stopping: a later signal is ignored until the process has exited (SIG_IGN,
            _stop.previous = previous     # which, unlike a Python handler, also holds while the interpreter exits)
            for s in STOP_SIGNALS:
                signal.signal(s, signal.SIG_IGN)
        else:
            for s, handler in previous.items():
                signal.signal(s, handler)


def restore_stop_handlers() -> None:
    """The handlers from before stop_signals, for a caller that goes on after a stopped run (main(), in-process)."""
    for s, handler in _stop.previous.items():
        signal.signal(s, handler)
    _stop.previous = {}


@contextlib.contextmanager
def signals_deferred(reraise: bool = True):
    """Within: a stop signal waits (the optimisers stepping, a checkpoint being written); at the end the first
    one is raised as Stopped (reraise) or left to the caller, which is stopping anyway."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    ours = signal.getsignal(signal.SIGINT) is _on_stop
    previous = {} if ours else {s: signal.signal(s, lambda signum, frame: _stop.received.append(signum))
                                for s in STOP_SIGNALS}
    if not ours:
        _stop.received = []
    seen = len(_stop.received)
    _stop.deferring += 1
    try:
        yield
    finally:
        _stop.deferring -= 1
        for s, handler in previous.items():
            signal.signal(s, handler)
        if reraise and not _stop.deferring and len(_stop.received) > seen and seen == 0:
            raise Stopped(_stop.received[0])


def _worker_signals(worker_id: int) -> None:
    """A DataLoader worker leaves stop signals to the main process: Ctrl-C as PyTorch's workers expect it,
    SIGTERM and SIGHUP ending it quietly."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for s in STOP_SIGNALS[1:]:
        signal.signal(s, signal.SIG_DFL)


# ==== SUPPORT: devices, and several processes (torchrun) ====
# torchrun starts one process per GPU (or CPU worker) with RANK, LOCAL_RANK, WORLD_SIZE in the environment.
# --batch-size stays the global batch; each process takes its slice of every global batch (make_loader) and
# of every random draw (my_rows), the loss sees every process's rows (gather_rows), and the validation sums
# each process's confusion matrices (evaluate). Rank 0 alone prints, logs and writes checkpoints. Every
# helper here is the identity (or a no-op) in one process, so the method above reads as one process.

def pick_device(name: str, flag: str = "--device") -> torch.device:
    """--device (or another device flag) -> torch.device: auto (CUDA when torch sees a GPU), cpu, cuda or cuda:N."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise PPAPError(f"unknown {flag} {name!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise PPAPError(f"{flag} {name}: this code runs on the CPU and on CUDA GPUs; use cpu or cuda")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise PPAPError(f"{flag} {name} asked for, but torch sees no CUDA GPU; use {flag} cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise PPAPError(f"{flag} {name} asked for, but torch sees {torch.cuda.device_count()} GPU(s) "
                            f"(indices 0 to {torch.cuda.device_count() - 1})")
    return dev


def _joined() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def dist_rank() -> int:
    return torch.distributed.get_rank() if _joined() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if _joined() else 1


def setup_distributed(device_name: str, global_batch: int | None = None) -> torch.device:
    """Join torchrun's process group (NCCL on CUDA, gloo on the CPU) and pick this process's device (GPU
    LOCAL_RANK); a plain `python ppap.py` just gets its device. Bad setups fail in every process alike, before
    any process waits for another."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_name)
    if world <= 1 or torch.distributed.is_initialized():
        return device
    local, local_world = int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if global_batch is not None and global_batch % world:
        raise PPAPError(f"--batch-size {global_batch} (the global batch) is not divisible by the "
                        f"{world} processes of this job")
    if device.type == "cuda":
        if local_world > torch.cuda.device_count():
            raise PPAPError(f"this node runs {local_world} processes but torch sees {torch.cuda.device_count()} "
                            f"GPU(s); use --nproc-per-node {torch.cuda.device_count()} or fewer")
        if not torch.distributed.is_nccl_available():
            raise PPAPError("this torch build has no NCCL, which CUDA jobs of several processes need; run on "
                            "one GPU, or use --device cpu (gloo)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def distributed(core: nn.Module, device: torch.device, cfg: Config) -> nn.Module:
    """The module the step calls: `core`, under torchrun wrapped in DistributedDataParallel (the trained
    modules' gradients are averaged; the frozen backbone has none)."""
    if world_size() == 1:
        return core
    return nn.parallel.DistributedDataParallel(core, device_ids=[device] if device.type == "cuda" else None,
                                               find_unused_parameters=not cfg.ppap_weight)


def unwrap(model) -> "PPAP":
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def barrier() -> None:
    if world_size() > 1:
        torch.distributed.barrier()


def from_rank0(obj):
    """Rank 0's value of a picklable object, in every process."""
    if world_size() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def my_rows(t: torch.Tensor) -> torch.Tensor:
    """This process's consecutive slice of the rows of a global tensor (all of it in one process)."""
    n = t.shape[0] // world_size()
    return t[dist_rank() * n:(dist_rank() + 1) * n]


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over the processes (the tensor itself in one process)."""
    if world_size() > 1:
        t = t.clone()
        torch.distributed.all_reduce(t)
    return t


def all_sum_dict(values: dict, device) -> dict:
    """{name: scalar or 1-D tensor, or float} summed over the processes in one collective, in float32 ->
    {name: float, or a list for a 1-D tensor} (in one process: the values themselves)."""
    parts = [torch.as_tensor(v).detach().to(device=device, dtype=torch.float32).reshape(-1) for v in values.values()]
    summed = all_sum(torch.cat(parts)).tolist()
    out, at = {}, 0
    for (k, v), p in zip(values.items(), parts):
        out[k] = summed[at:at + len(p)] if torch.is_tensor(v) and v.dim() else summed[at]
        at += len(p)
    return out


def all_names(names) -> list:
    """The sorted union over the processes of an iterable of names."""
    if world_size() == 1:
        return sorted(names)
    every = [None] * world_size()
    torch.distributed.all_gather_object(every, sorted(names))
    return sorted(set().union(*every))


def check_same_config(cfg: Config) -> None:
    """Every process of a job must train the same configuration (each gets its own command line): one line
    naming the first flag that differs, in every process, before any collective could hang on it."""
    if world_size() == 1:
        return
    mine = {k: v for k, v in asdict(cfg).items() if k != "progress"}
    every = [None] * world_size()
    torch.distributed.all_gather_object(every, mine)
    for rank, theirs in enumerate(every):
        differ = [k for k in mine if theirs.get(k) != every[0].get(k)]
        if differ:
            k = differ[0]
            raise PPAPError(f"the processes of this job were started with different flags: {flag(k)} "
                            f"{every[0][k]!r} in rank 0, {theirs[k]!r} in rank {rank}")


def check_same_weights(core: nn.Module, step: int) -> None:
    """Every process must hold the same trained weights (checked at each save); one line if they drifted."""
    if world_size() == 1:
        return
    sums = torch.stack([p.detach().double().sum() for p in core.parameters() if p.requires_grad])
    low, high = sums.clone(), sums.clone()
    torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN)
    torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise PPAPError(f"the {world_size()} processes hold different weights at step {step}")


class _GatherRows(torch.autograd.Function):
    """[n,D] per process -> [world*n, D], the processes' rows in rank order. Backward: every process's loss
    depends on every row, so the row gradients are summed over the processes before each takes its own."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(world_size())]
        torch.distributed.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad)
        return my_rows(grad)


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every process's rows of x, concatenated in rank order (x itself in one process), with gradient."""
    return _GatherRows.apply(x) if world_size() > 1 else x

# ==== SUPPORT: the feature cache (--feature-cache): the frozen backbone once per train crop ====
# The backbone is frozen and a train crop is always the same tensor (resize and centre crop, no random
# augmentation: the authors' loop reads data['img'] only), so what the frozen blocks make of a crop is the same
# at every epoch and in every run with the same backbone, data and size. --feature-cache DIR computes it once:
# before training, one pass writes every train crop's trunk(x) (the tokens that enter the trainable head;
# with --feature-cache-crit also its criterion features) to memory-mapped shards; every later epoch and run
# with the same key reads them, and the step runs only the criterion's frozen last block (crit_features; no
# frozen block at all with --feature-cache-crit) and the trained modules. Exact by default: a stored row is
# what the live path computes, in its dtype (DINO's residual stream is fp32, also under autocast). The pass
# runs in batches of the run's per-process batch size, the last batch padded with its own crops, so
# that the kernels see the shapes of the live step.
#   DIR/lock         flock: one builder at a time; another run waits for it, then reads
#   DIR/complete/    DONE.json (the key and the layout) and shard-<k>.bin: raw [rows, record, width] arrays,
#                    crop i in shard i // rows, row i % rows; a record is the crop's tokens, then (with
#                    --feature-cache-crit) its criterion features, patch by patch
#   DIR/building/    a build in progress: key.json, and whole shards only (each written to a temporary name,
#                    then renamed); renamed to complete/ once every shard is there, so a cache cut short is
#                    never read: the next run with the same key keeps its whole shards and builds the rest
# Under torchrun every process builds its share of the shards (shard k: rank k % world) and reads them all.

FEATURE_CACHE_DTYPES = ("exact", "fp16", "bf16")
FEATURE_CACHE_FORMAT = 1
FEATURE_SHARD_BYTES = 1 << 30     # shards of ~1 GiB: a killed build loses at most one per process
FEATURE_MIN_SHARDS = 8            # and at least 8 shards, which the processes of a job share
FEATURE_LOCK_POLL_S = 2.0         # a run waiting for another's build looks again after this long
_CACHE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                 "float64": torch.float64}
# numpy has no bfloat16: its rows are stored as their raw 16 bits
_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16, "float64": np.float64}
# the key's fields, as a rebuilt cache names what changed
_KEY_NAMES = {"format": "the cache format", "numerics": "the torch version or device type",
              "backbone": "the backbone", "weights_sha1": "the backbone weights", "data": "the train set",
              "files_sha1": "the train file list (names or sizes)",
              "crops": "the number of crops", "img_size": "the image size", "crop": "the crop mode",
              "autocast": "the autocast precision", "dtype": "--feature-cache-dtype",
              "crit": "--feature-cache-crit"}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def backbone_digest(backbone: nn.Module) -> str:
    """sha1 of the backbone's state dict (names, shapes, dtypes, bytes): the weights the cache was computed
    with, whichever file or seed they came from."""
    h = hashlib.sha1()
    for k, v in backbone.state_dict().items():
        t = v.detach().cpu().contiguous()
        h.update(f"{k}|{tuple(t.shape)}|{t.dtype}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def train_set_identity(dataset) -> dict:
    """What the train crops are: the demo's procedural set by its split; a set of files (RealSegDataset: the
    five-crop sets, Potsdam, ImageNet-S, any dataset with a `pairs` file list) by its reader and the names and
    sizes of its files (_sources_digest, as the five-crop set)."""
    if isinstance(dataset, SyntheticDataset):
        return {"data": f"synthetic {dataset.split}", "files_sha1": "procedural", "crop": "procedural"}
    pairs = getattr(dataset, "pairs", None)
    if pairs is None:
        raise PPAPError(f"--feature-cache cannot key a train set of type {type(dataset).__name__} (it has no file "
                        f"list `pairs`); run without --feature-cache")
    read = getattr(getattr(dataset, "read", None), "__name__", "?")
    return {"data": f"{getattr(dataset, 'name', '?')} read by {read}", "files_sha1": _sources_digest(pairs),
            "crop": "resize + centre crop"}


def feature_cache_key(cfg: Config, backbone: nn.Module, train_set, device) -> dict:
    """What the stored records depend on; a cache whose key differs in any field is rebuilt, naming the field.
    The torch version and the device type are in it because kernels differ in their last bits between them;
    the GPU model and the batch size are not (README, Feature cache)."""
    amp = amp_dtype(cfg, device)
    return {"format": FEATURE_CACHE_FORMAT, "numerics": f"torch {torch.__version__}, {torch.device(device).type}",
            "backbone": f"{cfg.arch}/{cfg.patch}", "weights_sha1": backbone_digest(backbone),
            **train_set_identity(train_set), "crops": len(train_set),
            "img_size": int(getattr(train_set, "size", cfg.img_size)),
            "autocast": _dtype_name(amp) if amp is not None else "off", "dtype": cfg.feature_cache_dtype,
            "crit": bool(cfg.feature_cache_crit)}


def _key_change(old, new: dict) -> str:
    """Why a cache with key `old` cannot serve `new`: '' when it can."""
    if not isinstance(old, dict):
        return "it has no readable key"
    return ", ".join(f"{_KEY_NAMES.get(k, k)} changed ({str(old.get(k))[:12]} -> {str(v)[:12]})"
                     for k, v in new.items() if old.get(k) != v)


def _gb(n: float) -> str:
    return f"{n / 1e9:.3g} GB"


def _shard_name(k: int) -> str:
    return f"shard-{k:05d}.bin"


def _shard_rows(layout: dict, k: int) -> int:
    return min(layout["shard_rows"], layout["crops"] - k * layout["shard_rows"])


def _shard_bytes(layout: dict, k: int) -> int:
    return _shard_rows(layout, k) * layout["record"] * layout["dim"] * layout["itemsize"]


def _whole_shards(folder: str, layout: dict) -> list[int]:
    """The shards of `folder` that exist with their full size."""
    def whole(k):
        try:
            return os.path.getsize(os.path.join(folder, _shard_name(k))) == _shard_bytes(layout, k)
        except OSError:
            return False
    return [k for k in range(layout["shards"]) if whole(k)]


def _cache_records(cfg: Config, backbone: nn.Module, img: torch.Tensor, device) -> torch.Tensor:
    """A batch of crops -> their records [B, tokens (+ h*w), D], computed as the step computes them (fit_to_patch,
    autocast, no_grad): trunk(x), then with --feature-cache-crit the criterion features, patch by patch."""
    x = fit_to_patch(img, backbone.patch_size)
    with torch.no_grad(), autocast(device, amp_dtype(cfg, device)):
        t = backbone.trunk(x)
        if not cfg.feature_cache_crit:
            return t
        c = backbone.crit_features(t, (x.shape[-2] // backbone.patch_size, x.shape[-1] // backbone.patch_size))
    if c.dtype != t.dtype:
        raise PPAPError(f"--feature-cache-crit stores the tokens and the criterion features in one dtype; "
                        f"{cfg.arch} gives {t.dtype} and {c.dtype}: run without --feature-cache-crit")
    return torch.cat([t, c.permute(0, 2, 3, 1).reshape(c.shape[0], -1, c.shape[1])], dim=1)


def _cache_layout(cfg: Config, backbone: nn.Module, train_set, device) -> dict:
    """The record of one crop (one crop through the backbone: tokens, width, dtype) and the shards."""
    img = train_set[0]["img"][None].to(device)
    rec = _cache_records(cfg, backbone, img, device)
    if rec.dim() != 3:
        raise PPAPError(f"--feature-cache stores token sequences [B,T,D]; {cfg.arch}'s trunk gives a "
                        f"{rec.dim()}-d tensor")
    grid = [patch_grid(s, backbone.patch_size) for s in img.shape[-2:]] if cfg.feature_cache_crit else [0, 0]
    live = _dtype_name(rec.dtype)
    stored = {"exact": live, "fp16": "float16", "bf16": "bfloat16"}[cfg.feature_cache_dtype]
    if live not in _CACHE_DTYPES:
        raise PPAPError(f"--feature-cache cannot store the backbone's {live} output")
    itemsize = torch.empty(0, dtype=_CACHE_DTYPES[stored]).element_size()
    n, per_crop, bs = len(train_set), rec.shape[1] * rec.shape[2] * itemsize, cfg.batch_size // world_size()
    rows = max(1, min(FEATURE_SHARD_BYTES // per_crop, -(-n // FEATURE_MIN_SHARDS)))
    rows = -(-rows // bs) * bs              # whole batches: only the last shard ends in a padded one
    return {"crops": n, "record": rec.shape[1], "tokens": rec.shape[1] - grid[0] * grid[1], "crit_grid": grid,
            "dim": rec.shape[2], "live_dtype": live, "stored": stored, "itemsize": itemsize, "shard_rows": rows,
            "shards": -(-n // rows)}


def _remove_folder(path: str) -> None:
    """Renamed first, then deleted: another run reading its files keeps them (open files outlive the name)."""
    if os.path.exists(path):
        gone = f"{path}.stale-{os.getpid()}"
        os.rename(path, gone)
        shutil.rmtree(gone, ignore_errors=True)


def _cache_plan(root: str, cfg: Config, backbone: nn.Module, train_set, device, unlocked: str | None = None) -> dict:
    """Rank 0, holding DIR's lock: read the complete cache when its key matches, else say why and plan the
    build (resuming an interrupted one of the same key), its size printed and checked against the disk.
    Without the lock (`unlocked` says why) a matching complete cache is read, and nothing is written."""
    key = feature_cache_key(cfg, backbone, train_set, device)
    complete, building = os.path.join(root, "complete"), os.path.join(root, "building")
    done = _read_json(os.path.join(complete, "DONE.json"))
    why = "it holds no complete cache"
    if done is not None or os.path.exists(complete):
        why = _key_change((done or {}).get("key"), key)
        if not why:
            cut = sorted(set(range(done["layout"]["shards"])) - set(_whole_shards(complete, done["layout"])))
            if not cut:
                return {"read": done}
            why = f"{_shard_name(cut[0])} is missing or cut short"
    if unlocked:
        raise PPAPError(f"feature cache {root}: {unlocked}, so it can only be read, and {why}")
    for e in os.scandir(root):
        if ".stale-" in e.name:                  # what a run killed while removing a folder left
            shutil.rmtree(e.path, ignore_errors=True)
    if os.path.exists(complete):
        print(f"feature cache {root}: rebuilt: {why}", flush=True)
        _remove_folder(complete)
    started = _read_json(os.path.join(building, "key.json"))
    if started is not None and started.get("key") == key:
        layout = started["layout"]
    else:
        if os.path.exists(building):
            print(f"feature cache {root}: discarding an interrupted build that is not for this key", flush=True)
            _remove_folder(building)
        layout = _cache_layout(cfg, backbone, train_set, device)
        os.makedirs(building)
        atomic_write(os.path.join(building, "key.json"), lambda p: write_json(p, {"key": key, "layout": layout}))
    for e in os.scandir(building):
        if ".tmp" in e.name:                     # a killed builder's shard in the making
            os.remove(e.path)
    whole = set(_whole_shards(building, layout))
    todo = [k for k in range(layout["shards"]) if k not in whole]
    need = sum(_shard_bytes(layout, k) for k in todo)
    total = sum(_shard_bytes(layout, k) for k in range(layout["shards"]))
    free = shutil.disk_usage(building).free
    hw = layout["record"] - layout["tokens"]
    print(f"feature cache {root}: {layout['crops']} crops x "
          + (f"({layout['tokens']} tokens + {hw} criterion rows)" if hw else f"{layout['tokens']} tokens")
          + f" x {layout['dim']} x {layout['itemsize']} B ({layout['stored']}) = {_gb(total)} in "
          f"{layout['shards']} shards" + (f"; resuming an interrupted build, {len(whole)} shards whole" if whole
                                          else "") + f"; writing {_gb(need)}, {_gb(free)} free", flush=True)
    if need > free:
        raise PPAPError(f"the feature cache needs {_gb(need)} more in {root}, which has {_gb(free)} free; free "
                        f"space, use --feature-cache-dtype fp16 (half), another --feature-cache DIR, or none")
    return {"build": {"key": key, "layout": layout, "todo": todo}}


def _build_shards(root: str, plan: dict, cfg: Config, backbone: nn.Module, train_set, device) -> None:
    """This process's share of the missing shards: the records of their crops in file order, in batches of
    the run's per-process batch size (the last shard's last batch padded with its own crops); each shard written
    whole to a temporary name and renamed."""
    layout, building = plan["layout"], os.path.join(root, "building")
    mine = [k for k in plan["todo"] if k % world_size() == dist_rank()]
    if not mine:
        return
    bs, rows, stored = cfg.batch_size // world_size(), layout["shard_rows"], _CACHE_DTYPES[layout["stored"]]
    batches = [list(range(a, min(a + bs, k * rows + _shard_rows(layout, k))))
               for k in mine for a in range(k * rows, k * rows + _shard_rows(layout, k), bs)]
    # a private generator: the workers' seeds must not be drawn from the global RNG the run goes on with
    loader = torch.utils.data.DataLoader(train_set, batch_sampler=batches, num_workers=loader_workers(cfg),
                                         pin_memory=torch.device(device).type == "cuda",
                                         generator=torch.Generator().manual_seed(0))
    it = iter(loader)
    bar = tqdm(total=sum(_shard_rows(layout, k) for k in mine), desc=f"feature cache -> {root}", unit="crop",
               dynamic_ncols=True, disable=not cfg.progress or dist_rank() != 0)

    def write_shard(k, path):
        with open(path, "wb") as f:
            left = _shard_rows(layout, k)
            while left:
                img = next(it)["img"].to(device, non_blocking=True)
                n = img.shape[0]
                rec = _cache_records(cfg, backbone, img[torch.arange(bs) % n], device)[:n]
                if tuple(rec.shape[1:]) != (layout["record"], layout["dim"]) or \
                        _dtype_name(rec.dtype) != layout["live_dtype"]:
                    raise PPAPError(f"the backbone gave {tuple(rec.shape[1:])} {rec.dtype} records, not the "
                                    f"{layout['record']}x{layout['dim']} {layout['live_dtype']} of crop 0")
                rec = rec.to(stored).cpu()
                f.write((rec.view(torch.int16) if stored == torch.bfloat16 else rec).numpy().tobytes())
                left -= n
                bar.update(n)
            f.flush()
            os.fsync(f.fileno())             # the rename must not outlive its data (a crash of the machine)

    try:
        for k in mine:
            atomic_write(os.path.join(building, _shard_name(k)), functools.partial(write_shard, k))
    except OSError as e:
        raise PPAPError(f"cannot write the feature cache {building}: {e.strerror or e} (disk full?); the next run "
                        f"keeps its whole shards") from None
    finally:
        bar.close()


def _finish_build(root: str, plan: dict, batch: int) -> dict:
    """Rank 0, every process's shards written: DONE.json, then building/ becomes complete/."""
    building, complete = os.path.join(root, "building"), os.path.join(root, "complete")
    layout = plan["layout"]
    missing = sorted(set(range(layout["shards"])) - set(_whole_shards(building, layout)))
    if missing:
        raise PPAPError(f"feature cache {root}: {_shard_name(missing[0])} was not written; rerun to complete it")
    done = {"key": plan["key"], "layout": layout, "built": time.strftime("%Y-%m-%d %H:%M:%S"),
            "processes": world_size(), "batch_per_process": batch}
    atomic_write(os.path.join(building, "DONE.json"), lambda p: write_json(p, done, indent=1))
    os.rename(building, complete)
    return done


def _on_rank0(fn, *args):
    """fn(*args) in rank 0, its result (or its error, as one line) in every process."""
    result = None
    if dist_rank() == 0:
        try:
            result = fn(*args)
        except PPAPError as e:
            result = {"error": str(e)}
        except OSError as e:
            result = {"error": f"cannot write the feature cache: {e.strerror or e} ({e.filename})"}
    result = from_rank0(result)
    if "error" in result:
        raise PPAPError(result["error"])
    return result


@contextlib.contextmanager
def _cache_lock(root: str):
    """DIR's lock, held by rank 0 while the job checks, builds and opens the cache; rank 0 polls it, so that
    the job's other processes wait in short collectives, never in one that could time out. Yields None, or
    why DIR cannot be locked (a read-only folder, a file system without locks): then it can only be read."""
    lock, unlocked = None, None
    if dist_rank() == 0:
        try:
            os.makedirs(root, exist_ok=True)
            lock = open(os.path.join(root, "lock"), "a")
        except OSError as e:
            unlocked = f"cannot write {root} ({e.strerror or e})"
    said = False
    try:
        while True:
            state = "locked"
            if lock is not None and fcntl is not None:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    state = "busy"
                except OSError as e:
                    unlocked = f"cannot lock {root}/lock ({e.strerror or e})"
            state = from_rank0(unlocked or state)
            if state != "busy":
                break
            if not said:
                print(f"feature cache {root}: another run is building it; waiting", flush=True)
                said = True
            time.sleep(FEATURE_LOCK_POLL_S)
        yield None if state == "locked" else state
    finally:
        if lock is not None:
            lock.close()


def open_feature_cache(cfg: Config, backbone: nn.Module, train_set, device) -> "CachedTrunkSet":
    """--feature-cache: the train set whose items carry their crop's cached backbone output, building the cache
    first when DIR has none for this key (one for another key is replaced, and one line says why)."""
    if not (callable(getattr(backbone, "trunk", None)) and callable(getattr(backbone, "crit_features", None))):
        raise PPAPError(f"--feature-cache needs a backbone with trunk() and crit_features() (the backbone "
                        f"contract); {cfg.arch} has not both: run without --feature-cache")
    root = os.path.abspath(cfg.feature_cache)
    with _cache_lock(root) as unlocked:
        plan = _on_rank0(_cache_plan, root, cfg, backbone, train_set, device, unlocked)
        built = "build" in plan
        if built:
            _build_shards(root, plan["build"], cfg, backbone, train_set, device)
            barrier()
            done = _on_rank0(_finish_build, root, plan["build"], cfg.batch_size // world_size())
        else:
            done = plan["read"]
            print(f"feature cache {root}: reusing {done['layout']['crops']} crops ({done['layout']['stored']}, "
                  f"built {done.get('built', '?')}): no backbone forward over the train set", flush=True)
        dataset = CachedTrunkSet(train_set, os.path.join(root, "complete"), done)
        barrier()                  # every process has its files open before another run may replace them
    if built:
        print(f"feature cache {root}: built; later epochs and runs read it", flush=True)
    return dataset


class CachedTrunkSet(torch.utils.data.Dataset):
    """The train set, each item with its crop's backbone output from the cache, in the dtypes the live path
    has: 'head_in' [T,D] (train_step hands it to PPAP.forward) and, with --feature-cache-crit, 'crit' [D,h,w].
    Opening checks DONE.json and maps every shard; a DataLoader worker that is not forked from this process
    maps them again and checks that they are the same files."""

    def __init__(self, dataset, folder: str, done: dict):
        self.dataset, self.folder, self.done = dataset, folder, done
        self.n_classes, self.class_names = dataset.n_classes, dataset.class_names
        if _read_json(os.path.join(folder, "DONE.json")) != done:
            raise PPAPError(f"the feature cache {folder} changed while it was opened; rerun")
        lay = done["layout"]
        self.files = [(os.path.join(folder, _shard_name(k)), _shard_rows(lay, k)) for k in range(lay["shards"])]
        self.inodes = [os.stat(p).st_ino for p, _ in self.files]
        self._maps = self._open()

    def _open(self) -> list:
        lay, maps = self.done["layout"], []
        for (path, rows), inode in zip(self.files, self.inodes):
            with open(path, "rb") as f:
                if os.fstat(f.fileno()).st_ino != inode:
                    raise PPAPError(f"the feature cache {self.folder} was replaced by another run while this one "
                                    f"trained; rerun")
                maps.append(np.memmap(f, dtype=_NUMPY_DTYPES[lay["stored"]], mode="r",
                                      shape=(rows, lay["record"], lay["dim"])))
        return maps

    def __getstate__(self):
        return {**self.__dict__, "_maps": None}       # a worker maps the files itself, never pickles their bytes

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        if self._maps is None:
            self._maps = self._open()
        lay = self.done["layout"]
        item = dict(self.dataset[i])
        rec = torch.from_numpy(np.array(self._maps[i // lay["shard_rows"]][i % lay["shard_rows"]]))
        if lay["stored"] == "bfloat16":
            rec = rec.view(torch.bfloat16)
        rec = rec.to(_CACHE_DTYPES[lay["live_dtype"]])
        item["head_in"] = rec[:lay["tokens"]]
        if lay["record"] > lay["tokens"]:
            item["crit"] = rec[lay["tokens"]:].reshape(*lay["crit_grid"], lay["dim"]).permute(2, 0, 1)
        return item


# ==== CLI ====

# What a continued run may change: where and how it executes, how long it runs and how often it is
# validated. Everything else is the run's own configuration and is refused with --resume. --feature-cache
# DIR is where: an exact cache feeds the head what the live path does; --feature-cache-dtype and
# --feature-cache-crit are not (with fp16 or bf16 they decide what the head and the criterion receive).
RESUME_FLAGS = ("resume", "max_steps", "epochs", "device", "num_workers", "crop_workers", "progress", "data_dir",
                "val_every", "val_limit", "feature_cache")


# torchrun parses the whole command line before the script gets it and takes any flag that abbreviates one
# of its own: `--run` reads as its --run-path. --run-dir is the name that passes through torchrun; --run stays
# for `python ppap.py`. (tests/test_distributed.py checks every flag against torchrun's parser.)
FLAG_NAMES = {"run": ("--run-dir", "--run")}


class _Parser(argparse.ArgumentParser):
    hint = "python ppap.py --help lists the flags"

    def error(self, message):            # one line, exit code 2 (through main), instead of usage + error
        raise PPAPError(f"{message} ({self.hint})")


def build_parser(shown: Config) -> argparse.ArgumentParser:
    """The Config dataclass is the CLI: every field is --field-name, its help the field's description and
    the value the chosen preset gives it."""
    p = _Parser(prog="ppap.py", description=__doc__.split("\n\n")[0],
                epilog=f"Flags allowed with --resume: {', '.join(map(flag, RESUME_FLAGS))}.",
                formatter_class=argparse.RawTextHelpFormatter)
    for f in fields(Config):
        flags = FLAG_NAMES.get(f.name, (flag(f.name),))
        value = getattr(shown, f.name)
        help = f.metadata["help"] + {"data": _choices(DATASETS), "arch": _choices(BACKBONES)}.get(f.name, "")
        help = f"{help}\n  [{shown.data} preset: {value!r}]"
        if f.type.startswith("bool"):
            p.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           help=help)
        else:
            p.add_argument(*flags, dest=f.name, type=type(f.default), default=argparse.SUPPRESS, help=help)
    return p


def _choices(registry: dict) -> str:
    """A registry's names for --help, each with what it is."""
    return ":" + "".join(f"\n    {name}" + (f": {spec.about}" if spec.about else "") for name, spec in registry.items())


def parse_overrides(argv=None) -> dict:
    """argv -> {field: value} for the flags given (the rest come from the preset)."""
    pre = argparse.ArgumentParser(add_help=False)
    for name, typ in (("--data", str), ("--arch", str), ("--patch", int)):
        pre.add_argument(name, type=typ, default=argparse.SUPPRESS)
    chosen, _ = pre.parse_known_args(argv)
    try:
        shown = make_config(vars(chosen))
    except PPAPError:
        shown = Config()
    return vars(build_parser(shown).parse_args(argv))


def parse_args(argv=None) -> Config:
    return make_config(parse_overrides(argv))


def resume_config(overrides: dict) -> tuple[Config, dict]:
    """--resume RUN [allowed flags] -> (the run's Config with those flags applied, its checkpoint).
    A run continues in its own directory; --run NEW continues it in a new one (required when resuming
    from best_on_val.pt, which would otherwise overwrite the run's newer last.pt)."""
    if not overrides["resume"].strip():
        raise PPAPError("--resume needs a run directory or a checkpoint file, not an empty value (an unset "
                        "variable in a requeue script?)")
    refused = [k for k in overrides if k not in RESUME_FLAGS + ("run",)]
    if refused:
        raise PPAPError(f"--resume continues a run as it was configured; {', '.join(map(flag, refused))} "
                        f"cannot change (allowed: {', '.join(map(flag, RESUME_FLAGS[1:]))}, --run)")
    file = os.path.abspath(checkpoint_file(overrides["resume"]))
    ckpt = read_checkpoint(file)
    run = overrides.get("run") or os.path.dirname(file)
    held = os.path.abspath(os.path.join(run, "last.pt"))
    if file != held and os.path.exists(held):
        raise PPAPError(f"--resume {file}: continuing it in {run} would overwrite {held}, the run's own; add "
                        f"--run-dir NEW_DIR to continue in a new directory")
    ckpt["_file"] = file
    cfg = config_from_checkpoint(ckpt, **overrides)
    cfg.run = run
    check_config(cfg)
    return cfg, ckpt


def main(argv=None) -> int:
    """`python ppap.py [flags]` trains (or continues a run with --resume), alone or as one process of a
    torchrun job; -> the exit code. In-process callers get their signal handlers back; the script keeps
    ignoring stop signals after a stop until it has exited (cli)."""
    try:
        return cli(argv)
    finally:
        restore_stop_handlers()


def cli(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    with job_output():
        try:
            overrides = parse_overrides(argv)
            cfg, ckpt = resume_config(overrides) if "resume" in overrides else (make_config(overrides), None)
            if int(os.environ.get("RANK", "0")):
                cfg.progress = False                     # one progress bar per job: rank 0's
            train(cfg, ckpt)
        except PPAPError as e:
            report_error(e)
            return 2
        except Stopped as e:
            print(f"\n{e}", file=sys.stderr)
            return 128 + e.signum
        except KeyboardInterrupt:                        # before training started
            print("\ninterrupted before training started: nothing was saved", file=sys.stderr)
            return 130
    return 0


@contextlib.contextmanager
def job_output():
    """In a torchrun job rank 0 alone prints (the others' stdout goes nowhere); the process group is left
    cleanly at the end."""
    quiet = int(os.environ.get("RANK", "0")) != 0
    stdout = sys.stdout
    if quiet:
        sys.stdout = open(os.devnull, "w")
    try:
        yield
    finally:
        if quiet:
            sys.stdout.close()
            sys.stdout = stdout
        if _joined():
            torch.distributed.destroy_process_group()


def report_error(e: Exception) -> None:
    """One `error:` line. In a torchrun job the errors every process meets alike (flags, setup) are printed
    by rank 0 only; once the job runs, another rank's error names the rank."""
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0 or _joined():
        print(f"error: {f'[rank {rank}] ' if rank else ''}{one_line(e)}", file=sys.stderr)


def one_line(e: Exception) -> str:
    """An error's message on one line. An error raised in a DataLoader worker arrives wrapped in the
    worker's traceback; its last line is the message."""
    text = str(e)
    if "Original Traceback" in text:
        text = [ln for ln in text.splitlines() if ln.strip()][-1]
        text = text.split(": ", 1)[1] if text.startswith(("ppap.PPAPError", "PPAPError", "__main__.PPAPError")) else text
    return " ".join(text.split())


if __name__ == "__main__":
    # A module that imports ppap (a fork's plug-in, a test helper) must see this module, not a second copy
    # whose classes and registries differ from the running ones.
    sys.modules.setdefault("ppap", sys.modules[__name__])
    sys.exit(cli())

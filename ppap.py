"""PPAP: Progressive Proxy Anchor Propagation for Unsupervised Semantic Segmentation (ECCV 2024).

One readable file, the method first and the plumbing after it:
config and presets -> frozen DINO ViT -> the two branches and probes -> proxy anchor propagation and the
PPAP loss -> train step, validation and loop -> support code (weights, datasets, five-crop cache,
checkpoints and files) -> CLI.

    python ppap.py --data synthetic            # offline demo on CPU, a few minutes
    python ppap.py --data cocostuff            # the paper's default preset (ViT-S/8), one GPU
    python ppap.py --data cityscapes --help    # every flag, with the value this preset uses

Numbers follow the authors' code (github.com/hynnsk/PPAP) on the same inputs; every deviation is a flag.
"""
from __future__ import annotations

import argparse
import copy
import glob
import hashlib
import json
import math
import multiprocessing
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from scipy.io import loadmat
from scipy.optimize import linear_sum_assignment
from tqdm import tqdm

try:
    import fcntl                      # POSIX file locks (the five-crop build); absent on Windows
except ImportError:                   # pragma: no cover
    fcntl = None


class PPAPError(Exception):
    """A user-facing problem (missing data, wrong weights, bad flag): printed as one line, exit code 2."""


# ==== CONFIG ====

def _f(default, help: str):
    """A Config field: its default and the one line `--help` shows for it."""
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # -- what to train on, and with which frozen backbone
    data: str = _f("cocostuff", "synthetic | cocostuff | cityscapes | potsdam | imagenet-s")
    data_dir: str = _f(os.environ.get("PPAP_DATA", "./data"), "dataset root as download.sh lays it out "
                       "($PPAP_DATA)")
    imagenet_s_classes: int = _f(50, "ImageNet-S variant: 50 | 300 | 919")
    arch: str = _f("vit_small", "backbone: vit_small | vit_base | vit_tiny_demo (random init, offline demo)")
    patch: int = _f(8, "ViT patch size: 8 | 16")
    weights: str = _f("", "backbone checkpoint file; empty = the released DINO one via the torch hub cache")
    crop_quality: int = _f(0, "five-crop JPEGs: 0 = Pillow's defaults (quality 75, 4:2:0), as the authors' "
                           "crop script; 1-100 = that quality with 4:4:4 chroma (opt-in, other training data)")
    # -- the PPAP loss (the authors' loss.py, SupConLoss)
    phi0: float = _f(0.55, "initial positiveness boundary Phi_0")
    psi0: float = _f(0.20, "initial ambiguity boundary Psi_0")
    prop_iter: int = _f(2, "T, proxy anchor propagation steps (0 = ablation: no propagation)")
    sigma_pos: float = _f(3.0, "sigma_pos: Phi_t = Phi_{t-1} - (1 - cos(v_{t-1}, v_t)) / sigma_pos")
    sigma_amb: float = _f(3.0, "sigma_amb: Psi_t = Psi_{t-1} + (1 - cos(v_{t-1}, v_t)) / sigma_amb")
    tau: float = _f(0.8, "temperature of the contrastive logits z_a . z_j / tau")
    trainpatchsplit: int = _f(16, "anchors per group = group / trainpatchsplit")
    group: int = _f(784, "rows per anchor group (the authors' split: one /8 image at 224 px)")
    no_ambiguity: bool = _f(False, "ablation: Psi = Phi, every non-positive is a negative")
    ppap_weight: float = _f(1.0, "weight of the PPAP loss (0 = ablation: probes on the unchanged head)")
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
    amp: bool = _f(True, "mixed precision on CUDA (ignored on CPU)")
    amp_dtype: str = _f("fp16", "fp16 (the authors', with a GradScaler) | bf16")
    # -- evaluation protocol
    val_size: int = _f(320, "validation crop size (px)")
    val_every: int = _f(100, "steps between validations (0 = only at the end)")
    val_limit: int = _f(0, "validate on at most this many images (0 = all)")
    select_on_val: bool = _f(False, "also keep best_on_val.pt, chosen on the labelled val set (the authors' "
                             "practice; off by default)")
    # -- machinery: where and how the run executes, never what it computes
    device: str = _f("auto", "auto | cpu | cuda | cuda:1")
    num_workers: int = _f(4, "DataLoader worker processes")
    crop_workers: int = _f(0, "processes building the five-crop cache (0 = all cores)")
    run: str = _f("", "run directory; empty = runs/<data>_<arch><patch>_<time>")
    resume: str = _f("", "a run directory (or its last.pt) to continue exactly")
    progress: bool = _f(True, "progress bars")


# The authors' presets (their json/server/*.json), chosen by --data and --arch/--patch.
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
# The backbone each dataset uses when --arch/--patch are not given (the paper's default per dataset).
DEFAULT_BACKBONE = {"cocostuff": ("vit_small", 8), "cityscapes": ("vit_base", 8), "potsdam": ("vit_base", 8),
                    "imagenet-s": ("vit_small", 8), "synthetic": ("vit_tiny_demo", 8)}


def make_config(overrides: dict) -> Config:
    """Defaults <- preset of (data, arch, patch) <- explicit overrides. Unknown combos keep the dataset's
    default preset."""
    data = overrides.get("data", Config.data)
    if data not in DEFAULT_BACKBONE:
        raise PPAPError(f"unknown --data {data!r}; choose one of {', '.join(DEFAULT_BACKBONE)}")
    arch, patch = DEFAULT_BACKBONE[data]
    arch, patch = overrides.get("arch", arch), overrides.get("patch", patch)
    preset = PRESETS.get((data, arch, patch), PRESETS.get((data, *DEFAULT_BACKBONE[data]), {}))
    values = {**preset, "data": data, "arch": arch, "patch": patch, **overrides}
    unknown = set(values) - {f.name for f in fields(Config)}
    if unknown:
        raise PPAPError(f"unknown config field(s): {', '.join(sorted(unknown))}")
    cfg = Config(**values)
    check_config(cfg)
    return cfg


def check_config(cfg: Config) -> None:
    """One-line errors for values no run can use."""
    if cfg.arch not in ARCHS:
        raise PPAPError(f"unknown --arch {cfg.arch!r}; choose one of {', '.join(ARCHS)}")
    if cfg.patch not in (8, 16):
        raise PPAPError(f"--patch must be 8 or 16, not {cfg.patch}")
    if cfg.img_size % cfg.patch or cfg.val_size % cfg.patch:
        raise PPAPError(f"--img-size/--val-size must be multiples of the patch size {cfg.patch}")
    if cfg.optimizer not in ("adam", "adamw"):
        raise PPAPError(f"--optimizer must be adam or adamw, not {cfg.optimizer!r}")
    if cfg.group % cfg.trainpatchsplit:
        raise PPAPError(f"--group {cfg.group} is not divisible by --trainpatchsplit {cfg.trainpatchsplit}")
    if not 0 <= cfg.crop_quality <= 100:
        raise PPAPError(f"--crop-quality must be 0 (Pillow's defaults) or 1-100, not {cfg.crop_quality}")


# ==== BACKBONE: DINO ViT (frozen) ====
# Key names and numerics of the released DINO checkpoints (DINO's vision_transformer.py, which the authors'
# model/dino/vision_transformer.py copies), so that they load with strict=True.

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
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


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
    def __init__(self, patch_size: int, embed_dim: int, depth: int, num_heads: int, img_size: int = 224):
        super().__init__()
        self.patch_size, self.embed_dim = patch_size, embed_dim
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (img_size // patch_size) ** 2, embed_dim))
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads) for _ in range(depth)])
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
        """DINO's bicubic resize of the positional grid to (H/p, W/p); the +0.1 avoids floor errors."""
        N = self.pos_embed.shape[1] - 1
        if n_patches == N and H == W:
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        g = int(math.sqrt(N))
        h0, w0 = H // self.patch_size + 0.1, W // self.patch_size + 0.1
        patch_pos = F.interpolate(patch_pos.reshape(1, g, g, -1).permute(0, 3, 1, 2),
                                  scale_factor=(h0 / math.sqrt(N), w0 / math.sqrt(N)), mode="bicubic")
        assert patch_pos.shape[-2:] == (int(h0), int(w0))
        return torch.cat((cls_pos, patch_pos.permute(0, 2, 3, 1).reshape(1, -1, self.embed_dim)), dim=1)

    def prepare_tokens(self, x):
        """[B,3,H,W] -> [B,1+h*w,D]: patch embedding, CLS token, positional embedding."""
        B, _, H, W = x.shape
        t = self.patch_embed(x)
        t = torch.cat((self.cls_token.expand(B, -1, -1), t), dim=1)
        return t + self.interpolate_pos_encoding(t.shape[1] - 1, H, W)

    def tokens(self, x):
        """[B,3,H,W] -> (t after the penultimate block, norm(t after the last block)), both [B,1+h*w,D]."""
        t = self.prepare_tokens(x)
        for blk in self.blocks[:-1]:
            t = blk(t)
        return t, self.norm(self.blocks[-1](t))

    def forward(self, x):
        return self.tokens(x)[1]


def vit_small(patch_size: int = 16) -> VisionTransformer:
    return VisionTransformer(patch_size, embed_dim=384, depth=12, num_heads=6)


def vit_base(patch_size: int = 16) -> VisionTransformer:
    return VisionTransformer(patch_size, embed_dim=768, depth=12, num_heads=12)


def vit_tiny_demo(patch_size: int = 8) -> VisionTransformer:
    """The offline demo's backbone: 4 blocks of width 192, randomly initialised from a fixed seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        return VisionTransformer(patch_size, embed_dim=192, depth=4, num_heads=3)


ARCHS = {"vit_small": vit_small, "vit_base": vit_base, "vit_tiny_demo": vit_tiny_demo}


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

    Built in the authors' order (DinoFeaturizer, then STEGOmodel): head (a copy, no random draw), projection,
    cluster probe, linear probe, so that one seed gives the authors' initial projection and probes."""

    def __init__(self, backbone: VisionTransformer, n_classes: int):
        super().__init__()
        self.backbone = backbone.requires_grad_(False)
        self.head = copy.deepcopy(backbone.blocks[-1]).requires_grad_(True)
        D = backbone.embed_dim
        self.proj = nn.Linear(D, D)
        self.crit_dropout = nn.Dropout2d(p=CRIT_DROPOUT)
        self.cluster_probe = ClusterProbe(D, n_classes)
        self.linear_probe = nn.Conv2d(D, n_classes, 1)
        self.n_classes, self.patch_size, self.dim = n_classes, backbone.patch_size, D

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()           # frozen: never in training mode (it has no dropout, but be explicit)
        return self

    def forward(self, x):
        """x normalised [B,3,H,W] -> {'code' [B,D,h,w], 'z' [B*h*w,D] unit rows, 'crit' [B,D,h,w]}."""
        B, _, H, W = x.shape
        h, w = H // self.patch_size, W // self.patch_size
        with torch.no_grad():
            t11, c = self.backbone.tokens(x)
        grid = lambda t: t[:, 1:].reshape(B, h, w, -1).permute(0, 3, 1, 2)
        crit = self.crit_dropout(grid(c))
        code = grid(self.backbone.norm(self.head(t11)))
        z = F.normalize(self.proj(code.permute(0, 2, 3, 1).reshape(B * h * w, -1)), dim=1)
        return {"code": code, "z": z, "crit": crit}

    def head_parameters(self):
        return list(self.head.parameters()) + list(self.proj.parameters())


def build_model(cfg: Config, n_classes: int) -> PPAP:
    return PPAP(build_backbone(cfg), n_classes)


# ==== PROPAGATION AND LOSS: progressive proxy anchor propagation with an ambiguity zone ====
# The paper's method section; the authors' loss.py, SupConLoss.forward. For each anchor, positives start
# as the samples above the positiveness boundary Phi_0; the proxy anchor then moves T times to the mean of
# its positives, and the further it moves, the looser Phi (more positives) and the higher the ambiguity
# boundary Psi (samples between Psi and Phi leave the negatives). A supervised-contrastive loss follows.

TAU_BASE = 0.07           # SupCon's base temperature, which the authors left at SupConLoss's default


def draw_anchors(n_rows: int, group: int, n_anchors: int, generator=None) -> torch.Tensor:
    """One torch.randperm per group, as the authors do -> within-group positions [n_rows // group, A]."""
    return torch.stack([torch.randperm(group, generator=generator)[:n_anchors] for _ in range(n_rows // group)])


def _fp16(x: float) -> float:
    # The authors keep Phi and Psi in float16 tensors: their boundaries start from the fp16-rounded values.
    return float(torch.tensor(x, dtype=torch.float16))


def propagate(f: torch.Tensor, anchor_rows: torch.Tensor, *, phi0, psi0, prop_iter, sigma_pos, sigma_amb,
              no_ambiguity=False, trace: list | None = None):
    """Move each anchor's proxy toward the dense region of its positives.

    f [N,D] unit rows, anchor_rows [a] global row ids -> (positive mask [a,N] without the anchor itself,
    negative mask [a,N] (sim < Psi), counted positives [a], counted negatives [a]).
    Proxies are mask @ f products: no [a,N,D] tensor is ever built (the authors' code builds one).

    trace: None (training: nothing is recorded and nothing extra computed), or a list that receives one
    dict per step t = 0..T (eval.py --propagation measures the paper's claim with it): 'pos', 'neg' [a,N]
    bool, the sets this function would return had it stopped after step t (anchor excluded); 'sim' [a,N],
    the similarity to the step's proxy (t = 0: the anchor itself); 'phi', 'psi' [a,1], the boundaries
    Phi_t and Psi_t that defined them (t = 0: the exact Phi_0, as the positives use it).
    """
    N = f.shape[0]
    fa = f[anchor_rows]
    sim = fa @ f.T                                              # [a,N]
    pos = sim > phi0                                            # P0 = {j : s_j > Phi0}
    phi = torch.full((len(anchor_rows), 1), _fp16(phi0), device=f.device)
    psi = torch.full((len(anchor_rows), 1), _fp16(psi0), device=f.device)
    if trace is not None:
        _trace_step(trace, anchor_rows, sim, pos, torch.full_like(phi, phi0), psi, no_ambiguity)
    v_prev = fa
    for _ in range(prop_iter):
        v = F.normalize((pos.to(f.dtype) @ f) / N, dim=1)       # proxy: mean of positives, re-normalised
        sim = v @ f.T
        moved = 1.0 - F.cosine_similarity(v_prev, v, dim=1)[:, None]
        psi = psi + moved / sigma_amb                           # further move -> wider ambiguity zone
        phi = phi - moved / sigma_pos                           #             -> looser positive boundary
        pos = sim > phi
        v_prev = v
        if trace is not None:
            _trace_step(trace, anchor_rows, sim, pos, phi, psi, no_ambiguity)
    neg = ~pos if no_ambiguity else sim < psi
    self_mask = torch.zeros_like(pos)
    self_mask[torch.arange(len(anchor_rows), device=f.device), anchor_rows] = True
    pos = pos & ~self_mask
    return pos, neg & ~self_mask, pos.sum(1), neg.sum(1)


def _trace_step(trace: list, anchor_rows, sim, pos, phi, psi, no_ambiguity) -> None:
    """propagate's diagnostics: the sets of one step, as propagate would return them (see its docstring)."""
    others = torch.ones_like(pos)
    others[torch.arange(len(anchor_rows), device=pos.device), anchor_rows] = False
    neg = ~pos if no_ambiguity else sim < psi
    trace.append({"pos": pos & others, "neg": neg & others, "sim": sim, "phi": phi, "psi": psi})


def ppap_loss(z, f, anchors, *, phi0, psi0, prop_iter, sigma_pos, sigma_amb, tau, group=784,
              no_ambiguity=False, chunk_elems=None):
    """The PPAP contrastive loss.

    z [N,D] unit rows (with gradient), f [N,D] criterion features (normalised here, no gradient),
    anchors [N // group, A] LongTensor of within-group positions. Every row of z/f is a contrast sample;
    only rows in full groups are anchors (the authors' int(N / 784) groups). An anchor's loss is
    -(tau / TAU_BASE) * mean over its positives of log p, with the ambiguous samples left out of p's
    denominator; anchors without positives are skipped; group loss = mean over anchors, total = mean over
    groups. Anchors of several groups are processed together in chunks of about chunk_elems similarity
    entries (default 2^20 on CPU, where caches favour small blocks, and 2^26 on GPUs, where large products
    pay), so memory is O(chunk) whatever the batch.
    Returns (loss scalar, {'positives', 'negatives'}: mean per anchor).
    """
    N = z.shape[0]
    n_groups, A = anchors.shape
    assert n_groups == N // group and n_groups > 0, "anchors must have one row per full group"
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
            pos, neg, n_pos[s:s + len(r)], n_neg[s:s + len(r)] = propagate(
                f, r, phi0=phi0, psi0=psi0, prop_iter=prop_iter, sigma_pos=sigma_pos, sigma_amb=sigma_amb,
                no_ambiguity=no_ambiguity)
            valid = pos.any(1)                                  # anchors without positives are skipped
        if not valid.any():
            continue
        pos, denom = pos[valid], (pos | neg)[valid]             # ambiguous samples leave the denominator
        logits = (z[r[valid]] @ z.T) / tau                      # [a,N]
        log_denom = torch.logsumexp(logits.masked_fill(~denom, float("-inf")), dim=1)
        mean_log_prob = (logits * pos).sum(1) / pos.sum(1) - log_denom
        idx = torch.arange(s, s + len(r), device=z.device)[valid]
        anchor_loss = anchor_loss.index_put((idx,), -(tau / TAU_BASE) * mean_log_prob)
        has_pos[idx] = True
    per_group = anchor_loss.view(n_groups, A).sum(1) / has_pos.view(n_groups, A).sum(1).clamp(min=1)
    stats = {"positives": n_pos.view(n_groups, A).mean(1).mean().item(),
             "negatives": n_neg.view(n_groups, A).mean(1).mean().item()}
    loss = per_group.mean()
    if z.requires_grad and not loss.requires_grad:     # no anchor had a positive: a zero that still backprops
        loss = loss + 0 * z.sum()
    return loss, stats


def loss_args(cfg: Config) -> dict:
    """Config -> the keyword arguments of ppap_loss: the one place the loss reads its hyper-parameters."""
    return dict(phi0=cfg.phi0, psi0=cfg.psi0, prop_iter=cfg.prop_iter, sigma_pos=cfg.sigma_pos,
                sigma_amb=cfg.sigma_amb, tau=cfg.tau, group=cfg.group, no_ambiguity=cfg.no_ambiguity)


def contrastive_loss(cfg: Config, z: torch.Tensor, crit: torch.Tensor):
    """The training step's contrastive term: z [N,D], crit [B,D,h,w] -> (loss, stats dict).

    A fork swaps the loss here (and in loss_args); the step logs whatever statistics it returns."""
    f = crit.permute(0, 2, 3, 1).reshape(-1, crit.shape[1])
    anchors = draw_anchors(f.shape[0], cfg.group, cfg.group // cfg.trainpatchsplit)
    return ppap_loss(z, f, anchors, **loss_args(cfg))


# ==== TRAIN STEP, VALIDATION AND LOOP ====
# The authors' run.py: three optimisers (head + projection, linear probe, cluster probe), one GradScaler,
# gradient clipping on head + projection, probes trained on the detached code.

GRAD_SCALER_INIT, GRAD_SCALER_GROWTH = 2048, 1000   # run.py: GradScaler(init_scale=2048, growth_interval=1000)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise PPAPError(f"unknown --device {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PPAPError(f"--device {name} asked for, but torch sees no CUDA GPU; use --device cpu")
    return dev


def amp_dtype(cfg: Config, device) -> torch.dtype | None:
    """The precision policy, decided here only: the autocast dtype for cfg on device, or None for fp32."""
    if not cfg.amp or torch.device(device).type != "cuda":
        return None
    return torch.bfloat16 if cfg.amp_dtype == "bf16" else torch.float16


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
            "cluster": torch.optim.Adam(model.cluster_probe.parameters(), lr=cfg.cluster_lr)}


def probe_losses(model: PPAP, code, label):
    """Linear-probe cross-entropy (logits upsampled to the label size) + cluster-probe loss, on code.detach()."""
    code = code.detach()
    logits = F.interpolate(model.linear_probe(code), label.shape[-2:], mode="bilinear", align_corners=False)
    logits = logits.permute(0, 2, 3, 1).reshape(-1, model.n_classes)
    flat = label.reshape(-1)
    keep = (flat >= 0) & (flat < model.n_classes)
    linear = F.cross_entropy(logits[keep].float(), flat[keep]) if keep.any() else logits.sum() * 0
    cluster, _ = model.cluster_probe(code, None)
    return linear, cluster


def train_step(model, batch, opts, scaler, cfg: Config, device) -> dict:
    """One step: forward, contrastive loss + probe losses, backward, clip, the three optimisers.
    -> stats: the losses, the gradient norm and whatever statistics the contrastive loss reports."""
    img = batch["img"].to(device, non_blocking=True)
    label = batch["label"].to(device, non_blocking=True)
    for o in opts.values():
        o.zero_grad(set_to_none=True)
    dtype = amp_dtype(cfg, device)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        out = model(img)
        linear, cluster = probe_losses(model, out["code"], label)
    loss = linear + cluster
    stats = {}
    if cfg.ppap_weight:    # weight 0 is the baseline: no gradient reaches head/projection
        loss_ppap, stats = contrastive_loss(cfg, out["z"], out["crit"])
        loss = loss + cfg.ppap_weight * loss_ppap
        stats = {"ppap": loss_ppap.item(), **stats}
    scaler.scale(loss).backward()
    scaler.unscale_(opts["net"])
    gnorm = nn.utils.clip_grad_norm_(model.head_parameters(), cfg.grad_clip)
    for o in opts.values():
        scaler.step(o)
    scaler.update()
    return {"loss": loss.item(), "linear": linear.item(), "cluster": cluster.item(), "grad_norm": float(gnorm),
            **stats}


# ---- validation metrics (the authors' utils/seg_utils.py UnsupervisedMetrics)
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
             progress: bool = True, desc: str = "val") -> dict:
    """The evaluation protocol on val items {'img','label'} (the authors' run.py evaluate).

    Per batch: code = model(img)['code'] upsampled bilinearly (align_corners=False) to the label size;
    linear prediction = argmax(linear_probe(code)); cluster prediction = argmax of the cosine scores with
    the centroids. ``refine(img, linear_logits, cluster_scores, code) -> {probe: pred}`` (code: the upsampled
    code [B,D,H,W]) adds predictions (eval.py's CRF and k-means); a probe whose name starts with one of
    MATCHED_PROBES predicts cluster ids and is Hungarian-matched, the others predict classes. One confusion
    matrix per probe over the loader. ``amp``: autocast dtype or None (fp32).

    Returns a flat dict; for each probe P: P_mIoU, P_Acc (x100), P_IoU (per class), P_IoU_extra (K > C),
    P_confusion [C,K], P_assignment, P_matched (see ``scores``); plus n_images and examples (dicts of uint8
    RGB 'image', 'label' and each probe's raw prediction, for eval.plot_examples). Scalars are floats/ints and
    everything else a list, so the dict goes straight into a JSON log after dropping lists. The model's
    train/eval mode is restored afterwards.
    """
    device = torch.device(device)
    n_classes, n_clusters = int(model.n_classes), int(model.cluster_probe.clusters.shape[0])
    confs, examples, n_images = {}, [], 0
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=not progress):
            img, label = _unpack_batch(batch)
            img = img.to(device, non_blocking=True)
            label = label.to(device, non_blocking=True).long()
            # as the authors: featurizer and probes under autocast, the upsampling outside it
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                code = model(img)["code"]
            code = F.interpolate(code, size=label.shape[-2:], mode="bilinear", align_corners=False)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                linear_logits = model.linear_probe(code)
                inner = model.cluster_probe.inner(code)
            preds = {"cluster": inner.argmax(1), "linear": linear_logits.argmax(1)}
            if refine is not None:
                preds.update(refine(img, linear_logits, inner, code))
            for k, p in preds.items():
                if k not in confs:
                    confs[k] = torch.zeros(n_classes, n_clusters if k.startswith("cluster") else n_classes,
                                           dtype=torch.int64, device=device)
                confusion_update(confs[k], p, label, n_classes, confs[k].shape[1])
            if len(examples) < n_examples:
                rgb = to_uint8_rgb(img).cpu()
                for i in range(min(img.shape[0], n_examples - len(examples))):
                    examples.append({"image": rgb[i].numpy(), "label": label[i].cpu().numpy(),
                                     **{k: p[i].cpu().numpy() for k, p in preds.items()}})
            n_images += img.shape[0]
    finally:
        model.train(was_training)
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
    Everything goes to cfg.run."""
    device = pick_device(cfg.device)
    if not cfg.run:
        cfg.run = os.path.join("runs", f"{cfg.data}_{cfg.arch}{cfg.patch}_{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(cfg.run, exist_ok=True)

    banner("config")
    print(f"git {git_commit()} | torch {torch.__version__} | device {device}")
    for k, v in asdict(cfg).items():
        print(f"  {k:18s} {v}")

    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    banner("data")
    train_set, val_set = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    if cfg.val_limit:
        val_set = subset(val_set, range(min(cfg.val_limit, len(val_set))))
    print(f"train {len(train_set)} images ({cfg.img_size}px), val {len(val_set)} images ({cfg.val_size}px), "
          f"{train_set.n_classes} classes")
    if len(train_set) < cfg.batch_size:
        raise PPAPError(f"the train set has {len(train_set)} images, fewer than --batch-size {cfg.batch_size}")
    h = cfg.img_size // cfg.patch
    if cfg.ppap_weight and cfg.batch_size * h * h < cfg.group:
        raise PPAPError(f"a batch of {cfg.batch_size} has {cfg.batch_size * h * h} patches, fewer than one "
                        f"anchor group ({cfg.group}); raise --batch-size or lower --group")

    banner("model")
    model = build_model(cfg, train_set.n_classes).to(device)
    opts = build_optimizers(cfg, model)
    scaler = make_scaler(cfg, device)
    step, best = 0, None
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        for k, o in opts.items():
            o.load_state_dict(ckpt["optim"][k])
        scaler.load_state_dict(ckpt["scaler"])
        step, best = ckpt["step"], ckpt.get("best")
        torch.set_rng_state(ckpt["rng"]["torch"])
        if ckpt["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        print(f"resumed {cfg.run} at step {step}")
    n_train = sum(p.numel() for p in model.head_parameters())
    print(f"{cfg.arch}/{cfg.patch}: {sum(p.numel() for p in model.backbone.parameters()) / 1e6:.1f}M frozen, "
          f"{n_train / 1e6:.2f}M trained (head + projection)")

    steps_per_epoch = len(train_set) // cfg.batch_size
    total = cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    val_loader = make_loader(cfg, val_set, train=False, batch_size=max(1, min(cfg.batch_size, 8)))
    log_path = os.path.join(cfg.run, "log.jsonl")

    def run_validation():
        nonlocal best
        metrics = evaluate(model, val_loader, device, amp=amp_dtype(cfg, device), progress=cfg.progress)
        record = {"step": step, **{k: v for k, v in metrics.items() if isinstance(v, float)}}
        with open(log_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        print(f"[val step {step}] " + "  ".join(f"{k} {v:.2f}" for k, v in record.items()
                                                 if k != "step"), flush=True)
        if cfg.select_on_val:
            score = sum(record.get(k, 0) for k in ("cluster_mIoU", "cluster_Acc", "linear_mIoU", "linear_Acc"))
            if best is None or score >= best["score"]:
                best = {"score": score, "step": step}
                save_checkpoint(model, opts, scaler, cfg, step, train_set, best, "best-on-val")
        model.train()
        return metrics

    banner("train")
    model.train()
    metrics = None
    bar = tqdm(total=total, initial=step, dynamic_ncols=True, desc="train", disable=not cfg.progress)
    while step < total:
        epoch, skip = divmod(step, steps_per_epoch)
        for batch in make_loader(cfg, train_set, train=True, epoch=epoch, skip=skip):
            t0 = time.time()
            st = train_step(model, batch, opts, scaler, cfg, device)
            step += 1
            bar.update(1)
            bar.set_postfix(_format_stats(st), ips=f"{cfg.batch_size / (time.time() - t0):.1f}")
            if validation_due(cfg, step, steps_per_epoch, total):
                bar.clear()
                metrics = run_validation()
                save_checkpoint(model, opts, scaler, cfg, step, train_set, best)
            if step == total:
                break
    bar.close()
    if metrics is None:            # resumed a finished run
        metrics = run_validation()
    banner("result")
    selection = "last checkpoint" + (f" (best-on-val kept separately at step {best['step']})" if best else "")
    print(f"{selection}: unsupervised mIoU {metrics['cluster_mIoU']:.2f}  Acc {metrics['cluster_Acc']:.2f} | "
          f"linear mIoU {metrics['linear_mIoU']:.2f}  Acc {metrics['linear_Acc']:.2f}")
    print(f"run: {cfg.run}  (evaluate with: python eval.py --run {cfg.run})")
    return metrics


# ==== SUPPORT: backbone weights ====

DINO_URL = "https://dl.fbaipublicfiles.com/dino/"
DINO_FILES = {("vit_small", 16): "dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth",
              ("vit_small", 8): "dino_deitsmall8_300ep_pretrain/dino_deitsmall8_300ep_pretrain.pth",
              ("vit_base", 16): "dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",
              ("vit_base", 8): "dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth"}


def dino_state_dict(obj) -> dict:
    """Released DINO weights, or a DINO training checkpoint ({'teacher': ...} with module./backbone. prefixes)."""
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
    """Load a DINO-format file into vit with strict=True; any mismatch is one clear PPAPError."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise PPAPError(f"weights file not found: {path}") from None
    except Exception as e:
        raise PPAPError(f"cannot read weights {path}: {type(e).__name__}: {str(e).splitlines()[0][:120]}") from None
    sd = dino_state_dict(obj)
    missing, unexpected, wrong = key_mismatch(vit.state_dict(), sd, free_shape=("pos_embed",))
    if missing or unexpected or wrong:
        what = (f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}" if unexpected
                else f"shape mismatch at {wrong[:3]}")
        raise PPAPError(f"{path} does not fit {vit.embed_dim}-wide ViT/{vit.patch_size} ({what}); "
                        f"check --arch/--patch, or run: bash download.sh weights")
    vit.adopt_pos_grid(sd["pos_embed"])
    vit.load_state_dict(sd, strict=True)


def build_backbone(cfg: Config) -> VisionTransformer:
    """The frozen backbone for cfg.arch/cfg.patch, with weights from --weights or the torch hub cache."""
    vit = ARCHS[cfg.arch](cfg.patch)
    if cfg.arch == "vit_tiny_demo" and not cfg.weights:
        return vit
    path = cfg.weights
    if not path:
        name = DINO_FILES[(cfg.arch, cfg.patch)]
        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(name))
        if not os.path.exists(path):
            try:
                torch.hub.download_url_to_file(DINO_URL + name, path, progress=cfg.progress)
            except Exception as e:
                raise PPAPError(f"cannot fetch DINO weights {DINO_URL + name} ({type(e).__name__}); run: "
                                f"bash download.sh weights, or pass --weights FILE") from None
    load_backbone_weights(vit, path)
    return vit


# ==== SUPPORT: datasets ====

# ---- the offline demo's synthetic dataset
# A deterministic procedural dataset for the offline demo and the tests. Each image is a random Voronoi
# layout of regions; each region belongs to one of SYNTH_CLASSES classes that differ in colour and texture
# (stripe orientation and frequency, grain). A per-image colour cast, brightness and contrast change make the
# raw features informative but not cleanly clustered, as DINO features are on real scenes.

SYNTH_CLASSES = ["red grain", "green stripes", "blue checks", "yellow smooth", "purple waves", "grey noise"]
_SYNTH_COLOURS = np.array([[0.75, 0.30, 0.25], [0.35, 0.65, 0.30], [0.25, 0.35, 0.80],
                           [0.80, 0.75, 0.30], [0.70, 0.30, 0.70], [0.35, 0.35, 0.35]], dtype=np.float32)


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
        u = xx * np.cos(angle) + yy * np.sin(angle)
        v = -xx * np.sin(angle) + yy * np.cos(angle)
        texture = {0: rng.normal(0, 0.18, (size, size)),
                   1: 0.25 * np.sign(np.sin(u / 2.0)),
                   2: 0.22 * np.sign(np.sin(u / 3.0)) * np.sign(np.sin(v / 3.0)),
                   3: np.zeros((size, size)),
                   4: 0.2 * np.sin(u / 4.0 + 2 * np.sin(v / 7.0)),
                   5: rng.normal(0, 0.3, (size, size))}[int(c)]
        colour = _SYNTH_COLOURS[c] + rng.normal(0, 0.06, 3)
        img[m] = colour + texture[m, None].astype(np.float32)
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
    cmd = f"bash download.sh {dataset} {data_dir}"
    return PPAPError(f"missing {path} — run: {cmd}{hint}")


def _require(paths, dataset, data_dir, hint=""):
    for p in paths:
        if not os.path.exists(p):
            raise _missing(p, dataset, data_dir, hint)


def _read_list(path):
    with open(path) as f:
        return [ln.strip() for ln in f if ln.strip()]


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

def _load_coco(img_path, lab_path):
    img = Image.open(img_path).convert("RGB")
    return img, _apply_lut(_COCO_LUT, Image.open(lab_path))   # fine ids 0..181, 255 unlabelled


def _load_cityscapes(img_path, lab_path):
    img = Image.open(img_path).convert("RGB")
    return img, _apply_lut(_CITYSCAPES_LUT, Image.open(lab_path))   # labelIds 0..33


def _potsdam_image(arr):
    """STEGO's potsdam .mat 'img' is [H,W,4] (RGB + IR).  Keep RGB.  uint8 is used as is; float
    data in [0,1] is scaled by 255, float data with values above 1.5 is taken as 0..255; rounded
    and clipped to uint8."""
    arr = np.asarray(arr)[..., :3]
    if arr.dtype != np.uint8:
        arr = arr.astype(np.float64)
        if np.nanmax(arr, initial=0.0) <= 1.5:
            arr = arr * 255.0
        arr = np.clip(np.rint(np.nan_to_num(arr)), 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(arr))          # mode RGB


def _load_potsdam(img_path, lab_path):
    img = _potsdam_image(loadmat(img_path)["img"])
    lab = np.asarray(loadmat(lab_path)["gt"])
    return img, _apply_lut(_POTSDAM_LUT, lab.reshape(lab.shape[:2]))   # fine 0..5, 255 ignore


def _load_imagenet_s(img_path, lab_path):
    img = Image.open(img_path).convert("RGB")
    rgb = np.asarray(Image.open(lab_path).convert("RGB")).astype(np.int64)
    lab = rgb[..., 0] + 256 * rgb[..., 1]                     # class id = R + 256*G
    return img, np.where(lab == IMAGENET_S_IGNORE, -1, lab)


_RAW_LOADERS = {"cocostuff": _load_coco, "cityscapes": _load_cityscapes,
                "potsdam": _load_potsdam, "imagenet-s": _load_imagenet_s}


class RealSegDataset(torch.utils.data.Dataset):
    """Pairs (image, label) from one of the real benchmarks, resized (shorter side, NEAREST) and
    centre-cropped to `size`.  `kind` selects the raw loader; five-crop sets use kind 'five_crop'."""

    def __init__(self, name, kind, pairs, size, n_classes, class_names, data_dir="data"):
        self.name, self.kind, self.pairs, self.size = name, kind, list(pairs), int(size)
        self.n_classes, self.class_names, self.data_dir = int(n_classes), list(class_names), data_dir

    def __len__(self):
        return len(self.pairs)

    def load_raw(self, i):
        """-> (PIL RGB image, int64 label array with -1 = ignore), at the stored resolution."""
        img_path, lab_path = self.pairs[i]
        try:
            if self.kind == "five_crop":
                img = Image.open(img_path).convert("RGB")
                return img, np.asarray(Image.open(lab_path), dtype=np.int64) - 1   # stored label + 1
            return _RAW_LOADERS[self.kind](img_path, lab_path)
        except FileNotFoundError as e:
            if self.kind == "five_crop":
                crops = os.path.dirname(os.path.dirname(os.path.dirname(img_path)))
                raise PPAPError(f"missing {e.filename} — delete {crops} to rebuild the five-crop set") from None
            raise _missing(e.filename, self.name, self.data_dir) from None

    def __getitem__(self, i):
        img, lab = self.load_raw(i)
        img = resize_center_crop(img, self.size)
        lab = np.asarray(resize_center_crop(_label_image(lab + 1), self.size), dtype=np.int64) - 1
        return to_item(img, lab)


# ---- five-crop cache (the authors' crop_datasets.py, which does not run as shipped; ours does)

def _five_crop_one(task):
    """Worker: crop source pair i into 5 (image, label+1) files; skips files already present."""
    kind, i, img_path, lab_path, out, quality = task
    names = [(os.path.join(out, "img", "train", f"{5 * i + k}.jpg"),
              os.path.join(out, "label", "train", f"{5 * i + k}.png")) for k in range(5)]
    if all(os.path.exists(p) for pair in names for p in pair):
        return i
    try:
        img, lab = _RAW_LOADERS[kind](img_path, lab_path)
    except FileNotFoundError as e:
        raise PPAPError(f"missing {e.filename}") from None
    if lab.shape != (img.height, img.width):
        raise PPAPError(f"label {lab_path} is {lab.shape[1]}x{lab.shape[0]} but image {img_path} "
                        f"is {img.width}x{img.height}")
    # Pillow's defaults (quality 75, 4:2:0 chroma) are what the authors' and STEGO's crop scripts wrote
    jpeg = dict(quality=quality, subsampling=0) if quality else {}
    stored = Image.fromarray((lab + 1).clip(0, 255).astype(np.uint8))     # mode L
    for (ip, lp), box in zip(names, five_crop_boxes(img.width, img.height)):
        atomic_write(ip, lambda p, c=img.crop(box): c.save(p, format="JPEG", **jpeg))
        atomic_write(lp, lambda p, c=stored.crop(box): c.save(p, format="PNG"))
    return i


def _pairs_digest(pairs):
    h = hashlib.sha1()
    for a, b in pairs:
        h.update(f"{os.path.basename(a)}\t{os.path.basename(b)}\n".encode())
    return h.hexdigest()


def five_crop_dir(data_dir, name, ratio=FIVE_CROP_RATIO, quality=0):
    """The authors' folder name; a non-default JPEG quality gets a folder of its own."""
    return os.path.join(data_dir, "cropped", f"{name}_five_crop_{ratio}" + (f"_q{quality}" if quality else ""))


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def build_five_crop(name, kind, pairs, data_dir, workers=0, progress=True, quality=0):
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
                "n_images": len(pairs), "n_crops": 5 * len(pairs), "sources_sha1": _pairs_digest(pairs)}
    if _read_json(os.path.join(out, "DONE.json")) == manifest:
        return out
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".lock", "w") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)      # one builder at a time; the others wait, then reuse
        if _read_json(os.path.join(out, "DONE.json")) == manifest:
            return out
        tmp = out + ".incomplete"
        if os.path.exists(tmp) and _read_json(os.path.join(tmp, "sources.json")) != manifest:
            shutil.rmtree(tmp)                    # leftover of a build from other sources or encoding
        for sub in ("img", "label"):
            d = os.path.join(tmp, sub, "train")
            os.makedirs(d, exist_ok=True)
            for e in os.scandir(d):               # temporaries of a killed builder
                if ".tmp" in e.name:
                    os.remove(e.path)
        atomic_write(os.path.join(tmp, "sources.json"), lambda p: write_json(p, manifest))
        tasks = [(kind, i, a, b, tmp, quality) for i, (a, b) in enumerate(pairs)]
        workers = int(workers) if workers and workers > 0 else (os.cpu_count() or 1)
        workers = max(1, min(workers, len(tasks)))
        bar = tqdm(total=len(tasks), desc=f"five-crop {name} -> {out}", unit="img", disable=not progress)
        try:
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
        except PPAPError as e:
            raise PPAPError(f"{e} — run: bash download.sh {name} {data_dir}") from None
        finally:
            bar.close()
        atomic_write(os.path.join(tmp, "DONE.json"), lambda p: write_json(p, manifest))
        if os.path.exists(out):                   # stale set (other sources / encoding): replace
            stale = f"{out}.stale-{os.getpid()}"
            os.rename(out, stale)
            os.rename(tmp, out)
            shutil.rmtree(stale, ignore_errors=True)
        else:
            os.rename(tmp, out)
    return out


def five_crop_dataset(name, kind, pairs, data_dir, size, n_classes, class_names, workers=0,
                      progress=True, quality=0):
    out = build_five_crop(name, kind, pairs, data_dir, workers=workers, progress=progress, quality=quality)
    crops = [(os.path.join(out, "img", "train", f"{j}.jpg"),
              os.path.join(out, "label", "train", f"{j}.png")) for j in range(5 * len(pairs))]
    return RealSegDataset(name, "five_crop", crops, size, n_classes, class_names, data_dir)


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


def _imagenet_s_variant(cfg):
    """50, 300 or 919 (--imagenet-s-classes)."""
    n = cfg.imagenet_s_classes
    if str(n) not in ("50", "300", "919"):
        raise PPAPError(f"ImageNet-S has 50, 300 or 919 classes, not {n}")
    return int(n)


REAL_DATASETS = ("cocostuff", "cityscapes", "potsdam", "imagenet-s")


def build_real_dataset(cfg: Config, split: str):
    """COCO-Stuff-27, Cityscapes-27, Potsdam-3, ImageNet-S from cfg.data_dir (layouts above).
    split 'train' -> cfg.img_size (COCO and Cityscapes: the five-crop set, built on first use with
    every available core), 'val' -> cfg.val_size.  ImageNet-S: see _imagenet_s_variant."""
    if split not in ("train", "val"):
        raise PPAPError(f"split must be 'train' or 'val', not {split!r}")
    name, data_dir = str(cfg.data), str(cfg.data_dir)
    size = int(cfg.img_size if split == "train" else cfg.val_size)
    workers = cfg.crop_workers or (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    progress = cfg.progress
    if name == "cocostuff":
        pairs, n, names = cocostuff_pairs(data_dir, split), 27, COCOSTUFF27_CLASS_NAMES
    elif name == "cityscapes":
        pairs, n, names = cityscapes_pairs(data_dir, split), 27, CITYSCAPES27_CLASS_NAMES
    elif name == "potsdam":
        return RealSegDataset(name, "potsdam", potsdam_pairs(data_dir, split), size, 3, POTSDAM3_CLASS_NAMES,
                              data_dir)
    elif name.startswith("imagenet-s"):
        k = _imagenet_s_variant(cfg)
        pairs, names = imagenet_s_pairs(data_dir, split, k)
        return RealSegDataset("imagenet-s", "imagenet-s", pairs, size, k + 1, names, data_dir)
    else:
        raise PPAPError(f'unknown dataset {name!r} (real datasets: {", ".join(REAL_DATASETS)})')
    if split == "train":
        return five_crop_dataset(name, name, pairs, data_dir, size, n, names, workers=workers,
                                 progress=progress, quality=cfg.crop_quality)
    return RealSegDataset(name, name, pairs, size, n, names, data_dir)


def build_dataset(cfg: Config, split: str):
    """split 'train' (img_size crops) or 'val' (val_size: shorter side resized to it with NEAREST, centre
    crop, as the authors' val transform)."""
    if cfg.data == "synthetic":
        return SyntheticDataset(split, cfg.img_size if split == "train" else cfg.val_size)
    return build_real_dataset(cfg, split)




def subset(dataset, indices):
    """torch Subset that keeps the dataset's n_classes and class_names."""
    sub = torch.utils.data.Subset(dataset, list(indices))
    sub.n_classes, sub.class_names = dataset.n_classes, dataset.class_names
    return sub


SEED_STRIDE = 100003      # a prime: the data-order seeds seed*SEED_STRIDE + epoch never collide in practice


def make_loader(cfg: Config, dataset, train: bool, epoch: int = 0, skip: int = 0, batch_size: int | None = None):
    """The DataLoader of every split. Training order is a permutation seeded by (seed, epoch) from a private
    generator; `skip` drops the batches a resumed run has already seen. Evaluation is in file order."""
    bs = batch_size or cfg.batch_size
    # A private generator: iterating a DataLoader must not draw from the global RNG that anchors and
    # dropout use, or a resumed run would diverge from an uninterrupted one.
    g = torch.Generator().manual_seed(cfg.seed * SEED_STRIDE + epoch)
    if train:
        sampler = torch.randperm(len(dataset), generator=g)[skip * bs:(len(dataset) // bs) * bs].tolist()
    else:
        sampler = range(len(dataset))
    return torch.utils.data.DataLoader(dataset, batch_size=bs, sampler=sampler, num_workers=cfg.num_workers,
                                       drop_last=train, pin_memory=torch.cuda.is_available(), generator=g)


# ==== SUPPORT: checkpoints and files ====

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


def write_json(path, obj, indent=None):
    with open(path, "w") as f:
        json.dump(obj, f, indent=indent)


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


def save_checkpoint(model, opts, scaler, cfg: Config, step: int, dataset, best=None, selection="last") -> str:
    """Everything a run needs to continue or be evaluated, as tensors, numbers and strings only (it loads
    with weights_only=True): last.pt, or best_on_val.pt for selection 'best-on-val'."""
    state = {"selection": selection, "model": model.state_dict(),
             "optim": {k: o.state_dict() for k, o in opts.items()}, "scaler": scaler.state_dict(),
             "step": step, "config": asdict(cfg), "n_classes": dataset.n_classes,
             "class_names": list(dataset.class_names), "git": git_commit(), "best": best,
             "rng": {"torch": torch.get_rng_state(),
                     "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}}
    path = os.path.join(cfg.run, "best_on_val.pt" if selection == "best-on-val" else "last.pt")
    atomic_write(path, lambda p: torch.save(state, p))
    return path


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
    return ckpt


def config_from_checkpoint(ckpt: dict, **overrides) -> Config:
    known = {f.name for f in fields(Config)}
    return Config(**{k: v for k, v in {**ckpt["config"], **overrides}.items() if k in known})


def model_from_checkpoint(ckpt: dict, file: str = "checkpoint") -> tuple[PPAP, Config]:
    """A checkpoint dict -> (PPAP model on the CPU with its weights, strict; its Config)."""
    cfg = config_from_checkpoint(ckpt)
    if cfg.arch not in ARCHS:
        raise PPAPError(f"{file}: unknown arch {cfg.arch!r}")
    model = PPAP(ARCHS[cfg.arch](cfg.patch), int(ckpt["n_classes"]))
    sd = ckpt["model"]
    if "backbone.pos_embed" in sd:
        model.backbone.adopt_pos_grid(sd["backbone.pos_embed"])
    missing, unexpected, wrong = key_mismatch(model.state_dict(), sd)
    if missing or unexpected or wrong:
        raise PPAPError(f"{file} does not fit {cfg.arch}/{cfg.patch}: missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]}, shapes differ at {wrong[:3]}")
    model.load_state_dict(sd, strict=True)
    return model, cfg


def load_run(path: str, device="cpu"):
    """A run directory (its last.pt) or a checkpoint file -> (model, cfg, checkpoint dict)."""
    ckpt = read_checkpoint(path)
    model, cfg = model_from_checkpoint(ckpt, checkpoint_file(path))
    return model.to(device), cfg, ckpt


# ==== CLI ====

# What a continued run may change: where and how it executes, how long it runs and how often it is
# validated. Everything else is the run's own configuration and is refused with --resume.
RESUME_FLAGS = ("resume", "max_steps", "epochs", "device", "num_workers", "crop_workers", "progress", "data_dir",
                "val_every", "val_limit")


class _Parser(argparse.ArgumentParser):
    def error(self, message):            # one line, exit code 2 (through main), instead of usage + error
        raise PPAPError(f"{message} (python ppap.py --help lists the flags)")


def build_parser(shown: Config) -> argparse.ArgumentParser:
    """The Config dataclass is the CLI: every field is --field-name, its help the field's description and
    the value the chosen preset gives it."""
    p = _Parser(prog="ppap.py", description=__doc__.split("\n\n")[0],
                epilog=f"Flags allowed with --resume: {', '.join('--' + k.replace('_', '-') for k in RESUME_FLAGS)}.",
                formatter_class=argparse.RawTextHelpFormatter)
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        value = getattr(shown, f.name)
        help = f"{f.metadata['help']}\n  [{shown.data} preset: {value!r}]"
        if isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help)
        else:
            p.add_argument(flag, type=type(f.default), default=argparse.SUPPRESS, help=help)
    return p


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
    """--resume RUN [allowed flags] -> (the run's Config with those flags applied, its checkpoint)."""
    refused = [k for k in overrides if k not in RESUME_FLAGS]
    if refused:
        raise PPAPError(f"--resume continues a run as it was configured; {', '.join('--' + k.replace('_', '-') for k in refused)} "
                        f"cannot change (allowed: {', '.join('--' + k.replace('_', '-') for k in RESUME_FLAGS[1:])})")
    file = checkpoint_file(overrides["resume"])
    ckpt = read_checkpoint(file)
    cfg = config_from_checkpoint(ckpt, **overrides)
    cfg.run = os.path.dirname(os.path.abspath(file))
    check_config(cfg)
    return cfg, ckpt


def main(argv=None) -> int:
    """`python ppap.py [flags]` trains (or continues a run with --resume)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        overrides = parse_overrides(argv)
        cfg, ckpt = resume_config(overrides) if overrides.get("resume") else (make_config(overrides), None)
        train(cfg, ckpt)
    except PPAPError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: the last checkpoint is intact; continue with --resume <run>", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.modules.setdefault("ppap", sys.modules[__name__])   # eval.py imports ppap: share this module, not a copy
    sys.exit(main())

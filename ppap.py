"""PPAP: Progressive Proxy Anchor Propagation for Unsupervised Semantic Segmentation (ECCV 2024).

One readable file, top to bottom in the order of the method:
config and presets -> data -> frozen DINO ViT -> the two branches and probes -> the PPAP loss
(proxy anchor propagation, positiveness boundary Phi, ambiguity boundary Psi) -> training loop -> CLI.

    python ppap.py --data synthetic            # offline demo on CPU, a few minutes
    python ppap.py --data cocostuff            # the paper's default preset (ViT-S/8), one GPU
    python ppap.py --help                      # every hyper-parameter is a flag

Numbers follow the authors' code (github.com/hynnsk/PPAP) on the same inputs; every deviation is a flag.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass, asdict, fields
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class PPAPError(Exception):
    """A user-facing problem (missing data, wrong weights, bad flag): printed as one line, exit code 2."""


# ==== CONFIG ====

@dataclass
class Config:
    # what to train on, and with which frozen backbone
    data: str = "cocostuff"            # synthetic | cocostuff | cityscapes | potsdam | imagenet-s
    data_dir: str = os.environ.get("PPAP_DATA", "./data")
    arch: str = "vit_small"            # vit_small | vit_base | vit_tiny_demo (random init, offline demo)
    patch: int = 8
    weights: str = ""                  # DINO checkpoint file; empty = the released one via the torch hub cache
    # PPAP loss (SPEC section 3)
    phi0: float = 0.55                 # initial positiveness boundary Phi_0
    psi0: float = 0.20                 # initial ambiguity boundary Psi_0
    prop_iter: int = 2                 # T, proxy propagation steps (0 = ablation: no propagation)
    sigma_pos: float = 3.0
    sigma_amb: float = 3.0
    tau: float = 0.8
    trainpatchsplit: int = 16          # anchors per group = group / trainpatchsplit
    group: int = 784                   # rows per anchor group (one /8 image at 224 px)
    no_ambiguity: bool = False         # ablation: Psi = Phi, every non-positive is a negative
    ppap_weight: float = 1.0           # 0 = probes on the unchanged head (the "no PPAP" baseline)
    # optimisation (SPEC section 4)
    optimizer: str = "adamw"           # adamw | adam, for head + projection
    lr: float = 1e-3
    weight_decay: float = 0.1
    linear_lr: float = 1e-3
    cluster_lr: float = 5e-3
    grad_clip: float = 10.0
    epochs: int = 5
    max_steps: int = 0                 # stop after this many steps (0 = run all epochs)
    batch_size: int = 64
    img_size: int = 224
    val_size: int = 320
    seed: int = 0
    # machinery
    device: str = "auto"               # auto | cpu | cuda | cuda:1 | mps
    amp: bool = True                   # mixed precision on CUDA (ignored on CPU)
    amp_dtype: str = "fp16"            # fp16 (the authors') | bf16
    num_workers: int = 4
    run: str = ""                      # run directory; empty = runs/<data>_<arch><patch>_<time>
    resume: str = ""                   # a run directory (or its last.pt) to continue exactly
    val_every: int = 100               # steps between validations (0 = only at the end)
    val_limit: int = 0                 # validate on at most this many images (0 = all)
    select_on_val: bool = False        # also keep best_on_val.pt, chosen on the labelled val set (authors)
    imagenet_s_classes: int = 50       # ImageNet-S variant: 50 | 300 | 919
    crop_workers: int = 0              # processes building the five-crop cache (0 = all cores)
    progress: bool = True              # tqdm progress bars
    knn_k: int = 7                     # neighbours per image for `python ppap.py knn`


# The authors' presets (SPEC section 4 table), chosen by --data and --arch/--patch.
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
    """Defaults <- preset of (data, arch, patch) <- explicit overrides. Unknown combos keep the COCO values."""
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
    return cfg


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(img01: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] in [0,1] -> ImageNet-normalised."""
    mean = img01.new_tensor(IMAGENET_MEAN).view(-1, 3, 1, 1)
    std = img01.new_tensor(IMAGENET_STD).view(-1, 3, 1, 1)
    return (img01 - mean) / std


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Inverse of normalize: [B,3,H,W] -> [0,1] (not clipped)."""
    mean = x.new_tensor(IMAGENET_MEAN).view(-1, 3, 1, 1)
    std = x.new_tensor(IMAGENET_STD).view(-1, 3, 1, 1)
    return x * std + mean


# ==== DATA: synthetic ====
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


# ==== DATA: real datasets ====
# Real benchmarks: COCO-Stuff-27, Cityscapes-27, Potsdam-3, ImageNet-S (50/300/919).
# Layout under --data-dir is what `bash download.sh <name> DATA_DIR` produces:
#   cocostuff/{images,annotations}/{train2017,val2017}/<id>.{jpg,png}, cocostuff/curated/<split>/<list>.txt
#   cityscapes/leftImg8bit/<split>/<city>/*_leftImg8bit.png, cityscapes/gtFine/<split>/<city>/*_gtFine_labelIds.png
#   potsdam/{imgs,gt}/<id>.mat, potsdam/labelled_{train,test}.txt
#   imagenet-s/ImageNetS<K>/{validation,train-semi}/<wnid>/<name>.JPEG + {validation,train-semi}-segmentation/<wnid>/<name>.png
# Train splits of COCO and Cityscapes are the five-crop sets, built once (and automatically)
# under DATA_DIR/cropped/<dataset>_five_crop_0.5/{img,label}/train/<5i+k>.{jpg,png}.
import glob
import hashlib
import shutil

from PIL import Image

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
FIVE_CROP_JPEG_QUALITY = 95     # 4:4:4 chroma; see docs of build_five_crop
_FIVE_CROP_VERSION = 1


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
    from scipy.io import loadmat
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


# ---- five-crop cache

def _write_atomic(path, save):
    tmp = path + ".tmp"
    save(tmp)
    os.replace(tmp, path)


def _five_crop_one(task):
    """Worker: crop source pair i into 5 (image, label+1) files; skips files already present."""
    kind, i, img_path, lab_path, out = task
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
    stored = Image.fromarray((lab + 1).clip(0, 255).astype(np.uint8))     # mode L
    for (ip, lp), box in zip(names, five_crop_boxes(img.width, img.height)):
        _write_atomic(ip, lambda p, c=img.crop(box): c.save(
            p, format="JPEG", quality=FIVE_CROP_JPEG_QUALITY, subsampling=0))
        _write_atomic(lp, lambda p, c=stored.crop(box): c.save(p, format="PNG"))
    return i


def _write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f)


def _pairs_digest(pairs):
    h = hashlib.sha1()
    for a, b in pairs:
        h.update(f"{os.path.basename(a)}\t{os.path.basename(b)}\n".encode())
    return h.hexdigest()


def five_crop_dir(data_dir, name, ratio=FIVE_CROP_RATIO):
    return os.path.join(data_dir, "cropped", f"{name}_five_crop_{ratio}")


def _five_crop_done(out, manifest):
    try:
        with open(os.path.join(out, "DONE.json")) as f:
            return json.load(f) == manifest
    except (OSError, ValueError):
        return False


def build_five_crop(name, kind, pairs, data_dir, workers=0, progress=True):
    """Build (once) the five-crop training set of `pairs` and return its directory.

    Crop 5i+k of source pair i is box k of five_crop_boxes (tl, tr, bl, br, centre; half height x
    half width, the geometry of torchvision's five_crop).  Images are stored as JPEG quality 95
    with 4:4:4 chroma (not lossless: about 1 grey level of error; the name .jpg is the one the
    authors' pipeline uses), labels already mapped to the coarse classes and stored as
    label + 1 in an 8-bit PNG (0 = ignore).  The set is built in '<dir>.incomplete' (every file
    written to a temporary name and renamed, so an interrupted build resumes from whole files),
    then 'DONE.json' (source-list digest, counts, format) is written and the folder renamed to
    <dir>: a folder without a matching DONE.json is never used.  Multi-process (`workers`
    processes, 0 = all cores), with a tqdm progress bar; a second call returns at once."""
    out = five_crop_dir(data_dir, name)
    manifest = {"dataset": name, "version": _FIVE_CROP_VERSION, "ratio": FIVE_CROP_RATIO,
                "jpeg_quality": FIVE_CROP_JPEG_QUALITY, "n_images": len(pairs),
                "n_crops": 5 * len(pairs), "sources_sha1": _pairs_digest(pairs)}
    if _five_crop_done(out, manifest):
        return out
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".lock", "w") as lock:
        try:
            import fcntl
            fcntl.flock(lock, fcntl.LOCK_EX)       # one builder at a time; others wait, then reuse
        except ImportError:                        # (no fcntl on Windows: no lock)
            pass
        if _five_crop_done(out, manifest):
            return out
        tmp = out + ".incomplete"
        if os.path.exists(os.path.join(tmp, "sources.json")):
            try:
                with open(os.path.join(tmp, "sources.json")) as f:
                    same = json.load(f) == manifest
            except (OSError, ValueError):
                same = False
            if not same:                          # leftover of a build from other sources
                shutil.rmtree(tmp)
        for sub in ("img", "label"):
            os.makedirs(os.path.join(tmp, sub, "train"), exist_ok=True)
        _write_json(os.path.join(tmp, "sources.json"), manifest)
        tasks = [(kind, i, a, b, tmp) for i, (a, b) in enumerate(pairs)]
        workers = int(workers) if workers and workers > 0 else (os.cpu_count() or 1)
        workers = max(1, min(workers, len(tasks)))
        from tqdm import tqdm
        bar = tqdm(total=len(tasks), desc=f"five-crop {name} -> {out}", unit="img",
                   disable=not progress)
        try:
            if workers == 1:
                for t in tasks:
                    _five_crop_one(t)
                    bar.update(1)
            else:
                import multiprocessing as mp
                ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
                with ctx.Pool(workers) as pool:
                    for _ in pool.imap_unordered(_five_crop_one, tasks, chunksize=8):
                        bar.update(1)
        except PPAPError as e:
            raise PPAPError(f"{e} — run: bash download.sh {name} {data_dir}") from None
        finally:
            bar.close()
        _write_atomic(os.path.join(tmp, "DONE.json"), lambda p: _write_json(p, manifest))
        if os.path.exists(out):                   # stale set (other sources / unfinished): replace
            stale = f"{out}.stale-{os.getpid()}"
            os.rename(out, stale)
            os.rename(tmp, out)
            shutil.rmtree(stale, ignore_errors=True)
        else:
            os.rename(tmp, out)
    return out


def five_crop_dataset(name, kind, pairs, data_dir, size, n_classes, class_names, workers=0,
                      progress=True):
    out = build_five_crop(name, kind, pairs, data_dir, workers=workers, progress=progress)
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
    """COCO-Stuff-27, Cityscapes-27, Potsdam-3, ImageNet-S (SPEC section 6) from cfg.data_dir.
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
                                 progress=progress)
    return RealSegDataset(name, name, pairs, size, n, names, data_dir)


def build_dataset(cfg: Config, split: str):
    """split 'train' (img_size crops) or 'val' (val_size, SPEC section 5 transform)."""
    if cfg.data == "synthetic":
        return SyntheticDataset(split, cfg.img_size if split == "train" else cfg.val_size)
    return build_real_dataset(cfg, split)


# ==== BACKBONE: DINO ViT (frozen) ====
# Key names and numerics match the released DINO checkpoints so they load with strict=True.

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


class VisionTransformer(nn.Module):
    def __init__(self, patch_size: int, embed_dim: int, depth: int, num_heads: int, img_size: int = 224):
        super().__init__()
        self.patch_size, self.embed_dim = patch_size, embed_dim
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (img_size // patch_size) ** 2, embed_dim))
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
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


def load_backbone_weights(vit: VisionTransformer, path: str) -> None:
    """Load a DINO-format file into vit with strict=True; any mismatch is one clear PPAPError."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise PPAPError(f"weights file not found: {path}") from None
    except Exception as e:
        raise PPAPError(f"cannot read weights {path}: {type(e).__name__}: {str(e).splitlines()[0][:120]}") from None
    sd = dino_state_dict(obj)
    ours = vit.state_dict()
    missing = [k for k in ours if k not in sd]
    unexpected = [k for k in sd if k not in ours]
    wrong = [k for k in ours if k in sd and sd[k].shape != ours[k].shape and k != "pos_embed"]
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


# ==== BRANCHES: criterion branch, training branch, probes ====

class ClusterProbe(nn.Module):
    """n_classes learnable centroids; cosine scores against normalised code."""

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
    """Frozen backbone; criterion branch crit (decides positives/negatives); training branch code -> z; probes."""

    def __init__(self, backbone: VisionTransformer, n_classes: int):
        super().__init__()
        self.backbone = backbone.requires_grad_(False)
        self.head = copy.deepcopy(backbone.blocks[-1]).requires_grad_(True)
        D = backbone.embed_dim
        self.proj = nn.Linear(D, D)
        self.crit_dropout = nn.Dropout2d(p=0.1)
        self.linear_probe = nn.Conv2d(D, n_classes, 1)
        self.cluster_probe = ClusterProbe(D, n_classes)
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


# ==== LOSS: progressive proxy anchor propagation with an ambiguity zone ====

def draw_anchors(n_rows: int, group: int, n_anchors: int, generator=None) -> torch.Tensor:
    """One torch.randperm per group, as the authors do -> within-group positions [n_rows // group, A]."""
    return torch.stack([torch.randperm(group, generator=generator)[:n_anchors] for _ in range(n_rows // group)])


def _fp16(x: float) -> float:
    # The authors keep Phi and Psi in float16 tensors: their boundaries start from the fp16-rounded values.
    return float(torch.tensor(x, dtype=torch.float16))


def propagate(f: torch.Tensor, anchor_rows: torch.Tensor, *, phi0, psi0, prop_iter, sigma_pos, sigma_amb,
              no_ambiguity=False):
    """Move each anchor's proxy toward the dense region of its positives (SPEC section 3, steps 1-3).

    f [N,D] unit rows, anchor_rows [a] global row ids -> (positive mask [a,N] without the anchor itself,
    negative mask [a,N] (sim < Psi), counted positives [a], counted negatives [a]).
    Proxies are mask @ f products: no [a,N,D] tensor is ever built.
    """
    N = f.shape[0]
    fa = f[anchor_rows]
    sim = fa @ f.T                                              # [a,N]
    pos = sim > phi0                                            # P0 = {j : s_j > Phi0}
    phi = torch.full((len(anchor_rows), 1), _fp16(phi0), device=f.device)
    psi = torch.full((len(anchor_rows), 1), _fp16(psi0), device=f.device)
    v_prev = fa
    for _ in range(prop_iter):
        v = F.normalize((pos.to(f.dtype) @ f) / N, dim=1)       # proxy: mean of positives, re-normalised
        sim = v @ f.T
        moved = 1.0 - F.cosine_similarity(v_prev, v, dim=1)[:, None]
        psi = psi + moved / sigma_amb                           # further move -> wider ambiguity zone
        phi = phi - moved / sigma_pos                           #             -> looser positive boundary
        pos = sim > phi
        v_prev = v
    neg = ~pos if no_ambiguity else sim < psi
    self_mask = torch.zeros_like(pos)
    self_mask[torch.arange(len(anchor_rows), device=f.device), anchor_rows] = True
    pos = pos & ~self_mask
    return pos, neg & ~self_mask, pos.sum(1), neg.sum(1)


def ppap_loss(z, f, anchors, *, phi0, psi0, prop_iter, sigma_pos, sigma_amb, tau, group=784,
              no_ambiguity=False, chunk_elems=None):
    """The PPAP contrastive loss.

    z [N,D] unit rows (with gradient), f [N,D] criterion features (normalised here, no gradient),
    anchors [N // group, A] LongTensor of within-group positions. Every row of z/f is a contrast sample;
    only rows in full groups are anchors. Anchors of several groups are processed together in chunks of
    about chunk_elems similarity entries (default 2^20 on CPU, where caches favour small blocks, and
    2^26 on GPUs, where large products pay), so memory is O(chunk) whatever the batch.
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
        anchor_loss = anchor_loss.index_put((idx,), -(tau / 0.07) * mean_log_prob)
        has_pos[idx] = True
    per_group = anchor_loss.view(n_groups, A).sum(1) / has_pos.view(n_groups, A).sum(1).clamp(min=1)
    stats = {"positives": n_pos.view(n_groups, A).mean(1).mean().item(),
             "negatives": n_neg.view(n_groups, A).mean(1).mean().item()}
    loss = per_group.mean()
    if z.requires_grad and not loss.requires_grad:     # no anchor had a positive: a zero that still backprops
        loss = loss + 0 * z.sum()
    return loss, stats


# ==== NEIGHBOUR TABLES (STEGO-style kNN image pairs) ====

def knn_table(cfg: Config, split: str = "train", k: int | None = None) -> str:
    """For every image of the split, its k most similar images (itself first) by the frozen backbone's
    mean-pooled, normalised final patch features; computed with ext.topk_neighbors (never the full
    similarity matrix) and cached at <data_dir>/nns/. Returns the cache path ({'indices', 'values'})."""
    k = k or cfg.knn_k
    name = f"nns_{cfg.data}_{split}_{cfg.arch}{cfg.patch}_{cfg.img_size if split == 'train' else cfg.val_size}.pt"
    path = os.path.join(cfg.data_dir, "nns", name)
    if os.path.exists(path) and torch.load(path, weights_only=True)["indices"].shape[1] >= k + 1:
        return path
    from ext import topk_neighbors
    device = pick_device(cfg.device)
    dataset = build_dataset(cfg, split)
    vit = build_backbone(cfg).to(device).eval()
    feats = []
    loader = make_loader(cfg, dataset, shuffle=False)
    if cfg.progress:
        from tqdm import tqdm
        loader = tqdm(loader, desc=f"kNN features ({split})", dynamic_ncols=True)
    with torch.no_grad(), torch.autocast(device.type, enabled=amp_enabled(cfg, device)):
        for batch in loader:
            tokens = vit(batch["img"].to(device, non_blocking=True))[:, 1:]
            feats.append(F.normalize(tokens.float().mean(1), dim=1))
    feats = torch.cat(feats)
    values, indices = topk_neighbors(feats, feats, min(k + 1, len(feats)))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_save({"indices": indices.cpu(), "values": values.cpu()}, path)
    return path


# ==== TRAINING ====

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


def atomic_save(obj, path: str) -> None:
    """Write to a temporary file in the same folder, then rename: a crash never leaves a half checkpoint."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


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


def make_loader(cfg: Config, dataset, shuffle: bool, epoch: int = 0, skip: int = 0,
                batch_size: int | None = None):
    """Training order is a permutation seeded by (seed, epoch); skip drops the batches a resumed run has seen."""
    bs = batch_size or cfg.batch_size
    # A private generator: iterating a DataLoader must not draw from the global RNG that anchors and
    # dropout use, or a resumed run would diverge from an uninterrupted one.
    g = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)
    if shuffle:
        sampler = torch.randperm(len(dataset), generator=g)[skip * bs:(len(dataset) // bs) * bs].tolist()
    else:
        sampler = range(len(dataset))
    return torch.utils.data.DataLoader(dataset, batch_size=bs, sampler=sampler, num_workers=cfg.num_workers,
                                       drop_last=shuffle, pin_memory=torch.cuda.is_available(), generator=g)


def validate(model: PPAP, loader, device, cfg: Config) -> dict:
    """Periodic validation without CRF: unsupervised (Hungarian) and linear mIoU/accuracy via eval.py."""
    from eval import evaluate_model
    return evaluate_model(model, loader, device, crf=False,
                          amp=cfg.amp_dtype if amp_enabled(cfg, device) else False, progress=cfg.progress)


def amp_enabled(cfg: Config, device) -> bool:
    return cfg.amp and torch.device(device).type == "cuda"


def train_step(model, batch, opts, scaler, cfg: Config, device):
    """One step: forward, PPAP loss + probe losses, backward, clip, the three optimisers. -> stats."""
    img = batch["img"].to(device, non_blocking=True)
    label = batch["label"].to(device, non_blocking=True)
    for o in opts.values():
        o.zero_grad(set_to_none=True)
    dtype = torch.bfloat16 if cfg.amp_dtype == "bf16" else torch.float16
    with torch.autocast(device.type, dtype=dtype, enabled=amp_enabled(cfg, device)):
        out = model(img)
        linear, cluster = probe_losses(model, out["code"], label)
    f = out["crit"].permute(0, 2, 3, 1).reshape(-1, model.dim)
    if cfg.ppap_weight:
        anchors = draw_anchors(f.shape[0], cfg.group, cfg.group // cfg.trainpatchsplit)
        loss_ppap, st = ppap_loss(out["z"], f, anchors, phi0=cfg.phi0, psi0=cfg.psi0, prop_iter=cfg.prop_iter,
                                  sigma_pos=cfg.sigma_pos, sigma_amb=cfg.sigma_amb, tau=cfg.tau, group=cfg.group,
                                  no_ambiguity=cfg.no_ambiguity)
    else:   # the baseline: no gradient reaches head/projection, so even weight decay leaves them unchanged
        loss_ppap, st = torch.zeros(()), {"positives": 0.0, "negatives": 0.0}
    loss = linear + cluster + (cfg.ppap_weight * loss_ppap if cfg.ppap_weight else 0)
    scaler.scale(loss).backward()
    scaler.unscale_(opts["net"])
    gnorm = nn.utils.clip_grad_norm_(model.head_parameters(), cfg.grad_clip)
    for o in opts.values():
        scaler.step(o)
    scaler.update()
    return {"loss": loss.item(), "ppap": loss_ppap.item(), "linear": linear.item(), "cluster": cluster.item(),
            "grad_norm": float(gnorm), **st}


def checkpoint_state(model, opts, scaler, cfg, step, dataset, best=None, selection="last"):
    return {"selection": selection, "model": model.state_dict(), "optim": {k: o.state_dict() for k, o in opts.items()},
            "scaler": scaler.state_dict(), "step": step, "config": asdict(cfg),
            "n_classes": dataset.n_classes, "class_names": list(dataset.class_names), "git": git_commit(),
            "best": best, "rng": {"torch": torch.get_rng_state(),
                                  "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}}


def load_run(path: str, device="cpu"):
    """A run directory (its last.pt) or a checkpoint file -> (model, cfg, checkpoint dict)."""
    file = os.path.join(path, "last.pt") if os.path.isdir(path) else path
    if not os.path.exists(file):
        raise PPAPError(f"no checkpoint at {file}")
    try:
        ckpt = torch.load(file, map_location="cpu", weights_only=False)
        cfg = Config(**ckpt["config"])
        n_classes = ckpt["n_classes"]
    except Exception as e:
        raise PPAPError(f"{file} is not a PPAP checkpoint ({type(e).__name__}: {str(e)[:100]})") from None
    model = PPAP(ARCHS[cfg.arch](cfg.patch), n_classes)
    model.backbone.adopt_pos_grid(ckpt["model"]["backbone.pos_embed"])
    model.load_state_dict(ckpt["model"], strict=True)
    return model.to(device), cfg, ckpt


def banner(title: str) -> None:
    print(f"\n{'=' * 20} {title} {'=' * (60 - len(title))}", flush=True)


def train(cfg: Config) -> dict:
    """Train PPAP as configured; returns the final validation metrics. Everything goes to cfg.run."""
    device = pick_device(cfg.device)
    ckpt = None
    if cfg.resume:
        file = os.path.join(cfg.resume, "last.pt") if os.path.isdir(cfg.resume) else cfg.resume
        if not os.path.exists(file):
            raise PPAPError(f"--resume: no checkpoint at {file}")
        ckpt = torch.load(file, map_location="cpu", weights_only=False)
        cfg = Config(**{**ckpt["config"], "resume": cfg.resume, "max_steps": cfg.max_steps or
                        ckpt["config"]["max_steps"], "device": cfg.device, "progress": cfg.progress})
        cfg.run = os.path.dirname(os.path.abspath(file))
    if not cfg.run:
        cfg.run = os.path.join("runs", f"{cfg.data}_{cfg.arch}{cfg.patch}_{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(cfg.run, exist_ok=True)

    banner("config")
    print(f"git {git_commit()} | torch {torch.__version__} | device {device}")
    for k, v in asdict(cfg).items():
        print(f"  {k:16s} {v}")

    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    banner("data")
    train_set, val_set = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    if cfg.val_limit:
        val_set = torch.utils.data.Subset(val_set, range(min(cfg.val_limit, len(val_set))))
        val_set.n_classes, val_set.class_names = val_set.dataset.n_classes, val_set.dataset.class_names
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
    scaler = torch.amp.GradScaler(device.type, init_scale=2048, growth_interval=1000,
                                  enabled=amp_enabled(cfg, device) and cfg.amp_dtype == "fp16")
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
    val_loader = make_loader(cfg, val_set, shuffle=False, batch_size=max(1, min(cfg.batch_size, 8)))
    log_path = os.path.join(cfg.run, "log.jsonl")

    def run_validation():
        nonlocal best
        metrics = validate(model, val_loader, device, cfg)
        record = {"step": step, **{k: v for k, v in metrics.items() if isinstance(v, float)}}
        with open(log_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        print(f"[val step {step}] " + "  ".join(f"{k} {v:.2f}" for k, v in record.items()
                                                 if k != "step"), flush=True)
        if cfg.select_on_val:
            score = sum(record.get(k, 0) for k in ("cluster_mIoU", "cluster_Acc", "linear_mIoU", "linear_Acc"))
            if best is None or score >= best["score"]:
                best = {"score": score, "step": step}
                atomic_save(checkpoint_state(model, opts, scaler, cfg, step, train_set, best, "best-on-val"),
                            os.path.join(cfg.run, "best_on_val.pt"))
        model.train()
        return metrics

    banner("train")
    model.train()
    metrics = None
    bar = None
    if cfg.progress:
        from tqdm import tqdm
        bar = tqdm(total=total, initial=step, dynamic_ncols=True, desc="train")
    while step < total:
        epoch, skip = divmod(step, steps_per_epoch)
        for batch in make_loader(cfg, train_set, shuffle=True, epoch=epoch, skip=skip):
            t0 = time.time()
            st = train_step(model, batch, opts, scaler, cfg, device)
            step += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{st['loss']:.3f}", pos=f"{st['positives']:.0f}",
                                neg=f"{st['negatives']:.0f}", ips=f"{cfg.batch_size / (time.time() - t0):.1f}")
            if (cfg.val_every and step % cfg.val_every == 0) or step == total:
                if bar is not None:
                    bar.clear()
                metrics = run_validation()
                atomic_save(checkpoint_state(model, opts, scaler, cfg, step, train_set, best),
                            os.path.join(cfg.run, "last.pt"))
            if step == total:
                break
    if bar is not None:
        bar.close()
    if metrics is None:            # resumed a finished run
        metrics = run_validation()
    banner("result")
    selection = "last checkpoint" + (f" (best-on-val kept separately at step {best['step']})" if best else "")
    print(f"{selection}: unsupervised mIoU {metrics['cluster_mIoU']:.2f}  Acc {metrics['cluster_Acc']:.2f} | "
          f"linear mIoU {metrics['linear_mIoU']:.2f}  Acc {metrics['linear_Acc']:.2f}")
    print(f"run: {cfg.run}  (evaluate with: python eval.py --run {cfg.run})")
    return metrics


# ==== CLI ====

def parse_args(argv=None) -> Config:
    """The Config dataclass is the CLI: every field is --field-name; unset flags come from the preset."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           help=f"(default {default})")
        else:
            p.add_argument(flag, type=type(default), default=argparse.SUPPRESS, help=f"(default {default!r})")
    return make_config(vars(p.parse_args(argv)))


def main(argv=None) -> int:
    """`python ppap.py [flags]` trains; `python ppap.py knn [flags]` builds the kNN image table."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["knn"]:
            cfg = parse_args(argv[1:])
            print(f"kNN table ({cfg.knn_k} neighbours per image): {knn_table(cfg)}")
            return 0
        train(parse_args(argv))
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

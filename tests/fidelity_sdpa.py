"""Fused attention against the authors' written-out softmax: how far apart the numbers drift (run by hand).

    python tests/fidelity_sdpa.py [--arch vit_tiny_demo|vit_small|vit_base] [--patch 8] [--weights FILE]
                                  [--steps 3] [--val-images 8] [--device cpu]

ppap.Attention calls F.scaled_dot_product_attention; the authors' model/dino/vision_transformer.py forms
softmax(q k^T * scale) @ v explicitly (tests/baseline_authors.ExplicitSoftmaxAttention, the same parameters).
Two copies of one model, one switched to the explicit form, see the same inputs in fp32:

  features   max |difference| of the criterion features and the code on --val-images val images
  training   --steps train steps from the same start, the same batches and the same step generator (anchors,
             criterion dropout): max |difference| of every trained tensor (head, projection, probes) after them
  prediction val pixels whose cluster or linear prediction differs between the two trained copies (no CRF)

Defaults: the offline demo's preset (vit_tiny_demo, synthetic 112 px). `--arch vit_small --patch 8` builds the
COCO ViT-S/8 shapes (224 px train crops, 320 px val, batch 4) with DINO's random initialisation, or with the
released weights from --weights; the images are the synthetic demo's either way (no dataset is read).
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _p in (str(REPO), str(REPO / "tests")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

import ppap  # noqa: E402
from baseline_authors import use_explicit_attention  # noqa: E402


def config(args) -> ppap.Config:
    over = {"data": "synthetic", "arch": args.arch, "patch": args.patch, "weights": args.weights,
            "device": args.device, "amp": False, "num_workers": 0, "progress": False}
    if args.arch != "vit_tiny_demo":                  # the COCO preset's shapes
        over.update(img_size=224, val_size=320, batch_size=4)
    return ppap.make_config(over)


def trained_tensors(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("backbone.")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="vit_tiny_demo", choices=("vit_tiny_demo", "vit_small", "vit_base"))
    p.add_argument("--patch", type=int, default=8)
    p.add_argument("--weights", default="", help="released DINO weights (default: DINO's random initialisation)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--val-images", type=int, default=8)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    cfg = config(args)
    device = ppap.pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    fused = ppap.build_model(cfg, len(ppap.SYNTH_CLASSES), weights=bool(cfg.weights)).to(device)
    explicit = copy.deepcopy(fused)
    n = use_explicit_attention(explicit)
    print(f"{cfg.arch}/{cfg.patch} ({'weights ' + cfg.weights if cfg.weights else 'random initialisation'}), "
          f"{n} attention layers switched to the explicit softmax; fp32 on {device}")

    val = ppap.SyntheticDataset("val", cfg.val_size)
    val_items = [val[i] for i in range(args.val_images)]
    img = torch.stack([it["img"] for it in val_items]).to(device)
    with torch.no_grad(), ppap.evaluating(fused), ppap.evaluating(explicit):
        a, b = fused(img), explicit(img)
    for k in ("crit", "code"):
        d = (a[k] - b[k]).abs()
        print(f"  features  {k:5s} {tuple(a[k].shape)}: max |diff| {d.max().item():.2e}, "
              f"mean {d.mean().item():.2e} (values up to {a[k].abs().max().item():.1f})")

    train = ppap.SyntheticDataset("train", cfg.img_size)
    for model in (fused, explicit):
        model.train()
        opts, scaler = ppap.build_optimizers(cfg, model), ppap.make_scaler(cfg, device)
        gen = torch.Generator().manual_seed(cfg.seed)
        criterion = ppap.build_loss(cfg)
        for step, batch in zip(range(args.steps), ppap.make_loader(cfg, train, train=True)):
            ppap.train_step(model, batch, opts, scaler, cfg, device, criterion, gen)
    ta, tb = trained_tensors(fused), trained_tensors(explicit)
    diffs = {k: (ta[k].float() - tb[k].float()).abs().max().item() for k in ta}
    worst = max(diffs, key=diffs.get)
    part = lambda prefix: max(v for k, v in diffs.items() if k.startswith(prefix))      # noqa: E731
    print(f"  training  after {args.steps} steps (batch {cfg.batch_size}, {cfg.img_size} px): max |diff| over the "
          f"{len(diffs)} trained tensors {diffs[worst]:.2e} ({worst}); head {part('head.'):.2e}, "
          f"projection {part('proj.'):.2e}")

    loader = [{"img": img.cpu(), "label": torch.stack([it["label"] for it in val_items])}]
    ra, rb = (ppap.evaluate(m, loader, device, n_examples=args.val_images, progress=False) for m in (fused, explicit))
    for probe in ("cluster", "linear"):
        moved = sum(int((ea[probe] != eb[probe]).sum()) for ea, eb in zip(ra["examples"], rb["examples"]))
        total = sum(ea[probe].size for ea in ra["examples"])
        print(f"  prediction {probe:7s}: {moved} of {total} val pixels differ; mIoU {ra[probe + '_mIoU']:.4f} vs "
              f"{rb[probe + '_mIoU']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

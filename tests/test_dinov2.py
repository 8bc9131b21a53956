"""DINOv2 backbones (with and without registers): released key format, strict loading, tokens against an
explicit DINOv2 forward, the 320 px evaluation rule, presets and patch 14, and a short training run.

The DINOv2-format state dicts are built here with random weights, named as facebookresearch/dinov2's
DinoVisionTransformer.state_dict() names them (dinov2/models/vision_transformer.py, as
dinov2/hub/backbones.py builds the released models: 518 px, patch 14, LayerScale, no block chunks).
"""
import math
import os

import pytest
import torch
import torch.nn.functional as F

import ppap

GRID = 37                  # 518 px / 14: the positional grid of every released DINOv2 model
# arch -> (width, depth, heads, registers, positional offset, antialias), as dinov2/hub/backbones.py sets them
REAL = {"dinov2_vits14": (384, 12, 6, 0, 0.1, False), "dinov2_vitb14": (768, 12, 12, 0, 0.1, False),
        "dinov2_vits14_reg": (384, 12, 6, 4, 0.0, True), "dinov2_vitb14_reg": (768, 12, 12, 4, 0.0, True)}


def released_shapes(D, depth, n_reg):
    """Key -> shape of a released DINOv2 backbone, in DinoVisionTransformer.state_dict() order: the
    module's own parameters (cls_token, pos_embed, register_tokens, mask_token), then patch_embed, the
    blocks (norm1, attn, ls1, norm2, mlp, ls2) and the final norm."""
    shapes = {"cls_token": (1, 1, D), "pos_embed": (1, 1 + GRID * GRID, D)}
    if n_reg:
        shapes["register_tokens"] = (1, n_reg, D)
    shapes.update({"mask_token": (1, D), "patch_embed.proj.weight": (D, 3, 14, 14), "patch_embed.proj.bias": (D,)})
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({b + "norm1.weight": (D,), b + "norm1.bias": (D,),
                       b + "attn.qkv.weight": (3 * D, D), b + "attn.qkv.bias": (3 * D,),
                       b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,), b + "ls1.gamma": (D,),
                       b + "norm2.weight": (D,), b + "norm2.bias": (D,),
                       b + "mlp.fc1.weight": (4 * D, D), b + "mlp.fc1.bias": (4 * D,),
                       b + "mlp.fc2.weight": (D, 4 * D), b + "mlp.fc2.bias": (D,), b + "ls2.gamma": (D,)})
    shapes.update({"norm.weight": (D,), "norm.bias": (D,)})
    return shapes


def released_state_dict(D, depth, n_reg, seed=0):
    """A DINOv2-format state dict with random weights of DINOv2-like magnitudes (attention far from
    uniform, LayerScale gammas away from 1, a positional grid worth interpolating)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in released_shapes(D, depth, n_reg).items():
        r = torch.randn(shape, generator=g)
        if k.endswith(("norm1.weight", "norm2.weight")) or k == "norm.weight":
            sd[k] = 1 + 0.1 * r
        elif k.endswith("gamma"):
            sd[k] = 0.3 + 0.2 * r
        elif k in ("cls_token", "pos_embed", "register_tokens", "mask_token"):
            sd[k] = 0.5 * r
        else:
            sd[k] = 0.05 * r if k.endswith("weight") else 0.02 * r
    return sd


def reference_tokens(sd, x, heads, n_reg, offset, antialias):
    """DINOv2's forward written out from the state dict alone (dinov2/models/vision_transformer.py
    prepare_tokens_with_masks and interpolate_pos_encoding, dinov2/layers/block.py Block, attention.py
    Attention, layer_scale.py LayerScale): -> (tokens after the penultimate block, norm(after the last)),
    CLS, registers, patches."""
    B, _, H, W = x.shape
    D, p = sd["cls_token"].shape[-1], 14
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=p)
    t = torch.cat([sd["cls_token"].expand(B, -1, -1), t.flatten(2).transpose(1, 2)], 1)
    N = sd["pos_embed"].shape[1] - 1
    M = math.isqrt(N)
    rows, cols = H // p, W // p           # DINOv2 calls them w0, h0: x.shape is unpacked as (B, nc, w, h)
    if rows * cols == N and H == W:
        pos = sd["pos_embed"]
    else:
        grid = sd["pos_embed"][:, 1:].float().reshape(1, M, M, D).permute(0, 3, 1, 2)
        if offset:      # the plain models: a scale factor with DINO's +0.1
            grid = F.interpolate(grid, scale_factor=((rows + offset) / M, (cols + offset) / M), mode="bicubic",
                                 antialias=antialias)
        else:           # the register models: the exact size, antialiased
            grid = F.interpolate(grid, size=(rows, cols), mode="bicubic", antialias=antialias)
        assert grid.shape[-2:] == (rows, cols)
        pos = torch.cat([sd["pos_embed"][:, :1], grid.permute(0, 2, 3, 1).reshape(1, rows * cols, D)], 1)
    t = t + pos
    if n_reg:           # registers go in after the positions were added: they have none
        t = torch.cat([t[:, :1], sd["register_tokens"].expand(B, -1, -1), t[:, 1:]], 1)
    T = t.shape[1]
    ln = lambda y, k: F.layer_norm(y, (D,), sd[k + ".weight"], sd[k + ".bias"], eps=1e-6)
    lin = lambda y, k: y @ sd[k + ".weight"].T + sd[k + ".bias"]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    outs = []
    for i in range(depth):
        b = f"blocks.{i}."
        q, k, v = lin(ln(t, b + "norm1"), b + "attn.qkv").reshape(B, T, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
        a = ((q * (D // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        y = lin((a @ v).transpose(1, 2).reshape(B, T, D), b + "attn.proj")
        t = t + y * sd[b + "ls1.gamma"]
        y = lin(F.gelu(lin(ln(t, b + "norm2"), b + "mlp.fc1")), b + "mlp.fc2")
        t = t + y * sd[b + "ls2.gamma"]
        outs.append(t)
    return outs[-2], ln(outs[-1], "norm")


def small_model(n_reg, offset, antialias):
    """A 2-block, 64-wide DINOv2-style ViT through the same class as the released ones (37x37 grid)."""
    return ppap.DinoV2ViT(embed_dim=64, depth=2, num_heads=4, n_registers=n_reg, interp_offset=offset,
                          interp_antialias=antialias)


@pytest.fixture
def no_init(monkeypatch):
    """Skip DINO's initialisation draws (seconds at full size on this CPU): the weights are loaded anyway."""
    monkeypatch.setattr(ppap, "trunc_normal_", lambda t, *args, **kw: t)


def loaded(model, sd, tmp_path, name="w.pth"):
    path = tmp_path / name
    torch.save(sd, path)
    ppap.load_backbone_weights(model, str(path))
    return model.eval()


# ---- the released format

@pytest.mark.parametrize("arch", list(REAL))
def test_constructors_have_the_released_keys_and_shapes(arch, no_init):
    D, depth, heads, n_reg, offset, antialias = REAL[arch]
    with torch.device("meta"):            # shapes only: no memory
        m = ppap.new_backbone(arch, 14)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == released_shapes(D, depth, n_reg)
    assert list(m.state_dict()) == list(released_shapes(D, depth, n_reg))     # and DINOv2's order
    assert (m.patch_size, m.n_prefix, m.interp_offset, m.interp_antialias) == (14, 1 + n_reg, offset, antialias)
    assert ppap.BACKBONES[arch].patches == (14,)
    assert os.path.basename(ppap.BACKBONES[arch].weights[14]) == \
        f"{arch.removesuffix('_reg')}{'_reg4' if n_reg else ''}_pretrain.pth"


@pytest.mark.parametrize("n_reg", [0, 4])
def test_released_format_roundtrips_strictly(tmp_path, n_reg):
    sd = released_state_dict(64, 2, n_reg)
    m = loaded(small_model(n_reg, 0.1, False), sd, tmp_path)
    own = m.state_dict()
    assert list(own) == list(sd) and all(torch.equal(own[k], v) for k, v in sd.items())
    other = small_model(4 - n_reg, 0.1, False)          # registers where the file has none, or the reverse
    with pytest.raises(ppap.PPAPError, match="does not fit 64-wide DINOv2 ViT/14"):
        ppap.load_backbone_weights(other, str(tmp_path / "w.pth"))


def test_dino_weights_do_not_fit_a_dinov2_model(tmp_path):
    path = tmp_path / "dino.pth"
    torch.save(ppap.VisionTransformer(16, embed_dim=64, depth=2, num_heads=4).state_dict(), path)
    with pytest.raises(ppap.PPAPError, match="does not fit"):
        ppap.load_backbone_weights(small_model(0, 0.1, False), str(path))


# ---- tokens against the explicit DINOv2 forward

@pytest.mark.parametrize("n_reg,offset,antialias", [(0, 0.1, False), (4, 0.0, True)], ids=["plain", "reg"])
@pytest.mark.parametrize("hw", [(224, 224), (448, 448), (518, 518), (224, 336)], ids=str)
def test_small_model_tokens_equal_explicit_dinov2(tmp_path, n_reg, offset, antialias, hw):
    sd = released_state_dict(64, 2, n_reg, seed=1)
    m = loaded(small_model(n_reg, offset, antialias), sd, tmp_path)
    B = 2 if hw == (224, 224) else 1
    x = torch.randn(B, 3, *hw, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = m.tokens(x)
        ref = reference_tokens(sd, x, 4, n_reg, offset, antialias)
    n = 1 + n_reg + (hw[0] // 14) * (hw[1] // 14)
    for a, b in zip(ours, ref):
        assert a.shape == (B, n, 64) and (a - b).abs().max() < 1e-4


def test_offset_and_antialias_matter():
    """The two positional resizes differ (so the equality tests above can tell them apart)."""
    m = small_model(0, 0.1, False)
    plain = m.interpolate_pos_encoding(16 * 16, 224, 224)
    m.interp_offset, m.interp_antialias = 0.0, True
    assert (plain - m.interpolate_pos_encoding(16 * 16, 224, 224)).abs().max() > 1e-3
    assert m.interpolate_pos_encoding(GRID * GRID, 518, 518) is m.pos_embed     # native grid: untouched


# Full-size released architectures. By default ViT-S/14-reg at 224 px (~3 s on a 2-core CPU); the 64-wide
# models above cover both resizes, 448 px and non-square inputs with the same code. PPAP_TEST_FULL=1 adds
# ViT-S/14 and ViT-B/14-reg, and 448 px (~45 s more).
FULL = os.environ.get("PPAP_TEST_FULL") == "1"
SIZES = [("dinov2_vits14_reg", 224)] + ([("dinov2_vits14", 224), ("dinov2_vits14", 448), ("dinov2_vits14_reg", 448),
                                         ("dinov2_vitb14_reg", 224), ("dinov2_vitb14_reg", 448)] if FULL else [])


@pytest.mark.parametrize("arch,size", SIZES)
def test_released_architectures_equal_explicit_dinov2(tmp_path, no_init, arch, size):
    D, depth, heads, n_reg, offset, antialias = REAL[arch]
    sd = released_state_dict(D, depth, n_reg, seed=3)
    m = loaded(ppap.new_backbone(arch, 14), sd, tmp_path)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours = m.tokens(x)
        ref = reference_tokens(sd, x, heads, n_reg, offset, antialias)
    diff = max((a - b).abs().max().item() for a, b in zip(ours, ref))
    print(f"{arch} {size}px: max |diff| {diff:.2e}")
    assert ours[1].shape == (1, 1 + n_reg + (size // 14) ** 2, D) and diff < 1e-4


# ---- PPAP on a DINOv2 backbone

def test_ppap_keeps_patch_tokens_and_the_head_sees_the_registers(tmp_path):
    sd = released_state_dict(64, 2, 4, seed=5)
    model = ppap.PPAP(loaded(small_model(4, 0.0, True), sd, tmp_path), n_classes=3).eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        out = model(x)
        _, final = reference_tokens(sd, x, 4, 4, 0.0, True)
    patches = final[:, 5:].reshape(2, 16, 16, 64).permute(0, 3, 1, 2)
    # before training the head is the last block: code equals the backbone's final patch tokens only if the
    # head attended to CLS and the registers too; crit (no dropout in eval) is those tokens
    assert out["code"].shape == out["crit"].shape == (2, 64, 16, 16) and out["z"].shape == (2 * 256, 64)
    assert (out["code"] - patches).abs().max() < 1e-4 and (out["crit"] - patches).abs().max() < 1e-4


def test_eval_at_320_px_resizes_the_input_to_322(tmp_path):
    assert ppap.patch_grid(320, 14) == 23 and ppap.patch_grid(224, 14) == 16 and ppap.patch_grid(320, 8) == 40
    model = ppap.PPAP(loaded(small_model(4, 0.0, True), released_state_dict(64, 2, 4), tmp_path), 6).eval()
    ds = ppap.SyntheticDataset("val", 320)
    batch = [ds[i] for i in range(2)]
    img = torch.stack([b["img"] for b in batch])
    with torch.no_grad():
        code = model(img)["code"]
        resized = F.interpolate(img, size=(322, 322), mode="bilinear", align_corners=False)
        assert torch.equal(code, model(resized)["code"]) and code.shape[-2:] == (23, 23)
    x = torch.randn(1, 3, 320, 320)
    assert ppap.fit_to_patch(x, 8) is x and ppap.fit_to_patch(x, 16) is x     # DINO: untouched
    label = torch.stack([b["label"] for b in batch])
    res = ppap.evaluate(model, [{"img": img, "label": label}], "cpu", progress=False)
    assert res["n_images"] == 2 and sum(map(sum, res["linear_confusion"])) == int((label >= 0).sum())
    # every labelled pixel of the 320x320 labels is scored: code was upsampled from 23x23 to them


# ---- configuration

def test_presets_and_implied_patch():
    cfg = ppap.parse_args(["--data", "cocostuff", "--arch", "dinov2_vits14_reg"])
    coco = ppap.parse_args(["--data", "cocostuff"])
    keys = ("phi0", "psi0", "prop_iter", "sigma_pos", "sigma_amb", "tau", "trainpatchsplit", "optimizer", "lr",
            "weight_decay", "cluster_lr", "epochs", "img_size", "val_size", "batch_size")
    assert cfg.patch == 14 and all(getattr(cfg, k) == getattr(coco, k) for k in keys)
    for arch, dino in (("dinov2_vitb14", "vit_base"), ("dinov2_vits14_reg", "vit_small")):
        cfg = ppap.parse_args(["--data", "cityscapes", "--arch", arch])
        ref = ppap.parse_args(["--data", "cityscapes", "--arch", dino])
        assert cfg.patch == 14 and all(getattr(cfg, k) == getattr(ref, k) for k in keys)
    cfg = ppap.parse_args(["--data", "potsdam", "--arch", "dinov2_vits14", "--patch", "14"])   # no ViT-S preset:
    assert cfg.patch == 14 and cfg.sigma_pos == 5 and cfg.tau == 0.07                       # the dataset's own
    cfg = ppap.parse_args(["--data", "synthetic", "--arch", "dinov2_vits14_reg"])           # the demo's values
    assert (cfg.patch, cfg.phi0, cfg.img_size, cfg.val_size, cfg.max_steps, cfg.batch_size) == (14, 0.75, 112, 112,
                                                                                                 400, 16)
    assert ppap.parse_args(["--data", "cocostuff", "--arch", "vit_base"]).patch == 8          # DINO unchanged
    with pytest.raises(ppap.PPAPError, match="--img-size must be a multiple of the patch size 14"):
        ppap.parse_args(["--data", "cocostuff", "--arch", "dinov2_vits14", "--img-size", "230"])
    assert ppap.parse_args(["--data", "cocostuff", "--patch", "16", "--val-size", "328"]).val_size == 328


def test_wrong_patch_for_dinov2_is_one_line(capsys):
    assert ppap.main(["--data", "cocostuff", "--arch", "dinov2_vits14", "--patch", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --patch 8 does not exist for --arch dinov2_vits14; its patch size is 14"]


# ---- weights from the torch hub cache, and the acceptance command

@pytest.fixture(scope="module")
def vits14_reg_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("hub") / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(released_state_dict(384, 12, 4, seed=7), path)
    return path


def test_hub_cache_lookup(vits14_reg_file, monkeypatch, tmp_path, no_init):
    hub = tmp_path / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    os.symlink(vits14_reg_file, hub / "checkpoints" / vits14_reg_file.name)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    vit = ppap.build_backbone(ppap.make_config({"data": "cocostuff", "arch": "dinov2_vits14_reg"}))
    assert torch.equal(vit.register_tokens, torch.load(vits14_reg_file)["register_tokens"])


def test_synthetic_run_with_dinov2_reg(vits14_reg_file, tmp_path, capsys, no_init):
    """The issue's acceptance command (python ppap.py ...), through main in this process (no second torch
    import): two steps, validation, last.pt."""
    run = tmp_path / "run"
    argv = ["--data", "synthetic", "--arch", "dinov2_vits14_reg", "--weights", str(vits14_reg_file),
            "--max-steps", "2", "--img-size", "112", "--val-size", "112", "--batch-size", "16", "--val-limit", "8",
            "--device", "cpu", "--no-progress", "--num-workers", "0", "--run", str(run)]
    assert ppap.main(argv) == 0
    assert (run / "last.pt").exists() and "unsupervised mIoU" in capsys.readouterr().out
    model, cfg, _ = ppap.load_run(str(run))
    assert (cfg.arch, cfg.patch, model.backbone.n_prefix) == ("dinov2_vits14_reg", 14, 5)

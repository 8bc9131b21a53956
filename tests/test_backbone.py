"""Backbone: DINO-format weights, attention numerics, positional interpolation, tokens()."""
import math

import pytest
import torch
import torch.nn.functional as F

import ppap


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    m = ppap.vit_small(16).eval()
    with torch.no_grad():            # DINO-like magnitudes so attention is not trivially uniform
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def explicit_forward(m, x):
    """DINO's forward written out by hand: explicit softmax attention, DINO's positional resize."""
    B, _, H, W = x.shape
    p = m.patch_size
    t = F.conv2d(x, m.patch_embed.proj.weight, m.patch_embed.proj.bias, stride=p).flatten(2).transpose(1, 2)
    t = torch.cat([m.cls_token.expand(B, -1, -1), t], 1)
    N = m.pos_embed.shape[1] - 1
    g = int(math.sqrt(N))
    if t.shape[1] - 1 == N and H == W:
        pos = m.pos_embed
    else:
        grid = m.pos_embed[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((H // p + 0.1) / g, (W // p + 0.1) / g), mode="bicubic")
        pos = torch.cat([m.pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, m.embed_dim)], 1)
    t = t + pos
    outs = []
    for blk in m.blocks:
        y = blk.norm1(t)
        nh = blk.attn.num_heads
        qkv = blk.attn.qkv(y).reshape(B, t.shape[1], 3, nh, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        a = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
        y = (a.softmax(-1) @ v).transpose(1, 2).reshape(B, t.shape[1], -1)
        t = t + blk.attn.proj(y)
        t = t + blk.mlp.fc2(F.gelu(blk.mlp.fc1(blk.norm2(t))))
        outs.append(t)
    return outs[-2], m.norm(outs[-1])


@pytest.mark.parametrize("size", [224, 320])
def test_tokens_equal_explicit_dino_forward(vit, size):
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        t11, c = vit.tokens(x)
        r11, rc = explicit_forward(vit, x)
    assert t11.shape == (2, 1 + (size // 16) ** 2, 384)
    assert (t11 - r11).abs().max() < 1e-4 and (c - rc).abs().max() < 1e-4


def test_sdpa_equals_explicit_softmax_attention(vit):
    attn = vit.blocks[3].attn
    x = torch.randn(2, 50, 384)
    with torch.no_grad():
        ours = attn(x)
        q, k, v = attn.qkv(x).reshape(2, 50, 3, 6, 64).permute(2, 0, 3, 1, 4)
        ref = attn.proj(((q @ k.transpose(-2, -1)) / 8.0).softmax(-1).matmul(v).transpose(1, 2).reshape(2, 50, 384))
    assert (ours - ref).abs().max() <= 1e-5


def test_positional_interpolation_is_identity_at_native_size(vit):
    assert vit.interpolate_pos_encoding(196, 224, 224) is vit.pos_embed
    grid = vit.interpolate_pos_encoding(400, 320, 320)
    assert grid.shape == (1, 401, 384)
    assert torch.equal(grid[:, 0], vit.pos_embed[:, 0])     # the CLS position is never resized


def test_non_square_input(vit):
    x = torch.randn(1, 3, 224, 320)
    with torch.no_grad():
        t11, c = vit.tokens(x)
        r11, rc = explicit_forward(vit, x)
    assert c.shape == (1, 1 + 14 * 20, 384) and (c - rc).abs().max() < 1e-4


def test_released_format_roundtrips_strictly(vit, tmp_path):
    sd = vit.state_dict()
    plain, teacher = tmp_path / "plain.pth", tmp_path / "teacher.pth"
    torch.save(sd, plain)
    # a DINO training checkpoint: teacher weights behind module./backbone. prefixes, plus the DINO head
    torch.save({"teacher": {**{f"module.backbone.{k}": v for k, v in sd.items()},
                            "module.head.last_layer.weight": torch.zeros(3, 3)}, "epoch": 3}, teacher)
    for path in (plain, teacher):
        m = ppap.vit_small(16)
        ppap.load_backbone_weights(m, str(path))
        assert all(torch.equal(m.state_dict()[k], v) for k, v in sd.items())
    assert list(ppap.vit_small(16).state_dict()) == list(sd)           # DINO's key names and order
    assert "blocks.11.attn.qkv.bias" in sd and "patch_embed.proj.weight" in sd


def test_wrong_weights_give_one_clear_error(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ppap.PPAPError, match="cannot read weights"):
        ppap.load_backbone_weights(ppap.vit_small(16), str(junk))
    with pytest.raises(ppap.PPAPError, match="not found"):
        ppap.load_backbone_weights(ppap.vit_small(16), str(tmp_path / "nope.pth"))
    small = tmp_path / "small.pth"
    torch.save(ppap.vit_small(16).state_dict(), small)
    with pytest.raises(ppap.PPAPError, match="does not fit"):
        ppap.load_backbone_weights(ppap.vit_base(16), str(small))
    with pytest.raises(ppap.PPAPError, match="does not fit"):
        ppap.load_backbone_weights(ppap.vit_small(8), str(small))   # patch kernel 16 vs 8


def test_checkpoint_trained_at_another_resolution_keeps_its_grid(tmp_path):
    src = ppap.VisionTransformer(16, embed_dim=384, depth=12, num_heads=6, img_size=320)    # 20x20 grid
    path = tmp_path / "w320.pth"
    torch.save(src.state_dict(), path)
    m = ppap.vit_small(16).requires_grad_(False)
    ppap.load_backbone_weights(m, str(path))
    assert torch.equal(m.pos_embed, src.pos_embed) and not m.pos_embed.requires_grad
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(m(x), explicit_forward(m, x)[1], atol=1e-4)     # resized 20x20 -> 14x14

"""--feature-cache: the frozen trunk's output of every train crop, computed once and read by later epochs and
runs. Exact (a cached run is bit-identical to a live one), keyed (another backbone, size or file list is
rebuilt with one line saying why), never read when cut short, shared safely by processes and runs."""
import pytest
import torch

import ppap


def demo_backbone():
    return ppap.new_backbone("vit_tiny_demo", 8).eval()


# ---------------------------------------------------------------- the backbone contract's two halves

@pytest.mark.parametrize("dinov2", [False, True])
def test_trunk_and_crit_features_are_features_and_forward_keeps_its_numbers(dinov2):
    torch.manual_seed(0)
    # the demo's ViT, and a small DINOv2 with 4 registers and its antialiased positional resize
    backbone = ppap.DinoV2ViT(64, 3, 2, n_registers=4, interp_offset=0.0, interp_antialias=True) if dinov2 \
        else demo_backbone()
    patch = backbone.patch_size
    model = ppap.PPAP(backbone, 6).eval()
    x = torch.randn(2, 3, 4 * patch, 4 * patch)
    with torch.no_grad():
        head_in, crit = model.backbone.features(x)
        t = model.backbone.trunk(x)
        assert torch.equal(t, head_in) and torch.equal(model.backbone.crit_features(t, (4, 4)), crit)
        keep = ppap.crit_dropout_mask(2, model.dim, torch.Generator().manual_seed(1))
        live, cached = model(x, crit_keep=keep, probes=True), model(x, crit_keep=keep, probes=True, head_in=t)
    for k in ("code", "z", "crit", "linear_logits"):
        assert torch.equal(live[k], cached[k]), k

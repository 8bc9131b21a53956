"""The README's "Forking" examples, each run end to end on tiny settings: a new positives rule as a loss
class, a non-ViT backbone through the backbone contract, and (test_folder.py) a folder of one's own images."""
import inspect
import json
import os

import pytest
import torch
import torch.nn as nn
import torchvision

import eval as ev
import ppap

TINY = ["--data", "synthetic", "--device", "cpu", "--batch-size", "4", "--val-limit", "4", "--val-every", "0",
        "--num-workers", "0", "--no-progress", "--max-steps", "3"]


# ---------------------------------------------------------------- a non-ViT backbone

class ResNet50Trunk(nn.Module):
    """torchvision's ResNet-50 up to layer3 (stride 16, 1024 channels) as a PPAP backbone: the same features
    feed the head and decide the positives; the head is a 1x1 convolution."""
    patch_size, embed_dim = 16, 1024

    def __init__(self, patch: int = 16):
        super().__init__()
        r = torchvision.models.resnet50(weights=None)
        self.trunk = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool, r.layer1, r.layer2, r.layer3)

    def features(self, x):
        f = self.trunk(x)                   # [B,1024,H/16,W/16]
        return f, f

    def make_head(self):
        return nn.Conv2d(self.embed_dim, self.embed_dim, 1)

    def code(self, head_out, grid):
        return head_out


def test_ppap_uses_the_backbone_contract_only():
    import re
    source = inspect.getsource(ppap.PPAP)
    for reach in (r"\.blocks\b", r"\.norm\b", r"\bn_prefix\b"):
        assert not re.search(reach, source), reach


def test_a_resnet50_backbone_trains_and_evaluates_unchanged(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(ppap.BACKBONES, "resnet50", ppap.BackboneSpec(ResNet50Trunk, (16,), about="torchvision"))
    run = str(tmp_path / "resnet")
    argv = TINY + ["--arch", "resnet50", "--img-size", "64", "--val-size", "64", "--group", "64",
                   "--trainpatchsplit", "4", "--run", run]
    assert ppap.main(argv) == 0
    ckpt = torch.load(os.path.join(run, "last.pt"), weights_only=True)
    assert ckpt["step"] == 3 and ckpt["config"]["arch"] == "resnet50"
    assert ckpt["model"]["head.weight"].shape == (1024, 1024, 1, 1)
    start = ppap.build_model(ppap.make_config({"data": "synthetic", "arch": "resnet50"}), 6, weights=False)
    assert not torch.equal(ckpt["model"]["head.weight"], start.state_dict()["head.weight"])   # the head learned
    capsys.readouterr()
    assert ev.main(["--run", run, "--limit", "4", "--device", "cpu", "--num-workers", "0", "--batch-size", "2"]) == 0
    doc = json.loads(open(os.path.join(run, "eval", "synthetic-first4", "metrics.json")).read())
    assert doc["n_images"] == 4 and 0 <= doc["metrics"]["cluster"]["mIoU"] <= 100


# ---------------------------------------------------------------- a new positives rule

class NearestPositives(ppap.PPAPLoss):
    """Positives: the K samples most similar to the (propagated) proxy, instead of those above Phi."""
    K = 5

    def sets(self, sim, pos, psi, rows):
        sim = sim.clone()
        sim[torch.arange(len(rows)), rows] = -float("inf")           # never the anchor itself
        nearest = torch.zeros_like(pos).scatter_(1, sim.topk(self.K, dim=1).indices, True)
        return super().sets(sim, nearest, psi, rows)


def test_a_new_positives_rule_trains_and_is_what_the_propagation_report_measures(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ppap, "build_loss", NearestPositives)
    run = str(tmp_path / "nearest")
    argv = TINY + ["--img-size", "56", "--val-size", "56", "--group", "196", "--trainpatchsplit", "4", "--run", run]
    assert ppap.main(argv) == 0
    capsys.readouterr()
    out = tmp_path / "prop"
    assert ev.main(["--propagation", "--run", run, "--limit", "4", "--batch-size", "4", "--device", "cpu",
                    "--num-workers", "0", "--out", str(out)]) == 0
    doc = json.loads((out / "propagation.json").read_text())
    for name in ("criterion", "z"):
        steps = doc["feature_sets"][name]["steps"]
        assert [s["positives"] for s in steps] == [NearestPositives.K] * len(steps), name
    # the unforked loss's positives on the same features are not K per anchor: the report did change
    monkeypatch.setattr(ppap, "build_loss", ppap.PPAPLoss)
    assert ev.main(["--propagation", "--run", run, "--limit", "4", "--batch-size", "4", "--device", "cpu",
                    "--num-workers", "0", "--out", str(tmp_path / "plain")]) == 0
    plain = json.loads((tmp_path / "plain" / "propagation.json").read_text())
    assert plain["feature_sets"]["criterion"]["steps"][0]["positives"] != pytest.approx(NearestPositives.K)

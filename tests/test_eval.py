"""Tests for eval.py: metrics (Hungarian, IoU, accuracy), authors' checkpoints, CRF plumbing, CLI.

    .venv/bin/python -m pytest -q tests/test_eval.py
"""
import itertools
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import eval as ev  # noqa: E402
import ppap  # noqa: E402

PY = sys.executable


# ---------------------------------------------------------------------------
# confusion_update

def test_confusion_update_counts_and_ignores():
    g = torch.Generator().manual_seed(0)
    C, K = 4, 6
    label = torch.randint(-1, C + 2, (3, 17, 19), generator=g)   # -1 and >= C are ignored
    pred = torch.randint(-1, K + 1, (3, 17, 19), generator=g)    # -1 and >= K are not counted
    conf = ev.confusion_update(None, pred, label, C, K)
    ref = np.zeros((C, K), np.int64)
    for t, p in zip(label.flatten().tolist(), pred.flatten().tolist()):
        if 0 <= t < C and 0 <= p < K:
            ref[t, p] += 1
    assert conf.dtype == torch.int64 and conf.shape == (C, K)
    assert np.array_equal(conf.numpy(), ref)
    # accumulates in place
    conf2 = ev.confusion_update(conf, pred, label, C, K)
    assert conf2 is conf and np.array_equal(conf.numpy(), 2 * ref)
    with pytest.raises(ValueError):
        ev.confusion_update(None, pred, label, C, C - 1)


# ---------------------------------------------------------------------------
# scores: hand-computed examples

def test_scores_identity_hand_example():
    # rows: true class, cols: predicted class. Class 2 has no pixel and is never predicted -> NaN, skipped.
    conf = np.array([[5, 1, 0, 0],
                     [2, 7, 0, 1],
                     [0, 0, 0, 0],
                     [0, 0, 0, 4]])
    s = ev.scores(conf, hungarian=False)
    # TP = 5, 7, 0, 4; rows 6, 10, 0, 4; columns 7, 8, 0, 5
    # IoU0 = 5 / (6 + 7 - 5) = 5/8, IoU1 = 7 / (10 + 8 - 7) = 7/11, IoU3 = 4 / (4 + 5 - 4) = 4/5
    assert s["IoU"][0] == pytest.approx(62.5)
    assert s["IoU"][1] == pytest.approx(700 / 11)
    assert math.isnan(s["IoU"][2])
    assert s["IoU"][3] == pytest.approx(80.0)
    assert s["mIoU"] == pytest.approx((62.5 + 700 / 11 + 80.0) / 3)   # 68.7121...
    assert s["Acc"] == pytest.approx(80.0)                              # 16 / 20
    assert s["assignment"] == [0, 1, 2, 3]


def test_scores_hungarian_hand_example():
    conf = np.array([[1, 9, 0],
                     [8, 2, 0],
                     [0, 3, 4]])
    s = ev.scores(conf, hungarian=True)
    # best matching: cluster 1 -> class 0 (9), cluster 0 -> class 1 (8), cluster 2 -> class 2 (4): 21 of 27
    assert s["assignment"] == [1, 0, 2]
    assert s["class_to_cluster"] == [1, 0, 2]
    assert s["matched"] == [[9, 1, 0], [2, 8, 0], [3, 0, 4]]
    # rows 10, 10, 7; matched columns 14, 9, 4
    assert s["IoU"] == pytest.approx([100 * 9 / 15, 100 * 8 / 11, 100 * 4 / 7])
    assert s["mIoU"] == pytest.approx(100 * (9 / 15 + 8 / 11 + 4 / 7) / 3)   # 63.2900...
    assert s["Acc"] == pytest.approx(100 * 21 / 27)                            # 77.777...
    # the linear (identity) view of the same matrix
    lin = ev.scores(conf, hungarian=False)
    assert lin["Acc"] == pytest.approx(100 * 7 / 27)


def test_scores_more_clusters_than_classes_hand_example():
    # 2 classes, 3 clusters. Matching: class 0 <- cluster 0 (6), class 1 <- cluster 1 (5); cluster 2 unmatched.
    conf = np.array([[6, 1, 3],
                     [0, 5, 2]])
    s = ev.scores(conf, hungarian=True)
    assert s["assignment"] == [0, 1, -1]
    # authors' histogram: unmatched clusters pooled into an "extra" column, no pixel is of class "extra"
    assert s["matched"] == [[6, 1, 3], [0, 5, 2], [0, 0, 0]]
    # IoU0 = 6 / (10 + 6 - 6), IoU1 = 5 / (7 + 6 - 5), IoU_extra = 0 / 5 = 0 and it counts in the mean
    assert s["IoU"] == pytest.approx([60.0, 62.5])
    assert s["IoU_extra"] == 0.0
    assert s["mIoU"] == pytest.approx((60.0 + 62.5 + 0.0) / 3)
    assert s["Acc"] == pytest.approx(100 * 11 / 17)
    # empty unmatched clusters: the extra class is NaN and skipped
    s2 = ev.scores(np.array([[6, 1, 0], [0, 5, 0]]), hungarian=True)
    assert math.isnan(s2["IoU_extra"])
    assert s2["mIoU"] == pytest.approx(100 * (6 / 7 + 5 / 6) / 2)


def test_scores_edge_cases():
    with pytest.raises(ValueError):
        ev.scores(np.zeros((3, 2), np.int64), hungarian=True)     # fewer clusters than classes
    with pytest.raises(ValueError):
        ev.scores(np.zeros((2, 3), np.int64), hungarian=False)    # identity needs a square matrix
    s = ev.scores(np.zeros((3, 3), np.int64), hungarian=True)     # nothing counted
    assert math.isnan(s["mIoU"]) and math.isnan(s["Acc"]) and all(math.isnan(v) for v in s["IoU"])
    # torch input works the same as numpy input
    conf = torch.tensor([[3, 1], [0, 2]])
    assert ev.scores(conf, True)["mIoU"] == ev.scores(conf.numpy(), True)["mIoU"]


# ---------------------------------------------------------------------------
# scores vs brute force over all matchings

def _brute_force(conf):
    """All injective class -> cluster maps; returns (best matched count, list of optimal maps)."""
    C, K = conf.shape
    best, maps = -1, []
    for perm in itertools.permutations(range(K), C):
        v = int(sum(conf[c, perm[c]] for c in range(C)))
        if v > best:
            best, maps = v, [perm]
        elif v == best:
            maps.append(perm)
    return best, maps


def _scores_from_map(conf, cmap):
    """IoU (list incl. extra when K > C), Acc for a given class -> cluster map, from the definitions."""
    C, K = conf.shape
    tot = conf.sum()
    ious = []
    for c in range(C):
        tp = conf[c, cmap[c]]
        fn = conf[c].sum() - tp                      # pixels of c predicted as another (or no) class
        fp = conf[:, cmap[c]].sum() - tp             # pixels predicted as c but of another class
        ious.append(tp / (tp + fp + fn) if tp + fp + fn else float("nan"))
    if K > C:
        unmatched = [k for k in range(K) if k not in cmap]
        n = conf[:, unmatched].sum()
        ious.append(0.0 if n else float("nan"))
    acc = sum(conf[c, cmap[c]] for c in range(C)) / tot
    return ious, acc


@pytest.mark.parametrize("seed", range(6))
def test_scores_hungarian_vs_brute_force(seed):
    rng = np.random.default_rng(seed)
    n_unique = 0
    for trial in range(40):
        C = int(rng.integers(1, 7))
        K = C if C == 6 or trial % 2 == 0 else C + int(rng.integers(1, 3))
        conf = rng.integers(0, 50, (C, K)) * (rng.random((C, K)) < 0.6)   # many zeros: ties, empty rows
        if trial % 5 == 0 and C > 1:
            conf[rng.integers(0, C)] = 0            # a class with no pixels
        if trial % 7 == 0:
            conf[:, rng.integers(0, K)] = 0         # a cluster that is never predicted
        if conf.sum() == 0:
            conf[0, 0] = 1
        s = ev.scores(conf, hungarian=True)
        best, maps = _brute_force(conf)
        assert s["Acc"] == pytest.approx(100 * best / conf.sum(), abs=1e-12)
        # the returned matching is one of the optimal ones and consistent with 'assignment'
        cmap = tuple(s["class_to_cluster"])
        assert cmap in maps
        assert sorted(k for k, c in enumerate(s["assignment"]) if c >= 0) == sorted(cmap) or K > C
        if len(maps) == 1:                           # unique optimum: every number is determined
            n_unique += 1
            ious, acc = _scores_from_map(conf, maps[0])
            np.testing.assert_allclose(s["IoU"], 100 * np.array(ious[:C]), rtol=1e-12, equal_nan=True)
            if K > C:
                np.testing.assert_allclose(s["IoU_extra"], 100 * ious[C], equal_nan=True)
            valid = [v for v in ious if not math.isnan(v)]
            assert s["mIoU"] == pytest.approx(100 * sum(valid) / len(valid), rel=1e-12)
    assert n_unique >= 10


# ---------------------------------------------------------------------------
# scores vs an independent re-statement of the authors' UnsupervisedMetrics.compute (torch)

def _authors_compute(conf, hungarian, dtype=torch.float64):
    """Authors' layout: stats[cluster, class] = conf.T; histogram rows = matched clusters."""
    stats = torch.as_tensor(np.ascontiguousarray(conf.T))
    K, C = stats.shape
    if not hungarian:
        hist = stats
        assign = np.arange(C)
    elif K == C:
        r, c = linear_sum_assignment(stats.numpy(), maximize=True)
        hist = stats[np.argsort(c), :]
        assign = c
    else:
        r, c = linear_sum_assignment(stats.numpy(), maximize=True)
        _, ct = linear_sum_assignment(stats.t().numpy(), maximize=True)
        hist = stats[ct, :]
        missing = list(set(range(K)) - set(r.tolist()))
        hist = torch.cat([hist, stats[missing, :].sum(0, keepdim=True)], 0)
        hist = torch.cat([hist, torch.zeros(C + 1, 1, dtype=hist.dtype)], 1)
        assign = np.full(K, -1)
        assign[r] = c
    hist = hist.to(dtype)
    tp = torch.diag(hist)
    fp = hist.sum(0) - tp
    fn = hist.sum(1) - tp
    iou = tp / (tp + fp + fn)
    acc = tp.sum() / hist.sum()
    return {"mIoU": 100 * iou[~torch.isnan(iou)].mean().item(), "Acc": 100 * acc.item(),
            "IoU": (100 * iou).tolist(), "assignment": [int(a) for a in assign]}


@pytest.mark.parametrize("seed", range(4))
def test_scores_equal_authors_formulas_on_random_matrices(seed):
    rng = np.random.default_rng(100 + seed)
    for trial in range(25):
        C = int(rng.integers(2, 28))
        extra = 0 if trial % 3 else int(rng.integers(1, 4))
        K = C + extra
        conf = rng.integers(0, 10 ** int(rng.integers(1, 7)), (C, K))
        conf *= rng.random((C, K)) < 0.7
        if trial % 4 == 0:
            conf[rng.integers(0, C)] = 0
        for hungarian in ((True, False) if K == C else (True,)):
            s = ev.scores(conf, hungarian)
            ref = _authors_compute(conf, hungarian)
            assert s["assignment"] == ref["assignment"]
            assert s["Acc"] == ref["Acc"]                                    # bit-identical
            np.testing.assert_array_equal(s["IoU"], ref["IoU"][:C])          # bit-identical, NaN where NaN
            if K > C:
                np.testing.assert_array_equal(s["IoU_extra"], ref["IoU"][C])
            assert s["mIoU"] == pytest.approx(ref["mIoU"], rel=1e-13, abs=1e-13)
            # the authors compute in float32: same numbers to ~1e-5 (x100 units)
            ref32 = _authors_compute(conf, hungarian, torch.float32)
            assert s["mIoU"] == pytest.approx(ref32["mIoU"], abs=1e-3)
            assert s["Acc"] == pytest.approx(ref32["Acc"], abs=1e-3)


# ---------------------------------------------------------------------------
# authors' checkpoints

def _dino_keys(depth):
    """DINO ViT key names, written out from the DINO architecture (head = Identity, no params)."""
    keys = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight",
            "norm.bias"]
    for i in range(depth):
        keys += [f"blocks.{i}.{k}" for k in _BLOCK_KEYS]
    return keys


_BLOCK_KEYS = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
               "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
               "mlp.fc2.weight", "mlp.fc2.bias"]


def _random_model(arch, n_classes, seed):
    torch.manual_seed(seed)
    m = ppap.PPAP(ppap.new_backbone(arch, 8), n_classes)
    with torch.no_grad():                 # make every trainable part non-trivial
        for p in list(m.head.parameters()) + list(m.proj.parameters()) + list(m.linear_probe.parameters()):
            p.add_(0.05 * torch.randn_like(p))
        m.cluster_probe.clusters.normal_()
    return m.eval()


def _authors_format(model, module_prefix=""):
    """Hand-written authors' layout of our model (independent of eval.official_state_dict)."""
    sd = model.state_dict()
    net = {}
    for k, v in sd.items():
        if k.startswith("backbone."):
            net[module_prefix + "model." + k[len("backbone."):]] = v.clone()
        elif k.startswith("head."):
            net[module_prefix + "decoder." + k[len("head."):]] = v.clone()
        elif k.startswith("proj."):
            net[module_prefix + "project_head." + k[len("proj."):]] = v.clone()
    return {"epoch": 4, "iter": 2000, "best": 123.4,
            "net_model_state_dict": net,
            "linear_model_state_dict": {"weight": sd["linear_probe.weight"].clone(),
                                        "bias": sd["linear_probe.bias"].clone()},
            "cluster_model_state_dict": {"clusters": sd["cluster_probe.clusters"].clone()}}


def _outputs(model, x):
    with torch.no_grad():
        code = model(x)["code"]
        return code, model.linear_probe(code), model.cluster_probe.inner(code)


def _authors_net_keys(depth):
    """The featurizer keys of the authors' released checkpoints for a ViT of this depth."""
    return sorted(["model." + k for k in _dino_keys(depth)] + ["decoder." + k for k in _BLOCK_KEYS]
                  + ["project_head.weight", "project_head.bias"])


def test_official_checkpoint_reproduces_outputs(tmp_path):
    model = _random_model("vit_tiny_demo", 5, seed=3)
    ck = _authors_format(model)
    # the layout we wrote by hand is the authors' one
    assert sorted(ck["net_model_state_dict"]) == _authors_net_keys(4)
    path = tmp_path / "ckpt.pth"
    torch.save(ck, path)
    loaded = ev.load_official(str(path), "vit_tiny_demo", 8)
    assert loaded.n_classes == 5
    x = torch.randn(2, 3, 48, 64, generator=torch.Generator().manual_seed(1))
    for a, b in zip(_outputs(model, x), _outputs(loaded, x)):
        assert torch.equal(a, b)
    # our exporter gives the same dict, and a DDP 'module.' prefix is accepted
    ours = ev.official_state_dict(model)
    for part in ev.OFFICIAL_KEYS:
        assert sorted(ours[part]) == sorted(ck[part])
        assert all(torch.equal(ours[part][k], ck[part][k]) for k in ck[part])
    torch.save(_authors_format(model, module_prefix="module."), tmp_path / "ddp.pth")
    loaded2 = ev.load_official(str(tmp_path / "ddp.pth"), "vit_tiny_demo", 8, n_classes=5)
    assert torch.equal(_outputs(loaded2, x)[2], _outputs(model, x)[2])


def test_official_vit_small_key_names(tmp_path):
    """ViT-S/8 with random weights: the released checkpoints' key set maps onto ours with strict=True."""
    model = _random_model("vit_small", 27, seed=4)
    ck = _authors_format(model)
    assert sorted(ck["net_model_state_dict"]) == _authors_net_keys(12)
    assert ck["net_model_state_dict"]["model.pos_embed"].shape == (1, 785, 384)
    path = tmp_path / "vits8.pth"
    torch.save(ck, path)
    loaded = ev.load_official(str(path), "vit_small", 8, n_classes=27)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    for a, b in zip(_outputs(model, x), _outputs(loaded, x)):
        assert torch.equal(a, b)
    # the same file as the wrong architecture: a clear error, not a crash
    with pytest.raises(ppap.PPAPError, match="does not match vit_tiny_demo/8: unexpected key[(]s[)]: net_model_state_dict:model.blocks.4.norm1"):
        ev.load_official(str(path), "vit_tiny_demo", 8)


@pytest.fixture(scope="module")
def tiny_official(tmp_path_factory):
    d = tmp_path_factory.mktemp("official")
    ck = _authors_format(_random_model("vit_tiny_demo", 6, seed=5))
    path = d / "good.pth"
    torch.save(ck, path)
    return d, ck, path


def _err(path, **kw):
    with pytest.raises(ppap.PPAPError) as e:
        ev.load_official(str(path), kw.pop("arch", "vit_tiny_demo"), 8, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_official_corrupt_checkpoints(tiny_official):
    d, ck, good = tiny_official
    import copy
    bad = copy.deepcopy(ck)
    del bad["net_model_state_dict"]["decoder.norm1.weight"]
    torch.save(bad, d / "missing.pth")
    assert "missing key(s): net_model_state_dict:decoder.norm1.weight" in _err(d / "missing.pth")

    bad = copy.deepcopy(ck)
    bad["net_model_state_dict"]["model.blocks.9.norm1.weight"] = torch.ones(192)
    torch.save(bad, d / "extra.pth")
    assert "unexpected key(s): net_model_state_dict:model.blocks.9.norm1.weight" in _err(d / "extra.pth")

    bad = copy.deepcopy(ck)
    bad["net_model_state_dict"]["segment_head.weight"] = torch.ones(3)
    torch.save(bad, d / "unmapped.pth")
    assert "unexpected key(s): net_model_state_dict:segment_head.weight" in _err(d / "unmapped.pth")

    bad = copy.deepcopy(ck)
    del bad["cluster_model_state_dict"]
    torch.save(bad, d / "nocluster.pth")
    assert "missing cluster_model_state_dict" in _err(d / "nocluster.pth")

    torch.save([1, 2, 3], d / "list.pth")
    assert "expected a dict, got list" in _err(d / "list.pth")

    raw = open(good, "rb").read()
    (d / "trunc.pth").write_bytes(raw[: len(raw) // 2])
    assert "cannot read checkpoint" in _err(d / "trunc.pth")
    (d / "text.pth").write_text("hello")
    assert "cannot read checkpoint" in _err(d / "text.pth")
    assert "checkpoint not found" in _err(d / "nope.pth")
    assert "checkpoint has 6 classes, the data set has 27" in _err(good, n_classes=27)

    bad = copy.deepcopy(ck)
    bad["linear_model_state_dict"]["weight"] = torch.ones(6, 100, 1, 1)
    torch.save(bad, d / "shape.pth")
    assert "shape mismatch: linear_model_state_dict:weight (6, 100, 1, 1) vs (6, 192, 1, 1)" in _err(d / "shape.pth")


def test_official_cli_errors(tiny_official, capsys):
    d, _, good = tiny_official
    torch.save({"a": 1}, d / "other.pth")
    rc = ev.main(["--official", str(d / "other.pth"), "--arch", "vit_tiny_demo", "--data", "synthetic"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and "net_model_state_dict" in err[0]


def test_official_cli_evaluates(tiny_official, tmp_path, capsys):
    _, _, good = tiny_official
    out = tmp_path / "out"
    rc = ev.main(["--official", str(good), "--arch", "vit_tiny_demo", "--patch", "8", "--data", "synthetic",
                  "--limit", "3", "--batch-size", "3", "--device", "cpu", "--out", str(out), "--n-examples", "2"])
    assert rc == 0
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["kind"] == "official" and doc["selection"] == "authors-release" and doc["n_images"] == 3
    assert set(doc["metrics"]) == {"cluster", "linear"}


# ---------------------------------------------------------------------------
# CRF: image conversion and plumbing (the real op is tested by ext's own tests)

def test_image_to_uint8_bgr_matches_authors_conversion():
    import torchvision.transforms.functional as VF
    g = torch.Generator().manual_seed(0)
    u8 = torch.randint(0, 256, (2, 3, 9, 11), dtype=torch.uint8, generator=g)
    u8[0, :, 0, 0] = 255
    u8[0, :, 0, 1] = 0
    x = ppap.normalize(u8.float() / 255)
    ours = ev.image_to_uint8_bgr(x)
    assert ours.dtype == torch.uint8 and ours.shape == (2, 9, 11, 3)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    for i in range(2):
        img = x[i].clone()
        for t, m, s in zip(img, mean, std):              # authors' UnNormalize
            t.mul_(s).add_(m)
        ref = np.array(VF.to_pil_image(img))[:, :, ::-1]  # to_pil_image truncates x * 255; RGB -> BGR
        assert np.array_equal(ours[i].numpy(), ref)
    # truncation, not rounding: some values come back one lower than the original uint8
    rgb = ev.image_to_uint8_bgr(x, bgr=False).permute(0, 3, 1, 2)
    assert ((u8.int() - rgb.int()) >= 0).all() and ((u8.int() - rgb.int()) <= 1).all()


class _StubCRF:
    """Records its inputs; returns the probabilities unchanged (so CRF argmax == plain argmax)."""

    def __init__(self):
        self.calls = []

    def __call__(self, image, probs, iters=5, pos_xy=0, pos_w=0, bi_xy=0, bi_rgb=0, bi_w=0):
        self.calls.append(dict(image=image.clone(), probs=probs.clone(), iters=iters, pos_xy=pos_xy,
                               pos_w=pos_w, bi_xy=bi_xy, bi_rgb=bi_rgb, bi_w=bi_w))
        return probs.clone()


def _val_loader(n=4, size=32, bs=2):
    ds = torch.utils.data.Subset(ppap.SyntheticDataset("val", size), range(n))
    return torch.utils.data.DataLoader(ds, batch_size=bs)


def test_crf_plumbing_with_stub(monkeypatch):
    """Only plumbing: a stub stands in for ext.dense_crf."""
    import types
    stub = _StubCRF()
    monkeypatch.setitem(sys.modules, "ext", types.SimpleNamespace(dense_crf=stub))
    model = _random_model("vit_tiny_demo", 6, seed=6)
    res = ev.evaluate_model(model, _val_loader(), "cpu", crf=True, progress=False, n_examples=1)
    assert len(stub.calls) == 4                                   # 2 batches x (linear, cluster)
    for j, call in enumerate(stub.calls):
        assert call["image"].dtype == torch.uint8 and call["image"].shape == (2, 32, 32, 3)
        assert call["probs"].shape == (2, 6, 32, 32) and call["probs"].dtype == torch.float32
        torch.testing.assert_close(call["probs"].sum(1), torch.ones(2, 32, 32))
        assert (call["iters"], call["pos_xy"], call["pos_w"], call["bi_xy"], call["bi_rgb"], call["bi_w"]) == \
            (10, 1, 3, 67, 3, 4)
    # BGR: the image handed over is the RGB image with channels reversed
    first = next(iter(_val_loader()))["img"]
    assert torch.equal(stub.calls[0]["image"], ev.image_to_uint8_bgr(first, bgr=False).flip(-1))
    # cluster probabilities are softmax(2 * cosine scores)
    with torch.no_grad():
        code = torch.nn.functional.interpolate(model(first)["code"], (32, 32), mode="bilinear",
                                               align_corners=False)
        want = torch.softmax(2 * model.cluster_probe.inner(code), 1)
        want_lin = torch.softmax(model.linear_probe(code), 1)
    torch.testing.assert_close(stub.calls[1]["probs"], want)
    torch.testing.assert_close(stub.calls[0]["probs"], want_lin)
    # identity stub: CRF scores equal the plain ones; all four probes reported
    for p in ("cluster", "linear"):
        assert res[f"{p}_crf_confusion"] == res[f"{p}_confusion"]
        assert res[f"{p}_crf_mIoU"] == res[f"{p}_mIoU"]
    assert set(res["examples"][0]) >= {"image", "label", "cluster", "linear", "cluster_crf", "linear_crf"}


def test_crf_unavailable_is_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "ext", None)                 # "import ext" raises ImportError
    with pytest.raises(ppap.PPAPError, match="^CRF unavailable: "):
        ev.load_crf()
    rc = ev.main(["--run", str(tmp_path), "--crf"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and err[0].startswith("CRF unavailable: ")


def test_evaluate_model_matches_manual_computation():
    """evaluate_model == upsample code, argmax of the probes, one confusion over all batches."""
    model = _random_model("vit_tiny_demo", 6, seed=7)
    model.train()
    res = ev.evaluate_model(model, _val_loader(n=5, bs=2), "cpu", progress=False)
    assert model.training                                         # mode restored
    model.eval()
    C = 6
    conf_c, conf_l = np.zeros((C, C), np.int64), np.zeros((C, C), np.int64)
    with torch.no_grad():
        for b in _val_loader(n=5, bs=5):
            code = torch.nn.functional.interpolate(model(b["img"])["code"], b["label"].shape[-2:],
                                                   mode="bilinear", align_corners=False)
            pc = model.cluster_probe(code, None)[1].argmax(1)
            pl = model.linear_probe(code).argmax(1)
            np.add.at(conf_c, (b["label"].numpy().ravel(), pc.numpy().ravel()), 1)
            np.add.at(conf_l, (b["label"].numpy().ravel(), pl.numpy().ravel()), 1)
    assert np.array_equal(np.array(res["cluster_confusion"]), conf_c)
    assert np.array_equal(np.array(res["linear_confusion"]), conf_l)
    assert res["cluster_mIoU"] == ev.scores(conf_c, True)["mIoU"]
    assert res["linear_Acc"] == ev.scores(conf_l, False)["Acc"]
    assert res["n_images"] == 5
    assert all(not isinstance(v, (dict, torch.Tensor)) for v in res.values())   # JSON-log friendly


def test_real_crf_runs():
    dense_crf = ev.load_crf()
    model = _random_model("vit_tiny_demo", 6, seed=8)
    res = ev.evaluate_model(model, _val_loader(n=2), "cpu", crf=True, progress=False, dense_crf=dense_crf)
    assert 0 <= res["cluster_crf_Acc"] <= 100 and 0 <= res["linear_crf_Acc"] <= 100


# ---------------------------------------------------------------------------
# plots

def test_plots_are_valid_pngs(tmp_path):
    from PIL import Image
    names = [f"class {i}" for i in range(27)]
    conf = np.random.default_rng(0).integers(0, 100, (27, 28))
    p = ev.plot_confusion(conf, names, names + ["extra"], str(tmp_path / "c.png"), "title")
    im = Image.open(p)
    assert im.format == "PNG" and im.mode == "RGB" and im.width > 27 * 14 and im.height > 27 * 14
    pal = ev.palette(30)
    assert pal.shape == (30, 3) and len({tuple(c) for c in pal}) == 30
    assert np.array_equal(pal, ev.palette(30))                   # fixed


# ---------------------------------------------------------------------------
# end to end: train a tiny synthetic run, evaluate it, summarise

@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "syn"
    # ppap.py's CLI entry point, in-process (saves a torch import); eval.py below runs as a subprocess
    argv = ["--data", "synthetic", "--max-steps", "1", "--batch-size", "4", "--val-limit", "6",
            "--val-every", "1", "--select-on-val", "--no-progress", "--device", "cpu", "--run", str(run)]
    with torch.random.fork_rng(devices=[]):
        assert ppap.main(argv) == 0
    return run


def test_end_to_end_eval(synthetic_run, tmp_path):
    from PIL import Image
    out = tmp_path / "ev"
    r = subprocess.run([PY, "eval.py", "--run", str(synthetic_run), "--limit", "6", "--batch-size", "4",
                        "--device", "cpu", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "probe" in r.stdout and "mIoU" in r.stdout and "per-class IoU" in r.stdout
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["selection"] == "last" and doc["crf"] is False and doc["device"] == "cpu"
    assert doc["torch"] == torch.__version__ and "git_commit" in doc and doc["config"]["data"] == "synthetic"
    assert doc["checkpoint"].endswith("last.pt") and doc["n_images"] == 6
    assert list(doc["metrics"]["cluster"]["IoU"]) == ppap.SYNTH_CLASSES
    for name in ("confusion_cluster.png", "confusion_linear.png", "examples.png"):
        im = Image.open(out / name)
        assert im.format == "PNG" and im.mode == "RGB" and min(im.size) > 100
    # the numbers equal the training run's own last validation (same images, CPU fp32)
    last = [json.loads(l) for l in open(synthetic_run / "log.jsonl")][-1]
    for k in ("cluster_mIoU", "cluster_Acc", "linear_mIoU", "linear_Acc"):
        p, m = k.split("_")
        assert doc["metrics"][p][m] == pytest.approx(last[k], rel=1e-9)


def test_best_on_val_selection_label(synthetic_run, tmp_path, capsys):
    rc = ev.main(["--run", str(synthetic_run / "best_on_val.pt"), "--limit", "2", "--device", "cpu",
                  "--out", str(tmp_path), "--n-examples", "0"])
    assert rc == 0
    doc = json.loads((tmp_path / "metrics.json").read_text())
    assert doc["selection"] == "best-on-val" and "examples" not in doc["pngs"]


def test_cli_errors(synthetic_run, tmp_path, capsys):
    def run(argv):
        rc = ev.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), err
        return err[0]
    assert "not found" in run(["--run", str(tmp_path / "missing")])
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    assert "junk.pt" in run(["--run", str(tmp_path / "junk.pt")])
    msg = run(["--run", str(synthetic_run), "--data", "cocostuff", "--data-dir", str(tmp_path / "nodata"),
               "--device", "cpu"])
    assert "cocostuff" in msg and "nodata" in msg
    assert "run not found" in run(["--summarize", str(tmp_path / "missing")])


def test_summarize(tmp_path, capsys):
    runs = []
    for i, (cm, la) in enumerate([(40.0, 60.0), (44.0, 62.0)]):
        d = tmp_path / f"seed{i}"
        d.mkdir()
        (d / "metrics.json").write_text(json.dumps({"metrics": {
            "cluster": {"mIoU": cm, "Acc": 70.0 + i, "IoU": {"a": 10.0 * i, "b": None}},
            "linear": {"mIoU": la, "Acc": 80.0, "IoU": {"a": 1.0, "b": 2.0}}}}))
        runs.append(str(d))
    d = tmp_path / "seed2"                        # no metrics.json: the last full validation in log.jsonl
    d.mkdir()
    (d / "log.jsonl").write_text(json.dumps({"step": 1, "cluster_mIoU": 1.0, "full": True}) + "\n"
                                 + json.dumps({"step": 2, "cluster_mIoU": 42.0, "linear_mIoU": 61.0, "val_images": 3,
                                               "full": True, "skipped_steps": 0}) + "\n"
                                 + json.dumps({"step": 3, "cluster_mIoU": 7.0, "full": False}) + "\n")
    s = ev.summarize(runs)
    assert s["metrics"]["cluster/mIoU"]["mean"] == pytest.approx(42.0)
    assert s["metrics"]["cluster/mIoU"]["std"] == pytest.approx(np.std([40.0, 44.0], ddof=1))
    assert s["metrics"]["cluster/IoU/a"] == {"mean": 5.0, "std": pytest.approx(np.std([0, 10], ddof=1)), "n": 2}
    assert s["metrics"]["cluster/IoU/b"]["n"] == 0
    s3 = ev.summarize([str(d)])
    assert s3["metrics"]["cluster/mIoU"] == {"mean": 42.0, "std": 0.0, "n": 1}
    assert set(s3["metrics"]) == {"cluster/mIoU", "linear/mIoU"}        # no step, val_images, ...
    mixed = ev.summarize(runs + [str(d)])          # both sources use the same metric names
    assert mixed["metrics"]["cluster/mIoU"]["n"] == 3
    assert mixed["metrics"]["cluster/mIoU"]["mean"] == pytest.approx(42.0)
    rc = ev.main(["--summarize", *runs, "--out", str(tmp_path / "sum")])
    out = capsys.readouterr().out
    assert rc == 0 and "cluster/mIoU" in out and "±" in out
    assert json.loads((tmp_path / "sum" / "summary.json").read_text())["metrics"]["linear/mIoU"]["mean"] == 61.0


# ---------------------------------------------------------------------------
# kNN image table (moved here from ppap.py: a tool, not part of training)

def test_knn_table_equals_torch_topk(tmp_path):
    from PIL import Image
    cfg = ppap.make_config({"data": "synthetic", "data_dir": str(tmp_path), "progress": False, "num_workers": 0})
    path = ev.knn_table(cfg, "val", k=5)
    assert path.startswith(str(tmp_path)) and ev.knn_table(cfg, "val", k=5) == path    # cached
    table = torch.load(path, weights_only=True)
    ds = ppap.SyntheticDataset("val", cfg.val_size)
    vit = ppap.build_backbone(cfg).eval()
    with torch.no_grad():
        tokens = vit(torch.stack([ds[i]["img"] for i in range(len(ds))]))[:, 1:]
        f = torch.nn.functional.normalize(tokens.mean(1), dim=1)
    values, indices = torch.topk(f @ f.T, 6)
    assert table["indices"].shape == (len(ds), 6)
    assert torch.allclose(table["values"], values, atol=1e-5)
    assert torch.equal(table["indices"][:, 0], torch.arange(len(ds)))              # itself first
    assert (table["indices"] == indices).float().mean() > 0.99                     # up to near-ties
    # other backbone weights -> another cache entry, not the stale table
    w = tmp_path / "w.pth"
    torch.save(ppap.vit_tiny_demo(8).state_dict(), w)
    other = ev.knn_table(ppap.make_config({"data": "synthetic", "data_dir": str(tmp_path), "progress": False,
                                           "num_workers": 0, "weights": str(w)}), "val", k=5)
    assert other != path
    png = ev.plot_knn(ds, table, str(tmp_path / "knn.png"), n_queries=3, k=4)
    im = Image.open(png)
    assert im.format == "PNG" and im.width > 5 * 100 and im.height > 3 * 100


def test_knn_cli(tmp_path, capsys):
    rc = ev.main(["--knn", "--data", "synthetic", "--data-dir", str(tmp_path), "--split", "val", "--k", "3",
                  "--device", "cpu", "--num-workers", "0", "--out", str(tmp_path / "k")])
    out = capsys.readouterr().out
    assert rc == 0 and "kNN table (3 neighbours per image, 64 images)" in out
    assert (tmp_path / "k" / "knn.png").exists()


# ---------------------------------------------------------------------------
# the unhappy path

def test_summarize_skips_a_metrics_json_older_than_the_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "metrics.json").write_text(json.dumps({"metrics": {"cluster": {"mIoU": 40.0, "Acc": 70.0}}}))
    (run / "last.pt").write_bytes(b"newer checkpoint")
    os.utime(run / "eval" / "metrics.json", (1000, 1000))
    assert ev.main(["--summarize", str(run)]) == 2
    err = capsys.readouterr().err
    assert "nothing to summarize" in err and "older than last.pt" in err and "python eval.py --run" in err


def test_summarize_bad_inputs_are_one_line(tmp_path, capsys):
    def one(argv):
        rc = ev.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), err
        return err[0]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.json").write_text("{not json")
    assert "cannot read" in one(["--summarize", str(bad)])
    (bad / "metrics.json").write_text("[1, 2]")
    assert "no 'metrics' object" in one(["--summarize", str(bad)])
    good = tmp_path / "good"
    good.mkdir()
    (good / "metrics.json").write_text(json.dumps({"metrics": {"cluster": {"mIoU": 1.0}}}))
    (tmp_path / "afile").write_text("x")
    assert "is a file" in one(["--summarize", str(good), "--out", str(tmp_path / "afile")])


def test_the_demo_classes_are_drawn_in_their_own_colours():
    pal = ev.class_palette(ppap.SYNTH_CLASSES)
    for name, (r, g, b) in zip(ppap.SYNTH_CLASSES, pal.astype(int)):
        word = name.split()[0]
        if word == "red":
            assert r > g + 60 and r > b + 60
        elif word == "green":
            assert g > r + 60 and g > b + 60
        elif word == "blue":
            assert b > r + 60 and b > g + 60
        elif word == "yellow":
            assert min(r, g) > b + 60
        elif word == "purple":
            assert min(r, b) > g + 60
        else:
            assert max(r, g, b) - min(r, g, b) < 10
    assert np.array_equal(ev.class_palette(["a", "b"]), ev.palette(2))


def test_crf_device_auto_falls_back_to_the_cpu_where_cuda_kernels_cannot_build(monkeypatch, capsys):
    import ext
    monkeypatch.setattr(ext, "cuda_unusable_reason", lambda: "nvcc was not found")
    assert ev.crf_device("auto", torch.device("cuda")) == torch.device("cpu")
    assert "nvcc was not found: the CRF runs on the CPU" in capsys.readouterr().err
    monkeypatch.setattr(ext, "cuda_unusable_reason", lambda: None)
    assert ev.crf_device("auto", torch.device("cuda", 0)) == torch.device("cuda", 0)
    assert ev.crf_device("auto", torch.device("cpu")) == torch.device("cpu")
    assert ev.crf_device("cpu", torch.device("cpu")) == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ppap.PPAPError, match="^--crf-device cuda asked for"):
            ev.crf_device("cuda", torch.device("cpu"))              # no GPU here: one line naming the flag


def test_knn_table_falls_back_to_the_cpu_where_cuda_kernels_cannot_build(monkeypatch, capsys, tmp_path):
    """A GPU machine without nvcc: the kNN search runs on the CPU and says so, as the CRF does."""
    import ext
    monkeypatch.setattr(ext, "cuda_unusable_reason", lambda: "nvcc was not found")
    assert ev.kernels_on(torch.device("cuda"), "the kNN search") == torch.device("cpu")
    assert "nvcc was not found: the kNN search runs on the CPU" in capsys.readouterr().err
    asked, real = [], ev.kernels_on
    monkeypatch.setattr(ev, "kernels_on", lambda device, what: asked.append(what) or real(device, what))
    cfg = ppap.make_config({"data": "synthetic", "data_dir": str(tmp_path), "device": "cpu", "num_workers": 0,
                            "progress": False, "val_size": 32})
    ev.knn_table(cfg, "val", k=2)
    assert asked == ["the kNN search"]


# ---------------------------------------------------------------------------
# evaluations never replace a different one; their output locations are checked before any work

def test_an_evaluation_never_replaces_a_different_one(synthetic_run, tmp_path, capsys):
    run = tmp_path / "run"
    import shutil
    shutil.copytree(synthetic_run, run)
    common = ["--run", str(run), "--device", "cpu", "--num-workers", "0", "--batch-size", "3"]
    assert ev.main(common) == 0
    full = run / "eval" / "synthetic-full" / "metrics.json"
    before = full.read_bytes()
    assert ev.main(common + ["--limit", "2"]) == 0                   # a quick look after the full evaluation
    assert full.read_bytes() == before
    assert json.loads((run / "eval" / "synthetic-first2" / "metrics.json").read_text())["n_images"] == 2
    # the summary takes the complete one and says what it passed over
    capsys.readouterr()
    assert ev.main(["--summarize", str(run)]) == 0
    out = capsys.readouterr().out
    assert "skipped" in out and "first 2 val images" in out and "eval/synthetic-full" in out
    # two evaluations of the same thing at once: both finish, one complete result, no leftovers
    procs = [subprocess.Popen([PY, "eval.py", *common, "--limit", "4"], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0], [p.stderr.read()[-500:] for p in procs]
    doc = json.loads((run / "eval" / "synthetic-first4" / "metrics.json").read_text())
    assert doc["n_images"] == 4 and sorted(doc["pngs"].values()) == sorted(
        f for f in os.listdir(run / "eval" / "synthetic-first4") if f.endswith(".png"))
    assert sorted(os.listdir(run / "eval")) == ["synthetic-first2", "synthetic-first4", "synthetic-full"]
    assert full.read_bytes() == before


def test_output_locations_are_checked_before_the_work(synthetic_run, tmp_path, capsys, monkeypatch):
    def one(argv):
        rc = ev.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), err
        return err[0]
    monkeypatch.setattr(ppap, "evaluate", lambda *a, **k: pytest.fail("evaluated before the output was checked"))
    common = ["--run", str(synthetic_run), "--device", "cpu", "--num-workers", "0"]
    (tmp_path / "afile").write_text("x")
    assert "is a file" in one(common + ["--out", str(tmp_path / "afile")])
    assert "is a file" in one(["--propagation", *common, "--out", str(tmp_path / "afile")])
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    assert "holds other files" in one(common + ["--out", str(tmp_path / "mine")])
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"

    def read_only(*a, **k):
        raise OSError(30, "Read-only file system")
    monkeypatch.setattr(ev.tempfile, "mkdtemp", read_only)        # a colleague's finished run on a shared mount
    assert "Read-only file system" in one(common)


def test_a_full_disk_while_writing_leaves_the_previous_report(synthetic_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "rep"
    common = ["--run", str(synthetic_run), "--device", "cpu", "--num-workers", "0", "--limit", "3", "--out", str(out)]
    assert ev.main(common) == 0
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}

    def full(examples, names, assignment, path, **k):
        open(path, "wb").close()                                    # what a full disk leaves: a 0-byte PNG
        raise OSError(28, "No space left on device", path)
    monkeypatch.setattr(ev, "plot_examples", full)
    capsys.readouterr()
    assert ev.main(common) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if "|" not in ln and ln.strip()]   # (progress bars)
    assert len(err) == 1 and "No space left on device" in err[0] and "keeps what it held" in err[0], err
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before        # no 0-byte PNG, nothing mixed
    assert [f for f in os.listdir(tmp_path) if ".tmp" in f] == []


def test_a_run_is_scored_only_on_data_with_its_classes(synthetic_run, tmp_path, capsys):
    from PIL import Image
    folder = tmp_path / "own"
    for split in ("train", "val"):
        (folder / "imgs" / split).mkdir(parents=True)
        (folder / "labels" / split).mkdir(parents=True)
        Image.new("RGB", (64, 64), (30, 90, 200)).save(folder / "imgs" / split / "a.png")
        Image.new("L", (64, 64), 1).save(folder / "labels" / split / "a.png")
    (folder / "classes.txt").write_text("\n".join(f"c{i}" for i in range(6)) + "\n")   # 6 classes, other names
    rc = ev.main(["--run", str(synthetic_run), "--data", "folder", "--data-dir", str(folder), "--device", "cpu",
                  "--num-workers", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "are not those of folder" in err[0] and "red grain" in err[0]


def test_the_knn_table_follows_the_val_set(tmp_path):
    from PIL import Image
    folder = tmp_path / "own"
    (folder / "imgs" / "val").mkdir(parents=True)
    (folder / "imgs" / "train").mkdir(parents=True)
    (folder / "classes.txt").write_text("a\nb\n")

    def images(n):
        for i in range(n):
            Image.new("RGB", (40, 40), (20 * i, 90, 200 - 20 * i)).save(folder / "imgs" / "val" / f"{i}.png")
    images(3)
    cfg = ppap.make_config({"data": "folder", "data_dir": str(folder), "arch": "vit_tiny_demo", "val_size": 32,
                            "device": "cpu", "num_workers": 0, "progress": False})
    three = ev.knn_table(cfg, "val", k=2)
    assert torch.load(three, weights_only=True)["indices"].shape[0] == 3
    images(5)                                                        # grown: a new table, not the 3-image one
    five = ev.knn_table(cfg, "val", k=2)
    assert five != three and torch.load(five, weights_only=True)["indices"].shape[0] == 5
    for i in (3, 4):
        os.remove(folder / "imgs" / "val" / f"{i}.png")
    (folder / "imgs" / "val" / "0.png").write_bytes((folder / "imgs" / "val" / "1.png").read_bytes() + b"\0")
    changed = ev.knn_table(cfg, "val", k=2)                          # same count, a changed file: new table
    assert changed not in (three, five) and torch.load(changed, weights_only=True)["indices"].shape[0] == 3


@pytest.mark.parametrize("exc,rc,says", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB"), 2, "error: out of memory with --batch-size 8"),
    (KeyboardInterrupt(), 130, "interrupted: nothing was written"),
    (OSError(5, "Input/output error", "/mnt/nfs/x.jpg"), 2, "error: /mnt/nfs/x.jpg: Input/output error"),
], ids=["oom", "ctrl-c", "io"])
def test_an_evaluation_that_cannot_finish_is_one_line(exc, rc, says, synthetic_run, tmp_path, capsys, monkeypatch):
    def fails(*a, **k):
        raise exc
    monkeypatch.setattr(ppap, "evaluate", fails)
    assert ev.main(["--run", str(synthetic_run), "--device", "cpu", "--num-workers", "0",
                    "--out", str(tmp_path / "o")]) == rc
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith(says), err
    assert not (tmp_path / "o").exists() and not [f for f in os.listdir(tmp_path) if ".tmp" in f]

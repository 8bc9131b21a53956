"""Audit kit (issue 14): propagate's trace hook, the propagation report, the k-means diagnostic and the
audit table of the authors' released checkpoints.

    .venv/bin/python -m pytest -q tests/test_audit.py

The brute-force helpers below re-derive the method from the paper's definitions with Python loops over
anchors and samples; they share no code with ppap.PPAPLoss.propagate.
"""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import ppap
from reference_loss import propagate

COCO = dict(phi0=0.55, psi0=0.20, sigma_pos=3.0, sigma_amb=3.0)


def loss_of(**hp):
    """The loss object of these hyper-parameters (Config fields)."""
    return ppap.PPAPLoss(ppap.Config(**hp))


def _fp16(x):
    return float(torch.tensor(x, dtype=torch.float16))


def brute_force_sets(f, anchor, *, phi0, psi0, prop_iter, sigma_pos, sigma_amb, no_ambiguity=False):
    """One anchor, loops only -> per step t = 0..T a dict of Python sets 'pos', 'amb', 'neg' (anchor excluded)
    and the floats 'phi', 'psi'. Proxy v_t = normalised mean of every sample above the previous boundary,
    the anchor too when it is above it (always at t = 0); Phi_t = Phi_{t-1} - (1 - cos(v_{t-1}, v_t)) / sigma_pos, Psi_t likewise
    upwards with sigma_amb; Phi and Psi start from their fp16 roundings, P_0 uses the exact Phi_0."""
    N = len(f)
    f64 = f.double()
    v = f64[anchor]
    sims = (f64 @ v).tolist()
    inside = [j for j in range(N) if sims[j] > phi0]
    phi_used, phi, psi = phi0, _fp16(phi0), _fp16(psi0)
    steps = []

    def record():
        pos = {j for j in inside if j != anchor}
        if no_ambiguity:
            neg = {j for j in range(N) if j not in inside and j != anchor}
        else:
            neg = {j for j in range(N) if sims[j] < psi and j != anchor}
        amb = {j for j in range(N) if j != anchor and j not in pos and j not in neg}
        steps.append({"pos": pos, "amb": amb, "neg": neg, "phi": phi_used, "psi": psi})

    record()
    for _ in range(prop_iter):
        total = f64[inside].sum(0)
        v_new = total / total.norm()
        moved = 1.0 - float(v @ v_new) / float(v.norm() * v_new.norm())
        psi += moved / sigma_amb
        phi -= moved / sigma_pos
        phi_used = phi
        v = v_new
        sims = (f64 @ v).tolist()
        inside = [j for j in range(N) if sims[j] > phi]
        record()
    return steps


def cluster_features(seed=0, n_per=6, dim=6, spread=0.35):
    """Three noisy clusters of unit vectors (rows grouped by cluster) and their labels 0, 1, 2; every
    fourth row of cluster 2 is unlabelled (-1)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(dim)[:3]
    f = torch.cat([centres[c] + spread * torch.randn(n_per, dim, generator=g) for c in range(3)])
    labels = torch.arange(3).repeat_interleave(n_per)
    labels[2 * n_per::4] = -1
    return F.normalize(f, dim=1), labels


# ---------------------------------------------------------------------------
# the loss's propagate and its trace hook

def test_propagate_trace_matches_brute_force_and_leaves_results_unchanged():
    f, _ = cluster_features()
    rows = torch.tensor([0, 5, 7, 13, 17])
    for T in (0, 1, 3):
        for no_amb in (False, True):
            kw = dict(COCO, prop_iter=T, no_ambiguity=no_amb)
            plain = propagate(f, rows, **kw)
            trace = []
            traced = propagate(f, rows, trace=trace, **kw)
            for a, b in zip(plain, traced):                       # the hook changes nothing
                assert torch.equal(a, b)
            assert len(trace) == T + 1
            assert torch.equal(trace[-1]["pos"], plain[0]) and torch.equal(trace[-1]["neg"], plain[1])
            for i, r in enumerate(rows.tolist()):
                ref = brute_force_sets(f, r, **kw)
                for t in range(T + 1):
                    st = trace[t]
                    pos = set(torch.nonzero(st["pos"][i]).flatten().tolist())
                    neg = set(torch.nonzero(st["neg"][i]).flatten().tolist())
                    assert pos == ref[t]["pos"] and neg == ref[t]["neg"], (T, no_amb, r, t)
                    assert st["phi"][i, 0].item() == pytest.approx(ref[t]["phi"], abs=1e-6)
                    assert st["psi"][i, 0].item() == pytest.approx(ref[t]["psi"], abs=1e-6)
                    assert st["sim"].shape == (len(rows), len(f))


def test_the_loss_does_not_use_the_hook(monkeypatch):
    """Training passes no trace to propagate."""
    traces, real = [], ppap.PPAPLoss.propagate
    monkeypatch.setattr(ppap.PPAPLoss, "propagate", lambda self, f, rows, trace=None: traces.append(trace)
                        or real(self, f, rows, trace))
    f, _ = cluster_features()
    z = F.normalize(torch.randn(len(f), 5, generator=torch.Generator().manual_seed(1)), dim=1)
    loss_of(group=len(f), trainpatchsplit=6, tau=0.8, prop_iter=2, **COCO)(z, f, torch.Generator().manual_seed(0))
    assert traces == [None]


# ---------------------------------------------------------------------------
# k-means diagnostic

import eval as ev  # noqa: E402


class CodeIsTheClass(torch.nn.Module):
    """A stand-in model whose code at each 8x8 patch is the one-hot class written in the image's first
    channel (plus a fixed small perturbation): perfectly separable code."""

    def __init__(self, n_classes=3):
        super().__init__()
        self.patch_size, self.n_classes = 8, n_classes
        self.cluster_probe = ppap.ClusterProbe(n_classes, n_classes)
        self.linear_probe = torch.nn.Conv2d(n_classes, n_classes, 1)

    def forward(self, x):
        cls = x[:, 0].round().long().clamp(0, self.n_classes - 1)
        onehot = F.one_hot(cls, self.n_classes).permute(0, 3, 1, 2).float()
        code = F.avg_pool2d(onehot, 8) + 0.05 * torch.sin(torch.arange(self.n_classes) + 1.0)[None, :, None, None]
        return {"code": code}


def separable_loader(n_images=4, size=32, n_classes=3):
    """Image i is all class i % n_classes (one class per image, so the bilinear upsampling of the code never
    blends two classes); its first two rows are unlabelled."""
    items = []
    for i in range(n_images):
        label = torch.full((size, size), i % n_classes)
        img = torch.zeros(3, size, size)
        img[0] = label.float()
        label[:2, :] = -1
        items.append({"img": img, "label": label})
    return torch.utils.data.DataLoader(items, batch_size=2)


def test_spherical_kmeans_separable_and_deterministic():
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(4, 8, generator=g), dim=1)
    truth = torch.arange(4).repeat(30)
    x = centres[truth] + 0.05 * torch.randn(120, 8, generator=g)
    c1, inertia1, _ = ev.spherical_kmeans(x, 4, restarts=3, seed=0)
    c2, inertia2, _ = ev.spherical_kmeans(x, 4, restarts=3, seed=0)
    assert torch.equal(c1, c2) and inertia1 == inertia2                   # same call, same bits
    assert torch.allclose(c1.norm(dim=1), torch.ones(4))
    pred = (F.normalize(x, dim=1) @ c1.T).argmax(1)
    s = ev.scores(ev.confusion_update(None, pred, truth, 4), hungarian=True)
    assert s["mIoU"] == 100.0 and s["Acc"] == 100.0
    # the inertia is the sum of 1 - cos to the closest centroid
    assert inertia1 == pytest.approx(float((1 - (F.normalize(x, dim=1) @ c1.T).max(1).values).sum()), rel=1e-6)
    with pytest.raises(ppap.PPAPError):
        ev.spherical_kmeans(x[:3], 4)


def test_kmeans_probe_scores_separable_code_perfectly_and_repeatably():
    model = CodeIsTheClass()
    loader = separable_loader(n_images=6)
    c1, info = ev.fit_kmeans(model, loader, "cpu", restarts=2, samples=20, progress=False)
    c2, _ = ev.fit_kmeans(model, loader, "cpu", restarts=2, samples=20, progress=False)
    assert torch.equal(c1, c2)
    assert info["samples"] == 6 * 4 and info["k"] == 3 and info["restarts"] == 2   # ceil(20 / 6) per image
    res = ev.evaluate_model(model, loader, "cpu", kmeans_centroids=c1, progress=False)
    assert res["kmeans_mIoU"] == 100.0 and res["kmeans_Acc"] == 100.0
    assert len(res["kmeans_confusion"][0]) == 3                            # K = n_classes columns
    assert sum(map(sum, res["kmeans_confusion"])) == 6 * 30 * 32                 # ignored pixels not counted
    again = ev.evaluate_model(model, loader, "cpu", kmeans_centroids=c2, progress=False)
    assert again["kmeans_confusion"] == res["kmeans_confusion"]


# ---------------------------------------------------------------------------
# on a short synthetic run (two training steps)

import json  # noqa: E402


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "syn"
    argv = ["--data", "synthetic", "--max-steps", "2", "--batch-size", "4", "--val-limit", "2", "--val-every", "0",
            "--no-progress", "--device", "cpu", "--num-workers", "0", "--run", str(run)]
    with torch.random.fork_rng(devices=[]):
        assert ppap.main(argv) == 0
    return run


def test_kmeans_cli_next_to_the_cluster_probe(short_run, tmp_path, capsys):
    argv = ["--run", str(short_run), "--limit", "4", "--batch-size", "4", "--device", "cpu", "--num-workers", "0",
            "--n-examples", "0", "--kmeans", "--kmeans-restarts", "2", "--kmeans-samples", "300"]
    assert ev.main(argv + ["--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "kmeans" in out and "k-means: K = 6, 2 restarts" in out
    doc = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert set(doc["metrics"]) == {"cluster", "linear", "kmeans"}
    assert doc["summary"]["kmeans/mIoU"] == doc["metrics"]["kmeans"]["mIoU"]
    assert doc["kmeans"]["samples"] == 4 * 75 and doc["kmeans"]["k"] == 6
    assert "confusion_kmeans.png" in doc["pngs"].values()
    assert ev.main(argv + ["--out", str(tmp_path / "b")]) == 0             # another call, the same numbers
    again = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert again["metrics"]["kmeans"]["confusion"] == doc["metrics"]["kmeans"]["confusion"]
    assert ev.main(["--summarize", str(short_run), "--kmeans"]) == 2        # only with --run / --official


# ---------------------------------------------------------------------------
# the audit table on fake released checkpoints

from test_eval import _authors_format, _random_model  # noqa: E402


def _fake_tree(tmp_path):
    """checkpoints.tsv as download.sh writes it, with synthetic-data rows (test only) next to a real one:
    a present fake authors' checkpoint, a missing file, a present file whose data is missing (junk bytes:
    the data check comes before loading) and a corrupt checkpoint."""
    ck = tmp_path / "ck"
    ck.mkdir()
    torch.save(_authors_format(_random_model("vit_tiny_demo", 6, seed=11)), ck / "fake_synthetic.pth")
    (ck / "ppap_cocostuff_vits16.pth").write_bytes(b"not read: the data is missing")
    (ck / "broken_synthetic.pth").write_text("truncated")
    rows = [("name", "file_id", "dataset", "arch", "patch"),
            ("fake_synthetic.pth", "id-a", "synthetic", "vit_tiny_demo", "8"),
            ("absent_synthetic.pth", "id-b", "synthetic", "vit_tiny_demo", "8"),
            ("ppap_cocostuff_vits16.pth", "1U6fsOnZJev5gj6LTjtb8x1iPjzjy1nOX", "cocostuff", "vit_small", "16"),
            ("broken_synthetic.pth", "id-c", "synthetic", "vit_tiny_demo", "8")]
    (ck / "checkpoints.tsv").write_text("".join("\t".join(r) + "\n" for r in rows))
    return ck


def test_audit_table_on_fake_checkpoints(tmp_path, capsys, monkeypatch):
    ck = _fake_tree(tmp_path)
    nodata, out = tmp_path / "nodata", tmp_path / "audit"
    monkeypatch.setitem(ev.PAPER_NUMBERS, ("synthetic", "vit_tiny_demo", 8),
                        {"numbers": {"cluster/mIoU": 12.3}, "source": "a test entry"})
    common = ["--limit", "4", "--batch-size", "4", "--device", "cpu", "--num-workers", "0", "--n-examples", "0"]
    rc = ev.main(["--audit", "--checkpoints", str(ck), "--data-dir", str(nodata), "--out", str(out)] + common)
    printed = capsys.readouterr().out
    assert rc == 1                                              # the corrupt checkpoint is an error row
    doc = json.loads((out / "audit.json").read_text())
    by = {r["name"]: r for r in doc["rows"]}
    assert [r["name"] for r in doc["rows"]] == ["fake_synthetic.pth", "absent_synthetic.pth",
                                                 "ppap_cocostuff_vits16.pth", "broken_synthetic.pth"]
    assert by["absent_synthetic.pth"]["status"] == "skipped"
    assert by["absent_synthetic.pth"]["reason"] == f"file missing — run: bash download.sh checkpoints {ck}"
    coco = by["ppap_cocostuff_vits16.pth"]
    assert coco["status"] == "skipped" and f"run: bash download.sh cocostuff {nodata}" in coco["reason"]
    assert coco["paper"] == {"cluster/mIoU": 26.5}              # the one number the project knows
    assert by["broken_synthetic.pth"]["status"] == "error" and "cannot read checkpoint" in by["broken_synthetic.pth"]["reason"]
    good = by["fake_synthetic.pth"]
    assert good["status"] == "evaluated" and good["n_images"] == 4 and doc["limit"] == 4 and doc["crf"] is False
    assert set(good["measured"]) == {"cluster", "linear"} and good["paper"] == {"cluster/mIoU": 12.3}
    for line in ("skip absent_synthetic.pth: file missing", "skip ppap_cocostuff_vits16.pth: cocostuff val data missing"):
        assert line in printed
    # the numbers are those of `eval.py --official` on the same file (the same evaluation path)
    assert ev.main(["--official", str(ck / "fake_synthetic.pth"), "--arch", "vit_tiny_demo", "--data", "synthetic",
                    "--out", str(tmp_path / "one")] + common) == 0
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    for p in ("cluster", "linear"):
        assert good["measured"][p] == {"Acc": one["metrics"][p]["Acc"], "mIoU": one["metrics"][p]["mIoU"]}
    assert json.loads((out / "fake_synthetic" / "metrics.json").read_text())["kind"] == "official"
    # the Markdown table: measured cells, the paper cell with its source mark, empty cells where unknown
    md = (out / "audit.md").read_text()
    head = next(l for l in md.splitlines() if l.startswith("| checkpoint"))
    cols = [c.strip() for c in head.strip("|").split("|")]
    assert cols == ["checkpoint", "data", "backbone", "val images", "unsup. Acc", "unsup. mIoU", "linear Acc",
                    "linear mIoU", "paper unsup. Acc", "paper unsup. mIoU", "paper linear Acc", "paper linear mIoU"]
    row = next(l for l in md.splitlines() if l.startswith("| `fake_synthetic.pth`"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:4] == ["`fake_synthetic.pth`", "synthetic", "vit_tiny_demo/8", "4"]
    assert cells[5] == f"{one['metrics']['cluster']['mIoU']:.2f}"
    assert cells[8:] == ["", "12.3 [1]", "", ""]
    assert "[1] a test entry" in md and "Only the first 4 val images" in md
    assert "- `absent_synthetic.pth` (synthetic, vit_tiny_demo/8): skipped: file missing" in md
    assert "- `broken_synthetic.pth` (synthetic, vit_tiny_demo/8): error: " in md


def test_audit_errors_are_one_line(tmp_path, capsys):
    rc = ev.main(["--audit", "--checkpoints", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0] == f"error: no {tmp_path / 'checkpoints.tsv'} — run: bash download.sh checkpoints {tmp_path}"
    (tmp_path / "checkpoints.tsv").write_text("name\tdataset\nx\ty\n")
    assert ev.main(["--audit", "--checkpoints", str(tmp_path)]) == 2
    assert "expected the header" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# propagation report

import numpy as np  # noqa: E402


def test_patch_labels_majority_rule():
    lab = torch.tensor([[[3, 3, 3, -1, 1, 1, 1, 1],
                         [3, 3, -1, -1, 1, 1, 1, 1],
                         [5, 3, 0, 0, 2, 2, 1, 1],      # 5 >= n_classes: an unlabelled pixel
                         [3, 3, 0, 4, 2, 2, 1, 1]]])
    # p = 2: patch (i, j) is rows 2i, 2i+1 and columns 2j, 2j+1
    assert ev.patch_labels(lab, 2, 5)[0].tolist() == [
        [3, -1, 1, 1],      # (0,1): one pixel of class 3, three unlabelled -> no label
        [3, 0, 2, 1]]       # (1,0): 3 of 4 pixels class 3 (one unlabelled); (1,1): 3 of 4 class 0
    # p = 4: the left patch has 8 of 16 pixels of class 3, not more than half -> no label; right: 12 of 16 class 1
    assert ev.patch_labels(lab, 4, 5)[0].tolist() == [[-1, 1]]
    tie = torch.tensor([[[1, 1], [2, 2]]])
    assert ev.patch_labels(tie, 2, 3)[0].tolist() == [[-1]]


def brute_force_sums(f, labels, anchors, **kw):
    """PROP_SUMS from brute_force_sets and Python loops over the labels."""
    T = kw["prop_iter"]
    out = {k: [0.0] * (T + 1) for k in ev.PROP_SUMS}
    labels = labels.tolist()
    for a in anchors:
        la = labels[a]
        for t, st in enumerate(brute_force_sets(f, a, **kw)):
            o = out
            o["anchors"][t] += 1
            o["labelled_anchors"][t] += la >= 0
            o["no_positive"][t] += not st["pos"]
            o["phi"][t] += st["phi"]
            o["psi"][t] += st["psi"]
            for key, members in (("pos", st["pos"]), ("amb", st["amb"]), ("neg", st["neg"])):
                o[key][t] += len(members)
                lab = [j for j in members if la >= 0 and labels[j] >= 0]
                o[key + "_labelled"][t] += len(lab)
                if key == "neg":
                    o["neg_diff"][t] += sum(labels[j] != la for j in lab)
                else:
                    o[key + "_same"][t] += sum(labels[j] == la for j in lab)
            others = [j for j in range(len(labels)) if j != a and la >= 0 and labels[j] >= 0]
            o["pairs_labelled"][t] += len(others)
            o["pairs_same"][t] += sum(labels[j] == la for j in others)
    return out


def test_propagation_statistics_by_hand():
    """test_loss's hand-built batch: cosines to the anchor e1 are 0.9, 0.9, 0.4, 0.0, 0.0, 0.1, 0.3, so with
    Phi0 = 0.55, Psi0 = 0.2: positives {1, 2}, ambiguous {3, 7}, negatives {4, 5, 6}."""
    from test_loss import hand_features
    f = hand_features()
    labels = torch.tensor([0, 0, 1, 0, 1, 2, -1, 0])
    sums = ev.propagation_sums(f, labels, torch.tensor([0]), loss_of(prop_iter=0, **COCO))
    got = {k: v[0].item() for k, v in sums.items()}
    assert got == {"anchors": 1, "labelled_anchors": 1, "no_positive": 0,
                   "pos": 2, "pos_labelled": 2, "pos_same": 1,               # 1 (class 0) yes, 2 (class 1) no
                   "amb": 2, "amb_labelled": 2, "amb_same": 2,               # 3 and 7 are class 0
                   "neg": 3, "neg_labelled": 2, "neg_diff": 2,               # 6 has no label
                   "phi": pytest.approx(0.55), "psi": pytest.approx(_fp16(0.2)),
                   "pairs_labelled": 6, "pairs_same": 3}                     # 1..7 but 6; 1, 3, 7 share class 0
    summary = ev.propagation_summary(sums)
    assert summary["chance_purity"] == 50.0
    assert summary["steps"] == [{"t": 0, "phi": pytest.approx(0.55), "psi": pytest.approx(_fp16(0.2)),
                                 "positives": 2.0, "positive_purity": 50.0, "ambiguous": 2.0,
                                 "ambiguous_purity": 100.0, "negatives": 3.0, "negative_purity": 100.0,
                                 "no_positive_anchors": 0.0}]
    # an unlabelled anchor counts in the set sizes but in no purity
    sums = ev.propagation_sums(f, torch.tensor([-1, 0, 1, 0, 1, 2, -1, 0]), torch.tensor([0]),
                               loss_of(prop_iter=0, **COCO))
    assert sums["pos"][0] == 2 and sums["pos_labelled"][0] == 0 and sums["pairs_labelled"][0] == 0
    assert ev.propagation_summary(sums)["steps"][0]["positive_purity"] is None


@pytest.mark.parametrize("no_ambiguity", [False, True])
def test_propagation_statistics_equal_brute_force_with_propagation(no_ambiguity):
    f, labels = cluster_features(seed=3)
    anchors = [0, 4, 7, 11, 12, 14, 16]                    # 12 and 16 are unlabelled
    kw = dict(COCO, prop_iter=3, no_ambiguity=no_ambiguity)
    want = brute_force_sums(f, labels, anchors, **kw)
    for chunk in (2 ** 24, 2 * len(f)):                     # one chunk, and two anchors per chunk
        got = ev.propagation_sums(f, labels, torch.tensor(anchors), loss_of(**kw), chunk_elems=chunk)
        for k in ev.PROP_SUMS:
            assert got[k].tolist() == pytest.approx(want[k], abs=1e-5), k
    # the sets do change with t here (the test is about propagation, not only t = 0)
    assert len({tuple(map(float, (got["pos"][t], got["amb"][t], got["neg"][t]))) for t in range(4)}) > 1


def _majority_labels(label, p):
    """PATCH_LABEL_RULE with numpy loops."""
    B, H, W = label.shape
    out = np.full((B, H // p, W // p), -1)
    for b in range(B):
        for i in range(H // p):
            for j in range(W // p):
                px = label[b, i * p:(i + 1) * p, j * p:(j + 1) * p].reshape(-1)
                px = px[px >= 0]
                if px.size:
                    counts = np.bincount(px)
                    if 2 * counts.max() > p * p:
                        out[b, i, j] = counts.argmax()
    return out


def _labels_the_vit_sees(label, p):
    """The pixel labels at the size the ViT sees, with Python arithmetic: each side rounded to the nearest
    multiple of p (halves up), each new pixel the label of the old pixel under its centre."""
    B, H, W = label.shape
    Hs, Ws = p * int(H / p + 0.5), p * int(W / p + 0.5)
    ys = [int((y + 0.5) * H / Hs) for y in range(Hs)]
    xs = [int((x + 0.5) * W / Ws) for x in range(Ws)]
    return label[:, ys][:, :, xs]


@pytest.mark.parametrize("p,size", [(14, 320), (14, 224), (14, 300), (8, 320), (16, 320), (16, 330)])
def test_patch_labels_follow_the_grid_the_backbone_sees(p, size):
    """At patch 14 the ViT sees 320 px as 322 (23 x 23 patches): the labels are cut on that grid, not on 22 x 22."""
    g = torch.Generator().manual_seed(p + size)
    coarse = torch.randint(-1, 4, (2, size // 20 + 1, size // 20 + 1), generator=g)   # blobs of ~20 px, some unlabelled
    label = coarse.repeat_interleave(20, 1).repeat_interleave(20, 2)[:, :size, :size - 4].numpy()
    got = ev.patch_labels(torch.from_numpy(label), p, 4)
    assert got.shape == (2, ppap.patch_grid(size, p), ppap.patch_grid(size - 4, p))
    assert got.tolist() == _majority_labels(_labels_the_vit_sees(label, p), p).tolist()
    if size % p == 0 and (size - 4) % p == 0:            # a multiple: the val crop itself, as before
        assert got.tolist() == _majority_labels(label, p).tolist()


@pytest.fixture
def small_dinov2(monkeypatch, tmp_path):
    """`--arch dinov2_vits14` as a 2-block, 64-wide DINOv2 ViT (the same class, released key format) and a
    weights file for it: the registry entry is what a run records and eval.py rebuilds."""
    from test_dinov2 import released_state_dict, small_model
    spec = ppap.BACKBONES["dinov2_vits14"]
    monkeypatch.setitem(ppap.BACKBONES, "dinov2_vits14",
                        dataclasses.replace(spec, build=lambda patch: small_model(0, 0.1, False)))
    path = tmp_path / "dinov2_small.pth"
    torch.save(released_state_dict(64, 2, 0, seed=8), path)
    return str(path)


def test_propagation_report_on_a_dinov2_run_validated_at_320_px(small_dinov2, tmp_path, capsys):
    """The issue's repro: a DINOv2 run validated at 320 px; before the fix the labels were cut 22 x 22 (1936 per
    batch of 4) against 23 x 23 features (2116)."""
    run = tmp_path / "R"
    assert ppap.main(["--data", "synthetic", "--arch", "dinov2_vits14", "--weights", small_dinov2, "--max-steps", "1",
                      "--batch-size", "16", "--img-size", "112", "--val-size", "320", "--val-limit", "4",
                      "--val-every", "0", "--run", str(run), "--device", "cpu", "--no-progress",
                      "--num-workers", "0"]) == 0
    out = tmp_path / "prop"
    assert ev.main(["--propagation", "--run", str(run), "--limit", "4", "--batch-size", "4", "--device", "cpu",
                    "--num-workers", "0", "--out", str(out)]) == 0
    doc = json.loads((out / "propagation.json").read_text())
    assert doc["grid"] == [23, 23] and doc["n_images"] == 4 and doc["n_labelled_anchors"] > 0
    sums = doc["feature_sets"]["criterion"]["sums"]
    assert sums["pairs_labelled"][0] > 0 and (out / "propagation.png").exists()
    capsys.readouterr()


def test_propagation_report_on_a_short_run(short_run, tmp_path, capsys):
    from PIL import Image
    out = tmp_path / "prop"
    rc = ev.main(["--propagation", "--run", str(short_run), "--limit", "8", "--batch-size", "4", "--device", "cpu",
                  "--num-workers", "0", "--anchors-seed", "3", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0 and "[criterion]" in printed and "[z]" in printed and "Phi_t" in printed
    doc = json.loads((out / "propagation.json").read_text())
    im = Image.open(out / doc["figure"])
    assert im.format == "PNG" and im.width > 4 * 120 and im.height > 2 * 120
    assert doc["n_images"] == 8 and doc["batches"] == 2 and doc["grid"] == [14, 14] and doc["kind"] == "run"
    assert doc["hyper"] == {"phi0": 0.75, "psi0": 0.35, "prop_iter": 2, "sigma_pos": 3.0, "sigma_amb": 3.0,
                            "tau": 0.8, "trainpatchsplit": 16, "group": 784,
                            "no_ambiguity": False}                   # the run's config (the synthetic preset)
    assert doc["anchors_per_group"] == 49 and doc["n_anchors"] == 2 * 49
    assert "eval" in doc["mode"] and "same for every run" in doc["feature_sets"]["criterion"]["description"]
    # brute force from the same model, images and anchors
    model, cfg, _ = ppap.load_run(str(short_run))
    model.eval()
    ds = ppap.SyntheticDataset("val", cfg.val_size)
    g = torch.Generator().manual_seed(3)
    kw = {k: doc["hyper"][k] for k in ("phi0", "psi0", "prop_iter", "sigma_pos", "sigma_amb", "no_ambiguity")}
    want = {"criterion": None, "z": None}
    for start in (0, 4):
        items = [ds[i] for i in range(start, start + 4)]
        img = torch.stack([it["img"] for it in items])
        label = torch.stack([it["label"] for it in items]).numpy()
        with torch.no_grad():
            o = model(img)
        N = img.shape[0] * 14 * 14
        anchors = ppap.draw_anchors(N, 784, 49, generator=g)
        rows = (anchors + torch.arange(anchors.shape[0])[:, None] * 784).reshape(-1).tolist()
        labels = torch.from_numpy(_majority_labels(label, 8).reshape(-1))
        assert torch.equal(ev.patch_labels(torch.from_numpy(label), 8, 6).reshape(-1), labels)
        feats = {"criterion": F.normalize(o["crit"].permute(0, 2, 3, 1).reshape(N, -1), dim=1), "z": o["z"]}
        for name, f in feats.items():
            bf = brute_force_sums(f, labels, rows, **kw)
            want[name] = bf if want[name] is None else {k: [a + b for a, b in zip(want[name][k], bf[k])] for k in bf}
    for name in want:
        got = doc["feature_sets"][name]["sums"]
        for k in ev.PROP_SUMS:
            # float32 (the loss) against float64 (here): a pair right at a boundary may flip; none did when
            # this was written, and a flip moves a sum by 1 in thousands
            assert got[k] == pytest.approx(want[name][k], rel=1e-3, abs=1e-4), (name, k)
        summary = ev.propagation_summary({k: torch.tensor(v, dtype=torch.float64) for k, v in got.items()})
        assert doc["feature_sets"][name]["steps"] == summary["steps"]
        assert len(doc["feature_sets"][name]["steps"]) == 3


def test_propagation_report_official_uses_the_preset(tmp_path, capsys):
    path = tmp_path / "authors.pth"
    torch.save(_authors_format(_random_model("vit_tiny_demo", 6, seed=12)), path)
    common = ["--official", str(path), "--arch", "vit_tiny_demo", "--data", "synthetic", "--limit", "4",
              "--device", "cpu", "--num-workers", "0"]
    assert ev.main(["--propagation", "--batch-size", "4", "--out", str(tmp_path / "p")] + common) == 0
    doc = json.loads((tmp_path / "p" / "propagation.json").read_text())
    preset = ppap.PRESETS[("synthetic", "vit_tiny_demo", 8)]
    assert {k: doc["hyper"][k] for k in ("phi0", "psi0", "prop_iter")} == \
        {k: preset[k] for k in ("phi0", "psi0", "prop_iter")}
    assert "preset" in doc["hyper_source"] and doc["kind"] == "official"
    capsys.readouterr()

    def one_error(argv):
        assert ev.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ")
        return err[0]
    assert "raise --batch-size" in one_error(["--propagation", "--batch-size", "2"] + common)   # 392 < 784 rows
    assert "unrecognized arguments: --propagation" in one_error(["--summarize", "x", "--propagation"])

"""The Phi_0/Psi_0 threshold sweep (issue 22): its counts against brute force, the grid, the similarity quantiles,
the sweep from a weights file without a run, its agreement with the propagation report, and the one-line
threshold note of runs whose thresholds were tuned for another backbone or dataset.

    .venv/bin/python -m pytest -q tests/test_sweep.py
"""
import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

import eval as ev
import ppap
from test_audit import COCO, brute_force_sums, cluster_features, short_run, small_dinov2  # noqa: F401 (fixtures)
from test_loss import hand_features


def _cfg(**kw):
    return ppap.Config(**{**COCO, **kw})


def _criteria(cfg, grid):
    return [ppap.build_loss(dataclasses.replace(cfg, phi0=r["phi0"], psi0=r["psi0"])) for r in grid]


# ---------------------------------------------------------------------------
# the counts

def test_sweep_counts_on_the_hand_built_batch():
    """test_loss's hand-built batch, anchor 0 (label 0); cosines to it 0.9, 0.9, 0.4, 0.0, 0.0, 0.1, 0.3 for rows
    1..7 with labels 0, 1, 0, 1, 2, -1, 0. T = 0, Psi0 = Phi0 - 0.3."""
    f, labels = hand_features(), torch.tensor([0, 0, 1, 0, 1, 2, -1, 0])
    cfg = _cfg(prop_iter=0)
    grid = ev.sweep_grid(cfg, [0.35, 0.55, 0.95], [0.3])
    assert [(r["phi0"], r["psi0"], r["preset"]) for r in grid] == [
        (0.35, 0.05, False), (0.55, 0.25, False), (0.95, 0.65, False), (0.55, 0.2, True)]   # preset: gap 0.35
    got = ev.sweep_sums(f, labels, torch.tensor([0]), _criteria(cfg, grid))
    counts = [{k: int(v[0]) for k, v in g["all"].items() if k in ("pos", "pos_same", "amb", "amb_labelled", "amb_same",
                                                                 "neg", "neg_labelled", "neg_diff", "no_positive")}
              for g in got]
    assert counts == [
        # Phi0 0.35: positives 1, 2, 3 (1 and 3 share label 0); ambiguous 6 (no label), 7 (label 0); negatives 4, 5
        dict(pos=3, pos_same=2, amb=2, amb_labelled=1, amb_same=1, neg=2, neg_labelled=2, neg_diff=2, no_positive=0),
        # Phi0 0.55, Psi0 0.25: positives 1, 2; ambiguous 3, 7 (both label 0); negatives 4, 5, 6
        dict(pos=2, pos_same=1, amb=2, amb_labelled=2, amb_same=2, neg=3, neg_labelled=2, neg_diff=2, no_positive=0),
        # Phi0 0.95: no positive; ambiguous 1, 2 (0.9 >= 0.65); negatives 3..7
        dict(pos=0, pos_same=0, amb=2, amb_labelled=2, amb_same=1, neg=5, neg_labelled=4, neg_diff=2, no_positive=1),
        # the preset (0.55, 0.2): as in test_propagation_statistics_by_hand
        dict(pos=2, pos_same=1, amb=2, amb_labelled=2, amb_same=2, neg=3, neg_labelled=2, neg_diff=2, no_positive=0)]
    rows = [ev.sweep_row(g["all"]) for g in got]
    assert rows[0]["positive_share"] == rows[0]["positive_share_t0"] == 100 * 3 / 8      # of the batch's 8 rows
    assert rows[0]["ambiguous_share"] == 100 * 2 / 8 and rows[2]["no_positive"] == 100.0
    assert rows[1]["positive_purity"] == 50.0 and rows[1]["ambiguous_purity"] == 100.0
    assert rows[2]["positive_purity"] is None and rows[0]["chance_purity"] == 50.0          # 1, 3, 7 of 1..7 but 6


@pytest.mark.parametrize("no_ambiguity", [False, True])
def test_sweep_counts_equal_brute_force_per_row_and_per_class(no_ambiguity):
    f, labels = cluster_features(seed=3)
    anchors = [0, 4, 7, 11, 12, 14, 16]                      # 12 and 16 are unlabelled
    cfg = _cfg(prop_iter=3, no_ambiguity=no_ambiguity)
    grid = ev.sweep_grid(cfg, [0.3, 0.5, 0.7, 0.9], [0.2, 0.45])
    got = ev.sweep_sums(f, labels, torch.tensor(anchors), _criteria(cfg, grid), per_class=True)
    assert len(got) == len(grid) == 9
    for row, g in zip(grid, got):
        kw = dict(phi0=row["phi0"], psi0=row["psi0"], prop_iter=3, sigma_pos=3.0, sigma_amb=3.0,
                  no_ambiguity=no_ambiguity)
        want = brute_force_sums(f, labels, anchors, **kw)
        for k in ev.PROP_SUMS:
            assert g["all"][k].tolist() == pytest.approx(want[k], abs=1e-5), (row, k)
        assert g["all"]["pos_share"].tolist() == pytest.approx([v / len(f) for v in want["pos"]])
        assert set(g["by_class"]) == {-1, 0, 1, 2}
        for c, sums in g["by_class"].items():
            mine = [a for a in anchors if int(labels[a]) == c]
            want_c = brute_force_sums(f, labels, mine, **kw)
            for k in ev.PROP_SUMS:
                assert sums[k].tolist() == pytest.approx(want_c[k], abs=1e-5), (row, c, k)
    # the rows differ (the sweep is about thresholds, not one set repeated)
    assert len({tuple(g["all"]["pos"].tolist()) for g in got}) > 3


def test_grid_flags_and_the_preset_row():
    assert ev.float_list("0.3:0.95:0.05") == [0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9,
                                              0.95]
    assert ev.float_list("0.6,0.5,0.5") == [0.5, 0.6] and ev.float_list("0.35") == [0.35]
    for bad in ("a,b", "0.3:0.9:0", "nan", ""):
        with pytest.raises(Exception, match="expected|step"):
            ev.float_list(bad)
    cfg = ppap.Config(phi0=0.123456, psi0=0.01)                # the preset's values are kept exactly
    grid = ev.sweep_grid(cfg, [0.1, 0.2], [0.1])
    preset = [r for r in grid if r["preset"]]
    assert len(preset) == 1 and (preset[0]["phi0"], preset[0]["psi0"]) == (0.123456, 0.01)
    grid = ev.sweep_grid(ppap.Config(), [0.5, 0.55], [0.35])  # the preset pair is a grid pair: one row
    assert [(r["phi0"], r["psi0"], r["preset"]) for r in grid] == [(0.5, 0.15, False), (0.55, 0.2, True)]


def test_similarity_quantiles_against_brute_force():
    g = torch.Generator().manual_seed(0)
    f = F.normalize(torch.randn(300, 8, generator=g) + torch.tensor([1.5] + [0.0] * 7), dim=1)
    rows = torch.tensor([0, 17, 150, 299])
    hist = ev.similarity_histogram(f, rows, chunk_elems=700)  # two anchors per chunk
    f64 = f.double()
    sims = torch.cat([torch.cat([f64[r] @ f64[:r].T, f64[r] @ f64[r + 1:].T]) for r in rows.tolist()])
    assert hist.sum() == len(rows) * (len(f) - 1)
    ref = torch.histc(sims, bins=ev.SIM_BINS, min=-1, max=1)
    assert (hist - ref).abs().sum() <= 4           # float32 against float64: a value on a bin edge may move
    q = ev.histogram_quantiles(hist)
    ordered = sims.sort().values
    for p in ev.SIM_QUANTILES:
        # the k-th smallest value, k = ceil(p n), lies in the bin the quantile is read from
        kth = float(ordered[max(1, math.ceil(p * len(sims))) - 1])
        assert abs(q[f"q{round(100 * p)}"] - kth) <= 2 / ev.SIM_BINS + 1e-9, p
    assert q["q50"] == pytest.approx(float(sims.median()), abs=0.01)
    assert ev.histogram_quantiles(torch.zeros(10))["q50"] is None


# ---------------------------------------------------------------------------
# end to end

def test_sweep_from_a_weights_file_without_a_run(small_dinov2, tmp_path, capsys):
    """The issue's acceptance: a DINOv2 backbone from --weights, no run directory, labelled val data; at 320 px
    the ViT sees 23 x 23 patches."""
    out = tmp_path / "sweep"
    argv = ["--propagation", "--sweep", "--data", "synthetic", "--arch", "dinov2_vits14", "--weights", small_dinov2,
            "--size", "320", "--limit", "4", "--batch-size", "4", "--phi0-grid", "0.5:0.9:0.2", "--per-class",
            "--device", "cpu", "--num-workers", "0", "--out", str(out)]
    assert ev.main(argv) == 0
    printed = capsys.readouterr().out
    doc = json.loads((out / "sweep.json").read_text())
    assert doc["kind"] == "backbone" and doc["backbone"] == "dinov2_vits14/14" and doc["grid"] == [23, 23]
    assert doc["weights"] == f"weights {small_dinov2}" and doc["val_size"] == 320 and doc["n_images"] == 4
    # the demo's thresholds, borrowed by DINOv2 (its own row is missing): marked, and the note says so
    assert doc["preset"]["row"] == ["synthetic", "vit_tiny_demo", 8] and not doc["preset"]["own_row"]
    assert "not for dinov2_vits14/14 on synthetic" in doc["preset"]["note"]
    assert [(r["phi0"], r["psi0"], r["preset"]) for r in doc["rows"]] == [
        (0.5, 0.1, False), (0.7, 0.3, False), (0.75, 0.35, True), (0.9, 0.5, False)]
    for r in doc["rows"]:
        assert r["anchors"] == doc["n_anchors"] == 2 * 49         # 4 x 529 patches: two groups of 784
        assert 0 <= r["positive_share"] <= 100 and r["positive_purity"] is not None
    assert [r["positive_share_t0"] for r in doc["rows"]] == sorted((r["positive_share_t0"] for r in doc["rows"]),
                                                                   reverse=True)   # a higher Phi0, fewer positives
    assert set(doc["similarity_quantiles"]) == {"q1", "q10", "q25", "q50", "q75", "q90", "q95", "q99"}
    assert set(doc["by_class"]) <= {str(c) for c in range(-1, 6)}
    md = (out / "sweep.md").read_text()
    assert "| **0.75** preset | 0.35 |" in md and "| Phi0 | Psi0 | positives t=0 |" in md and md.strip() in printed
    from PIL import Image
    im = Image.open(out / "sweep.png")
    assert im.format == "PNG" and im.width >= 800


def test_the_preset_row_is_the_propagation_reports_criterion(short_run, tmp_path, capsys):  # noqa: F811
    """Same run, images, batches and anchor seed: the sweep's preset row counts what the propagation report counts
    on the criterion features (the sweep takes them from the backbone alone)."""
    common = ["--run", str(short_run), "--limit", "8", "--batch-size", "4", "--device", "cpu", "--num-workers", "0",
              "--anchors-seed", "5"]
    assert ev.main(["--propagation"] + common + ["--out", str(tmp_path / "p")]) == 0
    assert ev.main(["--sweep", "--phi0-grid", "0.6,0.9"] + common + ["--out", str(tmp_path / "s")]) == 0
    capsys.readouterr()
    report = json.loads((tmp_path / "p" / "propagation.json").read_text())["feature_sets"]["criterion"]["sums"]
    sweep = json.loads((tmp_path / "s" / "sweep.json").read_text())
    preset = next(r for r in sweep["rows"] if r["preset"])
    assert (preset["phi0"], preset["psi0"]) == (0.75, 0.35) and sweep["thresholds_from"] == "the run's config"
    for k in ev.PROP_SUMS:
        assert preset["sums"][k] == pytest.approx(report[k], abs=1e-6), k


def test_sweep_of_an_authors_checkpoint_uses_its_backbone_and_the_preset(tmp_path, capsys):
    from test_eval import _authors_format, _random_model
    path = tmp_path / "authors.pth"
    model = _random_model("vit_tiny_demo", 6, seed=12)
    with torch.no_grad():                                  # a backbone of its own, not the demo's fixed init
        for p in model.backbone.parameters():
            p.add_(0.2 * torch.randn_like(p))
    torch.save(_authors_format(model), path)
    out = tmp_path / "s"
    assert ev.main(["--propagation", "--sweep", "--official", str(path), "--arch", "vit_tiny_demo", "--data",
                    "synthetic", "--limit", "4", "--batch-size", "4", "--phi0-grid", "0.8", "--device", "cpu",
                    "--num-workers", "0", "--out", str(out)]) == 0
    capsys.readouterr()
    doc = json.loads((out / "sweep.json").read_text())
    assert doc["kind"] == "official" and doc["weights"] == f"from {path}" and doc["preset"]["own_row"]
    assert doc["thresholds_from"] == "the preset row ('synthetic', 'vit_tiny_demo', 8) (ppap.PRESETS)"
    assert [(r["phi0"], r["preset"]) for r in doc["rows"]] == [(0.75, True), (0.8, False)]
    # the checkpoint's backbone, not a freshly built one: its criterion features give these counts
    model = ev.load_official(str(path), "vit_tiny_demo", 8)
    cfg = ppap.make_config({"data": "synthetic"})
    items = [ppap.SyntheticDataset("val", 112)[i] for i in range(4)]
    f, _ = ev.criterion_rows(model.backbone, torch.stack([it["img"] for it in items]), "cpu")
    rows = ppap.build_loss(cfg).anchors(f.shape[0], torch.Generator().manual_seed(0)).reshape(-1)
    labels = ev.patch_labels(torch.stack([it["label"] for it in items]), 8, 6).reshape(-1)
    want = ev.propagation_sums(f, labels, rows, ppap.build_loss(cfg))
    assert doc["rows"][0]["sums"]["pos"] == want["pos"].tolist()
    # each row is the loss with that row's Phi0 and Psi0 (0.8 and 0.8 - 0.4), on the same features and anchors
    swept = ev.propagation_sums(f, labels, rows, ppap.build_loss(dataclasses.replace(cfg, phi0=0.8, psi0=0.4)))
    for k in ev.PROP_SUMS:
        assert doc["rows"][1]["sums"][k] == pytest.approx(swept[k].tolist(), abs=1e-9), k
    fresh, _ = ev.criterion_rows(ppap.vit_tiny_demo(8), torch.stack([it["img"] for it in items]), "cpu")
    assert ev.propagation_sums(fresh, labels, rows, ppap.build_loss(cfg))["pos"].tolist() != want["pos"].tolist()


def test_label_free_columns_without_labels():
    """Val data without labels: the set sizes are measured all the same (they do not depend on labels), every
    purity is None and the table shows a dash."""
    cfg = ppap.make_config({"data": "synthetic", "num_workers": 0})
    backbone = ppap.build_backbone(cfg)
    ds = ppap.SyntheticDataset("val", cfg.val_size)
    items = [ds[i] for i in range(4)]
    labelled = torch.utils.data.DataLoader(items, batch_size=4)
    unlabelled = torch.utils.data.DataLoader([{**it, "label": torch.full_like(it["label"], -1)} for it in items],
                                             batch_size=4)
    grid = ev.sweep_grid(cfg, [0.6, 0.9], [0.4])
    a, b = (ev.threshold_sweep(backbone, loader, "cpu", cfg, grid, 6, per_class=True, progress=False)
            for loader in (labelled, unlabelled))
    free = ("anchors", "positive_share_t0", "positive_share", "ambiguous_share", "negative_share", "no_positive")
    for ra, rb in zip(a["rows"], b["rows"]):
        assert {k: ra[k] for k in free} == {k: rb[k] for k in free} and rb["positive_share"] > 0
        assert rb["positive_purity"] is rb["ambiguous_purity"] is rb["negative_purity"] is rb["chance_purity"] is None
    assert a["similarity_quantiles"] == b["similarity_quantiles"] and list(b["by_class"]) == [-1]
    report = {**b, "backbone": "vit_tiny_demo/8", "data": "synthetic", "weights": "random init", "val_size": 112,
              "anchors_seed": 0, "hyper": ppap.loss_hyper(cfg), "thresholds_from": "x", "preset": {"phi0": 0.75,
                                                                                                   "psi0": 0.35}}
    assert "| 0.6 | 0.2 | " in ev.format_sweep(report) and " — |" in ev.format_sweep(report)


def test_sweep_errors_are_one_line(short_run, tmp_path, capsys):  # noqa: F811
    def one_error(argv):
        assert ev.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), err
        return err[0]
    assert "needs --data" in one_error(["--sweep"])
    assert "--weights is for a sweep without --run" in one_error(["--sweep", "--run", str(short_run), "--weights", "w"])
    assert "--phi0-grid" in one_error(["--sweep", "--data", "synthetic", "--phi0-grid", "0.5:x"])
    assert "--gap" in one_error(["--sweep", "--data", "synthetic", "--gap", "nan"])
    assert "unrecognized arguments: --crf" in one_error(["--sweep", "--data", "synthetic", "--crf"])
    assert "raise --batch-size" in one_error(["--sweep", "--data", "synthetic", "--batch-size", "2", "--limit", "2"])
    assert "one of the arguments --run-dir/--run --official is required" in one_error(["--propagation"])


# ---------------------------------------------------------------------------
# the threshold note

def test_the_threshold_note_follows_the_registries(monkeypatch):
    note = lambda *argv: ppap.threshold_note(ppap.parse_args(list(argv)))
    for own in (["--data", "cocostuff"], ["--data", "cocostuff", "--patch", "16"], ["--data", "cityscapes"],
                ["--data", "cityscapes", "--arch", "vit_small"], ["--data", "potsdam"], ["--data", "synthetic"]):
        assert note(*own) is None, own                                    # the authors' (or the demo's) own rows
    line = note("--data", "cocostuff", "--arch", "dinov2_vits14_reg")
    assert line.startswith("note: --phi0 0.55 / --psi0 0.2 were tuned for vit_small/8 on cocostuff, not for "
                           "dinov2_vits14_reg/14 on cocostuff") and "\n" not in line
    assert "python eval.py --propagation --sweep --data cocostuff --arch dinov2_vits14_reg --patch 14" in line
    assert "--weights /w/v2.pth" in note("--data", "cocostuff", "--arch", "dinov2_vitb14", "--weights", "/w/v2.pth")
    assert "the defaults" in note("--data", "imagenet-s")                 # no row of its own, none to borrow
    assert "vit_base/8 on potsdam" in note("--data", "potsdam", "--arch", "vit_small")
    assert note("--data", "cocostuff", "--arch", "dinov2_vits14", "--phi0", "0.9") is None   # chosen for this run
    # a dataset that borrows another's rows, as the coming `--data folder` takes COCO-Stuff's
    borrowing = dataclasses.replace(ppap.DATASETS["cocostuff"], presets="cocostuff")
    monkeypatch.setitem(ppap.DATASETS, "borrowing", borrowing)
    assert "not for vit_small/8 on borrowing" in note("--data", "borrowing")


def test_a_dinov2_run_prints_the_note_once(small_dinov2, tmp_path, capsys):
    argv = ["--data", "synthetic", "--arch", "dinov2_vits14", "--weights", small_dinov2, "--max-steps", "1",
            "--batch-size", "16", "--img-size", "112", "--val-size", "112", "--val-limit", "2", "--val-every", "0",
            "--run", str(tmp_path / "r"), "--device", "cpu", "--no-progress", "--num-workers", "0"]
    assert ppap.main(argv) == 0
    out = capsys.readouterr().out
    notes = [line for line in out.splitlines() if line.startswith("note: --phi0")]
    assert len(notes) == 1 and "eval.py --propagation --sweep --data synthetic --arch dinov2_vits14" in notes[0]
    assert ppap.main(["--data", "synthetic", "--max-steps", "1", "--batch-size", "4", "--val-limit", "2",
                      "--val-every", "0", "--run", str(tmp_path / "demo"), "--device", "cpu", "--no-progress",
                      "--num-workers", "0"]) == 0
    assert "note: --phi0" not in capsys.readouterr().out                  # the demo preset is its own

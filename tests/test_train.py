"""Training loop and CLI: short synthetic runs, exact resume, checkpoints, one-line errors."""
import json
import os
import subprocess
import sys

import pytest
import torch

import ppap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--data", "synthetic", "--batch-size", "8", "--val-every", "2", "--val-limit", "8", "--no-progress",
        "--num-workers", "0"]


def test_presets_and_cli_overrides():
    cfg = ppap.parse_args(["--data", "cocostuff"])
    assert (cfg.arch, cfg.patch, cfg.phi0, cfg.psi0, cfg.trainpatchsplit, cfg.weight_decay) == \
        ("vit_small", 8, 0.55, 0.20, 16, 0.1)
    cfg = ppap.parse_args(["--data", "cocostuff", "--patch", "16", "--tau", "0.5", "--no-amp"])
    assert (cfg.psi0, cfg.sigma_amb, cfg.trainpatchsplit, cfg.tau, cfg.amp) == (0.15, 4, 4, 0.5, False)
    cfg = ppap.parse_args(["--data", "cityscapes"])
    assert (cfg.arch, cfg.prop_iter, cfg.tau, cfg.optimizer, cfg.epochs) == ("vit_base", 3, 0.1, "adam", 30)
    cfg = ppap.parse_args(["--data", "cityscapes", "--arch", "vit_small"])
    assert (cfg.tau, cfg.sigma_amb) == (0.8, 3)
    cfg = ppap.parse_args(["--data", "potsdam"])
    assert (cfg.prop_iter, cfg.sigma_pos, cfg.tau, cfg.lr) == (1, 5, 0.07, 5e-4)
    with pytest.raises(ppap.PPAPError, match="unknown --data"):
        ppap.parse_args(["--data", "pascal"])
    with pytest.raises(ppap.PPAPError, match="--patch"):
        ppap.parse_args(["--data", "cocostuff", "--patch", "14"])


def read_log(run):
    with open(os.path.join(run, "log.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def test_short_run_writes_log_and_checkpoint(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert ppap.main(TINY + ["--max-steps", "4", "--run", run]) == 0
    out = capsys.readouterr().out
    assert "unsupervised mIoU" in out and "git " in out and "phi0" in out     # config and git state printed
    log = read_log(run)
    assert [r["step"] for r in log] == [2, 4]
    for key in ("cluster_mIoU", "cluster_Acc", "linear_mIoU", "linear_Acc"):
        assert 0 <= log[-1][key] <= 100
    ckpt = torch.load(os.path.join(run, "last.pt"), weights_only=False)
    assert ckpt["step"] == 4 and ckpt["config"]["data"] == "synthetic" and ckpt["selection"] == "last"
    assert set(ckpt["optim"]) == {"net", "linear", "cluster"}
    assert not os.path.exists(os.path.join(run, "best_on_val.pt"))
    model, cfg, _ = ppap.load_run(run)
    assert cfg.max_steps == 4 and model.n_classes == len(ppap.SYNTH_CLASSES)
    assert not [f for f in os.listdir(run) if ".tmp" in f]                   # atomic writes leave nothing


def test_resume_continues_exactly(tmp_path):
    straight, split = str(tmp_path / "a"), str(tmp_path / "b")
    assert ppap.main(TINY + ["--max-steps", "4", "--run", straight]) == 0
    assert ppap.main(TINY + ["--max-steps", "2", "--run", split]) == 0
    assert ppap.main(["--resume", split, "--max-steps", "4", "--no-progress"]) == 0
    a = torch.load(os.path.join(straight, "last.pt"), weights_only=False)
    b = torch.load(os.path.join(split, "last.pt"), weights_only=False)
    assert b["step"] == 4
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert read_log(straight)[-1] == read_log(split)[-1]


def test_ppap_weight_zero_leaves_head_unchanged(tmp_path):
    run = str(tmp_path / "r")
    assert ppap.main(TINY + ["--max-steps", "2", "--ppap-weight", "0", "--run", run]) == 0
    model, cfg, _ = ppap.load_run(run)
    fresh = ppap.build_model(cfg, model.n_classes)
    for k, v in fresh.head.state_dict().items():
        assert torch.equal(v, model.head.state_dict()[k])
    assert not torch.equal(fresh.cluster_probe.clusters, model.cluster_probe.clusters)   # probes did train


def test_select_on_val_is_opt_in_and_labelled(tmp_path):
    run = str(tmp_path / "r")
    assert ppap.main(TINY + ["--max-steps", "2", "--select-on-val", "--run", run]) == 0
    best = torch.load(os.path.join(run, "best_on_val.pt"), weights_only=False)
    assert best["selection"] == "best-on-val" and best["best"]["step"] == 2


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "ppap.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)


def test_missing_data_is_one_line(tmp_path):
    r = run_cli("--data", "cocostuff", "--data-dir", str(tmp_path))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "download.sh cocostuff" in lines[0] and "Traceback" not in r.stderr


def test_wrong_weights_is_one_line(tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"foo": torch.zeros(3)}, bad)
    r = run_cli("--data", "synthetic", "--weights", str(bad), "--max-steps", "1")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not fit" in lines[0] and "Traceback" not in r.stderr


def test_batch_smaller_than_a_group_is_refused(tmp_path):
    with pytest.raises(ppap.PPAPError, match="anchor group"):
        ppap.train(ppap.make_config({"data": "synthetic", "batch_size": 2, "run": str(tmp_path / "r"),
                                     "progress": False}))


def test_knn_table_equals_torch_topk(tmp_path):
    cfg = ppap.make_config({"data": "synthetic", "data_dir": str(tmp_path), "progress": False,
                            "num_workers": 0, "knn_k": 5})
    path = ppap.knn_table(cfg, "val")
    assert path.startswith(str(tmp_path)) and ppap.knn_table(cfg, "val") == path    # cached
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


def test_synthetic_data_is_deterministic_and_labelled():
    a, b = ppap.SyntheticDataset("train", 64)[5], ppap.SyntheticDataset("train", 64)[5]
    assert torch.equal(a["img"], b["img"]) and torch.equal(a["label"], b["label"])
    assert not torch.equal(a["img"], ppap.SyntheticDataset("val", 64)[5]["img"])    # val is a different draw
    labels = torch.cat([ppap.SyntheticDataset("train", 64)[i]["label"].flatten() for i in range(20)])
    assert set(labels.unique().tolist()) == set(range(len(ppap.SYNTH_CLASSES)))


def test_demo_ppap_beats_probes_on_unchanged_head(tmp_path):
    """The README demo with its defaults: the PPAP loss must visibly improve unsupervised mIoU."""
    on, off = str(tmp_path / "ppap"), str(tmp_path / "off")
    assert ppap.main(["--data", "synthetic", "--no-progress", "--run", on]) == 0
    assert ppap.main(["--data", "synthetic", "--no-progress", "--ppap-weight", "0", "--run", off]) == 0
    with_ppap, without = read_log(on)[-1], read_log(off)[-1]
    assert with_ppap["step"] == without["step"] == 400
    assert with_ppap["cluster_mIoU"] >= without["cluster_mIoU"] + 3, (with_ppap, without)

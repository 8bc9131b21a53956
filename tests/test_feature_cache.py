"""--feature-cache: the frozen trunk's output of every train crop, computed once and read by later epochs and
runs. Exact (a cached run is bit-identical to a live one), keyed (another backbone, size or file list is
rebuilt with one line saying why), never read when cut short, shared safely by processes and runs."""
import dataclasses
import errno
import json
import os
import pickle
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from PIL import Image

import ppap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_TRAIN = 18          # not a multiple of the batch: the loader drops 2 crops an epoch, the last shard is padded
# two epochs of 4 steps; val crops of 48 px, so that a train crop (56 px) is known by its size
SMALL = ["--data", "synthetic", "--img-size", "56", "--val-size", "48", "--batch-size", "4", "--group", "196",
         "--trainpatchsplit", "4", "--val-limit", "8", "--num-workers", "0", "--no-progress", "--epochs", "2",
         "--val-every", "4"]


def _small_synthetic(mp):
    spec = ppap.DATASETS["synthetic"]
    mp.setitem(ppap.DATASETS, "synthetic", dataclasses.replace(spec, build=lambda cfg, split: ppap.SyntheticDataset(
        split, cfg.img_size if split == "train" else cfg.val_size, N_TRAIN if split == "train" else 8)))


@pytest.fixture
def small(monkeypatch):
    _small_synthetic(monkeypatch)


@pytest.fixture(scope="module")
def live_runs(tmp_path_factory):
    """The reference: two-epoch runs without the cache, seeds 0 and 1."""
    base = tmp_path_factory.mktemp("live")
    with pytest.MonkeyPatch.context() as mp:
        _small_synthetic(mp)
        for seed in (0, 1):
            assert ppap.main(SMALL + ["--seed", str(seed), "--run", str(base / f"seed{seed}")]) == 0
    return base


@pytest.fixture
def train_crops(monkeypatch):
    """Counts the trunk's calls on train-sized crops (56 px): the backbone forward over the train set."""
    calls = []
    trunk = ppap.VisionTransformer.trunk

    def counting(self, x):
        if x.shape[-1] == 56:
            calls.append(x.shape[0])
        return trunk(self, x)
    monkeypatch.setattr(ppap.VisionTransformer, "trunk", counting)
    return calls


def _checkpoint(run):
    return torch.load(os.path.join(run, "last.pt"), weights_only=True)


def _log(run):
    return open(os.path.join(run, "log.jsonl")).read()


def assert_same_run(a, b, differ=()):
    """Everything last.pt holds (weights, optimisers, scaler, step generator, config) is identical, except
    where the run lives, which cache it read and the config fields `differ`; the logs are byte for byte the
    same."""
    ca, cb = _checkpoint(a), _checkpoint(b)
    for c in (ca, cb):
        for name in ("run", "feature_cache", *differ):
            c["config"].pop(name)
        c.pop("git")
    assert ca["step"] == cb["step"] > 0
    flat_a, flat_b = _flatten(ca), _flatten(cb)
    assert flat_a.keys() == flat_b.keys()
    for k, v in flat_a.items():
        w = flat_b[k]
        assert (torch.equal(v, w) if torch.is_tensor(v) else v == w), k
    assert _log(a) == _log(b)


def _flatten(obj, prefix=""):
    if isinstance(obj, dict):
        return {k2: v2 for k, v in obj.items() for k2, v2 in _flatten(v, f"{prefix}{k}/").items()}
    if isinstance(obj, (list, tuple)):
        return {k2: v2 for i, v in enumerate(obj) for k2, v2 in _flatten(v, f"{prefix}{i}/").items()}
    return {prefix: obj}


def reference_rows(backbone, dataset, amp=None):
    """Every crop's trunk output, one crop at a time (no batch at all)."""
    with torch.no_grad(), ppap.autocast("cpu", amp):
        return torch.cat([backbone.trunk(dataset[i]["img"][None]) for i in range(len(dataset))])


def cache_cfg(cache, **over):
    return ppap.make_config({"data": "synthetic", "img_size": 56, "batch_size": 4, "num_workers": 0,
                             "progress": False, "feature_cache": str(cache), **over})


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


def test_a_backbone_without_the_two_halves_is_one_line(tmp_path):
    class Features(torch.nn.Module):            # the contract's minimum (tests/test_forks.py's ResNet-50 shape)
        patch_size, embed_dim = 8, 192

        def features(self, x):
            return x, x
    with pytest.raises(ppap.PPAPError, match="trunk\\(\\) and crit_features\\(\\).*without --feature-cache"):
        ppap.open_feature_cache(cache_cfg(tmp_path / "c"), Features(), ppap.SyntheticDataset("train", 56, 4), "cpu")


# ---------------------------------------------------------------- exact, and reused

def test_a_cached_run_is_bit_identical_and_another_seed_reuses_the_cache(live_runs, tmp_path, small, capsys,
                                                                            train_crops):
    cache = str(tmp_path / "cache")
    assert ppap.main(SMALL + ["--run", str(tmp_path / "a"), "--feature-cache", cache]) == 0
    out = capsys.readouterr().out
    assert f"{N_TRAIN} crops x 50 tokens x 192 x 4 B (float32)" in out and "built; later epochs" in out
    assert train_crops == [1] + [4] * 5         # one crop for the layout, then 5 shards of 4, 4, 4, 4, 2 + 2 padding
    assert_same_run(str(tmp_path / "a"), str(live_runs / "seed0"))

    train_crops.clear()
    assert ppap.main(SMALL + ["--seed", "1", "--run", str(tmp_path / "b"), "--feature-cache", cache]) == 0
    out = capsys.readouterr().out
    assert f"reusing {N_TRAIN} crops (float32" in out and "no backbone forward over the train set" in out
    assert train_crops == []                     # not one train crop through the trunk
    assert_same_run(str(tmp_path / "b"), str(live_runs / "seed1"))


def test_a_cache_of_the_criterion_features_too_leaves_the_run_bit_identical(live_runs, tmp_path, small, capsys,
                                                                            monkeypatch):
    last_block = []
    crit_features = ppap.VisionTransformer.crit_features
    monkeypatch.setattr(ppap.VisionTransformer, "crit_features",
                        lambda self, t, grid: (last_block.append(grid), crit_features(self, t, grid))[1])
    assert ppap.main(SMALL + ["--run", str(tmp_path / "a"), "--feature-cache", str(tmp_path / "c"),
                              "--feature-cache-crit"]) == 0
    assert f"{N_TRAIN} crops x (50 tokens + 49 criterion rows) x 192 x 4 B (float32)" in capsys.readouterr().out
    assert last_block[:6] == [(7, 7)] * 6 and (7, 7) not in last_block[6:]   # the build (1 + 5 batches), then
    # no train step ran a frozen block (validation, 48 px: 6 x 6)
    assert_same_run(str(tmp_path / "a"), str(live_runs / "seed0"), differ=("feature_cache_crit",))


def test_under_autocast_the_cache_holds_the_fp32_residual_stream_and_the_run_is_identical(tmp_path, small):
    amp = ["--amp", "--amp-dtype", "bf16", "--device", "cpu", "--max-steps", "2"]
    assert ppap.main(SMALL + amp + ["--run", str(tmp_path / "live")]) == 0
    assert ppap.main(SMALL + amp + ["--run", str(tmp_path / "cached"), "--feature-cache", str(tmp_path / "c")]) == 0
    assert_same_run(str(tmp_path / "cached"), str(tmp_path / "live"))
    done = json.load(open(tmp_path / "c" / "complete" / "DONE.json"))
    assert done["layout"]["stored"] == done["layout"]["live_dtype"] == "float32"
    assert done["key"]["autocast"] == "bfloat16"


def test_resume_may_add_the_cache_and_continues_exactly(live_runs, tmp_path, small, capsys):
    run = str(tmp_path / "r")
    assert ppap.main(SMALL + ["--max-steps", "4", "--run", run]) == 0
    assert ppap.main(["--resume", run, "--max-steps", "400", "--feature-cache", str(tmp_path / "c"),
                      "--no-progress"]) == 0
    assert "built; later epochs" in capsys.readouterr().out
    assert_same_run(run, str(live_runs / "seed0"), differ=("resume",))
    assert ppap.main(["--resume", run, "--feature-cache-dtype", "fp16"]) == 2     # what the head receives: refused
    assert "--feature-cache-dtype cannot change" in capsys.readouterr().err


def test_a_half_precision_cache_feeds_the_head_the_rounded_rows(tmp_path):
    ds, backbone = ppap.SyntheticDataset("train", 56, 6), demo_backbone()
    ref = reference_rows(backbone, ds)
    with torch.no_grad():
        ref_crit = backbone.crit_features(ref, (7, 7))
    sizes = {}
    for dtype, torch_dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        cached = ppap.open_feature_cache(cache_cfg(tmp_path / dtype, feature_cache_dtype=dtype,
                                                   feature_cache_crit=True), backbone, ds, "cpu")
        rows = torch.stack([cached[i]["head_in"] for i in range(len(ds))])
        crit = torch.stack([cached[i]["crit"] for i in range(len(ds))])
        assert rows.dtype == crit.dtype == torch.float32 and torch.equal(rows, ref.to(torch_dtype).float())
        assert torch.equal(crit, ref_crit.to(torch_dtype).float())     # rounded once, from the exact features
        sizes[dtype] = sum(f.stat().st_size for f in (tmp_path / dtype / "complete").glob("*.bin"))
    exact = ppap.open_feature_cache(cache_cfg(tmp_path / "exact"), backbone, ds, "cpu")
    assert torch.equal(torch.stack([exact[i]["head_in"] for i in range(len(ds))]), ref)
    assert sizes["fp16"] == sizes["bf16"] == (ref.numel() + ref_crit.numel()) * 2
    with pytest.raises(ppap.PPAPError, match="only a --feature-cache DIR stores"):
        ppap.make_config({"data": "synthetic", "feature_cache_dtype": "fp16"})


# ---------------------------------------------------------------- keyed and safe

def _crop_files(folder, n=6):
    folder.mkdir(parents=True, exist_ok=True)
    pairs = []
    for i in range(n):
        img, lab = ppap.synthetic_sample(i, 64, "train")
        ip, lp = folder / f"{i}.jpg", folder / f"{i}.png"
        Image.fromarray((img * 255).astype(np.uint8)).save(ip)
        Image.fromarray((lab + 1).astype(np.uint8)).save(lp)
        pairs.append((str(ip), str(lp)))
    return pairs


def test_another_backbone_size_or_file_list_is_rebuilt_with_one_line_saying_why(tmp_path, capsys):
    cache, backbone = tmp_path / "c", demo_backbone()
    pairs = _crop_files(tmp_path / "crops")
    files = ppap.RealSegDataset("cocostuff", ppap.read_five_crop, pairs, 56, ppap.COCOSTUFF27_CLASS_NAMES)
    cfg = cache_cfg(cache)

    def opened(dataset, bb):
        got = ppap.open_feature_cache(cfg, bb, dataset, "cpu")
        assert torch.equal(torch.stack([got[i]["head_in"] for i in range(len(dataset))]),
                           reference_rows(bb, dataset))                    # whatever happened, the right rows
        out = capsys.readouterr().out
        assert out.count("rebuilt:") <= 1
        return out
    assert "built" in opened(files, backbone) and "reusing 6 crops" in opened(files, backbone)
    other = demo_backbone()
    with torch.no_grad():
        other.blocks[0].mlp.fc1.bias[0] += 1e-3
    assert "rebuilt: the backbone weights changed" in opened(files, other)
    at48 = ppap.RealSegDataset("cocostuff", ppap.read_five_crop, pairs, 48, ppap.COCOSTUFF27_CLASS_NAMES)
    assert "rebuilt: the image size changed (56 -> 48)\n" in opened(at48, other)
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(pairs[2][0])    # a crop image replaced
    assert "rebuilt: the train file list (names or sizes) changed" in opened(at48, other)
    five = ppap.RealSegDataset("cocostuff", ppap.read_five_crop, pairs[:5], 48, ppap.COCOSTUFF27_CLASS_NAMES)
    assert "the number of crops changed (6 -> 5)" in opened(five, other)


KILLER = r"""
import os, signal, sys
sys.path.insert(0, {root!r})
import ppap
written = []
real = ppap.atomic_write

def dies_in_the_third_shard(path, write):
    if path.endswith(".bin"):
        written.append(path)
        if len(written) == 3:               # half a shard on disk, then the process is killed
            def half(tmp):
                with open(tmp, "wb") as f:
                    f.write(b"\0" * 1000)
                    f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            return real(path, half)
    return real(path, write)

ppap.atomic_write = dies_in_the_third_shard
cfg = ppap.make_config({{"data": "synthetic", "img_size": 56, "batch_size": 4, "num_workers": 0, "progress": False,
                        "feature_cache": {cache!r}}})
backbone = ppap.new_backbone("vit_tiny_demo", 8).eval()
ppap.open_feature_cache(cfg, backbone, ppap.SyntheticDataset("train", 56, 18), "cpu")
"""


def test_a_cache_killed_halfway_is_never_read_and_the_next_run_completes_it(tmp_path, capsys):
    cache = tmp_path / "c"
    r = subprocess.run([sys.executable, "-c", KILLER.format(root=ROOT, cache=str(cache))], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == -9, r.stderr[-2000:]
    assert not (cache / "complete").exists() and any(".tmp" in p.name for p in (cache / "building").iterdir())
    ds, backbone = ppap.SyntheticDataset("train", 56, 18), demo_backbone()
    got = ppap.open_feature_cache(cache_cfg(cache), backbone, ds, "cpu")
    assert "resuming an interrupted build, 2 shards whole" in capsys.readouterr().out
    assert torch.equal(torch.stack([got[i]["head_in"] for i in range(len(ds))]), reference_rows(backbone, ds))
    assert sorted(p.name for p in cache.iterdir()) == ["complete", "lock"]
    # a complete cache whose shard was cut short afterwards is rebuilt, not read
    shard = cache / "complete" / "shard-00001.bin"
    shard.write_bytes(shard.read_bytes()[:-4])
    got = ppap.open_feature_cache(cache_cfg(cache), backbone, ds, "cpu")
    assert "rebuilt: shard-00001.bin is missing or cut short" in capsys.readouterr().out
    assert torch.equal(torch.stack([got[i]["head_in"] for i in range(len(ds))]), reference_rows(backbone, ds))


def test_a_disk_that_cannot_hold_the_cache_is_one_line_before_writing(tmp_path, monkeypatch, capsys, small):
    monkeypatch.setattr(ppap.shutil, "disk_usage", lambda p: type("U", (), {"free": 10_000})())
    assert ppap.main(SMALL + ["--run", str(tmp_path / "r"), "--feature-cache", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the feature cache needs 0.000691 GB more" in err[0]
    assert not list((tmp_path / "c" / "building").glob("*.bin"))


def _cache_worker(rank, world, init_file, cache, out_dir):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    wrote = []
    real = ppap.atomic_write
    ppap.atomic_write = lambda path, write: (wrote.append(os.path.basename(path)), real(path, write))[1]
    ds = ppap.SyntheticDataset("train", 56, N_TRAIN)
    got = ppap.open_feature_cache(cache_cfg(cache), demo_backbone(), ds, "cpu")
    rows = torch.stack([got[i]["head_in"] for i in range(len(ds))])
    torch.save({"rows": rows, "wrote": [w for w in wrote if w.endswith(".bin")]}, os.path.join(out_dir, f"{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_processes_of_a_job_each_write_their_shards_and_all_read_every_row(tmp_path, capsys):
    cache = tmp_path / "c"
    torch.multiprocessing.spawn(_cache_worker, args=(2, str(tmp_path / "init"), str(cache), str(tmp_path)), nprocs=2)
    parts = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in (0, 1)]
    # shards of 4 crops (2 batches of the 2 crops each process takes of a global batch of 4)
    assert parts[0]["wrote"] == ["shard-00000.bin", "shard-00002.bin", "shard-00004.bin"]
    assert parts[1]["wrote"] == ["shard-00001.bin", "shard-00003.bin"]
    ref = reference_rows(demo_backbone(), ppap.SyntheticDataset("train", 56, N_TRAIN))
    assert torch.equal(parts[0]["rows"], ref) and torch.equal(parts[1]["rows"], ref)
    ppap.open_feature_cache(cache_cfg(cache), demo_backbone(), ppap.SyntheticDataset("train", 56, N_TRAIN), "cpu")
    assert f"reusing {N_TRAIN} crops" in capsys.readouterr().out        # a one-process run reads the job's cache


def test_two_runs_at_once_one_builds_the_other_waits_then_reads(tmp_path, capsys, monkeypatch):
    """Two openers of one cache at once (threads: flock excludes two open files of one process as it does two
    processes): the second finds the lock taken while the first builds, waits, then reads the first's cache."""
    monkeypatch.setattr(ppap, "FEATURE_LOCK_POLL_S", 0.05)
    blocked, inside = threading.Event(), threading.Event()
    flock = ppap.fcntl.flock

    def watched(f, op):
        try:
            return flock(f, op)
        except BlockingIOError:
            blocked.set()
            raise
    monkeypatch.setattr(ppap.fcntl, "flock", watched)
    real = ppap.atomic_write

    def first_shard_waits(path, write):
        if path.endswith(".bin") and not inside.is_set():
            inside.set()
            assert blocked.wait(60), "the second run never met the lock"
        return real(path, write)
    monkeypatch.setattr(ppap, "atomic_write", first_shard_waits)
    ds, backbone, rows = ppap.SyntheticDataset("train", 56, N_TRAIN), demo_backbone(), {}

    def run(name):
        got = ppap.open_feature_cache(cache_cfg(tmp_path / "c"), backbone, ds, "cpu")
        rows[name] = torch.stack([got[i]["head_in"] for i in range(len(ds))])
    first = threading.Thread(target=run, args=("first",))
    first.start()
    assert inside.wait(60)
    run("second")
    first.join()
    out = capsys.readouterr().out
    assert out.count("built; later epochs") == 1 and "another run is building it; waiting" in out
    assert f"reusing {N_TRAIN} crops" in out
    ref = reference_rows(backbone, ds)
    assert torch.equal(rows["first"], ref) and torch.equal(rows["second"], ref)


def test_a_run_reading_a_cache_that_another_replaces_keeps_its_rows(tmp_path, capsys):
    backbone = demo_backbone()
    ds56, ds48 = ppap.SyntheticDataset("train", 56, 6), ppap.SyntheticDataset("train", 48, 6)
    reading = ppap.open_feature_cache(cache_cfg(tmp_path / "c"), backbone, ds56, "cpu")
    ppap.open_feature_cache(cache_cfg(tmp_path / "c"), backbone, ds48, "cpu")     # another run, another size
    assert "rebuilt: the image size changed (56 -> 48)" in capsys.readouterr().out
    assert torch.equal(torch.stack([reading[i]["head_in"] for i in range(6)]), reference_rows(backbone, ds56))
    worker = pickle.loads(pickle.dumps(reading))      # a DataLoader worker that is not forked maps the files anew
    with pytest.raises(ppap.PPAPError, match="was replaced by another run while this one trained"):
        worker[0]


def test_a_cache_folder_that_cannot_be_locked_is_read_but_never_written(tmp_path, capsys, monkeypatch):
    backbone, ds = demo_backbone(), ppap.SyntheticDataset("train", 56, 6)
    ppap.open_feature_cache(cache_cfg(tmp_path / "c"), backbone, ds, "cpu")

    def no_locks(f, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(ppap.fcntl, "flock", no_locks)
    got = ppap.open_feature_cache(cache_cfg(tmp_path / "c"), backbone, ds, "cpu")
    assert "reusing 6 crops" in capsys.readouterr().out
    assert torch.equal(torch.stack([got[i]["head_in"] for i in range(6)]), reference_rows(backbone, ds))
    with pytest.raises(ppap.PPAPError, match="cannot lock .*No locks available.*, so it can only be read, and the "
                                             "image size changed"):
        ppap.open_feature_cache(cache_cfg(tmp_path / "c"), backbone, ppap.SyntheticDataset("train", 48, 6), "cpu")
    assert (tmp_path / "c" / "complete").exists() and not (tmp_path / "c" / "building").exists()

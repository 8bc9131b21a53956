"""Several processes (torchrun, gloo on the CPU): the same loss, training, evaluation and checkpoints as
one process at the same global batch."""
import glob
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import ppap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
# the README's CPU command (each run in its own working directory, default run directory)
README_ARGS = ["--data", "synthetic", "--device", "cpu", "--max-steps", "6", "--batch-size", "8", "--val-every", "3",
               "--val-limit", "16", "--no-progress", "--num-workers", "0"]


def run(cmd, cwd, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_every_flag_passes_through_torchrun():
    """torchrun parses the command line first and takes any flag that abbreviates one of its own (--run is
    its --run-path): no flag of ppap.py or eval.py may, except the documented --run of plain python."""
    import eval as ev
    from torch.distributed.run import get_args_parser
    theirs = [s for a in get_args_parser()._actions for s in a.option_strings]
    parsers = [ppap.build_parser(ppap.Config()), *(ev.build_parser(mode) for mode in ev.MODES)]
    ours = [s for parser in parsers for a in parser._actions for s in a.option_strings
            if s not in ("-h", "--help", "--run")]
    clashes = sorted({o for o in ours for t in theirs if t.startswith(o)})
    assert clashes == [] and "--run-dir" in ours


def _loss_worker(rank, world, init_file, out_dir):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    cfg = ppap.make_config({"data": "cocostuff", "prop_iter": 2})
    z, f = _loss_inputs()
    n = z.shape[0] // world
    z_mine = z[rank * n:(rank + 1) * n].clone().requires_grad_()
    share, stats = ppap.build_loss(cfg)(ppap.gather_rows(z_mine), ppap.gather_rows(f[rank * n:(rank + 1) * n]),
                                        torch.Generator().manual_seed(3), (rank, world))
    share.backward()
    torch.save({"share": share.detach(), "grad": z_mine.grad, "stats": stats}, os.path.join(out_dir, f"{rank}.pt"))
    torch.distributed.destroy_process_group()


def _loss_inputs():
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(9, 32, generator=g), dim=1)
    f = F.normalize(centres[torch.randint(0, 9, (784 * 4,), generator=g)] + 0.6 * torch.randn(784 * 4, 32, generator=g), dim=1)
    z = F.normalize(f @ torch.randn(32, 32, generator=g) + 0.3 * torch.randn(784 * 4, 32, generator=g), dim=1)
    return z, f


def test_the_loss_under_two_processes_equals_one_process(tmp_path):
    torch.multiprocessing.spawn(_loss_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    parts = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in (0, 1)]
    cfg = ppap.make_config({"data": "cocostuff", "prop_iter": 2})
    z, f = _loss_inputs()
    z = z.clone().requires_grad_()
    whole, stats = ppap.build_loss(cfg)(z, f, torch.Generator().manual_seed(3))
    whole.backward()
    total = parts[0]["share"] + parts[1]["share"]
    assert abs(total.item() - whole.item()) <= 1e-5 * abs(whole.item())
    grad = torch.cat([parts[0]["grad"], parts[1]["grad"]])
    assert (grad - z.grad).norm() <= 1e-5 * z.grad.norm()
    assert parts[0]["stats"]["positives"] + parts[1]["stats"]["positives"] == pytest.approx(stats["positives"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The README's command through torchrun (2 CPU processes) and as one process; and a 2-process run cut
    at step 3, resumed in one process."""
    base = tmp_path_factory.mktemp("dist")
    out = {}
    for name, cmd in (("two", TORCHRUN + [os.path.join(ROOT, "ppap.py")] + README_ARGS),
                      ("one", [sys.executable, os.path.join(ROOT, "ppap.py")] + README_ARGS),
                      ("cut", TORCHRUN + [os.path.join(ROOT, "ppap.py")] + README_ARGS +
                       ["--max-steps", "3", "--run-dir", "cut run"])):
        (base / name).mkdir()
        r = run(cmd, base / name)
        assert r.returncode == 0, r.stderr[-3000:]
        out[name] = (base / name, r)
    r = run([sys.executable, os.path.join(ROOT, "ppap.py"), "--resume", "cut run", "--max-steps", "6",
             "--no-progress"], base / "cut")
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def _last(d, pattern="runs/*"):
    run_dir = glob.glob(os.path.join(d, pattern))[0]
    log = [json.loads(line) for line in open(os.path.join(run_dir, "log.jsonl"))]
    return run_dir, torch.load(os.path.join(run_dir, "last.pt"), weights_only=True), log


def _same_weights(a, b, tol=1e-4):
    """Per trained tensor, |a - b| / |b| <= tol. The attention's key bias is left out: it receives no
    gradient in exact arithmetic (the softmax ignores a shift shared by all keys), so Adam turns the
    rounding noise of its gradient, which differs with the order of every sum, into steps of about +-lr
    that change no output."""
    for k, v in b.items():
        if k.startswith("backbone."):
            assert torch.equal(v, a[k]), k                              # frozen: untouched everywhere
            continue
        if k.endswith("attn.qkv.bias"):
            d = v.shape[0] // 3
            v, w = torch.cat([v[:d], v[2 * d:]]), torch.cat([a[k][:d], a[k][2 * d:]])
        else:
            w = a[k]
        assert (w - v).norm() <= tol * v.norm(), (k, ((w - v).norm() / v.norm()).item())


def test_torchrun_training_equals_one_process(runs):
    _, two, log2 = _last(runs["two"][0])
    _, one, log1 = _last(runs["one"][0])
    assert two["step"] == one["step"] == 6
    _same_weights(two["model"], one["model"])
    assert [r["step"] for r in log2] == [r["step"] for r in log1] == [3, 6]
    for a, b in zip(log2, log1):
        for k in ("cluster_mIoU", "cluster_Acc", "linear_mIoU", "linear_Acc"):
            assert abs(a[k] - b[k]) < 0.05, (k, a[k], b[k])
    out = runs["two"][1].stdout
    assert out.count("unsupervised mIoU") == 1 and out.count("==== result") == 1     # printed once


def test_a_two_process_checkpoint_resumes_in_one_process(runs):
    _, cut, log = _last(runs["cut"][0], "cut run")
    _, one, log1 = _last(runs["one"][0])
    assert cut["step"] == 6 and [r["step"] for r in log] == [3, 6]
    _same_weights(cut["model"], one["model"])
    assert abs(log[-1]["linear_mIoU"] - log1[-1]["linear_mIoU"]) < 0.05


def test_eval_under_two_processes_gives_the_same_confusions(runs, tmp_path):
    run_dir, _, _ = _last(runs["one"][0])
    common = ["--run-dir", run_dir, "--device", "cpu", "--limit", "16", "--num-workers", "0", "--n-examples", "0"]
    r2 = run(TORCHRUN + [os.path.join(ROOT, "eval.py")] + common + ["--out", str(tmp_path / "two")], tmp_path)
    r1 = run([sys.executable, os.path.join(ROOT, "eval.py")] + common + ["--out", str(tmp_path / "one")], tmp_path)
    assert r2.returncode == 0 and r1.returncode == 0, r2.stderr[-2000:] + r1.stderr[-2000:]
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("two", "one"))
    assert a["n_images"] == b["n_images"] == 16
    for probe in ("cluster", "linear"):
        assert a["metrics"][probe]["confusion"] == b["metrics"][probe]["confusion"]
        assert a["metrics"][probe]["mIoU"] == b["metrics"][probe]["mIoU"]
    assert r2.stdout.count("per-class IoU") == 1


def test_a_global_batch_the_processes_cannot_share_is_one_line(tmp_path):
    r = run(TORCHRUN + [os.path.join(ROOT, "ppap.py")] + README_ARGS[:6] + ["--batch-size", "7", "--no-progress"],
            tmp_path)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode != 0 and errors == ["error: --batch-size 7 (the global batch) is not divisible by the 2 "
                                            "processes of this job"]
    assert "Traceback (most recent call last):\n  File \"" + os.path.join(ROOT, "ppap.py") not in r.stderr


def _config_worker(rank, world, init_file, out_dir):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    cfg = ppap.make_config({"data": "synthetic", "max_steps": 4 + rank, "progress": rank == 0})
    try:
        ppap.check_same_config(cfg)
        msg = ""
    except ppap.PPAPError as e:
        msg = str(e)
    with open(os.path.join(out_dir, f"{rank}.txt"), "w") as f:
        f.write(msg)
    torch.distributed.destroy_process_group()


def test_processes_started_with_different_flags_stop_with_one_line(tmp_path):
    """torchrun hands every process its own command line: different --max-steps would end in a collective
    mismatch (gloo) or a hang (NCCL); every process says which flag differs instead, before training."""
    torch.multiprocessing.spawn(_config_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        msg = (tmp_path / f"{rank}.txt").read_text()
        assert msg == "the processes of this job were started with different flags: --max-steps 4 in rank 0, 5 in rank 1"

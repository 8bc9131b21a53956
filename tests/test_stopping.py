"""Stopping cleanly: whatever ends a training process (SIGTERM from a scheduler, SIGHUP from a dropped session,
Ctrl-C twice, a data error, lack of memory, divergence) saves the last finished step first and says in one line
which step last.pt holds; a resumed run then reaches the weights of an uninterrupted one, bit for bit."""
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import ppap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
S = ["--data", "synthetic", "--device", "cpu", "--batch-size", "4", "--img-size", "56", "--val-size", "56",
     "--group", "196", "--trainpatchsplit", "4", "--val-limit", "4", "--num-workers", "0", "--no-progress",
     "--max-steps", "12", "--val-every", "3"]


def start(run, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    out = open(run + ".out", "w")
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "ppap.py"), *S, *extra, "--run-dir", run],
                            stdout=out, stderr=subprocess.PIPE, text=True, env=env), out


def weights(run):
    ck = torch.load(os.path.join(run, "last.pt"), weights_only=True)
    return ck["step"], ck["model"], ck["optim"]


def same(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return torch.equal(a, b) if torch.is_tensor(a) else a == b


def wait_for_training(p, run):
    """Wait for the banner printed just before the first step -> the time it appeared."""
    while "== train ==" not in open(run + ".out").read():
        assert p.poll() is None, p.stderr.read()
        time.sleep(0.02)
    return time.time()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: its final state, and how long its training took (to aim the signals)."""
    run = str(tmp_path_factory.mktemp("stop") / "straight")
    p, out = start(run)
    t0 = wait_for_training(p, run)
    assert p.wait(timeout=300) == 0, p.stderr.read()
    out.close()
    return (*weights(run), time.time() - t0)


@pytest.mark.parametrize("signals", [("SIGTERM",), ("SIGHUP",), ("SIGINT", "SIGINT"), ("SIGTERM",)],
                         ids=["term", "hup", "int-int", "term-late"])
def test_a_stop_signal_saves_the_last_finished_step_and_resume_is_exact(signals, reference, tmp_path, request):
    """Fault injection: the signal(s) land at a random moment of training (seeded by the case), the second of
    two 50 ms after the first; last.pt holds the step the one-line message names, and --resume reaches the
    uninterrupted run's weights and optimiser states exactly."""
    rng = random.Random(request.node.callspec.id)
    run = str(tmp_path / "cut")
    p, out = start(run)
    wait_for_training(p, run)
    # aim by progress, not by the clock alone: after k of the validations (every 3 steps; the 4th is the end),
    # then a random part of the time 3 steps took in the reference run
    k = 2 if "late" in request.node.callspec.id else rng.randint(0, 2)
    log = os.path.join(run, "log.jsonl")
    while not os.path.exists(log) or sum(1 for _ in open(log)) < k:
        assert p.poll() is None, p.stderr.read()
        time.sleep(0.01)
    time.sleep(reference[3] / 4 * rng.uniform(0.0, 0.9))
    if p.poll() is not None:
        pytest.skip("the run finished before the signal (this machine was faster than the reference run)")
    for i, name in enumerate(signals):
        if i:
            time.sleep(0.05)
        p.send_signal(getattr(signal, name))
    rc = p.wait(timeout=120)
    err = p.stderr.read()
    out.close()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    if rc in (0, -getattr(signal, signals[0])) and "== result ==" in open(run + ".out").read():
        pytest.skip("the signal arrived after training had finished (the run is complete)")
    assert rc == 128 + getattr(signal, signals[0]), err
    assert len(lines) == 1 and "Traceback" not in err, err
    m = re.search(r"stopped by (\w+) at step (\d+): .*last.pt holds step (\d+); continue with: python ppap.py "
                  r"--resume", lines[0])
    if m is None:                                                  # stopped before the first step finished
        assert re.search(r"stopped by \w+ at step 0: nothing was saved", lines[0]), lines[0]
        return
    assert m.group(1) == signals[0] and m.group(2) == m.group(3)  # the last finished step is the one saved
    step = int(m.group(3))
    assert weights(run)[0] == step
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, os.path.join(ROOT, "ppap.py"), "--resume", run, "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    final = weights(run)
    assert final[0] == reference[0] == 12
    assert same(final[1], reference[1]) and same(final[2], reference[2])
    log = [ln for ln in open(os.path.join(run, "log.jsonl"))]
    assert [int(re.search(r'"step": (\d+)', ln).group(1)) for ln in log] == [3, 6, 9, 12]   # no step twice


def test_a_second_signal_never_interrupts_the_save(monkeypatch, tmp_path, capsys):
    """The save of the exit path runs with signals deferred: a SIGINT during it (here: from inside
    torch.save) neither aborts the save nor leaves a partial file."""
    real, calls = ppap.save_checkpoint, []

    def slow_save(*a, **kw):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)             # a second Ctrl-C while the first save writes
        return real(*a, **kw)
    steps = []

    def stop_in_4(*a, **kw):
        steps.append(1)
        if len(steps) == 4:
            os.kill(os.getpid(), signal.SIGTERM)            # the first signal, during step 4
        return real_step(*a, **kw)
    real_step = ppap.train_step
    monkeypatch.setattr(ppap, "train_step", stop_in_4)
    monkeypatch.setattr(ppap, "save_checkpoint", slow_save)
    run = str(tmp_path / "r")
    rc = ppap.main(S[:-4] + ["--max-steps", "6", "--val-every", "0", "--run", run])
    err = capsys.readouterr().err
    assert rc == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM at step 4" in err and "holds step 4" in err        # step 4 finished first
    assert torch.load(os.path.join(run, "last.pt"), weights_only=True)["step"] == 4
    assert not [f for f in os.listdir(run) if ".tmp" in f]


def _stop_at(monkeypatch, step_no, exc):
    real, n = ppap.train_step, []

    def step(*a, **kw):
        n.append(1)
        if len(n) == step_no:
            raise exc
        return real(*a, **kw)
    monkeypatch.setattr(ppap, "train_step", step)


@pytest.mark.parametrize("exc,says", [
    (ppap.PPAPError("cannot read data/x.jpg: broken data stream"), "cannot read data/x.jpg: broken data stream"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"), "out of memory in step 3"),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes"), "out of memory"),
    (ppap.Diverged("the loss is nan"), "training diverged at step 3: the loss is nan"),
], ids=["data", "cuda-oom", "cpu-oom", "diverged"])
def test_an_error_mid_run_saves_first_and_says_which_step_last_pt_holds(exc, says, monkeypatch, tmp_path, capsys):
    _stop_at(monkeypatch, 3, exc)
    run = str(tmp_path / "r")
    assert ppap.main(S[:-4] + ["--max-steps", "4", "--val-every", "0", "--run", run]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and says in err[0] and f"{os.path.join(run, 'last.pt')} holds step 2" in err[0], err
    assert torch.load(os.path.join(run, "last.pt"), weights_only=True)["step"] == 2
    assert ppap.main(["--resume", run, "--no-progress"]) == 0


def test_an_unexpected_error_saves_first_and_keeps_its_traceback(monkeypatch, tmp_path, capsys):
    _stop_at(monkeypatch, 3, ZeroDivisionError("a bug"))
    run = str(tmp_path / "r")
    with pytest.raises(ZeroDivisionError):
        ppap.main(S[:-4] + ["--max-steps", "4", "--val-every", "0", "--run", run])
    assert "holds step 2" in capsys.readouterr().err
    assert torch.load(os.path.join(run, "last.pt"), weights_only=True)["step"] == 2

"""Benchmarks of PPAP's loss and training step against the authors' implementation choices (run by hand).

    python tests/benchmarks.py [--device cpu|cuda] [--only loss,step,mem64,loader,cache] [--json OUT]
                               [--loss-batch 8] [--batch B] [--amp-dtype fp16|bf16] [--profile]

Every ratio is taken against a baseline measured by this same invocation on the same machine:

  loss  COCO ViT-S/8 shapes: --loss-batch images (default 8) -> N = 784 * B rows, D = 384, groups of 784,
        49 anchors per group (trainpatchsplit 16), T = 2 and the other cocostuff preset values.
        ours = ppap.PPAPLoss; baseline = tests/reference_loss.reference_ppap_loss (per-group Python loop,
        proxies from an [A, N, D] tensor). Forward + backward, median over repeats after warm-up; peak
        memory; relative difference of the two losses and of their gradients on the same inputs.
        Inputs are synthetic clustered features (27 classes in 6 super-classes, noise chosen so an anchor
        has ~500 positives and ~500 ambiguous samples of 6272), so no anchor group is degenerate.
  step  COCO ViT-S/8 preset (random weights, 27 classes), --batch images of 224 px from ppap.py's procedural
        generator (Gaussian-noise images give a random ViT no positive pairs, i.e. no PPAP loss at all):
        ours = ppap.train_step (fused SDPA attention, ppap_loss, the preset's AMP on CUDA);
        baseline = tests/baseline_authors.py (explicit softmax attention, reference loss, same AMP).
        Step time (median), images/s and peak memory.
  cache ppap.py --feature-cache (issue #23) in one process: the training step with the frozen backbone live,
        with the cached trunk output (--feature-cache) and with the cached criterion features too
        (--feature-cache-crit), steps interleaved on one model (machine load hits the three alike); the
        ratios are the later epochs' step speed-ups. Two configurations: the demo (vit_tiny_demo/8, 112 px,
        batch 16) and the COCO ViT-S/8 preset (224 px, --batch images, random weights). The cache is built
        by ppap.open_feature_cache over --batch x (warm-up + repeats) procedural crops in a temporary folder
        (build time per crop printed; rows are then read from the page cache, whose read time is printed
        apart); exactness: the cached rows against the live trunk on a shuffled batch of the same size and
        on batches of half the size (bitwise). --feature-cache-dtype fp16/bf16: the step's losses at the same
        weights on the same crops with the rows rounded as such a cache stores them (tests/test_feature_cache.py
        checks that it stores exactly that), against the exact rows.

Each case runs in a fresh subprocess. Memory: on CUDA, torch.cuda.max_memory_allocated minus
memory_allocated after setup (reset_peak_memory_stats first). On CPU, peak RSS growth over the RSS after
setup (inputs/model built, kernels warmed up on a tiny problem): the kernel's peak-RSS counter VmHWM is
reset by writing 5 to /proc/self/clear_refs, and read back after the warm-up and timed runs; where that
is not allowed, VmRSS is polled every 1 ms instead. RSS also counts what malloc keeps (per-thread arenas,
fragmentation), so on CPU a second figure is printed: the peak of live tensor bytes during one more, untimed
run, from torch.profiler(profile_memory=True). The CPU target (issue acceptance) for the loss is >= 5x
faster and >= 10x less peak memory than the reference; the verdict printed requires both memory figures.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _p in (str(REPO), str(REPO / "tests")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import ppap  # noqa: E402

MiB = 1 << 20
GROUP, ANCHORS = 784, 49                        # one /8 image at 224 px; 784 / trainpatchsplit 16


# ------------------------------------------------------------------------------------------ memory


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakMemory:
    """Peak memory growth (MiB) over the level at __enter__: CUDA allocator or process RSS."""

    def __init__(self, device: torch.device):
        self.device = device
        self.method = ""
        self.peak_mib = float("nan")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated - memory_allocated after setup"
            return self
        self.base = _status_kib("VmRSS")
        self.poller = None
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")                       # resets VmHWM to the current RSS
            self.method = "peak RSS growth over post-setup RSS (VmHWM reset via /proc/self/clear_refs)"
        except OSError:
            self.method = "peak RSS growth over post-setup RSS (VmRSS polled every 1 ms)"
            self.peak = [self.base]
            self.stop = threading.Event()

            def poll():
                while not self.stop.is_set():
                    self.peak[0] = max(self.peak[0], _status_kib("VmRSS"))
                    time.sleep(0.001)
            self.poller = threading.Thread(target=poll, daemon=True)
            self.poller.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mib = (torch.cuda.max_memory_allocated(self.device) - self.base) / MiB
        elif self.poller is None:
            self.peak_mib = (_status_kib("VmHWM") - self.base) / 1024
        else:
            self.stop.set()
            self.poller.join()
            self.peak_mib = (max(self.peak[0], _status_kib("VmRSS")) - self.base) / 1024
        return False


def tensor_peak_mib(run) -> float:
    """Peak bytes of live CPU tensors allocated during run() (torch.profiler profile_memory; independent of
    how malloc returns memory to the OS). NaN when the profiler's events cannot be read."""
    from torch.profiler import ProfilerActivity, profile
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            run()
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        events.sort(key=lambda e: e.start_ns())
        cur = peak = 0
        for e in events:
            cur += e.nbytes()
            peak = max(peak, cur)
        return peak / MiB
    except Exception:                       # a private profiler API: do not fail the benchmark on it
        return float("nan")


def small_op_ms(threads: int) -> float:
    """Time of one small elementwise op at `threads` threads: a few microseconds on an idle machine, several
    milliseconds when the cores are taken by other jobs (every parallel region then waits for a time slice)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    x = torch.randn(392, 384, generator=torch.Generator().manual_seed(0))    # leaves the global RNG alone
    for _ in range(3):
        x.mul(2.0)
    t0 = time.perf_counter()
    for _ in range(20):
        x.mul(2.0)
    torch.set_num_threads(saved)
    return (time.perf_counter() - t0) / 20 * 1e3


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -------------------------------------------------------------------------------------------- loss


def loss_kwargs() -> dict:
    """The COCO preset's loss hyper-parameters, in reference_ppap_loss's calling convention."""
    hp = ppap.loss_hyper(ppap.make_config({"data": "cocostuff"}))
    hp.pop("trainpatchsplit")
    return hp


def loss_inputs(batch: int, device: torch.device, seed: int = 0, dim: int = 384):
    """Clustered criterion features f [N,D], unit training features z [N,D] (leaf), anchors [B, 49]."""
    g = torch.Generator().manual_seed(seed)
    n = batch * GROUP
    sup = F.normalize(torch.randn(6, dim, generator=g), dim=1)
    centres = F.normalize(sup[torch.arange(27) % 6] + 0.9 * F.normalize(torch.randn(27, dim, generator=g), dim=1),
                          dim=1)
    label = torch.randint(0, 27, (n,), generator=g)
    f = F.normalize(centres[label] + 0.9 * F.normalize(torch.randn(n, dim, generator=g), dim=1), dim=1)
    mix = torch.randn(dim, dim, generator=g) / dim ** 0.5
    z = F.normalize(f @ mix + 0.5 * torch.randn(n, dim, generator=g) / dim ** 0.5, dim=1)
    anchors = ppap.draw_anchors(n, GROUP, ANCHORS, generator=g)
    return z.to(device).requires_grad_(True), f.to(device), anchors


def loss_fn(which: str, chunk_elems: int | None = None):
    from reference_loss import autograd_ppap_loss, ppap_loss_at, reference_ppap_loss
    if which == "ours":
        return lambda *a, **kw: ppap_loss_at(*a, chunk_elems=chunk_elems, **kw)
    return autograd_ppap_loss if which == "autograd" else reference_ppap_loss


def case_loss(spec: dict) -> dict:
    device = torch.device(spec["device"])
    fn, kw = loss_fn(spec["which"], spec.get("chunk_elems")), loss_kwargs()
    # warm the kernels up on one group (small), so lazy one-time allocations are not counted below
    zs, fs, anc = loss_inputs(1, device, seed=1)
    fn(zs, fs, anc, **kw)[0].backward()
    del zs, fs, anc
    z, f, anchors = loss_inputs(spec["batch"], device)
    probe = small_op_ms(torch.get_num_threads())
    sync(device)
    times, value, stats = [], None, None
    with PeakMemory(device) as mem:
        for i in range(spec["warmup"] + spec["repeats"]):
            z.grad = None
            sync(device)
            t0 = time.perf_counter()
            loss, stats = fn(z, f, anchors, **kw)
            loss.backward()
            sync(device)
            if i >= spec["warmup"]:
                times.append(time.perf_counter() - t0)
            value = loss.item()
            del loss
    if spec.get("save"):
        torch.save({"loss": value, "grad": z.grad.detach().float().cpu()}, spec["save"])
    out = dict(times_s=times, median_s=statistics.median(times), peak_mib=mem.peak_mib, memory_method=mem.method,
               loss=value, positives=stats["positives"], negatives=stats["negatives"], rows=z.shape[0],
               threads=torch.get_num_threads(), small_op_ms=probe)
    if device.type == "cpu":
        z.grad = None
        out["tensor_peak_mib"] = tensor_peak_mib(lambda: fn(z, f, anchors, **kw)[0].backward())
    if spec.get("profile"):
        out["profile"] = profile_table(lambda: fn(z, f, anchors, **kw)[0].backward(), device)
    return out


def profile_table(run, device: torch.device, rows: int = 18) -> str:
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts, record_shapes=True) as prof:
        run()
        sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages(group_by_input_shape=True).table(sort_by=key, row_limit=rows, max_name_column_width=38,
                                                              max_shapes_column_width=44)


# -------------------------------------------------------------------------------------------- step


def step_batch(batch: int, size: int) -> dict:
    """ppap.py's procedural images (Gaussian-noise images would give a random-weight ViT no positive pairs
    at all, so the PPAP loss would be skipped); labels in 0..5 of the 27 classes."""
    pairs = [ppap.synthetic_sample(i, size, "train") for i in range(batch)]
    img = torch.stack([torch.from_numpy(im).permute(2, 0, 1) for im, _ in pairs])
    return {"img": ppap.normalize(img), "label": torch.stack([torch.from_numpy(lb) for _, lb in pairs])}


def case_step(spec: dict) -> dict:
    import baseline_authors as base
    device = torch.device(spec["device"])
    torch.manual_seed(0)
    cfg = ppap.make_config({"data": "cocostuff", "batch_size": spec["batch"], "amp_dtype": spec["amp_dtype"],
                            "device": spec["device"], "progress": False})
    model = ppap.PPAP(ppap.new_backbone(cfg.arch, cfg.patch), 27).to(device)
    if spec["which"] == "baseline":
        assert base.use_explicit_attention(model) == 13
        step = base.authors_train_step
    else:
        criterion = ppap.build_loss(cfg)
        step = lambda *a: ppap.train_step(*a, criterion)     # noqa: E731
    opts = ppap.build_optimizers(cfg, model)
    scaler = ppap.make_scaler(cfg, device)
    model.train()
    batch = step_batch(cfg.batch_size, cfg.img_size)
    probe = small_op_ms(torch.get_num_threads())
    sync(device)
    times, first = [], None
    with PeakMemory(device) as mem:
        for i in range(spec["warmup"] + spec["repeats"]):
            sync(device)
            t0 = time.perf_counter()
            st = step(model, batch, opts, scaler, cfg, device)
            sync(device)
            if i >= spec["warmup"]:
                times.append(time.perf_counter() - t0)
            first = first or st
    med = statistics.median(times)
    out = dict(times_s=times, median_s=med, images_per_s=cfg.batch_size / med, peak_mib=mem.peak_mib,
               memory_method=mem.method, first_step=first, amp=ppap.amp_dtype(cfg, device) is not None,
               amp_dtype=cfg.amp_dtype if ppap.amp_dtype(cfg, device) is not None else "fp32",
               threads=torch.get_num_threads(), small_op_ms=probe)
    if device.type == "cpu":
        out["tensor_peak_mib"] = tensor_peak_mib(lambda: step(model, batch, opts, scaler, cfg, device))
    return out


# ------------------------------------------------------------------------------------------ cache


class _MemoSynthetic(ppap.SyntheticDataset):
    """The procedural train set, each crop generated once (the timed steps reuse them); still a
    SyntheticDataset, which is what the cache's key knows."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.memo = {}

    def __getitem__(self, i):
        if i not in self.memo:
            self.memo[i] = super().__getitem__(i)
        return self.memo[i]


def _collate(items: list) -> dict:
    return torch.utils.data.default_collate(items)


def _step_losses(model, batch: dict, cfg, device, criterion, seed: int) -> dict:
    """The step's loss terms on one batch at the model's current weights (no update), with the step's
    randomness drawn from `seed`."""
    gen = torch.Generator().manual_seed(seed)
    keep = ppap.crit_dropout_mask(batch["img"].shape[0], model.dim, gen)
    cached = {k: batch[k].to(device) for k in ("head_in", "crit") if k in batch}
    with torch.no_grad(), ppap.autocast(device, ppap.amp_dtype(cfg, device)):
        out = model(batch["img"].to(device), crit_keep=keep, probes=True, **cached)
        linear_sum, n, clusters = ppap.probe_losses(out, batch["label"].to(device), model.n_classes)
        loss, _ = criterion(out["z"], out["crit"].permute(0, 2, 3, 1).reshape(-1, model.dim), gen)
    return {"ppap": float(loss), "linear": float(linear_sum / n), "cluster": float(clusters[0])}


def case_cache(spec: dict) -> dict:
    import tempfile
    device = torch.device(spec["device"])
    torch.manual_seed(0)
    over = {"data": "synthetic"} if spec["config"] == "demo" else {"data": "cocostuff", "batch_size": spec["batch"]}
    cfg = ppap.make_config({**over, "device": spec["device"], "progress": False, "num_workers": 0,
                            "amp_dtype": spec["amp_dtype"]})
    B, steps = cfg.batch_size, spec["warmup"] + spec["repeats"]
    n_classes = 6 if spec["config"] == "demo" else 27
    model = ppap.PPAP(ppap.new_backbone(cfg.arch, cfg.patch), n_classes).to(device)
    criterion = ppap.build_loss(cfg)
    opts = ppap.build_optimizers(cfg, model)
    scaler = ppap.make_scaler(cfg, device)
    model.train()
    data = _MemoSynthetic("train", cfg.img_size, B * steps)
    with tempfile.TemporaryDirectory() as tmp:
        sets, build_s = {}, {}
        for name, crit in (("tokens", False), ("tokens+crit", True)):
            c = dataclasses.replace(cfg, feature_cache=os.path.join(tmp, name), feature_cache_crit=crit)
            if name == "tokens":
                for i in range(len(data)):
                    data[i]                              # generate the crops outside the timed build
            sync(device)
            t0 = time.perf_counter()
            sets[name] = ppap.open_feature_cache(c, model.backbone, data, device)
            sync(device)
            build_s[name] = time.perf_counter() - t0
        lay = sets["tokens"].done["layout"]
        computed = sum(-(-min(lay["shard_rows"], lay["crops"] - k * lay["shard_rows"]) // B) * B
                       for k in range(lay["shards"]))
        batches = {"live": [], "tokens": [], "tokens+crit": []}
        read_s = []
        for j in range(steps):
            idx = range(j * B, (j + 1) * B)
            batches["live"].append(_collate([data[i] for i in idx]))
            for name in ("tokens", "tokens+crit"):
                t0 = time.perf_counter()
                batches[name].append(_collate([sets[name][i] for i in idx]))
                if name == "tokens":
                    read_s.append(time.perf_counter() - t0)
        # exactness: the rows against the live trunk of the same crops in another batch of the same size, and
        # in batches of half the size (the shapes a run with another batch size would see)
        amp = ppap.amp_dtype(cfg, device)
        perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(1))[:B].tolist()
        img = torch.stack([data[i]["img"] for i in perm]).to(device)
        rows = torch.stack([sets["tokens+crit"][i]["head_in"] for i in perm]).to(device)
        crit = torch.stack([sets["tokens+crit"][i]["crit"] for i in perm]).to(device)
        with torch.no_grad(), ppap.autocast(device, amp):
            t, c = model.backbone.features(img)
            half = [model.backbone.trunk(img[a:a + max(1, B // 2)]) for a in range(0, B, max(1, B // 2))]
        exact_same = bool(torch.equal(t, rows) and torch.equal(c, crit))
        exact_half = bool(torch.equal(torch.cat(half), rows))
        max_diff_half = float((torch.cat(half).float() - rows.float()).abs().max())
        # half-precision caches: the losses at these (initial) weights with the rows rounded as they store them
        rounding = {}
        for name, dt in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
            diffs = {"ppap": [], "linear": [], "cluster": []}
            for j, b in enumerate(batches["tokens"]):
                exact = _step_losses(model, b, cfg, device, criterion, j)
                rounded = _step_losses(model, {**b, "head_in": b["head_in"].to(dt).float()}, cfg, device,
                                       criterion, j)
                for k in diffs:
                    diffs[k].append(abs(rounded[k] - exact[k]) / max(abs(exact[k]), 1e-12))
            rows = torch.cat([b["head_in"] for b in batches["tokens"]])
            rounding[name] = {"rows_rel_err": float((rows.to(dt).float() - rows).norm() / rows.norm()),
                              **{f"{k}_loss_rel_diff_max": max(v) for k, v in diffs.items()}}
        probe = small_op_ms(torch.get_num_threads())
        times = {k: [] for k in batches}
        for j in range(steps):
            for name in batches:
                sync(device)
                t0 = time.perf_counter()
                ppap.train_step(model, batches[name][j], opts, scaler, cfg, device, criterion)
                sync(device)
                if j >= spec["warmup"]:
                    times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return dict(config=spec["config"], arch=f"{cfg.arch}/{cfg.patch}", img_size=cfg.img_size, batch=B,
                crops=len(data), computed_crops=computed, shard_rows=lay["shard_rows"], times_s=times, median_s=med,
                build_s=build_s, read_ms=1e3 * statistics.median(read_s), exact_same_batch=exact_same,
                exact_half_batch=exact_half, max_diff_half_batch=max_diff_half, rounding=rounding,
                amp_dtype=str(amp).removeprefix("torch.") if amp is not None else "fp32",
                threads=torch.get_num_threads(), small_op_ms=probe)


def bench_cache(args, results: dict) -> None:
    results["cache"] = {}
    for config in [c.strip() for c in args.cache_configs.split(",") if c.strip()]:
        r = run_case(dict(kind="cache", config=config, device=args.device, batch=args.batch, warmup=args.warmup,
                          repeats=args.step_repeats, amp_dtype=args.amp_dtype, threads=args.threads))
        med = r["median_s"]
        print(f"\ncache {config}: {r['arch']}, {r['img_size']} px, batch {r['batch']}, {args.device} "
              f"({r['amp_dtype']}, {r['threads']} threads), one process, steps interleaved, median of "
              f"{args.step_repeats} after {args.warmup} warm-up")
        contention_note(args.device, r)
        live_crop = med["live"] / r["batch"]
        print(f"  first pass: {r['build_s']['tokens']:.1f} s for {r['crops']} crops "
              f"({1e3 * r['build_s']['tokens'] / r['crops']:.0f} ms/crop; tokens + crit "
              f"{1e3 * r['build_s']['tokens+crit'] / r['crops']:.0f} ms/crop; a live step: "
              f"{1e3 * live_crop:.0f} ms/crop; here {r['computed_crops']} crops computed for {r['crops']} stored: "
              f"batches padded to {r['batch']} at the end of the last shard); reading a batch's rows: "
              f"{r['read_ms']:.1f} ms (page cache)")
        print(f"  {'':36s} {'step':>10s} {'speed-up':>9s}")
        for name, label in (("live", "live (no cache)"), ("tokens", "--feature-cache"),
                            ("tokens+crit", "--feature-cache --feature-cache-crit")):
            print(f"  {label:36s} {med[name] * 1e3:8.1f}ms {med['live'] / med[name]:8.2f}x")
        print(f"  exact: cached rows == live trunk on a shuffled batch of {r['batch']}: {r['exact_same_batch']}; "
              f"in batches of {max(1, r['batch'] // 2)}: {r['exact_half_batch']} (max |diff| "
              f"{r['max_diff_half_batch']:.2g})")
        for name, d in r["rounding"].items():
            print(f"  --feature-cache-dtype {name}: rows off by {d['rows_rel_err']:.1e} (relative norm); the step's "
                  f"losses at the same weights on the same {r['crops']} crops off by at most "
                  + ", ".join(f"{d[k + '_loss_rel_diff_max']:.1e} ({k})" for k in ("ppap", "linear", "cluster"))
                  + " relative")
        r["speedup"] = {k: med["live"] / med[k] for k in ("tokens", "tokens+crit")}
        results["cache"][config] = r


# ------------------------------------------------------------------------------------------ driver


def run_case(spec: dict) -> dict:
    """Runs one case in a fresh interpreter -> its result dict (with the load average around it)."""
    load0 = os.getloadavg()
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"case {spec['kind']}/{spec['which']} failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["loadavg_before"], res["loadavg_after"] = load0, os.getloadavg()
    return res


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def memory_columns(ours: dict, base: dict) -> tuple[str, list, list, list]:
    """Header and per-row memory cells; on CPU both the RSS figure and the live-tensor figure."""
    cpu = "tensor_peak_mib" in ours
    head = f"{'peak MiB':>10s}" + (f" {'tensors MiB':>12s}" if cpu else "")

    def cells(r):
        return f"{r['peak_mib']:10.1f}" + (f" {r['tensor_peak_mib']:12.1f}" if cpu else "")
    ratios = [base["peak_mib"] / max(ours["peak_mib"], 1e-3)]
    if cpu:
        ratios.append(base["tensor_peak_mib"] / max(ours["tensor_peak_mib"], 1e-3))
    return head, cells(base), cells(ours), ratios


def contention_note(device: str, *cases: dict) -> None:
    """Warns when the timed processes saw multi-thread wake-up stalls (CPUs taken by other jobs)."""
    if device != "cpu":
        return
    probes = [c["small_op_ms"] for c in cases]
    threads = cases[0]["threads"]
    print("      small-op probe in the timed processes: " + ", ".join(f"{p:.3f}" for p in probes)
          + f" ms per op at {threads} threads (an idle machine: ~0.02)")
    if threads > 1 and max(probes) > 1.0:
        print(f"      WARNING: CPUs oversubscribed (load {os.getloadavg()[0]:.1f}): every parallel op waits "
              f"~{max(probes):.0f} ms for a time slice, so times at {threads} threads mostly count ops; "
              f"rerun with --threads 1")


def memory_note(ours: dict) -> str:
    note = f"      memory: {ours['memory_method']}"
    if "tensor_peak_mib" in ours:
        note += ("\n              tensors MiB = peak of live CPU tensors allocated during one more (untimed) "
                 "run, from torch.profiler(profile_memory=True)")
    return note


def bench_loss(args, results: dict) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        common = dict(kind="loss", device=args.device, batch=args.loss_batch, warmup=args.warmup,
                      repeats=args.loss_repeats, threads=args.threads)
        ours = run_case({**common, "which": "ours", "save": f"{tmp}/ours.pt", "profile": args.profile,
                         "chunk_elems": args.chunk_elems})
        ref = run_case({**common, "which": "reference", "save": f"{tmp}/ref.pt"})
        a, b = torch.load(f"{tmp}/ours.pt"), torch.load(f"{tmp}/ref.pt")
    loss_rel = rel(a["loss"], b["loss"])
    grad_rel = ((a["grad"] - b["grad"]).norm() / b["grad"].norm()).item()
    speed = ref["median_s"] / ours["median_s"]
    head, ref_cells, ours_cells, mems = memory_columns(ours, ref)
    met = speed >= 5 and all(m >= 10 for m in mems)
    threads = args.threads or torch.get_num_threads()
    print(f"\nloss  B={args.loss_batch} -> N={ours['rows']} rows, D=384, group {GROUP}, {ANCHORS} anchors/group, "
          f"T=2, {args.device} ({threads} threads), forward+backward, median of {args.loss_repeats} after "
          f"{args.warmup} warm-up")
    print(memory_note(ours))
    contention_note(args.device, ours, ref)
    print(f"      per anchor: {ours['positives']:.0f} positives, {ours['negatives']:.0f} negatives")
    label = "ours (ppap.PPAPLoss)" if not args.chunk_elems else f"ours (chunk_elems={args.chunk_elems})"
    print(f"  {'':28s} {'time':>10s} {head}")
    print(f"  {'reference ([A,N,D], loop)':28s} {ref['median_s'] * 1e3:8.1f}ms {ref_cells}")
    print(f"  {label:28s} {ours['median_s'] * 1e3:8.1f}ms {ours_cells}")
    print(f"  ratio: x{speed:.2f} faster, peak memory /" + " (RSS), /".join(f"{m:.1f}" for m in mems)
          + (" (tensors)" if len(mems) > 1 else "")
          + (f"   [CPU target >=5x time, >=10x memory: {'MET' if met else 'NOT MET'}]"
             if args.device == "cpu" else ""))
    print(f"  agreement: loss {a['loss']:.6f} vs {b['loss']:.6f} (rel diff {loss_rel:.2e}), "
          f"grad rel diff {grad_rel:.2e}")
    if ours.get("profile"):
        print("\n  profile of ours (one forward+backward):\n" + ours.pop("profile"))
    results["loss"] = dict(batch=args.loss_batch, rows=ours["rows"], chunk_elems=args.chunk_elems, ours=ours,
                           reference=ref, speedup=speed, memory_ratio=mems[0],
                           tensor_memory_ratio=mems[1] if len(mems) > 1 else None, loss_rel_diff=loss_rel,
                           grad_rel_diff=grad_rel, cpu_target_met=bool(met) if args.device == "cpu" else None)


def bench_mem64(args, results: dict) -> None:
    """The loss at the COCO ViT-S/8 batch (B=64, N=50,176): ours (custom backward keeping one byte per
    anchor and sample) vs the same chunked loss with plain autograd (keeps every chunk's logits)."""
    with tempfile.TemporaryDirectory() as tmp:
        common = dict(kind="loss", device=args.device, batch=args.mem_batch, warmup=1, repeats=1,
                      threads=args.threads)
        ours = run_case({**common, "which": "ours", "save": f"{tmp}/ours.pt"})
        before = run_case({**common, "which": "autograd", "save": f"{tmp}/before.pt"})
        a, b = torch.load(f"{tmp}/ours.pt"), torch.load(f"{tmp}/before.pt")
    grad_rel = ((a["grad"] - b["grad"]).abs().max() / b["grad"].abs().max()).item()
    head, before_cells, ours_cells, mems = memory_columns(ours, before)
    print(f"\nmem64 loss at B={args.mem_batch} -> N={ours['rows']} rows, D=384, {ANCHORS} anchors/group, T=2, "
          f"{args.device}, forward+backward")
    print(memory_note(ours))
    print(f"  {'':34s} {'time':>10s} {head}")
    print(f"  {'before (plain autograd, logits kept)':34s} {before['median_s'] * 1e3:8.1f}ms {before_cells}")
    print(f"  {'ours (masks kept, logits recomputed)':34s} {ours['median_s'] * 1e3:8.1f}ms {ours_cells}")
    print(f"  peak memory /" + " (RSS), /".join(f"{m:.2f}" for m in mems) + (" (tensors)" if len(mems) > 1 else "")
          + f"; time x{before['median_s'] / ours['median_s']:.2f}; loss {a['loss']:.6f} vs {b['loss']:.6f}, "
          f"max |grad diff| / max |grad| = {grad_rel:.1e}")
    results["mem64"] = dict(batch=args.mem_batch, ours=ours, before=before, memory_ratio=mems[0],
                            tensor_memory_ratio=mems[1] if len(mems) > 1 else None, grad_rel_diff=grad_rel)


def make_crop_tree(root: Path, n_sources: int) -> list:
    """A five-crop training tree as ppap.py builds it, from n_sources generated 640x480 photos-like images
    (JPEG with Pillow's defaults, labels as label+1 PNGs) -> the crop pairs."""
    import numpy as np
    from PIL import Image
    pairs = []
    for i in range(n_sources):
        img, lab = ppap.synthetic_sample(i, 480, "train")
        img = np.concatenate([img, img[:, :160]], axis=1)[:, :640]          # 640x480, COCO's usual size
        lab = np.concatenate([lab, lab[:, :160]], axis=1)[:, :640]
        rgb = Image.fromarray((img * 255).astype(np.uint8))
        stored = Image.fromarray((lab + 1).astype(np.uint8))
        for k, box in enumerate(ppap.five_crop_boxes(640, 480)):
            j = 5 * i + k
            ip, lp = root / f"{j}.jpg", root / f"{j}.png"
            rgb.crop(box).save(ip, format="JPEG")
            stored.crop(box).save(lp, format="PNG")
            pairs.append((str(ip), str(lp)))
    return pairs


def bench_loader(args, results: dict) -> None:
    """Training images per second the data pipeline delivers at the COCO preset (five-crop JPEGs -> 224 px
    tensors, batch 64) with ppap.make_loader's defaults, against what a 20-minute COCO run needs."""
    cfg = ppap.make_config({"data": "cocostuff", "num_workers": args.loader_workers, "progress": False})
    workers = ppap.loader_workers(cfg)
    need = 5 * 5 * 49_629 / 1200                       # 5 epochs of the five-crop set (~248k crops) in 20 min
    with tempfile.TemporaryDirectory() as tmp:
        pairs = make_crop_tree(Path(tmp), args.loader_sources)
        ds = ppap.RealSegDataset("cocostuff", ppap.read_five_crop, pairs, cfg.img_size, ppap.COCOSTUFF27_CLASS_NAMES)
        loader = ppap.make_loader(cfg, ds, train=True)
        n, t0, first = 0, time.perf_counter(), None
        for batch in loader:
            n += batch["img"].shape[0]
            if first is None:
                first, t1 = time.perf_counter() - t0, time.perf_counter()
        rate = (n - cfg.batch_size) / max(time.perf_counter() - t1, 1e-9) if n > cfg.batch_size else float("nan")
    print(f"\nloader five-crop JPEGs ({len(pairs)} crops of 320x240) -> {cfg.img_size} px, batch {cfg.batch_size}, "
          f"{workers} workers (of {os.cpu_count()} CPUs), pinned={torch.cuda.is_available()}")
    print(f"  {rate:8.0f} images/s after the first batch ({first:.2f} s to start); a 20-minute COCO run needs "
          f"~{need:.0f} images/s -> x{rate / need:.2f} of that on this machine")
    results["loader"] = dict(images_per_s=rate, first_batch_s=first, workers=workers, crops=len(pairs),
                             needed_images_per_s=need, ratio_to_needed=rate / need)


def bench_step(args, results: dict) -> None:
    common = dict(kind="step", device=args.device, batch=args.batch, warmup=args.warmup,
                  repeats=args.step_repeats, amp_dtype=args.amp_dtype, threads=args.threads)
    ours = run_case({**common, "which": "ours"})
    base = run_case({**common, "which": "baseline"})
    speed = base["median_s"] / ours["median_s"]
    head, base_cells, ours_cells, mems = memory_columns(ours, base)
    print(f"\nstep  COCO ViT-S/8 preset, B={args.batch}, 224 px, {args.device} "
          f"({ours['amp_dtype']}, {args.threads or torch.get_num_threads()} threads), median of "
          f"{args.step_repeats} after {args.warmup} warm-up")
    print(memory_note(ours))
    contention_note(args.device, ours, base)
    print(f"  {'':34s} {'time':>10s} {'img/s':>8s} {head}")
    print(f"  {'baseline (explicit attn, ref loss)':34s} {base['median_s'] * 1e3:8.1f}ms "
          f"{base['images_per_s']:8.2f} {base_cells}")
    print(f"  {'ours (ppap.train_step)':34s} {ours['median_s'] * 1e3:8.1f}ms "
          f"{ours['images_per_s']:8.2f} {ours_cells}")
    fo, fb = ours["first_step"], base["first_step"]
    print(f"  ratio: x{speed:.2f} faster, peak memory /" + " (RSS), /".join(f"{m:.2f}" for m in mems)
          + (" (tensors)" if len(mems) > 1 else ""))
    print(f"  first step: PPAP loss ours {fo['ppap']:.5f} vs baseline {fb['ppap']:.5f}; per anchor "
          f"{fo['positives']:.0f} positives, {fo['negatives']:.0f} negatives of {args.batch * GROUP}")
    results["step"] = dict(batch=args.batch, ours=ours, baseline=base, speedup=speed, memory_ratio=mems[0],
                           tensor_memory_ratio=mems[1] if len(mems) > 1 else None)


def environment(device: str) -> dict:
    env = dict(torch=torch.__version__, cuda=torch.version.cuda, python=platform.python_version(),
               git=ppap.git_commit(), host=platform.node(), cpu_count=os.cpu_count(),
               threads=torch.get_num_threads(), device=device, load_start=os.getloadavg(), argv=sys.argv[1:],
               time=time.strftime("%Y-%m-%d %H:%M:%S"))
    if device.startswith("cuda"):
        env["device_name"] = torch.cuda.get_device_name(torch.device(device))
    else:
        env["device_name"] = platform.processor() or platform.machine()
    return env


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu)")
    p.add_argument("--only", default="loss,step", help="comma list of: loss, step, mem64, loader, cache")
    p.add_argument("--json", type=Path, help="also write the numbers to this file")
    p.add_argument("--loss-batch", type=int, default=8, help="images for the loss benchmark (N = 784 B)")
    p.add_argument("--batch", type=int, help="images per training step (default 4 on CPU, 64 on CUDA)")
    p.add_argument("--amp-dtype", choices=("fp16", "bf16"), default="fp16", help="autocast dtype on CUDA")
    p.add_argument("--warmup", type=int, help="untimed runs first (default 1 on CPU, 2 on CUDA)")
    p.add_argument("--loss-repeats", type=int, help="timed loss runs (default 3 on CPU, 10 on CUDA)")
    p.add_argument("--step-repeats", type=int, help="timed steps (default 2 on CPU, 6 on CUDA)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads in every case (default: torch's)")
    p.add_argument("--chunk-elems", type=int, help="pass chunk_elems to ppap_loss (default: its own default)")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of ours' loss")
    p.add_argument("--mem-batch", type=int, default=64, help="images for the mem64 loss benchmark")
    p.add_argument("--loader-sources", type=int, default=200, help="source images for the loader benchmark "
                   "(x5 crops)")
    p.add_argument("--loader-workers", type=int, default=-1, help="DataLoader workers (-1: ppap's default)")
    p.add_argument("--cache-configs", default="demo,vits8", help="the cache benchmark's configurations: demo "
                   "(vit_tiny_demo/8, 112 px, batch 16), vits8 (COCO ViT-S/8, 224 px, --batch)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        spec = json.loads(args.child)
        if spec.get("threads"):
            torch.set_num_threads(spec["threads"])
        res = {"loss": case_loss, "step": case_step, "cache": case_cache}[spec["kind"]](spec)
        print(json.dumps(res))
        return 0

    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print("error: --device cuda, but torch sees no GPU", file=sys.stderr)
        return 2
    args.batch = args.batch or (64 if cuda else 4)
    args.loss_repeats = args.loss_repeats or (10 if cuda else 3)
    args.step_repeats = args.step_repeats or (6 if cuda else 2)
    args.warmup = args.warmup if args.warmup is not None else (2 if cuda else 1)
    parts = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(parts) - {"loss", "step", "mem64", "loader", "cache"}
    if unknown:
        p.error(f"--only: unknown part(s) {', '.join(sorted(unknown))}")
    if "step" in parts and args.batch * (224 // 8) ** 2 < GROUP:
        p.error("--batch must be >= 1")

    results = {"env": environment(args.device)}
    e = results["env"]
    print(f"PPAP benchmarks | git {e['git']} | torch {e['torch']} (CUDA {e['cuda']}) | {e['device_name']} | "
          f"{e['threads']} threads, {e['cpu_count']} CPUs | load {os.getloadavg()[0]:.2f}")
    failed = []
    for part, fn in (("loss", bench_loss), ("step", bench_step), ("mem64", bench_mem64), ("loader", bench_loader),
                     ("cache", bench_cache)):
        if part in parts:
            try:
                fn(args, results)
            except Exception as exc:         # report and go on with the next part
                failed.append(part)
                results[part] = {"error": str(exc)}
                print(f"\n{part}: FAILED: {exc}", file=sys.stderr)
    results["loadavg_end"] = os.getloadavg()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
        print(f"\nwrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark of the ext/ kernels against their baselines (run by hand).

    python tests/bench_ext.py [--big] [--json PATH] [--repeats N]

Prints, with every ratio taken against a baseline run on the same machine in
the same invocation:
  * dense CRF, 320x320, 27 classes, 10 iterations: ours vs pydensecrf, seconds
    per image for one image and for a batch of 8 (pydensecrf runs the images
    one after another, as the PPAP authors do);
  * top-k, M = K = 20,000, D = 384, k = 30 (cosine): ours vs
    torch.topk(q @ keys^T), wall time and peak memory;
  * --big: ours at M = K = 100,000, D = 384, k = 10, checking peak < 1 GB;
  * with a GPU: CUDA CRF vs pydensecrf, CUDA top-k vs torch.topk at
    M = K = 50,000 (time and torch.cuda.max_memory_allocated).

CPU peak memory is measured in a fresh subprocess per case: the inputs are
created, the peak-RSS counter is reset (/proc/self/clear_refs, or 1 ms RSS
polling where that is not allowed), the op runs once, and the reported figure
is peak RSS minus the RSS before the call, i.e. the op's own transient memory
including its outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # crf_scenes, when run as a script

import torch  # noqa: E402

import ext  # noqa: E402
from crf_scenes import pydensecrf_inference, synthetic_scene  # noqa: E402

MiB = 1 << 20


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def sync_if_cuda(t):
    if isinstance(t, torch.Tensor) and t.is_cuda:
        torch.cuda.synchronize(t.device)


# ------------------------------------------------------------------------ dense CRF


def bench_crf(repeats: int, results: dict) -> None:
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        print("crf: pydensecrf not installed (pip install pydensecrf2); skipping")
        return
    scenes = [synthetic_scene(320, 320, 27, seed=s) for s in range(8)]
    images = torch.stack([torch.from_numpy(im) for im, _ in scenes])
    probs = torch.stack([torch.from_numpy(p) for _, p in scenes])
    ext.dense_crf(images[:1], probs[:1], iters=1)  # build + warm up

    one_ref = best_time(lambda: pydensecrf_inference(*scenes[0]), repeats)
    one_ours = best_time(lambda: ext.dense_crf(images[:1], probs[:1]), repeats)
    batch_ref = best_time(lambda: [pydensecrf_inference(*s) for s in scenes], 1) / 8
    batch_ours = best_time(lambda: ext.dense_crf(images, probs), max(1, repeats - 1)) / 8
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # pydensecrf is single-threaded: compare per core too
    one_thread = best_time(lambda: ext.dense_crf(images[:1], probs[:1]), repeats)
    torch.set_num_threads(threads)
    print(f"crf 320x320x27, 10 iters, {threads} threads (seconds per image):")
    print(f"  1 image : pydensecrf {one_ref:.3f}  ours {one_ours:.3f}  "
          f"speed-up x{one_ref / one_ours:.2f}")
    print(f"  1 image, 1 thread: ours {one_thread:.3f}  speed-up x{one_ref / one_thread:.2f}")
    print(f"  batch 8 : pydensecrf {batch_ref:.3f}  ours {batch_ours:.3f}  "
          f"speed-up x{batch_ref / batch_ours:.2f}")
    results["crf_cpu"] = dict(threads=threads, one_pydensecrf_s=one_ref,
                              one_ours_s=one_ours, one_ours_1thread_s=one_thread,
                              batch8_pydensecrf_s_per_image=batch_ref,
                              batch8_ours_s_per_image=batch_ours)

    if torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
        img_d, prob_d = images.to(device), probs.to(device)

        def run_gpu(n):
            sync_if_cuda(ext.dense_crf(img_d[:n], prob_d[:n]))

        run_gpu(1)
        gpu_one = best_time(lambda: run_gpu(1), repeats)
        gpu_batch = best_time(lambda: run_gpu(8), repeats) / 8
        print(f"  CUDA    : 1 image {gpu_one:.4f}  batch 8 {gpu_batch:.4f} s/image  "
              f"speed-up vs pydensecrf x{one_ref / gpu_one:.1f} / x{batch_ref / gpu_batch:.1f}")
        results["crf_cuda"] = dict(device=torch.cuda.get_device_name(device), one_s=gpu_one,
                                   batch8_s_per_image=gpu_batch)


# ---------------------------------------------------------------------------- top-k

_CHILD = r"""
import json, os, sys, threading, time
sys.path.insert(0, {repo!r})
import torch, ext
M, K, D, k, which = {M}, {K}, {D}, {k}, {which!r}
gen = torch.Generator().manual_seed(0)
q, keys = torch.randn(M, D, generator=gen), torch.randn(K, D, generator=gen)
ext.topk_neighbors(q[:8], keys[:64], 4)  # load the library, warm up the threads

def rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])

try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (peak RSS) to the current RSS
    method = "VmHWM after clear_refs"
    poller = None
except OSError:
    method = "VmRSS polled every 1 ms"
    peak = [rss_kib("VmRSS")]
    stop = threading.Event()
    def poll():
        while not stop.is_set():
            peak[0] = max(peak[0], rss_kib("VmRSS")); time.sleep(0.001)
    poller = threading.Thread(target=poll, daemon=True); poller.start()

before = rss_kib("VmRSS")
start = time.perf_counter()
if which == "ours":
    values, indices = ext.topk_neighbors(q, keys, k)
else:
    values, indices = ext.topk_neighbors_reference(q, keys, k)
seconds = time.perf_counter() - start
if poller is None:
    high = rss_kib("VmHWM")
else:
    stop.set(); poller.join(); high = peak[0]
print(json.dumps(dict(seconds=seconds, peak_delta_mib=(high - before) / 1024, method=method,
                      threads=torch.get_num_threads())))
"""


def topk_cpu_case(M: int, K: int, D: int, k: int, which: str) -> dict:
    code = _CHILD.format(repo=str(REPO), M=M, K=K, D=D, k=k, which=which)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"top-k subprocess failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_topk_cpu(results: dict, big: bool) -> None:
    M = K = 20_000
    ours = topk_cpu_case(M, K, 384, 30, "ours")
    ref = topk_cpu_case(M, K, 384, 30, "torch")
    print(f"top-k CPU M=K={M}, D=384, k=30, cosine ({ours['threads']} threads; "
          f"memory: peak RSS delta, {ours['method']}):")
    print(f"  torch.topk(q @ keys.T): {ref['seconds']:.2f} s, {ref['peak_delta_mib']:.0f} MiB")
    print(f"  ours                  : {ours['seconds']:.2f} s, {ours['peak_delta_mib']:.0f} MiB  "
          f"(time x{ref['seconds'] / ours['seconds']:.2f} faster, "
          f"memory /{ref['peak_delta_mib'] / max(ours['peak_delta_mib'], 1):.0f})")
    results["topk_cpu_20k"] = dict(ours=ours, torch=ref)
    if big:
        M = K = 100_000
        big_res = topk_cpu_case(M, K, 384, 10, "ours")
        ok = big_res["peak_delta_mib"] < 1024
        print(f"  --big M=K={M}, k=10: ours {big_res['seconds']:.1f} s, "
              f"{big_res['peak_delta_mib']:.0f} MiB -> {'OK' if ok else 'FAIL'} (< 1 GB); "
              f"torch.topk would need {M * K * 4 / 2**30:.0f} GiB for the similarities alone")
        results["topk_cpu_100k"] = dict(ours=big_res, peak_below_1GB=ok)


def bench_topk_cuda(results: dict, repeats: int) -> None:
    if not torch.cuda.is_available():
        return
    device = torch.device("cuda", torch.cuda.current_device())
    M = K = 50_000
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(M, 384, generator=gen).to(device)
    keys = torch.randn(K, 384, generator=gen).to(device)

    def measure(fn):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        seconds = best_time(lambda: (fn(), torch.cuda.synchronize(device)), repeats)
        return seconds, (torch.cuda.max_memory_allocated(device) - base) / MiB

    ext.topk_neighbors(q[:8], keys[:64], 4)
    ours_s, ours_mem = measure(lambda: ext.topk_neighbors(q, keys, 30))
    try:
        ref_s, ref_mem = measure(lambda: ext.topk_neighbors_reference(q, keys, 30))
    except torch.OutOfMemoryError:
        ref_s, ref_mem = float("nan"), float("nan")
    print(f"top-k CUDA M=K={M}, D=384, k=30 ({torch.cuda.get_device_name(device)}; "
          "memory: max_memory_allocated above the inputs):")
    print(f"  torch.topk(q @ keys.T): {ref_s * 1e3:.1f} ms, {ref_mem:.0f} MiB")
    print(f"  ours                  : {ours_s * 1e3:.1f} ms, {ours_mem:.0f} MiB "
          f"(time x{ref_s / ours_s:.2f})")
    results["topk_cuda_50k"] = dict(ours_s=ours_s, ours_mib=ours_mem, torch_s=ref_s,
                                    torch_mib=ref_mem)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--big", action="store_true", help="also top-k at M=K=100,000")
    parser.add_argument("--json", type=Path, help="write the numbers to this JSON file")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats (best of)")
    parser.add_argument("--skip-crf", action="store_true")
    parser.add_argument("--skip-topk", action="store_true")
    args = parser.parse_args()

    ext.load()
    results: dict = dict(torch=torch.__version__, threads=torch.get_num_threads(),
                         cpu_count=os.cpu_count())
    if not args.skip_crf:
        bench_crf(args.repeats, results)
    if not args.skip_topk:
        bench_topk_cpu(results, args.big)
        bench_topk_cuda(results, args.repeats)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

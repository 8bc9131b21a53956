"""Self-check of the CUDA kernels against the CPU kernels.

The CUDA kernels cannot be tested where there is no GPU, and a GPU they were
not tested on (driver, architecture, compiler) could compute something else.
So the first time a process runs a CUDA op on a device, ``ext`` runs the op
once on a small fixed input on that device and on the CPU, and raises
SelfCheckError (with the way out) if they disagree.  PPAP_EXT_SKIP_SELFCHECK=1
skips it (benchmarks).

Tolerances: CRF max |dQ| <= 1e-4 and the same argmax on >= 99.9 % of pixels
(the kernels round the lattice arithmetic identically; only the order of the
CUDA splat's atomic additions differs); top-k values within 1e-5 and indices
equal except among similarities equal to within 1e-5.  The top-k input is
unit vectors (cosine similarity, what the op is for), so values are at most
1 in magnitude, where a float step is at most 1.2e-7: the tolerance covers
~80 steps, far more than summation orders differ by, and far less than
half-precision or TF32 arithmetic (~1e-3) would give.

The check runs with autocast disabled, and the ops themselves ignore
autocast and TF32 settings (csrc/ops.h, Float32Math), so a caller's
torch.autocast or torch.set_float32_matmul_precision("high") can neither make
it fail nor change what it checks.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Callable

import torch
import torch.nn.functional as F

CRF_MAX_ABS = 1e-4
CRF_MIN_ARGMAX_AGREEMENT = 0.999
TOPK_ATOL = 1e-5

CRF_WAY_OUT = "run the CRF on the CPU (eval.py --crf-device cpu) or set PPAP_EXT_REFERENCE=1"
TOPK_WAY_OUT = "set PPAP_EXT_REFERENCE=1"

OPS = ("dense_crf", "topk_neighbors")


class SelfCheckError(RuntimeError):
    """A CUDA kernel disagrees with the CPU kernel (message is one line)."""


_lock = threading.Lock()
# (op, device) -> None once passed, or the SelfCheckError it raised.
_results: dict[tuple[str, str], SelfCheckError | None] = {}
runs = 0  # number of self-checks run in this process (for the tests)


def skipped() -> bool:
    return os.environ.get("PPAP_EXT_SKIP_SELFCHECK", "") not in ("", "0")


def crf_inputs() -> tuple:
    """torch.ops.ppap_ext.dense_crf arguments: a 48x64 scene, 5 classes, default parameters.

    Regions of flat colour with noise, and noisy class probabilities that
    favour each region's class, so that both kernels and the mean field matter.
    """
    gen = torch.Generator().manual_seed(0)
    height, width, classes = 48, 64, 5
    rows = torch.arange(height)[:, None]
    cols = torch.arange(width)[None, :]
    region = (cols // 13 + 2 * (rows // 11) + (cols + rows) // 29) % classes  # [H, W]
    colours = torch.randint(30, 226, (classes, 3), generator=gen)
    noise = torch.randint(-12, 13, (height, width, 3), generator=gen)
    image = (colours[region] + noise).clamp(0, 255).to(torch.uint8)
    logits = torch.randn(classes, height, width, generator=gen)
    logits += 1.5 * torch.nn.functional.one_hot(region, classes).permute(2, 0, 1)
    probs = torch.softmax(2.0 * logits, dim=0)
    return (image[None].contiguous(), probs[None].contiguous(), 10, 1.0, 3.0, 67.0, 3.0, 4.0)


def topk_inputs() -> tuple:
    """torch.ops.ppap_ext.topk_neighbors arguments: 120 queries and 200 keys,
    unit vectors of 32 dimensions, k=16, key tiles of 64 and query blocks of
    48 (several of each, the last ones partial)."""
    gen = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(1, 120, 32, generator=gen), dim=-1)
    keys = F.normalize(torch.randn(1, 200, 32, generator=gen), dim=-1)
    return (q, keys, 16, 64, 48)


_INPUTS = {"dense_crf": crf_inputs, "topk_neighbors": topk_inputs}


def _on(device: torch.device, args: tuple) -> tuple:
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)


def _cpu(result):
    if isinstance(result, (tuple, list)):
        return tuple(r.cpu() for r in result)
    return result.cpu()


def _device_label(device: torch.device) -> str:
    if device.type == "cuda" and torch.cuda.is_available():
        try:
            return f"{device} ({torch.cuda.get_device_name(device)})"
        except (RuntimeError, AssertionError):
            pass
    return str(device)


def self_check(op_name: str, device: torch.device | str,
               run: Callable | None = None) -> dict[str, float]:
    """Compares op `op_name` on `device` with the CPU kernel on a fixed input.

    run(*args) gets the op's arguments as CPU tensors and numbers and returns
    its result; by default it runs torch.ops.ppap_ext.<op_name> on `device`.
    Returns the measured differences; raises SelfCheckError (one line, naming
    the way out) if they exceed the tolerances.  Always runs; the ops call
    it once per process and device (see maybe_self_check).
    """
    global runs
    if op_name not in _INPUTS:
        raise ValueError(f"self_check: op_name must be one of {OPS}, got {op_name!r}")
    device = torch.device(device)
    from . import _build

    _build.load_cpu()  # the reference, and the op schemas
    if run is None and device.type == "cuda":
        _build.load_cuda()
    elif run is None and device.type != "cpu":
        raise ValueError(f"self_check: device must be CPU or CUDA, got {device}")
    op = getattr(torch.ops.ppap_ext, op_name)
    if run is None:
        def run(*args):
            return op(*_on(device, args))
    args = _INPUTS[op_name]()
    with _autocast_disabled(device):
        expected = op(*args)  # the CPU kernel
        got = _cpu(run(*args))
    runs += 1
    where = f"ext: self-check of the {op_name} kernel on {_device_label(device)} failed"
    if op_name == "dense_crf":
        return _compare_crf(expected, got, where)
    return _compare_topk(args, expected, got, where)


def _autocast_disabled(device: torch.device) -> contextlib.ExitStack:
    """Autocast off for the CPU and for `device` (each has its own switch)."""
    stack = contextlib.ExitStack()
    for device_type in dict.fromkeys(("cpu", device.type)):
        stack.enter_context(torch.autocast(device_type, enabled=False))
    return stack


def _compare_crf(expected: torch.Tensor, got: torch.Tensor, where: str) -> dict[str, float]:
    if got.shape != expected.shape:
        raise SelfCheckError(f"{where}: Q has shape {tuple(got.shape)}, the CPU kernel's "
                             f"{tuple(expected.shape)}; {CRF_WAY_OUT}")
    max_abs = (got.double() - expected.double()).abs().max().item()  # NaN if got has NaN
    agree = (got.argmax(1) == expected.argmax(1)).double().mean().item()
    if not (max_abs <= CRF_MAX_ABS and agree >= CRF_MIN_ARGMAX_AGREEMENT):
        raise SelfCheckError(
            f"{where}: max |Q - Q_cpu| = {max_abs:.3g} (limit {CRF_MAX_ABS:g}), argmax equal on "
            f"{100 * agree:.2f}% of pixels (limit {100 * CRF_MIN_ARGMAX_AGREEMENT:g}%); "
            f"{CRF_WAY_OUT}")
    return {"max_abs": max_abs, "argmax_agreement": agree}


def _compare_topk(args: tuple, expected, got, where: str) -> dict[str, float]:
    (v_cpu, i_cpu), (v_dev, i_dev) = expected, got
    if v_dev.shape != v_cpu.shape or i_dev.shape != i_cpu.shape:
        raise SelfCheckError(f"{where}: results have shape {tuple(v_dev.shape)}, the CPU "
                             f"kernel's {tuple(v_cpu.shape)}; {TOPK_WAY_OUT}")
    max_abs = (v_dev.double() - v_cpu.double()).abs().max().item()
    # Where the indices differ, both must point at similarities equal to
    # within the tolerance (ties, possibly broken apart by GEMM rounding).
    q, keys = args[0].double(), args[1].double()
    sims = q @ keys.transpose(-1, -2)
    valid = bool(((i_dev >= 0) & (i_dev < keys.shape[1])).all())
    bad = int(i_dev.numel())
    if valid:
        differ = i_dev != i_cpu
        s_dev = torch.gather(sims, -1, i_dev)
        s_cpu = torch.gather(sims, -1, i_cpu)
        bad = int((differ & ~((s_dev - s_cpu).abs() <= TOPK_ATOL)).sum())
        # Each query's indices must also be distinct.
        bad += int((i_dev.sort(-1).values.diff(dim=-1) == 0).sum())
    if not (max_abs <= TOPK_ATOL and bad == 0):
        raise SelfCheckError(
            f"{where}: max |values - values_cpu| = {max_abs:.3g} (limit {TOPK_ATOL:g}), {bad} "
            f"indices differ beyond ties; {TOPK_WAY_OUT}")
    return {"max_abs": max_abs, "indices_differing_beyond_ties": bad}


def maybe_self_check(op_name: str, device: torch.device | str, run: Callable | None = None) -> bool:
    """self_check once per process, op and device (skipped under
    PPAP_EXT_SKIP_SELFCHECK=1).  A failure is remembered and raised again on
    every later call.  Returns whether the check ran now."""
    if skipped():
        return False
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (op_name, str(device))
    with _lock:
        if key in _results:
            if _results[key] is not None:
                raise _results[key]
            return False
        try:
            self_check(op_name, device, run)
        except SelfCheckError as exc:
            _results[key] = exc
            raise
        _results[key] = None
        return True

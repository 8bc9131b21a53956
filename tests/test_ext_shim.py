"""The CUDA kernels' logic, run on the CPU: ext/csrc/topk_cuda.cu and
crf_cuda.cu compiled as C++ against the host emulation of CUDA
(ext/csrc/shim/cuda_shim.h) and compared with the CPU kernels.

torch.ops.ppap_ext_shim.topk_neighbors / .dense_crf take CPU tensors and run
the CUDA implementations' host code and kernels (blocks on a thread pool,
__syncthreads as a barrier, atomics as std::atomic_ref).  What this proves and
what it cannot: README, "Kernels".  The first run compiles the emulation
library (about a minute on 2 cores); later runs reuse ext/build/.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import ext
from crf_scenes import synthetic_scene
from ext import _build

CRF_DEFAULTS = (1.0, 3.0, 67.0, 3.0, 4.0)  # pos_xy, pos_w, bi_xy, bi_rgb, bi_w


@pytest.fixture(scope="module")
def shim():
    _build.load_shim()
    return torch.ops.ppap_ext_shim


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits (NaN payloads and the sign of zero included)."""
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _assert_topk_identical(shim, q, keys, k, key_tile, query_block):
    v_cpu, i_cpu = torch.ops.ppap_ext.topk_neighbors(q, keys, k, key_tile, query_block)
    v_emu, i_emu = shim.topk_neighbors(q, keys, k, key_tile, query_block)
    assert v_emu.dtype == v_cpu.dtype and i_emu.dtype == torch.int64
    assert torch.equal(i_emu, i_cpu), (k, key_tile, query_block)
    assert torch.equal(_bits(v_emu), _bits(v_cpu)), (k, key_tile, query_block)


# ----------------------------------------------------------------------------- top-k


def test_shim_runs_the_select_kernel_with_barriers(shim):
    before = shim.stats()
    q, keys = torch.randn(1, 3, 4), torch.randn(1, 40, 4)
    _assert_topk_identical(shim, q, keys, 5, 16, 8)
    launches, blocks, cooperative, barriers = (a - b for a, b in zip(shim.stats(), before))
    # 3 tiles x 3 rows of select_topk_kernel, then one sort-key grid.
    assert launches == 4 and blocks == 10 and cooperative == 9
    assert barriers >= 9 * 256 * 17  # four radix passes of four barriers, and one more


@pytest.mark.parametrize("k,key_tile,query_block", [
    (1, 16, 7), (5, 16, 64), (20, 16, 8),   # k > key_tile
    (50, 16, 64),                           # k = K
    (50, 64, 3),                            # k = K inside one tile
])
def test_shim_topk_ties_nan_is_bit_identical(shim, k, key_tile, query_block):
    """Small integer vectors: many exact ties; NaN rows and keys (one with the
    sign bit set)."""
    gen = torch.Generator().manual_seed(k + key_tile)
    q = torch.randint(-2, 3, (2, 20, 6), generator=gen).float()
    keys = torch.randint(-2, 3, (2, 50, 6), generator=gen).float()
    q[0, 3] = math.nan
    q[1, 10, 2] = math.nan
    keys[0, [7, 30, 31, 49]] = math.nan
    keys[1, 0, 0] = float("-nan")
    _assert_topk_identical(shim, q, keys, k, key_tile, query_block)


def test_shim_topk_signed_zero_and_infinities(shim):
    # With D = 1 the similarities are the products themselves: +-0, +-inf,
    # NaN (0 * inf) and equal values across tiles.
    q = torch.tensor([[[1.0], [-1.0], [0.0], [-0.0]]])
    keys = torch.tensor([[[math.inf], [-0.0], [2.0], [0.0], [-math.inf], [math.nan], [2.0],
                          [-0.0], [0.0], [-2.0]]])
    for k, key_tile in ((1, 2), (3, 2), (4, 3), (10, 2), (10, 64)):
        _assert_topk_identical(shim, q, keys, k, key_tile, 3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_shim_topk_dtypes_are_bit_identical(shim, dtype):
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 9, 12, generator=gen).to(dtype)
    keys = torch.randn(2, 40, 12, generator=gen).to(dtype)
    _assert_topk_identical(shim, q, keys, 6, 16, 4)


def test_shim_topk_empty_queries_and_features(shim):
    _assert_topk_identical(shim, torch.randn(1, 0, 4), torch.randn(1, 5, 4), 2, 16, 8)
    _assert_topk_identical(shim, torch.randn(0, 3, 4), torch.randn(0, 5, 4), 2, 16, 8)
    _assert_topk_identical(shim, torch.randn(1, 3, 0), torch.randn(1, 5, 0), 5, 2, 8)


def _mm_shapes(op, *args):
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        op(*args)
    return [e.input_shapes for e in prof.events() if e.name == "aten::mm"]


def test_shim_and_cpu_tile_alike_when_k_exceeds_the_key_tile(shim):
    """Both multiply [rows, D] x [D, max(key_tile, k)] blocks (the CUDA
    selection needs k candidates from the first tile), so they round alike."""
    gen = torch.Generator().manual_seed(4)
    q, keys = torch.randn(1, 30, 8, generator=gen), torch.randn(1, 50, 8, generator=gen)
    args = (q, keys, 20, 16, 64)
    cpu = _mm_shapes(torch.ops.ppap_ext.topk_neighbors, *args)
    assert cpu == [[[30, 8], [8, 20]], [[30, 8], [8, 20]], [[30, 8], [8, 10]]]
    assert _mm_shapes(shim.topk_neighbors, *args) == cpu
    _assert_topk_identical(shim, *args)


def test_shim_topk_ignores_autocast(shim):
    # The GPU's position: under autocast the op's own GEMM would run in bf16.
    gen = torch.Generator().manual_seed(5)
    q, keys = torch.randn(1, 12, 32, generator=gen), torch.randn(1, 60, 32, generator=gen)
    expected = shim.topk_neighbors(q, keys, 8, 16, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = shim.topk_neighbors(q, keys, 8, 16, 8)
    assert torch.equal(got[1], expected[1]) and torch.equal(_bits(got[0]), _bits(expected[0]))


def test_shim_cublas_rounds_to_tf32_like_cublas(shim, matmul_precision):
    """The emulated cuBLAS honours PyTorch's TF32 switch (so that the next test
    can fail): float32 operands lose their last 13 mantissa bits."""
    a = torch.tensor([[1.0 + 2.0 ** -20]])
    assert shim.mm(a, torch.ones(1, 1)).item() == 1.0 + 2.0 ** -20
    matmul_precision("high")
    assert shim.mm(a, torch.ones(1, 1)).item() == 1.0
    gen = torch.Generator().manual_seed(6)
    x, y = torch.randn(20, 32, generator=gen), torch.randn(32, 20, generator=gen)
    assert (shim.mm(x, y) - x @ y).abs().max() > 1e-4


def test_shim_topk_ignores_tf32(shim, matmul_precision):
    gen = torch.Generator().manual_seed(7)
    q, keys = torch.randn(1, 12, 32, generator=gen), torch.randn(1, 60, 32, generator=gen)
    expected = shim.topk_neighbors(q, keys, 8, 16, 8)
    matmul_precision("high")
    got = shim.topk_neighbors(q, keys, 8, 16, 8)
    assert torch.equal(got[1], expected[1]) and torch.equal(_bits(got[0]), _bits(expected[0]))
    ext.self_check("topk_neighbors", "cpu", run=shim.topk_neighbors)


# ------------------------------------------------------------------------- dense CRF


def _crf_both(shim, image, probs, iters=10, params=CRF_DEFAULTS):
    q_cpu = torch.ops.ppap_ext.dense_crf(image, probs, iters, *params)
    q_emu = shim.dense_crf(image, probs, iters, *params)
    assert q_emu.shape == q_cpu.shape == probs.shape and q_emu.dtype == torch.float32
    return q_cpu, q_emu


def _scene(batch, height, width, classes, channels=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (batch, height, width, channels), generator=gen,
                          dtype=torch.uint8)
    probs = torch.softmax(3 * torch.randn(batch, classes, height, width, generator=gen), dim=1)
    return image, probs


def test_shim_crf_matches_the_cpu_kernel_on_a_scene(shim):
    image, probs = (torch.from_numpy(a)[None] for a in synthetic_scene(24, 20, 5, seed=2))
    q_cpu, q_emu = _crf_both(shim, image, probs)
    assert (q_emu - q_cpu).abs().max() <= 1e-5
    assert (q_cpu.argmax(1) != probs.argmax(1)).any()  # the CRF did something


@pytest.mark.parametrize("shape", [(1, 1, 1, 3), (1, 1, 7, 2), (1, 7, 1, 4), (3, 9, 11, 5)],
                         ids=["1x1", "1x7", "7x1", "batch3"])
def test_shim_crf_small_and_batched_images(shim, shape):
    # batch3: the position lattice is built once for the batch.
    batch, height, width, classes = shape
    image, probs = _scene(batch, height, width, classes, seed=height * width)
    q_cpu, q_emu = _crf_both(shim, image, probs)
    assert (q_emu - q_cpu).abs().max() <= 1e-5


@pytest.mark.parametrize("channels", range(1, 9), ids=lambda c: f"d{c + 2}")
def test_shim_crf_lattice_dimensions_3_to_10(shim, channels):
    image, probs = _scene(1, 6, 5, 3, channels=channels, seed=channels)
    q_cpu, q_emu = _crf_both(shim, image, probs, iters=3, params=(1.0, 3.0, 4.0, 20.0, 4.0))
    assert (q_emu - q_cpu).abs().max() <= 1e-5


@pytest.mark.parametrize("pos_w,bi_w", [(0.0, 4.0), (3.0, 0.0), (0.0, 0.0), (-2.0, 5.0)])
def test_shim_crf_zero_and_negative_weights(shim, pos_w, bi_w):
    image, probs = _scene(2, 8, 6, 4, seed=9)
    q_cpu, q_emu = _crf_both(shim, image, probs, params=(1.0, pos_w, 10.0, 13.0, bi_w))
    assert (q_emu - q_cpu).abs().max() <= 1e-5


def test_shim_crf_zero_iterations_one_class_and_zero_probabilities(shim):
    image, probs = _scene(1, 5, 6, 3, seed=11)
    probs[0, :, 1, 2] = torch.tensor([0.0, 0.0, 1.0])  # clipped to 1e-5 before the log
    for iters in (0, 1):
        q_cpu, q_emu = _crf_both(shim, image, probs, iters=iters)
        assert (q_emu - q_cpu).abs().max() <= 1e-5
    q_cpu, q_emu = _crf_both(shim, image, torch.ones(1, 1, 5, 6))
    assert torch.equal(q_emu, q_cpu)


@pytest.mark.parametrize("height,width", [(0, 5), (4, 0), (0, 0)])
def test_shim_crf_empty_image_gives_an_empty_result(shim, height, width):
    """CUDA refuses a grid of 0 blocks; the launch helper skips empty grids, so
    both implementations return an empty Q."""
    image, probs = _scene(2, height, width, 3)
    q_cpu, q_emu = _crf_both(shim, image, probs)
    assert q_emu.numel() == 0


# ------------------------------------------------------------------------ self-check


@pytest.mark.parametrize("op", ["topk_neighbors", "dense_crf"])
def test_shim_passes_the_self_check(shim, op):
    result = ext.self_check(op, "cpu", run=getattr(shim, op))
    assert result["max_abs"] <= (0.0 if op == "topk_neighbors" else 1e-5), result

"""Tests of the ext/ C++/CUDA extension (top-k neighbours and dense CRF).

The first run compiles the CPU library (about a minute on 2 cores) and, where
nvcc exists, the CUDA library for the compile check (a few minutes); later
runs reuse ext/build/.  GPU tests run where ext.cuda_usable() (a GPU, and nvcc
to build the CUDA library), and are skipped elsewhere.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import ext
from crf_scenes import pydensecrf_inference, synthetic_scene
from ext import _build, _selfcheck

REPO = Path(__file__).resolve().parents[1]
HAS_GPU = ext.cuda_usable()
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU and nvcc (ext.cuda_usable())")
DEVICES = ["cpu"] + (["cuda"] if HAS_GPU else [])


@pytest.fixture(scope="module", autouse=True)
def built():
    """Builds (or reuses) the libraries once; a build failure fails the tests."""
    ext.load()


def _check_topk(q, keys, k, cosine, values, indices):
    """values match torch.topk of the full product; indices point at them."""
    ref_values, _ = ext.topk_neighbors_reference(q, keys, k, cosine)
    qn = torch.nn.functional.normalize(q.float(), dim=-1) if cosine else q
    kn = torch.nn.functional.normalize(keys.float(), dim=-1) if cosine else keys
    sims = (qn @ kn.transpose(-1, -2)).float()
    assert values.shape == ref_values.shape and indices.dtype == torch.int64
    # Blocked GEMMs may round differently from the full product (rarely, by an ulp).
    tol = dict(rtol=0, atol=1e-5) if q.dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(values.float(), ref_values.float(), **tol)
    torch.testing.assert_close(torch.gather(sims, -1, indices), values.float(), **tol)
    assert torch.all(values[..., :-1] >= values[..., 1:]), "not sorted descending"
    # No key twice for one query.
    assert torch.all(indices.sort(-1).values.diff(dim=-1) > 0)


# ----------------------------------------------------------------------------- top-k


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cosine", [True, False])
@pytest.mark.parametrize("k,key_tile", [(1, 64), (7, 64), (100, 64), (5, 4096)])
def test_topk_matches_torch_topk(device, cosine, k, key_tile):
    gen = torch.Generator().manual_seed(k + key_tile)
    q = torch.randn(2, 150, 24, generator=gen).to(device)
    keys = torch.randn(2, 333, 24, generator=gen).to(device)  # 333: not a multiple of the tile
    values, indices = ext.topk_neighbors(q, keys, k, cosine, key_tile=key_tile, query_block=40)
    _check_topk(q, keys, k, cosine, values, indices)


@pytest.mark.parametrize("device", DEVICES)
def test_topk_unbatched_and_default_tiles(device):
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(300, 32, generator=gen).to(device)
    keys = torch.randn(5000, 32, generator=gen).to(device)  # > one default tile
    values, indices = ext.topk_neighbors(q, keys, 30)
    assert values.shape == (300, 30) and indices.shape == (300, 30)
    _check_topk(q, keys, 30, True, values, indices)


@pytest.mark.parametrize("device", DEVICES)
def test_topk_k_equals_all_keys_and_ties(device):
    # Integer-valued vectors give many exact ties; k = K selects everything.
    gen = torch.Generator().manual_seed(2)
    q = torch.randint(-2, 3, (50, 6), generator=gen).float().to(device)
    keys = torch.randint(-2, 3, (90, 6), generator=gen).float().to(device)
    for k in (3, 90):
        values, indices = ext.topk_neighbors(q, keys, k, cosine=False, key_tile=16)
        _check_topk(q, keys, k, False, values, indices)


def _stable_topk(sims: torch.Tensor, k: int):
    """The exact expected result: torch.sort(stable=True) puts NaN above every
    number (as torch.topk does) and keeps equal values in index order."""
    order = torch.sort(sims.float().cpu(), dim=-1, descending=True, stable=True)
    return order.values[..., :k], order.indices[..., :k]


@pytest.mark.parametrize("device", DEVICES)
def test_topk_nan_counts_as_largest_like_torch_topk(device):
    # Similarities [NaN, 1, 2, 3]: a NaN heap root used to block the 3.
    q = torch.tensor([[1.0]], device=device)
    keys = torch.tensor([[math.nan], [1.0], [2.0], [3.0]], device=device)
    values, indices = ext.topk_neighbors(q, keys, 2, cosine=False)
    ref = torch.topk((q @ keys.T).cpu(), 2)
    torch.testing.assert_close(values.cpu(), ref.values, rtol=0, atol=0, equal_nan=True)
    assert indices.tolist() == ref.indices.tolist() == [[0, 3]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k,key_tile,query_block", [(1, 16, 7), (5, 16, 64), (40, 16, 64),
                                                    (100, 4096, 13)])
def test_topk_order_with_nan_and_ties_is_exact(device, k, key_tile, query_block):
    """Small integer vectors: exact products (no GEMM rounding), many ties, NaN
    rows and keys (also a NaN with the sign bit set).  Values are torch.topk's;
    the order is NaN first, then descending, ties lowest key index first."""
    gen = torch.Generator().manual_seed(k + key_tile)
    q = torch.randint(-2, 3, (2, 60, 6), generator=gen).float()
    keys = torch.randint(-2, 3, (2, 100, 6), generator=gen).float()
    q[0, 3] = math.nan  # every similarity of this query is NaN
    q[1, 10, 2] = math.nan
    keys[0, [7, 50, 51, 99]] = math.nan
    keys[1, 0, 0] = float("-nan")
    sims = q @ keys.transpose(-1, -2)
    exp_values, exp_indices = _stable_topk(sims, k)
    values, indices = ext.topk_neighbors(q.to(device), keys.to(device), k, cosine=False,
                                         key_tile=key_tile, query_block=query_block)
    torch.testing.assert_close(values.cpu(), torch.topk(sims, k).values, rtol=0, atol=0,
                               equal_nan=True)
    torch.testing.assert_close(values.cpu(), exp_values, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(indices.cpu(), exp_indices)


def test_topk_ties_come_lowest_index_first():
    # All similarities equal, and groups of equal ones spread over several
    # tiles: the kept indices are the lowest of each group, in order.
    q = torch.ones(3, 1)
    keys = torch.tensor([[1.0], [2.0], [1.0], [2.0], [3.0], [2.0], [1.0], [3.0]] * 5)
    for k in (1, 2, 3, 4, 11, 12, 13, 40):
        for key_tile in (1, 3, 8, 64):
            _, indices = ext.topk_neighbors(q, keys, k, cosine=False, key_tile=key_tile)
            expected = _stable_topk(q @ keys.T, k)[1]
            assert torch.equal(indices, expected), (k, key_tile)
    _, indices = ext.topk_neighbors(torch.zeros(2, 4), torch.zeros(9, 4), 4, cosine=False)
    assert indices.tolist() == [[0, 1, 2, 3]] * 2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_topk_half_precision_zero_rows_normalise_to_zero(device, dtype):
    # F.normalize's eps underflows in half precision: 0 / 0 made zero rows NaN.
    gen = torch.Generator().manual_seed(6)
    q = torch.randn(20, 16, generator=gen).to(dtype)
    keys = torch.randn(50, 16, generator=gen).to(dtype)
    q[4] = 0
    keys[9] = 0
    values, indices = ext.topk_neighbors(q.to(device), keys.to(device), 5, key_tile=16)
    assert values.dtype == dtype and not values.isnan().any()
    qn = torch.nn.functional.normalize(q.float(), dim=-1)
    kn = torch.nn.functional.normalize(keys.float(), dim=-1)
    ref = torch.topk(qn @ kn.T, 5)
    torch.testing.assert_close(values.cpu().float(), ref.values, rtol=0, atol=1e-2)
    assert values[4].cpu().float().abs().max() == 0 and indices[4].tolist() == [0, 1, 2, 3, 4]


@needs_gpu
def test_topk_cuda_indices_equal_cpu_with_ties_and_nan():
    gen = torch.Generator().manual_seed(7)
    q = torch.randint(-2, 3, (2, 700, 8), generator=gen).float()
    keys = torch.randint(-2, 3, (2, 3000, 8), generator=gen).float()
    q[0, 5] = math.nan
    keys[1, [17, 2500]] = math.nan
    for k, key_tile in ((1, 512), (30, 512), (64, 4096), (300, 1000)):
        v_cpu, i_cpu = ext.topk_neighbors(q, keys, k, cosine=False, key_tile=key_tile)
        v_gpu, i_gpu = ext.topk_neighbors(q.cuda(), keys.cuda(), k, cosine=False,
                                          key_tile=key_tile)
        assert torch.equal(i_gpu.cpu(), i_cpu), (k, key_tile)
        torch.testing.assert_close(v_gpu.cpu(), v_cpu, rtol=0, atol=0, equal_nan=True)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_topk_half_precision_cuda(dtype):
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 500, 64, generator=gen).to("cuda", dtype)
    keys = torch.randn(2, 3000, 64, generator=gen).to("cuda", dtype)
    values, indices = ext.topk_neighbors(q, keys, 10, key_tile=1024)
    assert values.dtype == dtype
    _check_topk(q, keys, 10, True, values, indices)


@needs_gpu
def test_topk_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(4)
    q, keys = torch.randn(3, 400, 48, generator=gen), torch.randn(3, 2500, 48, generator=gen)
    v_cpu, i_cpu = ext.topk_neighbors(q, keys, 17, key_tile=512)
    v_gpu, i_gpu = ext.topk_neighbors(q.cuda(), keys.cuda(), 17, key_tile=512)
    torch.testing.assert_close(v_gpu.cpu(), v_cpu, rtol=0, atol=1e-5)
    _check_topk(q.cuda(), keys.cuda(), 17, True, v_gpu, i_gpu)
    # Random similarities have no ties: the same keys, in the same order.
    assert (i_gpu.cpu() == i_cpu).float().mean() > 0.999
    assert ("topk_neighbors", "cuda:0") in _selfcheck._results  # the first CUDA call checked


@pytest.mark.parametrize("cosine", [True, False])
def test_topk_under_cpu_autocast_equals_float32(cosine):
    """Autocast used to reach the op's own GEMM (the op has no autocast kernel,
    so the dispatcher passes it through): bf16 products moved values by ~0.1."""
    gen = torch.Generator().manual_seed(8)
    q, keys = torch.randn(2, 60, 32, generator=gen), torch.randn(2, 200, 32, generator=gen)
    values, indices = ext.topk_neighbors(q, keys, 16, cosine, key_tile=64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_values, got_indices = ext.topk_neighbors(q, keys, 16, cosine, key_tile=64)
    assert got_values.dtype == torch.float32
    assert torch.equal(got_values, values) and torch.equal(got_indices, indices)


@pytest.mark.parametrize("precision", ["high", "medium"])
def test_cpu_topk_is_never_below_float32_precision(matmul_precision, precision):
    """Where torch's float32 matmul precision lets oneDNN use TF32 / bf16, the
    CPU kernel forms the products in float64 (rounded to float32) instead."""
    gen = torch.Generator().manual_seed(9)
    q, keys = torch.randn(40, 64, generator=gen), torch.randn(300, 64, generator=gen)
    exact = torch.topk((q.double() @ keys.double().T).float(), 10)
    matmul_precision(precision)
    values, indices = torch.ops.ppap_ext.topk_neighbors(q[None], keys[None], 10, 64, 16)
    assert torch.equal(values[0], exact.values) and torch.equal(indices[0], exact.indices)


def test_crf_ignores_autocast():
    image, probs = _scene(12, 10, 4)
    q = ext.dense_crf(image, probs, iters=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(ext.dense_crf(image, probs, iters=3), q)


def test_topk_errors():
    q, keys = torch.randn(4, 8), torch.randn(5, 8)
    with pytest.raises(ValueError, match=r"k must be an int in \[1, K=5\]"):
        ext.topk_neighbors(q, keys, 6)
    with pytest.raises(ValueError, match="k must be"):
        ext.topk_neighbors(q, keys, 0)
    with pytest.raises(ValueError, match="differ in batch or feature size"):
        ext.topk_neighbors(q, torch.randn(5, 7), 2)
    with pytest.raises(ValueError, match="share a floating dtype"):
        ext.topk_neighbors(q, keys.double(), 2)
    with pytest.raises(ValueError, match="expected q"):
        ext.topk_neighbors(q, keys[None], 2)


# ------------------------------------------------------------------------- dense CRF


def _scene(height, width, classes, seed=0, batch=None):
    image, probs = synthetic_scene(height, width, classes, seed)
    return torch.from_numpy(image), torch.from_numpy(probs)


@pytest.mark.parametrize("shape", [(12, 10, 4), (40, 32, 6)])
def test_crf_close_to_exact_dense_filtering(shape):
    """The lattice approximates exact Gaussian filtering (reference: O(P^2))."""
    image, probs = _scene(*shape, seed=shape[0])
    probs = 0.5 * probs + 0.5 / shape[2]  # weak unaries: the pairwise terms decide
    q = ext.dense_crf(image, probs)
    q_ref = ext.dense_crf_reference(image, probs)
    assert q.shape == probs.shape and q.dtype == torch.float32
    torch.testing.assert_close(q.sum(0), torch.ones(shape[:2]), rtol=0, atol=1e-5)
    agree = (q.argmax(0) == q_ref.argmax(0)).float().mean().item()
    assert agree >= 0.99, agree
    assert (q - q_ref).abs().mean().item() < 0.01
    # The CRF must actually have changed something for this to be a test.
    assert (q_ref.argmax(0) != probs.argmax(0)).any()


def test_crf_matches_pydensecrf():
    pytest.importorskip("pydensecrf.densecrf", reason="pip install pydensecrf2 (test-only)")
    image, probs = synthetic_scene(320, 320, 27, seed=0)
    q_ref = pydensecrf_inference(image, probs, iters=10)
    q = ext.dense_crf(torch.from_numpy(image), torch.from_numpy(probs), iters=10).numpy()
    agree = (q.argmax(0) == q_ref.argmax(0)).mean()
    mean_abs = np.abs(q - q_ref).mean()
    assert agree >= 0.995 and mean_abs <= 1e-3, (agree, mean_abs)
    # Sanity: the CRF moved a good share of labels, so the sign and the
    # weights of the pairwise terms were exercised.
    assert (q_ref.argmax(0) != probs.argmax(0)).mean() > 0.02


def test_crf_matches_pydensecrf_custom_params_and_iters():
    pytest.importorskip("pydensecrf.densecrf", reason="pip install pydensecrf2 (test-only)")
    image, probs = synthetic_scene(64, 80, 5, seed=3)
    params = dict(pos_xy=3.0, pos_w=2.0, bi_xy=30.0, bi_rgb=10.0, bi_w=6.0)
    for iters in (0, 1, 4):
        q_ref = pydensecrf_inference(image, probs, iters=iters, **params)
        q = ext.dense_crf(torch.from_numpy(image), torch.from_numpy(probs), iters=iters, **params)
        assert np.abs(q.numpy() - q_ref).max() < 1e-4


def test_crf_batch_equals_per_image():
    images, probs = zip(*(_scene(48, 40, 5, seed=s) for s in range(3)))
    image_b, probs_b = torch.stack(images), torch.stack(probs)
    q_b = ext.dense_crf(image_b, probs_b)
    for i in range(3):
        torch.testing.assert_close(q_b[i], ext.dense_crf(images[i], probs[i]), rtol=0, atol=1e-6)


@pytest.fixture
def two_threads():
    """torch (and the ext ops' at::parallel_for) on 2 threads for one test."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_cpu_ops_really_run_on_several_threads(two_threads):
    # at::parallel_for silently runs serially in a library built without
    # OpenMP, which is how the CPU kernels once ran single-threaded.
    assert torch.ops.ppap_ext.parallel_threads(8) == 2


def test_results_do_not_depend_on_the_thread_count(two_threads):
    images, probs = zip(*(_scene(40, 56, 6, seed=s) for s in range(3)))
    image_b, probs_b = torch.stack(images), torch.stack(probs)
    gen = torch.Generator().manual_seed(5)
    q, keys = torch.randn(2, 300, 16, generator=gen), torch.randn(2, 700, 16, generator=gen)

    def run():
        return (ext.dense_crf(image_b, probs_b), ext.dense_crf(images[0], probs[0]),
                *ext.topk_neighbors(q, keys, 9, key_tile=128, query_block=32))

    parallel = run()
    torch.set_num_threads(1)
    for a, b in zip(parallel, run(), strict=True):
        assert torch.equal(a, b)


def test_crf_input_dtypes_and_layouts():
    image, probs = _scene(20, 30, 3)
    q = ext.dense_crf(image, probs, iters=2)
    # float64 probs and non-contiguous inputs give the same result.
    image_nc = image.permute(1, 0, 2).contiguous().permute(1, 0, 2)
    probs_nc = probs.permute(0, 2, 1).contiguous().permute(0, 2, 1)
    torch.testing.assert_close(ext.dense_crf(image_nc, probs_nc.double(), iters=2), q)


def test_crf_errors():
    image, probs = _scene(8, 9, 3)
    with pytest.raises(ValueError, match="image must be uint8"):
        ext.dense_crf(image.float(), probs)
    with pytest.raises(ValueError, match="disagree on batch/height/width"):
        ext.dense_crf(image, probs[:, :, :8])
    with pytest.raises(ValueError, match=r"expected image \[B,H,W,3\]"):
        ext.dense_crf(image[..., :2], probs)
    with pytest.raises(ValueError, match="iters must be"):
        ext.dense_crf(image, probs, iters=-1)
    with pytest.raises(ValueError, match="must be > 0"):
        ext.dense_crf(image, probs, bi_rgb=0)
    with pytest.raises(ValueError, match="must be finite"):
        ext.dense_crf(image, probs, bi_w=math.inf)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_crf_rejects_non_finite_probabilities(bad):
    # One NaN used to turn the whole image NaN (the lattice spreads it).
    image, probs = _scene(8, 9, 3)
    probs[1, 2, 3] = bad
    with pytest.raises(ValueError) as info:
        ext.dense_crf(image, probs)
    message = str(info.value)
    assert "\n" not in message and "NaN/inf" in message and "[1, 2, 3]" in message
    with pytest.raises(ValueError, match=r"first at index \[0, 1, 2, 3\]"):
        ext.dense_crf(image[None], probs[None])


def test_crf_feature_limit_message():
    image, probs = _scene(20, 30, 3)
    limit = ext.MAX_LATTICE_FEATURE
    for name, top in (("pos_xy", 30), ("bi_xy", 30), ("bi_rgb", 255)):
        with pytest.raises(ValueError) as info:
            ext.dense_crf(image, probs, iters=1, **{name: top / limit * 0.99})
        message = str(info.value)
        assert "\n" not in message and "2^17" in message
        assert f"{name}={top / limit * 0.99:g} is too small" in message
        assert f"use {name} >= {top / limit:.3g}" in message
    # A kernel with weight 0 is not built: its standard deviations do not matter.
    ext.dense_crf(image, probs, iters=1, pos_xy=1e-9, pos_w=0.0)


def test_crf_tiny_standard_deviations_raise_instead_of_crashing():
    """pos_xy=1e-6 / bi_rgb=1e-7 passed validation and crashed the interpreter
    (SIGSEGV): run in a subprocess so that a crash fails this test only."""
    code = textwrap.dedent(f"""
        import json, math, sys
        sys.path[:0] = [{str(REPO)!r}, {str(REPO / "tests")!r}]
        import torch, ext
        from crf_scenes import synthetic_scene
        ext.load("cpu")
        image, probs = (torch.from_numpy(a) for a in synthetic_scene(320, 320, 5, seed=0))
        defaults = dict(pos_xy=1.0, pos_w=3.0, bi_xy=67.0, bi_rgb=3.0, bi_w=4.0)
        out = {{}}
        for name, value in (("pos_xy", 1e-6), ("bi_rgb", 1e-7), ("bi_xy", 1e-6)):
            params = dict(defaults, **{{name: value}})
            try:
                ext.dense_crf(image, probs, iters=1, **params)
                out[name] = "returned"
            except ValueError as e:
                out[name] = "ValueError: " + str(e)
            try:  # the op itself, without the Python checks
                torch.ops.ppap_ext.dense_crf(image[None], probs[None], 1, *params.values())
                out[name + "_op"] = "returned"
            except RuntimeError as e:
                out[name + "_op"] = "RuntimeError: " + str(e).splitlines()[0]
        # Just inside the limit the lattice still works: finite Q, rows sum to 1.
        limit = ext.MAX_LATTICE_FEATURE
        q = ext.dense_crf(image, probs, iters=2, pos_xy=320 / limit * 1.001,
                          bi_xy=320 / limit * 1.001, bi_rgb=255 / limit * 1.001)
        out["edge_finite"] = bool(torch.isfinite(q).all())
        out["edge_sum_err"] = float((q.sum(0) - 1).abs().max())
        print(json.dumps(out))
        """)
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, text=True,
                            capture_output=True, timeout=300)
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    out = json.loads(result.stdout.strip().splitlines()[-1])
    for name in ("pos_xy", "bi_rgb", "bi_xy"):
        assert out[name].startswith("ValueError: dense_crf: " + name), out[name]
        assert "\n" not in out[name]
        assert out[name + "_op"].startswith("RuntimeError: ppap_ext::dense_crf: " + name), out
    assert out["edge_finite"] and out["edge_sum_err"] < 1e-5, out


def test_lattice_geometry_stays_in_bounds_for_huge_features(tmp_path):
    """enclosing_simplex under AddressSanitizer: features far beyond the
    accepted range (float rounding puts the rounded point many steps off the
    plane) must not index out of bounds, and inside the range the barycentric
    weights must be a partition of unity."""
    source = tmp_path / "simplex.cpp"
    source.write_text(textwrap.dedent("""
        #include <cmath>
        #include <cstdio>
        #include <random>
        #include "lattice_geometry.h"
        int main() {
          std::mt19937 rng(1);
          std::uniform_real_distribution<float> unit(-1.f, 1.f), exponent(0.f, 13.f);
          int bad = 0;
          for (int d = 2; d <= ppap::kMaxDim; ++d) {
            float scale[ppap::kMaxDim];
            for (int i = 0; i < d; ++i) scale[i] = ppap::lattice_scale(i, d);
            for (int t = 0; t < 20000; ++t) {
              float f[ppap::kMaxDim], bary[ppap::kMaxDim + 1];
              int keys[(ppap::kMaxDim + 1) * ppap::kMaxDim];
              const float magnitude = std::pow(10.f, exponent(rng));  // 1 .. 1e13
              for (int i = 0; i < d; ++i) f[i] = magnitude * unit(rng);
              ppap::enclosing_simplex(f, scale, d, keys, bary);
              if (magnitude <= ppap::kMaxFeature) {
                float sum = 0.f;
                for (int r = 0; r <= d; ++r) {
                  sum += bary[r];
                  if (bary[r] < -1e-3f || bary[r] > 1.001f) ++bad;
                }
                if (std::fabs(sum - 1.f) > 1e-3f) ++bad;
              }
            }
          }
          std::printf("bad %d\\n", bad);
          return bad != 0;
        }
        """))
    cxx = os.environ.get("CXX", "c++")
    binary = tmp_path / "simplex"
    # Out-of-range float -> int casts and int overflow are expected beyond the
    # accepted range (the results there are garbage, but must stay in bounds).
    flags = ["-O1", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
             "-fno-sanitize=float-cast-overflow,signed-integer-overflow"]
    built = subprocess.run([cxx, *flags, f"-I{REPO / 'ext' / 'csrc'}", str(source), "-o",
                            str(binary)], capture_output=True, text=True, timeout=300)
    if built.returncode != 0:
        pytest.skip(f"cannot build with sanitizers: {built.stderr.strip()[:200]}")
    result = subprocess.run([str(binary)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout, result.stderr[-2000:])
    assert result.stdout.strip() == "bad 0"


def test_reference_switch(monkeypatch):
    image, probs = _scene(10, 12, 3)
    monkeypatch.setenv("PPAP_EXT_REFERENCE", "1")
    torch.testing.assert_close(ext.dense_crf(image, probs), ext.dense_crf_reference(image, probs))
    q, keys = torch.randn(10, 4), torch.randn(20, 4)
    ref = ext.topk_neighbors_reference(q, keys, 3)
    torch.testing.assert_close(ext.topk_neighbors(q, keys, 3)[1], ref[1])


@needs_gpu
def test_crf_cuda_matches_cpu():
    images, probs = zip(*(_scene(96, 128, 7, seed=s) for s in range(2)))
    image_b, probs_b = torch.stack(images), torch.stack(probs)
    q_cpu = ext.dense_crf(image_b, probs_b)
    q_gpu = ext.dense_crf(image_b.cuda(), probs_b.cuda())
    assert q_gpu.is_cuda
    # Atomic splatting only changes the rounding.
    assert (q_gpu.argmax(1).cpu() == q_cpu.argmax(1)).float().mean() >= 0.999
    assert (q_gpu.cpu() - q_cpu).abs().max() <= 1e-5
    assert ("dense_crf", "cuda:0") in _selfcheck._results  # the first CUDA call checked


@needs_gpu
def test_crf_cuda_matches_cpu_640_wide():
    # Both build the lattice from csrc/lattice_geometry.h without FMA
    # contraction; only the order of the CUDA splat's atomic additions differs.
    image, probs = _scene(480, 640, 27, seed=5)
    q_cpu = ext.dense_crf(image, probs)
    q_gpu = ext.dense_crf(image.cuda(), probs.cuda()).cpu()
    assert (q_gpu - q_cpu).abs().max().item() <= 1e-5


@needs_gpu
def test_self_check_passes_on_the_gpu():
    for op in _selfcheck.OPS:
        assert ext.self_check(op, "cuda")["max_abs"] <= 1e-5


@needs_gpu
def test_crf_cuda_matches_pydensecrf():
    pytest.importorskip("pydensecrf.densecrf", reason="pip install pydensecrf2 (test-only)")
    image, probs = synthetic_scene(320, 320, 27, seed=1)
    q_ref = pydensecrf_inference(image, probs)
    q = ext.dense_crf(torch.from_numpy(image).cuda(), torch.from_numpy(probs).cuda()).cpu().numpy()
    assert (q.argmax(0) == q_ref.argmax(0)).mean() >= 0.995
    assert np.abs(q - q_ref).mean() <= 1e-3


# ------------------------------------------------------------------------- self-check


def test_self_check_passes_for_the_cpu_kernel():
    for op in _selfcheck.OPS:
        assert ext.self_check(op, "cpu")["max_abs"] == 0
        assert ext.self_check(op, "cpu", run=getattr(torch.ops.ppap_ext, op))["max_abs"] == 0


def _crf_wrong(how):
    def run(*args):
        q = torch.ops.ppap_ext.dense_crf(*args).clone()
        if how == "shift":
            q += 2e-4
        elif how == "swap":  # one pixel's class probabilities rolled
            q[0, :, 5, 7] = q[0, :, 5, 7].roll(1)
        elif how == "nan":
            q[0, 0, 0, 0] = math.nan
        return q
    return run


def _topk_wrong(how):
    def run(*args):
        values, indices = torch.ops.ppap_ext.topk_neighbors(*args)
        if how == "values":
            return values + 3e-5, indices
        return values, indices.roll(1, dims=-1)  # right values, wrong keys
    return run


@pytest.mark.parametrize("op,run,way_out", [
    ("dense_crf", _crf_wrong("shift"), _selfcheck.CRF_WAY_OUT),
    ("dense_crf", _crf_wrong("swap"), _selfcheck.CRF_WAY_OUT),
    ("dense_crf", _crf_wrong("nan"), _selfcheck.CRF_WAY_OUT),
    ("topk_neighbors", _topk_wrong("values"), _selfcheck.TOPK_WAY_OUT),
    ("topk_neighbors", _topk_wrong("indices"), _selfcheck.TOPK_WAY_OUT),
], ids=["crf-shifted", "crf-pixel-swapped", "crf-nan", "topk-values", "topk-indices"])
def test_self_check_catches_a_wrong_kernel(op, run, way_out):
    with pytest.raises(ext.SelfCheckError) as info:
        ext.self_check(op, "cpu", run=run)
    message = str(info.value)
    assert "\n" not in message and message.endswith(way_out) and op in message
    assert isinstance(info.value, RuntimeError)
    if op == "dense_crf":
        assert "eval.py --crf-device cpu" in message and "PPAP_EXT_REFERENCE=1" in message
    else:
        assert "PPAP_EXT_REFERENCE=1" in message


def test_self_check_allows_a_few_float_steps():
    """A kernel whose GEMM sums in another order is off by a few float steps.
    The check's top-k input used to be un-normalised randn (values up to ~25,
    where 8 steps exceed the 1e-5 tolerance); it is unit vectors now."""
    def eight_steps_up(*args):
        values, indices = torch.ops.ppap_ext.topk_neighbors(*args)
        for _ in range(8):
            values = torch.nextafter(values, torch.full_like(values, math.inf))
        return values, indices

    result = ext.self_check("topk_neighbors", "cpu", run=eight_steps_up)
    assert 0 < result["max_abs"] < 1e-6


def test_self_check_runs_with_autocast_disabled():
    seen = []

    def run(*args):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return torch.ops.ppap_ext.topk_neighbors(*args)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        ext.self_check("topk_neighbors", "cpu", run=run)
        assert torch.is_autocast_enabled("cpu")  # restored
    assert seen[0][0] is False


def test_self_check_runs_once_per_op_and_device(monkeypatch):
    monkeypatch.setattr(_selfcheck, "_results", {})
    monkeypatch.delenv("PPAP_EXT_SKIP_SELFCHECK", raising=False)
    calls = []

    def counted(op, wrong=False):
        def run(*args):
            calls.append(op)
            result = getattr(torch.ops.ppap_ext, op)(*args)
            return result + 1 if wrong else result
        return run

    check = _selfcheck.maybe_self_check
    assert check("dense_crf", "cuda:3", counted("dense_crf")) is True
    assert check("dense_crf", "cuda:3", counted("dense_crf")) is False
    assert check("topk_neighbors", "cuda:3", counted("topk_neighbors")) is True
    assert check("dense_crf", "cuda:4", counted("dense_crf")) is True  # another device
    assert calls == ["dense_crf", "topk_neighbors", "dense_crf"]
    # A failure is remembered and raised again without rerunning.
    for _ in range(2):
        with pytest.raises(ext.SelfCheckError, match="crf-device cpu"):
            check("dense_crf", "cuda:5", counted("dense_crf", wrong=True))
    assert calls.count("dense_crf") == 3
    monkeypatch.setenv("PPAP_EXT_SKIP_SELFCHECK", "1")
    assert check("topk_neighbors", "cuda:6", counted("topk_neighbors")) is False
    assert check("dense_crf", "cuda:5", counted("dense_crf")) is False  # skipped, not raised
    assert len(calls) == 4


def test_cpu_ops_run_no_self_check():
    before = _selfcheck.runs
    image, probs = _scene(10, 12, 3)
    ext.dense_crf(image, probs, iters=1)
    ext.topk_neighbors(torch.randn(5, 4), torch.randn(7, 4), 2)
    assert _selfcheck.runs == before


# ------------------------------------------------------------------------ build logic


def test_cpu_library_is_built_without_fp_contraction():
    ninja = Path(_build._loaded[_build.CPU_NAME]).parent / "build.ninja"
    cflags = next(ln for ln in ninja.read_text().splitlines() if ln.startswith("cflags ="))
    assert "-ffp-contract=off" in cflags.split()


def test_default_arch_list_has_ptx_and_names_the_build_dir(monkeypatch):
    entries = _build.parse_arch_list(_build.DEFAULT_CUDA_ARCHS)
    highest = max(entries)
    assert highest[3], f"no PTX for the highest arch of {_build.DEFAULT_CUDA_ARCHS}"
    assert _build.cuda_arch_tag("8.0;9.0+PTX") == "sm80_90_ptx"
    assert _build.cuda_arch_tag("Hopper") == "sm90_ptx"
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6 9.0a")
    assert _build.cuda_build_dir().name == "ppap_ext_cuda_sm86_90a"
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _build.cuda_arch_list() == _build.DEFAULT_CUDA_ARCHS
    assert _build.cuda_build_dir().name == "ppap_ext_cuda_" + _build.cuda_arch_tag(
        _build.DEFAULT_CUDA_ARCHS)


def _fake_gpu(monkeypatch, capability, name="Fake GPU"):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: name)


@pytest.mark.parametrize("archs,capability,ok", [
    ("8.0;9.0+PTX", (8, 0), True), ("8.0;9.0+PTX", (8, 6), True), ("8.0;9.0+PTX", (8, 9), True),
    ("8.0;9.0+PTX", (9, 0), True), ("8.0;9.0+PTX", (10, 0), True), ("8.0;9.0+PTX", (12, 0), True),
    ("8.0;9.0+PTX", (7, 5), False),  # T4: below the lowest arch, no SASS for it
    ("8.0;9.0", (10, 0), False), ("8.0;9.0", (12, 0), False),  # no PTX to JIT
    ("9.0a", (9, 0), True), ("9.0a+PTX", (10, 0), False), ("7.5;8.6", (8, 0), False),
])
def test_arch_check(monkeypatch, archs, capability, ok):
    _fake_gpu(monkeypatch, capability, "Tesla T4")
    targets = _build._targets_of(_build.parse_arch_list(archs))
    assert _build.runs_on(targets, capability) is ok
    if ok:
        _build.check_devices_supported(archs)
        return
    with pytest.raises(_build.BuildError) as info:
        _build.check_devices_supported(archs)
    message = str(info.value)
    assert "\n" not in message and "TORCH_CUDA_ARCH_LIST" in message and "Tesla T4" in message
    assert f"{capability[0]}.{capability[1]}" in message
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", archs)
    monkeypatch.setattr(_build, "cuda_buildable", lambda: True)
    assert not ext.cuda_usable()


def test_built_targets_come_from_build_ninja(tmp_path, monkeypatch):
    ninja = tmp_path / "build.ninja"
    ninja.write_text("cuda_cflags = -O3 -gencode=arch=compute_80,code=sm_80 "
                     "-gencode=arch=compute_90,code=compute_90 "
                     "-gencode=arch=compute_90,code=sm_90\n")
    targets = _build._built_cuda_targets(ninja)
    assert targets == {("sm", 8, 0, ""), ("sm", 9, 0, ""), ("compute", 9, 0, "")}
    _fake_gpu(monkeypatch, (10, 0))
    _build.check_devices_supported("8.0;9.0+PTX", built=targets)
    with pytest.raises(_build.BuildError, match="TORCH_CUDA_ARCH_LIST"):
        _build.check_devices_supported("8.0;9.0+PTX", built=targets - {("compute", 9, 0, "")})


def test_cuda_usable_needs_a_gpu_and_nvcc(monkeypatch):
    _fake_gpu(monkeypatch, (9, 0))
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(_build, "nvcc_path", lambda: None)
    assert not ext.cuda_usable()
    monkeypatch.setattr(_build, "nvcc_path", lambda: "/usr/local/cuda/bin/nvcc")
    assert ext.cuda_usable() is (torch.version.cuda is not None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not ext.cuda_usable()


def test_usable_device_falls_back_to_the_cpu_with_the_reason(monkeypatch):
    """eval.py runs the CRF and the kNN table where usable_device says: a GPU
    machine without nvcc gets both on the CPU, with one line saying why."""
    cpu = torch.device("cpu")
    assert ext.usable_device("cpu") == (cpu, None)
    _fake_gpu(monkeypatch, (9, 0))
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(_build, "nvcc_path", lambda: None)
    device, note = ext.usable_device("cuda:0")
    assert device == cpu and "\n" not in note
    assert note == ("the CUDA kernels cannot be built here: nvcc was not found (install the CUDA "
                    "toolkit or set CUDA_HOME)")
    monkeypatch.setattr(_build, "nvcc_path", lambda: "/usr/local/cuda/bin/nvcc")
    if torch.version.cuda is not None:
        assert ext.usable_device(torch.device("cuda", 0)) == (torch.device("cuda", 0), None)
        _fake_gpu(monkeypatch, (7, 5), "Tesla T4")
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        device, note = ext.usable_device("cuda")
        assert device == cpu and "Tesla T4" in note and "TORCH_CUDA_ARCH_LIST" in note
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ext.usable_device("cuda") == (cpu, "the CUDA kernels cannot be built here: no CUDA "
                                              "GPU is visible")


def _fake_toolkit(root: Path, runtime: str, lib: str = "lib") -> Path:
    """A CUDA toolkit folder: bin/nvcc (reporting its TOP as nvcc --dryrun
    does) and lib/<runtime>."""
    (root / "bin").mkdir(parents=True)
    (root / lib).mkdir()
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho '#$ TOP={root}/bin/..'\n")
    nvcc.chmod(0o755)
    (root / lib / runtime).write_bytes(b"")
    return root


def test_cuda_link_flags_name_the_runtime_of_a_pypi_toolkit(tmp_path, monkeypatch):
    """NVIDIA's toolkit from PyPI (nvidia/cu13) ships only libcudart.so.13:
    -lcudart failed, or silently linked /usr/local/cuda's runtime where that
    exists too.  The flags must point at this toolkit's runtime only."""
    import torch.utils.cpp_extension as cpp_extension

    toolkit = _fake_toolkit(tmp_path / "site-packages" / "nvidia" / "cu13", "libcudart.so.13")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(toolkit))
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    build = tmp_path / "build"
    flags = _build._cuda_link_flags(build)
    dirs = [Path(f[2:]) for f in flags if f.startswith("-L")]
    assert dirs and all(d.is_relative_to(toolkit) or d.is_relative_to(build) for d in dirs), flags
    runtimes = [(d / "libcudart.so").resolve() for d in dirs if (d / "libcudart.so").exists()]
    assert runtimes == [(toolkit / "lib" / "libcudart.so.13").resolve()], flags
    assert not any("/usr/local/cuda" in f for f in flags)
    assert _build._cuda_link_flags(build) == flags  # a second build reuses the link

    # A toolkit with the development link is linked where it is.
    other = _fake_toolkit(tmp_path / "cuda-13.0", "libcudart.so", lib="lib64")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(other))
    assert _build._cuda_link_flags(build) == [f"-L{other / 'lib64'}"]


def test_load_cpu_needs_no_nvcc(tmp_path):
    """ext.load("cpu") and the CPU ops work where nvcc cannot be found."""
    # PATH without the folders holding nvcc; the rest stays, so that the same
    # ninja (whose log format differs between versions) finds the build current.
    path = [d for d in os.environ.get("PATH", "").split(os.pathsep)
            if d and not (Path(d) / "nvcc").exists()]
    env = dict(os.environ, CUDA_HOME=str(tmp_path / "no-cuda"), PATH=os.pathsep.join(path))
    env.pop("CUDA_PATH", None)
    code = textwrap.dedent("""
        import torch, ext
        from ext import _build
        assert _build.nvcc_path() is None, _build.nvcc_path()
        ext.load("cpu")
        values, _ = ext.topk_neighbors(torch.ones(2, 3), torch.ones(4, 3), 2, cosine=False)
        assert values.tolist() == [[3.0, 3.0]] * 2
        print("cuda_usable", ext.cuda_usable())
        """)
    if shutil.which(os.environ.get("CXX", "c++"), path=env["PATH"]) is None:
        pytest.skip("the C++ compiler lives next to nvcc")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, text=True,
                            capture_output=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "cuda_usable False"


def test_missing_compiler_is_one_line(monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with pytest.raises(_build.BuildError) as info:
        _build._check_toolchain(with_cuda=False)
    assert "\n" not in str(info.value) and "set CXX" in str(info.value)


def test_compile_error_is_one_line_with_log(tmp_path, monkeypatch):
    bad = tmp_path / "broken.cpp"
    bad.write_text("int broken( {\n")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "build"))
    with pytest.raises(_build.BuildError) as info:
        _build._load("ppap_ext_broken_test", (str(bad),), with_cuda=False)
    message = str(info.value)
    assert "\n" not in message and "full log:" in message
    log = Path(message.split("full log: ")[1])
    assert log.is_file() and "broken" in log.read_text()


def test_leftover_lock_file_is_ignored_and_held_lock_times_out(tmp_path, monkeypatch):
    lock = tmp_path / "lock"
    lock.write_text("")  # left behind by a killed build: must not block
    _build._wait_for_lock(lock, "x")
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time, filelock
        with filelock.FileLock({str(lock)!r}):
            print("held", flush=True)
            time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setenv("PPAP_EXT_LOCK_TIMEOUT", "1")
        with pytest.raises(_build.BuildError, match="rm "):
            _build._wait_for_lock(lock, "x")
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.cuda_build
@pytest.mark.skipif(_build.nvcc_path() is None, reason="nvcc not found")
@pytest.mark.skipif(torch.version.cuda is None, reason="PyTorch built without CUDA")
def test_cuda_sources_compile():
    """Compiles and links the CUDA library (no GPU needed) so it cannot rot."""
    env = dict(os.environ)
    env.setdefault("TORCH_CUDA_ARCH_LIST", _build.DEFAULT_CUDA_ARCHS)
    code = "import ext._build as b; print(b.build_cuda_only())"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, text=True,
                            capture_output=True, timeout=1500)
    assert result.returncode == 0, result.stderr[-3000:]
    library = Path(result.stdout.strip().splitlines()[-1])
    assert library.is_file()
    archs = env["TORCH_CUDA_ARCH_LIST"]
    assert library.parent.name == f"{_build.CUDA_NAME}_{_build.cuda_arch_tag(archs)}"
    ninja = (library.parent / "build.ninja").read_text()
    cuda_cflags = next(ln for ln in ninja.splitlines() if ln.startswith("cuda_cflags ="))
    assert "--fmad=false" in cuda_cflags.split() and "-Xcompiler=-ffp-contract=off" in cuda_cflags
    assert "-ffp-contract=off" in next(ln for ln in ninja.splitlines() if ln.startswith("cflags ="))
    built = _build._built_cuda_targets(library.parent / "build.ninja")
    assert built == _build._targets_of(_build.parse_arch_list(archs))
    if archs == _build.DEFAULT_CUDA_ARCHS:  # PTX: newer GPUs JIT it
        assert "code=compute_90" in cuda_cflags
        assert _build.runs_on(built, (12, 0)) and not _build.runs_on(built, (7, 5))

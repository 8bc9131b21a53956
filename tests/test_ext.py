"""Tests of the ext/ C++/CUDA extension (top-k neighbours and dense CRF).

The first run compiles the CPU library (about a minute on 2 cores) and, where
nvcc exists, the CUDA library for the compile check (a few minutes); later
runs reuse ext/build/.  GPU tests are skipped without a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import ext
from ext import _build
from ext.testing import pydensecrf_inference, synthetic_scene

REPO = Path(__file__).resolve().parents[1]
HAS_GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
DEVICES = ["cpu"] + (["cuda"] if HAS_GPU else [])


@pytest.fixture(scope="module", autouse=True)
def built():
    """Builds (or reuses) the libraries once; a build failure fails the tests."""
    ext.load()


def _check_topk(q, keys, k, cosine, values, indices):
    """values match torch.topk of the full product; indices point at them."""
    ref_values, _ = ext.topk_neighbors_reference(q, keys, k, cosine)
    qn = torch.nn.functional.normalize(q, dim=-1) if cosine else q
    kn = torch.nn.functional.normalize(keys, dim=-1) if cosine else keys
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
    v_cpu, _ = ext.topk_neighbors(q, keys, 17, key_tile=512)
    v_gpu, i_gpu = ext.topk_neighbors(q.cuda(), keys.cuda(), 17, key_tile=512)
    torch.testing.assert_close(v_gpu.cpu(), v_cpu, rtol=0, atol=1e-5)
    _check_topk(q.cuda(), keys.cuda(), 17, True, v_gpu, i_gpu)


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
    assert (q_gpu.cpu() - q_cpu).abs().max() < 1e-3


@needs_gpu
def test_crf_cuda_matches_pydensecrf():
    pytest.importorskip("pydensecrf.densecrf", reason="pip install pydensecrf2 (test-only)")
    image, probs = synthetic_scene(320, 320, 27, seed=1)
    q_ref = pydensecrf_inference(image, probs)
    q = ext.dense_crf(torch.from_numpy(image).cuda(), torch.from_numpy(probs).cuda()).cpu().numpy()
    assert (q.argmax(0) == q_ref.argmax(0)).mean() >= 0.995
    assert np.abs(q - q_ref).mean() <= 1e-3


# ------------------------------------------------------------------------ build logic


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
    assert Path(result.stdout.strip().splitlines()[-1]).is_file()

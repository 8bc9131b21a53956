// Batched top-k neighbours on CUDA without materialising M x K.
//
// Per block of queries and tile of keys: one cuBLAS GEMM (at::mm) gives the
// tile's similarities, then select_topk_kernel merges them with each query's
// running top-k.  The selection is an exact radix select in shared memory:
// four 8-bit histogram passes over the order-preserving bit patterns find the
// k-th largest candidate, then everything above it (and enough ties) is
// written out.  Running results ping-pong between two [rows, k] buffers and
// are sorted once at the end.  Memory: O(query_block * key_tile + M * k).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

#include "ops.h"

namespace ppap {
namespace {

constexpr int kSelectThreads = 256;

// Monotone map float -> uint32: a < b  <=>  bits(a) < bits(b) (NaN above +inf).
__device__ __forceinline__ uint32_t ordered_bits(float f) {
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// One block per query row.  Candidates j < n_prev are the row's running
// top-k (prev_val/prev_idx), the others the tile's similarities (key index
// tile_start + j - n_prev).  Writes exactly k candidates (unsorted) to next_*.
// Requires n_prev + cols >= k.
__global__ void select_topk_kernel(const float* __restrict__ sims, int64_t cols, int64_t tile_start,
                                   const float* __restrict__ prev_val,
                                   const int64_t* __restrict__ prev_idx, int n_prev,
                                   float* __restrict__ next_val, int64_t* __restrict__ next_idx,
                                   int k) {
  __shared__ int hist[256];
  __shared__ uint32_t s_prefix;
  __shared__ int s_rank;
  __shared__ int n_above, n_equal;

  const int64_t row = blockIdx.x;
  const float* srow = sims + row * cols;
  const float* pv = prev_val + row * k;
  const int64_t* pi = prev_idx + row * k;
  const int64_t n = n_prev + cols;
  auto value_at = [&](int64_t j) { return j < n_prev ? pv[j] : srow[j - n_prev]; };
  auto index_at = [&](int64_t j) { return j < n_prev ? pi[j] : tile_start + (j - n_prev); };

  // Find the bit pattern of the k-th largest candidate, 8 bits at a time:
  // `rank` is its rank among the candidates that share the bits found so far.
  uint32_t prefix = 0, mask = 0;
  int rank = k;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
    __syncthreads();
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      const uint32_t u = ordered_bits(value_at(j));
      if ((u & mask) == prefix) atomicAdd(&hist[(u >> shift) & 0xFFu], 1);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int above = 0;
      int bin = 255;
      for (; bin > 0; --bin) {
        if (above + hist[bin] >= rank) break;
        above += hist[bin];
      }
      s_prefix = prefix | (static_cast<uint32_t>(bin) << shift);
      s_rank = rank - above;
      n_above = 0;
      n_equal = 0;
    }
    __syncthreads();
    prefix = s_prefix;
    rank = s_rank;
    mask |= 0xFFu << shift;
    __syncthreads();  // everyone has read s_* before the next pass rewrites hist
  }

  // prefix is now the k-th largest value; `rank` of its copies are needed.
  const int n_ties = rank;
  const int first_tie = k - n_ties;
  float* nv = next_val + row * k;
  int64_t* ni = next_idx + row * k;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    const float x = value_at(j);
    const uint32_t u = ordered_bits(x);
    if (u > prefix) {
      const int pos = atomicAdd(&n_above, 1);
      nv[pos] = x;
      ni[pos] = index_at(j);
    } else if (u == prefix) {
      const int e = atomicAdd(&n_equal, 1);
      if (e < n_ties) {
        nv[first_tie + e] = x;
        ni[first_tie + e] = index_at(j);
      }
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> topk_neighbors_cuda(const at::Tensor& q, const at::Tensor& keys,
                                                       int64_t k, int64_t key_tile,
                                                       int64_t query_block) {
  check_topk_args(q, keys, k, key_tile, query_block);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), M = q.size(1), K = keys.size(1);
  // The first tile alone must supply k candidates.
  const int64_t tile = std::max(key_tile, k);
  const auto float_opts = q.options().dtype(at::kFloat);
  const auto index_opts = q.options().dtype(at::kLong);
  at::Tensor values = at::empty({B, M, k}, float_opts);
  at::Tensor indices = at::empty({B, M, k}, index_opts);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  for (int64_t b = 0; b < B; ++b) {
    const at::Tensor qb_all = q[b];
    const at::Tensor kb_all = keys[b];
    for (int64_t m0 = 0; m0 < M; m0 += query_block) {
      const int64_t rows = std::min(query_block, M - m0);
      const at::Tensor qb = qb_all.narrow(0, m0, rows);
      at::Tensor cur_v = at::empty({rows, k}, float_opts), nxt_v = at::empty({rows, k}, float_opts);
      at::Tensor cur_i = at::empty({rows, k}, index_opts), nxt_i = at::empty({rows, k}, index_opts);
      int n_prev = 0;
      for (int64_t t0 = 0; t0 < K; t0 += tile) {
        const int64_t cols = std::min(tile, K - t0);
        at::Tensor sims = at::mm(qb, kb_all.narrow(0, t0, cols).t());
        sims = sims.to(at::kFloat).contiguous();
        select_topk_kernel<<<static_cast<unsigned>(rows), kSelectThreads, 0, stream>>>(
            sims.data_ptr<float>(), cols, t0, cur_v.data_ptr<float>(), cur_i.data_ptr<int64_t>(),
            n_prev, nxt_v.data_ptr<float>(), nxt_i.data_ptr<int64_t>(), static_cast<int>(k));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        std::swap(cur_v, nxt_v);
        std::swap(cur_i, nxt_i);
        n_prev = static_cast<int>(k);
      }
      // Sort by value, descending; the stable sort keeps tie order reproducible
      // for a given selection.
      const auto sorted = at::sort(cur_v, /*stable=*/true, /*dim=*/1, /*descending=*/true);
      values[b].narrow(0, m0, rows).copy_(std::get<0>(sorted));
      indices[b].narrow(0, m0, rows).copy_(cur_i.gather(1, std::get<1>(sorted)));
    }
  }
  return {values.to(q.scalar_type()), indices};
}

}  // namespace ppap

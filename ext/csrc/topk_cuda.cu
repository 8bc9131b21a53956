// Batched top-k neighbours on CUDA without materialising M x K.
//
// Per block of queries and tile of keys: one cuBLAS GEMM (at::mm) gives the
// tile's similarities, then select_topk_kernel merges them with each query's
// running top-k.  The selection is an exact radix select in shared memory:
// four 8-bit histogram passes over the order-preserving bit patterns find the
// k-th largest candidate, then everything above it and the lowest-index
// copies of it are written out.  Running results ping-pong between two
// [rows, k] buffers and are sorted once at the end by (value, index).
//
// The result order is that of the CPU kernel (topk_cpu.cpp) and of
// torch.topk: NaN above every number, -0 equal to +0, equal values lowest
// key index first.  Every choice depends only on the values and indices,
// never on the order in which threads get to their atomics, so the result
// is deterministic and equal to the CPU kernel's up to GEMM rounding.
// Memory: O(query_block * key_tile + M * k).
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>

#include "cuda_api.h"
#include "ops.h"

namespace ppap {
namespace {

constexpr int kSelectThreads = 256;

// Monotone map float -> uint32 for the result order: a ranks above b  <=>
// bits(a) > bits(b), except that equal values (every NaN, -0 and +0) share
// one pattern: NaN maps to the top, -0 to the pattern of +0.
__device__ __forceinline__ uint32_t ordered_bits(float f) {
  if (f != f) return 0xFFFFFFFFu;
  if (f == 0.f) return 0x80000000u;
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Shared-memory state of one block's radix selections.
struct SelectShared {
  int hist[256];
  uint32_t prefix;
  int rank;
  int count;
};

// Block-wide: the `rank`-th largest 32-bit key among candidates j in [0, n)
// for which key_of(j, &key) returns true (at least `rank` of them), found 8
// bits at a time.  Returns the key; `*needed` = how many candidates carrying
// exactly that key belong to the top `rank`, `*present` = how many carry it.
// Every thread of the block must call it.
template <class KeyOf>
__device__ uint32_t radix_select(int64_t n, int rank, const KeyOf& key_of, SelectShared& sh,
                                 int* needed, int* present) {
  uint32_t prefix = 0, mask = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) sh.hist[i] = 0;
    __syncthreads();
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      uint32_t u;
      if (key_of(j, &u) && (u & mask) == prefix) atomicAdd(&sh.hist[(u >> shift) & 0xFFu], 1);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int above = 0;
      int bin = 255;
      for (; bin > 0; --bin) {
        if (above + sh.hist[bin] >= rank) break;
        above += sh.hist[bin];
      }
      sh.prefix = prefix | (static_cast<uint32_t>(bin) << shift);
      sh.rank = rank - above;
      sh.count = sh.hist[bin];
    }
    __syncthreads();
    prefix = sh.prefix;
    rank = sh.rank;
    mask |= 0xFFu << shift;
    __syncthreads();  // everyone has read sh before the next pass rewrites it
  }
  *needed = rank;
  *present = sh.count;  // the last pass's bin holds exactly the copies of prefix
  __syncthreads();
  return prefix;
}

// One block per query row.  Candidates j < n_prev are the row's running
// top-k (prev_val/prev_idx), the others the tile's similarities (key index
// tile_start + j - n_prev).  Writes exactly k candidates (unsorted) to next_*.
// Requires n_prev + cols >= k and key indices < 2^32.
__global__ void select_topk_kernel(const float* __restrict__ sims, int64_t cols, int64_t tile_start,
                                   const float* __restrict__ prev_val,
                                   const int64_t* __restrict__ prev_idx, int n_prev,
                                   float* __restrict__ next_val, int64_t* __restrict__ next_idx,
                                   int k) {
  __shared__ SelectShared sh;
  __shared__ int n_above, n_equal;

  const int64_t row = blockIdx.x;
  const float* srow = sims + row * cols;
  const float* pv = prev_val + row * k;
  const int64_t* pi = prev_idx + row * k;
  const int64_t n = n_prev + cols;
  auto value_at = [&](int64_t j) { return j < n_prev ? pv[j] : srow[j - n_prev]; };
  auto index_at = [&](int64_t j) { return j < n_prev ? pi[j] : tile_start + (j - n_prev); };

  // The k-th largest value: n_ties of its n_equal copies are in the top k.
  int n_ties = 0, n_copies = 0;
  const uint32_t kth = radix_select(
      n, k, [&](int64_t j, uint32_t* u) { *u = ordered_bits(value_at(j)); return true; }, sh,
      &n_ties, &n_copies);

  // If only some copies fit, keep the lowest indices: the n_ties-th largest
  // of ~index among the copies (indices are distinct, so exactly n_ties
  // copies have ~index >= it).
  uint32_t min_inv_index = 0;
  if (n_ties < n_copies) {
    int unused_needed = 0, unused_present = 0;
    min_inv_index = radix_select(
        n, n_ties,
        [&](int64_t j, uint32_t* u) {
          *u = ~static_cast<uint32_t>(index_at(j));
          return ordered_bits(value_at(j)) == kth;
        },
        sh, &unused_needed, &unused_present);
  }

  if (threadIdx.x == 0) {
    n_above = 0;
    n_equal = 0;
  }
  __syncthreads();
  // Positions within next_* are claimed in atomic order, which does not
  // matter: the set is fixed, and the final sort orders it completely.
  const int first_tie = k - n_ties;
  float* nv = next_val + row * k;
  int64_t* ni = next_idx + row * k;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    const float x = value_at(j);
    const uint32_t u = ordered_bits(x);
    if (u > kth) {
      const int pos = atomicAdd(&n_above, 1);
      nv[pos] = x;
      ni[pos] = index_at(j);
    } else if (u == kth) {
      const int64_t index = index_at(j);
      if (~static_cast<uint32_t>(index) >= min_inv_index) {
        const int e = atomicAdd(&n_equal, 1);
        nv[first_tie + e] = x;
        ni[first_tie + e] = index;
      }
    }
  }
}

// Sort keys of the final order: ascending int64 <=> (value descending in the
// result order, then index ascending).  Indices are < 2^32.
__global__ void sort_key_kernel(int64_t n, const float* __restrict__ val,
                                const int64_t* __restrict__ idx, int64_t* __restrict__ key) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  const uint64_t u = (uint64_t(~ordered_bits(val[i])) << 32) | uint64_t(uint32_t(idx[i]));
  key[i] = static_cast<int64_t>(u ^ (uint64_t(1) << 63));  // unsigned order as signed
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> topk_neighbors_cuda(const at::Tensor& q, const at::Tensor& keys,
                                                       int64_t k, int64_t key_tile,
                                                       int64_t query_block) {
  check_topk_args(q, keys, k, key_tile, query_block);
  const DeviceGuard guard(q.device());
  const Float32Math float32_math;
  const int64_t B = q.size(0), M = q.size(1), K = keys.size(1);
  // Key indices travel as 32 bits through the tie selection and the sort key;
  // rows of the select grid are blocks (at most 2^31 - 1).
  TORCH_CHECK(K <= int64_t(UINT32_MAX), "ppap_ext::topk_neighbors: CUDA supports at most 2^32 - 1 keys, got ", K);
  TORCH_CHECK(k <= INT32_MAX, "ppap_ext::topk_neighbors: k too large for CUDA: ", k);
  const int64_t tile = topk_tile(key_tile, k);
  const auto float_opts = q.options().dtype(at::kFloat);
  const auto index_opts = q.options().dtype(at::kLong);
  at::Tensor values = at::empty({B, M, k}, float_opts);
  at::Tensor indices = at::empty({B, M, k}, index_opts);
  const cudaStream_t stream = current_stream();

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
        at::Tensor sims = device_mm(qb, kb_all.narrow(0, t0, cols).t());
        sims = sims.to(at::kFloat).contiguous();
        launch(select_topk_kernel, rows, kSelectThreads, stream, sims.data_ptr<float>(), cols, t0,
               cur_v.data_ptr<float>(), cur_i.data_ptr<int64_t>(), n_prev,
               nxt_v.data_ptr<float>(), nxt_i.data_ptr<int64_t>(), static_cast<int>(k));
        std::swap(cur_v, nxt_v);
        std::swap(cur_i, nxt_i);
        n_prev = static_cast<int>(k);
      }
      // Sort by (value descending, index ascending): one int64 key per entry.
      at::Tensor sort_key = at::empty({rows, k}, index_opts);
      launch(sort_key_kernel, (rows * k + 255) / 256, 256, stream, rows * k,
             cur_v.data_ptr<float>(), cur_i.data_ptr<int64_t>(), sort_key.data_ptr<int64_t>());
      const at::Tensor order = std::get<1>(at::sort(sort_key, /*dim=*/1));
      values[b].narrow(0, m0, rows).copy_(cur_v.gather(1, order));
      indices[b].narrow(0, m0, rows).copy_(cur_i.gather(1, order));
    }
  }
  return {values.to(q.scalar_type()), indices};
}

}  // namespace ppap

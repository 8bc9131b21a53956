// Batched top-k neighbours on the CPU without materialising M x K.
//
// For each block of queries, similarities are computed one key tile at a time
// with at::mm (multi-threaded BLAS), and every query keeps a size-k min-heap of
// its best candidates so far (threads split the queries of the block).
// Memory: O(query_block * key_tile + M * k).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "ops.h"

namespace ppap {
namespace {

// The order of the results, as torch.topk(largest=True) sorts: NaN counts as
// larger than every number (NaNs are equal to each other), -0 equals +0, and
// equal values come lowest key index first.  A strict total order on
// (value, index) pairs, since no index occurs twice.
inline bool ranks_before(float va, int64_t ia, float vb, int64_t ib) {
  const bool a_nan = std::isnan(va), b_nan = std::isnan(vb);
  if (a_nan != b_nan) return a_nan;
  if (!a_nan && va != vb) return va > vb;
  return ia < ib;
}

// Heap of a query's k best candidates so far, stored in two parallel arrays
// of capacity k, with the candidate that ranks last at the root.  Keys are
// offered in increasing index order, so a candidate displaces the root only
// if its value ranks strictly above the root's: among equal values the
// lowest indices stay.
struct HeapView {
  float* val;
  int64_t* idx;
  int64_t k;

  // True if entry a ranks after entry b (belongs nearer the root).
  bool after(int64_t a, int64_t b) const { return ranks_before(val[b], idx[b], val[a], idx[a]); }

  void sift_down(int64_t size, int64_t i) {
    while (true) {
      const int64_t l = 2 * i + 1, r = l + 1;
      int64_t last = i;
      if (l < size && after(l, last)) last = l;
      if (r < size && after(r, last)) last = r;
      if (last == i) return;
      std::swap(val[i], val[last]);
      std::swap(idx[i], idx[last]);
      i = last;
    }
  }

  void sift_up(int64_t i) {
    while (i > 0) {
      const int64_t parent = (i - 1) / 2;
      if (!after(i, parent)) return;
      std::swap(val[i], val[parent]);
      std::swap(idx[i], idx[parent]);
      i = parent;
    }
  }

  // Offers candidates s[0..n) with indices base + j (larger than every index
  // offered before); `size` is the heap fill.
  void offer(const float* s, int64_t n, int64_t base, int64_t& size) {
    int64_t j = 0;
    for (; j < n && size < k; ++j) {  // fill phase
      val[size] = s[j];
      idx[size] = base + j;
      sift_up(size);
      ++size;
    }
    if (j == n) return;
    // Steady state: almost every candidate fails the first test.  A NaN
    // candidate beats a numeric root; nothing beats a NaN root (the heap then
    // holds k NaNs of lower index), and `x > NaN` is false for every x.
    float threshold = val[0];
    bool root_is_nan = std::isnan(threshold);
    for (; j < n; ++j) {
      const float x = s[j];
      if (x > threshold || (std::isnan(x) && !root_is_nan)) {
        val[0] = x;
        idx[0] = base + j;
        sift_down(k, 0);
        threshold = val[0];
        root_is_nan = std::isnan(threshold);
      }
    }
  }

  // Writes the heap's content in result order (see ranks_before).
  void write_sorted(float* out_val, int64_t* out_idx) const {
    std::vector<int64_t> order(k);
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
      return ranks_before(val[a], idx[a], val[b], idx[b]);
    });
    for (int64_t i = 0; i < k; ++i) {
      out_val[i] = val[order[i]];
      out_idx[i] = idx[order[i]];
    }
  }
};

// The similarities of one tile, float32.  oneDNN follows PyTorch's float32
// matmul precision as well ("medium" computes in bf16 on AVX-512 CPUs, "high"
// in TF32 on CPUs with AMX-FP16) and offers no thread-local switch like
// at::NoTF32Guard, so under those settings float32 products are formed in
// float64 instead (rounded once to float32: never less precise than IEEE
// float32, the CUDA kernel's arithmetic).
at::Tensor tile_similarities(const at::Tensor& q, const at::Tensor& keys) {
  const auto precision =
      at::globalContext().float32Precision(at::Float32Backend::MKLDNN, at::Float32Op::MATMUL);
  const bool lowered =
      precision == at::Float32Precision::BF16 || precision == at::Float32Precision::TF32;
  if (q.scalar_type() == at::kFloat && lowered) {
    return at::mm(q.to(at::kDouble), keys.t().to(at::kDouble)).to(at::kFloat);
  }
  return at::mm(q, keys.t()).to(at::kFloat).contiguous();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> topk_neighbors_cpu(const at::Tensor& q, const at::Tensor& keys,
                                                      int64_t k, int64_t key_tile,
                                                      int64_t query_block) {
  check_topk_args(q, keys, k, key_tile, query_block);
  const Float32Math float32_math;
  const int64_t B = q.size(0), M = q.size(1), K = keys.size(1);
  const int64_t tile = topk_tile(key_tile, k);
  at::Tensor values = at::empty({B, M, k}, q.options().dtype(at::kFloat));
  at::Tensor indices = at::empty({B, M, k}, q.options().dtype(at::kLong));

  for (int64_t b = 0; b < B; ++b) {
    const at::Tensor qb_all = q[b];
    const at::Tensor kb_all = keys[b];
    for (int64_t m0 = 0; m0 < M; m0 += query_block) {
      const int64_t rows = std::min(query_block, M - m0);
      const at::Tensor qb = qb_all.narrow(0, m0, rows);
      std::vector<float> heap_val(rows * k);
      std::vector<int64_t> heap_idx(rows * k);
      std::vector<int64_t> heap_size(rows, 0);

      for (int64_t t0 = 0; t0 < K; t0 += tile) {
        const int64_t cols = std::min(tile, K - t0);
        // GEMM outside the parallel region so BLAS can use all threads.
        const at::Tensor sims = tile_similarities(qb, kb_all.narrow(0, t0, cols));
        const float* s = sims.data_ptr<float>();
        at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
          for (int64_t r = begin; r < end; ++r) {
            HeapView heap{&heap_val[r * k], &heap_idx[r * k], k};
            heap.offer(s + r * cols, cols, t0, heap_size[r]);
          }
        });
      }

      float* out_val = values[b].data_ptr<float>() + m0 * k;
      int64_t* out_idx = indices[b].data_ptr<int64_t>() + m0 * k;
      at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          HeapView heap{&heap_val[r * k], &heap_idx[r * k], k};
          heap.write_sorted(out_val + r * k, out_idx + r * k);
        }
      });
    }
  }
  return {values.to(q.scalar_type()), indices};
}

}  // namespace ppap

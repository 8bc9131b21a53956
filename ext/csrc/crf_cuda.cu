// Dense CRF on CUDA: the CPU algorithm (crf_cpu.cpp) with the lattice built
// and applied on the GPU.  Geometry comes from the shared lattice_geometry.h,
// so both paths put every pixel in the same simplex with the same weights.
//
// Per kernel (the position kernel once per batch, the bilateral one per image):
//   1. simplex_kernel   - the d+1 vertex keys and barycentric weights per pixel;
//   2. insert_kernel    - lock-free open-addressing hash table: each slot is
//                         claimed with atomicCAS by the first vertex carrying
//                         a key (keys are read from the array written in step
//                         1, so no slot is ever half-written);
//   3. lattice points   - the claiming vertices, numbered by a prefix sum;
//   4. neighbor_kernel  - blur neighbours along the d+1 axes via table lookups.
// Per filtering: splat (atomicAdd scatter), d+1 blur passes, slice.  The
// mean-field arithmetic between filterings uses ATen ops on the GPU.  Splat
// atomics make the summation order (hence the last bits) nondeterministic.
#include <ATen/ATen.h>

#include <optional>
#include <type_traits>
#include <vector>

#include "cuda_api.h"
#include "lattice_geometry.h"
#include "ops.h"

namespace ppap {
namespace {

constexpr int kThreads = 256;

struct LatticeScales {
  float s[kMaxDim];
};

int64_t blocks_for(int64_t n) { return (n + kThreads - 1) / kThreads; }

// Calls f(std::integral_constant<int, d>()) for a lattice dimension d in
// 2..kMaxDim.  The kernels with per-thread arrays are instantiated per
// dimension: arrays of constant size, indexed in unrolled loops, stay in
// registers instead of a stack frame.
template <class F>
void with_dimension(int d, const F& f) {
  static_assert(kMaxDim == 10, "with_dimension lists the dimensions 2..kMaxDim");
  switch (d) {
    case 2: return f(std::integral_constant<int, 2>());
    case 3: return f(std::integral_constant<int, 3>());
    case 4: return f(std::integral_constant<int, 4>());
    case 5: return f(std::integral_constant<int, 5>());
    case 6: return f(std::integral_constant<int, 6>());
    case 7: return f(std::integral_constant<int, 7>());
    case 8: return f(std::integral_constant<int, 8>());
    case 9: return f(std::integral_constant<int, 9>());
    case 10: return f(std::integral_constant<int, 10>());
  }
  TORCH_CHECK(false, "ppap_ext::dense_crf: lattice dimension ", d, " outside 2..", kMaxDim);
}

template <int D>
__global__ void simplex_kernel(int n_pixels, int width, const uint8_t* __restrict__ image,
                               int channels, float sxy, float srgb, LatticeScales scale,
                               int* __restrict__ keys, float* __restrict__ bary) {
  const int p = blockIdx.x * blockDim.x + threadIdx.x;
  if (p >= n_pixels) return;
  float f[D];
  pixel_feature(p, width, image, channels, sxy, srgb, f);
  enclosing_simplex<D>(f, scale.s, D, keys + int64_t(p) * (D + 1) * D,
                       bary + int64_t(p) * (D + 1));
}

__global__ void insert_kernel(int64_t n_vertices, int d, const int* __restrict__ keys,
                              int* table, uint32_t mask, int* __restrict__ owner) {
  const int64_t v = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (v >= n_vertices) return;
  const int* key = keys + v * d;
  uint32_t h = hash_key(key, d) & mask;
  while (true) {
    const int claimed = atomicCAS(&table[h], -1, static_cast<int>(v));
    if (claimed == -1) {
      owner[v] = static_cast<int>(v);
      return;
    }
    if (keys_equal(keys + int64_t(claimed) * d, key, d)) {
      owner[v] = claimed;
      return;
    }
    h = (h + 1) & mask;
  }
}

// Lattice point of `key`, or -1.  point_of[v] is valid for claiming vertices.
__device__ __forceinline__ int find_point(const int* key, int d, const int* __restrict__ keys,
                          const int* __restrict__ table, uint32_t mask,
                          const int* __restrict__ point_of) {
  uint32_t h = hash_key(key, d) & mask;
  while (true) {
    const int claimed = table[h];
    if (claimed < 0) return -1;
    if (keys_equal(keys + int64_t(claimed) * d, key, d)) return point_of[claimed];
    h = (h + 1) & mask;
  }
}

template <int D>
__global__ void neighbor_kernel(int n_points, const int64_t* __restrict__ representative,
                                const int* __restrict__ keys, const int* __restrict__ table,
                                uint32_t mask, const int* __restrict__ point_of,
                                int* __restrict__ neighbors) {
  const int m = blockIdx.x * blockDim.x + threadIdx.x;
  if (m >= n_points) return;
  const int* key = keys + representative[m] * D;
  int n1[D], n2[D];
  for (int j = 0; j <= D; ++j) {
    axis_neighbors(key, D, j, n1, n2);
    int* out = neighbors + (int64_t(j) * n_points + m) * 2;
    out[0] = find_point(n1, D, keys, table, mask, point_of) + 1;
    out[1] = find_point(n2, D, keys, table, mask, point_of) + 1;
  }
}

// values[(offset[v] + 1), c] += bary[v] * in[p, c], one thread per (vertex, class).
__global__ void splat_kernel(int64_t n_vertices, int nv, int C, const float* __restrict__ in,
                             const int* __restrict__ offset, const float* __restrict__ bary,
                             float* values) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= n_vertices * C) return;
  const int64_t v = i / C;
  const int c = static_cast<int>(i - v * C);
  const int64_t p = v / nv;
  atomicAdd(&values[(int64_t(offset[v]) + 1) * C + c], bary[v] * in[p * C + c]);
}

// One blur pass along one axis with [0.5, 1, 0.5]; row 0 is the zero row.
__global__ void blur_kernel(int n_points, int C, const int* __restrict__ nb,
                            const float* __restrict__ old_values, float* __restrict__ new_values) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= int64_t(n_points) * C) return;
  const int64_t m = i / C;
  const int c = static_cast<int>(i - m * C);
  const float self = old_values[(m + 1) * C + c];
  const float a = old_values[int64_t(nb[2 * m]) * C + c];
  const float b = old_values[int64_t(nb[2 * m + 1]) * C + c];
  new_values[(m + 1) * C + c] = self + 0.5f * (a + b);
}

__global__ void slice_kernel(int n_pixels, int nv, int C, const int* __restrict__ offset,
                             const float* __restrict__ bary, const float* __restrict__ values,
                             float alpha, float* __restrict__ out) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= int64_t(n_pixels) * C) return;
  const int64_t p = i / C;
  const int c = static_cast<int>(i - p * C);
  float acc = 0.f;
  for (int r = 0; r < nv; ++r) {
    const int64_t v = p * nv + r;
    acc += bary[v] * values[(int64_t(offset[v]) + 1) * C + c] * alpha;
  }
  out[i] = acc;
}

struct GpuLattice {
  int d = 0;
  int n_pixels = 0;
  int n_points = 0;
  at::Tensor offset;     // int32 [V]
  at::Tensor bary;       // float [V]
  at::Tensor neighbors;  // int32 [(d+1) * M * 2], point + 1, 0 = missing
};

// Smallest power of two >= n (at least 1024), in 64 bits: the hash table of
// V vertices has up to 2^32 slots (V < 2^31, check_crf_args), one more than
// uint32_t holds.
int64_t next_pow2(int64_t n) {
  int64_t p = 1024;
  while (p < n) p <<= 1;
  return p;
}

// image (device pointer) == nullptr builds the position-only lattice.
GpuLattice build_lattice(int n_pixels, int width, const uint8_t* image, int channels, float sxy,
                         float srgb, const at::TensorOptions& device_opts, cudaStream_t stream) {
  GpuLattice L;
  const int d = image != nullptr ? 2 + channels : 2;
  const int nv = d + 1;
  const int64_t n_vertices = int64_t(n_pixels) * nv;
  L.d = d;
  L.n_pixels = n_pixels;
  const auto int_opts = device_opts.dtype(at::kInt);

  LatticeScales scale{};
  for (int i = 0; i < d; ++i) scale.s[i] = lattice_scale(i, d);
  at::Tensor keys = at::empty({n_vertices * d}, int_opts);
  L.bary = at::empty({n_vertices}, device_opts.dtype(at::kFloat));
  with_dimension(d, [&](auto dim) {
    launch(simplex_kernel<decltype(dim)::value>, blocks_for(n_pixels), kThreads, stream, n_pixels, width, image,
           channels, sxy, srgb, scale, keys.data_ptr<int>(), L.bary.data_ptr<float>());
  });

  const int64_t table_size = next_pow2(2 * n_vertices + 1);
  TORCH_CHECK(table_size <= (int64_t(1) << 32), "ppap_ext::dense_crf: lattice hash table too large");
  const uint32_t mask = static_cast<uint32_t>(table_size - 1);  // the hash is 32 bits
  at::Tensor table = at::full({table_size}, -1, int_opts);
  at::Tensor owner = at::empty({n_vertices}, int_opts);
  launch(insert_kernel, blocks_for(n_vertices), kThreads, stream, n_vertices, d,
         keys.data_ptr<int>(), table.data_ptr<int>(), mask, owner.data_ptr<int>());

  // Lattice points = claiming vertices, numbered in vertex order.
  const at::Tensor is_owner = owner.eq(at::arange(n_vertices, int_opts));
  const at::Tensor point_of = is_owner.cumsum(0, at::kInt).sub_(1);  // valid where is_owner
  const at::Tensor representative = is_owner.nonzero().squeeze(1);   // int64 [M], ascending
  L.n_points = static_cast<int>(representative.size(0));
  L.offset = point_of.index_select(0, owner.to(at::kLong)).contiguous();

  L.neighbors = at::empty({int64_t(nv) * L.n_points * 2}, int_opts);
  with_dimension(d, [&](auto dim) {
    launch(neighbor_kernel<decltype(dim)::value>, blocks_for(L.n_points), kThreads, stream, L.n_points,
           representative.data_ptr<int64_t>(), keys.data_ptr<int>(), table.data_ptr<int>(), mask,
           point_of.data_ptr<int>(), L.neighbors.data_ptr<int>());
  });
  return L;
}

// Lattice approximation of K * in for in [P, C] (float, contiguous).
at::Tensor lattice_filter(const GpuLattice& L, const at::Tensor& in, cudaStream_t stream) {
  const int C = static_cast<int>(in.size(1));
  const int nv = L.d + 1;
  const int64_t n_vertices = int64_t(L.n_pixels) * nv;
  at::Tensor cur = at::zeros({int64_t(L.n_points) + 1, C}, in.options());
  at::Tensor nxt = at::zeros_like(cur);  // row 0 must stay zero in both buffers
  launch(splat_kernel, blocks_for(n_vertices * C), kThreads, stream, n_vertices, nv, C,
         in.data_ptr<float>(), L.offset.data_ptr<int>(), L.bary.data_ptr<float>(),
         cur.data_ptr<float>());
  for (int j = 0; j <= L.d; ++j) {
    launch(blur_kernel, blocks_for(int64_t(L.n_points) * C), kThreads, stream, L.n_points, C,
           L.neighbors.data_ptr<int>() + int64_t(j) * L.n_points * 2, cur.data_ptr<float>(),
           nxt.data_ptr<float>());
    std::swap(cur, nxt);
  }
  at::Tensor out = at::empty_like(in);
  launch(slice_kernel, blocks_for(int64_t(L.n_pixels) * C), kThreads, stream, L.n_pixels, nv, C,
         L.offset.data_ptr<int>(), L.bary.data_ptr<float>(), cur.data_ptr<float>(),
         slice_alpha(L.d), out.data_ptr<float>());
  return out;
}

// A pairwise kernel: its lattice, symmetric normaliser 1 / sqrt(K 1 + 1e-20)
// ([P, 1]) and weight.
struct GpuKernel {
  GpuLattice lattice;
  at::Tensor norm;
  double weight;
};

GpuKernel make_kernel(GpuLattice lattice, double weight, const at::TensorOptions& opts,
                      cudaStream_t stream) {
  GpuKernel k{std::move(lattice), {}, weight};
  const at::Tensor ones = at::ones({k.lattice.n_pixels, 1}, opts);
  k.norm = lattice_filter(k.lattice, ones, stream).add_(1e-20).rsqrt_();
  return k;
}

// Mean field for one image: prob [P, C] float, kernels in the order their
// messages are added (position, then bilateral, as on the CPU).
at::Tensor mean_field(const at::Tensor& prob, int64_t iters,
                      const std::vector<const GpuKernel*>& kernels, cudaStream_t stream) {
  const at::Tensor neg_unary = prob.clamp(1e-5, 1.0).log_();
  at::Tensor q = at::_softmax(neg_unary, 1, false);
  for (int64_t it = 0; it < iters; ++it) {
    at::Tensor logits = neg_unary.clone();
    for (const GpuKernel* k : kernels) {
      // n * K(n * Q); Potts: agreeing neighbours raise the logit.
      const at::Tensor message = lattice_filter(k->lattice, (q * k->norm).contiguous(), stream);
      logits.add_(message.mul_(k->norm), k->weight);
    }
    q = at::_softmax(logits, 1, false);
  }
  return q;
}

}  // namespace

at::Tensor dense_crf_cuda(const at::Tensor& image, const at::Tensor& probs, int64_t iters,
                          double pos_xy, double pos_w, double bi_xy, double bi_rgb, double bi_w) {
  check_crf_args(image, probs, iters);
  check_crf_params(probs, pos_xy, pos_w, bi_xy, bi_rgb, bi_w);
  const DeviceGuard guard(probs.device());
  const Float32Math float32_math;
  const int64_t B = probs.size(0), C = probs.size(1), H = probs.size(2), W = probs.size(3);
  const int P = static_cast<int>(H * W), width = static_cast<int>(W);
  const int channels = static_cast<int>(image.size(3));
  const at::Tensor img = image.contiguous();
  const at::Tensor prob_pc = probs.permute({0, 2, 3, 1}).contiguous().view({B, H * W, C});
  at::Tensor q_pc = at::empty_like(prob_pc);
  const cudaStream_t stream = current_stream();
  const auto opts = prob_pc.options();
  // The position kernel depends only on the image size: one lattice for the
  // batch (each build waits once for the GPU, to size the lattice by its
  // number of points).
  std::optional<GpuKernel> position;
  if (pos_w != 0) {
    position = make_kernel(build_lattice(P, width, nullptr, 0, static_cast<float>(pos_xy), 1.f,
                                         opts, stream),
                           pos_w, opts, stream);
  }
  for (int64_t b = 0; b < B; ++b) {
    std::vector<const GpuKernel*> kernels;
    if (position) kernels.push_back(&*position);
    std::optional<GpuKernel> bilateral;
    if (bi_w != 0) {
      bilateral = make_kernel(build_lattice(P, width, img[b].data_ptr<uint8_t>(), channels,
                                            static_cast<float>(bi_xy), static_cast<float>(bi_rgb),
                                            opts, stream),
                              bi_w, opts, stream);
      kernels.push_back(&*bilateral);
    }
    q_pc[b].copy_(mean_field(prob_pc[b], iters, kernels, stream));
  }
  return q_pc.view({B, H, W, C}).permute({0, 3, 1, 2}).contiguous();
}

}  // namespace ppap

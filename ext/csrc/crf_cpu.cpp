// Dense CRF (fully connected, Potts, mean field) on the CPU with the
// permutohedral lattice, numerically following pydensecrf (see SPEC.md).
//
// Layout: per image, pixel-major / class-minor ([P, C]) so that every lattice
// operation works on C contiguous floats per pixel or lattice point, which the
// compiler vectorises.  Parallelism: across images when the batch has at
// least as many images as threads, otherwise inside each image (splat, blur
// and slice are all data-parallel in the gather formulation used here).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "lattice_geometry.h"
#include "ops.h"

namespace ppap {
namespace {

// Runs f(begin, end) over [0, n) with at::parallel_for, or inline when the
// caller is already parallel across images.
template <class F>
void for_range(bool parallel, int64_t n, int64_t grain, const F& f) {
  if (parallel) {
    at::parallel_for(0, n, grain, f);
  } else if (n > 0) {
    f(0, n);
  }
}

// A lattice built for one image and one kernel; reused for every filtering.
struct Lattice {
  int d = 0;
  int n_pixels = 0;
  int n_points = 0;
  std::vector<int> offset;      // [V] lattice point of vertex v = p * (d+1) + r
  std::vector<float> bary;      // [V] barycentric weight of vertex v
  std::vector<int> neighbors;   // [(d+1) * n_points * 2]: point index + 1, 0 = missing
};

// Open-addressing hash table from d-coordinate keys to lattice point indices.
// Keys are stored once per point, compactly, which keeps probes cache friendly;
// the table doubles when half full.
class PointTable {
 public:
  explicit PointTable(int d, int64_t expected_points) : d_(d) {
    uint32_t cap = 1024;
    while (cap < 2 * expected_points) cap <<= 1;
    slots_.assign(cap, Slot{0, -1});
    keys_.reserve(expected_points * d);
  }

  int size() const { return static_cast<int>(keys_.size() / d_); }
  const int* key(int point) const { return &keys_[int64_t(point) * d_]; }

  // Point index of `key`, inserting it if new.
  int insert(const int* key) {
    if (2 * (int64_t(size()) + 1) > int64_t(slots_.size())) grow();
    const uint32_t h = hash_key(key, d_);
    uint32_t i = h & mask();
    while (true) {
      const Slot& s = slots_[i];
      if (s.point < 0) {
        const int point = size();
        keys_.insert(keys_.end(), key, key + d_);
        slots_[i] = Slot{h, point};
        return point;
      }
      if (s.hash == h && keys_equal(this->key(s.point), key, d_)) return s.point;
      i = (i + 1) & mask();
    }
  }

  // Point index of `key`, or -1.  Thread-safe once insertion is over.
  int find(const int* key) const {
    const uint32_t h = hash_key(key, d_);
    uint32_t i = h & mask();
    while (true) {
      const Slot& s = slots_[i];
      if (s.point < 0) return -1;
      if (s.hash == h && keys_equal(this->key(s.point), key, d_)) return s.point;
      i = (i + 1) & mask();
    }
  }

 private:
  struct Slot {
    uint32_t hash;
    int point;
  };
  uint32_t mask() const { return static_cast<uint32_t>(slots_.size() - 1); }

  void grow() {
    std::vector<Slot> old;
    old.swap(slots_);
    slots_.assign(old.size() * 2, Slot{0, -1});
    for (const Slot& s : old) {
      if (s.point < 0) continue;
      uint32_t i = s.hash & mask();
      while (slots_[i].point >= 0) i = (i + 1) & mask();
      slots_[i] = s;
    }
  }

  int d_;
  std::vector<Slot> slots_;
  std::vector<int> keys_;
};

// image == nullptr builds the position-only (Gaussian) lattice.
Lattice build_lattice(int n_pixels, int width, const uint8_t* image, int channels, float sxy,
                      float srgb, bool parallel) {
  Lattice L;
  const int d = image != nullptr ? 2 + channels : 2;
  const int nv = d + 1;
  L.d = d;
  L.n_pixels = n_pixels;
  const int64_t n_vertices = int64_t(n_pixels) * nv;

  float scale[kMaxDim];
  for (int i = 0; i < d; ++i) scale[i] = lattice_scale(i, d);

  // 1. Simplex vertices of every pixel (independent per pixel).
  std::vector<int> keys(n_vertices * d);
  L.bary.resize(n_vertices);
  for_range(parallel, n_pixels, 1024, [&](int64_t begin, int64_t end) {
    float f[kMaxDim];
    for (int64_t p = begin; p < end; ++p) {
      pixel_feature(static_cast<int>(p), width, image, channels, sxy, srgb, f);
      enclosing_simplex(f, scale, d, &keys[p * nv * d], &L.bary[p * nv]);
    }
  });

  // 2. Deduplicate vertices into lattice points (serial: points are numbered
  //    in first-seen order, which keeps neighbouring pixels' points close).
  PointTable table(d, n_pixels);
  L.offset.resize(n_vertices);
  for (int64_t v = 0; v < n_vertices; ++v) L.offset[v] = table.insert(&keys[v * d]);
  const int M = table.size();
  L.n_points = M;
  std::vector<int>().swap(keys);

  // 3. Blur neighbours along each of the d+1 lattice axes.
  L.neighbors.resize(int64_t(nv) * M * 2);
  for_range(parallel, M, 1024, [&](int64_t begin, int64_t end) {
    int n1[kMaxDim], n2[kMaxDim];
    for (int64_t m = begin; m < end; ++m) {
      const int* key = table.key(static_cast<int>(m));
      for (int j = 0; j <= d; ++j) {
        axis_neighbors(key, d, j, n1, n2);
        int* out = &L.neighbors[(int64_t(j) * M + m) * 2];
        out[0] = table.find(n1) + 1;
        out[1] = table.find(n2) + 1;
      }
    }
  });

  return L;
}

// Signals are filtered as rows of Cp floats per pixel / lattice point, with
// Cp a multiple of kVec (zero padding), processed as kVec-wide vectors (GCC /
// Clang vector extensions; no alignment assumed).  Four lanes keep the
// padding small (27 classes -> 28) and match the baseline SSE width.  Cp = 1
// (the normaliser) uses plain floats.
constexpr int kVec = 4;
typedef float vec4 __attribute__((vector_size(16), aligned(4)));

template <int VW>
struct VecOf {
  using type = float;
};
template <>
struct VecOf<4> {
  using type = vec4;
};

constexpr int kPrefetch = 8;

inline void prefetch_row(const void* row, int floats) {
  const char* p = static_cast<const char*>(row);
  for (int off = 0; off < floats * 4; off += 64) __builtin_prefetch(p + off);
}

// Scratch of the filtering: two [(n_points + 1) * Cp] buffers.  Row 0 stays
// zero and stands for "missing neighbour".
struct FilterBuffers {
  std::vector<float> data;
  float* prepare(int n_points, int row) {
    const size_t n = size_t(n_points + 1) * row * 2;
    if (data.size() < n) data.resize(n);
    return data.data();
  }
};

// out = alpha * slice(blur(splat(in))), the lattice approximation of K * in.
// in/out are [P, nvec * VW] floats.
template <int VW>
void lattice_filter(const Lattice& L, const float* in, float* out, int nvec, FilterBuffers& buf,
                    bool parallel) {
  using V = typename VecOf<VW>::type;
  const int d = L.d, nv = d + 1, M = L.n_points;
  const V* __restrict__ in_v = reinterpret_cast<const V*>(in);
  V* __restrict__ out_v = reinterpret_cast<V*>(out);
  const int64_t lattice_floats = int64_t(M + 1) * nvec * VW;
  float* scratch = buf.prepare(M, nvec * VW);
  V* cur = reinterpret_cast<V*>(scratch);
  V* nxt = reinterpret_cast<V*>(scratch + lattice_floats);
  for (int k = 0; k < nvec; ++k) cur[k] = nxt[k] = V{};

  // Splat: scatter each pixel into its d+1 lattice points, in pixel order
  // (the reference's order, so sums round identically).  Threads split the
  // vector lanes of each row instead of the pixels, so they never collide.
  std::fill(cur, cur + (int64_t(M) + 1) * nvec, V{});
  for_range(parallel, nvec, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t p = 0; p < L.n_pixels; ++p) {
      const V* src = in_v + p * nvec;
      for (int r = 0; r < nv; ++r) {
        const int64_t v = p * nv + r;
        const float w = L.bary[v];
        V* dst = cur + (int64_t(L.offset[v]) + 1) * nvec;
        for (int64_t k = k0; k < k1; ++k) dst[k] += w * src[k];
      }
    }
  });

  // Blur with [0.5, 1, 0.5] along each lattice axis in turn.
  for (int j = 0; j <= d; ++j) {
    const int* nb = &L.neighbors[int64_t(j) * M * 2];
    const V* __restrict__ old_v = cur;
    V* __restrict__ new_v = nxt;
    for_range(parallel, M, 1024, [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m) {
        // The neighbour rows are scattered over the lattice: fetch the ones a
        // few points ahead so that several cache misses overlap.
        if (m + kPrefetch < end) {
          prefetch_row(old_v + int64_t(nb[2 * (m + kPrefetch)]) * nvec, nvec * VW);
          prefetch_row(old_v + int64_t(nb[2 * (m + kPrefetch) + 1]) * nvec, nvec * VW);
        }
        const V* self = old_v + (m + 1) * nvec;
        const V* n1 = old_v + int64_t(nb[2 * m]) * nvec;
        const V* n2 = old_v + int64_t(nb[2 * m + 1]) * nvec;
        V* dst = new_v + (m + 1) * nvec;
        for (int k = 0; k < nvec; ++k) dst[k] = self[k] + 0.5f * (n1[k] + n2[k]);
      }
    });
    std::swap(cur, nxt);
  }

  // Slice (same operation order as the reference: (w * value) * alpha).
  const float alpha = slice_alpha(d);
  const V* __restrict__ val = cur;
  for_range(parallel, L.n_pixels, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      V* dst = out_v + p * nvec;
      for (int k = 0; k < nvec; ++k) dst[k] = V{};
      for (int r = 0; r < nv; ++r) {
        const int64_t v = p * nv + r;
        const float w = L.bary[v];
        const V* src = val + (int64_t(L.offset[v]) + 1) * nvec;
        for (int k = 0; k < nvec; ++k) dst[k] += w * src[k] * alpha;
      }
    }
  });
}

// 1 / sqrt(K * 1 + 1e-20): the symmetric normaliser of one kernel.
std::vector<float> symmetric_norm(const Lattice& L, FilterBuffers& buf, bool parallel) {
  std::vector<float> ones(L.n_pixels, 1.f), norm(L.n_pixels);
  lattice_filter<1>(L, ones.data(), norm.data(), 1, buf, parallel);
  for (float& x : norm) x = 1.f / std::sqrt(x + 1e-20f);
  return norm;
}

// Row-wise softmax of a [P, C] array, in place of q.  ATen's kernel is
// vectorised (exp dominates the cost otherwise); inside a parallel region it
// runs on the calling thread.
void softmax_rows(float* logits, float* q, int64_t P, int C) {
  const at::Tensor x = at::from_blob(logits, {P, C}, at::kFloat);
  at::Tensor y = at::from_blob(q, {P, C}, at::kFloat);
  at::_softmax_out(y, x, 1, false);
}

struct CrfParams {
  int iters;
  float pos_xy, pos_w, bi_xy, bi_rgb, bi_w;
};

struct Kernel {
  Lattice lattice;
  std::vector<float> norm;
  float weight;
};

// Mean field for one image.  prob and q are [P, C]; image is [H, W, Ci].
void crf_one_image(const uint8_t* image, int H, int W, int channels, const float* prob, float* q,
                   int C, const CrfParams& prm, bool parallel) {
  const int64_t P = int64_t(H) * W;
  const int64_t PC = P * C;
  FilterBuffers buf;

  std::vector<Kernel> kernels;
  if (prm.pos_w != 0.f) {
    kernels.push_back({build_lattice(P, W, nullptr, 0, prm.pos_xy, 1.f, parallel), {}, prm.pos_w});
  }
  if (prm.bi_w != 0.f) {
    kernels.push_back(
        {build_lattice(P, W, image, channels, prm.bi_xy, prm.bi_rgb, parallel), {}, prm.bi_w});
  }
  for (Kernel& k : kernels) k.norm = symmetric_norm(k.lattice, buf, parallel);

  // -U = log(clip(p, 1e-5, 1)); Q0 = softmax(-U).
  std::vector<float> neg_unary(PC);
  at::Tensor neg_unary_t = at::from_blob(neg_unary.data(), {P, C}, at::kFloat);
  at::log_out(neg_unary_t, at::from_blob(const_cast<float*>(prob), {P, C}, at::kFloat).clamp(1e-5, 1.0));
  softmax_rows(neg_unary.data(), q, P, C);

  // Filtered signals have rows of Cp >= C floats (zero padded to whole vectors).
  const int nvec = (C + kVec - 1) / kVec;
  const int Cp = nvec * kVec;
  std::vector<float> scaled(P * Cp, 0.f), message(P * Cp), logits(PC);
  for (int it = 0; it < prm.iters; ++it) {
    std::copy(neg_unary.begin(), neg_unary.end(), logits.begin());
    for (const Kernel& k : kernels) {
      // Symmetric normalisation: n * K(n * Q).
      for_range(parallel, P, 2048, [&](int64_t begin, int64_t end) {
        for (int64_t p = begin; p < end; ++p) {
          const float n = k.norm[p];
          for (int c = 0; c < C; ++c) scaled[p * Cp + c] = q[p * C + c] * n;
        }
      });
      lattice_filter<kVec>(k.lattice, scaled.data(), message.data(), nvec, buf, parallel);
      // Potts: agreeing neighbours lower the energy, i.e. raise the logit.
      for_range(parallel, P, 2048, [&](int64_t begin, int64_t end) {
        for (int64_t p = begin; p < end; ++p) {
          const float n = k.norm[p];
          for (int c = 0; c < C; ++c) logits[p * C + c] += k.weight * (message[p * Cp + c] * n);
        }
      });
    }
    softmax_rows(logits.data(), q, P, C);
  }
}

}  // namespace

at::Tensor dense_crf_cpu(const at::Tensor& image, const at::Tensor& probs, int64_t iters,
                         double pos_xy, double pos_w, double bi_xy, double bi_rgb, double bi_w) {
  check_crf_args(image, probs, iters);
  const int64_t B = probs.size(0), C = probs.size(1), H = probs.size(2), W = probs.size(3);
  const int channels = static_cast<int>(image.size(3));
  const at::Tensor img = image.contiguous();
  const at::Tensor prob_pc = probs.permute({0, 2, 3, 1}).contiguous();  // [B, H, W, C]
  at::Tensor q_pc = at::empty_like(prob_pc);

  const CrfParams prm{static_cast<int>(iters),      static_cast<float>(pos_xy),
                      static_cast<float>(pos_w),    static_cast<float>(bi_xy),
                      static_cast<float>(bi_rgb),   static_cast<float>(bi_w)};
  const uint8_t* img_ptr = img.data_ptr<uint8_t>();
  const float* prob_ptr = prob_pc.data_ptr<float>();
  float* q_ptr = q_pc.data_ptr<float>();
  const int64_t img_stride = H * W * channels, pc_stride = H * W * C;

  auto run = [&](int64_t b, bool inner_parallel) {
    crf_one_image(img_ptr + b * img_stride, static_cast<int>(H), static_cast<int>(W), channels,
                  prob_ptr + b * pc_stride, q_ptr + b * pc_stride, static_cast<int>(C), prm,
                  inner_parallel);
  };
  if (B > 1 && B >= at::get_num_threads()) {
    // Enough images to keep every thread busy: one image per task, no
    // synchronisation inside images.
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) run(b, false);
    });
  } else {
    for (int64_t b = 0; b < B; ++b) run(b, true);
  }
  return q_pc.permute({0, 3, 1, 2}).contiguous();
}

}  // namespace ppap

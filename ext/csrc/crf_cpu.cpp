// Dense CRF (fully connected, Potts, mean field) on the CPU with the
// permutohedral lattice, numerically following pydensecrf's permutohedral.cpp
// (Adams et al. 2010; Kraehenbuehl & Koltun 2011).
//
// Layout: per image, pixel-major / class-minor ([P, C]) so that every lattice
// operation works on C contiguous floats per pixel or lattice point, which the
// compiler vectorises.  Parallelism: across images when the batch has at
// least as many images as threads, otherwise inside each image (splat, blur
// and slice are all data-parallel in the gather formulation used here: the
// splat gathers per lattice point from a point -> pixels index).
//
// The lattice passes are bound by the latency of scattered row accesses
// (hash probes, neighbour rows, pixel rows of a point, point rows of a
// pixel), not by arithmetic, so every such loop prefetches a few iterations
// ahead.  The mean-field update is fused into the slice (logits = -U +
// sum_k w_k n_k K_k(n_k Q), written once per pixel).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

#include "lattice_geometry.h"
#include "ops.h"

namespace ppap {
namespace {

// Runs f(begin, end) over [0, n) on all threads, or inline when the caller is
// already parallel across images.  Threads pull chunks of ~n / (8 threads)
// (at least `grain`) from a shared counter instead of taking a fixed share,
// so that a thread slowed down by other load on its core does not hold the
// others up.
template <class F>
void for_range(bool parallel, int64_t n, int64_t grain, const F& f) {
  if (n <= 0) return;
  const int64_t threads = parallel ? at::get_num_threads() : 1;
  if (threads <= 1 || n <= grain) {
    f(0, n);
    return;
  }
  const int64_t chunk = std::max(grain, (n + 8 * threads - 1) / (8 * threads));
  const int64_t n_chunks = (n + chunk - 1) / chunk;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t c = next++; c < n_chunks; c = next++) {
      f(c * chunk, std::min(n, (c + 1) * chunk));
    }
  });
}

// A lattice built for one image and one kernel; reused for every filtering.
struct Lattice {
  int d = 0;
  int n_pixels = 0;
  int n_points = 0;
  std::vector<int> offset;      // [V] lattice point of vertex v = p * (d+1) + r
  std::vector<float> bary;      // [V] barycentric weight of vertex v
  std::vector<int> neighbors;   // [(d+1) * n_points * 2]: point index + 1, 0 = missing
  // The vertices grouped by lattice point (CSR, pixel order within a point):
  // entries entry_start[m] .. entry_start[m+1]-1 of point m.
  std::vector<int> entry_start;   // [n_points + 1]
  std::vector<int> entry_pixel;   // [V]
  std::vector<float> entry_weight;  // [V]
};


// Open-addressing hash table from d-coordinate keys to lattice point indices.
// Keys are stored once per point, compactly, which keeps probes cache friendly;
// the table doubles when half full.
class PointTable {
 public:
  // Sizes stay powers of two of at most 2^32 slots: at most V < 2^31 points
  // (check_crf_args) are inserted, and the table doubles only while
  // 2 * (points + 1) exceeds its size, so the 32-bit hash always covers it.
  explicit PointTable(int d, int64_t expected_points) : d_(d) {
    size_t cap = 1024;
    while (cap < size_t(2 * expected_points)) cap <<= 1;
    slots_.assign(cap, Slot{0, -1});
    keys_.reserve(expected_points * d);
  }

  int size() const { return static_cast<int>(keys_.size() / d_); }
  const int* key(int point) const { return &keys_[int64_t(point) * d_]; }

  // Starts loading the slot where a probe for `key` begins.
  void prefetch(const int* key) const { __builtin_prefetch(&slots_[hash_key(key, d_) & mask()]); }

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
  int find(const int* key) const { return find(key, hash_key(key, d_)); }
  uint32_t hash(const int* key) const { return hash_key(key, d_); }
  void prefetch_hash(uint32_t h) const { __builtin_prefetch(&slots_[h & mask()]); }
  int find(const int* key, uint32_t h) const {
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
  constexpr int kAhead = 8;  // hash-slot prefetch distance (probes are cache misses)
  for (int64_t v = 0; v < n_vertices; ++v) {
    if (v + kAhead < n_vertices) table.prefetch(&keys[(v + kAhead) * d]);
    L.offset[v] = table.insert(&keys[v * d]);
  }
  const int M = table.size();
  L.n_points = M;
  std::vector<int>().swap(keys);

  // 3. Vertices by lattice point, in pixel order (counting sort).
  L.entry_start.assign(int64_t(M) + 1, 0);
  for (int64_t v = 0; v < n_vertices; ++v) ++L.entry_start[L.offset[v] + 1];
  for (int m = 0; m < M; ++m) L.entry_start[m + 1] += L.entry_start[m];
  L.entry_pixel.resize(n_vertices);
  L.entry_weight.resize(n_vertices);
  {
    std::vector<int> fill(L.entry_start.begin(), L.entry_start.end() - 1);
    for (int64_t v = 0; v < n_vertices; ++v) {
      const int e = fill[L.offset[v]]++;
      L.entry_pixel[e] = static_cast<int>(v / nv);
      L.entry_weight[e] = L.bary[v];
    }
  }

  // 4. Blur neighbours along each of the d+1 lattice axes.
  L.neighbors.resize(int64_t(nv) * M * 2);
  for_range(parallel, M, 1024, [&](int64_t begin, int64_t end) {
    // Points in small blocks: hash every neighbour key of the block and
    // prefetch its slot first, then probe, so that the misses overlap.
    constexpr int kBlock = 8;
    int nk[kBlock][kMaxDim + 1][2][kMaxDim];
    uint32_t nh[kBlock][kMaxDim + 1][2];
    for (int64_t m0 = begin; m0 < end; m0 += kBlock) {
      const int nb = static_cast<int>(std::min<int64_t>(kBlock, end - m0));
      for (int b = 0; b < nb; ++b) {
        const int* key = table.key(static_cast<int>(m0 + b));
        for (int j = 0; j <= d; ++j) {
          axis_neighbors(key, d, j, nk[b][j][0], nk[b][j][1]);
          for (int s = 0; s < 2; ++s) {
            nh[b][j][s] = table.hash(nk[b][j][s]);
            table.prefetch_hash(nh[b][j][s]);
          }
        }
      }
      for (int b = 0; b < nb; ++b) {
        for (int j = 0; j <= d; ++j) {
          int* out = &L.neighbors[(int64_t(j) * M + m0 + b) * 2];
          out[0] = table.find(nk[b][j][0], nh[b][j][0]) + 1;
          out[1] = table.find(nk[b][j][1], nh[b][j][1]) + 1;
        }
      }
    }
  });

  return L;
}

// Signals are filtered as rows of Cp floats per lattice point, with Cp a
// multiple of kVec (zero padding), processed as kVec-wide vectors (GCC /
// Clang vector extensions; no alignment assumed).  Four lanes keep the
// padding small (27 classes -> 28) and match the baseline SSE width.  Cp = 1
// (the normaliser) uses plain floats.  Pixel-side arrays (Q, logits) keep
// their natural C floats per pixel; the last partial vector of a row is
// loaded / stored element-wise.
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

constexpr int kPrefetch = 16;
constexpr int kPrefetchEntries = 24;
constexpr int kPrefetchPixels = 8;

// Prefetches every cache line of a row (rows need not start on a line).
inline void prefetch_row(const void* row, int floats) {
  const char* p = static_cast<const char*>(row);
  for (int off = 0; off < floats * 4; off += 64) __builtin_prefetch(p + off);
  __builtin_prefetch(p + floats * 4 - 1);
}

// Vector k of row `src` of C floats (zero padded past C).  The partial last
// vector is assembled lane by lane (a variable-size memcpy is a libc call).
template <class V>
inline V load_vec(const float* __restrict__ src, int k, int C) {
  constexpr int VW = sizeof(V) / sizeof(float);
  V t{};
  if ((k + 1) * VW <= C) {
    std::memcpy(&t, src + k * VW, sizeof(V));
  } else {
    for (int i = 0; i < C - k * VW; ++i) t[i] = src[k * VW + i];
  }
  return t;
}

// Stores the lanes of vector k that fall inside row `dst` of C floats.
template <class V>
inline void store_vec(const V& x, int k, int C, float* __restrict__ dst) {
  constexpr int VW = sizeof(V) / sizeof(float);
  if ((k + 1) * VW <= C) {
    std::memcpy(dst + k * VW, &x, sizeof(V));
  } else {
    for (int i = 0; i < C - k * VW; ++i) dst[k * VW + i] = x[i];
  }
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

// Splat of the vectors [k0, k0 + NB) of every row: each lattice point sums
// its (pixel, weight) entries in registers.
template <int NB, class V>
void splat_block(const Lattice& L, const V* __restrict__ in, V* __restrict__ out, int nvec, int k0,
                 int64_t begin, int64_t end) {
  const int n_entries = L.entry_start[L.n_points];
  for (int64_t m = begin; m < end; ++m) {
    V acc[NB];
    for (int k = 0; k < NB; ++k) acc[k] = V{};
    for (int e = L.entry_start[m], e1 = L.entry_start[m + 1]; e < e1; ++e) {
      // The pixels of a point are scattered: fetch rows a few entries ahead.
      if (e + kPrefetchEntries < n_entries) {
        prefetch_row(in + int64_t(L.entry_pixel[e + kPrefetchEntries]) * nvec + k0,
                     NB * int(sizeof(V) / sizeof(float)));
      }
      const float w = L.entry_weight[e];
      const V* src = in + int64_t(L.entry_pixel[e]) * nvec + k0;
      for (int k = 0; k < NB; ++k) acc[k] += w * src[k];
    }
    V* dst = out + (m + 1) * nvec + k0;
    for (int k = 0; k < NB; ++k) dst[k] = acc[k];
  }
}

// Rows of up to 8 vectors in one sweep over the entries, longer ones in
// sweeps of 8.
template <class V>
void splat_range(const Lattice& L, const V* in, V* out, int nvec, int64_t begin, int64_t end) {
  for (int k0 = 0; k0 < nvec; k0 += 8) {
    switch (std::min(8, nvec - k0)) {
      case 1: splat_block<1>(L, in, out, nvec, k0, begin, end); break;
      case 2: splat_block<2>(L, in, out, nvec, k0, begin, end); break;
      case 3: splat_block<3>(L, in, out, nvec, k0, begin, end); break;
      case 4: splat_block<4>(L, in, out, nvec, k0, begin, end); break;
      case 5: splat_block<5>(L, in, out, nvec, k0, begin, end); break;
      case 6: splat_block<6>(L, in, out, nvec, k0, begin, end); break;
      case 7: splat_block<7>(L, in, out, nvec, k0, begin, end); break;
      default: splat_block<8>(L, in, out, nvec, k0, begin, end); break;
    }
  }
}

// out(p) = alpha * slice(blur(splat(in)))(p), the lattice approximation of
// K * in.  in is [P, nvec * VW] floats; each pixel's result (nvec vectors) is
// handed to emit(p, row).
//
// Splat is a gather: every lattice point sums its (pixel, weight) entries in
// pixel order, which is the reference's scatter order per point, so the sums
// round identically, and points are independent (parallel, no conflicts).
// NV > 0 fixes nvec at compile time (fully unrolled rows); NV == 0 takes it
// from nvec_rt.
template <int VW, int NV, class Emit>
void lattice_filter_n(const Lattice& L, const float* in, int nvec_rt, FilterBuffers& buf,
                      bool parallel, const Emit& emit) {
  using V = typename VecOf<VW>::type;
  const int nvec = NV > 0 ? NV : nvec_rt;
  const int d = L.d, nv = d + 1, M = L.n_points;
  const int64_t lattice_floats = int64_t(M + 1) * nvec * VW;
  float* scratch = buf.prepare(M, nvec * VW);
  V* cur = reinterpret_cast<V*>(scratch);
  V* nxt = reinterpret_cast<V*>(scratch + lattice_floats);
  for (int k = 0; k < nvec; ++k) cur[k] = nxt[k] = V{};

  const V* in_v = reinterpret_cast<const V*>(in);
  for_range(parallel, M, 512, [&](int64_t begin, int64_t end) {
    splat_range(L, in_v, cur, nvec, begin, end);
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
    V acc_fixed[NV > 0 ? NV : 1];
    std::vector<float> acc_buf(NV > 0 ? 0 : int64_t(nvec) * VW);
    V* acc = NV > 0 ? acc_fixed : reinterpret_cast<V*>(acc_buf.data());
    for (int64_t p = begin; p < end; ++p) {
      if (p + kPrefetchPixels < end) {
        for (int r = 0; r < nv; ++r) {
          prefetch_row(val + (int64_t(L.offset[(p + kPrefetchPixels) * nv + r]) + 1) * nvec,
                       nvec * VW);
        }
      }
      for (int k = 0; k < nvec; ++k) acc[k] = V{};
      for (int r = 0; r < nv; ++r) {
        const int64_t v = p * nv + r;
        const float w = L.bary[v];
        const V* src = val + (int64_t(L.offset[v]) + 1) * nvec;
        for (int k = 0; k < nvec; ++k) acc[k] += w * src[k] * alpha;
      }
      emit(p, acc);
    }
  });
}

template <int VW, class Emit>
void lattice_filter(const Lattice& L, const float* in, int nvec, FilterBuffers& buf, bool parallel,
                    const Emit& emit) {
  switch (nvec) {
    case 1: return lattice_filter_n<VW, 1>(L, in, nvec, buf, parallel, emit);
    case 2: return lattice_filter_n<VW, 2>(L, in, nvec, buf, parallel, emit);
    case 3: return lattice_filter_n<VW, 3>(L, in, nvec, buf, parallel, emit);
    case 4: return lattice_filter_n<VW, 4>(L, in, nvec, buf, parallel, emit);
    case 5: return lattice_filter_n<VW, 5>(L, in, nvec, buf, parallel, emit);
    case 6: return lattice_filter_n<VW, 6>(L, in, nvec, buf, parallel, emit);
    case 7: return lattice_filter_n<VW, 7>(L, in, nvec, buf, parallel, emit);
    case 8: return lattice_filter_n<VW, 8>(L, in, nvec, buf, parallel, emit);
    default: return lattice_filter_n<VW, 0>(L, in, nvec, buf, parallel, emit);
  }
}

// 1 / sqrt(K * 1 + 1e-20): the symmetric normaliser of one kernel.
std::vector<float> symmetric_norm(const Lattice& L, FilterBuffers& buf, bool parallel) {
  std::vector<float> norm(L.n_pixels), ones(L.n_pixels, 1.f);
  lattice_filter_n<1, 1>(
      L, ones.data(), 1, buf, parallel,
      [&](int64_t p, const float* row) { norm[p] = 1.f / std::sqrt(row[0] + 1e-20f); });
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
  if (kernels.empty()) return;

  using V = VecOf<kVec>::type;
  const int nvec = (C + kVec - 1) / kVec;
  const int Cp = nvec * kVec;
  std::vector<float> logits(PC), scaled(P * Cp, 0.f);
  for (int it = 0; it < prm.iters; ++it) {
    for (size_t ki = 0; ki < kernels.size(); ++ki) {
      const Kernel& k = kernels[ki];
      const float* n = k.norm.data();
      const float weight = k.weight;
      // Symmetric normalisation: n * K(n * Q); Potts: agreeing neighbours
      // lower the energy, i.e. raise the logit.  The first kernel starts the
      // logits from -U, the others add to them.
      for_range(parallel, P, 2048, [&](int64_t begin, int64_t end) {
        for (int64_t p = begin; p < end; ++p) {
          const float np = n[p];
          for (int c = 0; c < C; ++c) scaled[p * Cp + c] = q[p * C + c] * np;
        }
      });
      const float* base = ki == 0 ? neg_unary.data() : logits.data();
      auto emit = [&](int64_t p, V* acc) {
        const float np = n[p];
        for (int kk = 0; kk < nvec; ++kk) {
          const V x = load_vec<V>(base + p * C, kk, C) + weight * (acc[kk] * np);
          store_vec(x, kk, C, logits.data() + p * C);
        }
      };
      lattice_filter<kVec>(k.lattice, scaled.data(), nvec, buf, parallel, emit);
    }
    softmax_rows(logits.data(), q, P, C);
  }
}

}  // namespace

constexpr int64_t kMinPixelsForInnerParallel = 4096;

at::Tensor dense_crf_cpu(const at::Tensor& image, const at::Tensor& probs, int64_t iters,
                         double pos_xy, double pos_w, double bi_xy, double bi_rgb, double bi_w) {
  check_crf_args(image, probs, iters);
  check_crf_params(probs, pos_xy, pos_w, bi_xy, bi_rgb, bi_w);
  const Float32Math float32_math;
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
    // synchronisation inside images; images are handed out one at a time so
    // that a thread sharing its core with other load takes fewer.
    std::atomic<int64_t> next{0};
    at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
      for (int64_t b = next++; b < B; b = next++) run(b, false);
    });
  } else {
    // An image of a few thousand pixels takes milliseconds on one thread;
    // split up, each of the ~15 lattice passes per iteration would be a
    // parallel region whose synchronisation costs more than its work (far
    // more when the cores are shared with other processes).
    const bool inner_parallel = H * W >= kMinPixelsForInnerParallel;
    for (int64_t b = 0; b < B; ++b) run(b, inner_parallel);
  }
  return q_pc.permute({0, 3, 1, 2}).contiguous();
}

}  // namespace ppap

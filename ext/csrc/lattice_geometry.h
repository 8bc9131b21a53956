// Permutohedral-lattice geometry shared by the CPU and the CUDA dense CRF.
//
// Everything here is a pure function of one pixel (or one lattice key), so the
// same code runs on the host and on the device; keeping a single copy is what
// lets the untestable-here CUDA path inherit the numerics that the CPU tests
// check against pydensecrf.
//
// Conventions (those of pydensecrf's permutohedral lattice, Adams et al. 2010):
//   * d feature dimensions, d + 1 simplex vertices per pixel ("vertex" v =
//     pixel * (d + 1) + remainder).
//   * A lattice point is identified by the first d of its d + 1 integer
//     coordinates (the last one is implied: the coordinates sum to 0).
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define PPAP_HD __host__ __device__ __forceinline__
#else
#define PPAP_HD inline
#endif

namespace ppap {

// Largest feature dimension the fixed-size scratch arrays support.  The CRF
// uses d = 2 (position) and d = 2 + image channels (bilateral).
constexpr int kMaxDim = 10;

// Largest accepted feature magnitude (pixel coordinate / sxy, channel value /
// srgb).  Elevation multiplies features by at most ~31 (d <= kMaxDim), so
// elevated coordinates stay below 2^22, where float resolves a quarter unit,
// and far from int overflow.  Larger features (standard deviations far below
// one pixel / one grey level) let float rounding scatter the simplex
// computation.  ext/__init__.py enforces the same limit (MAX_LATTICE_FEATURE).
constexpr double kMaxFeature = 131072.0;  // 2^17

// Per-dimension scale applied before elevation: sqrt(2/3) (d+1) / sqrt((i+1)(i+2)).
// Computed in double and rounded once, like the reference implementation, so
// the rounding of lattice coordinates (hence which simplex a pixel falls in)
// matches.
inline float lattice_scale(int i, int d) {
  const float inv_std = static_cast<float>(std::sqrt(2.0 / 3.0) * (d + 1));
  return static_cast<float>(1.0 / std::sqrt(double((i + 1) * (i + 2))) * inv_std);
}

// The feature vector of pixel p (row-major, p = row * width + col):
//   (col / sxy, row / sxy, c_0 / srgb, ..., c_{channels-1} / srgb).
// With image == nullptr only the two position features are produced.
PPAP_HD void pixel_feature(int p, int width, const uint8_t* image, int channels,
                           float sxy, float srgb, float* f) {
  const int row = p / width;
  const int col = p - row * width;
  f[0] = static_cast<float>(col) / sxy;
  f[1] = static_cast<float>(row) / sxy;
  if (image != nullptr) {
    for (int c = 0; c < channels; ++c) {
      f[2 + c] = static_cast<float>(image[static_cast<int64_t>(p) * channels + c]) / srgb;
    }
  }
}

// Finds the simplex of the permutohedral lattice that encloses feature f
// (d values) and writes, for each remainder r = 0..d, the d-coordinate key of
// that vertex (keys[r * d + i]) and its barycentric weight (bary[r]).
// scale[i] = lattice_scale(i, d).  MaxD (>= d) sizes the scratch: the CUDA
// kernel instantiates it with d itself, so that the loops have constant
// bounds and the scratch stays in registers (with kMaxDim it took a 224-byte
// stack frame per thread).
template <int MaxD = kMaxDim>
PPAP_HD void enclosing_simplex(const float* f, const float* scale, int d, int* keys,
                               float* bary) {
  float elevated[MaxD + 1];
  int rem0[MaxD + 1];
  int rank[MaxD + 1];
  float b[MaxD + 2];

  // Elevate onto the hyperplane sum(x) = 0 in d + 1 dimensions (Adams et al.
  // 2010, E matrix applied without forming it).
  float running = 0.f;
  for (int j = d; j > 0; --j) {
    const float cf = f[j - 1] * scale[j - 1];
    elevated[j] = running - static_cast<float>(j) * cf;
    running += cf;
  }
  elevated[0] = running;

  // Nearest "remainder-0" point: every coordinate a multiple of d + 1.
  const float down_factor = 1.0f / static_cast<float>(d + 1);
  const float dp1 = static_cast<float>(d + 1);
  int sum = 0;
  for (int i = 0; i <= d; ++i) {
    const float v = down_factor * elevated[i];
    const float up = ceilf(v) * dp1;
    const float down = floorf(v) * dp1;
    rem0[i] = (up - elevated[i] < elevated[i] - down) ? static_cast<int>(up)
                                                       : static_cast<int>(down);
    sum += rem0[i];
  }
  sum /= d + 1;

  // Rank the residuals (largest residual gets rank 0).
  for (int i = 0; i <= d; ++i) rank[i] = 0;
  for (int i = 0; i < d; ++i) {
    const float di = elevated[i] - static_cast<float>(rem0[i]);
    for (int j = i + 1; j <= d; ++j) {
      if (di < elevated[j] - static_cast<float>(rem0[j])) {
        ++rank[i];
      } else {
        ++rank[j];
      }
    }
  }

  // The rounded point may be off the plane (sum != 0): walk it back.  With
  // features inside kMaxFeature one step of d + 1 suffices (as in pydensecrf);
  // beyond it float rounding can put the point many steps off, and the
  // general wrap keeps rank in [0, d], hence b[] below in bounds, regardless.
  for (int i = 0; i <= d; ++i) {
    rank[i] += sum;
    if (rank[i] < 0 || rank[i] > d) {
      const int steps = rank[i] < 0 ? -((-rank[i] + d) / (d + 1)) : rank[i] / (d + 1);
      rank[i] -= steps * (d + 1);
      rem0[i] -= steps * (d + 1);
    }
  }

  // Barycentric coordinates from the sorted residuals.
  for (int i = 0; i <= d + 1; ++i) b[i] = 0.f;
  for (int i = 0; i <= d; ++i) {
    const float v = (elevated[i] - static_cast<float>(rem0[i])) * down_factor;
    b[d - rank[i]] += v;
    b[d + 1 - rank[i]] -= v;
  }
  b[0] += 1.0f + b[d + 1];

  // Vertex r of the simplex: the remainder-0 point shifted by the canonical
  // simplex column r (coordinate i moves by r, or by r - (d + 1) when its rank
  // puts it past the r-th step).
  for (int r = 0; r <= d; ++r) {
    for (int i = 0; i < d; ++i) {
      keys[r * d + i] = rem0[i] + (rank[i] <= d - r ? r : r - (d + 1));
    }
    bary[r] = b[r];
  }
}

// Hash of a d-coordinate key (for open addressing; quality matters more than
// speed because clustered keys make probe chains long).
PPAP_HD uint32_t hash_key(const int* key, int d) {
  uint32_t h = 2166136261u;
  for (int i = 0; i < d; ++i) {
    h ^= static_cast<uint32_t>(key[i]);
    h *= 16777619u;
    h ^= h >> 15;
  }
  h *= 0x2c1b3c6du;
  h ^= h >> 12;
  return h;
}

PPAP_HD bool keys_equal(const int* a, const int* b, int d) {
  for (int i = 0; i < d; ++i) {
    if (a[i] != b[i]) return false;
  }
  return true;
}

// The two neighbours of lattice key `key` along lattice axis j (0..d): one
// step of the d+1 axis vector, i.e. every coordinate -1 except coordinate j
// which moves +d (n1), and the opposite (n2).  For j == d the moved
// coordinate is the implicit last one, so all stored coordinates shift.
PPAP_HD void axis_neighbors(const int* key, int d, int j, int* n1, int* n2) {
  for (int i = 0; i < d; ++i) {
    n1[i] = key[i] - 1;
    n2[i] = key[i] + 1;
  }
  if (j < d) {
    n1[j] = key[j] + d;
    n2[j] = key[j] - d;
  }
}

// Slice scale of the reference implementation.  Under symmetric normalisation
// it cancels, but keeping it makes unnormalised outputs comparable too.
PPAP_HD float slice_alpha(int d) { return 1.0f / (1.0f + powf(2.0f, -static_cast<float>(d))); }

}  // namespace ppap

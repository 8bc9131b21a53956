// Declarations of the device-specific implementations of the ppap_ext ops.
// The schemas live in ops_cpu.cpp (TORCH_LIBRARY(ppap_ext, ...)).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <algorithm>
#include <tuple>

#include "lattice_geometry.h"

namespace ppap {

// The op schemas (registered by ops_cpu.cpp; the CUDA emulation of the tests
// registers the same ones under its own namespace, shim/ops_shim.cpp).
constexpr const char* kTopkSchema =
    "topk_neighbors(Tensor q, Tensor keys, int k, int key_tile, int query_block) -> (Tensor, Tensor)";
constexpr const char* kCrfSchema =
    "dense_crf(Tensor image, Tensor probs, int iters, float pos_xy, float pos_w, float bi_xy, "
    "float bi_rgb, float bi_w) -> Tensor";

// Held by every op implementation: the ops compute what their documentation
// says whatever the caller's precision settings.
//  * Autocast: the ops register no autocast kernel, so the dispatcher passes
//    them through and their own ATen calls (the top-k GEMM) would be autocast
//    to fp16 / bf16.  Excluding the autocast keys keeps them in the input
//    dtype.
//  * TF32: with torch.backends.cuda.matmul.allow_tf32 (or
//    torch.set_float32_matmul_precision("high")) cuBLAS would multiply float32
//    in TF32, ~1e-3 relative.  at::NoTF32Guard turns that off for this thread
//    only, for the cuBLAS handles PyTorch hands out in its scope.
struct Float32Math {
  c10::impl::ExcludeDispatchKeyGuard no_autocast{c10::autocast_dispatch_keyset};
  at::NoTF32Guard no_tf32;
};

// Keys per similarity tile of top-k: at least k, so that the first tile alone
// supplies k candidates (the CUDA selection needs it).  The CPU tiles the
// same way, so both multiply the same blocks and round alike.
inline int64_t topk_tile(int64_t key_tile, int64_t k) { return std::max(key_tile, k); }

// q [B, M, D], keys [B, K, D] (same dtype), 1 <= k <= K.  Raw dot products
// (the Python front normalises for cosine similarity).  Returns values
// [B, M, k] (q's dtype, sorted descending) and indices [B, M, k] int64.
// Similarities are computed on blocks of query_block x key_tile, never for
// all M x K at once.
std::tuple<at::Tensor, at::Tensor> topk_neighbors_cpu(const at::Tensor& q, const at::Tensor& keys,
                                                      int64_t k, int64_t key_tile,
                                                      int64_t query_block);
std::tuple<at::Tensor, at::Tensor> topk_neighbors_cuda(const at::Tensor& q, const at::Tensor& keys,
                                                       int64_t k, int64_t key_tile,
                                                       int64_t query_block);

// image uint8 [B, H, W, Ci] (contiguous), probs float32 [B, C, H, W].
// Returns the mean-field marginals Q float32 [B, C, H, W].
at::Tensor dense_crf_cpu(const at::Tensor& image, const at::Tensor& probs, int64_t iters,
                         double pos_xy, double pos_w, double bi_xy, double bi_rgb, double bi_w);
at::Tensor dense_crf_cuda(const at::Tensor& image, const at::Tensor& probs, int64_t iters,
                          double pos_xy, double pos_w, double bi_xy, double bi_rgb, double bi_w);

// Shared argument checks (throw c10::Error with a one-line message).  Inline
// because the CPU and CUDA libraries are loaded separately and must not
// depend on each other's symbols.  The Python front validates user input
// with friendlier messages; these guard direct torch.ops calls.
inline void check_topk_args(const at::Tensor& q, const at::Tensor& keys, int64_t k,
                            int64_t key_tile, int64_t query_block) {
  TORCH_CHECK(q.dim() == 3 && keys.dim() == 3, "ppap_ext::topk_neighbors: expected q [B,M,D] and keys [B,K,D]");
  TORCH_CHECK(q.size(0) == keys.size(0) && q.size(2) == keys.size(2),
              "ppap_ext::topk_neighbors: batch or feature sizes differ: q ", q.sizes(), " keys ", keys.sizes());
  TORCH_CHECK(q.scalar_type() == keys.scalar_type(), "ppap_ext::topk_neighbors: q and keys dtypes differ");
  TORCH_CHECK(q.device() == keys.device(), "ppap_ext::topk_neighbors: q and keys are on different devices");
  TORCH_CHECK(k >= 1 && k <= keys.size(1), "ppap_ext::topk_neighbors: need 1 <= k <= K, got k=", k, ", K=", keys.size(1));
  TORCH_CHECK(key_tile >= 1 && query_block >= 1, "ppap_ext::topk_neighbors: key_tile and query_block must be >= 1");
}

inline void check_crf_args(const at::Tensor& image, const at::Tensor& probs, int64_t iters) {
  TORCH_CHECK(image.dim() == 4 && probs.dim() == 4, "ppap_ext::dense_crf: expected image [B,H,W,Ci] and probs [B,C,H,W]");
  TORCH_CHECK(image.scalar_type() == at::kByte, "ppap_ext::dense_crf: image must be uint8");
  TORCH_CHECK(probs.scalar_type() == at::kFloat, "ppap_ext::dense_crf: probs must be float32");
  TORCH_CHECK(image.device() == probs.device(), "ppap_ext::dense_crf: image and probs are on different devices");
  TORCH_CHECK(image.size(0) == probs.size(0) && image.size(1) == probs.size(2) && image.size(2) == probs.size(3),
              "ppap_ext::dense_crf: image ", image.sizes(), " and probs ", probs.sizes(), " disagree on batch/height/width");
  TORCH_CHECK(image.size(3) >= 1 && image.size(3) + 2 <= 10, "ppap_ext::dense_crf: image must have 1..8 channels");
  TORCH_CHECK(probs.size(1) >= 1, "ppap_ext::dense_crf: need at least one class");
  TORCH_CHECK(image.size(1) * image.size(2) * (image.size(3) + 3) < (int64_t(1) << 31),
              "ppap_ext::dense_crf: image too large for 32-bit lattice indices");
  TORCH_CHECK(iters >= 0, "ppap_ext::dense_crf: iters must be >= 0");
}

// Standard deviations so small that the lattice features (coordinate / sxy,
// channel value / srgb; bounded by max(H, W) / sxy and 255 / srgb) exceed
// kMaxFeature are refused: float rounding would scatter the lattice.
// Kernels with weight 0 are not built, so their parameters do not matter.
inline void check_crf_params(const at::Tensor& probs, double pos_xy, double pos_w, double bi_xy,
                             double bi_rgb, double bi_w) {
  const double extent = static_cast<double>(std::max(probs.size(2), probs.size(3)));
  TORCH_CHECK(std::isfinite(pos_w) && std::isfinite(bi_w), "ppap_ext::dense_crf: weights must be finite");
  if (pos_w != 0) {
    TORCH_CHECK(pos_xy > 0 && extent / pos_xy <= kMaxFeature, "ppap_ext::dense_crf: pos_xy=", pos_xy,
                " must be >= max(H, W) / ", kMaxFeature, " = ", extent / kMaxFeature);
  }
  if (bi_w != 0) {
    TORCH_CHECK(bi_xy > 0 && extent / bi_xy <= kMaxFeature, "ppap_ext::dense_crf: bi_xy=", bi_xy,
                " must be >= max(H, W) / ", kMaxFeature, " = ", extent / kMaxFeature);
    TORCH_CHECK(bi_rgb > 0 && 255.0 / bi_rgb <= kMaxFeature, "ppap_ext::dense_crf: bi_rgb=", bi_rgb,
                " must be >= 255 / ", kMaxFeature, " = ", 255.0 / kMaxFeature);
  }
}

}  // namespace ppap

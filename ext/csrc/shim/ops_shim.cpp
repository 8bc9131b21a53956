// The CUDA implementations of the ops, compiled against the host emulation
// (cuda_shim.h), registered as CPU ops of their own namespace with the
// schemas of ppap_ext: torch.ops.ppap_ext_shim.topk_neighbors(...) on CPU
// tensors runs topk_cuda.cu's host code and kernels.  Built for the tests
// only (ext/_build.py, load_shim).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "ops.h"
#include "shim/cuda_shim.h"

namespace ppap {

at::Tensor device_mm(const at::Tensor& a, const at::Tensor& b) {
  // PyTorch sets CUBLAS_TF32_TENSOR_OP_MATH on its cuBLAS handle under the
  // same condition; tensor cores then read float32 operands as TF32 (10
  // mantissa bits) and accumulate in float32 (NVIDIA A100 Tensor Core GPU
  // Architecture whitepaper, "TF32").
  const bool tf32 = a.scalar_type() == at::kFloat && !at::NoTF32Guard::should_disable_tf32() &&
                    at::globalContext().allowTF32CuBLAS();
  if (!tf32) return at::mm(a, b);
  auto to_tf32 = [](const at::Tensor& x) {
    at::Tensor bits = x.contiguous().clone().view(at::kInt);
    int32_t* p = bits.data_ptr<int32_t>();
    for (int64_t i = 0, n = bits.numel(); i < n; ++i) {
      const uint32_t u = static_cast<uint32_t>(p[i]);
      if ((u & 0x7F800000u) == 0x7F800000u) continue;  // inf and NaN stay
      // Round to nearest even at the 13 dropped mantissa bits.
      const uint32_t rounded = (u + 0x0FFFu + ((u >> 13) & 1u)) & ~0x1FFFu;
      p[i] = static_cast<int32_t>(rounded);
    }
    return bits.view(at::kFloat);
  };
  return at::mm(to_tf32(a), to_tf32(b));
}

}  // namespace ppap

TORCH_LIBRARY(ppap_ext_shim, m) {
  m.def(ppap::kTopkSchema);
  m.def(ppap::kCrfSchema);
  m.def("stats() -> int[]", &ppap::shim::stats);
  m.def("mm(Tensor a, Tensor b) -> Tensor", &ppap::device_mm);  // the emulated cuBLAS
}

TORCH_LIBRARY_IMPL(ppap_ext_shim, CPU, m) {
  m.impl("topk_neighbors", &ppap::topk_neighbors_cuda);
  m.impl("dense_crf", &ppap::dense_crf_cuda);
}

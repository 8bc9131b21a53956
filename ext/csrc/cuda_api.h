// What the .cu files use from the CUDA runtime and libraries, in one place:
// the device guard, the current stream, kernel launches and the GEMM.
// Compiled by nvcc these are the real thing.  With PPAP_CUDA_SHIM defined, the
// same .cu files compile as plain C++ against shim/cuda_shim.h, a host
// emulation that runs the kernels on the CPU for the tests (see there).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <utility>

#ifdef PPAP_CUDA_SHIM
#include "shim/cuda_shim.h"
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace ppap {

using DeviceGuard = c10::cuda::CUDAGuard;

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }

template <class... Params, class... Args>
void launch_raw(void (*kernel)(Params...), unsigned blocks, int threads, cudaStream_t stream,
                Args&&... args) {
  kernel<<<blocks, threads, 0, stream>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// a @ b with cuBLAS, in the math mode the caller's guards leave it.
inline at::Tensor device_mm(const at::Tensor& a, const at::Tensor& b) { return at::mm(a, b); }

}  // namespace ppap
#endif  // PPAP_CUDA_SHIM

namespace ppap {

// kernel<<<blocks, threads, 0, stream>>>(args...).  An empty grid launches
// nothing: CUDA rejects a grid of 0 blocks ("invalid configuration
// argument"), and empty inputs have no work, as on the CPU.  gridDim.x is
// at most 2^31 - 1 (CUDA C++ Programming Guide, table of technical
// specifications per compute capability).
template <class... Params, class... Args>
void launch(void (*kernel)(Params...), int64_t blocks, int threads, cudaStream_t stream,
            Args&&... args) {
  TORCH_CHECK(blocks >= 0 && blocks <= INT32_MAX, "ppap_ext: a grid of ", blocks,
              " blocks exceeds CUDA's limit of 2^31 - 1");
  if (blocks == 0) return;
  launch_raw(kernel, static_cast<unsigned>(blocks), threads, stream, std::forward<Args>(args)...);
}

}  // namespace ppap

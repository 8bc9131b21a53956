// Host emulation of the CUDA features the kernels use, so that the .cu files
// compile as C++ (cuda_api.h includes this under PPAP_CUDA_SHIM) and their
// logic runs on the CPU in the tests (library ppap_ext_shim, ext/_build.py).
//
//   __global__ / __device__ / __host__   erased
//   __shared__                           one copy per block in flight
//   threadIdx, blockIdx, ...             the emulated thread's indices
//   __syncthreads()                      a barrier over the block's threads
//   atomicAdd / atomicCAS                std::atomic_ref on the same memory
//   launch_raw                           runs the grid on a persistent thread pool
//   device_mm (cuBLAS)                   at::mm, in TF32 where cuBLAS would use it
//
// How threads run (cuda_shim.cpp): blocks are spread over a persistent pool
// of OS threads, so blocks run concurrently and global-memory atomics really
// race.  Inside a block, threads run one after another until one calls
// __syncthreads; from then on each thread is a fiber (ucontext) and every
// barrier phase runs the block's threads in a new pseudo-random order, so a
// read that is missing its barrier sees stale data.  A barrier that not every
// thread of the block reaches (undefined in CUDA) is reported as an error.
//
// What this cannot show: warp-level behaviour (lockstep execution, warp
// intrinsics), the GPU memory model (weaker ordering, caching), and device
// arithmetic (fused multiply-adds, intrinsics, cuBLAS's own kernels).
#pragma once

#ifndef PPAP_CUDA_SHIM
#error "shim/cuda_shim.h is the host emulation of CUDA; it is only used with PPAP_CUDA_SHIM"
#endif

// Light headers only: cuda_shim.cpp compiles without ATen.
#include <c10/core/Device.h>

#include <atomic>
#include <bit>
#include <cstdint>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
// Shared memory lives as long as its block; one block at a time runs on each
// pool thread, so a thread_local static is per block (and, as on a GPU, its
// content is undefined when the block starts: whatever the last block left).
#define __shared__ static thread_local

struct ShimDim3 {
  unsigned x = 1, y = 1, z = 1;
};
extern thread_local ShimDim3 threadIdx, blockIdx, blockDim, gridDim;

using cudaStream_t = struct ShimStream*;

void __syncthreads();

inline int atomicAdd(int* address, int value) { return std::atomic_ref<int>(*address).fetch_add(value); }
inline float atomicAdd(float* address, float value) {
  return std::atomic_ref<float>(*address).fetch_add(value);
}
inline int atomicCAS(int* address, int compare, int value) {
  std::atomic_ref<int>(*address).compare_exchange_strong(compare, value);
  return compare;  // the old value, as CUDA returns it
}
inline unsigned __float_as_uint(float f) { return std::bit_cast<unsigned>(f); }

namespace at {
class Tensor;
}

namespace ppap {

struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};

inline cudaStream_t current_stream() { return nullptr; }

namespace shim {
// Runs body() as every thread of a grid of `blocks` x `threads`; checks the
// configuration as the CUDA runtime does.  One grid at a time (a stream runs
// its kernels in order); returns when the grid has finished.
void run_grid(int64_t blocks, int threads, const std::function<void()>& body);
// Counters since the library was loaded: grids launched, blocks run, blocks
// that used __syncthreads, barrier arrivals (one per thread and barrier).
std::vector<int64_t> stats();
}  // namespace shim

template <class... Params, class... Args>
void launch_raw(void (*kernel)(Params...), unsigned blocks, int threads, cudaStream_t,
                Args&&... args) {
  // Arguments are converted to the parameter types once, as a launch copies
  // them into the kernel's parameter buffer; every thread gets its own copy.
  const std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
  shim::run_grid(blocks, threads, [&] { std::apply(kernel, params); });
}

// cuBLAS's a @ b: float32 operands rounded to TF32 where PyTorch's settings
// let cuBLAS use TF32, otherwise at::mm (ops_shim.cpp).
at::Tensor device_mm(const at::Tensor& a, const at::Tensor& b);

}  // namespace ppap

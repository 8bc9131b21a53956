// Operator schemas of the ppap_ext library and their CPU kernels.  The CUDA
// kernels are registered by a separately built library (ops_cuda.cpp) that is
// loaded only when a GPU and nvcc are available; the dispatcher then picks
// the implementation from the tensors' device.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <mutex>
#include <set>
#include <thread>

#include "ops.h"

namespace ppap {

// Diagnostic: the number of distinct threads that at::parallel_for used for n
// one-element tasks.  at::parallel_for is a header template that runs
// serially unless this library is compiled with OpenMP, whatever
// at::get_num_threads() says; the tests check that it is not.
int64_t parallel_threads(int64_t n) {
  std::mutex mu;
  std::set<std::thread::id> ids;
  at::parallel_for(0, n, 1, [&](int64_t, int64_t) {
    std::lock_guard<std::mutex> lock(mu);
    ids.insert(std::this_thread::get_id());
  });
  return static_cast<int64_t>(ids.size());
}

}  // namespace ppap

TORCH_LIBRARY(ppap_ext, m) {
  m.def(ppap::kTopkSchema);
  m.def(ppap::kCrfSchema);
  m.def("parallel_threads(int n) -> int", &ppap::parallel_threads);
}

TORCH_LIBRARY_IMPL(ppap_ext, CPU, m) {
  m.impl("topk_neighbors", &ppap::topk_neighbors_cpu);
  m.impl("dense_crf", &ppap::dense_crf_cpu);
}

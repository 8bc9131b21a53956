// CUDA kernels of the ppap_ext ops (schemas are defined in ops_cpu.cpp, which
// must be loaded first).  Compiled by the host compiler; the kernels live in
// the .cu files.
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY_IMPL(ppap_ext, CUDA, m) {
  m.impl("topk_neighbors", &ppap::topk_neighbors_cuda);
  m.impl("dense_crf", &ppap::dense_crf_cuda);
}

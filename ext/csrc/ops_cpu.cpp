// Operator schemas of the ppap_ext library and their CPU kernels.  The CUDA
// kernels are registered by a separately built library (ops_cuda.cpp) that is
// loaded only when a GPU and nvcc are available; the dispatcher then picks
// the implementation from the tensors' device.
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(ppap_ext, m) {
  m.def("topk_neighbors(Tensor q, Tensor keys, int k, int key_tile, int query_block) -> (Tensor, Tensor)");
  m.def("dense_crf(Tensor image, Tensor probs, int iters, float pos_xy, float pos_w, float bi_xy, "
        "float bi_rgb, float bi_w) -> Tensor");
}

TORCH_LIBRARY_IMPL(ppap_ext, CPU, m) {
  m.impl("topk_neighbors", &ppap::topk_neighbors_cpu);
  m.impl("dense_crf", &ppap::dense_crf_cpu);
}

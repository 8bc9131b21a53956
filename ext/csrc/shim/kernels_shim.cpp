// topk_cuda.cu and crf_cuda.cu compiled as C++ for the host emulation
// (cuda_shim.h); one translation unit, to parse ATen once.
#include "topk_cuda.cu"
#include "crf_cuda.cu"

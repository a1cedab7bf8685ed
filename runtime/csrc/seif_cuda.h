// Host-side entry points of the CUDA kernels (seif_cuda.cu). Pointers are device pointers;
// `stream` is the cudaStream_t ORT gives the kernel (KernelContext_GetGPUComputeStream).
// Each function returns an empty string on success, else an error message.
#pragma once

#include <cstdint>
#include <string>

#include "seif_kernels.h"

namespace seif {
namespace cuda {

// SeifRouter: logits [T, E] of type t; selection_bias [E] float32 or null; outputs [T, k].
std::string route(const void* logits, DType t, int64_t T, int64_t E, const float* selection_bias,
                  const Attrs& a, int64_t* indices, float* weights, bool* kept, void* stream);

// SeifMoE, token-choice kinds (topk, group_topk, sparse_mixer, with capacity), float32 hidden
// states and float32 weights. `in` holds device pointers with host-side shapes.
std::string moe(const Attrs& a, const TensorArg* in, void* out, DType out_type, void* stream);

const char* archs();  // e.g. "sm_80,sm_90"

}  // namespace cuda
}  // namespace seif

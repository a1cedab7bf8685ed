// CUDA kernels of the ai.seif ops, launched on ORT's compute stream.
//
// SeifRouter: one warp per token. The row's scores live in shared memory; elementwise work
// (scoring, bias, masking) is spread over the lanes; the top-k is k rounds of a warp-wide
// arg-best under the total order of spec §6.2 (NaN first, larger first, lower index on ties);
// the reductions whose rounding matters (softmax sums, normalization) are done by lane 0 in
// NumPy's pairwise order, as the CPU kernel does, so CPU and GPU agree to the last ulp or two.
// Capacity is a second kernel: one block per expert walks the assignments in priority order.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <string>

#include "seif_cuda.h"

namespace seif {
namespace cuda {

#ifndef SEIF_CUDA_ARCHS_STR
#define SEIF_CUDA_ARCHS_STR "80,90"
#endif

const char* archs() {
  static const std::string s = [] {
    std::string in = SEIF_CUDA_ARCHS_STR, out;
    size_t pos = 0;
    while (pos <= in.size()) {
      size_t end = in.find(',', pos);
      if (end == std::string::npos) end = in.size();
      std::string a = in.substr(pos, end - pos);
      if (!a.empty()) out += (out.empty() ? "sm_" : ",sm_") + a.substr(0, a.find('-'));
      pos = end + 1;
    }
    return out;
  }();
  return s.c_str();
}

namespace {

constexpr int kWarpsPerBlock = 4;
constexpr unsigned kFull = 0xffffffffu;

// Plain-old-data copy of the attributes for the kernels.
struct DevAttrs {
  int kind, scoring, normalize, epsilon_rule, group_score, group_mask;
  int64_t top_k, n_group, topk_group;
  float norm_p, epsilon, scale, jitter_eps;
};

enum : int { kTopK = 0, kGroupTopK = 1, kSparseMixer = 2 };
enum : int { kSoftmax = 0, kSigmoid = 1, kSoftmaxTopK = 2, kSigmoidTopK = 3 };

__device__ __forceinline__ bool better(float a, int ia, float b, int ib) {
  const bool an = isnan(a), bn = isnan(b);
  if (an != bn) return an;
  if (!an && a != b) return a > b;
  return ia < ib;
}

__device__ __forceinline__ float maximum_np(float a, float b) {
  return (a >= b || isnan(a)) ? a : b;
}

__device__ float np_pairwise(const float* a, int n) {
  // NumPy's float32 pairwise sum (8 accumulators, blocks of 128, halving above), as on CPU.
  if (n < 8) {
    float res = 0.0f;
    for (int i = 0; i < n; ++i) res += a[i];
    return res;
  }
  if (n <= 128) {
    float r[8];
    for (int j = 0; j < 8; ++j) r[j] = a[j];
    int i = 8;
    for (; i < n - (n % 8); i += 8)
      for (int j = 0; j < 8; ++j) r[j] += a[i + j];
    float res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    for (; i < n; ++i) res += a[i];
    return res;
  }
  int n2 = n / 2;
  n2 -= n2 % 8;
  return np_pairwise(a, n2) + np_pairwise(a + n2, n - n2);
}

__device__ __forceinline__ float sigmoid_f(float x) { return 1.0f / (1.0f + expf(-x)); }

template <typename T>
__device__ __forceinline__ float load_f(const T* p, int64_t i);
template <>
__device__ __forceinline__ float load_f<float>(const float* p, int64_t i) { return p[i]; }
template <>
__device__ __forceinline__ float load_f<__half>(const __half* p, int64_t i) {
  return __half2float(p[i]);
}
template <>
__device__ __forceinline__ float load_f<__nv_bfloat16>(const __nv_bfloat16* p, int64_t i) {
  return __bfloat162float(p[i]);
}

// Warp-wide max with NaN propagation.
__device__ float warp_max(const float* v, int n, int lane) {
  float m = -INFINITY;
  bool any = false;
  for (int i = lane; i < n; i += 32) {
    m = any ? maximum_np(m, v[i]) : v[i];
    any = true;
  }
  for (int off = 16; off; off >>= 1) {
    const float o = __shfl_xor_sync(kFull, m, off);
    const bool oa = __shfl_xor_sync(kFull, any, off);
    if (oa) m = any ? maximum_np(m, o) : o;
    any = any || oa;
  }
  return m;
}

// Softmax of v[0..n) in place (the warp cooperates; lane 0 sums).
__device__ void warp_softmax(float* v, int n, int lane) {
  const float m = warp_max(v, n, lane);
  for (int i = lane; i < n; i += 32) v[i] = expf(v[i] - m);
  __syncwarp();
  float s = 0.0f;
  if (lane == 0) s = 0.0f + np_pairwise(v, n);
  s = __shfl_sync(kFull, s, 0);
  for (int i = lane; i < n; i += 32) v[i] = v[i] / s;
  __syncwarp();
}

// Index of the best untaken entry of v[0..n) (warp-wide; taken[i] != 0 excludes i).
__device__ int warp_argbest(const float* v, const unsigned char* taken, int n, int lane) {
  int bi = -1;
  float bv = 0.0f;
  for (int i = lane; i < n; i += 32) {
    if (taken && taken[i]) continue;
    if (bi < 0 || better(v[i], i, bv, bi)) {
      bi = i;
      bv = v[i];
    }
  }
  for (int off = 16; off; off >>= 1) {
    const int oi = __shfl_xor_sync(kFull, bi, off);
    const float ov = __shfl_xor_sync(kFull, bv, off);
    if (oi >= 0 && (bi < 0 || better(ov, oi, bv, bi))) {
      bi = oi;
      bv = ov;
    }
  }
  return bi;
}

// Serial top-k for small arrays (group scores, two-of-a-group), lane-local.
__device__ void small_topk(const float* v, int n, int k, int* out) {
  int cnt = 0;
  for (int i = 0; i < n; ++i) {
    if (cnt == k && !better(v[i], i, v[out[k - 1]], out[k - 1])) continue;
    int p = cnt < k ? cnt++ : k - 1;
    while (p > 0 && better(v[i], i, v[out[p - 1]], out[p - 1])) {
      out[p] = out[p - 1];
      --p;
    }
    out[p] = i;
  }
}

constexpr int kMaxGroups = 64;

template <typename T>
__global__ void route_kernel(const T* __restrict__ logits, int64_t T_, int E,
                             const float* __restrict__ sel_bias, DevAttrs a,
                             int64_t* __restrict__ indices, float* __restrict__ weights) {
  extern __shared__ unsigned char smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  // per warp: z[E], s[E], c[E] floats + taken[E] bytes
  const size_t per_warp = static_cast<size_t>(E) * 3 * sizeof(float) + ((E + 15) / 16) * 16;
  float* z = reinterpret_cast<float*>(smem + warp * per_warp);
  float* s = z + E;
  float* c = s + E;
  unsigned char* taken = reinterpret_cast<unsigned char*>(c + E);
  if (t >= T_) return;  // whole warp exits together
  const int k = static_cast<int>(a.top_k);
  for (int e = lane; e < E; e += 32) {
    z[e] = load_f(logits, t * E + e);
    taken[e] = 0;
  }
  __syncwarp();
  int64_t* idx = indices + t * k;
  float* w = weights + t * k;

  if (a.kind == kSparseMixer) {
    // c = eligible logits, s = gates
    const float two_eps = static_cast<float>(2.0 * static_cast<double>(a.jitter_eps));
    for (int e = lane; e < E; e += 32) c[e] = z[e];
    __syncwarp();
    for (int r = 0; r < 2; ++r) {
      const int i = warp_argbest(c, nullptr, E, lane);
      const float m = c[i];
      for (int e = lane; e < E; e += 32) {
        const float factor = maximum_np(fabsf(z[e]), m);
        const bool masked = __fdiv_rn(m - z[e], factor) > two_eps;
        s[e] = masked ? -INFINITY : c[e];
      }
      __syncwarp();
      warp_softmax(s, E, lane);
      if (lane == 0) {
        idx[r] = i;
        w[r] = s[i];
        c[i] = -INFINITY;
      }
      __syncwarp();
    }
  } else {
    for (int e = lane; e < E; e += 32) {
      const float v = z[e];
      s[e] = a.scoring == kSigmoid ? sigmoid_f(v) : v;
    }
    __syncwarp();
    if (a.scoring == kSoftmax) warp_softmax(s, E, lane);
    for (int e = lane; e < E; e += 32) c[e] = sel_bias ? s[e] + sel_bias[e] : s[e];
    __syncwarp();
    if (a.kind == kGroupTopK) {
      const int G = static_cast<int>(a.n_group), P = E / G;
      __shared__ float gscore[kWarpsPerBlock][kMaxGroups];
      __shared__ unsigned char gkeep[kWarpsPerBlock][kMaxGroups];
      for (int g = lane; g < G; g += 32) {
        const float* v = c + g * P;
        if (a.group_score == 0) {
          float m = v[0];
          for (int i = 1; i < P; ++i) m = maximum_np(m, v[i]);
          gscore[warp][g] = m;
        } else {
          int t2[2];
          small_topk(v, P, 2, t2);
          gscore[warp][g] = v[t2[0]] + v[t2[1]];
        }
        gkeep[warp][g] = 0;
      }
      __syncwarp();
      if (lane == 0) {
        int best[kMaxGroups];
        small_topk(gscore[warp], G, static_cast<int>(a.topk_group), best);
        for (int i = 0; i < a.topk_group; ++i) gkeep[warp][best[i]] = 1;
      }
      __syncwarp();
      const float fill = a.group_mask == 0 ? -INFINITY : 0.0f;
      for (int e = lane; e < E; e += 32)
        if (!gkeep[warp][e / P]) c[e] = fill;
      __syncwarp();
    }
    for (int j = 0; j < k; ++j) {
      const int i = warp_argbest(c, taken, E, lane);
      if (lane == 0) {
        idx[j] = i;
        w[j] = s[i];
        taken[i] = 1;
      }
      __syncwarp();
    }
    if (lane == 0) {
      if (a.scoring == kSoftmaxTopK) {
        float m = w[0];
        for (int j = 1; j < k; ++j) m = maximum_np(m, w[j]);
        for (int j = 0; j < k; ++j) w[j] = expf(w[j] - m);
        const float sum = 0.0f + np_pairwise(w, k);
        for (int j = 0; j < k; ++j) w[j] = w[j] / sum;
      } else if (a.scoring == kSigmoidTopK) {
        for (int j = 0; j < k; ++j) w[j] = sigmoid_f(w[j]);
      }
    }
  }
  if (lane == 0) {  // normalize and scale (spec §5.7)
    if (a.normalize != 0) {
      float size;
      if (a.normalize == 1) {
        size = 0.0f + np_pairwise(w, k);
      } else {
        const float p = a.norm_p;
        const float inv_p = static_cast<float>(1.0 / static_cast<double>(p));
        float tmp[64];
        float acc = 0.0f;
        if (k <= 64) {
          for (int j = 0; j < k; ++j) tmp[j] = powf(fabsf(w[j]), p);
          acc = 0.0f + np_pairwise(tmp, k);
        } else {
          for (int j = 0; j < k; ++j) acc += powf(fabsf(w[j]), p);
        }
        size = powf(acc, inv_p);
      }
      const float denom = a.epsilon_rule == 0 ? size + a.epsilon : maximum_np(size, a.epsilon);
      for (int j = 0; j < k; ++j) w[j] = w[j] / denom;
    }
    for (int j = 0; j < k; ++j) w[j] = w[j] * a.scale;
  }
}

// kept[t, j] for capacity C. One block per expert walks the T*k assignments in priority order
// (choice-major, token-minor) in chunks of the block size; a ballot + prefix over the warps
// gives each matching assignment its position among the expert's assignments so far.
constexpr int kCapThreads = 256;
__global__ void capacity_kernel(const int64_t* __restrict__ indices, int64_t T_, int k,
                                int64_t C, bool* __restrict__ kept) {
  const int e = blockIdx.x;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __shared__ int warp_count[kCapThreads / 32];
  int64_t running = 0;
  const int64_t n = T_ * k;
  for (int64_t base = 0; base < n; base += kCapThreads) {
    const int64_t pos = base + threadIdx.x;  // priority position: j * T + t
    int64_t flat = -1;
    bool mine = false;
    if (pos < n) {
      const int64_t j = pos / T_, t = pos % T_;
      flat = t * k + j;
      mine = indices[flat] == e;
    }
    const unsigned ballot = __ballot_sync(kFull, mine);
    if (lane == 0) warp_count[warp] = __popc(ballot);
    __syncthreads();
    int before = 0, total = 0;
    for (int w = 0; w < kCapThreads / 32; ++w) {
      if (w < warp) before += warp_count[w];
      total += warp_count[w];
    }
    if (mine) {
      const int rank = before + __popc(ballot & ((1u << lane) - 1u));
      kept[flat] = running + rank < C;
    }
    running += total;
    __syncthreads();
  }
}

__global__ void fill_true(bool* p, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) p[i] = true;
}

std::string cuda_error(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return "";
  return std::string("ai.seif (CUDA) ") + what + ": " + cudaGetErrorString(err);
}

template <typename T>
std::string launch_route(const void* logits, int64_t T_, int64_t E, const float* sel_bias,
                         const DevAttrs& da, int64_t* indices, float* weights,
                         cudaStream_t stream) {
  const size_t per_warp = static_cast<size_t>(E) * 3 * sizeof(float) + ((E + 15) / 16) * 16;
  const size_t smem = per_warp * kWarpsPerBlock;
  if (smem > 48 * 1024) {
    cudaFuncSetAttribute(route_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                         static_cast<int>(smem));
  }
  const int64_t blocks = (T_ + kWarpsPerBlock - 1) / kWarpsPerBlock;
  route_kernel<T><<<static_cast<unsigned>(blocks), 32 * kWarpsPerBlock, smem, stream>>>(
      static_cast<const T*>(logits), T_, static_cast<int>(E), sel_bias, da, indices, weights);
  return cuda_error("route kernel");
}

}  // namespace

std::string route(const void* logits, DType t, int64_t T, int64_t E, const float* selection_bias,
                  const Attrs& a, int64_t* indices, float* weights, bool* kept, void* stream_) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_);
  const int64_t k = a.top_k;
  if (k < 1 || k > E) return "ai.seif.SeifRouter: top_k is not in [1, E]";
  if (E > 8192) return "ai.seif.SeifRouter (CUDA): more than 8192 experts";
  if (a.kind == Kind::SparseMixer && selection_bias)
    return "ai.seif: sparse_mixer has no selection bias";
  if (a.kind == Kind::GroupTopK) {
    if (E % a.n_group) return "ai.seif: the experts do not split into n_group groups";
    if (a.n_group > kMaxGroups) return "ai.seif.SeifRouter (CUDA): more than 64 groups";
    const int64_t P = E / a.n_group;
    if (a.group_score == GroupScore::Top2Sum && P < 2)
      return "ai.seif: top2_sum needs at least 2 experts per group";
    if (k > a.topk_group * P) return "ai.seif: top_k exceeds the experts in the kept groups";
  }
  if (T == 0) return "";
  DevAttrs da;
  da.kind = a.kind == Kind::TopK ? kTopK : a.kind == Kind::GroupTopK ? kGroupTopK : kSparseMixer;
  da.scoring = static_cast<int>(a.scoring);
  da.normalize = static_cast<int>(a.normalize);
  da.epsilon_rule = static_cast<int>(a.epsilon_rule);
  da.group_score = static_cast<int>(a.group_score);
  da.group_mask = static_cast<int>(a.group_mask);
  da.top_k = a.top_k;
  da.n_group = a.n_group;
  da.topk_group = a.topk_group;
  da.norm_p = a.norm_p;
  da.epsilon = a.epsilon;
  da.scale = a.scale;
  da.jitter_eps = a.jitter_eps;
  std::string err;
  switch (t) {
    case DType::F32:
      err = launch_route<float>(logits, T, E, selection_bias, da, indices, weights, stream);
      break;
    case DType::F16:
      err = launch_route<__half>(logits, T, E, selection_bias, da, indices, weights, stream);
      break;
    case DType::BF16:
      err = launch_route<__nv_bfloat16>(logits, T, E, selection_bias, da, indices, weights,
                                        stream);
      break;
  }
  if (!err.empty()) return err;
  if (a.has_capacity()) {
    const int64_t C = capacity_per_expert(a, T, E, k, false);
    capacity_kernel<<<static_cast<unsigned>(E), kCapThreads, 0, stream>>>(
        indices, T, static_cast<int>(k), C, kept);
    return cuda_error("capacity kernel");
  }
  const int64_t n = T * k;
  fill_true<<<static_cast<unsigned>((n + 255) / 256), 256, 0, stream>>>(kept, n);
  return cuda_error("fill kernel");
}

std::string moe(const Attrs& a, const TensorArg* in, void* out, DType out_type, void* stream) {
  return "ai.seif.SeifMoE: no CUDA kernel yet";
}

}  // namespace cuda
}  // namespace seif

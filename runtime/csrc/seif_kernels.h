// SEIF ai.seif custom ops: the device-independent part (attributes, dtypes, CPU kernels).
//
// Nothing here includes ONNX Runtime: the CPU kernels work on plain pointers so they can be
// unit-tested and reused. seif_ort.cpp adapts them to ORT's custom-op API.
// Semantics: seif/routing.py and seif/moe.py (spec/seif-v1.md §5-6). All math is float32
// except the expert activations, which are computed in float64 and rounded once, as the
// reference does.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace seif {

// ----------------------------------------------------------------------------- errors
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// ----------------------------------------------------------------------------- dtypes
enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };
const char* dtype_name(DType t);

float half_to_float(uint16_t h);
uint16_t float_to_half(float f);  // round to nearest even
inline float bf16_to_float(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}
uint16_t float_to_bf16(float f);  // round to nearest even, NaN stays NaN

// Convert n elements of type `t` at `src` to float32 (and back).
void to_float(const void* src, DType t, size_t n, float* dst);
void from_float(const float* src, size_t n, DType t, void* dst);
size_t dtype_size(DType t);

// ----------------------------------------------------------------------------- attributes
enum class Kind { TopK, GroupTopK, SparseMixer, ExpertChoice, SoftMoE };
enum class Scoring { Softmax, Sigmoid, SoftmaxTopK, SigmoidTopK };
enum class Normalize { None, Sum, Lp };
enum class EpsRule { Add, Clamp };
enum class GroupScore { Max, Top2Sum };
enum class GroupMask { NegInf, Zero };
enum class Activation { SwiGLU, GeGLU, GeGLUTanh, SwiGLUOai, ReLU, GeLU, GeLUTanh, SiLU, ReLU2 };
enum class WeightOn { Output, Input };
enum class DropPolicy { Zero, PassthroughScaled };

struct Attrs {
  Kind kind = Kind::TopK;
  int64_t top_k = 1;
  Scoring scoring = Scoring::Softmax;
  Normalize normalize = Normalize::None;
  float norm_p = 1.0f;
  float epsilon = 0.0f;
  EpsRule epsilon_rule = EpsRule::Add;
  float scale = 1.0f;
  int64_t n_group = 1;
  int64_t topk_group = 1;
  GroupScore group_score = GroupScore::Max;
  GroupMask group_mask = GroupMask::NegInf;
  float jitter_eps = 0.0f;
  int64_t capacity_tokens = 0;
  float capacity_factor = 0.0f;
  // SeifMoE only
  Activation activation = Activation::SwiGLU;
  float alpha = 1.702f;
  float limit = 7.0f;
  WeightOn weight_on = WeightOn::Output;
  DropPolicy drop_policy = DropPolicy::Zero;
  int64_t slots_per_expert = 0;

  bool has_capacity() const { return capacity_tokens > 0 || capacity_factor > 0.0f; }
  bool gated() const {
    return activation == Activation::SwiGLU || activation == Activation::GeGLU ||
           activation == Activation::GeGLUTanh || activation == Activation::SwiGLUOai;
  }
};

// Parse one string attribute into its enum; throws seif::Error naming the allowed values.
Kind parse_kind(const std::string& s);
Scoring parse_scoring(const std::string& s);
Normalize parse_normalize(const std::string& s);
EpsRule parse_epsilon_rule(const std::string& s);
GroupScore parse_group_score(const std::string& s);
GroupMask parse_group_mask(const std::string& s);
Activation parse_activation(const std::string& s);
WeightOn parse_weight_on(const std::string& s);
DropPolicy parse_drop_policy(const std::string& s);

// Cross-field checks that need no shapes (throws seif::Error). `moe` allows expert_choice and
// soft_moe and checks the MoE-only attributes.
void check_attrs(const Attrs& a, bool moe);

// Per-expert capacity C (spec §5.6): tokens, or ceil(factor * T * k / E) in binary64, left to
// right; expert choice uses k = 1 and clips to T.
int64_t capacity_per_expert(const Attrs& a, int64_t T, int64_t E, int64_t k, bool clip);

// ----------------------------------------------------------------------------- parallelism
// Runs fn(i) for i in [0, n), possibly in parallel; every i exactly once. Results never depend
// on how the work is split (each output element is written by one task, in a fixed order).
using ParallelFor = std::function<void(size_t n, const std::function<void(size_t)>& fn)>;
ParallelFor serial_for();

// ----------------------------------------------------------------------------- routing
// Token-choice routing of logits [T, E] (float32): indices/weights/kept are [T, k].
// selection_bias: [E] float32 or null. Throws seif::Error on bad shapes/attributes.
void route_cpu(const float* logits, int64_t T, int64_t E, const float* selection_bias,
               const Attrs& a, int64_t* indices, float* weights, bool* kept,
               const ParallelFor& pfor);

// Indices of the k best of v[0..n) (NaN first, larger first, lower index on ties), best first.
void topk_lowest_index(const float* v, int64_t n, int64_t k, int64_t* out);

// ----------------------------------------------------------------------------- GEMM
// C[m, n] = sum_k A[m, k] * B[n, k] (+ bias[n]) for m in [0, M), n in [n0, n1).
// A: float32 row-major (lda); B: weights [N, K] row-major (ldb) of type `bt`; bias of type `bt`
// or null; C float32 (ldc). K is summed in a fixed blocked order (deterministic).
void gemm_nt(int64_t M, int64_t n0, int64_t n1, int64_t K, const float* A, int64_t lda,
             const void* B, DType bt, int64_t ldb, const void* bias, float* C, int64_t ldc);
// gemm_nt for a caller that multiplies the same A by several weight blocks: a non-zero a_key
// names A's contents (together with A, lda, M and K), and a thread that meets them again reuses
// what it prepared from A (the packed tokens) instead of preparing it again. The caller must not
// give one key to different contents (0: no reuse). Same results as gemm_nt.
void gemm_nt_keyed(int64_t M, int64_t n0, int64_t n1, int64_t K, const float* A, int64_t lda,
                   const void* B, DType bt, int64_t ldb, const void* bias, float* C,
                   int64_t ldc, uint64_t a_key);
// Which kernels gemm_nt dispatches to: "avx512,f16:avx2" (float16 weights: AVX2), "avx2" or
// "generic".
const char* gemm_isa();

// h[i] = (g * sigmoid(g)) * up[i], g = gate[i], for i < n: SwiGLU in float64 (exp within a few
// ulp of the correctly rounded one), rounded once to float32. h may alias up. Runs only where
// the AVX-512 build is usable and returns true; false: nothing done, use the scalar path.
bool swiglu_f64(const float* gate, const float* up, float* h, int64_t n);

// ----------------------------------------------------------------------------- batched FFN
// One expert's weights: gate/up [I, H], down [H, I] and biases [I], [I], [H] (null: absent).
struct FfnWeights {
  const void* gate = nullptr;
  const void* up = nullptr;
  const void* down = nullptr;
  const void* gate_bias = nullptr;
  const void* up_bias = nullptr;
  const void* down_bias = nullptr;
};

// Expert e's weights in stacked tensors of type wt: gate/up [E, I, H], down [E, H, I], biases
// [E, I], [E, I], [E, H] (any pointer may be null).
FfnWeights stacked_expert(const void* gate, const void* up, const void* down,
                          const void* gate_bias, const void* up_bias, const void* down_bias,
                          DType wt, int64_t e, int64_t I, int64_t H);

// p + elems elements of type t (null stays null).
const void* offset(const void* p, DType t, int64_t elems);

// A float buffer left uninitialised (every element is written before it is read: zero-filling
// the gathered tokens, hidden activations and expert outputs would cost a pass over memory), on
// 64-byte boundaries so that the GEMM's 64-byte row loads do not straddle cache lines. Large
// ones come from, and go back to, a process-wide cache of released buffers (moe.cpp: fresh
// pages from the kernel are each faulted in and zeroed on first touch, ~10% of a call's time
// at tens of MB); SEIF_SCRATCH_MB caps what it keeps (default 256, 0: keep nothing).
struct FreeDeleter {
  size_t bytes = 0;  // the buffer's capacity
  void operator()(float* p) const;
};
using FloatBuf = std::unique_ptr<float[], FreeDeleter>;
FloatBuf uninit(int64_t n);  // n floats (at least one); throws std::bad_alloc

// f(r) for r < n, in tasks of 32 rows.
void parallel_rows(int64_t n, const ParallelFor& pfor, const std::function<void(int64_t)>& f);

// One expert's rows: Y [M, H] = down(act(gate X, up X)), X [M, H] float32 contiguous, Hbuf
// [M, I] float32 scratch.
struct FfnJob {
  FfnWeights w;
  int64_t I = 0;             // intermediate size
  const float* X = nullptr;  // [M, H] contiguous
  int64_t M = 0;
  float* Hbuf = nullptr;  // [M, I] scratch
  float* Y = nullptr;     // [M, H] output
};

// Runs every job's FFN (weights of type wt; a.activation, a.alpha, a.limit; a gated activation
// needs w.gate) in two parallel phases, gate/up + activation then down. Each output element is
// computed by one task in a fixed order: results do not depend on pfor's thread count. moe.cpp;
// also called by the C API (c_api.cpp) that the torch module uses.
void run_ffn_jobs(const std::vector<FfnJob>& jobs, int64_t H, DType wt, const Attrs& a,
                  const ParallelFor& pfor);

// ----------------------------------------------------------------------------- MoE
struct TensorArg {
  const void* data = nullptr;  // null: the optional input is absent
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  bool present() const { return data != nullptr; }
};

enum MoEInput : int {
  kHidden = 0, kRouterWeight, kRouterBias, kSelectionBias, kGateProj, kUpProj, kDownProj,
  kGateBias, kUpBias, kDownBias, kSharedGateProj, kSharedUpProj, kSharedDownProj,
  kSharedGateBias, kSharedUpBias, kSharedDownBias, kSharedExpertGate, kNumMoEInputs
};

// Checks every input's shape against the attributes; returns {N, H}. Every weight has
// up_proj's dtype (selection_bias any), as the operator's type constraint says; with
// router_own_dtype (the C API's callers, whose router may be kept in float32 beside bfloat16
// experts) router_weight with router_bias and shared_expert_gate may have their own.
void check_moe_inputs(const Attrs& a, const TensorArg* in, int64_t* N, int64_t* H,
                      bool router_own_dtype = false);

// SeifMoE forward on CPU. `in` has kNumMoEInputs entries (absent ones with data == null);
// out: [N, H] of type out_type. router_own_dtype: see check_moe_inputs.
void moe_cpu(const Attrs& a, const TensorArg* in, void* out, DType out_type,
             const ParallelFor& pfor, bool router_own_dtype = false);

}  // namespace seif

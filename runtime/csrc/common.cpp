// Dtype conversions, attribute parsing and checks shared by every kernel.
#include <cmath>
#include <cstring>

#include "seif_kernels.h"

namespace seif {

const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "float32";
    case DType::F16: return "float16";
    case DType::BF16: return "bfloat16";
  }
  return "?";
}

size_t dtype_size(DType t) { return t == DType::F32 ? 4 : 2; }

float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1f) {  // inf / NaN
    bits = sign | 0x7f800000u | (mant << 13);
  } else if (exp != 0) {  // normal
    bits = sign | ((exp + 112u) << 23) | (mant << 13);
  } else if (mant == 0) {  // +-0
    bits = sign;
  } else {  // subnormal: renormalize
    int e = -1;
    do {
      ++e;
      mant <<= 1;
    } while ((mant & 0x400u) == 0);
    bits = sign | ((112u - static_cast<uint32_t>(e)) << 23) | ((mant & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t float_to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) {  // inf or NaN (keep NaN quiet)
    return static_cast<uint16_t>(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0u));
  }
  if (ax >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to inf
  if (ax < 0x38800000u) {  // below the smallest normal half: subnormal or zero
    // value = ax as float; half subnormal unit is 2^-24.
    float a;
    std::memcpy(&a, &ax, 4);
    // a * 2^24, rounded to nearest even by the FPU (exact in float for this range).
    float scaled = a * 16777216.0f;
    float r = std::nearbyint(scaled);
    return static_cast<uint16_t>(sign | static_cast<uint16_t>(r));
  }
  // normal: rebias exponent, round mantissa to 10 bits (nearest even)
  uint32_t m = ax + 0xc8000000u;  // exponent - 112 (in the float's exponent field)
  const uint32_t round = 0xfffu + ((m >> 13) & 1u);
  m += round;
  return static_cast<uint16_t>(sign | (m >> 13));
}

uint16_t float_to_bf16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);
  x += 0x7fffu + ((x >> 16) & 1u);
  return static_cast<uint16_t>(x >> 16);
}

void to_float(const void* src, DType t, size_t n, float* dst) {
  switch (t) {
    case DType::F32:
      std::memcpy(dst, src, n * 4);
      return;
    case DType::F16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = half_to_float(s[i]);
      return;
    }
    case DType::BF16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = bf16_to_float(s[i]);
      return;
    }
  }
}

void from_float(const float* src, size_t n, DType t, void* dst) {
  switch (t) {
    case DType::F32:
      std::memcpy(dst, src, n * 4);
      return;
    case DType::F16: {
      uint16_t* d = static_cast<uint16_t*>(dst);
      for (size_t i = 0; i < n; ++i) d[i] = float_to_half(src[i]);
      return;
    }
    case DType::BF16: {
      uint16_t* d = static_cast<uint16_t*>(dst);
      for (size_t i = 0; i < n; ++i) d[i] = float_to_bf16(src[i]);
      return;
    }
  }
}

// ----------------------------------------------------------------------------- parsing
namespace {
template <typename E, size_t N>
E pick(const std::string& s, const char* what, const char* const (&names)[N], const E (&vals)[N]) {
  for (size_t i = 0; i < N; ++i)
    if (s == names[i]) return vals[i];
  std::string msg = std::string("ai.seif: unknown ") + what + " '" + s + "' (expected one of";
  for (size_t i = 0; i < N; ++i) msg += std::string(i ? ", " : " ") + names[i];
  throw Error(msg + ")");
}
}  // namespace

Kind parse_kind(const std::string& s) {
  static const char* const n[] = {"topk", "group_topk", "sparse_mixer", "expert_choice",
                                  "soft_moe"};
  static const Kind v[] = {Kind::TopK, Kind::GroupTopK, Kind::SparseMixer, Kind::ExpertChoice,
                           Kind::SoftMoE};
  return pick(s, "kind", n, v);
}
Scoring parse_scoring(const std::string& s) {
  static const char* const n[] = {"softmax", "sigmoid", "softmax_topk", "sigmoid_topk"};
  static const Scoring v[] = {Scoring::Softmax, Scoring::Sigmoid, Scoring::SoftmaxTopK,
                              Scoring::SigmoidTopK};
  return pick(s, "scoring", n, v);
}
Normalize parse_normalize(const std::string& s) {
  static const char* const n[] = {"none", "sum", "lp"};
  static const Normalize v[] = {Normalize::None, Normalize::Sum, Normalize::Lp};
  return pick(s, "normalize", n, v);
}
EpsRule parse_epsilon_rule(const std::string& s) {
  static const char* const n[] = {"add", "clamp"};
  static const EpsRule v[] = {EpsRule::Add, EpsRule::Clamp};
  return pick(s, "epsilon_rule", n, v);
}
GroupScore parse_group_score(const std::string& s) {
  static const char* const n[] = {"max", "top2_sum"};
  static const GroupScore v[] = {GroupScore::Max, GroupScore::Top2Sum};
  return pick(s, "group_score", n, v);
}
GroupMask parse_group_mask(const std::string& s) {
  static const char* const n[] = {"neg_inf", "zero"};
  static const GroupMask v[] = {GroupMask::NegInf, GroupMask::Zero};
  return pick(s, "group_mask", n, v);
}
Activation parse_activation(const std::string& s) {
  static const char* const n[] = {"swiglu", "geglu", "geglu_tanh", "swiglu_oai", "relu",
                                  "gelu", "gelu_tanh", "silu", "relu2"};
  static const Activation v[] = {Activation::SwiGLU, Activation::GeGLU, Activation::GeGLUTanh,
                                 Activation::SwiGLUOai, Activation::ReLU, Activation::GeLU,
                                 Activation::GeLUTanh, Activation::SiLU, Activation::ReLU2};
  return pick(s, "activation", n, v);
}
WeightOn parse_weight_on(const std::string& s) {
  static const char* const n[] = {"output", "input"};
  static const WeightOn v[] = {WeightOn::Output, WeightOn::Input};
  return pick(s, "weight_on", n, v);
}
DropPolicy parse_drop_policy(const std::string& s) {
  static const char* const n[] = {"zero", "passthrough_scaled"};
  static const DropPolicy v[] = {DropPolicy::Zero, DropPolicy::PassthroughScaled};
  return pick(s, "drop_policy", n, v);
}

void check_attrs(const Attrs& a, bool moe) {
  if (!moe && (a.kind == Kind::ExpertChoice || a.kind == Kind::SoftMoE))
    throw Error("ai.seif.SeifRouter: kind expert_choice and soft_moe exist only in SeifMoE");
  if (a.top_k < 1) throw Error("ai.seif: top_k must be >= 1");
  if (a.kind == Kind::SparseMixer && a.top_k != 2)
    throw Error("ai.seif: sparse_mixer is defined for top_k = 2");
  if (a.kind == Kind::GroupTopK) {
    if (a.n_group < 1 || a.topk_group < 1) throw Error("ai.seif: n_group, topk_group must be >= 1");
    if (a.topk_group > a.n_group) throw Error("ai.seif: topk_group > n_group");
  }
  if (a.capacity_tokens < 0 || a.capacity_factor < 0.0f || std::isnan(a.capacity_factor))
    throw Error("ai.seif: capacity_tokens and capacity_factor must be >= 0");
  if (a.capacity_tokens > 0 && a.capacity_factor > 0.0f)
    throw Error("ai.seif: set at most one of capacity_tokens and capacity_factor");
  if (a.normalize == Normalize::Lp && !(a.norm_p > 0.0f)) throw Error("ai.seif: norm_p must be > 0");
  if (a.epsilon < 0.0f) throw Error("ai.seif: epsilon must be >= 0");
  if (a.kind == Kind::ExpertChoice) {
    if (!a.has_capacity()) throw Error("ai.seif: expert_choice needs a capacity");
    if (a.scoring != Scoring::Softmax && a.scoring != Scoring::Sigmoid)
      throw Error("ai.seif: expert_choice scores with softmax or sigmoid");
    if (a.normalize != Normalize::None) throw Error("ai.seif: expert_choice has no normalize");
  }
  if (moe) {
    if (a.kind == Kind::SoftMoE && a.slots_per_expert < 1)
      throw Error("ai.seif: soft_moe needs slots_per_expert >= 1");
    if (!(a.limit > 0.0f)) throw Error("ai.seif: limit must be > 0");
  }
}

int64_t capacity_per_expert(const Attrs& a, int64_t T, int64_t E, int64_t k, bool clip) {
  int64_t c;
  if (a.capacity_tokens > 0) {
    c = a.capacity_tokens;
  } else {
    const double v = static_cast<double>(a.capacity_factor) * static_cast<double>(T) *
                     static_cast<double>(k) / static_cast<double>(E);
    c = static_cast<int64_t>(std::ceil(v));
  }
  return clip && c > T ? T : c;
}

ParallelFor serial_for() {
  return [](size_t n, const std::function<void(size_t)>& fn) {
    for (size_t i = 0; i < n; ++i) fn(i);
  };
}

}  // namespace seif

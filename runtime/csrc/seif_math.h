// Small float32 helpers that follow NumPy's rules, so the kernels reproduce seif.routing's
// numbers (NaN propagation, summation order) as closely as float32 allows.
#pragma once

#include <cmath>
#include <cstdint>

namespace seif {

// np.maximum(a, b): NaN in either propagates; on equality the first argument.
static inline float maximum_np(float a, float b) { return (a >= b || std::isnan(a)) ? a : b; }

// np.max over v[0..n): NaN propagates. n >= 1.
static inline float max_nan(const float* v, int64_t n) {
  float m = v[0];
  for (int64_t i = 1; i < n; ++i) m = maximum_np(m, v[i]);
  return m;
}

// NumPy's float32 pairwise summation (8 accumulators, blocks of 128, halving above).
static inline float np_pairwise(const float* a, int64_t n) {
  if (n < 8) {
    float res = 0.0f;
    for (int64_t i = 0; i < n; ++i) res += a[i];
    return res;
  }
  if (n <= 128) {
    float r[8];
    for (int j = 0; j < 8; ++j) r[j] = a[j];
    int64_t i = 8;
    for (; i < n - (n % 8); i += 8)
      for (int j = 0; j < 8; ++j) r[j] += a[i + j];
    float res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    for (; i < n; ++i) res += a[i];
    return res;
  }
  int64_t n2 = n / 2;
  n2 -= n2 % 8;
  return np_pairwise(a, n2) + np_pairwise(a + n2, n - n2);
}

static inline float np_sum(const float* a, int64_t n) { return 0.0f + np_pairwise(a, n); }

// 1 / (1 + exp(-x)) in float32 (exp overflow gives exactly 0, as in the reference).
static inline float sigmoid_f(float x) { return 1.0f / (1.0f + std::exp(-x)); }

// seif.routing._softmax over v[0..n) in place: exp(v - max) / sum; -inf entries get 0, a NaN
// anywhere makes the whole row NaN.
static inline void softmax_inplace(float* v, int64_t n) {
  if (n <= 0) return;
  const float m = max_nan(v, n);
  for (int64_t i = 0; i < n; ++i) v[i] = std::exp(v[i] - m);
  const float s = np_sum(v, n);
  for (int64_t i = 0; i < n; ++i) v[i] = v[i] / s;
}

}  // namespace seif

// Token-choice routing on CPU: seif.routing.route, step for step, in float32.
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "seif_kernels.h"
#include "seif_math.h"

namespace seif {

// The total order of spec §6.2: NaN first (NaNs tie), then larger values, then lower index.
// -0.0 == +0.0 falls out of the float comparison.
static inline bool better(float a, int64_t ia, float b, int64_t ib) {
  const bool an = std::isnan(a), bn = std::isnan(b);
  if (an != bn) return an;
  if (!an && a != b) return a > b;
  return ia < ib;
}

void topk_lowest_index(const float* v, int64_t n, int64_t k, int64_t* out) {
  if (k <= 0) return;
  if (k <= 32) {  // insertion into a sorted list of k: O(n k), no allocation
    int64_t cnt = 0;
    for (int64_t i = 0; i < n; ++i) {
      if (cnt == k && !better(v[i], i, v[out[k - 1]], out[k - 1])) continue;
      int64_t p = cnt < k ? cnt++ : k - 1;
      while (p > 0 && better(v[i], i, v[out[p - 1]], out[p - 1])) {
        out[p] = out[p - 1];
        --p;
      }
      out[p] = i;
    }
    return;
  }
  std::vector<int64_t> idx(static_cast<size_t>(n));
  std::iota(idx.begin(), idx.end(), int64_t{0});
  std::partial_sort(idx.begin(), idx.begin() + k, idx.end(),
                    [v](int64_t x, int64_t y) { return better(v[x], x, v[y], y); });
  std::copy(idx.begin(), idx.begin() + k, out);
}

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Group-limited masking of one row of choice values c[E] (spec §5.5), in place.
void group_limit(float* c, int64_t E, const Attrs& a, float* gscore, int64_t* gidx,
                 unsigned char* keep) {
  const int64_t G = a.n_group, P = E / G;
  for (int64_t g = 0; g < G; ++g) {
    const float* v = c + g * P;
    if (a.group_score == GroupScore::Max) {
      gscore[g] = max_nan(v, P);
    } else {
      int64_t t2[2];
      topk_lowest_index(v, P, 2, t2);
      gscore[g] = v[t2[0]] + v[t2[1]];
    }
  }
  topk_lowest_index(gscore, G, a.topk_group, gidx);
  std::fill(keep, keep + G, static_cast<unsigned char>(0));
  for (int64_t i = 0; i < a.topk_group; ++i) keep[gidx[i]] = 1;
  const float fill = a.group_mask == GroupMask::NegInf ? kNegInf : 0.0f;
  for (int64_t g = 0; g < G; ++g)
    if (!keep[g])
      for (int64_t e = g * P; e < (g + 1) * P; ++e) c[e] = fill;
}

// PhiMoE's sparsemixer, inference form (seif.routing._sparse_mixer), one row.
void sparse_mixer_row(const float* z, int64_t E, float jitter_eps, float* elig, float* gates,
                      int64_t* idx, float* w) {
  const float two_eps = static_cast<float>(2.0 * static_cast<double>(jitter_eps));
  std::copy(z, z + E, elig);
  for (int r = 0; r < 2; ++r) {
    int64_t i = 0;
    topk_lowest_index(elig, E, 1, &i);
    const float m = elig[i];
    for (int64_t e = 0; e < E; ++e) {
      const float factor = maximum_np(std::fabs(z[e]), m);
      const bool masked = (m - z[e]) / factor > two_eps;  // NaN compares false: not masked
      gates[e] = masked ? kNegInf : elig[e];
    }
    softmax_inplace(gates, E);
    idx[r] = i;
    w[r] = gates[i];
    elig[i] = kNegInf;
  }
}

void normalize_scale(float* w, int64_t k, const Attrs& a) {
  if (a.normalize != Normalize::None) {
    float size;
    if (a.normalize == Normalize::Sum) {
      size = np_sum(w, k);
    } else {
      const float p = a.norm_p;
      const float inv_p = static_cast<float>(1.0 / static_cast<double>(p));
      float tmp[64];
      std::vector<float> big;
      float* t = tmp;
      if (k > 64) {
        big.resize(static_cast<size_t>(k));
        t = big.data();
      }
      for (int64_t j = 0; j < k; ++j) t[j] = std::pow(std::fabs(w[j]), p);
      size = std::pow(np_sum(t, k), inv_p);
    }
    const float denom =
        a.epsilon_rule == EpsRule::Add ? size + a.epsilon : maximum_np(size, a.epsilon);
    for (int64_t j = 0; j < k; ++j) w[j] = w[j] / denom;
  }
  for (int64_t j = 0; j < k; ++j) w[j] = w[j] * a.scale;
}

}  // namespace

void route_cpu(const float* logits, int64_t T, int64_t E, const float* selection_bias,
               const Attrs& a, int64_t* indices, float* weights, bool* kept,
               const ParallelFor& pfor) {
  const int64_t k = a.top_k;
  if (k < 1 || k > E)
    throw Error("ai.seif: top_k " + std::to_string(k) + " is not in [1, " + std::to_string(E) +
                "] experts");
  if (a.kind == Kind::SparseMixer && selection_bias)
    throw Error("ai.seif: sparse_mixer has no selection bias");
  if (a.kind == Kind::GroupTopK) {
    if (E % a.n_group)
      throw Error("ai.seif: " + std::to_string(E) + " experts do not split into " +
                  std::to_string(a.n_group) + " groups");
    const int64_t P = E / a.n_group;
    if (a.group_score == GroupScore::Top2Sum && P < 2)
      throw Error("ai.seif: top2_sum needs at least 2 experts per group");
    if (k > a.topk_group * P)
      throw Error("ai.seif: top_k exceeds the experts in the kept groups");
  }
  constexpr int64_t kRows = 64;  // tokens per task
  const int64_t ntask = (T + kRows - 1) / kRows;
  pfor(static_cast<size_t>(ntask), [&](size_t task) {
    const int64_t t0 = static_cast<int64_t>(task) * kRows, t1 = std::min(T, t0 + kRows);
    std::vector<float> scores(static_cast<size_t>(E)), choice(static_cast<size_t>(E));
    std::vector<float> gscore(static_cast<size_t>(a.n_group));
    std::vector<int64_t> gidx(static_cast<size_t>(a.n_group));
    std::vector<unsigned char> keep(static_cast<size_t>(a.n_group));
    for (int64_t t = t0; t < t1; ++t) {
      const float* z = logits + t * E;
      int64_t* idx = indices + t * k;
      float* w = weights + t * k;
      if (a.kind == Kind::SparseMixer) {
        sparse_mixer_row(z, E, a.jitter_eps, scores.data(), choice.data(), idx, w);
      } else {
        std::copy(z, z + E, scores.begin());
        if (a.scoring == Scoring::Softmax) softmax_inplace(scores.data(), E);
        else if (a.scoring == Scoring::Sigmoid)
          for (auto& s : scores) s = sigmoid_f(s);
        for (int64_t e = 0; e < E; ++e)
          choice[e] = selection_bias ? scores[e] + selection_bias[e] : scores[e];
        if (a.kind == Kind::GroupTopK)
          group_limit(choice.data(), E, a, gscore.data(), gidx.data(), keep.data());
        topk_lowest_index(choice.data(), E, k, idx);
        for (int64_t j = 0; j < k; ++j) w[j] = scores[idx[j]];
        if (a.scoring == Scoring::SoftmaxTopK) softmax_inplace(w, k);
        else if (a.scoring == Scoring::SigmoidTopK)
          for (int64_t j = 0; j < k; ++j) w[j] = sigmoid_f(w[j]);
      }
      normalize_scale(w, k, a);
    }
  });

  // Capacity (spec §5.6): priority is choice-major, token-minor. Sequential by nature.
  if (a.has_capacity()) {
    const int64_t C = capacity_per_expert(a, T, E, k, false);
    std::vector<int64_t> count(static_cast<size_t>(E), 0);
    for (int64_t j = 0; j < k; ++j)
      for (int64_t t = 0; t < T; ++t) {
        const int64_t e = indices[t * k + j];
        kept[t * k + j] = count[e] < C;
        ++count[e];
      }
  } else {
    std::fill(kept, kept + T * k, true);
  }
}

}  // namespace seif

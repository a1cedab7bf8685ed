// SeifMoE on CPU: seif.moe.moe_forward as a sparse kernel.
//
// Token choice: route, sort the kept assignments by expert (counting sort, token order kept
// inside an expert), gather each expert's tokens into one contiguous block, run every active
// expert's FFN as two GEMM phases (gate/up + activation, then down) cut into independent tiles
// for the thread pool, then combine each token's k contributions in the order j = 0..k-1.
// Expert choice and Soft MoE reuse the same batched FFN runner. Every output element is computed
// by one task in a fixed order, so results do not depend on the number of threads.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <new>

#include "seif_kernels.h"
#include "seif_math.h"

namespace seif {

namespace {

// ----------------------------------------------------------------------------- activations
inline double sigmoid_d(double x) { return 1.0 / (1.0 + std::exp(-x)); }
inline double gelu_erf(double x) { return 0.5 * x * (1.0 + std::erf(x * 0.70710678118654752440)); }
inline double gelu_tanh(double x) {
  return 0.5 * x * (1.0 + std::tanh(0.79788456080286535588 * (x + 0.044715 * x * x * x)));
}

// h = act(gate, up), computed in float64 and rounded once (seif.moe.activation).
inline float act1(Activation act, float gate, float up, double alpha, double limit) {
  const double u = up;
  double out;
  switch (act) {
    case Activation::SwiGLU: {
      const double g = gate;
      out = g * sigmoid_d(g) * u;
      break;
    }
    case Activation::GeGLU: out = gelu_erf(gate) * u; break;
    case Activation::GeGLUTanh: out = gelu_tanh(gate) * u; break;
    case Activation::SwiGLUOai: {
      double g = gate;
      g = std::isnan(g) ? g : std::min(g, limit);
      double uc = std::isnan(u) ? u : (u < -limit ? -limit : (u > limit ? limit : u));
      out = (uc + 1.0) * (g * sigmoid_d(alpha * g));
      break;
    }
    case Activation::ReLU: out = u < 0.0 ? 0.0 : u; break;
    case Activation::GeLU: out = gelu_erf(u); break;
    case Activation::GeLUTanh: out = gelu_tanh(u); break;
    case Activation::SiLU: out = u * sigmoid_d(u); break;
    case Activation::ReLU2: {
      const double r = u < 0.0 ? 0.0 : u;
      out = r * r;
      break;
    }
    default: out = u;
  }
  return static_cast<float>(out);
}

// ----------------------------------------------------------------------------- batched FFN
// FfnWeights, FfnJob, run_ffn_jobs and the helpers below (offset, stacked_expert, uninit,
// parallel_rows) are declared in seif_kernels.h: c_api.cpp uses them too.

// FFN task tiles: up to kMB tokens of one expert times kNB output columns. Large kMB: a task's
// weight rows are read from memory once for all of its tokens (gemm_nt blocks the tokens itself).
// kNB 128 rather than 64: each token block gemm_nt holds in L2 serves 16 weight panels, not 8
// (measured: deepseek fp32 T=1024 ~7% faster, mixtral about even; the sums do not depend on it).
constexpr int64_t kMB = 256;  // token rows per tile
constexpr int64_t kNB = 128;  // output columns per tile

}  // namespace

const void* offset(const void* p, DType t, int64_t elems) {
  if (!p) return nullptr;
  return static_cast<const char*>(p) + static_cast<size_t>(elems) * dtype_size(t);
}

FfnWeights stacked_expert(const void* gate, const void* up, const void* down,
                          const void* gate_bias, const void* up_bias, const void* down_bias,
                          DType wt, int64_t e, int64_t I, int64_t H) {
  FfnWeights w;
  w.gate = offset(gate, wt, e * I * H);
  w.up = offset(up, wt, e * I * H);
  w.down = offset(down, wt, e * H * I);
  w.gate_bias = offset(gate_bias, wt, e * I);
  w.up_bias = offset(up_bias, wt, e * I);
  w.down_bias = offset(down_bias, wt, e * H);
  return w;
}

namespace {

// Released scratch buffers of kMinKeptBytes or more, kept for the next uninit. Why: a call's
// gathered tokens, hidden activations and expert outputs are tens of MB at a few hundred
// tokens, which glibc serves from fresh mmapped pages, each faulted in and zeroed by the
// kernel on first touch (measured: deepseek fp32 T=256 through the torch module, 158 ms; with
// glibc told never to give memory back, 141 ms).
constexpr size_t kMinKeptBytes = size_t{1} << 18;
struct ScratchCache {
  std::mutex mu;
  std::vector<std::pair<size_t, float*>> kept;  // (capacity in bytes, buffer)
  size_t bytes = 0;
};
ScratchCache& scratch_cache() {
  static ScratchCache* cache = new ScratchCache();  // never destroyed: outlives every buffer
  return *cache;
}
size_t scratch_limit() {
  static const size_t limit = [] {
    const char* v = std::getenv("SEIF_SCRATCH_MB");
    char* end = nullptr;
    const long long mb = v && *v ? std::strtoll(v, &end, 10) : 256;
    return v && *v && (*end != '\0' || mb < 0) ? size_t{256} << 20
                                                 : static_cast<size_t>(mb) << 20;
  }();
  return limit;
}

}  // namespace

FloatBuf uninit(int64_t n) {
  const size_t bytes = (static_cast<size_t>(std::max<int64_t>(n, 1)) * 4 + 63) / 64 * 64;
  if (bytes >= kMinKeptBytes) {  // the smallest kept buffer that fits and is not 2x too big
    ScratchCache& c = scratch_cache();
    std::lock_guard<std::mutex> lk(c.mu);
    size_t best = c.kept.size();
    for (size_t i = 0; i < c.kept.size(); ++i)
      if (c.kept[i].first >= bytes && c.kept[i].first <= 2 * bytes &&
          (best == c.kept.size() || c.kept[i].first < c.kept[best].first))
        best = i;
    if (best < c.kept.size()) {
      const auto [cap, p] = c.kept[best];
      c.kept.erase(c.kept.begin() + static_cast<std::ptrdiff_t>(best));
      c.bytes -= cap;
      return FloatBuf(p, FreeDeleter{cap});
    }
  }
  float* p = static_cast<float*>(std::aligned_alloc(64, bytes));
  if (!p) throw std::bad_alloc();
  return FloatBuf(p, FreeDeleter{bytes});
}

void FreeDeleter::operator()(float* p) const {
  if (!p) return;
  if (bytes >= kMinKeptBytes) {
    ScratchCache& c = scratch_cache();
    std::lock_guard<std::mutex> lk(c.mu);
    if (c.bytes + bytes <= scratch_limit()) {
      c.kept.emplace_back(bytes, p);
      c.bytes += bytes;
      return;
    }
  }
  std::free(p);
}

void parallel_rows(int64_t n, const ParallelFor& pfor, const std::function<void(int64_t)>& f) {
  constexpr int64_t kChunk = 32;
  const int64_t tasks = (n + kChunk - 1) / kChunk;
  pfor(static_cast<size_t>(tasks), [&](size_t i) {
    const int64_t r0 = static_cast<int64_t>(i) * kChunk, r1 = std::min(n, r0 + kChunk);
    for (int64_t r = r0; r < r1; ++r) f(r);
  });
}

// Y = down(act(gate X + bg, up X + bu)) + bd for every job, in two parallel phases.
void run_ffn_jobs(const std::vector<FfnJob>& jobs, int64_t H, DType wt, const Attrs& a,
                  const ParallelFor& pfor) {
  // Every task of one token block passes the same key with it to gemm_nt_keyed, so a thread
  // packs those tokens once for all the column blocks (and gate and up) it runs on them. Keys
  // come from a process-wide counter: never reused, whatever the buffers' addresses.
  static std::atomic<uint64_t> next_key{1};
  struct Tile {
    size_t job;
    int64_t m0, n0;
    uint64_t key;
  };
  std::vector<Tile> tiles;
  for (size_t j = 0; j < jobs.size(); ++j)
    for (int64_t m0 = 0; m0 < jobs[j].M; m0 += kMB) {
      const uint64_t key = next_key.fetch_add(1);
      for (int64_t n0 = 0; n0 < jobs[j].I; n0 += kNB) tiles.push_back({j, m0, n0, key});
    }
  const bool gated = a.gated();
  const double alpha = a.alpha, limit = a.limit;
  pfor(tiles.size(), [&](size_t ti) {
    const Tile& t = tiles[ti];
    const FfnJob& job = jobs[t.job];
    const int64_t mb = std::min(kMB, job.M - t.m0), nb = std::min(kNB, job.I - t.n0);
    const float* X = job.X + t.m0 * H;
    float* Hout = job.Hbuf + t.m0 * job.I + t.n0;
    gemm_nt_keyed(mb, 0, nb, H, X, H, offset(job.w.up, wt, t.n0 * H), wt, H,
                  offset(job.w.up_bias, wt, t.n0), Hout, job.I, t.key);
    thread_local std::vector<float> gbuf;
    if (gbuf.size() < static_cast<size_t>(kMB * kNB)) gbuf.resize(static_cast<size_t>(kMB * kNB));
    float* g = gbuf.data();
    if (gated)
      gemm_nt_keyed(mb, 0, nb, H, X, H, offset(job.w.gate, wt, t.n0 * H), wt, H,
                    offset(job.w.gate_bias, wt, t.n0), g, nb, t.key);
    for (int64_t m = 0; m < mb; ++m) {
      float* h = Hout + m * job.I;
      if (a.activation == Activation::SwiGLU && swiglu_f64(g + m * nb, h, h, nb)) continue;
      for (int64_t n = 0; n < nb; ++n)
        h[n] = act1(a.activation, gated ? g[m * nb + n] : 0.0f, h[n], alpha, limit);
    }
  });
  tiles.clear();
  for (size_t j = 0; j < jobs.size(); ++j)
    for (int64_t m0 = 0; m0 < jobs[j].M; m0 += kMB) {
      const uint64_t key = next_key.fetch_add(1);
      for (int64_t n0 = 0; n0 < H; n0 += kNB) tiles.push_back({j, m0, n0, key});
    }
  pfor(tiles.size(), [&](size_t ti) {
    const Tile& t = tiles[ti];
    const FfnJob& job = jobs[t.job];
    const int64_t mb = std::min(kMB, job.M - t.m0), nb = std::min(kNB, H - t.n0);
    gemm_nt_keyed(mb, 0, nb, job.I, job.Hbuf + t.m0 * job.I, job.I,
                  offset(job.w.down, wt, t.n0 * job.I), wt, job.I,
                  offset(job.w.down_bias, wt, t.n0), job.Y + t.m0 * H + t.n0, H, t.key);
  });
}

namespace {

// C [M, N] = A [M, K] @ B[N, K]^T (+ bias), split over column blocks and row blocks.
void gemm_parallel(int64_t M, int64_t N, int64_t K, const float* A, const void* B, DType bt,
                   const void* bias, float* C, const ParallelFor& pfor) {
  const int64_t mt = (M + kMB - 1) / kMB, nt = (N + kNB - 1) / kNB;
  pfor(static_cast<size_t>(mt * nt), [&](size_t i) {
    const int64_t m0 = static_cast<int64_t>(i) / nt * kMB, n0 = static_cast<int64_t>(i) % nt * kNB;
    const int64_t mb = std::min(kMB, M - m0), nb = std::min(kNB, N - n0);
    gemm_nt(mb, 0, nb, K, A + m0 * K, K, offset(B, bt, n0 * K), bt, K, offset(bias, bt, n0),
            C + m0 * N + n0, N);
  });
}

FfnWeights expert_weights(const TensorArg* in, int64_t e, int64_t I, int64_t H, bool shared) {
  const int base = shared ? kSharedGateProj : kGateProj;
  const int bbase = shared ? kSharedGateBias : kGateBias;
  return stacked_expert(in[base].data, in[base + 1].data, in[base + 2].data, in[bbase].data,
                        in[bbase + 1].data, in[bbase + 2].data, in[base + 1].dtype, e, I, H);
}

// ----------------------------------------------------------------------------- the kinds
void token_choice(const Attrs& a, const TensorArg* in, const float* X, int64_t T, int64_t H,
                  int64_t E, const float* logits, const float* sel_bias, float* out,
                  const ParallelFor& pfor) {
  const int64_t k = a.top_k;
  std::vector<int64_t> idx(static_cast<size_t>(T * k));
  std::vector<float> w(static_cast<size_t>(T * k));
  std::unique_ptr<bool[]> kept(new bool[static_cast<size_t>(T * k)]);
  route_cpu(logits, T, E, sel_bias, a, idx.data(), w.data(), kept.get(), pfor);

  // Counting sort of the kept assignments by expert; inside an expert, token order.
  std::vector<int64_t> start(static_cast<size_t>(E + 1), 0);
  for (int64_t i = 0; i < T * k; ++i)
    if (kept[i]) ++start[idx[i] + 1];
  for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
  const int64_t nk = start[E];
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  std::vector<int64_t> row_of(static_cast<size_t>(T * k), -1), src(static_cast<size_t>(nk));
  for (int64_t i = 0; i < T * k; ++i)
    if (kept[i]) {
      const int64_t pos = fill[idx[i]]++;
      row_of[i] = pos;
      src[pos] = i;
    }

  const bool on_input = a.weight_on == WeightOn::Input;
  const FloatBuf Xg = uninit(nk * H), Yg = uninit(nk * H);
  parallel_rows(nk, pfor, [&](int64_t r) {
    const int64_t i = src[r];
    const float* x = X + (i / k) * H;
    float* d = Xg.get() + r * H;
    if (on_input) {
      const float wi = w[i];
      for (int64_t h = 0; h < H; ++h) d[h] = wi * x[h];
    } else {
      std::memcpy(d, x, static_cast<size_t>(H) * 4);
    }
  });

  const int64_t I = in[kUpProj].shape[1];
  std::vector<FfnJob> jobs;
  const FloatBuf Hbuf = uninit(nk * I);
  for (int64_t e = 0; e < E; ++e) {
    const int64_t M = start[e + 1] - start[e];
    if (!M) continue;
    FfnJob j;
    j.w = expert_weights(in, e, I, H, false);
    j.I = I;
    j.X = Xg.get() + start[e] * H;
    j.M = M;
    j.Hbuf = Hbuf.get() + start[e] * I;
    j.Y = Yg.get() + start[e] * H;
    jobs.push_back(j);
  }
  run_ffn_jobs(jobs, H, in[kUpProj].dtype, a, pfor);

  const bool passthrough = a.drop_policy == DropPolicy::PassthroughScaled;
  parallel_rows(T, pfor, [&](int64_t t) {
    float* o = out + t * H;
    std::fill(o, o + H, 0.0f);
    for (int64_t j = 0; j < k; ++j) {
      const int64_t i = t * k + j;
      const float wi = w[i];
      if (row_of[i] >= 0) {
        const float* y = Yg.get() + row_of[i] * H;
        if (on_input)
          for (int64_t h = 0; h < H; ++h) o[h] += y[h];
        else
          for (int64_t h = 0; h < H; ++h) o[h] += wi * y[h];
      } else if (passthrough) {
        const float* x = X + t * H;
        for (int64_t h = 0; h < H; ++h) o[h] += wi * x[h];
      }
    }
  });
}

void expert_choice(const Attrs& a, const TensorArg* in, const float* X, int64_t T, int64_t H,
                   int64_t E, const float* logits, float* out, const ParallelFor& pfor) {
  std::vector<float> scores(logits, logits + T * E);
  parallel_rows(T, pfor, [&](int64_t t) {
    float* s = scores.data() + t * E;
    if (a.scoring == Scoring::Softmax) softmax_inplace(s, E);
    else
      for (int64_t e = 0; e < E; ++e) s[e] = sigmoid_f(s[e]);
  });
  const int64_t C = capacity_per_expert(a, T, E, 1, true);
  std::fill(out, out + T * H, 0.0f);
  if (C <= 0) return;
  std::vector<int64_t> tok(static_cast<size_t>(E * C));
  std::vector<float> w(static_cast<size_t>(E * C));
  pfor(static_cast<size_t>(E), [&](size_t ei) {
    const int64_t e = static_cast<int64_t>(ei);
    std::vector<float> col(static_cast<size_t>(T));
    for (int64_t t = 0; t < T; ++t) col[t] = scores[t * E + e];
    topk_lowest_index(col.data(), T, C, tok.data() + e * C);
    for (int64_t c = 0; c < C; ++c) w[e * C + c] = col[tok[e * C + c]] * a.scale;
  });
  const bool on_input = a.weight_on == WeightOn::Input;
  const int64_t n = E * C;
  std::vector<float> Xg(static_cast<size_t>(n * H)), Yg(static_cast<size_t>(n * H));
  parallel_rows(n, pfor, [&](int64_t r) {
    const float* x = X + tok[r] * H;
    float* d = Xg.data() + r * H;
    if (on_input)
      for (int64_t h = 0; h < H; ++h) d[h] = w[r] * x[h];
    else
      std::memcpy(d, x, static_cast<size_t>(H) * 4);
  });
  const int64_t I = in[kUpProj].shape[1];
  std::vector<float> Hbuf(static_cast<size_t>(n * I));
  std::vector<FfnJob> jobs;
  for (int64_t e = 0; e < E; ++e) {
    FfnJob j;
    j.w = expert_weights(in, e, I, H, false);
    j.I = I;
    j.X = Xg.data() + e * C * H;
    j.M = C;
    j.Hbuf = Hbuf.data() + e * C * I;
    j.Y = Yg.data() + e * C * H;
    jobs.push_back(j);
  }
  run_ffn_jobs(jobs, H, in[kUpProj].dtype, a, pfor);
  // out[tok] += y, experts in order (a token may be picked by several experts). Parallel over
  // column blocks keeps the per-element order.
  const int64_t nt = (H + 255) / 256;
  pfor(static_cast<size_t>(nt), [&](size_t bi) {
    const int64_t h0 = static_cast<int64_t>(bi) * 256, h1 = std::min(H, h0 + 256);
    for (int64_t r = 0; r < n; ++r) {
      float* o = out + tok[r] * H;
      const float* y = Yg.data() + r * H;
      if (on_input)
        for (int64_t h = h0; h < h1; ++h) o[h] += y[h];
      else
        for (int64_t h = h0; h < h1; ++h) o[h] += w[r] * y[h];
    }
  });
}

void soft_moe(const Attrs& a, const TensorArg* in, const float* X, int64_t T, int64_t H,
              int64_t E, const float* logits, float* out, const ParallelFor& pfor) {
  const int64_t S = a.slots_per_expert, R = E * S;
  // dispatch = softmax over tokens (per slot column), stored transposed [R, T];
  // combine = softmax over slots (per token row) [T, R].
  std::vector<float> DT(static_cast<size_t>(R * T)), comb(logits, logits + T * R);
  pfor(static_cast<size_t>(R), [&](size_t ri) {
    const int64_t r = static_cast<int64_t>(ri);
    float* d = DT.data() + r * T;
    for (int64_t t = 0; t < T; ++t) d[t] = logits[t * R + r];
    if (T == 0) return;
    // NumPy reduces over axis 0 row by row: a sequential sum, not a pairwise one.
    const float m = max_nan(d, T);
    float s = 0.0f;
    for (int64_t t = 0; t < T; ++t) {
      d[t] = std::exp(d[t] - m);
      s += d[t];
    }
    for (int64_t t = 0; t < T; ++t) d[t] = d[t] / s;
  });
  parallel_rows(T, pfor, [&](int64_t t) { softmax_inplace(comb.data() + t * R, R); });
  // slot_in [R, H] = dispatch^T @ X = DT @ (X^T)^T.
  std::vector<float> XT(static_cast<size_t>(H * T));
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < H; ++h) XT[h * T + t] = X[t * H + h];
  std::vector<float> slot_in(static_cast<size_t>(R * H)), slot_out(static_cast<size_t>(R * H), 0.0f);
  gemm_parallel(R, H, T, DT.data(), XT.data(), DType::F32, nullptr, slot_in.data(), pfor);
  if (T > 0) {
    const int64_t I = in[kUpProj].shape[1];
    std::vector<float> Hbuf(static_cast<size_t>(R * I));
    std::vector<FfnJob> jobs;
    for (int64_t e = 0; e < E; ++e) {
      FfnJob j;
      j.w = expert_weights(in, e, I, H, false);
      j.I = I;
      j.X = slot_in.data() + e * S * H;
      j.M = S;
      j.Hbuf = Hbuf.data() + e * S * I;
      j.Y = slot_out.data() + e * S * H;
      jobs.push_back(j);
    }
    run_ffn_jobs(jobs, H, in[kUpProj].dtype, a, pfor);
  }
  // out [T, H] = combine @ slot_out.
  std::vector<float> SOT(static_cast<size_t>(H * R));
  for (int64_t r = 0; r < R; ++r)
    for (int64_t h = 0; h < H; ++h) SOT[h * R + r] = slot_out[r * H + h];
  gemm_parallel(T, H, R, comb.data(), SOT.data(), DType::F32, nullptr, out, pfor);
}

void shared_experts(const TensorArg* in, const float* X, int64_t T, int64_t H, float* out,
                    const Attrs& a, const ParallelFor& pfor) {
  const int64_t S = in[kSharedUpProj].shape[0], Is = in[kSharedUpProj].shape[1];
  const DType wt = in[kSharedUpProj].dtype;
  const FloatBuf Y = uninit(S * T * H), Hbuf = uninit(S * T * Is);
  std::vector<FfnJob> jobs;
  for (int64_t s = 0; s < S; ++s) {
    FfnJob j;
    j.w = expert_weights(in, s, Is, H, true);
    j.I = Is;
    j.X = X;
    j.M = T;
    j.Hbuf = Hbuf.get() + s * T * Is;
    j.Y = Y.get() + s * T * H;
    jobs.push_back(j);
  }
  run_ffn_jobs(jobs, H, wt, a, pfor);
  std::vector<float> gate;
  if (in[kSharedExpertGate].present()) {
    gate.resize(static_cast<size_t>(T));
    gemm_parallel(T, 1, H, X, in[kSharedExpertGate].data, in[kSharedExpertGate].dtype, nullptr,
                  gate.data(), pfor);
  }
  parallel_rows(T, pfor, [&](int64_t t) {
    float* o = out + t * H;
    const float g = gate.empty() ? 1.0f : sigmoid_f(gate[t]);
    for (int64_t h = 0; h < H; ++h) {
      float sh = 0.0f;
      for (int64_t s = 0; s < S; ++s) sh += Y[(s * T + t) * H + h];
      if (!gate.empty()) sh = g * sh;
      o[h] = o[h] + sh;
    }
  });
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

const char* const kInputNames[kNumMoEInputs] = {
    "hidden_states", "router_weight", "router_bias", "selection_bias", "gate_proj", "up_proj",
    "down_proj", "gate_bias", "up_bias", "down_bias", "shared_gate_proj", "shared_up_proj",
    "shared_down_proj", "shared_gate_bias", "shared_up_bias", "shared_down_bias",
    "shared_expert_gate"};

void expect(const TensorArg* in, int i, const std::vector<int64_t>& shape) {
  if (!in[i].present()) return;
  if (in[i].shape != shape)
    throw Error(std::string("ai.seif.SeifMoE: ") + kInputNames[i] + " is " +
                shape_str(in[i].shape) + ", expected " + shape_str(shape));
}

}  // namespace

void check_moe_inputs(const Attrs& a, const TensorArg* in, int64_t* N_out, int64_t* H_out,
                      bool router_own_dtype) {
  for (int i : {int(kHidden), int(kRouterWeight), int(kUpProj), int(kDownProj)})
    if (!in[i].present())
      throw Error(std::string("ai.seif.SeifMoE: input ") + kInputNames[i] + " is required");
  if (in[kHidden].shape.size() != 2)
    throw Error("ai.seif.SeifMoE: hidden_states must be [N, H], got " +
                shape_str(in[kHidden].shape));
  const int64_t N = in[kHidden].shape[0], H = in[kHidden].shape[1];
  if (in[kUpProj].shape.size() != 3)
    throw Error("ai.seif.SeifMoE: up_proj must be [E, I, H], got " + shape_str(in[kUpProj].shape));
  const int64_t E = in[kUpProj].shape[0], I = in[kUpProj].shape[1];
  if (E < 1 || I < 1) throw Error("ai.seif.SeifMoE: up_proj has no experts or I = 0");
  const int64_t R = a.kind == Kind::SoftMoE ? E * a.slots_per_expert : E;
  expect(in, kUpProj, {E, I, H});
  expect(in, kRouterWeight, {R, H});
  if (!in[kRouterWeight].present() || in[kRouterWeight].shape.size() != 2) {
    throw Error("ai.seif.SeifMoE: router_weight must be [R, H]");
  }
  expect(in, kRouterBias, {R});
  expect(in, kSelectionBias, {E});
  if (in[kSelectionBias].present() &&
      (a.kind == Kind::SparseMixer || a.kind == Kind::ExpertChoice || a.kind == Kind::SoftMoE))
    throw Error("ai.seif.SeifMoE: this routing kind has no selection_bias");
  if (a.gated() != in[kGateProj].present())
    throw Error(a.gated() ? "ai.seif.SeifMoE: a gated activation needs gate_proj"
                          : "ai.seif.SeifMoE: an ungated activation takes no gate_proj");
  if (!a.gated() && in[kGateBias].present())
    throw Error("ai.seif.SeifMoE: an ungated activation takes no gate_bias");
  expect(in, kGateProj, {E, I, H});
  expect(in, kDownProj, {E, H, I});
  expect(in, kGateBias, {E, I});
  expect(in, kUpBias, {E, I});
  expect(in, kDownBias, {E, H});
  const bool any_shared = in[kSharedGateProj].present() || in[kSharedUpProj].present() ||
                          in[kSharedDownProj].present() || in[kSharedGateBias].present() ||
                          in[kSharedUpBias].present() || in[kSharedDownBias].present() ||
                          in[kSharedExpertGate].present();
  if (any_shared) {
    if (!in[kSharedUpProj].present() || !in[kSharedDownProj].present() ||
        in[kSharedUpProj].shape.size() != 3)
      throw Error("ai.seif.SeifMoE: shared experts need shared_up_proj [S, Is, H] and "
                  "shared_down_proj [S, H, Is]");
    const int64_t S = in[kSharedUpProj].shape[0], Is = in[kSharedUpProj].shape[1];
    if (a.gated() != in[kSharedGateProj].present())
      throw Error("ai.seif.SeifMoE: shared_gate_proj must be given exactly for gated activations");
    expect(in, kSharedUpProj, {S, Is, H});
    expect(in, kSharedGateProj, {S, Is, H});
    expect(in, kSharedDownProj, {S, H, Is});
    expect(in, kSharedGateBias, {S, Is});
    expect(in, kSharedUpBias, {S, Is});
    expect(in, kSharedDownBias, {S, H});
    expect(in, kSharedExpertGate, {1, H});
  }
  for (int i = kRouterWeight; i < kNumMoEInputs; ++i) {
    if (!in[i].present() || i == kSelectionBias) continue;
    const bool router = i == kRouterWeight || i == kRouterBias || i == kSharedExpertGate;
    if (router && router_own_dtype) {
      if (i == kRouterBias && in[i].dtype != in[kRouterWeight].dtype)
        throw Error(std::string("ai.seif.SeifMoE: router_bias is ") + dtype_name(in[i].dtype) +
                    " but router_weight is " + dtype_name(in[kRouterWeight].dtype));
      continue;
    }
    if (in[i].dtype != in[kUpProj].dtype)
      throw Error(std::string("ai.seif.SeifMoE: ") + kInputNames[i] + " is " +
                  dtype_name(in[i].dtype) + " but up_proj is " + dtype_name(in[kUpProj].dtype));
  }
  if (a.kind == Kind::TopK || a.kind == Kind::GroupTopK || a.kind == Kind::SparseMixer)
    if (a.top_k > E)
      throw Error("ai.seif.SeifMoE: top_k " + std::to_string(a.top_k) + " > " +
                  std::to_string(E) + " experts");
  *N_out = N;
  *H_out = H;
}

void moe_cpu(const Attrs& a, const TensorArg* in, void* out, DType out_type,
             const ParallelFor& pfor, bool router_own_dtype) {
  int64_t T, H;
  check_moe_inputs(a, in, &T, &H, router_own_dtype);
  const int64_t E = in[kUpProj].shape[0];
  const int64_t R = in[kRouterWeight].shape[0];
  if (T == 0) return;

  FloatBuf Xbuf;
  const float* X;
  if (in[kHidden].dtype == DType::F32) {
    X = static_cast<const float*>(in[kHidden].data);
  } else {
    Xbuf = uninit(T * H);
    to_float(in[kHidden].data, in[kHidden].dtype, static_cast<size_t>(T * H), Xbuf.get());
    X = Xbuf.get();
  }
  std::vector<float> logits(static_cast<size_t>(T * R));
  gemm_parallel(T, R, H, X, in[kRouterWeight].data, in[kRouterWeight].dtype,
                in[kRouterBias].data, logits.data(), pfor);
  std::vector<float> sel;
  if (in[kSelectionBias].present()) {
    sel.resize(static_cast<size_t>(E));
    to_float(in[kSelectionBias].data, in[kSelectionBias].dtype, sel.size(), sel.data());
  }

  FloatBuf obuf;
  float* o;
  if (out_type == DType::F32) {
    o = static_cast<float*>(out);
  } else {
    obuf = uninit(T * H);
    o = obuf.get();
  }
  switch (a.kind) {
    case Kind::TopK:
    case Kind::GroupTopK:
    case Kind::SparseMixer:
      token_choice(a, in, X, T, H, E, logits.data(), sel.empty() ? nullptr : sel.data(), o, pfor);
      break;
    case Kind::ExpertChoice: expert_choice(a, in, X, T, H, E, logits.data(), o, pfor); break;
    case Kind::SoftMoE: soft_moe(a, in, X, T, H, E, logits.data(), o, pfor); break;
  }
  if (in[kSharedUpProj].present()) shared_experts(in, X, T, H, o, a, pfor);
  if (out_type != DType::F32) from_float(o, static_cast<size_t>(T * H), out_type, out);
}

}  // namespace seif

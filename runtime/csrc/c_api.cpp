// A small C ABI over the CPU kernels, for callers other than ONNX Runtime (the torch module's
// "native" dispatch, seif.runtime.native, through ctypes): the routed experts on sorted rows
// (seif_experts_forward), on gathered tokens with the weighted sum (seif_moe_experts), and the
// whole SeifMoE operator (seif_moe_forward, moe_cpu: what ai.seif.SeifMoE runs in ORT).
//
// Why: torch's CPU matmuls for the small row counts of routed experts run far below memory
// bandwidth (bf16 at about half the fp32 rate on CPUs without AMX); run_ffn_jobs (moe.cpp) does
// the same work with the library's GEMM kernels, reading bf16 weights directly.
//
// Rules: every exported function catches every C++ exception and reports it as a non-zero return
// with a message for seif_last_error() (per thread); nothing here needs onnxruntime, so the
// library still links with -z defs. Parallel work runs on OpenMP where the library is built with
// it (the usual case), else on a small persistent std::thread pool; run_ffn_jobs gives the same
// bits for any thread count.
//
// Why OpenMP: torch's CPU ops run on libgomp, whose workers keep spinning for a while after each
// op. The library links libgomp.so.1 too, and the dynamic loader gives it the copy torch already
// loaded (same soname), so its parallel loops run on those same workers instead of fighting them
// for the cores. Measured on 2 cores, deepseek layer, torch module with native=True: bf16 T=1
// 6.65-6.96 -> 5.16-5.31 ms (floor 3.86), fp32 T=1 10.22 -> 8.41 ms (torch's own path 9.59),
// fp32 T=1024 477 -> 460 ms. A forked child (fork after the first native call) uses the
// std::thread pool: GNU libgomp's workers do not survive fork (torch's own ops hang there too).

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <new>
#include <string>
#include <thread>
#include <vector>

#include "seif_kernels.h"

#define SEIF_C_API extern "C" __attribute__((visibility("default")))

namespace {

thread_local std::string g_last_error;

// ----------------------------------------------------------------------------- thread pool
// Runs fn(i) for i < n on `threads` threads (the caller is one of them); every i exactly once.
// One run at a time (callers hold g_run_mu). Worker w takes part in a run when w < threads - 1;
// the caller waits until each of those has finished its share, so no worker still holds a run's
// fn when the next run starts.
class Pool {
 public:
  ~Pool() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
    }
    start_.notify_all();
    for (auto& t : workers_) t.join();
  }

  void run(size_t n, const std::function<void(size_t)>& fn, int threads) {
    const int helpers = static_cast<int>(std::min<size_t>(n, static_cast<size_t>(threads))) - 1;
    if (helpers <= 0) {
      for (size_t i = 0; i < n; ++i) fn(i);
      return;
    }
    grow(helpers);
    {
      std::lock_guard<std::mutex> lk(mu_);
      fn_ = &fn;
      n_ = n;
      next_.store(0);
      want_ = helpers;
      finished_ = 0;
      error_ = nullptr;
      ++generation_;
    }
    start_.notify_all();
    drain(fn, n);
    std::unique_lock<std::mutex> lk(mu_);
    done_.wait(lk, [&] { return finished_ == want_; });
    fn_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void grow(int helpers) {
    while (static_cast<int>(workers_.size()) < helpers) {
      const int id = static_cast<int>(workers_.size());
      uint64_t seen;
      {
        std::lock_guard<std::mutex> lk(mu_);
        seen = generation_;
      }
      workers_.emplace_back([this, id, seen] { loop(id, seen); });
    }
  }

  void drain(const std::function<void(size_t)>& fn, size_t n) {
    for (size_t i = next_.fetch_add(1); i < n; i = next_.fetch_add(1)) {
      try {
        fn(i);
      } catch (...) {
        std::lock_guard<std::mutex> lk(mu_);
        if (!error_) error_ = std::current_exception();
      }
    }
  }

  void loop(int id, uint64_t seen) {
    std::unique_lock<std::mutex> lk(mu_);
    for (;;) {
      start_.wait(lk, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
      if (id >= want_) continue;
      const std::function<void(size_t)>* fn = fn_;
      const size_t n = n_;
      lk.unlock();
      drain(*fn, n);
      lk.lock();
      if (++finished_ == want_) done_.notify_all();
    }
  }

  std::mutex mu_;
  std::condition_variable start_, done_;
  std::vector<std::thread> workers_;
  const std::function<void(size_t)>* fn_ = nullptr;
  size_t n_ = 0;
  std::atomic<size_t> next_{0};
  int want_ = 0, finished_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
  std::exception_ptr error_;
};

// The pool and the lock that serialises its runs. After fork() the child has none of the
// parent's workers: the child handler drops the pool (leaked, never joined) and a fresh one is
// made on first use. prepare/parent hold the lock across fork so no run is half-way there.
std::mutex g_run_mu;
Pool* g_pool = nullptr;
bool g_forked = false;  // set in a child forked after the handlers were installed
std::once_flag g_atfork_once;

void atfork_prepare() { g_run_mu.lock(); }
void atfork_parent() { g_run_mu.unlock(); }
void atfork_child() {
  g_forked = true;
  g_pool = nullptr;
  g_run_mu.unlock();
}

// A ParallelFor on the pool with `threads` threads (1: serial, no pool, no lock).
struct PoolFor {
  int threads;
  std::unique_lock<std::mutex> lock;
  explicit PoolFor(int t) : threads(std::max(1, t)) {
    if (threads > 1) {
      std::call_once(g_atfork_once,
                     [] { pthread_atfork(atfork_prepare, atfork_parent, atfork_child); });
      lock = std::unique_lock<std::mutex>(g_run_mu);
      if (!g_pool) g_pool = new Pool();
    }
  }
  seif::ParallelFor pfor() const {
    if (threads <= 1) return seif::serial_for();
    const int t = threads;
#if defined(_OPENMP)
    if (!g_forked)
      return [t](size_t n, const std::function<void(size_t)>& fn) {
        std::exception_ptr err;
        std::mutex mu;
#pragma omp parallel for num_threads(t) schedule(dynamic, 1)
        for (long i = 0; i < static_cast<long>(n); ++i) {
          try {
            fn(static_cast<size_t>(i));
          } catch (...) {
            std::lock_guard<std::mutex> lk(mu);
            if (!err) err = std::current_exception();
          }
        }
        if (err) std::rethrow_exception(err);
      };
#endif
    return [t](size_t n, const std::function<void(size_t)>& fn) { g_pool->run(n, fn, t); };
  }
};

// ----------------------------------------------------------------------------- helpers
template <typename F>
int guarded(F&& f) {
  try {
    f();
    g_last_error.clear();
    return 0;
  } catch (const std::bad_alloc&) {
    g_last_error = "out of memory";
  } catch (const std::exception& e) {
    g_last_error = e.what();
  } catch (...) {
    g_last_error = "unknown C++ exception";
  }
  return 1;
}

seif::DType dtype_of(int code) {
  switch (code) {
    case 0: return seif::DType::F32;
    case 1: return seif::DType::F16;
    case 2: return seif::DType::BF16;
    default:
      throw seif::Error("seif: dtype code " + std::to_string(code) +
                        " is not 0 (float32), 1 (float16) or 2 (bfloat16)");
  }
}

}  // namespace

// Version of this C ABI: callers check it before binding the functions below.
SEIF_C_API int seif_c_api_version() { return 3; }

// The message of the last failed call on this thread ("" after a successful one).
SEIF_C_API const char* seif_last_error() { return g_last_error.c_str(); }

namespace {

// The experts' attributes of the entry points that take them one by one.
seif::Attrs ffn_attrs(const char* activation, double alpha, double limit) {
  if (!activation) throw seif::Error("seif experts: activation is required");
  seif::Attrs a;
  a.activation = seif::parse_activation(activation);
  a.alpha = static_cast<float>(alpha);
  a.limit = static_cast<float>(limit);
  return a;
}

int64_t parse_int(const std::string& name, const std::string& v) {
  char* end = nullptr;
  errno = 0;
  const long long x = std::strtoll(v.c_str(), &end, 10);
  if (v.empty() || *end != '\0' || errno == ERANGE)
    throw seif::Error("seif attributes: " + name + "=" + v + " is not an integer");
  return static_cast<int64_t>(x);
}

float parse_float(const std::string& name, const std::string& v) {
  char* end = nullptr;
  const float x = std::strtof(v.c_str(), &end);  // rounded to float32, as ONNX attributes are
  if (v.empty() || *end != '\0')
    throw seif::Error("seif attributes: " + name + "=" + v + " is not a number");
  return x;
}

// SeifMoE attributes (spec/ops.md) from "name=value;name=value..." (the names and values of
// seif.converters.onnx.layer_attributes); absent names keep the operator's defaults, unknown
// ones are refused. Checked as the operator checks its node's attributes.
seif::Attrs parse_attrs(const char* text) {
  using seif::Error;
  if (!text) throw Error("seif attributes are required");
  seif::Attrs a;
  const std::string s(text);
  for (size_t pos = 0; pos <= s.size();) {
    size_t end = s.find(';', pos);
    if (end == std::string::npos) end = s.size();
    const std::string item = s.substr(pos, end - pos);
    pos = end + 1;
    if (item.empty()) continue;
    const size_t eq = item.find('=');
    if (eq == std::string::npos) throw Error("seif attributes: '" + item + "' is not name=value");
    const std::string k = item.substr(0, eq), v = item.substr(eq + 1);
    if (k == "kind") a.kind = seif::parse_kind(v);
    else if (k == "top_k") a.top_k = parse_int(k, v);
    else if (k == "scoring") a.scoring = seif::parse_scoring(v);
    else if (k == "normalize") a.normalize = seif::parse_normalize(v);
    else if (k == "norm_p") a.norm_p = parse_float(k, v);
    else if (k == "epsilon") a.epsilon = parse_float(k, v);
    else if (k == "epsilon_rule") a.epsilon_rule = seif::parse_epsilon_rule(v);
    else if (k == "scale") a.scale = parse_float(k, v);
    else if (k == "n_group") a.n_group = parse_int(k, v);
    else if (k == "topk_group") a.topk_group = parse_int(k, v);
    else if (k == "group_score") a.group_score = seif::parse_group_score(v);
    else if (k == "group_mask") a.group_mask = seif::parse_group_mask(v);
    else if (k == "jitter_eps") a.jitter_eps = parse_float(k, v);
    else if (k == "capacity_tokens") a.capacity_tokens = parse_int(k, v);
    else if (k == "capacity_factor") a.capacity_factor = parse_float(k, v);
    else if (k == "activation") a.activation = seif::parse_activation(v);
    else if (k == "alpha") a.alpha = parse_float(k, v);
    else if (k == "limit") a.limit = parse_float(k, v);
    else if (k == "weight_on") a.weight_on = seif::parse_weight_on(v);
    else if (k == "drop_policy") a.drop_policy = seif::parse_drop_policy(v);
    else if (k == "slots_per_expert") a.slots_per_expert = parse_int(k, v);
    else throw Error("seif attributes: unknown name '" + k + "'");
  }
  seif::check_attrs(a, true);
  return a;
}

// The checks and per-expert jobs both entry points share. Throws seif::Error.
struct Experts {
  int64_t N, H, I, E;
  const int64_t* counts;
  const void *gate, *up, *down, *gate_bias, *up_bias, *down_bias;
  seif::DType wt;
  seif::Attrs a;

  // Checks the sizes, the weight dtype, the activation's weights and the counts; keeps `attrs`
  // (its activation, alpha and limit are the experts').
  void check(int dtype, const seif::Attrs& attrs) {
    using seif::Error;
    if (N < 0 || H < 1 || I < 1 || E < 1)
      throw Error("seif experts: need N >= 0, H >= 1, I >= 1, E >= 1 (got N=" +
                  std::to_string(N) + ", H=" + std::to_string(H) + ", I=" + std::to_string(I) +
                  ", E=" + std::to_string(E) + ")");
    if (!counts || !up || !down) throw Error("seif experts: counts, up and down are required");
    wt = dtype_of(dtype);
    a = attrs;
    if (a.gated() != (gate != nullptr))
      throw Error(a.gated() ? "seif experts: a gated activation needs gate weights"
                            : "seif experts: an ungated activation takes no gate");
    if (!a.gated() && gate_bias) throw Error("seif experts: an ungated activation takes no gate bias");
    if (a.activation == seif::Activation::SwiGLUOai && !(a.limit > 0.0f))
      throw Error("seif experts: limit must be > 0");
    int64_t total = 0;
    for (int64_t e = 0; e < E; ++e) {
      if (counts[e] < 0 || counts[e] > N - total)
        throw Error("seif experts: expert row counts must be >= 0 and sum to N = " +
                    std::to_string(N));
      total += counts[e];
    }
    if (total != N)
      throw Error("seif experts: expert row counts sum to " + std::to_string(total) +
                  ", not N = " + std::to_string(N));
  }

  // Y [N, H] = the experts' FFN on X [N, H] (rows sorted by expert).
  void run(const float* X, float* Y, const seif::ParallelFor& pfor) const {
    if (N == 0) return;
    const seif::FloatBuf hbuf = seif::uninit(N * I);
    std::vector<seif::FfnJob> jobs;
    int64_t row = 0;
    for (int64_t e = 0; e < E; ++e) {
      const int64_t M = counts[e];
      if (M == 0) continue;
      seif::FfnJob j;
      j.w = seif::stacked_expert(gate, up, down, gate_bias, up_bias, down_bias, wt, e, I, H);
      j.I = I;
      j.X = X + row * H;
      j.M = M;
      j.Hbuf = hbuf.get() + row * I;
      j.Y = Y + row * H;
      jobs.push_back(j);
      row += M;
    }
    seif::run_ffn_jobs(jobs, H, wt, a, pfor);
  }
};

// out[t] += w[r] * FFN_e(X[t]) (or FFN_e(w[r] * X[t]) with weight_on_input; w null: 1) for
// each assignment r < ex.N, token t = tokens[r], sorted by expert as ex.counts says; a token's
// terms are added in increasing r, as torch's index_add_ over the sorted assignments does. The
// gather and the combine run on the pool too (no torch op between them). Throws seif::Error.
void gather_run_combine(const Experts& ex, const float* X, int64_t T, const int64_t* tokens,
                        const float* weights, bool weight_on_input, float* out,
                        const seif::ParallelFor& pfor) {
  const int64_t N = ex.N, H = ex.H;
  std::vector<int64_t> start(static_cast<size_t>(T) + 1, 0);
  for (int64_t r = 0; r < N; ++r) {
    if (tokens[r] < 0 || tokens[r] >= T)
      throw seif::Error("seif experts: token index " + std::to_string(tokens[r]) +
                        " is not in [0, " + std::to_string(T) + ")");
    ++start[static_cast<size_t>(tokens[r]) + 1];
  }
  for (int64_t t = 0; t < T; ++t) start[t + 1] += start[t];
  std::vector<int64_t> rows(static_cast<size_t>(N));  // a token's rows, increasing r
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t r = 0; r < N; ++r) rows[fill[tokens[r]]++] = r;
  }
  const bool on_input = weight_on_input && weights;
  const seif::FloatBuf Xg = seif::uninit(N * H), Yg = seif::uninit(N * H);
  seif::parallel_rows(N, pfor, [&](int64_t r) {
    const float* x = X + tokens[r] * H;
    float* d = Xg.get() + r * H;
    if (on_input) {
      const float w = weights[r];
      for (int64_t h = 0; h < H; ++h) d[h] = w * x[h];
    } else {
      std::copy(x, x + H, d);
    }
  });
  ex.run(Xg.get(), Yg.get(), pfor);
  const bool scale = weights && !on_input;
  seif::parallel_rows(T, pfor, [&](int64_t t) {
    float* o = out + t * H;
    for (int64_t i = start[t]; i < start[t + 1]; ++i) {
      const int64_t r = rows[i];
      const float* y = Yg.get() + r * H;
      if (scale) {
        const float w = weights[r];
        for (int64_t h = 0; h < H; ++h) o[h] += w * y[h];
      } else {
        for (int64_t h = 0; h < H; ++h) o[h] += y[h];
      }
    }
  });
}

}  // namespace

// Routed experts' FFN on rows already sorted by expert:
//   Y[r] = down_e(act(gate_e X[r] + gb_e, up_e X[r] + ub_e)) + db_e
// for the counts[e] rows of expert e (e = 0..E-1, consecutive). X, Y: [N, H] float32
// contiguous; gate/up: [E, I, H], down: [E, H, I], biases [E, I], [E, I], [E, H] contiguous, of
// weight dtype `dtype` (0 float32, 1 float16, 2 bfloat16); gate and gate_bias null for ungated
// activations; any bias may be null. activation: a SEIF activation name (spec §5.13), alpha and
// limit for swiglu_oai. threads >= 1. Returns 0, or non-zero with seif_last_error() set (nothing
// is guaranteed about Y then).
SEIF_C_API int seif_experts_forward(const float* X, int64_t N, int64_t H, int64_t I,
                                    const int64_t* counts, int64_t E, const void* gate,
                                    const void* up, const void* down, const void* gate_bias,
                                    const void* up_bias, const void* down_bias, int dtype,
                                    const char* activation, double alpha, double limit, float* Y,
                                    int threads) {
  return guarded([&] {
    Experts ex{N, H, I, E, counts, gate, up, down, gate_bias, up_bias, down_bias, {}, {}};
    ex.check(dtype, ffn_attrs(activation, alpha, limit));
    if (N > 0 && (!X || !Y)) throw seif::Error("seif_experts_forward: X and Y are required");
    const PoolFor pool(threads);
    ex.run(X, Y, pool.pfor());
  });
}

// The same experts on gathered tokens, combined into `out`: for every assignment r < N (sorted
// by expert as counts says), token t = tokens[r] in [0, T):
//   out[t] += w[r] * FFN_e(X[t])          (weights given, weight_on_input 0)
//   out[t] += FFN_e(w[r] * X[t])          (weight_on_input 1)
//   out[t] += FFN_e(X[t])                 (weights null)
// X, out: [T, H] float32 contiguous; tokens [N] int64; weights [N] float32 or null. A token's
// contributions are added in increasing r, as torch's index_add_ over the sorted assignments
// does; the gather and the combine run on the pool too (no torch op between them).
SEIF_C_API int seif_moe_experts(const float* X, int64_t T, int64_t H, int64_t I,
                                const int64_t* tokens, const float* weights,
                                int weight_on_input, int64_t N, const int64_t* counts, int64_t E,
                                const void* gate, const void* up, const void* down,
                                const void* gate_bias, const void* up_bias,
                                const void* down_bias, int dtype, const char* activation,
                                double alpha, double limit, float* out, int threads) {
  return guarded([&] {
    using seif::Error;
    Experts ex{N, H, I, E, counts, gate, up, down, gate_bias, up_bias, down_bias, {}, {}};
    ex.check(dtype, ffn_attrs(activation, alpha, limit));
    if (T < 0) throw Error("seif_moe_experts: T must be >= 0");
    if (N == 0) return;
    if (!X || !out || !tokens) throw Error("seif_moe_experts: X, tokens and out are required");
    const PoolFor pool(threads);
    gather_run_combine(ex, X, T, tokens, weights, weight_on_input != 0, out, pool.pfor());
  });
}

// The whole SeifMoE operator on caller arrays: moe_cpu (moe.cpp), what ai.seif.SeifMoE runs in
// ONNX Runtime, so the same bits for the same inputs (whatever the thread count). attrs:
// "name=value;..." (parse_attrs). Inputs i < n, n = 17, in the operator's order (spec/ops.md:
// hidden_states, router_weight, router_bias, selection_bias, gate/up/down_proj, their biases,
// the shared experts' six, shared_expert_gate): data[i] (null: absent), dtype code dtypes[i]
// (0 float32, 1 float16, 2 bfloat16), shape shapes[3 i .. 3 i + ranks[i]); the router
// (router_weight with router_bias, shared_expert_gate) may have its own dtype, the experts
// share one. out: [N, H] of hidden_states' dtype. Why: the torch module's routing ops, the
// sort between them and the dtype conversions cost about 1 ms per decode step on 2 cores
// (mostly each small op's setup), a quarter of the experts' own time at T = 1; one call does
// all of it.
SEIF_C_API int seif_moe_forward(const char* attrs, int n, const void* const* data,
                                const int* dtypes, const int64_t* shapes, const int* ranks,
                                void* out, int threads) {
  return guarded([&] {
    using seif::Error;
    if (n != seif::kNumMoEInputs)
      throw Error("seif_moe_forward: expected " + std::to_string(seif::kNumMoEInputs) +
                  " inputs, got " + std::to_string(n));
    if (!data || !dtypes || !shapes || !ranks)
      throw Error("seif_moe_forward: data, dtypes, shapes and ranks are required");
    const seif::Attrs a = parse_attrs(attrs);
    std::vector<seif::TensorArg> in(static_cast<size_t>(n));
    for (int i = 0; i < n; ++i) {
      if (!data[i]) continue;
      if (ranks[i] < 0 || ranks[i] > 3)
        throw Error("seif_moe_forward: input " + std::to_string(i) + " has rank " +
                    std::to_string(ranks[i]) + "; the operator's inputs have 1 to 3 dimensions");
      in[i].data = data[i];
      in[i].dtype = dtype_of(dtypes[i]);
      in[i].shape.assign(shapes + 3 * i, shapes + 3 * i + ranks[i]);
    }
    const seif::TensorArg& x = in[seif::kHidden];  // moe_cpu checks every input's shape
    if (!out && x.present() && x.shape.size() == 2 && x.shape[0] > 0)
      throw Error("seif_moe_forward: out is required");
    const PoolFor pool(threads);
    seif::moe_cpu(a, in.data(), out, in[seif::kHidden].dtype, pool.pfor(), true);
  });
}

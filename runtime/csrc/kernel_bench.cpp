// seif_kernel_bench: the CPU expert kernels alone, without ONNX Runtime or Python, for work on
// the kernels (benchmarks/README.md, "Session 8"). Built on demand:
//
//   cmake --build runtime/build --target seif_kernel_bench   (or `make bench-kernels`)
//
//   seif_kernel_bench gemm M N K f32|bf16 [reps=5] [mib=1024] [threads=1]
//       gemm_nt_keyed of M tokens by N weight rows of length K, in 128-row calls (as the MoE
//       layer's tasks call it; threads share the calls out like the layer does).
//   seif_kernel_bench ffn H I f32|bf16 M1,M2,... [reps=5] [mib=1024] [threads=1]
//       run_ffn_jobs, the MoE layer's expert part (gate/up + SwiGLU, then down), for experts
//       that received M1, M2, ... tokens.
//
// The weights are cycled over copies totalling at least `mib` MiB, so that each repeat reads
// its weights from memory, as a layer of a real model does (the last-level cache of a server
// can hold a whole layer: without copies a repeat would time cache-resident weights; mib=0: one
// copy, for weights in cache). Prints the median and best time, GFLOP/s and GB/s of weights,
// then checks sampled outputs against a float64 reference (exit status 1 when one is off).
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "seif_kernels.h"

namespace {

using seif::DType;

struct Options {
  int reps = 5;
  int64_t mib = 1024;
  int threads = 1;
};

[[noreturn]] void usage(const char* why) {
  std::fprintf(stderr,
               "seif_kernel_bench: %s\n"
               "usage: seif_kernel_bench gemm M N K f32|bf16 [reps=5] [mib=1024] [threads=1]\n"
               "       seif_kernel_bench ffn H I f32|bf16 M1,M2,... [reps=5] [mib=1024] "
               "[threads=1]\n",
               why);
  std::exit(2);
}

int64_t positive(const char* s, const char* what) {
  char* end = nullptr;
  const long long v = std::strtoll(s, &end, 10);
  if (!end || *end || v <= 0) usage((std::string(what) + " must be a positive integer").c_str());
  return v;
}

Options options(int argc, char** argv, int first) {
  Options o;
  for (int i = first; i < argc; ++i) {
    const std::string a = argv[i];
    const size_t eq = a.find('=');
    if (eq == std::string::npos) usage(("unexpected argument " + a).c_str());
    const std::string key = a.substr(0, eq);
    const char* value = argv[i] + eq + 1;
    if (key == "reps") o.reps = static_cast<int>(positive(value, "reps"));
    else if (key == "mib") o.mib = value[0] == '0' && !value[1] ? 0 : positive(value, "mib");
    else if (key == "threads") o.threads = static_cast<int>(positive(value, "threads"));
    else usage(("unknown option " + key).c_str());
  }
  return o;
}

DType dtype_of(const char* s) {
  if (!std::strcmp(s, "f32")) return DType::F32;
  if (!std::strcmp(s, "bf16")) return DType::BF16;
  usage("the weight type is f32 or bf16");
}

// Runs fn(i) for every i < n on `threads` threads, each taking the next undone i.
seif::ParallelFor thread_for(int threads) {
  return [threads](size_t n, const std::function<void(size_t)>& fn) {
    std::atomic<size_t> next{0};
    auto work = [&] {
      for (size_t i; (i = next.fetch_add(1)) < n;) fn(i);
    };
    std::vector<std::thread> pool;
    for (int t = 1; t < threads; ++t) pool.emplace_back(work);
    work();
    for (auto& t : pool) t.join();
  };
}

// Weights of one set, as float32 (the reference's values) and in the benchmark's type.
struct Weights {
  std::vector<float> f;          // values, bfloat16-exact when the type is bf16
  std::vector<char*> copies;     // 64-byte aligned copies in the benchmark's type
  size_t bytes = 0;
  DType type;
  ~Weights() {
    for (char* c : copies) std::free(c);
  }
};

void make_weights(Weights& w, size_t n, DType type, int64_t mib, std::mt19937& rng) {
  std::uniform_real_distribution<float> u(-0.5f, 0.5f);
  w.type = type;
  w.f.resize(n);
  w.bytes = n * seif::dtype_size(type);
  std::vector<char> first(w.bytes);
  for (size_t i = 0; i < n; ++i) {
    float v = u(rng);
    if (type == DType::BF16) {
      const uint16_t h = seif::float_to_bf16(v);
      std::memcpy(first.data() + 2 * i, &h, 2);
      seif::to_float(&h, DType::BF16, 1, &v);
    } else {
      std::memcpy(first.data() + 4 * i, &v, 4);
    }
    w.f[i] = v;
  }
  const size_t want = static_cast<size_t>(mib) << 20;
  const size_t ncopies = std::max<size_t>(1, (want + w.bytes - 1) / w.bytes);
  const size_t alloc = (w.bytes + 4095) / 4096 * 4096;
  for (size_t c = 0; c < ncopies; ++c) {
    char* p = static_cast<char*>(std::aligned_alloc(4096, alloc));
    if (!p) throw std::bad_alloc();
    std::memcpy(p, first.data(), w.bytes);
    w.copies.push_back(p);
  }
}

std::vector<float> random_tokens(size_t n, std::mt19937& rng) {
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> x(n);
  for (auto& v : x) v = u(rng);
  return x;
}

struct Timing {
  double median, best;
};

template <class F>
Timing time_reps(int reps, F run) {
  std::vector<double> t;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    run(r);
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(t.begin(), t.end());
  return {t[t.size() / 2], t[0]};
}

void report(const char* what, double flops, double bytes, const Timing& t) {
  std::printf("%s: median %.3f ms, %.1f GFLOP/s, %.2f GB/s of weights (best %.3f ms)\n", what,
              t.median * 1e3, flops / t.median / 1e9, bytes / t.median / 1e9, t.best * 1e3);
}

// |got - ref| <= tol * scale, scale: the sum of |terms| (float32 sums of float32 products: ~1e-6
// of it; the FFN's down projection also sums SwiGLU values rounded to float32 from such sums).
struct Check {
  double tol;
  int n = 0, bad = 0;
  double worst = 0;
  void add(double got, double ref, double scale) {
    const double err = std::fabs(got - ref) / std::max(scale, 1e-30);
    worst = std::max(worst, err);
    bad += !(err <= tol);
    ++n;
  }
  int finish() const {
    std::printf("check: %d sampled outputs, largest error %.1e of their scale: %s\n", n, worst,
                bad ? "FAILED" : "ok");
    return bad ? 1 : 0;
  }
};

constexpr int64_t kCallRows = 128;  // rows per gemm call, as the layer's tasks (moe.cpp kNB)

int bench_gemm(int argc, char** argv) {
  if (argc < 6) usage("gemm wants M N K and the weight type");
  const int64_t M = positive(argv[2], "M"), N = positive(argv[3], "N"), K = positive(argv[4], "K");
  const DType type = dtype_of(argv[5]);
  const Options o = options(argc, argv, 6);
  std::mt19937 rng(1);
  Weights w;
  make_weights(w, static_cast<size_t>(N * K), type, o.mib, rng);
  const std::vector<float> A = random_tokens(static_cast<size_t>(M * K), rng);
  std::vector<float> C(static_cast<size_t>(M * N));
  const seif::ParallelFor pfor = thread_for(o.threads);
  const int64_t calls = (N + kCallRows - 1) / kCallRows;
  const size_t esz = seif::dtype_size(type);
  uint64_t key = 0;
  const Timing t = time_reps(o.reps, [&](int r) {
    const char* B = w.copies[static_cast<size_t>(r) % w.copies.size()];
    const uint64_t k = ++key;
    pfor(static_cast<size_t>(calls), [&](size_t c) {
      const int64_t n0 = static_cast<int64_t>(c) * kCallRows;
      seif::gemm_nt_keyed(M, 0, std::min(kCallRows, N - n0), K, A.data(), K,
                          B + static_cast<size_t>(n0 * K) * esz, type, K, nullptr,
                          C.data() + n0, N, k);
    });
  });
  char what[160];
  std::snprintf(what, sizeof what, "gemm M=%lld N=%lld K=%lld %s threads=%d (%s, %zu copies)",
                static_cast<long long>(M), static_cast<long long>(N), static_cast<long long>(K),
                argv[5], o.threads, seif::gemm_isa(), w.copies.size());
  report(what, 2.0 * M * N * K, static_cast<double>(w.bytes), t);
  Check check{1e-5};
  std::uniform_int_distribution<int64_t> pick_m(0, M - 1), pick_n(0, N - 1);
  for (int s = 0; s < 64; ++s) {
    const int64_t m = pick_m(rng), n = pick_n(rng);
    double ref = 0, scale = 0;
    for (int64_t k = 0; k < K; ++k) {
      const double p = static_cast<double>(A[m * K + k]) * w.f[static_cast<size_t>(n * K + k)];
      ref += p, scale += std::fabs(p);
    }
    check.add(C[m * N + n], ref, scale);
  }
  return check.finish();
}

std::vector<int64_t> token_counts(const char* s) {
  std::vector<int64_t> out;
  std::string item;
  for (const char* p = s;; ++p) {
    if (*p == ',' || !*p) {
      out.push_back(positive(item.c_str(), "a token count"));
      item.clear();
      if (!*p) break;
    } else {
      item += *p;
    }
  }
  return out;
}

int bench_ffn(int argc, char** argv) {
  if (argc < 6) usage("ffn wants H I, the weight type and the token counts");
  const int64_t H = positive(argv[2], "H"), I = positive(argv[3], "I");
  const DType type = dtype_of(argv[4]);
  const std::vector<int64_t> Ms = token_counts(argv[5]);
  const Options o = options(argc, argv, 6);
  const int64_t E = static_cast<int64_t>(Ms.size());
  int64_t total = 0;
  for (int64_t m : Ms) total += m;
  std::mt19937 rng(1);
  Weights w;  // per expert: gate [I, H], up [I, H], down [H, I]
  const size_t per_expert = static_cast<size_t>(3 * I * H);
  make_weights(w, per_expert * static_cast<size_t>(E), type, o.mib, rng);
  const std::vector<float> X = random_tokens(static_cast<size_t>(total * H), rng);
  std::vector<float> Hbuf(static_cast<size_t>(total * I)), Y(static_cast<size_t>(total * H));
  const size_t esz = seif::dtype_size(type);
  const seif::ParallelFor pfor = thread_for(o.threads);
  seif::Attrs attrs;  // SwiGLU
  auto jobs_for = [&](const char* base) {
    std::vector<seif::FfnJob> jobs;
    int64_t row = 0;
    for (int64_t e = 0; e < E; ++e) {
      seif::FfnJob j;
      const char* p = base + static_cast<size_t>(e) * per_expert * esz;
      j.w.gate = p;
      j.w.up = p + static_cast<size_t>(I * H) * esz;
      j.w.down = p + static_cast<size_t>(2 * I * H) * esz;
      j.I = I, j.M = Ms[static_cast<size_t>(e)];
      j.X = X.data() + row * H, j.Hbuf = Hbuf.data() + row * I, j.Y = Y.data() + row * H;
      row += j.M;
      jobs.push_back(j);
    }
    return jobs;
  };
  const Timing t = time_reps(o.reps, [&](int r) {
    seif::run_ffn_jobs(jobs_for(w.copies[static_cast<size_t>(r) % w.copies.size()]), H, type,
                       attrs, pfor);
  });
  char what[200];
  std::snprintf(what, sizeof what, "ffn H=%lld I=%lld %s experts=%lld tokens=%lld threads=%d (%s)",
                static_cast<long long>(H), static_cast<long long>(I), argv[4],
                static_cast<long long>(E), static_cast<long long>(total), o.threads,
                seif::gemm_isa());
  report(what, 6.0 * total * H * I, static_cast<double>(w.bytes), t);
  // Reference: the first token of the first and the last expert, 16 outputs each.
  Check check{1e-4};
  for (int64_t e : {int64_t{0}, E - 1}) {
    int64_t row = 0;
    for (int64_t i = 0; i < e; ++i) row += Ms[static_cast<size_t>(i)];
    const float* x = X.data() + row * H;
    const size_t base = static_cast<size_t>(e) * per_expert;
    std::vector<double> act(static_cast<size_t>(I));
    for (int64_t i = 0; i < I; ++i) {
      double g = 0, u = 0;
      for (int64_t h = 0; h < H; ++h) {
        g += static_cast<double>(x[h]) * w.f[base + static_cast<size_t>(i * H + h)];
        u += static_cast<double>(x[h]) * w.f[base + static_cast<size_t>((I + i) * H + h)];
      }
      act[static_cast<size_t>(i)] = g / (1.0 + std::exp(-g)) * u;
    }
    for (int64_t h = 0; h < std::min<int64_t>(H, 16); ++h) {
      double ref = 0, scale = 0;
      for (int64_t i = 0; i < I; ++i) {
        const double p =
            act[static_cast<size_t>(i)] * w.f[base + static_cast<size_t>(2 * I * H + h * I + i)];
        ref += p, scale += std::fabs(p);
      }
      check.add(Y[static_cast<size_t>(row * H + h)], ref, scale);
    }
  }
  return check.finish();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) usage("name a mode: gemm or ffn");
  try {
    if (!std::strcmp(argv[1], "gemm")) return bench_gemm(argc, argv);
    if (!std::strcmp(argv[1], "ffn")) return bench_ffn(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "seif_kernel_bench: %s\n", e.what());
    return 1;
  }
  usage("the mode is gemm or ffn");
}

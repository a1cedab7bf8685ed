// seif_cuda_selftest: the CUDA kernels against the CPU kernels (which tests/test_native_ops.py
// checks against the NumPy reference), on a GPU machine without onnxruntime-gpu.
//   cmake --build runtime/build --target seif_cuda_selftest && runtime/build/seif_cuda_selftest
// Exit status 0 when every case matches (indices and kept exactly, weights within 1e-5).
#include <cuda_runtime.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <algorithm>
#include <random>
#include <string>
#include <vector>

#include "seif_cuda.h"
#include "seif_kernels.h"

using namespace seif;

namespace {

#define CK(x)                                                                      \
  do {                                                                             \
    cudaError_t e_ = (x);                                                          \
    if (e_ != cudaSuccess) {                                                       \
      std::fprintf(stderr, "%s: %s\n", #x, cudaGetErrorString(e_));                \
      std::exit(2);                                                                \
    }                                                                              \
  } while (0)

struct Case {
  std::string name;
  Attrs a;
  int64_t E;
  bool bias;
};

std::vector<Case> cases() {
  std::vector<Case> cs;
  auto add = [&](const char* name, int64_t E, bool bias, auto set) {
    Case c{name, Attrs{}, E, bias};
    set(c.a);
    cs.push_back(c);
  };
  add("topk_softmax", 16, false, [](Attrs& a) { a.top_k = 2; });
  add("topk_softmax_sum", 8, false, [](Attrs& a) { a.top_k = 2; a.normalize = Normalize::Sum; });
  add("topk_sigmoid_bias", 64, true, [](Attrs& a) {
    a.top_k = 6; a.scoring = Scoring::Sigmoid; a.normalize = Normalize::Sum;
    a.epsilon = 1e-20f; a.scale = 2.5f; });
  add("softmax_topk", 32, false, [](Attrs& a) { a.top_k = 4; a.scoring = Scoring::SoftmaxTopK; });
  add("sigmoid_topk", 16, false, [](Attrs& a) { a.top_k = 1; a.scoring = Scoring::SigmoidTopK; });
  add("lp", 16, false, [](Attrs& a) { a.top_k = 3; a.normalize = Normalize::Lp; a.norm_p = 2.0f; });
  add("clamp", 16, false, [](Attrs& a) {
    a.top_k = 2; a.scoring = Scoring::Sigmoid; a.normalize = Normalize::Sum; a.epsilon = 0.5f;
    a.epsilon_rule = EpsRule::Clamp; });
  add("group_max", 16, false, [](Attrs& a) {
    a.kind = Kind::GroupTopK; a.top_k = 2; a.n_group = 4; a.topk_group = 2; });
  add("group_v3_256", 256, true, [](Attrs& a) {
    a.kind = Kind::GroupTopK; a.top_k = 8; a.scoring = Scoring::Sigmoid;
    a.normalize = Normalize::Sum; a.epsilon = 1e-20f; a.scale = 2.5f; a.n_group = 8;
    a.topk_group = 4; a.group_score = GroupScore::Top2Sum; });
  add("group_zero", 16, true, [](Attrs& a) {
    a.kind = Kind::GroupTopK; a.top_k = 4; a.scoring = Scoring::Sigmoid; a.n_group = 4;
    a.topk_group = 2; a.group_score = GroupScore::Top2Sum; a.group_mask = GroupMask::Zero; });
  add("sparse_mixer", 16, false, [](Attrs& a) {
    a.kind = Kind::SparseMixer; a.top_k = 2; a.jitter_eps = 0.01f; });
  add("sparse_mixer_wide", 16, false, [](Attrs& a) {
    a.kind = Kind::SparseMixer; a.top_k = 2; a.jitter_eps = 0.5f; });
  add("capacity_tokens", 16, false, [](Attrs& a) {
    a.top_k = 2; a.normalize = Normalize::Sum; a.capacity_tokens = 3; });
  add("capacity_factor", 64, false, [](Attrs& a) { a.top_k = 8; a.capacity_factor = 1.0f; });
  add("wide_512", 512, false, [](Attrs& a) { a.top_k = 10; a.normalize = Normalize::Sum; });
  return cs;
}

// Logits with the awkward rows first: NaN, all-NaN, +-inf, all equal, +-0, integer ties.
std::vector<float> make_logits(int64_t T, int64_t E, uint32_t seed) {
  std::mt19937 g(seed);
  std::normal_distribution<float> n(0.0f, 1.0f);
  std::vector<float> z(static_cast<size_t>(T * E));
  for (auto& v : z) v = n(g);
  auto row = [&](int64_t t) { return z.data() + t * E; };
  if (T > 8) {
    row(0)[E / 3] = NAN;
    for (int64_t e = 0; e < E; ++e) row(1)[e] = NAN;
    row(2)[1] = INFINITY;
    for (int64_t e = 0; e < E; ++e) row(3)[e] = -INFINITY;
    for (int64_t e = 0; e < E; ++e) row(4)[e] = 0.25f;
    for (int64_t e = 0; e < E; ++e) row(5)[e] = (e % 2) ? 0.0f : -0.0f;
    for (int64_t e = 0; e < E; ++e) row(6)[e] = std::round(row(6)[e] * 2);
    row(7)[E - 1] = -INFINITY;
  }
  return z;
}

template <typename F>
double time_ms(F&& f, int reps) {
  CK(cudaDeviceSynchronize());
  auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < reps; ++i) f();
  CK(cudaDeviceSynchronize());
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() /
         reps;
}

}  // namespace

int main() {
  int failures = 0, checked = 0;
  cudaStream_t stream;
  CK(cudaStreamCreate(&stream));
  for (const Case& c : cases()) {
    for (int64_t T : {int64_t{0}, int64_t{1}, int64_t{37}, int64_t{5000}}) {
      for (DType dt : {DType::F32, DType::F16, DType::BF16}) {
        const int64_t E = c.E, k = c.a.top_k;
        std::vector<float> z = make_logits(T, E, static_cast<uint32_t>(T * 31 + E));
        // The device gets dtype dt; the CPU routes the same rounded values in float32.
        std::vector<uint16_t> half(z.size());
        if (dt != DType::F32) {
          from_float(z.data(), z.size(), dt, half.data());
          to_float(half.data(), dt, z.size(), z.data());
        }
        std::vector<float> bias;
        if (c.bias) {
          std::mt19937 g(7);
          std::normal_distribution<float> n(0.0f, 0.1f);
          for (int64_t e = 0; e < E; ++e) bias.push_back(n(g));
        }
        const size_t nk = static_cast<size_t>(T * k);
        std::vector<int64_t> idx(nk + 1);
        std::vector<float> w(nk + 1);
        std::unique_ptr<bool[]> kept(new bool[nk + 1]);
        route_cpu(z.data(), T, E, c.bias ? bias.data() : nullptr, c.a, idx.data(), w.data(),
                  kept.get(), serial_for());

        void* dz = nullptr;
        float* db = nullptr;
        int64_t* didx = nullptr;
        float* dw = nullptr;
        bool* dkept = nullptr;
        const size_t zbytes = z.size() * dtype_size(dt);
        CK(cudaMalloc(&dz, zbytes + 4));
        CK(cudaMemcpy(dz, dt == DType::F32 ? static_cast<const void*>(z.data()) : half.data(),
                      zbytes, cudaMemcpyHostToDevice));
        if (c.bias) {
          CK(cudaMalloc(&db, bias.size() * 4));
          CK(cudaMemcpy(db, bias.data(), bias.size() * 4, cudaMemcpyHostToDevice));
        }
        CK(cudaMalloc(&didx, (nk + 1) * 8));
        CK(cudaMalloc(&dw, (nk + 1) * 4));
        CK(cudaMalloc(&dkept, nk + 1));
        std::string err = cuda::route(dz, dt, T, E, db, c.a, didx, dw, dkept, stream);
        CK(cudaStreamSynchronize(stream));
        std::vector<int64_t> gidx(nk + 1);
        std::vector<float> gw(nk + 1);
        std::unique_ptr<bool[]> gkept(new bool[nk + 1]);
        CK(cudaMemcpy(gidx.data(), didx, nk * 8, cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(gw.data(), dw, nk * 4, cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(gkept.get(), dkept, nk, cudaMemcpyDeviceToHost));
        int bad = 0;
        double maxdiff = 0;
        for (size_t i = 0; i < nk; ++i) {
          if (gidx[i] != idx[i] || gkept[i] != kept[i]) ++bad;
          const bool bn = std::isnan(w[i]), gn = std::isnan(gw[i]);
          if (bn != gn) {
            ++bad;
          } else if (!bn) {
            const double d = std::fabs(double(w[i]) - gw[i]);
            maxdiff = std::max(maxdiff, d);
            if (d > 1e-5 * std::max(1.0, std::fabs(double(w[i])))) ++bad;
          }
        }
        ++checked;
        if (!err.empty() || bad) {
          ++failures;
          std::printf("FAIL %-18s T=%-5lld %-8s mismatches=%d maxdiff=%.2e %s\n", c.name.c_str(),
                      static_cast<long long>(T), dtype_name(dt), bad, maxdiff, err.c_str());
        } else if (T == 5000 && dt == DType::F32) {
          const double ms = time_ms([&] {
            cuda::route(dz, dt, T, E, db, c.a, didx, dw, dkept, stream);
          }, 20);
          std::printf("ok   %-18s E=%-4lld k=%-2lld maxdiff=%.1e  T=5000: %.3f ms\n",
                      c.name.c_str(), static_cast<long long>(E), static_cast<long long>(k),
                      maxdiff, ms);
        }
        cudaFree(dz);
        cudaFree(db);
        cudaFree(didx);
        cudaFree(dw);
        cudaFree(dkept);
      }
    }
  }
  std::printf("%d of %d cases match the CPU kernel\n", checked - failures, checked);
  return failures ? 1 : 0;
}

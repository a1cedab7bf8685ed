// Run-time choice between the AVX-512, AVX2 and baseline GEMM kernels (CPUID): float32 and
// bfloat16 weights go to the AVX-512 kernel where the CPU has AVX-512F/BW, float16 weights to the
// AVX2 one (F16C), everything else to the baseline build. SEIF_GEMM_ISA=avx2 or generic (read
// once) caps the choice, so the fallbacks can be tested on a machine that has AVX-512.
#include <cstdlib>
#include <cstring>

#include "seif_kernels.h"

namespace seif {
namespace generic {
void gemm_nt(int64_t, int64_t, int64_t, int64_t, const float*, int64_t, const void*, DType,
             int64_t, const void*, float*, int64_t);
}
#if defined(SEIF_HAVE_AVX2_GEMM)
namespace avx2 {
void gemm_nt(int64_t, int64_t, int64_t, int64_t, const float*, int64_t, const void*, DType,
             int64_t, const void*, float*, int64_t);
}
#endif
#if defined(SEIF_HAVE_AVX512_GEMM)
namespace avx512 {
void gemm_nt(int64_t, int64_t, int64_t, int64_t, const float*, int64_t, const void*, DType,
             int64_t, const void*, float*, int64_t, uint64_t);
void swiglu(const float*, const float*, float*, int64_t);
}
#endif

namespace {
// 2: any kernel, 1: AVX2 at most, 0: the baseline build only (SEIF_GEMM_ISA).
int isa_cap() {
  static const int cap = [] {
    const char* v = std::getenv("SEIF_GEMM_ISA");
    if (!v || !*v || std::strcmp(v, "avx512") == 0) return 2;
    if (std::strcmp(v, "avx2") == 0) return 1;
    if (std::strcmp(v, "generic") == 0) return 0;
    throw Error(std::string("SEIF_GEMM_ISA must be avx512, avx2 or generic, got '") + v + "'");
  }();
  return cap;
}
bool use_avx2() {
  if (isa_cap() < 1) return false;
#if defined(SEIF_HAVE_AVX2_GEMM) && (defined(__x86_64__) || defined(__i386__))
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
  }();
  return ok;
#else
  return false;
#endif
}
bool use_avx512() {
  if (isa_cap() < 2) return false;
#if defined(SEIF_HAVE_AVX512_GEMM) && (defined(__x86_64__) || defined(__i386__))
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("fma");
  }();
  return ok;
#else
  return false;
#endif
}
}  // namespace

const char* gemm_isa() {
  if (use_avx512()) return use_avx2() ? "avx512,f16:avx2" : "avx512,f16:generic";
  return use_avx2() ? "avx2" : "generic";
}

void gemm_nt(int64_t M, int64_t n0, int64_t n1, int64_t K, const float* A, int64_t lda,
             const void* B, DType bt, int64_t ldb, const void* bias, float* C, int64_t ldc) {
  gemm_nt_keyed(M, n0, n1, K, A, lda, B, bt, ldb, bias, C, ldc, 0);
}

void gemm_nt_keyed(int64_t M, int64_t n0, int64_t n1, int64_t K, const float* A, int64_t lda,
                   const void* B, DType bt, int64_t ldb, const void* bias, float* C,
                   int64_t ldc, uint64_t a_key) {
  if (M <= 0 || n1 <= n0) return;
#if defined(SEIF_HAVE_AVX512_GEMM)
  if (bt != DType::F16 && use_avx512())
    return avx512::gemm_nt(M, n0, n1, K, A, lda, B, bt, ldb, bias, C, ldc, a_key);
#endif
#if defined(SEIF_HAVE_AVX2_GEMM)
  if (use_avx2()) return avx2::gemm_nt(M, n0, n1, K, A, lda, B, bt, ldb, bias, C, ldc);
#endif
  generic::gemm_nt(M, n0, n1, K, A, lda, B, bt, ldb, bias, C, ldc);
}

bool swiglu_f64(const float* gate, const float* up, float* h, int64_t n) {
#if defined(SEIF_HAVE_AVX512_GEMM)
  if (use_avx512()) {
    avx512::swiglu(gate, up, h, n);
    return true;
  }
#endif
  return false;
}

}  // namespace seif

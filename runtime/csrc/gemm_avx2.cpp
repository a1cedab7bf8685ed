// AVX2 + FMA + F16C build of the GEMM kernel (compiled with -mavx2 -mfma -mf16c; used only
// when the CPU has them, see gemm.cpp).
#define SEIF_GEMM_NS avx2
#include "gemm_impl.inc"

// Baseline x86-64 (or any target) build of the GEMM kernel.
#define SEIF_GEMM_NS generic
#include "gemm_impl.inc"

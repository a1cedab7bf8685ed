// AVX-512 GEMM kernel C = A B^T (+ bias) for float32 and bfloat16 weights (compiled with
// -mavx512f -mavx512bw -mfma; used only when the CPU has them, see gemm.cpp, which sends float16
// weights to the AVX2 kernel).
//
// Three forms, chosen by the number of tokens M and the weight type (phase_min_m, outer_min_m),
// never by the thread count:
//
// Dot-product form (fewer than phase_min_m tokens): A (tokens [M, K], float32) and B (weights
// [N, K], the torch layout) are both read along K, so the weights are never packed or
// transposed and every weight byte is read from memory once per block of kMC tokens. A
// register tile of MR x NR accumulators of 16 lanes runs along K. Numerics: lane l of an
// accumulator adds its products in increasing k (float32: the k = l mod 16; bfloat16: the
// k = 2l and 2l + 1 mod 32), the 16 lanes are added in one fixed tree at the end, then the bias.
// Partial accumulators of a K block are kept whole (16 lanes) between blocks, so the result does
// not depend on the blocking or on the thread count.
//
// Blocking: up to kStreamM tokens, no K blocking (each weight row streams once, front to back);
// above (bfloat16 only: float32 takes the phase form from kPhaseMinMF32 = kStreamM tokens), K
// blocks of kKC so that the A block (kMC x kKC floats, L2) is reused by every NR-row weight
// panel (NR x kKC, read in place), partial sums in a per-thread buffer. While the token tiles
// run over one weight panel, the next one is prefetched into L2.
// Each 16-lane FMA of this form reads two full vectors, so with the token rows coming from L2 it
// reached only ~110 GFLOP/s per core (~190 on L1-resident data).
//
// Phase form (phase_min_m <= M < outer_min_m: float32 8-40 tokens, bfloat16 16-47): see
// gemm_phase. A vector holds 4 tokens x 4 consecutive k, so each weight row's 4 k are one
// broadcast load from the torch-layout row; every output is four float32 sums, one per k mod 4,
// added in a fixed order at the end.
//
// Outer-product form (M >= outer_min_m): tokens are packed k-major in blocks of up to 64 (4
// vectors, 32 KiB per K block of 128: L1; see outer_block), weights are broadcast one element
// at a time from their torch-layout rows (bfloat16 rows are first widened exactly, 6 rows x
// 128 k at a time, into an L1 buffer), 6 rows x 64 tokens of accumulators; each output is a
// plain float32 sum over k in increasing order (one FMA per k), then the bias. Measured
// 1.25-1.5x the dot form from 48 tokens on. The last 1-7 tokens past a multiple of 16 take the
// dot form (a vector of 16 token lanes would hold mostly zeros), so which form a token gets
// also depends on its place in the block. The tokens' packed forms are prepared once per call,
// or once per thread for all the calls that pass the same key (gemm_nt_keyed, PreparedTokens).
//
// The three forms add a token's products in different orders, so its result can differ in the
// last bits between experts that received a number of tokens in different forms' ranges (all
// deterministic; within a form's range it does not depend on the count).
//
// bfloat16 weights: one 64-byte load holds 32 weights; a shift and a mask turn it into the
// float32 weights of the even and the odd k, with no shuffle. The tokens of each K block are
// packed once into the matching even/odd order (kMC x kKC floats).
// GCC 12 flags the _mm512_undefined_ps() inside its own shuffle intrinsics as maybe-uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <new>

#include "seif_kernels.h"

namespace seif {
namespace avx512 {

namespace {

constexpr int64_t kMC = 64;      // tokens per block
constexpr int64_t kNC = 64;      // weight rows per block
constexpr int64_t kKC = 512;     // K per block (a multiple of 32)
constexpr int64_t kStreamM = 8;  // up to this many tokens per block: K is not blocked
// From this many tokens on: the outer-product form below. Measured on M x 1408 x 2048, one core:
// bfloat16 weights 1.1x the dot form at 40, 1.15-1.25x at 64, 1.25-1.35x at 256. float32
// weights: 1.3x at 48, 1.4x at 256. Below these counts the phase form beats it (seif_kernel_bench
// gemm M 11264 2048, weights from memory, phase against outer form; one core / both cores):
// float32 1.08-1.12x / 1.09x at 40, 0.96-1.02x at 44, 0.91x on both cores at 42; bfloat16
// 1.13-1.18x / 1.08x at 40, 1.15-1.17x / 1.03x at 44, 1.02x on both cores at 46, 1.0x on one at
// 47. (Before the phase form's K blocks of session 7 the float32 crossing was at ~40.)
constexpr int64_t kOuterMinMF32 = 41;
constexpr int64_t kOuterMinMBf16 = 48;
inline int64_t outer_min_m(bool bf16) { return bf16 ? kOuterMinMBf16 : kOuterMinMF32; }
// From this many tokens on (up to outer_min_m): the phase form. bfloat16 weights below 16 stay
// with the dot form, whose rows need no widening: 1.15x the phase form at 8, within +-12%
// either way at 10-14, and even on the mixtral layer (T=48, 64) with the phase form from 10 or 12.
constexpr int64_t kPhaseMinMF32 = 8;
constexpr int64_t kPhaseMinMBf16 = 16;
inline int64_t phase_min_m(bool bf16) { return bf16 ? kPhaseMinMBf16 : kPhaseMinMF32; }
constexpr int64_t kOuterTailMax = 7;  // see gemm(): tokens past a multiple of 16 for the dot form

// Sum of the 16 lanes in a fixed order: halves, quarters, pairs, then the last two.
inline float hsum16(__m512 v) {
  const __m512 s8 = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, 0x4E));     // i + (i + 8)
  const __m512 s4 = _mm512_add_ps(s8, _mm512_shuffle_f32x4(s8, s8, 0xB1));  // i + (i + 4)
  const __m512 s2 = _mm512_add_ps(s4, _mm512_permute_ps(s4, 0x4E));          // i + (i + 2)
  const __m512 s1 = _mm512_add_ps(s2, _mm512_permute_ps(s2, 0xB1));          // 0 + 1
  return _mm512_cvtss_f32(s1);
}

struct TileArgs {
  const float* A;      // first token row (bfloat16 weights: the packed even/odd rows)
  int64_t lda;
  const void* B;       // first weight row of the tile, at the block's first k
  int64_t ldb;
  int64_t kc;          // K elements in this block
  float* S;            // partial sums, S[(i * kNC + j) * 16 .. + 16)
  bool first, last;    // first / last K block
  float* C;
  int64_t ldc;
  const float* bias;   // float32 bias of the tile's columns, or null
  const char* pf;      // weight rows to prefetch (into L2), one 64-byte line per row per step
  int64_t pf_ld;       // their stride in bytes
  int pf_rows;         // how many (0: none)
};

inline void prefetch_step(const TileArgs& t, int64_t byte_off) {
  for (int r = 0; r < t.pf_rows; ++r)
    _mm_prefetch(t.pf + r * t.pf_ld + byte_off, _MM_HINT_T1);
}

template <int MR, int NR>
inline void start(__m512 (&acc)[MR][NR], const TileArgs& t) {
  _Pragma("GCC unroll 16") for (int i = 0; i < MR; ++i)
    _Pragma("GCC unroll 16") for (int j = 0; j < NR; ++j)
      acc[i][j] = t.first ? _mm512_setzero_ps() : _mm512_loadu_ps(t.S + (i * kNC + j) * 16);
}

template <int MR, int NR>
inline void finish(__m512 (&acc)[MR][NR], const TileArgs& t) {
  if (!t.last) {
    _Pragma("GCC unroll 16") for (int i = 0; i < MR; ++i)
      _Pragma("GCC unroll 16") for (int j = 0; j < NR; ++j) _mm512_storeu_ps(t.S + (i * kNC + j) * 16, acc[i][j]);
    return;
  }
  _Pragma("GCC unroll 16") for (int i = 0; i < MR; ++i)
    _Pragma("GCC unroll 16") for (int j = 0; j < NR; ++j) {
      float s = hsum16(acc[i][j]);
      if (t.bias) s += t.bias[j];
      t.C[i * t.ldc + j] = s;
    }
}

// float32 weights: 16 k per step.
template <int MR, int NR>
void tile_f32(const TileArgs& t) {
  __m512 acc[MR][NR];
  start(acc, t);
  const float* A = t.A;
  const float* B = static_cast<const float*>(t.B);
  int64_t k = 0;
  for (; k + 16 <= t.kc; k += 16) {
    prefetch_step(t, k * 4);
    __m512 a[MR];
    _Pragma("GCC unroll 16") for (int i = 0; i < MR; ++i) a[i] = _mm512_loadu_ps(A + i * t.lda + k);
    _Pragma("GCC unroll 16") for (int j = 0; j < NR; ++j) {
      __m512 b = _mm512_loadu_ps(B + j * t.ldb + k);
      __asm__("" : "+v"(b));  // one load into a register, not one memory operand per FMA
      _Pragma("GCC unroll 16") for (int i = 0; i < MR; ++i) acc[i][j] = _mm512_fmadd_ps(a[i], b, acc[i][j]);
    }
  }
  if (k < t.kc) {  // zeros in both operands past the end: the products add +0
    const __mmask16 m = static_cast<__mmask16>((1u << (t.kc - k)) - 1u);
    __m512 a[MR];
    _Pragma("GCC unroll 16") for (int i = 0; i < MR; ++i) a[i] = _mm512_maskz_loadu_ps(m, A + i * t.lda + k);
    _Pragma("GCC unroll 16") for (int j = 0; j < NR; ++j) {
      const __m512 b = _mm512_maskz_loadu_ps(m, B + j * t.ldb + k);
      _Pragma("GCC unroll 16") for (int i = 0; i < MR; ++i) acc[i][j] = _mm512_fmadd_ps(a[i], b, acc[i][j]);
    }
  }
  finish(acc, t);
}

// bfloat16 weights: 32 k per step; A is packed (per 32 k: the 16 even ones, then the 16 odd
// ones, zero past the end, rows padded to a multiple of 32).
template <int MR, int NR>
void tile_bf16(const TileArgs& t) {
  __m512 acc[MR][NR];
  start(acc, t);
  const float* A = t.A;
  const uint16_t* B = static_cast<const uint16_t*>(t.B);
  const __m512i hi_mask = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  auto step = [&](int64_t k, __mmask32 m, bool masked) {
    __m512 ae[MR], ao[MR];
    _Pragma("GCC unroll 16") for (int i = 0; i < MR; ++i) {
      ae[i] = _mm512_loadu_ps(A + i * t.lda + k);
      ao[i] = _mm512_loadu_ps(A + i * t.lda + k + 16);
    }
    _Pragma("GCC unroll 16") for (int j = 0; j < NR; ++j) {
      __m512i x = masked ? _mm512_maskz_loadu_epi16(m, B + j * t.ldb + k)
                         : _mm512_loadu_si512(B + j * t.ldb + k);
      __asm__("" : "+v"(x));  // one load, not one per use
      const __m512 be = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
      const __m512 bo = _mm512_castsi512_ps(_mm512_and_si512(x, hi_mask));
      _Pragma("GCC unroll 16") for (int i = 0; i < MR; ++i) {
        acc[i][j] = _mm512_fmadd_ps(ae[i], be, acc[i][j]);
        acc[i][j] = _mm512_fmadd_ps(ao[i], bo, acc[i][j]);
      }
    }
  };
  int64_t k = 0;
  for (; k + 32 <= t.kc; k += 32) {
    prefetch_step(t, k * 2);
    step(k, 0, false);
  }
  if (k < t.kc) step(k, static_cast<__mmask32>((1ull << (t.kc - k)) - 1ull), true);
  finish(acc, t);
}

// Rows [0, mb) of A, k in [k0, k0 + kc), into P (row stride ldp >= kc rounded up to 32) in the
// even/odd order of tile_bf16, zeros up to the multiple of 32.
void pack_even_odd(const float* A, int64_t lda, int64_t mb, int64_t k0, int64_t kc, float* P,
                   int64_t ldp) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  for (int64_t i = 0; i < mb; ++i) {
    const float* a = A + i * lda + k0;
    float* p = P + i * ldp;
    for (int64_t q = 0; q < kc; q += 32) {
      const int64_t n = std::max<int64_t>(0, std::min<int64_t>(32, kc - q));
      const __mmask16 m0 = static_cast<__mmask16>((1u << std::min<int64_t>(16, n)) - 1u);
      const __mmask16 m1 =
          static_cast<__mmask16>((1u << std::max<int64_t>(0, n - 16)) - 1u);
      const __m512 lo = _mm512_maskz_loadu_ps(m0, a + q);
      const __m512 hi = _mm512_maskz_loadu_ps(m1, a + q + 16);
      _mm512_storeu_ps(p + q, _mm512_permutex2var_ps(lo, even, hi));
      _mm512_storeu_ps(p + q + 16, _mm512_permutex2var_ps(lo, odd, hi));
    }
  }
}

// A per-thread float buffer on 64-byte boundaries (a 64-byte load that straddles two cache
// lines costs two), grown on demand.
class Buffer {
 public:
  ~Buffer() { std::free(p_); }
  float* get(int64_t n) {
    if (n > n_) {
      std::free(p_);
      p_ = static_cast<float*>(std::aligned_alloc(64, static_cast<size_t>((n + 15) / 16 * 64)));
      if (!p_) throw std::bad_alloc();
      n_ = n;
    }
    return p_;
  }

 private:
  float* p_ = nullptr;
  int64_t n_ = 0;
};

using TileFn = void (*)(const TileArgs&);

template <int MR>
TileFn f32_for(int nr) {
  switch (nr) {
    case 8: return tile_f32<MR, 8>;
    case 4: return tile_f32<MR, 4>;
    case 2: return tile_f32<MR, 2>;
    default: return tile_f32<MR, 1>;
  }
}

template <int MR>
TileFn bf16_for(int nr) {
  switch (nr) {
    case 4: return tile_bf16<MR, 4>;
    case 2: return tile_bf16<MR, 2>;
    default: return tile_bf16<MR, 1>;
  }
}

TileFn tile_fn(bool bf16, int mr, int nr) {
  if (bf16) {
    switch (mr) {
      case 4: return bf16_for<4>(nr);
      case 3: return bf16_for<3>(nr);
      case 2: return bf16_for<2>(nr);
      default: return bf16_for<1>(nr);
    }
  }
  switch (mr) {
    case 3: return f32_for<3>(nr);
    case 2: return f32_for<2>(nr);
    default: return f32_for<1>(nr);
  }
}

// The widest tile width <= left: the largest, then halves.
inline int tile_width(int64_t left, int widest) {
  int nr = widest;
  while (nr > left) nr /= 2;
  return nr;
}

// ----------------------------------------------------------------------------- outer form
// float32 weights, many tokens: C^T tiles of kOR weight rows x 64 tokens in registers. Per k,
// four 16-token vectors of the packed token block are multiplied by one broadcast weight per
// row, so each weight element is read once per 64 tokens (4 bytes per 16-lane FMA) and the
// token block (kOKC x 64 floats, packed k-major) stays in L1. Each output is one float32 sum
// over k in increasing order (one FMA per k), carried across K blocks in a per-thread buffer,
// then the bias. The order does not depend on the blocking or the thread count.
constexpr int64_t kOMB = 64;    // tokens per block (4 vectors)
constexpr int64_t kOKC = 128;   // K per block: the packed block is 32 KiB
constexpr int kOR = 6;          // weight rows per register tile

// Token block mbk of M tokens (its first token m0 and count mb): blocks of 4 vectors (64
// tokens), except that where the last block would be one vector, the block before it gives it
// one (... 4 + 3 + 2 instead of 4 + 4 + 1). A 1-vector tile has 6 FMA chains, fewer than the
// 8 that two FMA ports with 4 cycles of latency need, and 7 loads per 6 FMAs. Measured on
// M x 11264 x 2048, one core, weights from memory, alternating: float32 1.05-1.09x at 72-85
// tokens, 1.04-1.05x at 137-144, 1.02-1.04x at 208-272; bfloat16 1.06-1.08x at 72-80, 1.04x at
// 144. Same bits: an output's sum does not depend on which block holds its token.
inline int64_t outer_blocks(int64_t M) { return (M + kOMB - 1) / kOMB; }
inline void outer_block(int64_t M, int64_t mbk, int64_t& m0, int64_t& mb) {
  const int64_t vectors = (M + 15) / 16, blocks = outer_blocks(M);
  const bool three_two = vectors % 4 == 1 && blocks >= 2;
  m0 = mbk * kOMB - (three_two && mbk == blocks - 1 ? 16 : 0);
  const int64_t end = three_two && mbk == blocks - 2 ? m0 + kOMB - 16 : m0 + kOMB;
  mb = std::min(end, M) - m0;
}

// 16 x 16 transpose in registers.
inline void transpose16(__m512 (&r)[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int h = 0; h < 2; ++h)
    for (int i = 0; i < 4; ++i) {
      t[8 * h + i] = _mm512_shuffle_f32x4(r[8 * h + i], r[8 * h + 4 + i], 0x88);
      t[8 * h + 4 + i] = _mm512_shuffle_f32x4(r[8 * h + i], r[8 * h + 4 + i], 0xDD);
    }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0x88);
    r[8 + i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0xDD);
  }
}

// Tokens [0, mb) x k [k0, k0 + kc) of A into P[k * 64 + i], tokens mb..63 zero (kc <= kOKC).
void pack_tokens(const float* A, int64_t lda, int64_t mb, int64_t k0, int64_t kc, float* P) {
  const int64_t nv = (mb + 15) / 16;
  for (int64_t v = 0; v < nv; ++v)
    for (int64_t k = 0; k < kc; k += 16) {
      const int64_t kn = std::min<int64_t>(16, kc - k);
      const __mmask16 km = static_cast<__mmask16>((1u << kn) - 1u);
      __m512 r[16];
      for (int i = 0; i < 16; ++i) {
        const int64_t m = v * 16 + i;
        r[i] = m < mb ? _mm512_maskz_loadu_ps(km, A + m * lda + k0 + k) : _mm512_setzero_ps();
      }
      transpose16(r);
      for (int64_t kk = 0; kk < kn; ++kk) _mm512_store_ps(P + (k + kk) * kOMB + v * 16, r[kk]);
    }
}

struct OuterArgs {
  const float* P;      // packed tokens of the block
  const float* B;      // first weight row of the tile at the block's first k
  int64_t ldb;
  int64_t kc;
  float* S;            // partial sums of the tile: S[r * 64 + token]
  bool first, last;
  float* C;            // C[token * ldc + row] (last block only)
  int64_t ldc;
  int64_t mb;          // valid tokens
  const float* bias;   // of the tile's rows, or null
  const char* pf;      // next tile's weight rows (prefetched into L2), or null
  int64_t pf_ld;       // their stride in bytes
  int64_t pf_step;     // bytes of a row per 16 k
  int pf_rows;
};

template <int NR, int NV>
void outer_tile(const OuterArgs& t) {
  __m512 acc[NR][NV];
  _Pragma("GCC unroll 8") for (int r = 0; r < NR; ++r)
    _Pragma("GCC unroll 4") for (int v = 0; v < NV; ++v)
      acc[r][v] = t.first ? _mm512_setzero_ps() : _mm512_load_ps(t.S + r * kOMB + v * 16);
  const float* P = t.P;
  const float* B = t.B;
  for (int64_t k0 = 0; k0 < t.kc; k0 += 16) {
    for (int r = 0; r < t.pf_rows; ++r)  // one line of each of the next tile's rows
      _mm_prefetch(t.pf + r * t.pf_ld + k0 / 16 * t.pf_step, _MM_HINT_T1);
    const int64_t k1 = std::min<int64_t>(k0 + 16, t.kc);
    for (int64_t k = k0; k < k1; ++k) {
      __m512 a[NV];
      _Pragma("GCC unroll 4") for (int v = 0; v < NV; ++v) a[v] = _mm512_load_ps(P + k * kOMB + v * 16);
      _Pragma("GCC unroll 8") for (int r = 0; r < NR; ++r) {
        const __m512 b = _mm512_set1_ps(B[r * t.ldb + k]);
        _Pragma("GCC unroll 4") for (int v = 0; v < NV; ++v)
          acc[r][v] = _mm512_fmadd_ps(a[v], b, acc[r][v]);
      }
    }
  }
  if (!t.last) {
    _Pragma("GCC unroll 8") for (int r = 0; r < NR; ++r)
      _Pragma("GCC unroll 4") for (int v = 0; v < NV; ++v) _mm512_store_ps(t.S + r * kOMB + v * 16, acc[r][v]);
    return;
  }
  alignas(64) float o[NR][NV * 16];
  _Pragma("GCC unroll 8") for (int r = 0; r < NR; ++r)
    _Pragma("GCC unroll 4") for (int v = 0; v < NV; ++v) _mm512_store_ps(o[r] + v * 16, acc[r][v]);
  for (int64_t m = 0; m < t.mb; ++m)
    for (int r = 0; r < NR; ++r) t.C[m * t.ldc + r] = t.bias ? o[r][m] + t.bias[r] : o[r][m];
}

using OuterFn = void (*)(const OuterArgs&);
template <int NV>
OuterFn outer_for(int nr) {
  switch (nr) {
    case 6: return outer_tile<6, NV>;
    case 5: return outer_tile<5, NV>;
    case 4: return outer_tile<4, NV>;
    case 3: return outer_tile<3, NV>;
    case 2: return outer_tile<2, NV>;
    default: return outer_tile<1, NV>;
  }
}
OuterFn outer_fn(int nr, int nv) {
  switch (nv) {
    case 4: return outer_for<4>(nr);
    case 3: return outer_for<3>(nr);
    case 2: return outer_for<2>(nr);
    default: return outer_for<1>(nr);
  }
}

// Rows [0, nr) x k [0, kc) of bfloat16 weights (row stride ldb) as float32 into W (row stride
// ldw >= kc rounded up to 32): exact, so a tile computes the same products as with float32
// weights.
void widen_rows(const uint16_t* B, int64_t ldb, int nr, int64_t kc, float* W, int64_t ldw) {
  for (int r = 0; r < nr; ++r)
    for (int64_t k = 0; k < kc; k += 32) {
      const int64_t n = std::min<int64_t>(32, kc - k);
      const __mmask32 m = n == 32 ? ~0u : static_cast<__mmask32>((1u << n) - 1u);
      const __m512i x = _mm512_maskz_loadu_epi16(m, B + r * ldb + k);
      const __m512i lo = _mm512_cvtepu16_epi32(_mm512_castsi512_si256(x));
      const __m512i hi = _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(x, 1));
      _mm512_store_si512(W + r * ldw + k, _mm512_slli_epi32(lo, 16));
      _mm512_store_si512(W + r * ldw + k + 16, _mm512_slli_epi32(hi, 16));
    }
}

// Every token block (outer_block) x K block of A [M, K], packed by pack_tokens, one after
// another: block (mbk, kb) at P + (mbk * nkb + kb) * kOKC * kOMB, nkb = ceil(K / kOKC).
int64_t outer_packed_size(int64_t M, int64_t K) {
  return outer_blocks(M) * ((K + kOKC - 1) / kOKC) * kOKC * kOMB;
}
void pack_outer(const float* A, int64_t lda, int64_t M, int64_t K, float* P) {
  const int64_t nkb = (K + kOKC - 1) / kOKC;
  for (int64_t mbk = 0; mbk < outer_blocks(M); ++mbk) {
    int64_t m0, mb;
    outer_block(M, mbk, m0, mb);
    for (int64_t kb = 0; kb < nkb; ++kb)
      pack_tokens(A + m0 * lda, lda, mb, kb * kOKC, std::min(kOKC, K - kb * kOKC),
                  P + (mbk * nkb + kb) * kOKC * kOMB);
  }
}

// C[m, n] for n in [n0, n1) from the packed tokens P (pack_outer): K blocks outer (the weight
// block [n0, n1) x kc is read from memory once and reused by every token block), token blocks,
// then weight-row tiles. bfloat16 weights are widened tile by tile into W (kOR x kOKC floats,
// L1) first.
void gemm_outer(bool bf16, int64_t M, int64_t n0, int64_t n1, int64_t K, const float* P,
                const void* B, int64_t ldb, const float* bias, float* C, int64_t ldc,
                float* Sbuf, float* Wbuf) {
  const int64_t N = n1 - n0, nmb = outer_blocks(M), esz = bf16 ? 2 : 4;
  const int64_t nkb = (K + kOKC - 1) / kOKC;
  const char* Bc = static_cast<const char*>(B);
  for (int64_t k0 = 0; k0 < K; k0 += kOKC) {
    const int64_t kc = std::min(kOKC, K - k0);
    for (int64_t mbk = 0; mbk < nmb; ++mbk) {
      int64_t m0, mb;
      outer_block(M, mbk, m0, mb);
      const int nv = static_cast<int>((mb + 15) / 16);
      const float* Pb = P + (mbk * nkb + k0 / kOKC) * kOKC * kOMB;
      for (int64_t j = 0; j < N; j += kOR) {
        const int nr = static_cast<int>(std::min<int64_t>(kOR, N - j));
        const char* Bt = Bc + ((n0 + j) * ldb + k0) * esz;
        OuterArgs t;
        t.P = Pb;
        if (bf16) {
          widen_rows(reinterpret_cast<const uint16_t*>(Bt), ldb, nr, kc, Wbuf, kOKC);
          t.B = Wbuf;
          t.ldb = kOKC;
        } else {
          t.B = reinterpret_cast<const float*>(Bt);
          t.ldb = ldb;
        }
        t.kc = kc;
        t.S = Sbuf + (mbk * N + j) * kOMB;
        t.first = k0 == 0;
        t.last = k0 + kc == K;
        t.C = C + m0 * ldc + n0 + j;
        t.ldc = ldc;
        t.mb = mb;
        t.bias = bias ? bias + j : nullptr;
        t.pf = nullptr;
        t.pf_ld = ldb * esz;
        t.pf_step = 16 * esz;
        t.pf_rows = 0;
        if (mbk == 0) {  // the first token block brings the weight rows in: prefetch the next
          if (j + kOR < N) {
            t.pf = Bc + ((n0 + j + kOR) * ldb + k0) * esz;
            t.pf_rows = static_cast<int>(std::min<int64_t>(kOR, N - j - kOR));
          } else if (k0 + kc < K) {
            t.pf = Bc + (n0 * ldb + k0 + kc) * esz;
            t.pf_rows = static_cast<int>(std::min<int64_t>(kOR, N));
          }
        }
        outer_fn(nr, nv)(t);
      }
    }
  }
}

// ----------------------------------------------------------------------------- phase form
// float32 8-40 tokens, bfloat16 16-47. One vector holds 4 tokens x 4 consecutive k: lane
// 4t + p is token t at k = 4s + p (step s). A weight row's 4 k of a step are then one 16-byte
// broadcast load from its torch-layout row (no transposition, no shuffle), multiplied into
// every token vector of the tile: NR rows x NV vectors of accumulators, NR x NV FMAs per step
// for NR broadcasts and NV token loads. A vector is 4 tokens, so at most 3 lanes of a tile
// hold a missing token. Each output is four float32 sums, one per phase p = k mod 4, each in
// increasing k (one FMA per k, the partial vectors carried whole across K blocks), then
// (p0 + p1) + (p2 + p3), then the bias: a token's result does not depend on how many tokens
// share its expert within this form's range, nor on the blocking or the thread count.
// Measured against the column form it replaced (64-row weight panels transposed into L1,
// tokens broadcast: a shuffle per 4 weights on the port that also does half the FMAs), one
// core, M x 11264 x 2048 from memory: float32 1.25-1.47x at 8-28 tokens, 1.05-1.13x at 32-36
// (over the outer form); bfloat16 1.07x at 16 (over the dot form), 1.15-1.27x at 20-28.
//
// K blocks: 256 k for float32 (tiles read the rows in place), 512 for bfloat16 (rows
// widened into Wbuf first: kPRMax x 512 floats stay in L1), for every token count. Measured on
// one core, M x 11264 x 2048 (and x 5632 x 4096), 64-byte aligned weights from memory,
// alternating in one process, against the earlier blocks (256 k; 128 from 33 tokens):
// float32 1.06-1.09x at 36-39 tokens (one K block or 512-2048 k: 0.95-1.02x at 8-32, 1.0-1.12x
// at 36-39); bfloat16 1.04-1.12x at 16-32, 1.23x at 39 (1024 k: 1.0-1.03x at 16-32). On the
// MoE layer the gain shows where experts get 33-39 tokens (mixtral T=128). The sums do not
// depend on the blocking.
constexpr int64_t kPKC = 256;                   // K per block, float32
constexpr int64_t kPKCBf16 = 512;               // K per block, bfloat16
constexpr int64_t kPWld = kPKCBf16 + 16;        // Wbuf row stride in floats
constexpr int kPVMax = 6;          // most token vectors per tile
constexpr int kPRMax = 12;         // most weight rows per tile

// Q[(s * G + g) * 16 + 4t + p] = A[4g + t, 4s + p], zeros past M and K; G = ceil(M / 4).
int64_t phase_packed_size(int64_t M, int64_t K) { return (K + 3) / 4 * ((M + 3) / 4) * 16; }
void pack_phase(const float* A, int64_t lda, int64_t M, int64_t K, float* Q) {
  const int64_t G = (M + 3) / 4;
  for (int64_t g = 0; g < G; ++g)
    for (int64_t k = 0; k < K; k += 16) {
      const int64_t kn = std::min<int64_t>(16, K - k);
      const __mmask16 km = static_cast<__mmask16>((1u << kn) - 1u);
      __m512 r[4];
      for (int t = 0; t < 4; ++t) {
        const int64_t m = 4 * g + t;
        r[t] = m < M ? _mm512_maskz_loadu_ps(km, A + m * lda + k) : _mm512_setzero_ps();
      }
      // 4 x 4 blocks of 4 k: vector j = the j-th 4 k of tokens 0-3.
      const __m512 lo01 = _mm512_shuffle_f32x4(r[0], r[1], 0x44);
      const __m512 hi01 = _mm512_shuffle_f32x4(r[0], r[1], 0xEE);
      const __m512 lo23 = _mm512_shuffle_f32x4(r[2], r[3], 0x44);
      const __m512 hi23 = _mm512_shuffle_f32x4(r[2], r[3], 0xEE);
      const __m512 o[4] = {
          _mm512_shuffle_f32x4(lo01, lo23, 0x88), _mm512_shuffle_f32x4(lo01, lo23, 0xDD),
          _mm512_shuffle_f32x4(hi01, hi23, 0x88), _mm512_shuffle_f32x4(hi01, hi23, 0xDD)};
      for (int64_t j = 0; 4 * j < kn; ++j) _mm512_store_ps(Q + ((k / 4 + j) * G + g) * 16, o[j]);
    }
}

struct PhaseArgs {
  const float* Q;      // packed tokens at the block's first step, the tile's first group
  int64_t G;           // groups per step (the stride of Q in vectors)
  const float* B;      // first weight row of the tile at the block's first k (float32)
  int64_t ldb;
  int64_t kc;          // K of this block
  float* S;            // partial vectors: S[(r * G + v) * 16]
  bool first, last;    // first / last K block
  float* C;            // C[token * ldc + row] of the tile's first token and row
  int64_t ldc;
  int mb;              // valid tokens of the tile
  const float* bias;   // float32 bias of the tile's rows, or null
  const char* pf;      // weight rows to prefetch (into L2), one line per row per 16 k, or null
  int64_t pf_ld;       // their stride in bytes
  int64_t pf_step;     // bytes of a row per 16 k
  int pf_rows;
};

// One step (4 k) of a tile; m masks the k past the end of the last block.
template <int NR, int NV>
__attribute__((always_inline)) inline void phase_step(__m512 (&acc)[NR][NV], const float* Q,
                                                      const float* B, int64_t ldb, __mmask16 m) {
  __m512 x[NV];
  _Pragma("GCC unroll 6") for (int v = 0; v < NV; ++v) x[v] = _mm512_load_ps(Q + v * 16);
  _Pragma("GCC unroll 12") for (int r = 0; r < NR; ++r) {
    __m512 w;
    if (m == 0xFFFF) {
      w = _mm512_broadcast_f32x4(_mm_loadu_ps(B + r * ldb));
    } else {
      const __m512 z = _mm512_maskz_loadu_ps(m, B + r * ldb);
      w = _mm512_shuffle_f32x4(z, z, 0);
    }
    _Pragma("GCC unroll 6") for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(x[v], w, acc[r][v]);
  }
}

template <int NR, int NV>
void phase_tile(const PhaseArgs& t) {
  __m512 acc[NR][NV];
  _Pragma("GCC unroll 12") for (int r = 0; r < NR; ++r)
    _Pragma("GCC unroll 6") for (int v = 0; v < NV; ++v)
      acc[r][v] = t.first ? _mm512_setzero_ps() : _mm512_load_ps(t.S + (r * t.G + v) * 16);
  const float* Q = t.Q;
  const float* B = t.B;
  const int64_t steps = t.kc / 4, stride = t.G * 16;
  int64_t s = 0;
  for (; s + 4 <= steps; s += 4) {
    for (int r = 0; r < t.pf_rows; ++r)
      _mm_prefetch(t.pf + r * t.pf_ld + s / 4 * t.pf_step, _MM_HINT_T1);
    _Pragma("GCC unroll 4") for (int u = 0; u < 4; ++u)
      phase_step<NR, NV>(acc, Q + (s + u) * stride, B + 4 * (s + u), t.ldb, 0xFFFF);
  }
  for (; s < steps; ++s) phase_step<NR, NV>(acc, Q + s * stride, B + 4 * s, t.ldb, 0xFFFF);
  if (4 * steps < t.kc)  // zeros in both operands past the end: the products add +0
    phase_step<NR, NV>(acc, Q + steps * stride, B + 4 * steps, t.ldb,
                       static_cast<__mmask16>((1u << (t.kc - 4 * steps)) - 1u));
  if (!t.last) {
    _Pragma("GCC unroll 12") for (int r = 0; r < NR; ++r)
      _Pragma("GCC unroll 6") for (int v = 0; v < NV; ++v)
        _mm512_store_ps(t.S + (r * t.G + v) * 16, acc[r][v]);
    return;
  }
  alignas(64) float o[NR][NV * 16];
  _Pragma("GCC unroll 12") for (int r = 0; r < NR; ++r)
    _Pragma("GCC unroll 6") for (int v = 0; v < NV; ++v) {
      const __m512 a = acc[r][v];
      const __m512 pairs = _mm512_add_ps(a, _mm512_permute_ps(a, 0xB1));        // p0+p1, p2+p3
      const __m512 all = _mm512_add_ps(pairs, _mm512_permute_ps(pairs, 0x4E));  // lane 4t
      _mm512_store_ps(o[r] + v * 16, all);
    }
  for (int m = 0; m < t.mb; ++m)
    for (int r = 0; r < NR; ++r) t.C[m * t.ldc + r] = t.bias ? o[r][4 * m] + t.bias[r] : o[r][4 * m];
}

using PhaseFn = void (*)(const PhaseArgs&);
template <int NV>
PhaseFn phase_for(int nr) {
  switch (nr) {
    case kPRMax: return phase_tile<kPRMax, NV>;
    case 8: return phase_tile<8, NV>;
    case 6: return phase_tile<6, NV>;
    case 4: return phase_tile<4, NV>;
    case 3: return phase_tile<3, NV>;
    case 2: return phase_tile<2, NV>;
    default: return phase_tile<1, NV>;
  }
}
PhaseFn phase_fn(int nr, int nv) {
  switch (nv) {
    case 6: return phase_for<6>(nr);
    case 5: return phase_for<5>(nr);
    case 4: return phase_for<4>(nr);
    case 3: return phase_for<3>(nr);
    case 2: return phase_for<2>(nr);
    default: return phase_for<1>(nr);
  }
}
// Weight rows per tile of nv token vectors: nr x nv accumulators, nv token vectors and a
// broadcast in the 32 registers (4 x 6 leaves one spill per 2 steps; 5 rows would spill more).
inline int phase_rows(int nv) {
  static const int rows[kPVMax + 1] = {0, kPRMax, kPRMax, 8, 6, 4, 4};
  return rows[nv];
}
// The widest instantiated tile height <= both.
inline int phase_height(int64_t left, int widest) {
  for (int h : {kPRMax, 8, 6, 4, 3, 2})
    if (h <= widest && h <= left) return h;
  return 1;
}

// C[m, n] for n in [n0, n1) from the packed tokens Q (pack_phase; fewer than outer_min_m tokens,
// so all in one token block): K blocks outer (each weight block is read from memory once),
// weight-row tiles (bfloat16 rows widened exactly into Wbuf first), then the token tiles, sized
// evenly (7 groups: 4 + 3).
void gemm_phase(bool bf16, int64_t M, int64_t n0, int64_t n1, int64_t K, const float* Q,
                const void* B, int64_t ldb, const float* bias, float* C, int64_t ldc,
                float* Sbuf, float* Wbuf) {
  const int64_t N = n1 - n0, G = (M + 3) / 4, esz = bf16 ? 2 : 4;
  const int64_t KC = bf16 ? kPKCBf16 : kPKC;
  const int64_t ntile = (G + kPVMax - 1) / kPVMax;
  const int NR = phase_rows(static_cast<int>((G + ntile - 1) / ntile));
  const char* Bc = static_cast<const char*>(B);
  for (int64_t k0 = 0; k0 < K; k0 += KC) {
    const int64_t kc = std::min(KC, K - k0);
    for (int64_t j = 0; j < N;) {
      const int nr = phase_height(N - j, NR);
      const char* Bt = Bc + ((n0 + j) * ldb + k0) * esz;
      const float* Bf = reinterpret_cast<const float*>(Bt);
      int64_t ldbf = ldb;
      if (bf16) {
        widen_rows(reinterpret_cast<const uint16_t*>(Bt), ldb, nr, kc, Wbuf, kPWld);
        Bf = Wbuf;
        ldbf = kPWld;
      }
      // While the first token tile runs, the next weight-row tile is prefetched.
      const char* pf = nullptr;
      int pf_rows = 0;
      if (j + nr < N) {
        pf = Bc + ((n0 + j + nr) * ldb + k0) * esz;
        pf_rows = phase_height(N - j - nr, NR);
      } else if (k0 + kc < K) {
        pf = Bc + (n0 * ldb + k0 + kc) * esz;
        pf_rows = phase_height(N, NR);
      }
      for (int64_t i = 0; i < ntile; ++i) {
        const int64_t g0 = i * G / ntile, g1 = (i + 1) * G / ntile;
        PhaseArgs t;
        t.Q = Q + (k0 / 4 * G + g0) * 16;
        t.G = G;
        t.B = Bf;
        t.ldb = ldbf;
        t.kc = kc;
        t.S = Sbuf + (j * G + g0) * 16;
        t.first = k0 == 0;
        t.last = k0 + kc == K;
        t.C = C + 4 * g0 * ldc + n0 + j;
        t.ldc = ldc;
        t.mb = static_cast<int>(std::min(4 * g1, M) - 4 * g0);
        t.bias = bias ? bias + j : nullptr;
        t.pf = i == 0 ? pf : nullptr;
        t.pf_ld = ldb * esz;
        t.pf_step = 16 * esz;
        t.pf_rows = i == 0 ? pf_rows : 0;
        phase_fn(nr, static_cast<int>(g1 - g0))(t);
      }
      j += nr;
    }
  }
}

// The tokens A [M, K] as a kernel form wants them (packed k-major blocks for the outer form, the
// even/odd order for the bfloat16 dot form), kept per thread: a caller that multiplies the same
// tokens by several weight blocks names them with a key (gemm_nt_keyed) and they are prepared
// once per thread instead of once per call (the MoE FFN multiplies each expert's token block by
// I / 128 gate, I / 128 up and H / 128 down weight blocks; re-packing them was ~9% of the
// outer form's time at deepseek T=1024).
enum class Form { Outer, EvenOdd, Phase };
class PreparedTokens {
 public:
  template <class Prepare>
  const float* get(uint64_t key, Form form, const float* A, int64_t lda, int64_t M, int64_t K,
                   int64_t n, Prepare prepare) {
    if (key == 0 || key != key_ || form != form_ || A != A_ || lda != lda_ || M != M_ ||
        K != K_) {
      key_ = 0;  // invalid until prepared (prepare may throw bad_alloc)
      prepare(buf_.get(n));
      key_ = key, form_ = form, A_ = A, lda_ = lda, M_ = M, K_ = K;
    }
    return buf_.get(n);
  }

 private:
  uint64_t key_ = 0;
  Form form_ = Form::Outer;
  const float* A_ = nullptr;
  int64_t lda_ = 0, M_ = 0, K_ = 0;
  Buffer buf_;
};

// Bias elements [n0, n0 + n) as float32 (the tiles add float32 biases), in buf; null for none.
const float* float_bias(const void* bias, DType bt, int64_t n0, int64_t n, Buffer& buf) {
  if (!bias) return nullptr;
  float* f = buf.get(n);
  to_float(static_cast<const char*>(bias) + n0 * dtype_size(bt), bt, static_cast<size_t>(n), f);
  return f;
}

void gemm(bool bf16, int64_t M, int64_t n0, int64_t n1, int64_t K, const float* A, int64_t lda,
          const void* B, int64_t ldb, const void* bias, float* C, int64_t ldc, uint64_t a_key) {
  thread_local Buffer Sbuf, Fbuf, Wbuf;
  thread_local PreparedTokens prepared, scratch;  // keyed calls / the others (a_key 0)
  PreparedTokens& slot = a_key ? prepared : scratch;
  const int MR = bf16 ? 4 : 3, NR = bf16 ? 4 : 8;
  const int64_t esz = bf16 ? 2 : 4;
  const DType bt = bf16 ? DType::BF16 : DType::F32;
  if (K == 0) {  // an empty sum is +0, then the bias
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = n0; n < n1; ++n) {
        float b = 0.0f;
        if (bias) to_float(static_cast<const char*>(bias) + n * esz, bt, 1, &b);
        C[m * ldc + n] = bias ? 0.0f + b : 0.0f;
      }
    return;
  }
  if (M >= phase_min_m(bf16) && M < outer_min_m(bf16)) {
    const float* fb = float_bias(bias, bt, n0, n1 - n0, Fbuf);
    const float* Q = slot.get(a_key, Form::Phase, A, lda, M, K, phase_packed_size(M, K),
                              [&](float* p) { pack_phase(A, lda, M, K, p); });
    gemm_phase(bf16, M, n0, n1, K, Q, B, ldb, fb, C, ldc, Sbuf.get((n1 - n0) * ((M + 3) / 4) * 16),
               Wbuf.get(kPRMax * kPWld));
    return;
  }
  if (M >= outer_min_m(bf16)) {
    // The last 1-kOuterTailMax tokens past a multiple of 16 would fill one vector of every
    // outer tile mostly with zeros (65 tokens: 5 vectors for 65): the dot form takes them, reading
    // the weight block again from L2. Measured on 65-106 x 128 x 2048, one core: 1.03-1.3x at
    // 1-7 such tokens (1.3x at 65, 1.17x at 68), about even at 8 (so not taken).
    const int64_t r = M % 16;
    if (r >= 1 && r <= kOuterTailMax && M - r >= outer_min_m(bf16)) {
      gemm(bf16, M - r, n0, n1, K, A, lda, B, ldb, bias, C, ldc, a_key);
      gemm(bf16, r, n0, n1, K, A + (M - r) * lda, lda, B, ldb, bias, C + (M - r) * ldc, ldc, 0);
      return;
    }
    const float* fb = float_bias(bias, bt, n0, n1 - n0, Fbuf);
    const int64_t nmb = outer_blocks(M);
    const float* P = slot.get(a_key, Form::Outer, A, lda, M, K, outer_packed_size(M, K),
                                  [&](float* p) { pack_outer(A, lda, M, K, p); });
    gemm_outer(bf16, M, n0, n1, K, P, B, ldb, fb, C, ldc, Sbuf.get(nmb * (n1 - n0) * kOMB),
               Wbuf.get(kOR * kOKC));
    return;
  }
  // bfloat16: the tokens in the even/odd order of tile_bf16, all of K (row stride a multiple
  // of 32 floats plus one line: rows a power-of-two bytes apart would share L1 sets).
  const int64_t ldf = (K + 31) / 32 * 32 + 16;
  const float* EO = nullptr;
  if (bf16)
    EO = slot.get(a_key, Form::EvenOdd, A, lda, M, K, M * ldf,
                      [&](float* p) { pack_even_odd(A, lda, M, 0, K, p, ldf); });
  for (int64_t m0 = 0; m0 < M; m0 += kMC) {
    const int64_t mb = std::min(kMC, M - m0);
    const bool blocked = mb > kStreamM && K > kKC;
    const int64_t kcb = blocked ? kKC : K;
    float* S = blocked ? Sbuf.get(kMC * kNC * 16) : nullptr;
    for (int64_t nc0 = n0; nc0 < n1; nc0 += kNC) {
      const int64_t nb = std::min(kNC, n1 - nc0);
      const float* fb = float_bias(bias, bt, nc0, nb, Fbuf);
      for (int64_t k0 = 0; k0 < K; k0 += kcb) {
        const int64_t kc = std::min(kcb, K - k0);
        const float* Ab = bf16 ? EO + m0 * ldf + k0 : A + m0 * lda + k0;
        const int64_t ldab = bf16 ? ldf : lda;
        // While the token tiles run over one weight panel, the next panel is prefetched, its
        // rows shared out among the token tiles.
        const int n_mt = static_cast<int>((mb + MR - 1) / MR);
        for (int64_t j0 = 0; j0 < nb;) {
          const int nr = tile_width(nb - j0, NR);
          const char* pf = nullptr;
          int pf_n = 0;
          {  // (also with one token tile: the prefetches run ahead across 4 KiB pages)
            if (j0 + nr < nb) {
              pf = static_cast<const char*>(B) + ((nc0 + j0 + nr) * ldb + k0) * esz;
              pf_n = tile_width(nb - j0 - nr, NR);
            } else if (k0 + kc < K) {
              pf = static_cast<const char*>(B) + (nc0 * ldb + k0 + kc) * esz;
              pf_n = tile_width(nb, NR);
            }
          }
          // Weight panels are read in place (bfloat16, the only blocked case: copying them to
          // a buffer with rows not 2^n bytes apart measured 5-12% slower at 12-32 tokens).
          const char* Bp = static_cast<const char*>(B) + ((nc0 + j0) * ldb + k0) * esz;
          for (int64_t i0 = 0, it = 0; i0 < mb; i0 += MR, ++it) {
            const int mr = static_cast<int>(std::min<int64_t>(MR, mb - i0));
            const int r0 = static_cast<int>(it * pf_n / n_mt);
            const int r1 = static_cast<int>((it + 1) * pf_n / n_mt);
            TileArgs t{Ab + i0 * ldab,
                       ldab,
                       Bp,
                       ldb,
                       kc,
                       S ? S + (i0 * kNC + j0) * 16 : nullptr,
                       k0 == 0,
                       k0 + kc == K,
                       C + (m0 + i0) * ldc + nc0 + j0,
                       ldc,
                       fb ? fb + j0 : nullptr,
                       pf ? pf + r0 * ldb * esz : nullptr,
                       ldb * esz,
                       r1 - r0};
            tile_fn(bf16, mr, nr)(t);
          }
          j0 += nr;
        }
      }
    }
  }
}

}  // namespace

void gemm_nt(int64_t M, int64_t n0, int64_t n1, int64_t K, const float* A, int64_t lda,
             const void* B, DType bt, int64_t ldb, const void* bias, float* C, int64_t ldc,
             uint64_t a_key) {
  if (bt == DType::F16) throw Error("avx512::gemm_nt: float16 weights go to the AVX2 kernel");
  gemm(bt == DType::BF16, M, n0, n1, K, A, lda, B, ldb, bias, C, ldc, a_key);
}

}  // namespace avx512
}  // namespace seif

// ----------------------------------------------------------------------------- SwiGLU
namespace seif {
namespace avx512 {
namespace {

// exp(x) in float64, 8 lanes: x = n ln2 + r (Cody-Waite, |r| <= ln2/2), the degree-13 Taylor
// polynomial of exp(r) (truncation error < 1e-17), times 2^n by vscalefpd (overflow to +inf,
// underflow to 0). Within a few ulp of the correctly rounded double; NaN stays NaN.
inline __m512d exp_pd(__m512d x) {
  x = _mm512_min_pd(_mm512_set1_pd(710.0), x);   // the second operand (x) if NaN
  x = _mm512_max_pd(_mm512_set1_pd(-750.0), x);
  const __m512d n = _mm512_roundscale_pd(_mm512_mul_pd(x, _mm512_set1_pd(1.4426950408889634)),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512d r = _mm512_fnmadd_pd(n, _mm512_set1_pd(6.93147180369123816490e-01), x);
  r = _mm512_fnmadd_pd(n, _mm512_set1_pd(1.90821492927058770002e-10), r);
  static const double c[] = {1.0 / 6227020800.0, 1.0 / 479001600.0, 1.0 / 39916800.0,
                             1.0 / 3628800.0,    1.0 / 362880.0,    1.0 / 40320.0,
                             1.0 / 5040.0,       1.0 / 720.0,       1.0 / 120.0,
                             1.0 / 24.0,         1.0 / 6.0,         0.5,
                             1.0,                1.0};
  __m512d p = _mm512_set1_pd(c[0]);
  for (int i = 1; i < 14; ++i) p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(c[i]));
  return _mm512_scalef_pd(p, n);
}

// 8 lanes of (g * sigmoid(g)) * u in float64, rounded once to float32.
inline __m256 swiglu8(__m256 gate, __m256 up) {
  const __m512d g = _mm512_cvtps_pd(gate), u = _mm512_cvtps_pd(up);
  const __m512d e = exp_pd(_mm512_sub_pd(_mm512_setzero_pd(), g));
  const __m512d s = _mm512_div_pd(_mm512_set1_pd(1.0), _mm512_add_pd(_mm512_set1_pd(1.0), e));
  return _mm512_cvtpd_ps(_mm512_mul_pd(_mm512_mul_pd(g, s), u));
}

}  // namespace

void swiglu(const float* gate, const float* up, float* h, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(h + i, swiglu8(_mm256_loadu_ps(gate + i), _mm256_loadu_ps(up + i)));
  if (i < n) {  // the tail through a padded copy, by the same formula
    float g[8] = {0}, u[8] = {0}, o[8];
    for (int64_t j = i; j < n; ++j) {
      g[j - i] = gate[j];
      u[j - i] = up[j];
    }
    _mm256_storeu_ps(o, swiglu8(_mm256_loadu_ps(g), _mm256_loadu_ps(u)));
    for (int64_t j = i; j < n; ++j) h[j] = o[j - i];
  }
}

}  // namespace avx512
}  // namespace seif

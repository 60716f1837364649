// y = x @ (qweight * scale)^T + bias on the CPU: weight-only int8 (W8A32) linear.
//
// qweight (N, K) int8, scale (N,) fp32 per output channel or (N, G) per group of K / G columns,
// x (M, K) fp32/fp16/bf16, bias (N,) in x's dtype; y (M, N) in x's dtype. The weights are widened to
// fp32 in registers (int8 -> int32 -> fp32, exact) and every product is accumulated in fp32; the
// per-row (per-group) scale multiplies the finished fp32 dot of that row (group), so the only
// difference from F.linear on the dequantized weight is the order of the fp32 roundings.
//
// Few rows (M <= 64: decode, short prefills): bound by reading the weight once, N * K bytes (a quarter
// of fp32's), at a few rows; up to 64 rows the widened weight tile (in L1) against every row still
// beats widening the whole weight for BLAS (one thread, interleaved: 768x2304 at 32 rows 1.23 vs
// 1.66 ms, 64 rows 2.60 vs 2.91; 3072x768 at 64 rows 3.01 vs 3.85; even at 128 rows).
// Output features are split over the threads (at::parallel_for, chunks of >= 64 KB of int8 weight),
// each chunk walked in tiles of NR weight rows; for each tile the input rows (fp32 copies, in L1/L2)
// go by in blocks of MR = 4/2/1 against the tile, which stays in L1 between them. A register tile
// holds MR x NR x U fp32 accumulators; per k step each weight vector is loaded and widened once and
// each input vector loaded once.
// - AVX-512 (run-time choice, cpu_use_avx512(); FASTLM_CPU_NO_AVX512=1 forces AVX2): 16 k a step,
//   NR = 4, masked tails (no read past a row).
// - AVX-512 VNNI, one input row only (decode at batch 1), per-channel scales, K <= 65536, finite x
//   (run-time choice: the CPU has avx512_vnni and FASTLM_INT8_VNNI is not 0; anything else, a NaN/inf
//   anywhere in x included, takes the widening kernels above/below, so non-finite rows give what they
//   always gave; group scales too). The row is split exactly into four int8 digits on a power-of-two
//   scale 2^e (max|x| <= 127 * 2^e): x = 2^e (q1 + (u2 - 128) / 2^8 + u3 / 2^16 + (u4 + 1/2) / 2^24)
//   to within 2^(e-25) ~ max|x| * 2^-31 per element (three digits, max|x| * 2^-23, failed the parity rule
//   on rows of huge dynamic range: the error is spread over every element, not just the big ones).
//   vpdpbusd (u8 digit x s8 weight, 64 MACs per instruction, exact int32) gives each digit's dot; a
//   fifth vpdpbusd against all-ones gives sum_k w_k, which removes the +128 offsets and adds the 1/2;
//   the digit dots are combined exactly in int64 and y = T * 2^(e-25) * scale is formed in fp64 and
//   rounded once: the exact dot of x~ and the int8 row (more accurate than fp32 accumulation). 5
//   instructions per 64 weights against the widening path's 12 (per 16: widen, convert, FMA). Tiles
//   of 2 weight rows (1 x 4 made GCC spill accumulators every step); the rows ~16 KB ahead are
//   prefetched to L2 (_MM_HINT_T1), which is what lets it stream from DRAM: one thread, weights
//   rotated out of cache, GB/s of int8 weight old -> VNNI: 768x2304 7.7 -> 15.6, 768x768 7.4 -> 13.8,
//   768x3072 7.7 -> 14.9, 3072x768 11.5 -> 19.2, 768x50257 8.1 -> 15.6 (a plain read: ~16-19); GPT-2
//   small int8 decode, batch 1, 1 thread: 50 -> 87 tokens/s. In cache (one weight called repeatedly)
//   it is even at K = 768 (per-call costs) and ~25% faster at K = 3072. At 2+ rows every digit costs
//   a vpdpbusd per row (4 per 64 k per row against the widening path's 2 per 16 k shared by the rows
//   plus an FMA per row): 8 rows measured 2x slower (with spills), so those keep the widening kernel.
// - AVX2 int16, one input row only (decode at batch 1) on CPUs without the AVX-512 kernels (Zen 3...,
//   FASTLM_CPU_NO_AVX512=1), per-channel scales, K <= 65536, finite x, FASTLM_INT8_VNNI not 0 (the
//   same switch as the VNNI path: 0 gives the widening kernel; anything else that does not apply too).
//   The row is split into two int16 digits on a power-of-two scale 2^e (max|x| <= 32767 * 2^e):
//   x = 2^e (hi + lo / 2^16) to within 2^(e-17) ~ max|x| * 2^-31 per element, the VNNI path's
//   accuracy. The weights are widened int8 -> int16 once per 16 (vpmovsxbw) and each digit's dot is
//   vpmaddwd + vpaddd (16 exact products, int32 lanes; inline asm, see cpu/vnni512.h); the lanes go
//   into int64 every 4096 k (the most an int32 lane holds: 4096 / 8 * 127 * 2^15 < 2^31), then
//   T = 2^16 dot_hi + dot_lo exactly and y = T * 2^(e-16) * scale in fp64, rounded once. 1 x 4
//   register tiles (8 accumulators), the rows ~16 KB ahead prefetched to L2. One thread, one row,
//   FASTLM_CPU_NO_AVX512=1 on a Zen 4 host (the other core busy; medians of two sessions), weights
//   rotated out of cache, GB/s of int8 weight widening -> int16: 768x2304 5.0-5.2 -> 11.9-16.8,
//   3072x768 5.6-5.8 -> 15.5-18.1, 768x50257 5.0-6.6 -> 10.4-13.1; in cache 768x2304 14.5-16.2 ->
//   20.8-26.8, 3072x768 18.6-22.1 -> 23.3-26.5.
// - AVX2 + FMA (the file's baseline ISA on x86): 8 k a step, NR = 2, scalar tails.
// - portable scalar loop everywhere else (aarch64 builds; also the oracle of nothing: same math).
// Many rows (prefill): the weight is dequantized once into an fp32 (N, K) panel (parallel, one pass)
// and multiplied by BLAS (at::linear): the widening costs O(N K) against the GEMM's O(M N K).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/ones.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include "common.h"
#include "cpu/decode_parallel.h"
#include "cpu/vnni512.h"
#include "cpu/vec_utils.h"

namespace fastlm::cpu {
namespace {

constexpr const char* kOp = "linear_int8_fwd";
constexpr int64_t kFewRows = 64;  // up to here the weight-streaming kernel; beyond, dequantize + BLAS

// Shape of the weights' scales: G groups of gs consecutive k per output row (G = 1: per channel).
struct Groups {
  int64_t G, gs;
};

// ---------------------------------------------------------------- portable scalar tile
// out[m][r] = sum_k w[r][k] * x[m][k] over k in [0, K), fp32.
template <int MR, int NR, typename WT>
inline void tile_scalar(const WT* w, int64_t ldw, const float* x, int64_t ldx, int64_t K, float* out) {
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += static_cast<float>(w[r * ldw + k]) * x[m * ldx + k];
      out[m * NR + r] = s;
    }
}

#if defined(__AVX2__) && defined(__FMA__)
// ---------------------------------------------------------------- AVX2 + FMA tile (8 k per step)
inline __m256 load_w8(const int8_t* p) {  // 8 int8 -> 8 fp32 (exact)
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

inline __m256 load_w8(const at::BFloat16* p) {  // 8 bf16 -> 8 fp32 (exact: the high half of fp32)
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}

inline float hsum256(__m256 t) {
  __m128 lo = _mm256_castps256_ps128(t), hi = _mm256_extractf128_ps(t, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
  return _mm_cvtss_f32(lo);
}

// MR input rows x NR weight rows, U k-steps unrolled: MR * NR * U accumulators (<= 8 of 16 ymm).
template <int MR, int NR, int U, typename WT>
inline void tile_avx2(const WT* w, int64_t ldw, const float* x, int64_t ldx, int64_t K, float* out) {
  __m256 acc[MR][NR][U];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r)
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u) acc[m][r][u] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 * U <= K; k += 8 * U) {
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) {
      __m256 wv[NR];
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) wv[r] = load_w8(w + r * ldw + k + 8 * u);
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) {
        const __m256 xv = _mm256_loadu_ps(x + m * ldx + k + 8 * u);
#pragma GCC unroll 8
        for (int r = 0; r < NR; ++r) acc[m][r][u] = _mm256_fmadd_ps(wv[r], xv, acc[m][r][u]);
      }
    }
  }
  for (; k + 8 <= K; k += 8) {
    __m256 wv[NR];
    for (int r = 0; r < NR; ++r) wv[r] = load_w8(w + r * ldw + k);
    for (int m = 0; m < MR; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + m * ldx + k);
      for (int r = 0; r < NR; ++r) acc[m][r][0] = _mm256_fmadd_ps(wv[r], xv, acc[m][r][0]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) {
      __m256 t = acc[m][r][0];
      for (int u = 1; u < U; ++u) t = _mm256_add_ps(t, acc[m][r][u]);
      float s = hsum256(t);
      for (int64_t kk = k; kk < K; ++kk) s += static_cast<float>(w[r * ldw + kk]) * x[m * ldx + kk];
      out[m * NR + r] = s;
    }
}
#endif

#if defined(__x86_64__) || defined(_M_X64)
// ---------------------------------------------------------------- AVX-512 tile (16 k per step)
// (GCC 12 warns that _mm512_undefined_ps inside its own reduce intrinsics is uninitialized: noise.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define FASTLM_I8_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))

FASTLM_I8_TARGET inline __m512 load_w16(const int8_t* p) {  // 16 int8 -> 16 fp32 (exact)
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
FASTLM_I8_TARGET inline __m512 load_w16(const int8_t* p, __mmask16 msk) {  // the lanes of msk only
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(msk, p)));
}
FASTLM_I8_TARGET inline __m512 load_w16(const at::BFloat16* p) {  // 16 bf16 -> 16 fp32 (exact)
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
FASTLM_I8_TARGET inline __m512 load_w16(const at::BFloat16* p, __mmask16 msk) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(msk, p)), 16));
}

// MR input rows x NR weight rows, U k-steps unrolled: MR * NR * U <= 16 accumulators plus NR * U
// widened weight vectors (< 32 zmm). Weight rows ~16 KB ahead (contiguous after this tile's) are
// prefetched to L2 a line per row and step, so their DRAM latency hides behind the FMAs.
template <int MR, int NR, int U, typename WT>
FASTLM_I8_TARGET inline void tile_avx512(const WT* w, int64_t ldw, const float* x, int64_t ldx, int64_t K,
                                         float* out) {
  __m512 acc[MR][NR][U];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r)
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u) acc[m][r][u] = _mm512_setzero_ps();
  // prefetch distance: the weight rows ~16 KB ahead (whole tiles, at least the next), into L2 -- as
  // linear_tiles.h's tile: the next tile only, into L1, streamed from DRAM at ~55% of a plain read
  const int64_t row_bytes = ldw * static_cast<int64_t>(sizeof(WT));
  const int64_t pfd = std::max<int64_t>(1, (int64_t(16384) + NR * row_bytes - 1) / (NR * row_bytes)) * NR;
  int64_t k = 0;
  for (; k + 16 * U <= K; k += 16 * U) {
    __m512 wv[NR][U];
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r)
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u) wv[r][u] = load_w16(w + r * ldw + k + 16 * u);
    if (((k * int64_t(sizeof(WT))) & 63) == 0) {  // a line (64 bytes) per row and step
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(w + (pfd + r) * ldw + k), _MM_HINT_T1);
    }
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u) {
        __m512 xv = _mm512_loadu_ps(x + m * ldx + k + 16 * u);
        asm("" : "+v"(xv));  // one load, kept in a register for the NR FMAs (GCC would refold it)
#pragma GCC unroll 8
        for (int r = 0; r < NR; ++r) acc[m][r][u] = _mm512_fmadd_ps(wv[r][u], xv, acc[m][r][u]);
      }
  }
  for (; k < K; k += 16) {  // tail: masked, whole 16s first then the rest
    const __mmask16 msk = K - k >= 16 ? __mmask16(0xffff) : __mmask16((1u << (K - k)) - 1);
    __m512 wv[NR];
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) wv[r] = load_w16(w + r * ldw + k, msk);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const __m512 xv = _mm512_maskz_loadu_ps(msk, x + m * ldx + k);
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) acc[m][r][0] = _mm512_fmadd_ps(wv[r], xv, acc[m][r][0]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) {
      __m512 t = acc[m][r][0];
#pragma GCC unroll 4
      for (int u = 1; u < U; ++u) t = _mm512_add_ps(t, acc[m][r][u]);
      out[m * NR + r] = _mm512_reduce_add_ps(t);
    }
}
#pragma GCC diagnostic pop
#endif

#if defined(__x86_64__) || defined(_M_X64)
// ---------------------------------------------------------------- AVX-512 VNNI path (int8 weights)
// x is split per row into three int8 digits on power-of-two scales: v = x * 2^-e (exact) with
// max|v| <= 127, v = q1 + q2 / 256 + q3 / 65536 + r, each q = floor(t + 0.5) of the running residual t
// (q1 in [-127, 127], q2, q3 in [-128, 127]; the residuals are exact in fp32), |r| < 2^-17, so
// |x - x~| < max|x| * 2^-23. The digits are stored as u8 (q + 128) and dotted with the int8 weights
// by vpdpbusd (64 u8 x s8 products a step, exact in int32); a fourth vpdpbusd against all-ones
// gives sum_k w_k per weight row, so each digit's dot is acc - 128 * wsum. The three digit dots are
// combined exactly in int64 (T = 65536 D1 + 256 D2 + D3) and y = T * 2^(e - 16) * scale in fp64,
// rounded once to fp32: the exact dot of x~ and the int8 row. Exactness bounds: |acc| <= K * 255 * 128
// < 2^31 for K <= 65536.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define FASTLM_I8_VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))

constexpr int64_t kVnniMaxK = 65536;
constexpr int kDigits = 4;
constexpr int64_t kVnniMaxRows = 1;  // at 2+ rows the widening kernel is as fast or faster (see the header)

// Row x[0, K) -> digits xd[blk][3][64] (u8, padded with 128 = digit 0 to a multiple of 64), given
// p = 2^-e (a normal fp32).
FASTLM_I8_VNNI_TARGET inline void split_digits(const float* x, int64_t K, float p, uint8_t* xd) {
  const __m512 pv = _mm512_set1_ps(p), half = _mm512_set1_ps(0.5f), c256 = _mm512_set1_ps(256.f), c128 = _mm512_set1_ps(128.f);
  const __m512i off = _mm512_set1_epi32(128), zero = _mm512_setzero_si512(), u255 = _mm512_set1_epi32(255);
  const int64_t nblk = (K + 63) / 64;
  for (int64_t b = 0; b < nblk; ++b)
    for (int j = 0; j < 4; ++j) {
      const int64_t k = b * 64 + j * 16;
      const __mmask16 msk = K - k >= 16 ? __mmask16(0xffff) : K - k <= 0 ? __mmask16(0) : __mmask16((1u << (K - k)) - 1);
      __m512 t = _mm512_mul_ps(_mm512_maskz_loadu_ps(msk, x + k), pv);
      // q1 = floor(t + 0.5) in [-127, 127]; the residual in [-1/2, 1/2) as three base-256 digits:
      // u2 = floor(256 r1 + 128), u3 = floor(256 r2), u4 = floor(256 r3), each clamped to [0, 255]; u4
      // stands for u4 + 1/2 (added back through the weight sums): x / 2^e = q1 + (u2 - 128) / 2^8 +
      // u3 / 2^16 + (u4 + 1/2) / 2^24 to within 2^-25.
      const __m512i q1 = _mm512_cvt_roundps_epi32(_mm512_add_ps(t, half), _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
      t = _mm512_fmadd_ps(_mm512_sub_ps(t, _mm512_cvtepi32_ps(q1)), c256, c128);
      auto digit = [&](__m512 v) FASTLM_I8_VNNI_TARGET {
        return _mm512_min_epi32(_mm512_max_epi32(_mm512_cvt_roundps_epi32(v, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC), zero), u255);
      };
      const __m512i u2 = digit(t);
      t = _mm512_mul_ps(_mm512_sub_ps(t, _mm512_cvtepi32_ps(u2)), c256);
      const __m512i u3 = digit(t);
      t = _mm512_mul_ps(_mm512_sub_ps(t, _mm512_cvtepi32_ps(u3)), c256);
      const __m512i u4 = digit(t);
      uint8_t* o = xd + b * 64 * kDigits + j * 16;
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o), _mm512_cvtepi32_epi8(_mm512_add_epi32(q1, off)));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 64), _mm512_cvtepi32_epi8(u2));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 128), _mm512_cvtepi32_epi8(u3));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 192), _mm512_cvtepi32_epi8(u4));
    }
}

// T[m][r] = sum_k w[r][k] * (65536 q1 + 256 q2 + q3)[m][k] (exact), MR x NR outputs, nblk steps of 64 k
// (the last masked to K). PF: prefetch the next NR rows a line per row and step.
template <int MR, int NR, bool PF>
FASTLM_I8_VNNI_TARGET inline void tile_vnni(const int8_t* w, int64_t ldw, const uint8_t* xd, int64_t ldxd,
                                            int64_t K, int64_t* T, int64_t pfd = NR) {
  static_assert(MR * NR * kDigits + NR <= 32, "accumulators");
  __m512i acc[MR * NR * kDigits + NR];
  constexpr int NA = MR * NR * kDigits + NR;
#pragma GCC unroll 32
  for (int i = 0; i < NA; ++i) acc[i] = _mm512_setzero_si512();
  const __m512i ones = _mm512_set1_epi8(1);
  const int64_t nfull = K / 64;
  // one 64-k step; the full steps unmasked, the last partial one masked (no read past a row). (One
  // loop with a per-step mask made GCC copy every accumulator through another register each step:
  // ~20 extra moves a step, 15 -> 20 GB/s of int8 weight streamed from DRAM once removed.)
  auto step = [&](int64_t b, __mmask64 msk, auto full_tag) FASTLM_I8_VNNI_TARGET __attribute__((always_inline)) {
    __m512i wv[NR];
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) {
      if constexpr (decltype(full_tag)::value) wv[r] = _mm512_loadu_si512(w + r * ldw + b * 64);
      else wv[r] = _mm512_maskz_loadu_epi8(msk, w + r * ldw + b * 64);
    }
    if constexpr (PF) {
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) _mm_prefetch(reinterpret_cast<const char*>(w + (pfd + r) * ldw + b * 64), _MM_HINT_T1);
    }
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) dpbusd(acc[MR * NR * kDigits + r], ones, wv[r]);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
      for (int d = 0; d < kDigits; ++d) {
        const __m512i xv = _mm512_loadu_si512(xd + m * ldxd + (b * kDigits + d) * 64);
#pragma GCC unroll 8
        for (int r = 0; r < NR; ++r)
          dpbusd(acc[(m * NR + r) * kDigits + d], xv, wv[r]);
      }
  };
  for (int64_t b = 0; b < nfull; ++b) step(b, ~__mmask64(0), std::true_type{});
  if (K > nfull * 64) step(nfull, (~uint64_t(0)) >> (64 - (K - nfull * 64)), std::false_type{});
  alignas(64) int32_t s[32];
  hsum_epi32<NA>(acc, s);
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) {
      const int64_t corr = int64_t(128) * s[MR * NR * kDigits + r];
      const int32_t* a = s + (m * NR + r) * kDigits;
      const int64_t ws = s[MR * NR * kDigits + r];
      T[m * NR + r] = (int64_t(a[0]) - corr) * (int64_t(1) << 25) + (int64_t(a[1]) - corr) * (int64_t(1) << 17) +
                      int64_t(a[2]) * 512 + int64_t(a[3]) * 2 + ws;
    }
}

// Weight rows [n0, n1) for one input row: pairs of weight rows (a 1 x 2 register tile: 10 accumulators;
// 1 x 4 made GCC spill accumulators every step), then a single row.
template <typename T>
FASTLM_I8_VNNI_TARGET void vnni_rows_range(const int8_t* w, const float* scale, const uint8_t* xd, double xs,
                                           int64_t K, const float* bias, T* y, int64_t n0, int64_t n1) {
  const int64_t ldxd = (K + 63) / 64 * 64 * kDigits;
  // prefetch (to L2) the rows ~16 KB ahead: enough lines in flight to stream from DRAM
  const int64_t pfd = std::max<int64_t>(2, ((int64_t(16384) + K - 1) / K + 1) / 2 * 2);
  auto emit = [&](const int64_t* t, int64_t n, int nr) {
    for (int r = 0; r < nr; ++r)
      y[n + r] = static_cast<T>(static_cast<float>(double(t[r]) * xs * double(scale[n + r])) + bias[n + r]);
  };
  int64_t t[2];
  int64_t n = n0;
  for (; n + 2 <= n1; n += 2) {
    if (n + pfd + 2 <= n1) tile_vnni<1, 2, true>(w + n * K, K, xd, ldxd, K, t, pfd);
    else tile_vnni<1, 2, false>(w + n * K, K, xd, ldxd, K, t);
    emit(t, n, 2);
  }
  if (n < n1) {
    tile_vnni<1, 1, false>(w + n * K, K, xd, ldxd, K, t);
    emit(t, n, 1);
  }
}
#pragma GCC diagnostic pop

inline bool cpu_use_vnni() {
  static const bool ok = cpu_use_avx512() && __builtin_cpu_supports("avx512vnni");
  return ok && !(std::getenv("FASTLM_INT8_VNNI") && std::getenv("FASTLM_INT8_VNNI")[0] == '0');
}

// The VNNI path for fp32 rows xf (M x K), per-channel scales: false (nothing written) when it does not
// apply (no VNNI, group scales, K > kVnniMaxK, a non-finite input, or a row whose max|x| is so small
// or large that 2^-e is not a normal fp32); the caller then runs the widening kernel.
template <typename T>
bool vnni_few_rows(const int8_t* w, const float* scale, Groups g, const float* xf, int64_t M, int64_t K, int64_t N,
                   const float* bias, T* y) {
  if (M > kVnniMaxRows || g.G != 1 || K > kVnniMaxK || !cpu_use_vnni()) return false;
  const int64_t ldxd = (K + 63) / 64 * 64 * kDigits;
  std::vector<double> xs(M);
  std::vector<float> ps(M);
  for (int64_t m = 0; m < M; ++m) {
    float amax = 0.f;
    const float* r = xf + m * K;
    for (int64_t k = 0; k < K; ++k) {
      const float a = std::abs(r[k]);
      if (!(a <= 3.4028235e38f)) return false;  // NaN / inf
      amax = std::max(amax, a);
    }
    int e = 0;  // smallest e with amax <= 127 * 2^e
    if (amax > 0.f) {
      e = std::ilogb(amax) - 6;
      if (amax > std::ldexp(127.f, e)) ++e;
      if (e > 126 || e < -126) return false;
    }
    ps[m] = std::ldexp(1.f, -e);
    xs[m] = amax > 0.f ? std::ldexp(1.0, e - 25) : 0.0;  // a zero row: exactly 0
  }
  // Digits in a 64-byte aligned buffer.
  std::vector<uint8_t> buf(M * ldxd + 64);
  uint8_t* xd = buf.data() + ((64 - (reinterpret_cast<uintptr_t>(buf.data()) & 63)) & 63);
  for (int64_t m = 0; m < M; ++m) split_digits(xf + m * K, K, ps[m], xd + m * ldxd);
  const int64_t pairs = (N + 1) / 2;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(2 * K, 1));  // >= 64 KB
  parallel_range(0, pairs, grain, [&](int64_t b, int64_t e) {
    vnni_rows_range<T>(w, scale, xd, xs[0], K, bias, y, b * 2, std::min(N, e * 2));
  });
  return true;
}
#endif

#if defined(__AVX2__) && defined(__FMA__)
// ---------------------------------------------------------------- AVX2 int16 path (one row, int8 weights)
// The row as two int16 digits on a power-of-two scale, both dotted with the int8 weights (widened to
// int16, vpmaddwd: exact int32), combined exactly in int64: see the file comment.
constexpr int64_t kInt16MaxK = 65536;
constexpr int64_t kInt16Chunk = 4096;  // k per int32 lane: 4096 / 8 products * 127 * 32768 < 2^31

// Row x[0, K) -> digit planes hi, lo (Kp = K rounded up to 16 int16 each, zero past K), given p = 2^-e
// with max|x| p <= 32767: t = x p (exact), hi = round(t), lo = round(65536 (t - hi)) (t - hi exact),
// so x = 2^e (hi + lo / 65536) to within 2^(e-17). lo = 32768 (t - hi = 1/2 exactly) becomes hi + 1,
// lo = -32768 (hi + 1 <= 32767 there), so both fit int16.
inline void split_digits_i16(const float* x, int64_t K, float p, int16_t* hi, int16_t* lo) {
  const __m256 pv = _mm256_set1_ps(p), c65536 = _mm256_set1_ps(65536.f);
  const __m256i c32768 = _mm256_set1_epi32(32768), c65536i = _mm256_set1_epi32(65536);
  for (int64_t k = 0; k < K; k += 16) {
    __m256i h[2], l[2];
    for (int j = 0; j < 2; ++j) {
      const int64_t kk = k + 8 * j;
      __m256 v;
      if (kk + 8 <= K) {
        v = _mm256_loadu_ps(x + kk);
      } else {  // the tail: zeros past K (no read past the row)
        alignas(32) float tmp[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
        for (int64_t i = kk; i < K; ++i) tmp[i - kk] = x[i];
        v = _mm256_load_ps(tmp);
      }
      const __m256 t = _mm256_mul_ps(v, pv);
      const __m256 hr = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m256i l32 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_sub_ps(t, hr), c65536));  // nearest (MXCSR)
      const __m256i fix = _mm256_cmpeq_epi32(l32, c32768);                                  // -1 where lo = 32768
      h[j] = _mm256_sub_epi32(_mm256_cvtps_epi32(hr), fix);
      l[j] = _mm256_sub_epi32(l32, _mm256_and_si256(fix, c65536i));
    }
    // 2 x 8 int32 -> 16 int16 in order (packs works per 128-bit half: then swap the middle quarters)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(hi + k), _mm256_permute4x64_epi64(_mm256_packs_epi32(h[0], h[1]), 0xD8));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(lo + k), _mm256_permute4x64_epi64(_mm256_packs_epi32(l[0], l[1]), 0xD8));
  }
}

// T[r] = sum_k w[r][k] (65536 hi[k] + lo[k]) (exact) for NR weight rows (stride K). tile_i16_chunk, k
// in [c, ce) (a chunk of <= kInt16Chunk): per 16 k each weight row widened once (vpmovsxbw), two
// vpmaddwd + vpaddd (hi, lo) into 2 NR int32 accumulators (2 NR + 4 <= 16 ymm); 64 k a step, with
// the rows pfd ahead prefetched to L2 a line per row (PF); the lanes then added into int64 (s64).
// Not inlined: inlined into tile_i16's chunk loop (or with a memcpy'd K % 16 tail in its loops), GCC
// kept every accumulator on the stack, a load and a store per step. The K % 16 tail: scalar, at the end.
template <int NR, bool PF>
__attribute__((noinline)) void tile_i16_chunk(const int8_t* w, int64_t K, const int16_t* hi, const int16_t* lo, int64_t c, int64_t ce,
                           int64_t pfd, __m256i* s64) {
  static_assert(2 * NR + 4 <= 16, "ymm registers");
  __m256i acc[2 * NR];
#pragma GCC unroll 8
  for (int i = 0; i < 2 * NR; ++i) acc[i] = _mm256_setzero_si256();
  auto sub = [&](const int8_t* wp, int64_t k) __attribute__((always_inline)) {
    const __m256i xh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(hi + k));
    const __m256i xl = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lo + k));
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r) {  // one widened weight vector live at a time
      const __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wp + r * K)));
      madd_epi16_acc(acc[2 * r], wv, xh);
      madd_epi16_acc(acc[2 * r + 1], wv, xl);
    }
  };
  int64_t k = c;
  for (; k + 64 <= ce; k += 64) {
    if constexpr (PF) {
#pragma GCC unroll 4
      for (int r = 0; r < NR; ++r) _mm_prefetch(reinterpret_cast<const char*>(w + (pfd + r) * K + k), _MM_HINT_T1);
    }
    sub(w + k, k);
    sub(w + k + 16, k + 16);
    sub(w + k + 32, k + 32);
    sub(w + k + 48, k + 48);
  }
  for (; k + 16 <= ce; k += 16) sub(w + k, k);
  auto widen = [](__m256i v) __attribute__((always_inline)) {  // 8 int32 -> 4 int64 (pairs added)
    return _mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(v)), _mm256_cvtepi32_epi64(_mm256_extracti128_si256(v, 1)));
  };
#pragma GCC unroll 4
  for (int r = 0; r < NR; ++r)
    s64[r] = _mm256_add_epi64(s64[r], _mm256_add_epi64(_mm256_slli_epi64(widen(acc[2 * r]), 16), widen(acc[2 * r + 1])));
}

template <int NR, bool PF>
inline void tile_i16(const int8_t* w, int64_t K, const int16_t* hi, const int16_t* lo, int64_t* T, int64_t pfd) {
  __m256i s64[NR];  // per row: 4 int64 lanes of 65536 hi-dot + lo-dot
  for (int r = 0; r < NR; ++r) s64[r] = _mm256_setzero_si256();
  for (int64_t c = 0; c < K; c += kInt16Chunk) tile_i16_chunk<NR, PF>(w, K, hi, lo, c, std::min(K, c + kInt16Chunk), pfd, s64);
  const int64_t kt = K / 16 * 16;  // the K % 16 tail in scalar code, past the accumulators' live range
  for (int r = 0; r < NR; ++r) {
    alignas(32) int64_t l[4];
    _mm256_store_si256(reinterpret_cast<__m256i*>(l), s64[r]);
    int64_t t = l[0] + l[1] + l[2] + l[3];
    for (int64_t k = kt; k < K; ++k) t += int64_t(w[r * K + k]) * (65536 * int64_t(hi[k]) + lo[k]);
    T[r] = t;
  }
}

// Weight rows [n0, n1) for one input row: quads of weight rows (a 1 x 4 register tile: 8 accumulators),
// then single rows.
template <typename T>
void int16_rows_range(const int8_t* w, const float* scale, const int16_t* hi, const int16_t* lo, double xs, int64_t K,
                      const float* bias, T* y, int64_t n0, int64_t n1) {
  // prefetch (to L2) the rows ~16 KB ahead: enough lines in flight to stream from DRAM
  const int64_t pfd = std::max<int64_t>(4, ((int64_t(16384) + K - 1) / K + 3) / 4 * 4);
  auto emit = [&](const int64_t* t, int64_t n, int nr) {
    for (int r = 0; r < nr; ++r)
      y[n + r] = static_cast<T>(static_cast<float>(double(t[r]) * xs * double(scale[n + r])) + bias[n + r]);
  };
  int64_t t[4];
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) {
    if (n + pfd + 4 <= n1) tile_i16<4, true>(w + n * K, K, hi, lo, t, pfd);
    else tile_i16<4, false>(w + n * K, K, hi, lo, t, pfd);
    emit(t, n, 4);
  }
  for (; n < n1; ++n) {
    tile_i16<1, false>(w + n * K, K, hi, lo, t, pfd);
    emit(t, n, 1);
  }
}

// The AVX2 int16 path for one fp32 row, per-channel scales: false (nothing written) when it does not
// apply (an AVX-512 CPU: its own kernels; FASTLM_INT8_VNNI=0; more rows, group scales, K > kInt16MaxK,
// a non-finite input, or max|x| so small or large that 2^-e is not a normal fp32).
template <typename T>
bool int16_few_rows(const int8_t* w, const float* scale, Groups g, const float* xf, int64_t M, int64_t K, int64_t N,
                    const float* bias, T* y) {
  const char* env = std::getenv("FASTLM_INT8_VNNI");  // read per call: tests run both paths
  if (M != 1 || g.G != 1 || K > kInt16MaxK || cpu_use_avx512() || (env && env[0] == '0')) return false;
  float amax = 0.f;
  for (int64_t k = 0; k < K; ++k) {
    const float a = std::abs(xf[k]);
    if (!(a <= 3.4028235e38f)) return false;  // NaN / inf
    amax = std::max(amax, a);
  }
  int e = 0;  // smallest e with amax <= 32767 * 2^e
  if (amax > 0.f) {
    e = std::ilogb(amax) - 14;
    if (amax > std::ldexp(32767.f, e)) ++e;
    if (e > 126 || e < -126) return false;
  }
  const float p = std::ldexp(1.f, -e);
  const double xs = amax > 0.f ? std::ldexp(1.0, e - 16) : 0.0;  // a zero row: exactly 0
  const int64_t Kp = (K + 15) / 16 * 16;
  std::vector<int16_t> buf(2 * Kp + 16);
  int16_t* hi = buf.data() + ((32 - (reinterpret_cast<uintptr_t>(buf.data()) & 31)) & 31) / 2;
  int16_t* lo = hi + Kp;
  split_digits_i16(xf, K, p, hi, lo);
  const int64_t quads = (N + 3) / 4;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(4 * K, 1));  // >= 64 KB
  parallel_range(0, quads, grain, [&](int64_t b, int64_t e) {
    int16_rows_range<T>(w, scale, hi, lo, xs, K, bias, y, b * 4, std::min(N, e * 4));
  });
  return true;
}
#endif

// ---------------------------------------------------------------- the few-row driver
enum class Isa { kScalar, kAvx2, kAvx512 };

Isa pick_isa() {
#if defined(__x86_64__) || defined(_M_X64)
  if (cpu_use_avx512()) return Isa::kAvx512;
#endif
#if defined(__AVX2__) && defined(__FMA__)
  return Isa::kAvx2;
#else
  return Isa::kScalar;
#endif
}

// One (MR x nr) block of outputs for weight rows [n, n + nr) and input rows [m, m + MR): the dot of
// every group, times its scale, summed in fp32; then the bias.
template <Isa I, int MR, int NR, int U, typename WT>
inline void tile_dispatch(const WT* w, int64_t ldw, const float* x, int64_t ldx, int64_t K, float* out) {
#if defined(__x86_64__) || defined(_M_X64)
  if constexpr (I == Isa::kAvx512) return tile_avx512<MR, NR, U>(w, ldw, x, ldx, K, out);
#endif
#if defined(__AVX2__) && defined(__FMA__)
  if constexpr (I == Isa::kAvx2) return tile_avx2<MR, NR, U>(w, ldw, x, ldx, K, out);
#endif
  tile_scalar<MR, NR>(w, ldw, x, ldx, K, out);
}

template <Isa I, int MR, int NR, int U, typename WT>
inline void block_rows(const WT* wn, int64_t K, const float* xm, const float* sc /* scale + n * G */,
                       Groups g, float* acc /* [MR][NR] */) {
  float part[MR * NR];
  for (int i = 0; i < MR * NR; ++i) acc[i] = 0.f;
  for (int64_t gi = 0; gi < g.G; ++gi) {
    tile_dispatch<I, MR, NR, U>(wn + gi * g.gs, K, xm + gi * g.gs, K, g.gs, part);
    for (int m = 0; m < MR; ++m)
      for (int r = 0; r < NR; ++r) acc[m * NR + r] += part[m * NR + r] * sc[r * g.G + gi];
  }
}

// Weight rows [n0, n1) of y for all M (<= 16) rows: tiles of NR weight rows (then single rows at the
// end), the input rows in blocks of 4/2/1 against each tile.
template <Isa I, int NR, typename T, typename WT>
void rows_range(const WT* w, const float* scale, Groups g, const float* x, int64_t M, int64_t K, int64_t N,
                const float* bias, T* y, int64_t n0, int64_t n1) {
  auto emit = [&](const float* acc, int64_t m, int mr, int64_t n, int nr) {
    for (int i = 0; i < mr; ++i)
      for (int r = 0; r < nr; ++r) y[(m + i) * N + n + r] = static_cast<T>(acc[i * nr + r] + bias[n + r]);
  };
  auto tile = [&](auto nr_tag, int64_t n) {
    constexpr int nr = decltype(nr_tag)::value;
    const WT* wn = w + n * K;
    const float* sc = scale + n * g.G;
    float acc[4 * nr];
    int64_t m = 0;
    for (; M - m >= 4; m += 4) {
      block_rows<I, 4, nr, 1>(wn, K, x + m * K, sc, g, acc);
      emit(acc, m, 4, n, nr);
    }
    if (M - m >= 2) {
      block_rows<I, 2, nr, 2>(wn, K, x + m * K, sc, g, acc);
      emit(acc, m, 2, n, nr);
      m += 2;
    }
    if (M - m == 1) {
      block_rows<I, 1, nr, (I == Isa::kAvx2 ? 4 : 2)>(wn, K, x + m * K, sc, g, acc);
      emit(acc, m, 1, n, nr);
    }
  };
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) tile(std::integral_constant<int, NR>{}, n);
  for (; n < n1; ++n) tile(std::integral_constant<int, 1>{}, n);
}

template <Isa I, int NR, typename T, typename WT>
void few_rows_isa(const WT* w, const float* scale, Groups g, const float* x, int64_t M, int64_t K, int64_t N,
                  const float* bias, T* y) {
  const int64_t tiles = (N + NR - 1) / NR;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(NR * K, 1));  // >= 64 KB
  parallel_range(0, tiles, grain, [&](int64_t b, int64_t e) {
    rows_range<I, NR, T, WT>(w, scale, g, x, M, K, N, bias, y, b * NR, std::min(N, e * NR));
  });
}

// WT: int8_t (qweight, scale per channel / group) or at::BFloat16 (weight, scale all ones: exact).
template <typename T, typename WT>
void linear_int8_few_rows(const at::Tensor& x, const at::Tensor& qw, const at::Tensor& scale, Groups g,
                          const at::Tensor* bias, at::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1), N = qw.size(0);
  std::vector<float> xf(M * K), bf(N, 0.f);  // input rows and bias as fp32 once (tiny next to W)
  const T* xp = x.data_ptr<T>();
  for (int64_t m = 0; m < M; ++m) row_to_float(xp + m * x.stride(0), xf.data() + m * K, K);
  if (bias) row_to_float(bias->data_ptr<T>(), bf.data(), N);
  const WT* wp = static_cast<const WT*>(qw.data_ptr());
  const float* sp = scale.data_ptr<float>();
  T* yp = y.data_ptr<T>();
#if defined(__x86_64__) || defined(_M_X64)
  if constexpr (std::is_same_v<WT, int8_t>)
    if (vnni_few_rows<T>(wp, sp, g, xf.data(), M, K, N, bf.data(), yp)) return;
#endif
#if defined(__AVX2__) && defined(__FMA__)
  if constexpr (std::is_same_v<WT, int8_t>)
    if (int16_few_rows<T>(wp, sp, g, xf.data(), M, K, N, bf.data(), yp)) return;
#endif
  switch (pick_isa()) {
    case Isa::kAvx512:
      return few_rows_isa<Isa::kAvx512, 4, T, WT>(wp, sp, g, xf.data(), M, K, N, bf.data(), yp);
    case Isa::kAvx2:
      return few_rows_isa<Isa::kAvx2, 2, T, WT>(wp, sp, g, xf.data(), M, K, N, bf.data(), yp);
    default:
      return few_rows_isa<Isa::kScalar, 2, T, WT>(wp, sp, g, xf.data(), M, K, N, bf.data(), yp);
  }
}

// ---------------------------------------------------------------- dequantize (the many-row panel)
// out (N, K) fp32 = qweight * scale, row-parallel; the same product the reference forms.
void dequantize_into(const at::Tensor& qw, const at::Tensor& scale, Groups g, float* out) {
  const int64_t N = qw.size(0), K = qw.size(1);
  const int8_t* wp = qw.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(K, 1));
  at::parallel_for(0, N, grain, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n)
      for (int64_t gi = 0; gi < g.G; ++gi) {
        const float s = sp[n * g.G + gi];
        const int8_t* src = wp + n * K + gi * g.gs;
        float* dst = out + n * K + gi * g.gs;
#pragma GCC ivdep
        for (int64_t k = 0; k < g.gs; ++k) dst[k] = static_cast<float>(src[k]) * s;
      }
  });
}

Groups check_quantized(const at::Tensor& qw, const at::Tensor& scale, const char* op) {
  FASTLM_CHECK(qw.defined() && qw.dim() == 2, op, "qweight must be 2-D (out_features, in_features)");
  FASTLM_CHECK(qw.scalar_type() == at::kChar, op, "qweight must be int8, got ", qw.scalar_type());
  FASTLM_CHECK(qw.is_contiguous(), op, "qweight must be contiguous");
  const int64_t N = qw.size(0), K = qw.size(1);
  FASTLM_CHECK(scale.defined() && scale.scalar_type() == at::kFloat, op, "scale must be float32");
  FASTLM_CHECK(scale.device() == qw.device(), op, "scale is on ", scale.device(), ", qweight on ", qw.device());
  FASTLM_CHECK(scale.is_contiguous(), op, "scale must be contiguous");
  FASTLM_CHECK((scale.dim() == 1 || scale.dim() == 2) && scale.size(0) == N, op,
               "scale must be (out_features,) or (out_features, groups) with out_features ", N, ", got ",
               scale.sizes());
  const int64_t G = scale.dim() == 2 ? scale.size(1) : 1;
  FASTLM_CHECK(G >= 1 && (K == 0 || K % G == 0), op, "scale's ", G, " groups must divide in_features ", K);
  return {G, G > 0 ? K / G : K};
}

at::Tensor linear_int8_dequant_cpu(const at::Tensor& qweight, const at::Tensor& scale) {
  const Groups g = check_quantized(qweight, scale, "linear_int8_dequant");
  at::Tensor out = new_output({qweight.size(0), qweight.size(1)}, scale.options());
  if (out.numel() > 0) dequantize_into(qweight, scale, g, out.data_ptr<float>());
  return out;
}

at::Tensor linear_int8_fwd_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                               const std::optional<at::Tensor>& bias) {
  check_rows(x, kOp, "input");
  const Groups g = check_quantized(qweight, scale, kOp);
  FASTLM_CHECK(qweight.device() == x.device(), kOp, "qweight is on ", qweight.device(), ", input on ", x.device());
  FASTLM_CHECK(qweight.size(1) == x.size(1), kOp, "qweight has ", qweight.size(1), " input features, input has ",
               x.size(1));
  const int64_t M = x.size(0), N = qweight.size(0), K = x.size(1);
  check_vector(bias, N, x, kOp, "bias");
  const at::Tensor* b = opt_ptr(bias);
  if (M > kFewRows) {  // compute bound: widen the weight once, then BLAS in fp32
    const at::Tensor w = linear_int8_dequant_cpu(qweight, scale);
    const at::Tensor xf = x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);
    const std::optional<at::Tensor> bf = b ? std::optional<at::Tensor>(b->to(at::kFloat)) : std::nullopt;
    at::Tensor y = at::linear(xf, w, bf);
    return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
  }
  at::Tensor y = new_output({M, N}, x.options());
  if (y.numel() == 0) return y;
  if (K == 0) {
    if (b) y.copy_(b->unsqueeze(0).expand({M, N})); else y.zero_();
    return y;
  }
  FASTLM_DISPATCH_FLOAT_TYPES(x.scalar_type(), kOp,
                              [&] { linear_int8_few_rows<scalar_t, int8_t>(x, qweight, scale, g, b, y); });
  return y;
}

// y = x @ weight^T + bias with a bf16 weight and x in fp32/fp16/bf16 (weight-only bf16: the weight
// widened to fp32 in registers, exact; fp32 accumulation), y in x's dtype. Few rows: the int8 kernel's
// tiles on bf16 loads (2 bytes a weight); many rows: the weight widened once, then at::linear in fp32.
at::Tensor linear_w16_fwd_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "linear_w16_fwd";
  check_rows(x, op, "input");
  FASTLM_CHECK(weight.defined() && weight.dim() == 2, op, "weight must be 2-D (out_features, in_features)");
  FASTLM_CHECK(weight.scalar_type() == at::kBFloat16, op, "weight must be bfloat16, got ", weight.scalar_type());
  FASTLM_CHECK(weight.is_contiguous(), op, "weight must be contiguous");
  FASTLM_CHECK(weight.device() == x.device(), op, "weight is on ", weight.device(), ", input on ", x.device());
  FASTLM_CHECK(weight.size(1) == x.size(1), op, "weight has ", weight.size(1), " input features, input has ",
               x.size(1));
  const int64_t M = x.size(0), N = weight.size(0), K = x.size(1);
  check_vector(bias, N, x, op, "bias");
  const at::Tensor* b = opt_ptr(bias);
  if (M > kFewRows || K == 0) {
    const at::Tensor xf = x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);
    const std::optional<at::Tensor> bf = b ? std::optional<at::Tensor>(b->to(at::kFloat)) : std::nullopt;
    at::Tensor y = at::linear(xf, weight.to(at::kFloat), bf);
    return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
  }
  at::Tensor y = new_output({M, N}, x.options());
  if (y.numel() == 0) return y;
  const at::Tensor ones = at::ones({N}, x.options().dtype(at::kFloat));
  FASTLM_DISPATCH_FLOAT_TYPES(x.scalar_type(), op, [&] {
    linear_int8_few_rows<scalar_t, at::BFloat16>(x, weight, ones, Groups{1, K}, b, y);
  });
  return y;
}

// ---------------------------------------------------------------- quantize (fastlm.quantize)
// Round to nearest even, as torch.round: the fp32 magic-number trick (|v| < 2^22 here).
inline float round_even(float v) { return (v + 12582912.f) - 12582912.f; }

// Squared error of quantizing row[0, L) with scale s: sum (clamp(round(w / s), -127, 127) * s - w)^2.
inline float quant_error(const float* row, int64_t L, float s) {
  float e = 0.f;
#pragma GCC ivdep
  for (int64_t i = 0; i < L; ++i) {
    const float q = std::min(127.f, std::max(-127.f, round_even(row[i] / s)));
    const float d = q * s - row[i];
    e += d * d;
  }
  return e;
}

// weight (N, K) fp32 -> (qweight (N, K) int8, scale (N,) or (N, K / group) fp32): symmetric,
// round to nearest even. search: each row's (group's) scale is clip * max|w| / 127 with the clip of
// least squared error among 0.50, 0.55, ..., 1.00 and then the best +- 0.01 .. 0.04 (within [0.3, 1]);
// else clip = 1. A zero row (group): scale 1, zeros. fastlm/nn/quant_linear.py holds the same math in
// PyTorch (the fallback without the extension).
std::tuple<at::Tensor, at::Tensor> linear_int8_quantize_cpu(const at::Tensor& weight, int64_t group_size,
                                                            bool search) {
  constexpr const char* op = "linear_int8_quantize";
  FASTLM_CHECK(weight.defined() && weight.dim() == 2 && weight.scalar_type() == at::kFloat && weight.is_contiguous(),
               op, "weight must be a contiguous 2-D float32 tensor");
  const int64_t N = weight.size(0), K = weight.size(1);
  FASTLM_CHECK(group_size >= 0 && (group_size == 0 || (K % group_size == 0)), op, "group_size ", group_size,
               " must be 0 (per channel) or divide in_features ", K);
  const int64_t L = group_size ? group_size : K, G = group_size ? K / group_size : 1;
  at::Tensor q = at::empty({N, K}, weight.options().dtype(at::kChar));
  at::Tensor scale = group_size ? at::empty({N, G}, weight.options()) : at::empty({N}, weight.options());
  const float* wp = weight.data_ptr<float>();
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = scale.data_ptr<float>();
  const int64_t rows = N * G;
  at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(L, 1)), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const float* row = wp + r * L;
      float amax = 0.f;
      for (int64_t i = 0; i < L; ++i) amax = std::max(amax, std::abs(row[i]));
      float s = 1.f;
      if (amax > 0.f) {
        float best_clip = 1.f;
        if (search) {
          float best_err = quant_error(row, L, amax * 1.f / 127.f);
          auto consider = [&](float clip) {
            const float err = quant_error(row, L, amax * clip / 127.f);
            if (err < best_err) best_err = err, best_clip = clip;
          };
          for (int c = 10; c < 20; ++c) consider(0.5f + 0.05f * float(c - 10));
          const float coarse = best_clip;
          for (int f = -4; f <= 4; ++f)
            if (f != 0) consider(std::min(1.f, std::max(0.3f, coarse + 0.01f * float(f))));
        }
        s = amax * best_clip / 127.f;
      }
      sp[r] = s;
      int8_t* qr = qp + r * L;
      for (int64_t i = 0; i < L; ++i)
        qr[i] = static_cast<int8_t>(amax > 0.f ? std::min(127.f, std::max(-127.f, round_even(row[i] / s))) : 0.f);
    }
  });
  return {q, scale};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlm_C, CPU, m) {
  m.impl("linear_int8_fwd", &linear_int8_fwd_cpu);
  m.impl("linear_int8_dequant", &linear_int8_dequant_cpu);
  m.impl("linear_w16_fwd", &linear_w16_fwd_cpu);
  m.impl("linear_int8_quantize", &linear_int8_quantize_cpu);
}

}  // namespace fastlm::cpu

// The kernels of the few-row linear (csrc/cpu/linear.cpp) shared with the screened argmax
// (csrc/cpu/linear_argmax.cpp), which recomputes candidate logits with exactly the arithmetic
// linear_fwd uses for one input row on the same ISA path: AVX-512, the register tile
// tile_avx512<1, NR, 2> over the whole K (the same value for a W row whatever NR); otherwise the
// one-row stream row_times_rows<1, 4> (AVX2 + FMA when built with them, else scalar).
#pragma once
#include <algorithm>
#include <cstdint>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace fastlm::cpu {

// y[m] = sum_k w[k] * x[m][k] for one W row and MR input rows (row stride ldx), with U k-steps
// unrolled: MR * U independent fp32 accumulators (>= 4 hide the FMA latency). The W row is one
// sequential stream that the hardware prefetcher follows; the x rows sit in L1/L2.
template <int MR, int U>
inline void row_times_rows(const float* w, const float* x, int64_t ldx, int64_t K, float* y) {
  int64_t k = 0;
  float s[MR];
  for (int m = 0; m < MR; ++m) s[m] = 0.f;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 acc[MR][U];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) acc[m][u] = _mm256_setzero_ps();
  for (; k + 8 * U <= K; k += 8 * U) {
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) {
      const __m256 wv = _mm256_loadu_ps(w + k + 8 * u);
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) acc[m][u] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * ldx + k + 8 * u), acc[m][u]);
    }
  }
  for (; k + 8 <= K; k += 8) {
    const __m256 wv = _mm256_loadu_ps(w + k);
    for (int m = 0; m < MR; ++m) acc[m][0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * ldx + k), acc[m][0]);
  }
  for (int m = 0; m < MR; ++m) {
    __m256 t = acc[m][0];
    for (int u = 1; u < U; ++u) t = _mm256_add_ps(t, acc[m][u]);
    __m128 lo = _mm256_castps256_ps128(t), hi = _mm256_extractf128_ps(t, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
    s[m] = _mm_cvtss_f32(lo);
  }
#endif
  for (int m = 0; m < MR; ++m) {
    for (int64_t kk = k; kk < K; ++kk) s[m] += w[kk] * x[m * ldx + kk];
    y[m] = s[m];
  }
}

}  // namespace fastlm::cpu

#if defined(__x86_64__) || defined(_M_X64)
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <cstdint>

namespace fastlm::cpu {

// (GCC 12 warns that _mm512_undefined_ps inside its own reduce intrinsics is uninitialized: noise.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define FASTLM_TILE_TARGET __attribute__((target("avx512f,avx512bw,avx512vl")))

// 16 W values from p as fp32 (all 16, or the lanes of msk; no read past them): fp32 as is, bf16 by
// a 16-bit shift, fp16 by vcvtph2ps (both exact).
FASTLM_TILE_TARGET inline __m512 load_w16(const float* p) { return _mm512_loadu_ps(p); }
FASTLM_TILE_TARGET inline __m512 load_w16(const float* p, __mmask16 msk) { return _mm512_maskz_loadu_ps(msk, p); }
FASTLM_TILE_TARGET inline __m512 bf16_to_ps(__m256i v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
FASTLM_TILE_TARGET inline __m512 load_w16(const c10::BFloat16* p) {
  return bf16_to_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
FASTLM_TILE_TARGET inline __m512 load_w16(const c10::BFloat16* p, __mmask16 msk) {
  return bf16_to_ps(_mm256_maskz_loadu_epi16(msk, p));
}
FASTLM_TILE_TARGET inline __m512 load_w16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
FASTLM_TILE_TARGET inline __m512 load_w16(const c10::Half* p, __mmask16 msk) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(msk, p));
}

// AVX-512 register tile: NR W rows x MR input rows, 16 k per step, MR * NR * U accumulators
// (<= 24 of the 32 zmm registers); W and x are each loaded once per tile step and reused from
// registers (linear.cpp's single-W-row AVX2 kernel needs one x load per FMA: load bound at 8 rows).
// W is fp32, bf16 or fp16 (widened to fp32 as loaded), x fp32, accumulation fp32. Compiled for
// AVX-512 by attribute; callers check cpu_use_avx512() at run time.
template <int MR, int NR, int U, typename WT = float>
FASTLM_TILE_TARGET inline void tile_avx512(const WT* w, int64_t ldw, const float* x, int64_t ldx, int64_t K,
                                           float* out /* [MR][NR], += */) {
  __m512 acc[MR][NR][U];
#pragma GCC unroll 64
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r)
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u) acc[m][r][u] = _mm512_setzero_ps();
  // Prefetch distance: the W rows ~16 KB after this tile's (a whole number of tiles, at least the next
  // one), into L2 (see below).
  const int64_t row_bytes = ldw * static_cast<int64_t>(sizeof(WT));
  const int64_t pfd = std::max<int64_t>(1, (int64_t(16384) + NR * row_bytes - 1) / (NR * row_bytes)) * NR;
  int64_t k = 0;
  for (; k + 16 * U <= K; k += 16 * U) {
    __m512 wv[NR][U];
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r)
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u) wv[r][u] = load_w16(w + r * ldw + k + 16 * u);
    // Prefetch the W rows pfd ahead (contiguous after this tile's), a line per row and step, to L2:
    // enough lines in flight for one core to stream W from DRAM near the plain read rate (the next
    // tile only, to L1, reached ~55% of it; prefetching past the end of W is harmless).
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r)
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u)
        _mm_prefetch(reinterpret_cast<const char*>(w + (pfd + r) * ldw + k + 16 * u), _MM_HINT_T1);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u) {
        __m512 xv = _mm512_loadu_ps(x + m * ldx + k + 16 * u);
        // Keep xv in a register: GCC otherwise folds the load into each of the NR FMAs (NR loads
        // of the same vector; measured 8 rows, GPT-2 small's 48 matrices: 9.8 -> 8.7 ms).
        asm("" : "+v"(xv));
#pragma GCC unroll 8
        for (int r = 0; r < NR; ++r) acc[m][r][u] = _mm512_fmadd_ps(wv[r][u], xv, acc[m][r][u]);
      }
  }
  for (; k < K; k += 16) {  // tail: masked
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
      out[m * NR + r] += _mm512_reduce_add_ps(t);
    }
}

#pragma GCC diagnostic pop

}  // namespace fastlm::cpu
#endif

// GELU over fp32 values for the CPU kernels' fused epilogues (linear_w8a8's activation, gelu_ffn's
// bias + GELU pass), 16 lanes (AVX-512) or 8 (AVX2 + FMA) at a time:
// - "tanh": 0.5 x (1 + tanh(u)) = x / (1 + exp(-2u)), u = sqrt(2/pi) (x + 0.044715 x^3), through
//   exp512 / exp256 (relative error ~1e-7; a few fp32 ulps from torch's tanh form, ~5x faster than
//   at::vec's Sleef tanh in this build);
// - "erf": x * 0.5 * (1 + erf(x / sqrt(2))) with torch's own vectorized erf formula (Abramowitz &
//   Stegun 7.1.26: t = 1 / (1 + p |z|), erf |z| = 1 - t r(t) exp(-z^2), the same coefficients and
//   order as ATen's Vectorized<float>::erf, which torch's F.gelu runs) but exp from exp512 / exp256
//   instead of Sleef: within a few ulps of F.gelu. Measured 1 thread, Zen 4, linear_w8a8 128 x 384
//   -> 1536 with the erf GELU fused: at::vec's erf (Sleef exp, AVX2) added ~530 us to a ~360 us GEMM,
//   this ~60 (see linear_w8a8.cpp).
// x = +inf gives inf, x = -inf NaN (as torch's: -inf * 0), NaN stays NaN.
#pragma once
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstdint>

#include "cpu/exp512.h"
#include "cpu/vec_utils.h"

namespace fastlm::cpu {

// Abramowitz & Stegun 7.1.26 as ATen's Vectorized<float>::erf writes it.
constexpr float kErfP = 0.3275911f, kErfA1 = 0.254829592f, kErfA2 = -0.284496736f, kErfA3 = 1.421413741f,
                kErfA4 = -1.453152027f, kErfA5 = 1.061405429f;

#if defined(__x86_64__) || defined(_M_X64)
__attribute__((target("avx512f"))) inline __m512 gelu_tanh512(__m512 x) {
  const __m512 c = _mm512_set1_ps(-2.f * 0.7978845608028654f), a = _mm512_set1_ps(0.044715f);
  const __m512 t = _mm512_mul_ps(c, _mm512_fmadd_ps(_mm512_mul_ps(a, x), _mm512_mul_ps(x, x), x));  // -2u
  return _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.f), exp512<false>(t)));
}

// erf(z), 16 lanes (ATen's formula, exp512 for exp(-z^2)).
__attribute__((target("avx512f"))) inline __m512 erf512(__m512 z) {
  const __m512 one = _mm512_set1_ps(1.f);
  const __m512 t = _mm512_div_ps(one, _mm512_fmadd_ps(_mm512_set1_ps(kErfP), _mm512_abs_ps(z), one));
  __m512 r = _mm512_fmadd_ps(_mm512_set1_ps(kErfA5), t, _mm512_set1_ps(kErfA4));
  r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(kErfA3));
  r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(kErfA2));
  r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(kErfA1));
  const __m512 e = exp512<false>(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(z, z)));   // exp(-z^2)
  const __m512 ea = _mm512_fmadd_ps(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(e, t)), r, one);
  // sign(z) * ea: z's sign bit moved onto ea
  return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(ea),
                                             _mm512_and_si512(_mm512_castps_si512(z), _mm512_set1_epi32(INT32_MIN))));
}

__attribute__((target("avx512f"))) inline __m512 gelu_erf512(__m512 x) {
  const __m512 e = erf512(_mm512_mul_ps(x, _mm512_set1_ps(0.70710678118654752440f)));
  return _mm512_mul_ps(_mm512_mul_ps(x, _mm512_set1_ps(0.5f)), _mm512_add_ps(_mm512_set1_ps(1.f), e));
}

__attribute__((target("avx512f"))) inline void gelu_row_avx512(float* y, int64_t n, bool tanh_approx) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 msk = n - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - i)) - 1);
    const __m512 x = _mm512_maskz_loadu_ps(msk, y + i);
    _mm512_mask_storeu_ps(y + i, msk, tanh_approx ? gelu_tanh512(x) : gelu_erf512(x));
  }
}
#endif

#if defined(__AVX2__) && defined(__FMA__)
// exp(x) for any x: exp256 (written for x <= 0, whose 2^n overflows past 127) with x capped at 88
// (exp(88) ~ 1.65e38, finite: x / (1 + it) and 2 / (1 + it) then round to 0 as with inf); NaN stays
// NaN (vminps returns its second operand, x, on NaN).
inline __m256 exp256_capped(__m256 x) { return exp256(_mm256_min_ps(_mm256_set1_ps(88.f), x)); }

inline __m256 gelu_tanh256(__m256 x) {
  const __m256 c = _mm256_set1_ps(-2.f * 0.7978845608028654f), a = _mm256_set1_ps(0.044715f);
  const __m256 t = _mm256_mul_ps(c, _mm256_fmadd_ps(_mm256_mul_ps(a, x), _mm256_mul_ps(x, x), x));  // -2u
  return _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.f), exp256_capped(t)));
}

// erf(z), 8 lanes (ATen's formula, exp256 for exp(-z^2)).
inline __m256 erf256(__m256 z) {
  const __m256 one = _mm256_set1_ps(1.f), sign = _mm256_set1_ps(-0.f);
  const __m256 t = _mm256_div_ps(one, _mm256_fmadd_ps(_mm256_set1_ps(kErfP), _mm256_andnot_ps(sign, z), one));
  __m256 r = _mm256_fmadd_ps(_mm256_set1_ps(kErfA5), t, _mm256_set1_ps(kErfA4));
  r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(kErfA3));
  r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(kErfA2));
  r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(kErfA1));
  const __m256 e = exp256(_mm256_xor_ps(sign, _mm256_mul_ps(z, z)));   // exp(-z^2)
  const __m256 ea = _mm256_fmadd_ps(_mm256_xor_ps(sign, _mm256_mul_ps(e, t)), r, one);
  return _mm256_or_ps(ea, _mm256_and_ps(sign, z));
}

inline __m256 gelu_erf256(__m256 x) {
  const __m256 e = erf256(_mm256_mul_ps(x, _mm256_set1_ps(0.70710678118654752440f)));
  return _mm256_mul_ps(_mm256_mul_ps(x, _mm256_set1_ps(0.5f)), _mm256_add_ps(_mm256_set1_ps(1.f), e));
}
#endif

// y[0, n) = GELU(y) in place; tanh_approx: the tanh form, else the erf form.
inline void gelu_row_fp32(float* y, int64_t n, bool tanh_approx) {
#if defined(__x86_64__) || defined(_M_X64)
  if (cpu_use_avx512()) return gelu_row_avx512(y, n, tanh_approx);
#endif
  int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_loadu_ps(y + i);
    _mm256_storeu_ps(y + i, tanh_approx ? gelu_tanh256(x) : gelu_erf256(x));
  }
#endif
  const float c = 0.7978845608028654f, a = 0.044715f, r2 = 0.7071067811865476f;
  for (; i < n; ++i) {
    const float x = y[i];
    y[i] = tanh_approx ? 0.5f * x * (1.f + std::tanh(c * (x + a * x * x * x))) : x * 0.5f * (1.f + std::erf(x * r2));
  }
}

}  // namespace fastlm::cpu

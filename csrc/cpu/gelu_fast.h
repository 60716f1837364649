// GELU over a row of fp32 values in place, for the int8 kernels' fused epilogues (linear_w8a8's
// activation). "tanh": 0.5 x (1 + tanh(u)) = x / (1 + exp(-2u)), u = sqrt(2/pi) (x + 0.044715 x^3),
// with exp512 / exp256 (relative error ~1e-7; a few fp32 ulps from torch's tanh form, ~5x faster than
// at::vec's tanh); "erf": 0.5 x (1 + erf(x / sqrt(2))) with at::vec's erf (torch's own, already fast).
// x = +inf gives inf, x = -inf NaN (as torch's tanh form: -inf * 0), NaN stays NaN.
#pragma once
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstdint>

#include "cpu/exp512.h"
#include "cpu/vec_utils.h"

namespace fastlm::cpu {

#if defined(__x86_64__) || defined(_M_X64)
__attribute__((target("avx512f"))) inline void gelu_tanh_row_avx512(float* y, int64_t n) {
  const __m512 c = _mm512_set1_ps(-2.f * 0.7978845608028654f), a = _mm512_set1_ps(0.044715f),
               one = _mm512_set1_ps(1.f);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 msk = n - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - i)) - 1);
    const __m512 x = _mm512_maskz_loadu_ps(msk, y + i);
    const __m512 t = _mm512_mul_ps(c, _mm512_fmadd_ps(_mm512_mul_ps(a, x), _mm512_mul_ps(x, x), x));  // -2u
    _mm512_mask_storeu_ps(y + i, msk, _mm512_div_ps(x, _mm512_add_ps(one, exp512<false>(t))));
  }
}
#endif

// y[0, n) = GELU(y) in place; tanh_approx: the tanh form, else the erf form.
inline void gelu_row_fp32(float* y, int64_t n, bool tanh_approx) {
#if defined(__x86_64__) || defined(_M_X64)
  if (tanh_approx && cpu_use_avx512()) return gelu_tanh_row_avx512(y, n);
#endif
  using fVec = at::vec::Vectorized<float>;
  const int64_t V = fVec::size();
  const float c = 0.7978845608028654f, a = 0.044715f, r2 = 0.7071067811865476f;
  int64_t i = 0;
  for (; i + V <= n; i += V) {
    const fVec x = fVec::loadu(y + i);
    const fVec r = tanh_approx ? fVec(0.5f) * x * (fVec(1.f) + (fVec(c) * (x + fVec(a) * x * x * x)).tanh())
                               : fVec(0.5f) * x * (fVec(1.f) + (x * fVec(r2)).erf());
    r.store(y + i);
  }
  for (; i < n; ++i) {
    const float x = y[i];
    y[i] = tanh_approx ? 0.5f * x * (1.f + std::tanh(c * (x + a * x * x * x))) : 0.5f * x * (1.f + std::erf(x * r2));
  }
}

}  // namespace fastlm::cpu

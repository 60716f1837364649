// exp(x) on 16 fp32 lanes (exp512) and on 8 (exp256, in AVX2 + FMA builds) for softmax arguments
// (x <= 0), shared by the CPU attention and decode attention kernels. Cody-Waite reduction
// x = n ln2 + r, |r| <= ln2/2, degree-6 Taylor polynomial (relative error ~1e-7), scaled by 2^n with
// vscalefps (exp(-127) and below underflow to 0).
// kNanIsZero: a NaN lane gives 0; otherwise (what the attention kernels use) NaN propagates: a NaN
// score must make a NaN output, as torch's.
#pragma once
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

namespace fastlm::cpu {

template <bool kNanIsZero = true>
__attribute__((target("avx512f"))) inline __m512 exp512(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-127.f);
  // vmaxps returns its second operand when either is NaN
  x = kNanIsZero ? _mm512_max_ps(x, lo) : _mm512_max_ps(lo, x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.f / 720.f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

#if defined(__AVX2__) && defined(__FMA__)
// exp(x) on 8 fp32 lanes for softmax arguments (x <= 0): exp512's Cody-Waite reduction and degree-6
// polynomial, scaled by 2^n through the exponent bits (2^n for n < -126 flushed to 0, where exp512
// keeps the subnormal); a NaN lane stays NaN (vmaxps returns its second operand, x, on NaN).
inline __m256 exp256(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-127.f), x);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187e-06f), r);
  __m256 p = _mm256_set1_ps(1.f / 720.f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
  const __m256i ok = _mm256_cmpgt_epi32(e, _mm256_setzero_si256());   // NaN: cvt gives INT_MIN, not ok
  return _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_and_si256(_mm256_slli_epi32(e, 23), ok)));
}
#endif

}  // namespace fastlm::cpu
#endif

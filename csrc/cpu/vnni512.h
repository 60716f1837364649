// AVX-512 VNNI helpers of the int8 kernels (linear_int8's one-row tile, linear_argmax's VNNI screen):
// an in-place vpdpbusd and the end-of-tile horizontal sums of many int32 accumulators.
#pragma once
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include <cstdint>

namespace fastlm::cpu {

// acc += the dot of each 4-byte group of a (u8) and b (s8), per int32 lane. Inline asm, not
// _mm512_dpbusd_epi32: with the intrinsic GCC (12-14) copies every accumulator through another
// register (or the stack) each loop step in tiles of 8+ accumulators; "+v" keeps each one in place.
__attribute__((target("avx512f,avx512vnni"), always_inline)) inline void dpbusd(__m512i& acc, __m512i a, __m512i b) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
}

// a[0..16) -> out lane i = the sum of a[i]'s 16 int32 lanes (wrapping int32 adds).
__attribute__((target("avx512f"), always_inline)) inline __m512i hsum16_epi32(const __m512i (&a)[16]) {
  __m512i t[8], u[4], w[2];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i)
    t[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_epi32(a[2 * i], a[2 * i + 1]));
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j)
    u[j] = _mm512_add_epi32(_mm512_unpacklo_epi64(t[2 * j], t[2 * j + 1]), _mm512_unpackhi_epi64(t[2 * j], t[2 * j + 1]));
#pragma GCC unroll 2
  for (int j = 0; j < 2; ++j)
    w[j] = _mm512_add_epi32(_mm512_shuffle_i32x4(u[2 * j], u[2 * j + 1], 0x88), _mm512_shuffle_i32x4(u[2 * j], u[2 * j + 1], 0xDD));
  return _mm512_add_epi32(_mm512_shuffle_i32x4(w[0], w[1], 0x88), _mm512_shuffle_i32x4(w[0], w[1], 0xDD));
}

// acc[0..n) (n <= 32) -> out[i] = the sum of acc[i]'s lanes.
template <int n>
__attribute__((target("avx512f"), always_inline)) inline void hsum_epi32(const __m512i* acc, int32_t* out) {
  static_assert(n <= 32, "at most 32 accumulators");
  __m512i v[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) v[i] = i < n ? acc[i] : _mm512_setzero_si512();
  _mm512_storeu_si512(out, hsum16_epi32(v));
  if constexpr (n > 16) {
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) v[i] = 16 + i < n ? acc[16 + i] : _mm512_setzero_si512();
    _mm512_storeu_si512(out + 16, hsum16_epi32(v));
  }
}

}  // namespace fastlm::cpu
#endif

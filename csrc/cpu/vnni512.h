// Helpers of the integer int8 kernels (linear_int8's one-row tiles, linear_argmax's integer screens):
// AVX-512 VNNI: an in-place vpdpbusd and the end-of-tile horizontal sums of many int32 accumulators;
// AVX2 (the int16 paths, vpmaddwd): the same horizontal sums on ymm accumulators.
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

#if defined(__AVX2__)
// acc += vpmaddwd(w, x): per int32 lane, the sum of two s16 x s16 products (exact). Inline asm, not
// _mm256_add_epi32(acc, _mm256_madd_epi16(w, x)): GCC reassociates the integer adds of an unrolled
// loop into a tree of products, and spills them to the stack; "+x" keeps each accumulator in place.
// x in a register: loaded once for the NR weight rows it meets (folded into each vpmaddwd, the loads
// outnumber what the load ports take per cycle: a 4x2 tile ~15% slower in one microbenchmark).
__attribute__((always_inline)) inline void madd_epi16_acc(__m256i& acc, __m256i w, __m256i x) {
  __m256i t;
  asm("vpmaddwd %[x], %[w], %[t]\n\tvpaddd %[t], %[acc], %[acc]" : [acc] "+x"(acc), [t] "=&x"(t) : [w] "x"(w), [x] "x"(x));
}

// a[0..8) -> lane i = the sum of a[i]'s 8 int32 lanes (wrapping int32 adds): a transpose-add tree,
// 21 instructions for 8 sums (unpack 32, unpack 64, then the two 128-bit halves).
__attribute__((always_inline)) inline __m256i hsum8_epi32(const __m256i (&a)[8]) {
  __m256i t[4], u[2];
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i)
    t[i] = _mm256_add_epi32(_mm256_unpacklo_epi32(a[2 * i], a[2 * i + 1]), _mm256_unpackhi_epi32(a[2 * i], a[2 * i + 1]));
#pragma GCC unroll 2
  for (int j = 0; j < 2; ++j)
    u[j] = _mm256_add_epi32(_mm256_unpacklo_epi64(t[2 * j], t[2 * j + 1]), _mm256_unpackhi_epi64(t[2 * j], t[2 * j + 1]));
  return _mm256_add_epi32(_mm256_permute2x128_si256(u[0], u[1], 0x20), _mm256_permute2x128_si256(u[0], u[1], 0x31));
}

// acc[0..n) (n <= 16) -> out[i] = the sum of acc[i]'s lanes (out: 8 or 16 int32).
template <int n>
__attribute__((always_inline)) inline void hsum_epi32_avx2(const __m256i* acc, int32_t* out) {
  static_assert(n <= 16, "at most 16 accumulators");
  __m256i v[8];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) v[i] = i < n ? acc[i] : _mm256_setzero_si256();
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), hsum8_epi32(v));
  if constexpr (n > 8) {
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) v[i] = 8 + i < n ? acc[8 + i] : _mm256_setzero_si256();
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 8), hsum8_epi32(v));
  }
}
#endif  // AVX2

}  // namespace fastlm::cpu
#endif

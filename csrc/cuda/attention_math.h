// Math shared by the CPU (csrc/cpu/attention.cpp) and CUDA (csrc/cuda/attention*.cu) attention
// kernels: the dropout RNG. __host__ __device__ inline, so the CPU tests exercise the very code the
// GPU runs. The Python reference (fastlm/ops/reference.py: philox_uint32, attention_dropout_keep_ref)
// and the Triton kernel (kernels/attention.py) compute the same bits.
//
// Dropout mask: element (b, h, i, j) of a (B, H, Sq, Sk) attention matrix is kept when
//   philox4x32_10(counter = (j, i, b * H + h, offset), key = (seed_lo, seed_hi)).word0 >> 8
//     >= dropout_threshold(p)     (i.e. a 24-bit uniform u in [0, 1) satisfies u >= p)
// and kept weights are scaled by 1 / (1 - p). (seed, offset) come from torch's generator.
#pragma once
#include <cmath>
#include <cstdint>

#include "fastlm_math.h"

namespace fastlm {

// First output word of Philox-4x32 with 10 rounds (Salmon et al., Random123).
FASTLM_HD uint32_t philox4x32_10_word0(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p1);
    c3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

// The 24-bit integer threshold for dropout probability p: keep iff (word >> 8) >= threshold.
inline uint32_t attention_dropout_threshold(double p) {
  return static_cast<uint32_t>(std::ceil(p * 16777216.0));
}

// Whether attention element (bh = b * H + h, row i, col j) is kept.
FASTLM_HD bool attention_dropout_keep(uint64_t seed, uint64_t offset, uint32_t bh, uint32_t i, uint32_t j,
                                      uint32_t threshold) {
  const uint32_t word = philox4x32_10_word0(j, i, bh, static_cast<uint32_t>(offset),
                                            static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  return (word >> 8) >= threshold;
}

}  // namespace fastlm

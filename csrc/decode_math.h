// Math shared by the decode-attention kernels (CPU and CUDA): the online-softmax / split-K merge.
// __host__ __device__ inline functions, so the CPU tests exercise the very code the GPU runs.
#pragma once
#include <cmath>

#include "fastlm_math.h"

namespace fastlm {

// Merge the softmax state (m_b, l_b) of a second chunk into (m, l), where m is a chunk's running
// max of the scaled scores and l = sum(exp(score - m)). On return alpha and beta are the factors
// that rescale the two chunks' unnormalized accumulators: acc = alpha * acc + beta * acc_b.
// An empty chunk has m = -inf, l = 0 and contributes nothing; two empty chunks stay empty.
FASTLM_HD void softmax_merge(float& m, float& l, float m_b, float l_b, float& alpha, float& beta) {
  const float mn = fmaxf(m, m_b);
  if (mn == -INFINITY) {
    alpha = 1.f;
    beta = 0.f;
    return;
  }
  alpha = expf(m - mn);  // exp(-inf) = 0: an empty chunk is dropped
  beta = expf(m_b - mn);
  l = l * alpha + l_b * beta;
  m = mn;
}

// How many chunks ("splits") the cache of one (row, kv head) is cut into, flash-decoding style:
// enough work items to fill `parallel_units` (SMs x a few, or CPU threads x 2) even at batch 1, but
// no chunk shorter than `min_chunk` positions (the merge would cost more than it saves).
FASTLM_HD int decode_num_splits(long long items, long long max_len, long long parallel_units, long long min_chunk) {
  if (max_len <= 0 || items <= 0) return 1;
  long long want = (parallel_units + items - 1) / items;
  long long cap = (max_len + min_chunk - 1) / min_chunk;
  long long s = want < cap ? want : cap;
  if (s < 1) s = 1;
  if (s > 128) s = 128;
  return static_cast<int>(s);
}

}  // namespace fastlm

// Math shared by the CPU and CUDA kernels: __host__ __device__ inline functions, so the CPU tests
// exercise the very code the GPU runs. fp32 in, fp32 out.
#pragma once
#include <cmath>

#if defined(__CUDACC__)
#define FASTLM_HD __host__ __device__ __forceinline__
#else
#define FASTLM_HD inline
#endif

namespace fastlm {

// LayerNorm backward for one element, given the row constants of the standard formula
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),  g = dy * weight,  xhat = (x - mean) * rstd
// with mean_g = mean(g) and mean_gx = mean(g * xhat) over the row.
FASTLM_HD float layer_norm_dx(float g, float xhat, float mean_g, float mean_gx, float rstd) {
  return rstd * (g - mean_g - xhat * mean_gx);
}

// Chan et al. parallel merge of two (count, mean, M2) partial statistics; used when a row's
// statistics are accumulated in pieces (looped kernels) so the variance never cancels catastrophically.
FASTLM_HD void welford_merge(float& count, float& mean, float& m2, float count_b, float mean_b, float m2_b) {
  float n = count + count_b;
  if (n == 0.f) return;
  float delta = mean_b - mean;
  float wb = count_b / n;
  mean += delta * wb;
  m2 += m2_b + delta * delta * count * wb;
  count = n;
}

}  // namespace fastlm

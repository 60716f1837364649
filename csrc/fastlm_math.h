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

// GELU and its derivative, exact (erf: BERT) and tanh-approximated (GPT-2) forms:
//   exact: gelu(x) = x Phi(x) = 0.5 x (1 + erf(x / sqrt 2)),  gelu'(x) = Phi(x) + x phi(x),
//          phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
//   tanh:  gelu(x) = 0.5 x (1 + t),  t = tanh(u),  u = sqrt(2/pi) (x + 0.044715 x^3),
//          gelu'(x) = 0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)
// The vectorized CPU passes use the same formulas on at::vec (cpu/gelu_ffn.cpp).
constexpr float kGeluSqrt1_2 = 0.70710678118654752440f;    // 1 / sqrt(2)
constexpr float kGeluInvSqrt2Pi = 0.39894228040143267794f;  // 1 / sqrt(2 pi)
constexpr float kGeluSqrt2OverPi = 0.79788456080286535588f; // sqrt(2 / pi)
constexpr float kGeluCoeff = 0.044715f;

FASTLM_HD float gelu_erf(float x) { return 0.5f * x * (1.f + erff(x * kGeluSqrt1_2)); }

FASTLM_HD float gelu_erf_grad(float x) {
  return 0.5f * (1.f + erff(x * kGeluSqrt1_2)) + x * kGeluInvSqrt2Pi * expf(-0.5f * x * x);
}

FASTLM_HD float gelu_tanh(float x) {
  return 0.5f * x * (1.f + tanhf(kGeluSqrt2OverPi * (x + kGeluCoeff * x * x * x)));
}

FASTLM_HD float gelu_tanh_grad(float x) {
  const float t = tanhf(kGeluSqrt2OverPi * (x + kGeluCoeff * x * x * x));
  return 0.5f * (1.f + t) + 0.5f * x * (1.f - t * t) * kGeluSqrt2OverPi * (1.f + 3.f * kGeluCoeff * x * x);
}

FASTLM_HD float gelu(float x, bool tanh_approx) { return tanh_approx ? gelu_tanh(x) : gelu_erf(x); }
FASTLM_HD float gelu_grad(float x, bool tanh_approx) { return tanh_approx ? gelu_tanh_grad(x) : gelu_erf_grad(x); }

}  // namespace fastlm

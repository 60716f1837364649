// Row helpers for the CPU kernels: convert a row of fp16/bf16/fp32 to an fp32 scratch row and back
// with at::vec (AVX2 when built with it), and vectorized fp32 reductions. Every CPU kernel does its
// arithmetic in fp32 on rows that sit in L1/L2.
#pragma once
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cstdlib>
#include <cstring>
#include <type_traits>

namespace fastlm::cpu {

using fVec = at::vec::Vectorized<float>;

template <typename T>
inline void row_to_float(const T* src, float* dst, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(dst, src, n * sizeof(float));
  } else {
    using bVec = at::vec::Vectorized<T>;
    int64_t i = 0;
    for (; i + bVec::size() <= n; i += bVec::size()) {
      auto [lo, hi] = at::vec::convert_to_float<T>(bVec::loadu(src + i));
      lo.store(dst + i);
      hi.store(dst + i + fVec::size());
    }
    for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
  }
}

template <typename T>
inline void row_from_float(const float* src, T* dst, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(dst, src, n * sizeof(float));
  } else {
    using bVec = at::vec::Vectorized<T>;
    int64_t i = 0;
    for (; i + bVec::size() <= n; i += bVec::size()) {
      at::vec::convert_from_float<T>(fVec::loadu(src + i), fVec::loadu(src + i + fVec::size())).store(dst + i);
    }
    for (; i < n; ++i) dst[i] = static_cast<T>(src[i]);
  }
}

// sum(x[i]) with 4 independent accumulators (hides FMA/add latency), fp32.
inline float row_sum(const float* x, int64_t n) {
  fVec a0(0.f), a1(0.f), a2(0.f), a3(0.f);
  const int64_t V = fVec::size();
  int64_t i = 0;
  for (; i + 4 * V <= n; i += 4 * V) {
    a0 += fVec::loadu(x + i);
    a1 += fVec::loadu(x + i + V);
    a2 += fVec::loadu(x + i + 2 * V);
    a3 += fVec::loadu(x + i + 3 * V);
  }
  for (; i + V <= n; i += V) a0 += fVec::loadu(x + i);
  float s = at::vec::vec_reduce_all<float>([](fVec& p, fVec& q) { return p + q; }, (a0 + a1) + (a2 + a3));
  for (; i < n; ++i) s += x[i];
  return s;
}

// sum((x[i] - c)^2), fp32; the second pass of a two-pass variance (no cancellation). Four
// independent FMA chains: one chain is bound by the FMA latency, not by the loads.
inline float row_sum_sq_dev(const float* x, float c, int64_t n) {
  fVec a0(0.f), a1(0.f), a2(0.f), a3(0.f), vc(c);
  const int64_t V = fVec::size();
  int64_t i = 0;
  for (; i + 4 * V <= n; i += 4 * V) {
    fVec d0 = fVec::loadu(x + i) - vc, d1 = fVec::loadu(x + i + V) - vc;
    fVec d2 = fVec::loadu(x + i + 2 * V) - vc, d3 = fVec::loadu(x + i + 3 * V) - vc;
    a0 = at::vec::fmadd(d0, d0, a0);
    a1 = at::vec::fmadd(d1, d1, a1);
    a2 = at::vec::fmadd(d2, d2, a2);
    a3 = at::vec::fmadd(d3, d3, a3);
  }
  for (; i + V <= n; i += V) {
    fVec d = fVec::loadu(x + i) - vc;
    a0 = at::vec::fmadd(d, d, a0);
  }
  float s = at::vec::vec_reduce_all<float>([](fVec& p, fVec& q) { return p + q; }, (a0 + a1) + (a2 + a3));
  for (; i < n; ++i) s += (x[i] - c) * (x[i] - c);
  return s;
}

// Whether the AVX-512 kernels (compiled with target attributes, picked at run time) may run: the CPU
// has AVX-512 F/DQ/VL/BW and FASTLM_CPU_NO_AVX512=1 is not set (it forces the AVX2 paths, so the
// tests cover them on AVX-512 machines too).
inline bool cpu_use_avx512() {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
                         !(std::getenv("FASTLM_CPU_NO_AVX512") && std::getenv("FASTLM_CPU_NO_AVX512")[0] == '1');
  return ok;
#else
  return false;
#endif
}

}  // namespace fastlm::cpu

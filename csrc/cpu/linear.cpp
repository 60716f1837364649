// y = x @ W^T + b on the CPU, fast for few rows (the decode step of a language model).
//
// With one to a few rows the product is bound by reading W (N x K) from memory once: BLAS kernels
// pack W for reuse that never comes, and reach a fraction of the read bandwidth. Here the output
// features are split into contiguous ranges, one per thread (at::parallel_for), so each thread
// streams its own part of W exactly once. A task takes NR = 4 rows of W at a time and, for every
// block of MR <= 2 input rows, runs over K with NR x MR fp32 vector accumulators (8 AVX2 registers)
// (one row, M = 1: each W row is one sequential stream into 4 accumulators, which streams faster);
// the 4 W rows stay in L1/L2 while the input-row blocks reuse them, so W leaves memory once whatever
// M is. fp16/bf16 rows of W are converted to an fp32 scratch block first; accumulation is fp32.
// Many rows (prefill): at::linear (BLAS), which is compute bound and already good there.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <torch/library.h>

#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "common.h"
#include "cpu/decode_parallel.h"
#include "cpu/vec_utils.h"

namespace fastlm::cpu {
namespace {

constexpr const char* kOp = "linear_fwd";
constexpr int64_t kFewRows = 16;  // up to here the weight-streaming kernel; beyond, BLAS
constexpr int NR = 4;             // weight rows per block

// out[r][m] = sum_k w[r][k] * x[m][k] for NR weight rows (row stride ldw) and MR input rows (ldx).
// Raw AVX2 intrinsics: the NR x MR accumulators must live in registers (at::vec's class wrapper
// left them on the stack, which halved the throughput).
template <int MR>
inline void micro_kernel(const float* w, int64_t ldw, int nr, const float* x, int64_t ldx, int64_t K,
                         float (&out)[NR][2]) {
  const float* wr[NR];
  for (int r = 0; r < NR; ++r) wr[r] = w + (r < nr ? r : 0) * ldw;  // a short block repeats row 0
  int64_t k = 0;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 acc[NR][MR];
#pragma GCC unroll 8
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 2
    for (int m = 0; m < MR; ++m) acc[r][m] = _mm256_setzero_ps();
  for (; k + 8 <= K; k += 8) {
    // Software prefetch ~1 KB ahead on every W row (once per 64-byte line): keeps enough lines in
    // flight per core that the stream runs at the memory's read bandwidth, not at its latency.
    if ((k & 15) == 0) {
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) __builtin_prefetch(wr[r] + k + 256, 0, 0);
    }
    __m256 xv[MR];
#pragma GCC unroll 2
    for (int m = 0; m < MR; ++m) xv[m] = _mm256_loadu_ps(x + m * ldx + k);
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) {
      const __m256 wv = _mm256_loadu_ps(wr[r] + k);
#pragma GCC unroll 2
      for (int m = 0; m < MR; ++m) acc[r][m] = _mm256_fmadd_ps(wv, xv[m], acc[r][m]);
    }
  }
  for (int r = 0; r < NR; ++r) {
    for (int m = 0; m < MR; ++m) {
      // horizontal sum of 8 lanes
      __m128 lo = _mm256_castps256_ps128(acc[r][m]), hi = _mm256_extractf128_ps(acc[r][m], 1);
      lo = _mm_add_ps(lo, hi);
      lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
      lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
      out[r][m] = _mm_cvtss_f32(lo);
    }
  }
#else
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) out[r][m] = 0.f;
#endif
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) {
      float s = out[r][m];
      for (int64_t kk = k; kk < K; ++kk) s += wr[r][kk] * x[m * ldx + kk];
      out[r][m] = s;
    }
}

// sum_k w[k] * x[k] for one W row: one sequential stream, 4 independent accumulators (the FMA
// latency is hidden and the hardware prefetcher sees a single stream: the fastest form for M = 1).
inline float row_dot(const float* w, const float* x, int64_t K) {
  int64_t k = 0;
  float s = 0.f;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (; k + 32 <= K; k += 32) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x + k), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 8), _mm256_loadu_ps(x + k + 8), a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 16), _mm256_loadu_ps(x + k + 16), a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 24), _mm256_loadu_ps(x + k + 24), a3);
  }
  for (; k + 8 <= K; k += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x + k), a0);
  __m256 t = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
  __m128 lo = _mm256_castps256_ps128(t), hi = _mm256_extractf128_ps(t, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
  s = _mm_cvtss_f32(lo);
#endif
  for (; k < K; ++k) s += w[k] * x[k];
  return s;
}

template <typename T>
void linear_few_rows(const at::Tensor& x, const at::Tensor& w, const at::Tensor* bias, at::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  // Input rows and bias as fp32 once (M x K is tiny next to W).
  std::vector<float> xf(M * K), bf(N, 0.f);
  const T* xp = x.data_ptr<T>();
  for (int64_t m = 0; m < M; ++m) row_to_float(xp + m * x.stride(0), xf.data() + m * K, K);
  if (bias) row_to_float(bias->data_ptr<T>(), bf.data(), N);
  const T* wp = w.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  const int64_t blocks = (N + NR - 1) / NR;
  // Grain: enough W per task (>= 256 KB) that scheduling costs nothing next to the stream.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(K * NR, 1));
  parallel_range(0, blocks, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> wbuf(std::is_same_v<T, float> ? 0 : NR * K);
    std::vector<float> ybuf(std::is_same_v<T, float> ? 0 : M * NR);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t n0 = blk * NR;
      const int nr = static_cast<int>(std::min<int64_t>(NR, N - n0));
      const float* wf;
      if constexpr (std::is_same_v<T, float>) {
        wf = wp + n0 * K;
      } else {
        for (int r = 0; r < nr; ++r) row_to_float(wp + (n0 + r) * K, wbuf.data() + r * K, K);
        wf = wbuf.data();
      }
      if (M == 1) {
        for (int r = 0; r < nr; ++r) yp[n0 + r] = static_cast<T>(row_dot(wf + r * K, xf.data(), K) + bf[n0 + r]);
        continue;
      }
      float out[NR][2];
      int64_t m = 0;
      for (; m + 2 <= M; m += 2) {
        micro_kernel<2>(wf, K, nr, xf.data() + m * K, K, K, out);
        for (int mm = 0; mm < 2; ++mm)
          for (int r = 0; r < nr; ++r) yp[(m + mm) * N + n0 + r] = static_cast<T>(out[r][mm] + bf[n0 + r]);
      }
      if (m < M) {
        micro_kernel<1>(wf, K, nr, xf.data() + m * K, K, K, out);
        for (int r = 0; r < nr; ++r) yp[m * N + n0 + r] = static_cast<T>(out[r][0] + bf[n0 + r]);
      }
    }
  });
}

at::Tensor linear_fwd_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  check_rows(x, kOp, "input");
  check_rows(weight, kOp, "weight");
  check_same(weight, x, kOp, "weight");
  FASTLM_CHECK(weight.size(1) == x.size(1), kOp, "weight has ", weight.size(1), " input features, input has ",
               x.size(1));
  const int64_t M = x.size(0), N = weight.size(0);
  check_vector(bias, N, x, kOp, "bias");
  const at::Tensor* b = opt_ptr(bias);
  if (M > kFewRows) return at::linear(x, weight, bias);  // compute bound: BLAS
  at::Tensor wc = weight.is_contiguous() ? weight : weight.contiguous();
  at::Tensor y = new_output({M, N}, x.options());
  if (y.numel() == 0) return y;
  if (x.size(1) == 0) {
    if (b) y.copy_(b->unsqueeze(0).expand({M, N})); else y.zero_();
    return y;
  }
  FASTLM_DISPATCH_FLOAT_TYPES(x.scalar_type(), kOp, [&] { linear_few_rows<scalar_t>(x, wc, b, y); });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlm_C, CPU, m) { m.impl("linear_fwd", &linear_fwd_cpu); }

}  // namespace fastlm::cpu

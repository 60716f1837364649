// y = x @ W^T + b on the CPU, fast for few rows (the decode step of a language model).
//
// With one to a few rows the product is bound by reading W (N x K) from memory once (1 row), or by
// the FMAs (8 rows: 16 flops per weight read): BLAS kernels pack W for reuse that never comes.
// Here the output features are split over the threads (at::parallel_for via parallel_range) and W
// is read once against all M input rows (fp32, in L1/L2):
// - AVX-512 machines (chosen at run time, the file is compiled for AVX2): a register tile of 3 W
//   rows x 8/4/2/1 input rows, each W and x vector loaded once per 16-k step and reused from
//   registers, with a software prefetch of the next tile's W rows (2x at 8 rows, measured; 8 rows
//   reach ~90 GFLOP/s per core with W in cache, what MKL's large sgemm reaches here).
// - otherwise: each W row as one sequential stream against the input rows in blocks of 8/4/2/1
//   with enough independent AVX2 accumulators to hide the FMA latency (one x load per FMA).
// fp16/bf16 W: widened to fp32 as the AVX-512 tile loads it (half the bytes of fp32, so about twice
// the rows per second); without AVX-512, each row is converted to fp32 scratch first (second path).
// Accumulation is fp32.
// Many rows (prefill): at::linear (BLAS), which is compute bound and already good there.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <torch/library.h>

#include <cstdlib>
#include <type_traits>
#include <vector>

#include "common.h"
#include "cpu/decode_parallel.h"
#include "cpu/linear_tiles.h"
#include "cpu/vec_utils.h"

namespace fastlm::cpu {
namespace {

constexpr const char* kOp = "linear_fwd";
constexpr int64_t kFewRows = 16;  // up to here the weight-streaming kernel; beyond, BLAS

#if defined(__x86_64__) || defined(_M_X64)
// (GCC 12 warns that _mm512_undefined_ps inside its own reduce intrinsics is uninitialized: noise.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// Rows [n0, n1) of y for all M (<= 16) rows (fp32): tiles of NR W rows; for each, K in blocks of
// kKBlock (the input rows' block stays in L1: 8 rows x 3072 floats would not) and, per block, the
// input rows in blocks of 8/4/2/1 (the W tile's block stays in L1 across them).
template <int NR, typename T>
FASTLM_TILE_TARGET void rows_avx512(const T* w, const float* x, int64_t M, int64_t K, int64_t N, const float* bias,
                                    T* y, int64_t n0, int64_t n1, int64_t kblock) {
  float out[16 * 4];
  auto block = [&](auto nr_tag, int64_t n) {
    constexpr int nr = decltype(nr_tag)::value;
    const T* wn = w + n * K;
    for (int i = 0; i < M * nr; ++i) out[i] = 0.f;
    for (int64_t k0 = 0; k0 < K; k0 += kblock) {
      const int64_t kk = std::min(kblock, K - k0);
      int64_t m = 0;
      for (; M - m >= 8; m += 8) tile_avx512<8, nr, 1>(wn + k0, K, x + m * K + k0, K, kk, out + m * nr);
      if (M - m >= 4) {
        tile_avx512<4, nr, 1>(wn + k0, K, x + m * K + k0, K, kk, out + m * nr);
        m += 4;
      }
      if (M - m >= 2) {
        tile_avx512<2, nr, 2>(wn + k0, K, x + m * K + k0, K, kk, out + m * nr);
        m += 2;
      }
      if (M - m == 1) tile_avx512<1, nr, 2>(wn + k0, K, x + m * K + k0, K, kk, out + m * nr);
    }
    for (int64_t i = 0; i < M; ++i)
      for (int r = 0; r < nr; ++r) y[i * N + n + r] = static_cast<T>(out[i * nr + r] + bias[n + r]);
  };
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) block(std::integral_constant<int, NR>{}, n);
  for (; n < n1; ++n) block(std::integral_constant<int, 1>{}, n);
}

#pragma GCC diagnostic pop

bool has_avx512() {
  return cpu_use_avx512();
}
#else
bool has_avx512() { return false; }
#endif

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
#if defined(__x86_64__) || defined(_M_X64)
  {  // fp32, bf16, fp16 weights (widened in the tile)
    if (has_avx512()) {
      constexpr int64_t NR = 3;
      // K unblocked up to 4096 (the input rows stay in L2: 16 x 4096 fp32 = 256 KB). Measured, 8 rows,
      // 2 threads, interleaved: GPT-2 small's 48 decode matrices 7.91 -> 7.43 ms against K blocks of
      // 512, GPT-2 medium's 33.97 -> 32.17 ms (blocks of 512 had won on one thread, compute bound).
      // Longer K: blocks of 512 (not measured here).
      const int64_t kblock = M > 1 && K > 4096 ? 512 : std::max<int64_t>(K, 1);
      // chunks of whole NR-row tiles, >= ~64 KB of W each
      const int64_t tiles = (N + NR - 1) / NR;
      const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(NR * K, 1));
      parallel_range(0, tiles, grain, [&](int64_t begin, int64_t end) {
        rows_avx512<NR>(wp, xf.data(), M, K, N, bf.data(), yp, begin * NR, std::min(N, end * NR), kblock);
      });
      return;
    }
  }
#endif
  // Grain: enough W per chunk (>= 64 KB) that claiming chunks costs nothing next to the stream.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(K, 1));
  parallel_range(0, N, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> wbuf(std::is_same_v<T, float> ? 0 : K);
    float out[8];
    for (int64_t n = begin; n < end; ++n) {
      const float* wf;
      if constexpr (std::is_same_v<T, float>) {
        wf = wp + n * K;
      } else {
        row_to_float(wp + n * K, wbuf.data(), K);
        wf = wbuf.data();
      }
      int64_t m = 0;
      auto emit = [&](int cnt) {
        for (int i = 0; i < cnt; ++i) yp[(m + i) * N + n] = static_cast<T>(out[i] + bf[n]);
        m += cnt;
      };
      while (M - m >= 8) {
        row_times_rows<8, 1>(wf, xf.data() + m * K, K, K, out);
        emit(8);
      }
      if (M - m >= 4) {
        row_times_rows<4, 2>(wf, xf.data() + m * K, K, K, out);
        emit(4);
      }
      if (M - m >= 2) {
        row_times_rows<2, 2>(wf, xf.data() + m * K, K, K, out);
        emit(2);
      }
      if (M - m == 1) {
        row_times_rows<1, 4>(wf, xf.data() + m * K, K, K, out);
        emit(1);
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

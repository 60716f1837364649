// Batch-invariant linear on the CPU: y = act(x @ W^T + b) where every output element is computed with
// the same arithmetic whatever the number of rows M -- exactly the arithmetic linear_fwd uses for ONE
// input row. The serving engine runs all its projections through it, so a request's logits do not
// depend on which other requests share its step (linear_fwd picks other tiles at 2-16 rows and BLAS
// above 16, whose per-row sums are ordered differently).
//
// Tiling: input rows in chunks of 64 (their K values stay in L2); per chunk, at::parallel_for over
// tiles of 3 W rows (a fixed split: it depends on N and K only); per W tile, the chunk's rows in
// register tiles of 4/2/1. AVX-512 (run-time check): tile_avx512<MR, NR, 2> from linear_tiles.h,
// whose value per (row, W row) pair -- two 16-lane accumulators over K alternating 16-k steps, the
// masked tail into the first, one horizontal reduction -- is the same for every MR and NR and equals
// linear_fwd's tile_avx512<1, NR, 2>. AVX2: four 8-lane accumulators per row, as linear_fwd's
// row_times_rows<1, 4>, then the same reduction and scalar tail. Elsewhere: a scalar dot product in
// k order. fp32 accumulation; bias added once at the end (out + bias, as linear_fwd).
// act: "none", or GELU ("tanh" approximation or exact "erf") applied per output row: full vectors
// with at::vec then a scalar tail, so an element's value depends on its column only.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "common.h"
#include "cpu/linear_tiles.h"
#include "cpu/vec_utils.h"

namespace fastlm::cpu {
namespace {

constexpr const char* kOp = "linear_rowwise_fwd";
constexpr int64_t kRowChunk = 64;
constexpr int NR = 3;

// out[m * nr + r] = dot(w row r, x row m) for MR x nr, the AVX2 / portable arithmetic.
template <int MR>
inline void tile_portable(const float* w, int64_t ldw, int nr, const float* x, int64_t ldx, int64_t K, float* out) {
  for (int r = 0; r < nr; ++r) {
    const float* wr = w + r * ldw;
    for (int m = 0; m < MR; ++m) {
      const float* xm = x + m * ldx;
      float s = 0.f;
      int64_t k = 0;
#if defined(__AVX2__) && defined(__FMA__)
      __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      for (; k + 32 <= K; k += 32)
        for (int u = 0; u < 4; ++u)
          acc[u] = _mm256_fmadd_ps(_mm256_loadu_ps(wr + k + 8 * u), _mm256_loadu_ps(xm + k + 8 * u), acc[u]);
      for (; k + 8 <= K; k += 8) acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(wr + k), _mm256_loadu_ps(xm + k), acc[0]);
      __m256 t = acc[0];
      for (int u = 1; u < 4; ++u) t = _mm256_add_ps(t, acc[u]);
      __m128 lo = _mm256_castps256_ps128(t), hi = _mm256_extractf128_ps(t, 1);
      lo = _mm_add_ps(lo, hi);
      lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
      lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
      s = _mm_cvtss_f32(lo);
#endif
      for (; k < K; ++k) s += wr[k] * xm[k];
      out[m * nr + r] = s;
    }
  }
}

#if defined(__x86_64__) || defined(_M_X64)
template <int MR, typename WT>
FASTLM_TILE_TARGET inline void tile512(const WT* w, int64_t ldw, int nr, const float* x, int64_t ldx, int64_t K,
                                       float* out) {
  for (int i = 0; i < MR * nr; ++i) out[i] = 0.f;
  if (nr == 3) tile_avx512<MR, 3, 2>(w, ldw, x, ldx, K, out);
  else if (nr == 2) tile_avx512<MR, 2, 2>(w, ldw, x, ldx, K, out);
  else tile_avx512<MR, 1, 2>(w, ldw, x, ldx, K, out);
}
#endif

template <typename T>
void gelu_row(T* y, int64_t n, bool tanh_approx) {
  // on fp32 values: y is converted through an fp32 row
  std::vector<float> f(n);
  row_to_float(y, f.data(), n);
  const int64_t V = fVec::size();
  int64_t i = 0;
  const float c = 0.7978845608028654f, a = 0.044715f, r2 = 0.7071067811865476f;
  for (; i + V <= n; i += V) {
    fVec x = fVec::loadu(f.data() + i), r;
    if (tanh_approx) r = fVec(0.5f) * x * (fVec(1.f) + (fVec(c) * (x + fVec(a) * x * x * x)).tanh());
    else r = fVec(0.5f) * x * (fVec(1.f) + (x * fVec(r2)).erf());
    r.store(f.data() + i);
  }
  for (; i < n; ++i) {
    const float x = f[i];
    f[i] = tanh_approx ? 0.5f * x * (1.f + std::tanh(c * (x + a * x * x * x))) : 0.5f * x * (1.f + std::erf(x * r2));
  }
  row_from_float(f.data(), y, n);
}

template <typename T>
void linear_rowwise(const at::Tensor& x, const at::Tensor& w, const at::Tensor* bias, at::Tensor& y, int act) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  std::vector<float> bf(N, 0.f);
  if (bias) row_to_float(bias->data_ptr<T>(), bf.data(), N);
  const T* xp = x.data_ptr<T>();
  const T* wp = w.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  const bool avx512 = cpu_use_avx512();
  // W in fp32 for the portable path when it is fp16/bf16 (AVX-512 widens it in the tile).
  std::vector<float> wf;
  if (!std::is_same_v<T, float> && !avx512) {
    wf.resize(N * K);
    at::parallel_for(0, N, 64, [&](int64_t b, int64_t e) {
      for (int64_t n = b; n < e; ++n) row_to_float(wp + n * K, wf.data() + n * K, K);
    });
  }
  const int64_t tiles = (N + NR - 1) / NR;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(NR * K, 1));
  std::vector<float> xf(std::min(M, kRowChunk) * K);
  for (int64_t m0 = 0; m0 < M; m0 += kRowChunk) {
    const int64_t mc = std::min(kRowChunk, M - m0);
    for (int64_t m = 0; m < mc; ++m) row_to_float(xp + (m0 + m) * x.stride(0), xf.data() + m * K, K);
    at::parallel_for(0, tiles, grain, [&](int64_t tb, int64_t te) {
      float out[4 * NR];
      for (int64_t tile = tb; tile < te; ++tile) {
        const int64_t n = tile * NR;
        const int nr = static_cast<int>(std::min<int64_t>(NR, N - n));
        auto emit = [&](int64_t m, int mr) {
          for (int i = 0; i < mr; ++i)
            for (int r = 0; r < nr; ++r)
              yp[(m0 + m + i) * N + n + r] = static_cast<T>(out[i * nr + r] + bf[n + r]);
        };
        int64_t m = 0;
#if defined(__x86_64__) || defined(_M_X64)
        if (avx512) {
          const T* wn = wp + n * K;
          for (; mc - m >= 4; m += 4) { tile512<4>(wn, K, nr, xf.data() + m * K, K, K, out); emit(m, 4); }
          if (mc - m >= 2) { tile512<2>(wn, K, nr, xf.data() + m * K, K, K, out); emit(m, 2); m += 2; }
          if (mc - m == 1) { tile512<1>(wn, K, nr, xf.data() + m * K, K, K, out); emit(m, 1); m += 1; }
          continue;
        }
#endif
        const float* wn;
        if constexpr (std::is_same_v<T, float>) wn = wp + n * K;
        else wn = wf.data() + n * K;
        for (; mc - m >= 4; m += 4) { tile_portable<4>(wn, K, nr, xf.data() + m * K, K, K, out); emit(m, 4); }
        for (; m < mc; ++m) { tile_portable<1>(wn, K, nr, xf.data() + m * K, K, K, out); emit(m, 1); }
      }
    });
  }
  if (act != 0) {
    at::parallel_for(0, M, 1, [&](int64_t b, int64_t e) {
      for (int64_t m = b; m < e; ++m) gelu_row(yp + m * N, N, act == 1);
    });
  }
}

at::Tensor linear_rowwise_fwd_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                  c10::string_view activation) {
  check_rows(x, kOp, "input");
  check_rows(weight, kOp, "weight");
  check_same(weight, x, kOp, "weight");
  FASTLM_CHECK(weight.size(1) == x.size(1), kOp, "weight has ", weight.size(1), " input features, input has ",
               x.size(1));
  const int64_t M = x.size(0), N = weight.size(0);
  check_vector(bias, N, x, kOp, "bias");
  int act;
  if (activation == "none") act = 0;
  else if (activation == "tanh") act = 1;
  else if (activation == "erf") act = 2;
  else FASTLM_CHECK(false, kOp, "activation must be 'none', 'tanh' or 'erf', got '", std::string(activation), "'");
  at::Tensor wc = weight.is_contiguous() ? weight : weight.contiguous();
  at::Tensor y = new_output({M, N}, x.options());
  if (y.numel() == 0) return y;
  const at::Tensor* b = opt_ptr(bias);
  if (x.size(1) == 0) {
    if (b) y.copy_(b->unsqueeze(0).expand({M, N})); else y.zero_();
    if (act != 0) {
      FASTLM_DISPATCH_FLOAT_TYPES(x.scalar_type(), kOp, [&] {
        for (int64_t m = 0; m < M; ++m) gelu_row(y.data_ptr<scalar_t>() + m * N, N, act == 1);
      });
    }
    return y;
  }
  FASTLM_DISPATCH_FLOAT_TYPES(x.scalar_type(), kOp, [&] { linear_rowwise<scalar_t>(x, wc, b, y, act); });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlm_C, CPU, m) { m.impl("linear_rowwise_fwd", &linear_rowwise_fwd_cpu); }

}  // namespace fastlm::cpu

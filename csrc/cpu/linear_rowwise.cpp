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
// linear_fwd's tile_avx512<1, NR, 2>. At K >= 2048, tiles of 6 W rows x 4 input rows instead
// (tile_chains): the same FMAs as two U = 1 passes, one per accumulator chain (the 24 accumulators
// of one chain fit the registers where U = 2 allows 4 x 3), each chain stored, then added and
// reduced as tile_avx512 does -- bit-identical, fewer loads per FMA. AVX2: four 8-lane accumulators
// per row, as linear_fwd's row_times_rows<1, 4>, then the same reduction and scalar tail. Elsewhere:
// a scalar dot product in k order. fp32 accumulation; bias added once at the end (out + bias, as linear_fwd).
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
constexpr int NR = 3;   // W rows per tile, portable path
constexpr int NR512 = 6, MR512 = 4;  // AVX-512 register tile of tile_chains (K >= kChainsK)
// From here on tile_chains (measured 1 thread, interleaved, medians of 5, 3072 -> 768: M = 64..2048
// 54-60 -> 80-88 GFLOP/s, M = 16 63 -> 69); below it tile512 (at K = 768 the two measured the same
// within this host's noise, +-15%).
constexpr int64_t kChainsK = 2048;

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

#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// One of tile_avx512<*, *, 2>'s two accumulator chains for an MR x NR register tile, U = 1 (MR * NR
// accumulators, so a bigger tile than U = 2 allows): chain 0 = the 16-k steps at k = 0, 32, 64, ...
// below K rounded down to 32, then the masked tail (full 16-k steps, then the rest); chain 1 = the
// steps at k = 16, 48, ... below that bound. The FMAs of each chain are tile_avx512's, in its order,
// so chain 0 + chain 1, reduced, is its value bit for bit. acc: [MR][NR][16] fp32, stored.
template <int MR, int NR, int CHAIN, typename WT>
FASTLM_TILE_TARGET inline void chain512(const WT* w, int64_t ldw, const float* x, int64_t ldx, int64_t K,
                                        float* acc_out) {
  __m512 acc[MR][NR];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_setzero_ps();
  const int64_t kfull = K - K % 32;
  for (int64_t k = CHAIN * 16; k < kfull; k += 32) {
    __m512 wv[NR];
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) wv[r] = load_w16(w + r * ldw + k);
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) _mm_prefetch(reinterpret_cast<const char*>(w + r * ldw + k + 256), _MM_HINT_T0);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      __m512 xv = _mm512_loadu_ps(x + m * ldx + k);
      asm("" : "+v"(xv));
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_fmadd_ps(wv[r], xv, acc[m][r]);
    }
  }
  if (CHAIN == 0) {
    for (int64_t k = kfull; k < K; k += 16) {
      const __mmask16 msk = K - k >= 16 ? __mmask16(0xffff) : __mmask16((1u << (K - k)) - 1);
      __m512 wv[NR];
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) wv[r] = load_w16(w + r * ldw + k, msk);
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) {
        const __m512 xv = _mm512_maskz_loadu_ps(msk, x + m * ldx + k);
#pragma GCC unroll 8
        for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_fmadd_ps(wv[r], xv, acc[m][r]);
      }
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) _mm512_storeu_ps(acc_out + (m * NR + r) * 16, acc[m][r]);
}

// out[m * NR + r] = tile_avx512<MR, NR, 2>'s value (from out = 0) via its two chains.
template <int MR, int NR, typename WT>
FASTLM_TILE_TARGET void tile_chains(const WT* w, int64_t ldw, const float* x, int64_t ldx, int64_t K, float* out) {
  alignas(64) float a0[MR * NR * 16], a1[MR * NR * 16];
  chain512<MR, NR, 0>(w, ldw, x, ldx, K, a0);
  chain512<MR, NR, 1>(w, ldw, x, ldx, K, a1);
  for (int i = 0; i < MR * NR; ++i) {
    const __m512 t = _mm512_add_ps(_mm512_load_ps(a0 + 16 * i), _mm512_load_ps(a1 + 16 * i));
    float o = 0.f;
    o += _mm512_reduce_add_ps(t);
    out[i] = o;
  }
}

template <int MR, typename WT>
FASTLM_TILE_TARGET void tile_chains_nr(const WT* w, int64_t ldw, int nr, const float* x, int64_t ldx, int64_t K,
                                       float* out) {
  static_assert(NR512 <= 6 && MR512 <= 4, "tile_chains_nr / the row remainders cover these");
  switch (nr) {
    case 6: tile_chains<MR, 6>(w, ldw, x, ldx, K, out); break;
    case 5: tile_chains<MR, 5>(w, ldw, x, ldx, K, out); break;
    case 4: tile_chains<MR, 4>(w, ldw, x, ldx, K, out); break;
    case 3: tile_chains<MR, 3>(w, ldw, x, ldx, K, out); break;
    case 2: tile_chains<MR, 2>(w, ldw, x, ldx, K, out); break;
    default: tile_chains<MR, 1>(w, ldw, x, ldx, K, out); break;
  }
}
#pragma GCC diagnostic pop
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
  const bool chains = avx512 && K >= kChainsK;
  const int nrt = chains ? NR512 : NR;
  const int64_t tiles = (N + nrt - 1) / nrt;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(nrt * K, 1));
  std::vector<float> xf(std::min(M, kRowChunk) * K);
  for (int64_t m0 = 0; m0 < M; m0 += kRowChunk) {
    const int64_t mc = std::min(kRowChunk, M - m0);
    for (int64_t m = 0; m < mc; ++m) row_to_float(xp + (m0 + m) * x.stride(0), xf.data() + m * K, K);
    at::parallel_for(0, tiles, grain, [&](int64_t tb, int64_t te) {
      float out[8 * 8];
      for (int64_t tile = tb; tile < te; ++tile) {
        const int64_t n = tile * nrt;
        const int nr = static_cast<int>(std::min<int64_t>(nrt, N - n));
        auto emit = [&](int64_t m, int mr) {
          for (int i = 0; i < mr; ++i)
            for (int r = 0; r < nr; ++r)
              yp[(m0 + m + i) * N + n + r] = static_cast<T>(out[i * nr + r] + bf[n + r]);
        };
        int64_t m = 0;
#if defined(__x86_64__) || defined(_M_X64)
        if (chains) {
          const T* wn = wp + n * K;
          const float* xb = xf.data();
          for (; mc - m >= MR512; m += MR512) {
            tile_chains_nr<MR512>(wn, K, nr, xb + m * K, K, K, out);
            emit(m, MR512);
          }
          switch (mc - m) {
            case 3: tile_chains_nr<3>(wn, K, nr, xb + m * K, K, K, out); emit(m, 3); break;
            case 2: tile_chains_nr<2>(wn, K, nr, xb + m * K, K, K, out); emit(m, 2); break;
            case 1: tile_chains_nr<1>(wn, K, nr, xb + m * K, K, K, out); emit(m, 1); break;
            default: break;
          }
          continue;
        }
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

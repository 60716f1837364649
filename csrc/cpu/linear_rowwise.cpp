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
// Many rows on AVX-512 (a packed weight from linear_rowwise_pack, or M >= kPackedMinRows): the same
// values from an outer-product kernel over W packed by k chain (linear_rowwise_packed, below).
// act: "none", or GELU ("tanh" approximation or exact "erf") applied per output row (gelu_fast.h:
// exp-based forms, a function of the element's value only).
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
#include "cpu/gelu_fast.h"
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

#if defined(__x86_64__) || defined(_M_X64)
// ---- Many rows (AVX-512, M >= kPackedMinRows): the same values as an outer-product GEMM ----
// tile_avx512<1, NR, 2>'s value for (row m, W row n) is reduce(chain0 + chain1), where lane c of
// chain 0 is an FMA chain over k = c, c + 32, ... (below kfull = K - K % 32), then kfull + c and
// kfull + 16 + c (the tail steps; a masked-off lane adds 0 * 0), and lane c of chain 1 over
// k = 16 + c, 48 + c, ... (below kfull). Here the 32 lane chains are computed with the output
// columns along the vector instead of k: W is packed per call into panels of PN = 64 columns,
// panel[c][i][64] = W[n0 + j][k(c, i)] (c = chain lane 0..31 as 16 * chain + lane, i = step; zeros
// past K and N), x rows likewise into [c][i]; a register tile of PM = 6 rows x 64 columns runs each
// lane chain over its steps (broadcast x, 4 W vectors, 24 FMAs a step) -- the same FMAs in the same
// order per output -- then chain 0 + chain 1 and the 16-lane tree of _mm512_reduce_add_ps (halves
// 8, 4, 2, 1) vectorized over 16 columns. Bit for bit the one-row value, at GEMM speed: no horizontal
// reduction per output and 10 loads per 24 FMAs. Per call: W packed once (all threads, by panel);
// rows in chunks of kPackRows (their packed x stays in L2); per chunk at::parallel_for over panels,
// each thread the whole chunk for its panels (a split by N only).
constexpr int PN = 64, PM = 6;
// Packing per call (no packed argument) costs about a fp32 copy-transpose of W: worth it from kPackedMinRows
// rows (measured 1 thread, K = 768: at 64 rows 30-39 GFLOP/s with it vs ~55 without; at 1024, 66-80 vs 60-68).
constexpr int64_t kPackedMinRows = 512, kPackRows = 96;

struct ChainLayout {
  int64_t kc, steps;   // kc = K / 32 full 32-k steps; steps = kc + 2 (lanes of chain 0 add two tail steps)
  explicit ChainLayout(int64_t K) : kc(K / 32), steps(K / 32 + 2) {}
  int64_t steps_of(int c) const { return c < 16 ? steps : kc; }
  int64_t size() const { return 32 * steps; }   // floats per packed row / column
};

// dst[c * cstride + i * stride] = the value of lane chain c (0..31) at step i, from a row src of K
// values: step i < kc holds k = 32 i + c; the two tail steps hold k = 32 kc + c and 32 kc + 16 + c
// for c < 16 (0 past K), nothing (0) for c >= 16.
template <typename T>
void pack_chain_row(const T* src, int64_t K, const ChainLayout& L, float* dst, int64_t stride,
                    int64_t cstride) {
  for (int64_t i = 0; i < L.kc; ++i)
    for (int c = 0; c < 32; ++c) dst[c * cstride + i * stride] = static_cast<float>(src[32 * i + c]);
  for (int t = 0; t < 2; ++t)
    for (int c = 0; c < 32; ++c) {
      const int64_t k = 32 * L.kc + 16 * t + c;
      dst[c * cstride + (L.kc + t) * stride] = c < 16 && k < K ? static_cast<float>(src[k]) : 0.f;
    }
}

// T16[c][m][64] (c < 16) = chain0 lane c + chain1 lane c for MR rows x 64 columns of one panel.
template <int MR>
FASTLM_TILE_TARGET void panel_chains(const float* P, const float* X, int64_t ldx, const ChainLayout& L, float* T16) {
  for (int c = 0; c < 32; ++c) {
    const float* pw = P + c * L.steps * PN;
    const float* px = X + c * L.steps;
    const int64_t n = L.steps_of(c);
    __m512 acc[MR][4];
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) acc[m][j] = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; ++i) {
      __m512 wv[4];
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) wv[j] = _mm512_loadu_ps(pw + i * PN + 16 * j);
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) {
        __m512 xv = _mm512_set1_ps(px[m * ldx + i]);
        asm("" : "+v"(xv));   // one broadcast per row and step, not one per FMA
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) acc[m][j] = _mm512_fmadd_ps(wv[j], xv, acc[m][j]);
      }
    }
    float* t = T16 + (c & 15) * MR * PN;
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        float* p = t + m * PN + 16 * j;
        // tile_avx512: t = acc[0] + acc[1] (chain 0 first, then chain 1 added)
        _mm512_storeu_ps(p, c < 16 ? acc[m][j] : _mm512_add_ps(_mm512_loadu_ps(p), acc[m][j]));
      }
  }
}

// out[m][j] = 0 + tree over the 16 lanes (T16[c][m][j]) in _mm512_reduce_add_ps's order (256-bit
// halves, then 128-bit halves, then {2,3} + {0,1}, then [0] + [1]), 16 columns per vector.
template <int MR>
FASTLM_TILE_TARGET void panel_reduce(const float* T16, float* out /* [MR][PN] */) {
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < 4; ++j) {
      __m512 s[16];
#pragma GCC unroll 16
      for (int c = 0; c < 16; ++c) s[c] = _mm512_loadu_ps(T16 + (c * MR + m) * PN + 16 * j);
#pragma GCC unroll 8
      for (int c = 0; c < 8; ++c) s[c] = _mm512_add_ps(s[c + 8], s[c]);
#pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) s[c] = _mm512_add_ps(s[c + 4], s[c]);
      const __m512 a = _mm512_add_ps(s[0], s[2]), b = _mm512_add_ps(s[1], s[3]);
      _mm512_storeu_ps(out + m * PN + 16 * j, _mm512_add_ps(_mm512_setzero_ps(), _mm512_add_ps(a, b)));
    }
}

template <int MR>
FASTLM_TILE_TARGET void panel_tile(const float* P, const float* X, int64_t ldx, const ChainLayout& L, float* T16,
                                   float* out) {
  panel_chains<MR>(P, X, ldx, L, T16);
  panel_reduce<MR>(T16, out);
}

std::vector<int64_t> packed_shape(int64_t N, int64_t K) { return {(N + PN - 1) / PN, ChainLayout(K).size(), PN}; }

// P (packed_shape(N, K)) := W (N, K) in the panel layout.
template <typename T>
void pack_weight(const T* wp, int64_t N, int64_t K, float* P) {
  const ChainLayout L(K);
  const int64_t panels = (N + PN - 1) / PN, psize = L.size() * PN;
  at::parallel_for(0, panels, 1, [&](int64_t pb, int64_t pe) {
    for (int64_t p = pb; p < pe; ++p) {
      float* dst = P + p * psize;
      for (int64_t j = 0; j < PN; ++j) {
        const int64_t n = p * PN + j;
        if (n < N) pack_chain_row(wp + n * K, K, L, dst + j, PN, L.steps * PN);
        else
          for (int64_t i = 0; i < L.size(); ++i) dst[i * PN + j] = 0.f;
      }
    }
  });
}

// y = x W^T + b through the panels P (packed_shape(N, K); packed here when null).
template <typename T>
void linear_rowwise_packed(const T* xp, int64_t ldx_in, const T* wp, const float* P, const float* bf, T* yp,
                           int64_t M, int64_t K, int64_t N) {
  const ChainLayout L(K);
  const int64_t panels = (N + PN - 1) / PN, psize = L.size() * PN;
  std::vector<float> own;
  if (!P) {
    own.resize(panels * psize);
    pack_weight(wp, N, K, own.data());
    P = own.data();
  }
  const int64_t ldx = L.size();
  std::vector<float> X(std::min(M, kPackRows) * ldx);
  for (int64_t m0 = 0; m0 < M; m0 += kPackRows) {
    const int64_t mc = std::min(kPackRows, M - m0);
    at::parallel_for(0, mc, 8, [&](int64_t b, int64_t e) {
      for (int64_t m = b; m < e; ++m) pack_chain_row(xp + (m0 + m) * ldx_in, K, L, X.data() + m * ldx, 1, L.steps);
    });
    at::parallel_for(0, panels, 1, [&](int64_t pb, int64_t pe) {
      alignas(64) float T16[16 * PM * PN], out[PM * PN];
      for (int64_t p = pb; p < pe; ++p) {
        const float* panel = P + p * psize;
        const int64_t n0 = p * PN;
        const int64_t nn = std::min<int64_t>(PN, N - n0);
        for (int64_t m = 0; m < mc; m += PM) {
          const int mr = static_cast<int>(std::min<int64_t>(PM, mc - m));
          const float* xm = X.data() + m * ldx;
          switch (mr) {
            case 6: panel_tile<6>(panel, xm, ldx, L, T16, out); break;
            case 5: panel_tile<5>(panel, xm, ldx, L, T16, out); break;
            case 4: panel_tile<4>(panel, xm, ldx, L, T16, out); break;
            case 3: panel_tile<3>(panel, xm, ldx, L, T16, out); break;
            case 2: panel_tile<2>(panel, xm, ldx, L, T16, out); break;
            default: panel_tile<1>(panel, xm, ldx, L, T16, out); break;
          }
          for (int i = 0; i < mr; ++i) {
            T* y = yp + (m0 + m + i) * N + n0;
            for (int64_t j = 0; j < nn; ++j) y[j] = static_cast<T>(out[i * PN + j] + bf[n0 + j]);
          }
        }
      }
    });
  }
}
#endif

// GELU of one output row in place: gelu_fast.h's forms on fp32 values (fp16 / bf16 rows through an
// fp32 copy); an element's value depends on its own value only, so rows stay batch-invariant.
template <typename T>
void gelu_row(T* y, int64_t n, bool tanh_approx) {
  if constexpr (std::is_same_v<T, float>) {
    gelu_row_fp32(y, n, tanh_approx);
  } else {
    std::vector<float> f(n);
    row_to_float(y, f.data(), n);
    gelu_row_fp32(f.data(), n, tanh_approx);
    row_from_float(f.data(), y, n);
  }
}

template <typename T>
void gelu_rows(T* y, int64_t M, int64_t N, int act) {
  if (act == 0) return;
  at::parallel_for(0, M, 1, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) gelu_row(y + m * N, N, act == 1);
  });
}

template <typename T>
void linear_rowwise(const at::Tensor& x, const at::Tensor& w, const at::Tensor* bias, const at::Tensor* packed,
                    at::Tensor& y, int act) {
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
#if defined(__x86_64__) || defined(_M_X64)
  if (avx512 && (packed || M >= kPackedMinRows)) {
    linear_rowwise_packed<T>(xp, x.stride(0), wp, packed ? packed->data_ptr<float>() : nullptr, bf.data(), yp, M, K, N);
    gelu_rows(yp, M, N, act);
    return;
  }
#endif
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
  gelu_rows(yp, M, N, act);
}

at::Tensor linear_rowwise_fwd_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                  c10::string_view activation, const std::optional<at::Tensor>& packed) {
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
  const at::Tensor* pk = nullptr;
#if defined(__x86_64__) || defined(_M_X64)
  if (packed.has_value() && packed->defined()) {
    const auto want = packed_shape(N, x.size(1));
    FASTLM_CHECK(packed->scalar_type() == at::kFloat && packed->is_contiguous() && packed->device() == x.device() &&
                     packed->sizes() == at::IntArrayRef(want),
                 kOp, "packed must be linear_rowwise_pack(weight) (float32, contiguous, shape ", at::IntArrayRef(want),
                 "), got ", packed->scalar_type(), " ", packed->sizes());
    pk = &*packed;
  }
#endif
  FASTLM_DISPATCH_FLOAT_TYPES(x.scalar_type(), kOp, [&] { linear_rowwise<scalar_t>(x, wc, b, pk, y, act); });
  return y;
}

at::Tensor linear_rowwise_pack_cpu(const at::Tensor& weight) {
  check_rows(weight, "linear_rowwise_pack", "weight");
#if defined(__x86_64__) || defined(_M_X64)
  const int64_t N = weight.size(0), K = weight.size(1);
  if (!cpu_use_avx512()) return at::empty({0}, weight.options().dtype(at::kFloat));   // AVX2: no packed kernel
  at::Tensor wc = weight.contiguous();
  at::Tensor P = at::empty(packed_shape(N, K), weight.options().dtype(at::kFloat));
  FASTLM_DISPATCH_FLOAT_TYPES(weight.scalar_type(), "linear_rowwise_pack",
                              [&] { pack_weight<scalar_t>(wc.data_ptr<scalar_t>(), N, K, P.data_ptr<float>()); });
  return P;
#else
  return at::empty({0}, weight.options().dtype(at::kFloat));   // portable build: no packed kernel
#endif
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlm_C, CPU, m) {
  m.impl("linear_rowwise_fwd", &linear_rowwise_fwd_cpu);
  m.impl("linear_rowwise_pack", &linear_rowwise_pack_cpu);
}

}  // namespace fastlm::cpu

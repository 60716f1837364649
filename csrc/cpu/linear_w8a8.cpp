// y = dequant(quant(x) @ qweight^T) + bias on the CPU: the W8A8 linear (int8 weights AND int8
// activations, int32 accumulation), fastlm.quantize(weights="int8", activations="int8").
//
// Math (fastlm/ops/reference.py linear_w8a8_fwd_ref is the same, exact in integers):
//   a_scale[m] = max_k |x[m, k]| / 127                       (fp32 division)
//   xq[m, k]   = clamp(round_half_even(x[m, k] / a_scale[m]), -127, 127)   (fp32 division, then rint)
//   acc[m, n]  = sum_k xq[m, k] * qweight[n, k]              (int32, exact: see kMaxK)
//   y[m, n]    = (float(acc) * a_scale[m]) * scale[n] + bias[n]   (fp32, in this order, no FMA), then
//                rounded once to x's dtype.
// activation "tanh" / "erf" then applies GELU to y (as rounded to x's dtype; computed in fp32, rounded
// again; csrc/cpu/gelu_fast.h: the tanh form through exp512, a few ulps from torch's), rows in
// parallel right after the GEMM: the fc of a W8A8 FFN without a separate F.gelu call and pass.
// A row whose a_scale is 0 (all zeros, or max|x| / 127 underflows) has xq = 0 (y = bias); a row with a
// NaN / inf has a_scale = NaN and xq = 0 (y = NaN: the non-finite input shows). x may be fp32 / fp16 /
// bf16 (widened to fp32 exactly first); scale is per output channel (N,) fp32 only.
//
// The packed weight (linear_w8a8_pack; built once per weight, Int8Linear caches it): output channels in
// blocks of 16, k in groups of 4, W[nb][k / 4][16][4] int8 (one 64-byte line = 16 channels x 4 k: one
// zmm feeds 16 output columns), N padded to 16 and K to 4 with zeros; then colsum[Np] int32 = sum_k
// qweight[n, k]. Np * Kp + 4 * Np bytes, ISA-independent (every path below reads the same buffer).
//
// Paths (chosen per call; FASTLM_CPU_NO_AVX512=1 forces AVX2, FASTLM_W8A8_ISA=avx2|scalar narrows the
// choice for tests):
// - AVX-512 VNNI (cpu_use_avx512() and avx512vnni; target attributes, x86 only): vpdpbusd multiplies
//   u8 x s8, so activations are stored as u8 = xq + 128 and 128 * colsum[n] is subtracted in the
//   epilogue. Register tile: MR = 8 rows x NT = 2 zmm (32 output columns), 16 int32 accumulators; per k
//   group of 4: NT weight loads, MR 4-byte broadcasts of the activations, MR * NT vpdpbusd (64 MACs
//   each). The K tail is zero in the packed weight (and 128 = xq 0 in the activations), so no masks.
// - AVX2 (the file's baseline ISA on x86): the same packed groups sign-extended to int16 (vpmovsxbw)
//   and vpmaddwd against the row's 4 int16 activations broadcast (no vpmaddubsw: it saturates int16);
//   2 rows x 16 columns a tile, pairs summed at the end (vphaddd). Signed activations: no correction.
// - portable scalar loop (aarch64 builds, K > kMaxK, FASTLM_W8A8_ISA=scalar): reads qweight itself,
//   int64 accumulators.
// Exactness: |(xq + 128) * w| <= 255 * 128 per product, so int32 accumulators are exact for K <= 65536
// (kMaxK; larger K takes the scalar path). Every path gives the reference's acc exactly, and the same
// fp32 epilogue (an asm barrier keeps -ffp-contract=fast from fusing the bias add), so outputs are
// bit-identical to the reference.
//
// Measured (AVX-512 Zen 4, 1 thread, host shared; GFLOP/s counting 2 M N K): M = 128: 768->2304 263-415
// (W8A32 linear_int8 62-80, F.linear fp32 50-78: 5.3x fp32), 3072->768 281-416, 384->1536 296-422; M = 512:
// 768->3072 384 (fp32 81), 3072->768 370 (fp32 84). vpdpbusd zmm issues once a cycle on Zen 4 (~470
// GOP/s at 3.7 GHz): the inner loop (2 weight loads, 8 broadcasts, 16 vpdpbusd a group) sits at ~85% of
// it. AVX2 path ~110 GOP/s, scalar ~16 (768->2304, 384->1536 at M = 128).
//
// Threads: (1) the rows are quantized in parallel (at::parallel_for over rows); (2) the GEMM's work is
// cut into tasks of one column panel (NT * 16 output channels, all of K) x one row block (kMB rows),
// panel-major, and at::parallel_for hands each thread a contiguous range of tasks: a thread walks the
// row blocks of a panel with that panel's packed weight (NT * 16 * Kp bytes) hot in L1/L2, and
// computes and writes those outputs y[rows of the block, columns of the panel] completely (no
// reduction between threads). The epilogue is fused into the tile (no int32 C matrix in memory).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include "common.h"
#include "cpu/gelu_fast.h"
#include "cpu/vec_utils.h"

namespace fastlm::cpu {
namespace {

constexpr const char* kOp = "linear_w8a8_fwd";
constexpr int64_t kNB = 16;         // output channels per packed block (one zmm of int32 results)
constexpr int64_t kKG = 4;          // consecutive k per packed group (one vpdpbusd lane)
constexpr int64_t kMaxK = 65536;    // int32 accumulators exact up to here (header)
constexpr int64_t kMB = 64;         // rows per GEMM task

inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

struct PackDims {
  int64_t Np, Kp, bytes;
};
inline PackDims pack_dims(int64_t N, int64_t K) {
  const int64_t Np = round_up(N, kNB), Kp = round_up(K, kKG);
  return {Np, Kp, Np * Kp + 4 * Np};
}

// Keeps the compiler from contracting `v` into a following add (-ffp-contract=fast would make
// p * s + b one FMA, one rounding fewer than the reference).
inline float opaque(float v) {
#if defined(__x86_64__) || defined(_M_X64)
  asm("" : "+x"(v));
#elif defined(__aarch64__)
  asm("" : "+w"(v));
#else
  volatile float t = v;
  v = t;
#endif
  return v;
}

// The fp32 epilogue shared by every path: (acc * a_scale) * scale, then + bias (no FMA).
inline float epilogue(float acc, float as, float sc, const float* bias, int64_t n) {
  const float p = opaque((acc * as) * sc);
  return bias ? p + bias[n] : p;
}

// ---------------------------------------------------------------- pack
// qweight (N, K) int8 -> the packed layout above (out: Np * Kp bytes, then colsum Np int32).
void pack_weight(const int8_t* w, int64_t N, int64_t K, int8_t* out) {
  const PackDims d = pack_dims(N, K);
  const int64_t kq = d.Kp / kKG;
  int32_t* colsum = reinterpret_cast<int32_t*>(out + d.Np * d.Kp);
  const int64_t nblk = d.Np / kNB;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(kNB * d.Kp, 1));
  at::parallel_for(0, nblk, grain, [&](int64_t b, int64_t e) {
    for (int64_t nb = b; nb < e; ++nb) {
      int8_t* dst = out + nb * kq * 64;
      for (int64_t c = 0; c < kNB; ++c) {
        const int64_t n = nb * kNB + c;
        int32_t s = 0;
        for (int64_t j = 0; j < kq; ++j)
          for (int64_t t = 0; t < kKG; ++t) {
            const int64_t k = j * kKG + t;
            const int8_t v = (n < N && k < K) ? w[n * K + k] : int8_t(0);
            dst[j * 64 + c * kKG + t] = v;
            s += v;
          }
        colsum[n] = s;
      }
    }
  });
}

// ---------------------------------------------------------------- activation quantization
// Q: int8_t (xq), uint8_t (xq + 128, for vpdpbusd) or int16_t (xq, for vpmaddwd).
template <typename Q>
constexpr int32_t kQOffset = std::is_same_v<Q, uint8_t> ? 128 : 0;

// max|x| over the row, or NaN when the row holds a NaN / inf.
inline float row_amax(const float* x, int64_t K) {
  float amax = 0.f;
  bool finite = true;
  for (int64_t k = 0; k < K; ++k) {
    const float a = std::fabs(x[k]);
    finite &= (a <= FLT_MAX);
    amax = std::max(amax, a);
  }
  return finite ? amax : std::numeric_limits<float>::quiet_NaN();
}

// The row's a_scale from its amax (see the header): NaN for a non-finite row, possibly 0.
inline float row_scale(float amax) { return std::isnan(amax) ? amax : amax / 127.f; }

// x[0, K) -> q[0, Kp) (the pad [K, Kp) is xq = 0) given the row's a_scale s; returns nothing.
template <typename Q>
void quantize_row_scalar(const float* x, int64_t K, int64_t Kp, float s, Q* q) {
  const bool zero = !(s > 0.f);  // 0 or NaN: xq = 0
  for (int64_t k = 0; k < K; ++k) {
    int32_t v = 0;
    if (!zero) v = static_cast<int32_t>(std::min(127.f, std::max(-127.f, std::nearbyint(x[k] / s))));
    q[k] = static_cast<Q>(v + kQOffset<Q>);
  }
  for (int64_t k = K; k < Kp; ++k) q[k] = static_cast<Q>(kQOffset<Q>);
}

#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define FASTLM_W8A8_512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
#define FASTLM_W8A8_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))

// The same as row_amax / quantize_row_scalar, 16 lanes at a time (division and rint are correctly
// rounded in both: the same xq bit for bit).
FASTLM_W8A8_512 float row_amax_512(const float* x, int64_t K) {
  __m512 mx = _mm512_setzero_ps();
  __mmask16 bad = 0;
  const __m512 fmax = _mm512_set1_ps(FLT_MAX);
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 msk = K - k >= 16 ? __mmask16(0xffff) : __mmask16((1u << (K - k)) - 1);
    const __m512 a = _mm512_abs_ps(_mm512_maskz_loadu_ps(msk, x + k));
    bad |= _mm512_cmp_ps_mask(a, fmax, _CMP_NLE_UQ);  // inf or NaN
    mx = _mm512_max_ps(mx, a);
  }
  return bad ? std::numeric_limits<float>::quiet_NaN() : _mm512_reduce_max_ps(mx);
}

template <typename Q>
FASTLM_W8A8_512 void quantize_row_512(const float* x, int64_t K, int64_t Kp, float s, Q* q) {
  if (!(s > 0.f)) {
    for (int64_t k = 0; k < Kp; ++k) q[k] = static_cast<Q>(kQOffset<Q>);
    return;
  }
  const __m512 sv = _mm512_set1_ps(s), lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
  const __m512i off = _mm512_set1_epi32(kQOffset<Q>);
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 msk = K - k >= 16 ? __mmask16(0xffff) : __mmask16((1u << (K - k)) - 1);
    __m512 v = _mm512_div_ps(_mm512_maskz_loadu_ps(msk, x + k), sv);
    v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
    const __m512i i = _mm512_add_epi32(_mm512_cvtps_epi32(v), off);  // exact: integral, in range
    if constexpr (sizeof(Q) == 1)
      _mm512_mask_cvtepi32_storeu_epi8(q + k, msk, i);
    else
      _mm512_mask_cvtepi32_storeu_epi16(q + k, msk, i);
  }
  for (int64_t k = K; k < Kp; ++k) q[k] = static_cast<Q>(kQOffset<Q>);
}
#pragma GCC diagnostic pop
#endif

// Rows of x (M, K) in dtype T -> xq (M, Kp) of Q and a_scale (M,): parallel over rows.
template <typename T, typename Q>
void quantize_rows(const T* x, int64_t ldx, int64_t M, int64_t K, int64_t Kp, bool use512, Q* xq, float* as) {
  at::parallel_for(0, M, std::max<int64_t>(1, 4096 / std::max<int64_t>(K, 1)), [&](int64_t b, int64_t e) {
    std::vector<float> buf(std::is_same_v<T, float> ? 0 : K);
    for (int64_t m = b; m < e; ++m) {
      const float* xf;
      if constexpr (std::is_same_v<T, float>) {
        xf = x + m * ldx;
      } else {
        row_to_float(x + m * ldx, buf.data(), K);
        xf = buf.data();
      }
#if defined(__x86_64__) || defined(_M_X64)
      if (use512) {
        as[m] = row_scale(row_amax_512(xf, K));
        quantize_row_512<Q>(xf, K, Kp, as[m], xq + m * Kp);
        continue;
      }
#endif
      (void)use512;
      as[m] = row_scale(row_amax(xf, K));
      quantize_row_scalar<Q>(xf, K, Kp, as[m], xq + m * Kp);
    }
  });
}

// Stores one 16-column result row (fp32 v[0, cnt)) to y (dtype T).
template <typename T>
inline void store_row(const float* v, int cnt, T* y) {
  for (int i = 0; i < cnt; ++i) y[i] = static_cast<T>(v[i]);
}

// The GEMM tasks (header): panels of `pw` 16-blocks x row blocks of kMB rows, panel-major.
template <class F>
void for_tasks(int64_t M, int64_t nblk, int64_t pw, const F& f /* (m0, m1, nb0, nb1) */) {
  const int64_t panels = (nblk + pw - 1) / pw, mblocks = (M + kMB - 1) / kMB;
  at::parallel_for(0, panels * mblocks, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t p = t / mblocks, mb = t % mblocks;
      f(mb * kMB, std::min(M, mb * kMB + kMB), p * pw, std::min(nblk, p * pw + pw));
    }
  });
}

// ---------------------------------------------------------------- AVX-512 VNNI
#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
constexpr int kVnniMR = 8, kVnniNT = 2;

// Outputs y[m0 .. m0 + MR, nb0 * 16 .. + NT * 16) from u8 activations xa (row m0, ld Kp) and the packed
// blocks from nb0 (wb; ldb bytes between blocks), kq groups of 4 k.
template <int MR, int NT, typename T>
FASTLM_W8A8_VNNI void tile_vnni(const uint8_t* xa, int64_t ldx, const int8_t* wb, int64_t ldb, int64_t kq,
                                const int32_t* colsum, const float* as, const float* scale, const float* bias,
                                int64_t n0, int64_t N, T* y) {
  __m512i acc[MR][NT];
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int t = 0; t < NT; ++t) acc[m][t] = _mm512_setzero_si512();
  for (int64_t j = 0; j < kq; ++j) {
    __m512i wv[NT];
#pragma GCC unroll 4
    for (int t = 0; t < NT; ++t) wv[t] = _mm512_loadu_si512(wb + t * ldb + j * 64);
    // the next panel's blocks (this thread's next task after this panel's row blocks), into L2: few
    // rows (decode) stream the packed weight from DRAM (8 rows x GPT-2's 768x50257 head, 1 thread,
    // other core busy: 4.0-6.4 -> 3.0-3.3 ms); with many rows the later row blocks find it in L2
    // (prefetching past the end of the buffer is harmless)
#pragma GCC unroll 4
    for (int t = 0; t < NT; ++t) _mm_prefetch(reinterpret_cast<const char*>(wb + (NT + t) * ldb + j * 64), _MM_HINT_T1);
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m) {
      int32_t x4;
      std::memcpy(&x4, xa + m * ldx + j * kKG, 4);
      const __m512i xb = _mm512_set1_epi32(x4);
#pragma GCC unroll 4
      for (int t = 0; t < NT; ++t) acc[m][t] = _mm512_dpbusd_epi32(acc[m][t], xb, wv[t]);
    }
  }
#pragma GCC unroll 4
  for (int t = 0; t < NT; ++t) {
    const int64_t n = n0 + t * 16;
    if (n >= N) break;
    const int cnt = int(std::min<int64_t>(16, N - n));
    const __mmask16 msk = cnt == 16 ? __mmask16(0xffff) : __mmask16((1u << cnt) - 1);
    const __m512i corr = _mm512_slli_epi32(_mm512_loadu_si512(colsum + t * 16), 7);  // 128 * colsum
    const __m512 sc = _mm512_maskz_loadu_ps(msk, scale + n);
    const __m512 bv = bias ? _mm512_maskz_loadu_ps(msk, bias + n) : _mm512_setzero_ps();
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m) {
      __m512 p = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[m][t], corr)),
                                             _mm512_set1_ps(as[m])), sc);
      asm("" : "+v"(p));  // no FMA with the bias add (the reference rounds the product first)
      if (bias) p = _mm512_add_ps(p, bv);
      T* yr = y + m * N + n;
      if constexpr (std::is_same_v<T, float>) {
        _mm512_mask_storeu_ps(yr, msk, p);
      } else {
        alignas(64) float tmp[16];
        _mm512_store_ps(tmp, p);
        store_row(tmp, cnt, yr);
      }
    }
  }
}

template <int NT, typename T>
FASTLM_W8A8_VNNI void rows_vnni(int mr, const uint8_t* xa, int64_t ldx, const int8_t* wb, int64_t ldb, int64_t kq,
                                const int32_t* colsum, const float* as, const float* scale, const float* bias,
                                int64_t n0, int64_t N, T* y) {
  switch (mr) {
#define FASTLM_W8A8_CASE(R) \
  case R: return tile_vnni<R, NT, T>(xa, ldx, wb, ldb, kq, colsum, as, scale, bias, n0, N, y);
    FASTLM_W8A8_CASE(1) FASTLM_W8A8_CASE(2) FASTLM_W8A8_CASE(3) FASTLM_W8A8_CASE(4)
    FASTLM_W8A8_CASE(5) FASTLM_W8A8_CASE(6) FASTLM_W8A8_CASE(7) FASTLM_W8A8_CASE(8)
#undef FASTLM_W8A8_CASE
    default: return;
  }
}

template <typename T>
void gemm_vnni(const uint8_t* xa, int64_t M, int64_t Kp, const int8_t* packed, int64_t N, int64_t Np,
               const float* as, const float* scale, const float* bias, T* y) {
  static_assert(kVnniMR == 8, "rows_vnni's cases");
  const int64_t kq = Kp / kKG, ldb = kq * 64, nblk = Np / kNB;
  const int32_t* colsum = reinterpret_cast<const int32_t*>(packed + Np * Kp);
  for_tasks(M, nblk, kVnniNT, [&](int64_t m0, int64_t m1, int64_t nb0, int64_t nb1) {
    const int8_t* wb = packed + nb0 * ldb;
    const int64_t n0 = nb0 * kNB;
    for (int64_t m = m0; m < m1; m += kVnniMR) {
      const int mr = int(std::min<int64_t>(kVnniMR, m1 - m));
      if (nb1 - nb0 == kVnniNT)
        rows_vnni<kVnniNT, T>(mr, xa + m * Kp, Kp, wb, ldb, kq, colsum + n0, as + m, scale, bias, n0, N, y + m * N);
      else
        rows_vnni<1, T>(mr, xa + m * Kp, Kp, wb, ldb, kq, colsum + n0, as + m, scale, bias, n0, N, y + m * N);
    }
  });
}
#pragma GCC diagnostic pop
#endif

// ---------------------------------------------------------------- AVX2
#if defined(__AVX2__) && defined(__FMA__)
// Outputs y[m0 .. m0 + MR, n0 .. n0 + 16) from int16 activations xa (row m0, ld Kp) and one packed
// block wb (kq groups of 4 k). Per group: the 64 weight bytes sign-extended to 4 x 16 int16 (4
// columns x 4 k each), vpmaddwd with the row's 4 int16 activations broadcast -> per column two pair
// sums (k0k1, k2k3) in adjacent int32 lanes, added up at the end.
template <int MR, typename T>
void tile_avx2(const int16_t* xa, int64_t ldx, const int8_t* wb, int64_t kq, const float* as, const float* scale,
               const float* bias, int64_t n0, int64_t N, T* y) {
  __m256i acc[MR][4];
  for (int m = 0; m < MR; ++m)
    for (int q = 0; q < 4; ++q) acc[m][q] = _mm256_setzero_si256();
  for (int64_t j = 0; j < kq; ++j) {
    __m256i wv[4];
    for (int q = 0; q < 4; ++q)
      wv[q] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wb + j * 64 + q * 16)));
    for (int m = 0; m < MR; ++m) {
      int64_t x4;
      std::memcpy(&x4, xa + m * ldx + j * kKG, 8);
      const __m256i xb = _mm256_set1_epi64x(x4);
      for (int q = 0; q < 4; ++q) acc[m][q] = _mm256_add_epi32(acc[m][q], _mm256_madd_epi16(wv[q], xb));
    }
  }
  const int cnt = int(std::min<int64_t>(16, N - n0));
  for (int m = 0; m < MR; ++m) {
    // acc[m][q] lanes (2c + h): column 4q + c, pair h; hadd + permute -> columns 8 at a time in order
    alignas(32) int32_t s[16];
    const __m256i lo = _mm256_permute4x64_epi64(_mm256_hadd_epi32(acc[m][0], acc[m][1]), 0xD8);
    const __m256i hi = _mm256_permute4x64_epi64(_mm256_hadd_epi32(acc[m][2], acc[m][3]), 0xD8);
    _mm256_store_si256(reinterpret_cast<__m256i*>(s), lo);
    _mm256_store_si256(reinterpret_cast<__m256i*>(s + 8), hi);
    float v[16];
    for (int i = 0; i < cnt; ++i) v[i] = epilogue(static_cast<float>(s[i]), as[m], scale[n0 + i], bias, n0 + i);
    store_row(v, cnt, y + m * N + n0);
  }
}

template <typename T>
void gemm_avx2(const int16_t* xa, int64_t M, int64_t Kp, const int8_t* packed, int64_t N, int64_t Np,
               const float* as, const float* scale, const float* bias, T* y) {
  const int64_t kq = Kp / kKG, ldb = kq * 64, nblk = Np / kNB;
  for_tasks(M, nblk, 2, [&](int64_t m0, int64_t m1, int64_t nb0, int64_t nb1) {
    for (int64_t nb = nb0; nb < nb1; ++nb) {
      const int8_t* wb = packed + nb * ldb;
      int64_t m = m0;
      for (; m + 2 <= m1; m += 2)
        tile_avx2<2, T>(xa + m * Kp, Kp, wb, kq, as + m, scale, bias, nb * kNB, N, y + m * N);
      if (m < m1) tile_avx2<1, T>(xa + m * Kp, Kp, wb, kq, as + m, scale, bias, nb * kNB, N, y + m * N);
    }
  });
}
#endif

// ---------------------------------------------------------------- portable scalar
// Reads qweight (N, K) row-major; int64 accumulators (any K).
template <typename T>
void gemm_scalar(const int8_t* xq, int64_t M, int64_t Kp, const int8_t* w, int64_t K, int64_t N, const float* as,
                 const float* scale, const float* bias, T* y) {
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(K * M, 1));
  at::parallel_for(0, N, grain, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) {
      const int8_t* wr = w + n * K;
      for (int64_t m = 0; m < M; ++m) {
        const int8_t* xr = xq + m * Kp;
        int64_t acc = 0;
        for (int64_t k = 0; k < K; ++k) acc += int32_t(xr[k]) * int32_t(wr[k]);
        y[m * N + n] = static_cast<T>(epilogue(static_cast<float>(acc), as[m], scale[n], bias, n));
      }
    }
  });
}

// ---------------------------------------------------------------- driver
enum class Path { kScalar, kAvx2, kVnni };

inline bool cpu_has_vnni512() {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool ok = cpu_use_avx512() && __builtin_cpu_supports("avx512vnni");
  return ok;
#else
  return false;
#endif
}

// The widest path here; FASTLM_W8A8_ISA (read per call, a test knob) narrows it: "avx2" or "scalar".
Path pick_path(int64_t K) {
  Path p = Path::kScalar;
#if defined(__AVX2__) && defined(__FMA__)
  p = Path::kAvx2;
#endif
  if (cpu_has_vnni512()) p = Path::kVnni;
  if (const char* env = std::getenv("FASTLM_W8A8_ISA")) {
    if (std::strcmp(env, "scalar") == 0) p = Path::kScalar;
    else if (std::strcmp(env, "avx2") == 0 && p == Path::kVnni) p = Path::kAvx2;
  }
  if (K > kMaxK) p = Path::kScalar;  // int32 accumulators would not be exact
  return p;
}

void check_qweight(const at::Tensor& qw, const char* op) {
  FASTLM_CHECK(qw.defined() && qw.dim() == 2, op, "qweight must be 2-D (out_features, in_features)");
  FASTLM_CHECK(qw.scalar_type() == at::kChar, op, "qweight must be int8, got ", qw.scalar_type());
  FASTLM_CHECK(qw.is_contiguous(), op, "qweight must be contiguous");
}

void check_packed(const at::Tensor& packed, int64_t N, int64_t K, const at::Tensor& qw) {
  const PackDims d = pack_dims(N, K);
  FASTLM_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 1 && packed.is_contiguous(), kOp,
               "packed must be a contiguous 1-D uint8 tensor (linear_w8a8_pack(qweight))");
  FASTLM_CHECK(packed.device() == qw.device(), kOp, "packed is on ", packed.device(), ", qweight on ", qw.device());
  FASTLM_CHECK(packed.numel() == d.bytes, kOp, "packed has ", packed.numel(), " bytes, a (", N, ", ", K,
               ") qweight packs to ", d.bytes, ": pass linear_w8a8_pack(qweight) of this qweight");
}

at::Tensor linear_w8a8_pack_cpu(const at::Tensor& qweight) {
  check_qweight(qweight, "linear_w8a8_pack");
  const int64_t N = qweight.size(0), K = qweight.size(1);
  at::Tensor out = at::empty({pack_dims(N, K).bytes}, qweight.options().dtype(at::kByte));
  if (out.numel() > 0) pack_weight(qweight.data_ptr<int8_t>(), N, K, static_cast<int8_t*>(out.data_ptr()));
  return out;
}

template <typename T>
void run(const at::Tensor& x, const at::Tensor& qweight, const float* scale, const float* bias,
         const at::Tensor& packed_in, Path path, at::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0);
  const PackDims d = pack_dims(N, K);
  const T* xp = x.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  std::vector<float> as(M);
  at::Tensor packed = packed_in;
  if (path != Path::kScalar && !packed.defined()) packed = linear_w8a8_pack_cpu(qweight);
  const int8_t* pk = packed.defined() ? static_cast<const int8_t*>(packed.data_ptr()) : nullptr;
  (void)pk;  // unused where only the scalar path is compiled
#if defined(__x86_64__) || defined(_M_X64)
  if (path == Path::kVnni) {
    std::vector<uint8_t> xa(M * d.Kp);
    quantize_rows<T, uint8_t>(xp, x.stride(0), M, K, d.Kp, true, xa.data(), as.data());
    return gemm_vnni<T>(xa.data(), M, d.Kp, pk, N, d.Np, as.data(), scale, bias, yp);
  }
#endif
#if defined(__AVX2__) && defined(__FMA__)
  if (path == Path::kAvx2) {
    std::vector<int16_t> xa(M * d.Kp);
    quantize_rows<T, int16_t>(xp, x.stride(0), M, K, d.Kp, false, xa.data(), as.data());
    return gemm_avx2<T>(xa.data(), M, d.Kp, pk, N, d.Np, as.data(), scale, bias, yp);
  }
#endif
  std::vector<int8_t> xa(M * d.Kp);
  quantize_rows<T, int8_t>(xp, x.stride(0), M, K, d.Kp, false, xa.data(), as.data());
  gemm_scalar<T>(xa.data(), M, d.Kp, qweight.data_ptr<int8_t>(), K, N, as.data(), scale, bias, yp);
}

// y (M, N) = GELU(y) in place, rows in parallel (act 1: tanh form, 2: erf form).
template <typename T>
void gelu_rows_inplace(T* y, int64_t M, int64_t N, int act) {
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(N, 1)), [&](int64_t b, int64_t e) {
    std::vector<float> f(std::is_same_v<T, float> ? 0 : N);
    for (int64_t m = b; m < e; ++m) {
      if constexpr (std::is_same_v<T, float>) {
        gelu_row_fp32(y + m * N, N, act == 1);
      } else {
        row_to_float(y + m * N, f.data(), N);
        gelu_row_fp32(f.data(), N, act == 1);
        row_from_float(f.data(), y + m * N, N);
      }
    }
  });
}

at::Tensor linear_w8a8_fwd_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                               const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& packed,
                               c10::string_view activation) {
  const int act = activation == "none" ? 0 : activation == "tanh" ? 1 : activation == "erf" ? 2 : -1;
  FASTLM_CHECK(act >= 0, kOp, "activation must be 'none', 'tanh' or 'erf', got '", std::string(activation), "'");
  check_rows(x, kOp, "input");
  check_qweight(qweight, kOp);
  FASTLM_CHECK(qweight.device() == x.device(), kOp, "qweight is on ", qweight.device(), ", input on ", x.device());
  const int64_t M = x.size(0), N = qweight.size(0), K = x.size(1);
  FASTLM_CHECK(qweight.size(1) == K, kOp, "qweight has ", qweight.size(1), " input features, input has ", K);
  FASTLM_CHECK(scale.defined() && scale.scalar_type() == at::kFloat, kOp, "scale must be float32");
  FASTLM_CHECK(scale.dim() == 1 && scale.size(0) == N, kOp, "scale must be (out_features,) = (", N,
               ",) per output channel (W8A8 takes no group scales), got ", scale.sizes());
  FASTLM_CHECK(scale.is_contiguous() && scale.device() == x.device(), kOp, "scale must be contiguous, on ",
               x.device());
  check_vector(bias, N, x, kOp, "bias");
  const at::Tensor* pk = opt_ptr(packed);
  if (pk) check_packed(*pk, N, K, qweight);
  at::Tensor y = new_output({M, N}, x.options());
  if (y.numel() == 0) return y;
  std::vector<float> bf;
  const at::Tensor* b = opt_ptr(bias);
  FASTLM_DISPATCH_FLOAT_TYPES(x.scalar_type(), kOp, [&] {
    if (b) {
      bf.resize(N);
      row_to_float(b->data_ptr<scalar_t>(), bf.data(), N);
    }
    run<scalar_t>(x, qweight, scale.data_ptr<float>(), b ? bf.data() : nullptr, pk ? *pk : at::Tensor(),
                  pick_path(K), y);
    if (act) gelu_rows_inplace<scalar_t>(y.data_ptr<scalar_t>(), M, N, act);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlm_C, CPU, m) {
  m.impl("linear_w8a8_fwd", &linear_w8a8_fwd_cpu);
  m.impl("linear_w8a8_pack", &linear_w8a8_pack_cpu);
}

}  // namespace fastlm::cpu

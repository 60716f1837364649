// argmax_n (x @ W^T)[m, n] on the CPU for a few fp32 rows x, reading most of W as int8: the greedy
// pick of a decode step, whose LM head (50257 x 768 for GPT-2) is ~30% of the weights read per step.
//
// Screen (linear_argmax_screen, built once per weight): per W row n, q_n = round(w_n / s_n) in int8
// with s_n = max|w_n| / 127, and a bound slack_n such that for every x
//     | l_mn - a_mn | <= ||x_m||_2 * slack_n,
// where l_mn is the fp32 logit linear_fwd computes for the one row x_m and a_mn = fl(s_n * sum x q)
// the screened one: slack_n = ||w_n - s_n q_n||_2 (the quantization residual, exact in fp64, by
// Cauchy-Schwarz) + gamma_{K+2} (||w_n||_2 + ||s_n q_n||_2) (the fp32 rounding of both dot
// products, gamma_k = k u / (1 - k u), u = 2^-24), padded by 1e-6 relative and rounded up.
//
// Argmax (linear_argmax_fwd): one pass over the int8 rows computes a (threads split the rows; tiles
// of 4 rows against the input rows in blocks of 4/2/1, or of 3 against blocks of 8; the next tile
// prefetched) and, per row m,
// T_m = max_n (a_mn - e_mn), e_mn = ||x_m|| slack_n. Every n with a_mn + e_mn < T_m has
// l_mn < l_m(argmax of the lower bound): it cannot be the argmax. The survivors ("candidates",
// collected in the same pass against the running threshold, then filtered by the final one) are
// recomputed exactly with linear_fwd's one-row arithmetic (tile_avx512<1, 1, 2> over the whole K) and
// the first largest wins (a NaN logit counts as the largest, as torch.argmax). So the result is
// bit-for-bit argmax(ops.linear(x[m:m+1], W)), reading 1 byte per weight instead of 4 plus a few
// rows. A row x_m with a non-finite value, or with more than max(N / 16, 256) candidates, takes
// the exact full product. Paths, chosen at run time: AVX-512 VNNI (below), AVX-512 (tiles of 16 k,
// exact recompute with tile_avx512<1, 1, 2>), AVX2 integer (below) and AVX2 + FMA (8 k per step,
// Avx2Path, the AVX2 integer screen's fallback; both recompute with row_times_rows<1, 4>, linear_fwd's
// one-row AVX2 stream): each recomputes on the path linear_fwd takes on that machine. Builds without
// AVX2 (aarch64...) run linear_fwd on each row, then argmax.
//
// VNNI screen (CPUs with avx512_vnni; FASTLM_INT8_VNNI=0 turns it off): the screened logit is an
// integer dot instead of an fp32 one. Each input row is split into two int8 digits on a power-of-two
// scale 2^e (max|x| <= 127 * 2^e): x' = 2^e (hi + lo / 256), hi = round(x / 2^e), lo =
// round(256 (x / 2^e - hi)) clamped to [-127, 127], d = x - x' (computed exactly in fp64, ||d|| <=
// ~2^e sqrt(K) / 512). vpdpbusd (the weight row as u8 = q + 128, the digits s8; 64 MACs an
// instruction, exact int32) gives both digit dots, combined exactly in int64, and
// a_mn = s_n * 2^(e-8) (256 dot_hi + dot_lo) in fp64 = fl(x' . s_n q_n). The bound gains
// |x' . s q - x . s q| <= ||d|| ||s_n q_n|| <= ||d|| s_n 127 sqrt(K) and the fp64 roundings:
// e_mn = ||x_m|| slack_n + s_n * 127 sqrt(K) (||d_m|| + 2^-50 (||x_m|| + ||d_m||)), padded up. Two
// instructions per 64 weights and row against the fp32 screen's 4 widenings + 4 FMAs per row: the
// many-row screen (the serving engine's decode rows) is ~2x faster, one row streams at the read rate.
//
// AVX2 integer screen (Avx2IntPath: CPUs without the AVX-512 paths, e.g. Zen 3, and under
// FASTLM_CPU_NO_AVX512=1; FASTLM_INT8_VNNI=0 turns it off too, as it does the VNNI one): the same
// model with one int16 digit per element: x' = 2^e h, h = round(x / 2^e), e the smallest with
// max|x| <= 32767 * 2^e and 127 sum_k |h_k| < 2^31 (then no int32 sum of a tile can overflow, at any
// K; e grows by a bit or two only for long flat rows), d = x - x' exact in fp64 (|d_k| <= 2^(e-1)),
// a_mn = s_n * (T * 2^e) in fp64 (T = sum q h, exact int32; T * 2^e exact, one rounding) and e_mn as
// in the VNNI screen. Each 16 weights of a W row are widened to int16 once (vpmovsxbw) and meet each
// input row in one vpmaddwd (16 exact s16 products, summed in pairs into int32) + vpaddd, through
// inline asm (cpu/vnni512.h: with the intrinsics GCC reassociated the unrolled adds and spilled);
// register tiles 1x4 / 2x4 / 3x3 / 4x2 (input rows x W rows, accumulators + weights <= 16 ymm), a
// transpose-add tree for the horizontal sums, the rows ~16 KB ahead prefetched to L2. Two
// instructions per 16 MACs against the fp32 screen's widen + convert + FMA per 8. It takes every
// finite row (2^e is an fp64 power of two: never out of range) up to K = 65536 (past it the digits
// get coarse: the fp32 screen). Pass 1's consumer (ChunkSink) keeps the row state in fixed arrays
// and drops the common case (a + e below the running threshold) after one comparison; this screen
// makes that test for up to 4 outputs at once in fp64 vectors first. GPT-2 head (50257 x 768), 1
// thread, FASTLM_CPU_NO_AVX512=1 on a Zen 4 host (medians of 4 interleaved runs, the other core
// lightly loaded), fp32 -> int16 screen: 1 row 5.5 -> 2.4 ms, 4 rows 6.8 -> 4.4, 8 rows 11.7 -> 6.7,
// 16 rows 22.6 -> 12.3 (about the VNNI screen's times on the same host).
#include <ATen/Parallel.h>
#include <ATen/ops/argmax.h>
#include <ATen/ops/empty.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <functional>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "common.h"
#include "cpu/decode_parallel.h"
#include "cpu/vnni512.h"
#include "cpu/linear_tiles.h"
#include "cpu/vec_utils.h"

namespace fastlm::cpu {
namespace {

constexpr const char* kScreen = "linear_argmax_screen";
constexpr const char* kOp = "linear_argmax_fwd";
constexpr int64_t kMaxRows = 16;

double gamma_k(int64_t k) {
  const double ku = static_cast<double>(k) * std::ldexp(1.0, -24);
  return ku / (1.0 - ku);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_argmax_screen_cpu(const at::Tensor& weight) {
  check_rows(weight, kScreen, "weight");
  FASTLM_CHECK(weight.scalar_type() == at::kFloat, kScreen, "weight must be float32, got ", weight.scalar_type());
  const at::Tensor w = weight.contiguous();
  const int64_t N = w.size(0), K = w.size(1);
  FASTLM_CHECK(K > 0 && K < (int64_t(1) << 22), kScreen, "weight must have 1 to 2^22 input features, got ", K);
  at::Tensor q = at::empty({N, K}, w.options().dtype(at::kChar));
  at::Tensor scale = at::empty({N}, w.options());
  at::Tensor slack = at::empty({N}, w.options());
  const float* wp = w.data_ptr<float>();
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = scale.data_ptr<float>();
  float* slp = slack.data_ptr<float>();
  const double g = gamma_k(K + 2);
  parallel_range(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const float* wr = wp + n * K;
      int8_t* qr = qp + n * K;
      float amax = 0.f;
      bool finite = true;
      for (int64_t k = 0; k < K; ++k) {
        finite = finite && std::isfinite(wr[k]);
        amax = std::max(amax, std::fabs(wr[k]));
      }
      if (!finite) {  // never screened out: always a candidate
        std::fill(qr, qr + K, int8_t(0));
        sp[n] = 0.f;
        slp[n] = std::numeric_limits<float>::infinity();
        continue;
      }
      const float s = amax / 127.f;
      double r2 = 0.0, w2 = 0.0, q2 = 0.0;
      for (int64_t k = 0; k < K; ++k) {
        const int qi = s > 0.f ? static_cast<int>(std::clamp(std::nearbyint(wr[k] / s), -127.f, 127.f)) : 0;
        qr[k] = static_cast<int8_t>(qi);
        const double sq = static_cast<double>(s) * qi;  // exact in fp64
        const double r = static_cast<double>(wr[k]) - sq;
        r2 += r * r;
        w2 += static_cast<double>(wr[k]) * wr[k];
        q2 += sq * sq;
      }
      const double bound = (std::sqrt(r2) + g * (std::sqrt(w2) + std::sqrt(q2))) * (1.0 + 1e-6);
      sp[n] = s;
      slp[n] = std::nextafter(static_cast<float>(bound), std::numeric_limits<float>::infinity());
    }
  });
  return {q, scale, slack};
}

// The checks both screened ops make (x fp32 (M <= 16, K), weight (N, K), its screen).
void check_screened_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& qweight,
                         const at::Tensor& scale, const at::Tensor& slack, const char* op) {
  check_rows(x, op, "input");
  check_rows(weight, op, "weight");
  check_same(weight, x, op, "weight");
  FASTLM_CHECK(x.scalar_type() == at::kFloat, op, "input must be float32, got ", x.scalar_type());
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  FASTLM_CHECK(weight.size(1) == K, op, "weight has ", weight.size(1), " input features, input has ", K);
  FASTLM_CHECK(N > 0, op, "weight must have at least one row");
  FASTLM_CHECK(M <= kMaxRows, op, "input has ", M, " rows; at most ", kMaxRows, " (use linear)");
  FASTLM_CHECK(qweight.scalar_type() == at::kChar && qweight.dim() == 2 && qweight.size(0) == N &&
                   qweight.size(1) == K && qweight.is_contiguous() && qweight.device() == x.device(),
               op, "qweight must be a contiguous int8 (", N, ", ", K, ") tensor from linear_argmax_screen(weight)");
  check_vector(scale, N, x, op, "scale");
  check_vector(slack, N, x, op, "slack");
}

#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// MR input rows x NR int8 W rows (row stride K), 16 k per step: each int8 vector is widened to fp32
// once and used for MR FMAs; the next tile's rows (NR * K bytes on) are prefetched a line per row
// every 64 k. out[m * NR + r] = sum_k x[m][k] * q[r][k] (fp32).
template <int MR, int NR>
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline void tile_q8(const int8_t* q, int64_t K, const float* x,
                                                                          int64_t ldx, float* out) {
  __m512 acc[MR][NR];
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 wv[NR];
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r)
      wv[r] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + r * K + k))));
    if ((k & 63) == 0) {
#pragma GCC unroll 4
      for (int r = 0; r < NR; ++r) _mm_prefetch(reinterpret_cast<const char*>(q + (NR + r) * K + k), _MM_HINT_T0);
    }
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m) {
      __m512 xv = _mm512_loadu_ps(x + m * ldx + k);
      asm("" : "+v"(xv));  // one load, not one folded into each FMA (see linear_tiles.h)
#pragma GCC unroll 4
      for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_fmadd_ps(wv[r], xv, acc[m][r]);
    }
  }
  if (k < K) {  // tail: masked (no read past the row)
    const __mmask16 msk = static_cast<__mmask16>((1u << (K - k)) - 1);
    __m512 wv[NR];
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r)
      wv[r] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(msk, q + r * K + k)));
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m) {
      const __m512 xv = _mm512_maskz_loadu_ps(msk, x + m * ldx + k);
#pragma GCC unroll 4
      for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_fmadd_ps(wv[r], xv, acc[m][r]);
    }
  }
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r) out[m * NR + r] = _mm512_reduce_add_ps(acc[m][r]);
}
#pragma GCC diagnostic pop

// linear_fwd's logit for one input row and one W row (the arithmetic of its M == 1 AVX-512 path).
FASTLM_TILE_TARGET float exact_logit_avx512(const float* w, const float* x, int64_t K) {
  float out = 0.f;
  tile_avx512<1, 1, 2>(w, K, x, K, K, &out);
  return out + 0.f;  // linear_fwd adds the (zero) bias
}

struct Candidate {
  int64_t m, n;
  double a;  // the screened logit
};

struct RowState {
  double xnorm = 0.0;     // ||x_m||_2, padded up
  double extra = 0.0;     // the integer screens' digit-rounding term per unit of s_n (0 on the fp32 screens)
  bool screened = true;   // false: the exact full product
};

// e_mn = ||x_m|| slack_n + extra_m s_n; a non-finite weight row (slack = inf) is always a candidate,
// x = 0 included (0 * inf would be NaN and fail every comparison).
inline double bound(const RowState& row, float slack, float s) {
  return std::isinf(slack) ? std::numeric_limits<double>::infinity()
                           : row.xnorm * static_cast<double>(slack) + row.extra * static_cast<double>(s);
}

// Pass 1's consumer of the screened logits of one chunk of W rows: per row m, lo[m] = the running max
// of a_mn - e_mn, and the candidates (a_mn + e_mn >= lo[m] when seen). Called once per (m, n): the
// row state sits in fixed arrays, e_mn = xn[m] slack_n + extra_m s_n without a branch (xn = max(||x||,
// DBL_MIN): a non-finite weight row's inf slack gives e = inf, never NaN, even for x = 0; a row not
// screened: xn = NaN, so nothing passes), and the common case (a + e < lo: neither a candidate nor a
// new max) is one comparison.
struct ChunkSink {
  double xn[kMaxRows], extra[kMaxRows], lo[kMaxRows];
  const float* slp;
  const float* sp;
  std::vector<Candidate> cand;
  ChunkSink(const std::vector<RowState>& rows, const float* slp_, const float* sp_) : slp(slp_), sp(sp_) {
    for (size_t m = 0; m < rows.size(); ++m) {
      xn[m] = rows[m].screened ? std::max(rows[m].xnorm, std::numeric_limits<double>::min())
                               : std::numeric_limits<double>::quiet_NaN();
      extra[m] = rows[m].extra;
      lo[m] = -std::numeric_limits<double>::infinity();
    }
  }
  inline void operator()(int64_t m, int64_t n, double a) {
    const double e = xn[m] * static_cast<double>(slp[n]) + extra[m] * static_cast<double>(sp[n]);
    if (!(a + e >= lo[m])) return;  // a - e <= a + e < lo too
    if (a - e > lo[m]) lo[m] = a - e;
    if (a + e >= lo[m]) cand.push_back({m, n, a});
  }
};

// The int8 tiles of W rows [n0, n1) against all M input rows: emit(m, n, sum_k x[m][k] q[n][k]) for
// every pair (the caller scales by scale[n]).
template <class Emit>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void screen_tiles_avx512(const int8_t* q, const float* x,
                                                                             int64_t M, int64_t K, int64_t n0,
                                                                             int64_t n1, const Emit& consider) {
  float out[8 * 4];
  auto tile = [&](auto nr_tag, int64_t n) {
    constexpr int nr = decltype(nr_tag)::value;
    const int8_t* qn = q + n * K;
    int64_t m = 0;
    if constexpr (nr <= 3) {
      for (; M - m >= 8; m += 8) {
        tile_q8<8, nr>(qn, K, x + m * K, K, out);
        for (int i = 0; i < 8; ++i)
          for (int r = 0; r < nr; ++r) consider(m + i, n + r, out[i * nr + r]);
      }
    }
    for (; M - m >= 4; m += 4) {
      tile_q8<4, nr>(qn, K, x + m * K, K, out);
      for (int i = 0; i < 4; ++i)
        for (int r = 0; r < nr; ++r) consider(m + i, n + r, out[i * nr + r]);
    }
    if (M - m >= 2) {
      tile_q8<2, nr>(qn, K, x + m * K, K, out);
      for (int i = 0; i < 2; ++i)
        for (int r = 0; r < nr; ++r) consider(m + i, n + r, out[i * nr + r]);
      m += 2;
    }
    if (M - m == 1) {
      tile_q8<1, nr>(qn, K, x + m * K, K, out);
      for (int r = 0; r < nr; ++r) consider(m, n + r, out[r]);
    }
  };
  int64_t n = n0;
  if (M >= 8) {
    for (; n + 3 <= n1; n += 3) tile(std::integral_constant<int, 3>{}, n);
  } else {
    for (; n + 4 <= n1; n += 4) tile(std::integral_constant<int, 4>{}, n);
  }
  for (; n < n1; ++n) tile(std::integral_constant<int, 1>{}, n);
}

// int8 W rows per register tile on AVX-512: 4 against input rows in blocks of 4/2/1; 3 against
// blocks of 8 (24 accumulators: each widened W vector feeds 8 FMAs).
struct Avx512Path {
  static int64_t tile_rows(int64_t M) { return M >= 8 ? 3 : 4; }
  template <class Emit>
  static void screen(const int8_t* q, const float* x, int64_t M, int64_t K, int64_t n0, int64_t n1, const Emit& e) {
    screen_tiles_avx512(q, x, M, K, n0, n1, e);
  }
  static float exact(const float* w, const float* x, int64_t K) { return exact_logit_avx512(w, x, K); }
};

#define FASTLM_ARGMAX_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

// MR input rows (two int8 digit planes each: hi at xd, lo at xd + Kp; row stride ldxd) x NR int8 W
// rows (stride K), 64 k a step (the tail masked: the weight bytes past K load as 0 and their digits
// are 0). out[(m * NR + r) * 2 + {0, 1}] = sum_k (q[r][k] + 128) * {hi, lo}[m][k] (exact int32). PF:
// prefetch (to L2) the W rows pfd rows ahead, a line per row and step.
template <int MR, int NR, bool PF>
FASTLM_ARGMAX_VNNI void tile_q8_vnni(const int8_t* q, int64_t K, const int8_t* xd, int64_t ldxd, int64_t Kp,
                                     int32_t* out, int64_t pfd) {
  constexpr int NA = MR * NR * 2;
  __m512i acc[NA];
#pragma GCC unroll 32
  for (int i = 0; i < NA; ++i) acc[i] = _mm512_setzero_si512();
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const int64_t nfull = K / 64;
  auto step = [&](int64_t b, __mmask64 msk, auto full_tag) FASTLM_ARGMAX_VNNI __attribute__((always_inline)) {
    __m512i wv[NR];
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r) {
      const __m512i w = decltype(full_tag)::value ? _mm512_loadu_si512(q + r * K + b * 64)
                                                  : _mm512_maskz_loadu_epi8(msk, q + r * K + b * 64);
      wv[r] = _mm512_xor_si512(w, flip);  // q + 128 as u8 (masked-out bytes: 128, against zero digits)
    }
    if constexpr (PF) {
#pragma GCC unroll 4
      for (int r = 0; r < NR; ++r) _mm_prefetch(reinterpret_cast<const char*>(q + (pfd + r) * K + b * 64), _MM_HINT_T1);
    }
#pragma GCC unroll 4
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 2
      for (int d = 0; d < 2; ++d) {
        const __m512i xv = _mm512_loadu_si512(xd + m * ldxd + d * Kp + b * 64);
#pragma GCC unroll 4
        for (int r = 0; r < NR; ++r) dpbusd(acc[(m * NR + r) * 2 + d], wv[r], xv);
      }
  };
  for (int64_t b = 0; b < nfull; ++b) step(b, ~__mmask64(0), std::true_type{});
  if (K > nfull * 64) step(nfull, (~uint64_t(0)) >> (64 - (K - nfull * 64)), std::false_type{});
  hsum_epi32<NA>(acc, out);
}

inline bool screen_use_vnni() {
  static const bool ok = cpu_use_avx512() && __builtin_cpu_supports("avx512vnni");
  const char* env = std::getenv("FASTLM_INT8_VNNI");  // read per call: tests run both screens
  return ok && !(env && env[0] == '0');
}

// The VNNI screen (see the file comment): prepare() splits the input rows into digits and sets each
// row's `extra` (false: a row's 2^e is out of range; the caller takes the fp32 screen), screen()
// emits consider(m, n, a_mn) for W rows [n0, n1).
struct VnniPath {
  static constexpr int64_t kMaxK = 65536;  // int32 lanes: K / 16 * 4 * 255 * 127 < 2^31
  int64_t K = 0, Kp = 0, ldxd = 0;
  std::vector<int8_t> digits;  // per row: hi plane (Kp bytes), lo plane (Kp bytes), zero-padded
  std::vector<int64_t> corr;   // per row: 128 * (256 sum hi + sum lo), the u8 offset's share
  std::vector<double> unit;    // per row: 2^(e-8) (a = s_n * (T * 2^(e-8)), the product exact)

  static int64_t tile_rows(int64_t M) { return M >= 4 ? 3 : 4; }
  static float exact(const float* w, const float* x, int64_t K) { return exact_logit_avx512(w, x, K); }

  bool prepare(const float* xf, std::vector<RowState>& rows, int64_t M, int64_t K_) {
    K = K_;
    if (K > kMaxK) return false;
    Kp = (K + 63) / 64 * 64;
    ldxd = 2 * Kp;
    digits.assign(M * ldxd, 0);
    corr.assign(M, 0);
    unit.assign(M, 0.0);
    const double c127 = 127.0 * std::sqrt(static_cast<double>(K));
    for (int64_t m = 0; m < M; ++m) {
      if (!rows[m].screened) continue;
      const float* x = xf + m * K;
      float amax = 0.f;
      for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(x[k]));
      if (amax == 0.f) continue;  // a zero row: digits 0, a = 0, d = 0
      int e = std::ilogb(amax) - 6;  // the smallest e with amax <= 127 * 2^e
      if (amax > std::ldexp(127.f, e)) ++e;
      if (e < -120 || e > 120) return false;
      int8_t* hi = digits.data() + m * ldxd;
      int8_t* lo = hi + Kp;
      int64_t sum = 0;
      double d2 = 0.0;
      for (int64_t k = 0; k < K; ++k) {
        const double t = std::ldexp(static_cast<double>(x[k]), -e);  // exact, |t| <= 127
        const double h = std::nearbyint(t);
        const double l = std::clamp(std::nearbyint((t - h) * 256.0), -127.0, 127.0);
        hi[k] = static_cast<int8_t>(h);
        lo[k] = static_cast<int8_t>(l);
        sum += 256 * static_cast<int64_t>(h) + static_cast<int64_t>(l);
        const double d = static_cast<double>(x[k]) - std::ldexp(256.0 * h + l, e - 8);  // one rounding at most
        d2 += d * d;
      }
      corr[m] = 128 * sum;
      unit[m] = std::ldexp(1.0, e - 8);
      const double dn = std::sqrt(d2) * (1.0 + 1e-12);
      rows[m].extra = c127 * (dn + std::ldexp(rows[m].xnorm + dn, -50)) * (1.0 + 1e-9);
    }
    return true;
  }

  template <class Emit>
  void screen(const int8_t* q, const float* sp, int64_t M, int64_t n0, int64_t n1, const Emit& consider) const {
    const int64_t pfd = std::max<int64_t>(4, ((int64_t(16384) + K - 1) / K + 3) / 4 * 4);  // ~16 KB ahead
    alignas(64) int32_t out[32];
    auto emit = [&](int64_t m0, int mr, int64_t n, int nr) {
      for (int i = 0; i < mr; ++i)
        for (int r = 0; r < nr; ++r) {
          const int64_t m = m0 + i;
          const int64_t T = 256 * int64_t(out[(i * nr + r) * 2]) + out[(i * nr + r) * 2 + 1] - corr[m];
          consider(m, n + r, static_cast<double>(sp[n + r]) * (static_cast<double>(T) * unit[m]));
        }
    };
    auto tile = [&](auto nr_tag, int64_t n) {
      constexpr int nr = decltype(nr_tag)::value;
      const int8_t* qn = q + n * K;
      const bool pf = n + pfd + nr <= n1;
      int64_t m = 0;
      auto block = [&](auto mr_tag) {
        constexpr int mr = decltype(mr_tag)::value;
        if (pf && m == 0) tile_q8_vnni<mr, nr, true>(qn, K, digits.data() + m * ldxd, ldxd, Kp, out, pfd);
        else tile_q8_vnni<mr, nr, false>(qn, K, digits.data() + m * ldxd, ldxd, Kp, out, pfd);
        emit(m, mr, n, nr);
        m += mr;
      };
      if constexpr (nr == 3) {
        while (M - m >= 4) block(std::integral_constant<int, 4>{});
      }
      while (M - m >= 2) block(std::integral_constant<int, 2>{});
      if (M - m == 1) block(std::integral_constant<int, 1>{});
    };
    int64_t n = n0;
    if (M >= 4) {
      for (; n + 3 <= n1; n += 3) tile(std::integral_constant<int, 3>{}, n);
    } else {
      for (; n + 4 <= n1; n += 4) tile(std::integral_constant<int, 4>{}, n);
    }
    for (; n < n1; ++n) tile(std::integral_constant<int, 1>{}, n);
  }
};
#endif  // x86

#if defined(__AVX2__) && defined(__FMA__)
// The AVX2 + FMA screen (16 ymm registers): MR input rows x NR int8 W rows, 8 k per step, each int8
// group of 8 widened (vpmovsxbd + vcvtdq2ps) once and used for MR FMAs, MR * NR <= 8 accumulators;
// the next tile's rows prefetched a line per row every 64 k; the K % 8 tail through a zeroed
// 8-byte copy and a masked x load. out[m * NR + r] = sum_k x[m][k] q[r][k] (fp32).
inline float hsum256(__m256 v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  return _mm_cvtss_f32(_mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1)));
}

inline __m256 q8_to_ps(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

template <int MR, int NR>
inline void tile_q8_avx2(const int8_t* q, int64_t K, const float* x, int64_t ldx, float* out) {
  __m256 acc[MR][NR];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    if ((k & 63) == 0) {
#pragma GCC unroll 4
      for (int r = 0; r < NR; ++r) _mm_prefetch(reinterpret_cast<const char*>(q + (NR + r) * K + k), _MM_HINT_T0);
    }
    __m256 wv[NR];
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r) wv[r] = q8_to_ps(q + r * K + k);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + m * ldx + k);
#pragma GCC unroll 4
      for (int r = 0; r < NR; ++r) acc[m][r] = _mm256_fmadd_ps(wv[r], xv, acc[m][r]);
    }
  }
  if (k < K) {  // tail: no read past the rows
    const int rem = static_cast<int>(K - k);
    alignas(32) int32_t lanes[8];
    for (int i = 0; i < 8; ++i) lanes[i] = i < rem ? -1 : 0;
    const __m256i msk = _mm256_load_si256(reinterpret_cast<const __m256i*>(lanes));
    __m256 wv[NR];
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r) {
      int8_t tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int i = 0; i < rem; ++i) tmp[i] = q[r * K + k + i];
      wv[r] = q8_to_ps(tmp);
    }
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const __m256 xv = _mm256_maskload_ps(x + m * ldx + k, msk);
#pragma GCC unroll 4
      for (int r = 0; r < NR; ++r) acc[m][r] = _mm256_fmadd_ps(wv[r], xv, acc[m][r]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r) out[m * NR + r] = hsum256(acc[m][r]);
}

// W rows [n0, n1) against all M rows on AVX2: tiles of 2 W rows against input rows in blocks of 4/2/1
// when M >= 4, else of 4 W rows against blocks of 2/1 (<= 8 accumulators either way).
struct Avx2Path {
  static int64_t tile_rows(int64_t M) { return M >= 4 ? 2 : 4; }
  template <class Emit>
  static void screen(const int8_t* q, const float* x, int64_t M, int64_t K, int64_t n0, int64_t n1,
                     const Emit& consider) {
    float out[8];
    auto tile = [&](auto nr_tag, int64_t n) {
      constexpr int nr = decltype(nr_tag)::value;
      const int8_t* qn = q + n * K;
      int64_t m = 0;
      if constexpr (nr <= 2) {
        for (; M - m >= 4; m += 4) {
          tile_q8_avx2<4, nr>(qn, K, x + m * K, K, out);
          for (int i = 0; i < 4; ++i)
            for (int r = 0; r < nr; ++r) consider(m + i, n + r, out[i * nr + r]);
        }
      }
      for (; M - m >= 2; m += 2) {
        tile_q8_avx2<2, nr>(qn, K, x + m * K, K, out);
        for (int i = 0; i < 2; ++i)
          for (int r = 0; r < nr; ++r) consider(m + i, n + r, out[i * nr + r]);
      }
      if (M - m == 1) {
        tile_q8_avx2<1, nr>(qn, K, x + m * K, K, out);
        for (int r = 0; r < nr; ++r) consider(m, n + r, out[r]);
      }
    };
    int64_t n = n0;
    if (M >= 4) {
      for (; n + 2 <= n1; n += 2) tile(std::integral_constant<int, 2>{}, n);
    } else {
      for (; n + 4 <= n1; n += 4) tile(std::integral_constant<int, 4>{}, n);
    }
    for (; n < n1; ++n) tile(std::integral_constant<int, 1>{}, n);
  }
  // linear_fwd's one-row logit on this path (row_times_rows<1, 4>, linear.cpp's M == 1 AVX2 stream)
  static float exact(const float* w, const float* x, int64_t K) {
    float out = 0.f;
    row_times_rows<1, 4>(w, x, K, K, &out);
    return out + 0.f;  // linear_fwd adds the (zero) bias
  }
};

// The AVX2 integer screen (see the file comment): MR input rows of int16 digits (xd, row stride
// ldxd, zero past K) x NR int8 W rows (stride K). Each 16 weights of a row are widened to int16
// once (vpmovsxbw) and multiplied into MR accumulators by vpmaddwd (pairs of s16 x s16 products
// summed into int32, exact) + vpaddd; MR * NR accumulators + NR weight vectors + 2 <= 16 ymm. A
// step is 64 k (four of 16), the W rows pfd rows ahead prefetched to L2 a line per row and step
// (PF); then whole 16s, then the K % 16 tail in scalar code (no read past the rows).
// out[m * NR + r] = sum_k q[r][k] xd[m][k] (exact int32: the caller keeps 127 ||xd_m||_1 < 2^31).
template <int MR, int NR, bool PF>
inline void tile_q8_i16(const int8_t* q, int64_t K, const int16_t* xd, int64_t ldxd, int32_t* out, int64_t pfd) {
  static_assert(MR * NR + NR + 2 <= 16, "ymm registers");
  constexpr int NA = MR * NR;
  __m256i acc[NA];
#pragma GCC unroll 16
  for (int i = 0; i < NA; ++i) acc[i] = _mm256_setzero_si256();
  auto sub = [&](const int8_t* w, int64_t ldw, int64_t k) __attribute__((always_inline)) {
    __m256i wv[NR];
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r) wv[r] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * ldw)));
#pragma GCC unroll 4
    for (int m = 0; m < MR; ++m) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xd + m * ldxd + k));
#pragma GCC unroll 4
      for (int r = 0; r < NR; ++r) madd_epi16_acc(acc[m * NR + r], wv[r], xv);
    }
  };
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    if constexpr (PF) {
#pragma GCC unroll 4
      for (int r = 0; r < NR; ++r) _mm_prefetch(reinterpret_cast<const char*>(q + (pfd + r) * K + k), _MM_HINT_T1);
    }
    sub(q + k, K, k);
    sub(q + k + 16, K, k + 16);
    sub(q + k + 32, K, k + 32);
    sub(q + k + 48, K, k + 48);
  }
  for (; k + 16 <= K; k += 16) sub(q + k, K, k);
  hsum_epi32_avx2<NA>(acc, out);
  for (; k < K; ++k)  // the K % 16 tail, past the accumulators' live range
#pragma GCC unroll 4
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
      for (int r = 0; r < NR; ++r) out[m * NR + r] += int32_t(q[r * K + k]) * xd[m * ldxd + k];
}

inline bool screen_use_int16() {
  const char* env = std::getenv("FASTLM_INT8_VNNI");  // read per call: tests run both screens
  return !(env && env[0] == '0');
}

// The AVX2 integer screen (see the file comment): prepare() writes each input row as one int16
// digit per element and sets its `extra`; screen() emits consider(m, n, a_mn) for W rows [n0, n1).
// It applies to every finite row (2^e is a power of two in fp64: never out of range); K is capped
// where the digits would get too coarse (past it, the fp32 screen).
struct Avx2IntPath {
  static constexpr int64_t kMaxK = 65536;
  int64_t K = 0, ldxd = 0;
  std::vector<int16_t> buf;   // the digit rows (ldxd int16 each, zero-padded), 32-byte aligned at digits
  int16_t* digits = nullptr;
  std::vector<double> unit;   // per row: 2^e (a = s_n * (T * 2^e), the product T * 2^e exact)

  // W rows per tile: 1 x 4 and 2 x 4 register tiles at 1-2 input rows, 3 x 3 at 3, 4 x 2 beyond.
  static int64_t tile_rows(int64_t M) { return M <= 2 ? 4 : M == 3 ? 3 : 2; }
  static float exact(const float* w, const float* x, int64_t K) { return Avx2Path::exact(w, x, K); }

  bool prepare(const float* xf, std::vector<RowState>& rows, int64_t M, int64_t K_) {
    K = K_;
    if (K > kMaxK) return false;
    ldxd = (K + 15) / 16 * 16;
    buf.assign(M * ldxd + 16, 0);
    digits = buf.data() + ((32 - (reinterpret_cast<uintptr_t>(buf.data()) & 31)) & 31) / 2;
    unit.assign(M, 0.0);
    const double c127 = 127.0 * std::sqrt(static_cast<double>(K));
    for (int64_t m = 0; m < M; ++m) {
      if (!rows[m].screened) continue;
      const float* x = xf + m * K;
      float amax = 0.f;
      for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(x[k]));
      if (amax == 0.f) continue;  // a zero row: digits 0, a = 0, d = 0
      int e = std::ilogb(amax) - 14;  // the smallest e with amax <= 32767 * 2^e
      if (amax > std::ldexp(32767.0, e)) ++e;
      int16_t* xd = digits + m * ldxd;
      double d2 = 0.0;
      for (;; ++e) {  // and 127 sum |digit| < 2^31: no int32 sum of the tile can overflow
        const double p = std::ldexp(1.0, -e), u = std::ldexp(1.0, e);
        int64_t l1 = 0;
        d2 = 0.0;
        for (int64_t k = 0; k < K; ++k) {
          const double h = std::nearbyint(static_cast<double>(x[k]) * p);  // x * 2^-e exact, |h| <= 32767
          xd[k] = static_cast<int16_t>(h);
          l1 += static_cast<int64_t>(std::fabs(h));
          const double d = static_cast<double>(x[k]) - h * u;  // exact (|d| <= 2^(e-1); d = x when h = 0)
          d2 += d * d;
        }
        if (127 * l1 <= std::numeric_limits<int32_t>::max()) break;
      }
      unit[m] = std::ldexp(1.0, e);
      const double dn = std::sqrt(d2) * (1.0 + 1e-12);
      rows[m].extra = c127 * (dn + std::ldexp(rows[m].xnorm + dn, -50)) * (1.0 + 1e-9);
    }
    return true;
  }

  // f (argmax's pass 1): each tile row's (up to 4) outputs tested at once in fp64 vectors, a + e >= lo
  // (f's running threshold), as the sink's own first test; only those passing go to consider (rarely
  // any: the scalar test per output was ~20% of the 16-row screen). e here may differ from the sink's
  // in the last bit (association): either is a valid bound (slack is padded 1e-6 relative).
  template <class Emit>
  void screen(const int8_t* q, const float* sp, int64_t M, int64_t n0, int64_t n1, const Emit& consider,
              const ChunkSink* f = nullptr) const {
    const int64_t pfd = std::max<int64_t>(4, ((int64_t(16384) + K - 1) / K + 3) / 4 * 4);  // ~16 KB ahead
    alignas(32) int32_t out[24];  // 16 outputs at most, and room for 4-lane reads past the last row
    auto emit = [&](int64_t m0, int mr, int64_t n, int nr) {
      if (f == nullptr) {
        for (int i = 0; i < mr; ++i) {
          const double um = unit[m0 + i];
          for (int r = 0; r < nr; ++r)
            consider(m0 + i, n + r, static_cast<double>(sp[n + r]) * (static_cast<double>(out[i * nr + r]) * um));
        }
        return;
      }
      const __m128i live = _mm_cmpgt_epi32(_mm_set1_epi32(nr), _mm_setr_epi32(0, 1, 2, 3));  // lanes < nr
      const __m256d s = _mm256_cvtps_pd(_mm_maskload_ps(sp + n, live));  // no read past the arrays
      const __m256d sl = _mm256_cvtps_pd(_mm_maskload_ps(f->slp + n, live));
      for (int i = 0; i < mr; ++i) {
        const int64_t m = m0 + i;
        // s * 2^e exact, then * T: the same single rounding as s * (T * 2^e)
        const __m256d a = _mm256_mul_pd(_mm256_cvtepi32_pd(_mm_loadu_si128(reinterpret_cast<const __m128i*>(out + i * nr))),
                                        _mm256_mul_pd(s, _mm256_set1_pd(unit[m])));
        const __m256d e = _mm256_fmadd_pd(_mm256_set1_pd(f->xn[m]), sl, _mm256_mul_pd(_mm256_set1_pd(f->extra[m]), s));
        int pass = _mm256_movemask_pd(_mm256_cmp_pd(_mm256_add_pd(a, e), _mm256_set1_pd(f->lo[m]), _CMP_GE_OQ)) &
                   ((1 << nr) - 1);
        if (pass == 0) continue;
        alignas(32) double av[4];
        _mm256_store_pd(av, a);
        for (; pass != 0; pass &= pass - 1) {
          const int r = __builtin_ctz(pass);
          consider(m, n + r, av[r]);
        }
      }
    };
    auto tile = [&](auto nr_tag, int64_t n) {
      constexpr int nr = decltype(nr_tag)::value;
      constexpr int max_mr = nr >= 4 ? 2 : nr == 3 ? 3 : 4;  // MR * NR + NR + 2 <= 16
      const int8_t* qn = q + n * K;
      const bool pf = n + pfd + nr <= n1;
      int64_t m = 0;
      auto block = [&](auto mr_tag) {
        constexpr int mr = decltype(mr_tag)::value;
        if (pf && m == 0) tile_q8_i16<mr, nr, true>(qn, K, digits + m * ldxd, ldxd, out, pfd);
        else tile_q8_i16<mr, nr, false>(qn, K, digits + m * ldxd, ldxd, out, pfd);
        emit(m, mr, n, nr);
        m += mr;
      };
      while (M - m >= max_mr) block(std::integral_constant<int, max_mr>{});
      if constexpr (max_mr > 3) {
        if (M - m == 3) block(std::integral_constant<int, 3>{});
      }
      if constexpr (max_mr > 2) {
        if (M - m == 2) block(std::integral_constant<int, 2>{});
      }
      if (M - m == 1) block(std::integral_constant<int, 1>{});
    };
    const int64_t NRt = tile_rows(M);
    int64_t n = n0;
    if (NRt == 4) {
      for (; n + 4 <= n1; n += 4) tile(std::integral_constant<int, 4>{}, n);
    } else if (NRt == 3) {
      for (; n + 3 <= n1; n += 3) tile(std::integral_constant<int, 3>{}, n);
    } else {
      for (; n + 2 <= n1; n += 2) tile(std::integral_constant<int, 2>{}, n);
    }
    for (; n < n1; ++n) tile(std::integral_constant<int, 1>{}, n);
  }
};
#endif  // AVX2 + FMA

#if defined(__x86_64__) || defined(_M_X64)

// torch.argmax's order: the first NaN, else the first largest.
inline bool better(float v, int64_t n, float best, int64_t best_n) {
  if (best_n < 0) return true;
  if (std::isnan(best)) return false;
  if (std::isnan(v)) return true;
  return v > best || (v == best && n < best_n);
}

// The input rows as fp32 (M x K) and each row's ||x||_2 (padded up; not finite: not screened).
void screened_rows(const at::Tensor& x, std::vector<float>& xf, std::vector<RowState>& rows) {
  const int64_t M = x.size(0), K = x.size(1);
  xf.resize(M * K);
  rows.assign(M, RowState{});
  for (int64_t m = 0; m < M; ++m) row_to_float(x.data_ptr<float>() + m * x.stride(0), xf.data() + m * K, K);
  for (int64_t m = 0; m < M; ++m) {
    double s2 = 0.0;
    for (int64_t k = 0; k < K; ++k) s2 += static_cast<double>(xf[m * K + k]) * xf[m * K + k];
    rows[m].xnorm = std::sqrt(s2) * (1.0 + 1e-12);
    rows[m].screened = std::isfinite(rows[m].xnorm);
  }
}

// linear_fwd's logits of input row m alone (its one-row arithmetic on path P), into out (N floats).
template <class P>
void exact_row(const float* wp, const float* xm, int64_t N, int64_t K, float* out) {
  parallel_range(0, N, std::max<int64_t>(1, (int64_t(1) << 14) / K), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) out[n] = P::exact(wp + n * K, xm, K);
  });
}

#endif

#if defined(__x86_64__) || defined(_M_X64)
// One screen pass over W rows [n0, n1): consider(m, n, a_mn) with a_mn the screened logit in fp64. The
// fp32 screens (Avx512Path, Avx2Path): a = fl32(acc * s_n), widened; the VNNI screen computes its own.
template <class P>
struct Screen {
  const float* xf;
  int64_t M, K;
  const int8_t* q;
  const float* sp;
  Screen(const float* xf_, std::vector<RowState>&, int64_t M_, int64_t K_, const int8_t* q_, const float* sp_)
      : xf(xf_), M(M_), K(K_), q(q_), sp(sp_) {}
  int64_t tile_rows() const { return P::tile_rows(M); }
  template <class Emit>
  void run(int64_t n0, int64_t n1, const Emit& consider) const {
    P::screen(q, xf, M, K, n0, n1,
              [&](int64_t m, int64_t n, float acc) { consider(m, n, static_cast<double>(acc * sp[n])); });
  }
  void run_sink(int64_t n0, int64_t n1, ChunkSink& sink) const {
    run(n0, n1, [&](int64_t m, int64_t n, double a) { sink(m, n, a); });
  }
};

// The integer screens (VnniPath, Avx2IntPath): the input rows as digits (prepare), the screened
// logit computed by the path.
template <class P>
struct DigitScreen {
  P path;
  int64_t M;
  const int8_t* q;
  const float* sp;
  DigitScreen(const float* xf, std::vector<RowState>& rows, int64_t M_, int64_t K, const int8_t* q_, const float* sp_)
      : M(M_), q(q_), sp(sp_) {
    TORCH_CHECK(path.prepare(xf, rows, M, K), "fastlm: ", kOp, ": internal error: integer screen not applicable");
  }
  int64_t tile_rows() const { return P::tile_rows(M); }
  template <class Emit>
  void run(int64_t n0, int64_t n1, const Emit& consider) const { path.screen(q, sp, M, n0, n1, consider); }
  void run_sink(int64_t n0, int64_t n1, ChunkSink& sink) const {
    run(n0, n1, [&](int64_t m, int64_t n, double a) { sink(m, n, a); });
  }
};

template <>
struct Screen<VnniPath> : DigitScreen<VnniPath> {
  using DigitScreen<VnniPath>::DigitScreen;
};

// Whether the VNNI screen takes this call: the CPU has it, K fits, and every screened row's 2^e is in
// range (checked on a scratch copy of the row states).
bool vnni_screen_applies(const at::Tensor& x) {
  if (!screen_use_vnni() || x.size(1) > VnniPath::kMaxK) return false;
  std::vector<float> xf;
  std::vector<RowState> rows;
  screened_rows(x, xf, rows);
  VnniPath probe;
  return probe.prepare(xf.data(), rows, x.size(0), x.size(1));
}

#if defined(__AVX2__) && defined(__FMA__)
template <>
struct Screen<Avx2IntPath> : DigitScreen<Avx2IntPath> {
  using DigitScreen<Avx2IntPath>::DigitScreen;
  void run_sink(int64_t n0, int64_t n1, ChunkSink& sink) const {  // the tiles filtered against sink.lo
    path.screen(q, sp, M, n0, n1, [&](int64_t m, int64_t n, double a) { sink(m, n, a); }, &sink);
  }
};

// Whether the AVX2 integer screen takes this call (on the AVX2 path): not turned off, K fits (its
// prepare() accepts every row then).
bool int16_screen_applies(const at::Tensor& x) { return screen_use_int16() && x.size(1) <= Avx2IntPath::kMaxK; }
#endif

// The screened argmax on path P (VnniPath, Avx512Path, Avx2IntPath, Avx2Path) into res (M,): see the
// file comment.
template <class P>
void argmax_screened(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& qweight, const at::Tensor& scale,
                     const at::Tensor& slack, int64_t* res) {
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  const at::Tensor wc = weight.contiguous();
  const float* wp = wc.data_ptr<float>();
  std::vector<float> xf;
  std::vector<RowState> rows;
  screened_rows(x, xf, rows);
  // Pass 1 (parallel over W rows): screened logits, per-chunk thresholds and candidates.
  const float* sp = scale.data_ptr<float>();
  const float* slp = slack.data_ptr<float>();
  const Screen<P> scr(xf.data(), rows, M, K, qweight.data_ptr<int8_t>(), sp);
  std::mutex mu;
  std::vector<double> lo_max(M, -std::numeric_limits<double>::infinity());
  std::vector<std::pair<int64_t, std::vector<Candidate>>> chunks;  // (first tile, candidates)
  const int64_t nr = scr.tile_rows();
  const int64_t tiles = (N + nr - 1) / nr;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(nr * K, 1));
  parallel_range(0, tiles, grain, [&](int64_t begin, int64_t end) {
    // this chunk's candidates: a_mn + e_mn >= its running max of a - e (a superset of the final
    // ones), and its max of a - e per row in lo
    ChunkSink sink(rows, slp, sp);
    scr.run_sink(begin * nr, std::min(N, end * nr), sink);
    std::lock_guard<std::mutex> lock(mu);
    for (int64_t m = 0; m < M; ++m) lo_max[m] = std::max(lo_max[m], sink.lo[m]);
    chunks.emplace_back(begin, std::move(sink.cand));
  });
  std::sort(chunks.begin(), chunks.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  // Final candidates per row, in n order.
  std::vector<std::vector<int64_t>> per_row(M);
  const int64_t cap = std::max<int64_t>(N / 16, 256);
  for (const auto& chunk : chunks)
    for (const auto& [m, n, a] : chunk.second) {
      if (!rows[m].screened) continue;
      if (a + bound(rows[m], slp[n], sp[n]) >= lo_max[m]) {
        per_row[m].push_back(n);
        if (static_cast<int64_t>(per_row[m].size()) > cap) rows[m].screened = false;
      }
    }
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = xf.data() + m * K;
    float best = 0.f;
    int64_t best_n = -1;
    if (rows[m].screened) {
      for (const int64_t n : per_row[m]) {
        const float v = P::exact(wp + n * K, xm, K);
        if (better(v, n, best, best_n)) best = v, best_n = n;
      }
    } else {  // the exact full product (parallel over W rows), then the first largest
      std::vector<float> logits(N);
      exact_row<P>(wp, xm, N, K, logits.data());
      for (int64_t n = 0; n < N; ++n)
        if (better(logits[n], n, best, best_n)) best = logits[n], best_n = n;
    }
    TORCH_CHECK(best_n >= 0, "fastlm: ", kOp, ": internal error: no candidate for row ", m);
    res[m] = best_n;
  }
}
#endif

at::Tensor linear_argmax_fwd_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& qweight,
                                 const at::Tensor& scale, const at::Tensor& slack) {
  check_screened_args(x, weight, qweight, scale, slack, kOp);
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor result = at::empty({M}, x.options().dtype(at::kLong));
  if (M == 0) return result;
  int64_t* res = result.data_ptr<int64_t>();
#if defined(__x86_64__) || defined(_M_X64)
  if (K > 0 && cpu_use_avx512()) {
    if (vnni_screen_applies(x)) argmax_screened<VnniPath>(x, weight, qweight, scale, slack, res);
    else argmax_screened<Avx512Path>(x, weight, qweight, scale, slack, res);
    return result;
  }
#endif
#if defined(__AVX2__) && defined(__FMA__)
  if (K > 0) {
    if (int16_screen_applies(x)) argmax_screened<Avx2IntPath>(x, weight, qweight, scale, slack, res);
    else argmax_screened<Avx2Path>(x, weight, qweight, scale, slack, res);
    return result;
  }
#endif
  // Builds without AVX2: linear_fwd's own arithmetic for each row alone, then torch's argmax.
  static const auto linear_fwd = c10::Dispatcher::singleton().findSchemaOrThrow("fastlm_C::linear_fwd", "")
      .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&)>();
  for (int64_t m = 0; m < M; ++m)
    res[m] = at::argmax(linear_fwd.call(x.narrow(0, m, 1), weight, std::nullopt)).item<int64_t>();
  return result;
}

#if defined(__x86_64__) || defined(_M_X64)
// The screened top-k logits on path P into outp (M x N): see linear_topk_logits_fwd_cpu.
template <class P>
void topk_screened(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& qweight, const at::Tensor& scale,
                   const at::Tensor& slack, int64_t k, float* outp) {
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  const at::Tensor wc = weight.contiguous();
  const float* wp = wc.data_ptr<float>();
  const float* sp = scale.data_ptr<float>();
  const float* slp = slack.data_ptr<float>();
  std::vector<float> xf;
  std::vector<RowState> rows;
  screened_rows(x, xf, rows);
  // Pass 1 (parallel over W rows): the screened logits a (M x N).
  const Screen<P> scr(xf.data(), rows, M, K, qweight.data_ptr<int8_t>(), sp);
  std::vector<double> a(M * N);
  const int64_t nr = scr.tile_rows();
  const int64_t tiles = (N + nr - 1) / nr;
  parallel_range(0, tiles, std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(nr * K, 1)),
                 [&](int64_t begin, int64_t end) {
                   scr.run(begin * nr, std::min(N, end * nr), [&](int64_t m, int64_t n, double v) { a[m * N + n] = v; });
                 });
  const int64_t cap = std::max<int64_t>({N / 16, 256, 4 * k});
  // Rows in parallel (one task each; exact_row inside runs serially then).
  parallel_range(0, M, 1, [&](int64_t m0, int64_t m1) {
    std::vector<double> lo(N), sample, top;
    std::vector<int64_t> cand;
    for (int64_t m = m0; m < m1; ++m) {
      const double* am = a.data() + m * N;
      const float* xm = xf.data() + m * K;
      float* om = outp + m * N;
      bool full = !rows[m].screened || k >= N;
      if (!full) {
        for (int64_t n = 0; n < N; ++n) lo[n] = am[n] - bound(rows[m], slp[n], sp[n]);
        // T = the k-th largest lower bound, selected among the rows at or above T0 = the k-th largest of
        // every 16th (T0 <= T: at least k rows pass)
        double T0 = -std::numeric_limits<double>::infinity();
        sample.clear();
        for (int64_t n = 0; n < N; n += 16) sample.push_back(lo[n]);
        if (static_cast<int64_t>(sample.size()) >= k) {
          std::nth_element(sample.begin(), sample.begin() + (k - 1), sample.end(), std::greater<double>());
          T0 = sample[k - 1];
        }
        top.clear();
        for (int64_t n = 0; n < N; ++n)
          if (lo[n] >= T0) top.push_back(lo[n]);
        std::nth_element(top.begin(), top.begin() + (k - 1), top.end(), std::greater<double>());
        const double T = top[k - 1];
        cand.clear();
        for (int64_t n = 0; n < N && !full; ++n) {
          if (am[n] + bound(rows[m], slp[n], sp[n]) >= T) {
            cand.push_back(n);
            full = static_cast<int64_t>(cand.size()) > cap;
          }
        }
      }
      if (full) {
        exact_row<P>(wp, xm, N, K, om);
        continue;
      }
      std::fill(om, om + N, -std::numeric_limits<float>::infinity());
      for (const int64_t n : cand) om[n] = P::exact(wp + n * K, xm, K);
    }
  });
}
#endif

// Logits for top-k sampling: (M, N) fp32 whose entries are each row's exact logit (linear_fwd's
// one-row arithmetic) or -inf, with every logit >= the row's k-th largest exact. So masking all but
// the k largest gives exactly what it gives on the full product. Per row: T = the k-th largest lower
// bound a - e; a row n with a_n + e_n < T has k rows strictly above it. The candidates (a + e >= T)
// are recomputed exactly; a row with a non-finite input, k >= N, or more than max(N / 16, 256, 4k)
// candidates gets the full exact row. AVX-512 and AVX2 paths as the argmax; without AVX2: linear_fwd
// on each row alone.
at::Tensor linear_topk_logits_fwd_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& qweight,
                                      const at::Tensor& scale, const at::Tensor& slack, int64_t k) {
  constexpr const char* op = "linear_topk_logits_fwd";
  check_screened_args(x, weight, qweight, scale, slack, op);
  FASTLM_CHECK(k >= 1, op, "k must be >= 1, got ", k);
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  at::Tensor out = new_output({M, N}, x.options());
  if (M == 0) return out;
  float* outp = out.data_ptr<float>();
#if defined(__x86_64__) || defined(_M_X64)
  if (K > 0 && cpu_use_avx512()) {
    if (vnni_screen_applies(x)) topk_screened<VnniPath>(x, weight, qweight, scale, slack, k, outp);
    else topk_screened<Avx512Path>(x, weight, qweight, scale, slack, k, outp);
    return out;
  }
#endif
#if defined(__AVX2__) && defined(__FMA__)
  if (K > 0) {
    if (int16_screen_applies(x)) topk_screened<Avx2IntPath>(x, weight, qweight, scale, slack, k, outp);
    else topk_screened<Avx2Path>(x, weight, qweight, scale, slack, k, outp);
    return out;
  }
#endif
  static const auto linear_fwd = c10::Dispatcher::singleton().findSchemaOrThrow("fastlm_C::linear_fwd", "")
      .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&)>();
  for (int64_t m = 0; m < M; ++m) out[m].copy_(linear_fwd.call(x.narrow(0, m, 1), weight, std::nullopt)[0]);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlm_C, CPU, m) {
  m.impl("linear_argmax_screen", &linear_argmax_screen_cpu);
  m.impl("linear_argmax_fwd", &linear_argmax_fwd_cpu);
  m.impl("linear_topk_logits_fwd", &linear_topk_logits_fwd_cpu);
}

}  // namespace fastlm::cpu

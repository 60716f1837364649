// Flash attention forward and backward on the CPU.
//
// Layout: q (B, H, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv), each with a contiguous last dim
// (other strides free); H % Hkv == 0 (query head h reads kv head h / (H / Hkv), no K/V copies); an
// optional additive mask (B, H, Sq, Sk) of q's dtype whose strides may be 0 where it broadcasts;
// causal = top-left aligned (row i sees keys j <= i). Dropout from (seed, offset): see
// cuda/attention_math.h.
//
// Forward: tasks (batch, head, query block of kBQ rows), handed out dynamically to the threads (an
// atomic counter: on a shared machine a preempted thread does not hold the other at a barrier). Each
// worker converts K^T and V of its task's (b, kv head) to fp32 panels when the head changes (tasks are
// (b, h)-major, so the panels stay in that core's L2). Per kBK-key block: S = Q K^T (register-blocked
// fp32 GEMM: AVX-512 when the CPU has it, chosen at run time, else AVX2), online softmax (running max
// m, sum l, rescaled output accumulator; one register pass per row with exp512 / exp256), O += P V.
// Key blocks above the causal diagonal are skipped, and so are key blocks a row-independent mask (a
// (B, 1, 1, Sk) key-padding mask, read through its stride-0 broadcast) masks fully. Memory O(S),
// never S x S. On AVX-512 CPUs, without dropout and with no mask or a key-padding one (encoders: BERT,
// MiniLM), the forward takes a fused path instead (fused_fwd_worker512): S^T per query block with the
// softmax down the keys, fp32 K/V read in place, see its header.
// Backward (FlashAttention-2 style, recomputing P from the saved logsumexp): at::parallel_for over
// (batch, kv head); the task owns dK, dV of its kv head and dQ of the heads of its group, all in
// fp32, so no atomics and a schedule-independent result. Per (key block, query block):
// S = Q K^T, P = exp(scale S + mask - lse), dP = dO V^T, dS = P (dP - delta), dV += P^T dO,
// dK += dS^T Q, dQ += dS K (P^T and dS^T are read in place by the GEMM: no transposes).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#if defined(__AVX2__)
#include <immintrin.h>
#endif
#include <cmath>
#include <cstdlib>
#include <limits>
#include <type_traits>
#include <vector>

#include "common.h"
#include "cpu/exp512.h"
#include "cpu/vec_utils.h"
#include "cuda/attention_math.h"

namespace fastlm::cpu {
namespace {

constexpr const char* kFwd = "attention_fwd";
constexpr const char* kBwd = "attention_bwd";
constexpr int64_t kV = fVec::size();  // fp32 lanes per vector
constexpr int64_t kBQ = 64;           // query rows per block
constexpr int64_t kBK = 64;           // keys per block (a multiple of kV)
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// ---- register-blocked fp32 GEMM: C[M x N] (+)= A[M x K] B[K x N], N a multiple of kV ----
// The accumulators are raw __m256 (AVX2 + FMA, as setup.py builds on x86) so that they stay in
// registers: arrays of at::vec::Vectorized objects get spilled to the stack by GCC.
#if defined(__AVX2__) && defined(__FMA__)
template <int MR, int NV>
inline void gemm_micro(int64_t K, const float* A, int64_t lda, int64_t ak, const float* B, int64_t ldb, float* C,
                       int64_t ldc, bool accumulate) {
  static_assert(NV * 8 == NV * kV, "AVX2 micro-kernel expects 8 fp32 lanes");
  __m256 c[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) c[r][v] = accumulate ? _mm256_loadu_ps(C + r * ldc + v * 8) : _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m256 b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = _mm256_loadu_ps(B + k * ldb + v * 8);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m256 a = _mm256_broadcast_ss(A + r * lda + k * ak);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) c[r][v] = _mm256_fmadd_ps(a, b[v], c[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(C + r * ldc + v * kV, c[r][v]);
}
#else
template <int MR, int NV>
inline void gemm_micro(int64_t K, const float* A, int64_t lda, int64_t ak, const float* B, int64_t ldb, float* C,
                       int64_t ldc, bool accumulate) {
  fVec c[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) c[r][v] = accumulate ? fVec::loadu(C + r * ldc + v * kV) : fVec(0.f);
  for (int64_t k = 0; k < K; ++k) {
    fVec b[NV];
    for (int v = 0; v < NV; ++v) b[v] = fVec::loadu(B + k * ldb + v * kV);
    for (int r = 0; r < MR; ++r) {
      const fVec a(A[r * lda + k * ak]);
      for (int v = 0; v < NV; ++v) c[r][v] = at::vec::fmadd(a, b[v], c[r][v]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) c[r][v].store(C + r * ldc + v * kV);
}
#endif

template <int NV>
inline void gemm_rows(int64_t M, int64_t K, const float* A, int64_t lda, int64_t ak, const float* B, int64_t ldb,
                      float* C, int64_t ldc, bool acc) {
  int64_t i = 0;
  for (; i + 6 <= M; i += 6) gemm_micro<6, NV>(K, A + i * lda, lda, ak, B, ldb, C + i * ldc, ldc, acc);
  const float* a = A + i * lda;
  float* c = C + i * ldc;
  switch (M - i) {
    case 5: gemm_micro<5, NV>(K, a, lda, ak, B, ldb, c, ldc, acc); break;
    case 4: gemm_micro<4, NV>(K, a, lda, ak, B, ldb, c, ldc, acc); break;
    case 3: gemm_micro<3, NV>(K, a, lda, ak, B, ldb, c, ldc, acc); break;
    case 2: gemm_micro<2, NV>(K, a, lda, ak, B, ldb, c, ldc, acc); break;
    case 1: gemm_micro<1, NV>(K, a, lda, ak, B, ldb, c, ldc, acc); break;
    default: break;
  }
}

void gemm_avx2(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, int64_t ak, const float* B, int64_t ldb,
               float* C, int64_t ldc, bool acc) {
  int64_t j = 0;
  for (; j + 2 * kV <= N; j += 2 * kV) gemm_rows<2>(M, K, A, lda, ak, B + j, ldb, C + j, ldc, acc);
  if (j < N) gemm_rows<1>(M, K, A, lda, ak, B + j, ldb, C + j, ldc, acc);
}

// A forward row that met a NaN score: P = NaN (so O = NaN through P V), m = l = NaN; later blocks
// keep it NaN (max(NaN, .) and exp(. - NaN) stay NaN), and the final scaling writes a NaN row.
inline void nan_row(float* srow, int64_t n, float& m, float& l) {
  std::fill(srow, srow + n, std::numeric_limits<float>::quiet_NaN());
  m = l = std::numeric_limits<float>::quiet_NaN();
}

// ---- AVX-512 versions (compiled for avx512f with a target pragma, chosen at run time) ----
// The extension is built for AVX2 (setup.py); on a CPU with AVX-512 the GEMMs and the softmax pass
// run on 16-lane zmm registers: 2x the lanes per FMA, and 32 registers, so a 6 x 64 accumulator tile
// plus the B row stays in registers.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__AVX2__)
#define FASTLM_ATTN_AVX512 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma")
#pragma GCC diagnostic push
// GCC 12 flags the intrinsics' own "undefined" vectors (_mm512_reduce_*, masked loads): false positives
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

inline __mmask16 tail_mask(int64_t n) {  // lanes [0, n) of a 16-lane vector, n in [1, 16]
  return static_cast<__mmask16>(n >= 16 ? 0xFFFF : ((1u << n) - 1u));
}

// C[MR x (NV-1)*16 + tail] (+)= A[MR x K] B[K x ...]; the last vector column is masked by `last`.
template <int MR, int NV>
inline void gemm512_micro(int64_t K, const float* A, int64_t lda, int64_t ak, const float* B, int64_t ldb, float* C,
                          int64_t ldc, bool accumulate, __mmask16 last) {
  __m512 c[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const __mmask16 mk = v == NV - 1 ? last : static_cast<__mmask16>(0xFFFF);
      c[r][v] = accumulate ? _mm512_maskz_loadu_ps(mk, C + r * ldc + v * 16) : _mm512_setzero_ps();
    }
  for (int64_t k = 0; k < K; ++k) {
    __m512 b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      b[v] = v == NV - 1 ? _mm512_maskz_loadu_ps(last, B + k * ldb + v * 16) : _mm512_loadu_ps(B + k * ldb + v * 16);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512 a = _mm512_set1_ps(A[r * lda + k * ak]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) c[r][v] = _mm512_fmadd_ps(a, b[v], c[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      if (v == NV - 1)
        _mm512_mask_storeu_ps(C + r * ldc + v * 16, last, c[r][v]);
      else
        _mm512_storeu_ps(C + r * ldc + v * 16, c[r][v]);
    }
}

template <int MR, int NV>
inline void gemm512_rows(int64_t M, int64_t K, const float* A, int64_t lda, int64_t ak, const float* B, int64_t ldb,
                         float* C, int64_t ldc, bool acc, __mmask16 last) {
  int64_t i = 0;
  for (; i + MR <= M; i += MR) gemm512_micro<MR, NV>(K, A + i * lda, lda, ak, B, ldb, C + i * ldc, ldc, acc, last);
  const float* a = A + i * lda;
  float* c = C + i * ldc;
  switch (M - i) {  // MR <= 8
    case 7: gemm512_micro<7 < MR ? 7 : 1, NV>(K, a, lda, ak, B, ldb, c, ldc, acc, last); break;
    case 6: gemm512_micro<6 < MR ? 6 : 1, NV>(K, a, lda, ak, B, ldb, c, ldc, acc, last); break;
    case 5: gemm512_micro<5 < MR ? 5 : 1, NV>(K, a, lda, ak, B, ldb, c, ldc, acc, last); break;
    case 4: gemm512_micro<4 < MR ? 4 : 1, NV>(K, a, lda, ak, B, ldb, c, ldc, acc, last); break;
    case 3: gemm512_micro<3 < MR ? 3 : 1, NV>(K, a, lda, ak, B, ldb, c, ldc, acc, last); break;
    case 2: gemm512_micro<2 < MR ? 2 : 1, NV>(K, a, lda, ak, B, ldb, c, ldc, acc, last); break;
    case 1: gemm512_micro<1, NV>(K, a, lda, ak, B, ldb, c, ldc, acc, last); break;
    default: break;
  }
}

// C[M x N] (+)= A[M x K] B[K x N], any N (the last vector is masked).
void gemm512(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, int64_t ak, const float* B, int64_t ldb,
             float* C, int64_t ldc, bool acc) {
  int64_t j = 0;
  for (; j + 64 <= N; j += 64) gemm512_rows<6, 4>(M, K, A, lda, ak, B + j, ldb, C + j, ldc, acc, 0xFFFF);
  const int64_t rest = N - j;
  if (rest <= 0) return;
  const __mmask16 last = tail_mask(rest - (rest - 1) / 16 * 16);
  switch ((rest + 15) / 16) {
    case 4: gemm512_rows<6, 4>(M, K, A, lda, ak, B + j, ldb, C + j, ldc, acc, last); break;
    case 3: gemm512_rows<8, 3>(M, K, A, lda, ak, B + j, ldb, C + j, ldc, acc, last); break;
    case 2: gemm512_rows<8, 2>(M, K, A, lda, ak, B + j, ldb, C + j, ldc, acc, last); break;
    default: gemm512_rows<8, 1>(M, K, A, lda, ak, B + j, ldb, C + j, ldc, acc, last); break;
  }
}

// exp512<false> (cpu/exp512.h): a NaN score stays NaN, so a NaN in q/k/v/mask gives a NaN row, as in
// torch (rows that saw nothing yet never reach exp: P = 0 below).

// One forward block's online-softmax step for rows [0, bq) of S (row stride kBK, kBK columns, masked
// entries already -inf): m_new = max(m, rowmax), S <- exp(S - m_new) (0 in rows that saw nothing yet),
// l <- l alpha + rowsum, O row *= alpha (alpha = exp(m - m_new)), m <- m_new.
void softmax_step512(float* S, int64_t bq, float* m, float* l, float* O, int64_t ldo, int64_t Dv) {
  static_assert(kBK % 16 == 0, "kBK must be a multiple of 16");
  constexpr int NB = kBK / 16;
  for (int64_t r = 0; r < bq; ++r) {
    float* srow = S + r * kBK;
    __m512 x[NB];
    __m512 mx = _mm512_set1_ps(kNegInf);
    __mmask16 nan = 0;
#pragma GCC unroll 8
    for (int v = 0; v < NB; ++v) {
      x[v] = _mm512_loadu_ps(srow + v * 16);
      mx = _mm512_max_ps(mx, x[v]);
      nan |= _mm512_cmp_ps_mask(x[v], x[v], _CMP_UNORD_Q);
    }
    if (nan) {  // a NaN score (NaN in the inputs): the row is NaN, as in torch
      nan_row(srow, kBK, m[r], l[r]);
      continue;
    }
    const float m_new = std::max(m[r], _mm512_reduce_max_ps(mx));
    if (m_new == kNegInf) {  // nothing seen yet in this row: P = 0
#pragma GCC unroll 8
      for (int v = 0; v < NB; ++v) _mm512_storeu_ps(srow + v * 16, _mm512_setzero_ps());
      continue;
    }
    const __m512 vm = _mm512_set1_ps(m_new);
    __m512 sum = _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int v = 0; v < NB; ++v) {
      const __m512 e = exp512<false>(_mm512_sub_ps(x[v], vm));
      _mm512_storeu_ps(srow + v * 16, e);
      sum = _mm512_add_ps(sum, e);
    }
    const float alpha = m[r] == kNegInf ? 0.f : std::exp(m[r] - m_new);
    if (alpha != 1.f) {
      float* orow = O + r * ldo;
      const __m512 va = _mm512_set1_ps(alpha);
      int64_t d = 0;
      for (; d + 16 <= Dv; d += 16) _mm512_storeu_ps(orow + d, _mm512_mul_ps(_mm512_loadu_ps(orow + d), va));
      if (d < Dv) {
        const __mmask16 t = tail_mask(Dv - d);
        _mm512_mask_storeu_ps(orow + d, t, _mm512_mul_ps(_mm512_maskz_loadu_ps(t, orow + d), va));
      }
    }
    l[r] = l[r] * alpha + _mm512_reduce_add_ps(sum);
    m[r] = m_new;
  }
}

#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif  // FASTLM_ATTN_AVX512

inline bool use_avx512() {
#if defined(FASTLM_ATTN_AVX512)
  return cpu_use_avx512();
#else
  return false;
#endif
}

// C[M x N] (+)= A[M x K] B[K x N] with A[r][k] at A[r * lda + k * ak] (ak = 1: row-major A; lda = 1,
// ak = ld: A is the transpose of a row-major matrix, read in place).
void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
          int64_t ldc, bool acc, int64_t ak = 1) {
#if defined(FASTLM_ATTN_AVX512)
  if (use_avx512()) return gemm512(M, N, K, A, lda, ak, B, ldb, C, ldc, acc);
#endif
  gemm_avx2(M, N, K, A, lda, ak, B, ldb, C, ldc, acc);
}

struct Shapes {
  int64_t B, H, Hkv, Sq, Sk, D, Dv, group, Dp, Dvp, Skp;
};

template <typename T>
struct Strided4 {  // a (B, H, S, X) tensor with a contiguous last dim
  const T* p;
  int64_t sb, sh, ss;
  explicit Strided4(const at::Tensor& t)
      : p(t.data_ptr<T>()), sb(t.stride(0)), sh(t.stride(1)), ss(t.stride(2)) {}
  const T* row(int64_t b, int64_t h, int64_t s) const { return p + b * sb + h * sh + s * ss; }
};

template <typename T>
struct MaskView {  // additive mask (B, H, Sq, Sk), any strides (0 where broadcast); p == nullptr: none
  const T* p = nullptr;
  int64_t sb = 0, sh = 0, sq = 0, sk = 0;
  bool row_independent = false;  // the same for every query row (a key-padding mask)
  MaskView() = default;
  explicit MaskView(const at::Tensor* t) {
    if (t == nullptr) return;
    p = t->data_ptr<T>();
    sb = t->stride(0), sh = t->stride(1), sq = t->stride(2), sk = t->stride(3);
    row_independent = sq == 0 || t->size(2) == 1;
  }
  float at(int64_t b, int64_t h, int64_t i, int64_t j) const {
    return static_cast<float>(p[b * sb + h * sh + i * sq + j * sk]);
  }
  // True if every key in [j0, j1) is masked out (-inf) for every row: only checked for
  // row-independent masks (otherwise false: the block is computed and masked element-wise).
  bool block_dead(int64_t b, int64_t h, int64_t j0, int64_t j1) const {
    if (p == nullptr || !row_independent) return false;
    for (int64_t j = j0; j < j1; ++j)
      if (at(b, h, 0, j) != kNegInf) return false;
    return true;
  }
};

struct Dropout {
  bool on = false;
  uint64_t seed = 0, offset = 0;
  uint32_t threshold = 0;
  float inv_keep = 1.f;
  bool keep(int64_t bh, int64_t i, int64_t j) const {
    return attention_dropout_keep(seed, offset, static_cast<uint32_t>(bh), static_cast<uint32_t>(i),
                                  static_cast<uint32_t>(j), threshold);
  }
};

Dropout make_dropout(double p, const std::optional<at::Tensor>& rng, const char* op) {
  Dropout d;
  if (p <= 0.0) return d;
  FASTLM_CHECK(rng.has_value() && rng->defined(), op, "rng (seed, offset) is required when dropout_p > 0");
  FASTLM_CHECK(rng->device().is_cpu() && rng->scalar_type() == at::kLong && rng->numel() == 2, op,
               "rng must be an int64 CPU tensor of 2 elements (seed, offset)");
  FASTLM_CHECK(p < 1.0, op, "dropout_p must be < 1, got ", p);
  auto r = rng->contiguous();
  d.on = true;
  d.seed = static_cast<uint64_t>(r.data_ptr<int64_t>()[0]);
  d.offset = static_cast<uint64_t>(r.data_ptr<int64_t>()[1]);
  d.threshold = attention_dropout_threshold(p);
  d.inv_keep = static_cast<float>(1.0 / (1.0 - p));
  return d;
}

// Convert rows [s0, s1) of a (S, X) slice to fp32 rows of length ldd (zero padded) at dst.
template <typename T>
void load_rows(const Strided4<T>& t, int64_t b, int64_t h, int64_t s0, int64_t s1, int64_t X, float* dst,
               int64_t ldd) {
  for (int64_t s = s0; s < s1; ++s) {
    float* d = dst + (s - s0) * ldd;
    row_to_float(t.row(b, h, s), d, X);
    std::fill(d + X, d + ldd, 0.f);
  }
}

// K^T of one (b, kv head) as Skp / kBK contiguous (D x kBK) panels (panel jb holds keys
// [jb * kBK, (jb + 1) * kBK)), and V (Skp x Dvp); fp32, zero padded.
template <typename T>
void pack_kv(const Strided4<T>& k, const Strided4<T>& v, const Shapes& s, int64_t b, int64_t hk, float* kt,
             float* vf, std::vector<float>& row) {
  row.resize(s.D);
  std::fill(kt, kt + s.D * s.Skp, 0.f);
  for (int64_t j = 0; j < s.Sk; ++j) {
    row_to_float(k.row(b, hk, j), row.data(), s.D);
    float* panel = kt + (j / kBK) * s.D * kBK + (j % kBK);
    for (int64_t d = 0; d < s.D; ++d) panel[d * kBK] = row[d];
  }
  load_rows(v, b, hk, 0, s.Sk, s.Dv, vf, s.Dvp);
  std::fill(vf + s.Sk * s.Dvp, vf + s.Skp * s.Dvp, 0.f);
}

// Adds the mask, the causal and padding limits to the raw scaled scores of one block, in place:
// rows [i0, i0 + bq), keys [j0, j0 + bk) valid of kBK columns. Masked entries become -inf.
template <typename T>
inline void mask_scores(float* S, int64_t bq, int64_t bk, int64_t i0, int64_t j0, bool causal, const MaskView<T>& mask,
                        int64_t b, int64_t h) {
  for (int64_t r = 0; r < bq; ++r) {
    float* srow = S + r * kBK;
    const int64_t i = i0 + r;
    if (mask.p != nullptr) {
      const T* mp = mask.p + b * mask.sb + h * mask.sh + i * mask.sq + j0 * mask.sk;
      if (mask.sk == 1) {
        for (int64_t c = 0; c < bk; ++c) srow[c] += static_cast<float>(mp[c]);
      } else {
        for (int64_t c = 0; c < bk; ++c) srow[c] += static_cast<float>(mp[c * mask.sk]);
      }
    }
    int64_t valid = bk;
    if (causal) valid = std::min<int64_t>(bk, std::max<int64_t>(0, i - j0 + 1));
    for (int64_t c = valid; c < kBK; ++c) srow[c] = kNegInf;
  }
}

inline float row_max(const float* x, int64_t n) {  // n a multiple of kV
  fVec m(kNegInf);
  for (int64_t c = 0; c < n; c += kV) m = at::vec::maximum(m, fVec::loadu(x + c));
  return at::vec::vec_reduce_all<float>([](fVec& a, fVec& b) { return at::vec::maximum(a, b); }, m);
}

// x[c] = exp(x[c] - m) for n (a multiple of kV) entries; returns their sum. exp(-inf) = 0.
inline float exp_sub_sum(float* x, float m, int64_t n) {
  const fVec vm(m);
  fVec acc(0.f);
  for (int64_t c = 0; c < n; c += kV) {
    fVec e = (fVec::loadu(x + c) - vm).exp_u20();
    e.store(x + c);
    acc += e;
  }
  return at::vec::vec_reduce_all<float>([](fVec& a, fVec& b) { return a + b; }, acc);
}

inline void scale_row(float* x, float a, int64_t n) {  // n a multiple of kV
  const fVec va(a);
  for (int64_t c = 0; c < n; c += kV) (fVec::loadu(x + c) * va).store(x + c);
}

#if defined(__AVX2__) && defined(__FMA__)
inline float hmax256(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// softmax_step512 on 8-lane AVX2 vectors (the path of CPUs without AVX-512): one pass over a row's
// kBK scores in registers (NaN check, max), then exp256 and the sum, the O row rescaled when the
// max moved. Measured 1 thread, (4,12,512,64) forward with FASTLM_CPU_NO_AVX512=1, interleaved
// runs: 44.7-46.7 -> 41.6-43.2 ms (the scalar NaN scan and the separate max / exp passes it replaces).
void softmax_step256(float* S, int64_t bq, float* m, float* l, float* O, int64_t ldo, int64_t Dv) {
  static_assert(kBK % 8 == 0, "kBK must be a multiple of 8");
  constexpr int NB = kBK / 8;
  for (int64_t r = 0; r < bq; ++r) {
    float* srow = S + r * kBK;
    __m256 x[NB];
    __m256 mx = _mm256_set1_ps(kNegInf);
    __m256 nan = _mm256_setzero_ps();
#pragma GCC unroll 8
    for (int v = 0; v < NB; ++v) {
      x[v] = _mm256_loadu_ps(srow + v * 8);
      mx = _mm256_max_ps(mx, x[v]);
      nan = _mm256_or_ps(nan, _mm256_cmp_ps(x[v], x[v], _CMP_UNORD_Q));
    }
    if (_mm256_movemask_ps(nan)) {  // a NaN score (NaN in the inputs): the row is NaN, as in torch
      nan_row(srow, kBK, m[r], l[r]);
      continue;
    }
    const float m_new = std::max(m[r], hmax256(mx));
    if (m_new == kNegInf) {  // nothing seen yet in this row: P = 0
#pragma GCC unroll 8
      for (int v = 0; v < NB; ++v) _mm256_storeu_ps(srow + v * 8, _mm256_setzero_ps());
      continue;
    }
    const __m256 vm = _mm256_set1_ps(m_new);
    __m256 sum = _mm256_setzero_ps();
#pragma GCC unroll 8
    for (int v = 0; v < NB; ++v) {
      const __m256 e = exp256(_mm256_sub_ps(x[v], vm));
      _mm256_storeu_ps(srow + v * 8, e);
      sum = _mm256_add_ps(sum, e);
    }
    const float alpha = m[r] == kNegInf ? 0.f : std::exp(m[r] - m_new);
    if (alpha != 1.f) scale_row(O + r * ldo, alpha, Dv);   // Dv (Dvp) a multiple of 8
    l[r] = l[r] * alpha + hsum256(sum);
    m[r] = m_new;
  }
}
#endif

// ------------------------------ forward, fused path for AVX-512 CPUs ------------------------------
// attention_fwd_kernel's path on CPUs with AVX-512 when there is no dropout and no mask or a
// row-independent (key-padding) one: encoder attention (BERT, MiniLM: head dims 32..128, 64..512 keys).
// Same tasks (b, h, block of kFQ = 64 query rows), computed on S^T (keys x query lanes) so that the
// softmax never reduces across lanes:
//   1. S^T = K Q'^T with Q' = Q * scale * log2(e) (the softmax runs in base 2): K broadcast from its
//      own rows (fp32: read in place through its strides, no K^T panel), Q'^T a (D x 64) panel packed
//      per task. The tile's epilogue adds the key bias (mask * log2(e)), applies the causal limit and
//      keeps each query lane's running max m: a vertical max, no horizontal reduction.
//   2. P^T = 2^(S^T - m) in place and l = the per-lane sum, one pass (exp2_512).
//   3. O = P V with P^T read in place (one broadcast per query row) and V from its own rows (fp32: in
//      place), the accumulators in registers over all keys of the chunk; the epilogue scales by 1 / l
//      and writes the output rows (fp32: straight into `out`).
// Keys come in chunks of kFK = 512: up to 512 keys there is one chunk and nothing is rescaled; longer
// rows keep O in fp32 between chunks, rescaled by 2^(m_old - m_new) (online softmax). Deterministic: a
// fixed order of every sum, whatever the thread count. Why it wins over the blocked kernel above at small
// head dims: no per-row horizontal max / sum, no alpha rescaling below 512 keys, no K^T / V / Q / O copies,
// and tiles whose inner loops keep 24 accumulators busy (QK 6 keys x 64 queries, PV 8 x 32 or 6 x 64).
// Measured 1 thread (Zen 4), q/k/v strided views of a fused QKV projection as in BERT: (1, 12, 128, 32)
// ~440 -> ~290 us, (1, 12, 128, 64) ~770 -> ~550 us, (4, 12, 512, 64) ~41 -> ~34 ms.
#if defined(FASTLM_ATTN_AVX512)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma")
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"  // the same, from _mm512_max_ps

constexpr int64_t kFQ = 64;   // query rows per task (4 vectors of 16 lanes); row stride of Q'^T and S^T
constexpr int64_t kFK = 512;  // keys per chunk
constexpr double kLog2e = 1.4426950408889634;
constexpr float kLn2 = 0.6931471805599453f;

// 2^t on 16 lanes for t <= 0: t = n + f with n = round(t), |f| <= 1/2 (exact), 2^f by a degree-5
// minimax polynomial (relative error 2.1e-7 evaluated in fp32, exp512's Taylor form has 2.3e-7, with
// 2 operations fewer and no Cody-Waite step), times 2^n by vscalefps. -inf (a masked score) clamps to
// 2^-200 = 0 exactly; NaN stays NaN (vmaxps returns its second operand on NaN), so a NaN score makes
// a NaN row, as in torch.
inline __m512 exp2_512(__m512 t) {
  t = _mm512_max_ps(_mm512_set1_ps(-200.f), t);
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.3276472454890609e-3f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.675540961325169e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550713092088699e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022120237350464e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931469440460205e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0000001192092896f));
  return _mm512_scalef_ps(p, n);
}

// S^T tile of R keys x NQ vectors of query lanes: ST[r] = kbias[r] + sum_d K[r][d] QT[d] (kbias may
// be null); causal: lanes of queries i < key j get -inf; mrun = max(mrun, ST[r]) over the rows. The max
// takes the running value on NaN (vmaxps), so a NaN score never becomes m: it reaches exp2_512 and
// makes its row NaN there.
template <int R, int NQ>
inline void qk_tile(int64_t D, const float* K, int64_t ldk, const float* QT, float* ST, const float* kbias,
                    bool causal, int64_t key0, int64_t i0, float* mrun) {
  __m512 c[R][NQ];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {  // the key bias as the accumulators' start
    const __m512 bv = kbias != nullptr ? _mm512_set1_ps(kbias[r]) : _mm512_setzero_ps();
#pragma GCC unroll 4
    for (int n = 0; n < NQ; ++n) c[r][n] = bv;
  }
  for (int64_t d = 0; d < D; ++d) {
    __m512 qd[NQ];
#pragma GCC unroll 4
    for (int n = 0; n < NQ; ++n) qd[n] = _mm512_loadu_ps(QT + d * kFQ + n * 16);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(K[r * ldk + d]);
#pragma GCC unroll 4
      for (int n = 0; n < NQ; ++n) c[r][n] = _mm512_fmadd_ps(a, qd[n], c[r][n]);
    }
  }
  if (causal && key0 + R - 1 > i0) {  // a key after some query of the block
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int n = 0; n < NQ; ++n) {
        const __m512i qi = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(i0 + n * 16)), lane);
        const __mmask16 dead = _mm512_cmplt_epi32_mask(qi, _mm512_set1_epi32(static_cast<int>(key0 + r)));
        c[r][n] = _mm512_mask_mov_ps(c[r][n], dead, _mm512_set1_ps(kNegInf));
      }
  }
#pragma GCC unroll 4
  for (int n = 0; n < NQ; ++n) {
    __m512 mv = _mm512_loadu_ps(mrun + n * 16);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) mv = _mm512_max_ps(c[r][n], mv);
    _mm512_storeu_ps(mrun + n * 16, mv);
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int n = 0; n < NQ; ++n) _mm512_storeu_ps(ST + r * kFQ + n * 16, c[r][n]);
}

template <int NQ, int R>
inline void qk_tail(int64_t rows, int64_t D, const float* K, int64_t ldk, const float* QT, float* ST,
                    const float* kbias, bool causal, int64_t key0, int64_t i0, float* mrun) {
  if constexpr (R > 0) {
    if (rows == R)
      qk_tile<R, NQ>(D, K, ldk, QT, ST, kbias, causal, key0, i0, mrun);
    else
      qk_tail<NQ, R - 1>(rows, D, K, ldk, QT, ST, kbias, causal, key0, i0, mrun);
  }
}

// S^T rows of nk keys (key0 = the first one's index) for NQ query vectors; tiles of MR keys keep 24
// accumulators (NQ = 4: 6 keys; 2: 12) in registers, K broadcast from memory.
template <int NQ>
void qk_block(int64_t nk, int64_t D, const float* K, int64_t ldk, const float* QT, float* ST, const float* kbias,
              bool causal, int64_t key0, int64_t i0, float* mrun) {
  constexpr int MR = NQ == 4 ? 6 : NQ == 3 ? 8 : 12;
  int64_t j = 0;
  for (; j + MR <= nk; j += MR)
    qk_tile<MR, NQ>(D, K + j * ldk, ldk, QT, ST + j * kFQ, kbias ? kbias + j : nullptr, causal, key0 + j, i0, mrun);
  if (j < nk)
    qk_tail<NQ, MR - 1>(nk - j, D, K + j * ldk, ldk, QT, ST + j * kFQ, kbias ? kbias + j : nullptr, causal, key0 + j,
                        i0, mrun);
}

// P^T = 2^(S^T - m) in place over nk key rows; lsum = the per-lane sums. A lane with m = -inf (it saw no
// key yet: its scores are -inf or NaN) subtracts the lowest float instead: -inf -> 0, NaN stays NaN.
template <int NQ>
void exp_block(float* ST, int64_t nk, const float* mrun, float* lsum) {
  __m512 mv[NQ], ls[NQ];
#pragma GCC unroll 4
  for (int n = 0; n < NQ; ++n) {
    mv[n] = _mm512_max_ps(_mm512_loadu_ps(mrun + n * 16), _mm512_set1_ps(std::numeric_limits<float>::lowest()));
    ls[n] = _mm512_setzero_ps();
  }
  for (int64_t j = 0; j < nk; ++j) {
#pragma GCC unroll 4
    for (int n = 0; n < NQ; ++n) {
      float* p = ST + j * kFQ + n * 16;
      const __m512 e = exp2_512(_mm512_sub_ps(_mm512_loadu_ps(p), mv[n]));
      _mm512_storeu_ps(p, e);
      ls[n] = _mm512_add_ps(ls[n], e);
    }
  }
#pragma GCC unroll 4
  for (int n = 0; n < NQ; ++n) _mm512_storeu_ps(lsum + n * 16, ls[n]);
}

// O tile of R query rows x NV vectors of value columns (the last one masked by `last`):
// acc = cin ? cin[r] * alpha[r] : 0, acc += sum_j PT[j][r] V[j] over nk keys, dst[r] = acc (* rs[r]).
// cin and dst have the row stride ldd (cin == dst: the fp32 O of the previous chunks, in place).
template <int R, int NV>
inline void pv_tile(int64_t nk, const float* PT, const float* V, int64_t ldv, __mmask16 last, const float* cin,
                    const float* alpha, float* dst, int64_t ldd, const float* rs) {
  __m512 c[R][NV];
  if (cin != nullptr) {
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(alpha[r]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        const __mmask16 mk = v == NV - 1 ? last : static_cast<__mmask16>(0xFFFF);
        c[r][v] = _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, cin + r * ldd + v * 16), a);
      }
    }
  } else {
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) c[r][v] = _mm512_setzero_ps();
  }
  for (int64_t j = 0; j < nk; ++j) {
    __m512 b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      b[v] = v == NV - 1 ? _mm512_maskz_loadu_ps(last, V + j * ldv + v * 16) : _mm512_loadu_ps(V + j * ldv + v * 16);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(PT[j * kFQ + r]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) c[r][v] = _mm512_fmadd_ps(a, b[v], c[r][v]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    const __m512 s = _mm512_set1_ps(rs != nullptr ? rs[r] : 1.f);
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const __mmask16 mk = v == NV - 1 ? last : static_cast<__mmask16>(0xFFFF);
      _mm512_mask_storeu_ps(dst + r * ldd + v * 16, mk, rs != nullptr ? _mm512_mul_ps(c[r][v], s) : c[r][v]);
    }
  }
}

template <int NV, int R>
inline void pv_tail(int64_t rows, int64_t nk, const float* PT, const float* V, int64_t ldv, __mmask16 last,
                    const float* cin, const float* alpha, float* dst, int64_t ldd, const float* rs) {
  if constexpr (R > 0) {
    if (rows == R)
      pv_tile<R, NV>(nk, PT, V, ldv, last, cin, alpha, dst, ldd, rs);
    else
      pv_tail<NV, R - 1>(rows, nk, PT, V, ldv, last, cin, alpha, dst, ldd, rs);
  }
}

// O rows [0, bq) for one panel of NV value vectors, in tiles of MR query rows (16 to 24 accumulators; 8 rows
// at NV = 2 so that a block of 64 rows has no tail tile).
template <int NV>
void pv_rows(int64_t bq, int64_t nk, const float* PT, const float* V, int64_t ldv, __mmask16 last, const float* cin,
             const float* alpha, float* dst, int64_t ldd, const float* rs) {
  constexpr int MR = NV == 4 ? 6 : NV == 3 ? 8 : NV == 2 ? 8 : 16;
  int64_t i = 0;
  for (; i + MR <= bq; i += MR)
    pv_tile<MR, NV>(nk, PT + i, V, ldv, last, cin ? cin + i * ldd : nullptr, alpha + i, dst + i * ldd, ldd,
                    rs ? rs + i : nullptr);
  if (i < bq)
    pv_tail<NV, MR - 1>(bq - i, nk, PT + i, V, ldv, last, cin ? cin + i * ldd : nullptr, alpha + i, dst + i * ldd,
                        ldd, rs ? rs + i : nullptr);
}

// O (bq x Dv, row stride ldd) = P V over nk keys, in column panels of up to 64 (4 vectors).
void pv_block(int64_t bq, int64_t nk, const float* PT, const float* V, int64_t ldv, int64_t Dv, const float* cin,
              const float* alpha, float* dst, int64_t ldd, const float* rs) {
  for (int64_t d0 = 0; d0 < Dv; d0 += 64) {
    const int64_t w = std::min<int64_t>(64, Dv - d0);
    const __mmask16 last = tail_mask(w - (w - 1) / 16 * 16);
    const float* ci = cin ? cin + d0 : nullptr;
    switch ((w + 15) / 16) {
      case 4: pv_rows<4>(bq, nk, PT, V + d0, ldv, last, ci, alpha, dst + d0, ldd, rs); break;
      case 3: pv_rows<3>(bq, nk, PT, V + d0, ldv, last, ci, alpha, dst + d0, ldd, rs); break;
      case 2: pv_rows<2>(bq, nk, PT, V + d0, ldv, last, ci, alpha, dst + d0, ldd, rs); break;
      default: pv_rows<1>(bq, nk, PT, V + d0, ldv, last, ci, alpha, dst + d0, ldd, rs); break;
    }
  }
}

// 16 x 16 transpose in registers: x[i][j] -> x[j][i] (unpack pairs, then 4 x 4 blocks, then 128-bit lanes).
inline void transpose16x16(__m512 x[16]) {
  __m512 t[16];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(x[2 * i], x[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(x[2 * i], x[2 * i + 1]);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {  // x[4i + j], 128-bit lane k: column 4k + j of rows 4i..4i+3
    x[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    x[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    x[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    x[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
    t[j] = _mm512_shuffle_f32x4(x[j], x[4 + j], 0x88);
    t[4 + j] = _mm512_shuffle_f32x4(x[j], x[4 + j], 0xDD);
    t[8 + j] = _mm512_shuffle_f32x4(x[8 + j], x[12 + j], 0x88);
    t[12 + j] = _mm512_shuffle_f32x4(x[8 + j], x[12 + j], 0xDD);
  }
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
    x[j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88);
    x[8 + j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xDD);
    x[4 + j] = _mm512_shuffle_f32x4(t[4 + j], t[12 + j], 0x88);
    x[12 + j] = _mm512_shuffle_f32x4(t[4 + j], t[12 + j], 0xDD);
  }
}

// Q'^T panel (D x kFQ): QT[d][r] = q_r[d] * sc for the bq rows q_r = q + r * ldq (fp32), zero in lanes
// [bq, 16 ceil(bq / 16)); 16 x 16 blocks transposed in registers.
inline void pack_qt512(const float* q, int64_t ldq, int64_t bq, int64_t D, float sc, float* QT) {
  const __m512 vs = _mm512_set1_ps(sc);
  for (int64_t r0 = 0; r0 < bq; r0 += 16) {
    const int64_t nr = std::min<int64_t>(16, bq - r0);
    for (int64_t d0 = 0; d0 < D; d0 += 16) {
      const int64_t nd = std::min<int64_t>(16, D - d0);
      const __mmask16 mk = tail_mask(nd);
      __m512 x[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i)
        x[i] = i < nr ? _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, q + (r0 + i) * ldq + d0), vs) : _mm512_setzero_ps();
      transpose16x16(x);
      for (int64_t i = 0; i < nd; ++i) _mm512_storeu_ps(QT + (d0 + i) * kFQ + r0, x[i]);
    }
  }
}

// 64-byte aligned fp32 scratch (zmm rows that do not straddle cache lines).
struct AlignedBuf {
  std::vector<float> v;
  float* p = nullptr;
  explicit AlignedBuf(int64_t n) : v(static_cast<size_t>(n + 16)) {
    p = v.data() + ((64 - reinterpret_cast<uintptr_t>(v.data()) % 64) % 64) / sizeof(float);
  }
};

template <typename T>
struct FusedArgs {
  Strided4<T> q, k, v;
  MaskView<T> mask;
  float scale;
  bool causal;
  Shapes s;
  T* out;
  float* lse;
  int64_t nqb, ntask;
};

// One worker: takes tasks from `next` until none is left.
template <typename T>
void fused_fwd_worker512(const FusedArgs<T>& a, std::atomic<int64_t>& next) {
  constexpr bool kF32 = std::is_same_v<T, float>;
  const Shapes& s = a.s;
  const int64_t D = s.D, Dv = s.Dv;
  AlignedBuf QT(D * kFQ), ST(std::max<int64_t>(1, std::min(s.Sk, kFK)) * kFQ), O(kFQ * Dv);
  AlignedBuf m(kFQ), mold(kFQ), l(kFQ), lsum(kFQ), alpha(kFQ), inv(kFQ), kbias(std::max<int64_t>(1, s.Sk));
  std::vector<float> Kf(kF32 ? 0 : s.Sk * D), Vf(kF32 ? 0 : s.Sk * Dv), Qf(kF32 ? 0 : kFQ * D);
  // Q' = Q * scale * log2(e): the product rounded once, in double
  const float sc = static_cast<float>(static_cast<double>(a.scale) * kLog2e);
  int64_t packed = -1, biased = -1, live0 = 0, live1 = s.Sk;
  for (int64_t task = next.fetch_add(1, std::memory_order_relaxed); task < a.ntask;
       task = next.fetch_add(1, std::memory_order_relaxed)) {
    // (b, h)-major, so K and V stay in cache across a head's tasks; causal: the late (long) query
    // blocks of each head first
    const int64_t bh = task / a.nqb, qb = a.causal ? a.nqb - 1 - task % a.nqb : task % a.nqb;
    const int64_t b = bh / s.H, h = bh % s.H, hk = h / s.group;
    const int64_t i0 = qb * kFQ, bq = std::min(kFQ, s.Sq - i0), nq = (bq + 15) / 16;
    const float *K, *V;
    int64_t ldk, ldv;
    if constexpr (kF32) {
      K = a.k.row(b, hk, 0), ldk = a.k.ss;
      V = a.v.row(b, hk, 0), ldv = a.v.ss;
    } else {  // fp32 copies of this (b, kv head)'s K and V rows, made when the head changes
      if (b * s.Hkv + hk != packed) {
        for (int64_t j = 0; j < s.Sk; ++j) {
          row_to_float(a.k.row(b, hk, j), Kf.data() + j * D, D);
          row_to_float(a.v.row(b, hk, j), Vf.data() + j * Dv, Dv);
        }
        packed = b * s.Hkv + hk;
      }
      K = Kf.data(), ldk = D;
      V = Vf.data(), ldv = Dv;
    }
    // Key bias (mask * log2(e)) of this (b, h), and its live key range: keys masked for every row
    // before the first and after the last live one are skipped.
    const float* kb = nullptr;
    if (a.mask.p != nullptr) {
      if (bh != biased) {
        live0 = s.Sk, live1 = 0;
        for (int64_t j = 0; j < s.Sk; ++j) {
          const float x = a.mask.at(b, h, 0, j);
          kbias.p[j] = static_cast<float>(x * kLog2e);
          if (x != kNegInf) live0 = std::min(live0, j), live1 = j + 1;
        }
        biased = bh;
      }
      kb = kbias.p;
    }
    const int64_t k0 = a.mask.p != nullptr ? live0 : 0;
    int64_t kend = a.mask.p != nullptr ? live1 : s.Sk;
    if (a.causal) kend = std::min(kend, i0 + bq);  // row i sees keys j <= i
    if constexpr (kF32) {  // Q'^T panel (D x 64), lanes past bq zero
      pack_qt512(a.q.row(b, h, i0), a.q.ss, bq, D, sc, QT.p);
    } else {
      for (int64_t r = 0; r < bq; ++r) row_to_float(a.q.row(b, h, i0 + r), Qf.data() + r * D, D);
      pack_qt512(Qf.data(), D, bq, D, sc, QT.p);
    }
    std::fill(m.p, m.p + kFQ, kNegInf);
    std::fill(l.p, l.p + kFQ, 0.f);
    float* dst = O.p;
    if constexpr (kF32) dst = a.out + (bh * s.Sq + i0) * Dv;
    for (int64_t c0 = k0; c0 < kend; c0 += kFK) {
      const int64_t nk = std::min(kend - c0, kFK);
      const bool first = c0 == k0, last = c0 + nk == kend;
      if (!first) std::copy(m.p, m.p + kFQ, mold.p);
      const float* kbc = kb ? kb + c0 : nullptr;
      switch (nq) {
        case 4: qk_block<4>(nk, D, K + c0 * ldk, ldk, QT.p, ST.p, kbc, a.causal, c0, i0, m.p); break;
        case 3: qk_block<3>(nk, D, K + c0 * ldk, ldk, QT.p, ST.p, kbc, a.causal, c0, i0, m.p); break;
        case 2: qk_block<2>(nk, D, K + c0 * ldk, ldk, QT.p, ST.p, kbc, a.causal, c0, i0, m.p); break;
        default: qk_block<1>(nk, D, K + c0 * ldk, ldk, QT.p, ST.p, kbc, a.causal, c0, i0, m.p); break;
      }
      switch (nq) {
        case 4: exp_block<4>(ST.p, nk, m.p, lsum.p); break;
        case 3: exp_block<3>(ST.p, nk, m.p, lsum.p); break;
        case 2: exp_block<2>(ST.p, nk, m.p, lsum.p); break;
        default: exp_block<1>(ST.p, nk, m.p, lsum.p); break;
      }
      for (int64_t n = 0; n < nq * 16; n += 16) {
        if (first) {
          _mm512_storeu_ps(l.p + n, _mm512_loadu_ps(lsum.p + n));
        } else {  // alpha = 2^(m_old - m_new), 0 where m_old = -inf (O and l are 0 there)
          const __m512 mo = _mm512_loadu_ps(mold.p + n);
          const __m512 al = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(mo, _mm512_set1_ps(kNegInf), _CMP_NEQ_OQ),
                                                exp2_512(_mm512_sub_ps(mo, _mm512_loadu_ps(m.p + n))));
          _mm512_storeu_ps(alpha.p + n, al);
          _mm512_storeu_ps(l.p + n, _mm512_fmadd_ps(_mm512_loadu_ps(l.p + n), al, _mm512_loadu_ps(lsum.p + n)));
        }
      }
      if (last)  // 1 / l (NaN stays NaN; 0 where no key was seen: the row is zeroed below)
        for (int64_t r = 0; r < bq; ++r) inv.p[r] = l.p[r] != 0.f ? 1.f / l.p[r] : 0.f;
      pv_block(bq, nk, ST.p, V + c0 * ldv, ldv, Dv, first ? nullptr : O.p, alpha.p, last ? dst : O.p, Dv,
               last ? inv.p : nullptr);
    }
    for (int64_t r = 0; r < bq; ++r) {
      const int64_t i = i0 + r;
      if (l.p[r] > 0.f || std::isnan(l.p[r])) {  // (a NaN in the inputs: a NaN row, as torch)
        a.lse[bh * s.Sq + i] = (m.p[r] + std::log2(l.p[r])) * kLn2;
      } else {  // a row that sees no key: zeros, lse = -inf (as torch)
        a.lse[bh * s.Sq + i] = kNegInf;
        std::fill(dst + r * Dv, dst + (r + 1) * Dv, 0.f);
      }
      if constexpr (!kF32) row_from_float(O.p + r * Dv, a.out + (bh * s.Sq + i) * Dv, Dv);
    }
  }
}

#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif  // FASTLM_ATTN_AVX512

// ------------------------------------------ forward ------------------------------------------

template <typename T>
void attention_fwd_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor* mask_t,
                          float scale, bool causal, const Dropout& drop, const Shapes& s, at::Tensor& out,
                          at::Tensor& lse) {
  const Strided4<T> qv(q), kv(k), vv(v);
  const MaskView<T> mask(mask_t);
  T* op = out.data_ptr<T>();
  float* lp = lse.data_ptr<float>();
#if defined(FASTLM_ATTN_AVX512)
  if (use_avx512() && !drop.on && (mask.p == nullptr || mask.row_independent)) {
    const int64_t nqb = (s.Sq + kFQ - 1) / kFQ;
    const FusedArgs<T> args{qv, kv, vv, mask, scale, causal, s, op, lp, nqb, s.B * s.H * nqb};
    std::atomic<int64_t> next{0};
    const int64_t nworkers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), args.ntask));
    at::parallel_for(0, nworkers, 1, [&](int64_t, int64_t) { fused_fwd_worker512<T>(args, next); });
    return;
  }
#endif
  // Tasks (b, h, query block) are handed out dynamically (an atomic counter, one parallel region of
  // one chunk per thread): on a shared machine a preempted thread then does not hold the other one at
  // a barrier.
  const int64_t nqb = (s.Sq + kBQ - 1) / kBQ, nbh = s.B * s.H, ntask = nbh * nqb;
  const bool avx512 = use_avx512();
  std::atomic<int64_t> next{0};
  const int64_t nworkers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), ntask));
  at::parallel_for(0, nworkers, 1, [&](int64_t, int64_t) {
    std::vector<float> Q(kBQ * s.D), S(kBQ * kBK), O(kBQ * s.Dvp), m(kBQ), l(kBQ), row;
    // This worker's fp32 panels of one (b, kv head): K^T (D x Skp) and V (Skp x Dvp), packed when a task
    // needs another kv head (tasks are (b, h)-major, so about once per head per worker; packing per
    // worker keeps them in this core's L2, where a shared pre-pass left them in L3).
    std::vector<float> kt(static_cast<size_t>(s.D * s.Skp)), vf(static_cast<size_t>(s.Skp * s.Dvp));
    int64_t packed = -1;
    for (int64_t task = next.fetch_add(1, std::memory_order_relaxed); task < ntask;
         task = next.fetch_add(1, std::memory_order_relaxed)) {
      // (b, h)-major, so a task's K/V panels are still in L2 from the previous one; causal: the long
      // (late) query blocks of each head first, so the tail of the schedule is short tasks.
      const int64_t bh = task / nqb, qb = causal ? nqb - 1 - task % nqb : task % nqb;
      const int64_t b = bh / s.H, h = bh % s.H, hk = h / s.group;
      const int64_t i0 = qb * kBQ, bq = std::min(kBQ, s.Sq - i0);
      if (b * s.Hkv + hk != packed) {
        pack_kv(kv, vv, s, b, hk, kt.data(), vf.data(), row);
        packed = b * s.Hkv + hk;
      }
      const float* KT = kt.data();
      const float* Vf = vf.data();
      // Q block, pre-multiplied by scale.
      for (int64_t r = 0; r < bq; ++r) {
        row_to_float(qv.row(b, h, i0 + r), Q.data() + r * s.D, s.D);
        for (int64_t d = 0; d < s.D; ++d) Q[r * s.D + d] *= scale;
      }
      std::fill(O.begin(), O.end(), 0.f);
      std::fill(m.begin(), m.end(), kNegInf);
      std::fill(l.begin(), l.end(), 0.f);
      const int64_t kend = causal ? std::min(s.Sk, i0 + bq) : s.Sk;
      for (int64_t j0 = 0; j0 < kend; j0 += kBK) {
        const int64_t bk = std::min(kBK, s.Sk - j0);
        if (mask.block_dead(b, h, j0, j0 + bk)) continue;
        const int64_t bkp = round_up(bk, kV);
        gemm(bq, bkp, s.D, Q.data(), s.D, KT + j0 * s.D, kBK, S.data(), kBK, false);
        mask_scores(S.data(), bq, bk, i0, j0, causal, mask, b, h);
#if defined(FASTLM_ATTN_AVX512)
        if (avx512) {
          softmax_step512(S.data(), bq, m.data(), l.data(), O.data(), s.Dvp, s.Dvp);
        } else
#endif
#if defined(__AVX2__) && defined(__FMA__)
        if (kV == 8) {
          softmax_step256(S.data(), bq, m.data(), l.data(), O.data(), s.Dvp, s.Dvp);
        } else
#endif
        {
          for (int64_t r = 0; r < bq; ++r) {
            float* srow = S.data() + r * kBK;
            if (std::any_of(srow, srow + bkp, [](float x) { return std::isnan(x); })) {
              nan_row(srow, bkp, m[r], l[r]);  // a NaN score: the row is NaN, as in torch
              continue;
            }
            const float m_new = std::max(m[r], row_max(srow, bkp));
            if (m_new == kNegInf) {  // nothing seen yet in this row: P = 0
              std::fill(srow, srow + bkp, 0.f);
              continue;
            }
            const float alpha = std::exp(m[r] - m_new);  // 0 when m was -inf
            if (alpha != 1.f) scale_row(O.data() + r * s.Dvp, alpha, s.Dvp);
            l[r] = l[r] * alpha + exp_sub_sum(srow, m_new, bkp);
            m[r] = m_new;
          }
        }
        if (drop.on) {
          for (int64_t r = 0; r < bq; ++r) {
            float* srow = S.data() + r * kBK;
            for (int64_t c = 0; c < bk; ++c)
              srow[c] = drop.keep(bh, i0 + r, j0 + c) ? srow[c] * drop.inv_keep : 0.f;
          }
        }
        gemm(bq, s.Dvp, bk, S.data(), kBK, Vf + j0 * s.Dvp, s.Dvp, O.data(), s.Dvp, true);
      }
      for (int64_t r = 0; r < bq; ++r) {
        float* orow = O.data() + r * s.Dvp;
        const int64_t i = i0 + r;
        if (l[r] > 0.f || std::isnan(l[r])) {  // (a NaN in the inputs: a NaN row, as torch)
          scale_row(orow, 1.f / l[r], s.Dvp);
          lp[bh * s.Sq + i] = m[r] + std::log(l[r]);
        } else {  // a row that sees no key: zeros, lse = -inf (as torch)
          std::fill(orow, orow + s.Dvp, 0.f);
          lp[bh * s.Sq + i] = kNegInf;
        }
        row_from_float(orow, op + (bh * s.Sq + i) * s.Dv, s.Dv);
      }
    }
  });
}

// ------------------------------------------ backward ------------------------------------------

template <typename T>
void attention_bwd_kernel(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const at::Tensor& out, const at::Tensor& lse, const at::Tensor* mask_t, float scale,
                          bool causal, const Dropout& drop, const Shapes& s, at::Tensor& dq, at::Tensor& dk,
                          at::Tensor& dv) {
  const Strided4<T> qv(q), kv(k), vv(v), dov(dout), ov(out);
  const MaskView<T> mask(mask_t);
  const float* lp = lse.data_ptr<float>();  // contiguous (B, H, Sq)
  T* dqp = dq.data_ptr<T>();
  T* dkp = dk.data_ptr<T>();
  T* dvp = dv.data_ptr<T>();
  const int64_t Dp = s.Dp, Dvp = s.Dvp, Skp = s.Skp;

  at::parallel_for(0, s.B * s.Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> Kf(Skp * Dp), KT(s.D * Skp), VT(s.Dv * Skp), dK(Skp * Dp), dV(Skp * Dvp);
    std::vector<float> Qf(s.Sq * Dp), dOf(s.Sq * Dvp), dQ(s.Sq * Dp), delta(s.Sq), orow(s.Dv);
    std::vector<float> S(kBQ * kBK), dP(kBQ * kBK), T1(kBK * kBQ);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / s.Hkv, hk = t % s.Hkv;
      load_rows(kv, b, hk, 0, s.Sk, s.D, Kf.data(), Dp);
      std::fill(Kf.begin() + s.Sk * Dp, Kf.end(), 0.f);
      std::fill(KT.begin(), KT.end(), 0.f);
      std::fill(VT.begin(), VT.end(), 0.f);
      for (int64_t j = 0; j < s.Sk; ++j) {
        // K^T and V^T as (D x kBK) panels, one per key block (see pack_kv)
        float* kpanel = KT.data() + (j / kBK) * s.D * kBK + (j % kBK);
        for (int64_t d = 0; d < s.D; ++d) kpanel[d * kBK] = Kf[j * Dp + d];
        const T* vr = vv.row(b, hk, j);
        float* vpanel = VT.data() + (j / kBK) * s.Dv * kBK + (j % kBK);
        for (int64_t d = 0; d < s.Dv; ++d) vpanel[d * kBK] = static_cast<float>(vr[d]);
      }
      std::fill(dK.begin(), dK.end(), 0.f);
      std::fill(dV.begin(), dV.end(), 0.f);
      for (int64_t h = hk * s.group; h < (hk + 1) * s.group; ++h) {
        const int64_t bh = b * s.H + h;
        load_rows(qv, b, h, 0, s.Sq, s.D, Qf.data(), Dp);
        load_rows(dov, b, h, 0, s.Sq, s.Dv, dOf.data(), Dvp);
        for (int64_t i = 0; i < s.Sq; ++i) {
          row_to_float(ov.row(b, h, i), orow.data(), s.Dv);
          float acc = 0.f;
          for (int64_t d = 0; d < s.Dv; ++d) acc += orow[d] * dOf[i * Dvp + d];
          delta[i] = acc;
        }
        std::fill(dQ.begin(), dQ.end(), 0.f);
        const float* L = lp + bh * s.Sq;
        for (int64_t j0 = 0; j0 < s.Sk; j0 += kBK) {
          const int64_t bk = std::min(kBK, s.Sk - j0), bkp = round_up(bk, kV);
          if (mask.block_dead(b, h, j0, j0 + bk)) continue;
          // causal: rows i >= j0 see this block
          for (int64_t i0 = causal ? (j0 / kBQ) * kBQ : 0; i0 < s.Sq; i0 += kBQ) {
            const int64_t bq = std::min(kBQ, s.Sq - i0);
            if (causal && i0 + bq - 1 < j0) continue;
            gemm(bq, bkp, s.D, Qf.data() + i0 * Dp, Dp, KT.data() + j0 * s.D, kBK, S.data(), kBK, false);
            for (int64_t r = 0; r < bq; ++r) scale_row(S.data() + r * kBK, scale, bkp);
            mask_scores(S.data(), bq, bk, i0, j0, causal, mask, b, h);
            gemm(bq, bkp, s.Dv, dOf.data() + i0 * Dvp, Dvp, VT.data() + j0 * s.Dv, kBK, dP.data(), kBK, false);
            for (int64_t r = 0; r < bq; ++r) {
              float* srow = S.data() + r * kBK;  // -> P, then dS
              float* prow = dP.data() + r * kBK;
              const float li = L[i0 + r];
              if (li == kNegInf) {  // a row that saw no key: P = dS = 0
                std::fill(srow, srow + kBK, 0.f);
                if (drop.on)
                  for (int64_t c = 0; c < bk; ++c) T1[c * kBQ + r] = 0.f;
                continue;
              }
              exp_sub_sum(srow, li, bkp);
              const float di = delta[i0 + r];
              if (drop.on) {
                for (int64_t c = 0; c < bk; ++c) {
                  const float p = srow[c];
                  const bool kept = drop.keep(bh, i0 + r, j0 + c);
                  T1[c * kBQ + r] = kept ? p * drop.inv_keep : 0.f;                // P_dropped^T, for dV
                  srow[c] = p * ((kept ? prow[c] * drop.inv_keep : 0.f) - di);     // dS
                }
              }
            }
            if (drop.on) {
              // dV_j += Pd^T dO_i
              gemm(bk, Dvp, bq, T1.data(), kBQ, dOf.data() + i0 * Dvp, Dvp, dV.data() + j0 * Dvp, Dvp, true);
            } else {
              // dV_j += P^T dO_i, P^T read in place (no transpose); then dS = P (dP - delta) in place
              gemm(bk, Dvp, bq, S.data(), 1, dOf.data() + i0 * Dvp, Dvp, dV.data() + j0 * Dvp, Dvp, true, kBK);
              for (int64_t r = 0; r < bq; ++r) {
                float* srow = S.data() + r * kBK;
                const float* prow = dP.data() + r * kBK;
                const fVec vd(delta[i0 + r]);
                for (int64_t c = 0; c < bkp; c += kV)
                  (fVec::loadu(srow + c) * (fVec::loadu(prow + c) - vd)).store(srow + c);
              }
            }
            // dQ_i += dS K_j
            gemm(bq, Dp, bk, S.data(), kBK, Kf.data() + j0 * Dp, Dp, dQ.data() + i0 * Dp, Dp, true);
            // dK_j += dS^T Q_i, dS^T read in place
            gemm(bk, Dp, bq, S.data(), 1, Qf.data() + i0 * Dp, Dp, dK.data() + j0 * Dp, Dp, true, kBK);
          }
        }
        for (int64_t i = 0; i < s.Sq; ++i) {
          scale_row(dQ.data() + i * Dp, scale, Dp);
          row_from_float(dQ.data() + i * Dp, dqp + (bh * s.Sq + i) * s.D, s.D);
        }
      }
      const int64_t bhk = b * s.Hkv + hk;
      for (int64_t j = 0; j < s.Sk; ++j) {
        scale_row(dK.data() + j * Dp, scale, Dp);
        row_from_float(dK.data() + j * Dp, dkp + (bhk * s.Sk + j) * s.D, s.D);
        row_from_float(dV.data() + j * Dvp, dvp + (bhk * s.Sk + j) * s.Dv, s.Dv);
      }
    }
  });
}

// ------------------------------------------ entry points ------------------------------------------

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const char* op) {
  for (auto [t, name] : {std::pair<const at::Tensor&, const char*>{q, "q"}, {k, "k"}, {v, "v"}}) {
    FASTLM_CHECK(t.dim() == 4, op, name, " must be 4-D (B, H, S, D), got ", t.dim(), "-D");
    FASTLM_CHECK(is_float_type(t.scalar_type()), op, name, " must be float32, float16 or bfloat16, got ",
                 t.scalar_type());
    FASTLM_CHECK(t.size(3) <= 1 || t.stride(3) == 1, op, name, " must be contiguous in its last dimension");
    FASTLM_CHECK(t.device().is_cpu(), op, name, " must be a CPU tensor, got ", t.device());
  }
  check_same(k, q, op, "k");
  check_same(v, q, op, "v");
  FASTLM_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0), op, "batch sizes differ");
  FASTLM_CHECK(k.size(3) == q.size(3), op, "k head dim ", k.size(3), " != q head dim ", q.size(3));
  FASTLM_CHECK(k.size(1) == v.size(1) && k.size(2) == v.size(2), op, "k and v shapes disagree: ", k.sizes(),
               " vs ", v.sizes());
  FASTLM_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, op, "q heads ", q.size(1),
               " must be a multiple of kv heads ", k.size(1));
}

Shapes make_shapes(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  Shapes s;
  s.B = q.size(0), s.H = q.size(1), s.Sq = q.size(2), s.D = q.size(3);
  s.Hkv = k.size(1), s.Sk = k.size(2), s.Dv = v.size(3);
  s.group = s.H / s.Hkv;
  s.Dp = round_up(s.D, kV), s.Dvp = round_up(s.Dv, kV), s.Skp = round_up(s.Sk, kBK);
  return s;
}

void check_mask(const std::optional<at::Tensor>& mask, const at::Tensor& q, const Shapes& s, const char* op) {
  if (!opt_ptr(mask)) return;
  const at::Tensor& m = *mask;
  FASTLM_CHECK(m.dim() == 4 && m.size(0) == s.B && m.size(1) == s.H && m.size(2) == s.Sq && m.size(3) == s.Sk, op,
               "mask must be (B, H, Sq, Sk) = (", s.B, ", ", s.H, ", ", s.Sq, ", ", s.Sk, ") (expanded), got ",
               m.sizes());
  check_same(m, q, op, "mask");
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     const std::optional<at::Tensor>& mask, double scale,
                                                     bool is_causal, double dropout_p,
                                                     const std::optional<at::Tensor>& rng) {
  check_qkv(q, k, v, kFwd);
  const Shapes s = make_shapes(q, k, v);
  check_mask(mask, q, s, kFwd);
  const Dropout drop = make_dropout(dropout_p, rng, kFwd);
  auto out = new_output({s.B, s.H, s.Sq, s.Dv}, q.options());
  auto lse = new_output({s.B, s.H, s.Sq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  FASTLM_DISPATCH_FLOAT_TYPES(q.scalar_type(), kFwd, [&] {
    attention_fwd_kernel<scalar_t>(q, k, v, opt_ptr(mask), static_cast<float>(scale), is_causal, drop, s, out, lse);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& mask, double scale, bool is_causal, double dropout_p,
    const std::optional<at::Tensor>& rng) {
  check_qkv(q, k, v, kBwd);
  const Shapes s = make_shapes(q, k, v);
  check_mask(mask, q, s, kBwd);
  for (auto [t, name] : {std::pair<const at::Tensor&, const char*>{dout, "dout"}, {out, "out"}}) {
    FASTLM_CHECK(t.dim() == 4 && t.size(0) == s.B && t.size(1) == s.H && t.size(2) == s.Sq && t.size(3) == s.Dv,
                 kBwd, name, " must be (B, H, Sq, Dv), got ", t.sizes());
    FASTLM_CHECK(t.size(3) <= 1 || t.stride(3) == 1, kBwd, name, " must be contiguous in its last dimension");
    check_same(t, q, kBwd, name);
  }
  FASTLM_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 3 && lse.size(0) == s.B && lse.size(1) == s.H &&
                   lse.size(2) == s.Sq,
               kBwd, "lse must be fp32 (B, H, Sq), got ", lse.scalar_type(), " ", lse.sizes());
  const Dropout drop = make_dropout(dropout_p, rng, kBwd);
  auto lse_c = lse.contiguous();
  auto dq = new_output({s.B, s.H, s.Sq, s.D}, q.options());
  auto dk = new_output({s.B, s.Hkv, s.Sk, s.D}, q.options());
  auto dv = new_output({s.B, s.Hkv, s.Sk, s.Dv}, q.options());
  if (s.B == 0 || s.H == 0) return {dq, dk, dv};
  FASTLM_DISPATCH_FLOAT_TYPES(q.scalar_type(), kBwd, [&] {
    attention_bwd_kernel<scalar_t>(dout, q, k, v, out, lse_c, opt_ptr(mask), static_cast<float>(scale), is_causal,
                                   drop, s, dq, dk, dv);
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlm_C, CPU, m) {
  m.impl("attention_fwd", &attention_fwd_cpu);
  m.impl("attention_bwd", &attention_bwd_cpu);
}

}  // namespace fastlm::cpu

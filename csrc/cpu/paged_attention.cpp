// Paged attention on the CPU: the serving engine's attention over a block-paged KV cache, and the
// cache write (fastlm/serving/kv_pages.py owns the blocks; fastlm/ops/paged_attention.py the op).
//
// Cache layout, per layer: k_cache, v_cache (num_blocks, Hkv, block_size, D); a request's token at
// position j lives in block block_tables[r][j / block_size], row j % block_size. One kernel serves
// decode and chunked prefill: query token t (of T) reads the block table row seq_index[t] and attends
// to that request's positions [0, key_lens[t]) -- a decode token has key_lens = its context length, a
// prefill chunk's token at position p has key_lens = p + 1 (causal inside the chunk, full over the
// cached prefix). The chunk's own keys/values are written first (paged_kv_write), so every key is
// read through the block table: no gather copy.
//
// Work split: at::parallel_for over (query token, kv head) tasks. A task converts its G = H / Hkv
// query heads to fp32, walks the keys in position order (each K row read once for the G heads),
// keeps the G x L scaled scores in an fp32 scratch, takes an exact two-pass softmax (max, then
// vectorized exp and sum) and accumulates p * V in fp32, then divides by the sum. Why two-pass
// and not split-K: each query token's arithmetic is then a fixed function of its own inputs (the
// same order of operations whatever else is in the batch, and the same in decode and prefill), the
// engine's batch invariance rests on it; and T x Hkv tasks already fill the cores at serving batch
// sizes. Portable at::vec (AVX2 in this build, NEON/scalar elsewhere). On AVX-512 CPUs, fp32 with
// head dim 64 or 128 takes paged_attention512 below instead (query blocks; its own fixed per-row
// arithmetic, as invariant): measured 1 thread, a 512-token prefill chunk (12 heads, D 64) 34 -> 7-9
// ms (SDPA causal on the dense tensors: 10.5-13), 64 decode rows x 300 keys 15 -> 6.5-8 ms.
// NaN in a query/key/value gives NaN in that row (the max skips NaN, exp(NaN) propagates); a token
// with key_lens = 0 gets zeros.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include "common.h"
#include "cpu/exp512.h"
#include "cpu/vec_utils.h"

namespace fastlm::cpu {
namespace {

constexpr const char* kAttn = "paged_attention_fwd";
constexpr const char* kWrite = "paged_kv_write";

inline float dot_f(const float* a, const float* b, int64_t n) {
  const int64_t V = fVec::size();
  fVec s0(0.f), s1(0.f);
  int64_t i = 0;
  for (; i + 2 * V <= n; i += 2 * V) {
    s0 = at::vec::fmadd(fVec::loadu(a + i), fVec::loadu(b + i), s0);
    s1 = at::vec::fmadd(fVec::loadu(a + i + V), fVec::loadu(b + i + V), s1);
  }
  for (; i + V <= n; i += V) s0 = at::vec::fmadd(fVec::loadu(a + i), fVec::loadu(b + i), s0);
  float s = at::vec::vec_reduce_all<float>([](fVec& p, fVec& q) { return p + q; }, s0 + s1);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline void axpy_f(float p, const float* v, float* acc, int64_t n) {
  const int64_t V = fVec::size();
  const fVec vp(p);
  int64_t i = 0;
  for (; i + V <= n; i += V) at::vec::fmadd(vp, fVec::loadu(v + i), fVec::loadu(acc + i)).store(acc + i);
  for (; i < n; ++i) acc[i] += p * v[i];
}

// s[i] = exp(s[i] - m) in place; returns their sum (fp32, vector lanes then lanes reduced, then the
// scalar tail: a fixed order for a given n).
inline float exp_sum(float* s, float m, int64_t n) {
  const int64_t V = fVec::size();
  const fVec vm(m);
  fVec acc(0.f);
  int64_t i = 0;
  for (; i + V <= n; i += V) {
    fVec e = (fVec::loadu(s + i) - vm).exp();
    e.store(s + i);
    acc = acc + e;
  }
  float sum = at::vec::vec_reduce_all<float>([](fVec& p, fVec& q) { return p + q; }, acc);
  for (; i < n; ++i) {
    s[i] = std::exp(s[i] - m);
    sum += s[i];
  }
  return sum;
}

struct Dims {
  int64_t T, H, Hkv, G, D, bs, nblocks, R, max_blocks;
};

template <typename T>
void paged_attention_kernel(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc, const int32_t* bt,
                            const int32_t* seq, const int32_t* lens, float scale, const Dims& d, at::Tensor& out) {
  const T* qp = q.data_ptr<T>();
  const T* kp = kc.data_ptr<T>();
  const T* vp = vc.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t q_row = q.stride(0), q_head = q.stride(1);
  const int64_t D = d.D, G = d.G, bs = d.bs, Hkv = d.Hkv;
  at::parallel_for(0, d.T * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), acc(G * D), kf(D), vf(D), scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t t = task / Hkv, g = task % Hkv;
      const int64_t L = lens[t];
      const int32_t* table = bt + int64_t(seq[t]) * d.max_blocks;
      T* o = op + t * d.H * D + g * G * D;   // out is contiguous (T, H, D)
      if (L == 0) {
        for (int64_t i = 0; i < G * D; ++i) o[i] = static_cast<T>(0.f);
        continue;
      }
      for (int64_t h = 0; h < G; ++h) row_to_float(qp + t * q_row + (g * G + h) * q_head, qf.data() + h * D, D);
      scores.resize(G * L);
      for (int64_t j = 0; j < L; ++j) {
        const T* krow = kp + ((int64_t(table[j / bs]) * Hkv + g) * bs + j % bs) * D;
        const float* k32;
        if constexpr (std::is_same_v<T, float>) {
          k32 = krow;
        } else {
          row_to_float(krow, kf.data(), D);
          k32 = kf.data();
        }
        for (int64_t h = 0; h < G; ++h) scores[h * L + j] = dot_f(qf.data() + h * D, k32, D) * scale;
      }
      std::vector<float> inv(G);
      for (int64_t h = 0; h < G; ++h) {
        float* s = scores.data() + h * L;
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < L; ++j) m = s[j] > m ? s[j] : m;   // NaN skipped here, propagates in exp
        if (m == -std::numeric_limits<float>::infinity()) m = 0.f;   // all -inf (or NaN): exp gives 0 (NaN)
        inv[h] = 1.f / exp_sum(s, m, L);
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = 0; j < L; ++j) {
        const T* vrow = vp + ((int64_t(table[j / bs]) * Hkv + g) * bs + j % bs) * D;
        const float* v32;
        if constexpr (std::is_same_v<T, float>) {
          v32 = vrow;
        } else {
          row_to_float(vrow, vf.data(), D);
          v32 = vf.data();
        }
        for (int64_t h = 0; h < G; ++h) axpy_f(scores[h * L + j], v32, acc.data() + h * D, D);
      }
      for (int64_t h = 0; h < G; ++h) {
        for (int64_t i = 0; i < D; ++i) acc[h * D + i] *= inv[h];
        row_from_float(acc.data() + h * D, o + h * D, D);
      }
    }
  });
}

#if defined(__x86_64__) || defined(_M_X64)
// ---- AVX-512, fp32, head dim D = 16 * NV (NV = 4: D 64; NV = 8: D 128): query blocks ----
// The same task structure, but a task is (query block, kv head): up to kQB consecutive tokens of one
// request whose key_lens grow by one (a prefill chunk; a decode token is a block of one), times its G
// query heads -- the block's rows. Per row the arithmetic is a fixed function of that row's query and
// its keys/values (never of the block it shares), so the engine's batch invariance holds:
//   score[j] = scale * tree16(lanes of sum_i q[16 i + l] * k_j[16 i + l]) -- 16-lane FMA chains over
//     D, then a transposing reduction of 16 keys at once (keys in position groups 16c .. 16c + 15):
//     per key ((l, l + 2) + (l + 1, l + 3)) within each 128-bit chunk, then the chunks ((0 + 1) +
//     (2 + 3)); the same tree for every key and group;
//   softmax over [0, L): max (NaN skipped), exp512 of (s - max) over 16-lane steps then the masked
//     tail, lane sums reduced by _mm512_reduce_add_ps; out = (sum_j p_j v_j, j ascending, one FMA chain
//     per output lane) * (1 / sum).
// Scores: K rows read once per block and kv head, for all rows (L1-resident groups of 16). P V: V
// rows read once per 24 / NV rows (register tiles of RB rows x NV vectors), over the keys every row
// of the block sees; each row then finishes its own causal tail.
// (GCC 12 warns that _mm512_undefined_ps inside its own intrinsics is uninitialized: noise.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define FASTLM_PA512 __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw")))
// kAhead: K and V rows are prefetched into L2 this many 16-key groups ahead of the scores (V's for
// the P V pass after them); measured 1 thread, 64 decode rows x 300 keys from DRAM: none 10 GB/s of
// K/V, 1 group to L1 11, 2 groups to L2 14.8-18.2, 4: 15.5, 8: 14.0. The P V pass (whose V rows are
// then in L2) also prefetches the next task's K and V rows into L2, so memory stays busy through it:
// 12 layers of 64 decode rows x 150-600 keys, 1 thread: 13.0 -> 15.3-16.0 GB/s (plain read 28).
constexpr int kQB = 12, kAhead = 2;

// 16 vectors of 16 lanes -> one vector whose lane j is the tree sum of v[j].
FASTLM_PA512 inline __m512 reduce16x16(__m512* v) {
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  // a[i] per 128-bit chunk: [x0 + x2, y0 + y2, x1 + x3, y1 + y3] of keys x = 2i, y = 2i + 1
  for (int i = 0; i < 4; ++i) {
    const __m512d lo = _mm512_castps_pd(a[2 * i]), hi = _mm512_castps_pd(a[2 * i + 1]);
    b[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(lo, hi)), _mm512_castpd_ps(_mm512_unpackhi_pd(lo, hi)));
  }
  // b[i] per chunk: the chunk's sums of keys 4i .. 4i + 3
  for (int i = 0; i < 2; ++i)
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88),   // chunks 0, 2 of each
                         _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xdd));  // chunks 1, 3
  // c[i]: [keys 8i..8i+3 (chunks 0+1), (2+3); keys 8i+4..8i+7 (0+1), (2+3)]
  const __m512 lo = _mm512_shuffle_f32x4(c[0], c[1], 0x88), hi = _mm512_shuffle_f32x4(c[0], c[1], 0xdd);
  return _mm512_add_ps(lo, hi);
}

// s[0, n) = exp(s - m) in place; returns the sum.
FASTLM_PA512 inline float exp_sum512(float* s, float m, int64_t n) {
  const __m512 vm = _mm512_set1_ps(m);
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 e = exp512<false>(_mm512_sub_ps(_mm512_loadu_ps(s + i), vm));
    _mm512_storeu_ps(s + i, e);
    acc = _mm512_add_ps(acc, e);
  }
  if (i < n) {
    const __mmask16 k = __mmask16((1u << (n - i)) - 1);
    const __m512 e = exp512<false>(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + i), vm));
    _mm512_mask_storeu_ps(s + i, k, e);
    acc = _mm512_mask_add_ps(acc, k, acc, e);
  }
  return _mm512_reduce_add_ps(acc);
}

template <int NV>
FASTLM_PA512 void paged_block512(const float* kp, const float* vp, const int32_t* table, int64_t g, int64_t Hkv,
                                 int64_t bs, const float* qrows /* [R][16 NV] */, const int64_t* lens /* [R] */,
                                 int R, float scale, float* S /* [R][ld] */, int64_t ld, float* out /* [R][16 NV] */,
                                 std::vector<int64_t>& offs, const int64_t* next_offs, int64_t next_delta,
                                 int64_t next_n) {
  constexpr int D = 16 * NV, RB = 24 / NV;
  int64_t lmax = 0, lmin = INT64_MAX;
  for (int r = 0; r < R; ++r) lmax = std::max(lmax, lens[r]), lmin = std::min(lmin, lens[r]);
  // offs[j] = key j's row offset in either cache, block by block (no division per key)
  offs.resize(lmax);
  for (int64_t j = 0, b = 0; j < lmax; ++b)
    for (int64_t o = 0, base = (int64_t(table[b]) * Hkv + g) * bs * D; o < bs && j < lmax; ++o, ++j) offs[j] = base + o * D;
  const int64_t* off = offs.data();
  auto row_of = [off](const float* base, int64_t j) { return base + off[j]; };
  const __m512 vscale = _mm512_set1_ps(scale);
  // the first groups of K and V
  for (int64_t j = 0; j < std::min<int64_t>(lmax, 16 * kAhead); ++j)
    for (int i = 0; i < NV; ++i) {
      _mm_prefetch(reinterpret_cast<const char*>(row_of(kp, j) + 16 * i), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(row_of(vp, j) + 16 * i), _MM_HINT_T1);
    }
  // scores
  for (int64_t j0 = 0; j0 < lmax; j0 += 16) {
    const int nk = static_cast<int>(std::min<int64_t>(16, lmax - j0));
    const float* krow[16];
    for (int j = 0; j < nk; ++j) krow[j] = row_of(kp, j0 + j);
    // K and V rows kAhead groups on (other blocks when bs <= 16), into L2
    for (int64_t j = j0 + 16 * kAhead; j < std::min(lmax, j0 + 16 * kAhead + 16); ++j)
      for (int i = 0; i < NV; ++i) {
        _mm_prefetch(reinterpret_cast<const char*>(row_of(kp, j) + 16 * i), _MM_HINT_T1);
        _mm_prefetch(reinterpret_cast<const char*>(row_of(vp, j) + 16 * i), _MM_HINT_T1);
      }
    for (int r = 0; r < R; ++r) {
      __m512 q[NV];
      for (int i = 0; i < NV; ++i) q[i] = _mm512_loadu_ps(qrows + r * D + 16 * i);
      __m512 v[16];
      for (int j = 0; j < 16; ++j) {
        if (j >= nk) { v[j] = _mm512_setzero_ps(); continue; }
        __m512 a = _mm512_mul_ps(q[0], _mm512_loadu_ps(krow[j]));
        for (int i = 1; i < NV; ++i) a = _mm512_fmadd_ps(q[i], _mm512_loadu_ps(krow[j] + 16 * i), a);
        v[j] = a;
      }
      const __m512 sc = _mm512_mul_ps(reduce16x16(v), vscale);
      _mm512_mask_storeu_ps(S + r * ld + j0, nk == 16 ? __mmask16(0xffff) : __mmask16((1u << nk) - 1), sc);
    }
  }
  // softmax per row over its own keys
  float inv[kQB * 8];
  for (int r = 0; r < R; ++r) {
    float* s = S + r * ld;
    const int64_t L = lens[r];
    // max over the row, NaN skipped (vmaxps returns its second operand when either is NaN); exact
    __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    int64_t j = 0;
    for (; j + 16 <= L; j += 16) mx = _mm512_max_ps(_mm512_loadu_ps(s + j), mx);
    if (j < L) {
      const __mmask16 k = __mmask16((1u << (L - j)) - 1);
      mx = _mm512_mask_max_ps(mx, k, _mm512_maskz_loadu_ps(k, s + j), mx);
    }
    float m = _mm512_reduce_max_ps(mx);
    if (m == -std::numeric_limits<float>::infinity()) m = 0.f;   // all -inf (or NaN): exp gives 0 (NaN)
    inv[r] = 1.f / exp_sum512(s, m, L);
  }
  // P V: tiles of RB rows over the keys all of them see, then each row's own tail
  for (int r0 = 0; r0 < R; r0 += RB) {
    const int rb = std::min(RB, R - r0);
    __m512 acc[RB][NV];
    for (int r = 0; r < RB; ++r)
      for (int i = 0; i < NV; ++i) acc[r][i] = _mm512_setzero_ps();
    for (int64_t j = 0; j < lmin; ++j) {
      const float* vr = row_of(vp, j);
      if (r0 == 0 && j < next_n) {   // the next task's K and V rows, into L2 (see kAhead)
        const int64_t o = next_offs ? next_offs[j] : off[j] + next_delta;
        for (int i = 0; i < NV; ++i) {
          _mm_prefetch(reinterpret_cast<const char*>(kp + o + 16 * i), _MM_HINT_T1);
          _mm_prefetch(reinterpret_cast<const char*>(vp + o + 16 * i), _MM_HINT_T1);
        }
      }
      if (j + 16 * kAhead < lmax)
        for (int i = 0; i < NV; ++i)
          _mm_prefetch(reinterpret_cast<const char*>(row_of(vp, j + 16 * kAhead) + 16 * i), _MM_HINT_T0);
      __m512 vv[NV];
      for (int i = 0; i < NV; ++i) vv[i] = _mm512_loadu_ps(vr + 16 * i);
      for (int r = 0; r < RB; ++r) {
        if (r >= rb) break;
        const __m512 p = _mm512_set1_ps(S[(r0 + r) * ld + j]);
        for (int i = 0; i < NV; ++i) acc[r][i] = _mm512_fmadd_ps(p, vv[i], acc[r][i]);
      }
    }
    for (int r = 0; r < rb; ++r) {
      __m512 a[NV];
      for (int i = 0; i < NV; ++i) a[i] = acc[r][i];
      const float* srow = S + (r0 + r) * ld;
      for (int64_t j = lmin; j < lens[r0 + r]; ++j) {
        const float* vr = row_of(vp, j);
        const __m512 p = _mm512_set1_ps(srow[j]);
        for (int i = 0; i < NV; ++i) a[i] = _mm512_fmadd_ps(p, _mm512_loadu_ps(vr + 16 * i), a[i]);
      }
      const __m512 w = _mm512_set1_ps(inv[r0 + r]);
      for (int i = 0; i < NV; ++i) _mm512_storeu_ps(out + (r0 + r) * D + 16 * i, _mm512_mul_ps(a[i], w));
    }
  }
}

// The fp32 AVX-512 path over all tokens: blocks of consecutive tokens (same request, key_lens + 1
// each), tasks (block, kv head).
void paged_attention512(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc, const int32_t* bt,
                        const int32_t* seq, const int32_t* lens, float scale, const Dims& d, at::Tensor& out) {
  std::vector<int64_t> starts;
  for (int64_t t = 0; t < d.T; ++t) {
    const bool cont = t > 0 && t - starts.back() < kQB && seq[t] == seq[t - 1] && lens[t] == lens[t - 1] + 1 &&
                      lens[t - 1] > 0;
    if (!cont) starts.push_back(t);
  }
  const int64_t nblk = static_cast<int64_t>(starts.size());
  starts.push_back(d.T);
  const float* qp = q.data_ptr<float>();
  const float* kp = kc.data_ptr<float>();
  const float* vp = vc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t q_row = q.stride(0), q_head = q.stride(1), D = d.D, G = d.G, Hkv = d.Hkv;
  // the rows of task `task` (its block's longest key range) as offsets into either cache
  auto task_offsets = [&](int64_t task, std::vector<int64_t>& out) {
    const int64_t b = task / Hkv, g = task % Hkv;
    int64_t n = 0;
    for (int64_t t = starts[b]; t < starts[b + 1]; ++t) n = std::max<int64_t>(n, lens[t]);
    const int32_t* table = bt + int64_t(seq[starts[b]]) * d.max_blocks;
    out.resize(n);
    for (int64_t j = 0, blk = 0; j < n; ++blk)
      for (int64_t r = 0, base = (int64_t(table[blk]) * Hkv + g) * d.bs * D; r < d.bs && j < n; ++r, ++j)
        out[j] = base + r * D;
  };
  at::parallel_for(0, nblk * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf, S, o;
    std::vector<int64_t> L, offs, next;
    for (int64_t task = begin; task < end; ++task) {
      // the next task: the same block's next kv head (its rows: these + bs * D, the same key count),
      // or another block's (offsets computed)
      const bool has_next = task + 1 < end;
      const bool same_block = has_next && (task + 1) / Hkv == task / Hkv;
      if (has_next && !same_block) task_offsets(task + 1, next);
      else next.clear();
      const int64_t b = task / Hkv, g = task % Hkv;
      const int64_t t0 = starts[b], nt = starts[b + 1] - t0;
      const int R = static_cast<int>(nt * G);
      qf.resize(R * D);
      L.resize(R);
      o.resize(R * D);
      int64_t lmax = 0;
      for (int64_t t = 0; t < nt; ++t)
        for (int64_t h = 0; h < G; ++h) {
          const int64_t r = t * G + h;
          std::copy_n(qp + (t0 + t) * q_row + (g * G + h) * q_head, D, qf.data() + r * D);
          L[r] = lens[t0 + t];
          lmax = std::max(lmax, L[r]);
        }
      const int64_t ld = (lmax + 15) / 16 * 16;
      S.resize(R * ld);
      const int32_t* table = bt + int64_t(seq[t0]) * d.max_blocks;
      if (lmax == 0) std::fill(o.begin(), o.end(), 0.f);
      else if (D == 64) paged_block512<4>(kp, vp, table, g, Hkv, d.bs, qf.data(), L.data(), R, scale, S.data(), ld, o.data(),
                                   offs, same_block ? nullptr : next.data(), d.bs * D,
                                   same_block ? lmax : static_cast<int64_t>(next.size()));
      else paged_block512<8>(kp, vp, table, g, Hkv, d.bs, qf.data(), L.data(), R, scale, S.data(), ld, o.data(),
                                   offs, same_block ? nullptr : next.data(), d.bs * D,
                                   same_block ? lmax : static_cast<int64_t>(next.size()));
      for (int64_t t = 0; t < nt; ++t)
        for (int64_t h = 0; h < G; ++h)
          std::copy_n(o.data() + (t * G + h) * D, D, op + (t0 + t) * d.H * D + (g * G + h) * D);
    }
  });
}
#pragma GCC diagnostic pop
#endif

void check_cache(const at::Tensor& c, const at::Tensor& like, const char* op, const char* name) {
  FASTLM_CHECK(c.dim() == 4, op, name, " must be (num_blocks, Hkv, block_size, D), got ", c.dim(), "-D");
  FASTLM_CHECK(c.is_contiguous(), op, name, " must be contiguous");
  check_same(c, like, op, name);
}

void check_int32(const at::Tensor& t, int64_t dim, const char* op, const char* name) {
  FASTLM_CHECK(t.scalar_type() == at::kInt, op, name, " must be int32, got ", t.scalar_type());
  FASTLM_CHECK(t.dim() == dim, op, name, " must be ", dim, "-D, got ", t.dim(), "-D");
  FASTLM_CHECK(t.is_contiguous(), op, name, " must be contiguous");
  FASTLM_CHECK(t.device().is_cpu(), op, name, " must be on the CPU");
}

at::Tensor paged_attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                   const at::Tensor& block_tables, const at::Tensor& seq_index,
                                   const at::Tensor& key_lens, double scale) {
  FASTLM_CHECK(q.dim() == 3, kAttn, "query must be (T, H, D), got ", q.dim(), "-D");
  FASTLM_CHECK(is_float_type(q.scalar_type()), kAttn, "query must be float32, float16 or bfloat16, got ",
               q.scalar_type());
  FASTLM_CHECK(q.size(2) <= 1 || q.stride(2) == 1, kAttn, "query must be contiguous in its last dimension");
  check_cache(k_cache, q, kAttn, "k_cache");
  check_cache(v_cache, q, kAttn, "v_cache");
  FASTLM_CHECK(v_cache.sizes() == k_cache.sizes(), kAttn, "v_cache has shape ", v_cache.sizes(), ", k_cache ",
               k_cache.sizes());
  check_int32(block_tables, 2, kAttn, "block_tables");
  check_int32(seq_index, 1, kAttn, "seq_index");
  check_int32(key_lens, 1, kAttn, "key_lens");
  Dims d;
  d.T = q.size(0);
  d.H = q.size(1);
  d.D = q.size(2);
  d.nblocks = k_cache.size(0);
  d.Hkv = k_cache.size(1);
  d.bs = k_cache.size(2);
  d.R = block_tables.size(0);
  d.max_blocks = block_tables.size(1);
  FASTLM_CHECK(k_cache.size(3) == d.D, kAttn, "k_cache has head dim ", k_cache.size(3), ", query ", d.D);
  FASTLM_CHECK(d.Hkv > 0 && d.H % d.Hkv == 0, kAttn, "query heads (", d.H, ") must be a multiple of cache heads (",
               d.Hkv, ")");
  FASTLM_CHECK(d.bs > 0, kAttn, "block_size must be positive");
  FASTLM_CHECK(seq_index.size(0) == d.T && key_lens.size(0) == d.T, kAttn,
               "seq_index and key_lens must have shape (", d.T, ",)");
  d.G = d.H / d.Hkv;
  const int32_t* bt = block_tables.data_ptr<int32_t>();
  const int32_t* seq = seq_index.data_ptr<int32_t>();
  const int32_t* lens = key_lens.data_ptr<int32_t>();
  // Every block a task will read is checked here, before any thread runs: no read out of bounds.
  for (int64_t t = 0; t < d.T; ++t) {
    FASTLM_CHECK(seq[t] >= 0 && seq[t] < d.R, kAttn, "seq_index[", t, "] = ", seq[t], " outside [0, ", d.R, ")");
    FASTLM_CHECK(lens[t] >= 0 && lens[t] <= d.max_blocks * d.bs, kAttn, "key_lens[", t, "] = ", lens[t],
                 " outside [0, ", d.max_blocks * d.bs, "] (block_tables holds ", d.max_blocks, " blocks of ", d.bs, ")");
    const int64_t nb = (int64_t(lens[t]) + d.bs - 1) / d.bs;
    for (int64_t b = 0; b < nb; ++b) {
      const int32_t blk = bt[int64_t(seq[t]) * d.max_blocks + b];
      FASTLM_CHECK(blk >= 0 && blk < d.nblocks, kAttn, "block_tables[", seq[t], "][", b, "] = ", blk,
                   " outside [0, ", d.nblocks, ")");
    }
  }
  at::Tensor out = new_output({d.T, d.H, d.D}, q.options());
  if (out.numel() == 0) return out;
#if defined(__x86_64__) || defined(_M_X64)
  if (q.scalar_type() == at::kFloat && (d.D == 64 || d.D == 128) && d.G <= 8 && cpu_use_avx512()) {
    paged_attention512(q, k_cache, v_cache, bt, seq, lens, static_cast<float>(scale), d, out);
    return out;
  }
#endif
  FASTLM_DISPATCH_FLOAT_TYPES(q.scalar_type(), kAttn, [&] {
    paged_attention_kernel<scalar_t>(q, k_cache, v_cache, bt, seq, lens, static_cast<float>(scale), d, out);
  });
  return out;
}

// k_cache[slot / bs, :, slot % bs, :] = key[t] for every t with slots[t] >= 0 (-1: padding, skipped).
void paged_kv_write_cpu(const at::Tensor& key, const at::Tensor& value, const at::Tensor& k_cache,
                        const at::Tensor& v_cache, const at::Tensor& slots) {
  FASTLM_CHECK(key.dim() == 3, kWrite, "key must be (T, Hkv, D), got ", key.dim(), "-D");
  FASTLM_CHECK(value.sizes() == key.sizes(), kWrite, "value has shape ", value.sizes(), ", key ", key.sizes());
  FASTLM_CHECK(is_float_type(key.scalar_type()), kWrite, "key must be float32, float16 or bfloat16");
  check_same(value, key, kWrite, "value");
  check_cache(k_cache, key, kWrite, "k_cache");
  check_cache(v_cache, key, kWrite, "v_cache");
  FASTLM_CHECK(v_cache.sizes() == k_cache.sizes(), kWrite, "v_cache has shape ", v_cache.sizes(), ", k_cache ",
               k_cache.sizes());
  FASTLM_CHECK(slots.scalar_type() == at::kLong && slots.dim() == 1 && slots.is_contiguous() && slots.device().is_cpu(),
               kWrite, "slots must be a contiguous 1-D int64 CPU tensor");
  const int64_t T = key.size(0), Hkv = key.size(1), D = key.size(2);
  FASTLM_CHECK(slots.size(0) == T, kWrite, "slots has ", slots.size(0), " entries, key ", T, " rows");
  FASTLM_CHECK(k_cache.size(1) == Hkv && k_cache.size(3) == D, kWrite, "k_cache (", k_cache.sizes(),
               ") does not hold key heads/dim (", Hkv, ", ", D, ")");
  const int64_t bs = k_cache.size(2), cap = k_cache.size(0) * bs;
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    FASTLM_CHECK(sp[t] >= -1 && sp[t] < cap, kWrite, "slots[", t, "] = ", sp[t], " outside [-1, ", cap, ")");
  FASTLM_DISPATCH_FLOAT_TYPES(key.scalar_type(), kWrite, [&] {
    const scalar_t* kp = key.data_ptr<scalar_t>();
    const scalar_t* vp = value.data_ptr<scalar_t>();
    scalar_t* kd = k_cache.data_ptr<scalar_t>();
    scalar_t* vd = v_cache.data_ptr<scalar_t>();
    const int64_t ks0 = key.stride(0), ks1 = key.stride(1), ks2 = key.stride(2);
    const int64_t vs0 = value.stride(0), vs1 = value.stride(1), vs2 = value.stride(2);
    at::parallel_for(0, T * Hkv, 64, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const int64_t t = i / Hkv, h = i % Hkv;
        if (sp[t] < 0) continue;
        const int64_t dst = ((sp[t] / bs * Hkv + h) * bs + sp[t] % bs) * D;
        for (int64_t x = 0; x < D; ++x) {
          kd[dst + x] = kp[t * ks0 + h * ks1 + x * ks2];
          vd[dst + x] = vp[t * vs0 + h * vs1 + x * vs2];
        }
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlm_C, CPU, m) {
  m.impl("paged_attention_fwd", &paged_attention_fwd_cpu);
  m.impl("paged_kv_write", &paged_kv_write_cpu);
}

}  // namespace fastlm::cpu

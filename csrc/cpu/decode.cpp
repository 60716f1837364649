// Decode attention over a KV cache on the CPU: one query token per row, ragged cache lengths, GQA.
//
// Work split (flash-decoding): each (row b, kv head, chunk of the cache) is one task of
// at::parallel_for. A task reads its K rows once for all the G = H / Hkv query heads that share the
// kv head (GQA), computes the G x chunk scaled scores into an fp32 scratch, takes a softmax with its
// own max, and accumulates exp(s - m) * V in fp32. It leaves (m, l, acc) per query head; the chunks
// of a head are then merged by logsumexp (fastlm::softmax_merge, the same code the CUDA kernel runs)
// and divided by l. The number of chunks grows only when (B * Hkv) tasks cannot keep every thread busy.
// fp32 on AVX-512 with D % 16 == 0 (GPT-2's 64, 128, ...) runs decode_task_avx512: scores of 16 keys
// at a time reduced together (sum16), the softmax's exp vectorized (exp512), the V accumulator in
// registers (measured here, 1 x 12 heads x 1024 x 64: 84 -> 41 us; torch's SDPA 73 us). Other dtypes
// and head dims: the generic at::vec task.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "common.h"
#include "cpu/decode_parallel.h"
#include "cpu/exp512.h"
#include "cpu/vec_utils.h"
#include "decode_math.h"

namespace fastlm::cpu {
namespace {

constexpr const char* kOp = "decode_attention_fwd";

inline float dot(const float* a, const float* b, int64_t n) {
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

// acc[i] += p * v[i]
inline void axpy(float p, const float* v, float* acc, int64_t n) {
  const int64_t V = fVec::size();
  const fVec vp(p);
  int64_t i = 0;
  for (; i + V <= n; i += V) at::vec::fmadd(vp, fVec::loadu(v + i), fVec::loadu(acc + i)).store(acc + i);
  for (; i < n; ++i) acc[i] += p * v[i];
}

#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define FASTLM_AVX512 __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw")))
// 16 vectors (one per key, each holding 16 partial products of that key's score) -> one vector of
// the 16 scores (key i in lane i): pairs interleaved and added within 128-bit blocks, then blocks
// shuffled and added (45 operations for 16 keys instead of 16 horizontal reductions).
FASTLM_AVX512 inline __m512 sum16(const __m512* v) {
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)  // per block: (x0+x2, y0+y2, x1+x3, y1+y3)
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)  // per block: the block's sum of keys 4i..4i+3
    b[i] = _mm512_add_ps(_mm512_shuffle_ps(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  for (int i = 0; i < 2; ++i)  // blocks (0+1, 2+3) of b[2i] then of b[2i+1]
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// One task of the fp32 kernel below on AVX-512, for D a multiple of 16 up to 256: scores of 16 keys
// at a time per query head (their K rows, 16 x D, stay in L1 across the G heads), the softmax with
// exp512 (NaN propagates), then acc = sum_s p_s V_s with the D-wide accumulator in registers.
// q: G x D, already scaled; scores: G x n scratch; acc: G x D out (unnormalized).
FASTLM_AVX512 void decode_task_avx512(const float* q, int64_t G, int64_t D, const float* kbase, int64_t sks,
                                      const float* vbase, int64_t svs, int64_t n, float* scores, float* m_out,
                                      float* l_out, float* acc) {
  const int64_t V = D / 16;
  int64_t s = 0;
  for (; s + 16 <= n; s += 16) {
    for (int64_t g = 0; g < G; ++g) {
      const float* qg = q + g * D;
      __m512 part[16];
      for (int i = 0; i < 16; ++i) {
        const float* kr = kbase + (s + i) * sks;
        __m512 a0 = _mm512_mul_ps(_mm512_loadu_ps(qg), _mm512_loadu_ps(kr));
        for (int64_t v = 1; v < V; ++v) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(qg + 16 * v), _mm512_loadu_ps(kr + 16 * v), a0);
        part[i] = a0;
      }
      _mm512_storeu_ps(scores + g * n + s, sum16(part));
    }
  }
  for (; s < n; ++s) {
    const float* kr = kbase + s * sks;
    for (int64_t g = 0; g < G; ++g) {
      const float* qg = q + g * D;
      __m512 a0 = _mm512_mul_ps(_mm512_loadu_ps(qg), _mm512_loadu_ps(kr));
      for (int64_t v = 1; v < V; ++v) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(qg + 16 * v), _mm512_loadu_ps(kr + 16 * v), a0);
      scores[g * n + s] = _mm512_reduce_add_ps(a0);
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    float* sc = scores + g * n;
    __m512 vm = _mm512_set1_ps(-INFINITY);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) vm = _mm512_max_ps(vm, _mm512_loadu_ps(sc + i));
    float m = _mm512_reduce_max_ps(vm);
    for (; i < n; ++i) m = std::max(m, sc[i]);
    const __m512 mv = _mm512_set1_ps(m);
    __m512 vl = _mm512_setzero_ps();
    for (i = 0; i < n; i += 16) {
      const __mmask16 k = n - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - i)) - 1);
      const __m512 e = exp512<false>(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, sc + i), mv));
      _mm512_mask_storeu_ps(sc + i, k, e);
      vl = _mm512_add_ps(vl, _mm512_maskz_mov_ps(k, e));
    }
    m_out[g] = m;
    l_out[g] = _mm512_reduce_add_ps(vl);
    __m512 o[16];
    for (int64_t v = 0; v < V; ++v) o[v] = _mm512_setzero_ps();
    for (int64_t t = 0; t < n; ++t) {
      const __m512 p = _mm512_set1_ps(sc[t]);
      const float* vr = vbase + t * svs;
      for (int64_t v = 0; v < V; ++v) o[v] = _mm512_fmadd_ps(p, _mm512_loadu_ps(vr + 16 * v), o[v]);
    }
    for (int64_t v = 0; v < V; ++v) _mm512_storeu_ps(acc + g * D + 16 * v, o[v]);
  }
}
#undef FASTLM_AVX512
#pragma GCC diagnostic pop
#endif

template <typename T>
void decode_attention_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const std::vector<int64_t>& lens, float scale, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t Hkv = k.size(1), G = H / Hkv;
  const int64_t max_len = lens.empty() ? 0 : *std::max_element(lens.begin(), lens.end());
  const int64_t threads = at::get_num_threads();
  // At least 16 parallel units whatever the thread count: up to 8 threads the split (and so every
  // bit of the result) does not depend on it (generate() switches the count between decode steps).
  const int64_t splits = decode_num_splits(B * Hkv, max_len, std::max<int64_t>(2 * threads, 16), 64);
  const int64_t chunk = std::max<int64_t>(1, (max_len + splits - 1) / splits);
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const int64_t sqb = q.stride(0), sqh = q.stride(1);
  const int64_t skb = k.stride(0), skh = k.stride(1), sks = k.stride(2);
  const int64_t svb = v.stride(0), svh = v.stride(1), svs = v.stride(2);
  // Per (b, kv head, split, g): m, l and an unnormalized fp32 accumulator of D.
  const int64_t tasks = B * Hkv * splits;
  // fp32 on AVX-512 with D % 16 == 0: the vectorized task (decode_task_avx512)
  const bool fast = std::is_same_v<T, float> && cpu_use_avx512() && D % 16 == 0 && D <= 256;
  std::vector<float> part_m(tasks * G), part_l(tasks * G), part_acc(tasks * G * D);

  parallel_range(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), kf(D), vf(D), scores;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t split = t % splits, bh = t / splits, kvh = bh % Hkv, b = bh / Hkv;
      const int64_t s0 = std::min(split * chunk, lens[b]), s1 = std::min(s0 + chunk, lens[b]);
      const int64_t n = s1 - s0;
      float* m_out = part_m.data() + t * G;
      float* l_out = part_l.data() + t * G;
      float* acc = part_acc.data() + t * G * D;
      std::fill(acc, acc + G * D, 0.f);
      if (n <= 0) {
        std::fill(m_out, m_out + G, -INFINITY);
        std::fill(l_out, l_out + G, 0.f);
        continue;
      }
      for (int64_t g = 0; g < G; ++g) {
        row_to_float(qp + b * sqb + (kvh * G + g) * sqh, qf.data() + g * D, D);
        for (int64_t i = 0; i < D; ++i) qf[g * D + i] *= scale;  // scale folded into q once
      }
      scores.resize(G * n);
#if defined(__x86_64__) || defined(_M_X64)
      if constexpr (std::is_same_v<T, float>) {
        if (fast) {
          decode_task_avx512(qf.data(), G, D, kp + b * skb + kvh * skh + s0 * sks, sks,
                             vp + b * svb + kvh * svh + s0 * svs, svs, n, scores.data(), m_out, l_out, acc);
          continue;
        }
      }
#endif
      const T* kbase = kp + b * skb + kvh * skh;
      for (int64_t s = 0; s < n; ++s) {  // each K row is read once for all G heads
        const float* krow;
        if constexpr (std::is_same_v<T, float>) {
          krow = kbase + (s0 + s) * sks;
        } else {
          row_to_float(kbase + (s0 + s) * sks, kf.data(), D);
          krow = kf.data();
        }
        for (int64_t g = 0; g < G; ++g) scores[g * n + s] = dot(qf.data() + g * D, krow, D);
      }
      for (int64_t g = 0; g < G; ++g) {
        float* sc = scores.data() + g * n;
        float m = -INFINITY;
        for (int64_t s = 0; s < n; ++s) m = std::max(m, sc[s]);
        float l = 0.f;
        for (int64_t s = 0; s < n; ++s) {
          sc[s] = std::exp(sc[s] - m);
          l += sc[s];
        }
        m_out[g] = m;
        l_out[g] = l;
      }
      const T* vbase = vp + b * svb + kvh * svh;
      for (int64_t s = 0; s < n; ++s) {  // each V row is read once for all G heads
        const float* vrow;
        if constexpr (std::is_same_v<T, float>) {
          vrow = vbase + (s0 + s) * svs;
        } else {
          row_to_float(vbase + (s0 + s) * svs, vf.data(), D);
          vrow = vf.data();
        }
        for (int64_t g = 0; g < G; ++g) axpy(scores[g * n + s], vrow, acc + g * D, D);
      }
    }
  });

  // Merge the splits of every (b, h) by logsumexp and normalize.
  T* op = out.data_ptr<T>();
  parallel_range(0, B * H, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> o(D);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H, kvh = h / G, g = h % G;
      const int64_t t0 = (b * Hkv + kvh) * splits;
      float m = -INFINITY, l = 0.f;
      std::fill(o.begin(), o.end(), 0.f);
      for (int64_t sp = 0; sp < splits; ++sp) {
        const int64_t t = t0 + sp;
        float alpha, beta;
        softmax_merge(m, l, part_m[t * G + g], part_l[t * G + g], alpha, beta);
        const float* a = part_acc.data() + (t * G + g) * D;
        for (int64_t i = 0; i < D; ++i) o[i] = alpha * o[i] + beta * a[i];
      }
      const float inv = l > 0.f ? 1.f / l : 0.f;  // an empty row (length 0) gives zeros
      for (int64_t i = 0; i < D; ++i) o[i] *= inv;
      row_from_float(o.data(), op + b * H * D + h * D, D);
    }
  });
}

at::Tensor decode_attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                    const at::Tensor& cache_seqlens, double scale) {
  FASTLM_CHECK(q.dim() == 3, kOp, "query must be (B, H, D), got ", q.sizes());
  FASTLM_CHECK(k_cache.dim() == 4, kOp, "key_cache must be (B, Hkv, S_max, D), got ", k_cache.sizes());
  FASTLM_CHECK(is_float_type(q.scalar_type()), kOp, "query must be float32, float16 or bfloat16");
  check_same_shape(v_cache, k_cache, kOp, "value_cache");
  check_same(k_cache, q, kOp, "key_cache");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  FASTLM_CHECK(k_cache.size(0) == B, kOp, "key_cache batch ", k_cache.size(0), " != query batch ", B);
  FASTLM_CHECK(k_cache.size(3) == D, kOp, "key_cache head dim ", k_cache.size(3), " != query head dim ", D);
  const int64_t Hkv = k_cache.size(1), S = k_cache.size(2);
  FASTLM_CHECK(Hkv > 0 && H % Hkv == 0, kOp, "query heads ", H, " must be a multiple of kv heads ", Hkv);
  FASTLM_CHECK(q.stride(2) == 1 && k_cache.stride(3) == 1 && v_cache.stride(3) == 1, kOp,
               "query and caches must be contiguous in the head dim");
  FASTLM_CHECK(cache_seqlens.dim() == 1 && cache_seqlens.size(0) == B, kOp, "cache_seqlens must be (", B,
               ",), got ", cache_seqlens.sizes());
  FASTLM_CHECK(cache_seqlens.scalar_type() == at::kInt || cache_seqlens.scalar_type() == at::kLong, kOp,
               "cache_seqlens must be int32 or int64");
  FASTLM_CHECK(cache_seqlens.device() == q.device(), kOp, "cache_seqlens must be on ", q.device());
  std::vector<int64_t> lens(B);
  auto sl = cache_seqlens.to(at::kLong).contiguous();
  const int64_t* lp = sl.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    FASTLM_CHECK(lp[b] >= 0 && lp[b] <= S, kOp, "cache_seqlens[", b, "] = ", lp[b], " is outside [0, S_max=", S, "]");
    lens[b] = lp[b];
  }
  auto qc = q.contiguous();
  at::Tensor out = new_output({B, H, D}, q.options());
  if (out.numel() == 0) return out;
  FASTLM_DISPATCH_FLOAT_TYPES(q.scalar_type(), kOp, [&] {
    decode_attention_kernel<scalar_t>(qc, k_cache, v_cache, lens, static_cast<float>(scale), out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlm_C, CPU, m) { m.impl("decode_attention_fwd", &decode_attention_fwd_cpu); }

}  // namespace fastlm::cpu

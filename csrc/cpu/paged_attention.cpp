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
// sizes. Portable at::vec (AVX2 in this build, NEON/scalar elsewhere): no ISA-specific code.
// NaN in a query/key/value gives NaN in that row (the max skips NaN, exp(NaN) propagates); a token
// with key_lens = 0 gets zeros.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "common.h"
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

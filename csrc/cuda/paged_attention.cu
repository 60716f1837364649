// Paged attention on CUDA: the serving engine's attention over a block-paged KV cache (decode tokens
// and chunked-prefill tokens alike), and its cache write. The paging follows vLLM's PagedAttention
// (Kwon et al., "Efficient Memory Management for LLM Serving with PagedAttention", 2023), the key
// split flash-decoding (Dao et al., 2023); the warp layout is decode.cu's. Written for fastlm.
//
// Cache layout, per layer: k_cache, v_cache (num_blocks, Hkv, block_size, D); token t reads block-table
// row seq_index[t] and attends to its positions [0, key_lens[t]); position j sits in block
// block_tables[row][j / block_size], row j % block_size. Keys and values are read in place through
// the table (no gather copy). A prefill chunk's tokens are simply more tokens, each with its own
// key_lens (position + 1).
//
// Kernels:
// - paged_attention_fwd_kernel: one CTA (4 warps) per (query token, kv head, head chunk, key split).
//   It takes GT query heads of one kv head (all G = H / Hkv of them when G <= 8), so every K and V row
//   is read once for the GT heads. Lanes form groups of LPR lanes; a group holds one key row (LPR lanes
//   x VPL vectors of VEC elements cover the head dim) and warps stride through the split's keys. Each
//   group keeps an online softmax (running max m, sum l, fp32 accumulator) per head; groups are merged
//   with xor shuffles, warps through shared memory (fastlm::softmax_merge, the code the CPU decode
//   kernel runs). Without a split the CTA writes the normalized output; with one, the split's
//   normalized output and logsumexp go to fp32 scratch.
// - paged_attention_merge_kernel: one CTA per (token, query head) combines the splits by logsumexp.
// - paged_kv_write_kernel: one CTA per token copies its Hkv x D key and value rows to the slot.
// The split is chosen on the host from shapes only (paged_attention_plan): while the (token, kv head,
// head chunk) CTAs are fewer than 4 per SM, the keys of the longest context the table allows are cut
// into up to 128 splits of >= 128 keys; each token then splits its own key_lens evenly, so a short
// context leaves the later splits empty (they exit at once). G > 8 takes ceil(G / 8) head chunks (K/V
// read again, mostly from L2). Registers bound the heads per CTA: with GT = 8 the kernel takes ~255
// registers (2 CTAs per SM; ptxas -v, sm_90): the first thing to tune once it is measured on a GPU.
//
// Numerics: every load is widened to fp32 and accumulated in fp32; scores are (q . k) * scale.
// A token with key_lens = 0 gets zeros. NaN in a query, key or value gives NaN in that head's output
// (NaN * 0 keeps it through the rescaling). Device-side guards instead of host checks (no host read of
// device tensors, so the op can be graph-captured): a seq_index or key_lens outside the table gives the
// token NaN, a block id outside [0, num_blocks) makes that key's score NaN, and neither is ever read.
// The split count depends on the batch shape, so a token's result can differ in the last bits between
// batch sizes (the cpu backend is the batch-invariant one).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "cuda/paged_attention.h"
#include "cuda/vec_io.cuh"
#include "decode_math.h"

namespace fastlm::cuda {
namespace {

constexpr int kWarps = 4;                 // warps per attention CTA
constexpr int kThreads = kWarps * 32;
constexpr int kCtasPerSm = 4;             // 16 warps per SM in flight, as decode.cu
constexpr int kMinChunk = 128;            // the fewest keys a split takes: 32 per warp
constexpr int kMaxHeadsPerCta = 8;

struct PagedShape {
  int64_t sqt, sqh;                       // q strides (token, head); the head dim is contiguous
  int64_t nblocks;                        // num_blocks: block ids outside [0, nblocks) are never read
  int H, Hkv, G, D, bs, max_blocks, R;
  int head_chunks, splits, min_chunk;
  int lpr;                                // lanes per key row: a power of two <= 32
  float scale;
};

// VEC: elements per vector load (16 bytes, or 1 for the scalar path); VPL: vectors per lane
// (LPR * VPL * VEC >= D); GT: query heads per CTA.
template <typename T, int VEC, int VPL, int GT>
__global__ void __launch_bounds__(kThreads)
paged_attention_fwd_kernel(const T* __restrict__ q,             // (T, H, D), strides sqt, sqh, 1
                           const T* __restrict__ k_cache,       // (num_blocks, Hkv, bs, D) contiguous
                           const T* __restrict__ v_cache,       // same shape as k_cache
                           const int* __restrict__ block_tables,  // (R, max_blocks)
                           const int* __restrict__ seq_index,   // (T,) row of block_tables per token
                           const int* __restrict__ key_lens,    // (T,) keys each token attends to
                           T* __restrict__ out,                 // (T, H, D) contiguous; splits == 1
                           float* __restrict__ o_part,          // (T * H, splits, D); splits > 1
                           float* __restrict__ lse_part,        // (T * H, splits); splits > 1
                           PagedShape sh) {
  extern __shared__ float smem[];         // [kWarps][GT][D] accumulators, [kWarps][GT] m, [kWarps][GT] l
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t cta = blockIdx.x;
  const int hc = static_cast<int>(cta % sh.head_chunks);
  const int64_t token_kv = cta / sh.head_chunks;
  const int kvh = static_cast<int>(token_kv % sh.Hkv);
  const int64_t t = token_kv / sh.Hkv;
  const int split = blockIdx.y;
  const int h0 = kvh * sh.G + hc * GT;    // this CTA's first query head
  const int nh = min(GT, sh.G - hc * GT); // and how many it takes
  const int D = sh.D;

  const int row = seq_index[t];
  const int len = key_lens[t];
  // The host checked max_blocks * bs < 2^31 - 1024, so positions fit an int with room for the stride.
  const bool bad = row < 0 || row >= sh.R || len < 0 || len > sh.max_blocks * sh.bs;
  int start = 0, end = bad ? 0 : len;
  if (sh.splits > 1 && !bad) {
    // Split s takes keys [s * chunk, (s + 1) * chunk) of this token's own length; a short context
    // leaves the later splits empty rather than cutting it into tiny pieces.
    const int chunk = max((len + sh.splits - 1) / sh.splits, sh.min_chunk);
    const long long s0 = static_cast<long long>(split) * chunk;
    start = static_cast<int>(s0 < len ? s0 : len);
    end = min(start + chunk, len);
  }
  if (bad || start >= end) {
    // Nothing to read. Without a split: zeros (key_lens 0) or NaN (bad token). With one: an empty
    // split's lse is -inf (the merge skips it, its o_part is never read); a bad token's is NaN.
    const int64_t th0 = t * sh.H + h0;
    if (sh.splits == 1) {
      for (int idx = threadIdx.x; idx < nh * D; idx += kThreads)
        out[th0 * D + idx] = static_cast<T>(bad ? NAN : 0.f);
    } else if (threadIdx.x < nh) {
      lse_part[(th0 + threadIdx.x) * sh.splits + split] = bad ? NAN : -INFINITY;
    }
    return;  // the whole CTA: no __syncthreads is skipped by part of it
  }

  const int lpr = sh.lpr, rows = 32 / lpr;  // key rows per warp step
  const int group = lane / lpr, gl = lane % lpr;
  // Lane gl of a group holds the vectors i = 0..VPL-1 at head-dim offset (gl + i * lpr) * VEC. q stays
  // in its own dtype (half the registers of fp32 for fp16/bf16: they bound the heads a CTA can hold),
  // widened at each use; the scale multiplies the fp32 dot product, as in the reference.
  Pack<T, VEC> qp[GT][VPL];
  float acc[GT][VPL][VEC], m[GT], l[GT];
#pragma unroll
  for (int j = 0; j < GT; ++j) {
    m[j] = -INFINITY;
    l[j] = 0.f;
#pragma unroll
    for (int i = 0; i < VPL; ++i) {
      const int d0 = (gl + i * lpr) * VEC;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        qp[j][i].val[e] = static_cast<T>(0.f);  // heads past nh and slots past D stay 0 (never written)
        acc[j][i][e] = 0.f;
      }
      if (j < nh && d0 < D)
        qp[j][i] = *reinterpret_cast<const Pack<T, VEC>*>(q + t * sh.sqt + static_cast<int64_t>(h0 + j) * sh.sqh + d0);
    }
  }

  const int* table = block_tables + static_cast<int64_t>(row) * sh.max_blocks;
  const int64_t block_stride = static_cast<int64_t>(sh.Hkv) * sh.bs * D;
  const int64_t head_offset = static_cast<int64_t>(kvh) * sh.bs * D;
  // Every group of a warp runs the same number of steps (the shuffles need all 32 lanes); a row past
  // `end` is masked, not skipped.
  for (int s0 = start + warp * rows; s0 < end; s0 += kWarps * rows) {
    const int s = s0 + group;
    const bool valid = s < end;
    bool in_range = false;
    int64_t offset = 0;
    if (valid) {
      const int blk = table[s / sh.bs];
      in_range = blk >= 0 && blk < sh.nblocks;
      offset = static_cast<int64_t>(blk) * block_stride + head_offset + static_cast<int64_t>(s % sh.bs) * D;
    }
    // K and V both loaded before any math: two independent loads in flight per vector.
    float kf[VPL][VEC], vf[VPL][VEC];
#pragma unroll
    for (int i = 0; i < VPL; ++i) {
      const int d0 = (gl + i * lpr) * VEC;
#pragma unroll
      for (int e = 0; e < VEC; ++e) kf[i][e] = vf[i][e] = 0.f;
      if (in_range && d0 < D) {
        load_float<T, VEC>(k_cache + offset + d0, kf[i]);
        load_float<T, VEC>(v_cache + offset + d0, vf[i]);
      }
    }
    float dot[GT];
#pragma unroll
    for (int j = 0; j < GT; ++j) {
      dot[j] = 0.f;
#pragma unroll
      for (int i = 0; i < VPL; ++i)
#pragma unroll
        for (int e = 0; e < VEC; ++e) dot[j] += static_cast<float>(qp[j][i].val[e]) * kf[i][e];
    }
#pragma unroll
    for (int j = 0; j < GT; ++j)
      for (int off = lpr >> 1; off > 0; off >>= 1) dot[j] += __shfl_xor_sync(0xffffffffu, dot[j], off);
#pragma unroll
    for (int j = 0; j < GT; ++j) dot[j] *= sh.scale;
    if (valid) {
#pragma unroll
      for (int j = 0; j < GT; ++j) {
        const float score = in_range ? dot[j] : NAN;  // a bad block id poisons the head, nothing is read
        const float m_new = fmaxf(m[j], score);
        const float alpha = expf(m[j] - m_new);        // m = -inf on the first row: alpha = 0
        const float p = expf(score - m_new);
        l[j] = l[j] * alpha + p;
        m[j] = m_new;
#pragma unroll
        for (int i = 0; i < VPL; ++i)
#pragma unroll
          for (int e = 0; e < VEC; ++e) acc[j][i][e] = acc[j][i][e] * alpha + p * vf[i][e];
      }
    }
  }

  // Merge the groups of the warp (lanes with the same gl hold the same head-dim slots).
  for (int off = lpr; off < 32; off <<= 1) {
#pragma unroll
    for (int j = 0; j < GT; ++j) {
      const float m_o = __shfl_xor_sync(0xffffffffu, m[j], off);
      const float l_o = __shfl_xor_sync(0xffffffffu, l[j], off);
      float alpha, beta;
      softmax_merge(m[j], l[j], m_o, l_o, alpha, beta);
#pragma unroll
      for (int i = 0; i < VPL; ++i)
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const float a_o = __shfl_xor_sync(0xffffffffu, acc[j][i][e], off);
          acc[j][i][e] = alpha * acc[j][i][e] + beta * a_o;
        }
    }
  }

  // Then the warps, through shared memory: group 0 of each warp publishes its unnormalized state.
  float* acc_s = smem;
  float* m_s = smem + kWarps * GT * D;
  float* l_s = m_s + kWarps * GT;
  if (group == 0) {
#pragma unroll
    for (int j = 0; j < GT; ++j) {
#pragma unroll
      for (int i = 0; i < VPL; ++i) {
        const int d0 = (gl + i * lpr) * VEC;
#pragma unroll
        for (int e = 0; e < VEC; ++e)
          if (d0 + e < D) acc_s[(warp * GT + j) * D + d0 + e] = acc[j][i][e];
      }
      if (gl == 0) {
        m_s[warp * GT + j] = m[j];
        l_s[warp * GT + j] = l[j];
      }
    }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < nh * D; idx += kThreads) {
    const int j = idx / D, d = idx - j * D;
    float mm = m_s[j], ll = l_s[j], a = acc_s[j * D + d];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) {
      float alpha, beta;
      softmax_merge(mm, ll, m_s[w * GT + j], l_s[w * GT + j], alpha, beta);
      a = alpha * a + beta * acc_s[(w * GT + j) * D + d];
    }
    // A non-empty split has ll >= 1 (its max score has p = 1) or NaN; the ll == 0 branch is defensive,
    // and 0 * a there still keeps a NaN the accumulator may hold.
    const float o = ll == 0.f ? 0.f * a : a / ll;
    const int64_t th = t * sh.H + h0 + j;
    if (sh.splits == 1) {
      out[th * D + d] = static_cast<T>(o);
    } else {
      o_part[(th * sh.splits + split) * D + d] = o;
      if (d == 0) lse_part[th * sh.splits + split] = ll > 0.f ? mm + logf(ll) : (ll == 0.f ? -INFINITY : NAN);
    }
  }
}

// One CTA per (token, query head): out = sum_s exp(lse_s - max) o_s / sum_s exp(lse_s - max) over the
// non-empty splits (lse -inf: empty, skipped; o_part there is unwritten). A NaN lse (NaN scores, a bad
// token) gives NaN; no non-empty split (key_lens 0) gives zeros.
template <typename T>
__global__ void paged_attention_merge_kernel(const float* __restrict__ o_part, const float* __restrict__ lse_part,
                                             T* __restrict__ out, int splits, int D) {
  const int64_t th = blockIdx.x;
  const float* lse = lse_part + th * splits;
  float m = -INFINITY;
  bool has_nan = false;
  for (int s = 0; s < splits; ++s) {
    const float x = lse[s];
    has_nan |= isnan(x);
    m = fmaxf(m, x);
  }
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float o;
    if (has_nan) {
      o = NAN;
    } else if (m == -INFINITY) {
      o = 0.f;
    } else {
      float num = 0.f, den = 0.f;
      for (int s = 0; s < splits; ++s) {
        if (lse[s] == -INFINITY) continue;
        const float w = expf(lse[s] - m);
        num += w * o_part[(th * splits + s) * D + d];
        den += w;
      }
      o = num / den;  // den >= 1: the split holding the max has w = 1
    }
    out[th * D + d] = static_cast<T>(o);
  }
}

template <typename T, int VEC, int VPL, int GT>
void launch_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& tables,
                      const at::Tensor& seq, const at::Tensor& lens, const at::Tensor& o_part,
                      const at::Tensor& lse_part, const at::Tensor& out, PagedShape sh, cudaStream_t stream) {
  const int64_t ctas = q.size(0) * sh.Hkv * sh.head_chunks;
  const size_t smem = sizeof(float) * static_cast<size_t>(kWarps) * GT * (sh.D + 2);  // <= 33 KB (D 256, GT 8)
  const dim3 grid(static_cast<unsigned>(ctas), static_cast<unsigned>(sh.splits));
  paged_attention_fwd_kernel<T, VEC, VPL, GT><<<grid, kThreads, smem, stream>>>(
      reinterpret_cast<const T*>(q.data_ptr()), reinterpret_cast<const T*>(k.data_ptr()),
      reinterpret_cast<const T*>(v.data_ptr()), tables.data_ptr<int>(), seq.data_ptr<int>(), lens.data_ptr<int>(),
      reinterpret_cast<T*>(out.data_ptr()), sh.splits > 1 ? o_part.data_ptr<float>() : nullptr,
      sh.splits > 1 ? lse_part.data_ptr<float>() : nullptr, sh);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int VEC, int VPL>
void launch_heads(int heads_per_cta, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& tables, const at::Tensor& seq, const at::Tensor& lens, const at::Tensor& o_part,
                  const at::Tensor& lse_part, const at::Tensor& out, PagedShape sh, cudaStream_t stream) {
  switch (heads_per_cta) {
    case 1:
      return launch_attention<T, VEC, VPL, 1>(q, k, v, tables, seq, lens, o_part, lse_part, out, sh, stream);
    case 2:
      return launch_attention<T, VEC, VPL, 2>(q, k, v, tables, seq, lens, o_part, lse_part, out, sh, stream);
    case 4:
      return launch_attention<T, VEC, VPL, 4>(q, k, v, tables, seq, lens, o_part, lse_part, out, sh, stream);
    default:
      return launch_attention<T, VEC, VPL, kMaxHeadsPerCta>(q, k, v, tables, seq, lens, o_part, lse_part, out, sh,
                                                            stream);
  }
}

// Whether t's data pointer and every stride but the last are multiples of 16 bytes.
bool aligned16(const at::Tensor& t) {
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  const int64_t per = 16 / static_cast<int64_t>(t.element_size());
  for (int64_t d = 0; d + 1 < t.dim(); ++d)
    if (t.size(d) > 1 && t.stride(d) % per != 0) return false;
  return true;
}

int lanes_per_row(int64_t vectors) {
  int lpr = 1;
  while (lpr < 32 && lpr < vectors) lpr <<= 1;
  return lpr;
}

template <typename T>
void launch_typed(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& tables,
                  const at::Tensor& seq, const at::Tensor& lens, float scale, const PagedAttentionPlan& plan,
                  const at::Tensor& o_part, const at::Tensor& lse_part, const at::Tensor& out) {
  const int64_t T_ = q.size(0), H = q.size(1), D = q.size(2);
  PagedShape sh;
  sh.sqt = q.stride(0);
  sh.sqh = q.stride(1);
  sh.nblocks = k.size(0);
  sh.H = static_cast<int>(H);
  sh.Hkv = static_cast<int>(k.size(1));
  sh.G = static_cast<int>(H / k.size(1));
  sh.D = static_cast<int>(D);
  sh.bs = static_cast<int>(k.size(2));
  sh.max_blocks = static_cast<int>(tables.size(1));
  sh.R = static_cast<int>(tables.size(0));
  sh.head_chunks = plan.head_chunks;
  sh.splits = plan.splits;
  sh.min_chunk = plan.min_chunk;
  sh.scale = scale;
  auto stream = c10::cuda::getCurrentCUDAStream(q.device().index()).stream();
  constexpr int VEC = 16 / static_cast<int>(sizeof(T));
  const bool vec_ok = D % VEC == 0 && aligned16(q) && aligned16(k) && aligned16(v);
  if (vec_ok) {
    // 16-byte loads: fp32 needs two vectors per lane past D = 128; fp16/bf16 cover D <= 256 with one.
    sh.lpr = lanes_per_row(D / VEC);
    bool two_per_lane = false;
    if constexpr (VEC == 4) two_per_lane = D / VEC > sh.lpr;
    if (two_per_lane) {
      if constexpr (VEC == 4)
        launch_heads<T, VEC, 2>(plan.heads_per_cta, q, k, v, tables, seq, lens, o_part, lse_part, out, sh, stream);
    } else {
      launch_heads<T, VEC, 1>(plan.heads_per_cta, q, k, v, tables, seq, lens, o_part, lse_part, out, sh, stream);
    }
  } else {
    // Scalar loads (a head dim that is not a multiple of 16 bytes, or unaligned q): up to 8 per lane.
    sh.lpr = lanes_per_row(D);
    launch_heads<T, 1, 8>(plan.heads_per_cta, q, k, v, tables, seq, lens, o_part, lse_part, out, sh, stream);
  }
  if (plan.splits > 1) {
    const int threads = D >= 128 ? 128 : (D > 32 ? 64 : 32);
    paged_attention_merge_kernel<T><<<static_cast<unsigned>(T_ * H), threads, 0, stream>>>(
        o_part.data_ptr<float>(), lse_part.data_ptr<float>(), reinterpret_cast<T*>(out.data_ptr()), plan.splits,
        static_cast<int>(D));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// One CTA per token: its Hkv x D key and value elements, thread i taking elements i, i + 128, ...
// (consecutive threads write consecutive elements of a cache row). A slot outside [0, cap) is skipped.
template <typename T, typename I>
__global__ void paged_kv_write_kernel(const T* __restrict__ key,    // (T, Hkv, D), strides ks0, ks1, ks2
                                      const T* __restrict__ value,  // (T, Hkv, D), strides vs0, vs1, vs2
                                      T* __restrict__ k_cache,      // (num_blocks, Hkv, bs, D) contiguous
                                      T* __restrict__ v_cache,
                                      const I* __restrict__ slots,  // (T,) block * bs + row, -1: skip
                                      int64_t Hkv, int64_t D, int64_t bs, int64_t cap, int64_t ks0, int64_t ks1,
                                      int64_t ks2, int64_t vs0, int64_t vs1, int64_t vs2) {
  const int64_t t = blockIdx.x;
  const int64_t slot = static_cast<int64_t>(slots[t]);
  if (slot < 0 || slot >= cap) return;
  const int64_t blk = slot / bs, pos = slot % bs;
  for (int64_t i = threadIdx.x; i < Hkv * D; i += blockDim.x) {
    const int64_t h = i / D, d = i - h * D;
    const int64_t dst = ((blk * Hkv + h) * bs + pos) * D + d;
    k_cache[dst] = key[t * ks0 + h * ks1 + d * ks2];
    v_cache[dst] = value[t * vs0 + h * vs1 + d * vs2];
  }
}

template <typename T, typename I>
void launch_write(const at::Tensor& key, const at::Tensor& value, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const at::Tensor& slots) {
  const int64_t T_ = key.size(0), Hkv = key.size(1), D = key.size(2), bs = k_cache.size(2);
  auto stream = c10::cuda::getCurrentCUDAStream(key.device().index()).stream();
  paged_kv_write_kernel<T, I><<<static_cast<unsigned>(T_), 128, 0, stream>>>(
      reinterpret_cast<const T*>(key.data_ptr()), reinterpret_cast<const T*>(value.data_ptr()),
      reinterpret_cast<T*>(k_cache.data_ptr()), reinterpret_cast<T*>(v_cache.data_ptr()),
      reinterpret_cast<const I*>(slots.data_ptr()), Hkv, D, bs, k_cache.size(0) * bs, key.stride(0), key.stride(1),
      key.stride(2), value.stride(0), value.stride(1), value.stride(2));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_write_typed(const at::Tensor& key, const at::Tensor& value, const at::Tensor& k_cache,
                        const at::Tensor& v_cache, const at::Tensor& slots) {
  if (slots.scalar_type() == at::kLong)
    launch_write<T, int64_t>(key, value, k_cache, v_cache, slots);
  else
    launch_write<T, int32_t>(key, value, k_cache, v_cache, slots);
}

}  // namespace

PagedAttentionPlan paged_attention_plan(int64_t T, int64_t Hkv, int64_t G, int64_t max_keys, int device) {
  PagedAttentionPlan plan;
  plan.heads_per_cta = G <= 1 ? 1 : G <= 2 ? 2 : G <= 4 ? 4 : kMaxHeadsPerCta;
  plan.head_chunks = static_cast<int>((G + plan.heads_per_cta - 1) / plan.heads_per_cta);
  plan.min_chunk = kMinChunk;
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  // Split the keys only while the (token, kv head, head chunk) CTAs leave SMs idle, into chunks of at
  // least kMinChunk keys of the longest context the table allows (fastlm::decode_num_splits: <= 128).
  plan.splits = decode_num_splits(T * Hkv * plan.head_chunks, max_keys, static_cast<long long>(sms) * kCtasPerSm,
                                  kMinChunk);
  return plan;
}

void paged_attention_launch(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& block_tables, const at::Tensor& seq_index, const at::Tensor& key_lens,
                            float scale, const PagedAttentionPlan& plan, const at::Tensor& o_part,
                            const at::Tensor& lse_part, const at::Tensor& out) {
  switch (q.scalar_type()) {
    case at::kFloat:
      launch_typed<float>(q, k_cache, v_cache, block_tables, seq_index, key_lens, scale, plan, o_part, lse_part, out);
      break;
    case at::kHalf:
      launch_typed<c10::Half>(q, k_cache, v_cache, block_tables, seq_index, key_lens, scale, plan, o_part, lse_part,
                              out);
      break;
    case at::kBFloat16:
      launch_typed<c10::BFloat16>(q, k_cache, v_cache, block_tables, seq_index, key_lens, scale, plan, o_part,
                                  lse_part, out);
      break;
    default:
      TORCH_CHECK(false, "fastlm: paged_attention_fwd (cuda): unsupported dtype ", q.scalar_type());
  }
}

void paged_kv_write_launch(const at::Tensor& key, const at::Tensor& value, const at::Tensor& k_cache,
                           const at::Tensor& v_cache, const at::Tensor& slots) {
  switch (key.scalar_type()) {
    case at::kFloat:
      launch_write_typed<float>(key, value, k_cache, v_cache, slots);
      break;
    case at::kHalf:
      launch_write_typed<c10::Half>(key, value, k_cache, v_cache, slots);
      break;
    case at::kBFloat16:
      launch_write_typed<c10::BFloat16>(key, value, k_cache, v_cache, slots);
      break;
    default:
      TORCH_CHECK(false, "fastlm: paged_kv_write (cuda): unsupported dtype ", key.scalar_type());
  }
}

}  // namespace fastlm::cuda

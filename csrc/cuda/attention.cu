// Flash attention forward and backward, CUDA: a simple, bounds-checked tiled kernel (fp32 math for
// fp32/fp16/bf16 inputs), not yet a tensor-core kernel.
//
// Scheme (memory O(S), never S x S; logsumexp saved for the backward):
// - forward: a block of kRows warps handles kRows query rows of one (b, h); one warp per query row,
//   each lane holding D / 32 of its elements in registers. K/V tiles of kTile keys are staged in
//   shared memory (fp32) and shared by the block's warps; per key: a warp-reduced dot product, the
//   online-softmax update (running max m, sum l) and acc = acc * alpha + p * v. Key tiles past the
//   causal diagonal of the block's last row are not loaded.
// - backward: delta = rowsum(dO * O) (one warp per row); dQ: one warp per query row, recomputing
//   p = exp(s - lse) and dp = dO . v per key from shared K/V tiles; dK/dV: one warp per key row of one
//   (b, kv head), looping over the query heads of its GQA group and their rows (staged Q/dO tiles),
//   so each dK/dV row has exactly one writer (no atomics).
// Dropout bits come from cuda/attention_math.h, the same function the CPU kernel and tests run.
// TODO(perf): an mma.sync/wgmma tensor-core kernel for fp16/bf16 (sm80/sm90); this one is the
// correctness baseline and has not yet been run on a GPU.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "cuda/attention.h"
#include "cuda/attention_math.h"

namespace fastlm::cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kRows = 4;           // warps (rows) per block
constexpr int kTile = 16;          // keys (forward, dQ) or query rows (dK/dV) staged per tile
constexpr int kMaxD = 256;         // largest head dim
constexpr int kPerLane = kMaxD / kWarp;

struct Params {
  int64_t B, H, Hkv, Sq, Sk, D, Dv, group;
  int64_t qb, qh, qs, kb, kh, ks, vb, vh, vs;  // strides (last dims contiguous)
  int64_t mb, mh, mq, mk;                      // mask strides
  int64_t ob, oh, os;                          // strides of out / dout (bwd)
  int64_t db, dh, ds;
  float scale;
  bool causal;
  bool dropout;
  uint64_t seed, offset;
  uint32_t threshold;
  float inv_keep;
};

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

template <typename T>
__device__ __forceinline__ float to_f(T x) {
  return static_cast<float>(x);
}

__device__ __forceinline__ float neg_inf() { return -__int_as_float(0x7f800000); }

template <typename T>
__device__ __forceinline__ float mask_at(const T* mask, const Params& p, int64_t b, int64_t h, int64_t i, int64_t j) {
  return mask == nullptr ? 0.f : to_f(mask[b * p.mb + h * p.mh + i * p.mq + j * p.mk]);
}

// Stage rows [r0, r0 + kTile) of a (rows, X) slice (row stride rs) into shared fp32 (kTile x X).
template <typename T>
__device__ __forceinline__ void stage(float* dst, const T* src, int64_t rs, int64_t r0, int64_t rows, int64_t X) {
  for (int64_t idx = threadIdx.x; idx < kTile * X; idx += blockDim.x) {
    const int64_t r = idx / X, d = idx % X;
    dst[idx] = (r0 + r < rows) ? to_f(src[(r0 + r) * rs + d]) : 0.f;
  }
}

template <typename T>
__global__ void __launch_bounds__(kRows * kWarp) attn_fwd_kernel(const T* __restrict__ q, const T* __restrict__ k,
                                                                  const T* __restrict__ v, const T* __restrict__ mask,
                                                                  T* __restrict__ out, float* __restrict__ lse,
                                                                  Params p) {
  extern __shared__ float smem[];
  float* Ks = smem;                  // kTile x D
  float* Vs = smem + kTile * p.D;    // kTile x Dv
  const int64_t nblk = (p.Sq + kRows - 1) / kRows;
  const int64_t bh = blockIdx.x / nblk, blk = blockIdx.x % nblk;
  const int64_t b = bh / p.H, h = bh % p.H, hk = h / p.group;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t i = blk * kRows + warp;
  const bool row_ok = i < p.Sq;
  float qr[kPerLane], acc[kPerLane];
#pragma unroll
  for (int t = 0; t < kPerLane; ++t) {
    const int64_t d = lane + t * kWarp;
    qr[t] = (row_ok && d < p.D) ? to_f(q[b * p.qb + h * p.qh + i * p.qs + d]) * p.scale : 0.f;
    acc[t] = 0.f;
  }
  float m = neg_inf(), l = 0.f;
  const T* kbase = k + b * p.kb + hk * p.kh;
  const T* vbase = v + b * p.vb + hk * p.vh;
  const int64_t last_row = min(p.Sq, (blk + 1) * kRows) - 1;
  const int64_t kend = p.causal ? min(p.Sk, last_row + 1) : p.Sk;
  for (int64_t j0 = 0; j0 < kend; j0 += kTile) {
    __syncthreads();
    stage(Ks, kbase, p.ks, j0, p.Sk, p.D);
    stage(Vs, vbase, p.vs, j0, p.Sk, p.Dv);
    __syncthreads();
    if (!row_ok) continue;
    for (int jj = 0; jj < kTile; ++jj) {
      const int64_t j = j0 + jj;
      if (j >= p.Sk || (p.causal && j > i)) break;
      // The mask is read first (one value for the whole warp, so the branch is uniform): a masked key
      // (a key-padding mask's padded keys) costs no dot product.
      const float mv = mask_at(mask, p, b, h, i, j);
      if (mv == neg_inf()) continue;  // masked key: contributes nothing
      float s = 0.f;
#pragma unroll
      for (int t = 0; t < kPerLane; ++t) {
        const int64_t d = lane + t * kWarp;
        if (d < p.D) s += qr[t] * Ks[jj * p.D + d];
      }
      s = warp_sum(s) + mv;
      if (s == neg_inf()) continue;
      const float m_new = fmaxf(m, s);
      const float alpha = __expf(m - m_new);  // 0 when m was -inf
      float e = __expf(s - m_new);
      l = l * alpha + e;
      m = m_new;
      if (p.dropout) e = attention_dropout_keep(p.seed, p.offset, static_cast<uint32_t>(bh), static_cast<uint32_t>(i),
                                                static_cast<uint32_t>(j), p.threshold) ? e * p.inv_keep : 0.f;
#pragma unroll
      for (int t = 0; t < kPerLane; ++t) {
        const int64_t d = lane + t * kWarp;
        acc[t] = acc[t] * alpha + (d < p.Dv ? e * Vs[jj * p.Dv + d] : 0.f);
      }
    }
  }
  if (!row_ok) return;
  const float inv = l > 0.f ? 1.f / l : 0.f;
  T* orow = out + (bh * p.Sq + i) * p.Dv;
#pragma unroll
  for (int t = 0; t < kPerLane; ++t) {
    const int64_t d = lane + t * kWarp;
    if (d < p.Dv) orow[d] = static_cast<T>(acc[t] * inv);
  }
  if (lane == 0) lse[bh * p.Sq + i] = l > 0.f ? m + logf(l) : neg_inf();
}

// delta[b, h, i] = sum_d dout[b, h, i, d] * out[b, h, i, d]; one warp per row.
template <typename T>
__global__ void __launch_bounds__(kRows * kWarp) attn_delta_kernel(const T* __restrict__ dout, const T* __restrict__ out,
                                                                    float* __restrict__ delta, Params p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRows + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= p.B * p.H * p.Sq) return;
  const int64_t bh = row / p.Sq, i = row % p.Sq, b = bh / p.H, h = bh % p.H;
  const T* o = out + b * p.ob + h * p.oh + i * p.os;
  const T* g = dout + b * p.db + h * p.dh + i * p.ds;
  float s = 0.f;
  for (int64_t d = lane; d < p.Dv; d += kWarp) s += to_f(o[d]) * to_f(g[d]);
  s = warp_sum(s);
  if (lane == 0) delta[row] = s;
}

template <typename T>
__global__ void __launch_bounds__(kRows * kWarp) attn_bwd_dq_kernel(const T* __restrict__ q, const T* __restrict__ k,
                                                                     const T* __restrict__ v, const T* __restrict__ mask,
                                                                     const T* __restrict__ dout,
                                                                     const float* __restrict__ lse,
                                                                     const float* __restrict__ delta,
                                                                     T* __restrict__ dq, Params p) {
  extern __shared__ float smem[];
  float* Ks = smem;
  float* Vs = smem + kTile * p.D;
  const int64_t nblk = (p.Sq + kRows - 1) / kRows;
  const int64_t bh = blockIdx.x / nblk, blk = blockIdx.x % nblk;
  const int64_t b = bh / p.H, h = bh % p.H, hk = h / p.group;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t i = blk * kRows + warp;
  const bool row_ok = i < p.Sq;
  const float L = row_ok ? lse[bh * p.Sq + i] : neg_inf();
  const float dl = row_ok ? delta[bh * p.Sq + i] : 0.f;
  const bool live = row_ok && L != neg_inf();
  float qr[kPerLane], gr[kPerLane], acc[kPerLane];
#pragma unroll
  for (int t = 0; t < kPerLane; ++t) {
    const int64_t d = lane + t * kWarp;
    qr[t] = (row_ok && d < p.D) ? to_f(q[b * p.qb + h * p.qh + i * p.qs + d]) * p.scale : 0.f;
    gr[t] = (row_ok && d < p.Dv) ? to_f(dout[b * p.db + h * p.dh + i * p.ds + d]) : 0.f;
    acc[t] = 0.f;
  }
  const T* kbase = k + b * p.kb + hk * p.kh;
  const T* vbase = v + b * p.vb + hk * p.vh;
  const int64_t last_row = min(p.Sq, (blk + 1) * kRows) - 1;
  const int64_t kend = p.causal ? min(p.Sk, last_row + 1) : p.Sk;
  for (int64_t j0 = 0; j0 < kend; j0 += kTile) {
    __syncthreads();
    stage(Ks, kbase, p.ks, j0, p.Sk, p.D);
    stage(Vs, vbase, p.vs, j0, p.Sk, p.Dv);
    __syncthreads();
    if (!live) continue;
    for (int jj = 0; jj < kTile; ++jj) {
      const int64_t j = j0 + jj;
      if (j >= p.Sk || (p.causal && j > i)) break;
      const float mv = mask_at(mask, p, b, h, i, j);  // warp-uniform: masked keys skip the dots
      if (mv == neg_inf()) continue;
      float s = 0.f, dp = 0.f;
#pragma unroll
      for (int t = 0; t < kPerLane; ++t) {
        const int64_t d = lane + t * kWarp;
        if (d < p.D) s += qr[t] * Ks[jj * p.D + d];
        if (d < p.Dv) dp += gr[t] * Vs[jj * p.Dv + d];
      }
      s = warp_sum(s) + mv;
      dp = warp_sum(dp);
      if (s == neg_inf()) continue;
      const float pr = __expf(s - L);
      if (p.dropout) dp = attention_dropout_keep(p.seed, p.offset, static_cast<uint32_t>(bh), static_cast<uint32_t>(i),
                                                 static_cast<uint32_t>(j), p.threshold) ? dp * p.inv_keep : 0.f;
      const float ds = pr * (dp - dl);
#pragma unroll
      for (int t = 0; t < kPerLane; ++t) {
        const int64_t d = lane + t * kWarp;
        if (d < p.D) acc[t] += ds * Ks[jj * p.D + d];
      }
    }
  }
  if (!row_ok) return;
  T* row = dq + (bh * p.Sq + i) * p.D;
#pragma unroll
  for (int t = 0; t < kPerLane; ++t) {
    const int64_t d = lane + t * kWarp;
    if (d < p.D) row[d] = static_cast<T>(acc[t] * p.scale);
  }
}

template <typename T>
__global__ void __launch_bounds__(kRows * kWarp) attn_bwd_dkdv_kernel(const T* __restrict__ q, const T* __restrict__ k,
                                                                       const T* __restrict__ v,
                                                                       const T* __restrict__ mask,
                                                                       const T* __restrict__ dout,
                                                                       const float* __restrict__ lse,
                                                                       const float* __restrict__ delta,
                                                                       T* __restrict__ dk, T* __restrict__ dv, Params p) {
  extern __shared__ float smem[];
  float* Qs = smem;                  // kTile x D
  float* Gs = smem + kTile * p.D;    // kTile x Dv (dout)
  const int64_t nblk = (p.Sk + kRows - 1) / kRows;
  const int64_t bhk = blockIdx.x / nblk, blk = blockIdx.x % nblk;
  const int64_t b = bhk / p.Hkv, hk = bhk % p.Hkv;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t j = blk * kRows + warp;
  const bool row_ok = j < p.Sk;
  float kr[kPerLane], vr[kPerLane], dka[kPerLane], dva[kPerLane];
#pragma unroll
  for (int t = 0; t < kPerLane; ++t) {
    const int64_t d = lane + t * kWarp;
    kr[t] = (row_ok && d < p.D) ? to_f(k[b * p.kb + hk * p.kh + j * p.ks + d]) * p.scale : 0.f;
    vr[t] = (row_ok && d < p.Dv) ? to_f(v[b * p.vb + hk * p.vh + j * p.vs + d]) : 0.f;
    dka[t] = 0.f;
    dva[t] = 0.f;
  }
  const int64_t first_key = blk * kRows;
  const int64_t i_start = p.causal ? (first_key / kTile) * kTile : 0;  // rows i < first_key see no key here
  for (int64_t g = 0; g < p.group; ++g) {
    const int64_t h = hk * p.group + g, bh = b * p.H + h;
    const T* qbase = q + b * p.qb + h * p.qh;
    const T* gbase = dout + b * p.db + h * p.dh;
    for (int64_t i0 = i_start; i0 < p.Sq; i0 += kTile) {
      __syncthreads();
      stage(Qs, qbase, p.qs, i0, p.Sq, p.D);
      stage(Gs, gbase, p.ds, i0, p.Sq, p.Dv);
      __syncthreads();
      if (!row_ok) continue;
      for (int ii = 0; ii < kTile; ++ii) {
        const int64_t i = i0 + ii;
        if (i >= p.Sq) break;
        if (p.causal && j > i) continue;
        const float L = lse[bh * p.Sq + i];
        if (L == neg_inf()) continue;
        const float mv = mask_at(mask, p, b, h, i, j);  // warp-uniform: masked keys skip the dots
        if (mv == neg_inf()) continue;
        float s = 0.f, dp = 0.f;
#pragma unroll
        for (int t = 0; t < kPerLane; ++t) {
          const int64_t d = lane + t * kWarp;
          if (d < p.D) s += kr[t] * Qs[ii * p.D + d];
          if (d < p.Dv) dp += vr[t] * Gs[ii * p.Dv + d];
        }
        s = warp_sum(s) + mv;
        dp = warp_sum(dp);
        if (s == neg_inf()) continue;
        const float pr = __expf(s - L);
        float pd = pr;
        if (p.dropout) {
          const bool kept = attention_dropout_keep(p.seed, p.offset, static_cast<uint32_t>(bh), static_cast<uint32_t>(i),
                                                   static_cast<uint32_t>(j), p.threshold);
          pd = kept ? pr * p.inv_keep : 0.f;
          dp = kept ? dp * p.inv_keep : 0.f;
        }
        const float ds = pr * (dp - delta[bh * p.Sq + i]);
#pragma unroll
        for (int t = 0; t < kPerLane; ++t) {
          const int64_t d = lane + t * kWarp;
          if (d < p.Dv) dva[t] += pd * Gs[ii * p.Dv + d];
          if (d < p.D) dka[t] += ds * Qs[ii * p.D + d];
        }
      }
    }
  }
  if (!row_ok) return;
  T* krow = dk + (bhk * p.Sk + j) * p.D;
  T* vrow = dv + (bhk * p.Sk + j) * p.Dv;
#pragma unroll
  for (int t = 0; t < kPerLane; ++t) {
    const int64_t d = lane + t * kWarp;
    if (d < p.D) krow[d] = static_cast<T>(dka[t] * p.scale);
    if (d < p.Dv) vrow[d] = static_cast<T>(dva[t]);
  }
}

Params make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor* mask,
                   const AttentionArgs& a) {
  Params p{};
  p.B = q.size(0), p.H = q.size(1), p.Sq = q.size(2), p.D = q.size(3);
  p.Hkv = k.size(1), p.Sk = k.size(2), p.Dv = v.size(3), p.group = p.H / p.Hkv;
  p.qb = q.stride(0), p.qh = q.stride(1), p.qs = q.stride(2);
  p.kb = k.stride(0), p.kh = k.stride(1), p.ks = k.stride(2);
  p.vb = v.stride(0), p.vh = v.stride(1), p.vs = v.stride(2);
  if (mask != nullptr) p.mb = mask->stride(0), p.mh = mask->stride(1), p.mq = mask->stride(2), p.mk = mask->stride(3);
  p.scale = a.scale, p.causal = a.causal, p.dropout = a.dropout;
  p.seed = a.seed, p.offset = a.offset, p.threshold = a.threshold, p.inv_keep = a.inv_keep;
  return p;
}

template <typename T>
const T* ptr(const at::Tensor* t) {
  return t != nullptr ? static_cast<const T*>(t->data_ptr()) : nullptr;
}

template <typename T>
void fwd_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor* mask,
              const AttentionArgs& a, const at::Tensor& out, const at::Tensor& lse) {
  const Params p = make_params(q, k, v, mask, a);
  const int64_t blocks = p.B * p.H * ((p.Sq + kRows - 1) / kRows);
  if (blocks == 0) return;
  const size_t shmem = sizeof(float) * kTile * (p.D + p.Dv);
  auto stream = c10::cuda::getCurrentCUDAStream();
  attn_fwd_kernel<T><<<static_cast<unsigned>(blocks), kRows * kWarp, shmem, stream>>>(
      ptr<T>(&q), ptr<T>(&k), ptr<T>(&v), ptr<T>(mask), static_cast<T*>(out.data_ptr()),
      static_cast<float*>(lse.data_ptr()), p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void bwd_impl(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& out, const at::Tensor& lse, const at::Tensor* mask, const AttentionArgs& a,
              const at::Tensor& delta, const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv) {
  Params p = make_params(q, k, v, mask, a);
  p.ob = out.stride(0), p.oh = out.stride(1), p.os = out.stride(2);
  p.db = dout.stride(0), p.dh = dout.stride(1), p.ds = dout.stride(2);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const size_t shmem = sizeof(float) * kTile * (p.D + p.Dv);
  const int64_t rows = p.B * p.H * p.Sq;
  if (rows > 0) {
    attn_delta_kernel<T><<<static_cast<unsigned>((rows + kRows - 1) / kRows), kRows * kWarp, 0, stream>>>(
        ptr<T>(&dout), ptr<T>(&out), static_cast<float*>(delta.data_ptr()), p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    attn_bwd_dq_kernel<T><<<static_cast<unsigned>(p.B * p.H * ((p.Sq + kRows - 1) / kRows)), kRows * kWarp, shmem,
                            stream>>>(ptr<T>(&q), ptr<T>(&k), ptr<T>(&v), ptr<T>(mask), ptr<T>(&dout),
                                      static_cast<const float*>(lse.data_ptr()),
                                      static_cast<const float*>(delta.data_ptr()), static_cast<T*>(dq.data_ptr()), p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const int64_t kblocks = p.B * p.Hkv * ((p.Sk + kRows - 1) / kRows);
  if (kblocks > 0) {
    attn_bwd_dkdv_kernel<T><<<static_cast<unsigned>(kblocks), kRows * kWarp, shmem, stream>>>(
        ptr<T>(&q), ptr<T>(&k), ptr<T>(&v), ptr<T>(mask), ptr<T>(&dout), static_cast<const float*>(lse.data_ptr()),
        static_cast<const float*>(delta.data_ptr()), static_cast<T*>(dk.data_ptr()), static_cast<T*>(dv.data_ptr()), p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

#define FASTLM_ATTN_DISPATCH(dtype, ...)                                                   \
  switch (dtype) {                                                                         \
    case at::kFloat: { using T = float; __VA_ARGS__; break; }                             \
    case at::kHalf: { using T = c10::Half; __VA_ARGS__; break; }                          \
    case at::kBFloat16: { using T = c10::BFloat16; __VA_ARGS__; break; }                  \
    default: TORCH_CHECK(false, "fastlm: attention (cuda): unsupported dtype ", dtype);   \
  }

void attention_fwd_launch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor* mask,
                          const AttentionArgs& args, const at::Tensor& out, const at::Tensor& lse) {
  FASTLM_ATTN_DISPATCH(q.scalar_type(), fwd_impl<T>(q, k, v, mask, args, out, lse));
}

void attention_bwd_launch(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const at::Tensor& out, const at::Tensor& lse, const at::Tensor* mask,
                          const AttentionArgs& args, const at::Tensor& delta, const at::Tensor& dq,
                          const at::Tensor& dk, const at::Tensor& dv) {
  FASTLM_ATTN_DISPATCH(q.scalar_type(), bwd_impl<T>(dout, q, k, v, out, lse, mask, args, delta, dq, dk, dv));
}

}  // namespace fastlm::cuda

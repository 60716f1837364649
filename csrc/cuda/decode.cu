// Decode attention over a KV cache on CUDA: flash-decoding, a warp per (row, head, chunk).
//
// Pass 1 (decode_split_kernel): warp w of the grid owns item (b*H + h, split). Its lanes form
// 32 / LPR groups of LPR lanes; a group reads one cache position at a time (LPR lanes x VPL vectors of
// 16 bytes cover the head dim), so a warp streams 32 / LPR K and V rows per iteration with 16-byte
// loads. Each group keeps its own online-softmax state (running max m, sum l, fp32 accumulator); at
// the end the groups are merged with xor shuffles by fastlm::softmax_merge (the code the CPU kernel
// runs), and lanes of group 0 write the chunk's normalized output and its logsumexp (-inf if empty).
// Pass 2 (decode_merge_kernel): one block per (b, h) combines the chunks by logsumexp.
// A VEC = 1 instantiation (scalar loads) takes head dims or strides that are not 16-byte multiples.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "cuda/decode.h"
#include "decode_math.h"

namespace fastlm::cuda {
namespace {

constexpr int kWarpsPerBlock = 4;

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

struct Shape {
  int64_t H, G, D, splits, chunk;
  int64_t sqb, sqh, skb, skh, sks, svb, svh, svs;
  int lpr;  // lanes per cache row (power of two <= 32)
  float scale;
};

// MAX_VPL: 16-byte vectors per lane that cover D <= 256 (fp32 VEC=4: 2; VEC=1: 8).
template <typename T, int VEC, int MAX_VPL>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
decode_split_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                    const int* __restrict__ lens, float* __restrict__ o_part, float* __restrict__ lse_part,
                    int64_t items, Shape sh) {
  const int lane = threadIdx.x & 31;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (item >= items) return;  // whole warps exit together: shuffles below stay full-warp
  const int64_t split = item % sh.splits, bh = item / sh.splits;
  const int64_t b = bh / sh.H, h = bh % sh.H, kvh = h / sh.G;
  const int lpr = sh.lpr, rows_per_iter = 32 / lpr;
  const int group = lane / lpr, gl = lane % lpr;
  const int64_t len = lens[b];
  const int64_t start = split * sh.chunk;
  const int64_t end = start + sh.chunk < len ? start + sh.chunk : len;

  // Lane gl of a group holds vectors j = gl + i * lpr (i < MAX_VPL) of the head dim.
  float qf[MAX_VPL][VEC], acc[MAX_VPL][VEC];
#pragma unroll
  for (int i = 0; i < MAX_VPL; ++i) {
    const int64_t d0 = (static_cast<int64_t>(gl) + static_cast<int64_t>(i) * lpr) * VEC;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      qf[i][e] = 0.f;
      acc[i][e] = 0.f;
    }
    if (d0 < sh.D) {
      Pack<T, VEC> p = *reinterpret_cast<const Pack<T, VEC>*>(q + b * sh.sqb + h * sh.sqh + d0);
#pragma unroll
      for (int e = 0; e < VEC; ++e) qf[i][e] = static_cast<float>(p.v[e]) * sh.scale;  // scale folded into q
    }
  }
  float m = -INFINITY, l = 0.f;
  const T* kb = k + b * sh.skb + kvh * sh.skh;
  const T* vb = v + b * sh.svb + kvh * sh.svh;
  // Every group runs the same number of iterations (shuffles need all 32 lanes); rows past `end` are
  // masked instead of skipped.
  for (int64_t s0 = start; s0 < end; s0 += rows_per_iter) {
    const int64_t s = s0 + group;
    const bool valid = s < end;
    float dot = 0.f;
    if (valid) {
#pragma unroll
      for (int i = 0; i < MAX_VPL; ++i) {
        const int64_t d0 = (static_cast<int64_t>(gl) + static_cast<int64_t>(i) * lpr) * VEC;
        if (d0 < sh.D) {
          Pack<T, VEC> p = *reinterpret_cast<const Pack<T, VEC>*>(kb + s * sh.sks + d0);
#pragma unroll
          for (int e = 0; e < VEC; ++e) dot += qf[i][e] * static_cast<float>(p.v[e]);
        }
      }
    }
    for (int off = lpr >> 1; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);  // within the group
    if (valid) {
      const float m_new = fmaxf(m, dot);
      const float alpha = expf(m - m_new);  // m = -inf on the first row: alpha = 0
      const float p = expf(dot - m_new);
      l = l * alpha + p;
      m = m_new;
#pragma unroll
      for (int i = 0; i < MAX_VPL; ++i) {
        const int64_t d0 = (static_cast<int64_t>(gl) + static_cast<int64_t>(i) * lpr) * VEC;
        if (d0 < sh.D) {
          Pack<T, VEC> pv = *reinterpret_cast<const Pack<T, VEC>*>(vb + s * sh.svs + d0);
#pragma unroll
          for (int e = 0; e < VEC; ++e) acc[i][e] = acc[i][e] * alpha + p * static_cast<float>(pv.v[e]);
        }
      }
    }
  }
  // Merge the groups' states across the warp (lanes with the same gl hold the same head-dim slots).
  for (int off = lpr; off < 32; off <<= 1) {
    const float m_o = __shfl_xor_sync(0xffffffffu, m, off);
    const float l_o = __shfl_xor_sync(0xffffffffu, l, off);
    float alpha, beta;
    softmax_merge(m, l, m_o, l_o, alpha, beta);
#pragma unroll
    for (int i = 0; i < MAX_VPL; ++i)
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float a_o = __shfl_xor_sync(0xffffffffu, acc[i][e], off);
        acc[i][e] = alpha * acc[i][e] + beta * a_o;
      }
  }
  if (group != 0) return;
  const float inv = l > 0.f ? 1.f / l : 0.f;
  float* op = o_part + item * sh.D;
#pragma unroll
  for (int i = 0; i < MAX_VPL; ++i) {
    const int64_t d0 = (static_cast<int64_t>(gl) + static_cast<int64_t>(i) * lpr) * VEC;
#pragma unroll
    for (int e = 0; e < VEC; ++e)
      if (d0 + e < sh.D) op[d0 + e] = acc[i][e] * inv;
  }
  if (gl == 0) lse_part[item] = l > 0.f ? m + logf(l) : -INFINITY;
}

// One block per (b, h): out = sum_s exp(lse_s - lse) o_s over the splits; zeros for an empty row.
template <typename T>
__global__ void decode_merge_kernel(const float* __restrict__ o_part, const float* __restrict__ lse_part,
                                    T* __restrict__ out, int64_t splits, int64_t D) {
  const int64_t bh = blockIdx.x;
  const float* lse = lse_part + bh * splits;
  float m = -INFINITY;
  for (int64_t s = 0; s < splits; ++s) m = fmaxf(m, lse[s]);
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    float num = 0.f, den = 0.f;
    if (m != -INFINITY) {
      for (int64_t s = 0; s < splits; ++s) {
        const float w = expf(lse[s] - m);  // exp(-inf) = 0 for an empty chunk
        num += w * o_part[(bh * splits + s) * D + d];
        den += w;
      }
    }
    out[bh * D + d] = static_cast<T>(den > 0.f ? num / den : 0.f);
  }
}

template <typename T, int VEC, int MAX_VPL>
void launch_split(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lens,
                  const at::Tensor& o_part, const at::Tensor& lse_part, int64_t items, Shape sh, cudaStream_t stream) {
  const int64_t vecs = (sh.D + VEC - 1) / VEC;
  int lpr = 1;
  while (lpr < 32 && lpr < vecs) lpr <<= 1;
  sh.lpr = lpr;
  const int64_t blocks = (items + kWarpsPerBlock - 1) / kWarpsPerBlock;
  decode_split_kernel<T, VEC, MAX_VPL><<<static_cast<unsigned>(blocks), kWarpsPerBlock * 32, 0, stream>>>(
      reinterpret_cast<const T*>(q.data_ptr()), reinterpret_cast<const T*>(k.data_ptr()),
      reinterpret_cast<const T*>(v.data_ptr()), lens.data_ptr<int>(), o_part.data_ptr<float>(),
      lse_part.data_ptr<float>(), items, sh);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

bool aligned16(const at::Tensor& t, int64_t elem) {
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  const int64_t per = 16 / elem;
  for (int64_t d = 0; d + 1 < t.dim(); ++d)
    if (t.size(d) > 1 && t.stride(d) % per != 0) return false;
  return true;
}

template <typename T>
void launch_typed(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lens, float scale,
                  int splits, const at::Tensor& o_part, const at::Tensor& lse_part, const at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t Hkv = k.size(1), S = k.size(2);
  Shape sh{H, H / Hkv, D, splits, (S + splits - 1) / splits,
           q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
           1, scale};
  auto stream = c10::cuda::getCurrentCUDAStream(q.device().index()).stream();
  const int64_t items = B * H * splits;
  constexpr int VEC = 16 / static_cast<int>(sizeof(T));
  const bool vec_ok = D % VEC == 0 && aligned16(q, sizeof(T)) && aligned16(k, sizeof(T)) && aligned16(v, sizeof(T));
  if (vec_ok) {
    launch_split<T, VEC, (256 / VEC + 31) / 32>(q, k, v, lens, o_part, lse_part, items, sh, stream);
  } else {
    launch_split<T, 1, 8>(q, k, v, lens, o_part, lse_part, items, sh, stream);
  }
  const int threads = D >= 128 ? 128 : (D > 32 ? 64 : 32);
  decode_merge_kernel<T><<<static_cast<unsigned>(B * H), threads, 0, stream>>>(
      o_part.data_ptr<float>(), lse_part.data_ptr<float>(), reinterpret_cast<T*>(out.data_ptr()), splits, D);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

int decode_attention_num_splits(int64_t batch_heads, int64_t s_max, int device) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  // 16 warps per SM in flight; chunks of at least 64 positions
  return decode_num_splits(batch_heads, s_max, static_cast<long long>(sms) * 16, 64);
}

void decode_attention_launch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lens,
                             float scale, int splits, const at::Tensor& o_part, const at::Tensor& lse_part,
                             const at::Tensor& out) {
  switch (q.scalar_type()) {
    case at::kFloat:
      launch_typed<float>(q, k, v, lens, scale, splits, o_part, lse_part, out);
      break;
    case at::kHalf:
      launch_typed<c10::Half>(q, k, v, lens, scale, splits, o_part, lse_part, out);
      break;
    case at::kBFloat16:
      launch_typed<c10::BFloat16>(q, k, v, lens, scale, splits, o_part, lse_part, out);
      break;
    default:
      TORCH_CHECK(false, "fastlm: decode_attention_fwd (cuda): unsupported dtype ", q.scalar_type());
  }
}

}  // namespace fastlm::cuda

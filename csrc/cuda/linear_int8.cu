// Weight-only int8 GEMV on CUDA (decode): y[m, n] = scale[n] * sum_k x[m, k] * qweight[n, k] + bias[n]
// for M <= 16 rows.
//
// Tiling: a block of kWarps warps; warp w owns output channel n = blockIdx.x * kWarps + w and every
// row m of x. Each lane walks its channel's int8 row in 16-byte vectors (16 weights, one load),
// lane-strided so a warp reads 512 contiguous bytes per step (coalesced), widens them to fp32 in
// registers (int8 -> fp32 is exact) and multiplies them against the same 16 columns of each of the M
// input rows (small: read through the L1/L2, shared by all warps), keeping M fp32 partial sums. The
// warp's partial sums are reduced with xor shuffles and lane 0 writes scale[n] * sum + bias[n] in x's
// dtype. The weight, the bytes that bound a decode step, is read exactly once.
// A VEC = false instantiation (one weight per lane per step) takes K or base pointers that are not
// 16-byte aligned.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "common.h"
#include "cuda/linear_int8.h"

namespace fastlm::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kMaxRows = static_cast<int>(kInt8MaxRows);
constexpr int kVec = 16;  // int8 weights per 16-byte load

struct alignas(16) Int8x16 {
  int8_t v[kVec];
};

template <typename T, bool VEC>
__global__ void __launch_bounds__(kWarps * 32)
    linear_int8_gemv_kernel(const T* __restrict__ x, int64_t ldx, const int8_t* __restrict__ w,
                            const float* __restrict__ scale, const T* __restrict__ bias, T* __restrict__ out,
                            int M, int64_t N, int64_t K) {
  const int lane = threadIdx.x & 31;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (n >= N) return;
  const int8_t* wr = w + n * K;
  float acc[kMaxRows];
#pragma unroll
  for (int m = 0; m < kMaxRows; ++m) acc[m] = 0.f;

  if constexpr (VEC) {
    for (int64_t k0 = static_cast<int64_t>(lane) * kVec; k0 < K; k0 += 32 * kVec) {
      const Int8x16 pk = *reinterpret_cast<const Int8x16*>(wr + k0);
      float wf[kVec];
#pragma unroll
      for (int i = 0; i < kVec; ++i) wf[i] = static_cast<float>(pk.v[i]);
#pragma unroll
      for (int m = 0; m < kMaxRows; ++m) {
        if (m < M) {
          const T* xr = x + m * ldx + k0;
          float s = acc[m];
#pragma unroll
          for (int i = 0; i < kVec; ++i) s = fmaf(wf[i], static_cast<float>(xr[i]), s);
          acc[m] = s;
        }
      }
    }
  } else {
    for (int64_t k = lane; k < K; k += 32) {
      const float wf = static_cast<float>(wr[k]);
#pragma unroll
      for (int m = 0; m < kMaxRows; ++m)
        if (m < M) acc[m] = fmaf(wf, static_cast<float>(x[m * ldx + k]), acc[m]);
    }
  }

#pragma unroll
  for (int m = 0; m < kMaxRows; ++m) {
    if (m < M) {
      float s = acc[m];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
      acc[m] = s;
    }
  }
  if (lane == 0) {
    const float sc = scale[n];
    const float b = bias ? static_cast<float>(bias[n]) : 0.f;
    for (int m = 0; m < M; ++m) out[m * N + n] = static_cast<T>(acc[m] * sc + b);
  }
}

template <typename T>
void launch_typed(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale, const at::Tensor* bias,
                  const at::Tensor& out) {
  const int M = static_cast<int>(x.size(0));
  const int64_t N = qweight.size(0), K = qweight.size(1), ldx = x.stride(0);
  const T* xp = x.data_ptr<T>();
  const int8_t* wp = qweight.data_ptr<int8_t>();
  const T* bp = bias ? bias->data_ptr<T>() : nullptr;
  // 16-byte weight loads need every row start aligned; x's 16-column runs are read element-wise.
  const bool vec = K % kVec == 0 && reinterpret_cast<uintptr_t>(wp) % 16 == 0;
  const dim3 grid(static_cast<unsigned>((N + kWarps - 1) / kWarps));
  const dim3 block(kWarps * 32);
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (vec)
    linear_int8_gemv_kernel<T, true><<<grid, block, 0, stream>>>(xp, ldx, wp, scale.data_ptr<float>(), bp,
                                                                 out.data_ptr<T>(), M, N, K);
  else
    linear_int8_gemv_kernel<T, false><<<grid, block, 0, stream>>>(xp, ldx, wp, scale.data_ptr<float>(), bp,
                                                                  out.data_ptr<T>(), M, N, K);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void linear_int8_launch(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                        const at::Tensor* bias, const at::Tensor& out) {
  switch (x.scalar_type()) {
    case at::kFloat: launch_typed<float>(x, qweight, scale, bias, out); break;
    case at::kHalf: launch_typed<c10::Half>(x, qweight, scale, bias, out); break;
    case at::kBFloat16: launch_typed<c10::BFloat16>(x, qweight, scale, bias, out); break;
    default: TORCH_CHECK(false, "fastlm: linear_int8_fwd (cuda): unsupported dtype ", x.scalar_type());
  }
}

}  // namespace fastlm::cuda

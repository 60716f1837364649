// The GELU feed-forward's fused elementwise kernels in CUDA; the GEMMs around them are cuBLAS
// (gelu_ffn_cuda.cpp).
//
// Tiling: blocks of 32 x 8 threads. threadIdx.x walks 16-byte column vectors (VEC = 4 fp32 or 8
// fp16/bf16 elements; VEC = 1 when the rows are not 16-byte aligned), so a warp reads 512 contiguous
// bytes of a row; threadIdx.y and blockIdx.y stride over rows (a bounded grid: each thread handles
// rows y, y + 8 * gridDim.y, ...), blockIdx.x over column tiles of 32 vectors.
//   bias_gelu: h <- gelu(h + bias) in place, pre <- h + bias (optional): the GEMM's epilogue that
//              cuBLASLt lacks for the exact GELU and for storing the pre-activation.
//   dgelu:     d <- d * gelu'(pre) in place (dact -> dpre), act <- gelu(pre) (optional), and the
//              column sums of the new d (the bias gradient) kept in registers per thread, reduced over
//              the block's 8 rows in shared memory and written to slot blockIdx.y of an fp32 (slots, F)
//              buffer that column_sum_kernel reduces: deterministic, no atomics.
// fp32 math throughout; the GELU formulas are csrc/fastlm_math.h's, the very code the CPU tests run.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>

#include "cuda/gelu_ffn.h"
#include "cuda/vec_io.cuh"
#include "fastlm_math.h"

namespace fastlm::cuda {
namespace {

constexpr int kThreadsX = 32, kThreadsY = 8;

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreadsX * kThreadsY)
    bias_gelu_kernel(T* __restrict__ h, const T* __restrict__ bias, T* __restrict__ pre, int64_t M, int64_t F,
                     int64_t ldh, int64_t ldp, bool tanh_approx) {
  const int64_t col = (static_cast<int64_t>(blockIdx.x) * kThreadsX + threadIdx.x) * VEC;
  if (col >= F) return;  // F % VEC == 0, so a vector that starts inside the row ends inside it
  float b[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) b[i] = 0.f;
  if (bias != nullptr) load_float<T, VEC>(bias + col, b);
  const int64_t row_step = static_cast<int64_t>(gridDim.y) * kThreadsY;
  for (int64_t row = static_cast<int64_t>(blockIdx.y) * kThreadsY + threadIdx.y; row < M; row += row_step) {
    float v[VEC];
    load_float<T, VEC>(h + row * ldh + col, v);
#pragma unroll
    for (int i = 0; i < VEC; ++i) v[i] += b[i];
    if (pre != nullptr) store_float<T, VEC>(pre + row * ldp + col, v);
#pragma unroll
    for (int i = 0; i < VEC; ++i) v[i] = gelu(v[i], tanh_approx);
    store_float<T, VEC>(h + row * ldh + col, v);
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreadsX * kThreadsY)
    dgelu_kernel(T* __restrict__ d, const T* __restrict__ pre, T* __restrict__ act, float* __restrict__ part,
                 int64_t M, int64_t F, int64_t ldd, int64_t ldp, int64_t lda, bool tanh_approx) {
  __shared__ float smem[kThreadsY][kThreadsX * VEC];
  const int64_t col = (static_cast<int64_t>(blockIdx.x) * kThreadsX + threadIdx.x) * VEC;
  const bool col_ok = col < F;
  float acc[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) acc[i] = 0.f;
  if (col_ok) {
    const int64_t row_step = static_cast<int64_t>(gridDim.y) * kThreadsY;
    for (int64_t row = static_cast<int64_t>(blockIdx.y) * kThreadsY + threadIdx.y; row < M; row += row_step) {
      float dv[VEC], pv[VEC];
      load_float<T, VEC>(d + row * ldd + col, dv);
      load_float<T, VEC>(pre + row * ldp + col, pv);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        dv[i] *= gelu_grad(pv[i], tanh_approx);
        acc[i] += dv[i];
      }
      store_float<T, VEC>(d + row * ldd + col, dv);
      if (act != nullptr) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) pv[i] = gelu(pv[i], tanh_approx);
        store_float<T, VEC>(act + row * lda + col, pv);
      }
    }
  }
  if (part == nullptr) return;  // uniform over the block: no thread is left waiting at the barrier
#pragma unroll
  for (int i = 0; i < VEC; ++i) smem[threadIdx.y][threadIdx.x * VEC + i] = acc[i];
  __syncthreads();
  if (threadIdx.y == 0 && col_ok) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      float s = 0.f;
#pragma unroll
      for (int y = 0; y < kThreadsY; ++y) s += smem[y][threadIdx.x * VEC + i];
      part[static_cast<int64_t>(blockIdx.y) * F + col + i] = s;
    }
  }
}

// out[c] = sum over slots of part[s, c]; one thread per column, coalesced across the warp.
template <typename T>
__global__ void column_sum_kernel(const float* __restrict__ part, T* __restrict__ out, int64_t slots, int64_t F) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= F) return;
  float s = 0.f;
  for (int64_t k = 0; k < slots; ++k) s += part[k * F + c];
  out[c] = static_cast<T>(s);
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

int sm_count(int device) {
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  return n;
}

// 16-byte vectors when every row of every tensor starts 16-byte aligned and F is a multiple of VEC.
template <typename T>
bool can_vectorize(int64_t F, std::initializer_list<const at::Tensor*> ts) {
  constexpr int V = 16 / sizeof(T);
  if (F % V != 0) return false;
  for (const at::Tensor* t : ts)
    if (t != nullptr && (!aligned16(t->data_ptr()) || (t->dim() == 2 && t->stride(0) % V != 0))) return false;
  return true;
}

// grid: x over column tiles; y over row slots, enough blocks to fill the GPU (8 per SM), no more
// than the rows need, within the 65535 limit of gridDim.y.
dim3 grid_for(int64_t M, int64_t F, int vec, int device) {
  const int64_t gx = std::max<int64_t>(1, (F / vec + kThreadsX - 1) / kThreadsX);
  const int64_t want = std::max<int64_t>(1, static_cast<int64_t>(sm_count(device)) * 8 / gx);
  const int64_t gy = std::max<int64_t>(1, std::min<int64_t>({want, (M + kThreadsY - 1) / kThreadsY, 65535}));
  return dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
}

template <typename T>
void bias_gelu_impl(const at::Tensor& h, const at::Tensor* bias, const at::Tensor* pre, bool tanh_approx) {
  const int64_t M = h.size(0), F = h.size(1);
  const int device = h.device().index();
  auto stream = c10::cuda::getCurrentCUDAStream(device).stream();
  T* hp = static_cast<T*>(h.data_ptr());
  const T* bp = bias != nullptr ? static_cast<const T*>(bias->data_ptr()) : nullptr;
  T* pp = pre != nullptr ? static_cast<T*>(pre->data_ptr()) : nullptr;
  const int64_t ldp = pre != nullptr ? pre->stride(0) : 0;
  const dim3 block(kThreadsX, kThreadsY);
  if (can_vectorize<T>(F, {&h, bias, pre})) {
    constexpr int V = 16 / sizeof(T);
    bias_gelu_kernel<T, V><<<grid_for(M, F, V, device), block, 0, stream>>>(hp, bp, pp, M, F, h.stride(0), ldp,
                                                                             tanh_approx);
  } else {
    bias_gelu_kernel<T, 1><<<grid_for(M, F, 1, device), block, 0, stream>>>(hp, bp, pp, M, F, h.stride(0), ldp,
                                                                             tanh_approx);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void dgelu_impl(const at::Tensor& d, const at::Tensor& pre, const at::Tensor* act, const at::Tensor* dbias,
                bool tanh_approx) {
  const int64_t M = d.size(0), F = d.size(1);
  const int device = d.device().index();
  auto stream = c10::cuda::getCurrentCUDAStream(device).stream();
  const bool vec = can_vectorize<T>(F, {&d, &pre, act});
  constexpr int V = 16 / sizeof(T);
  const dim3 grid = grid_for(M, F, vec ? V : 1, device), block(kThreadsX, kThreadsY);
  at::Tensor part;
  float* partp = nullptr;
  if (dbias != nullptr) {
    part = at::empty({static_cast<int64_t>(grid.y), F}, d.options().dtype(at::kFloat));
    partp = static_cast<float*>(part.data_ptr());
  }
  T* dp = static_cast<T*>(d.data_ptr());
  const T* pp = static_cast<const T*>(pre.data_ptr());
  T* ap = act != nullptr ? static_cast<T*>(act->data_ptr()) : nullptr;
  const int64_t lda = act != nullptr ? act->stride(0) : 0;
  if (vec) {
    dgelu_kernel<T, V><<<grid, block, 0, stream>>>(dp, pp, ap, partp, M, F, d.stride(0), pre.stride(0), lda,
                                                   tanh_approx);
  } else {
    dgelu_kernel<T, 1><<<grid, block, 0, stream>>>(dp, pp, ap, partp, M, F, d.stride(0), pre.stride(0), lda,
                                                   tanh_approx);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (dbias != nullptr) {
    column_sum_kernel<T><<<static_cast<unsigned>((F + 255) / 256), 256, 0, stream>>>(
        partp, static_cast<T*>(dbias->data_ptr()), static_cast<int64_t>(grid.y), F);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

#define FASTLM_GELU_DISPATCH(dtype, ...)                                             \
  switch (dtype) {                                                                  \
    case at::kFloat: { using T = float; __VA_ARGS__; break; }                       \
    case at::kHalf: { using T = c10::Half; __VA_ARGS__; break; }                    \
    case at::kBFloat16: { using T = c10::BFloat16; __VA_ARGS__; break; }            \
    default: TORCH_CHECK(false, "fastlm: gelu_ffn (cuda): unsupported dtype ", dtype); \
  }

void bias_gelu_launch(const at::Tensor& h, const at::Tensor* bias, const at::Tensor* pre, bool tanh_approx) {
  if (h.numel() == 0) return;
  FASTLM_GELU_DISPATCH(h.scalar_type(), bias_gelu_impl<T>(h, bias, pre, tanh_approx));
}

void dgelu_launch(const at::Tensor& d, const at::Tensor& pre, const at::Tensor* act, const at::Tensor* dbias,
                  bool tanh_approx) {
  if (d.numel() == 0) return;  // the caller zero-fills dbias when there are no rows
  FASTLM_GELU_DISPATCH(d.scalar_type(), dgelu_impl<T>(d, pre, act, dbias, tanh_approx));
}

}  // namespace fastlm::cuda

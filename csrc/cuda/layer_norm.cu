// LayerNorm (optionally on x + residual) forward and backward in CUDA.
//
// Tiling. A row is handled by `tpr` threads (blockDim.x): a warp (tpr = 32, blockDim.y = 4 rows per
// block) when the row fits a warp's register budget, else a whole block (tpr = 64..1024, one row per
// block). Each thread holds ITERS vectors of VEC elements (16-byte loads: VEC = 4 fp32 or 8 fp16/bf16;
// VEC = 1 when the row is not 16-byte aligned) in registers, so the row is read from memory once.
// Statistics are fp32 and two-pass over the registers (mean, then sum of squared deviations): no
// E[x^2] - E[x]^2 cancellation. Rows too long for registers use the looped kernels (three passes
// over the row, the re-reads served by L2).
// Backward: a persistent grid; each row group (warp or block) walks rows g, g + groups, ... and keeps
// its dweight/dbias partial in registers, written to slot g of a (groups, N) fp32 buffer that two
// column-sum kernels reduce (slices of slots, then the slices): bounded memory, deterministic, no
// atomics.
// The math is fastlm/ops/reference.py's; the per-element backward formula is csrc/fastlm_math.h's.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cuda/layer_norm.h"
#include "cuda/vec_io.cuh"
#include "fastlm_math.h"

namespace fastlm::cuda {
namespace {

// The most threads a block of a kernel holding `elems` fp32 values per thread may have: the register
// file (64K per SM) must hold the block. Used in __launch_bounds__ and by the launch configuration.
constexpr int max_threads_for(int elems) { return elems <= 8 ? 1024 : elems <= 16 ? 512 : 256; }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the threads of one row: the warp when blockDim.x == 32, else the (single-row) block.
// smem: 32 floats per reduced value. Every thread of the row gets the total.
__device__ __forceinline__ float row_sum(float v, float* smem) {
  v = warp_sum(v);
  if (blockDim.x == 32) return v;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  __syncthreads();  // smem may still be read by a previous row_sum
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  return warp_sum(lane < nwarps ? smem[lane] : 0.f);
}

__device__ __forceinline__ float2 row_sum2(float a, float b, float* smem) {
  a = warp_sum(a);
  b = warp_sum(b);
  if (blockDim.x == 32) return make_float2(a, b);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0) {
    smem[warp] = a;
    smem[32 + warp] = b;
  }
  __syncthreads();
  return make_float2(warp_sum(lane < nwarps ? smem[lane] : 0.f), warp_sum(lane < nwarps ? smem[32 + lane] : 0.f));
}

// One row per (threadIdx.y, blockIdx.x); the row in registers.
template <typename T, int VEC, int ITERS>
__global__ void __launch_bounds__(max_threads_for(VEC * ITERS)) layer_norm_fwd_kernel(const T* __restrict__ x, const T* __restrict__ res, T* __restrict__ summed,
                                      T* __restrict__ y, const T* __restrict__ w, const T* __restrict__ b,
                                      float* __restrict__ mean_out, float* __restrict__ rstd_out, int64_t sx,
                                      int64_t sr, int64_t M, int N, float eps) {
  __shared__ float smem[32];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= M) return;  // whole warp (warp mode) or whole block (block mode: blockDim.y == 1)
  const int tpr = blockDim.x, t = threadIdx.x;
  float v[ITERS][VEC];
  float sum = 0.f;
#pragma unroll
  for (int it = 0; it < ITERS; ++it) {
    const int col = (it * tpr + t) * VEC;
    if (col < N) {
      load_float<T, VEC>(x + row * sx + col, v[it]);
      if (res != nullptr) {
        float r[VEC];
        load_float<T, VEC>(res + row * sr + col, r);
#pragma unroll
        for (int i = 0; i < VEC; ++i) v[it][i] = static_cast<float>(static_cast<T>(v[it][i] + r[i]));
        store_float<T, VEC>(summed + row * N + col, v[it]);  // normalize exactly the rounded sum
      }
#pragma unroll
      for (int i = 0; i < VEC; ++i) sum += v[it][i];
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) v[it][i] = 0.f;
    }
  }
  const float mu = row_sum(sum, smem) / N;
  float sq = 0.f;
#pragma unroll
  for (int it = 0; it < ITERS; ++it) {
    if ((it * tpr + t) * VEC < N) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) sq += (v[it][i] - mu) * (v[it][i] - mu);
    }
  }
  const float rstd = rsqrtf(row_sum(sq, smem) / N + eps);
  if (t == 0) {
    mean_out[row] = mu;
    rstd_out[row] = rstd;
  }
#pragma unroll
  for (int it = 0; it < ITERS; ++it) {
    const int col = (it * tpr + t) * VEC;
    if (col < N) {
      float wv[VEC], bv[VEC], o[VEC];
      if (w != nullptr) load_float<T, VEC>(w + col, wv);
      if (b != nullptr) load_float<T, VEC>(b + col, bv);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        float h = (v[it][i] - mu) * rstd;
        if (w != nullptr) h *= wv[i];
        if (b != nullptr) h += bv[i];
        o[i] = h;
      }
      store_float<T, VEC>(y + row * N + col, o);
    }
  }
}

// One row per block, three passes over the row (rows too long for registers).
template <typename T>
__global__ void __launch_bounds__(1024) layer_norm_fwd_looped_kernel(const T* __restrict__ x, const T* __restrict__ res, T* __restrict__ summed,
                                             T* __restrict__ y, const T* __restrict__ w, const T* __restrict__ b,
                                             float* __restrict__ mean_out, float* __restrict__ rstd_out, int64_t sx,
                                             int64_t sr, int N, float eps) {
  __shared__ float smem[32];
  const int64_t row = blockIdx.x;
  const T* src = res != nullptr ? summed + row * N : x + row * sx;
  float sum = 0.f;
  for (int col = threadIdx.x; col < N; col += blockDim.x) {
    float v = static_cast<float>(x[row * sx + col]);
    if (res != nullptr) {
      const T s = static_cast<T>(v + static_cast<float>(res[row * sr + col]));
      summed[row * N + col] = s;
      v = static_cast<float>(s);
    }
    sum += v;
  }
  const float mu = row_sum(sum, smem) / N;  // row_sum's __syncthreads also orders the summed writes
  float sq = 0.f;
  for (int col = threadIdx.x; col < N; col += blockDim.x) {
    const float d = static_cast<float>(src[col]) - mu;
    sq += d * d;
  }
  const float rstd = rsqrtf(row_sum(sq, smem) / N + eps);
  if (threadIdx.x == 0) {
    mean_out[row] = mu;
    rstd_out[row] = rstd;
  }
  for (int col = threadIdx.x; col < N; col += blockDim.x) {
    float h = (static_cast<float>(src[col]) - mu) * rstd;
    if (w != nullptr) h *= static_cast<float>(w[col]);
    if (b != nullptr) h += static_cast<float>(b[col]);
    y[row * N + col] = static_cast<T>(h);
  }
}

// Row groups (warp or block) walk rows g, g + groups, ...; partials to slot g of (groups, N).
template <typename T, int VEC, int ITERS>
__global__ void __launch_bounds__(max_threads_for(2 * VEC * ITERS)) layer_norm_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ w,
                                      const float* __restrict__ mean, const float* __restrict__ rstd,
                                      const T* __restrict__ ds, T* __restrict__ dx, float* __restrict__ dw_part,
                                      float* __restrict__ db_part, int64_t sdy, int64_t sx, int64_t sds, int64_t M,
                                      int N) {
  __shared__ float smem[64];
  const int tpr = blockDim.x, t = threadIdx.x;
  const int64_t slot = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const int64_t groups = static_cast<int64_t>(gridDim.x) * blockDim.y;
  float wv[ITERS][VEC], dwa[ITERS][VEC], dba[ITERS][VEC];
#pragma unroll
  for (int it = 0; it < ITERS; ++it) {
    const int col = (it * tpr + t) * VEC;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      wv[it][i] = 1.f;
      dwa[it][i] = 0.f;
      dba[it][i] = 0.f;
    }
    if (w != nullptr && col < N) load_float<T, VEC>(w + col, wv[it]);
  }
  // Block mode has blockDim.y == 1, so every thread of a block runs the same trip count and the
  // __syncthreads inside row_sum2 are reached uniformly.
  for (int64_t row = slot; row < M; row += groups) {
    const float mu = mean[row], r = rstd[row];
    float xh[ITERS][VEC], dv[ITERS][VEC];
    float sg = 0.f, sgx = 0.f;
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      const int col = (it * tpr + t) * VEC;
      if (col < N) {
        load_float<T, VEC>(x + row * sx + col, xh[it]);
        load_float<T, VEC>(dy + row * sdy + col, dv[it]);
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          xh[it][i] = (xh[it][i] - mu) * r;
          const float g = dv[it][i] * wv[it][i];
          sg += g;
          sgx += g * xh[it][i];
          dwa[it][i] += dv[it][i] * xh[it][i];
          dba[it][i] += dv[it][i];
        }
      }
    }
    const float2 s = row_sum2(sg, sgx, smem);
    const float mean_g = s.x / N, mean_gx = s.y / N;
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      const int col = (it * tpr + t) * VEC;
      if (col < N) {
        float o[VEC], d[VEC];
        if (ds != nullptr) load_float<T, VEC>(ds + row * sds + col, d);
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          o[i] = layer_norm_dx(dv[it][i] * wv[it][i], xh[it][i], mean_g, mean_gx, r);
          if (ds != nullptr) o[i] += d[i];
        }
        store_float<T, VEC>(dx + row * N + col, o);
      }
    }
  }
#pragma unroll
  for (int it = 0; it < ITERS; ++it) {
    const int col = (it * tpr + t) * VEC;
    if (col < N) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        if (dw_part != nullptr) dw_part[slot * N + col + i] = dwa[it][i];
        if (db_part != nullptr) db_part[slot * N + col + i] = dba[it][i];
      }
    }
  }
}

// Rows too long for registers: one block per row group, two passes per row; the block's partials
// accumulate in its own (zero-initialised) slot of the partial buffers.
template <typename T>
__global__ void __launch_bounds__(1024) layer_norm_bwd_looped_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ w,
                                             const float* __restrict__ mean, const float* __restrict__ rstd,
                                             const T* __restrict__ ds, T* __restrict__ dx, float* __restrict__ dw_part,
                                             float* __restrict__ db_part, int64_t sdy, int64_t sx, int64_t sds,
                                             int64_t M, int N) {
  __shared__ float smem[64];
  const int64_t slot = blockIdx.x;
  for (int64_t row = slot; row < M; row += gridDim.x) {
    const float mu = mean[row], r = rstd[row];
    float sg = 0.f, sgx = 0.f;
    for (int col = threadIdx.x; col < N; col += blockDim.x) {
      const float xh = (static_cast<float>(x[row * sx + col]) - mu) * r;
      const float g = static_cast<float>(dy[row * sdy + col]) * (w != nullptr ? static_cast<float>(w[col]) : 1.f);
      sg += g;
      sgx += g * xh;
    }
    const float2 s = row_sum2(sg, sgx, smem);
    const float mean_g = s.x / N, mean_gx = s.y / N;
    for (int col = threadIdx.x; col < N; col += blockDim.x) {
      const float xh = (static_cast<float>(x[row * sx + col]) - mu) * r;
      const float d = static_cast<float>(dy[row * sdy + col]);
      float o = layer_norm_dx(d * (w != nullptr ? static_cast<float>(w[col]) : 1.f), xh, mean_g, mean_gx, r);
      if (ds != nullptr) o += static_cast<float>(ds[row * sds + col]);
      dx[row * N + col] = static_cast<T>(o);
      if (dw_part != nullptr) dw_part[slot * N + col] += d * xh;  // this thread owns the element
      if (db_part != nullptr) db_part[slot * N + col] += d;
    }
  }
}

// Column sums of the (slots, N) fp32 partials in two deterministic stages that fill the GPU, both
// column_sum_kernel: block (x, y) sums slots [y * per, (y + 1) * per) of columns [32 x, 32 x + 32)
// (8 slot-lanes, loads unrolled, then a shared-memory reduction) into out[y, col]. Stage 1: grid
// (ceil(N / 32), slices) into an fp32 (slices, N) buffer; stage 2: grid (ceil(N / 32), 1) over the
// slices into dweight/dbias. One stage alone launched only N / 32 blocks: at 32768 x 768 bf16 on the
// H100, 24 blocks read 26 MB of partials, most of the 0.43 ms backward (torch: 0.21 ms); the split
// is not yet measured on a GPU.
constexpr int kColumnSlices = 64;

template <typename OutT>
__global__ void column_sum_kernel(const float* __restrict__ part, OutT* __restrict__ out, int64_t slots, int64_t per,
                                  int N) {
  __shared__ float smem[8][33];
  const int col = blockIdx.x * 32 + threadIdx.x;
  const int64_t g0 = static_cast<int64_t>(blockIdx.y) * per;
  const int64_t g1 = g0 + per < slots ? g0 + per : slots;
  float acc = 0.f;
  if (col < N) {
#pragma unroll 4
    for (int64_t g = g0 + threadIdx.y; g < g1; g += 8) acc += part[g * N + col];
  }
  smem[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && col < N) {
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) sum += smem[i][threadIdx.x];
    out[static_cast<int64_t>(blockIdx.y) * N + col] = static_cast<OutT>(sum);
  }
}

// ---------------------------------------------------------------------------------------------------
// Launch configuration
// ---------------------------------------------------------------------------------------------------

struct RowConfig {
  int vec;       // elements per 16-byte vector, or 1
  int iters;     // vectors per thread: 1, 2, 4 or 8; 0 = looped kernel
  int tpr;       // threads per row (32 = warp mode)
  int rows;      // rows per block (warp mode: 4)
};

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

int pow2_at_least(int n) {
  int p = 1;
  while (p < n) p <<= 1;
  return p;
}

// max_elems: register budget in elements per thread (forward 32; backward 16: it holds x, dy and
// two accumulators per element); regs_factor scales the per-element register cost (backward: 2). Warp per row when the row fits a warp within that budget; else a
// block per row, preferring <= 256 threads, never more than max_threads_for(elements per thread).
RowConfig row_config(int N, int elem_size, bool vec_ok, int max_elems, int regs_factor) {
  RowConfig c{};
  c.vec = vec_ok ? 16 / elem_size : 1;
  const int vcols = (N + c.vec - 1) / c.vec;
  const int warp_iters = pow2_at_least((vcols + 31) / 32);
  if (warp_iters <= 8 && warp_iters * c.vec <= max_elems) {
    c.iters = warp_iters;
    c.tpr = 32;
    c.rows = 4;
    return c;
  }
  c.rows = 1;
  for (int pass = 0; pass < 2; ++pass) {
    for (int iters = 1; iters <= 8 && iters * c.vec <= max_elems; iters *= 2) {
      const int tpr = std::max(64, ((vcols + iters - 1) / iters + 31) / 32 * 32);
      if (tpr <= (pass == 0 ? 256 : max_threads_for(iters * c.vec * regs_factor))) {
        c.iters = iters;
        c.tpr = tpr;
        return c;
      }
    }
  }
  c.iters = 0;  // looped kernel
  c.tpr = 1024;
  return c;
}

// Calls f(vec, iters) with compile-time constants; only instantiates vec * iters <= MAX_ELEMS.
template <typename T, int MAX_ELEMS, typename F>
void dispatch_vec_iters(const RowConfig& c, F&& f) {
  auto run = [&](auto vec_tag) {
    constexpr int V = decltype(vec_tag)::value;
    auto call = [&](auto iters_tag) {
      constexpr int I = decltype(iters_tag)::value;
      if constexpr (V * I <= MAX_ELEMS) {
        f(std::integral_constant<int, V>{}, std::integral_constant<int, I>{});
      } else {
        TORCH_CHECK(false, "fastlm: layer_norm (cuda): no kernel for vec ", V, " x iters ", I);
      }
    };
    switch (c.iters) {
      case 1: call(std::integral_constant<int, 1>{}); break;
      case 2: call(std::integral_constant<int, 2>{}); break;
      case 4: call(std::integral_constant<int, 4>{}); break;
      default: call(std::integral_constant<int, 8>{}); break;
    }
  };
  if (c.vec == 1) run(std::integral_constant<int, 1>{});
  else run(std::integral_constant<int, 16 / sizeof(T)>{});
}

const void* ptr_or_null(const at::Tensor* t) { return t != nullptr ? t->data_ptr() : nullptr; }

template <typename T>
void fwd_impl(const at::Tensor& x, const at::Tensor* residual, const at::Tensor* weight, const at::Tensor* bias,
              float eps, const at::Tensor& out, const at::Tensor& summed, const at::Tensor& mean,
              const at::Tensor& rstd) {
  const int64_t M = x.size(0);
  const int N = static_cast<int>(x.size(1));
  const int V = 16 / sizeof(T);
  bool vec_ok = N % V == 0 && x.stride(0) % V == 0 && aligned16(x.data_ptr()) && aligned16(out.data_ptr());
  if (residual != nullptr)
    vec_ok = vec_ok && residual->stride(0) % V == 0 && aligned16(residual->data_ptr()) && aligned16(summed.data_ptr());
  if (weight != nullptr) vec_ok = vec_ok && aligned16(weight->data_ptr());
  if (bias != nullptr) vec_ok = vec_ok && aligned16(bias->data_ptr());
  const RowConfig c = row_config(N, sizeof(T), vec_ok, 32, 1);
  auto stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  const T* xp = static_cast<const T*>(x.data_ptr());
  const T* rp = static_cast<const T*>(ptr_or_null(residual));
  T* sp = residual != nullptr ? static_cast<T*>(summed.data_ptr()) : nullptr;
  T* yp = static_cast<T*>(out.data_ptr());
  const T* wp = static_cast<const T*>(ptr_or_null(weight));
  const T* bp = static_cast<const T*>(ptr_or_null(bias));
  float* mp = static_cast<float*>(mean.data_ptr());
  float* rsp = static_cast<float*>(rstd.data_ptr());
  const int64_t sr = residual != nullptr ? residual->stride(0) : 0;
  if (c.iters == 0) {
    layer_norm_fwd_looped_kernel<T><<<M, 1024, 0, stream>>>(xp, rp, sp, yp, wp, bp, mp, rsp, x.stride(0), sr, N, eps);
  } else {
    const dim3 block(c.tpr, c.rows);
    const int64_t grid = (M + c.rows - 1) / c.rows;
    dispatch_vec_iters<T, 32>(c, [&](auto vec, auto iters) {
      layer_norm_fwd_kernel<T, decltype(vec)::value, decltype(iters)::value>
          <<<grid, block, 0, stream>>>(xp, rp, sp, yp, wp, bp, mp, rsp, x.stride(0), sr, M, N, eps);
    });
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

int sm_count(int device) {
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  return n;
}

template <typename T>
void bwd_impl(const at::Tensor& dy, const at::Tensor& x, const at::Tensor* weight, const at::Tensor& mean,
              const at::Tensor& rstd, const at::Tensor* dsummed, const at::Tensor& dx, const at::Tensor& dweight,
              const at::Tensor& dbias) {
  const int64_t M = x.size(0);
  const int N = static_cast<int>(x.size(1));
  const int V = 16 / sizeof(T);
  bool vec_ok = N % V == 0 && x.stride(0) % V == 0 && dy.stride(0) % V == 0 && aligned16(x.data_ptr()) &&
                aligned16(dy.data_ptr()) && aligned16(dx.data_ptr());
  if (dsummed != nullptr) vec_ok = vec_ok && dsummed->stride(0) % V == 0 && aligned16(dsummed->data_ptr());
  if (weight != nullptr) vec_ok = vec_ok && aligned16(weight->data_ptr());
  const RowConfig c = row_config(N, sizeof(T), vec_ok, 16, 2);
  const int device = x.device().index();
  auto stream = c10::cuda::getCurrentCUDAStream(device).stream();
  // A persistent grid: enough row groups to fill the GPU, never more than there are rows.
  const int64_t max_blocks = static_cast<int64_t>(sm_count(device)) * (c.rows == 4 ? 8 : std::max(1, 2048 / c.tpr));
  const int64_t grid = std::max<int64_t>(1, std::min<int64_t>(max_blocks, (M + c.rows - 1) / c.rows));
  const int64_t slots = grid * c.rows;
  const bool need_dw = dweight.defined() && dweight.numel() > 0, need_db = dbias.defined() && dbias.numel() > 0;
  // The partial buffers: fp32 (slots, N), bounded by the grid size, not by M.
  at::Tensor part = at::empty({(need_dw ? slots : 0) + (need_db ? slots : 0), N},
                              x.options().dtype(at::kFloat));
  if (c.iters == 0) part.zero_();
  float* dwp = need_dw ? static_cast<float*>(part.data_ptr()) : nullptr;
  float* dbp = need_db ? static_cast<float*>(part.data_ptr()) + (need_dw ? slots * N : 0) : nullptr;
  const T* dyp = static_cast<const T*>(dy.data_ptr());
  const T* xp = static_cast<const T*>(x.data_ptr());
  const T* wp = static_cast<const T*>(ptr_or_null(weight));
  const T* dsp = static_cast<const T*>(ptr_or_null(dsummed));
  const float* mp = static_cast<const float*>(mean.data_ptr());
  const float* rp = static_cast<const float*>(rstd.data_ptr());
  T* dxp = static_cast<T*>(dx.data_ptr());
  const int64_t sds = dsummed != nullptr ? dsummed->stride(0) : 0;
  if (M > 0) {
    if (c.iters == 0) {
      layer_norm_bwd_looped_kernel<T><<<grid, 1024, 0, stream>>>(dyp, xp, wp, mp, rp, dsp, dxp, dwp, dbp, dy.stride(0),
                                                                 x.stride(0), sds, M, N);
    } else {
      const dim3 block(c.tpr, c.rows);
      dispatch_vec_iters<T, 16>(c, [&](auto vec, auto iters) {
        layer_norm_bwd_kernel<T, decltype(vec)::value, decltype(iters)::value><<<grid, block, 0, stream>>>(
            dyp, xp, wp, mp, rp, dsp, dxp, dwp, dbp, dy.stride(0), x.stride(0), sds, M, N);
      });
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else if (need_dw || need_db) {
    part.zero_();
  }
  if (need_dw || need_db) {
    // slots (>= 1) in `slices` ranges of `per`; stage: (slices, N) per reduced tensor
    const int64_t per = (slots + kColumnSlices - 1) / kColumnSlices;
    const int64_t slices = (slots + per - 1) / per;
    at::Tensor stage = at::empty({(need_dw ? slices : 0) + (need_db ? slices : 0), N}, x.options().dtype(at::kFloat));
    float* sw = static_cast<float*>(stage.data_ptr());
    float* sb = sw + (need_dw ? slices * N : 0);
    const dim3 block(32, 8);
    const int cgrid = (N + 31) / 32;
    const dim3 sgrid(cgrid, static_cast<unsigned>(slices));
    if (need_dw) {
      column_sum_kernel<float><<<sgrid, block, 0, stream>>>(dwp, sw, slots, per, N);
      column_sum_kernel<T><<<cgrid, block, 0, stream>>>(sw, static_cast<T*>(dweight.data_ptr()), slices, slices, N);
    }
    if (need_db) {
      column_sum_kernel<float><<<sgrid, block, 0, stream>>>(dbp, sb, slots, per, N);
      column_sum_kernel<T><<<cgrid, block, 0, stream>>>(sb, static_cast<T*>(dbias.data_ptr()), slices, slices, N);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

#define FASTLM_LN_DISPATCH(dtype, ...)                                                  \
  switch (dtype) {                                                                     \
    case at::kFloat: { using T = float; __VA_ARGS__; break; }                          \
    case at::kHalf: { using T = c10::Half; __VA_ARGS__; break; }                       \
    case at::kBFloat16: { using T = c10::BFloat16; __VA_ARGS__; break; }               \
    default: TORCH_CHECK(false, "fastlm: layer_norm (cuda): unsupported dtype ", dtype); \
  }

void layer_norm_fwd_launch(const at::Tensor& x, const at::Tensor* residual, const at::Tensor* weight,
                           const at::Tensor* bias, float eps, const at::Tensor& out, const at::Tensor& summed,
                           const at::Tensor& mean, const at::Tensor& rstd) {
  if (x.size(0) == 0) return;
  FASTLM_LN_DISPATCH(x.scalar_type(), fwd_impl<T>(x, residual, weight, bias, eps, out, summed, mean, rstd));
}

void layer_norm_bwd_launch(const at::Tensor& dy, const at::Tensor& x, const at::Tensor* weight,
                           const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor* dsummed,
                           const at::Tensor& dx, const at::Tensor& dweight, const at::Tensor& dbias) {
  FASTLM_LN_DISPATCH(x.scalar_type(), bwd_impl<T>(dy, x, weight, mean, rstd, dsummed, dx, dweight, dbias));
}

}  // namespace fastlm::cuda

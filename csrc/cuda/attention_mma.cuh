// Tensor-core helpers shared by the flash-attention forward (attention_mma.cu) and backward
// (attention_mma_bwd.cu): fp16/bf16 mma.sync.m16n8k16 on raw 16-bit patterns, ldmatrix, cp.async and the
// zero-filling shared-memory tile loader. The fragment layouts these rely on are written out at the top
// of attention_mma.cu. Included only by .cu files (for pre-sm80 targets the helpers trap, see below).
#pragma once
#include <ATen/core/Tensor.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

// cp.async and the bf16 / m16n8k16 mma need sm80. A pre-sm80 target in the arch list (setup.py honours
// TORCH_CUDA_ARCH_LIST, e.g. "7.5") would make ptxas reject these files and so the whole build; for such a
// target the helpers compile to a trap instead. Those images never run: the launchers decline devices
// below sm80 and, through mma_image_ok, an image compiled from pre-sm80 PTX (JIT on a newer device).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define FASTLM_MMA_PRE_SM80 1
#else
#define FASTLM_MMA_PRE_SM80 0
#endif

namespace fastlm::cuda::mma {

constexpr int kSmemPad = 8;           // b16 elements of padding per shared row: 16 bytes, so the 8 row
                                      // addresses of one ldmatrix fall in distinct bank groups
constexpr float kLog2e = 1.4426950408889634f;

// fp16 / bf16 conversions and the matching mma instruction, on raw 16-bit patterns.
template <bool kBf16>
struct Dtype;

template <>
struct Dtype<false> {
  static __device__ __forceinline__ float to_float(uint16_t x) { return __half2float(__ushort_as_half(x)); }
  static __device__ __forceinline__ uint16_t from_float(float x) { return __half_as_ushort(__float2half_rn(x)); }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);  // lo in the low 16 bits
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if FASTLM_MMA_PRE_SM80
    __trap();
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
  }
};

template <>
struct Dtype<true> {
  static __device__ __forceinline__ float to_float(uint16_t x) { return __bfloat162float(__ushort_as_bfloat16(x)); }
  static __device__ __forceinline__ uint16_t from_float(float x) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(x));
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);  // lo in the low 16 bits
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if FASTLM_MMA_PRE_SM80
    __trap();
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
  }
};

__device__ __forceinline__ float neg_inf() { return -__int_as_float(0x7f800000); }

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
#if FASTLM_MMA_PRE_SM80
  __trap();
  r[0] = r[1] = r[2] = r[3] = 0u;
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#endif
}

__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], uint32_t addr) {
#if FASTLM_MMA_PRE_SM80
  __trap();
  r[0] = r[1] = r[2] = r[3] = 0u;
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#endif
}

#if FASTLM_MMA_PRE_SM80
__device__ __forceinline__ void cp_async_16(void*, const void*) { __trap(); }
__device__ __forceinline__ void cp_async_commit() {}
__device__ __forceinline__ void cp_async_wait_all() {}
#else
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(smem)), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }
#endif

// Stage rows [r0, r0 + ROWS) of a (rows, D) slice with row stride `rs` into shared memory as a
// ROWS x DP tile (row stride DP + kSmemPad), zero-filling rows >= rows and columns >= D, so padded
// head dims and out-of-range keys/queries contribute exact zeros to the products. Chunks of 8
// elements: cp.async when the chunk is whole and 16-byte aligned (vec), else bounds-checked loads.
template <int DP, int ROWS, int THREADS>
__device__ __forceinline__ void load_tile(uint16_t* tile, const uint16_t* src, int64_t rs, int64_t r0, int64_t rows,
                                          int D, bool vec) {
  constexpr int kChunks = DP / 8;
  constexpr int kStride = DP + kSmemPad;
  for (int c = threadIdx.x; c < ROWS * kChunks; c += THREADS) {
    const int r = c / kChunks, col = (c % kChunks) * 8;
    uint16_t* dst = tile + r * kStride + col;
    const int64_t row = r0 + r;
    if (row < rows && col < D) {
      const uint16_t* g = src + row * rs + col;
      if (vec && col + 8 <= D) {
        cp_async_16(dst, g);
      } else {
        uint32_t w[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const uint32_t lo = col + 2 * e < D ? g[2 * e] : 0u;
          const uint32_t hi = col + 2 * e + 1 < D ? g[2 * e + 1] : 0u;
          w[e] = lo | (hi << 16);
        }
        *reinterpret_cast<uint4*>(dst) = make_uint4(w[0], w[1], w[2], w[3]);
      }
    } else {
      *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
    }
  }
}

// True when the image of `kernel` that runs on the current device was compiled for sm80+ (ptxVersion: its
// virtual architecture, x10). False for an image JIT-compiled from pre-sm80 PTX (the trapping helpers
// above) and when the build has no image for the device (that error is cleared: the caller falls back).
inline bool mma_image_ok(const void* kernel) {
  cudaFuncAttributes attr{};
  if (cudaFuncGetAttributes(&attr, kernel) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return attr.ptxVersion >= 80;
}

// True when t (4-D, last dim contiguous) can be read as aligned 16-byte chunks of 8 elements per row.
inline bool aligned16(const at::Tensor& t) {
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int d = 0; d < 3; ++d) {
    if (t.size(d) > 1 && t.stride(d) % 8 != 0) return false;
  }
  return true;
}

}  // namespace fastlm::cuda::mma

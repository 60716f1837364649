// 16-byte vector loads and stores shared by the CUDA kernels: VEC elements of T moved as one
// aligned access (VEC = 16 / sizeof(T)), converted to/from fp32 registers. Callers check alignment
// and that the vector lies inside the row before using them.
#pragma once

namespace fastlm::cuda {

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T val[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void load_float(const T* p, float (&out)[VEC]) {
  const Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = static_cast<float>(pk.val[i]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_float(T* p, const float (&in)[VEC]) {
  Pack<T, VEC> pk;
#pragma unroll
  for (int i = 0; i < VEC; ++i) pk.val[i] = static_cast<T>(in[i]);
  *reinterpret_cast<Pack<T, VEC>*>(p) = pk;
}

}  // namespace fastlm::cuda

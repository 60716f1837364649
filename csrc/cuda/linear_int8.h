// CUDA weight-only int8 GEMV launcher (csrc/cuda/linear_int8.cu). Inputs are checked and the output
// allocated by the caller (linear_int8_cuda.cpp); runs on the current stream.
#pragma once
#include <ATen/core/Tensor.h>

namespace fastlm::cuda {

constexpr int64_t kInt8MaxRows = 16;  // the GEMV's row bound (fastlm/ops/linear_int8.py _FEW_ROWS)

// x (M, K) with a contiguous last dim, M <= kInt8MaxRows; qweight (N, K) int8 contiguous; scale (N,)
// fp32; bias (N,) like x or nullptr; out (M, N) like x, contiguous.
void linear_int8_launch(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                        const at::Tensor* bias, const at::Tensor& out);

}  // namespace fastlm::cuda

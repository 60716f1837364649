// CUDA LayerNorm launchers (csrc/cuda/layer_norm.cu). Outputs are allocated and inputs checked by
// the caller (layer_norm_cuda.cpp); launchers run on the current stream of the tensors' device.
#pragma once
#include <ATen/core/Tensor.h>

namespace fastlm::cuda {

// x, residual (nullable), out, summed: (M, N) rows, last dim contiguous; weight/bias (N,) nullable;
// mean/rstd (M,) fp32.
void layer_norm_fwd_launch(const at::Tensor& x, const at::Tensor* residual, const at::Tensor* weight,
                           const at::Tensor* bias, float eps, const at::Tensor& out, const at::Tensor& summed,
                           const at::Tensor& mean, const at::Tensor& rstd);

// dx = LN backward (+ dsummed); dweight/dbias (N,) from a bounded (slots, N) fp32 partial buffer
// reduced in a second kernel. dweight/dbias may be undefined when not requested.
void layer_norm_bwd_launch(const at::Tensor& dy, const at::Tensor& x, const at::Tensor* weight,
                           const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor* dsummed,
                           const at::Tensor& dx, const at::Tensor& dweight, const at::Tensor& dbias);

}  // namespace fastlm::cuda

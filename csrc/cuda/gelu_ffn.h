// CUDA launchers of the GELU feed-forward's fused elementwise kernels (csrc/cuda/gelu_ffn.cu). The
// GEMMs are cuBLAS (at::mm in gelu_ffn_cuda.cpp); these kernels are what cuBLAS(Lt) lacks: the exact
// GELU, the stored pre-activation and the backward's dGELU. Outputs are allocated and inputs checked
// by the caller; launchers run on the current stream of the tensors' device.
#pragma once
#include <ATen/core/Tensor.h>

namespace fastlm::cuda {

// h (M, F) rows with a contiguous last dim, in place: h <- gelu(h + bias); pre (M, F), when not null,
// <- h + bias (the pre-activation the backward needs). bias (F,) may be null.
void bias_gelu_launch(const at::Tensor& h, const at::Tensor* bias, const at::Tensor* pre, bool tanh_approx);

// d (M, F) in place: d <- d * gelu'(pre) (dact -> dpre); act (M, F), when not null, <- gelu(pre);
// dbias (F,), when not null, <- the column sums of the new d (fp32 partials per row slot, reduced in
// a second kernel: deterministic, no atomics). With no rows nothing is written: the caller zero-fills dbias.
void dgelu_launch(const at::Tensor& d, const at::Tensor& pre, const at::Tensor* act, const at::Tensor* dbias,
                  bool tanh_approx);

}  // namespace fastlm::cuda

// CUDA registrations of the LayerNorm ops: input checks, output allocation, launch
// (kernels in layer_norm.cu).
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common.h"
#include "layer_norm_checks.h"
#include "cuda/layer_norm.h"

namespace fastlm::cuda {
namespace {

constexpr const char* kFwd = "layer_norm_fwd (cuda)";
constexpr const char* kBwd = "layer_norm_bwd (cuda)";

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps) {
  check_layer_norm_fwd_args(x, residual, weight, bias, /*is_cuda=*/true, kFwd);
  const int64_t M = x.size(0), N = x.size(1);
  c10::cuda::CUDAGuard guard(x.device());
  auto out = new_output({M, N}, x.options());
  auto summed = new_output({opt_ptr(residual) ? M : 0, N}, x.options());
  auto mean = new_output({M}, x.options().dtype(at::kFloat));
  auto rstd = new_output({M}, x.options().dtype(at::kFloat));
  layer_norm_fwd_launch(x, opt_ptr(residual), opt_ptr(weight), opt_ptr(bias), static_cast<float>(eps), out, summed,
                        mean, rstd);
  return {out, summed, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cuda(
    const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& weight, const at::Tensor& mean,
    const at::Tensor& rstd, const std::optional<at::Tensor>& dsummed, bool has_bias) {
  check_layer_norm_bwd_args(dy, x, weight, mean, rstd, dsummed, /*is_cuda=*/true, kBwd);
  const int64_t M = x.size(0), N = x.size(1);
  c10::cuda::CUDAGuard guard(x.device());
  auto dx = new_output({M, N}, x.options());
  auto dweight = new_output({opt_ptr(weight) ? N : 0}, x.options());
  auto dbias = new_output({has_bias ? N : 0}, x.options());
  layer_norm_bwd_launch(dy, x, opt_ptr(weight), mean, rstd, opt_ptr(dsummed), dx, dweight, dbias);
  return {dx, dweight, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlm_C, CUDA, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd_cuda);
  m.impl("layer_norm_bwd", &layer_norm_bwd_cuda);
}

}  // namespace fastlm::cuda

// Argument checks of the LayerNorm ops, shared by the CPU and CUDA registrations (both throw the
// same messages for the same bad call).
#pragma once
#include "common.h"

namespace fastlm {

// x (M, N) [+ residual (M, N)], weight/bias (N,): same dtype and device, last dims contiguous.
inline void check_layer_norm_fwd_args(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                      const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                      bool is_cuda, const char* op) {
  check_rows(x, op, "x");
  FASTLM_CHECK(x.is_cuda() == is_cuda, op, "x must be a ", is_cuda ? "CUDA" : "CPU", " tensor, got ", x.device());
  const int64_t N = x.size(1);
  FASTLM_CHECK(N > 0 && N < (int64_t{1} << 30), op, "x must have between 1 and 2^30 columns, got ", N);
  if (auto r = opt_ptr(residual)) {
    check_rows(*r, op, "residual");
    check_same_shape(*r, x, op, "residual");
  }
  check_vector(weight, N, x, op, "weight");
  check_vector(bias, N, x, op, "bias");
}

// dy, x [, dsummed] (M, N); weight (N,); mean, rstd (M,) contiguous fp32 on x's device.
inline void check_layer_norm_bwd_args(const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                      const at::Tensor& mean, const at::Tensor& rstd,
                                      const std::optional<at::Tensor>& dsummed, bool is_cuda, const char* op) {
  check_rows(x, op, "x");
  FASTLM_CHECK(x.is_cuda() == is_cuda, op, "x must be a ", is_cuda ? "CUDA" : "CPU", " tensor, got ", x.device());
  check_rows(dy, op, "dy");
  check_same_shape(dy, x, op, "dy");
  if (auto d = opt_ptr(dsummed)) {
    check_rows(*d, op, "dsummed");
    check_same_shape(*d, x, op, "dsummed");
  }
  const int64_t M = x.size(0), N = x.size(1);
  FASTLM_CHECK(N > 0 && N < (int64_t{1} << 30), op, "x must have between 1 and 2^30 columns, got ", N);
  check_vector(weight, N, x, op, "weight");
  for (const auto* s : {&mean, &rstd}) {
    FASTLM_CHECK(s->scalar_type() == at::kFloat && s->is_contiguous() && s->numel() == M && s->device() == x.device(),
                 op, "mean/rstd must be contiguous fp32 tensors of ", M, " elements on ", x.device());
  }
}

}  // namespace fastlm

// CUDA registration of linear_int8_fwd: input checks, output allocation, launch (kernel in
// linear_int8.cu). Per-channel scales and at most kInt8MaxRows rows (the Python op sends other calls
// to Triton or torch).
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common.h"
#include "cuda/linear_int8.h"

namespace fastlm::cuda {
namespace {

constexpr const char* kOp = "linear_int8_fwd (cuda)";

at::Tensor linear_int8_fwd_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                                const std::optional<at::Tensor>& bias) {
  check_rows(x, kOp, "x");
  FASTLM_CHECK(x.is_cuda(), kOp, "x must be a CUDA tensor, got ", x.device());
  FASTLM_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kChar, kOp,
               "qweight must be a 2-D int8 tensor, got ", qweight.scalar_type(), " ", qweight.sizes());
  FASTLM_CHECK(qweight.device() == x.device(), kOp, "qweight is on ", qweight.device(), ", expected ", x.device());
  FASTLM_CHECK(qweight.is_contiguous(), kOp, "qweight must be contiguous");
  const int64_t M = x.size(0), N = qweight.size(0), K = qweight.size(1);
  FASTLM_CHECK(x.size(1) == K, kOp, "x has ", x.size(1), " columns, qweight's in_features is ", K);
  FASTLM_CHECK(M <= kInt8MaxRows, kOp, "at most ", kInt8MaxRows, " rows (a GEMV), got ", M);
  FASTLM_CHECK(scale.dim() == 1 && scale.size(0) == N && scale.scalar_type() == at::kFloat && scale.is_contiguous(),
               kOp, "scale must be a contiguous float32 (", N, ",) tensor (per-channel), got ", scale.scalar_type(),
               " ", scale.sizes());
  FASTLM_CHECK(scale.device() == x.device(), kOp, "scale is on ", scale.device(), ", expected ", x.device());
  check_vector(bias, N, x, kOp, "bias");
  c10::cuda::CUDAGuard guard(x.device());
  auto out = new_output({M, N}, x.options());
  if (out.numel() == 0) return out;
  if (K == 0) return out.copy_(bias.has_value() && bias->defined() ? bias->unsqueeze(0).expand({M, N})
                                                                    : at::zeros({M, N}, x.options()));
  linear_int8_launch(x, qweight, scale, opt_ptr(bias), out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlm_C, CUDA, m) { m.impl("linear_int8_fwd", &linear_int8_fwd_cuda); }

}  // namespace fastlm::cuda

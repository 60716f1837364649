// CUDA registrations of the GELU feed-forward ops: input checks, output allocation, the GEMMs on
// cuBLAS (at::mm / at::addmm on the current stream) and fastlm's fused elementwise kernels between
// them (gelu_ffn.cu): bias+GELU (+ the stored pre-activation) after the first GEMM, and the backward's
// dGELU (+ gelu(pre) for dW2, + the bias gradient) after the dy @ W2 GEMM. When nothing needs the
// pre-activation (inference) and the GELU is the tanh form, the first GEMM runs through cuBLASLt's
// own bias+GELU epilogue (at::_addmm_activation), which computes exactly that.
#include <ATen/ops/_addmm_activation.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <string_view>

#include "common.h"
#include "cuda/gelu_ffn.h"
#include "gelu_ffn_checks.h"

namespace fastlm::cuda {
namespace {

constexpr const char* kLgFwd = "linear_gelu_fwd (cuda)";
constexpr const char* kLgBwd = "linear_gelu_bwd (cuda)";
constexpr const char* kFfnFwd = "gelu_ffn_fwd (cuda)";
constexpr const char* kFfnBwd = "gelu_ffn_bwd (cuda)";

void check_input(const at::Tensor& x, const char* op) {
  check_rows(x, op, "x");
  FASTLM_CHECK(x.is_cuda(), op, "x must be a CUDA tensor, got ", x.device());
}

// c = a @ b into a preallocated row- or column-major c (column-major: c^T = b^T @ a^T, row-major).
void mm_into(const at::Tensor& c, const at::Tensor& a, const at::Tensor& b) {
  if (!c.is_contiguous() && c.t().is_contiguous()) {
    auto ct = c.t();
    at::mm_out(ct, b.t(), a.t());
  } else {
    auto out = c;
    at::mm_out(out, a, b);
  }
}

void check_like(const at::Tensor& t, int64_t rows, int64_t cols, const at::Tensor& like, const char* op,
                const char* name) {
  check_rows(t, op, name);
  FASTLM_CHECK(t.size(0) == rows && t.size(1) == cols, op, name, " must have shape (", rows, ", ", cols, "), got ",
               t.sizes());
  check_same(t, like, op, name);
}

// act = gelu(x @ w^T + bias), pre = x @ w^T + bias when save_pre; act and pre preallocated (M, F).
void first_layer(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias, bool tanh_approx,
                 bool save_pre, at::Tensor& act, const at::Tensor& pre) {
  if (x.size(0) == 0) return;
  if (tanh_approx && !save_pre && opt_ptr(bias) != nullptr) {
    at::_addmm_activation_out(act, *bias, x, w.t(), 1, 1, /*use_gelu=*/true);
    return;
  }
  at::mm_out(act, x, w.t());
  bias_gelu_launch(act, opt_ptr(bias), save_pre ? &pre : nullptr, tanh_approx);
}

std::tuple<at::Tensor, at::Tensor> linear_gelu_fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                        const std::optional<at::Tensor>& bias,
                                                        c10::string_view approximate, bool save_pre) {
  const bool tanh_approx = parse_approximate(approximate, kLgFwd);
  check_input(x, kLgFwd);
  const int64_t M = x.size(0), K = x.size(1);
  FASTLM_CHECK(weight.dim() == 2, kLgFwd, "weight must be 2-D, got ", weight.sizes());
  const int64_t N = weight.size(0);
  check_weight(weight, N, K, x, kLgFwd, "weight");
  check_vector(bias, N, x, kLgFwd, "bias");
  c10::cuda::CUDAGuard guard(x.device());
  auto out = new_output({M, N}, x.options());
  auto pre = new_output({save_pre ? M : 0, N}, x.options());
  first_layer(x, weight, bias, tanh_approx, save_pre, out, pre);
  return {out, pre};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_gelu_bwd_cuda(const at::Tensor& dy, const at::Tensor& x,
                                                                    const at::Tensor& weight, const at::Tensor& pre,
                                                                    c10::string_view approximate, bool has_bias) {
  const bool tanh_approx = parse_approximate(approximate, kLgBwd);
  check_input(x, kLgBwd);
  const int64_t M = x.size(0), K = x.size(1);
  FASTLM_CHECK(weight.dim() == 2, kLgBwd, "weight must be 2-D, got ", weight.sizes());
  const int64_t N = weight.size(0);
  check_weight(weight, N, K, x, kLgBwd, "weight");
  check_like(dy, M, N, x, kLgBwd, "dy");
  check_like(pre, M, N, x, kLgBwd, "pre");
  c10::cuda::CUDAGuard guard(x.device());
  auto dpre = at::empty({M, N}, x.options());
  if (M > 0) dpre.copy_(dy);
  auto dbias = has_bias ? (M > 0 ? new_output({N}, x.options()) : at::zeros({N}, x.options()))
                        : at::empty({0}, x.options());
  dgelu_launch(dpre, pre, nullptr, has_bias ? &dbias : nullptr, tanh_approx);
  auto dx = new_output({M, K}, x.options());
  auto dweight = new_weight_grad(weight);
  at::mm_out(dx, dpre, weight);
  mm_into(dweight, dpre.t(), x);
  return {dx, dweight, dbias};
}

std::tuple<at::Tensor, at::Tensor> gelu_ffn_fwd_cuda(const at::Tensor& x, const at::Tensor& fc1_weight,
                                                     const std::optional<at::Tensor>& fc1_bias,
                                                     const at::Tensor& fc2_weight,
                                                     const std::optional<at::Tensor>& fc2_bias,
                                                     c10::string_view approximate, bool save_pre) {
  const bool tanh_approx = parse_approximate(approximate, kFfnFwd);
  check_input(x, kFfnFwd);
  const int64_t M = x.size(0), K = x.size(1);
  FASTLM_CHECK(fc1_weight.dim() == 2 && fc2_weight.dim() == 2, kFfnFwd, "fc1_weight and fc2_weight must be 2-D");
  const int64_t F = fc1_weight.size(0), N = fc2_weight.size(0);
  check_weight(fc1_weight, F, K, x, kFfnFwd, "fc1_weight");
  check_weight(fc2_weight, N, F, x, kFfnFwd, "fc2_weight");
  check_vector(fc1_bias, F, x, kFfnFwd, "fc1_bias");
  check_vector(fc2_bias, N, x, kFfnFwd, "fc2_bias");
  c10::cuda::CUDAGuard guard(x.device());
  auto out = new_output({M, N}, x.options());
  auto pre = new_output({save_pre ? M : 0, F}, x.options());
  auto act = at::empty({M, F}, x.options());
  first_layer(x, fc1_weight, fc1_bias, tanh_approx, save_pre, act, pre);
  if (auto b2 = opt_ptr(fc2_bias)) {
    at::addmm_out(out, *b2, act, fc2_weight.t());
  } else {
    at::mm_out(out, act, fc2_weight.t());
  }
  return {out, pre};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gelu_ffn_bwd_cuda(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& fc1_weight, const at::Tensor& fc2_weight,
    const at::Tensor& pre, c10::string_view approximate, bool has_fc1_bias, bool has_fc2_bias) {
  const bool tanh_approx = parse_approximate(approximate, kFfnBwd);
  check_input(x, kFfnBwd);
  const int64_t M = x.size(0), K = x.size(1);
  FASTLM_CHECK(fc1_weight.dim() == 2 && fc2_weight.dim() == 2, kFfnBwd, "fc1_weight and fc2_weight must be 2-D");
  const int64_t F = fc1_weight.size(0), N = fc2_weight.size(0);
  check_weight(fc1_weight, F, K, x, kFfnBwd, "fc1_weight");
  check_weight(fc2_weight, N, F, x, kFfnBwd, "fc2_weight");
  check_like(dy, M, N, x, kFfnBwd, "dy");
  check_like(pre, M, F, x, kFfnBwd, "pre");
  c10::cuda::CUDAGuard guard(x.device());
  auto dx = new_output({M, K}, x.options());
  auto dw1 = new_weight_grad(fc1_weight);
  auto dw2 = new_weight_grad(fc2_weight);
  auto db1 = has_fc1_bias ? (M > 0 ? new_output({F}, x.options()) : at::zeros({F}, x.options()))
                          : at::empty({0}, x.options());
  auto dpre = at::empty({M, F}, x.options());  // dy @ W2, turned into dpre in place
  auto act = at::empty({M, F}, x.options());   // gelu(pre), for dW2
  at::mm_out(dpre, dy, fc2_weight);
  dgelu_launch(dpre, pre, &act, has_fc1_bias ? &db1 : nullptr, tanh_approx);
  mm_into(dw2, dy.t(), act);
  mm_into(dw1, dpre.t(), x);
  at::mm_out(dx, dpre, fc1_weight);
  auto db2 = has_fc2_bias ? at::sum(dy, {0}, false, at::kFloat).to(x.scalar_type()) : at::empty({0}, x.options());
  return {dx, dw1, db1, dw2, db2};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlm_C, CUDA, m) {
  m.impl("linear_gelu_fwd", &linear_gelu_fwd_cuda);
  m.impl("linear_gelu_bwd", &linear_gelu_bwd_cuda);
  m.impl("gelu_ffn_fwd", &gelu_ffn_fwd_cuda);
  m.impl("gelu_ffn_bwd", &gelu_ffn_bwd_cuda);
}

}  // namespace fastlm::cuda

// Input checks shared by every C++ op (CPU and CUDA registrations). Each check names the argument,
// so a bad call fails with "fastlm: <op>: <arg> must ..." instead of a crash or a silent wrong answer.
// Python validates first (ValueError/TypeError); these TORCH_CHECKs guard direct torch.ops calls.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <ATen/ops/empty.h>
#include <limits>
#include <optional>

#define FASTLM_CHECK(cond, op, ...) TORCH_CHECK(cond, "fastlm: ", op, ": ", __VA_ARGS__)

namespace fastlm {

inline bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// A 2-D tensor whose rows may be strided but whose last dimension is contiguous.
inline void check_rows(const at::Tensor& t, const char* op, const char* name) {
  FASTLM_CHECK(t.defined(), op, name, " is undefined");
  FASTLM_CHECK(t.dim() == 2, op, name, " must be 2-D (rows, cols), got ", t.dim(), "-D");
  FASTLM_CHECK(is_float_type(t.scalar_type()), op, name, " must be float32, float16 or bfloat16, got ",
               t.scalar_type());
  FASTLM_CHECK(t.size(1) <= 1 || t.stride(1) == 1, op, name, " must be contiguous in its last dimension");
}

inline void check_same(const at::Tensor& t, const at::Tensor& like, const char* op, const char* name) {
  FASTLM_CHECK(t.scalar_type() == like.scalar_type(), op, name, " has dtype ", t.scalar_type(),
               ", expected ", like.scalar_type());
  FASTLM_CHECK(t.device() == like.device(), op, name, " is on ", t.device(), ", expected ", like.device());
}

inline void check_vector(const std::optional<at::Tensor>& t, int64_t n, const at::Tensor& like, const char* op,
                         const char* name) {
  if (!t.has_value() || !t->defined()) return;
  FASTLM_CHECK(t->dim() == 1 && t->size(0) == n, op, name, " must have shape (", n, ",), got ", t->sizes());
  FASTLM_CHECK(t->is_contiguous(), op, name, " must be contiguous");
  check_same(*t, like, op, name);
}

inline void check_same_shape(const at::Tensor& t, const at::Tensor& like, const char* op, const char* name) {
  FASTLM_CHECK(t.sizes() == like.sizes(), op, name, " has shape ", t.sizes(), ", expected ", like.sizes());
  check_same(t, like, op, name);
}

// Test hook: when set (fastlm.testing.poison_outputs), new_output fills every output with NaN before
// the kernel runs, so an element a kernel forgets to write fails the parity tests.
inline bool& poison_outputs_flag() {
  static bool flag = false;
  return flag;
}

inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  auto t = at::empty(sizes, options);
  if (poison_outputs_flag() && t.numel() > 0) t.fill_(std::numeric_limits<float>::quiet_NaN());
  return t;
}

inline const at::Tensor* opt_ptr(const std::optional<at::Tensor>& t) {
  return (t.has_value() && t->defined()) ? &*t : nullptr;
}

}  // namespace fastlm

// Dispatch over the three dtypes fastlm's kernels take (fp32, fp16, bf16); scalar_t inside.
#define FASTLM_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)                      \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                          \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

// Argument checks and the weight-gradient layout of the Linear+GELU / GELU-FFN ops, shared by the CPU
// and CUDA registrations (both throw the same messages for the same bad call).
#pragma once
#include <string>
#include <string_view>

#include "common.h"

namespace fastlm {

// "none" (erf GELU) or "tanh": returns whether it is the tanh approximation.
inline bool parse_approximate(std::string_view approximate, const char* op) {
  FASTLM_CHECK(approximate == "none" || approximate == "tanh", op, "approximate must be 'none' or 'tanh', got '",
               std::string(approximate), "'");
  return approximate == "tanh";
}

// A 2-D weight (rows, cols) of like's dtype and device, row-major (contiguous) or column-major (its
// transpose contiguous: e.g. GPT-2's Conv1D weight stored (in, out), passed as a .t() view). The GEMMs
// take either layout as it is (a transposed operand costs nothing), so no copy is ever made.
inline void check_weight(const at::Tensor& w, int64_t rows, int64_t cols, const at::Tensor& like, const char* op,
                         const char* name) {
  FASTLM_CHECK(w.dim() == 2 && w.size(0) == rows && w.size(1) == cols, op, name, " must have shape (", rows, ", ",
               cols, "), got ", w.sizes());
  FASTLM_CHECK(w.is_contiguous() || w.t().is_contiguous(), op, name,
               " must be contiguous or the transpose of a contiguous matrix, got strides ", w.strides());
  check_same(w, like, op, name);
}

// The gradient of weight w, allocated in w's layout (row- or column-major), so that autograd
// accumulates it without a layout-changing copy.
inline at::Tensor new_weight_grad(const at::Tensor& w) {
  if (w.is_contiguous()) return new_output(w.sizes(), w.options());
  return new_output({w.size(1), w.size(0)}, w.options()).t();
}

}  // namespace fastlm

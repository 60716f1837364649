// CUDA registrations of the attention ops: input checks, output allocation, launch (kernels in
// attention.cu). Dropout (seed, offset) is read from the rng CPU tensor on the host (no sync).
// FASTLM_CUDA_ATTENTION_MMA=1 routes the fp16/bf16 forward and backward to the tensor-core kernels
// (attention_mma.cu, attention_mma_bwd.cu; not yet run on a GPU, so off by default;
// scripts/gpu_check.sh runs the CUDA attention tests with it on). It is read at every call, so a
// benchmark can toggle it per contender.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>

#include "common.h"
#include "cuda/attention.h"
#include "cuda/attention_math.h"

namespace fastlm::cuda {
namespace {

constexpr const char* kFwd = "attention_fwd (cuda)";
constexpr const char* kBwd = "attention_bwd (cuda)";

// getenv is a few string compares: cheap next to a kernel launch.
bool mma_enabled() {
  const char* e = std::getenv("FASTLM_CUDA_ATTENTION_MMA");
  return e != nullptr && std::strcmp(e, "1") == 0;
}

void check_4d(const at::Tensor& t, const char* op, const char* name) {
  FASTLM_CHECK(t.dim() == 4, op, name, " must be 4-D (B, H, S, D), got ", t.dim(), "-D");
  FASTLM_CHECK(is_float_type(t.scalar_type()), op, name, " must be float32, float16 or bfloat16, got ",
               t.scalar_type());
  FASTLM_CHECK(t.size(3) <= 1 || t.stride(3) == 1, op, name, " must be contiguous in its last dimension");
  FASTLM_CHECK(t.is_cuda(), op, name, " must be a CUDA tensor, got ", t.device());
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const std::optional<at::Tensor>& mask, const char* op) {
  check_4d(q, op, "q");
  check_4d(k, op, "k");
  check_4d(v, op, "v");
  check_same(k, q, op, "k");
  check_same(v, q, op, "v");
  FASTLM_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0), op, "batch sizes differ");
  FASTLM_CHECK(k.size(3) == q.size(3), op, "k head dim ", k.size(3), " != q head dim ", q.size(3));
  FASTLM_CHECK(k.size(1) == v.size(1) && k.size(2) == v.size(2), op, "k and v shapes disagree");
  FASTLM_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, op, "q heads must be a multiple of kv heads");
  FASTLM_CHECK(q.size(3) <= 256 && v.size(3) <= 256, op, "head dims must be <= 256, got ", q.size(3), " and ",
               v.size(3));
  if (auto m = opt_ptr(mask)) {
    FASTLM_CHECK(m->dim() == 4 && m->size(0) == q.size(0) && m->size(1) == q.size(1) && m->size(2) == q.size(2) &&
                     m->size(3) == k.size(2),
                 op, "mask must be (B, H, Sq, Sk) (expanded), got ", m->sizes());
    check_same(*m, q, op, "mask");
  }
}

AttentionArgs make_args(double scale, bool causal, double dropout_p, const std::optional<at::Tensor>& rng,
                        const char* op) {
  AttentionArgs a;
  a.scale = static_cast<float>(scale);
  a.causal = causal;
  if (dropout_p > 0.0) {
    FASTLM_CHECK(dropout_p < 1.0, op, "dropout_p must be < 1, got ", dropout_p);
    FASTLM_CHECK(rng.has_value() && rng->defined() && rng->device().is_cpu() && rng->scalar_type() == at::kLong &&
                     rng->numel() == 2,
                 op, "rng must be an int64 CPU tensor (seed, offset) when dropout_p > 0");
    auto r = rng->contiguous();
    a.dropout = true;
    a.seed = static_cast<uint64_t>(r.data_ptr<int64_t>()[0]);
    a.offset = static_cast<uint64_t>(r.data_ptr<int64_t>()[1]);
    a.threshold = attention_dropout_threshold(dropout_p);
    a.inv_keep = static_cast<float>(1.0 / (1.0 - dropout_p));
  }
  return a;
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      const std::optional<at::Tensor>& mask, double scale,
                                                      bool is_causal, double dropout_p,
                                                      const std::optional<at::Tensor>& rng) {
  check_inputs(q, k, v, mask, kFwd);
  const AttentionArgs args = make_args(scale, is_causal, dropout_p, rng, kFwd);
  c10::cuda::CUDAGuard guard(q.device());
  auto out = new_output({q.size(0), q.size(1), q.size(2), v.size(3)}, q.options());
  auto lse = new_output({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  // The tensor-core kernel declines (returns false) what it does not cover: fp32, dropout, Dv != D.
  if (!(mma_enabled() && attention_fwd_mma_launch(q, k, v, opt_ptr(mask), args, out, lse))) {
    attention_fwd_launch(q, k, v, opt_ptr(mask), args, out, lse);
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& mask, double scale, bool is_causal, double dropout_p,
    const std::optional<at::Tensor>& rng) {
  check_inputs(q, k, v, mask, kBwd);
  check_4d(dout, kBwd, "dout");
  check_4d(out, kBwd, "out");
  check_same(dout, q, kBwd, "dout");
  check_same(out, q, kBwd, "out");
  const auto osz = std::vector<int64_t>{q.size(0), q.size(1), q.size(2), v.size(3)};
  FASTLM_CHECK(dout.sizes() == at::IntArrayRef(osz) && out.sizes() == at::IntArrayRef(osz), kBwd,
               "dout and out must be (B, H, Sq, Dv)");
  FASTLM_CHECK(lse.scalar_type() == at::kFloat && lse.is_cuda() && lse.dim() == 3 && lse.size(0) == q.size(0) &&
                   lse.size(1) == q.size(1) && lse.size(2) == q.size(2),
               kBwd, "lse must be fp32 CUDA (B, H, Sq)");
  const AttentionArgs args = make_args(scale, is_causal, dropout_p, rng, kBwd);
  c10::cuda::CUDAGuard guard(q.device());
  auto lse_c = lse.contiguous();
  auto dq = new_output(q.sizes(), q.options());
  auto dk = new_output(k.sizes(), k.options());
  auto dv = new_output(v.sizes(), v.options());
  auto delta = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  // The tensor-core backward declines (returns false) fp32, dropout, Dv != D and D > 128.
  if (!(mma_enabled() &&
        attention_bwd_mma_launch(dout, q, k, v, out, lse_c, opt_ptr(mask), args, delta, dq, dk, dv))) {
    attention_bwd_launch(dout, q, k, v, out, lse_c, opt_ptr(mask), args, delta, dq, dk, dv);
  }
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlm_C, CUDA, m) {
  m.impl("attention_fwd", &attention_fwd_cuda);
  m.impl("attention_bwd", &attention_bwd_cuda);
}

}  // namespace fastlm::cuda

// CUDA flash-attention launchers (csrc/cuda/attention.cu). Inputs are checked and outputs allocated
// by the caller (attention_cuda.cpp); launchers run on the current stream of the tensors' device.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>

namespace fastlm::cuda {

struct AttentionArgs {
  float scale = 1.f;
  bool causal = false;
  bool dropout = false;      // dropout mask from cuda/attention_math.h
  uint64_t seed = 0, offset = 0;
  uint32_t threshold = 0;    // attention_dropout_threshold(p)
  float inv_keep = 1.f;      // 1 / (1 - p)
};

// q (B, H, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv) with contiguous last dims; mask (nullable)
// additive (B, H, Sq, Sk) of q's dtype, any strides; out (B, H, Sq, Dv) and lse (B, H, Sq) fp32
// contiguous. D, Dv <= 256.
void attention_fwd_launch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor* mask,
                          const AttentionArgs& args, const at::Tensor& out, const at::Tensor& lse);

// Tensor-core forward (csrc/cuda/attention_mma.cu; mma.sync + ldmatrix + cp.async, sm80+), same contract
// as attention_fwd_launch. Returns false, launching nothing, for calls outside its scope (fp32, dropout,
// Dv != D, pre-sm80 devices); the caller then uses attention_fwd_launch. attention_cuda.cpp uses it only
// when FASTLM_CUDA_ATTENTION_MMA=1 (read at every call, so a benchmark can toggle it): not yet run on a
// GPU; scripts/gpu_check.sh runs the CUDA attention tests with it on.
bool attention_fwd_mma_launch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor* mask,
                              const AttentionArgs& args, const at::Tensor& out, const at::Tensor& lse);

// dout, out like the forward's out (contiguous last dims); delta: (B, H, Sq) fp32 scratch;
// dq, dk, dv contiguous, shaped like q, k, v (dk, dv summed over each GQA group).
void attention_bwd_launch(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const at::Tensor& out, const at::Tensor& lse, const at::Tensor* mask,
                          const AttentionArgs& args, const at::Tensor& delta, const at::Tensor& dq,
                          const at::Tensor& dk, const at::Tensor& dv);

// Tensor-core backward (csrc/cuda/attention_mma_bwd.cu; FA2 scheme: a dQ pass per query tile and a
// dK/dV pass per key tile, no atomics), same contract as attention_bwd_launch. Returns false, launching
// nothing, for calls outside its scope (fp32, dropout, Dv != D, D > 128, non-contiguous lse/delta/outputs,
// pre-sm80 devices); the caller then uses attention_bwd_launch. Gated like the forward by
// FASTLM_CUDA_ATTENTION_MMA=1; not yet run on a GPU.
bool attention_bwd_mma_launch(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& out, const at::Tensor& lse, const at::Tensor* mask,
                              const AttentionArgs& args, const at::Tensor& delta, const at::Tensor& dq,
                              const at::Tensor& dk, const at::Tensor& dv);

}  // namespace fastlm::cuda

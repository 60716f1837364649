// CUDA decode-attention launcher (csrc/cuda/decode.cu). Inputs are checked and the output and the
// fp32 split buffers allocated by the caller (decode_cuda.cpp); runs on the current stream.
#pragma once
#include <ATen/core/Tensor.h>

namespace fastlm::cuda {

// How many chunks each (row, head) is split into for this device: enough warps to fill every SM
// even at batch 1 (fastlm::decode_num_splits, csrc/decode_math.h).
int decode_attention_num_splits(int64_t batch_heads, int64_t s_max, int device);

// q (B, H, D) contiguous; k/v caches (B, Hkv, S_max, D) with a contiguous last dim; lens (B,) int32;
// o_part (B*H, splits, D) fp32 and lse_part (B*H, splits) fp32 scratch; out (B, H, D) like q.
void decode_attention_launch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lens,
                             float scale, int splits, const at::Tensor& o_part, const at::Tensor& lse_part,
                             const at::Tensor& out);

}  // namespace fastlm::cuda

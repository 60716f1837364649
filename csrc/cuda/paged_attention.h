// CUDA paged-attention launchers (csrc/cuda/paged_attention.cu). Inputs are checked and the output and
// the fp32 split buffers allocated by the caller (paged_attention_cuda.cpp); everything runs on the
// current stream and nothing reads a device tensor on the host (the ops can be captured in a CUDA graph).
#pragma once
#include <ATen/core/Tensor.h>

namespace fastlm::cuda {

// The launch plan of one paged_attention_fwd call, from shapes only (never from key_lens' values).
struct PagedAttentionPlan {
  int heads_per_cta;  // query heads of one kv head that a CTA takes (1, 2, 4 or 8)
  int head_chunks;    // ceil(G / heads_per_cta): CTAs per (token, kv head, split)
  int splits;         // key splits per (token, kv head); 1: no split buffers, no merge kernel
  int min_chunk;      // the fewest keys a split takes (shorter contexts leave the later splits empty)
};

// G = H / Hkv query heads per kv head; max_keys = max_blocks * block_size (the most any token reads).
PagedAttentionPlan paged_attention_plan(int64_t T, int64_t Hkv, int64_t G, int64_t max_keys, int device);

// q (T, H, D) with a contiguous last dim; caches (num_blocks, Hkv, block_size, D) contiguous;
// block_tables (R, max_blocks), seq_index (T,), key_lens (T,) int32 contiguous; out (T, H, D)
// contiguous like q. With plan.splits > 1: o_part (T * H, splits, D) and lse_part (T * H, splits) fp32
// scratch (undefined tensors otherwise).
void paged_attention_launch(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& block_tables, const at::Tensor& seq_index, const at::Tensor& key_lens,
                            float scale, const PagedAttentionPlan& plan, const at::Tensor& o_part,
                            const at::Tensor& lse_part, const at::Tensor& out);

// k_cache[s / bs, :, s % bs] = key[t] (and value) for s = slots[t]; slots (T,) int32 or int64, contiguous;
// a slot outside [0, num_blocks * bs) (-1: padding) skips its row. key/value (T, Hkv, D) any strides.
void paged_kv_write_launch(const at::Tensor& key, const at::Tensor& value, const at::Tensor& k_cache,
                           const at::Tensor& v_cache, const at::Tensor& slots);

}  // namespace fastlm::cuda

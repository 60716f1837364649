// CUDA registrations of paged_attention_fwd and paged_kv_write: input checks (shapes, dtypes, devices,
// layouts), output and split-buffer allocation, launch (kernels in paged_attention.cu). No host read
// of block_tables, seq_index, key_lens or slots: the ops can be captured in a CUDA graph. Their values
// are validated by the Python wrappers (fastlm/ops/paged_attention.py) outside capture; the kernels
// never read out of bounds on bad values (see paged_attention.cu).
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

#include "common.h"
#include "cuda/paged_attention.h"

namespace fastlm::cuda {
namespace {

constexpr const char* kAttn = "paged_attention_fwd (cuda)";
constexpr const char* kWrite = "paged_kv_write (cuda)";
constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();

void check_cache(const at::Tensor& c, const at::Tensor& like, const char* op, const char* name) {
  FASTLM_CHECK(c.dim() == 4, op, name, " must be (num_blocks, Hkv, block_size, D), got ", c.sizes());
  FASTLM_CHECK(c.is_contiguous(), op, name, " must be contiguous");
  check_same(c, like, op, name);
}

void check_int32(const at::Tensor& t, int64_t dim, const at::Tensor& like, const char* op, const char* name) {
  FASTLM_CHECK(t.scalar_type() == at::kInt, op, name, " must be int32, got ", t.scalar_type());
  FASTLM_CHECK(t.dim() == dim, op, name, " must be ", dim, "-D, got ", t.dim(), "-D");
  FASTLM_CHECK(t.is_contiguous(), op, name, " must be contiguous");
  FASTLM_CHECK(t.device() == like.device(), op, name, " is on ", t.device(), ", expected ", like.device());
}

at::Tensor paged_attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                    const at::Tensor& block_tables, const at::Tensor& seq_index,
                                    const at::Tensor& key_lens, double scale) {
  FASTLM_CHECK(q.dim() == 3, kAttn, "query must be (T, H, D), got ", q.sizes());
  FASTLM_CHECK(is_float_type(q.scalar_type()), kAttn, "query must be float32, float16 or bfloat16, got ",
               q.scalar_type());
  FASTLM_CHECK(q.is_cuda(), kAttn, "query must be a CUDA tensor, got ", q.device());
  FASTLM_CHECK(q.size(2) <= 1 || q.stride(2) == 1, kAttn, "query must be contiguous in its last dimension");
  check_cache(k_cache, q, kAttn, "k_cache");
  check_cache(v_cache, q, kAttn, "v_cache");
  FASTLM_CHECK(v_cache.sizes() == k_cache.sizes(), kAttn, "v_cache has shape ", v_cache.sizes(), ", k_cache ",
               k_cache.sizes());
  check_int32(block_tables, 2, q, kAttn, "block_tables");
  check_int32(seq_index, 1, q, kAttn, "seq_index");
  check_int32(key_lens, 1, q, kAttn, "key_lens");
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t Hkv = k_cache.size(1), bs = k_cache.size(2);
  const int64_t R = block_tables.size(0), max_blocks = block_tables.size(1);
  FASTLM_CHECK(k_cache.size(3) == D, kAttn, "k_cache has head dim ", k_cache.size(3), ", query ", D);
  FASTLM_CHECK(D > 0 && D <= 256, kAttn, "head dim must be in [1, 256], got ", D);
  FASTLM_CHECK(Hkv > 0 && H % Hkv == 0, kAttn, "query heads (", H, ") must be a multiple of cache heads (", Hkv,
               ")");
  FASTLM_CHECK(bs > 0, kAttn, "k_cache block_size must be positive");
  FASTLM_CHECK(seq_index.size(0) == T, kAttn, "seq_index must have shape (", T, ",), got ", seq_index.sizes());
  FASTLM_CHECK(key_lens.size(0) == T, kAttn, "key_lens must have shape (", T, ",), got ", key_lens.sizes());
  // The kernel keeps positions, heads and table sizes in 32-bit ints (with room for a warp's stride).
  FASTLM_CHECK(max_blocks * bs <= kIntMax - 1024, kAttn, "block_tables spans ", max_blocks, " blocks of ", bs,
               " positions: more than 2^31 - 1024");
  FASTLM_CHECK(R <= kIntMax && H <= kIntMax, kAttn, "block_tables rows (", R, ") and query heads (", H,
               ") must fit in int32");
  c10::cuda::CUDAGuard guard(q.device());
  auto out = new_output({T, H, D}, q.options());
  if (out.numel() == 0) return out;
  const PagedAttentionPlan plan = paged_attention_plan(T, Hkv, H / Hkv, max_blocks * bs, q.device().index());
  FASTLM_CHECK(T * Hkv * plan.head_chunks <= kIntMax && T * H <= kIntMax, kAttn, "too many tokens (", T,
               ") for one launch");
  at::Tensor o_part, lse_part;
  if (plan.splits > 1) {
    o_part = at::empty({T * H, plan.splits, D}, q.options().dtype(at::kFloat));
    lse_part = at::empty({T * H, plan.splits}, q.options().dtype(at::kFloat));
  }
  paged_attention_launch(q, k_cache, v_cache, block_tables, seq_index, key_lens, static_cast<float>(scale), plan,
                         o_part, lse_part, out);
  return out;
}

// k_cache[slot / bs, :, slot % bs, :] = key[t] for every t with slots[t] >= 0 (-1: padding, skipped).
void paged_kv_write_cuda(const at::Tensor& key, const at::Tensor& value, const at::Tensor& k_cache,
                         const at::Tensor& v_cache, const at::Tensor& slots) {
  FASTLM_CHECK(key.dim() == 3, kWrite, "key must be (T, Hkv, D), got ", key.sizes());
  FASTLM_CHECK(is_float_type(key.scalar_type()), kWrite, "key must be float32, float16 or bfloat16, got ",
               key.scalar_type());
  FASTLM_CHECK(key.is_cuda(), kWrite, "key must be a CUDA tensor, got ", key.device());
  FASTLM_CHECK(value.sizes() == key.sizes(), kWrite, "value has shape ", value.sizes(), ", key ", key.sizes());
  check_same(value, key, kWrite, "value");
  check_cache(k_cache, key, kWrite, "k_cache");
  check_cache(v_cache, key, kWrite, "v_cache");
  FASTLM_CHECK(v_cache.sizes() == k_cache.sizes(), kWrite, "v_cache has shape ", v_cache.sizes(), ", k_cache ",
               k_cache.sizes());
  FASTLM_CHECK(slots.scalar_type() == at::kLong || slots.scalar_type() == at::kInt, kWrite,
               "slots must be int64 or int32, got ", slots.scalar_type());
  FASTLM_CHECK(slots.dim() == 1 && slots.is_contiguous(), kWrite, "slots must be a contiguous 1-D tensor, got ",
               slots.sizes());
  FASTLM_CHECK(slots.device() == key.device(), kWrite, "slots is on ", slots.device(), ", expected ", key.device());
  const int64_t T = key.size(0), Hkv = key.size(1), D = key.size(2);
  FASTLM_CHECK(slots.size(0) == T, kWrite, "slots has ", slots.size(0), " entries, key ", T, " rows");
  FASTLM_CHECK(k_cache.size(1) == Hkv && k_cache.size(3) == D, kWrite, "k_cache (", k_cache.sizes(),
               ") does not hold key heads/dim (", Hkv, ", ", D, ")");
  FASTLM_CHECK(T <= kIntMax, kWrite, "too many rows (", T, ") for one launch");
  if (T == 0 || Hkv * D == 0 || k_cache.numel() == 0) return;
  c10::cuda::CUDAGuard guard(key.device());
  paged_kv_write_launch(key, value, k_cache, v_cache, slots);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlm_C, CUDA, m) {
  m.impl("paged_attention_fwd", &paged_attention_fwd_cuda);
  m.impl("paged_kv_write", &paged_kv_write_cuda);
}

}  // namespace fastlm::cuda

// CUDA registration of decode_attention_fwd: input checks, output and split-buffer allocation,
// launch (kernels in decode.cu). No host read of cache_seqlens: the op can be captured in a CUDA
// graph (the Python wrapper validates the lengths outside capture).
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common.h"
#include "cuda/decode.h"

namespace fastlm::cuda {
namespace {

constexpr const char* kOp = "decode_attention_fwd (cuda)";

at::Tensor decode_attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                     const at::Tensor& cache_seqlens, double scale) {
  FASTLM_CHECK(q.dim() == 3, kOp, "query must be (B, H, D), got ", q.sizes());
  FASTLM_CHECK(k_cache.dim() == 4, kOp, "key_cache must be (B, Hkv, S_max, D), got ", k_cache.sizes());
  FASTLM_CHECK(is_float_type(q.scalar_type()), kOp, "query must be float32, float16 or bfloat16");
  FASTLM_CHECK(q.is_cuda(), kOp, "query must be a CUDA tensor, got ", q.device());
  check_same_shape(v_cache, k_cache, kOp, "value_cache");
  check_same(k_cache, q, kOp, "key_cache");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  FASTLM_CHECK(k_cache.size(0) == B, kOp, "key_cache batch ", k_cache.size(0), " != query batch ", B);
  FASTLM_CHECK(k_cache.size(3) == D, kOp, "key_cache head dim ", k_cache.size(3), " != query head dim ", D);
  FASTLM_CHECK(D > 0 && D <= 256, kOp, "head dim must be in [1, 256], got ", D);
  const int64_t Hkv = k_cache.size(1), S = k_cache.size(2);
  FASTLM_CHECK(Hkv > 0 && H % Hkv == 0, kOp, "query heads ", H, " must be a multiple of kv heads ", Hkv);
  FASTLM_CHECK(k_cache.stride(3) == 1 && v_cache.stride(3) == 1, kOp, "caches must be contiguous in the head dim");
  FASTLM_CHECK(cache_seqlens.dim() == 1 && cache_seqlens.size(0) == B, kOp, "cache_seqlens must be (", B, ",), got ",
               cache_seqlens.sizes());
  FASTLM_CHECK(cache_seqlens.scalar_type() == at::kInt || cache_seqlens.scalar_type() == at::kLong, kOp,
               "cache_seqlens must be int32 or int64");
  FASTLM_CHECK(cache_seqlens.device() == q.device(), kOp, "cache_seqlens must be on ", q.device());
  c10::cuda::CUDAGuard guard(q.device());
  auto qc = q.contiguous();
  auto lens = cache_seqlens.to(at::kInt).contiguous();
  auto out = new_output({B, H, D}, q.options());
  if (out.numel() == 0) return out;
  const int splits = decode_attention_num_splits(B * H, S, q.device().index());
  auto o_part = at::empty({B * H, splits, D}, q.options().dtype(at::kFloat));
  auto lse_part = at::empty({B * H, splits}, q.options().dtype(at::kFloat));
  decode_attention_launch(qc, k_cache, v_cache, lens, static_cast<float>(scale), splits, o_part, lse_part, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlm_C, CUDA, m) { m.impl("decode_attention_fwd", &decode_attention_fwd_cuda); }

}  // namespace fastlm::cuda

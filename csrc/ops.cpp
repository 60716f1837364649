// The fastlm_C operator library: every schema lives here; each backend file (cpu/*.cpp,
// cuda/*.cpp) registers its own dispatch key with TORCH_LIBRARY_IMPL. The Python module `fastlm._C`
// is an empty stub whose import loads this shared library and so runs the registrations.
#include <Python.h>
#include <torch/library.h>

#include "common.h"
#include "cpu/isa.h"

namespace {
bool set_poison_outputs(bool enable) {
  bool previous = fastlm::poison_outputs_flag();
  fastlm::poison_outputs_flag() = enable;
  return previous;
}
}  // namespace

TORCH_LIBRARY(fastlm_C, m) {
  // Test hook: outputs of every kernel are NaN-filled before it runs; returns the previous setting.
  m.def("set_poison_outputs(bool enable) -> bool", &set_poison_outputs);
  // The CPU kernels' instruction-set path here: cpu_isa() "avx512" / "avx2" / "neon" / "scalar";
  // cpu_isa_paths() one line per kernel, "<kernel>: <path> (<why>)" (csrc/cpu/isa.cpp).
  m.def("cpu_isa() -> str", [] { return fastlm::cpu::cpu_isa(); });
  m.def("cpu_isa_paths() -> str[]", [] { return fastlm::cpu::cpu_isa_paths(); });
  // LayerNorm over the last dim of x (M, N), optionally on summed = x + residual (returned; empty
  // when residual is None). mean and rstd are (M,) fp32, saved for the backward.
  m.def("layer_norm_fwd(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, float eps)"
        " -> (Tensor out, Tensor summed, Tensor mean, Tensor rstd)");
  // Backward of the above: x is the normalized input (summed for add_layer_norm). dsummed, when
  // given, is added to dx (the gradient that reaches summed directly). dweight/dbias are empty when
  // weight is None / has_bias is false.
  m.def("layer_norm_bwd(Tensor dy, Tensor x, Tensor? weight, Tensor mean, Tensor rstd, Tensor? dsummed,"
        " bool has_bias) -> (Tensor dx, Tensor dweight, Tensor dbias)");
  // [attention] Flash attention: q (B, H, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv), H % Hkv == 0,
  // last dims contiguous; mask: additive, q's dtype, (B, H, Sq, Sk) expanded (stride 0 where it
  // broadcasts); is_causal top-left aligned; dropout from rng = int64 CPU (seed, offset).
  // -> out (B, H, Sq, Dv), lse (B, H, Sq) fp32 (-inf for a row that sees no key).
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, bool is_causal, float dropout_p,"
        " Tensor? rng) -> (Tensor out, Tensor lse)");
  // [attention] Backward from the saved lse; dk, dv summed over each GQA group.
  m.def("attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? mask,"
        " float scale, bool is_causal, float dropout_p, Tensor? rng) -> (Tensor dq, Tensor dk, Tensor dv)");
  // [decode] Attention of one query token per row over a KV cache: q (B, H, D), caches
  // (B, Hkv, S_max, D) with H % Hkv == 0, cache_seqlens (B,) int32/int64; row b attends to
  // positions [0, cache_seqlens[b]). -> (B, H, D). Split-K over the cache, merged by logsumexp.
  m.def("decode_attention_fwd(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, float scale)"
        " -> Tensor");
  // [decode] y = x @ weight^T + bias: x (M, K), weight (N, K), bias (N,). Fast path for few rows.
  m.def("linear_fwd(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  // [decode] The layer loop of a GPT-2 decode step (CPU): per layer 12 weights (c_attn, c_proj, ln_2,
  // fc, proj, next LayerNorm; weight then bias), caches (L, B, H, S_max, D), this step's flat cache
  // rows index (B * H,), attention lengths (B,), eps (ln_2, next) per layer. -> (x, h).
  m.def("decode_layers(Tensor x, Tensor h, Tensor[] weights, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor index,"
        " Tensor lengths, float scale, str approximate, float[] eps) -> (Tensor x, Tensor h)");
  // [decode] Greedy pick: argmax_n (x @ weight^T)[m, n] for fp32 x (M <= 16, K), weight (N, K),
  // screening weight with its int8 copy (qweight, scale, slack from linear_argmax_screen). -> (M,) int64.
  m.def("linear_argmax_screen(Tensor weight) -> (Tensor qweight, Tensor scale, Tensor slack)");
  m.def("linear_argmax_fwd(Tensor x, Tensor weight, Tensor qweight, Tensor scale, Tensor slack) -> Tensor");
  // [decode] Logits for top-k sampling through the same screen: (M, N) fp32, each entry the exact logit
  // or -inf, every logit >= the row's k-th largest exact.
  m.def("linear_topk_logits_fwd(Tensor x, Tensor weight, Tensor qweight, Tensor scale, Tensor slack, int k)"
        " -> Tensor");
  // [gelu_ffn] out = gelu(x @ weight^T + bias): x (M, K), weight (N, K), bias (N,)?; approximate
  // "none" (erf) or "tanh". pre = x @ weight^T + bias (M, N) when save_pre, else (0, N).
  m.def("linear_gelu_fwd(Tensor x, Tensor weight, Tensor? bias, str approximate, bool save_pre)"
        " -> (Tensor out, Tensor pre)");
  // [gelu_ffn] Backward of the above from the saved pre; dbias is (0,) when has_bias is false.
  m.def("linear_gelu_bwd(Tensor dy, Tensor x, Tensor weight, Tensor pre, str approximate, bool has_bias)"
        " -> (Tensor dx, Tensor dweight, Tensor dbias)");
  // [gelu_ffn] out = gelu(x @ fc1_weight^T + fc1_bias) @ fc2_weight^T + fc2_bias: fc1_weight (F, K),
  // fc2_weight (N, F); pre = the hidden pre-activation (M, F) when save_pre, else (0, F).
  m.def("gelu_ffn_fwd(Tensor x, Tensor fc1_weight, Tensor? fc1_bias, Tensor fc2_weight, Tensor? fc2_bias,"
        " str approximate, bool save_pre) -> (Tensor out, Tensor pre)");
  // [gelu_ffn] Backward from the saved pre; absent biases give (0,) gradients.
  m.def("gelu_ffn_bwd(Tensor dy, Tensor x, Tensor fc1_weight, Tensor fc2_weight, Tensor pre, str approximate,"
        " bool has_fc1_bias, bool has_fc2_bias)"
        " -> (Tensor dx, Tensor dfc1_weight, Tensor dfc1_bias, Tensor dfc2_weight, Tensor dfc2_bias)");

  // ---- [linear_int8] weight-only int8 linear (csrc/cpu/linear_int8.cpp, csrc/cuda/linear_int8*) ----
  // y = x @ (qweight * scale)^T + bias: x (M, K) fp32/fp16/bf16, qweight (N, K) int8, scale (N,) fp32
  // per output channel or (N, G) fp32 per group of K / G columns, bias (N,) in x's dtype. -> (M, N).
  m.def("linear_int8_fwd(Tensor x, Tensor qweight, Tensor scale, Tensor? bias) -> Tensor");
  // The dequantized weight qweight * scale as fp32 (N, K) (the many-row path's GEMM operand).
  m.def("linear_int8_dequant(Tensor qweight, Tensor scale) -> Tensor");
  // weight (N, K) fp32 -> (qweight int8, scale fp32 (N,) | (N, K / group_size)): fastlm.quantize's int8
  // weights (group_size 0: per channel; search: the scale of least squared error among clipped ranges).
  m.def("linear_int8_quantize(Tensor weight, int group_size, bool search) -> (Tensor, Tensor)");
  // y = x @ weight^T + bias with a bf16 weight widened to fp32 in registers, x fp32/fp16/bf16 -> x's dtype.
  m.def("linear_w16_fwd(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  // ---- end [linear_int8] ----
  // ---- [linear_w8a8] int8 weights x int8 activations (csrc/cpu/linear_w8a8.cpp) ----
  // y = (acc * a_scale[m]) * scale[n] + bias[n], acc = xq @ qweight^T exact in int32: x (M, K) fp32/fp16/bf16
  // quantized per row (a_scale = max|x| / 127, xq = rint(x / a_scale) in [-127, 127]), qweight (N, K) int8,
  // scale (N,) fp32 per output channel, bias (N,) in x's dtype; packed: linear_w8a8_pack(qweight) or
  // None (packed per call). -> (M, N) in x's dtype.
  // activation: "none", or GELU ("tanh" / "erf" form) applied to that output.
  m.def("linear_w8a8_fwd(Tensor x, Tensor qweight, Tensor scale, Tensor? bias, Tensor? packed, str activation=\"none\") -> Tensor");
  // qweight (N, K) int8 -> the kernel's packed weight (uint8: 16-channel x 4-k blocks, then int32 column sums).
  m.def("linear_w8a8_pack(Tensor qweight) -> Tensor");
  // ---- end [linear_w8a8] ----
  // ---- [serving] paged KV cache (csrc/cpu/paged_attention.cpp, csrc/cpu/linear_rowwise.cpp) ----
  // Attention over a block-paged cache: q (T, H, D); caches (num_blocks, Hkv, block_size, D);
  // block_tables (R, max_blocks) int32; query t reads row seq_index[t] (T,) int32 and attends to
  // positions [0, key_lens[t]) (T,) int32 (decode: the context length; prefill: position + 1). -> (T, H, D).
  m.def("paged_attention_fwd(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_index,"
        " Tensor key_lens, float scale) -> Tensor");
  // Cache write: key/value (T, Hkv, D) to flat slots (T,) int64 = block * block_size + offset (-1: skip).
  m.def("paged_kv_write(Tensor key, Tensor value, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slots) -> ()");
  // Batch-invariant y = act(x @ weight^T + bias): every row with linear_fwd's one-row arithmetic;
  // activation "none", "tanh" or "erf" (GELU). packed: linear_rowwise_pack(weight) or None (AVX-512:
  // packed per call when there are enough rows; other ISAs ignore it).
  m.def("linear_rowwise_fwd(Tensor x, Tensor weight, Tensor? bias, str activation, Tensor? packed=None) -> Tensor");
  // weight (N, K) -> its fp32 copy in the many-row kernel's layout (panels of 64 columns by k chain);
  // empty where that kernel does not run (no AVX-512).
  m.def("linear_rowwise_pack(Tensor weight) -> Tensor");
}

extern "C" {
// A minimal module object: importing fastlm._C loads the library; the ops are reached as
// torch.ops.fastlm_C.<name>.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "fastlm C++/CUDA operators", -1, nullptr};
  return PyModule_Create(&module_def);
}
}

// The layer loop of a GPT-2 decode step on the CPU, in one call: for a few token rows, every
// pre-LayerNorm block (fused QKV -> KV-cache append -> decode attention -> projection -> add +
// LayerNorm -> Linear + GELU + Linear -> add + the next LayerNorm).
//
// Each op is the same fastlm_C kernel the Python decode step calls one by one (linear_fwd,
// decode_attention_fwd, layer_norm_fwd; at::gelu in between), called through the dispatcher in the
// same order on the same shapes, and the cache appends are plain row copies: the result is bit for
// bit the Python loop's.
// What goes away is the Python between the ~10 kernels of each layer (~0.6 ms a step for GPT-2
// small, measured with a 64-wide model whose kernels cost nothing).
// A model quantized by fastlm.quantize passes its int8 projections instead (16 tensors a layer: the
// 12 below with each projection's qweight in place of its weight, then the 4 scales; 20 with the 4
// W8A8 packed weights after those, for W8A8 steps of 2+ rows): each projection is then
// linear_int8_fwd (W8A32) or linear_w8a8_fwd, again the kernel the Python step calls.
// bf16 weights (fastlm.quantize(weights="bf16")) under fp32 / fp16 activations: the 12 tensors with
// bf16 projection weights, each projection linear_w16_fwd (what ops.linear_bf16w calls).
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/gelu.h>
#include <torch/library.h>

#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "common.h"

namespace fastlm::cpu {
namespace {

constexpr const char* kOp = "decode_layers";
constexpr int64_t kPerLayer = 12;      // tensors per layer in `weights` (fp32 / fp16 / bf16 weights)
constexpr int64_t kPerLayerInt8 = 16;  // + the 4 projections' scales (their weights int8)
constexpr int64_t kPerLayerW8A8 = 20;  // + the 4 projections' W8A8 packed weights

using OptT = std::optional<at::Tensor>;

at::Tensor call_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastlm_C::linear_fwd", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const OptT&)>();
  return op.call(x, w, b);
}

at::Tensor call_linear_int8(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale, const at::Tensor& b) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastlm_C::linear_int8_fwd", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptT&)>();
  return op.call(x, q, scale, b);
}

at::Tensor call_linear_w16(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastlm_C::linear_w16_fwd", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const OptT&)>();
  return op.call(x, w, b);
}

at::Tensor call_linear_w8a8(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale, const at::Tensor& b,
                            const at::Tensor& packed, c10::string_view activation = "none") {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastlm_C::linear_w8a8_fwd", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               const OptT&, const OptT&, c10::string_view)>();
  return op.call(x, q, scale, b, packed, activation);
}

std::tuple<at::Tensor, at::Tensor> call_add_layer_norm(const at::Tensor& x, const at::Tensor& res,
                                                       const at::Tensor& w, const at::Tensor& b, double eps) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastlm_C::layer_norm_fwd", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const OptT&,
                                                                            const OptT&, const OptT&, double)>();
  auto out = op.call(x, res, w, b, eps);
  return {std::get<0>(out), std::get<1>(out)};
}

at::Tensor call_decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& lens, double scale) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastlm_C::decode_attention_fwd", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, double)>();
  return op.call(q, k, v, lens, scale);
}

// x (B, C): the first layer's ln_1 output; h (B, C): the residual stream. weights: per layer, in
// order, c_attn (3C, C) and its bias, c_proj (C, C) + bias, ln_2 weight + bias, fc (F, C) + bias,
// proj (C, F) + bias, and the next LayerNorm's weight + bias (the following block's ln_1, or ln_f
// after the last). k_cache, v_cache: (L, B, H, S_max, D); index (B * H,) int64: this step's flat row
// in a layer's (B * H * S_max, D) view; lengths (B,): attention lengths (this token included).
// eps: (ln_2 eps, next eps) per layer. -> (x, h) after the last layer (x = ln_f(h)).
// Quantized (weights[0] int8): 16 or 20 tensors a layer, see the file comment.
std::tuple<at::Tensor, at::Tensor> decode_layers_cpu(const at::Tensor& x0, const at::Tensor& h0,
                                                     at::TensorList weights, const at::Tensor& k_cache,
                                                     const at::Tensor& v_cache, const at::Tensor& index,
                                                     const at::Tensor& lengths, double scale,
                                                     c10::string_view approximate, at::ArrayRef<double> eps) {
  check_rows(x0, kOp, "x");
  check_same_shape(h0, x0, kOp, "h");
  FASTLM_CHECK(!weights.empty() && weights[0].defined(), kOp, "weights must not be empty");
  const bool int8 = weights[0].scalar_type() == at::kChar;
  // bf16 weights under wider activations (bf16 activations: the plain path, linear_fwd on bf16)
  const bool w16 = weights[0].scalar_type() == at::kBFloat16 && x0.scalar_type() != at::kBFloat16;
  const int64_t E = static_cast<int64_t>(weights.size());
  const int64_t Lc = k_cache.dim() > 0 ? k_cache.size(0) : 0;  // the layer count, by the cache
  const int64_t per = !int8 ? kPerLayer : (Lc > 0 && E == Lc * kPerLayerW8A8) ? kPerLayerW8A8 : kPerLayerInt8;
  FASTLM_CHECK(E % per == 0, kOp, "weights must hold ", per, " tensors per layer, got ", E);
  const bool w8a8 = per == kPerLayerW8A8;
  const int64_t L = E / per;
  const int64_t B = x0.size(0), C = x0.size(1);
  FASTLM_CHECK(k_cache.dim() == 5 && k_cache.size(0) == L && k_cache.size(1) == B, kOp,
               "k_cache must be (", L, ", ", B, ", H, S_max, D), got ", k_cache.sizes());
  check_same_shape(v_cache, k_cache, kOp, "v_cache");
  FASTLM_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), kOp, "k_cache and v_cache must be contiguous");
  const int64_t H = k_cache.size(2), S = k_cache.size(3), D = k_cache.size(4);
  FASTLM_CHECK(H * D == C, kOp, "k_cache heads x head_dim = ", H * D, " must equal the model width ", C);
  FASTLM_CHECK(index.dim() == 1 && index.size(0) == B * H && index.scalar_type() == at::kLong, kOp,
               "index must be (", B * H, ",) int64");
  FASTLM_CHECK(static_cast<int64_t>(eps.size()) == 2 * L, kOp, "eps must hold 2 values per layer");
  FASTLM_CHECK(approximate == "none" || approximate == "tanh", kOp, "approximate must be 'none' or 'tanh'");
  if (index.numel() > 0) {  // the appends write cache rows index[i]: every one inside the cache
    const auto mm = index.aminmax();
    FASTLM_CHECK(std::get<0>(mm).item<int64_t>() >= 0 && std::get<1>(mm).item<int64_t>() < B * H * S, kOp,
                 "index holds a row outside the cache (B * H * S_max = ", B * H * S, ")");
  }
  for (int64_t i = 0; i < E; ++i) {
    // quantized: the projections' qweights int8, their scales fp32, the packed weights uint8; the rest
    // (biases, LayerNorms) in x's dtype (each kernel checks its own shapes)
    const int64_t j = i % per;
    const bool proj = j == 0 || j == 2 || j == 6 || j == 8;
    const at::ScalarType want = (int8 && proj) ? at::kChar
                                : (w16 && proj) ? at::kBFloat16
                                : (int8 && j >= kPerLayerInt8) ? at::kByte
                                : (int8 && j >= kPerLayer)     ? at::kFloat
                                                               : x0.scalar_type();
    FASTLM_CHECK(weights[i].defined() && weights[i].scalar_type() == want && weights[i].device() == x0.device(),
                 kOp, "weights[", i, "] must be a ", want, " tensor on ", x0.device());
  }
  FASTLM_CHECK(k_cache.scalar_type() == x0.scalar_type() && v_cache.scalar_type() == x0.scalar_type(), kOp,
               "k_cache and v_cache must have x's dtype ", x0.scalar_type());
  const at::Tensor index_c = index.contiguous();
  const int64_t* idx = index_c.data_ptr<int64_t>();
  const std::string approx(approximate);
  at::Tensor x = x0, h = h0;
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor* w = weights.data() + l * per;
    // projection i (0 c_attn, 1 c_proj, 2 fc, 3 proj): weight w[wi], bias w[wi + 1]
    auto linear = [&](const at::Tensor& in, int i, int64_t wi) {
      if (w16) return call_linear_w16(in, w[wi], w[wi + 1]);
      if (!int8) return call_linear(in, w[wi], w[wi + 1]);
      if (w8a8) return call_linear_w8a8(in, w[wi], w[kPerLayer + i], w[wi + 1], w[kPerLayerInt8 + i]);
      return call_linear_int8(in, w[wi], w[kPerLayer + i], w[wi + 1]);
    };
    // fc + GELU: W8A8 fuses the GELU into linear_w8a8_fwd (as the Python step's Int8Linear.forward_gelu)
    auto fc_gelu = [&](const at::Tensor& in) {
      if (w8a8)
        return call_linear_w8a8(in, w[6], w[kPerLayer + 2], w[7], w[kPerLayerInt8 + 2], approx == "none" ? "erf" : "tanh");
      return at::gelu(linear(in, 2, 6), approx);
    };
    const at::Tensor qkv = linear(x, 0, 0).view({B, 3, H, D});
    const at::Tensor q = qkv.select(1, 0);
    const at::Tensor kl = k_cache.select(0, l), vl = v_cache.select(0, l);
    // the appends: row (b, h) of this step's k and v to flat cache row index[b * H + h] (a copy of D
    // elements each; index_copy_ took ~15 us a call at 8 x 12 rows)
    {
      const char* src = static_cast<const char*>(qkv.data_ptr());
      char* kd = static_cast<char*>(kl.data_ptr());
      char* vd = static_cast<char*>(vl.data_ptr());
      const int64_t row = D * static_cast<int64_t>(qkv.element_size());
      for (int64_t b = 0; b < B; ++b)
        for (int64_t hh = 0; hh < H; ++hh) {
          const int64_t dst = idx[b * H + hh] * row;
          std::memcpy(kd + dst, src + ((b * 3 + 1) * H + hh) * row, row);
          std::memcpy(vd + dst, src + ((b * 3 + 2) * H + hh) * row, row);
        }
    }
    at::Tensor a = call_decode_attention(q, kl, vl, lengths, scale);
    a = linear(a.reshape({B, C}), 1, 2);
    std::tie(x, h) = call_add_layer_norm(a, h, w[4], w[5], eps[2 * l]);
    const at::Tensor m = linear(fc_gelu(x), 3, 8);
    std::tie(x, h) = call_add_layer_norm(m, h, w[10], w[11], eps[2 * l + 1]);
  }
  return {x, h};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlm_C, CPU, m) { m.impl("decode_layers", &decode_layers_cpu); }

}  // namespace fastlm::cpu

"""fastlm's functional ops: drop-in replacements for the torch functions they name, with autograd,
registered as torch.library ops (fastlm::*) so torch.compile(fullgraph=True) traces them.

Each op family lives in its own module (layer_norm.py, ...): torch.library ops with their fake impls
and autograd, then the public functions, which check their arguments (TypeError/ValueError naming the
argument), reshape to what the kernels take and call the op; the op picks the backend per call
(fastlm.backends). This module only re-exports the public functions.
"""
from fastlm.ops.layer_norm import add_layer_norm, layer_norm
from fastlm.ops.gelu_ffn import gelu_ffn, linear_gelu
from fastlm.ops.attention import scaled_dot_product_attention
from fastlm.ops.decode import decode_attention
from fastlm.ops.linear import linear
from fastlm.ops.linear_argmax import LinearArgmaxScreen, linear_argmax, linear_topk_logits

__all__ = ["layer_norm", "add_layer_norm", "linear_gelu", "gelu_ffn"]
__all__ += ["scaled_dot_product_attention"]
__all__ += ["decode_attention", "linear", "linear_argmax", "linear_topk_logits", "LinearArgmaxScreen"]
from fastlm.ops.linear_int8 import linear_bf16w, linear_int8  # noqa: E402  (weight-only int8 / bf16; fastlm.quant)

__all__ += ["linear_int8", "linear_bf16w"]
from fastlm.ops.linear_w8a8 import linear_w8a8, linear_w8a8_pack  # noqa: E402  (int8 weights x int8 activations)

__all__ += ["linear_w8a8", "linear_w8a8_pack"]

"""Drop-in modules: subclasses of the torch modules they replace, same constructor and state_dict."""
from fastlm.nn.layer_norm import LayerNorm
from fastlm.nn.attention import MultiheadAttention
from fastlm.nn.gelu_ffn import GeluFFN
from fastlm.nn.kv_cache import StaticKVCache

__all__ = ["LayerNorm", "GeluFFN"]
__all__ += ["StaticKVCache"]
__all__ += ["MultiheadAttention"]
from fastlm.nn.quant_linear import Bf16Linear, Int8Linear  # noqa: E402

__all__ += ["Int8Linear", "Bf16Linear"]

"""Drop-in modules: subclasses of the torch modules they replace, same constructor and state_dict."""
from fastlm.nn.layer_norm import LayerNorm
from fastlm.nn.gelu_ffn import GeluFFN

__all__ = ["LayerNorm", "GeluFFN"]

"""Drop-in modules: subclasses of the torch modules they replace, same constructor and state_dict."""
from fastlm.nn.layer_norm import LayerNorm

__all__ = ["LayerNorm"]

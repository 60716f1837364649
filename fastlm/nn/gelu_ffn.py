"""fastlm.nn.GeluFFN: the transformer feed-forward block Linear -> GELU -> Linear as one module whose
forward is the fused fastlm.ops.gelu_ffn. Its children fc1 and fc2 are plain torch.nn.Linear, so the
state_dict keys are fc1.weight, fc1.bias, fc2.weight, fc2.bias (bias=False drops the biases)."""
from __future__ import annotations

import torch
from torch import Tensor

from fastlm import ops


class GeluFFN(torch.nn.Module):
    """y = fc2(gelu(fc1(x), approximate)): fc1 = Linear(d_model, d_ff), fc2 = Linear(d_ff, d_model).
    approximate: "none" (erf GELU, BERT) or "tanh" (GPT-2)."""

    def __init__(self, d_model: int, d_ff: int, approximate: str = "none", bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"fastlm.nn.GeluFFN: approximate must be 'none' or 'tanh', got {approximate!r}")
        self.d_model, self.d_ff, self.approximate = d_model, d_ff, approximate
        self.fc1 = torch.nn.Linear(d_model, d_ff, bias=bias, device=device, dtype=dtype)
        self.fc2 = torch.nn.Linear(d_ff, d_model, bias=bias, device=device, dtype=dtype)

    def forward(self, input: Tensor) -> Tensor:
        return ops.gelu_ffn(input, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, self.approximate)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_ff={self.d_ff}, approximate={self.approximate!r}"

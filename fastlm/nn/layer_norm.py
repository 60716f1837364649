"""fastlm.nn.LayerNorm: torch.nn.LayerNorm (same constructor, parameters, state_dict) whose forward
runs fastlm.ops.layer_norm, plus `forward_add` for the fused residual add."""
from __future__ import annotations

import torch
from torch import Tensor

from fastlm import ops


class LayerNorm(torch.nn.LayerNorm):
    def forward(self, input: Tensor) -> Tensor:
        return ops.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)

    def forward_add(self, input: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
        """(self(input + residual), input + residual), fused."""
        return ops.add_layer_norm(input, residual, self.normalized_shape, self.weight, self.bias, self.eps)

    @classmethod
    def from_torch(cls, module: torch.nn.LayerNorm) -> "LayerNorm":
        """A fastlm LayerNorm sharing `module`'s parameters (no copy)."""
        new = cls.__new__(cls)
        new.__dict__.update(module.__dict__)
        return new

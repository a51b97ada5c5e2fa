"""Quantization-aware training: int8 fake quantization of linear weights.

Each linear weight is replaced, in the forward pass, by its symmetric per-output-channel int8
quantization; the straight-through estimator passes gradients to the float weight unchanged.
The float weights stay the master copy, so checkpoints and exports are unaffected.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize


class FakeQuantInt8(nn.Module):
    def forward(self, weight: Tensor) -> Tensor:
        scale = weight.detach().abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / 127.0
        quantized = torch.clamp(torch.round(weight / scale), -127, 127) * scale
        return weight + (quantized - weight).detach()


def enable_int8_qat(model: nn.Module) -> int:
    """Fake-quantize every linear layer inside the blocks; returns how many were wrapped.

    The tied LM head (which shares the embedding matrix) is left alone.
    """
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.startswith("blocks."):
            parametrize.register_parametrization(module, "weight", FakeQuantInt8())
            count += 1
    return count

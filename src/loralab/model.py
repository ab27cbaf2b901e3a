"""The MLP being adapted. Layers are named ``linear1..N`` so LoRA targets and adapter keys match
the hkproj/pytorch-lora notebook's ExpensiveNet (784-1000-2000-10, 2,807,010 parameters)."""

from __future__ import annotations

import torch
from torch import nn

from loralab.layout import layer_shapes


class MLP(nn.Module):
    def __init__(self, sizes: list[int]):
        super().__init__()
        self.sizes = [int(n) for n in sizes]
        for name, (n_in, n_out) in layer_shapes(self.sizes).items():
            setattr(self, name, nn.Linear(n_in, n_out))
        self.relu = nn.ReLU()

    @property
    def layers(self) -> list[nn.Module]:
        return [getattr(self, f"linear{i}") for i in range(1, len(self.sizes))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, self.sizes[0])
        *hidden, last = self.layers
        for layer in hidden:
            x = self.relu(layer(x))
        return last(x)

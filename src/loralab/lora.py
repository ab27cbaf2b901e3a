"""LoRA from scratch: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (2021),
with the variants practitioners choose between: DoRA, PiSSA's init and rsLoRA's scaling.

``LoRASpec`` (defined in loralab.spec, torch-free) is everything that defines an adapter, built
once and used everywhere. ``LoRALinear`` wraps a frozen ``nn.Linear`` and adds
``scale * B @ A`` to its weight, computed factorised so the dense update is never built while
training. Every adapter tensor's name starts with ``lora_``: that prefix is the contract for
freezing, optimizer filtering and saving. Merging is explicit and never tied to ``train()``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from loralab.spec import INITS, LoRASpec, variant_flags  # noqa: F401 - the spec is part of this module's API

PREFIX = "lora_"


class LoRALinear(nn.Module):
    """``base_layer(x) + scale * B A x``; with DoRA, each output row is rescaled to a learnt
    magnitude; with PiSSA, A and B start on W's principal singular directions."""

    def __init__(self, base_layer: nn.Linear, spec: LoRASpec):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"LoRALinear wraps nn.Linear, got {type(base_layer).__name__}")
        # No upper bound on the rank here: a rank above min(in, out) adds nothing to train (the
        # config refuses it), but a saved PiSSA adapter holds twice its trained rank and must load.
        self.base_layer, self.spec = base_layer, spec
        self.rank, self.scale = spec.rank, spec.scale
        factory = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(spec.rank, base_layer.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(base_layer.out_features, spec.rank, **factory))
        if spec.init == "pissa":
            # The frozen initial product: the model computes W + s(BA - B0A0), equal to W at step 0.
            self.register_buffer("lora_A0", torch.empty_like(self.lora_A))
            self.register_buffer("lora_B0", torch.empty_like(self.lora_B))
        if spec.dora:
            self.lora_magnitude_vector = nn.Parameter(torch.empty(base_layer.out_features, **factory))
        self.lora_dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.enabled = True
        self.merged = False
        self._dora_factor: torch.Tensor | None = None  # m / ||W + dW|| while merged
        self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        init = self.spec.init
        if init == "gaussian":
            nn.init.normal_(self.lora_A, mean=0.0, std=1.0)  # the seeds' choice
        elif init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's default
        if init == "pissa":
            # PiSSA (Meng et al., 2024), as PEFT's pissa_init: the top-r singular triplets of W,
            # divided by the scale so that s * B0 A0 is W's principal part, split as sqrt(S).
            weight = self.base_layer.weight.float()
            u, s, vh = torch.linalg.svd(weight, full_matrices=False)
            root = torch.sqrt(s[: self.rank] / self.scale)
            self.lora_A.copy_(root[:, None] * vh[: self.rank])
            self.lora_B.copy_(u[:, : self.rank] * root[None, :])
            self.lora_A0.copy_(self.lora_A)
            self.lora_B0.copy_(self.lora_B)
        else:
            nn.init.zeros_(self.lora_B)  # B = 0: the first forward pass equals the base model's
        if self.spec.dora:
            # DoRA (Liu et al., 2024): m starts at the row norms of the adapted weight, i.e. ||W||.
            self.lora_magnitude_vector.copy_(self.weight_norm())

    def delta_weight(self) -> torch.Tensor:
        delta = self.lora_B @ self.lora_A
        if self.spec.init == "pissa":
            delta = delta - self.lora_B0 @ self.lora_A0
        return delta * self.scale

    def weight_norm(self) -> torch.Tensor:
        """||W + dW|| per output row, detached: DoRA paper section 4.3 treats it as a constant."""
        weight = self.base_layer.weight
        return torch.linalg.norm(weight + self.delta_weight().detach().to(weight.dtype), dim=1).detach()

    def lora_product(self, x: torch.Tensor) -> torch.Tensor:
        """``B A x``; under PiSSA ``B A x - B0 A0 x``, exactly zero at step 0 (the same products
        of the same tensors)."""
        product = F.linear(F.linear(x, self.lora_A), self.lora_B)
        if self.spec.init == "pissa":
            product = product - F.linear(F.linear(x, self.lora_A0), self.lora_B0)
        return product

    def lora_output(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out + scale * B A x`` (minus B0 A0 x under PiSSA)."""
        if self.spec.init == "pissa" or out.dim() != 2:
            return torch.add(out, self.lora_product(x), alpha=self.scale)
        # One kernel for out + scale * h @ B.T: no temporary for the product or the scaling.
        return torch.addmm(out, F.linear(x, self.lora_A), self.lora_B.t(), alpha=self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if not self.enabled or self.merged:
            return out
        dropped = self.lora_dropout(x)
        if not self.spec.dora:
            return self.lora_output(dropped, out)
        # DoRA as PEFT computes it: out + (m/n - 1) W x' + (m/n) s B A x', x' the dropped input;
        # without dropout that is (m/n)(W x + s B A x) + bias: the bias is not rescaled.
        factor = self.lora_magnitude_vector / self.weight_norm()
        bias = self.base_layer.bias
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            base = out if bias is None else out - bias
        else:
            base = F.linear(dropped, self.base_layer.weight)
        return out + (factor - 1) * base + (factor * self.scale) * self.lora_product(dropped)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        if not self.enabled:
            raise RuntimeError("cannot merge a disabled adapter; enable it first")
        weight = self.base_layer.weight
        delta = self.delta_weight().to(weight.dtype)
        if self.spec.dora:
            self._dora_factor = self.lora_magnitude_vector / self.weight_norm()
            weight.add_(delta).mul_(self._dora_factor[:, None])
        else:
            weight += delta
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        weight = self.base_layer.weight
        if self.spec.dora:
            weight.div_(self._dora_factor[:, None])
            self._dora_factor = None
        weight -= self.delta_weight().to(weight.dtype)
        self.merged = False

    def extra_repr(self) -> str:
        variant = "".join(f", {flag}" for flag in variant_flags(self.spec) if flag != "pissa")
        return f"rank={self.rank}, alpha={self.spec.alpha:g}, scale={self.scale:g}, init={self.spec.init}{variant}, enabled={self.enabled}, merged={self.merged}"


def is_lora_name(name: str) -> bool:
    return name.rpartition(".")[2].startswith(PREFIX)


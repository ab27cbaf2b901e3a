"""LoRA from scratch: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (2021),
with the variants practitioners choose between: DoRA, PiSSA's init and rsLoRA's scaling.

``LoRASpec`` (defined in loralab.spec, torch-free) is everything that defines an adapter, built
once and used everywhere. ``LoRALinear`` wraps a frozen ``nn.Linear`` and adds ``scale * B @ A``
to its weight, computed factorised so the dense update is never built while training. It holds
the tensors and the state (enabled, merged); what it computes is one ``Update`` and one
``Output`` from loralab.variants, plain LoRA's or a variant's (that module says how they
compose). Every adapter tensor's name starts with ``lora_``: that prefix is the contract for
freezing, optimizer filtering and saving. Merging is explicit and never tied to ``train()``.
"""

from __future__ import annotations

import torch
from torch import nn

from loralab.quant import is_quantized
from loralab.spec import LoRASpec, variant_flags
from loralab.variants import compose

PREFIX = "lora_"


class LoRALinear(nn.Module):
    """``base_layer(x) + scale * B A x``, as its update and output compute it. ``name``: the
    layer's name in its model, where the spec's rank_pattern or alpha_pattern may name it."""

    def __init__(self, base_layer: nn.Linear, spec: LoRASpec, name: str = ""):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"LoRALinear wraps nn.Linear, got {type(base_layer).__name__}")
        # No upper bound on the rank here: a rank above min(in, out) adds nothing to train (the
        # config refuses it), but a saved PiSSA adapter holds twice its trained rank and must load.
        self.base_layer, self.spec = base_layer, spec
        self.rank, self.alpha, self.scale = spec.rank_of(name), spec.alpha_of(name), spec.scale_of(name)
        self.update, self.output = compose(spec)
        factory = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        sizes = self.rank, base_layer.in_features, base_layer.out_features
        for part in (self.update, self.output):
            for name, shape in part.parameters(*sizes).items():
                self.register_parameter(name, nn.Parameter(torch.empty(shape, **factory)))
            for name, shape in part.buffers(*sizes).items():
                self.register_buffer(name, torch.empty(shape, **factory))
        self.lora_dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.enabled = True
        self.merged = False
        self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        self.update.reset(self)
        self.output.reset(self)  # after the update: DoRA's magnitude is measured on W + ΔW

    def delta_weight(self) -> torch.Tensor:
        """ΔW, dense."""
        return self.update.dense(self) * self.scale

    def lora_product(self, x: torch.Tensor) -> torch.Tensor:
        """ΔW x / scale, factorised: ``B A x`` for plain LoRA."""
        return self.update.product(self, x)

    def lora_output(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out + ΔW x``."""
        return self.update.add_to(self, x, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if not self.enabled or self.merged:
            return out
        return self.output.forward(self, self.lora_dropout(x), out)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        if not self.enabled:
            raise RuntimeError("cannot merge a disabled adapter; enable it first")
        if is_quantized(self.base_layer.weight):
            raise RuntimeError("cannot merge into a quantized base weight, which cannot hold W + ΔW; merge into the fp32 base")
        self.output.merge(self, self.base_layer.weight)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self.output.unmerge(self, self.base_layer.weight)
        self.merged = False

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        """This layer's adapter as a file holds it: its parameters, in each part's saved form."""
        tensors = {name: p.detach().clone() for name, p in self.named_parameters(recurse=False)}
        return self.output.saved(self, self.update.saved(self, tensors))

    def extra_repr(self) -> str:
        variant = "".join(f", {flag}" for flag in variant_flags(self.spec) if flag != self.spec.init)
        return f"rank={self.rank}, alpha={self.alpha:g}, scale={self.scale:g}, init={self.spec.init}{variant}, enabled={self.enabled}, merged={self.merged}"


def is_lora_name(name: str) -> bool:
    return name.rpartition(".")[2].startswith(PREFIX)

"""What a LoRA layer computes, in two parts that each variant replaces one of.

An ``Update`` is the low-rank update ΔW = s·(its product): plain LoRA's is s·B A (Hu et al., 2021),
drawn with B = 0. An ``Output`` is how the update enters the layer, in the forward pass and in a
merge: plain LoRA's adds it, y = W x + b + ΔW x. A variant subclasses one of the two:

- ``PiSSA`` is an update (Meng et al., 2024): A and B start on W's principal singular triplets
  and the frozen start B0 A0 is subtracted, ΔW = s·(B A − B0 A0), so W is never rewritten and
  step 0 equals the base; it saves itself as plain LoRA on the original base.
- ``DoRA`` is an output (Liu et al., 2024): each output row is rescaled to a learnt magnitude,
  W' = (m / ||W + ΔW||) ⊙ (W + ΔW).

A layer holds one update and one output, so they compose by construction: an output sees the
update only through the layer's ``delta_weight()`` and ``lora_product()``, and DoRA+PiSSA is DoRA
applied to PiSSA's update. PEFT splits them the same way (DoRA a ``LoraVariant``, PiSSA an init
in peft/tuners/lora); PiSSA is more than an init here because it keeps W and subtracts its start.
rsLoRA is no class: it is the scale, which ``LoRASpec.scale`` defines. Adding a variant is one
class here, keyed in ``VARIANTS`` by the flag ``variant_flags`` gives for its config value, and
its invariant tests.

Tensors stay on the layer, named ``lora_*`` (the prefix every freeze, optimizer and save relies
on): a variant declares its own in ``parameters`` and ``buffers`` and fills them in ``reset``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from loralab.quant import dense
from loralab.spec import LoRASpec, variant_flags

if TYPE_CHECKING:
    from loralab.lora import LoRALinear

Shapes = dict[str, tuple[int, ...]]


class Part:
    """What both parts may add to a layer: tensors, their starting values, their saved form."""

    def parameters(self, rank: int, n_in: int, n_out: int) -> Shapes:
        """Trainable tensors, registered on the layer in this order."""
        return {}

    def buffers(self, rank: int, n_in: int, n_out: int) -> Shapes:
        """Frozen tensors that travel with the layer (``state_dict``, ``.to()``)."""
        return {}

    def reset(self, layer: LoRALinear) -> None:
        """Set this part's tensors to their starting values (called under no_grad)."""

    def saved(self, layer: LoRALinear, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The layer's tensors as an adapter file holds them."""
        return tensors


# How plain LoRA draws A (B = 0, so the first forward pass equals the base's).
DRAWS = {
    "gaussian": lambda a: nn.init.normal_(a, mean=0.0, std=1.0),  # the reference notebook's choice
    "kaiming": lambda a: nn.init.kaiming_uniform_(a, a=math.sqrt(5)),  # PEFT's default
}


class Update(Part):
    """Plain LoRA's update, ΔW = s·B A, applied factorised so the dense update is never built."""

    def parameters(self, rank, n_in, n_out):
        return {"lora_A": (rank, n_in), "lora_B": (n_out, rank)}

    def reset(self, layer):
        DRAWS[layer.spec.init](layer.lora_A)
        nn.init.zeros_(layer.lora_B)

    def dense(self, layer: LoRALinear) -> torch.Tensor:
        """ΔW / s, dense."""
        return layer.lora_B @ layer.lora_A

    def product(self, layer: LoRALinear, x: torch.Tensor) -> torch.Tensor:
        """ΔW x / s, factorised: ``B (A x)``."""
        return F.linear(F.linear(x, layer.lora_A), layer.lora_B)

    def add_to(self, layer: LoRALinear, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out + ΔW x``."""
        if out.dim() != 2:
            return torch.add(out, self.product(layer, x), alpha=layer.scale)
        # One kernel for out + s * (A x) B^T: no temporary for the product or the scaling.
        return torch.addmm(out, F.linear(x, layer.lora_A), layer.lora_B.t(), alpha=layer.scale)


class Output(Part):
    """Plain LoRA's output: the update is added, to the output or, merged, to W."""

    def forward(self, layer: LoRALinear, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The layer's output from ``out`` = base(x) and ``x``, the input after the adapter's dropout."""
        return layer.lora_output(x, out)

    def merge(self, layer: LoRALinear, weight: torch.Tensor) -> None:
        weight += layer.delta_weight().to(weight.dtype)

    def unmerge(self, layer: LoRALinear, weight: torch.Tensor) -> None:
        weight -= layer.delta_weight().to(weight.dtype)


class PiSSA(Update):
    """PiSSA (Meng et al., 2024), as PEFT's pissa_init: A0, B0 are the top-r singular triplets of W
    divided by the scale, split as sqrt(S), so s·B0 A0 is W's best rank-r approximation. The
    model computes W + s(B A − B0 A0), W itself staying the pretrained one: without dropout, the
    function and gradients of PEFT's residual base W − s·B0 A0 plus s·B A. With dropout in
    training, B0 A0 sees the dropped input as B A does (PEFT's residual applies to the whole
    input): the function of the converted file this saves, which PEFT loads as plain LoRA."""

    def buffers(self, rank, n_in, n_out):
        return {"lora_A0": (rank, n_in), "lora_B0": (n_out, rank)}

    def reset(self, layer):
        u, s, vh = singular_triplets(layer.base_layer.weight.float())
        root = torch.sqrt(s[: layer.rank] / layer.scale)
        layer.lora_A.copy_(root[:, None] * vh[: layer.rank])
        layer.lora_B.copy_(u[:, : layer.rank] * root[None, :])
        layer.lora_A0.copy_(layer.lora_A)
        layer.lora_B0.copy_(layer.lora_B)

    def dense(self, layer):
        return super().dense(layer) - layer.lora_B0 @ layer.lora_A0

    def product(self, layer, x):
        # Exactly zero at step 0: the same products of the same tensors.
        return super().product(layer, x) - F.linear(F.linear(x, layer.lora_A0), layer.lora_B0)

    def add_to(self, layer, x, out):
        return torch.add(out, self.product(layer, x), alpha=layer.scale)

    def saved(self, layer, tensors):
        # Plain LoRA on the original base (PEFT's conversion): A' = [A; A0], B' = [B, -B0], so
        # B' A' = B A - B0 A0 at rank 2r (LoRASpec.saved_rank and to_peft_config keep the scale).
        return tensors | {"lora_A": torch.cat([layer.lora_A, layer.lora_A0]).detach(),
                          "lora_B": torch.cat([layer.lora_B, -layer.lora_B0], dim=1).detach()}


# The SVDs PiSSA has taken, each with the weight it factorised: every PiSSA job of a sweep starts
# from the same base, and the SVD of ExpensiveNet's three weights takes about 0.3 s, longer than the
# job's 100 training steps (docs/benchmarks.md section 14).
SVDS: list[tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = []
SVDS_KEPT = 6  # two bases of three layers


def singular_triplets(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.linalg.svd(weight, full_matrices=False)``, computed once per weight: a weight equal
    bit for bit to one factorised before gets that SVD back (the same as computing it again)."""
    for kept, svd in SVDS:
        if kept.shape == weight.shape and kept.dtype == weight.dtype and kept.device == weight.device and torch.equal(bits(kept), bits(weight)):
            return svd
    svd = tuple(torch.linalg.svd(weight, full_matrices=False))
    SVDS.append((weight.detach().clone(), svd))
    del SVDS[:-SVDS_KEPT]
    return svd


def bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bytes: torch.equal on floats takes -0.0 for 0.0 and never matches a NaN."""
    return t.detach().contiguous().view(torch.uint8)


class DoRA(Output):
    """DoRA (Liu et al., 2024) as PEFT computes it: a magnitude m per output row, starting at the
    row norms of W + ΔW (i.e. ||W||, since ΔW = 0 at step 0)."""

    def __init__(self):
        self.merged_factor: torch.Tensor | None = None  # m / ||W + ΔW|| of the merge, to undo it

    def parameters(self, rank, n_in, n_out):
        return {"lora_magnitude_vector": (n_out,)}

    def reset(self, layer):
        layer.lora_magnitude_vector.copy_(self.weight_norm(layer))

    @staticmethod
    def weight_norm(layer: LoRALinear) -> torch.Tensor:
        """||W + ΔW|| per output row, detached: the DoRA paper (section 4.3) treats it as a constant.
        W dequantized where the base is stored in NF4 (PEFT's DoRA on a 4-bit layer does the same)."""
        weight = dense(layer.base_layer.weight)
        return torch.linalg.norm(weight + layer.delta_weight().detach().to(weight.dtype), dim=1).detach()

    def forward(self, layer, x, out):
        # out + (m/n - 1) W x + (m/n) ΔW x, x the dropped input (PEFT uses it in both terms);
        # without dropout that is (m/n)(W x + ΔW x) + bias: the bias is not rescaled, and W x is
        # out - bias, already computed.
        factor = layer.lora_magnitude_vector / self.weight_norm(layer)
        bias = layer.base_layer.bias
        if isinstance(layer.lora_dropout, nn.Identity) or not layer.training:
            base = out if bias is None else out - bias
        else:
            base = F.linear(x, layer.base_layer.weight)
        return out + (factor - 1) * base + (factor * layer.scale) * layer.lora_product(x)

    def merge(self, layer, weight):
        delta = layer.delta_weight().to(weight.dtype)
        self.merged_factor = layer.lora_magnitude_vector / self.weight_norm(layer)
        weight.add_(delta).mul_(self.merged_factor[:, None])

    def unmerge(self, layer, weight):
        weight.div_(self.merged_factor[:, None])
        self.merged_factor = None
        weight -= layer.delta_weight().to(weight.dtype)


# Each variant under the flag variant_flags gives for its config value (rsLoRA's is the scale).
VARIANTS: dict[str, type[Update] | type[Output]] = {"pissa": PiSSA, "dora": DoRA}


def compose(spec: LoRASpec) -> tuple[Update, Output]:
    """The update and output a layer of ``spec`` computes: a variant's where the spec names one,
    plain LoRA's otherwise."""
    chosen = [VARIANTS[flag] for flag in variant_flags(spec) if flag in VARIANTS]
    updates = [cls for cls in chosen if issubclass(cls, Update)] or [Update]
    outputs = [cls for cls in chosen if issubclass(cls, Output)] or [Output]
    if len(updates) > 1 or len(outputs) > 1:
        raise ValueError(f"{' and '.join(c.__name__ for c in chosen)} replace the same part of LoRA; choose one")
    return updates[0](), outputs[0]()


def parameter_shapes(spec: LoRASpec, rank: int, n_in: int, n_out: int) -> Shapes:
    """Every trainable tensor a layer of ``spec`` holds at ``rank``, and its shape."""
    return {name: shape for part in compose(spec) for name, shape in part.parameters(rank, n_in, n_out).items()}

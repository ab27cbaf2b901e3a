"""The frozen base stored as QLoRA stores it (Dettmers et al., 2023): every Linear weight in 4-bit
NormalFloat, through torchao's NF4 tensor, which is pure PyTorch and so runs on CPU; or in int8
with one scale per output row (torchao's weight-only int8), twice NF4's bytes at a fraction of its
CPU cost (docs/benchmarks.md, section 16).

A quantized weight stays the parameter of its ``nn.Linear``: torchao's tensors answer ``F.linear``
by dequantizing and give the input its gradient, so an adapter trains on top and ``LoRALinear``
wraps the layer unchanged. What reads the dense weight (DoRA's row norms) reads ``dense(weight)``,
the dequantized weight, as PEFT does for bitsandbytes layers. What would write it (a merge,
PiSSA's residual, a full fine-tune) is refused in the config (``QuantConfig``): a 4- or 8-bit code
cannot hold W + ΔW.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from torch import nn

from loralab.layout import layer_shapes

if TYPE_CHECKING:
    from loralab.config import QuantConfig  # the schema imports Hydra; this module is read by every layer


def is_quantized(tensor: torch.Tensor) -> bool:
    """A tensor subclass that stores its values in inner tensors (torchao's NF4 and int8)."""
    return hasattr(tensor, "__tensor_flatten__")


def stored(tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """What a tensor's values are stored in: itself, or a quantized tensor's codes and constants."""
    if not is_quantized(tensor):
        return {"": tensor}
    names, _ = tensor.__tensor_flatten__()
    return {name: getattr(tensor, name) for name in names}


def dense(weight: torch.Tensor) -> torch.Tensor:
    """The weight as a plain tensor: a quantized weight dequantized (a copy), any other as it is."""
    if not is_quantized(weight):
        return weight
    return weight.get_original_weight() if hasattr(weight, "get_original_weight") else weight.dequantize()  # NF4, int8


def held_bytes(model: nn.Module) -> int:
    """Bytes of the memory the model's base tensors hold, as stored (each storage counted once)."""
    storages = {}
    for tensor in model.state_dict().values():
        for inner in stored(tensor).values():
            storage = inner.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def _torchao():
    """torchao's quantization module. Its import takes about 3 s (docs/benchmarks.md, section 16),
    paid only by a run that quantizes. It logs a deprecation from torch's pytree registry, torchao's
    and torch's business: quieted."""
    pytree = logging.getLogger("torch.utils._pytree")
    level = pytree.level
    pytree.setLevel(logging.ERROR)
    try:
        import torchao.quantization as torchao_quantization
    finally:
        pytree.setLevel(level)
    return torchao_quantization


def quantize(model: nn.Module, quant: QuantConfig) -> dict[str, tuple[int, int]]:
    """Store ``model``'s Linear weights in ``quant``'s format, frozen, before any adapter wraps
    them; returns each layer's NF4 (block, scaler block), empty for ``none`` and ``int8``."""
    if quant.format == "none":
        return {}
    blocks = quant.blocks(layer_shapes(model.sizes))
    ao = _torchao()
    for name in layer_shapes(model.sizes):
        layer = getattr(model, name)  # the MLP's layers by their layout names
        with torch.no_grad():
            if quant.format == "nf4":
                layer.weight = nn.Parameter(ao.to_nf4(layer.weight.detach().contiguous(), *blocks[name]), requires_grad=False)
            else:
                # Symmetric, one fp32 scale per output row; set_inductor_config would change
                # torch.compile's settings for the whole process.
                ao.quantize_(layer, ao.Int8WeightOnlyConfig(set_inductor_config=False))
                layer.weight.requires_grad_(False)
    return blocks

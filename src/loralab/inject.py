"""Model-wide LoRA operations: wrap target layers, freeze the rest, switch, merge, save tensors."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from loralab.lora import LoRALinear, is_lora_name
from loralab.spec import LoRASpec, match_targets


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Adaptable layers by name: plain Linears, and LoRALinears in place of the Linear they wrap."""
    wrapped = {id(m.base_layer) for m in lora_layers(model).values()}
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, LoRALinear) or (isinstance(m, nn.Linear) and id(m) not in wrapped)
    }


def resolve_targets(model: nn.Module, targets: str | tuple[str, ...]) -> list[str]:
    """Module names for ``targets``: a list of names, or one regex matched against whole names."""
    return match_targets(linear_layers(model), targets)


def inject_lora(model: nn.Module, spec: LoRASpec) -> list[str]:
    """Wrap each target Linear in a LoRALinear; return the targeted names.

    A layer that already carries an adapter of the same spec is left alone, so loading a second
    file of one layout into a model (load_adapter) fills the same layers; one of another spec is
    an error. A training run injects once, through the LoRA callback (loralab.finetuning).
    """
    names = resolve_targets(model, spec.targets)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = getattr(parent, child)
        if isinstance(layer, LoRALinear):
            if layer.spec != spec:
                raise ValueError(f"{name} already has an adapter ({layer.spec}); remove it before injecting {spec}")
            continue
        setattr(parent, child, LoRALinear(layer, spec, name))
    return names


def mark_only_lora_trainable(model: nn.Module) -> None:
    """Freeze every base parameter, biases included, as the reference notebook does."""
    for name, param in model.named_parameters():
        param.requires_grad = is_lora_name(name)


def set_lora_enabled(model: nn.Module, enabled: bool) -> None:
    for name, layer in lora_layers(model).items():
        if layer.merged and not enabled:
            raise RuntimeError(f"{name} is merged; call unmerge_lora(model) before disabling adapters")
        layer.enabled = enabled


@contextmanager
def lora_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """The base model, for the duration of the block (PEFT's ``disable_adapter()``)."""
    layers = lora_layers(model)
    before = {name: layer.enabled for name, layer in layers.items()}
    set_lora_enabled(model, False)
    try:
        yield model
    finally:
        for name, layer in layers.items():
            layer.enabled = before[name]


def merge_lora(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.unmerge()


def remove_lora(model: nn.Module, merge: bool = False) -> nn.Module:
    """Put each wrapped Linear back in its place; with ``merge``, its weight keeps the update first.

    The result is a plain model whose inference cost is the base model's.
    """
    for name, layer in lora_layers(model).items():
        if merge:
            layer.merge()
        else:
            layer.unmerge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.base_layer)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained adapter tensors (parameters named ``lora_*``)."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if is_lora_name(name)}


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy adapter tensors into an injected model; names and shapes must match exactly."""
    own = {name: p for name, p in model.named_parameters() if is_lora_name(name)}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"adapter tensors do not match the model: missing {missing}, unexpected {unexpected}")
    layers = lora_layers(model)
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(own[name].shape):
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, the model expects {tuple(own[name].shape)}")
        if layers[name.rpartition(".")[0]].merged:
            raise RuntimeError(f"{name} belongs to a merged layer; unmerge before loading another adapter")
        own[name].copy_(tensor)


def count_parameters(model: nn.Module) -> dict[str, int]:
    params = dict(model.named_parameters())
    lora = sum(p.numel() for n, p in params.items() if is_lora_name(n))
    total = sum(p.numel() for p in params.values())
    return {
        "total": total,
        "trainable": sum(p.numel() for p in params.values() if p.requires_grad),
        "lora": lora,
        "base": total - lora,
    }

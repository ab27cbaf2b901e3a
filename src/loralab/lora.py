"""LoRA from scratch: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (2021).

``LoRALinear`` wraps a frozen ``nn.Linear`` and adds ``scale * B @ A`` to its weight, computed
factorised (``(x @ A.T) @ B.T``) so the dense ``d x k`` update is never built while training.
Every adapter parameter's name starts with ``lora_``: that prefix is the contract for freezing,
optimizer filtering and saving. Merging is explicit and never tied to ``train()``/``eval()``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

INITS = ("gaussian", "kaiming")
PREFIX = "lora_"


class LoRALinear(nn.Module):
    def __init__(
        self,
        base_layer: nn.Linear,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        init: str = "gaussian",
        rslora: bool = False,
    ):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"LoRALinear wraps nn.Linear, got {type(base_layer).__name__}")
        max_rank = min(base_layer.in_features, base_layer.out_features)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= max_rank:
            raise ValueError(f"rank must be an integer in 1..{max_rank} for {base_layer}, got {rank!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self.base_layer = base_layer
        self.rank, self.alpha, self.init, self.rslora = rank, float(alpha), init, rslora
        # Section 4.1 of the paper: scaling by alpha / r means retuning the learning rate is rarely
        # needed when r changes. rsLoRA (Kalajdzievski, 2023) uses alpha / sqrt(r) so that large
        # ranks keep learning.
        self.scale = self.alpha / (math.sqrt(rank) if rslora else rank)
        factory = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, base_layer.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(base_layer.out_features, rank, **factory))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True
        self.merged = False
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        if self.init == "gaussian":
            nn.init.normal_(self.lora_A, mean=0.0, std=1.0)  # the seeds' choice
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's default
        nn.init.zeros_(self.lora_B)  # B = 0: the first forward pass equals the base model's

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if not self.enabled or self.merged:
            return out
        h = F.linear(self.lora_dropout(x), self.lora_A)
        if out.dim() == 2:
            # One kernel for out + scale * h @ B.T: no temporary for the product or the scaling.
            return torch.addmm(out, h, self.lora_B.t(), alpha=self.scale)
        return out + F.linear(h, self.lora_B) * self.scale

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        if not self.enabled:
            raise RuntimeError("cannot merge a disabled adapter; enable it first")
        self.base_layer.weight += self.delta_weight().to(self.base_layer.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self.base_layer.weight -= self.delta_weight().to(self.base_layer.weight.dtype)
        self.merged = False

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}, scale={self.scale:g}, enabled={self.enabled}, merged={self.merged}"


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


def resolve_targets(model: nn.Module, targets: str | Iterable[str]) -> list[str]:
    """Module names for ``targets``: a list of names, or one regex matched against whole names."""
    available = linear_layers(model)
    if isinstance(targets, str):
        names = [n for n in available if re.fullmatch(targets, n)]
        if not names:
            raise ValueError(f"lora.targets regex {targets!r} matches no Linear layer; available: {', '.join(available)}")
        return names
    names = list(targets)
    if not names:
        raise ValueError(f"lora.targets is empty; name one or more of: {', '.join(available)}")
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ValueError(f"lora.targets {unknown} are not Linear layers; available: {', '.join(available)}")
    return names


def inject_lora(
    model: nn.Module,
    targets: str | Iterable[str],
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    init: str = "gaussian",
    rslora: bool = False,
) -> list[str]:
    """Wrap each target Linear in a LoRALinear; return the targeted names.

    Idempotent: a layer that already carries an adapter with the same rank, alpha and scaling is
    left alone (Lightning runs setup for fit, validate and test); a different one is an error.
    """
    names = resolve_targets(model, targets)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = getattr(parent, child)
        if isinstance(layer, LoRALinear):
            if (layer.rank, layer.alpha, layer.rslora) != (rank, float(alpha), rslora):
                raise ValueError(
                    f"{name} already has an adapter (rank={layer.rank}, alpha={layer.alpha:g}, "
                    f"rslora={layer.rslora}); remove it before injecting rank={rank}, alpha={alpha}"
                )
            continue
        setattr(parent, child, LoRALinear(layer, rank, alpha, dropout, init, rslora))
    return names


def mark_only_lora_trainable(model: nn.Module) -> None:
    """Freeze every base parameter, biases included, as the seeds do."""
    for name, param in model.named_parameters():
        param.requires_grad = is_lora_name(name)


def is_lora_name(name: str) -> bool:
    return name.rpartition(".")[2].startswith(PREFIX)


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

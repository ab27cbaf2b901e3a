"""LoRA from scratch: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (2021),
with the variants practitioners choose between: DoRA, PiSSA's init and rsLoRA's scaling.

``LoRASpec`` is everything that defines an adapter, built once and used everywhere (injection,
adapter files, metrics.json, HParams). ``LoRALinear`` wraps a frozen ``nn.Linear`` and adds
``scale * B @ A`` to its weight, computed factorised so the dense update is never built while
training. Every adapter tensor's name starts with ``lora_``: that prefix is the contract for
freezing, optimizer filtering and saving. Merging is explicit and never tied to ``train()``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

# Each init and what it draws; B = 0 in the first two, so an adapter starts as a no-op.
INITS = {
    "gaussian": "lora_A ~ N(0, 1), lora_B = 0 (the seeds')",
    "kaiming": "lora_A ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), lora_B = 0 (PEFT's default)",
    "pissa": "lora_A, lora_B from W's top-rank singular triplets (Meng et al., 2024); saved converted to plain LoRA",
}
# The PEFT release whose LoraConfig fields and meanings adapter_config.json follows (checked
# against it by tests/test_peft_interop.py); written as peft_version, the field PEFT writes.
PEFT_VERSION = "0.21.2"
PREFIX = "lora_"


def _invalid(name: str, value, allowed: str) -> ValueError:
    return ValueError(f"lora.{name}={value!r} is invalid: {allowed}")


@dataclass(frozen=True)
class LoRASpec:
    """An adapter's settings. ``targets`` is a list of layer names or one regex (full match)."""

    rank: int
    alpha: float
    targets: tuple[str, ...] | str = field(default=("linear1", "linear2", "linear3"))
    dropout: float = 0.0
    init: str = "gaussian"
    rslora: bool = False
    dora: bool = False

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise _invalid("rank", self.rank, "expected an integer ≥ 1")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 < self.alpha < math.inf:
            raise _invalid("alpha", self.alpha, "expected a number > 0")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise _invalid("dropout", self.dropout, "expected a number ≥ 0 and < 1")
        if self.init not in INITS:
            raise _invalid("init", self.init, f"expected one of {', '.join(INITS)}")
        for name in ("rslora", "dora"):
            if not isinstance(getattr(self, name), bool):
                raise _invalid(name, getattr(self, name), "expected true or false")
        targets = self.targets if isinstance(self.targets, str) else tuple(self.targets)
        if not isinstance(targets, str) and not all(isinstance(t, str) for t in targets):
            raise _invalid("targets", self.targets, "expected a list of layer names or one regex string")
        object.__setattr__(self, "targets", targets)
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "dropout", float(self.dropout))

    @property
    def scale(self) -> float:
        # Section 4.1 of the LoRA paper: scaling by alpha / r means retuning the learning rate is
        # rarely needed when r changes. rsLoRA (Kalajdzievski, 2023) uses alpha / sqrt(r) so that
        # large ranks keep learning.
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def to_dict(self) -> dict:
        """metrics.json's ``lora`` field and the run's HParams."""
        values = asdict(self)
        values["targets"] = self.targets if isinstance(self.targets, str) else list(self.targets)
        return {"rank": self.rank, "alpha": self.alpha, "scale": self.scale} | values

    @property
    def saved_rank(self) -> int:
        """The rank of the saved adapter: PiSSA's is written as plain LoRA on the original base,
        A' = [A; A0] and B' = [B, -B0] (PEFT's conversion), so it holds twice the trained rank."""
        return 2 * self.rank if self.init == "pissa" else self.rank

    def to_peft_config(self) -> dict:
        """adapter_config.json in PEFT's LoraConfig fields, describing the saved file."""
        # PEFT's PiSSA conversion keeps the scale at twice the rank: alpha * 2, or * sqrt 2 (rsLoRA).
        alpha = self.alpha * (self.saved_rank / self.rank) ** (0.5 if self.rslora else 1.0)
        return {
            "peft_type": "LORA",
            "task_type": None,
            "base_model_name_or_path": None,
            "r": self.saved_rank,
            "lora_alpha": alpha,
            "target_modules": self.targets if isinstance(self.targets, str) else list(self.targets),
            "lora_dropout": self.dropout,
            "bias": "none",
            "use_rslora": self.rslora,
            "use_dora": self.dora,
            "init_lora_weights": self.peft_init,
            "fan_in_fan_out": False,
            "modules_to_save": None,
            "inference_mode": True,
            "peft_version": PEFT_VERSION,
        }

    @property
    def peft_init(self) -> bool | str:
        """init_lora_weights as PEFT means it: True is A ~ kaiming-uniform, "gaussian" is A ~
        N(0, std 1/r), B = 0 for both. Our gaussian (std 1) is PEFT's at rank 1 only; at other
        ranks PEFT has no equivalent (an unknown string would break its loading), so the file
        says True, B = 0 like ours, and the weights' metadata records our init (loralab_init).
        A PiSSA adapter is saved converted to plain LoRA, which PEFT also marks True."""
        return "gaussian" if self.init == "gaussian" and self.rank == 1 else True

    @classmethod
    def from_peft_config(cls, config: dict, loralab_init: str | None = None) -> LoRASpec:
        """The spec of a saved adapter (ours or PEFT's): what to inject before loading its tensors.
        ``loralab_init``: the init our weights' metadata records, where PEFT's field cannot say it."""
        init = config.get("init_lora_weights", True)
        if isinstance(init, str) and init.startswith("pissa"):
            raise ValueError("it is a PiSSA adapter saved without conversion (it applies to PiSSA's residual base only); "
                             "save it with PEFT's path_initial_model_for_weight_conversion")
        targets = config["target_modules"]
        return cls(
            rank=int(config["r"]),
            alpha=float(config["lora_alpha"]),
            targets=tuple(targets) if isinstance(targets, list) else targets,
            dropout=float(config.get("lora_dropout") or 0.0),
            init=loralab_init if loralab_init in ("gaussian", "kaiming") else "gaussian" if init == "gaussian" else "kaiming",
            rslora=bool(config.get("use_rslora", False)),
            dora=bool(config.get("use_dora", False)),
        )


class LoRALinear(nn.Module):
    """``base_layer(x) + scale * B A x``; with DoRA, each output row is rescaled to a learnt
    magnitude; with PiSSA, A and B start on W's principal singular directions."""

    def __init__(self, base_layer: nn.Linear, spec: LoRASpec):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"LoRALinear wraps nn.Linear, got {type(base_layer).__name__}")
        max_rank = min(base_layer.in_features, base_layer.out_features)
        if spec.rank > max_rank:
            raise ValueError(f"rank must be an integer in 1..{max_rank} for {base_layer}, got {spec.rank!r}")
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

    def lora_output(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out + scale * B A x``; under PiSSA ``out + scale * (B A x - B0 A0 x)``, whose
        difference is exactly zero at step 0 (the same products of the same tensors)."""
        if self.spec.init == "pissa":
            lora = F.linear(F.linear(x, self.lora_A), self.lora_B) - F.linear(F.linear(x, self.lora_A0), self.lora_B0)
            return torch.add(out, lora, alpha=self.scale)
        if out.dim() != 2:
            return out + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale
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
        lora = self.lora_output(dropped, torch.zeros_like(base))
        return out + (factor - 1) * base + factor * lora

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
        variant = "".join(f", {flag}" for flag in ("dora", "rslora") if getattr(self.spec, flag))
        return f"rank={self.rank}, alpha={self.spec.alpha:g}, scale={self.scale:g}, init={self.spec.init}{variant}, enabled={self.enabled}, merged={self.merged}"


def is_lora_name(name: str) -> bool:
    return name.rpartition(".")[2].startswith(PREFIX)


"""LoRA settings without torch: ``LoRASpec`` is everything that defines an adapter, built once
from the validated config and used everywhere (injection, adapter files, metrics.json, HParams).
Torch-free so that the CLI can check a config and refuse a typo before importing torch."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

# gaussian: A ~ N(0, 1), the seeds' choice; kaiming: PEFT's default; pissa: Meng et al. (2024).
INITS = ("gaussian", "kaiming", "pissa")


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
        return {"rank": self.rank, "alpha": self.alpha, "scale": self.scale} | values | {"saved_rank": self.saved_rank}

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
            "init_lora_weights": "gaussian" if self.init == "gaussian" else True,
            "fan_in_fan_out": False,
            "modules_to_save": None,
            "inference_mode": True,
        }

    @classmethod
    def from_peft_config(cls, config: dict) -> LoRASpec:
        """The spec of a saved adapter (ours or PEFT's): what to inject before loading its tensors."""
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
            init="gaussian" if init == "gaussian" else "kaiming",
            rslora=bool(config.get("use_rslora", False)),
            dora=bool(config.get("use_dora", False)),
        )


def match_targets(available: Iterable[str], targets: str | tuple[str, ...]) -> list[str]:
    """Layer names for ``targets``: a list of names, or one regex matched against whole names."""
    available = list(available)
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

"""LoRA settings without torch: ``LoRASpec`` is everything that defines an adapter, built once
from the validated config and used everywhere (injection, adapter files, metrics.json, HParams).
Torch-free so that the CLI can check a config and refuse a typo before importing torch."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

from loralab.rules import Checked, Rule, invalid, setting

# Each init and what it draws; B = 0 in the first two, so an adapter starts as a no-op. The texts
# are written into every adapter file's metadata (loralab_init_rule): "the seeds'" names the
# reference notebook, kept so that files stay byte-for-byte what earlier runs wrote.
INITS = {
    "gaussian": "lora_A ~ N(0, 1), lora_B = 0 (the seeds')",
    "kaiming": "lora_A ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), lora_B = 0 (PEFT's default)",
    "pissa": "lora_A, lora_B from W's top-rank singular triplets (Meng et al., 2024); saved converted to plain LoRA",
}
# The PEFT release whose LoraConfig fields and meanings adapter_config.json follows (checked
# against it by tests/test_peft_interop.py); written as peft_version, the field PEFT writes.
PEFT_VERSION = "0.21.2"


@dataclass(frozen=True)
class LoRASpec(Checked):
    """An adapter's settings, and the ``lora`` node of the fine-tune's schema (loralab.config).
    ``targets`` is a list of layer names or one regex (full match). ``rank_pattern`` and
    ``alpha_pattern`` give layers their own rank and alpha, as PEFT's LoraConfig fields of those
    names do: a key is a regex matched against the end of a layer's name (``linear3``), the first
    key that matches wins, and a layer no key matches takes ``rank`` and ``alpha``."""

    KEY: ClassVar[str] = "lora"

    rank: int = setting(1, Rule(int, low=1))
    alpha: float = setting(1.0, Rule(float, low=0, low_open=True))
    targets: Any = ("linear1", "linear2", "linear3")
    dropout: float = setting(0.0, Rule(float, low=0, high=1, high_open=True))
    init: str = setting("gaussian", Rule(str, choices=tuple(INITS)))
    rslora: bool = setting(False, Rule(bool))
    dora: bool = setting(False, Rule(bool))
    rank_pattern: dict[str, int] = setting(factory=dict)
    alpha_pattern: dict[str, float] = setting(factory=dict)

    def __post_init__(self):
        self.check_rules()
        for key, rule in (("rank_pattern", Rule(int, low=1)), ("alpha_pattern", Rule(float, low=0, low_open=True))):
            pattern = getattr(self, key)
            if not isinstance(pattern, dict):
                raise invalid(f"lora.{key}", pattern, "expected a mapping of layer-name regexes to values, e.g. {linear3: 8}")
            for name, value in pattern.items():
                compile_pattern(f"lora.{key}", name)
                if not rule.allows(value):
                    raise invalid(f"lora.{key}.{name}", value, rule.expected)
            object.__setattr__(self, key, {str(k): (int(v) if key == "rank_pattern" else float(v)) for k, v in pattern.items()})
        targets = self.targets if isinstance(self.targets, str) else tuple(self.targets) if isinstance(self.targets, (list, tuple)) else None
        if targets is None or (not isinstance(targets, str) and not all(isinstance(t, str) for t in targets)):
            raise invalid("lora.targets", self.targets, "expected a list of layer names or one regex string")
        object.__setattr__(self, "targets", targets)
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "dropout", float(self.dropout))

    def __hash__(self) -> int:
        # The patterns are dicts; a spec is still a value (AdapterSet and adapter_spec compare them).
        # Sorted: equal specs (dict equality ignores order) must hash alike.
        return hash(tuple((f.name, tuple(sorted(v.items())) if isinstance(v := getattr(self, f.name), dict) else v) for f in fields(self)))

    @property
    def scale(self) -> float:
        """The scale of a layer that no pattern names."""
        return self.scaling(self.rank, self.alpha)

    def scaling(self, rank: int, alpha: float) -> float:
        # Section 4.1 of the LoRA paper: scaling by alpha / r means retuning the learning rate is
        # rarely needed when r changes. rsLoRA (Kalajdzievski, 2023) uses alpha / sqrt(r) so that
        # large ranks keep learning.
        return alpha / (math.sqrt(rank) if self.rslora else rank)

    def rank_of(self, layer: str) -> int:
        """Layer ``layer``'s rank: its rank_pattern entry's, or ``rank``."""
        return self.rank_pattern.get(pattern_key(self.rank_pattern, layer), self.rank)

    def alpha_of(self, layer: str) -> float:
        return self.alpha_pattern.get(pattern_key(self.alpha_pattern, layer), self.alpha)

    def scale_of(self, layer: str) -> float:
        return self.scaling(self.rank_of(layer), self.alpha_of(layer))

    def to_dict(self) -> dict:
        """metrics.json's ``lora`` field and the run's HParams."""
        values = asdict(self)
        values["targets"] = self.targets if isinstance(self.targets, str) else list(self.targets)
        return {"rank": self.rank, "alpha": self.alpha, "scale": self.scale} | values | {"saved_rank": self.saved_rank}

    @property
    def saving_factor(self) -> int:
        """How many times its trained rank a saved layer holds (see saved_rank)."""
        return 2 if self.init == "pissa" else 1

    @property
    def saved_rank(self) -> int:
        """The rank of the saved adapter: PiSSA's is written as plain LoRA on the original base,
        A' = [A; A0] and B' = [B, -B0] (PEFT's conversion), so it holds twice the trained rank."""
        return self.saving_factor * self.rank

    def to_peft_config(self) -> dict:
        """adapter_config.json in PEFT's LoraConfig fields, describing the saved file."""
        # PEFT's PiSSA conversion keeps the scale at twice the rank: alpha * 2, or * sqrt 2 (rsLoRA),
        # and doubles rank_pattern (peft_model.py, save_pretrained); each alpha_pattern entry gets
        # the factor that keeps its layer's scale (PEFT refuses rsLoRA with patterns there).
        factor = self.saving_factor ** (0.5 if self.rslora else 1.0)
        return {
            "peft_type": "LORA",
            "task_type": None,
            "base_model_name_or_path": None,
            "r": self.saved_rank,
            "lora_alpha": self.alpha * factor,
            "rank_pattern": {k: self.saving_factor * r for k, r in self.rank_pattern.items()},
            "alpha_pattern": {k: a * factor for k, a in self.alpha_pattern.items()},
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
        if init not in (True, False, "gaussian"):
            # olora, corda, loftq and the like rewrite the base they train on: this file would not
            # apply to the original one.
            raise ValueError(f"init_lora_weights={init!r} trains on a rewritten base; only true, false and \"gaussian\" apply to the original")
        unsupported = [key for key in ("layers_to_transform", "modules_to_save") if config.get(key)]
        if config.get("bias", "none") != "none":
            unsupported.append("bias")
        if unsupported:
            raise ValueError(f"it uses {', '.join(unsupported)}, which loralab's adapters do not have (every target layer adapted, no bias)")
        def read(key: str, rule: Rule, default=None):
            # The file's own key names the problem: "its r='abc'", not a setting it never had.
            value = config.get(key, default)
            if not rule.allows(value):
                raise ValueError(f"its {key}={value!r} is invalid: {rule.expected}")
            return value

        targets = config.get("target_modules")
        return cls(
            rank=read("r", Rule(int, low=1)),
            alpha=float(read("lora_alpha", Rule(float, low=0, low_open=True))),
            targets=tuple(targets) if isinstance(targets, list) else targets,
            dropout=float(read("lora_dropout", Rule(float, low=0, high=1, high_open=True, optional=True)) or 0.0),
            init=loralab_init if loralab_init in ("gaussian", "kaiming") else "gaussian" if init == "gaussian" else "kaiming",
            rslora=read("use_rslora", Rule(bool), False),
            dora=read("use_dora", Rule(bool), False),
            rank_pattern=config.get("rank_pattern") or {},  # LoRASpec refuses what is not a mapping
            alpha_pattern=config.get("alpha_pattern") or {},
        )


def variant_flags(settings) -> list[str]:
    """The variants an adapter's settings (a LoRASpec, or metrics.json's ``lora`` dict) combine:
    ``["dora", "rslora", "pissa"]``, or none for plain LoRA."""
    get = settings.get if isinstance(settings, dict) else lambda key: getattr(settings, key, None)
    return [flag for flag in ("dora", "rslora") if get(flag)] + (["pissa"] if get("init") == "pissa" else [])


def compile_pattern(key: str, pattern: str) -> re.Pattern:
    """A regex from the config or an adapter file, its error in one line."""
    try:
        return re.compile(pattern)
    except (re.error, TypeError) as err:
        raise invalid(key, pattern, f"not a regular expression ({getattr(err, 'msg', err)}); fix or escape it") from None


def pattern_key(pattern: dict, layer: str) -> str | None:
    """The first key of a rank or alpha pattern that names ``layer``: PEFT's get_pattern_key, a
    key matching the whole name or its last dotted parts."""
    return next((key for key in pattern if re.match(rf"(.*\.)?({key})$", layer)), None)


def match_targets(available: Iterable[str], targets: str | tuple[str, ...]) -> list[str]:
    """Layer names for ``targets``: a list of names, or one regex matched against whole names."""
    available = list(available)
    if isinstance(targets, str):
        regex = compile_pattern("lora.targets", targets)
        names = [n for n in available if regex.fullmatch(n)]
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

"""Adapter files in Hugging Face PEFT's layout: ``adapter_model.safetensors`` holds
``base_model.model.<module>.lora_A.weight`` (r x in) and ``...lora_B.weight`` (out x r);
``adapter_config.json`` holds the LoraConfig fields. A PEFT user can load one, and PEFT-written
LoRA adapters load here."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from torch import nn

from loralab.errors import ArtifactError
from loralab.files import regular_file, short, write_json, write_safetensors
from loralab.inject import (
    inject_lora,
    linear_layers,
    load_lora_state_dict,
    lora_layers,
    remove_lora,
    resolve_targets,
    set_lora_enabled,
)
from loralab.lora import is_lora_name
from loralab.spec import INITS, LoRASpec
from loralab.variants import parameter_shapes
from loralab.weights import fingerprint, read_safetensors

log = logging.getLogger(__name__)

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
MAGNITUDE = "lora_magnitude_vector"  # PEFT saves DoRA's magnitude without a ".weight" suffix


def to_peft_key(name: str) -> str:
    return f"{PEFT_PREFIX}{name}" if name.endswith(MAGNITUDE) else f"{PEFT_PREFIX}{name}.weight"


def from_peft_key(key: str) -> str:
    name = key.removeprefix(PEFT_PREFIX).removesuffix(".weight")
    return re.sub(r"\.(lora_A|lora_B|lora_magnitude_vector)\.default$", r".\1", name)


def saved_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter as it is saved, for the original base: each layer's tensors in its variants'
    saved form (PiSSA's as plain LoRA: A' = [A; A0], B' = [B, -B0])."""
    return {f"{name}.{key}": t for name, layer in lora_layers(model).items() for key, t in layer.saved_tensors().items()}


def adapter_spec(model: nn.Module) -> LoRASpec:
    specs = {layer.spec for layer in lora_layers(model).values()}
    if len(specs) != 1:
        raise ValueError("the model carries no LoRA adapter to save" if not specs else f"the model carries {len(specs)} different adapters; save one")
    return specs.pop()


def save_adapter(model: nn.Module, directory: str | Path, sizes: list[int], base_sha256: str | None = None,
                 extra_meta: dict[str, str] | None = None) -> dict[str, Path]:
    """``base_sha256``: the base's fingerprint where the caller already holds it (hashing the
    11 MB base again gives the same value); computed otherwise. ``extra_meta``: more metadata
    for the weights file (a combined adapter's recipe)."""
    spec = adapter_spec(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", "base_sha256": base_sha256 or fingerprint(model), "model": json.dumps({"sizes": list(sizes)}),
            # PEFT ignores safetensors metadata: the one clean place for what its config cannot say.
            "loralab_init": spec.init, "loralab_init_rule": INITS[spec.init]} | (extra_meta or {})
    tensors = {to_peft_key(name): t for name, t in saved_tensors(model).items()}
    return {
        "adapter": write_safetensors(directory / WEIGHTS_FILE, tensors, meta),
        "adapter_config": write_json(directory / CONFIG_FILE, spec.to_peft_config()),
    }


def read_adapter_config(directory: Path) -> dict:
    if not directory.is_dir():
        raise ArtifactError(f"adapter {short(directory)} is not a directory; pass the directory that holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    path = directory / CONFIG_FILE
    if not path.exists():
        raise ArtifactError(f"no {CONFIG_FILE} in {short(directory)}; pass a directory written by save_adapter or PEFT")
    try:
        config = json.loads(regular_file(path, CONFIG_FILE, limit=1 << 20).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{short(path)} is not valid JSON ({str(err)[:60]}); restore it or save the adapter again") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        found = config.get("peft_type") if isinstance(config, dict) else type(config).__name__
        raise ArtifactError(f"{short(path)} has peft_type {found!r}; only LoRA adapters (peft_type \"LORA\") are supported")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in config:
            raise ArtifactError(f"{short(path)} lacks {key!r}; it is not a complete LoRA adapter config")
    return config


def read_adapter(directory: str | Path) -> tuple[dict, dict, dict]:
    """(config, tensors under loralab names, safetensors metadata) of an adapter directory."""
    directory = Path(directory)
    config = read_adapter_config(directory)
    tensors, meta = read_safetensors(directory / WEIGHTS_FILE, "adapter")
    return config, {from_peft_key(k): t for k, t in tensors.items()}, meta


def read_spec(config: dict, meta: dict, source: str) -> LoRASpec:
    try:
        return LoRASpec.from_peft_config(config, meta.get("loralab_init"))
    except (ValueError, TypeError) as err:  # a ConfigError (r=0) is a ValueError
        raise ArtifactError(f"adapter in {short(source)} cannot be used: {err}") from None


def apply_adapter(model: nn.Module, spec: LoRASpec, state: dict, source: str) -> None:
    """Fill ``model``'s adapters from a read adapter, injecting them first where needed."""
    try:
        inject_lora(model, spec)
        load_lora_state_dict(model, state)
    except ValueError as err:
        raise ArtifactError(f"adapter in {short(source)} does not fit the base: {err}") from None


def check_fits(model: nn.Module, spec: LoRASpec, state: dict, source: str) -> None:
    """Refuse an adapter whose targets or tensor shapes do not fit ``model``, before anything runs."""
    try:
        names = resolve_targets(model, spec.targets)
    except ValueError as err:
        raise ArtifactError(f"adapter in {short(source)} does not fit the base: {err}") from None
    layers = linear_layers(model)
    expected = {}
    for name in names:
        base = getattr(layers[name], "base_layer", layers[name])
        expected |= {f"{name}.{key}": shape for key, shape in parameter_shapes(spec, spec.rank_of(name), base.in_features, base.out_features).items()}
    found = {key: tuple(t.shape) for key, t in state.items()}
    if found != expected:
        wrong = sorted(k for k in found.keys() | expected.keys() if found.get(k) != expected.get(k))[0]
        if wrong not in found:
            problem = f"it lacks {wrong} {expected[wrong]}, which its config (target_modules, r, use_dora) calls for"
        elif wrong not in expected:
            problem = f"it holds {wrong}, which its config (target_modules, r, use_dora) does not call for"
        else:
            problem = f"{wrong} has shape {found[wrong]}, the model needs {expected[wrong]}"
        raise ArtifactError(f"adapter in {short(source)} does not fit the base: {problem}")


def layout(spec: LoRASpec) -> tuple:
    """What the wrapped layers depend on: adapters that share it switch by copying tensors (the
    init only drew the starting values, which the copy replaces)."""
    targets = tuple(sorted(spec.targets)) if not isinstance(spec.targets, str) else spec.targets
    patterns = tuple(spec.rank_pattern.items()), tuple(spec.alpha_pattern.items())
    return targets, spec.rank, spec.alpha, spec.rslora, spec.dora, spec.dropout, patterns


def warn_if_other_base(meta: dict, base_sha256: str, source: str, quant: str = "none") -> None:
    """``base_sha256``: the fp32 weights' fingerprint; ``quant``: how the base is held now."""
    if meta.get("base_sha256") and meta["base_sha256"] != base_sha256:
        log.warning("adapter in %s was trained on another base (sha256 %s…); loading it anyway", source, meta["base_sha256"][:12])
    trained_on = meta.get("loralab_quant", "none")
    if trained_on != quant:
        # QLoRA's mismatch: the adapter learnt to correct another rounding of the same weights.
        log.warning("adapter in %s was trained on the base stored as %s, and is applied to it stored as %s", source, trained_on, quant)


def load_adapter(model: nn.Module, directory: str | Path) -> dict:
    """Inject and fill the adapter saved in ``directory``; return its config.

    Refuses an adapter whose shapes do not fit ``model``; warns when only the base differs.
    """
    config, state, meta = read_adapter(directory)
    spec = read_spec(config, meta, str(directory))
    check_fits(model, spec, state, str(directory))  # before any allocation: r may be anything a file says
    apply_adapter(model, spec, state, str(directory))
    warn_if_other_base(meta, fingerprint(model), str(directory))
    return config


class AdapterSet:
    """Several adapters on one base model, switched by name without reloading the base.

    Adapters are read and checked against the base once, in ``add``; switching copies only their
    tensors into the wrapped layers (re-wrapping only when the next adapter has another layout:
    targets, rank, alpha, scaling, DoRA or dropout).
    """

    def __init__(self, model: nn.Module, base_sha256: str | None = None, quant: str = "none"):
        """``base_sha256``: the fp32 weights' fingerprint where the caller holds it (for a
        quantized base it cannot be computed from the model); ``quant``: how the base is held."""
        self.model, self.quant = model, quant
        self.base_sha256 = base_sha256 or fingerprint(model)
        self.adapters: dict[str, tuple[LoRASpec, dict, str]] = {}  # name -> (spec, tensors, source)
        self.active: str | None = None
        self._injected: LoRASpec | None = None  # the spec of the adapters now wrapped in the model
        self._params: dict[str, torch.Tensor] = {}
        self._layers: list = []

    def add(self, name: str, directory: str | Path) -> None:
        if name in self.adapters:
            raise ArtifactError(f"an adapter named {name!r} is already loaded; give each adapter its own name")
        config, state, meta = read_adapter(directory)
        spec = read_spec(config, meta, str(directory))
        check_fits(self.model, spec, state, str(directory))
        warn_if_other_base(meta, self.base_sha256, str(directory), self.quant)
        self.adapters[name] = (spec, state, str(directory))

    def use(self, name: str | None) -> None:
        """Switch to adapter ``name``; ``None`` switches adapters off (the base model exactly)."""
        if name is None:
            set_lora_enabled(self.model, False)
        else:
            if name not in self.adapters:
                raise ArtifactError(f"no adapter named {name!r}; loaded: {', '.join(self.adapters) or 'none'}")
            spec, state, source = self.adapters[name]
            if self._injected is not None and layout(spec) == layout(self._injected):
                if any(layer.merged for layer in self._layers):
                    raise RuntimeError("an adapter is merged; call unmerge_lora(model) before switching")
                with torch.no_grad():  # the fast path: copy A and B into the layers as they are
                    for key, tensor in state.items():
                        self._params[key].copy_(tensor)
            else:
                remove_lora(self.model)
                apply_adapter(self.model, spec, state, source)
                self._params = {n: p for n, p in self.model.named_parameters() if is_lora_name(n)}
                self._layers = list(lora_layers(self.model).values())
                self._injected = spec
            set_lora_enabled(self.model, True)
        self.active = name

"""loralab: LoRA and its variants from scratch, on an MNIST MLP.

The public API, as the README shows it. Names load on first use (PEP 562), so importing one
torch-free module (the CLI's config check) does not import torch or Lightning.
"""

from importlib import import_module

_EXPORTS = {
    "loralab.adapter": ("AdapterSet", "load_adapter", "save_adapter"),
    "loralab.inject": (
        "count_parameters", "inject_lora", "load_lora_state_dict", "lora_disabled", "lora_layers", "lora_state_dict",
        "mark_only_lora_trainable", "merge_lora", "remove_lora", "set_lora_enabled", "unmerge_lora",
    ),
    "loralab.lora": ("LoRALinear", "is_lora_name"),
    "loralab.spec": ("LoRASpec",),
    "loralab.model": ("MLP",),
    "loralab.results": ("Shift", "TestResult"),
    "loralab.runs": ("Run", "read_run"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'loralab' has no attribute {name!r}")
    value = getattr(import_module(_MODULE_OF[name]), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return __all__

"""loralab: LoRA and its variants from scratch, on an MNIST MLP.

The public API, as the README shows it; Lightning is not imported until a stage runs.
"""

from loralab.adapter import AdapterSet, load_adapter, save_adapter
from loralab.inject import (
    count_parameters,
    inject_lora,
    load_lora_state_dict,
    lora_disabled,
    lora_layers,
    lora_state_dict,
    mark_only_lora_trainable,
    merge_lora,
    remove_lora,
    set_lora_enabled,
    unmerge_lora,
)
from loralab.lora import LoRALinear, LoRASpec, is_lora_name
from loralab.model import MLP
from loralab.results import Shift, TestResult
from loralab.runs import Run, read_run

__all__ = [
    "MLP",
    "AdapterSet",
    "LoRALinear",
    "LoRASpec",
    "Run",
    "Shift",
    "TestResult",
    "count_parameters",
    "inject_lora",
    "is_lora_name",
    "load_adapter",
    "load_lora_state_dict",
    "lora_disabled",
    "lora_layers",
    "lora_state_dict",
    "mark_only_lora_trainable",
    "merge_lora",
    "read_run",
    "remove_lora",
    "save_adapter",
    "set_lora_enabled",
    "unmerge_lora",
]

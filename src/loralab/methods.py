"""The two ways the fine-tune stage trains a base: LoRA adapters on a frozen base, or every
parameter (the baseline LoRA is measured against). Each sets itself up, compares the base before
and after, and saves what it trained. The base's own results, which both measure against, are
``base_result``'s."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

from torch import nn

from loralab.adapter import save_adapter
from loralab.config import FinetuneSettings
from loralab.finetuning import LoRAFinetuning
from loralab.results import TestResult
from loralab.runs import FULL_FILE
from loralab.spec import LoRASpec, variant_flags
from loralab.weights import HeldBase, fingerprint, save_base

Test = Callable[[str], TestResult]  # runs the test set (or, for a "val..." split, validation), logged under the split

# The base's results by its fingerprint and the images they count: every job of a sweep on one
# base would test it again, a test and a validation pass of a job of about 2 s (benchmarks/sweep.py).
BASE_RESULTS: dict[tuple, TestResult] = {}


def base_result(test: Test, split: str, base_sha256: str, images: tuple, log: Callable[[TestResult, str], None]) -> TestResult:
    """The base's result on ``split`` (test_base, val_base); ``images`` names the data tested
    (the data dir; for validation, its size and seed too). Call it before training: a full
    fine-tune trains the base, and adapters are switched off for it. A result another job
    measured is logged through ``log``, so every run's TensorBoard has its base's scalars."""
    key = (base_sha256, images, split)
    if key in BASE_RESULTS:
        log(BASE_RESULTS[key], split)
    else:
        BASE_RESULTS[key] = test(split)
    return BASE_RESULTS[key]


class BaseChangedError(RuntimeError):
    """The frozen base weights changed during LoRA training: a bug, never a silent pass."""

    def __init__(self, before: str, after: str):
        super().__init__(f"base weights changed during LoRA training: sha256 {before} -> {after}")
        self.before, self.after = before, after


def base_comparison(before: str, after: str | None) -> dict:
    """metrics.json's record of the comparison: the fingerprint after training (None where
    nothing is compared) and whether it is the one before."""
    return {"base_sha256_after": after, "base_unchanged": None if after is None else after == before}


class LoRAMethod:
    name = "lora"

    def __init__(self, spec: LoRASpec, held: HeldBase, base_path: Path):
        self.spec, self.held = spec, held
        self.base_sha256 = held.sha256
        self.callback = LoRAFinetuning(spec, base_path, self.base_sha256, held.format)
        self.frozen_base = None  # distillation's base is the model with its adapters off

    def callbacks(self) -> list:
        return [self.callback]

    def prepare(self, module) -> None:
        # In this process, before any test or fit: ddp_spawn's ranks train copies of this module,
        # and rank 0's weights come back into it.
        self.callback.attach(module)

    def compare_base(self, model: nn.Module) -> dict:
        """On the weights the run keeps (under ddp_spawn, the ones rank 0 sent back). A changed
        base stops the run before any artifact is written."""
        comparison = base_comparison(self.base_sha256, fingerprint(model))
        if not comparison["base_unchanged"]:
            raise BaseChangedError(self.base_sha256, comparison["base_sha256_after"])
        return comparison

    def save(self, model: nn.Module, run_dir: Path, cfg: FinetuneSettings) -> dict[str, Path]:
        # The adapter records the fp32 weights as its base (the file users apply it to; compare_base
        # has confirmed them unchanged), and a quantized base's format beside them.
        quant = {"loralab_quant": self.held.format} if self.held.quantized else {}
        return save_adapter(model, run_dir, list(cfg.model.sizes), self.held.weights_sha256, quant)

    def summary(self) -> dict:
        return self.spec.to_dict()

    def describe(self) -> str:
        names = {"dora": "DoRA", "rslora": "rsLoRA", "pissa": "PiSSA init"}
        return ", ".join([f"LoRA rank {self.spec.rank}, alpha {self.spec.alpha:g}", *(names[f] for f in variant_flags(self.spec))])


class FullMethod:
    name = "full"

    def __init__(self, model: nn.Module, held: HeldBase, distill: float):
        self.base_sha256 = held.sha256
        # Training the base itself: distillation needs a frozen copy of where it started.
        self.frozen_base = copy.deepcopy(model).requires_grad_(False) if distill else None

    def callbacks(self) -> list:
        return []

    def prepare(self, module) -> None:
        pass

    def compare_base(self, model: nn.Module) -> dict:
        return base_comparison(self.base_sha256, None)  # the base is what a full fine-tune trains

    def save(self, model: nn.Module, run_dir: Path, cfg: FinetuneSettings) -> dict[str, Path]:
        save_base(model, run_dir / FULL_FILE, cfg.model.name)
        return {"model": run_dir / FULL_FILE}

    def summary(self) -> None:
        return None

    def describe(self) -> str:
        return "full fine-tune"


def make_method(cfg: FinetuneSettings, model: nn.Module, held: HeldBase, base_path: Path) -> LoRAMethod | FullMethod:
    return LoRAMethod(cfg.adapter, held, base_path) if cfg.adapter is not None else FullMethod(model, held, cfg.finetune.distill)

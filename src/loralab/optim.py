"""The optimizer the stages train with: Adam, and LoRA+'s learning rate per parameter group."""

from __future__ import annotations

import torch
from torch import nn


def adam(params: list, lr: float, fused: bool) -> torch.optim.Adam:
    """The stages' Adam (the benchmark uses it too). ``foreach`` updates all tensors per kernel
    instead of torch's CPU default of one at a time, bit-identically (tests/test_optimizer.py);
    ``fused`` does the whole update in one kernel per tensor and rounds differently. Adapters
    train with ``fused``: faster at batch 10 and 64, level at 256, and a 100-step fine-tune ends
    within 1e-5 of foreach's (tests/test_optimizer.py). Whole networks train with ``foreach``:
    over thousands of pretraining steps fused's rounding grows into a different base, and every
    published result is measured on the foreach bases. docs/benchmarks.md section 10 has the
    measurements."""
    return torch.optim.Adam(params, lr=lr, fused=True) if fused else torch.optim.Adam(params, lr=lr, foreach=True)


def loraplus_groups(named: list[tuple[str, nn.Parameter]], lr: float, ratio: float) -> list[dict]:
    """LoRA+ (Hayou et al., 2024) as PEFT's create_loraplus_optimizer: every B matrix and every
    1-D trainable parameter (DoRA's magnitudes) learns ``ratio`` times faster than the rest."""
    fast = [p for n, p in named if "lora_B" in n or p.ndim == 1]
    slow = [p for n, p in named if not ("lora_B" in n or p.ndim == 1)]
    return [group for group in ({"params": slow, "lr": lr}, {"params": fast, "lr": lr * ratio}) if group["params"]]

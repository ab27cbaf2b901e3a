"""The MLP's layer names and shapes, without torch: the config is checked against them before
torch is imported (a typo costs one line, not torch's import time)."""

from __future__ import annotations


def layer_shapes(sizes: list[int] | tuple[int, ...]) -> dict[str, tuple[int, int]]:
    """``{"linear1": (in, out), ...}``: named as the hkproj/pytorch-lora notebook's ExpensiveNet names them."""
    return {f"linear{i}": (n_in, n_out) for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:]), start=1)}

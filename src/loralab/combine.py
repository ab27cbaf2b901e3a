"""Several LoRA adapters on one base combined into one, with PEFT's ``add_weighted_adapter``
methods (peft/tuners/lora/model.py, peft/utils/merge_utils.py), checked against it by
tests/test_combine.py.

Adapter i adds ΔWᵢ = sᵢ·Bᵢ·Aᵢ to a layer (sᵢ its scale: alpha/r, or alpha/√r under rsLoRA);
with weights wᵢ the exact combination is ΔW = Σ wᵢ·ΔWᵢ. The methods:

- ``cat``: A = [w₁s₁A₁; w₂s₂A₂; ...], B = [B₁, B₂, ...], so B·A = ΔW exactly, at rank Σ rᵢ.
- ``svd`` (and ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``):
  the per-layer deltas wᵢ·ΔWᵢ merged (summed, or by TIES/DARE/pruning), then truncated to
  ``rank`` singular triplets: exact when the rank holds the whole sum.
- ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: A and B merged
  separately, each weighted by √|wᵢsᵢ| (the sign on A). B·A then holds cross terms Bᵢ·Aⱼ: it is
  PEFT's cheap approximation, exact for one adapter only, and needs equal ranks.

TIES is Yadav et al. 2023 (trim to the largest ``density`` share, elect a sign per entry, average
the entries that agree with it); DARE is Yu et al. 2024 (drop entries at random with
probability 1 - ``density`` and rescale the rest by 1/``density``).

The result is a plain LoRA adapter whose scale is 1 in every layer (alpha = r; rank_pattern
and alpha_pattern where layers' ranks differ). It differs from PEFT's on purpose in one place:
PEFT copies the first adapter's use_rslora and use_dora into the combined config, so an rsLoRA
input gives a combined scale of √r instead of 1, and a DoRA input a new magnitude. Here the
scales are folded into the tensors and the result is exact. DoRA adapters are refused: a DoRA
update rescales each row of W + ΔW to a learnt norm, which is not a low-rank delta that adds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from loralab.adapter import read_adapter, read_spec
from loralab.errors import ArtifactError, ConfigError
from loralab.files import short
from loralab.spec import LoRASpec

# Merges of a list of same-shape tensors with weights (merge_utils' names and definitions).
MERGES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
ON_FACTORS = MERGES  # on A and B separately
ON_DELTAS = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
METHODS = ("cat", *ON_DELTAS, *ON_FACTORS)
USES_DENSITY = {"ties", "dare_linear", "dare_ties", "magnitude_prune", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd"}
SIGN_METHODS = ("total", "frequency")


@dataclass(frozen=True)
class Recipe:
    """How adapters are combined: the method, one weight per adapter, and the method's knobs.
    ``rank``: the svd methods' rank per layer (default the largest input rank, capped at the
    layer's min(in, out)); ``density``: the share of entries TIES, DARE and pruning keep;
    ``seed``: DARE's random masks."""

    method: str
    weights: tuple[float, ...]
    rank: int | None = None
    density: float | None = None
    majority_sign: str = "total"
    seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"method {self.method!r} is unknown; choose one of {', '.join(METHODS)}")
        if not self.weights:
            raise ConfigError("no adapters to combine; pass at least one adapter directory")
        bad = [w for w in self.weights if not math.isfinite(w)]
        if bad:
            raise ConfigError(f"weight {bad[0]!r} is not finite; give each adapter a finite weight")
        if self.rank is not None and self.method not in ON_DELTAS:
            raise ConfigError(f"rank={self.rank} does nothing with {self.method}; leave it out, or use one of the svd methods")
        if self.rank is not None and self.rank < 1:
            raise ConfigError(f"rank={self.rank} is invalid: expected an integer ≥ 1")
        if self.method in USES_DENSITY:
            if self.density is None or not 0 < self.density <= 1:
                raise ConfigError(f"{self.method} needs a density in (0, 1], the share of entries kept; got {self.density}")
        elif self.density is not None:
            raise ConfigError(f"density={self.density} does nothing with {self.method}; leave it out, or use ties or dare")
        if self.majority_sign not in SIGN_METHODS:
            raise ConfigError(f"majority_sign {self.majority_sign!r} is unknown; choose total or frequency")


@dataclass(frozen=True)
class Adapter:
    """One input: its spec, its tensors per layer (A, B) and the base it records."""

    source: str
    spec: LoRASpec
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    base_sha256: str | None

    def delta(self, layer: str) -> torch.Tensor:
        A, B = self.factors[layer]
        return self.spec.scale_of(layer) * (B @ A)


def read(directory: str | Path) -> Adapter:
    """An adapter directory (ours or PEFT's) as combine needs it; DoRA refused with the reason."""
    config, state, meta = read_adapter(directory)
    spec = read_spec(config, meta, str(directory))
    if spec.dora:
        raise ArtifactError(f"adapter {short(directory, 40)} is DoRA: its rows are rescaled to learnt norms, not a delta "
                            "that adds; merge it alone with scripts/merge_adapter.py")
    layers = sorted({key.rsplit(".", 1)[0] for key in state})
    factors = {}
    for layer in layers:
        A, B = state.get(f"{layer}.lora_A"), state.get(f"{layer}.lora_B")
        if A is None or B is None or A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise ArtifactError(f"adapter {short(directory)} has no matching lora_A and lora_B for {layer}; save the adapter again")
        factors[layer] = (A.float(), B.float())  # float32, as PEFT combines: the same op order gives the same values
    return Adapter(str(directory), spec, factors, meta.get("base_sha256"))


def check_compatible(adapters: list[Adapter], base_sha256: str | None) -> None:
    """One base, one set of layers: refused in one line naming the two adapters that differ."""
    first = adapters[0]
    for other in adapters[1:]:
        if first.base_sha256 and other.base_sha256 and first.base_sha256 != other.base_sha256:
            raise ArtifactError(f"adapters {short(first.source, 40)} and {short(other.source, 40)} were trained on different bases "
                                f"(sha256 {first.base_sha256[:8]}…, {other.base_sha256[:8]}…); combine adapters of one base")
        if set(first.factors) != set(other.factors):
            only = ", ".join(sorted(set(first.factors) ^ set(other.factors)))
            raise ArtifactError(f"adapters {short(first.source, 40)} and {short(other.source, 40)} adapt different layers "
                                f"({only} in one only); combine adapters of one layout")
        for layer in first.factors:
            (a1, b1), (a2, b2) = first.factors[layer], other.factors[layer]
            if (a1.shape[1], b1.shape[0]) != (a2.shape[1], b2.shape[0]):
                raise ArtifactError(f"adapters {short(first.source, 40)} and {short(other.source, 40)} give {layer} different shapes; "
                                    "combine adapters of one base")
    for adapter in adapters:
        if base_sha256 and adapter.base_sha256 and adapter.base_sha256 != base_sha256:
            raise ArtifactError(f"adapter {short(adapter.source)} was trained on another base (sha256 {adapter.base_sha256[:8]}…); "
                                "pass the base it was trained on")


def combine(adapters: list[Adapter], recipe: Recipe) -> tuple[LoRASpec, dict[str, torch.Tensor]]:
    """The combined adapter: its spec (scale 1 everywhere) and its tensors under loralab names."""
    if len(adapters) != len(recipe.weights):
        raise ConfigError(f"{len(recipe.weights)} weights for {len(adapters)} adapters; give one weight per adapter")
    check_compatible(adapters, None)
    generator = torch.Generator().manual_seed(recipe.seed)
    factors = {}
    for layer in sorted(adapters[0].factors):  # PEFT's order, named_modules': the DARE masks draw alike
        factors[layer] = combine_layer(adapters, layer, recipe, generator)
    ranks = {layer: A.shape[0] for layer, (A, _) in factors.items()}
    rank = max(ranks.values())
    others = {layer: r for layer, r in ranks.items() if r != rank}
    spec = LoRASpec(rank=rank, alpha=float(rank), targets=tuple(sorted(factors)), init="kaiming",
                    rank_pattern=others, alpha_pattern={layer: float(r) for layer, r in others.items()})
    tensors = {}
    for layer, (A, B) in factors.items():
        tensors[f"{layer}.lora_A"], tensors[f"{layer}.lora_B"] = A.contiguous(), B.contiguous()
    return spec, tensors


def combine_layer(adapters: list[Adapter], layer: str, recipe: Recipe, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    weights = recipe.weights
    if recipe.method == "cat":
        A = torch.cat([w * a.spec.scale_of(layer) * a.factors[layer][0] for a, w in zip(adapters, weights)], dim=0)
        B = torch.cat([a.factors[layer][1] for a in adapters], dim=1)
        return A, B
    if recipe.method in ON_DELTAS:
        merge = "linear" if recipe.method == "svd" else recipe.method.removesuffix("_svd")
        delta = merged([a.delta(layer) for a in adapters], list(weights), merge, recipe, generator)
        # The merge in float32, as PEFT's (TIES' trim and sign votes see the same values); the SVD
        # in float64, so that a rank holding the whole sum gives it back to float32 rounding.
        U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
        k = min(recipe.rank or max(a.factors[layer][0].shape[0] for a in adapters), S.numel())
        return Vh[:k].to(delta.dtype), (U[:, :k] * S[:k]).to(delta.dtype)
    ranks = {a.factors[layer][0].shape[0] for a in adapters}
    if len(ranks) != 1:
        raise ConfigError(f"{recipe.method} merges A and B entry by entry, so every adapter needs the same rank at {layer} "
                          f"(found {sorted(ranks)}); use cat or svd")
    scaled = [w * a.spec.scale_of(layer) for a, w in zip(adapters, weights)]
    weights_A = [math.copysign(math.sqrt(abs(s)), s) for s in scaled]  # the sign on one side only
    weights_B = [math.sqrt(abs(s)) for s in scaled]
    A = merged([a.factors[layer][0] for a in adapters], weights_A, recipe.method, recipe, generator)
    B = merged([a.factors[layer][1] for a in adapters], weights_B, recipe.method, recipe, generator)
    return A, B


def merged(tensors: list[torch.Tensor], weights: list[float], merge: str, recipe: Recipe, generator: torch.Generator) -> torch.Tensor:
    """merge_utils' task_arithmetic, ties, dare_linear, dare_ties and magnitude_prune."""
    density = recipe.density if recipe.density is not None else 1.0
    if merge in ("ties", "magnitude_prune"):
        tensors = [keep_largest(t, density) for t in tensors]
    elif merge.startswith("dare") and density < 1:
        tensors = [t * torch.bernoulli(torch.full_like(t, density), generator=generator) / density for t in tensors]
    stacked = torch.stack(tensors)
    weighted = stacked * torch.tensor(weights).view(-1, *[1] * (stacked.dim() - 1))
    if merge in ("ties", "dare_ties"):
        sign = stacked.sign()
        votes = stacked.sum(dim=0) if recipe.majority_sign == "total" else sign.sum(dim=0)
        agree = sign == torch.where(votes >= 0, 1.0, -1.0)
        return (weighted * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)
    return weighted.sum(dim=0)


def keep_largest(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """TIES' trim: the int(density·n) entries largest in magnitude, the rest zero."""
    if density >= 1:
        return tensor
    mask = torch.zeros(tensor.numel(), dtype=tensor.dtype)
    mask[torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel())).indices] = 1
    return tensor * mask.view_as(tensor)

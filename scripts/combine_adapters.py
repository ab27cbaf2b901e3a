"""Combine LoRA adapters trained on one base into one adapter.

    python scripts/combine_adapters.py BASE OUT_DIR ADAPTER_DIR... --method cat --weights 1 1
    python scripts/combine_adapters.py BASE OUT_DIR A B --method svd --rank 4
    python scripts/combine_adapters.py BASE OUT_DIR A B --method ties --density 0.5
    python scripts/combine_adapters.py BASE OUT_DIR A --weights -1     # task negation

BASE is a pretrain run dir or base.safetensors; each ADAPTER_DIR a fine-tune's adapter/ (or a
PEFT adapter). OUT_DIR gets a plain PEFT-layout adapter (adapter_config.json and
adapter_model.safetensors, the recipe in its metadata), written whole or not at all. The methods
are PEFT's add_weighted_adapter's (loralab.combine says what each computes). The script prints
how far the combined adapter's logits are from the exact weighted sum of the inputs' updates on a
fixed probe, relative to the logits' scale: float32 rounding for cat, and for svd at a rank that
holds the sum.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from loralab.adapter import apply_adapter, check_fits, save_adapter
from loralab.combine import METHODS, ON_DELTAS, Adapter, Recipe, check_compatible, combine, read
from loralab.errors import ArgumentParser, ArtifactError, LoralabError
from loralab.files import short
from loralab.inject import linear_layers, remove_lora
from loralab.runs import BASE_FILE
from loralab.weights import fingerprint, load_base, non_finite

# An exact method's logits against the dense sum W + Σ wᵢ·ΔWᵢ, relative to the largest logit:
# float32 rounds W + ΔW once per weight, about 2e-6 of the logits' scale on these layers.
TOLERANCE = 1e-5


def exact_gap(model: torch.nn.Module, adapters: list[Adapter], weights: tuple[float, ...], probe: torch.Tensor) -> float:
    """Max |logits(base + combined adapter) - logits(base + Σ wᵢ·ΔWᵢ)| on ``probe``, relative to
    the largest |logit| of the latter."""
    with torch.no_grad():
        combined = model(probe)
        exact = remove_lora(copy.deepcopy(model))
        layers = linear_layers(exact)
        for layer in adapters[0].factors:
            layers[layer].weight += sum(w * a.delta(layer) for a, w in zip(adapters, weights)).to(layers[layer].weight.dtype)
        expected = exact(probe)
        return ((expected - combined).abs().max() / expected.abs().max()).item()


def svd_is_exact(adapters: list[Adapter], spec) -> bool:
    """Whether svd kept, in every layer, as many triplets as the exact sum can have: min(Σ rᵢ, in, out)."""
    for layer, (A, B) in adapters[0].factors.items():
        if spec.rank_of(layer) < min(sum(a.factors[layer][0].shape[0] for a in adapters), A.shape[1], B.shape[0]):
            return False
    return True


def run(base: Path, out: Path, sources: list[Path], recipe: Recipe, sizes: list[int]) -> tuple[float, int]:
    """Write the combined adapter to ``out``; return its gap to the exact sum and its largest rank."""
    if out.exists():
        raise LoralabError(f"{short(out)} already exists; choose another output directory")
    if not out.parent.is_dir():
        raise LoralabError(f"{short(out.parent)} does not exist; create it, or choose another output directory")
    model, _ = load_base(base / BASE_FILE if base.is_dir() else base, sizes)
    base_sha = fingerprint(model)
    adapters = [read(s) for s in sources]
    for adapter in adapters:  # targets and shapes against the base, before any product is formed
        tensors = {f"{layer}.{key}": t for layer, pair in adapter.factors.items() for key, t in zip(("lora_A", "lora_B"), pair)}
        check_fits(model, adapter.spec, tensors, adapter.source)
    check_compatible(adapters, base_sha)
    spec, tensors = combine(adapters, recipe)
    found = non_finite(tensors)
    if found:
        raise ArtifactError(f"the combination gives non-finite values in {found}; nothing written: use smaller weights")
    apply_adapter(model, spec, tensors, str(out))
    model.eval()
    probe = torch.randn(256, sizes[0], generator=torch.Generator().manual_seed(0))
    gap = exact_gap(model, adapters, recipe.weights, probe)
    if (recipe.method == "cat" or (recipe.method == "svd" and svd_is_exact(adapters, spec))) and gap > TOLERANCE:
        raise RuntimeError(f"{recipe.method} should be exact, but its logits differ from the exact sum by {gap:.2e} (> {TOLERANCE})")
    recipe_meta = {"method": recipe.method, "weights": list(recipe.weights), "rank": recipe.rank, "density": recipe.density,
                   "majority_sign": recipe.majority_sign, "seed": recipe.seed, "adapters": [str(s) for s in sources]}
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        save_adapter(model, staging, sizes, base_sha, extra_meta={"loralab_combination": json.dumps(recipe_meta)})
        staging.rename(out)  # the directory appears whole, or not at all
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return gap, spec.rank


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("adapters", type=Path, nargs="*")
    parser.add_argument("--method", default="cat", help=f"one of {', '.join(METHODS)}")
    parser.add_argument("--weights", type=float, nargs="+", help="one per adapter (default 1 each)")
    parser.add_argument("--rank", type=int, help=f"the rank of {', '.join(ON_DELTAS)} (default the largest input rank)")
    parser.add_argument("--density", type=float, help="the share of entries ties, dare and magnitude_prune keep")
    parser.add_argument("--majority-sign", default="total", help="TIES' sign election: total or frequency")
    parser.add_argument("--seed", type=int, default=0, help="DARE's random masks")
    parser.add_argument("--sizes", type=int, nargs="+", default=[784, 1000, 2000, 10])
    args = parser.parse_intermixed_args(argv)  # options before, between or after the adapters
    try:
        weights = tuple(args.weights) if args.weights is not None else (1.0,) * len(args.adapters)
        if args.weights is not None and len(weights) != len(args.adapters):
            raise LoralabError(f"{len(weights)} weights for {len(args.adapters)} adapters; give one weight per adapter")
        recipe = Recipe(args.method, weights, args.rank, args.density, args.majority_sign, args.seed)
        gap, rank = run(args.base, args.out, args.adapters, recipe, args.sizes)
    except LoralabError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({args.method}, rank {rank}; logits off the exact weighted sum by {gap:.1e} of their scale)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

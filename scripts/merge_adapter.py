"""Merge a LoRA adapter into its base and write a plain model.

    python scripts/merge_adapter.py BASE ADAPTER_DIR OUT.safetensors

BASE is a pretrain run dir or base.safetensors. The output is an ordinary MLP (same format as a
base, so `base=OUT.safetensors` fine-tunes it further): W' = W + scale·B·A (DoRA: each row
rescaled to its learnt magnitude), no adapter left,
so inference costs exactly what the base costs. Its logits are checked against base + adapter,
and, as PEFT's ``safe_merge``, a merge that gives NaN or inf weights is refused with nothing written.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from loralab import load_adapter, remove_lora
from loralab.errors import ArgumentParser, ArtifactError, LoralabError
from loralab.files import short
from loralab.runs import BASE_FILE
from loralab.weights import load_base, non_finite, save_base

TOLERANCE = 1e-5


def merge(base: Path, adapter: Path, out: Path, sizes: list[int], name: str) -> float:
    """Write the merged model; return the largest logit difference against base + adapter."""
    if out.exists():
        raise LoralabError(f"{short(out)} already exists; choose another output path")
    if not out.parent.is_dir():
        raise LoralabError(f"{short(out.parent)} does not exist; create it, or choose another output path")
    model, _ = load_base(base / BASE_FILE if base.is_dir() else base, sizes)
    load_adapter(model, adapter)
    model.eval()  # the adapter's dropout off: the probe compares the merged function, not one draw of it
    probe = torch.randn(256, sizes[0], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(probe)
        plain = remove_lora(model, merge=True)
        # Finite base and adapter can still overflow float32 once multiplied and added.
        found = non_finite(plain.state_dict())
        if found:
            raise ArtifactError(f"merging {short(adapter)} overflows float32: {found} non-finite; nothing written, use another adapter")
        gap = (plain(probe) - expected).abs().max().item()
    if gap > TOLERANCE:
        raise RuntimeError(f"merged logits differ from base + adapter by {gap:.2e} (> {TOLERANCE})")
    save_base(plain, out, name)
    return gap


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", type=Path)
    parser.add_argument("adapter", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--sizes", type=int, nargs="+", default=[784, 1000, 2000, 10])
    parser.add_argument("--name", default="expensive_mlp_merged")
    args = parser.parse_args(argv)
    try:
        gap = merge(args.base, args.adapter, args.out, args.sizes, args.name)
    except LoralabError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} (max logit difference against base + adapter: {gap:.1e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

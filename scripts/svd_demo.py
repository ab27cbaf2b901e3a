"""Why low rank works: an SVD demo, and the spectrum of real fine-tuning updates.

    python scripts/svd_demo.py [--full FULL_RUN_DIR] [--adapter ADAPTER_DIR] [--out svd.png]

Part 1 builds a rank-2 10x10 W, factorises it by SVD into B (10x2) and A (2x10), and shows that
y = Wx + b equals y' = B(Ax) + b with 40 instead of 100 numbers. Part 2 (with --full, a run of
`stage=finetune finetune.method=full`) plots the singular values of each layer's full fine-tune
update W_ft - W_base: how low is the "intrinsic rank" of what fine-tuning changed? With --adapter,
the adapter's scale*B@A is plotted beside it (rank r by construction).
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from loralab import load_adapter, lora_layers, read_run  # noqa: E402
from loralab.errors import ArgumentParser, LoralabError  # noqa: E402
from loralab.files import short  # noqa: E402
from loralab.runs import BASE_FILE, FULL_FILE  # noqa: E402
from loralab.weights import load_base  # noqa: E402


def factorisation_demo(d: int = 10, k: int = 10, rank: int = 2) -> dict:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(d, rank, generator=gen) @ torch.randn(rank, k, generator=gen)
    u, s, vh = torch.linalg.svd(w)
    b, a = u[:, :rank] @ torch.diag(s[:rank]), vh[:rank]
    bias, x = torch.randn(d, generator=gen), torch.randn(k, generator=gen)
    y, y_prime = w @ x + bias, b @ (a @ x) + bias
    return {
        "rank": int(torch.linalg.matrix_rank(w)),
        "max_abs_diff": float((y - y_prime).abs().max()),
        "params_dense": d * k,
        "params_factorised": b.numel() + a.numel(),
    }


def base_of(run_dir: Path):
    """The base model a fine-tune ran on, as its metrics.json records it."""
    metrics = read_run(run_dir).metrics
    base = Path(metrics["base"])
    return load_base(base / BASE_FILE if base.is_dir() else base, metrics["model"]["sizes"])[0]


def update_spectra(full_dir: Path) -> dict[str, torch.Tensor]:
    base = base_of(full_dir)
    sizes = base.sizes
    tuned, _ = load_base(full_dir / FULL_FILE, sizes)
    return {
        name: torch.linalg.svdvals(tuned.get_submodule(name).weight - base.get_submodule(name).weight).detach()
        for name in (f"linear{i}" for i in range(1, len(sizes)))
    }


def adapter_spectra(adapter_dir: Path) -> dict[str, torch.Tensor]:
    model = base_of(adapter_dir)
    load_adapter(model, adapter_dir)
    return {name: torch.linalg.svdvals(layer.delta_weight()).detach() for name, layer in lora_layers(model).items()}


def effective_rank(s: torch.Tensor, energy: float = 0.9) -> int:
    """How many singular values hold ``energy`` of the update's squared Frobenius norm."""
    cumulative = torch.cumsum(s**2, 0) / (s**2).sum()
    return int((cumulative < energy).sum()) + 1


def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", type=Path)
    parser.add_argument("--adapter", type=Path)
    parser.add_argument("--out", type=Path, default=Path("svd.png"))
    args = parser.parse_args(argv)
    if args.out.is_dir():
        print(f"error: --out {short(args.out)} is a directory; name the PNG file to write", file=sys.stderr)
        return 2
    if not args.out.parent.is_dir():
        print(f"error: --out {short(args.out)}: its directory does not exist; create it, or choose another path", file=sys.stderr)
        return 2
    demo = factorisation_demo()
    print(f"W is 10x10 of rank {demo['rank']}; SVD gives B (10x2) @ A (2x10).")
    print(f"max |y - y'| = {demo['max_abs_diff']:.1e}; numbers stored: {demo['params_dense']} -> {demo['params_factorised']}")
    spectra = {}
    try:
        if args.full:
            spectra |= {f"full {k}": v for k, v in update_spectra(args.full).items()}
        if args.adapter:
            spectra |= {f"LoRA {k}": v for k, v in adapter_spectra(args.adapter).items()}
    except LoralabError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not spectra:
        return 0
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, s in spectra.items():
        top = s[:50]
        ax.semilogy(range(1, len(top) + 1), top.clamp(min=1e-12), marker=".", label=f"{label} (90% energy in {effective_rank(s)})")
        print(f"{label}: 90 % of the update's energy lies in its top {effective_rank(s)} singular values (of {len(s)})")
    ax.set_xlabel("singular value index")
    ax.set_ylabel("singular value")
    ax.set_title("Spectrum of the fine-tuning update ΔW")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

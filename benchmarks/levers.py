"""The levers issue 15 lists for the LoRA step, each measured against the shipped layer
(``loralab``) and the floor in one interleaved run (docs/benchmarks.md section 9). None is in
loralab: this is the record of what each buys.

    python benchmarks/levers.py --reps 30 [--compile]

- ``inplace``: the adapter's product accumulated into the base's output in place (``addmm_``);
- ``inplace_bt``: the same, with ``B^T`` made contiguous each step, so that autograd computes
  B's gradient as ``(xA^T)^T g``, the faster orientation for these shapes;
- ``function``: one autograd Function per layer: the product added into the base's output in
  place, the adapter's input gradient accumulated into the base's, every skinny product with r
  as the rows of its result (about 3x faster in MKL than the orientation autograd picks);
- ``compile``: ``torch.compile`` of the shipped model (default mode); its compile time is printed.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from bench import SIZES, adapter_products, build, interleaved, step_fn  # beside this file
from loralab.lora import LoRALinear
from loralab.optim import adam


class LoRAProduct(torch.autograd.Function):
    """``x W^T + b + s (x A^T) B^T`` for a frozen W and b."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale):
        xa = F.linear(x, lora_a)
        out = F.linear(x, weight, bias).addmm_(xa, lora_b.t(), alpha=scale)
        ctx.save_for_backward(x, xa, weight, lora_a, lora_b)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad):
        x, xa, weight, lora_a, lora_b = ctx.saved_tensors
        grad_bt = torch.mm(lora_b.t().contiguous(), grad.t()).mul_(ctx.scale)  # s (g B)^T: r x batch
        grad_x = torch.mm(grad, weight).addmm_(grad_bt.t(), lora_a) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, torch.mm(grad_bt, x), torch.mm(xa.t(), grad).t().mul_(ctx.scale), None


def inplace(self, x):
    return self.base_layer(x).addmm_(F.linear(x, self.lora_A), self.lora_B.t(), alpha=self.scale)


def inplace_bt(self, x):
    return self.base_layer(x).addmm_(F.linear(x, self.lora_A), self.lora_B.t().contiguous(), alpha=self.scale)


def function(self, x):
    base = self.base_layer
    return LoRAProduct.apply(x, base.weight, base.bias, self.lora_A, self.lora_B, self.scale)


FORWARDS = {"inplace": inplace, "inplace_bt": inplace_bt, "function": function}


def lever_model(lever: str, rank: int) -> torch.nn.Module:
    model = build("floor" if lever == "floor" else "loralab", rank)
    for layer in model.modules():
        if isinstance(layer, LoRALinear) and lever in FORWARDS:
            layer.forward = FORWARDS[lever].__get__(layer)
    return model


def both_orientations(n_out: int) -> dict:
    """``g B`` against ``(B^T g^T)^T``, and B's gradient ``g^T (x A^T)`` against
    ``((x A^T)^T g)^T``, at batch 256 and rank 4."""
    g, lora_b, xa = torch.randn(256, n_out), torch.randn(n_out, 4), torch.randn(256, 4)
    lora_bt = lora_b.t().contiguous()
    return {"g B": lambda: torch.mm(g, lora_b), "(B^T g^T)^T": lambda: torch.mm(lora_bt, g.t()),
            "g^T xa": lambda: torch.mm(g.t(), xa), "(xa^T g)^T": lambda: torch.mm(xa.t(), g)}


def orientations(reps: int) -> None:
    for n_in, n_out in zip(SIZES, SIZES[1:-1]):
        medians = interleaved(both_orientations(n_out), reps)
        print(f"{n_in} -> {n_out}: " + ", ".join(f"{name} {1000 * t:.3f} ms" for name, t in medians.items()))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="issue 15's levers for the LoRA step")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--compile", action="store_true", help="also torch.compile (about 10 s of compiling, more on a cold cache)")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    torch.set_flush_denormal(True)
    orientations(args.reps * 5)
    for batch_size in (10, 64, 256):
        for rank in (1, 4, 10):
            x, y = torch.randn(batch_size, 784), torch.randint(0, 10, (batch_size,))
            steps = {}
            for lever in ("floor", "loralab", *FORWARDS):
                model = lever_model(lever, rank)
                steps[lever] = step_fn(model, adam([p for p in model.parameters() if p.requires_grad], 1e-3, fused=True), x, y)
            if args.compile:
                model = lever_model("loralab", rank)
                steps["compile"] = step_fn(torch.compile(model), adam([p for p in model.parameters() if p.requires_grad], 1e-3, fused=True), x, y)
                start = time.perf_counter()
                steps["compile"]()
                print(f"batch {batch_size} rank {rank}: compile and first step {time.perf_counter() - start:.1f} s")
            steps["products"] = adapter_products(batch_size, rank)
            medians = interleaved(steps, args.reps)
            floor = medians["floor"]
            ratios = " ".join(f"{name} {t / floor:.3f}" for name, t in medians.items() if name not in ("floor", "products"))
            print(f"batch {batch_size} rank {rank}: floor {1000 * floor:.2f} ms; / floor: {ratios}; bound {(floor + medians['products']) / floor:.3f}")


if __name__ == "__main__":
    main()

"""Benchmarks: every figure is a ratio measured in one process, variants interleaved (A B A B ...),
median of the timed repetitions after warm-up.

    python benchmarks/bench.py                 # prints a table, writes bench.json
    python benchmarks/bench.py --reps 3 --quick  # the smoke test's size
    python benchmarks/bench.py --only-protocol --out protocol.json   # the reference notebook's whole protocol
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from loralab.adapter import AdapterSet, save_adapter
from loralab.classifier import Classifier
from loralab.data import DigitBatchSampler, load_tensors
from loralab.files import write_json
from loralab.inject import inject_lora, lora_layers, mark_only_lora_trainable, remove_lora
from loralab.malloc import keep_freed_memory
from loralab.mnist import ensure_mnist
from loralab.model import MLP
from loralab.optim import adam
from loralab.spec import LoRASpec
from loralab.weights import load_base, save_base
from seeds_reference import DenseLoRA  # beside this file: a script's directory is on sys.path
from startup import ROOT
from startup import measure as measure_startup

SIZES = [784, 1000, 2000, 10]
TARGETS = ["linear1", "linear2", "linear3"]


VARIANTS = {"loralab": {}, "dora": {"dora": True}, "pissa": {"init": "pissa"}}


def build(method: str, rank: int) -> nn.Module:
    torch.manual_seed(0)
    model = MLP(SIZES)
    if method in VARIANTS:
        inject_lora(model, LoRASpec(rank=rank, alpha=rank, targets=TARGETS, **VARIANTS[method]))
        mark_only_lora_trainable(model)
    elif method == "floor":
        # The frozen base's own work in a LoRA step: the forward pass and the input gradients
        # through linear3 and linear2 down to linear1's output; the optimizer has one bias.
        model.requires_grad_(False)
        model.linear1.bias.requires_grad_(True)
    elif method == "parametrize":
        for name in TARGETS:
            layer = model.get_submodule(name)
            parametrize.register_parametrization(layer, "weight", DenseLoRA(layer.out_features, layer.in_features, rank))
        for name, p in model.named_parameters():
            p.requires_grad = "lora_" in name
    elif method == "peft":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS))
    return model


def interleaved(fns: dict[str, callable], reps: int, warmup: int = 3) -> dict[str, float]:
    """Median seconds per call of each function, called in turn so drift hits all alike."""
    times = {name: [] for name in fns}
    for rep in range(warmup + reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if rep >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def train_steps(batch_size: int, rank: int, reps: int) -> dict:
    methods = ["full", "loralab", "parametrize"]
    try:
        import peft  # noqa: F401

        methods.append("peft")
    except ImportError:
        pass
    # full_default: full fine-tuning with torch's default Adam (on CPU, one tensor at a time), the
    # baseline a plain PyTorch script gets.
    methods.append("full_default")
    x, y = torch.randn(batch_size, 784), torch.randint(0, 10, (batch_size,))
    steps = {}
    for method in methods:
        model = build("full" if method == "full_default" else method, rank)
        trainable = [p for p in model.parameters() if p.requires_grad]
        # As the stages choose: fused Adam for adapters, foreach for the whole network.
        opt = torch.optim.Adam(trainable, lr=1e-3) if method == "full_default" else adam(trainable, 1e-3, fused=method != "full")

        def step(model=model, opt=opt):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()

        steps[method] = step
    medians = interleaved(steps, reps)
    return {f"{m}_ms": 1000 * t for m, t in medians.items()} | {
        f"{m}_vs_full": t / medians["full"] for m, t in medians.items() if m != "full"
    } | {"loralab_vs_full_default": medians["loralab"] / medians["full_default"]} | (
        {"loralab_vs_peft": medians["loralab"] / medians["peft"]} if "peft" in medians else {})


def step_fn(model: nn.Module, opt, x: torch.Tensor, y: torch.Tensor):
    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def adapter_products(batch_size: int, rank: int):
    """The products a LoRA step adds to its floor and cannot skip, each once, in isolation: per
    adapted layer x A^T and the rank-r update of the output (forward), g B, the gradients of B and
    A, and the rank-r update of the input gradient (not at linear1, whose input needs none)."""
    layers = []
    for n_in, n_out in zip(SIZES, SIZES[1:]):
        layers.append({"x": torch.randn(batch_size, n_in), "g": torch.randn(batch_size, n_out), "out": torch.randn(batch_size, n_out),
                       "gx": torch.randn(batch_size, n_in) if n_in != SIZES[0] else None,
                       "A": torch.randn(rank, n_in), "B": torch.randn(n_out, rank)})

    def products():
        for t in layers:
            xa = torch.mm(t["x"], t["A"].t())
            t["out"].addmm_(xa, t["B"].t())
            # Each in the orientation MKL runs fastest here (r as the rows of the result).
            gb_t = torch.mm(t["B"].t().contiguous(), t["g"].t())
            torch.mm(xa.t(), t["g"])  # B's gradient, transposed
            torch.mm(gb_t, t["x"])
            if t["gx"] is not None:
                t["gx"].addmm_(gb_t.t(), t["A"])

    return products


def floor_steps(batch_size: int, rank: int, reps: int) -> dict:
    """A LoRA step against the floor no LoRA step can go below (the frozen base's own work) and
    against PEFT, with the Adam the stages give adapters (fused) and, as issue 15 measured, with
    foreach for every method; the variants beside plain LoRA; and the bound the adapter's own
    products set: floor + those products, timed alone."""
    x, y = torch.randn(batch_size, 784), torch.randint(0, 10, (batch_size,))
    steps = {}
    for method in ("floor", "loralab", "peft", "dora", "pissa"):
        for fused in (True, False) if method in ("floor", "loralab", "peft") else (True,):
            model = build(method, rank)
            params = [p for p in model.parameters() if p.requires_grad]
            steps[method + ("" if fused else "_foreach")] = step_fn(model, adam(params, 1e-3, fused=fused), x, y)
    steps["products"] = adapter_products(batch_size, rank)
    m = interleaved(steps, reps)
    return {f"{name}_ms": 1000 * t for name, t in m.items()} | {
        "loralab_vs_floor": m["loralab"] / m["floor"], "peft_vs_floor": m["peft"] / m["floor"],
        "loralab_vs_peft": m["loralab"] / m["peft"], "bound_vs_floor": (m["floor"] + m["products"]) / m["floor"],
        "loralab_foreach_vs_floor_foreach": m["loralab_foreach"] / m["floor_foreach"],
        "loralab_foreach_vs_peft_foreach": m["loralab_foreach"] / m["peft_foreach"],
        "dora_vs_loralab": m["dora"] / m["loralab"], "pissa_vs_loralab": m["pissa"] / m["loralab"]}


def optimizers(batch_size: int, reps: int) -> dict:
    """foreach against fused Adam, on a full (pretrain-like) step and a rank-4 LoRA step."""
    x, y = torch.randn(batch_size, 784), torch.randint(0, 10, (batch_size,))
    steps = {}
    for method in ("full", "loralab"):
        for kind in ("foreach", "fused"):
            model = build(method, 4)
            params = [p for p in model.parameters() if p.requires_grad]
            steps[f"{method}_{kind}"] = step_fn(model, adam(params, 1e-3, fused=kind == "fused"), x, y)
    medians = interleaved(steps, reps)
    return {f"{m}_ms": 1000 * t for m, t in medians.items()} | {
        f"{m}_fused_vs_foreach": medians[f"{m}_fused"] / medians[f"{m}_foreach"] for m in ("full", "loralab")}


def lightning_epoch(data_dir: str, batches: int | None, reps: int) -> dict:
    """One pretrain epoch through the Lightning Trainer against a bare loop over the same batches."""
    ensure_mnist(data_dir)
    train_x, train_y, _, _ = load_tensors(data_dir)
    pool = torch.arange(len(train_y))
    sampler = DigitBatchSampler(pool, 64, seed=0)
    order = list(sampler)[:batches] if batches else list(sampler)

    def bare():
        model = MLP(SIZES)
        opt = adam(list(model.parameters()), 1e-3, fused=False)  # the stages' optimizer for a whole network
        for idx in order:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(train_x[idx]), train_y[idx]).backward()
            opt.step()

    def lightning():
        loader = torch.utils.data.DataLoader(torch.utils.data.StackDataset(train_x, train_y), sampler=order, batch_size=None)
        trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, accelerator="cpu")
        trainer.fit(Classifier(MLP(SIZES)), train_dataloaders=loader)

    medians = interleaved({"bare": bare, "lightning": lightning}, reps, warmup=1)
    return {"batches": len(order), "bare_s": medians["bare"], "lightning_s": medians["lightning"],
            "lightning_vs_bare": medians["lightning"] / medians["bare"]}


def inference(reps: int) -> dict:
    x = torch.randn(64, 784)
    base = build("full", 1)
    unmerged = build("loralab", 4)
    for layer in lora_layers(unmerged).values():
        nn.init.normal_(layer.lora_B)
    merged = remove_lora(build("loralab", 4), merge=True)

    def forward(model):
        return lambda: model(x)

    with torch.no_grad():
        medians = interleaved({"base": forward(base), "merged": forward(merged), "unmerged": forward(unmerged)}, reps * 5)
    return {"base_ms": 1000 * medians["base"], "merged_vs_base": medians["merged"] / medians["base"],
            "unmerged_vs_base": medians["unmerged"] / medians["base"]}


def switching(reps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base_file = tmp / "base.safetensors"
        save_base(MLP(SIZES), base_file, "expensive_mlp")
        for name in ("a", "b"):
            adapted = build("loralab", 1)
            save_adapter(adapted, tmp / name, SIZES)
        model, _ = load_base(base_file, SIZES)
        adapters = AdapterSet(model)
        adapters.add("a", tmp / "a")
        adapters.add("b", tmp / "b")
        medians = interleaved({"switch_a": lambda: adapters.use("a"), "switch_b": lambda: adapters.use("b"),
                               "load_base": lambda: load_base(base_file, SIZES)}, reps)
        switch = (medians["switch_a"] + medians["switch_b"]) / 2
        adapter_bytes = (tmp / "a" / "adapter_model.safetensors").stat().st_size
        return {"switch_ms": 1000 * switch, "load_base_ms": 1000 * medians["load_base"],
                "switch_vs_load_base": switch / medians["load_base"], "adapter_bytes": adapter_bytes,
                "base_bytes": base_file.stat().st_size, "adapter_vs_base_file": adapter_bytes / base_file.stat().st_size}


def _rss_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak so far) of this process, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _memory_probe(method: str, queue) -> None:
    torch.set_num_threads(2)
    before = _rss_mb("VmRSS")  # after imports: what follows is the model, its gradients and optimizer
    model = build(method, 1)
    opt = adam([p for p in model.parameters() if p.requires_grad], 1e-3, fused=method != "full")
    x, y = torch.randn(64, 784), torch.randint(0, 10, (64,))
    for _ in range(5):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    queue.put({"optimizer_state_bytes": state, "training_peak_rss_mb": _rss_mb("VmHWM") - before})


def memory() -> dict:
    """Each method in a fresh process, since a process's peak RSS only ever grows; the figure is the
    peak above the process's RSS once torch is imported."""
    ctx = multiprocessing.get_context("spawn")
    out = {}
    for method in ("full", "loralab"):
        queue = ctx.Queue()
        proc = ctx.Process(target=_memory_probe, args=(method, queue))
        proc.start()
        out[method] = queue.get(timeout=300)
        proc.join()
    return out


def seeds_protocol(data_dir: str) -> dict:
    """The reference notebook's whole protocol (pretrain 1 epoch at batch 10, fine-tune 100 steps), end to end as
    commands: loralab's CLI against the seed-style plain loop. Minutes long, so run once each."""
    here = Path(__file__).resolve().parent
    root = here.parent
    env = {**os.environ, "LORALAB_DATA_DIR": str(Path(data_dir).resolve())}
    with tempfile.TemporaryDirectory() as out:
        loralab_cmds = [
            [sys.executable, str(root / "train.py"), "stage=pretrain", "trainer.max_epochs=1", "data.batch_size=10",
             "optim.scheduler=none", "trainer.enable_progress_bar=false", f"output_root={out}"],
            [sys.executable, str(root / "train.py"), "stage=finetune", "trainer.enable_progress_bar=false", f"output_root={out}"],
        ]
        reference_cmds = [[sys.executable, str(here / "seeds_reference.py"), str(data_dir)]]
        seconds = {}
        for name, cmds in (("loralab", loralab_cmds), ("reference", reference_cmds)):
            start = time.perf_counter()
            for cmd in cmds:
                subprocess.run(cmd, check=True, env=env, capture_output=True)
            seconds[name] = time.perf_counter() - start
    return {"loralab_s": seconds["loralab"], "reference_s": seconds["reference"],
            "loralab_vs_reference": seconds["loralab"] / seconds["reference"]}


def floor_and_adam(reps: int, quick: bool) -> dict:
    results = {}
    for bs in (10, 64, 256):
        for rank in (1,) if quick else (1, 4, 10):  # 16 exceeds linear3's 10 outputs, which the config refuses to train
            results[f"floor_bs{bs}_r{rank}"] = floor_steps(bs, rank, reps)
        results[f"adam_bs{bs}"] = optimizers(bs, reps)
    return results


def startup_times(data_dir: str, quick: bool) -> dict:
    """Time to an input error, to the first training step and to exit (benchmarks/startup.py), in
    the runtime venv `make run` builds (.venv) and in this interpreter's (the dev venv)."""
    runtime = ROOT / ".venv" / "bin" / "python"
    trees = {"dev_venv": (ROOT, sys.executable)}
    if runtime.exists() and not quick:
        trees = {"runtime_venv": (ROOT, str(runtime))} | trees
    return measure_startup(trees, data_dir, reps=1 if quick else 5)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description="loralab benchmarks")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="tiny sizes for the smoke test")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--out", type=Path, default=Path("bench.json"))
    parser.add_argument("--protocol", action="store_true", help="also time the reference notebook's whole protocol (minutes)")
    parser.add_argument("--only-protocol", action="store_true", help="time only the reference notebook's whole protocol")
    parser.add_argument("--only-floor", action="store_true", help="time only the LoRA step against its floor, and Adam")
    parser.add_argument("--only-startup", action="store_true", help="time only start-up, in the runtime and the dev venv")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    torch.set_flush_denormal(True)
    results = {"machine": {"platform": platform.platform(), "processor": platform.processor(), "threads": 2,
                           "torch": torch.__version__}, "reps": args.reps}
    if args.only_floor:
        keep_freed_memory()
        results |= floor_and_adam(args.reps, args.quick)
    elif args.only_startup:
        results["startup"] = startup_times(args.data_dir, args.quick)
    elif not args.only_protocol:
        # Training steps twice: first with glibc's default allocator, as in a plain PyTorch process,
        # where out-of-place temporaries cost page faults; then, like everything after, the way
        # the stages run (keep_freed_memory).
        for bs in (64, 256):
            for rank in (1, 4):
                results[f"train_step_bs{bs}_r{rank}_default_malloc"] = train_steps(bs, rank, args.reps)
        keep_freed_memory()
        for bs in (64, 256):
            for rank in (1, 4):
                results[f"train_step_bs{bs}_r{rank}"] = train_steps(bs, rank, args.reps)
        results["lightning_epoch"] = lightning_epoch(args.data_dir, 20 if args.quick else None, 1 if args.quick else 3)
        results["inference"] = inference(args.reps)
        results["switching"] = switching(args.reps)
        results["memory"] = memory()
        results |= floor_and_adam(args.reps, args.quick)
        results["startup"] = startup_times(args.data_dir, args.quick)
    if args.protocol or args.only_protocol:
        results["seeds_protocol"] = seeds_protocol(args.data_dir)
    write_json(args.out, results)
    for key, value in results.items():
        print(f"{key}: {json.dumps(value, default=lambda v: round(v, 4))}")
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()

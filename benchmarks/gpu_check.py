"""`make gpu-check`: everything loralab does on a CUDA GPU, in one run of at most about 8 minutes,
every figure written as JSON.

    PYTHONPATH=src python benchmarks/gpu_check.py --wheels .whl --out gpu_check.json

1. Hydra and OmegaConf (and antlr4, which Hydra needs) are installed from ``--wheels`` where
   they are missing, never from the network (the GPU machine has none).
2. MNIST is prepared from ``data/downloads`` (``python -m loralab.mnist data``).
3. The CUDA-only tests run (``pytest -m cuda``; without a GPU they skip with their reason).
4. The short ``accelerator=gpu`` pretrain and fine-tune run through train.py, the fine-tune
   also with ``trainer.precision=bf16-mixed``.
5. Timed on the device, interleaved: a Lightning epoch against a bare loop over device tensors,
   and a LoRA step against the full step.

Without a GPU it stops after step 3, exit 0, and says so: CI runs that part.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NEEDED = {"hydra": "hydra-core", "omegaconf": "omegaconf", "antlr4": "antlr4-python3-runtime", "pytest": "pytest"}


def install_missing(wheels: Path | None) -> list[str]:
    missing = [pkg for module, pkg in NEEDED.items() if importlib.util.find_spec(module) is None]
    if missing:
        if wheels is None or not wheels.is_dir():
            raise SystemExit(f"error: {', '.join(missing)} missing and no --wheels directory to install them from; pass --wheels <dir of .whl files>")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(wheels), *missing], check=True)
    return missing


def env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}


def run(args: list[str], timeout: int) -> dict:
    """One step, recorded whatever happens: a step that runs out of time is a result too, and the
    others still run and get written."""
    start = time.perf_counter()
    try:
        done = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env(), timeout=timeout)
        returncode, tail = done.returncode, (done.stdout + done.stderr)[-1500:]
    except subprocess.TimeoutExpired as err:
        returncode, tail = "timeout", f"killed after {timeout} s: {str(err.stdout or '')[-1000:]}"
    return {"command": " ".join(args[1:]), "returncode": returncode, "seconds": time.perf_counter() - start, "tail": tail}


def cuda_tests() -> dict:
    result = run([sys.executable, "-m", "pytest", "-m", "cuda", "-rs", "-q", "tests/test_cuda.py", "-p", "no:cacheprovider"], 150)
    result["summary"] = next((line for line in reversed(result["tail"].splitlines()) if " in " in line), "")
    return result


def stage_runs(out: Path) -> dict:
    common = [f"output_root={out}", "accelerator=gpu", "trainer.enable_progress_bar=false"]
    runs = {"pretrain": run([sys.executable, "train.py", "stage=pretrain", "trainer.max_epochs=1", *common], 150)}
    base = f"base={next(out.glob('pretrain/*/base.safetensors'), 'none')}"
    runs["finetune"] = run([sys.executable, "train.py", "stage=finetune", base, *common], 60)
    runs["finetune_bf16"] = run([sys.executable, "train.py", "stage=finetune", base, "trainer.precision=bf16-mixed", *common], 60)
    for name, path in (("pretrain", "pretrain"), ("finetune", "finetune")):
        found = sorted(out.glob(f"{path}/*/metrics.json"))
        runs[f"{name}_metrics"] = [{k: json.loads(f.read_text()).get(k) for k in ("status", "test", "seconds", "base_unchanged")} for f in found]
    return runs


def timings(reps: int) -> dict:
    import lightning as L
    import torch
    import torch.nn.functional as F

    from loralab.classifier import Classifier
    from loralab.data import load_tensors
    from loralab.inject import inject_lora, mark_only_lora_trainable
    from loralab.model import MLP
    from loralab.optim import adam
    from loralab.spec import LoRASpec

    device = torch.device("cuda")
    train_x, train_y, _, _ = load_tensors("data")
    x, y = train_x.to(device), train_y.to(device)
    batches = [torch.arange(i, min(i + 64, len(y)), device=device) for i in range(0, len(y), 64)]

    def sync_time(fn) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - start

    def bare_epoch():
        model = MLP([784, 1000, 2000, 10]).to(device)
        opt = adam(list(model.parameters()), 1e-3, fused=False)
        for idx in batches:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()

    def lightning_epoch():
        loader = torch.utils.data.DataLoader(torch.utils.data.StackDataset(x, y), sampler=batches, batch_size=None)
        trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            num_sanity_val_steps=0, limit_val_batches=0, accelerator="gpu", devices=1)
        trainer.fit(Classifier(MLP([784, 1000, 2000, 10])), train_dataloaders=loader)

    epochs = {"bare": [], "lightning": []}
    for rep in range(1 + reps):  # the first of each warms up
        for name, fn in (("bare", bare_epoch), ("lightning", lightning_epoch)):
            seconds = sync_time(fn)
            if rep:
                epochs[name].append(seconds)
    out = {"epoch_batches": len(batches), "bare_epoch_s": statistics.median(epochs["bare"]),
           "lightning_epoch_s": statistics.median(epochs["lightning"])}
    out["lightning_vs_bare"] = out["lightning_epoch_s"] / out["bare_epoch_s"]
    for batch in (10, 64, 256):
        xb, yb = torch.randn(batch, 784, device=device), torch.randint(0, 10, (batch,), device=device)
        steps = {}
        for method in ("full", "lora_r1", "lora_r8"):
            torch.manual_seed(0)
            model = MLP([784, 1000, 2000, 10]).to(device)
            if method != "full":
                inject_lora(model, LoRASpec(rank=int(method[6:]), alpha=1.0))
                mark_only_lora_trainable(model)
            opt = adam([p for p in model.parameters() if p.requires_grad], 1e-3, fused=method != "full")

            def step(model=model, opt=opt, xb=xb, yb=yb):
                for _ in range(20):
                    opt.zero_grad(set_to_none=True)
                    F.cross_entropy(model(xb), yb).backward()
                    opt.step()

            steps[method] = step
        times = {m: [] for m in steps}
        for rep in range(3 + 3 * reps):
            for m, fn in steps.items():
                seconds = sync_time(fn) / 20
                if rep >= 3:
                    times[m].append(seconds)
        medians = {m: statistics.median(t) for m, t in times.items()}
        out[f"step_bs{batch}"] = {f"{m}_ms": 1000 * t for m, t in medians.items()} | {
            f"{m}_vs_full": t / medians["full"] for m, t in medians.items() if m != "full"}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheels", type=Path, default=None, help="a directory of wheels for what is missing (hydra-core, omegaconf, antlr4)")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    results: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "installed_from_wheels": install_missing(args.wheels)}
    import torch

    results |= {"torch": torch.__version__, "cuda_available": torch.cuda.is_available()}
    results["mnist"] = run([sys.executable, "-m", "loralab.mnist", "data"], 60)
    results["cuda_tests"] = cuda_tests()
    if torch.cuda.is_available():
        results["gpu"] = torch.cuda.get_device_name(0)
        out = ROOT / "outputs" / f"gpu-check-{time.strftime('%Y%m%d-%H%M%S')}"  # a fresh root: its base is this run's
        results["stages"] = stage_runs(out)
        results["timings"] = timings(args.reps)
    else:
        results["gpu"] = None
        results["skipped"] = "no CUDA GPU: the stage runs and timings need one; the CUDA tests above skipped with their reason"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k in ("gpu", "cuda_available", "skipped")} | {"cuda_tests": results["cuda_tests"]["summary"]}))
    print(f"wrote {args.out}")
    failed = [k for k, v in results.get("stages", {}).items() if isinstance(v, dict) and v.get("returncode") != 0]
    if results["cuda_tests"]["returncode"] != 0 or failed:  # pytest's 5 (no test collected) fails too
        sys.exit(1)


if __name__ == "__main__":
    main()

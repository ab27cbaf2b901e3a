"""Sweeps against their compute floor: jobs per minute for experiment=variants and
experiment=frontier as users run them, and the bare-torch time of the same work, timed in the
same run.

    python benchmarks/sweep.py --base outputs/pretrain/<time> --out sweep.json
    python benchmarks/sweep.py --base ... --experiments variants --seeds 1   # a quick look

The floor of a sweep is, for every job, its training steps in a bare torch loop (the same model,
adapters and Adam, batches gathered from tensors in memory, no Lightning, Hydra or files) plus
the passes its results need: the 10,000 test images and the 5,000 validation images through the
trained model, adapters unmerged as the job computes its results; and the base's own test and
validation passes once per sweep (they are shared by every job on one base). Everything the
sweep spends beyond that is framework and bookkeeping: composing configs, building Trainers,
TensorBoard, checkpoints, adapter files, metrics.json. A stricter bound is printed beside it,
``base_eval_floor_s``: every test pass at the base's own speed, as if each adapter were merged
first (which would change the results' rounding; loralab tests unmerged).
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from loralab.config import load_job
from loralab.data import load_tensors
from loralab.files import write_json
from loralab.inject import inject_lora, mark_only_lora_trainable
from loralab.optim import adam, loraplus_groups
from loralab.weights import load_base

ROOT = Path(__file__).resolve().parents[1]


def sweep_jobs(experiment: str, seeds: int | None) -> list[list[str]]:
    """Each job's overrides, as Hydra's basic sweeper expands the experiment's params."""
    from omegaconf import OmegaConf

    params = OmegaConf.load(ROOT / "conf" / "experiment" / f"{experiment}.yaml").hydra.sweeper.params
    axes = [[f"{key}={value}" for value in str(values).split(",")] for key, values in params.items()]
    if seeds is not None:
        axes = [axis[:seeds] if axis[0].startswith("seed=") else axis for axis in axes]
    jobs = [[]]
    for axis in axes:
        jobs = [job + [value] for job in jobs for value in axis]
    return jobs


def floor_seconds(job: list[str], experiment: str, base: Path, data: tuple, reps: int) -> tuple[float, float]:
    """One job's training steps in a bare loop, and its test and validation passes through the
    model it trained: the best of ``reps`` each."""
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        settings = load_job(compose("config", [f"experiment={experiment}", *job])).settings
    train_x, train_y, test_x = data
    pool = (train_y == settings.data.digits[0]).nonzero().squeeze(1)
    batch, steps = settings.data.batch_size, settings.trainer["max_steps"]
    train, tests = float("inf"), float("inf")
    for _ in range(reps):
        model, _ = load_base(base, list(settings.model.sizes))
        if settings.adapter is not None:
            inject_lora(model, settings.adapter)
            mark_only_lora_trainable(model)
            named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            ratio = settings.optim.loraplus_ratio
            params = loraplus_groups(named, settings.optim.lr, ratio) if ratio else [p for _, p in named]
            optimizer = adam(params, settings.optim.lr, fused=True)
        else:
            optimizer = adam(list(model.parameters()), settings.optim.lr, fused=False)
        order = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(0))]
        start = time.perf_counter()
        for step in range(steps):
            idx = order[(step * batch) % (len(order) - batch):][:batch]
            loss = F.cross_entropy(model(train_x[idx]), train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        train = min(train, time.perf_counter() - start)
        tests = min(tests, eval_seconds(model, test_x, settings.data.eval_batch_size) + eval_seconds(model, train_x[:5000], settings.data.eval_batch_size))
    return train, tests


@torch.no_grad()
def eval_seconds(model: torch.nn.Module, images: torch.Tensor, batch: int = 1000, reps: int = 1) -> float:
    """A forward pass over ``images`` in batches, and the per-digit counts it needs."""
    model.eval()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        for chunk in images.split(batch):
            model(chunk).argmax(1).bincount(minlength=10)
        best = min(best, time.perf_counter() - start)
    return best


def run_sweep(experiment: str, seeds: int | None, base: Path, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as out:
        args = ["-m", f"experiment={experiment}", f"base={base}", f"output_root={out}", "trainer.enable_progress_bar=false", *extra]
        if seeds is not None:
            args.append("seed=" + ",".join(map(str, range(seeds))))
        start = time.perf_counter()
        done = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True, cwd=ROOT)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"error: the {experiment} sweep failed:\n{done.stderr[-2000:]}")
        jobs = len(list(Path(out).rglob("metrics.json")))
    return {"wall_s": wall, "jobs": jobs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True, help="a pretrain run dir or its base.safetensors")
    parser.add_argument("--experiments", default="variants,frontier")
    parser.add_argument("--seeds", type=int, default=None, help="only the first N seeds of each sweep")
    parser.add_argument("--reps", type=int, default=3, help="floor repetitions (the best is kept)")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--max-steps", type=int, default=None, help="shorter jobs (the smoke test's)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    base = args.base / "base.safetensors" if args.base.is_dir() else args.base
    torch.set_flush_denormal(True)  # as train.py runs
    train_x, train_y, test_x, _ = load_tensors(args.data_dir)
    results = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_name(), "torch": torch.__version__, "threads": torch.get_num_threads(),
               "command": " ".join(["python", *sys.argv]), "sweeps": {}}
    base_model, _ = load_base(base, [784, 1000, 2000, 10])
    base_eval_s = eval_seconds(base_model, test_x, reps=args.reps) + eval_seconds(base_model, train_x[:5000], reps=args.reps)
    extra = [f"trainer.max_steps={args.max_steps}", f"trainer.val_check_interval={args.max_steps}"] if args.max_steps else []
    for experiment in args.experiments.split(","):
        jobs = [job + extra for job in sweep_jobs(experiment, args.seeds)]
        sweep = run_sweep(experiment, args.seeds, base, extra)  # the sweep, then the floor of each of its arms
        arm_floors = {}
        for job in jobs:
            arm = tuple(o for o in job if not o.startswith("seed="))
            if arm not in arm_floors:
                arm_floors[arm] = floor_seconds(job, experiment, base, (train_x, train_y, test_x), args.reps)
        floors = [arm_floors[tuple(o for o in job if not o.startswith("seed="))] for job in jobs]
        train_s, eval_s = sum(f[0] for f in floors), sum(f[1] for f in floors) + base_eval_s
        floor, base_floor = train_s + eval_s, train_s + (len(jobs) + 1) * base_eval_s
        results["sweeps"][experiment] = sweep | {
            "jobs_per_minute": 60 * sweep["jobs"] / sweep["wall_s"], "seconds_per_job": sweep["wall_s"] / sweep["jobs"],
            "floor_s": floor, "floor_train_s": train_s, "floor_eval_s": eval_s, "ratio_to_floor": sweep["wall_s"] / floor,
            "base_eval_floor_s": base_floor, "ratio_to_base_eval_floor": sweep["wall_s"] / base_floor,
        }
        print(f"{experiment}: {sweep['jobs']} jobs in {sweep['wall_s']:.1f} s ({60 * sweep['jobs'] / sweep['wall_s']:.1f} jobs/min, "
              f"{sweep['wall_s'] / sweep['jobs']:.2f} s a job); floor {floor:.1f} s; ratio {sweep['wall_s'] / floor:.2f} "
              f"(at the base's test speed: floor {base_floor:.1f} s, ratio {sweep['wall_s'] / base_floor:.2f})")
    if args.out:
        write_json(args.out, results)
        print(f"wrote {args.out}")


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


if __name__ == "__main__":
    main()

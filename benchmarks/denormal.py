"""What ``flush_denormal`` buys: a whole real pretrain with and without it, interleaved, and how
many of Adam's state values end subnormal (docs/benchmarks.md section 12).

    python benchmarks/denormal.py --reps 2 [--epochs 3]

Each rep runs ``train.py stage=pretrain flush_denormal=<true|false>`` as a user would, in one
process each, alternating; it prints each run's fit seconds and median step, and the share of
the last checkpoint's Adam state (exp_avg, exp_avg_sq) that is subnormal in the run without
flushing (the values flushing turns into zeros).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def pretrain(flush: bool, epochs: int, out: Path) -> dict:
    run_dir = out / f"flush-{flush}-{len(list(out.iterdir()))}"
    subprocess.run([sys.executable, str(ROOT / "train.py"), "stage=pretrain", f"flush_denormal={str(flush).lower()}",
                    f"trainer.max_epochs={epochs}", "trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}"],
                   check=True, capture_output=True, cwd=ROOT)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {"run_dir": run_dir, "fit": metrics["seconds"]["fit"], "step": metrics["seconds"]["step"], "acc": metrics["test"]["acc"]}


def subnormal_share(checkpoint: Path) -> dict:
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["optimizer_states"][0]["state"]
    tiny = torch.finfo(torch.float32).tiny
    counts = {"values": 0, "subnormal": 0, "zero": 0}
    for tensors in state.values():
        for name in ("exp_avg", "exp_avg_sq"):
            t = tensors[name].abs()
            counts["values"] += t.numel()
            counts["subnormal"] += int(((t > 0) & (t < tiny)).sum())
            counts["zero"] += int((t == 0).sum())
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    runs: dict[bool, list[dict]] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            for flush in (rep % 2 == 0, rep % 2 != 0):  # alternate which goes first
                runs[flush].append(pretrain(flush, args.epochs, Path(tmp)))
                print(f"rep {rep} flush={flush}: fit {runs[flush][-1]['fit']:.1f} s, step {1000 * runs[flush][-1]['step']:.2f} ms, "
                      f"acc {runs[flush][-1]['acc']:.4f}", flush=True)
        share = subnormal_share(runs[False][-1]["run_dir"] / "checkpoints" / "last.ckpt")
    fit = {flush: statistics.median(r["fit"] for r in rs) for flush, rs in runs.items()}
    print(f"median fit: flush on {fit[True]:.1f} s, off {fit[False]:.1f} s (off / on = {fit[False] / fit[True]:.2f})")
    print(f"Adam state after the run without flushing: {share['subnormal']} of {share['values']} values subnormal, {share['zero']} zero")


if __name__ == "__main__":
    main()

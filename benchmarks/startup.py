"""Start-up: what every command pays before it trains, measured from outside the process.

    python benchmarks/startup.py --data-dir data        # this checkout with this interpreter
    python benchmarks/startup.py --data-dir data --timeline --tree runtime . .venv/bin/python   # where it goes
    python benchmarks/startup.py --data-dir data --tree new . .venv/bin/python --tree old ../old .venv-dev/bin/python

Each case runs ``train.py`` in a fresh process, cases interleaved (A B A B ...), medians:
- ``error_s``: launch to exit of ``stage=finetune lora.rank=0`` (one error line, exit 2);
- ``first_step_s``: launch to the start of the first training step of a fine-tune;
- ``run_s``: launch to exit of that one-step fine-tune.
The first step is seen by wrapping Lightning's training-epoch loop in the child (FIRST_STEP below),
so the same probe works on any loralab commit. A commit whose ``src/loralab`` has no
``__init__.py`` (before 846ccc1) is a namespace package, which the editable install's regular
package shadows: give such a checkout an empty one, or it runs this tree's code.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Runs in the child: report the seconds since the parent launched it when Lightning starts the
# first training batch, then run train.py as `python train.py` would.
FIRST_STEP = """
import runpy, sys, time
launched = float(sys.argv.pop(1))
from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop
advance = _TrainingEpochLoop.advance
def first_advance(self, *args, **kwargs):
    # The stage's own module only: loralab's check of trainer.* values runs a throwaway dry fit.
    if type(self.trainer.lightning_module).__name__ == "Classifier" and not getattr(_TrainingEpochLoop, "seen", False):
        _TrainingEpochLoop.seen = True
        print(f"FIRST_STEP {time.time() - launched:.4f}", file=sys.stderr, flush=True)
    return advance(self, *args, **kwargs)
_TrainingEpochLoop.advance = first_advance
sys.argv[0] = "train.py"
runpy.run_path("train.py", run_name="__main__")
"""


# Runs in the child too: where a fine-tune's time to its first step goes, as seconds from launch.
TIMELINE = """
import runpy, sys, time
launched = float(sys.argv.pop(1))
def mark(what):
    print(f"TIMELINE {time.time() - launched:.3f} {what}", file=sys.stderr, flush=True)
mark("interpreter started")
import hydra; mark("hydra imported")
import torch; mark("torch imported")
import lightning; mark("lightning imported")
import loralab.cli, loralab.stages; mark("loralab imported")
run_job = loralab.cli.run_job
def timed_job(cfg):
    mark("config composed, Hydra's job set up")
    return run_job(cfg)
loralab.cli.run_job = timed_job
from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop
advance = _TrainingEpochLoop.advance
def first_advance(self, *args, **kwargs):
    if type(self.trainer.lightning_module).__name__ == "Classifier" and not getattr(_TrainingEpochLoop, "seen", False):
        _TrainingEpochLoop.seen = True
        mark("first training step (after checks, base, MNIST, Trainer)")
    return advance(self, *args, **kwargs)
_TrainingEpochLoop.advance = first_advance
sys.argv[0] = "train.py"
runpy.run_path("train.py", run_name="__main__")
"""


def timeline(src: Path, python: str, data_dir: str) -> list[str]:
    """The TIMELINE marks of one one-step fine-tune (after one run to warm the page cache)."""
    work = Path(tempfile.mkdtemp(prefix="timeline-"))
    env = os.environ | {"LORALAB_DATA_DIR": str(Path(data_dir).resolve()), "PYTHONPATH": str(src / "src")}
    subprocess.run([python, "train.py", "stage=pretrain", "trainer.max_steps=5", "trainer.enable_progress_bar=false",
                    f"hydra.run.dir={work / 'base'}"], cwd=src, env=env, check=True, capture_output=True)
    for attempt in ("warm", "timed"):
        args = ["stage=finetune", f"base={work / 'base'}", "trainer.max_steps=1", "trainer.enable_progress_bar=false", f"hydra.run.dir={work / attempt}"]
        done = subprocess.run([python, "-c", TIMELINE, repr(time.time()), *args], cwd=src, env=env, capture_output=True, text=True)
    return [line.removeprefix("TIMELINE ") for line in done.stderr.splitlines() if line.startswith("TIMELINE ")]


def timed(python: str, src: Path, args: list[str], env: dict, probe: bool = False) -> tuple[float, float | None]:
    """(seconds to exit, seconds to the first training step or None) of ``train.py args`` in ``src``."""
    env = env | {"PYTHONPATH": str(src / "src")}  # this tree's package, whatever the venv has installed
    launched = time.time()
    command = [python, "-c", FIRST_STEP, repr(launched), *args] if probe else [python, "train.py", *args]
    done = subprocess.run(command, cwd=src, env=env, capture_output=True, text=True)
    wall = time.time() - launched
    first = [float(line.split()[1]) for line in done.stderr.splitlines() if line.startswith("FIRST_STEP ")]
    if probe and (done.returncode != 0 or not first):
        raise RuntimeError(f"{python} train.py {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return wall, (first[0] if first else None)


def measure(trees: dict[str, tuple[Path, str]], data_dir: str, reps: int) -> dict:
    work = Path(tempfile.mkdtemp(prefix="startup-"))
    env = os.environ | {"LORALAB_DATA_DIR": str(Path(data_dir).resolve()), "HYDRA_FULL_ERROR": "0"}
    src, python = next(iter(trees.values()))
    base = work / "base"
    subprocess.run([python, "train.py", "stage=pretrain", "trainer.max_steps=5", "trainer.enable_progress_bar=false",
                    f"hydra.run.dir={base}"], cwd=src, env=env | {"PYTHONPATH": str(src / "src")}, check=True, capture_output=True)
    finetune = ["stage=finetune", f"base={base}", "trainer.max_steps=1", "trainer.enable_progress_bar=false"]
    times: dict[str, dict[str, list[float]]] = {name: {"error_s": [], "first_step_s": [], "run_s": []} for name in trees}
    for rep in range(reps + 1):  # the first round warms the page cache and is not counted
        for name, (src, python) in trees.items():
            error, _ = timed(python, src, ["stage=finetune", "lora.rank=0", f"hydra.run.dir={work / 'error'}"], env)
            run, first = timed(python, src, [*finetune, f"hydra.run.dir={work / f'{name}-{rep}'}"], env, probe=True)
            if rep:
                for key, value in (("error_s", error), ("first_step_s", first), ("run_s", run)):
                    times[name][key].append(value)
    return {name: {key: {"median": statistics.median(v), "min": min(v), "max": max(v)} for key, v in measured.items()}
            for name, measured in times.items()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description="loralab start-up times")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--tree", nargs=3, action="append", metavar=("NAME", "SRC", "PYTHON"),
                        help="a checkout and the interpreter to run it with; several are interleaved")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--timeline", action="store_true", help="print where the first tree's time to its first step goes, and stop")
    args = parser.parse_args(argv)
    # abspath, not resolve: a venv's python is a symlink to the interpreter it was made from.
    trees = {name: (Path(src).resolve(), os.path.abspath(python)) for name, src, python in args.tree or [("this", ROOT, sys.executable)]}
    if args.timeline:
        print("\n".join(timeline(*next(iter(trees.values())), args.data_dir)))
        return {}
    results = measure(trees, args.data_dir, args.reps)
    print(json.dumps(results, indent=1, default=lambda v: round(v, 3)))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()

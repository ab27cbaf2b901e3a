"""Start-up: what every command pays before it trains, measured from outside the process.

    python benchmarks/startup.py --data-dir data        # this checkout with this interpreter
    python benchmarks/startup.py --data-dir data --timeline --tree runtime . .venv/bin/python   # where it goes
    python benchmarks/startup.py --data-dir data --tree new . .venv/bin/python --tree old ../old .venv-dev/bin/python

Each case runs ``train.py`` in a fresh process, cases interleaved (A B A B ...), medians:
- ``error_s``: launch to exit of ``stage=finetune lora.rank=0`` (one error line, exit 2);
- ``first_step_s``: launch to the start of the first training step of a fine-tune;
- ``run_s``: launch to exit of that one-step fine-tune.
The first step is seen by wrapping Lightning's training-epoch loop in the child (PROBE below),
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

from loralab.files import write_json

ROOT = Path(__file__).resolve().parent.parent

# Runs in the child: prints "MARK <seconds since the parent launched it> <what>" at the first
# training step of the stage's own module (loralab's check of trainer.* values runs a throwaway
# dry fit first), and, with --timeline, after each import; then runs train.py as
# `python train.py` would.
PROBE = """
import runpy, sys, time
launched, timeline = float(sys.argv.pop(1)), sys.argv.pop(1) == "timeline"
def mark(what):
    print(f"MARK {time.time() - launched:.4f} {what}", file=sys.stderr, flush=True)
if timeline:
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


def tree_env(src: Path, data_dir: str) -> dict:
    # PYTHONPATH: this tree's package, whatever the venv has installed.
    return os.environ | {"LORALAB_DATA_DIR": str(Path(data_dir).resolve()), "PYTHONPATH": str(src / "src"), "HYDRA_FULL_ERROR": "0"}


def make_base(src: Path, python: str, data_dir: str, work: Path) -> Path:
    base = work / "base"
    subprocess.run([python, "train.py", "stage=pretrain", "trainer.max_steps=5", "trainer.enable_progress_bar=false",
                    f"hydra.run.dir={base}"], cwd=src, env=tree_env(src, data_dir), check=True, capture_output=True)
    return base


def one_step_finetune(base: Path, run_dir: Path) -> list[str]:
    return ["stage=finetune", f"base={base}", "trainer.max_steps=1", "trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}"]


def probed(python: str, src: Path, args: list[str], env: dict, timeline: bool = False) -> tuple[float, list[tuple[float, str]]]:
    """(seconds to exit, the child's marks) of ``train.py args`` in ``src``, which must succeed."""
    launched = time.time()
    done = subprocess.run([python, "-c", PROBE, repr(launched), "timeline" if timeline else "-", *args],
                          cwd=src, env=env, capture_output=True, text=True)
    wall = time.time() - launched
    marks = [(float(line.split(" ", 2)[1]), line.split(" ", 2)[2]) for line in done.stderr.splitlines() if line.startswith("MARK ")]
    if done.returncode != 0 or not marks:
        raise RuntimeError(f"{python} train.py {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return wall, marks


def error_seconds(python: str, src: Path, run_dir: Path, env: dict) -> float:
    """Seconds from launch to exit of a fine-tune with an invalid rank, which must end in its one
    error line with exit 2."""
    launched = time.time()
    done = subprocess.run([python, "train.py", "stage=finetune", "lora.rank=0", f"hydra.run.dir={run_dir}"],
                          cwd=src, env=env, capture_output=True, text=True)
    wall = time.time() - launched
    if done.returncode != 2 or not done.stderr.startswith("error: "):
        raise RuntimeError(f"lora.rank=0 did not end in one error line (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return wall


def timeline(src: Path, python: str, data_dir: str) -> list[str]:
    """The marks of one one-step fine-tune, after one run that warms the page cache."""
    with tempfile.TemporaryDirectory(prefix="timeline-") as tmp:
        work = Path(tmp)
        base = make_base(src, python, data_dir, work)
        for attempt in ("warm", "timed"):
            _, marks = probed(python, src, one_step_finetune(base, work / attempt), tree_env(src, data_dir), timeline=True)
    return [f"{seconds:.3f} {what}" for seconds, what in marks]


def measure(trees: dict[str, tuple[Path, str]], data_dir: str, reps: int) -> dict:
    """Per tree, median, min and max of error_s, first_step_s and run_s over ``reps`` rounds."""
    times: dict[str, dict[str, list[float]]] = {name: {"error_s": [], "first_step_s": [], "run_s": []} for name in trees}
    with tempfile.TemporaryDirectory(prefix="startup-") as tmp:
        work = Path(tmp)
        base = make_base(*next(iter(trees.values())), data_dir, work)
        for rep in range(reps + 1):  # the first round warms the page cache and is not counted
            for name, (src, python) in trees.items():
                env = tree_env(src, data_dir)
                error = error_seconds(python, src, work / "error", env)
                run, marks = probed(python, src, one_step_finetune(base, work / f"{name}-{rep}"), env)
                if rep:
                    for key, value in (("error_s", error), ("first_step_s", marks[0][0]), ("run_s", run)):
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
    print(json.dumps(results, indent=1))
    if args.out:
        write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()

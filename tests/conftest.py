"""Shared fixtures: real MNIST on disk, the real Hydra config, and real pretrain runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from loralab.mnist import ensure_mnist
from loralab.stages import run_stage

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
DATA_DIR = Path(os.environ.get("LORALAB_DATA_DIR", ROOT / "data")).resolve()

# A fast, real slice: a few batches of real MNIST through the real Trainer.
SLICE = [
    "trainer.limit_train_batches=5",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "accelerator=cpu",
]


class MakesADirectory:
    """Unpickling this runs os.makedirs: the evidence that a loader executed code it should not."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.makedirs, (self.path,))


def make_cfg(overrides: list[str], output_root: Path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, f"output_root={output_root}", f"data_dir={DATA_DIR}"])
    return cfg


def run(overrides: list[str], output_root: Path, name: str) -> tuple[dict, Path]:
    cfg = make_cfg(overrides, output_root)
    run_dir = output_root / name
    run_dir.mkdir(parents=True)
    return run_stage(cfg, run_dir), run_dir


def train_py(*args: str, cwd: Path = ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real CLI, as a user runs it."""
    full_env = {**os.environ, "LORALAB_DATA_DIR": str(DATA_DIR), **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True, cwd=cwd, env=full_env, timeout=900)


@pytest.fixture(scope="session", autouse=True)
def mnist_dir() -> Path:
    ensure_mnist(DATA_DIR)
    return DATA_DIR


@pytest.fixture(scope="session")
def outputs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("outputs")


@pytest.fixture(scope="session")
def pretrained(outputs) -> tuple[dict, Path]:
    """A pretrain of the real ExpensiveNet on a slice (the full-data run is in test_e2e)."""
    return run([*SLICE, "stage=pretrain", "trainer.max_epochs=1"], outputs, "pretrain")


@pytest.fixture(scope="session")
def finetuned(outputs, pretrained) -> tuple[dict, Path]:
    _, base_dir = pretrained
    return run([*SLICE, "stage=finetune", "trainer.max_steps=20", "trainer.val_check_interval=10", f"base={base_dir}"], outputs, "finetune")

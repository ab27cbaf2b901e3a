"""Shared fixtures and helpers: real MNIST on disk, the real Hydra config, real pretrain runs,
the CLI as users run it, and adapters that really change the model."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from torch import nn

from loralab.cli import config_error_line, configure_process
from loralab.config import Job, load_job
from loralab.errors import ConfigError
from loralab.lora import is_lora_name
from loralab.mnist import ensure_mnist
from loralab.stages import run_stage

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
DATA_DIR = Path(os.environ.get("LORALAB_DATA_DIR", ROOT / "data")).resolve()
SMALL = [784, 32, 16, 10]
EXPENSIVE = [784, 1000, 2000, 10]  # ExpensiveNet, the model every stage trains by default
ALL_LAYERS = ("linear1", "linear2", "linear3")
MAX_ERROR_CHARS = 200  # the README's promise: one short line, readable in a terminal

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


def load(overrides: list[str], output_root: Path) -> Job:
    """The typed settings of ``overrides``, checked as the CLI checks them: a value Hydra refuses
    while composing is a ConfigError with the CLI's one line too."""
    try:
        cfg = make_cfg(overrides, output_root)
    except HydraException as err:
        raise ConfigError(config_error_line(err, overrides, CONF)) from None
    return load_job(cfg)


def run(overrides: list[str], output_root: Path, name: str) -> tuple[dict, Path]:
    """A stage in this process, validated as the CLI validates it."""
    job = load(overrides, output_root)
    run_dir = output_root / name
    run_dir.mkdir(parents=True)
    return run_stage(job, run_dir), run_dir


def env_with_data(env: dict | None = None) -> dict:
    return {**os.environ, "LORALAB_DATA_DIR": str(DATA_DIR), **(env or {})}


def train_py(*args: str, cwd: Path = ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real CLI, as a user runs it."""
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True, cwd=cwd, env=env_with_data(env), timeout=900)


def start_train_py(*args: str, **popen) -> subprocess.Popen:
    """The real CLI in the background, to interrupt."""
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env_with_data(), **popen)


def script(*args) -> subprocess.CompletedProcess:
    """A script or module run as a user runs it: ``script(path, arg, ...)``."""
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=600, env=env_with_data())


def tree_digest(root: Path) -> dict:
    """Every file under ``root`` and its sha256: equal before and after iff nothing was written."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_one_line_error(done: subprocess.CompletedProcess, *fragments: str) -> None:
    """Non-zero exit, no traceback, exactly one ``error:`` line of at most MAX_ERROR_CHARS
    characters, holding every fragment."""
    assert done.returncode != 0, done.stdout
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, done.stderr
    assert len(errors[0]) <= MAX_ERROR_CHARS, f"{len(errors[0])} characters: {errors[0]}"
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@torch.no_grad()
def as_if_trained(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every adapter tensor non-trivial values (B = 0 at init makes any adapter invisible),
    in a loralab model (``linear1.lora_B``) or a PEFT one (``...linear1.lora_B.default.weight``)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if any(is_lora_name(part) for part in name.split(".")):
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


@pytest.fixture(scope="session", autouse=True)
def mnist_dir() -> Path:
    configure_process(flush_denormal=True)  # as train.py does, so in-process runs match the CLI's
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

"""The Hydra task behind ``train.py``: validate, run the stage, turn user errors into one line."""

from __future__ import annotations

import logging
import shutil
import sys
import warnings
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from loralab.errors import ArtifactError, LoralabError
from loralab.files import write_text
from loralab.stages import run_stage
from loralab.validate import check_config

log = logging.getLogger(__name__)

# Batches are slices of in-memory tensors: worker processes would only add start-up cost.
warnings.filterwarnings("ignore", message=r".*does not have many workers.*")


def discard_if_empty(run_dir: Path, output_root: Path) -> None:
    """Remove a run dir that holds nothing but Hydra's own bookkeeping, and the parents this run
    created, so a typo leaves no litter under the output root."""
    if any(p.name != ".hydra" and p.suffix != ".log" for p in run_dir.iterdir()):
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    root = output_root.resolve()
    for parent in run_dir.resolve().parents:
        if parent == root or root not in parent.parents or any(parent.iterdir()):
            break
        parent.rmdir()


def run_job(cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        check_config(cfg)
        if (run_dir / "metrics.json").exists():
            raise ArtifactError(f"{run_dir} already holds a finished run (metrics.json); choose another hydra.run.dir")
        metrics = run_stage(cfg, run_dir)
    except LoralabError as err:
        if cfg.get("debug"):
            raise
        print(f"error: {err}", file=sys.stderr)
        if multirun:
            # The sweep goes on; the summary lists this job as failed.
            write_text(run_dir / "error.txt", f"{err}\n")
            return None
        discard_if_empty(run_dir, Path(cfg.output_root))
        sys.exit(2)
    # Hydra sweepers (Optuna) optimise the returned value.
    return metrics.get("objective", metrics["test"]["acc"])

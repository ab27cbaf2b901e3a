"""The Lightning Trainer the stages run on: its logger and checkpoints, fitting and testing with
results returned (not left on the module), and resuming an interrupted run from its last checkpoint."""

from __future__ import annotations

import io
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf
from torch.multiprocessing import ProcessRaisedException

from loralab.config import INCIDENTAL, Job, Settings, flat
from loralab.errors import ArtifactError, LoralabError
from loralab.files import atomic_write_bytes, regular_file, short
from loralab.monitors import measurements
from loralab.progress import StepProgressBar
from loralab.results import TestResult
from loralab.runs import METRICS_FILE
from loralab.trainer_args import trainer_kwargs


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints go through the same temporary-file-and-rename as every artifact, so a
    run killed while saving keeps its previous last.ckpt whole instead of a torn new one."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, buffer.getvalue())


def checkpoint_file(run_dir: Path) -> Path:
    """Where a run keeps its one checkpoint, replaced at every validation."""
    return run_dir / "checkpoints" / "last.ckpt"


def make_trainer(cfg: Settings, run_dir: Path, callbacks: list, checkpoint: bool, testing: bool = False) -> L.Trainer:
    kwargs = trainer_kwargs(cfg.trainer, testing)
    # Event files go straight into the run dir, so `tensorboard --logdir outputs` names runs by path.
    logger = TensorBoardLogger(save_dir=str(run_dir), name="", version="", default_hp_metric=False)
    if checkpoint:
        # One file, replaced at every validation (mid-epoch too, for fine-tunes): with save_top_k=0,
        # save_last would only write when training ends, too late for a run that gets killed.
        path = checkpoint_file(run_dir)
        checkpoint_cb = ModelCheckpoint(dirpath=path.parent, filename=path.stem, save_top_k=1, enable_version_counter=False)
        callbacks = [*callbacks, checkpoint_cb]
    if kwargs.get("enable_progress_bar", True):
        callbacks = [*callbacks, StepProgressBar()]
    return L.Trainer(
        **kwargs,
        use_distributed_sampler=False,  # the DataModule gives each rank its share itself
        logger=logger,
        callbacks=callbacks,
        enable_checkpointing=checkpoint,
        plugins=[AtomicCheckpointIO()],
        default_root_dir=str(run_dir),
    )


def tester(trainer: L.Trainer, cfg: Settings, run_dir: Path) -> L.Trainer:
    """The trainer that tests: the training one, unless that one spawns ranks (ddp_spawn), whose
    results would stay in the spawned processes."""
    return trainer if trainer.world_size == 1 else make_trainer(cfg, run_dir, [], checkpoint=False, testing=True)


@dataclass(frozen=True)
class Fit:
    seconds: float
    step_seconds: float  # median wall time of one training step
    optimizer_state_bytes: int


def fit(trainer: L.Trainer, module: L.LightningModule, datamodule: L.LightningDataModule, ckpt: Path | None) -> Fit:
    start = time.perf_counter()
    try:
        # weights_only: a checkpoint is data; unpickling arbitrary objects from it could run code.
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)
    except ProcessRaisedException as err:
        # ddp_spawn hands back a rank's exception as its traceback text, whose last line is
        # "loralab.errors.DivergedError: <message>"; a user error stays a user error.
        kind, _, message = str(err).strip().splitlines()[-1].partition(": ")
        if kind.startswith(f"{LoralabError.__module__}."):
            raise LoralabError(message) from None
        raise
    seconds = time.perf_counter() - start
    return Fit(seconds, *measurements(trainer))  # before the next test resets them


def run_test(trainer: L.Trainer, module: L.LightningModule, datamodule, split: str = "test") -> TestResult:
    """Test on the full test set, logged under ``split`` (test, test_base, test_<adapter>); a
    split named ``val...`` (val_final, val_base) runs on the validation split instead."""
    module.test_split = split
    on_val = split.startswith("val")
    loader = {"dataloaders": datamodule.whole_val_dataloader()} if on_val else {"datamodule": datamodule}
    module.test_result = None
    # A test draws from the global RNG (each DataLoader iterator takes a base seed): forked, so
    # that training after it draws the same numbers whether or not a test ran first (the base's
    # results are computed by a process's first job only, loralab.methods.base_result).
    with torch.random.fork_rng(devices=[]):
        trainer.test(module, verbose=False, **loader)
    return module.test_result


def run_overrides(run_dir: Path) -> list[str] | None:
    """The command-line overrides ``run_dir`` was made with, as Hydra recorded them; None for a
    run that did not come from train.py."""
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    return [str(o) for o in OmegaConf.load(overrides_file)] if overrides_file.exists() else None


def run_command(run_dir: Path) -> str | None:
    """The command that made ``run_dir`` (one job's, for a sweep job)."""
    overrides = run_overrides(run_dir)
    return None if overrides is None else shlex.join(["python", "train.py", *overrides])


def resume_command(run_dir: Path) -> str:
    """The command that continues ``run_dir``: its own overrides, plus resume=."""
    overrides = [o for o in run_overrides(run_dir) or [] if not o.startswith("resume=")]
    return shlex.join(["python", "train.py", *overrides, f"resume={run_dir}"])


def resume_checkpoint(job: Job) -> Path | None:
    """The last checkpoint of an interrupted run, checked before training: the run's config must
    be this one (up to the incidental keys: where things are, not what is trained), and the
    checkpoint must load without unpickling objects."""
    if job.settings.resume is None:
        return None
    run_dir = Path(job.settings.resume)
    ckpt = checkpoint_file(run_dir)
    if not ckpt.exists():
        raise ArtifactError(f"resume={short(run_dir)} has no checkpoints/last.ckpt; pass the run dir of an interrupted run")
    if (run_dir / METRICS_FILE).exists():
        raise ArtifactError(f"resume={short(run_dir)} finished (its {METRICS_FILE} is there), so nothing is left to resume; "
                            "run again without resume=")
    saved = run_dir / ".hydra" / "config.yaml"
    if saved.exists():
        try:
            loaded = OmegaConf.load(regular_file(saved, "saved config"))
            if not isinstance(loaded, DictConfig):
                raise TypeError("not a mapping")
            before = flat(OmegaConf.to_container(loaded, resolve=True))
        except LoralabError:
            raise
        except Exception as err:  # noqa: BLE001 - YAML, interpolation or type errors: not the file Hydra wrote
            raise ArtifactError(f"{short(saved)} is not the config Hydra saved ({type(err).__name__}); restore it, or start afresh") from None
        now = flat(job.composed)
        changed = sorted(k for k in before.keys() | now.keys() if k not in INCIDENTAL and before.get(k) != now.get(k))
        if changed:
            first = changed[0]
            # The full resume command would run past one short line; the run's own overrides are
            # in its .hydra/overrides.yaml, and a Ctrl-C prints the command.
            raise ArtifactError(f"resume={short(run_dir)} ran with {first}={before.get(first)!r}, not {now.get(first)!r}"
                                f"{f' (and {len(changed) - 1} more)' if len(changed) > 1 else ''}; "
                                "resume with the run's own values (its .hydra/overrides.yaml)")
    try:
        checkpoint = torch.load(regular_file(ckpt, "checkpoint"), map_location="cpu", weights_only=True)
    except LoralabError:
        raise
    except Exception as err:  # noqa: BLE001 - every failure here means "not a safe, whole checkpoint"
        # torch's weights-only refusal runs to a paragraph; what it means here fits in a few words.
        reason = "torch.load's weights-only reader refused it" if "Weights only load failed" in str(err) else str(err).splitlines()[0][:80]
        raise ArtifactError(f"{short(ckpt)} is not a loadable checkpoint ({reason}); resume a run loralab wrote") from None
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise ArtifactError(f"{short(ckpt)} is not a Lightning checkpoint (no {', '.join(missing)}); resume the run that wrote it")
    return ckpt


# What Lightning needs to continue a run (its loops, the optimizer, the weights).
CHECKPOINT_KEYS = ("state_dict", "optimizer_states", "loops", "global_step")


def last_checkpoint(run_dir: Path) -> str | None:
    ckpt = checkpoint_file(run_dir)
    return str(ckpt) if ckpt.exists() else None

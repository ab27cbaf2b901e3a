"""Lightning callbacks: LoRA fine-tuning (inject, freeze) and the resume hint."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import BaseFinetuning
from lightning.pytorch.utilities.exceptions import SIGTERMException

from loralab.inject import count_parameters, inject_lora, mark_only_lora_trainable
from loralab.lora import LoRASpec
from loralab.trainer import checkpoint_file, resume_command


class ResumeHint(L.Callback):
    """On Ctrl-C or SIGTERM, say where the last checkpoint is and the command that continues."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, (KeyboardInterrupt, SIGTERMException)):
            last = checkpoint_file(self.run_dir)
            if last.exists():
                print(f"interrupted: the last checkpoint is {last}; resume with: {resume_command(self.run_dir)}", file=sys.stderr)
            else:
                print("interrupted before the first checkpoint: nothing to resume, start the run again", file=sys.stderr)


class LoRAFinetuning(BaseFinetuning):
    """Runs at every setup (fit, validate, test); injection is idempotent, so a model is never
    wrapped twice. The optimizer then sees only ``lora_`` parameters, since
    ``Classifier.configure_optimizers`` takes the trainable ones."""

    def __init__(self, spec: LoRASpec):
        super().__init__()
        self.spec = spec

    def freeze_before_training(self, pl_module: L.LightningModule) -> None:
        inject_lora(pl_module.model, self.spec)
        mark_only_lora_trainable(pl_module.model)

    def finetune_function(self, pl_module, current_epoch, optimizer) -> None:
        """Nothing is unfrozen later: the base stays frozen for the whole run."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if trainer.logger is not None:
            counts = count_parameters(pl_module.model)
            trainer.logger.log_metrics({f"params/{k}": float(v) for k, v in counts.items()}, step=0)

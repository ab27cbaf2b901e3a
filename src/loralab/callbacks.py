"""The resume hint: what an interrupted run says on its way out."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

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


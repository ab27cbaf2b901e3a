"""What a run prints. Hydra's job logging (conf/hydra/job_logging/loralab.yaml) is the one output
for log records: the console, and the run's train.log, which keeps every record. This module keeps
third-party chatter off the console only; ``verbose=true`` shows all of it again.

Hydra's logging config imports this module before the job starts: it must import nothing heavy.
"""

from __future__ import annotations

import logging
import warnings


class ConsoleFilter(logging.Filter):
    """On the console handler only, so train.log still receives what is dropped here:
    Lightning's product tips, and matplotlib's notices (e.g. "generated new fontManager" on the
    first run with an empty font cache)."""

    def __init__(self, verbose: bool = False):
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        if self.verbose:
            return True
        if record.name.startswith("lightning.") and record.getMessage().startswith("💡 Tip:"):
            return False
        return not (record.name.startswith("matplotlib") and record.levelno < logging.WARNING)


def use_hydra_handlers() -> None:
    """``import lightning`` hands the "lightning" logger a stderr handler of its own ("INFO: ...")
    and leaves propagation on, so under Hydra's root handlers every Lightning record is printed
    twice; torchmetrics does the same for "torchmetrics". Hydra's handlers are enough. Outside
    Hydra (no root handler, e.g. a test calling a stage) the libraries' handlers stay."""
    if not logging.getLogger().handlers:
        return
    for name in ("lightning", "torchmetrics"):
        logging.getLogger(name).handlers.clear()


def quiet_warnings() -> None:
    """Warnings about third-party code that loralab cannot act on."""
    # Batches are slices of in-memory tensors: worker processes would only add start-up cost.
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    # Lightning 2.6's pytree helper builds LeafSpec(), deprecated since torch 2.10
    # (Lightning-AI/pytorch-lightning#21326); the same filter as pyproject.toml's for pytest.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)

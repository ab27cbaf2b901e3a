"""Callbacks that watch every training run: the median step time, the optimizer's state size, and
the stop at the first non-finite loss.

Their measurements go into ``trainer.callback_metrics`` when training ends: under ddp_spawn it is
the one thing Lightning carries back from the spawned ranks (rank 0's) to the process that runs
the stage, and ``measurements`` reads them there. The next test resets it, so read it first.
"""

from __future__ import annotations

import math
import statistics
import time

import lightning as L
import torch

from loralab.errors import DivergedError

STEP_SECONDS = "train/step_seconds"
OPTIMIZER_STATE_BYTES = "train/optimizer_state_bytes"


class StepTimes(L.Callback):
    """Wall time of each training step (forward, backward, optimizer), reported as the median."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seconds: list[float] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        self.seconds.append(time.perf_counter() - self.start)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        median = statistics.median(self.seconds) if self.seconds else math.nan
        trainer.callback_metrics[STEP_SECONDS] = torch.tensor(median, dtype=torch.float64)


class OptimizerStateSize(L.Callback):
    """Bytes of the optimizers' state tensors (Adam's two moments and step counts) once trained."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state_bytes = sum(
            t.numel() * t.element_size()
            for optimizer in trainer.optimizers
            for state in optimizer.state.values()
            for t in state.values()
            if torch.is_tensor(t)
        )
        trainer.callback_metrics[OPTIMIZER_STATE_BYTES] = torch.tensor(state_bytes, dtype=torch.int64)


class StopOnNonFiniteLoss(L.Callback):
    """Stop at the first NaN or inf loss, before its backward and optimizer step: every later step
    would be NaN too, and the run would still save an adapter and report ~10 % accuracy.
    Lightning re-raises it (after its on_exception hooks); the CLI prints it as one line.
    (Lightning 2 has no terminate_on_nan; detect_anomaly is autograd's debugging mode, which
    checks every backward op and ends in a traceback.)"""

    def __init__(self, lr: float):
        self.lr = lr  # the configured rate, which the message suggests lowering

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss):
            raise DivergedError(
                f"training diverged: the loss is {loss.item()} at step {trainer.global_step + 1} (epoch {trainer.current_epoch}); "
                f"lower the learning rate, e.g. optim.lr={self.lr / 10:g} (now {self.lr:g})"
            )


def monitors(lr: float) -> list[L.Callback]:
    return [StepTimes(), OptimizerStateSize(), StopOnNonFiniteLoss(lr)]


def measurements(trainer: L.Trainer) -> tuple[float, int]:
    """(median step seconds, optimizer state bytes); NaN and 0 when Lightning trained no step
    (resuming a run whose training had finished): nothing was measured."""
    measured = trainer.callback_metrics
    return float(measured.get(STEP_SECONDS, math.nan)), int(measured.get(OPTIMIZER_STATE_BYTES, 0))

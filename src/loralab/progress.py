"""The training progress bar: optimizer steps for a step-bounded run."""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar


class StepProgressBar(RichProgressBar):
    """Lightning titles a step-bounded run (max_steps set, max_epochs=None, which Lightning turns
    into -1) "Epoch 0/-2" and counts the batches of each epoch. This bar says "step" and counts the
    run's optimizer steps, across epochs and from a resumed step: "step ━━━━ 37/100". Runs bounded
    by epochs (pretrain) keep Lightning's "Epoch 1/2" bar."""

    def step_bounded(self) -> bool:
        # The test Lightning's own ProgressBar.total_train_batches makes.
        return self.trainer.max_epochs == -1 and self.trainer.max_steps > 0

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps if self.step_bounded() else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        if self.step_bounded():
            return f"{'step':{len(self.validation_description)}}"  # padded as Lightning pads, against flicker
        return super()._get_train_description(current_epoch)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self.step_bounded() and self.train_progress_bar_id is not None:
            return  # one bar for the whole run: Lightning's would restart at 0 each epoch
        super().on_train_epoch_start(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        # Lightning's bar shows batch_idx + 1; a step-bounded one shows the steps taken so far.
        super().on_train_batch_end(trainer, pl_module, outputs, batch, trainer.global_step - 1 if self.step_bounded() else batch_idx)

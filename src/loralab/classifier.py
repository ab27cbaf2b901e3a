"""The LightningModule: the model, its loss (cross-entropy, with distillation to the base on
replayed images), Adam, and per-digit metrics from torchmetrics. What a run measures besides
(step time, optimizer state, divergence) is in loralab.monitors; LoRA's injection, freezing and
adapter-only checkpoints in loralab.finetuning.

Metric names are ``split/name``: ``val/acc``, ``test/err_d9``, ``test/wrong_target``. "target"
means the digits being trained on, "other" the rest, so forgetting shows up on its own curve.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import matplotlib
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from loralab.errors import ArtifactError
from loralab.finetuning import checkpoint_model
from loralab.inject import lora_disabled, lora_layers
from loralab.optim import adam, loraplus_groups
from loralab.results import NUM_CLASSES, TestResult
from loralab.weights import fingerprint

matplotlib.use("Agg")  # figures go to TensorBoard, never to a screen


def digit_metrics() -> MetricCollection:
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(NUM_CLASSES, average="micro"),
            "confmat": MulticlassConfusionMatrix(NUM_CLASSES),
        }
    )


class Classifier(L.LightningModule):
    """Trains and tests ``model`` (an MLP, adapted or not) on the digits ``target_digits``.

    ``Classifier.load_from_checkpoint(path)`` rebuilds the module from any stage's checkpoint:
    the MLP of the sizes it saved, or, for a LoRA fine-tune's (which holds only the adapter), the
    base file it names, checked against the base's fingerprint, with the adapter it trained."""

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        target_digits: list[int] | None = None,
        scheduler: str = "none",
        distill: float = 0.0,
        frozen_base: nn.Module | None = None,
        loraplus_ratio: float | None = None,
        confusion_figures: bool = True,
    ):
        super().__init__()
        self.model = model
        self.target_digits = list(range(NUM_CLASSES)) if target_digits is None else sorted(target_digits)
        # Plain values only, so a checkpoint loads with weights_only=True; the model's sizes are
        # what load_from_checkpoint rebuilds it from. logger=False: the stage logs the run's
        # hyperparameters itself, with its results.
        self.save_hyperparameters({
            "sizes": [int(n) for n in model.sizes], "lr": lr, "target_digits": self.target_digits,
            "scheduler": scheduler, "distill": distill, "loraplus_ratio": loraplus_ratio,
        }, logger=False)
        self.lr, self.scheduler, self.loraplus_ratio = lr, scheduler, loraplus_ratio
        # Learning without Forgetting (Li & Hoiem, 2016): on the replayed images of the other
        # digits, also match the base model's output distribution, not only the label. The base
        # is the model with its adapters off, or, for a full fine-tune, a frozen copy.
        self.distill, self.frozen_base = distill, frozen_base
        self.register_buffer("target_mask", torch.isin(torch.arange(NUM_CLASSES), torch.tensor(self.target_digits)), persistent=False)
        self.val_metrics = digit_metrics()
        self.test_metrics = digit_metrics()
        self.test_split = "test"  # what trainer.run_test logs this test as: test, test_base, ...
        self.test_result: TestResult | None = None  # the last test's, which run_test returns
        self.confusion_figures = confusion_figures  # each test's confusion matrix as a TensorBoard image

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: str | Path, base: str | Path | None = None, **kwargs) -> Classifier:
        """Lightning's, with the model built first from what the checkpoint records; ``base``: the
        base file a LoRA checkpoint adapts, where it is no longer at the path it names."""
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        return super().load_from_checkpoint(checkpoint_path, model=checkpoint_model(checkpoint, base), **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def configure_optimizers(self):
        # Only what is trainable: under LoRA, adapt has frozen all but the lora_ parameters.
        trainable = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        trains_adapters = bool(lora_layers(self.model))  # fused Adam for adapters: loralab.optim.adam says why
        if self.loraplus_ratio:
            optimizer = adam(loraplus_groups(trainable, self.lr, self.loraplus_ratio), self.lr, fused=trains_adapters)
        else:
            optimizer = adam([p for _, p in trainable], self.lr, fused=trains_adapters)
        if self.scheduler == "none":
            return optimizer
        # Cosine decay to zero over the run: a constant-lr Adam ends wherever its last noisy steps
        # left it, about half a point below what the same epochs reach with a decayed rate.
        total = self.trainer.estimated_stepping_batches
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, int(total)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": cosine, "interval": "step", "name": "train/lr"}}

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        logging_step = self.logging_step()
        if self.distill:
            distill = self.distill_loss(x, y, logits)
            if logging_step:
                self.log("train/distill", distill)
            loss = loss + self.distill * distill
        if logging_step:
            self.log("train/loss", loss, prog_bar=True)
        return loss

    def logging_step(self) -> bool:
        """Whether the logger writes this step: each self.log costs ~1 ms of Lightning's
        bookkeeping, 10 % of a batch-64 step on a CPU, for a value that would be dropped."""
        trainer = self._trainer
        if trainer is None:
            return True
        return (self.global_step + 1) % max(1, trainer.log_every_n_steps) == 0 or trainer.fast_dev_run

    def distill_loss(self, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """KL(base || model) on the batch's other-digit (replay) images; 0 when it has none."""
        other = ~self.target_mask[y]
        if not other.any():
            return logits.new_zeros(())
        x, logits = x[other], logits[other]
        with torch.no_grad():
            if self.frozen_base is not None:
                base = self.frozen_base(x)
            else:
                with lora_disabled(self.model):
                    base = self.model(x)
        return F.kl_div(F.log_softmax(logits, dim=1), F.log_softmax(base, dim=1), log_target=True, reduction="batchmean")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """No checkpoint keeps the frozen distillation copy: it is the base the run started from."""
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("frozen_base.")}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A checkpoint may leave out the frozen base and stand for it by its fingerprint (a LoRA
        fine-tune's does): checked against the base this module holds, which then fills it in."""
        expected = checkpoint.get("base_sha256")
        if expected is not None and expected != fingerprint(self.model):
            raise ArtifactError(f"the checkpoint was trained on a base with sha256 {expected[:12]}…, not the base given now; resume with the same base=")
        for name, tensor in self.state_dict().items():
            checkpoint["state_dict"].setdefault(name, tensor)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val/loss", F.cross_entropy(logits, y), sync_dist=True)
        self.val_metrics.update(logits, y)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.test_metrics.update(self(x), y)

    def on_validation_epoch_end(self) -> None:
        # compute() has already summed the confusion matrix over ranks: every rank logs the same.
        self.log_dict(self.scalars(self.result(self.val_metrics.compute()), "val"), sync_dist=True)
        self.val_metrics.reset()

    def on_test_epoch_end(self) -> None:
        # Straight to the logger, not through self.log_dict: a test's scalars are read from
        # test_result, and Lightning's epoch-end bookkeeping of 40 values costs 0.05-0.1 s a test,
        # a tenth of a frontier job's overhead (docs/benchmarks.md section 14).
        values = self.test_metrics.compute()
        self.test_result = self.result(values)
        if self.logger is not None:
            self.logger.log_metrics(self.scalars(self.test_result, self.test_split), step=self.global_step)
        if self.confusion_figures and not self.test_split.startswith("val"):  # validation's are selection data
            self.log_confusion_figure(values["confmat"], f"{self.test_split}/confusion_matrix")
        self.test_metrics.reset()

    @staticmethod
    def result(values: dict[str, torch.Tensor]) -> TestResult:
        """One split's metrics as a TestResult: accuracy, and the wrong and total count per digit."""
        confmat = values["confmat"]
        count = confmat.sum(dim=1)
        return TestResult(values["acc"].item(), tuple((count - confmat.diagonal()).tolist()), tuple(count.tolist()))

    def scalars(self, result: TestResult, split: str) -> dict[str, float]:
        """``result``'s scalars under ``split``: what a test logs, and what a job logs for a base
        result another job of its sweep measured (loralab.methods.base_result)."""
        out = {f"{split}/acc": result.acc}
        for d in range(NUM_CLASSES):
            out[f"{split}/err_d{d}"] = result.wrong[d] / result.count[d] if result.count[d] else 1.0  # torchmetrics' 0 accuracy
            out[f"{split}/wrong_d{d}"] = float(result.wrong[d])
        other = [d for d in range(NUM_CLASSES) if d not in self.target_digits]
        for group, digits in (("target", self.target_digits), ("other", other)):
            if digits:
                out[f"{split}/wrong_{group}"] = float(result.wrong_on(digits))
                out[f"{split}/err_{group}"] = result.wrong_on(digits) / max(1, sum(result.count[d] for d in digits))
        return out

    def log_confusion_figure(self, confmat: torch.Tensor, tag: str) -> None:
        experiment = getattr(self.logger, "experiment", None)
        if not hasattr(experiment, "add_figure"):
            return
        fig, _ = self.test_metrics["confmat"].plot(val=confmat, labels=[str(d) for d in range(NUM_CLASSES)])
        experiment.add_figure(tag, fig, global_step=self.global_step)  # closes the figure

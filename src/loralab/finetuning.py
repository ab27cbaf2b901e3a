"""LoRA fine-tuning as a Lightning callback: adapters on a frozen base, what the fine-tune changed
per digit against that base, and checkpoints that hold the adapter and name the base.

``LoRAFinetuning.attach`` is the one place a training run injects adapters, once, in the process
that runs the stage and before anything trains or tests. Under ddp_spawn the spawned ranks train
pickled copies of the attached module, and rank 0's weights come back into this process's module,
which carries the same adapters to take them. ``checkpoint_model`` rebuilds a checkpoint's model
through the same ``adapt``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import lightning as L
from torch import nn
from torchmetrics.classification import MulticlassConfusionMatrix

from loralab.config import QuantConfig
from loralab.errors import ArtifactError
from loralab.files import short
from loralab.inject import count_parameters, inject_lora, lora_disabled, lora_layers, mark_only_lora_trainable
from loralab.lora import is_lora_name
from loralab.model import MLP
from loralab.results import NUM_CLASSES
from loralab.spec import LoRASpec
from loralab.weights import hold_base


def adapt(model: nn.Module, spec: LoRASpec) -> nn.Module:
    """``model`` with ``spec``'s adapters injected and every base parameter frozen, biases
    included, as the reference notebook does: what a LoRA fine-tune trains, and what its checkpoints fill."""
    if lora_layers(model):
        raise ValueError("the model already carries adapters; a fine-tune adapts a plain base")
    inject_lora(model, spec)
    mark_only_lora_trainable(model)
    return model


def checkpoint_model(checkpoint: dict, base: str | Path | None = None) -> nn.Module:
    """The model a Classifier checkpoint's state fills: an MLP of its sizes, or, for a LoRA
    fine-tune's (which holds only the adapter), the base file it names, adapted as the fine-tune
    adapted it; Classifier.on_load_checkpoint then checks that base's fingerprint."""
    sizes = checkpoint["hyper_parameters"]["sizes"]
    if "lora" not in checkpoint:
        return MLP(sizes)
    base = Path(base or checkpoint["base"])
    if not base.exists():
        raise ArtifactError(f"the checkpoint adapts {short(base)}, which does not exist; "
                            "pass base=<pretrain run>/base.safetensors to load_from_checkpoint")
    model, _, _ = hold_base(base, sizes, QuantConfig(checkpoint.get("quant", "none")))
    return adapt(model, LoRASpec(**checkpoint["lora"]))


class LoRAFinetuning(L.Callback):
    """Trains ``spec``'s adapters on the frozen base at ``base_path`` (fingerprint ``base_sha256``).

    Logs the parameter counts when fitting starts and, at each validation, each digit's wrong
    count against the base's on the same images (``val/wrong_change_d<d>``), with the target
    digits' errors fixed (``val/target_gain``) and the other digits' errors caused
    (``val/forgetting``); the module logs the errors themselves (``val/err_target``, ...)."""

    def __init__(self, spec: LoRASpec, base_path: Path, base_sha256: str, quant: str = "none"):
        self.spec, self.base_path, self.base_sha256, self.quant = spec, Path(base_path).resolve(), base_sha256, quant
        self.base_wrong: list[int] | None = None  # the base's wrong count per digit on the validation set
        self.base_confmat: MulticlassConfusionMatrix | None = None

    def attach(self, module: L.LightningModule) -> None:
        adapt(module.model, self.spec)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not lora_layers(pl_module.model):
            raise RuntimeError("LoRAFinetuning.attach(module) comes before fit: unattached, the whole base would train")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.logger is not None:
            counts = count_parameters(pl_module.model)
            trainer.logger.log_metrics({f"params/{k}": float(v) for k, v in counts.items()}, step=0)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The base is frozen: its errors are measured once, on the first full validation's batches
        # (the ones validation really runs: trainer.limit_val_batches may keep fewer than val_base's).
        if self.base_wrong is None and not trainer.sanity_checking:
            self.base_confmat = MulticlassConfusionMatrix(NUM_CLASSES).to(pl_module.device)

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.base_confmat is not None:
            x, y = batch
            with lora_disabled(pl_module.model), trainer.precision_plugin.val_step_context():
                self.base_confmat.update(pl_module.model(x), y)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if self.base_confmat is not None:
            confmat = self.base_confmat.compute()  # summed over ranks, as the module's metrics are
            self.base_wrong = (confmat.sum(dim=1) - confmat.diagonal()).tolist()
            self.base_confmat = None
        if trainer.logger is None:
            return
        logged = trainer.callback_metrics
        change = [round(logged[f"val/wrong_d{d}"].item()) - self.base_wrong[d] for d in range(NUM_CLASSES)]
        target = pl_module.target_digits
        metrics = {f"val/wrong_change_d{d}": float(c) for d, c in enumerate(change)}
        metrics["val/target_gain"] = float(-sum(change[d] for d in target))
        metrics["val/forgetting"] = float(sum(c for d, c in enumerate(change) if d not in target))
        trainer.logger.log_metrics(metrics, step=trainer.global_step)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        """The adapter, and the base it adapts by path and fingerprint instead of another copy of
        it (kilobytes, not 11 MB)."""
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if is_lora_name(k)}
        checkpoint |= {"lora": dataclasses.asdict(self.spec), "base": str(self.base_path), "base_sha256": self.base_sha256, "quant": self.quant}

"""Distillation to the base on replayed images (finetune.distill): what it computes, and the runs."""

import shutil

import pytest
import torch
from torch import nn

from conftest import SLICE, run
from loralab import LoRASpec, inject_lora, lora_layers, mark_only_lora_trainable
from loralab.classifier import Classifier
from loralab.errors import ArtifactError
from loralab.model import MLP


def lora_classifier(distill=1.0) -> Classifier:
    torch.manual_seed(0)
    model = MLP([784, 32, 10])
    inject_lora(model, LoRASpec(rank=2, alpha=2, targets=["linear1", "linear2"]))
    mark_only_lora_trainable(model)
    return Classifier(model, target_digits=[9], distill=distill)


def test_distill_loss_is_zero_while_the_adapter_is_zero_and_grows_after():
    module = lora_classifier()
    x, y = torch.randn(16, 784), torch.tensor([9] * 8 + [0, 1, 2, 3, 4, 5, 6, 7])
    assert module.distill_loss(x, y, module(x)) == 0  # B = 0: the model is the base
    for layer in lora_layers(module.model).values():
        nn.init.normal_(layer.lora_B)
    loss = module.distill_loss(x, y, module(x))
    assert loss > 0
    loss.backward()
    grads = {n for n, p in module.model.named_parameters() if p.grad is not None}
    assert grads and all(n.rpartition(".")[2].startswith("lora_") for n in grads)
    assert all(layer.enabled for layer in lora_layers(module.model).values())  # the teacher pass left them on


def test_distill_ignores_target_digit_images():
    module = lora_classifier()
    for layer in lora_layers(module.model).values():
        nn.init.normal_(layer.lora_B)
    x = torch.randn(8, 784)
    assert module.distill_loss(x, torch.full((8,), 9), module(x)) == 0
    mixed = torch.tensor([9, 9, 9, 9, 1, 1, 1, 1])
    # Only the four other-digit rows count, averaged over those rows.
    alone = module.distill_loss(x[4:], mixed[4:], module(x[4:]))
    assert torch.allclose(module.distill_loss(x, mixed, module(x)), alone)


def test_lora_run_with_distillation_logs_it_and_checkpoints_only_the_adapter(pretrained, outputs):
    metrics, run_dir = run([*SLICE, "stage=finetune", "trainer.max_steps=10", "trainer.val_check_interval=5",
                            f"base={pretrained[1]}", "data.replay=0.3", "finetune.distill=1.0"], outputs, "distill-lora")
    assert metrics["config"]["finetune"]["distill"] == 1.0 and metrics["base_unchanged"]
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["base_sha256"] == pretrained[0]["base_sha256"]
    assert ckpt["state_dict"] and all(k.rpartition(".")[2].startswith("lora_") for k in ckpt["state_dict"])


def test_full_finetune_distils_to_a_frozen_copy_left_out_of_checkpoints(pretrained, outputs):
    metrics, run_dir = run([*SLICE, "stage=finetune", "trainer.max_steps=5", "trainer.val_check_interval=5", f"base={pretrained[1]}",
                            "finetune.method=full", "data.replay=0.3", "finetune.distill=1.0"], outputs, "distill-full")
    assert metrics["params"]["trainable"] == 2807010  # the frozen copy is neither counted nor trained
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert not any(k.startswith("frozen_base.") for k in ckpt["state_dict"])
    assert {f"model.linear{i}.weight" for i in (1, 2, 3)} <= set(ckpt["state_dict"])


def test_resume_onto_another_base_is_refused(pretrained, tmp_path):
    base_dir = tmp_path / "base"
    shutil.copytree(pretrained[1], base_dir)
    overrides = [*SLICE, "stage=finetune", "trainer.max_steps=4", "trainer.val_check_interval=2", f"base={base_dir}"]
    _, run_dir = run(overrides, tmp_path, "first")
    (run_dir / "metrics.json").unlink()  # as a kill before the end leaves it
    other, other_dir = run([*SLICE, "stage=pretrain", "trainer.max_epochs=1", "seed=1"], tmp_path, "other")
    assert other["base_sha256"] != pretrained[0]["base_sha256"]
    shutil.copy(other_dir / "base.safetensors", base_dir / "base.safetensors")  # same path, other weights
    with pytest.raises(ArtifactError, match="trained on a base with sha256"):
        run([*overrides, f"resume={run_dir}"], tmp_path, "resumed")

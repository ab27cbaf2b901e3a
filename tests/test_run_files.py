"""Checkpoints load the Lightning way, hparams.yaml holds the run's hyperparameters, and a run
with a scheduler logs its learning-rate curve."""

import lightning as L
import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import DATA_DIR, EXPENSIVE, SLICE, run, train_py
from loralab.adapter import load_adapter
from loralab.classifier import Classifier
from loralab.data import MNISTDataModule
from loralab.inject import lora_layers
from loralab.trainer import checkpoint_file, run_test
from loralab.weights import load_base


def result_of(module: Classifier, digits: list[int]) -> dict:
    datamodule = MNISTDataModule(str(DATA_DIR), digits)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    return run_test(trainer, module, datamodule).to_json()


def test_pretrain_checkpoint_alone_gives_the_runs_test_result(pretrained):
    metrics, run_dir = pretrained
    module = Classifier.load_from_checkpoint(checkpoint_file(run_dir), weights_only=True)
    assert module.hparams.sizes == metrics["model"]["sizes"] and not lora_layers(module.model)
    assert result_of(module, metrics["digits"]) == metrics["test"]


def test_lora_checkpoint_alone_gives_the_runs_test_result(finetuned):
    metrics, run_dir = finetuned
    ckpt = checkpoint_file(run_dir)
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert all("lora_" in k for k in saved["state_dict"])  # the adapter only, not another copy of the base
    assert saved["base"] == metrics["base"] and saved["base_sha256"] == metrics["base_sha256"]
    assert saved["lora"]["rank"] == metrics["lora"]["rank"]
    module = Classifier.load_from_checkpoint(ckpt, weights_only=True)
    assert result_of(module, metrics["digits"]) == metrics["test"]


@pytest.mark.parametrize("variant", ["dora", "pissa", "full"])
def test_variant_checkpoint_alone_gives_the_finished_runs_model(pretrained, outputs, variant):
    """The last checkpoint (at the last step) loads into the model the run finished with: its
    test result, and the outputs of the file the run saved (the base with its adapter loaded)."""
    metrics, run_dir = run([*SLICE, "stage=finetune", "trainer.max_steps=20", "trainer.val_check_interval=10",
                            f"base={pretrained[1]}", f"variant={variant}"], outputs, f"ckpt-{variant}")
    module = Classifier.load_from_checkpoint(checkpoint_file(run_dir), weights_only=True)
    assert result_of(module, metrics["digits"]) == metrics["test"] != metrics["test_base"]
    if variant == "full":
        finished, _ = load_base(run_dir / "model.safetensors", EXPENSIVE)
    else:
        finished, _ = load_base(pretrained[1] / "base.safetensors", EXPENSIVE)
        load_adapter(finished, run_dir)
    data = MNISTDataModule(str(DATA_DIR))
    data.setup()
    x = data.test_set.tensors[0][:1000]
    with torch.no_grad():
        torch.testing.assert_close(module(x), finished(x), rtol=1e-5, atol=1e-5)


def test_hparams_yaml_holds_the_runs_hyperparameters(pretrained, finetuned):
    for metrics, run_dir in (pretrained, finetuned):
        hparams = yaml.safe_load((run_dir / "hparams.yaml").read_text())
        assert hparams["stage"] == metrics["stage"] and hparams["seed"] == metrics["seed"]
        assert hparams["digits"] == " ".join(map(str, metrics["digits"]))
    assert yaml.safe_load((finetuned[1] / "hparams.yaml").read_text())["lora.rank"] == finetuned[0]["lora"]["rank"]


def test_scheduler_logs_learning_rate_curve(pretrained, finetuned):
    pretrain = EventAccumulator(str(pretrained[1])).Reload()
    lrs = [e.value for e in pretrain.Scalars("train/lr")]
    assert len(lrs) >= 2 and lrs[-1] < lrs[0]  # cosine decays
    assert "train/lr" not in EventAccumulator(str(finetuned[1])).Reload().Tags()["scalars"]  # optim.scheduler=none


def test_model_card_names_the_base_and_results(finetuned):
    metrics, run_dir = finetuned
    card = (run_dir / "README.md").read_text()
    assert metrics["artifacts"]["model_card"] == str(run_dir / "README.md")
    assert metrics["base_file_sha256"] in card and metrics["base_sha256"] in card
    assert f"digits {metrics['digits']}" in card and f"rank {metrics['lora']['rank']}" in card
    assert f"{100 * metrics['test_base']['acc']:.2f} % | {100 * metrics['test']['acc']:.2f} %" in card


def test_cli_run_logs_its_table_and_card_names_its_command(tmp_path, pretrained):
    """train.log holds the per-digit table the console shows (once); the card holds the command."""
    args = [*SLICE, "stage=finetune", "trainer.max_steps=5", "trainer.val_check_interval=5", f"base={pretrained[1]}", f"hydra.run.dir={tmp_path / 'run'}"]
    done = train_py(*args)
    assert done.returncode == 0, done.stderr
    table_line = "target digits [9]: wrong"
    assert done.stdout.count(table_line) == 1
    assert table_line in (tmp_path / "run" / "train.log").read_text()
    card = (tmp_path / "run" / "README.md").read_text()
    assert f"python train.py {' '.join(args[:-1])}\n" in card  # Hydra records overrides, not hydra.run.dir

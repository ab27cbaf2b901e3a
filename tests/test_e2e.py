"""The README's experiment on full MNIST with the default config (about a minute on 2 cores)."""

import pytest

from conftest import run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def full_pretrain(tmp_path_factory):
    return run(["trainer.enable_progress_bar=false"], tmp_path_factory.mktemp("e2e"), "pretrain")


def test_default_pretrain_reaches_98_percent(full_pretrain):
    metrics, run_dir = full_pretrain
    assert metrics["test"]["acc"] >= 0.98, metrics["test"]
    assert 10_000_000 < (run_dir / "base.safetensors").stat().st_size < 12_000_000


def test_seeds_protocol_fixes_digit_nine_with_a_kilobyte_adapter(full_pretrain):
    pre_metrics, pre_dir = full_pretrain
    metrics, run_dir = run(["stage=finetune", "trainer.enable_progress_bar=false", f"base={pre_dir}"], pre_dir.parent, "finetune")
    assert metrics["test_base"] == pre_metrics["test"]
    assert metrics["test"]["wrong"][9] < metrics["test_base"]["wrong"][9]
    assert metrics["params"]["lora"] == 6794 and metrics["base_unchanged"]
    size = (run_dir / "adapter_model.safetensors").stat().st_size
    assert 20_000 < size < 40_000  # ~27 KB against ~11 MB for the base

"""Several adapters on one base, switched by name, and merging into a plain model."""

import pytest
import torch

from conftest import ROOT, SLICE, run, script
from loralab import lora_layers
from loralab.adapter import AdapterSet
from loralab.model import MLP
from loralab.weights import load_base

SIZES = [784, 1000, 2000, 10]


@pytest.fixture(scope="module")
def two_adapters(pretrained, outputs):
    base_dir = pretrained[1]
    common = [*SLICE, "stage=finetune", "trainer.max_steps=10", f"base={base_dir}"]
    nine = run([*common, "digits=nine"], outputs, "ad-nine")
    weak = run([*common, "data.digits=[3,5,8]", "lora.rank=2", "lora.alpha=4"], outputs, "ad-358")
    return base_dir, nine, weak


def test_eval_switches_between_adapters(two_adapters, outputs):
    base_dir, (nine_m, nine_dir), (weak_m, weak_dir) = two_adapters
    metrics, _ = run([*SLICE, "stage=eval", f"base={base_dir}", f"eval.adapters=['{nine_dir}','{weak_dir}','{nine_dir}']"], outputs, "eval")
    assert metrics["test"] == nine_m["test_base"]  # the base alone first
    results = metrics["adapters"]
    assert results["ad-nine"]["test"] == nine_m["test"] and results["ad-358"]["test"] == weak_m["test"]
    assert results["ad-nine-2"]["test"] == nine_m["test"]  # switching back gives the same result
    assert metrics["seconds"]["adapter_switch"] < metrics["seconds"]["base_load"]


def test_merged_eval_matches_unmerged(two_adapters, outputs):
    base_dir, (nine_m, nine_dir), _ = two_adapters
    metrics, _ = run([*SLICE, "stage=eval", f"base={base_dir}", f"eval.adapters=['{nine_dir}']", "eval.merge=true"], outputs, "eval-merged")
    assert metrics["adapters"]["ad-nine"]["merged"] and metrics["adapters"]["ad-nine"]["test"] == nine_m["test"]


def test_adapter_set_switches_without_reloading(two_adapters):
    base_dir, (_, nine_dir), (_, weak_dir) = two_adapters
    model, _ = load_base(base_dir / "base.safetensors", SIZES)
    x = torch.randn(8, 784)
    base_out = model(x).detach()
    adapters = AdapterSet(model)
    adapters.add("nine", nine_dir)
    adapters.add("weak", weak_dir)
    weights_id = id(model.linear1.weight)
    adapters.use("nine")
    nine_out = model(x).detach()
    adapters.use("weak")
    assert {layer.rank for layer in lora_layers(model).values()} == {2}
    adapters.use("nine")
    assert torch.equal(model(x), nine_out)
    adapters.use(None)
    assert torch.equal(model(x), base_out)
    assert id(lora_layers(model)["linear1"].base_layer.weight) == weights_id  # the same base tensors throughout


def test_merge_script_writes_a_plain_model(two_adapters, tmp_path):
    base_dir, (nine_m, nine_dir), _ = two_adapters
    out = tmp_path / "merged.safetensors"
    cmd = [ROOT / "scripts" / "merge_adapter.py", base_dir, nine_dir, out]
    done = script(*cmd)
    assert done.returncode == 0, done.stderr
    merged, _ = load_base(out, SIZES)
    assert type(merged) is MLP and not lora_layers(merged)
    reference, _ = load_base(base_dir / "base.safetensors", SIZES)
    adapters = AdapterSet(reference)
    adapters.add("nine", nine_dir)
    adapters.use("nine")
    x = torch.randn(64, 784)
    assert torch.allclose(merged(x), reference(x), atol=1e-5)
    again = script(*cmd)
    assert again.returncode == 2 and "already exists" in again.stderr


def test_switching_a_merged_adapter_is_refused(two_adapters):
    from loralab import merge_lora, unmerge_lora

    base_dir, (_, nine_dir), _ = two_adapters
    model, _ = load_base(base_dir / "base.safetensors", SIZES)
    adapters = AdapterSet(model)
    adapters.add("a", nine_dir)
    adapters.add("b", nine_dir)
    adapters.use("a")
    merge_lora(model)
    with pytest.raises(RuntimeError, match="unmerge"):
        adapters.use("b")
    unmerge_lora(model)
    adapters.use("b")

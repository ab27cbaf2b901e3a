"""Several adapters on one base, switched by name, and merging into a plain model."""

import pytest
import torch

from conftest import ROOT, SLICE, run, script
from loralab import load_adapter, lora_layers, merge_lora, unmerge_lora
from loralab.adapter import AdapterSet
from loralab.model import MLP
from loralab.weights import load_base

SIZES = [784, 1000, 2000, 10]
X = torch.randn(64, 784, generator=torch.Generator().manual_seed(0))
# Fine-tunes whose files carry each variant's own form: DoRA's magnitudes (and its dropout in the
# config), PiSSA converted to plain LoRA of twice the rank, and both together.
VARIANT_RUNS = {
    "dora": ["variant=dora", "lora.rank=2", "lora.alpha=4", "lora.dropout=0.1"],
    "pissa": ["variant=pissa", "lora.rank=2", "lora.alpha=4"],
    "dora+pissa": ["variant=dora", "lora.init=pissa", "lora.rank=2", "lora.alpha=4", "lora.rslora=true"],
}


def finetune_overrides(base_dir) -> list[str]:
    return [*SLICE, "stage=finetune", "trainer.max_steps=10", f"base={base_dir}"]


@pytest.fixture(scope="module")
def two_adapters(pretrained, outputs):
    base_dir = pretrained[1]
    nine = run([*finetune_overrides(base_dir), "digits=nine"], outputs, "ad-nine")
    weak = run([*finetune_overrides(base_dir), "data.digits=[3,5,8]", "lora.rank=2", "lora.alpha=4"], outputs, "ad-358")
    return base_dir, nine, weak


@pytest.fixture(scope="module")
def same_layout(two_adapters, outputs):
    """An adapter of the nine one's layout (targets, rank, alpha, ...) trained on other digits."""
    return run([*finetune_overrides(two_adapters[0]), "data.digits=[3,5,8]"], outputs, "ad-358-r1")


@pytest.fixture(scope="module")
def variant_adapters(pretrained, outputs) -> dict:
    return {name: run([*finetune_overrides(pretrained[1]), *overrides], outputs, f"ad-{name}") for name, overrides in VARIANT_RUNS.items()}


@torch.no_grad()
def alone(base_dir, adapter_dir) -> torch.Tensor:
    """Logits of the base with only this adapter loaded, as load_adapter injects it."""
    model, _ = load_base(base_dir / "base.safetensors", SIZES)
    load_adapter(model, adapter_dir)
    return model.eval()(X)


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


@pytest.mark.parametrize("variant", ["lora", *VARIANT_RUNS])
def test_merge_script_writes_a_plain_model(two_adapters, variant_adapters, variant, tmp_path):
    base_dir, (_, nine_dir), _ = two_adapters
    adapter_dir = nine_dir if variant == "lora" else variant_adapters[variant][1]
    out = tmp_path / "merged.safetensors"
    cmd = [ROOT / "scripts" / "merge_adapter.py", base_dir, adapter_dir, out]
    done = script(*cmd)
    assert done.returncode == 0, done.stderr
    merged, _ = load_base(out, SIZES)
    assert type(merged) is MLP and not lora_layers(merged)
    reference, _ = load_base(base_dir / "base.safetensors", SIZES)
    adapters = AdapterSet(reference)
    adapters.add(variant, adapter_dir)
    adapters.use(variant)
    reference.eval()  # the layers use just wrapped start in training mode: the DoRA file's dropout off
    with torch.no_grad():
        assert torch.allclose(merged(X), reference(X), atol=1e-5)
        adapters.use(None)
        assert not torch.allclose(merged(X), reference(X), atol=1e-3)  # the merge really changed the weights
    again = script(*cmd)
    assert again.returncode == 2 and "already exists" in again.stderr


def test_adapter_set_switches_in_place_between_adapters_of_one_layout(two_adapters, same_layout):
    """Two adapters of one layout switch by copying tensors into the same wrapped layers (the
    fast path), and each gives exactly its logits when loaded alone, back and forth."""
    base_dir, (_, nine_dir), _ = two_adapters
    other_dir = same_layout[1]
    expected = {"nine": alone(base_dir, nine_dir), "other": alone(base_dir, other_dir)}
    assert not torch.allclose(expected["nine"], expected["other"], atol=1e-3)  # different trained values
    model, _ = load_base(base_dir / "base.safetensors", SIZES)
    adapters = AdapterSet(model)
    adapters.add("nine", nine_dir)
    adapters.add("other", other_dir)
    adapters.use("nine")
    wrapped = lora_layers(model)
    with torch.no_grad():
        for name in ("nine", "other", "nine", "other"):
            adapters.use(name)
            assert torch.equal(model(X), expected[name]), name
            assert all(layer is wrapped[key] for key, layer in lora_layers(model).items())  # not re-wrapped


def test_adapter_set_takes_dora_and_pissa_files(two_adapters, variant_adapters):
    """Each variant's file switched in by name gives the logits it gives loaded alone, merged
    and unmerged, and switching back to plain LoRA and off gives theirs."""
    base_dir, (_, nine_dir), _ = two_adapters
    model, _ = load_base(base_dir / "base.safetensors", SIZES)
    with torch.no_grad():
        base_out = model(X)
    adapters = AdapterSet(model)
    adapters.add("nine", nine_dir)
    for name, (_, directory) in variant_adapters.items():
        adapters.add(name, directory)
    expected = {name: alone(base_dir, source) for name, (_, _, source) in adapters.adapters.items()}
    with torch.no_grad():
        for name in [*variant_adapters, "nine", *reversed(variant_adapters)]:
            adapters.use(name)
            model.eval()  # layers wrapped anew start in training mode: the DoRA file's dropout off
            assert torch.equal(model(X), expected[name]), name
        adapters.use(None)
        assert torch.equal(model(X), base_out)
        for name in variant_adapters:  # last: unmerging restores W to rounding, not bit for bit
            adapters.use(name)
            model.eval()
            merge_lora(model)
            assert torch.allclose(model(X), expected[name], atol=1e-5), name
            unmerge_lora(model)


def test_eval_takes_dora_and_pissa_adapters(pretrained, variant_adapters, outputs):
    dirs = ",".join(f"'{directory}'" for _, directory in variant_adapters.values())
    for merge in ("false", "true"):
        metrics, _ = run([*SLICE, "stage=eval", f"base={pretrained[1]}", f"eval.adapters=[{dirs}]", f"eval.merge={merge}"], outputs, f"eval-variants-{merge}")
        for name, (finetuned, _) in variant_adapters.items():
            result = metrics["adapters"][f"ad-{name}"]
            assert result["merged"] == (merge == "true") and result["test"] == finetuned["test"], name


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

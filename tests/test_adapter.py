"""Adapter files: PEFT's layout, refusal of foreign shapes and damaged configs."""

import json
import logging

import pytest
import torch
from safetensors import safe_open

from loralab import LoRASpec, inject_lora
from loralab.adapter import load_adapter, save_adapter
from loralab.errors import ArtifactError
from loralab.model import MLP

SIZES = [784, 32, 16, 10]


def adapted(sizes=SIZES, rank=2, seed=0) -> MLP:
    torch.manual_seed(seed)
    model = MLP(sizes)
    inject_lora(model, LoRASpec(rank=rank, alpha=4, targets=["linear1", "linear2", "linear3"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_()
    return model


def base_copy(model: MLP, sizes=SIZES) -> MLP:
    fresh = MLP(sizes)
    fresh.load_state_dict({k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k})
    return fresh


def test_files_follow_peft_layout(tmp_path):
    model = adapted()
    save_adapter(model, tmp_path, SIZES)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2 and config["lora_alpha"] == 4.0
    assert config["target_modules"] == ["linear1", "linear2", "linear3"]
    assert {"lora_dropout", "bias", "use_rslora", "init_lora_weights", "fan_in_fan_out"} <= set(config)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        assert f.get_slice("base_model.model.linear1.lora_A.weight").get_shape() == [2, 784]
        assert f.get_slice("base_model.model.linear1.lora_B.weight").get_shape() == [32, 2]
        assert len(list(f.keys())) == 6
        assert json.loads(f.metadata()["model"])["sizes"] == SIZES and len(f.metadata()["base_sha256"]) == 64


def test_round_trip_is_bit_identical(tmp_path):
    model = adapted()
    save_adapter(model, tmp_path, SIZES)
    loaded = base_copy(model)
    load_adapter(loaded, tmp_path)
    x = torch.randn(32, 784)
    assert torch.equal(loaded(x), model(x))


def test_adapter_for_another_shape_is_refused(tmp_path):
    save_adapter(adapted(sizes=[784, 64, 16, 10]), tmp_path, [784, 64, 16, 10])
    with pytest.raises(ArtifactError, match="does not fit the base"):
        load_adapter(MLP(SIZES), tmp_path)


def test_other_base_only_warns(tmp_path, caplog):
    model = adapted()
    save_adapter(model, tmp_path, SIZES)
    with caplog.at_level(logging.WARNING):
        load_adapter(MLP(SIZES), tmp_path)  # same shapes, other weights
    assert "trained on another base" in caplog.text


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: p.write_text("{ not json"), "not valid JSON"),
        (lambda p: p.write_text(json.dumps({"peft_type": "IA3", "r": 1})), "peft_type 'IA3'"),
        (lambda p: p.write_text(json.dumps({"peft_type": "LORA"})), "lacks 'r'"),
        (lambda p: p.unlink(), "no adapter_config.json"),
        (lambda p: p.write_text(json.dumps(json.loads(p.read_text()) | {"r": 0})), r"cannot be used: its r=0 is invalid"),
        (lambda p: p.write_text(json.dumps(json.loads(p.read_text()) | {"lora_dropout": 1.5})), r"cannot be used: its lora_dropout=1.5 is invalid"),
    ],
)
def test_damaged_config_is_one_clear_error(tmp_path, damage, message):
    save_adapter(adapted(), tmp_path, SIZES)
    damage(tmp_path / "adapter_config.json")
    with pytest.raises(ArtifactError, match=message):
        load_adapter(MLP(SIZES), tmp_path)


def test_truncated_weights_are_refused(tmp_path):
    save_adapter(adapted(), tmp_path, SIZES)
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:300])
    with pytest.raises(ArtifactError, match="not a readable safetensors adapter"):
        load_adapter(MLP(SIZES), tmp_path)


def test_no_temporary_files_are_left(tmp_path):
    save_adapter(adapted(), tmp_path, SIZES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_adapter_set_refuses_an_unfit_adapter_when_added(tmp_path):
    """stage=eval reads every adapter before testing anything: a misfit fails there, not later."""
    from loralab import AdapterSet

    save_adapter(adapted(sizes=[784, 64, 16, 10]), tmp_path, [784, 64, 16, 10])
    model = MLP(SIZES)
    with pytest.raises(ArtifactError, match="linear1.lora_B has shape \\(64, 2\\), the model needs \\(32, 2\\)"):
        AdapterSet(model).add("other", tmp_path)
    assert not any("lora_" in n for n, _ in model.named_parameters())  # the model is untouched

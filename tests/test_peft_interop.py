"""Adapters cross between loralab and Hugging Face PEFT in both directions with the same logits."""

import dataclasses
import json

import pytest
import torch
from packaging.version import Version
from safetensors import safe_open

from loralab import LoRASpec, inject_lora
from loralab.adapter import load_adapter, save_adapter
from loralab.model import MLP
from loralab.spec import PEFT_VERSION

peft = pytest.importorskip("peft")  # a dev dependency: installed by `make test`

SIZES = [784, 64, 32, 10]


def base_model(seed=0) -> MLP:
    torch.manual_seed(seed)
    return MLP(SIZES)


def test_loralab_adapter_loads_in_peft(tmp_path):
    ours = base_model()
    inject_lora(ours, LoRASpec(rank=2, alpha=4, init="kaiming", targets=["linear1", "linear2", "linear3"]))
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith("lora_B"):
                p.normal_()
    save_adapter(ours, tmp_path, SIZES)
    theirs = peft.PeftModel.from_pretrained(base_model(), str(tmp_path))
    x = torch.randn(16, 784)
    assert torch.allclose(theirs(x), ours(x), atol=1e-5)


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_adapter_loads_in_loralab(tmp_path, rslora):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["linear1", "linear3"], init_lora_weights=False, use_rslora=rslora)
    theirs = peft.get_peft_model(base_model(), config)
    theirs.save_pretrained(str(tmp_path))
    ours = base_model()
    load_adapter(ours, tmp_path)
    x = torch.randn(16, 784)
    assert torch.allclose(ours(x), theirs(x), atol=1e-5)
    assert not torch.allclose(ours(x), base_model()(x), atol=1e-3)  # the adapter is really applied


@pytest.mark.parametrize("init, rank", [("gaussian", 1), ("kaiming", 4), ("gaussian", 4)])
def test_peft_config_describes_our_init(tmp_path, init, rank):
    """PEFT reads adapter_config.json's init_lora_weights with its own meaning: where PEFT has our
    init, a LoraConfig built from the file draws A as we did (B = 0 in all of them); where it has
    none (our N(0, 1) at rank > 1, PEFT's gaussian being N(0, 1/r²)), the file says True and the
    weights' metadata says what we used."""
    ours = base_model()
    inject_lora(ours, LoRASpec(rank=rank, alpha=1, init=init))
    save_adapter(ours, tmp_path, SIZES)
    config = peft.LoraConfig.from_pretrained(str(tmp_path))
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata()["loralab_init"] == init
    theirs = peft.get_peft_model(base_model(), config).base_model.model
    a_ours, a_theirs = ours.linear1.lora_A, theirs.linear1.lora_A["default"].weight  # rank x 784 draws each
    assert not theirs.linear1.lora_B["default"].weight.any()
    same = 0.85 < (a_theirs.std() / a_ours.std()).item() < 1.15
    assert same == (init == "kaiming" or rank == 1)
    assert config.init_lora_weights == ("gaussian" if (init, rank) == ("gaussian", 1) else True)


@pytest.mark.parametrize("settings", [
    {"rank": 1, "alpha": 1},
    {"rank": 4, "alpha": 8, "init": "kaiming", "targets": "linear[13]"},
    {"rank": 2, "alpha": 4, "dora": True, "rslora": True, "dropout": 0.1},
    {"rank": 2, "alpha": 4, "init": "pissa", "rslora": True},
], ids=["seeds", "regex", "dora+rslora+dropout", "pissa+rslora"])
def test_adapter_config_is_peft_loraconfig_as_peft_writes_it(tmp_path, settings):
    """Every key of adapter_config.json is a field of the installed PEFT's LoraConfig, PEFT reads
    back each value as written, and PEFT saving a model of that config writes the same values;
    the installed PEFT is PEFT_VERSION's release (major.minor) or later."""
    ours = base_model()
    inject_lora(ours, LoRASpec(**settings))
    save_adapter(ours, tmp_path / "ours", SIZES)
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert written.keys() <= {f.name for f in dataclasses.fields(peft.LoraConfig)}
    config = peft.LoraConfig.from_pretrained(str(tmp_path / "ours"))

    def comparable(key, value):  # PEFT holds a list of target names as a set
        return set(value) if key == "target_modules" and not isinstance(value, str) else value

    assert {k: comparable(k, getattr(config, k)) for k in written} == {k: comparable(k, v) for k, v in written.items()}
    peft.get_peft_model(base_model(), config).save_pretrained(str(tmp_path / "theirs"))
    theirs = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    assert {k: comparable(k, theirs[k]) for k in written if k != "peft_version"} == {k: comparable(k, v) for k, v in written.items() if k != "peft_version"}
    assert Version(peft.__version__).release[:2] >= Version(PEFT_VERSION).release[:2] == Version(written["peft_version"]).release[:2]


PATTERNS = {"rank": 4, "alpha": 8, "init": "kaiming", "rank_pattern": {"linear3": 2, "linear[12]": 6}, "alpha_pattern": {"linear2": 3}}


@pytest.mark.parametrize("settings", [PATTERNS, PATTERNS | {"rslora": True}, PATTERNS | {"dora": True}],
                         ids=["patterns", "patterns+rslora", "patterns+dora"])
def test_rank_and_alpha_patterns_cross_with_peft(tmp_path, settings):
    """Per-layer ranks and alphas: each layer has the rank PEFT gives it, and a file crosses in
    both directions with the same logits."""
    ours = base_model()
    inject_lora(ours, LoRASpec(**settings))
    assert [ours.linear1.rank, ours.linear2.rank, ours.linear3.rank] == [6, 6, 2]
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith("lora_B"):
                p.normal_()
    save_adapter(ours, tmp_path / "ours", SIZES)
    theirs = peft.PeftModel.from_pretrained(base_model(), str(tmp_path / "ours"))
    layers = theirs.base_model.model
    assert [layers.linear1.r["default"], layers.linear2.r["default"], layers.linear3.r["default"]] == [6, 6, 2]
    assert layers.linear2.scaling["default"] == pytest.approx(ours.linear2.scale)
    x = torch.randn(16, 784)
    assert torch.allclose(theirs(x), ours(x), atol=1e-5)
    theirs.save_pretrained(str(tmp_path / "theirs"))
    back = base_model()
    load_adapter(back, tmp_path / "theirs")
    assert back.linear2.alpha == 3 and back.linear3.rank == 2
    assert torch.allclose(back(x), theirs(x), atol=1e-5)


def test_peft_pissa_with_rank_pattern_matches_ours_converted(tmp_path):
    """PiSSA with a rank pattern, saved converted to plain LoRA: PEFT's conversion doubles each
    pattern's rank as ours does, and both files give the same function."""
    spec = {"rank": 4, "alpha": 4, "rank_pattern": {"linear3": 2}}
    ours = base_model()
    inject_lora(ours, LoRASpec(**spec, init="pissa"))
    save_adapter(ours, tmp_path / "ours", SIZES)
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert (written["r"], written["lora_alpha"], written["rank_pattern"]) == (8, 8.0, {"linear3": 4})
    theirs = peft.get_peft_model(base_model(), peft.LoraConfig(r=4, lora_alpha=4, rank_pattern={"linear3": 2}, init_lora_weights="pissa",
                                                            target_modules=["linear1", "linear2", "linear3"]))
    assert theirs.base_model.model.linear3.r["default"] == 2
    with torch.no_grad():  # trained: B moves off B0, so the file's scale and doubled ranks matter
        for name, p in ours.named_parameters():
            if name.endswith("lora_B"):
                p.add_(0.05 * torch.randn_like(p))
    save_adapter(ours, tmp_path / "trained", SIZES)
    loaded = peft.PeftModel.from_pretrained(base_model(), str(tmp_path / "trained"))
    x = torch.randn(16, 784)
    assert not torch.allclose(ours(x), base_model()(x), atol=1e-3)
    assert torch.allclose(loaded(x), ours(x), atol=1e-4)
    assert loaded.base_model.model.linear3.r["default"] == 4 and loaded.base_model.model.linear1.r["default"] == 8

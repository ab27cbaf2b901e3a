"""Invariants every LoRA variant keeps (plain, DoRA, PiSSA, rsLoRA, and their combinations), and
PEFT's own implementation as the reference for their exact semantics."""

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import ALL_LAYERS, SMALL, as_if_trained
from loralab import MLP, LoRASpec, inject_lora, is_lora_name, load_adapter, lora_disabled, lora_layers, merge_lora, save_adapter, unmerge_lora
from loralab.classifier import Classifier

peft = pytest.importorskip("peft")  # a dev dependency: installed by `make test`

VARIANTS = {
    "plain": {},
    "rslora": {"rslora": True},
    "dora": {"dora": True},
    "pissa": {"init": "pissa"},
    "pissa+rslora": {"init": "pissa", "rslora": True},
    "dora+pissa": {"dora": True, "init": "pissa"},
    "dora+rslora+dropout": {"dora": True, "rslora": True, "dropout": 0.1},
}
X = torch.randn(16, 784, generator=torch.Generator().manual_seed(42))


def base_model(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP(SMALL)


def adapted(variant: str, rank: int = 2, alpha: float = 4.0, trained: bool = True) -> MLP:
    model = base_model()
    inject_lora(model, LoRASpec(rank=rank, alpha=alpha, targets=ALL_LAYERS, **VARIANTS[variant]))
    model.eval()
    return as_if_trained(model) if trained else model


@pytest.mark.parametrize("variant", VARIANTS)
def test_step_zero_equals_the_base_exactly(variant):
    assert torch.equal(adapted(variant, trained=False)(X), base_model()(X))


@pytest.mark.parametrize("variant", VARIANTS)
def test_adapters_off_give_the_base_exactly(variant):
    model = adapted(variant)
    assert not torch.allclose(model(X), base_model()(X), atol=1e-3)  # the adapter really acts
    with lora_disabled(model):
        assert torch.equal(model(X), base_model()(X))


@pytest.mark.parametrize("variant", VARIANTS)
def test_merge_equals_unmerged_and_unmerge_restores_the_weights(variant):
    model = adapted(variant)
    weights = {n: layer.base_layer.weight.clone() for n, layer in lora_layers(model).items()}
    unmerged = model(X)
    merge_lora(model)
    merge_lora(model)  # safe to repeat
    assert torch.allclose(model(X), unmerged, atol=1e-5)
    unmerge_lora(model)
    unmerge_lora(model)
    for name, layer in lora_layers(model).items():
        assert torch.allclose(layer.base_layer.weight, weights[name], atol=1e-6)
    assert torch.allclose(model(X), unmerged, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_saved_adapter_reloads_to_the_same_model(variant, tmp_path):
    model = adapted(variant)
    save_adapter(model, tmp_path, SMALL)
    fresh = base_model()
    load_adapter(fresh, tmp_path)
    assert torch.allclose(fresh.eval()(X), model(X), atol=1e-5)


@pytest.mark.parametrize("variant", [v for v in VARIANTS if "dropout" not in v])
def test_loralab_files_load_in_peft_with_the_same_logits(variant, tmp_path):
    model = adapted(variant)
    save_adapter(model, tmp_path, SMALL)
    theirs = peft.PeftModel.from_pretrained(base_model(), str(tmp_path)).eval()
    with torch.no_grad():
        assert torch.allclose(theirs(X), model(X), atol=1e-5)


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_dora_files_load_here_with_the_same_logits(tmp_path, rslora):
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=list(ALL_LAYERS), use_dora=True, use_rslora=rslora)
    theirs = as_if_trained(peft.get_peft_model(base_model(), config)).eval()
    theirs.save_pretrained(str(tmp_path))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_dora"] is True
    ours = base_model()
    load_adapter(ours, tmp_path)
    assert {layer.spec.dora for layer in lora_layers(ours).values()} == {True}
    with torch.no_grad():
        assert torch.allclose(ours(X), theirs(X), atol=1e-5)


def test_dora_gradients_match_peft():
    """The norm is detached (DoRA paper, section 4.3) and the bias is not rescaled, as in PEFT."""
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=list(ALL_LAYERS), use_dora=True)
    theirs = as_if_trained(peft.get_peft_model(base_model(), config))
    ours = adapted("dora", trained=False)
    with torch.no_grad():
        for name, layer in lora_layers(ours).items():
            peft_layer = theirs.base_model.model.get_submodule(name)
            layer.lora_A.copy_(peft_layer.lora_A["default"].weight)
            layer.lora_B.copy_(peft_layer.lora_B["default"].weight)
            layer.lora_magnitude_vector.copy_(peft_layer.lora_magnitude_vector["default"].weight)
    y = torch.randint(0, 10, (16,))
    F.cross_entropy(ours(X), y).backward()
    F.cross_entropy(theirs(X), y).backward()
    for name, layer in lora_layers(ours).items():
        peft_layer = theirs.base_model.model.get_submodule(name)
        assert torch.allclose(layer.lora_A.grad, peft_layer.lora_A["default"].weight.grad, atol=1e-6)
        assert torch.allclose(layer.lora_B.grad, peft_layer.lora_B["default"].weight.grad, atol=1e-6)
        assert torch.allclose(layer.lora_magnitude_vector.grad, peft_layer.lora_magnitude_vector["default"].weight.grad, atol=1e-6)


def test_dora_magnitude_starts_at_the_row_norms():
    model = adapted("dora", trained=False)
    for layer in lora_layers(model).values():
        assert torch.equal(layer.lora_magnitude_vector, torch.linalg.norm(layer.base_layer.weight, dim=1))


def test_pissa_starts_on_the_principal_part_as_peft_does():
    theirs = peft.get_peft_model(base_model(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=list(ALL_LAYERS), init_lora_weights="pissa"))
    ours = adapted("pissa", trained=False)
    for name, layer in lora_layers(ours).items():
        peft_layer = theirs.base_model.model.get_submodule(name)
        principal = peft_layer.scaling["default"] * peft_layer.lora_B["default"].weight @ peft_layer.lora_A["default"].weight
        assert torch.allclose(layer.scale * layer.lora_B0 @ layer.lora_A0, principal, atol=1e-5)
        assert torch.equal(layer.lora_A, layer.lora_A0) and torch.equal(layer.lora_B, layer.lora_B0)
        assert torch.equal(layer.base_layer.weight, base_model().get_submodule(name).weight)  # W is never rewritten


@pytest.mark.parametrize("variant, saved_alpha", [("pissa", 8.0), ("pissa+rslora", 4 * 2**0.5)])
def test_pissa_is_saved_as_plain_lora_of_twice_the_rank(tmp_path, variant, saved_alpha):
    model = adapted(variant, rank=2, alpha=4)
    save_adapter(model, tmp_path, SMALL)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == pytest.approx(saved_alpha)
    assert config["init_lora_weights"] is True  # what PEFT's own conversion writes
    converted = peft.LoraConfig.from_pretrained(str(tmp_path))
    assert converted.r == 4
    fresh = base_model()
    load_adapter(fresh, tmp_path)
    assert torch.allclose(fresh.eval()(X), model(X), atol=1e-5)


def test_pissa_saved_above_a_layers_rank_loads_everywhere(tmp_path):
    """Rank 8 on linear3 (10 outputs) saves as rank 16: loralab and PEFT both load it."""
    model = adapted("pissa", rank=8, alpha=8)
    save_adapter(model, tmp_path, SMALL)
    fresh = base_model()
    load_adapter(fresh, tmp_path)
    assert torch.allclose(fresh.eval()(X), model(X), atol=1e-5)
    theirs = peft.PeftModel.from_pretrained(base_model(), str(tmp_path)).eval()
    with torch.no_grad():
        assert torch.allclose(theirs(X), model(X), atol=1e-5)


@pytest.mark.parametrize("field, value, message", [
    ("alpha_pattern", {"linear1": 64}, "alpha_pattern"),
    ("init_lora_weights", "olora", "rewritten base"),
    ("bias", "all", "bias"),
])
def test_peft_adapters_loralab_cannot_represent_are_refused(tmp_path, field, value, message):
    model = adapted("plain")
    save_adapter(model, tmp_path, SMALL)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(config | {field: value}))
    from loralab.errors import ArtifactError

    with pytest.raises(ArtifactError, match=message):
        load_adapter(base_model(), tmp_path)


def test_pissa_cannot_start_from_an_unconverted_peft_file(tmp_path):
    theirs = peft.get_peft_model(base_model(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=list(ALL_LAYERS), init_lora_weights="pissa"))
    theirs.save_pretrained(str(tmp_path))
    from loralab.errors import ArtifactError

    with pytest.raises(ArtifactError, match="PiSSA adapter saved without conversion"):
        load_adapter(base_model(), tmp_path)


@pytest.mark.parametrize("variant", ["plain", "dora"])
def test_loraplus_learning_rates_follow_peft(variant):
    """B matrices and 1-D adapter tensors (DoRA's magnitudes) get lr x ratio, A matrices lr."""
    from peft.optimizers import create_loraplus_optimizer

    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=list(ALL_LAYERS), use_dora=variant == "dora")
    theirs = peft.get_peft_model(base_model(), config)
    reference = create_loraplus_optimizer(theirs, torch.optim.Adam, lr=1e-3, loraplus_lr_ratio=16)
    names = {id(p): n.replace(".default", "").replace(".weight", "").removeprefix("base_model.model.") for n, p in theirs.named_parameters()}
    expected = {names[id(p)]: group["lr"] for group in reference.param_groups for p in group["params"]}
    model = adapted(variant, trained=False)
    for name, param in model.named_parameters():
        param.requires_grad = is_lora_name(name)
    module = Classifier(model, lr=1e-3, loraplus_ratio=16)
    ours = {id(p): n.removeprefix("model.") for n, p in module.named_parameters()}
    got = {ours[id(p)]: group["lr"] for group in module.configure_optimizers().param_groups for p in group["params"]}
    assert got == pytest.approx(expected)
    assert all(lr == pytest.approx(16e-3) for n, lr in got.items() if n.endswith("lora_B"))

"""Invariants every LoRA variant keeps (plain, DoRA, PiSSA, rsLoRA, and their combinations), and
PEFT's own implementation as the reference for their exact semantics."""

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import ALL_LAYERS, SMALL, as_if_trained
from loralab import (
    MLP,
    LoRASpec,
    inject_lora,
    is_lora_name,
    load_adapter,
    lora_disabled,
    lora_layers,
    mark_only_lora_trainable,
    merge_lora,
    save_adapter,
    unmerge_lora,
)
from loralab.classifier import Classifier
from loralab.variants import SVDS, SVDS_KEPT, singular_triplets

peft = pytest.importorskip("peft")  # a dev dependency: installed by `make test`

VARIANTS = {
    "plain": {},
    "rslora": {"rslora": True},
    "dora": {"dora": True},
    "pissa": {"init": "pissa"},
    "pissa+rslora": {"init": "pissa", "rslora": True},
    "dora+pissa": {"dora": True, "init": "pissa"},
    "dora+rslora+dropout": {"dora": True, "rslora": True, "dropout": 0.1},
    "pissa+dropout": {"init": "pissa", "dropout": 0.2},
    "dora+pissa+dropout": {"dora": True, "init": "pissa", "dropout": 0.2},
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


def seeded(model, seed: int = 7) -> torch.Tensor:
    """The model's logits on X with the global generator seeded first: two models that draw their
    dropout masks in the same order (one per layer, same shapes) draw the same ones."""
    torch.manual_seed(seed)
    return model(X)


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_loralab_files_load_in_peft_with_the_same_logits(variant, mode, tmp_path):
    model = adapted(variant)
    save_adapter(model, tmp_path, SMALL)
    theirs = peft.PeftModel.from_pretrained(base_model(), str(tmp_path))
    model.train(mode == "train")
    theirs.train(mode == "train")
    with torch.no_grad():
        assert torch.allclose(seeded(theirs), seeded(model), atol=1e-5)
        if "dropout" in variant and mode == "train":
            assert not torch.allclose(seeded(model), seeded(model, seed=8), atol=1e-3)  # the dropout really acts


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


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_dora_outputs_and_gradients_match_peft_in_training(dropout):
    """The norm is detached (DoRA paper, section 4.3) and the bias is not rescaled, as in PEFT;
    with dropout, PEFT's DoRA feeds the dropped input to both W x and B A x
    (DoraLinearVariant.forward and DoraLinearLayer.forward in peft/tuners/lora), and so do we."""
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=list(ALL_LAYERS), use_dora=True, lora_dropout=dropout)
    theirs = as_if_trained(peft.get_peft_model(base_model(), config)).train()
    ours = base_model()
    inject_lora(ours, LoRASpec(rank=2, alpha=4, targets=ALL_LAYERS, dora=True, dropout=dropout))
    with torch.no_grad():
        for name, layer in lora_layers(ours).items():
            peft_layer = theirs.base_model.model.get_submodule(name)
            layer.lora_A.copy_(peft_layer.lora_A["default"].weight)
            layer.lora_B.copy_(peft_layer.lora_B["default"].weight)
            layer.lora_magnitude_vector.copy_(peft_layer.lora_magnitude_vector["default"].weight)
    y = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(0))
    logits = seeded(ours)
    assert torch.allclose(logits, seeded(theirs), atol=1e-5)
    if dropout:
        assert not torch.allclose(logits, seeded(ours, seed=8), atol=1e-3)  # the dropout really acts
    F.cross_entropy(seeded(ours), y).backward()
    F.cross_entropy(seeded(theirs), y).backward()
    for name, layer in lora_layers(ours).items():
        peft_layer = theirs.base_model.model.get_submodule(name)
        assert torch.allclose(layer.lora_A.grad, peft_layer.lora_A["default"].weight.grad, atol=1e-6)
        assert torch.allclose(layer.lora_B.grad, peft_layer.lora_B["default"].weight.grad, atol=1e-6)
        assert torch.allclose(layer.lora_magnitude_vector.grad, peft_layer.lora_magnitude_vector["default"].weight.grad, atol=1e-6)


def test_dora_magnitude_starts_at_the_row_norms():
    model = adapted("dora", trained=False)
    for layer in lora_layers(model).values():
        assert torch.equal(layer.lora_magnitude_vector, torch.linalg.norm(layer.base_layer.weight, dim=1))


@pytest.mark.parametrize("variant", ["pissa", "pissa+rslora"])
def test_pissa_starts_on_the_principal_part_as_peft_does(variant):
    """A0 and B0 are PEFT's own pissa_init factors of the same W (sqrt(S / s) on each side, not
    only their product), s B0 A0 is W's best rank-r approximation (Eckart-Young: what is left
    holds exactly the other singular values), and PEFT's residual base is W minus it."""
    rslora = variant == "pissa+rslora"
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=list(ALL_LAYERS), init_lora_weights="pissa", use_rslora=rslora)
    theirs = peft.get_peft_model(base_model(), config)
    ours = adapted(variant, trained=False)
    for name, layer in lora_layers(ours).items():
        peft_layer = theirs.base_model.model.get_submodule(name)
        weight = base_model().get_submodule(name).weight.detach()
        assert torch.allclose(layer.lora_A0, peft_layer.lora_A["default"].weight, atol=1e-6)
        assert torch.allclose(layer.lora_B0, peft_layer.lora_B["default"].weight, atol=1e-6)
        principal = layer.scale * layer.lora_B0 @ layer.lora_A0
        singular = torch.linalg.svdvals(weight)
        assert torch.linalg.matrix_rank(principal) == 2
        assert torch.allclose(torch.linalg.svdvals(weight - principal)[: len(singular) - 2], singular[2:], atol=1e-5)
        assert torch.allclose(peft_layer.base_layer.weight, weight - principal, atol=1e-6)
        assert torch.equal(layer.base_layer.weight, weight)  # W is never rewritten


def test_pissa_takes_each_weights_svd_once_and_never_anothers():
    """A sweep's PiSSA jobs start from one base: its SVD is taken once. A weight differing in one
    bit (here the sign of a zero) gets its own SVD, equal to a fresh one."""
    SVDS.clear()
    first = adapted("pissa", trained=False)
    kept = list(SVDS)
    assert len(kept) == len(ALL_LAYERS)
    again = adapted("pissa", trained=False)
    assert [svd for _, svd in SVDS] == [svd for _, svd in kept]  # the same tensors: no SVD was taken
    for (name, layer), other in zip(lora_layers(first).items(), lora_layers(again).values()):
        assert torch.equal(layer.lora_A0, other.lora_A0) and torch.equal(layer.lora_B0, other.lora_B0), name

    changed = base_model()
    with torch.no_grad():
        changed.linear1.weight[0, 0] = 0.0
    zeroed = changed.linear1.weight.detach().clone()
    zeroed[0, 0] = -0.0
    singular_triplets(changed.linear1.weight.detach())
    for weight in (zeroed, zeroed * 2):
        u, s, vh = singular_triplets(weight)
        fresh = torch.linalg.svd(weight, full_matrices=False)
        assert torch.equal(u, fresh.U) and torch.equal(s, fresh.S) and torch.equal(vh, fresh.Vh)
    assert len(SVDS) == min(len(ALL_LAYERS) + 3, SVDS_KEPT)


def test_pissa_start_stays_frozen_while_a_and_b_train():
    """A0 and B0 are buffers: saved in the state dict, never given to the optimizer."""
    model = adapted("pissa", trained=False)
    mark_only_lora_trainable(model)
    start = {name: t.clone() for name, t in model.state_dict().items() if name.endswith(("lora_A0", "lora_B0"))}
    assert len(start) == 6 and not start.keys() & dict(model.named_parameters()).keys()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(X), torch.arange(16) % 10).backward()
        opt.step()
    for name, layer in lora_layers(model).items():
        assert torch.equal(layer.lora_A0, start[f"{name}.lora_A0"]) and torch.equal(layer.lora_B0, start[f"{name}.lora_B0"])
        assert not torch.allclose(layer.lora_A, layer.lora_A0, atol=1e-4)  # A (and B) moved away from the start


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
    ("layers_to_transform", [0], "layers_to_transform"),
    ("rank_pattern", {"linear1": 3}, "has shape"),  # a pattern its tensors do not follow
    ("rank_pattern", {"linear[": 3}, "not a regular expression"),
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

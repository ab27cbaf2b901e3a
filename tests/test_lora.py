"""Invariants of the LoRA core, each of which a wrong implementation breaks."""

import math

import pytest
import torch
from torch import nn

from loralab import (
    LoRALinear,
    LoRASpec,
    count_parameters,
    inject_lora,
    load_lora_state_dict,
    lora_disabled,
    lora_state_dict,
    mark_only_lora_trainable,
    merge_lora,
    set_lora_enabled,
    unmerge_lora,
)
from loralab.model import MLP

EXPENSIVE = [784, 1000, 2000, 10]


def trained_layer(rank=2, alpha=4.0, **kwargs) -> LoRALinear:
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(20, 30), LoRASpec(rank=rank, alpha=alpha, **kwargs))
    with torch.no_grad():
        layer.lora_B.normal_()  # as if trained: B != 0
    return layer


def test_b_starts_at_zero_so_output_equals_base():
    base = nn.Linear(20, 30)
    layer = LoRALinear(base, LoRASpec(rank=4, alpha=4))
    x = torch.randn(8, 20)
    assert torch.count_nonzero(layer.lora_B) == 0
    assert torch.equal(layer(x), base(x))


def test_shapes_and_scale():
    layer = LoRALinear(nn.Linear(20, 30), LoRASpec(rank=4, alpha=8))
    assert layer.lora_A.shape == (4, 20) and layer.lora_B.shape == (30, 4)
    assert layer.scale == 2.0
    assert LoRALinear(nn.Linear(20, 30), LoRASpec(rank=4, alpha=8, rslora=True)).scale == 8 / math.sqrt(4)


def test_inits():
    torch.manual_seed(0)
    gaussian = LoRALinear(nn.Linear(500, 500), LoRASpec(rank=8, alpha=8, init="gaussian"))
    kaiming = LoRALinear(nn.Linear(500, 500), LoRASpec(rank=8, alpha=8, init="kaiming"))
    assert abs(gaussian.lora_A.std().item() - 1.0) < 0.05
    bound = 1 / math.sqrt(500)  # kaiming_uniform with a=sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert kaiming.lora_A.abs().max().item() <= bound and kaiming.lora_A.abs().max().item() > 0.9 * bound
    with pytest.raises(ValueError, match="init"):
        LoRALinear(nn.Linear(5, 5), LoRASpec(rank=1, alpha=1, init="xavier"))


def test_factorised_forward_matches_dense_reference():
    layer = trained_layer()
    x = torch.randn(16, 20)
    dense = x @ (layer.base_layer.weight + layer.scale * layer.lora_B @ layer.lora_A).T + layer.base_layer.bias
    assert torch.allclose(layer(x), dense, atol=1e-5)


def test_optimizer_step_leaves_base_bit_identical():
    model = MLP([784, 32, 16, 10])
    inject_lora(model, LoRASpec(rank=2, alpha=2, targets=["linear1", "linear2", "linear3"]))
    mark_only_lora_trainable(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = nn.functional.cross_entropy(model(torch.randn(8, 784)), torch.randint(0, 10, (8,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = dict(model.named_parameters())
    assert before and all(torch.equal(before[n], after[n]) for n in before)
    assert any(after[n].abs().sum() > 0 for n in after if n.endswith("lora_B"))  # the adapter did learn


def test_merge_equals_w_plus_scaled_ba_and_is_idempotent():
    layer = trained_layer()
    w = layer.base_layer.weight.detach().clone()
    expected = w + layer.scale * layer.lora_B.detach() @ layer.lora_A.detach()
    x = torch.randn(5, 20)
    y_unmerged = layer(x)
    layer.merge()
    layer.merge()  # safe to repeat
    assert layer.merged
    assert torch.allclose(layer.base_layer.weight, expected, atol=1e-6)
    assert torch.allclose(layer(x), y_unmerged, atol=1e-5)
    layer.unmerge()
    layer.unmerge()
    assert not layer.merged
    assert torch.allclose(layer.base_layer.weight, w, atol=1e-6)


def test_merge_is_not_tied_to_train_or_eval_mode():
    layer = trained_layer()
    w = layer.base_layer.weight.detach().clone()
    layer.eval()
    layer.train()
    assert not layer.merged and torch.equal(layer.base_layer.weight, w)


def test_disabled_equals_base_exactly():
    model = MLP([784, 32, 16, 10])
    x = torch.randn(4, 784)
    base_out = model(x)
    inject_lora(model, LoRASpec(rank=2, alpha=2, targets="linear.*"))
    for layer in model.modules():
        if isinstance(layer, LoRALinear):
            nn.init.normal_(layer.lora_B)
    assert not torch.equal(model(x), base_out)
    set_lora_enabled(model, False)
    assert torch.equal(model(x), base_out)
    set_lora_enabled(model, True)
    merge_lora(model)
    with pytest.raises(RuntimeError, match="unmerge"):
        set_lora_enabled(model, False)
    unmerge_lora(model)


def test_inject_is_idempotent_and_checks_conflicts():
    model = MLP(EXPENSIVE)
    inject_lora(model, LoRASpec(rank=1, alpha=1, targets=["linear1", "linear2", "linear3"]))
    first = model.linear1
    inject_lora(model, LoRASpec(rank=1, alpha=1, targets=["linear1", "linear2", "linear3"]))
    assert model.linear1 is first and isinstance(model.linear1.base_layer, nn.Linear)
    assert count_parameters(model)["lora"] == 6794
    with pytest.raises(ValueError, match="already has an adapter"):
        inject_lora(model, LoRASpec(rank=2, alpha=1, targets=["linear1"]))


def test_rank1_on_expensive_net_adds_6794_parameters():
    model = MLP(EXPENSIVE)
    inject_lora(model, LoRASpec(rank=1, alpha=1, targets="linear[123]"))
    mark_only_lora_trainable(model)
    counts = count_parameters(model)
    assert counts == {"total": 2807010 + 6794, "trainable": 6794, "lora": 6794, "base": 2807010}
    assert round(100 * counts["lora"] / counts["base"], 3) == 0.242


@pytest.mark.parametrize(
    "targets, message",
    [(["linear9"], "available: linear1, linear2, linear3"), ([], "empty"), ("conv.*", "matches no Linear")],
)
def test_unknown_targets_list_the_linear_layers(targets, message):
    with pytest.raises(ValueError, match=message):
        inject_lora(MLP([784, 32, 16, 10]), LoRASpec(rank=1, alpha=1, targets=targets))


@pytest.mark.parametrize("rank", [0, -1, 1.5, True])
def test_rank_bounds(rank):
    """A rank above min(in, out) is refused by the config (test_validate), not here: a saved
    PiSSA adapter holds twice its trained rank and must load (test_variants)."""
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(nn.Linear(2000, 10), LoRASpec(rank=rank, alpha=1))


def test_state_dict_round_trip_gives_identical_outputs():
    torch.manual_seed(0)
    trained = MLP([784, 32, 16, 10])
    inject_lora(trained, LoRASpec(rank=2, alpha=2, targets=["linear1", "linear3"]))
    for layer in trained.modules():
        if isinstance(layer, LoRALinear):
            nn.init.normal_(layer.lora_B)
    state = lora_state_dict(trained)
    assert set(state) == {"linear1.lora_A", "linear1.lora_B", "linear3.lora_A", "linear3.lora_B"}
    fresh = MLP([784, 32, 16, 10])
    fresh.load_state_dict({k.replace(".base_layer", ""): v for k, v in trained.state_dict().items() if "lora_" not in k})
    inject_lora(fresh, LoRASpec(rank=2, alpha=2, targets=["linear1", "linear3"]))
    load_lora_state_dict(fresh, state)
    x = torch.randn(6, 784)
    assert torch.equal(fresh(x), trained(x))
    with pytest.raises(ValueError, match="missing"):
        load_lora_state_dict(fresh, {k: v for k, v in state.items() if "linear1" not in k})


def test_lora_disabled_gives_the_base_and_restores_each_layer():
    torch.manual_seed(0)
    model = MLP([20, 30, 10])
    plain = model(torch.ones(2, 20))
    inject_lora(model, LoRASpec(rank=2, alpha=2, targets=["linear1", "linear2"]))
    for layer in (model.linear1, model.linear2):
        nn.init.normal_(layer.lora_B)
    model.linear2.enabled = False  # a mixed state must come back as it was
    with lora_disabled(model):
        assert torch.equal(model(torch.ones(2, 20)), plain)
    assert model.linear1.enabled and not model.linear2.enabled
    with pytest.raises(ZeroDivisionError), lora_disabled(model):
        raise ZeroDivisionError
    assert model.linear1.enabled

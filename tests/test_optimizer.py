"""The stages' optimizer: Adam over the trainable tensors only, bit-identical to torch's
reference (one tensor at a time) Adam, so the speed-up changes no result."""

import copy

import torch
import torch.nn.functional as F

from loralab import LoRASpec, inject_lora, is_lora_name, mark_only_lora_trainable
from loralab.classifier import Classifier
from loralab.data import load_tensors
from loralab.model import MLP


def test_a_lora_run_steps_only_the_adapter():
    model = MLP([784, 32, 16, 10])
    inject_lora(model, LoRASpec(rank=2, alpha=2, targets=["linear1", "linear2", "linear3"]))
    mark_only_lora_trainable(model)
    optimizer = Classifier(model).configure_optimizers()
    names = {id(p): n for n, p in model.named_parameters()}
    stepped = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    assert len(stepped) == 6 and all(is_lora_name(n) for n in stepped)


def test_the_stages_adam_is_bit_identical_to_torchs_reference_adam(mnist_dir):
    """50 steps of the real ExpensiveNet on real MNIST. (fused=True fails this: its rounding flips
    ReLU units and the runs drift apart like runs with another seed.)"""
    x, y, _, _ = load_tensors(mnist_dir)
    torch.manual_seed(0)
    reference = MLP([784, 1000, 2000, 10])
    ours, start = copy.deepcopy(reference), copy.deepcopy(reference)
    optimizers = [torch.optim.Adam(reference.parameters(), lr=1e-3, foreach=False), Classifier(ours).configure_optimizers()]
    for step in range(50):
        batch = slice(64 * step, 64 * (step + 1))
        for model, optimizer in zip((reference, ours), optimizers):
            optimizer.zero_grad()
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    assert not torch.equal(reference.linear2.weight, start.linear2.weight)
    assert all(torch.equal(a, b) for a, b in zip(reference.parameters(), ours.parameters()))

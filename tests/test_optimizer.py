"""The stages' optimizer: Adam over the trainable tensors only. Whole networks train with foreach
Adam, bit-identical to torch's reference (one tensor at a time) Adam, so the published bases stay
what they were; adapters train with fused Adam, which ends a fine-tune within rounding of it."""

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


def test_whole_network_adam_is_bit_identical_to_torchs_reference_adam(mnist_dir):
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


def lora_classifiers() -> tuple[Classifier, Classifier]:
    """Two copies of one LoRA fine-tune at step 0, as the stage builds it."""
    torch.manual_seed(0)
    model, spec = MLP([784, 1000, 2000, 10]), LoRASpec(rank=4, alpha=4, targets=["linear1", "linear2", "linear3"])
    inject_lora(model, spec)
    mark_only_lora_trainable(model)
    return tuple(Classifier(copy.deepcopy(model), lr=1e-3) for _ in range(2))


def test_adapters_train_with_fused_adam_and_end_where_foreach_ends(mnist_dir):
    """100 steps of batch 10 on the real ExpensiveNet, as the seeds' protocol trains: fused Adam's
    adapter ends within rounding of foreach Adam's, far closer than another seed's would be."""
    x, y, _, _ = load_tensors(mnist_dir)
    fused, foreach = lora_classifiers()
    assert fused.configure_optimizers().defaults["fused"] and not Classifier(MLP([784, 16, 10])).configure_optimizers().defaults["fused"]
    optimizers = [fused.configure_optimizers(), torch.optim.Adam([p for p in foreach.parameters() if p.requires_grad], lr=1e-3, foreach=True)]
    start = {n: p.detach().clone() for n, p in fused.named_parameters()}
    nines = torch.nonzero(y == 9).flatten()
    for step in range(100):
        batch = nines[10 * step : 10 * (step + 1)]
        for module, optimizer in zip((fused, foreach), optimizers):
            optimizer.zero_grad()
            F.cross_entropy(module(x[batch]), y[batch]).backward()
            optimizer.step()
    for (name, a), b in zip(fused.named_parameters(), foreach.parameters()):
        if a.requires_grad:
            assert not torch.equal(a, start[name]), name
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)

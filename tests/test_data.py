"""The DataModule on real MNIST: digit filtering, a fixed held-out split, replay batches."""

import pytest
import torch

from loralab.data import DigitBatchSampler, MNISTDataModule
from loralab.mnist import TRAIN_MEAN, TRAIN_STD, read_idx
from loralab.model import MLP


@pytest.fixture(scope="module")
def nines(mnist_dir):
    data = MNISTDataModule(str(mnist_dir), digits=[9], batch_size=10)
    data.setup()
    return data


def test_training_draws_only_the_selected_digits(nines):
    labels = torch.cat([y for _, y in nines.train_dataloader()])
    assert set(labels.tolist()) == {9}
    assert len(labels) == len(nines.train_pool) and len(nines.train_pool) > 5000


def test_validation_split_is_fixed_seeded_and_disjoint(mnist_dir, nines):
    assert len(nines.val_set) == 5000
    again = MNISTDataModule(str(mnist_dir), digits=[9], seed=0)
    again.setup()
    assert torch.equal(again.val_set.tensors[1], nines.val_set.tensors[1])
    other = MNISTDataModule(str(mnist_dir), digits=[9], seed=1)
    other.setup()
    assert not torch.equal(other.val_set.tensors[1], nines.val_set.tensors[1])
    fit = set((nines.train_pool.tolist())) | set(nines.other_pool.tolist())
    assert len(fit) == 55000  # 60,000 minus the held-out 5,000


def test_test_set_is_always_the_full_ten_thousand(nines):
    labels = torch.cat([y for _, y in nines.test_dataloader()])
    assert len(labels) == 10000 and torch.bincount(labels).tolist()[9] == 1009


def test_images_are_normalised_once(mnist_dir):
    data = MNISTDataModule(str(mnist_dir))
    data.setup()
    x = data.train_set.tensors[0]
    assert x.shape == (60000, 784) and x.dtype == torch.float32
    assert abs(x.mean().item()) < 1e-3 and abs(x.std().item() - 1) < 1e-3
    raw = torch.from_numpy(read_idx(mnist_dir)[0].copy()).reshape(60000, 784)
    assert torch.equal(x, ((raw.float() / 255.0) - TRAIN_MEAN) / TRAIN_STD)  # in place, same values


@pytest.mark.parametrize("replay", [0.3, 0.5])
def test_replay_batches_contain_the_asked_fraction(nines, replay):
    sampler = DigitBatchSampler(nines.train_pool, 10, seed=0, replay_pool=nines.other_pool, replay=replay)
    y = nines.train_set.tensors[1]
    for batch in list(sampler)[:50]:
        assert len(batch) == 10
        assert int((y[batch] != 9).sum()) == round(replay * 10)


def test_epochs_reshuffle_reproducibly(nines):
    sampler = DigitBatchSampler(nines.train_pool, 10, seed=0)
    first = next(iter(sampler))
    sampler.set_epoch(1)
    assert not torch.equal(next(iter(sampler)), first)
    sampler.set_epoch(0)
    assert torch.equal(next(iter(sampler)), first)


def test_expensive_net_shapes_and_parameter_count():
    model = MLP([784, 1000, 2000, 10])
    assert sum(p.numel() for p in model.parameters()) == 2807010
    assert [n for n, _ in model.named_children()][:3] == ["linear1", "linear2", "linear3"]
    assert model(torch.zeros(7, 1, 28, 28)).shape == (7, 10)

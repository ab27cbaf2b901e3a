"""The seeds' protocol written the way the seed notebooks run it, as the benchmark's reference:
torchvision's per-sample transforms, a plain PyTorch loop, Adam without denormal flushing, and a
parametrize-based rank-1 LoRA fine-tune on digit 9. Used only by ``benchmarks/bench.py --protocol``.

    python benchmarks/seeds_reference.py DATA_DIR
"""

import sys

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torchvision import datasets, transforms

from loralab.model import MLP


class DenseLoRA(nn.Module):
    """The seeds' way: a parametrization that builds W + scale * B @ A on every forward."""

    def __init__(self, out_features: int, in_features: int, rank: int):
        super().__init__()
        self.lora_A = nn.Parameter(torch.randn(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.lora_B @ self.lora_A


def run(data_dir: str) -> None:
    torch.manual_seed(0)
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    train = datasets.MNIST(data_dir, train=True, download=False, transform=tf)
    test = datasets.MNIST(data_dir, train=False, download=False, transform=tf)
    model = MLP([784, 1000, 2000, 10])

    def fit(loader, steps=None):
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        for i, (x, y) in enumerate(loader):
            opt.zero_grad()
            F.cross_entropy(model(x.view(-1, 784)), y).backward()
            opt.step()
            if steps and i + 1 >= steps:
                break

    def evaluate():
        wrong = torch.zeros(10, dtype=torch.long)
        with torch.no_grad():
            for x, y in torch.utils.data.DataLoader(test, batch_size=10):
                miss = model(x.view(-1, 784)).argmax(1) != y
                wrong += torch.bincount(y[miss], minlength=10)
        return wrong

    fit(torch.utils.data.DataLoader(train, batch_size=10, shuffle=True))
    print("pretrained, wrong per digit:", evaluate().tolist())
    for name in ("linear1", "linear2", "linear3"):
        layer = model.get_submodule(name)
        parametrize.register_parametrization(layer, "weight", DenseLoRA(layer.out_features, layer.in_features, 1))
    for name, p in model.named_parameters():
        p.requires_grad = "lora_" in name
    nines = torch.utils.data.Subset(train, (train.targets == 9).nonzero().flatten().tolist())
    fit(torch.utils.data.DataLoader(nines, batch_size=10, shuffle=True), steps=100)
    print("fine-tuned, wrong per digit:", evaluate().tolist())


if __name__ == "__main__":
    run(sys.argv[1])

"""Adapters cross between loralab and Hugging Face PEFT in both directions with the same logits."""

import pytest
import torch

from loralab import LoRASpec, inject_lora
from loralab.adapter import load_adapter, save_adapter
from loralab.model import MLP

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

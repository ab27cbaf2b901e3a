"""On a CUDA GPU: adapters give the CPU's outputs, merge exactly, train under bf16 autocast with
the base untouched, and the fine-tune stage runs with accelerator=gpu. Without a GPU every test
skips with its reason; `make gpu-check` runs them on one."""

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import SLICE, as_if_trained, run
from loralab import LoRASpec, inject_lora
from loralab.inject import mark_only_lora_trainable, merge_lora
from loralab.model import MLP
from loralab.weights import fingerprint

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; `make gpu-check` runs these on one")]

VARIANTS = {"plain": {}, "dora": {"dora": True}, "pissa": {"init": "pissa"}, "rslora": {"rslora": True}}


def adapted(settings: dict) -> MLP:
    torch.manual_seed(0)
    model = MLP([784, 64, 32, 10])
    inject_lora(model, LoRASpec(rank=4, alpha=8, **settings))
    return as_if_trained(model).eval()


@pytest.mark.parametrize("variant", VARIANTS)
def test_adapters_on_cuda_give_the_cpus_outputs(variant):
    cpu = adapted(VARIANTS[variant])
    gpu = copy.deepcopy(cpu).cuda()
    x = torch.randn(32, 784)
    with torch.no_grad():
        # fp32 on both; cuBLAS sums in another order: rounding of the 784-long dot products.
        assert torch.allclose(gpu(x.cuda()).cpu(), cpu(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_merge_on_cuda_keeps_the_function(variant):
    model = adapted(VARIANTS[variant]).cuda()
    x = torch.randn(32, 784, device="cuda")
    with torch.no_grad():
        before = model(x)
        merge_lora(model)
        assert torch.allclose(model(x), before, atol=1e-4, rtol=1e-4)


def test_a_bf16_autocast_step_trains_the_adapter_only():
    model = adapted({}).cuda().train()
    mark_only_lora_trainable(model)
    base, before = fingerprint(model), model.linear1.lora_B.detach().clone()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x, y = torch.randn(64, 784, device="cuda"), torch.randint(0, 10, (64,), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and fingerprint(model) == base
    assert model.linear1.lora_B.dtype == torch.float32 and not torch.equal(model.linear1.lora_B, before)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_the_fine_tune_stage_runs_on_the_gpu(outputs, pretrained, precision):
    cpu_slice = [o for o in SLICE if not o.startswith("accelerator=")]
    metrics, _ = run([*cpu_slice, "accelerator=gpu", "stage=finetune", "trainer.max_steps=10", "trainer.val_check_interval=10",
                      f"trainer.precision={precision}", f"base={pretrained[1]}"], outputs, f"gpu-finetune-{precision}")
    assert metrics["status"] == "ok" and metrics["base_unchanged"] is True
    # The base alone on the GPU, as on the CPU, up to an image whose two top logits cuBLAS's
    # summation order swaps.
    assert abs(sum(metrics["test_base"]["wrong"]) - sum(pretrained[0]["test"]["wrong"])) <= 3

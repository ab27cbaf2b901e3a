"""Every bad config value is caught by one validation step, before any data or training."""

import pytest

from conftest import make_cfg
from loralab.config import check_config
from loralab.errors import ConfigError

BAD = [
    (["stage=finetune", "lora.rank=0"], "lora.rank=0"),
    (["stage=finetune", "lora.rank=-2"], "lora.rank=-2"),
    (["stage=finetune", "lora.rank=1.5"], "lora.rank=1.5"),
    (["stage=finetune", "lora.rank=11"], "from 1 to 10"),  # linear3 is 2000 -> 10
    (["stage=finetune", "lora.alpha=0"], "lora.alpha=0"),
    (["stage=finetune", "lora.alpha=abc"], "lora.alpha='abc'"),
    (["stage=finetune", "lora.dropout=1.0"], "lora.dropout=1.0"),
    (["stage=finetune", "lora.dropout=-0.1"], "lora.dropout=-0.1"),
    (["stage=finetune", "lora.init=xavier"], "lora.init='xavier'"),
    (["stage=finetune", "lora.targets=[conv1]"], "available: linear1, linear2, linear3"),
    (["stage=finetune", "lora.targets=[]"], "empty"),
    (["stage=finetune", "lora.rslora=maybe"], "lora.rslora"),
    (["data.digits=[10]"], "10 is not a digit"),
    (["data.digits=[]"], "empty"),
    (["data.digits=[3,3]"], "once"),
    (["data.digits=nine"], "expected a list"),
    (["data.digits=[a]"], "'a' is not a digit"),
    (["trainer.max_steps=0"], "trainer.max_steps=0"),
    (["data.batch_size=0"], "data.batch_size=0"),
    (["data.replay=1.0"], "data.replay=1.0"),
    (["optim.lr=0"], "optim.lr=0"),
    (["optim.scheduler=linear"], "optim.scheduler"),
    (["model.sizes=[784,10,5]"], "784 inputs and 10 outputs"),
    (["stage=finetune", "finetune.distill=-1"], "finetune.distill=-1"),
    (["stage=finetune", "finetune.distill=0.5"], "set data.replay > 0"),
    (["accelerator=ddp", "trainer.strategy=ddp"], "use accelerator=ddp"),
    (["accelerator=ddp", "trainer.devices=3"], "divide evenly among trainer.devices=3"),
    (["accelerator=ddp", "trainer.devices=0"], "trainer.devices=0"),
]


@pytest.mark.parametrize("overrides, message", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_value_is_one_clear_line(overrides, message, tmp_path):
    cfg = make_cfg(overrides, tmp_path)
    with pytest.raises(ConfigError) as err:
        check_config(cfg)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_gpu_without_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        check_config(make_cfg(["accelerator=gpu"], tmp_path))


@pytest.mark.parametrize("overrides", [[], ["stage=finetune"], ["stage=finetune", "digits=weak", "lora=peft"], ["model=small_mlp"]])
def test_shipped_configs_are_valid(overrides, tmp_path):
    check_config(make_cfg(overrides, tmp_path))

"""Every bad config value is caught by one validation step, before any data or training."""

import pytest
import torch

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


IGNORED = [
    (["lora.rank=4"], "lora.rank=4 is read only by stage=finetune, so this stage=pretrain run would ignore it; add stage=finetune"),
    (["variant=dora"], "variant=dora is read only by stage=finetune"),
    (["lora=peft", "data.replay=0.2"], "add stage=finetune, or drop lora=peft (1 more such override)"),
    (["optim.loraplus_ratio=16"], "optim.loraplus_ratio=16 is read only by stage=finetune"),
    (["base=outputs/pretrain/x"], "read only by stage=finetune and stage=eval, so this stage=pretrain run"),
    (["stage=eval", "resume=outputs/x"], "resume=outputs/x is read only by stage=pretrain and stage=finetune, so this stage=eval run would ignore it; run one of those stages"),
    (["stage=eval", "optim.lr=0.1"], "optim.lr=0.1 is read only by stage=pretrain and stage=finetune"),
    (["experiment=seeds_pretrain", "lora.alpha=4"], "lora.alpha=4 is read only by stage=finetune, so this stage=pretrain run"),
]


@pytest.mark.parametrize("overrides, message", IGNORED, ids=[" ".join(o) for o, _ in IGNORED])
def test_override_the_stage_ignores_is_refused(overrides, message, tmp_path):
    with pytest.raises(ConfigError) as err:
        check_config(make_cfg(overrides, tmp_path), overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("overrides", [["stage=finetune", "lora.rank=4", "variant=dora", "base=x"], ["experiment=seeds", "lora.rank=4"],
                                       ["stage=eval", "base=x", "eval.merge=true"], ["stage=pretrain", "optim.lr=0.01", "resume=x"]])
def test_override_the_stage_reads_is_accepted(overrides, tmp_path):
    check_config(make_cfg(overrides, tmp_path), overrides)


def test_experiment_values_are_not_overrides(tmp_path):
    """experiment=no_forgetting sets lora.*, data.replay and optim.lr for its own stage."""
    assert check_config(make_cfg(["experiment=no_forgetting"], tmp_path), ["experiment=no_forgetting"]).lora.rank == 8


TRAINER_BAD = [
    (["trainer.precision=bogus"], "trainer.precision='bogus' is invalid"),
    (["stage=finetune", "trainer.val_check_interval=0"], "trainer.val_check_interval=0 is invalid"),  # fails only inside fit
    (["trainer.check_val_every_n_epoch=0"], "trainer.check_val_every_n_epoch=0 is invalid"),  # likewise
    (["trainer.limit_train_batches=-1"], "trainer.limit_train_batches=-1 is invalid"),
    (["trainer.log_every_n_steps=-3"], "trainer.log_every_n_steps=-3 is invalid"),
    (["trainer.deterministic=maybe"], "trainer.deterministic='maybe' is invalid"),
    (["accelerator=cpu", "trainer.devices=0"], "trainer.devices=0 is invalid"),
    (["+trainer.gradient_clip_val=a"], "trainer.gradient_clip_val='a' is invalid"),
    (["+trainer.no_such_key=1"], "trainer.no_such_key is not a lightning.Trainer argument"),
    (["+trainer.max_step=3"], "did you mean trainer.max_steps?"),
    (["+trainer.logger=false"], "trainer.logger is set by loralab itself"),
]


@pytest.mark.parametrize("overrides, message", TRAINER_BAD, ids=[" ".join(o) for o, _ in TRAINER_BAD])
def test_bad_trainer_value_is_one_line_from_lightning(overrides, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the throwaway Trainer must write nothing, here or anywhere
    cfg = make_cfg(overrides, tmp_path / "outputs")
    with pytest.raises(ConfigError) as err:
        check_config(cfg)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_trainer_check_leaves_the_process_as_it_was(tmp_path):
    """check_config runs before seed_everything, but the dry fit must not move torch's RNG or
    flags anyway: the run that follows is the one it would have been."""
    from loralab.trainer_args import check_trainer_args

    expected = torch.manual_seed(0) and torch.rand(3)
    torch.manual_seed(0)
    flags = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark)
    check_config(make_cfg(["stage=finetune", "trainer.deterministic=true"], tmp_path))
    assert torch.equal(torch.rand(3), expected)
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark) == flags
    # What only the data decides: validation every 25 batches of a 5-batch epoch.
    kwargs = {"val_check_interval": 25, "check_val_every_n_epoch": 1, "max_steps": 100}
    with pytest.raises(ConfigError, match="trainer.val_check_interval=25 is invalid"):
        check_trainer_args(kwargs, train_batches=5)
    check_trainer_args(kwargs, train_batches=50)

"""Every bad config value is caught by the schema, while Hydra composes it or when it becomes the
stage's typed settings, before any data or training."""

import time
from dataclasses import fields, is_dataclass

import pytest
import torch
from omegaconf import OmegaConf

from conftest import CONF, assert_one_line_error, load, make_cfg, train_py
from loralab.config import SCHEMAS, FinetuneSettings, PretrainSettings, load_job
from loralab.errors import ConfigError

BAD = [
    (["stage=finetune", "lora.rank=0"], "lora.rank=0"),
    (["stage=finetune", "lora.rank=-2"], "lora.rank=-2"),
    (["stage=finetune", "lora.rank=1.5"], "lora.rank=1.5"),
    (["stage=finetune", "lora.init=pissa", "lora.rank=11"], "at most linear3's 10 singular vectors"),  # linear3 is 2000 -> 10
    (["stage=finetune", "lora.rank_pattern={linear4:2}"], "names none of the adapted layers"),
    (["stage=finetune", "lora.alpha_pattern={linear2:-1}"], "lora.alpha_pattern.linear2=-1.0 is invalid"),
    (["stage=finetune", "lora.targets='linear('"], "not a regular expression"),
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
    (["seed=-1"], "seed=-1 is invalid: expected an integer from 0 to 4294967295"),
    (["data.batch_size=abc"], "data.batch_size='abc' is invalid: expected an integer ≥ 1"),
    (["stage=finetune", "optim.loraplus_ratio=abc"], "optim.loraplus_ratio='abc' is invalid: expected a number > 0 (or null)"),
    (["digits=auto"], "needs stage=finetune"),
    (["stage=finetune", "data.auto_k=10"], "data.auto_k=10 is invalid: expected an integer from 1 to 9"),
    (["stage.name=eval"], "stage.name='eval' does not match"),
]


@pytest.mark.parametrize("overrides, message", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_value_is_one_clear_line(overrides, message, tmp_path):
    with pytest.raises(ConfigError) as err:
        load(overrides, tmp_path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_gpu_without_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        load(["accelerator=gpu"], tmp_path)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


# Every option of every group, each with the stage it belongs to (an experiment brings its own).
SHIPPED = ([[f"model={o}"] for o in options("model")] + [[f"digits={o}", "stage=finetune"] for o in options("digits")]
           + [[f"lora={o}", "stage=finetune"] for o in options("lora")] + [[f"variant={o}", "stage=finetune"] for o in options("variant")]
           + [[f"rank={o}", "stage=finetune"] for o in options("rank")] + [[f"alpha={o}", "stage=finetune"] for o in options("alpha")]
           + [[f"arm={o}", "stage=finetune", f"lr_step={step}"] for o in options("arm") for step in (-2, 2)]
           + [[f"task={o}", "stage=finetune"] for o in options("task")]
           + [[f"quant={o}", f"stage={stage}"] for o in options("quant") for stage in ("finetune", "eval")]
           + [[f"accelerator={o}"] for o in options("accelerator") if o != "gpu"] + [[f"stage={o}"] for o in options("stage")]
           + [[f"experiment={o}"] for o in options("experiment") if o != "optuna"])


@pytest.mark.parametrize("overrides", SHIPPED, ids=[" ".join(o) for o in SHIPPED])
def test_every_shipped_config_is_valid(overrides, tmp_path):
    job = load(overrides, tmp_path)
    assert type(job.settings) is SCHEMAS[job.settings.stage.name]


def test_every_option_of_every_group_is_composed():
    """SHIPPED leaves out only what this machine cannot run: accelerator=gpu (no CUDA here; its
    refusal is test_gpu_without_gpu) and experiment=optuna (a sweeper: its jobs run in
    tests/test_scale.py)."""
    groups = [p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra"]
    composed = {o for overrides in SHIPPED for o in overrides if o.split("=")[0] in groups}
    assert {f"{g}={o}" for g in groups for o in options(g)} - composed == {"accelerator=gpu", "experiment=optuna"}


@pytest.mark.parametrize("rank", [1, 4, 16, 64])
@pytest.mark.parametrize("policy, alpha, scale", [
    ("fixed", lambda r: 1.0, lambda r: 1 / r),
    ("rank", lambda r: r, lambda r: 1.0),
    ("double", lambda r: 2 * r, lambda r: 2.0),
    ("rslora", lambda r: 1.0, lambda r: r ** -0.5),
])
def test_alpha_policies_give_their_scales(tmp_path, rank, policy, alpha, scale):
    """An alpha policy follows the rank however it is set: a preset, lora.rank=, or a sweep."""
    for overrides in ([f"rank=r{rank}"], [f"lora.rank={rank}"]):
        spec = load(["stage=finetune", f"alpha={policy}", *overrides], tmp_path).settings.lora
        assert (spec.rank, spec.alpha) == (rank, alpha(rank)) and spec.scale == pytest.approx(scale(rank), rel=1e-12)


def test_a_rank_preset_named_by_its_number_is_one_line():
    done = train_py("stage=finetune", "rank=16")
    assert_one_line_error(done, "rank=16 names a config by a number", "r16")


def test_optuna_experiment_composes_for_its_sweep(tmp_path):
    """Its sweeper is Hydra's plugin: composed here as a job of it would be, one trial's values."""
    job = load(["experiment=optuna", "lora.rank=4", "lora.alpha=16.0", "optim.lr=0.001", "data.replay=0.3"], tmp_path)
    assert (job.settings.lora.rank, job.settings.data.replay) == (4, 0.3)


def test_settings_are_frozen_records(tmp_path):
    settings = load(["stage=finetune"], tmp_path).settings
    assert isinstance(settings, FinetuneSettings) and settings.lora.targets == ("linear1", "linear2", "linear3")
    with pytest.raises(AttributeError):
        settings.lora.rank = 3


def test_the_schema_holds_every_default(tmp_path):
    """conf/config.yaml holds presets and Hydra's own settings, no value: the defaults are the
    schema's, so the plain pretrain config is the schema's defaults less what stage=pretrain sets."""
    assert set(OmegaConf.load(CONF / "config.yaml")) == {"defaults", "hydra"}
    composed = load([], tmp_path).settings
    assert composed.optim.scheduler == "cosine" and PretrainSettings().optim.scheduler == "none"
    assert composed.data == PretrainSettings().data and composed.seed == PretrainSettings().seed


def test_config_check_takes_well_under_a_second(tmp_path):
    """Composing and typing a fine-tune's settings (Lightning's dry fit aside, timed with the CLI
    in docs/benchmarks.md): the schema adds no noticeable time to a run's start."""
    cfg = make_cfg(["stage=finetune", "lora.rank=4"], tmp_path)
    start = time.perf_counter()
    OmegaConf.to_object(cfg)
    assert time.perf_counter() - start < 0.5


MISPLACED = [
    (["lora.rank=4"], "lora.rank=4 is read only by stage=finetune, so this stage=pretrain run has no such setting; add stage=finetune"),
    (["+lora.rank=4"], "+lora.rank is read only by stage=finetune"),
    (["variant=dora"], "variant=dora is read only by stage=finetune"),
    (["lora=peft", "data.replay=0.2"], "add stage=finetune, or drop lora=peft"),
    (["optim.loraplus_ratio=16"], "optim.loraplus_ratio=16 is read only by stage=finetune"),
    (["base=outputs/pretrain/x"], "read only by stage=finetune and stage=eval, so this stage=pretrain run"),
    (["stage=eval", "resume=outputs/x"], "resume=outputs/x is read only by stage=pretrain and stage=finetune, so this stage=eval run has no such setting; run one of those stages"),
    (["stage=eval", "optim.lr=0.1"], "optim.lr=0.1 is read only by stage=pretrain and stage=finetune"),
    (["experiment=seeds_pretrain", "lora.alpha=4"], "lora.alpha=4 is read only by stage=finetune, so this stage=pretrain run"),
    (["stage=finetune", "lora.rnk=4"], "lora.rnk=4 is not a setting: lora has no key 'rnk'; its keys are rank, alpha, targets"),
    (["stage=finetune", "+lora.rnk=4"], "+lora.rnk is not a setting: lora has no key 'rnk'"),
]


@pytest.mark.parametrize("overrides, message", MISPLACED, ids=[" ".join(o) for o, _ in MISPLACED])
def test_a_key_the_stage_does_not_have_is_refused(overrides, message, tmp_path):
    with pytest.raises(ConfigError) as err:
        load(overrides, tmp_path)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("overrides", [["stage=finetune", "lora.rank=4", "variant=dora", "base=x"], ["experiment=seeds", "lora.rank=4"],
                                       ["stage=eval", "base=x", "eval.merge=true"], ["stage=pretrain", "optim.lr=0.01", "resume=x"]])
def test_a_key_the_stage_has_is_accepted(overrides, tmp_path):
    load(overrides, tmp_path)


def test_experiment_values_are_the_stages_own(tmp_path):
    """experiment=no_forgetting sets lora.*, data.replay and optim.lr for its own stage."""
    assert load(["experiment=no_forgetting"], tmp_path).settings.lora.rank == 8


def test_each_setting_is_one_field_with_its_rule():
    """Every scalar setting of every stage is a schema field, and every number has its range there."""
    def leaves(schema, prefix=""):
        for f in fields(schema):
            value = f.default_factory() if callable(f.default_factory) else f.default
            if is_dataclass(value):
                yield from leaves(type(value), f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}", f, value
    unruled = {key for schema in SCHEMAS.values() for key, f, value in leaves(schema)
               if isinstance(value, (int, float)) and not isinstance(value, bool) and "rule" not in f.metadata}
    assert unruled == set()


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
    with pytest.raises(ConfigError) as err:
        load(overrides, tmp_path / "outputs")
    assert message in str(err.value) and "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_trainer_check_leaves_the_process_as_it_was(tmp_path):
    """load_job runs before seed_everything, but the dry fit must not move torch's RNG or
    flags anyway: the run that follows is the one it would have been."""
    from loralab.trainer_args import check_trainer_args

    expected = torch.manual_seed(0) and torch.rand(3)
    torch.manual_seed(0)
    flags = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark)
    load_job(make_cfg(["stage=finetune", "trainer.deterministic=true"], tmp_path))
    assert torch.equal(torch.rand(3), expected)
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark) == flags
    # What only the data decides: validation every 25 batches of a 5-batch epoch.
    kwargs = {"val_check_interval": 25, "check_val_every_n_epoch": 1, "max_steps": 100}
    with pytest.raises(ConfigError, match="trainer.val_check_interval=25 is invalid"):
        check_trainer_args(kwargs, train_batches=5)
    check_trainer_args(kwargs, train_batches=50)


@pytest.mark.parametrize("task, digits, steps", [("d8", [8], 100), ("d9", [9], 100), ("union", [8, 9], 200)])
def test_a_task_sets_its_digits_and_budget(tmp_path, task, digits, steps):
    """experiment=combine's tasks: the union gets the single-digit adapters' steps together."""
    job = load(["experiment=combine", f"task={task}", "lr_step=0"], tmp_path)
    assert list(job.settings.data.digits) == digits and job.settings.trainer["max_steps"] == steps

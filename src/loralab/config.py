"""The run's settings: Hydra composes them, ``check_config`` validates them once, before any data,
training or file writing, and returns a typed ``RunConfig`` that the stages take as it is.

Each problem is reported as one line naming the field, the bad value and what is allowed.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from loralab.errors import ConfigError
from loralab.layout import layer_shapes
from loralab.overrides import check_overrides
from loralab.spec import LoRASpec, match_targets

STAGES = ("pretrain", "finetune", "eval")
SCHEDULERS = ("none", "cosine")
METHODS = ("lora", "full")

@dataclass(frozen=True)
class DataConfig:
    digits: tuple[int, ...] | None  # None: digits=auto, the base's worst auto_k digits
    auto_k: int
    batch_size: int
    eval_batch_size: int
    val_size: int
    replay: float


@dataclass(frozen=True)
class RunConfig:
    stage: str
    model_name: str
    sizes: tuple[int, ...]
    data: DataConfig
    lr: float
    scheduler: str
    seed: int
    data_dir: str
    output_root: str
    trainer: dict[str, Any]  # lightning.Trainer keyword arguments
    source: DictConfig  # the composed config, as metrics.json records it
    method: str = "lora"
    lora: LoRASpec | None = None  # set for a LoRA fine-tune only
    distill: float = 0.0
    loraplus_ratio: float | None = None
    base: str | None = None
    resume: str | None = None
    eval_adapters: tuple[str, ...] = ()
    eval_merge: bool = False
    # In a sweep job, this job's values of the keys the sweep varies ({"lora.rank": 2}); the cli
    # reads them from Hydra, and TensorBoard's HParams table shows them first.
    sweep: dict[str, Any] = field(default_factory=dict)


def _bad(field: str, value, allowed: str) -> ConfigError:
    return ConfigError(f"{field}={value!r} is invalid: {allowed}")


def _int(field: str, value, low: int, high: int | None = None) -> int:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)
    if not ok:
        raise _bad(field, value, f"expected an integer {'≥ ' + str(low) if high is None else f'from {low} to {high}'}")
    return value


def _number(field: str, value, low: float, high: float | None = None, low_open: bool = False, high_open: bool = True) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (high is None or (value < high if high_open else value <= high))
    if not ok:
        lo = f"{'>' if low_open else '≥'} {low:g}"
        hi = "" if high is None else f" and {'<' if high_open else '≤'} {high:g}"
        raise _bad(field, value, f"expected a number {lo}{hi}")
    return float(value)


def _choice(field: str, value, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise _bad(field, value, f"expected one of {', '.join(choices)}")
    return value


def check_digits(value, stage: str) -> tuple[int, ...] | None:
    if value == "auto":
        if stage != "finetune":
            raise _bad("data.digits", value, "digits=auto picks the base model's worst digits, so it needs stage=finetune")
        return None
    if not isinstance(value, (list, ListConfig)):
        raise _bad("data.digits", value, "expected a list of digits 0-9, e.g. data.digits=[3,5] or digits=nine")
    digits = list(value)
    if not digits:
        raise _bad("data.digits", digits, "the list is empty; name at least one digit 0-9")
    for d in digits:
        if isinstance(d, bool) or not isinstance(d, int) or not 0 <= d <= 9:
            raise _bad("data.digits", digits, f"{d!r} is not a digit 0-9")
    if len(set(digits)) != len(digits):
        raise _bad("data.digits", digits, "each digit may appear once")
    return tuple(sorted(digits))


def check_sizes(model: DictConfig) -> tuple[int, ...]:
    sizes = model.get("sizes")
    if not isinstance(sizes, (list, ListConfig)) or len(sizes) < 2:
        raise _bad("model.sizes", sizes, "expected a list of layer sizes like [784, 1000, 2000, 10]")
    for n in sizes:
        _int("model.sizes", n, 1)
    if sizes[0] != 784 or sizes[-1] != 10:
        raise _bad("model.sizes", list(sizes), "MNIST needs 784 inputs and 10 outputs")
    return tuple(sizes)


def check_lora(lora: DictConfig, sizes: tuple[int, ...]) -> LoRASpec:
    values = OmegaConf.to_container(lora, resolve=True)
    targets = values.get("targets")
    if isinstance(targets, list) and all(isinstance(t, str) for t in targets):
        targets = tuple(targets)
    elif not isinstance(targets, str):
        raise _bad("lora.targets", targets, "expected a list of layer names or one regex string")
    shapes = layer_shapes(sizes)
    try:
        names = match_targets(shapes, targets)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    max_rank = min(min(shapes[n]) for n in names)
    _int("lora.rank", values.get("rank"), 1, max_rank)
    try:
        return LoRASpec(**(values | {"targets": targets}))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    except TypeError as err:  # a key the spec does not have, e.g. +lora.rnak=2
        raise ConfigError(f"lora: {err}; the keys are {', '.join(LoRASpec.__dataclass_fields__)}") from None


def check_devices(trainer: dict, batch_size: int) -> None:
    devices, strategy = trainer.get("devices", "auto"), trainer.get("strategy", "auto")
    if devices in ("auto", 1, "1", None) or isinstance(devices, list):
        return
    _int("trainer.devices", devices, 1)
    if strategy not in ("ddp_spawn", "auto"):
        # ddp re-runs train.py for each extra rank: every rank would run the whole stage and write
        # its files, and under -m each would rerun the sweep (Lightning issue #11300).
        raise _bad("trainer.strategy", strategy, "several devices run with ddp_spawn here; use accelerator=ddp, or leave trainer.strategy=auto")
    if batch_size % devices:
        raise _bad("data.batch_size", batch_size, f"must divide evenly among trainer.devices={devices}, so each rank takes an equal share of every batch")


def cuda_available() -> bool:
    import torch  # only when a GPU is asked for: everything else here is checked without torch

    return torch.cuda.is_available()


def check_trainer(trainer: dict, batch_size: int) -> dict:
    if trainer.get("max_steps", -1) != -1:
        _int("trainer.max_steps", trainer["max_steps"], 1)
    if trainer.get("max_epochs") is not None:
        _int("trainer.max_epochs", trainer["max_epochs"], 1)
    if trainer.get("accelerator") in ("gpu", "cuda") and not cuda_available():
        raise ConfigError("accelerator=gpu but no CUDA GPU is visible; use accelerator=cpu (or auto)")
    check_devices(trainer, batch_size)
    return trainer


def check_with_lightning(trainer: dict) -> None:
    """Every trainer.* value by Lightning's own rules. Last, and imported here: Lightning takes
    seconds to import, and a typo in any other key should not wait for it."""
    from loralab.trainer_args import check_trainer_args, trainer_kwargs

    check_trainer_args(trainer_kwargs(trainer))


def check_data(data: DictConfig, stage: str) -> DataConfig:
    return DataConfig(
        digits=check_digits(data.digits, stage),
        auto_k=_int("data.auto_k", data.get("auto_k", 1), 1, 9),
        batch_size=_int("data.batch_size", data.batch_size, 1),
        eval_batch_size=_int("data.eval_batch_size", data.eval_batch_size, 1),
        val_size=_int("data.val_size", data.val_size, 1, 59999),
        replay=_number("data.replay", data.replay, 0, 1),
    )


def check_finetune(cfg: DictConfig, sizes: tuple[int, ...], replay: float) -> dict:
    method = _choice("finetune.method", cfg.finetune.method, METHODS)
    distill = _number("finetune.distill", cfg.finetune.distill, 0)
    if distill and not replay:
        raise _bad("finetune.distill", cfg.finetune.distill, "distillation acts on replayed images; set data.replay > 0 too")
    spec = check_lora(cfg.lora, sizes)  # checked for a full fine-tune too: a typo is a typo
    ratio = cfg.optim.get("loraplus_ratio")
    if ratio is not None:
        _number("optim.loraplus_ratio", ratio, 0, low_open=True)
        if method != "lora":
            raise _bad("optim.loraplus_ratio", ratio, "LoRA+ sets the adapters' B learning rate; a full fine-tune has none (leave it null)")
    return {"method": method, "distill": distill, "lora": spec if method == "lora" else None, "loraplus_ratio": ratio}


def check_eval(cfg: DictConfig) -> dict:
    adapters = cfg.eval.adapters
    if not isinstance(adapters, (list, ListConfig)) or not all(isinstance(a, str) for a in adapters):
        raise _bad("eval.adapters", adapters, "expected a list of adapter directories, e.g. eval.adapters=[outputs/finetune/<time>]")
    if not isinstance(cfg.eval.merge, bool):
        raise _bad("eval.merge", cfg.eval.merge, "expected true or false")
    return {"eval_adapters": tuple(adapters), "eval_merge": cfg.eval.merge}


def check_config(cfg: DictConfig, overrides: Sequence[str] = ()) -> RunConfig:
    """``overrides``: the command line's (Hydra's overrides.task), checked against the stage."""
    stage = _choice("stage.name", cfg.stage.name, STAGES)
    check_overrides(overrides, stage)
    sizes = check_sizes(cfg.model)
    data = check_data(cfg.data, stage)
    trainer = check_trainer(OmegaConf.to_container(cfg.trainer, resolve=True), data.batch_size)
    extra = check_finetune(cfg, sizes, data.replay) if stage == "finetune" else check_eval(cfg) if stage == "eval" else {}
    lr = _number("optim.lr", cfg.optim.lr, 0, low_open=True)
    scheduler = _choice("optim.scheduler", cfg.optim.scheduler, SCHEDULERS)
    seed = _int("seed", cfg.seed, 0)
    check_with_lightning(trainer)
    return RunConfig(
        stage=stage,
        model_name=cfg.model.name,
        sizes=sizes,
        data=data,
        lr=lr,
        scheduler=scheduler,
        seed=seed,
        data_dir=str(cfg.data_dir),
        output_root=str(cfg.output_root),
        trainer=trainer,
        source=cfg,
        base=cfg.get("base"),
        resume=cfg.get("resume"),
        **extra,
    )

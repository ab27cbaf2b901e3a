"""One validation step over the composed config, run before any data, training or file writing.

Each problem is reported as one line naming the field, the bad value and what is allowed.
"""

from __future__ import annotations

import numbers

import torch
from omegaconf import DictConfig, ListConfig

from loralab.errors import ConfigError
from loralab.lora import INITS, resolve_targets
from loralab.model import MLP

STAGES = ("pretrain", "finetune", "eval")
SCHEDULERS = ("none", "cosine")
METHODS = ("lora", "full")


def _bad(field: str, value, allowed: str) -> ConfigError:
    return ConfigError(f"{field}={value!r} is invalid: {allowed}")


def _int(field: str, value, low: int, high: int | None = None) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)
    if not ok:
        raise _bad(field, value, f"expected an integer {'≥ ' + str(low) if high is None else f'from {low} to {high}'}")


def _number(field: str, value, low: float, high: float | None = None, low_open: bool = False, high_open: bool = True) -> None:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok:
        ok = (value > low if low_open else value >= low) and (high is None or (value < high if high_open else value <= high))
    if not ok:
        lo = f"{'>' if low_open else '≥'} {low:g}"
        hi = "" if high is None else f" and {'<' if high_open else '≤'} {high:g}"
        raise _bad(field, value, f"expected a number {lo}{hi}")


def check_digits(value) -> list[int]:
    if value == "auto":
        raise _bad("data.digits", value, "digits=auto picks the base model's worst digits, so it needs stage=finetune")
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
    return sorted(digits)


def check_model(model: DictConfig) -> None:
    sizes = model.get("sizes")
    if not isinstance(sizes, (list, ListConfig)) or len(sizes) < 2:
        raise _bad("model.sizes", sizes, "expected a list of layer sizes like [784, 1000, 2000, 10]")
    for n in sizes:
        _int("model.sizes", n, 1)
    if sizes[0] != 784 or sizes[-1] != 10:
        raise _bad("model.sizes", list(sizes), "MNIST needs 784 inputs and 10 outputs")


def check_lora(lora: DictConfig, sizes: list[int]) -> None:
    targets = lora.get("targets")
    if isinstance(targets, ListConfig):
        targets = list(targets)
    if not isinstance(targets, (str, list)) or not all(isinstance(t, str) for t in (targets if isinstance(targets, list) else [])):
        raise _bad("lora.targets", targets, "expected a list of layer names or one regex string")
    with torch.device("meta"):
        model = MLP(sizes)  # shapes only: no memory, no initialisation cost
    try:
        names = resolve_targets(model, targets)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    max_rank = min(min(model.get_submodule(n).in_features, model.get_submodule(n).out_features) for n in names)
    _int("lora.rank", lora.get("rank"), 1, max_rank)
    _number("lora.alpha", lora.get("alpha"), 0, low_open=True)
    _number("lora.dropout", lora.get("dropout"), 0, 1)
    if lora.get("init") not in INITS:
        raise _bad("lora.init", lora.get("init"), f"expected one of {', '.join(INITS)}")
    if not isinstance(lora.get("rslora"), bool):
        raise _bad("lora.rslora", lora.get("rslora"), "expected true or false")


def check_devices(cfg: DictConfig) -> None:
    devices, strategy = cfg.trainer.get("devices", "auto"), cfg.trainer.get("strategy", "auto")
    if devices in ("auto", 1, "1", None) or isinstance(devices, (list, ListConfig)):
        return
    _int("trainer.devices", devices, 1)
    if strategy not in ("ddp_spawn", "auto"):
        # ddp re-runs train.py for each extra rank: every rank would run the whole stage and write
        # its files, and under -m each would rerun the sweep (Lightning issue #11300).
        raise _bad("trainer.strategy", strategy, "several devices run with ddp_spawn here; use accelerator=ddp, or leave trainer.strategy=auto")
    if cfg.data.batch_size % devices:
        raise _bad("data.batch_size", cfg.data.batch_size, f"must divide evenly among trainer.devices={devices}, so each rank takes an equal share of every batch")


def check_config(cfg: DictConfig) -> None:
    stage = cfg.stage.name
    if stage not in STAGES:
        raise _bad("stage.name", stage, f"expected one of {', '.join(STAGES)}")
    check_model(cfg.model)
    if not (stage == "finetune" and cfg.data.digits == "auto"):
        check_digits(cfg.data.digits)
    if cfg.data.get("auto_k") is not None:
        _int("data.auto_k", cfg.data.auto_k, 1, 9)
    _int("data.batch_size", cfg.data.batch_size, 1)
    _int("data.eval_batch_size", cfg.data.eval_batch_size, 1)
    _int("data.val_size", cfg.data.val_size, 1, 59999)
    _number("data.replay", cfg.data.replay, 0, 1)
    _number("optim.lr", cfg.optim.lr, 0, low_open=True)
    if cfg.optim.scheduler not in SCHEDULERS:
        raise _bad("optim.scheduler", cfg.optim.scheduler, f"expected one of {', '.join(SCHEDULERS)}")
    _int("seed", cfg.seed, 0)
    max_steps = cfg.trainer.get("max_steps", -1)
    if max_steps != -1:
        _int("trainer.max_steps", max_steps, 1)
    if cfg.trainer.get("max_epochs") is not None:
        _int("trainer.max_epochs", cfg.trainer.max_epochs, 1)
    if cfg.trainer.get("accelerator") in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError("accelerator=gpu but no CUDA GPU is visible; use accelerator=cpu (or auto)")
    check_devices(cfg)
    if stage == "eval":
        adapters = cfg.eval.adapters
        if not isinstance(adapters, (list, ListConfig)) or not all(isinstance(a, str) for a in adapters):
            raise _bad("eval.adapters", adapters, "expected a list of adapter directories, e.g. eval.adapters=[outputs/finetune/<time>]")
        if not isinstance(cfg.eval.merge, bool):
            raise _bad("eval.merge", cfg.eval.merge, "expected true or false")
    if stage == "finetune":
        if cfg.finetune.method not in METHODS:
            raise _bad("finetune.method", cfg.finetune.method, f"expected one of {', '.join(METHODS)}")
        _number("finetune.distill", cfg.finetune.distill, 0)
        if cfg.finetune.distill and not cfg.data.replay:
            raise _bad("finetune.distill", cfg.finetune.distill, "distillation acts on replayed images; set data.replay > 0 too")
        check_lora(cfg.lora, list(cfg.model.sizes))

"""``trainer.*`` is user input: checked against lightning.Trainer itself before anything is written.

The rules are Lightning's own, not a copy of them: the keys and types come from
``Trainer.__init__``'s signature, the values from building a throwaway Trainer and running two
steps of a one-number model in a temporary directory, where Lightning's in-fit checks run (some
values, like ``val_check_interval=0``, only fail there, after the run dir has files). Each error
becomes one line naming the key.
"""

from __future__ import annotations

import collections.abc
import contextlib
import difflib
import inspect
import logging
import os
import tempfile
import types
import typing
import warnings

import lightning as L
import torch
from lightning.pytorch.trainer.connectors.accelerator_connector import _AcceleratorConnector

from loralab.errors import ConfigError

# make_trainer passes these itself: a trainer.<key> for them would clash ("got multiple values").
RESERVED = {"logger", "callbacks", "enable_checkpointing", "plugins", "default_root_dir", "use_distributed_sampler"}
PARAMS = [n for n in inspect.signature(L.Trainer.__init__).parameters if n != "self"]
HINTS = typing.get_type_hints(L.Trainer.__init__)
# The keys Lightning's accelerator connector parses: checked by construction only, since the dry
# fit runs on one CPU.
HARDWARE = set(inspect.signature(_AcceleratorConnector.__init__).parameters) - {"self"}
# The trainer.* values check_trainer_args has passed in this process, as keys it makes of them.
_PASSED: set[str] = set()
QUIET = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False}


def trainer_kwargs(trainer: dict, testing: bool = False) -> dict:
    """The keyword arguments lightning.Trainer gets from ``trainer.*``, checked and run alike."""
    kwargs = dict(trainer)
    if testing:
        # Tests run here, in one process: seconds of work, not worth spawning ranks for.
        kwargs |= {"devices": 1, "strategy": "auto"}
    elif kwargs.get("strategy", "auto") == "auto" and str(kwargs.get("devices", "auto")) not in ("auto", "1"):
        kwargs["strategy"] = "ddp_spawn"  # see conf/accelerator/ddp.yaml
    return kwargs


def _fits(value, hint) -> bool:
    """isinstance against Lightning's annotation (Union, Optional, Literal, list, dict, classes)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is typing.Any:
        return True
    if hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin in (list, collections.abc.Iterable):
        return isinstance(value, (list, tuple)) and (not args or all(_fits(v, args[0]) for v in value))
    if origin is dict:
        return isinstance(value, dict) and all(_fits(k, args[0]) and _fits(v, args[1]) for k, v in value.items())
    if hint is float:  # an int is a float, a bool is neither
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _describe(hint) -> str:
    """The annotation in words: "int or None", "one of 64, 32, '16-mixed', ... or None"."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    literals = [repr(v) for a in args if typing.get_origin(a) is typing.Literal for v in typing.get_args(a)]
    names = [getattr(a, "__name__", str(a).replace("typing.", "")) for a in args if typing.get_origin(a) is not typing.Literal]
    if len(literals) > 6:  # precision's 15: its "<bits>-true|mixed" spellings, and where the rest are
        literals = [v for v in literals if v.endswith(("-true'", "-mixed'"))][:6] + ["... (all: help(lightning.Trainer))"]
    words = literals + ["None" if n == "NoneType" else n for n in names]
    return ("one of " if literals else "") + (", ".join(words[:-1]) + " or " + words[-1] if len(words) > 1 else words[0])


@contextlib.contextmanager
def _throwaway():
    """An empty temporary directory, Lightning quiet, and afterwards the process as it was: the
    torch flags a Trainer sets (deterministic, cudnn.benchmark, CUBLAS_WORKSPACE_CONFIG) and the
    random state the dry fit's DataLoader draws from."""
    flags = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    loggers = [logging.getLogger(n) for n in ("lightning", "lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield tmp
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)
            torch.use_deterministic_algorithms(flags[0], warn_only=flags[1])
            torch.backends.cudnn.benchmark = flags[2]
            if flags[3] is None:
                os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
            else:
                os.environ["CUBLAS_WORKSPACE_CONFIG"] = flags[3]


def _first_line(err: BaseException) -> str:
    """The error's first sentence: Lightning's messages go on with advice for its own API that
    would push the line past 200 characters."""
    line = (str(err).strip().splitlines() or [type(err).__name__])[0].strip()
    return line.split(". ")[0].rstrip(".")


class _Dry(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        loss = (self.w - batch).pow(2).mean()
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", (self.w - batch).pow(2).mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _Batches(torch.utils.data.Dataset):
    """``n`` one-number batches, made on demand: only the few the dry fit takes are built."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        return torch.ones(1)


def _dry_fit(kwargs: dict, root: str, train_batches: int) -> None:
    """Two optimizer steps on one CPU with the loop keys as given."""
    loop = {k: v for k, v in kwargs.items() if k not in HARDWARE}
    steps = loop.get("max_steps", -1)
    loop["max_steps"] = 2 if steps == -1 or steps > 2 else steps
    trainer = L.Trainer(**loop | QUIET | {"profiler": None}, accelerator="cpu", devices=1, default_root_dir=root)
    trainer.fit(_Dry(), *(torch.utils.data.DataLoader(_Batches(n), batch_size=None) for n in (train_batches, 1)))


def _culprit(kwargs: dict, attempt, error: Exception) -> str | None:
    """The key that alone (the rest at Lightning's defaults) fails the same way, or else the one
    whose removal lets the rest pass."""
    same = (type(error), _first_line(error))
    for key in kwargs:
        try:
            attempt({key: kwargs[key]})
        except Exception as err:  # noqa: BLE001 - compared, not handled
            if (type(err), _first_line(err)) == same:
                return key
    for key in kwargs:
        try:
            attempt({k: v for k, v in kwargs.items() if k != key})
            return key
        except Exception:  # noqa: BLE001 - this key was not the only problem
            pass
    return None


def _check_keys(kwargs: dict) -> None:
    for key, value in kwargs.items():
        if key in RESERVED:
            raise ConfigError(f"trainer.{key} is set by loralab itself; remove it")
        if key not in PARAMS:
            close = difflib.get_close_matches(key, PARAMS, n=1)
            hint = f"did you mean trainer.{close[0]}?" if close else "see lightning.Trainer's arguments"
            raise ConfigError(f"trainer.{key} is not a lightning.Trainer argument; {hint}")
        if not _fits(value, HINTS.get(key, typing.Any)):
            raise ConfigError(f"trainer.{key}={value!r} is invalid: lightning.Trainer takes {_describe(HINTS[key])}")
    # Lightning takes a negative log_every_n_steps and logs every |n| steps (step % n == 0), while
    # Classifier.logging_step would log every step: the one rule not Lightning's own.
    if (kwargs.get("log_every_n_steps") or 0) < 0:
        raise ConfigError(f"trainer.log_every_n_steps={kwargs['log_every_n_steps']!r} is invalid: expected an integer ≥ 0")


def check_trainer_args(kwargs: dict, train_batches: int | None = None) -> None:
    """ConfigError naming ``trainer.<key>`` if Lightning would reject ``kwargs``, when the Trainer
    is built or inside fit. Writes nothing. ``train_batches``: the run's number of training
    batches, once known (val_check_interval may not exceed it)."""
    _check_keys(kwargs)
    key = repr((sorted(kwargs.items()), train_batches))
    if key in _PASSED:  # the same values passed before in this process: a sweep checks them once
        return
    with _throwaway() as root:
        for attempt in (lambda kw: L.Trainer(**kw | QUIET, default_root_dir=root), lambda kw: _dry_fit(kw, root, train_batches or 10**9)):
            try:
                attempt(kwargs)
            except Exception as err:  # noqa: BLE001 - ValueError, TypeError, ZeroDivisionError, ModuleNotFoundError, ...
                why = _first_line(err)
                if isinstance(err, ZeroDivisionError):
                    why = "Lightning divides by it inside fit (ZeroDivisionError); use a positive value"
                culprit = _culprit(kwargs, attempt, err)
                if culprit is None:
                    keys = ", ".join(f"trainer.{k}={v!r}" for k, v in kwargs.items() if k in HARDWARE)
                    raise ConfigError(f"{keys or 'the trainer.* values'} do not work together: {why}") from None
                raise ConfigError(f"trainer.{culprit}={kwargs[culprit]!r} is invalid: {why}") from None
    _PASSED.add(key)

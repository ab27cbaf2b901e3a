"""The run's settings, defined once. Each key's type, default and allowed values are a field of
the dataclasses below; each stage's settings are one root class, registered in Hydra's ConfigStore
as ``schema/<stage>``, which conf/config.yaml puts first in its defaults (``schema: ${stage}``).
So Hydra types every value as it composes, and a key the chosen stage does not have
(``stage=pretrain lora.rank=4``) fails in composition. The YAML files hold only the presets users
pick; the defaults are here. ``load_job`` turns the composed config into these frozen
objects, which runs every range and cross-field check, then Lightning's own check of ``trainer.*``.

Torch-free: a bad value costs one line, not torch's import.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, fields, is_dataclass
from typing import Any, ClassVar

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from loralab.errors import ConfigError
from loralab.layout import layer_shapes
from loralab.rules import Checked, Rule, invalid, setting
from loralab.spec import LoRASpec, match_targets, pattern_key

# Keys that say where things are or how a run is shown, not what it computes: a resumed run may
# change them, and a sweep's job directories are not named after them (conf/config.yaml).
INCIDENTAL = ("output_root", "data_dir", "base", "resume", "debug", "verbose", "trainer.enable_progress_bar", "confusion_figures")

MNIST_TEST_IMAGES = 10_000

# Lightning's own defaults where they serve; trainer.* is checked by Lightning's rules (trainer_args).
TRAINER = {
    "max_epochs": 3, "max_steps": -1, "val_check_interval": 1.0, "check_val_every_n_epoch": 1, "log_every_n_steps": 50,
    "num_sanity_val_steps": 0, "deterministic": True, "enable_progress_bar": True, "enable_model_summary": False,
    "fast_dev_run": False, "limit_train_batches": None, "limit_val_batches": None, "limit_test_batches": None,
}


@dataclass(frozen=True)
class StageConfig(Checked):
    KEY: ClassVar[str] = "stage"
    name: str = "pretrain"


@dataclass(frozen=True)
class ModelConfig(Checked):
    KEY: ClassVar[str] = "model"
    name: str = "expensive_mlp"
    sizes: tuple[int, ...] = (784, 1000, 2000, 10)  # the hkproj/pytorch-lora notebook's ExpensiveNet

    def __post_init__(self):
        sizes = self.sizes
        if len(sizes) < 2 or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in sizes):
            raise invalid("model.sizes", list(sizes), "expected a list of layer sizes like [784, 1000, 2000, 10]")
        if sizes[0] != 784 or sizes[-1] != 10:
            raise invalid("model.sizes", list(sizes), "MNIST needs 784 inputs and 10 outputs")
        object.__setattr__(self, "sizes", tuple(sizes))


@dataclass(frozen=True)
class DataConfig(Checked):
    KEY: ClassVar[str] = "data"
    digits: Any = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9)  # a list of digits; a fine-tune may say "auto"
    batch_size: int = setting(64, Rule(int, low=1))
    eval_batch_size: int = setting(1000, Rule(int, low=1))
    val_size: int = setting(5000, Rule(int, low=1, high=59999))  # held out of the 60,000 training images, seeded

    def __post_init__(self):
        self.check_rules()
        object.__setattr__(self, "digits", self.check_digits(self.digits))

    def check_digits(self, value) -> tuple[int, ...] | None:
        if value == "auto":
            raise invalid("data.digits", value, "digits=auto picks the base model's worst digits, so it needs stage=finetune")
        if not isinstance(value, (list, tuple)):
            raise invalid("data.digits", value, "expected a list of digits 0-9, e.g. data.digits=[3,5] or digits=nine")
        digits = list(value)
        if not digits:
            raise invalid("data.digits", digits, "the list is empty; name at least one digit 0-9")
        for d in digits:
            if isinstance(d, bool) or not isinstance(d, int) or not 0 <= d <= 9:
                raise invalid("data.digits", digits, f"{d!r} is not a digit 0-9")
        if len(set(digits)) != len(digits):
            raise invalid("data.digits", digits, "each digit may appear once")
        return tuple(sorted(digits))


@dataclass(frozen=True)
class FinetuneData(DataConfig):
    auto_k: int = setting(1, Rule(int, low=1, high=9))  # digits=auto: how many of the base's worst digits
    replay: float = setting(0.0, Rule(float, low=0, high=1, high_open=True))  # share of each batch from the other digits
    # The validation split's seed; null: the run's seed. Fixed across a sweep's seeds, every job
    # selects on the same images; 0 holds out what a seed-0 pretrain never trained on.
    split_seed: int | None = setting(None, Rule(int, low=0, high=2**32 - 1, optional=True))

    def check_digits(self, value) -> tuple[int, ...] | None:
        return None if value == "auto" else super().check_digits(value)


@dataclass(frozen=True)
class OptimConfig(Checked):
    KEY: ClassVar[str] = "optim"
    lr: float = setting(1e-3, Rule(float, low=0, low_open=True))
    scheduler: str = setting("none", Rule(str, choices=("none", "cosine")))  # cosine: decay to zero over the run


@dataclass(frozen=True)
class FinetuneOptim(OptimConfig):
    # LoRA+ (Hayou et al., 2024): B matrices (and DoRA magnitudes) learn this many times faster; the paper suggests 16.
    loraplus_ratio: float | None = setting(None, Rule(float, low=0, low_open=True, optional=True))


@dataclass(frozen=True)
class FinetuneConfig(Checked):
    KEY: ClassVar[str] = "finetune"
    method: str = setting("lora", Rule(str, choices=("lora", "full")))  # full: every parameter trained, the baseline
    distill: float = setting(0.0, Rule(float, low=0))  # weight of KL(base || model) on replayed images


@dataclass(frozen=True)
class EvalConfig(Checked):
    KEY: ClassVar[str] = "eval"
    adapters: tuple[str, ...] = ()  # adapter directories, tested one after the other on the same base
    merge: bool = setting(False, Rule(bool))  # merge each adapter into the weights before testing it


# QLoRA's NF4 blocks (Dettmers et al., 2023, section 3): 64 weights share one absmax constant, and
# 256 of those constants share one second-level constant (double quantization).
NF4_BLOCK, NF4_SCALER_BLOCK = 64, 256
# A layer that 64 does not divide gets the largest even block that does, down to this: a block of
# 16 already spends half a bit per weight on its 8-bit constant, an eighth of the 4-bit code.
MIN_BLOCK = 16


def largest_divisor(n: int, low: int, high: int, even: bool = False) -> int | None:
    return next((b for b in range(high, low - 1, -1) if n % b == 0 and not (even and b % 2)), None)


@dataclass(frozen=True)
class QuantConfig(Checked):
    """How the frozen base is stored while it is fine-tuned or evaluated: ``none`` keeps its fp32
    weights; ``nf4`` stores every Linear weight in 4-bit NormalFloat, ``int8`` in 8-bit integers
    with a scale per output row (loralab.quant); the biases stay fp32."""

    KEY: ClassVar[str] = "quant"
    BITS: ClassVar[dict[str, int]] = {"none": 32, "nf4": 4, "int8": 8}
    format: str = setting("none", Rule(str, choices=tuple(BITS)))

    @property
    def bits(self) -> int:
        return self.BITS[self.format]

    def blocks(self, shapes: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
        """Each layer's (block, scaler block): QLoRA's 64 and 256, or the largest that divide the
        layer's weights (an even block: two 4-bit codes share a byte) and its number of blocks."""
        if self.format != "nf4":
            return {}  # int8 scales whole rows: any shape fits
        found = {}
        for name, (n_in, n_out) in shapes.items():
            block = largest_divisor(n_in * n_out, MIN_BLOCK, NF4_BLOCK, even=True)
            if block is None:
                raise ConfigError(f"quant=nf4 needs an even block of {MIN_BLOCK}-{NF4_BLOCK} weights dividing {name}'s {n_in}x{n_out}, "
                                  "and none does; use quant=none, or other model.sizes")
            found[name] = (block, largest_divisor(n_in * n_out // block, 1, NF4_SCALER_BLOCK))
        return found

    def check(self, sizes: tuple[int, ...], trainer: dict) -> None:
        """The model's layers have blocks, and the run keeps to one process: torchao's tensors do
        not survive ddp_spawn's copy to another (NF4's clone quantizes again with the default
        blocks, which these layers' sizes need not fit; int8's does not pickle)."""
        self.blocks(layer_shapes(sizes))
        devices = trainer.get("devices", "auto")
        one = devices in ("auto", 1, "1", None) or (isinstance(devices, (list, tuple)) and len(devices) == 1)
        if self.format != "none" and not one:
            raise ConfigError(f"quant={self.format} runs in one process, and trainer.devices={trainer['devices']} asks for more "
                              "(torchao's quantized tensors do not survive ddp_spawn's copy); use accelerator=cpu or gpu")


@dataclass(frozen=True)
class Settings(Checked):
    """What every stage reads. A stage's root class adds its own nodes."""

    STAGE: ClassVar[str] = ""
    stage: StageConfig = setting(factory=StageConfig)
    model: ModelConfig = setting(factory=ModelConfig)
    data: DataConfig = setting(factory=DataConfig)
    trainer: dict[str, Any] = setting(factory=lambda: dict(TRAINER))  # lightning.Trainer's keyword arguments
    seed: int = setting(0, Rule(int, low=0, high=2**32 - 1))  # the range torch and Lightning seed from
    data_dir: str = "${oc.env:LORALAB_DATA_DIR,data}"
    output_root: str = "outputs"
    # Each test's confusion matrix as a TensorBoard image: about 0.3 s of matplotlib each, a tenth
    # of a 100-step fine-tune (experiment=frontier turns them off; the per-digit scalars stay).
    confusion_figures: bool = setting(True, Rule(bool))
    flush_denormal: bool = setting(True, Rule(bool))  # Adam's state goes subnormal on long CPU runs and steps slow down ~3x
    debug: bool = setting(False, Rule(bool))  # full tracebacks for input errors too
    verbose: bool = setting(False, Rule(bool))  # the console shows every log record and warning (train.log always has them)

    def __post_init__(self):
        self.check_rules()
        check_trainer(self.trainer, self.data.batch_size)
        limit = self.trainer.get("limit_test_batches")
        batches = -(-MNIST_TEST_IMAGES // self.data.eval_batch_size)
        if batches_left(batches, limit) == 0:
            # Every stage's results are its test: none would leave metrics.json without them.
            raise invalid("trainer.limit_test_batches", limit, f"leaves none of the {batches} test batches, and every result is a test; "
                          "raise it, or set it to null for all")


@dataclass(frozen=True)
class PretrainSettings(Settings):
    STAGE: ClassVar[str] = "pretrain"
    stage: StageConfig = setting(factory=lambda: StageConfig("pretrain"))
    optim: OptimConfig = setting(factory=OptimConfig)
    resume: str | None = None  # the run dir of an interrupted run, continued from its last checkpoint


@dataclass(frozen=True)
class FinetuneSettings(Settings):
    STAGE: ClassVar[str] = "finetune"
    stage: StageConfig = setting(factory=lambda: StageConfig("finetune"))
    data: FinetuneData = setting(factory=FinetuneData)
    optim: FinetuneOptim = setting(factory=FinetuneOptim)
    finetune: FinetuneConfig = setting(factory=FinetuneConfig)
    lora: LoRASpec = setting(factory=LoRASpec)  # read by method=lora; checked for a full fine-tune too: a typo is a typo
    quant: QuantConfig = setting(factory=QuantConfig)  # the frozen base's storage (quant=nf4: QLoRA's)
    base: str | None = None  # a pretrain run dir or base.safetensors; null: the newest pretrain run
    resume: str | None = None
    # A point of an arm's lr grid (conf/arm/): lr = 10^(the arm's exponent + lr_step / 2). Read by
    # the arm configs' optim.lr; without an arm, set optim.lr itself.
    lr_step: int = setting(0, Rule(int, low=-8, high=8))

    def __post_init__(self):
        super().__post_init__()
        if self.finetune.distill and not self.data.replay:
            raise invalid("finetune.distill", self.finetune.distill, "distillation acts on replayed images; set data.replay > 0 too")
        if self.data.replay:
            # DigitBatchSampler replays round(replay * batch) images of each batch.
            batch, replayed = self.data.batch_size, round(self.data.replay * self.data.batch_size)
            if replayed >= batch or replayed == 0:
                what = "all of it, none of the target digits" if replayed else "none of it"
                raise invalid("data.replay", self.data.replay, f"at data.batch_size={batch} it replays {replayed} of each batch "
                              f"({what}); choose a share that replays 1 to {batch - 1} ({1 / batch:.3g} to {(batch - 1) / batch:.3g}), or a larger batch")
        if self.optim.loraplus_ratio is not None and self.finetune.method != "lora":
            raise invalid("optim.loraplus_ratio", self.optim.loraplus_ratio,
                          "LoRA+ sets the adapters' B learning rate; a full fine-tune has none (leave it null)")
        shapes = layer_shapes(self.model.sizes)
        self.quant.check(self.model.sizes, self.trainer)
        if self.quant.format != "none":
            # A 4- or 8-bit code cannot hold a trained or rewritten weight: QLoRA trains adapters only.
            if self.finetune.method == "full":
                raise invalid("finetune.method", "full", f"a full fine-tune trains the base weights, which quant={self.quant.format} stores "
                              f"frozen in {self.quant.bits} bits; use quant=none, or finetune.method=lora")
            if self.lora.init == "pissa":
                raise invalid("lora.init", "pissa", f"PiSSA rewrites the base to W - BA, which quant={self.quant.format} cannot store "
                              "exactly (PEFT refuses it too); use quant=none")
        try:
            names = match_targets(shapes, self.lora.targets)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        for key in ("rank_pattern", "alpha_pattern"):
            for pattern in getattr(self.lora, key):
                if not any(pattern_key({pattern: None}, n) is not None for n in names):
                    raise ConfigError(f"lora.{key} key {pattern!r} names none of the adapted layers ({', '.join(names)}); "
                                      "name one of them, or drop the key")
        for name in names:
            # B·A has rank at most min(in, out); ranks up to max(in, out) stay open for study, a
            # rank above both sizes only allocates (lora.rank=100000 would take gigabytes).
            if self.lora.rank_of(name) > max(shapes[name]):
                own = pattern_key(self.lora.rank_pattern, name)
                raise invalid("lora.rank" if own is None else f"lora.rank_pattern.{own}", self.lora.rank_of(name),
                              f"above both of {name}'s sizes {tuple(shapes[name])}, where B·A has rank ≤ {min(shapes[name])}; "
                              f"lower it to at most {max(shapes[name])}")
        if self.lora.init == "pissa":
            # PiSSA starts from W's top-r singular triplets: a layer has min(in, out) of them. Any
            # other adapter may be wider than that (its update's rank is still at most min(in, out)).
            for name in names:
                if self.lora.rank_of(name) > min(shapes[name]):
                    own = pattern_key(self.lora.rank_pattern, name)
                    key = "lora.rank" if own is None else f"lora.rank_pattern.{own}"
                    raise invalid(key, self.lora.rank_of(name), f"PiSSA needs at most {name}'s {min(shapes[name])} singular "
                                  f"vectors; lower it, or give {name} its own rank with lora.rank_pattern")

    @property
    def adapter(self) -> LoRASpec | None:
        """The adapter a LoRA fine-tune trains; None for a full fine-tune."""
        return self.lora if self.finetune.method == "lora" else None


@dataclass(frozen=True)
class EvalSettings(Settings):
    STAGE: ClassVar[str] = "eval"
    stage: StageConfig = setting(factory=lambda: StageConfig("eval"))
    eval: EvalConfig = setting(factory=EvalConfig)
    base: str | None = None
    quant: QuantConfig = setting(factory=QuantConfig)

    def __post_init__(self):
        super().__post_init__()
        self.quant.check(self.model.sizes, self.trainer)
        if self.eval.merge and self.quant.format != "none":
            raise invalid("eval.merge", "true", f"merging adds each adapter to the base weights, which quant={self.quant.format} stores "
                          f"in {self.quant.bits} bits; test it unmerged, or use quant=none")


@dataclass(frozen=True)
class Job:
    """One run of a stage: its settings, the composed config they were built from (metrics.json's
    ``config``, and what a resumed run is compared with), and, in a sweep, this job's values of
    the keys the sweep varies ({"lora.rank": 2}), which TensorBoard's HParams table shows first."""

    settings: Settings
    composed: dict[str, Any]
    sweep: dict[str, Any] = setting(factory=dict)


SCHEMAS: dict[str, type[Settings]] = {cls.STAGE: cls for cls in (PretrainSettings, FinetuneSettings, EvalSettings)}


def flat(container: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict's leaves under dotted keys, as the command line names them ("lora.rank")."""
    if not isinstance(container, dict):
        return {prefix[:-1]: container}
    return {k: v for key, value in container.items() for k, v in flat(value, f"{prefix}{key}.").items()}


def batches_left(batches: int, limit) -> int:
    """How many of ``batches`` a ``trainer.limit_*_batches`` value keeps, as Lightning counts them:
    a count caps them, a fraction keeps that share rounded down, null keeps all."""
    if not isinstance(limit, (int, float)) or isinstance(limit, bool):
        return batches  # null, or a value Lightning's own check refuses
    return min(batches, limit) if isinstance(limit, int) else int(batches * limit)


def check_trainer(trainer: dict, batch_size: int) -> None:
    """The trainer.* rules that are loralab's, not Lightning's (those run in load_job)."""
    if trainer.get("max_steps", -1) != -1 and not Rule(int, low=1).allows(trainer["max_steps"]):
        raise invalid("trainer.max_steps", trainer["max_steps"], "expected an integer ≥ 1 (or -1: no limit)")
    if trainer.get("max_epochs") is not None and not Rule(int, low=1).allows(trainer["max_epochs"]):
        raise invalid("trainer.max_epochs", trainer["max_epochs"], "expected an integer ≥ 1 (or null)")
    if trainer.get("accelerator") in ("gpu", "cuda") and not cuda_available():
        raise ConfigError("accelerator=gpu but no CUDA GPU is visible; use accelerator=cpu (or auto)")
    devices, strategy = trainer.get("devices", "auto"), trainer.get("strategy", "auto")
    if devices in ("auto", 1, "1", None) or isinstance(devices, list):
        return
    if not Rule(int, low=1).allows(devices):
        raise invalid("trainer.devices", devices, "expected an integer ≥ 1")
    if strategy not in ("ddp_spawn", "auto"):
        # ddp re-runs train.py for each extra rank: every rank would run the whole stage and write
        # its files, and under -m each would rerun the sweep (Lightning issue #11300).
        raise invalid("trainer.strategy", strategy, "several devices run with ddp_spawn here; use accelerator=ddp, or leave trainer.strategy=auto")
    if batch_size % devices:
        raise invalid("data.batch_size", batch_size, f"must divide evenly among trainer.devices={devices}, so each rank takes an equal share of every batch")


def cuda_available() -> bool:
    import torch  # only when a GPU is asked for: everything else here is checked without torch

    return torch.cuda.is_available()


def _writable(node: DictConfig) -> DictConfig:
    """The schema's records are frozen once built, but Hydra must merge the YAML and the command
    line into them while composing: OmegaConf marks a frozen dataclass's node read-only."""
    OmegaConf.set_readonly(node, None)
    for key in node:
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            _writable(child)
    return node


# Mappings whose keys are the user's (layer names), so lora.rank_pattern={linear3:8} needs no "+":
# Hydra's struct mode would refuse a key the schema's empty default does not have.
OPEN_KEYS = ("lora.rank_pattern", "lora.alpha_pattern")


def register() -> None:
    """``schema/<stage>`` in Hydra's ConfigStore, merged at the config's root."""
    store = ConfigStore.instance()
    for name, schema in SCHEMAS.items():
        node = _writable(OmegaConf.structured(schema))
        for key in OPEN_KEYS:
            if OmegaConf.select(node, key) is not None:
                OmegaConf.set_struct(OmegaConf.select(node, key), False)
        store.store(group="schema", name=name, node=node, package="_global_")


register()
# A sweep's job directories are named by their overrides, less the stage (the sweep dir names it)
# and the incidental keys (paths would nest directories).
OmegaConf.register_new_resolver("loralab_dirname_excludes", lambda: ["stage", *INCIDENTAL], replace=True)
# alpha=double (conf/alpha/double.yaml): alpha = 2 r, which an interpolation cannot multiply.
OmegaConf.register_new_resolver("loralab_times", lambda factor, value: float(factor) * float(value), replace=True)
# An arm's lr grid (conf/arm/): 10^(exponent + step / 2), half-decade steps, to 3 significant digits.
OmegaConf.register_new_resolver("loralab_grid", lambda exponent, step: float(f"{10 ** (float(exponent) + int(step) / 2):.3g}"), replace=True)


def load_job(cfg: DictConfig, sweep: dict[str, Any] | None = None) -> Job:
    """The composed config as the stage's frozen settings, every check run, Lightning's last:
    it takes seconds to import, and a typo in any other key should not wait for it."""
    schema = SCHEMAS.get(cfg.stage.name)
    if schema is None or OmegaConf.get_type(cfg) is not schema:
        raise ConfigError(f"stage.name={cfg.stage.name!r} does not match the settings composed; choose the stage with stage=<{'|'.join(SCHEMAS)}>")
    if key := extra_key(cfg, schema):
        raise unknown_key(key, schema.STAGE, f"+{key}")
    settings = OmegaConf.to_object(cfg)
    from loralab.trainer_args import check_trainer_args, trainer_kwargs

    check_trainer_args(trainer_kwargs(settings.trainer))
    return Job(settings, OmegaConf.to_container(cfg, resolve=True), sweep or {})


def stages_with(key: str) -> list[str]:
    """The stages whose settings have ``key`` ("lora.rank"): what a misplaced key's error names."""
    return [name for name, schema in SCHEMAS.items() if field_of(schema, key) is not None]


def field_of(schema: type, key: str):
    """The dataclass field ``key`` names in ``schema`` (dotted), or None. A key inside a dict
    (trainer.*) is the dict's field."""
    node, found = schema, None
    for part in key.split("."):
        if not is_dataclass(node):
            return found
        found = next((f for f in fields(node) if f.name == part), None)
        if found is None:
            return None
        node = typing.get_type_hints(node).get(part)
    return found


def expected(schema: type, key: str) -> str | None:
    """What ``key`` may hold, in the words of its rule; None when it has no rule."""
    found = field_of(schema, key)
    rule = found.metadata.get("rule") if found is not None else None
    return rule.expected if rule else None



def node_fields(schema: type, key: str) -> list[str]:
    """The keys of the node ``key`` names in ``schema`` ("" for the root)."""
    node = schema
    for part in filter(None, key.split(".")):
        node = typing.get_type_hints(node).get(part) if is_dataclass(node) else None
    return [f.name for f in fields(node)] if is_dataclass(node) else []


def unknown_key(key: str, stage: str, written: str) -> ConfigError:
    """``key``, set by ``written`` on the command line, is not in stage=``stage``'s settings:
    either another stage reads it (stage=pretrain lora.rank=4) or no stage has it (a typo)."""
    stages = [s for s in stages_with(key) if s != stage]
    if stages:
        fix = f"add stage={stages[0]}" if len(stages) == 1 else "run one of those stages"
        return ConfigError(f"{written} is read only by {' and '.join(f'stage={s}' for s in stages)}, "
                           f"so this stage={stage} run has no such setting; {fix}, or drop {written}")
    parent, _, name = key.rpartition(".")
    keys = node_fields(SCHEMAS[stage], parent)
    return ConfigError(f"{written} is not a setting: {parent or 'the config'} has no key {name!r}"
                       + (f"; its keys are {', '.join(keys)}" if keys else ""))


def extra_key(cfg: DictConfig, schema: type, prefix: str = "") -> str | None:
    """The first key of ``cfg`` (added with +key=) that ``schema`` does not define."""
    known = {f.name: typing.get_type_hints(schema)[f.name] for f in fields(schema)}
    for key in cfg:
        if key not in known:
            value = cfg._get_node(key)
            leaf = next(iter(flat(OmegaConf.to_container(value)))) if isinstance(value, DictConfig) and len(value) else ""
            return f"{prefix}{key}" + (f".{leaf}" if leaf else "")
        child = cfg._get_node(key)
        if isinstance(child, DictConfig) and is_dataclass(known[key]) and (found := extra_key(child, known[key], f"{prefix}{key}.")):
            return found
    return None

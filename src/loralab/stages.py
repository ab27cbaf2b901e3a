"""The stages users run: ``pretrain`` trains the base on all digits, ``finetune`` adapts it on a
digit subset, ``eval`` tests a base with several adapters. Each returns metrics.json's contents,
the contract with users, scripts and tests."""

from __future__ import annotations

import functools
import logging
import resource
import statistics
import subprocess
import sys
import time
from functools import partial
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor
from torch import nn

from loralab.adapter import AdapterSet
from loralab.callbacks import ResumeHint
from loralab.classifier import Classifier
from loralab.config import EvalSettings, FinetuneSettings, Job, PretrainSettings, Settings, batches_left
from loralab.dashboard import add_forgetting_chart, hp_results, log_hparams
from loralab.data import MNISTDataModule
from loralab.errors import ArtifactError, ConfigError, DataError
from loralab.files import raise_thread_write_failure, short, write_json
from loralab.inject import count_parameters, lora_disabled, merge_lora, unmerge_lora
from loralab.methods import base_result, make_method
from loralab.model import MLP
from loralab.modelcard import AdapterCard, write_card
from loralab.monitors import monitors
from loralab.report import digit_table, show
from loralab.results import Shift, TestResult
from loralab.runs import BASE_FILE, METRICS_FILE, resolve_base, worst_digits
from loralab.trainer import fit, last_checkpoint, make_trainer, resume_checkpoint, run_command, run_test, tester
from loralab.trainer_args import check_trainer_args, trainer_kwargs
from loralab.weights import HeldBase, file_sha256, hold_base, save_base

log = logging.getLogger(__name__)

PACKAGES = ("loralab", "torch", "lightning", "torchmetrics", "hydra-core", "safetensors")


def make_datamodule(cfg: Settings, digits: list[int]) -> MNISTDataModule:
    """Prepared and set up here, so data loading is not counted in the fit seconds."""
    replay, split_seed = getattr(cfg.data, "replay", 0.0), getattr(cfg.data, "split_seed", None)  # a fine-tune's settings
    datamodule = MNISTDataModule(cfg.data_dir, digits, cfg.data.batch_size, cfg.data.eval_batch_size, cfg.data.val_size, replay, cfg.seed,
                                 split_seed)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def check_batches(cfg: Settings, datamodule: MNISTDataModule) -> None:
    """load_job's trainer check again, now that the number of training batches is known
    (val_check_interval may not exceed it), before the Trainer writes its first file. A run with
    nothing to train on would write metrics.json with status ok."""
    batches = len(datamodule.train_dataloader())
    if batches == 0:
        raise DataError(f"no training images of digits {datamodule.digits} are left once data.val_size={cfg.data.val_size} are held out; "
                        "lower data.val_size")
    limit = cfg.trainer.get("limit_train_batches")
    if batches_left(batches, limit) == 0:
        raise ConfigError(f"trainer.limit_train_batches={limit} leaves none of the {batches} training batches, so nothing would train; "
                          "raise it, or set it to null for all")
    check_trainer_args(trainer_kwargs(cfg.trainer), train_batches=batches)


def fit_callbacks(run_dir: Path, module: Classifier, extra: list = ()) -> list:
    """The resume hint, the run's monitors (step time, optimizer state, divergence), the method's
    own, and a learning-rate curve (train/lr) when a scheduler moves the rate (a constant one
    would only repeat optim.lr)."""
    lr_monitor = [LearningRateMonitor(logging_interval="step")] if module.scheduler != "none" else []
    return [ResumeHint(run_dir), *monitors(module.lr), *extra, *lr_monitor]


def provenance() -> dict:
    """The installed versions and the git commit, read once per process: a process runs the code it
    imported, whatever is committed while its sweep runs (whose 225 jobs would spawn git 225 times)."""
    versions, commit = code_identity()
    return {"versions": dict(versions), "git_commit": commit}


@functools.cache
def code_identity() -> tuple[tuple[tuple[str, str | None], ...], str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return tuple(versions.items()), commit


def peak_rss_bytes() -> int:
    """The process's peak resident memory so far (Linux reports kilobytes, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def run_metrics(cfg: Settings, model: nn.Module, digits: list[int]) -> dict:
    return {
        "stage": cfg.stage.name,
        "status": "ok",
        "model": {"name": cfg.model.name, "sizes": list(model.sizes)},
        "digits": digits,
        "seed": cfg.seed,
        "params": count_parameters(model),
        "peak_rss_bytes": peak_rss_bytes(),  # the process's peak so far: in a sweep, over the jobs before this one too
    }


def pretrain(job: Job, run_dir: Path) -> dict:
    cfg: PretrainSettings = job.settings
    digits = list(cfg.data.digits)
    datamodule = make_datamodule(cfg, digits)
    check_batches(cfg, datamodule)
    model = MLP(list(cfg.model.sizes))
    module = Classifier(model, lr=cfg.optim.lr, target_digits=digits, scheduler=cfg.optim.scheduler, confusion_figures=cfg.confusion_figures)
    ckpt = resume_checkpoint(job)
    trainer = make_trainer(cfg, run_dir, fit_callbacks(run_dir, module), checkpoint=True)
    fitted = fit(trainer, module, datamodule, ckpt)
    start = time.perf_counter()
    test = run_test(tester(trainer, cfg, run_dir), module, datamodule)
    test_s = time.perf_counter() - start
    sha = save_base(model, run_dir / BASE_FILE, cfg.model.name)
    metrics = run_metrics(cfg, model, digits) | {
        "test": test.to_json(),
        "base_sha256": sha,
        "seconds": {"fit": fitted.seconds, "test": test_s, "step": fitted.step_seconds},
        "artifacts": {"base": str(run_dir / BASE_FILE), "checkpoint": last_checkpoint(run_dir), "tensorboard": str(run_dir)},
    }
    log_hparams(trainer, job, digits, results=hp_results(test, Shift.between(test, test, digits)))
    show(f"\nPretrained {cfg.model.name} on MNIST, test set (10,000 images):\n{digit_table(test)}")
    return metrics


def finetune(job: Job, run_dir: Path) -> dict:
    cfg: FinetuneSettings = job.settings
    base_path = resolve_base(cfg.base, cfg.output_root, list(cfg.model.sizes))
    digits = list(cfg.data.digits) if cfg.data.digits else worst_digits(base_path, cfg.data.auto_k)
    base_file_sha = file_sha256(base_path)
    model, base_meta, held = hold_base(base_path, list(cfg.model.sizes), cfg.quant)
    log.info("fine-tuning base %s on digits %s", base_path, digits)
    datamodule = make_datamodule(cfg, digits)
    check_batches(cfg, datamodule)
    method = make_method(cfg, model, held, base_path)
    module = Classifier(model, lr=cfg.optim.lr, target_digits=digits, scheduler=cfg.optim.scheduler, distill=cfg.finetune.distill,
                        frozen_base=method.frozen_base, loraplus_ratio=cfg.optim.loraplus_ratio, confusion_figures=cfg.confusion_figures)
    ckpt = resume_checkpoint(job)
    trainer = make_trainer(cfg, run_dir, fit_callbacks(run_dir, module, method.callbacks()), checkpoint=True)
    add_forgetting_chart(trainer)
    test = partial(run_test, tester(trainer, cfg, run_dir), module, datamodule)
    method.prepare(module)  # LoRA: the adapters are attached here, once
    # The images, and how the base is run on them (bf16 gives other results than fp32).
    data = (str(Path(cfg.data_dir).resolve()), str(trainer.precision), type(trainer.accelerator).__name__)
    shared = partial(log_result, trainer, module)
    with lora_disabled(model):  # before training: a full fine-tune trains the base itself
        test_base = base_result(test, "test_base", method.base_sha256, data, shared)
        val_base = base_result(test, "val_base", method.base_sha256, (*data, cfg.data.val_size, datamodule.split_seed), shared)
    fitted = fit(trainer, module, datamodule, ckpt)
    base_comparison = method.compare_base(model)
    start = time.perf_counter()
    result = test("test")
    test_s = time.perf_counter() - start
    val = test("val_final")  # what an lr is selected on (loralab.selection), never the test
    check_base_file(base_path, base_file_sha, base_meta, held.weights_sha256)
    artifacts = method.save(model, run_dir, cfg)
    shift = Shift.between(test_base, result, digits)
    metrics = run_metrics(cfg, model, digits) | {
        "method": method.name,
        "test": result.to_json(),
        "test_base": test_base.to_json(),
        "val": val.to_json(),
        "val_base": val_base.to_json(),
        "val_split": {"seed": datamodule.split_seed, "size": cfg.data.val_size},
        "forgetting": shift.forgetting,
        "objective": shift.objective,
        "lora": method.summary(),
        "base": str(base_path),
        "base_sha256": method.base_sha256,
        "base_file_sha256": base_file_sha,
        "quant": held.to_json(),
        **base_comparison,
        "optimizer_state_bytes": fitted.optimizer_state_bytes,
        "artifact_bytes": sum(Path(p).stat().st_size for p in artifacts.values()),
        "seconds": {"fit": fitted.seconds, "test": test_s, "step": fitted.step_seconds},
        "artifacts": {k: str(v) for k, v in artifacts.items()} | {"checkpoint": last_checkpoint(run_dir), "tensorboard": str(run_dir)}
        | model_card(cfg, run_dir, base_path, base_file_sha, held.weights_sha256, digits, test_base, result),
    }
    log_hparams(trainer, job, digits, method.summary(), hp_results(result, shift))
    show(f"\n{method.describe()}{held_note(held)} on digits {digits}, test set, base -> fine-tuned:\n{digit_table(result, before=test_base, digits=digits)}")
    return metrics


def held_note(held: HeldBase) -> str:
    """How a quantized base is held, as the run's summary says it; nothing for fp32."""
    return f", base in {held.format.upper()} ({held.held_bytes / 1e6:.2f} MB, fp32 {held.fp32_bytes / 1e6:.2f} MB)" if held.quantized else ""


def log_result(trainer: L.Trainer, module: Classifier, result: TestResult, split: str) -> None:
    if trainer.logger is not None:
        trainer.logger.log_metrics(module.scalars(result, split), step=0)


def model_card(cfg: FinetuneSettings, run_dir: Path, base_path: Path, base_file_sha: str, base_sha: str, digits: list[int],
               before: TestResult, after: TestResult) -> dict:
    """README.md beside a LoRA adapter (outside artifact_bytes, which measures the adapter)."""
    if cfg.adapter is None:
        return {}
    card = AdapterCard(cfg.adapter, cfg.model.name, list(cfg.model.sizes), base_path.resolve(), base_file_sha, base_sha, digits, before, after, run_command(run_dir))
    return {"model_card": str(write_card(run_dir, card))}


def check_base_file(base_path: Path, file_sha: str, meta: dict, weights_sha: str) -> None:
    """Before any artifact is written: the base file is the one the run started from."""
    if meta.get("weights_sha256") not in (None, weights_sha):
        log.warning("%s records weights sha256 %s but holds %s: the file was changed after pretraining",
                    base_path, meta["weights_sha256"][:12], weights_sha[:12])
    if file_sha256(base_path) != file_sha:
        raise ArtifactError(f"{short(base_path)} changed on disk during this run; something else is writing to it")


def evaluate(job: Job, run_dir: Path) -> dict:
    """The base alone, then each adapter switched in by name on the same loaded base."""
    cfg: EvalSettings = job.settings
    digits = list(cfg.data.digits)
    base_path = resolve_base(cfg.base, cfg.output_root, list(cfg.model.sizes))
    start = time.perf_counter()
    model, _, held = hold_base(base_path, list(cfg.model.sizes), cfg.quant)
    load_s = time.perf_counter() - start
    adapters = AdapterSet(model, held.weights_sha256, held.format)
    for directory in cfg.eval.adapters:  # read them all before testing anything
        name = Path(directory).name
        adapters.add(name if name not in adapters.adapters else f"{name}-{len(adapters.adapters)}", directory)
    datamodule = make_datamodule(cfg, digits)
    trainer = make_trainer(cfg, run_dir, [], checkpoint=False, testing=True)
    test = partial(run_test, trainer, Classifier(model, target_digits=digits, confusion_figures=cfg.confusion_figures), datamodule)
    start = time.perf_counter()
    base_result = test("test")
    test_s = time.perf_counter() - start
    results, switch_s = {}, []
    for name, (_, _, source) in adapters.adapters.items():
        start = time.perf_counter()
        adapters.use(name)
        switch_s.append(time.perf_counter() - start)
        if cfg.eval.merge:
            merge_lora(model)
        result = test(f"test_{name}")
        unmerge_lora(model)
        results[name] = {"path": source, "merged": cfg.eval.merge, "test": result.to_json()}
        show(f"\nadapter {name} ({'merged' if cfg.eval.merge else 'unmerged'}), base -> adapter:\n{digit_table(result, before=base_result, digits=digits)}")
    adapters.use(None)
    log_hparams(trainer, job, digits)
    return run_metrics(cfg, model, digits) | {
        "test": base_result.to_json(),
        "base": str(base_path),
        "quant": held.to_json(),
        "adapters": results,
        "seconds": {"fit": 0.0, "test": test_s, "base_load": load_s, "adapter_switch": statistics.median(switch_s) if switch_s else None},
        "artifacts": {"tensorboard": str(run_dir)},
    }


# Each stage's function, by the type of its settings: the schema names the stages.
RUNS = {PretrainSettings: pretrain, FinetuneSettings: finetune, EvalSettings: evaluate}


def run_stage(job: Job, run_dir: Path) -> dict:
    L.seed_everything(job.settings.seed, workers=True, verbose=False)
    metrics = RUNS[type(job.settings)](job, run_dir)
    metrics |= provenance() | {"config": job.composed}
    raise_thread_write_failure()  # a TensorBoard file left short by a full disk fails the run
    write_json(run_dir / METRICS_FILE, metrics)
    return metrics

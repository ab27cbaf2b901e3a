"""The stages users run: ``pretrain`` trains the base on all digits, ``finetune`` adapts it with
LoRA on a digit subset. Each writes metrics.json, the contract with users, scripts and tests."""

from __future__ import annotations

import copy
import json
import logging
import statistics
import subprocess
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from loralab.adapter import AdapterSet, save_adapter
from loralab.callbacks import LoRAFinetuning, ResumeHint
from loralab.classifier import Classifier
from loralab.data import MNISTDataModule
from loralab.errors import ArtifactError
from loralab.files import write_json
from loralab.lora import count_parameters, lora_disabled, lora_layers, merge_lora, unmerge_lora
from loralab.malloc import keep_freed_memory
from loralab.model import MLP
from loralab.report import digit_table, split_wrong
from loralab.trainer import last_checkpoint, make_trainer, resume_checkpoint, tester
from loralab.validate import check_digits
from loralab.weights import BASE_FILE, FULL_FILE, file_sha256, fingerprint, load_base, resolve_base, save_base

log = logging.getLogger(__name__)

PACKAGES = ("loralab", "torch", "lightning", "torchmetrics", "hydra-core", "safetensors")


def make_datamodule(cfg: DictConfig, digits: list[int]) -> MNISTDataModule:
    """Prepared and set up here, so data loading is not counted in the fit seconds."""
    datamodule = MNISTDataModule(
        data_dir=cfg.data_dir,
        digits=digits,
        batch_size=cfg.data.batch_size,
        eval_batch_size=cfg.data.eval_batch_size,
        val_size=cfg.data.val_size,
        replay=cfg.data.replay,
        seed=cfg.seed,
    )
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def timed(fn, *args, **kwargs) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def provenance() -> dict:
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
    return {"versions": versions, "git_commit": commit}


def log_hparams(trainer: L.Trainer, cfg: DictConfig, metrics: dict) -> None:
    """One HParams entry per run, with its final results, so TensorBoard compares runs side by side."""
    hparams = {
        "stage": cfg.stage.name, "model": cfg.model.name, "seed": cfg.seed, "lr": cfg.optim.lr,
        "batch_size": cfg.data.batch_size, "digits": " ".join(map(str, metrics["digits"])),
        "max_steps": cfg.trainer.max_steps, "max_epochs": cfg.trainer.max_epochs or -1, "replay": cfg.data.replay,
    }
    if metrics.get("lora"):
        hparams.update({f"lora.{k}": v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in metrics["lora"].items()})
    before = metrics.get("test_base", metrics["test"])
    (tb, ob), (ta, oa) = split_wrong(before, metrics["digits"]), split_wrong(metrics["test"], metrics["digits"])
    results = {"hp/test_acc": metrics["test"]["acc"], "hp/target_wrong": ta, "hp/other_wrong": oa,
               "hp/target_gain": tb - ta, "hp/forgetting": oa - ob}
    trainer.logger.log_hyperparams(hparams, results)
    trainer.logger.save()


def base_metrics(cfg: DictConfig, model: MLP, digits: list[int]) -> dict:
    return {
        "stage": cfg.stage.name,
        "status": "ok",
        "model": {"name": cfg.model.name, "sizes": list(model.sizes)},
        "digits": digits,
        "seed": cfg.seed,
        "params": count_parameters(model),
    }


def pretrain(cfg: DictConfig, run_dir: Path) -> dict:
    digits = check_digits(cfg.data.digits)
    datamodule = make_datamodule(cfg, digits)
    model = MLP(list(cfg.model.sizes))
    module = Classifier(model, lr=cfg.optim.lr, target_digits=digits, scheduler=cfg.optim.scheduler)
    ckpt = resume_checkpoint(cfg) if cfg.resume else None
    trainer = make_trainer(cfg, run_dir, [ResumeHint(run_dir)], checkpoint=True)
    # weights_only: a checkpoint is data; unpickling arbitrary objects from it could run code.
    fit_s = timed(trainer.fit, module, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)
    test_s = timed(tester(trainer, cfg, run_dir).test, module, datamodule=datamodule, verbose=False)
    sha = save_base(model, run_dir / BASE_FILE, cfg.model.name)
    metrics = base_metrics(cfg, model, digits) | {
        "test": module.last_test,
        "base_sha256": sha,
        "seconds": {"fit": fit_s, "test": test_s},
        "artifacts": {
            "base": str(run_dir / BASE_FILE),
            "checkpoint": last_checkpoint(run_dir),
            "tensorboard": str(run_dir),
        },
    }
    log_hparams(trainer, cfg, metrics)
    print(f"\nPretrained {cfg.model.name} on MNIST, test set (10,000 images):\n{digit_table(module.last_test)}")
    return metrics


def worst_digits(base_path: Path, k: int) -> list[int]:
    """digits=auto: the k digits with the highest error rate in the base's own metrics.json."""
    metrics_file = base_path.parent / "metrics.json"
    if not metrics_file.exists():
        raise ArtifactError(f"digits=auto needs the base's metrics.json, not found beside {base_path}; name the digits instead (data.digits=[...])")
    test = json.loads(metrics_file.read_text())["test"]
    rates = [w / c for w, c in zip(test["wrong"], test["count"])]
    return sorted(sorted(range(10), key=lambda d: -rates[d])[:k])


class BaseChangedError(RuntimeError):
    """The frozen base weights changed during LoRA training: a bug, never a silent pass."""


def finetune(cfg: DictConfig, run_dir: Path) -> dict:
    sizes = list(cfg.model.sizes)
    base_path = resolve_base(cfg.base, cfg.output_root, sizes)
    digits = worst_digits(base_path, cfg.data.auto_k) if cfg.data.digits == "auto" else check_digits(cfg.data.digits)
    base_file_sha = file_sha256(base_path)
    model, base_meta = load_base(base_path, sizes)
    log.info("fine-tuning base %s on digits %s", base_path, digits)
    datamodule = make_datamodule(cfg, digits)
    method = cfg.finetune.method
    # A full fine-tune trains the base itself, so distillation needs a frozen copy of it.
    frozen = copy.deepcopy(model).requires_grad_(False) if method == "full" and cfg.finetune.distill else None
    module = Classifier(model, lr=cfg.optim.lr, target_digits=digits, distill=cfg.finetune.distill, frozen_base=frozen)
    lora = LoRAFinetuning(**OmegaConf.to_container(cfg.lora, resolve=True)) if method == "lora" else None
    ckpt = resume_checkpoint(cfg) if cfg.resume else None
    callbacks = [ResumeHint(run_dir)] + ([lora] if lora else [])
    trainer = make_trainer(cfg, run_dir, callbacks, checkpoint=True)
    testing = tester(trainer, cfg, run_dir)
    base_sha = fingerprint(model)
    if lora:
        # Injected here as well as in every rank's setup (idempotent): ddp_spawn hands rank 0's
        # weights back to this process, and only a model with the same adapters takes them.
        lora.freeze_before_training(module)
    if method == "full":
        # No adapter to switch off afterwards: test the base before it is trained.
        test_base = test_as(testing, module, datamodule, "test_base")
    fit_s = timed(trainer.fit, module, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)
    base_unchanged = None
    if lora:
        # Checked here, on the weights the run keeps (under ddp_spawn, the ones rank 0 sent back).
        after = fingerprint(model)
        if after != base_sha:
            raise BaseChangedError(f"base weights changed during LoRA training: sha256 {base_sha} -> {after}")
        base_unchanged = True
    state_bytes = int(trainer.callback_metrics["optimizer_state_bytes"])  # read before a test resets it
    start = time.perf_counter()
    test = test_as(testing, module, datamodule, "test")
    test_s = time.perf_counter() - start
    if method == "lora":
        with lora_disabled(model):
            test_base = test_as(testing, module, datamodule, "test_base")
    if base_meta.get("weights_sha256") not in (None, base_sha):
        log.warning("%s records weights sha256 %s but holds %s: the file was changed after pretraining",
                    base_path, base_meta["weights_sha256"][:12], base_sha[:12])
    if file_sha256(base_path) != base_file_sha:  # checked before any artifact of this run is written
        raise ArtifactError(f"{base_path} changed on disk during this run; something else is writing to it")
    if method == "lora":
        artifacts = save_adapter(model, run_dir, sizes)
    else:
        save_base(model, run_dir / FULL_FILE, cfg.model.name)
        artifacts = {"model": run_dir / FULL_FILE}
    (tb, ob), (ta, oa) = split_wrong(test_base, digits), split_wrong(test, digits)
    metrics = base_metrics(cfg, model, digits) | {
        "method": method,
        "test": test,
        "test_base": test_base,
        "forgetting": oa - ob,
        # What a sweeper maximises: target-digit errors fixed minus errors caused elsewhere.
        "objective": (tb - ta) - (oa - ob),
        "lora": lora_summary(model, cfg) if lora else None,
        "base": str(base_path),
        "base_sha256": base_sha,
        "base_file_sha256": base_file_sha,
        "base_unchanged": base_unchanged,
        "optimizer_state_bytes": state_bytes,
        "artifact_bytes": sum(Path(p).stat().st_size for p in artifacts.values()),
        "seconds": {"fit": fit_s, "test": test_s},
        "artifacts": {k: str(v) for k, v in artifacts.items()} | {"checkpoint": last_checkpoint(run_dir), "tensorboard": str(run_dir)},
    }
    log_hparams(trainer, cfg, metrics)
    what = f"LoRA rank {metrics['lora']['rank']}, alpha {metrics['lora']['alpha']:g}" if lora else "full fine-tune"
    print(f"\n{what} on digits {digits}, test set, base -> fine-tuned:")
    print(digit_table(test, before=test_base, digits=digits))
    return metrics


def test_as(trainer: L.Trainer, module: Classifier, datamodule: MNISTDataModule, prefix: str) -> dict:
    module.test_prefix = prefix
    trainer.test(module, datamodule=datamodule, verbose=False)
    module.test_prefix = "test"
    return module.last_test


def lora_summary(model, cfg: DictConfig) -> dict:
    layer = next(iter(lora_layers(model).values()))
    targets = cfg.lora.targets if isinstance(cfg.lora.targets, str) else list(cfg.lora.targets)
    return {
        "rank": layer.rank, "alpha": layer.alpha, "scale": layer.scale, "targets": targets,
        "dropout": cfg.lora.dropout, "init": cfg.lora.init, "rslora": cfg.lora.rslora,
    }


def evaluate(cfg: DictConfig, run_dir: Path) -> dict:
    """The base alone, then each adapter switched in by name on the same loaded base."""
    sizes, digits = list(cfg.model.sizes), check_digits(cfg.data.digits)
    base_path = resolve_base(cfg.base, cfg.output_root, sizes)
    start = time.perf_counter()
    model, _ = load_base(base_path, sizes)
    load_s = time.perf_counter() - start
    adapters = AdapterSet(model)
    for directory in cfg.eval.adapters:  # read them all before testing anything
        name = Path(directory).name
        adapters.add(name if name not in adapters.adapters else f"{name}-{len(adapters.adapters)}", directory)
    datamodule = make_datamodule(cfg, digits)
    module = Classifier(model, target_digits=digits)
    trainer = make_trainer(cfg, run_dir, [], checkpoint=False, testing=True)
    start = time.perf_counter()
    test = test_as(trainer, module, datamodule, "test")
    test_s = time.perf_counter() - start
    results, switch_s = {}, []
    for name, (_, _, source) in adapters.adapters.items():
        start = time.perf_counter()
        adapters.use(name)
        switch_s.append(time.perf_counter() - start)
        if cfg.eval.merge:
            merge_lora(model)
        results[name] = {"path": source, "merged": bool(cfg.eval.merge), "test": test_as(trainer, module, datamodule, f"test_{name}")}
        unmerge_lora(model)
        print(f"\nadapter {name} ({'merged' if cfg.eval.merge else 'unmerged'}), base -> adapter:")
        print(digit_table(results[name]["test"], before=test, digits=digits))
    adapters.use(None)
    return base_metrics(cfg, model, digits) | {
        "test": test,
        "base": str(base_path),
        "adapters": results,
        "seconds": {"fit": 0.0, "test": test_s, "base_load": load_s, "adapter_switch": statistics.median(switch_s) if switch_s else None},
        "artifacts": {"tensorboard": str(run_dir)},
    }


STAGES = {"pretrain": pretrain, "finetune": finetune, "eval": evaluate}


def run_stage(cfg: DictConfig, run_dir: Path) -> dict:
    torch.set_flush_denormal(bool(cfg.flush_denormal))
    keep_freed_memory()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    metrics = STAGES[cfg.stage.name](cfg, run_dir)
    metrics |= provenance() | {"config": OmegaConf.to_container(cfg, resolve=True)}
    write_json(run_dir / "metrics.json", metrics)
    return metrics

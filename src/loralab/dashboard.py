"""What a run adds to TensorBoard besides its logged scalars and figures: one HParams entry, with
the keys its sweep varies in view, and a chart of target- against other-digit error."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import lightning as L
from omegaconf import OmegaConf
from tensorboard.plugins.hparams import metadata, plugin_data_pb2
from torch.utils.tensorboard.summary import hparams as hparams_summaries

from loralab.config import INCIDENTAL, Job, flat
from loralab.files import write_text
from loralab.results import Shift, TestResult

# Custom Scalars tab: forgetting at a glance, the target digits' validation error falling while
# the other digits' rises. Test errors are one point each, so HParams' results show them better;
# the per-digit charts stay in the Scalars tab.
FORGETTING_LAYOUT = {"forgetting": {"validation error, target vs other digits": ["Multiline", ["val/err_target", "val/err_other"]]}}


def add_forgetting_chart(trainer: L.Trainer) -> None:
    trainer.logger.experiment.add_custom_scalars(FORGETTING_LAYOUT)


def hparams_entry(job: Job, digits: list[int], lora: dict | None) -> dict:
    """The run's settings, named as they are set on the command line, the keys its sweep varies
    first: every setting of the schema but the incidental ones, the digits as trained (digits=auto
    resolved), and the adapter's settings with what they imply (its scale)."""
    settings = {key: value for key, value in flat(asdict(job.settings)).items()
                if key not in INCIDENTAL and key.partition(".")[0] not in ("stage", "model", "lora") and key != "data.digits"}
    entry = {"stage": job.settings.stage.name, "model": job.settings.model.name, "digits": " ".join(map(str, digits))}
    entry |= settings | {f"lora.{k}": v for k, v in (lora or {}).items()}
    entry = {key: value if isinstance(value, (int, float, str, bool)) else str(value) for key, value in entry.items()}
    # A swept key that is no setting above (variant=dora) gets its own column, valued as overridden.
    return {key: entry.get(key, value) for key, value in job.sweep.items()} | entry


def hp_results(test: TestResult, shift: Shift) -> dict:
    return {"hp/test_acc": test.acc, "hp/target_wrong": shift.target_after, "hp/other_wrong": shift.other_after,
            "hp/target_gain": shift.gain, "hp/forgetting": shift.forgetting}


def log_hparams(trainer: L.Trainer, job: Job, digits: list[int], lora: dict | None = None, results: dict | None = None) -> None:
    """One HParams entry per run, with its final results, so TensorBoard compares runs side by side;
    hparams.yaml holds the same values."""
    logger = trainer.logger
    entry = hparams_entry(job, digits, lora)
    if results:
        logger.log_metrics(results)
    experiment, session_start, session_end = hparams_summaries(entry, results or {})
    mark_differing(experiment, set(job.sweep))
    # Written as Lightning's own log_hyperparams writes them, which cannot mark the swept keys.
    writer = logger.experiment._get_file_writer()
    for summary in (experiment, session_start, session_end):
        writer.add_summary(summary)
    logger.finalize("success")  # flushes and closes the file writer the summaries above reopened
    # Lightning writes hparams.yaml once, when fit or test starts and only if it is missing, so it
    # would hold {}: the values are known only now.
    write_text(Path(logger.log_dir) / logger.NAME_HPARAMS_FILE, OmegaConf.to_yaml(entry))


def mark_differing(experiment_summary, keys: set[str]) -> None:
    """Flag ``keys`` as the hparams that differ between runs. The HParams table shows five columns
    until the user ticks more: the differing ones first, the rest by name, whatever order they were
    written in (tensorboard 2.21: backend_context._sort_and_reduce_to_hparams_limit and the query
    pane). Unflagged, a rank sweep showed batch size, digits, alpha, dropout, init and no rank."""
    value = experiment_summary.value[0]
    data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
    for info in data.experiment.hparam_infos:
        info.differs = info.name in keys
    value.metadata.CopyFrom(metadata.create_summary_metadata(data))

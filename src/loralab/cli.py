"""The Hydra task behind ``train.py``: validate, run the stage, turn user errors into one line."""

from __future__ import annotations

import gc
import logging
import os
import re
import shutil
import signal
import sys
from dataclasses import replace
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from loralab.config import check_config
from loralab.console import quiet_warnings, use_hydra_handlers
from loralab.errors import ArtifactError, LoralabError
from loralab.files import write_text
from loralab.overrides import ignored_by_stage
from loralab.runs import ERROR_FILE, METRICS_FILE

log = logging.getLogger(__name__)


def discard_if_empty(run_dir: Path, output_root: Path) -> None:
    """Remove a run dir that holds nothing but Hydra's own bookkeeping, and the parents this run
    created, so a typo leaves no litter under the output root."""
    if any(p.name != ".hydra" and p.suffix != ".log" for p in run_dir.iterdir()):
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    root = output_root.resolve()
    for parent in run_dir.resolve().parents:
        if parent == root or root not in parent.parents or any(parent.iterdir()):
            break
        parent.rmdir()


def mark_failed(run_dir: Path, err: Exception) -> None:
    """A failed run that left files keeps them (its log, its last checkpoint) with the reason
    beside them, so no one takes it for a finished run; an interrupted one is left resumable."""
    if run_dir.exists() and not (run_dir / METRICS_FILE).exists():
        write_text(run_dir / ERROR_FILE, f"{type(err).__name__}: {err}\n" if not isinstance(err, LoralabError) else f"{err}\n")


def configure_process(flush_denormal: bool) -> None:
    """Process-wide settings, made here at the entry point rather than by whoever runs a stage."""
    import torch

    from loralab.malloc import keep_freed_memory

    # Adam's state goes subnormal on long CPU runs and steps slow down about 3x.
    torch.set_flush_denormal(flush_denormal)
    keep_freed_memory()


def swept_values(hydra_cfg: DictConfig) -> dict:
    """This sweep job's values of the keys its sweep varies: {"lora.rank": 2} for the second job
    of ``lora.rank=1,2,4 -m``. A job's own overrides hold every key, swept or not; the sweep's
    command line is in multirun.yaml (Hydra's basic sweeper writes it before launching any job,
    whatever the launcher), and experiment configs sweep through hydra.sweeper.params."""
    parser = OverridesParser.create()
    recorded = Path(hydra_cfg.sweep.dir) / "multirun.yaml"
    command_line = list(OmegaConf.load(recorded).hydra.overrides.task) if recorded.exists() else []
    swept = [o.key_or_group for o in parser.parse_overrides(command_line) if o.is_sweep_override()]
    swept += list(hydra_cfg.sweeper.get("params") or {})
    job = {o.key_or_group: o.value() for o in parser.parse_overrides(list(hydra_cfg.overrides.task))}
    return {key: job[key] if isinstance(job[key], (bool, int, float, str)) else str(job[key])
            for key in dict.fromkeys(swept) if key in job}


def run_job(cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    if not cfg.get("verbose"):
        quiet_warnings()
    try:
        settings = replace(check_config(cfg, hydra_cfg.overrides.task), sweep=swept_values(hydra_cfg) if multirun else {})
        if (run_dir / METRICS_FILE).exists():
            raise ArtifactError(f"{run_dir} already holds a finished run ({METRICS_FILE}); choose another hydra.run.dir")
        # Imported once the config is known good: Lightning and torchmetrics take seconds to
        # import, and a typo should cost one line, not that wait.
        from loralab.stages import run_stage

        use_hydra_handlers()  # now that Lightning is imported and has added its own
        configure_process(cfg.flush_denormal)
        metrics = run_stage(settings, run_dir)
    except SystemExit as exit_:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if isinstance(exit_, SIGTERMException):
            # Lightning stopped at a step boundary and the ResumeHint callback said how to go on;
            # SIGTERMException is a SystemExit with code 0, but a terminated run did not succeed.
            sys.exit(128 + signal.SIGTERM)
        raise
    except LoralabError as err:
        if cfg.get("debug"):
            raise
        print(f"error: {err}", file=sys.stderr)
        if multirun:
            # The sweep goes on; the summary lists this job as failed.
            write_text(run_dir / ERROR_FILE, f"{err}\n")
            return None
        discard_if_empty(run_dir, Path(cfg.output_root))
        mark_failed(run_dir, err)
        sys.exit(2)
    except Exception as err:
        mark_failed(run_dir, err)  # a bug: its traceback follows
        raise
    # Hydra sweepers (Optuna) optimise the returned value.
    return metrics.get("objective", metrics["test"]["acc"])


def stage_section_missing(err: HydraException) -> str | None:
    """`eval.merge=true` without stage=eval does not compose: the eval section comes with its
    stage. Say which stage the key needs, rather than Hydra's hint to append it with +."""
    overridden = re.match(r"Could not override '([^']+)'", str(err))
    missing = re.match(r"Key '([^']+)' is not in struct", str(err.__cause__ or ""))
    if overridden and missing and overridden[1].startswith(f"{missing[1]}."):
        return ignored_by_stage(overridden[1], None, overridden[1])
    return None


def config_error_line(err: HydraException) -> str:
    """Hydra's composition errors span several lines; users get one."""
    if stage_hint := stage_section_missing(err):
        return stage_hint
    if isinstance(err, MissingConfigException) and err.missing_cfg_file and err.options:
        group, _, name = err.missing_cfg_file.rpartition("/")
        return f"{group}={name} is not a config in conf/{group}/; choose one of: {', '.join(sorted(err.options))}"
    parts = [str(err).splitlines()[0].rstrip(".")]
    if isinstance(err, OverrideParseException):
        parts.insert(0, "the command line does not parse (overrides are key=value, lists key=[a,b])")
    if err.__cause__ is not None:
        parts.append(str(err.__cause__).splitlines()[0])
    hint = next((line for line in str(err).splitlines()[1:] if line.startswith("To append")), None)
    return ": ".join(parts) + (f" ({hint[0].lower()}{hint[1:]})" if hint else "")


def main(hydra_main) -> None:
    """Run ``hydra_main``; a config that does not compose ends in one ``error:`` line, exit 2."""
    # Without this, Hydra prints its own multi-line report and exits 1 before we see the error.
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    args = sys.argv[1:]
    launching = {"-m", "--multirun"} & set(args)  # --cfg and --help only compose
    if launching and any(a.startswith("hydra/launcher=slurm") for a in args) and shutil.which("srun") is None:
        # submitit would fail later with a traceback, after Hydra made the sweep dir.
        print("error: hydra/launcher=slurm needs a SLURM cluster (no srun here); try the same jobs with hydra/launcher=submitit_local", file=sys.stderr)
        sys.exit(2)
    try:
        hydra_main()
    except HydraException as err:
        if "debug=true" in args:  # no config was composed to read debug from
            raise
        print(f"error: {config_error_line(err)}", file=sys.stderr)
        sys.exit(2)
    finally:
        # Whatever the outcome, nothing runs after this but the interpreter's teardown, whose
        # final collection of everything torch, Lightning and torchmetrics created at import took
        # about 1 s after each command's last line (docs/benchmarks.md, section 11). Frozen
        # objects are skipped, so nothing may rely on a collection at exit: every writer is
        # closed explicitly before this point.
        gc.freeze()

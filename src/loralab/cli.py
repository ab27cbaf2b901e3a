"""The Hydra task behind ``train.py``: validate, run the stage, turn user errors into one line."""

from __future__ import annotations

import gc
import logging
import os
import re
import shutil
import signal
import sys
from dataclasses import fields, is_dataclass
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

from loralab.config import SCHEMAS, Settings, invalid, load_job, unknown_key
from loralab.console import quiet_warnings, use_hydra_handlers
from loralab.errors import LoralabError
from loralab.files import DISK_FULL, short, watch_writer_threads, write_text
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
    watch_writer_threads()


_swept_keys: dict[Path, tuple[str, ...]] = {}


def swept_on_command_line(recorded: Path) -> tuple[str, ...]:
    """The keys a sweep's command line sweeps, read once per sweep: its multirun.yaml holds the
    whole config, and reading it for every job cost about 0.08 s a job (docs/benchmarks.md, section 14)."""
    if recorded not in _swept_keys:
        if not recorded.exists():
            return ()
        command_line = list(OmegaConf.load(recorded).hydra.overrides.task)
        _swept_keys[recorded] = tuple(o.key_or_group for o in OverridesParser.create().parse_overrides(command_line) if o.is_sweep_override())
    return _swept_keys[recorded]


def swept_values(hydra_cfg: DictConfig) -> dict:
    """This sweep job's values of the keys its sweep varies: {"lora.rank": 2} for the second job
    of ``lora.rank=1,2,4 -m``. A job's own overrides hold every key, swept or not; the sweep's
    command line is in multirun.yaml (Hydra's basic sweeper writes it before launching any job,
    whatever the launcher), and experiment configs sweep through hydra.sweeper.params."""
    parser = OverridesParser.create()
    swept = list(swept_on_command_line(Path(hydra_cfg.sweep.dir) / "multirun.yaml"))
    swept += list(hydra_cfg.sweeper.get("params") or {})
    job = {o.key_or_group: o.value() for o in parser.parse_overrides(list(hydra_cfg.overrides.task))}
    return {key: job[key] if isinstance(job[key], (bool, int, float, str)) else str(job[key])
            for key in dict.fromkeys(swept) if key in job}


def disk_full_line(err: OSError) -> str:
    return f"the disk is full or a file-size limit was reached ({err.strerror}); free some space and run again"


# Set once Hydra has made a run dir and called run_job: an OSError before that is Hydra failing to
# make the output directory the user named.
_started = False


def run_job(cfg: DictConfig) -> float | None:
    global _started
    _started = True
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    if not cfg.get("verbose"):
        quiet_warnings()
    try:
        job = load_job(cfg, swept_values(hydra_cfg) if multirun else {})
        # Imported once the config is known good: Lightning and torchmetrics take seconds to
        # import, and a typo should cost one line, not that wait.
        from loralab.stages import run_stage

        use_hydra_handlers()  # now that Lightning is imported and has added its own
        configure_process(cfg.flush_denormal)
        metrics = run_stage(job, run_dir)
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
    except OSError as err:
        if err.errno not in DISK_FULL or cfg.get("debug"):
            mark_failed(run_dir, err)
            raise
        # A write outside loralab's own (Lightning's, TensorBoard's) on a full disk: not a bug.
        print(f"error: {disk_full_line(err)}", file=sys.stderr)
        sys.exit(2)
    except Exception as err:
        mark_failed(run_dir, err)  # a bug: its traceback follows
        raise
    # Hydra sweepers (Optuna) optimise the returned value.
    return metrics.get("objective", metrics["test"]["acc"])


def root_schema(node) -> type[Settings] | None:
    """The stage settings class at the root of the config ``node`` belongs to."""
    root = node._get_root() if node is not None else None
    schema = OmegaConf.get_type(root) if root is not None else None
    return schema if schema in SCHEMAS.values() else None


def stage_of(overrides: list[str]) -> str:
    """The stage a command line asks for (the config's default, pretrain, without one)."""
    return next((o.split("=", 1)[1] for o in reversed(overrides) if o.startswith("stage=")), "pretrain")


def stage_groups(conf: Path, stage: str) -> set[str]:
    """The config groups stage=``stage`` brings in its own defaults list (finetune: lora, rank, alpha, variant)."""
    path = conf / "stage" / f"{stage}.yaml"
    defaults = OmegaConf.load(path).get("defaults", []) if path.is_file() else []
    return {str(k).removeprefix("override ").lstrip("/") for d in defaults if isinstance(d, DictConfig) for k in d}


def composition_error(err: HydraException, overrides: list[str], conf: Path) -> str | None:
    """A value Hydra refused while composing, in the schema's words: a key the stage does not
    have (stage=pretrain lora.rank=4, lora.rnk=4), a group it does not have (variant=dora), or a
    value of the wrong type (lora.alpha=abc)."""
    cause, message = err.__cause__, str(err)
    if isinstance(cause, ValidationError) and cause.full_key:
        schema = cause.object_type if isinstance(cause.object_type, type) else None
        name = cause.full_key.rpartition(".")[2]
        rule = next((f.metadata.get("rule") for f in fields(schema) if f.name == name), None) if schema and is_dataclass(schema) else None
        return str(invalid(cause.full_key, cause.value, rule.expected if rule else str(cause).splitlines()[0]))
    overridden = re.match(r"Could not override '([^']+)'\.( No match in the defaults list)?", message)
    if not overridden:
        return None
    key, written = overridden[1], next((o for o in overrides if o.lstrip("+~").split("=")[0] == overridden[1]), overridden[1])
    schema = root_schema(getattr(cause, "parent_node", None))
    stage = schema.STAGE if schema else stage_of(overrides)
    if overridden[2]:  # a config group: lora, rank, alpha and variant come with stage=finetune's defaults
        owners = [s for s in SCHEMAS if s != stage and key in stage_groups(conf, s) - stage_groups(conf, stage)]
        if not owners:
            return None
        return f"{written} is read only by {' and '.join(f'stage={s}' for s in owners)}, so this stage={stage} run has no such setting; add stage={owners[0]}, or drop {written}"
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)):
        return str(unknown_key(key, stage, written))
    return None


def config_error_line(err: HydraException, overrides: list[str], conf: Path) -> str:
    """Hydra's composition errors span several lines; users get one."""
    if line := composition_error(err, overrides, conf):
        return line
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


def numbered_group_line(overrides: list[str], conf: Path) -> str:
    """rank=16: Hydra reads 16 as a number, which cannot name a config (its presets are r16, ...)."""
    written = next((o for o in overrides if "=" in o and (conf / o.split("=")[0].lstrip("+~")).is_dir()
                    and re.fullmatch(r"[\d.,]+", o.split("=", 1)[1])), "a config group override")
    group = written.split("=")[0].lstrip("+~")
    options = sorted((p.stem for p in (conf / group).glob("*.yaml")), key=lambda n: (len(n), n)) if (conf / group).is_dir() else []
    return (f"{written} names a config by a number, which Hydra reads as an integer; choose one of {group}'s "
            f"configs ({', '.join(options)})" + (f", or set lora.{group}= directly" if group == "rank" else ""))


def making_directories(err: OSError) -> bool:
    """``err`` came from a mkdir (Hydra making the run or sweep dir), not from a job's own work
    re-raised in this process (joblib's and submitit's jobs run in others)."""
    frame = err.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    return frame is not None and frame.tb_frame.f_code.co_name in ("mkdir", "makedirs")


def main(hydra_main, conf: Path) -> None:
    """Run ``hydra_main``, whose configs are in ``conf``; a config that does not compose ends in
    one ``error:`` line, exit 2."""
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
        print(f"error: {config_error_line(err, args, conf)}", file=sys.stderr)
        sys.exit(2)
    except ValueError as err:
        if not str(err).startswith("Config group override must be a string"):
            raise
        print(f"error: {numbered_group_line(args, conf)}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:
        if _started or "debug=true" in args:
            raise
        if err.errno in DISK_FULL:  # Hydra writing .hydra/ into the run dir
            print(f"error: {disk_full_line(err)}", file=sys.stderr)
            sys.exit(2)
        if not making_directories(err):
            raise
        print(f"error: cannot make the run directory {short(err.filename or '?')} ({err.strerror or err}); set output_root= "
              f"(or hydra.{'sweep' if launching else 'run'}.dir=) to a directory you can write", file=sys.stderr)
        sys.exit(2)
    finally:
        # Whatever the outcome, nothing runs after this but the interpreter's teardown, whose
        # final collection of everything torch, Lightning and torchmetrics created at import took
        # about 1 s after each command's last line (docs/benchmarks.md, section 11). Frozen
        # objects are skipped, so nothing may rely on a collection at exit: every writer is
        # closed explicitly before this point.
        gc.freeze()

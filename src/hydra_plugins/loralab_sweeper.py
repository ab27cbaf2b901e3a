"""loralab's sweeper: Hydra's basic sweeper, checking a batch of jobs by composing one job for
each distinct override instead of every job, and launching each job from a composed config of
the same config groups rather than composing it afresh.

Hydra's basic sweeper composes every job's config up front (so that a bad value fails the sweep
before its first job), and its launcher composes each job again to run it: two compositions of
about 0.25 s each per job, a fifth of an ``experiment=frontier`` job (docs/benchmarks.md section
14). Composing each override once still refuses any bad value before the first job runs; what it
no longer composes ahead is a combination of good values that fails only together, which then
fails when the launcher reaches it. For the launch, jobs that choose the same config groups
(``arm=``, ``task=``) and differ only in plain values (``seed=``, ``lr_step=``) share one
composition: each gets a copy with its own values applied by Hydra's own override code, and the
``hydra.overrides.task`` and ``override_dirname`` Hydra would give it (tests/test_sweeper.py
checks every job's config against Hydra's composition). Hydra looks for sweepers in the
``hydra_plugins`` namespace only, so this module lives there rather than in loralab.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from hydra._internal.config_loader_impl import ConfigLoaderImpl, get_overrides_dirname
from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import OverrideType
from hydra.types import HydraContext
from omegaconf import DictConfig, OmegaConf, open_dict


class LoralabSweeper(BasicSweeper):
    def setup(self, *, hydra_context: HydraContext, task_function, config: DictConfig) -> None:
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        if type(self.launcher) is BasicLauncher:  # other launchers pickle the loader into other processes
            self.launcher.hydra_context = HydraContext(SharedCompositions(hydra_context.config_loader), hydra_context.callbacks)

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        super().validate_batch_is_legal(covering(batch))


def covering(batch: Sequence[Sequence[str]]) -> list[Sequence[str]]:
    """The jobs of ``batch``, in order, that hold an override no earlier one held: every
    override appears in one of them (for a grid, at most the sum of its axes' lengths)."""
    seen: set[str] = set()
    kept = []
    for overrides in batch:
        if not seen.issuperset(overrides):
            kept.append(overrides)
            seen.update(overrides)
    return kept


class SharedCompositions:
    """A config loader for the launcher: Hydra's, but a job whose config-group choices an earlier
    job composed is that composition with its own plain values applied."""

    def __init__(self, loader: ConfigLoaderImpl):
        self.loader = loader
        self.parser = OverridesParser.create()
        self.composed: dict[tuple, DictConfig] = {}

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def is_value(self, override) -> bool:
        """A plain ``key=value`` on the job's config: no group, no package, no add or delete."""
        return (override.type == OverrideType.CHANGE and override.package is None and not override.is_hydra_override()
                and not override.is_sweep_override() and not self.loader.repository.group_exists(override.key_or_group))

    def load_sweep_config(self, master_config: DictConfig, sweep_overrides: list[str]) -> DictConfig:
        parsed = self.parser.parse_overrides(sweep_overrides)
        values = [o for o in parsed if self.is_value(o)]
        key = tuple(o.input_line if not self.is_value(o) else o.key_or_group for o in parsed)
        if key not in self.composed:
            self.composed[key] = self.loader.load_sweep_config(master_config, sweep_overrides)
            return copy.deepcopy(self.composed[key])
        config = copy.deepcopy(self.composed[key])
        ConfigLoaderImpl._apply_overrides_to_config(values, config)
        task = [o for o in parsed if not o.is_hydra_override()]
        with open_dict(config.hydra):
            config.hydra.overrides.task = [o.input_line for o in task]
            dirname = config.hydra.job.config.override_dirname
            config.hydra.job.override_dirname = get_overrides_dirname(task, dirname.exclude_keys, dirname.item_sep, dirname.kv_sep)
        OmegaConf.copy_cache(from_config=master_config, to_config=config)
        return config

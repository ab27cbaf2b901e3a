"""loralab's sweeper: Hydra's basic sweeper, checking a batch of jobs by composing one job for
each distinct override instead of every job.

Hydra's basic sweeper composes every job's config up front (so that a bad value fails the sweep
before its first job), and its launcher composes each job again to run it: two compositions of
about 0.23 s each per job, a tenth of an ``experiment=frontier`` job (docs/benchmarks.md section
14). Composing each override once still refuses any bad value before the first job runs; what it
no longer composes ahead is a combination of good values that fails only together, which then
fails when the launcher reaches it. Hydra looks for sweepers in the ``hydra_plugins`` namespace
only, so this module lives there rather than in loralab.
"""

from __future__ import annotations

from collections.abc import Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper


class LoralabSweeper(BasicSweeper):
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

"""Hydra callback that writes the sweep summary when a multirun ends."""

from __future__ import annotations

import sys
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from loralab.report import write_summary


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        rows, table = write_summary(config.hydra.sweep.dir)
        print(f"\nSweep summary ({config.hydra.sweep.dir}/summary.md):\n{table}")
        failed = [r["job"] for r in rows if r.get("status") != "ok"]
        if failed:
            print(f"error: {len(failed)} of {len(rows)} jobs failed: {', '.join(failed)}", file=sys.stderr)
            sys.exit(1)

"""Hydra callbacks: refuse to reuse a finished run dir, summarise a sweep when it ends, and
(experiment=combine) combine its adapters."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from loralab.errors import LoralabError
from loralab.files import short
from loralab.report import show, write_summary
from loralab.runs import METRICS_FILE

SWEEP_LOG = "sweep.log"


class FreshRunDir(Callback):
    """The one guard of finished runs: it runs before Hydra writes anything into the run or sweep
    dir, so a finished run, or any finished job of a sweep, stays byte-identical."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        run_dir = Path(config.hydra.run.dir)
        self.refuse_if_finished(run_dir, [METRICS_FILE], "hydra.run.dir")
        if (run_dir / "checkpoints" / "last.ckpt").exists() and Path(config.get("resume") or "").resolve() != run_dir.resolve():
            # An interrupted run: training into it would replace the checkpoint its resume needs.
            print(f"error: {short(run_dir)} holds an interrupted run (a checkpoint, no {METRICS_FILE}); continue it with "
                  "resume=<that dir> and its overrides, or choose another hydra.run.dir", file=sys.stderr)
            sys.exit(2)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.refuse_if_finished(Path(config.hydra.sweep.dir), ["summary.csv", f"*/{METRICS_FILE}"], "hydra.sweep.dir")

    @staticmethod
    def refuse_if_finished(directory: Path, markers: list[str], key: str) -> None:
        found = next((path for marker in markers for path in directory.glob(marker)), None)
        if found is not None:
            print(f"error: {directory} already holds a finished run ({found.relative_to(directory)}); choose another {key}", file=sys.stderr)
            sys.exit(2)


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            rows, table = write_summary(config.hydra.sweep.dir)
        except LoralabError as err:  # a damaged or foreign metrics.json among the jobs
            print(f"error: no sweep summary: {err}", file=sys.stderr)
            sys.exit(1)
        # A sweep has no train.log of its own (Hydra's file handler is the last job's by now).
        sweep_dir = Path(config.hydra.sweep.dir)
        show(f"\nSweep summary ({sweep_dir}/summary.md):\n{table}", sweep_dir / SWEEP_LOG)
        if any(r.get("status") == "ok" and r.get("method") in ("lora", "full") for r in rows):  # fine-tunes: an lr axis makes a frontier
            from loralab.plots import write_frontier  # matplotlib, for this sweep end only

            try:
                if (frontier := write_frontier(sweep_dir)) is not None:
                    show(f"\n{frontier.read_text()}", sweep_dir / SWEEP_LOG)
            except (LoralabError, ValueError, OSError) as err:  # Hydra would turn it into a warning and drop the exit below
                print(f"error: no frontier report: {err}", file=sys.stderr)
        failed = [r["job"] for r in rows if r.get("status") != "ok"]
        if failed:
            print(f"error: {len(failed)} of {len(rows)} jobs failed: {', '.join(failed)}", file=sys.stderr)
            sys.exit(1)


class CombineReport(SweepSummary):
    """experiment=combine's sweep end: the sweep summary, then loralab.combine_report. It takes
    SweepSummary's place (conf/experiment/combine.yaml): Hydra runs end callbacks last-registered
    first, so a second callback would print the combinations above the summary."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        super().on_multirun_end(config, **kwargs)
        from loralab.combine_report import write_combine_report  # torch, for this sweep end only

        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            report = write_combine_report(sweep_dir)
        except (LoralabError, ValueError, OSError) as err:
            print(f"error: no combine report: {err}", file=sys.stderr)
            sys.exit(1)
        show(f"\n{report.read_text()}", sweep_dir / SWEEP_LOG)

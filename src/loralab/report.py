"""Human-readable results: per-digit tables for one run, and the summary of a sweep."""

from __future__ import annotations

import csv
import io
import logging
import re
import statistics
from pathlib import Path

from loralab.files import write_json, write_text
from loralab.results import Shift, TestResult
from loralab.runs import Run, sweep_jobs

log = logging.getLogger(__name__)

SUMMARY_COLUMNS = [
    "job", "status", "method", "rank", "alpha", "digits", "trainable",
    "target_wrong_before", "target_wrong_after", "other_wrong_before", "other_wrong_after",
    "acc_before", "acc_after", "forgetting", "optimizer_state_bytes", "artifact_bytes", "fit_seconds",
    "seed", "variant", "quant", "base_held_bytes", "peak_rss_bytes",
]


def show(text: str, log_file: Path | None = None) -> None:
    """Print ``text`` for the console, and log it at INFO to log files only: the run's train.log
    (Hydra's file handler), or ``log_file``. Through the console handler too, it would show twice."""
    print(text)
    record = log.makeRecord(log.name, logging.INFO, __file__, 0, text, None, None)
    own = logging.FileHandler(log_file, encoding="utf-8") if log_file else None
    handlers = [own] if own else [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    for handler in handlers:
        if record.levelno >= handler.level:
            handler.handle(record)
    if own:
        own.close()


def digit_table(test: TestResult, before: TestResult | None = None, digits: list[int] | None = None) -> str:
    """Per-digit wrong counts and error rates; with ``before``, side by side as before -> after."""
    digits = digits or []
    lines = []
    if before is None:
        lines.append(f"{'digit':>6} {'count':>6} {'wrong':>6} {'err %':>7}")
    else:
        lines.append(f"{'digit':>6} {'count':>6} {'wrong before -> after':>22} {'err % before -> after':>22}")
    for d, count in enumerate(test.count):
        mark = f"{d}*" if d in digits else f"{d} "
        after = test.wrong[d]
        if before is None:
            lines.append(f"{mark:>6} {count:>6} {after:>6} {100 * after / count:>7.2f}")
        else:
            b = before.wrong[d]
            lines.append(f"{mark:>6} {count:>6} {b:>10} -> {after:<8} {100 * b / count:>10.2f} -> {100 * after / count:<8.2f}")
    total = sum(test.count)
    if before is None:
        lines.append(f"{'all':>6} {total:>6} {sum(test.wrong):>6} {100 * (1 - test.acc):>7.2f}   accuracy {100 * test.acc:.2f} %")
    else:
        lines.append(f"{'all':>6} {total:>6} {sum(before.wrong):>10} -> {sum(test.wrong):<8}"
                     f"   accuracy {100 * before.acc:.2f} % -> {100 * test.acc:.2f} %")
        if digits and len(digits) < len(test.count):
            shift = Shift.between(before, test, digits)
            lines.append(f"target digits {digits}: wrong {shift.target_before} -> {shift.target_after};  "
                         f"other digits: wrong {shift.other_before} -> {shift.other_after} (forgetting {shift.forgetting:+d})")
    return "\n".join(lines)


def summary_row(run: Run) -> dict:
    m, shift = run.metrics, run.shift
    before = run.test_base or run.test
    lora = m.get("lora") or {}
    return {
        "job": run.name, "status": "ok", "method": m.get("method", m["stage"]),
        "rank": lora.get("rank", ""), "alpha": lora.get("alpha", ""),
        "digits": " ".join(map(str, run.digits)), "trainable": m["params"]["trainable"],
        "target_wrong_before": shift.target_before, "target_wrong_after": shift.target_after,
        "other_wrong_before": shift.other_before, "other_wrong_after": shift.other_after,
        "acc_before": round(before.acc, 4), "acc_after": round(run.test.acc, 4),
        "forgetting": shift.forgetting, "optimizer_state_bytes": m.get("optimizer_state_bytes", ""),
        "artifact_bytes": m.get("artifact_bytes", ""),
        "fit_seconds": round(m["seconds"]["fit"], 2),
        "seed": m.get("seed", ""), "variant": run.label,
        # How the frozen base was held (quant=nf4: QLoRA's 4 bits), and the process's peak memory.
        "quant": (m.get("quant") or {}).get("format", ""), "base_held_bytes": (m.get("quant") or {}).get("held_bytes", ""),
        "peak_rss_bytes": m.get("peak_rss_bytes", ""),
    }


MARKDOWN_COLUMNS = {
    "job": "job", "status": "status", "method": "method", "rank": "rank", "alpha": "alpha",
    "digits": "digits", "trainable": "trainable params",
    "target_wrong": "target wrong", "other_wrong": "other wrong", "acc": "accuracy", "forgetting": "forgetting",
    "optimizer_state_bytes": "optimizer state B", "artifact_bytes": "file B", "fit_seconds": "fit s",
    "quant": "base stored", "base_held_bytes": "base B", "peak_rss_bytes": "peak RSS B",
}


def markdown_table(rows: list[dict]) -> str:
    """The sweep as a table for people: before -> after pairs in one cell each."""
    def cell(row: dict, key: str) -> str:
        if f"{key}_before" in row:
            return f"{row[f'{key}_before']} → {row[f'{key}_after']}"
        return str(row.get(key, ""))

    out = ["| " + " | ".join(MARKDOWN_COLUMNS.values()) + " |", "|" + "---|" * len(MARKDOWN_COLUMNS)]
    out += ["| " + " | ".join(cell(r, key) for key in MARKDOWN_COLUMNS) + " |" for r in rows]
    return "\n".join(out) + "\n"


def setting_name(job: str) -> str:
    """A job's name without its number and seed: ``3_lora.rank=2,seed=1`` -> ``lora.rank=2``."""
    overrides = [o for o in re.sub(r"^\d+_", "", job).split(",") if not re.fullmatch(r"seed=\d+", o)]
    return ",".join(overrides) or "default"


def spread(values: list[float], digits: int = 4) -> dict:
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits), "max": round(max(values), digits)}


def seed_groups(runs: list[Run]) -> list[dict]:
    """One row per setting: the jobs that differ only by seed, as median and min-max."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.setting, []).append(run)
    rows = []
    for members in groups.values():
        first = members[0]
        rows.append({
            "setting": setting_name(first.name), "label": first.label, "seeds": [r.metrics["seed"] for r in members],
            "trainable": first.metrics["params"]["trainable"], "optimizer_state_bytes": first.metrics.get("optimizer_state_bytes"),
            "target_wrong_before": first.shift.target_before, "other_wrong_before": first.shift.other_before,
            "acc_before": round((first.test_base or first.test).acc, 4),
            "target_wrong": spread([r.shift.target_after for r in members]),
            "other_wrong": spread([r.shift.other_after for r in members]),
            "acc": spread([r.test.acc for r in members]),
            "fit_seconds": spread([r.metrics["seconds"]["fit"] for r in members], 2),
            "step_ms": spread([1000 * r.metrics["seconds"].get("step", float("nan")) for r in members], 2),
        })
    return rows


def seed_table(groups: list[dict]) -> str:
    def cell(value: dict) -> str:
        return f"{value['median']:g} ({value['min']:g}–{value['max']:g})"

    out = ["| setting | seeds | trainable params | optimizer state B | target wrong | other wrong | accuracy | fit s | step ms |", "|" + "---|" * 9]
    for g in groups:
        out.append(f"| {g['setting']} | {len(g['seeds'])} | {g['trainable']} | {g['optimizer_state_bytes']} | {g['target_wrong_before']} → {cell(g['target_wrong'])} | "
                   f"{g['other_wrong_before']} → {cell(g['other_wrong'])} | {g['acc_before']:g} → {cell(g['acc'])} | {cell(g['fit_seconds'])} | {cell(g['step_ms'])} |")
    return "\n".join(out) + "\n"


def write_summary(sweep_dir: str | Path) -> tuple[list[dict], str]:
    """summary.csv (one row per job), summary.md, and, when jobs differ only by seed,
    seeds.json and a table of medians with their min-max range."""
    jobs = sweep_jobs(sweep_dir)
    rows = [summary_row(job.run) if job.run else {"job": job.name, "status": f"failed: {job.error}"} for job in jobs]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text(Path(sweep_dir) / "summary.csv", buffer.getvalue())
    table = markdown_table(rows)
    groups = seed_groups([job.run for job in jobs if job.run])
    if any(len(g["seeds"]) > 1 for g in groups):
        write_json(Path(sweep_dir) / "seeds.json", groups)
        table = f"Medians over seeds (min–max):\n\n{seed_table(groups)}\nEvery job:\n\n{table}"
    write_text(Path(sweep_dir) / "summary.md", f"# Sweep summary: {sweep_dir}\n\n{table}")
    return rows, table

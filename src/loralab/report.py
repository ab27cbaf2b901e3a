"""Human-readable results: per-digit tables for one run, and the summary of a sweep."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from loralab.files import write_text

SUMMARY_COLUMNS = [
    "job", "status", "method", "rank", "alpha", "digits", "trainable",
    "target_wrong_before", "target_wrong_after", "other_wrong_before", "other_wrong_after",
    "acc_before", "acc_after", "forgetting", "optimizer_state_bytes", "artifact_bytes", "fit_seconds",
]


def split_wrong(test: dict, digits: list[int]) -> tuple[int, int]:
    """(wrong on the target digits, wrong on the others) for one test result."""
    target = sum(w for d, w in enumerate(test["wrong"]) if d in digits)
    return target, sum(test["wrong"]) - target


def digit_table(test: dict, before: dict | None = None, digits: list[int] | None = None) -> str:
    """Per-digit wrong counts and error rates; with ``before``, side by side as before -> after."""
    digits = digits or []
    lines = []
    if before is None:
        lines.append(f"{'digit':>6} {'count':>6} {'wrong':>6} {'err %':>7}")
    else:
        lines.append(f"{'digit':>6} {'count':>6} {'wrong before -> after':>22} {'err % before -> after':>22}")
    for d, count in enumerate(test["count"]):
        mark = f"{d}*" if d in digits else f"{d} "
        after = test["wrong"][d]
        if before is None:
            lines.append(f"{mark:>6} {count:>6} {after:>6} {100 * after / count:>7.2f}")
        else:
            b = before["wrong"][d]
            lines.append(f"{mark:>6} {count:>6} {b:>10} -> {after:<8} {100 * b / count:>10.2f} -> {100 * after / count:<8.2f}")
    total = sum(test["count"])
    if before is None:
        lines.append(f"{'all':>6} {total:>6} {sum(test['wrong']):>6} {100 * (1 - test['acc']):>7.2f}   accuracy {100 * test['acc']:.2f} %")
    else:
        lines.append(f"{'all':>6} {total:>6} {sum(before['wrong']):>10} -> {sum(test['wrong']):<8}"
                     f"   accuracy {100 * before['acc']:.2f} % -> {100 * test['acc']:.2f} %")
        if digits and len(digits) < len(test["count"]):
            (tb, ob), (ta, oa) = split_wrong(before, digits), split_wrong(test, digits)
            lines.append(f"target digits {digits}: wrong {tb} -> {ta};  other digits: wrong {ob} -> {oa} (forgetting {oa - ob:+d})")
    return "\n".join(lines)


def summary_row(job: str, metrics: dict) -> dict:
    digits = metrics.get("digits", list(range(10)))
    test, before = metrics["test"], metrics.get("test_base", metrics["test"])
    (tb, ob), (ta, oa) = split_wrong(before, digits), split_wrong(test, digits)
    lora = metrics.get("lora") or {}
    return {
        "job": job, "status": "ok", "method": metrics.get("method", metrics["stage"]),
        "rank": lora.get("rank", ""), "alpha": lora.get("alpha", ""),
        "digits": " ".join(map(str, digits)), "trainable": metrics["params"]["trainable"],
        "target_wrong_before": tb, "target_wrong_after": ta, "other_wrong_before": ob, "other_wrong_after": oa,
        "acc_before": round(before["acc"], 4), "acc_after": round(test["acc"], 4),
        "forgetting": oa - ob, "optimizer_state_bytes": metrics.get("optimizer_state_bytes", ""),
        "artifact_bytes": metrics.get("artifact_bytes", ""),
        "fit_seconds": round(metrics["seconds"]["fit"], 2),
    }


def collect(sweep_dir: str | Path) -> list[dict]:
    """One summary row per job directory (a subdirectory with Hydra's .hydra/ folder)."""
    rows = []
    for job_dir in sorted((p.parent for p in Path(sweep_dir).glob("*/.hydra")), key=lambda p: p.name):
        metrics_file = job_dir / "metrics.json"
        if metrics_file.exists():
            rows.append(summary_row(job_dir.name, json.loads(metrics_file.read_text())))
        else:
            error = job_dir / "error.txt"
            reason = error.read_text().strip() if error.exists() else "no metrics.json (see the job's log)"
            rows.append({"job": job_dir.name, "status": f"failed: {reason}"})
    return rows


MARKDOWN_COLUMNS = {
    "job": "job", "status": "status", "method": "method", "rank": "rank", "alpha": "alpha",
    "digits": "digits", "trainable": "trainable params",
    "target_wrong": "target wrong", "other_wrong": "other wrong", "acc": "accuracy", "forgetting": "forgetting",
    "optimizer_state_bytes": "optimizer state B", "artifact_bytes": "file B", "fit_seconds": "fit s",
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


def write_summary(sweep_dir: str | Path) -> tuple[list[dict], str]:
    rows = collect(sweep_dir)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text(Path(sweep_dir) / "summary.csv", buffer.getvalue())
    table = markdown_table(rows)
    write_text(Path(sweep_dir) / "summary.md", f"# Sweep summary: {sweep_dir}\n\n{table}")
    return rows, table

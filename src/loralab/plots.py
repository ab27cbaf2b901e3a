"""Figures of a run or a sweep: per-digit wrong counts, rank against gain and forgetting,
LoRA against full fine-tuning. Written as PNG and logged to TensorBoard."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

from loralab.files import write_text  # noqa: E402
from loralab.report import markdown_table, summary_row  # noqa: E402
from loralab.runs import Run, finished_runs  # noqa: E402


def per_digit_figure(runs: list[Run]):
    fig, axes = plt.subplots(len(runs), 1, figsize=(9, 2.6 * len(runs)), squeeze=False)
    for ax, run in zip(axes[:, 0], runs):
        digits = range(10)
        if run.test_base:
            ax.bar([d - 0.2 for d in digits], run.test_base.wrong, width=0.4, label="before")
            ax.bar([d + 0.2 for d in digits], run.test.wrong, width=0.4, label="after")
        else:
            ax.bar(digits, run.test.wrong, width=0.6, label="wrong")
        ax.set_xticks(list(digits))
        ax.set_title(f"{run.name}: target digits {run.digits}", fontsize=9)
        ax.set_ylabel("wrong (of ~1000)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def tradeoff_figure(runs: list[Run]):
    """Target-digit gain and forgetting for each fine-tune, LoRA ranks and full fine-tuning."""
    finetunes = sorted((r for r in runs if r.test_base), key=lambda r: (r.metrics.get("method") == "full", (r.metrics.get("lora") or {}).get("rank", 0)))
    labels = [r.label for r in finetunes]
    gains = [r.shift.gain for r in finetunes]
    forgetting = [r.shift.forgetting for r in finetunes]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], gains, width=0.4, label="target gain (fewer wrong)")
    ax.bar([x + 0.2 for x in xs], forgetting, width=0.4, label="forgetting (more wrong elsewhere)")
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("test images")
    ax.legend(fontsize=8)
    ax.set_title("What each fine-tune buys and costs")
    fig.tight_layout()
    return fig


def write_report(path: Path) -> Path:
    runs = finished_runs(path)
    out = path / "report"
    out.mkdir(exist_ok=True)
    figures = {"per_digit": per_digit_figure(runs)}
    if any(r.test_base for r in runs):
        figures["tradeoff"] = tradeoff_figure(runs)
    writer = SummaryWriter(str(out))
    for name, fig in figures.items():
        fig.savefig(out / f"{name}.png", dpi=110)
        writer.add_figure(f"report/{name}", fig)  # closes the figure
    writer.close()
    rows = [summary_row(run) for run in runs]
    images = "\n".join(f"![{name}]({name}.png)" for name in figures)
    return write_text(out / "report.md", f"# loralab report: {path}\n\n{markdown_table(rows)}\n{images}\n")

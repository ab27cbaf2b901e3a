"""Figures of a run or a sweep: per-digit wrong counts, rank against gain and forgetting,
LoRA against full fine-tuning. Written as PNG and logged to TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

from loralab.files import write_text  # noqa: E402
from loralab.report import markdown_table, split_wrong, summary_row  # noqa: E402


def load_runs(path: Path) -> dict[str, dict]:
    """{job name: metrics} for a run dir, or for every finished job of a sweep dir."""
    if (path / "metrics.json").exists():
        return {path.name: json.loads((path / "metrics.json").read_text())}
    runs = {p.parent.name: json.loads(p.read_text()) for p in sorted(path.glob("*/metrics.json"))}
    if not runs:
        raise FileNotFoundError(f"no metrics.json in {path} or its job directories; pass a run or sweep dir")
    return runs


def per_digit_figure(runs: dict[str, dict]):
    fig, axes = plt.subplots(len(runs), 1, figsize=(9, 2.6 * len(runs)), squeeze=False)
    for ax, (name, m) in zip(axes[:, 0], runs.items()):
        digits = range(10)
        if "test_base" in m:
            ax.bar([d - 0.2 for d in digits], m["test_base"]["wrong"], width=0.4, label="before")
            ax.bar([d + 0.2 for d in digits], m["test"]["wrong"], width=0.4, label="after")
        else:
            ax.bar(digits, m["test"]["wrong"], width=0.6, label="wrong")
        ax.set_xticks(list(digits))
        ax.set_title(f"{name}: target digits {m.get('digits')}", fontsize=9)
        ax.set_ylabel("wrong (of ~1000)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def tradeoff_figure(runs: dict[str, dict]):
    """Target-digit gain and forgetting for each fine-tune, LoRA ranks and full fine-tuning."""
    finetunes = [m for m in runs.values() if "test_base" in m]
    labels, gains, forgetting = [], [], []
    for m in sorted(finetunes, key=lambda m: (m.get("method") == "full", (m.get("lora") or {}).get("rank", 0))):
        (tb, _), (ta, _) = split_wrong(m["test_base"], m["digits"]), split_wrong(m["test"], m["digits"])
        lora = m.get("lora")
        labels.append(f"r={lora['rank']}" if lora else "full")
        gains.append(tb - ta)
        forgetting.append(m["forgetting"])
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
    runs = load_runs(path)
    out = path / "report"
    out.mkdir(exist_ok=True)
    figures = {"per_digit": per_digit_figure(runs)}
    if any("test_base" in m for m in runs.values()):
        figures["tradeoff"] = tradeoff_figure(runs)
    writer = SummaryWriter(str(out))
    for name, fig in figures.items():
        fig.savefig(out / f"{name}.png", dpi=110)
        writer.add_figure(f"report/{name}", fig)  # closes the figure
    writer.close()
    rows = [summary_row(name, m) for name, m in runs.items()]
    images = "\n".join(f"![{name}]({name}.png)" for name in figures)
    return write_text(out / "report.md", f"# loralab report: {path}\n\n{markdown_table(rows)}\n{images}\n")

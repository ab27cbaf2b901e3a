"""Figures of a run or a sweep: per-digit wrong counts, rank against gain and forgetting,
LoRA against full fine-tuning, and a sweep's learning–forgetting frontier over learning rates.
Written as PNG and logged to TensorBoard."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

from loralab.files import write_json, write_text  # noqa: E402
from loralab.report import markdown_table, seed_groups, seed_table, summary_row  # noqa: E402
from loralab.runs import Run, finished_runs  # noqa: E402
from loralab.selection import Arm, Selection, arms, table, to_json  # noqa: E402


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


def seeds_figure(groups: list[dict]):
    """Target gain against forgetting per setting: the median, with the seeds' min-max as bars."""
    fig, ax = plt.subplots(figsize=(9, 4.5))
    labels = [g["label"] for g in groups]
    for g in groups:
        before_t, before_o = g["target_wrong_before"], g["other_wrong_before"]
        t, o = g["target_wrong"], g["other_wrong"]
        x, y = o["median"] - before_o, before_t - t["median"]
        xerr = [[x - (o["min"] - before_o)], [(o["max"] - before_o) - x]]
        yerr = [[y - (before_t - t["max"])], [(before_t - t["min"]) - y]]
        name = g["label"] if labels.count(g["label"]) == 1 else g["setting"]
        ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="o", capsize=3, label=f"{name} ({len(g['seeds'])} seeds)")
    ax.set_xscale("symlog", linthresh=100)
    ax.set_xlabel("forgetting: more wrong on the other digits (median, min-max)")
    ax.set_ylabel("target gain: fewer wrong (median, min-max)")
    ax.set_title("What each setting buys and costs, over seeds")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


def write_report(path: Path) -> Path:
    runs = finished_runs(path)
    out = path / "report"
    out.mkdir(exist_ok=True)
    groups = seed_groups(runs)
    seeded = any(len(g["seeds"]) > 1 for g in groups)
    if seeded:  # one panel per setting (its first seed), not one per job
        firsts = {r.setting: r for r in reversed(runs)}
        runs = [r for r in runs if firsts[r.setting] is r]
    figures = {"per_digit": per_digit_figure(runs)}
    if seeded:
        figures["seeds"] = seeds_figure(groups)
    elif any(r.test_base for r in runs):
        figures["tradeoff"] = tradeoff_figure(runs)
    writer = SummaryWriter(str(out))
    for name, fig in figures.items():
        fig.savefig(out / f"{name}.png", dpi=110)
        writer.add_figure(f"report/{name}", fig)  # closes the figure
    writer.close()
    table = seed_table(groups) if seeded else markdown_table([summary_row(run) for run in runs])
    images = "\n".join(f"![{name}]({name}.png)" for name in figures)
    return write_text(out / "report.md", f"# loralab report: {path}\n\n{table}\n{images}\n")


def arm_colors(arm_list: list[Arm]) -> list:
    """One colour per arm, the same in both frontier figures."""
    return [plt.get_cmap("tab10")(i % 10) for i in range(len(arm_list))]


def frontier_figure(arm_list: list[Arm]):
    """Biderman et al. (2024)'s plot for MNIST: one curve per arm across its lrs, target errors
    fixed against forgetting on the test set, medians with min-max bars, each point its lr; the
    lr that validation chose is circled."""
    fig, ax = plt.subplots(figsize=(10, 6))
    for arm, color in zip(arm_list, arm_colors(arm_list)):
        xs, ys = [p.forgetting.median for p in arm.points], [p.gain.median for p in arm.points]
        xerr = [[p.forgetting.median - p.forgetting.low for p in arm.points], [p.forgetting.high - p.forgetting.median for p in arm.points]]
        yerr = [[p.gain.median - p.gain.low for p in arm.points], [p.gain.high - p.gain.median for p in arm.points]]
        ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, fmt="-o", ms=4, capsize=2, lw=1.2, elinewidth=0.6, label=arm.name, color=color)
        for p in arm.points:
            ax.annotate(f"{p.lr:.2g}", (p.forgetting.median, p.gain.median), fontsize=6, color=color, xytext=(3, 3), textcoords="offset points")
        ax.plot(arm.chosen.forgetting.median, arm.chosen.gain.median, "o", ms=11, mfc="none", mec=color, mew=1.5)
    ax.set_xscale("symlog", linthresh=10)
    ax.set_xlabel("forgetting: errors added on the other digits (test, median and min-max over seeds)")
    ax.set_ylabel("target errors fixed (test)")
    ax.set_title("Learning against forgetting, each arm across its learning rates (circled: chosen on validation)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def lr_response_figure(arm_list: list[Arm], rule: Selection):
    """The validation objective against lr, per arm: where each arm's optimum lies."""
    fig, ax = plt.subplots(figsize=(9, 5))
    for arm, color in zip(arm_list, arm_colors(arm_list)):
        lrs = [p.lr for p in arm.points]
        ax.plot(lrs, [p.objective.median for p in arm.points], "-o", ms=4, label=arm.name, color=color)
        ax.fill_between(lrs, [p.objective.low for p in arm.points], [p.objective.high for p in arm.points], color=color, alpha=0.12)
        ax.plot(arm.chosen.lr, arm.chosen.objective.median, "*", ms=13, color=color)
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=10)
    ax.set_xlabel("learning rate")
    ax.set_ylabel(f"validation objective: fixed - forgetting beyond {100 * rule.budget:g} %")
    ax.set_title("Each arm's objective against its learning rate (star: chosen; band: min-max over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def write_frontier(path: Path, rule: Selection | None = None) -> Path | None:
    """<sweep>/frontier/{frontier.png, lr_response.png, frontier.md, selection.json} for a sweep
    with an lr axis; None for one without. ``rule``: Selection's default, unless given."""
    rule = rule or Selection()
    arm_list = arms(finished_runs(path), rule)
    if not arm_list:
        return None
    out = path / "frontier"
    out.mkdir(exist_ok=True)
    writer = SummaryWriter(str(out))
    for name, fig in {"frontier": frontier_figure(arm_list), "lr_response": lr_response_figure(arm_list, rule)}.items():
        fig.savefig(out / f"{name}.png", dpi=110)
        writer.add_figure(f"frontier/{name}", fig)  # closes the figure
    writer.close()
    write_json(out / "selection.json", to_json(arm_list, rule))
    return write_text(out / "frontier.md", f"# Frontier: {path}\n\n{table(arm_list, rule)}\n![frontier](frontier.png)\n![lr response](lr_response.png)\n")

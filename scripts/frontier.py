"""The learning-forgetting frontier of a sweep with an lr axis (experiment=frontier): each arm's
lr chosen on validation, the test results at it, and the figures.

    python scripts/frontier.py outputs/finetune-sweep/<time> [--budget 0.01] [--claims]

Writes <dir>/frontier/{frontier.md, frontier.png, lr_response.png, selection.json}. The sweep
writes the same at its end with the default rule; --budget re-applies another rule without
re-running anything (loralab.selection says what it is). --claims prints, for experiment=frontier's
arms, what the sweep says of four published claims (docs/results.md's table).
"""

import math
import statistics
import sys
from pathlib import Path

from loralab.errors import ArgumentParser, ArtifactError
from loralab.plots import write_frontier
from loralab.runs import finished_runs
from loralab.selection import Arm, Selection, arms

LORA, VARIANTS = ("r=1", "r=4", "r=16", "r=64"), ("r=4 dora", "r=4 pissa", "r=4 lora+", "r=4 rslora")


def forgetting_at(arm: Arm, gain: float) -> float | None:
    """The forgetting where the arm's median curve (by lr) first fixes ``gain`` target errors,
    linearly between its two neighbouring lrs; None if no lr of its grid gets there."""
    points = arm.points
    for lo, hi in zip(points, points[1:]):
        if lo.gain.median <= gain <= hi.gain.median and hi.gain.median > lo.gain.median:
            t = (gain - lo.gain.median) / (hi.gain.median - lo.gain.median)
            return lo.forgetting.median + t * (hi.forgetting.median - lo.forgetting.median)
    return next((p.forgetting.median for p in points if p.gain.median == gain), None)


def claims(arm_list: list[Arm], rule: Selection) -> str:
    by = {a.name: a for a in arm_list}
    if not set(LORA) | {"full"} <= set(by):
        raise ValueError(f"--claims needs experiment=frontier's arms ({', '.join(LORA)}, full); this sweep has {', '.join(by)}")
    full, seeds = by["full"], by["full"].best_per_seed(rule)
    rows = ["| claim | measured on MNIST (median, min–max over seeds) | holds here? |", "|---|---|---|"]
    ratios = {n: [by[n].best_per_seed(rule)[s] / seeds[s] for s in seeds] for n in LORA}
    cells = "; ".join(f"{n}: {by[n].chosen.lr / full.chosen.lr:.3g} ({min(r):.3g}–{max(r):.3g})" for n, r in ratios.items())
    ten = statistics.median(by[n].chosen.lr / full.chosen.lr for n in LORA)
    away = round(abs(2 * math.log10(ten / 10)))  # the grids are half-decades: 10x and 31.6x are neighbours
    rows.append(f"| 1. LoRA's best lr is about 10× full fine-tuning's (LoRA Without Regret; 15× under 100 steps) | chosen-lr ratio {cells} "
                f"| {'yes' if away == 0 else 'nearly' if away == 1 else 'no'}: {ten:.3g}× at the median rank, "
                f"{away} half-decade grid step{'s' * (away != 1)} from 10× |")
    chosen = [by[n].chosen.lr for n in LORA]
    steps = round(2 * math.log10(max(chosen) / min(chosen)))
    rows.append(f"| 2. Under alpha/r with a fixed alpha, the best lr hardly depends on the rank | chosen lr at ranks 1, 4, 16, 64: "
                f"{', '.join(f'{lr:.3g}' for lr in chosen)} | {'yes' if steps <= 1 else 'no'}: {steps} half-decade{'s' * (steps != 1)} apart |")
    gain = full.chosen.gain.median
    at = {n: forgetting_at(by[n], gain) for n in (*LORA, "full")}
    cells = "; ".join(f"{n}: {'n/a' if f is None else f'{f:.0f}'}" for n, f in at.items())
    lora_less = [n for n in LORA if at[n] is not None and at[n] < at["full"]]
    rows.append(f"| 3. At equal target gain LoRA forgets less than full fine-tuning (Biderman et al. 2024) | forgetting at "
                f"{gain:g} target errors fixed (full's gain at its chosen lr), along each median curve: {cells} | "
                f"{'yes' if len(lora_less) == len(LORA) else 'no' if not lora_less else 'for ' + ', '.join(lora_less)} |")
    plain = by["r=4"].chosen
    diffs = {n: by[n].chosen.acc.median - plain.acc.median for n in VARIANTS if n in by}
    cells = "; ".join(f"{n}: {by[n].chosen.acc} %, target wrong {by[n].chosen.target_wrong}" for n in diffs)
    rows.append(f"| 4. DoRA, PiSSA, LoRA+ and rsLoRA, each at its best lr, are within 1–2 % of plain LoRA at its best (arXiv 2602.04998) | "
                f"r=4: {plain.acc} %, target wrong {plain.target_wrong}; {cells} | "
                f"{'yes' if all(abs(d) <= 2 for d in diffs.values()) else 'no'}: accuracy within {max(map(abs, diffs.values())):.2f} points |")
    return "\n".join(rows) + "\n"

if __name__ == "__main__":
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--budget", type=float, default=Selection().budget,
                        help="forgetting allowed free, as a share of the other digits' validation images (default %(default)s)")
    parser.add_argument("--claims", action="store_true", help="print the published claims' table (experiment=frontier's arms)")
    args = parser.parse_args()
    if not args.sweep_dir.is_dir():
        print(f"error: {args.sweep_dir} is not a directory; pass a sweep dir: python scripts/frontier.py outputs/finetune-sweep/<time>", file=sys.stderr)
        sys.exit(2)
    if not (math.isfinite(args.budget) and 0 <= args.budget <= 1):
        print(f"error: --budget={args.budget} is invalid: expected a share from 0 to 1 (0.01 is 1 %)", file=sys.stderr)
        sys.exit(2)
    try:
        written = write_frontier(args.sweep_dir, Selection(args.budget))
    except (ArtifactError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    if written is None:
        print(f"error: {args.sweep_dir} has no arm trained at two or more learning rates; sweep optim.lr (or lr_step) too", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {written}")
    if args.claims:
        try:
            print(claims(arms(finished_runs(args.sweep_dir), Selection(args.budget)), Selection(args.budget)))
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

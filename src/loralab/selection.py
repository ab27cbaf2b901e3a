"""Choosing each method's learning rate on validation, and reporting the test results at it.

A sweep with an lr axis (experiment=frontier) trains each arm (a method at a rank) at several
learning rates over several seeds. Every job records its per-digit errors on the held-out
validation split (metrics.json's ``val`` and ``val_base``). ``Selection`` is the one rule that
turns those into each arm's lr:

    objective = target errors fixed - max(0, errors added on the other digits - budget)

on validation, per seed; an arm's lr is the one with the highest median objective. So an lr
earns every target error it fixes until it forgets more than ``budget`` (a share of the other
digits' validation images), and loses one per error beyond. The test results are read only at
the lr chosen, so the tables report what the rule would pick without seeing the test set
(Biderman et al., 2024, tune each method's lr the same way before comparing them). Torch-free:
the rule can be changed and re-applied to a finished sweep (scripts/frontier.py --budget).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass

from loralab.config import flat
from loralab.results import Shift, TestResult
from loralab.runs import Run

# Keys that tell an arm's lr points and seeds apart, not arms (lr_step picks a grid point).
LR_KEYS = ("seed", "optim.lr", "lr_step")


@dataclass(frozen=True)
class Spread:
    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values))

    def __str__(self) -> str:
        return f"{self.median:g} ({self.low:g}–{self.high:g})"


@dataclass(frozen=True)
class Selection:
    """The rule: maximise the median over seeds of ``objective`` on validation."""

    budget: float = 0.01  # forgetting allowed free, as a share of the other digits' validation images

    def objective(self, base: TestResult, after: TestResult, digits: list[int]) -> float:
        shift = Shift.between(base, after, digits)
        allowed = self.budget * sum(c for d, c in enumerate(base.count) if d not in digits)
        return shift.gain - max(0.0, shift.forgetting - allowed)


@dataclass(frozen=True)
class Point:
    """One arm at one lr: its jobs (one per seed) and their medians and ranges."""

    lr: float
    runs: tuple[Run, ...]
    objective: Spread  # on validation: what selects
    val_gain: Spread
    val_forgetting: Spread
    gain: Spread  # on test: what is reported
    forgetting: Spread
    target_wrong: Spread
    acc: Spread


@dataclass(frozen=True)
class Arm:
    name: str
    points: tuple[Point, ...]  # by lr
    chosen: Point

    def best_per_seed(self, rule: Selection) -> dict[int, float]:
        """Each seed's own best lr on validation: how far the choice moves between seeds."""
        scores: dict[int, list[tuple[float, float]]] = {}
        for p in self.points:
            for run in p.runs:
                score = rule.objective(TestResult.from_json(run.metrics["val_base"]), TestResult.from_json(run.metrics["val"]), run.digits)
                scores.setdefault(run.metrics["seed"], []).append((score, -p.lr))
        return {seed: -max(pairs)[1] for seed, pairs in sorted(scores.items())}

    @property
    def at_edge(self) -> bool:
        """The chosen lr is the grid's lowest or highest: the optimum may lie beyond it."""
        return self.chosen is self.points[0] or self.chosen is self.points[-1]


def arm_key(run: Run) -> str:
    config = flat(run.metrics.get("config", {}))
    return json.dumps({k: v for k, v in config.items() if k not in LR_KEYS}, sort_keys=True)


def lr_of(run: Run) -> float:
    return float(run.metrics["config"]["optim"]["lr"])


def point(lr: float, runs: list[Run], rule: Selection) -> Point:
    vals = [(TestResult.from_json(r.metrics["val_base"]), TestResult.from_json(r.metrics["val"]), r.digits) for r in runs]
    val_shifts = [Shift.between(b, a, d) for b, a, d in vals]
    return Point(
        lr, tuple(runs),
        objective=Spread.of([rule.objective(b, a, d) for b, a, d in vals]),
        val_gain=Spread.of([s.gain for s in val_shifts]),
        val_forgetting=Spread.of([s.forgetting for s in val_shifts]),
        gain=Spread.of([r.shift.gain for r in runs]),
        forgetting=Spread.of([r.shift.forgetting for r in runs]),
        target_wrong=Spread.of([r.shift.target_after for r in runs]),
        acc=Spread.of([100 * r.test.acc for r in runs]),
    )


def arms(runs: list[Run], rule: Selection) -> list[Arm]:
    """Each arm of a sweep that has at least two lrs, its lr chosen by ``rule`` on validation."""
    if missing := [r.name for r in runs if "val" not in r.metrics or "val_base" not in r.metrics]:
        raise ValueError(f"{len(missing)} runs have no validation result (e.g. {missing[0]}); rerun them with this loralab")
    grouped: dict[str, dict[float, list[Run]]] = {}
    for run in runs:
        grouped.setdefault(arm_key(run), {}).setdefault(lr_of(run), []).append(run)
    out, names = [], arm_names(grouped)
    for by_lr, name in zip(grouped.values(), names):
        if len(by_lr) < 2:
            continue
        points = tuple(point(lr, by_lr[lr], rule) for lr in sorted(by_lr))
        # Ties go to the lower lr: the same objective with the smaller step.
        chosen = max(points, key=lambda p: (p.objective.median, -p.lr))
        out.append(Arm(name, points, chosen))
    return out


def arm_names(grouped: dict[str, dict[float, list[Run]]]) -> list[str]:
    """Each arm's label ("r=4 dora"); arms that share one get the settings that tell them apart
    ("r=4 data.digits=[8] trainer.max_steps=100")."""
    labels = [next(iter(g.values()))[0].label for g in grouped.values()]
    configs = [json.loads(key) for key in grouped]
    names = []
    for label, config in zip(labels, configs):
        twins = [c for c, other in zip(configs, labels) if other == label]
        differ = [k for k in sorted(config) if any(t.get(k) != config[k] for t in twins)]
        names.append(" ".join([label, *(f"{k}={json.dumps(config[k])}" for k in differ)]) if len(twins) > 1 else label)
    return names


def table(arm_list: list[Arm], rule: Selection) -> str:
    """Each arm at its chosen lr: test results, median (min–max) over seeds."""
    first = arm_list[0].chosen.runs[0]
    before = first.shift
    lines = [
        f"Each arm at the lr its validation objective chose (budget {100 * rule.budget:g} % of the other digits' "
        f"validation images); test set, median (min–max) over seeds. Base: target digits {first.digits} "
        f"{before.target_before} wrong, other digits {before.other_before} wrong.", "",
        "| arm | lr chosen | grid | seeds | target wrong | other digits' errors added | accuracy % | val objective |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm in arm_list:
        p = arm.chosen
        grid = f"{arm.points[0].lr:.2g}–{arm.points[-1].lr:.2g} ({len(arm.points)})" + (" edge" if arm.at_edge else "")
        lines.append(f"| {arm.name} | {p.lr:.3g} | {grid} | {len(p.runs)} | {p.target_wrong} | {p.forgetting} | "
                     f"{Spread(round(p.acc.median, 2), round(p.acc.low, 2), round(p.acc.high, 2))} | {p.objective} |")
    return "\n".join(lines) + "\n"


def to_json(arm_list: list[Arm], rule: Selection) -> dict:
    def spread(s: Spread) -> dict:
        return {"median": s.median, "min": s.low, "max": s.high}

    return {"rule": {"budget": rule.budget}, "arms": [{
        "arm": a.name, "chosen_lr": a.chosen.lr, "at_edge": a.at_edge, "best_lr_per_seed": a.best_per_seed(rule),
        "points": [{"lr": p.lr, "seeds": [r.metrics["seed"] for r in p.runs], "jobs": [r.name for r in p.runs],
                    **{k: spread(getattr(p, k)) for k in ("objective", "val_gain", "val_forgetting", "gain", "forgetting", "target_wrong", "acc")}}
                   for p in a.points],
    } for a in arm_list]}

"""experiment=combine's report: does a sum of single-digit adapters fix both digits, and at what
forgetting, against one adapter trained on both?

The sweep trains one adapter per digit (task=d8, task=d9) and one on the union (task=union,
the two single-digit budgets together), each over an lr grid and seeds. Each task's lr is chosen
on validation by loralab.selection's rule. Then, seed by seed, the single-digit adapters at their
chosen lrs are combined by each method (loralab.combine) and tested on the test set; the union's
adapter at its chosen lr is the joint-training arm. A last arm, d8 + d9 - d8 by cat, checks
negation: it must give d9's results exactly. Written to <sweep>/combine/: combine.md and
combine.json, medians (min–max) over seeds.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from loralab.adapter import apply_adapter
from loralab.combine import Recipe, combine, read
from loralab.data import load_tensors
from loralab.files import write_json, write_text
from loralab.results import NUM_CLASSES, TestResult
from loralab.runs import Run, finished_runs
from loralab.selection import Selection, Spread, arms
from loralab.weights import load_base

# Each method once, with the knobs PEFT's docs use as examples (density 0.5 keeps half the entries).
RECIPES = {
    "cat": {},
    "svd": {},  # at the inputs' rank: the sum truncated to half its rank
    "linear": {},
    "ties": {"density": 0.5},
    "dare_linear": {"density": 0.5},
    "dare_ties": {"density": 0.5},
}
EVAL_BATCH = 1000  # the test loader's batch (data.eval_batch_size's default)


def chosen_runs(runs: list[Run], rule: Selection) -> dict[tuple[int, ...], dict[int, Run]]:
    """Each task (its digits) -> seed -> the run at the task's lr chosen on validation."""
    by_task: dict[tuple[int, ...], list[Run]] = {}
    for run in runs:
        by_task.setdefault(tuple(run.digits), []).append(run)
    out = {}
    for digits, task_runs in sorted(by_task.items()):
        (arm,) = arms(task_runs, rule) or [None]
        if arm is None:
            raise ValueError(f"task {list(digits)} has fewer than two lrs; run experiment=combine's lr_step axis")
        out[digits] = {run.metrics["seed"]: run for run in arm.chosen.runs}
    return out


@torch.no_grad()
def test_result(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> TestResult:
    model.eval()
    predicted = torch.cat([model(x[i:i + EVAL_BATCH]).argmax(dim=1) for i in range(0, len(x), EVAL_BATCH)])
    count = torch.bincount(y, minlength=NUM_CLASSES)
    wrong = torch.bincount(y[predicted != y], minlength=NUM_CLASSES)
    return TestResult((predicted == y).float().mean().item(), tuple(wrong.tolist()), tuple(count.tolist()))


def combined_results(chosen: dict[tuple[int, ...], dict[int, Run]]) -> dict[str, dict[int, TestResult]]:
    """Arm name -> seed -> test result, for the single tasks, the union and each combination."""
    singles = [digits for digits in chosen if len(digits) == 1]
    joint = [digits for digits in chosen if len(digits) > 1]
    if len(singles) < 2 or len(joint) != 1:
        raise ValueError(f"experiment=combine needs two or more single-digit tasks and one union; found tasks {[list(d) for d in chosen]}")
    seeds = sorted(set.intersection(*(set(chosen[d]) for d in chosen)))
    names = [f"d{d[0]}" for d in singles]
    results: dict[str, dict[int, TestResult]] = {name: {} for name in [*names, "union"]}
    first = chosen[singles[0]][seeds[0]]
    base, _ = load_base(first.metrics["base"], first.metrics["model"]["sizes"])
    _, _, x, y = load_tensors(first.metrics["config"]["data_dir"])
    for seed in seeds:
        for name, digits in zip(names, singles):
            results[name][seed] = chosen[digits][seed].test
        results["union"][seed] = chosen[joint[0]][seed].test
        adapters = [read(chosen[digits][seed].path) for digits in singles]
        arms_here = {f"{' + '.join(names)} {method}": (adapters, Recipe(method, (1.0,) * len(adapters), **knobs))
                     for method, knobs in RECIPES.items()}
        negation = [*adapters, adapters[0]]
        arms_here[f"{' + '.join(names)} - {names[0]} cat"] = (negation, Recipe("cat", (1.0,) * len(adapters) + (-1.0,)))
        for name, (inputs, recipe) in arms_here.items():
            spec, tensors = combine(inputs, recipe)
            model = copy.deepcopy(base)
            apply_adapter(model, spec, tensors, name)
            results.setdefault(name, {})[seed] = test_result(model, x, y)
    return results


def summarise(results: dict[str, dict[int, TestResult]], base: TestResult, digits: list[int]) -> list[dict]:
    rows = []
    for name, by_seed in results.items():
        tests = list(by_seed.values())
        row = {"arm": name, "seeds": sorted(by_seed)}
        for d in digits:
            row[f"wrong_d{d}"] = Spread.of([t.wrong[d] for t in tests])
        others = [d for d in range(NUM_CLASSES) if d not in digits]
        row["forgetting"] = Spread.of([t.wrong_on(others) - base.wrong_on(others) for t in tests])
        row["acc"] = Spread.of([round(100 * t.acc, 2) for t in tests])
        rows.append(row)
    return rows


def write_combine_report(sweep_dir: str | Path, rule: Selection | None = None) -> Path:
    """<sweep>/combine/{combine.md, combine.json}; returns combine.md's path."""
    sweep_dir = Path(sweep_dir)
    rule = rule or Selection()
    chosen = chosen_runs(finished_runs(sweep_dir), rule)
    results = combined_results(chosen)
    union = next(d for d in chosen if len(d) > 1)
    a_run = next(iter(chosen[union].values()))
    base = a_run.test_base
    digits = list(union)
    rows = summarise(results, base, digits)
    lrs = {f"d{d[0]}" if len(d) == 1 else "union": float(next(iter(runs.values())).metrics["config"]["optim"]["lr"]) for d, runs in chosen.items()}
    head = [f"Base: {', '.join(f'digit {d} {base.wrong[d]} wrong' for d in digits)}, other digits "
            f"{base.wrong_on([d for d in range(NUM_CLASSES) if d not in digits])} wrong. Each task's lr chosen on validation "
            f"({', '.join(f'{k} {v:.3g}' for k, v in lrs.items())}); test set, median (min–max) over seeds.", "",
            "| arm | " + " | ".join(f"digit {d} wrong" for d in digits) + " | other digits' errors added | accuracy % |",
            "|---|" + "---|" * (len(digits) + 2)]
    lines = [f"| {r['arm']} | " + " | ".join(str(r[f'wrong_d{d}']) for d in digits) + f" | {r['forgetting']} | {r['acc']} |" for r in rows]
    out = sweep_dir / "combine"
    out.mkdir(exist_ok=True)

    def spread(s: Spread) -> dict:
        return {"median": s.median, "min": s.low, "max": s.high}

    write_json(out / "combine.json", {
        "rule": {"budget": rule.budget}, "lrs": lrs, "digits": digits,
        "base": base.to_json(),
        "arms": [{k: spread(v) if isinstance(v, Spread) else v for k, v in r.items()} for r in rows],
        "per_seed": {name: {str(seed): t.to_json() for seed, t in by_seed.items()} for name, by_seed in results.items()},
    })
    return write_text(out / "combine.md", f"# Adapters combined: {sweep_dir}\n\n" + "\n".join(head + lines) + "\n")

"""experiment=frontier as users run it: a real sweep of two arms over three learning rates and two
seeds, its lr chosen on validation alone, and the frontier figures and table."""

import dataclasses
import json

import pytest

from conftest import ROOT, assert_one_line_error, script, train_py
from loralab.methods import base_result
from loralab.results import TestResult
from loralab.runs import finished_runs
from loralab.selection import Selection, arms

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def frontier_sweep(tmp_path_factory, pretrained):
    out = tmp_path_factory.mktemp("frontier")
    done = train_py("-m", "experiment=frontier", "arm=lora_r1,full", "lr_step=-1,0,1", "seed=0,1", f"base={pretrained[1]}",
                    "trainer.max_steps=10", "data.val_size=1000", "trainer.enable_progress_bar=false", "accelerator=cpu",
                    f"output_root={out}")
    assert done.returncode == 0, done.stderr
    (sweep,) = (out / "finetune-sweep").iterdir()
    return sweep, done.stdout


def test_frontier_sweep_writes_both_figures_and_the_table(frontier_sweep):
    sweep, stdout = frontier_sweep
    out = sweep / "frontier"
    assert (out / "frontier.png").read_bytes()[:8] == PNG and (out / "lr_response.png").read_bytes()[:8] == PNG
    selection = json.loads((out / "selection.json").read_text())
    assert [a["arm"] for a in selection["arms"]] == ["r=1", "full"]
    for arm, centre in zip(selection["arms"], (-3.5, -5)):  # conf/arm/lora_r1.yaml, full.yaml
        lrs = [p["lr"] for p in arm["points"]]
        assert lrs == pytest.approx([10 ** (centre + step / 2) for step in (-1, 0, 1)], rel=1e-2)
        assert arm["chosen_lr"] in lrs and all(sorted(p["seeds"]) == [0, 1] for p in arm["points"])
    table = (out / "frontier.md").read_text()
    assert "| r=1 |" in table and "| full |" in table and "lr chosen" in table and "lr chosen" in stdout


def test_every_job_records_its_validation_result(frontier_sweep):
    sweep, _ = frontier_sweep
    runs = finished_runs(sweep)
    assert len(runs) == 12
    for run in runs:
        val, base = TestResult.from_json(run.metrics["val"]), TestResult.from_json(run.metrics["val_base"])
        assert sum(val.count) == sum(base.count) == 1000 and val.count == base.count
        assert run.metrics["val_split"] == {"seed": 0, "size": 1000}  # the same images for every seed
    assert len({json.dumps(r.metrics["val_base"]) for r in runs}) == 1  # one base, one split: one result


def with_result(run, key: str, result: TestResult):
    return dataclasses.replace(run, metrics=run.metrics | {key: result.to_json()})


def perfect(result: TestResult) -> TestResult:
    return TestResult(1.0, (0,) * 10, result.count)


def test_selection_reads_validation_only(frontier_sweep):
    """Test results made perfect at every lr not chosen change no choice; the same made to the
    validation results of one lr not chosen makes it the choice."""
    sweep, _ = frontier_sweep
    runs = finished_runs(sweep)
    rule = Selection()
    chosen = {a.name: a.chosen.lr for a in arms(runs, rule)}
    lr = lambda run: run.metrics["config"]["optim"]["lr"]  # noqa: E731
    other = {name: next(p.lr for p in a.points if p.lr != chosen[name]) for name, a in ((a.name, a) for a in arms(runs, rule))}
    test_changed = [with_result(r, "test", perfect(r.test)) if lr(r) != chosen[r.label] else r for r in runs]
    assert {a.name: a.chosen.lr for a in arms(test_changed, rule)} == chosen
    val_changed = [with_result(r, "val", perfect(TestResult.from_json(r.metrics["val"]))) if lr(r) == other[r.label] else r for r in runs]
    assert {a.name: a.chosen.lr for a in arms(val_changed, rule)} == other


def test_the_rule_is_reapplied_without_rerunning(frontier_sweep):
    sweep, _ = frontier_sweep
    done = script(ROOT / "scripts" / "frontier.py", sweep, "--budget", "0.5")
    assert done.returncode == 0, done.stderr
    assert json.loads((sweep / "frontier" / "selection.json").read_text())["rule"] == {"budget": 0.5}
    assert_one_line_error(script(ROOT / "scripts" / "frontier.py", sweep, "--budget", "nan"), "--budget=nan is invalid")


def test_the_objective_counts_forgetting_beyond_the_budget_only():
    base = TestResult(0.9, (10,) * 10, (100,) * 10)
    after = TestResult(0.9, (10,) * 9 + (2,), (100,) * 10)  # digit 9: 8 errors fixed, nothing forgotten
    assert Selection(0.01).objective(base, after, [9]) == 8
    forgot = TestResult(0.9, (30,) + (10,) * 8 + (2,), (100,) * 10)  # 20 added on digit 0; 1 % of 900 is 9
    assert Selection(0.01).objective(base, forgot, [9]) == 8 - (20 - 9)
    assert Selection(0.5).objective(base, forgot, [9]) == 8


def test_base_results_are_shared_by_base_and_images_only():
    calls = []

    def test(split):
        calls.append(split)
        return TestResult(0.5, (1,) * 10, (2,) * 10)

    logged = []
    for sha, images in (("a", ("data",)), ("a", ("data",)), ("b", ("data",)), ("a", ("data", 5000, 1))):
        base_result(test, "test_base", f"frontier-test-{sha}", images, lambda result, split: logged.append(split))
    assert len(calls) == 3 and logged == ["test_base"]  # the shared one is logged in the job that reuses it

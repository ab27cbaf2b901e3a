"""The variants experiment as users run it: a real multirun over variants and seeds, its summary
grouped by seed (median and min-max), and the report's figure with the seeds' spread."""

import csv
import json

import pytest

from conftest import ROOT, SLICE, load, script, train_py
from loralab.errors import ConfigError


@pytest.fixture(scope="module")
def variants_sweep(tmp_path_factory, pretrained):
    out = tmp_path_factory.mktemp("variants")
    done = train_py("experiment=variants", "variant=lora,dora,pissa,loraplus,full", "lora.rank=2", "seed=0,1", f"base={pretrained[1]}",
                    *SLICE, "trainer.max_steps=3", "trainer.val_check_interval=3", f"output_root={out}", "-m")
    assert done.returncode == 0, done.stderr
    (sweep,) = (out / "finetune-sweep").iterdir()
    return sweep, done.stdout


def test_summary_groups_jobs_that_differ_only_by_seed(variants_sweep):
    sweep, stdout = variants_sweep
    with open(sweep / "summary.csv") as handle:
        jobs = list(csv.DictReader(handle))
    assert len(jobs) == 10 and {j["status"] for j in jobs} == {"ok"}  # one row per job stays
    groups = json.loads((sweep / "seeds.json").read_text())
    assert [g["label"] for g in groups] == ["r=2", "r=2 dora", "r=2 pissa", "r=2 lora+", "full"]
    assert all(sorted(g["seeds"]) == [0, 1] for g in groups)
    for g in groups:
        members = [int(j["target_wrong_after"]) for j in jobs if j["variant"] == g["label"]]
        assert g["target_wrong"]["min"] <= g["target_wrong"]["median"] <= g["target_wrong"]["max"]
        assert {g["target_wrong"]["min"], g["target_wrong"]["max"]} == {min(members), max(members)}
        assert g["step_ms"]["median"] > 0
    dora = next(g for g in groups if g["label"] == "r=2 dora")
    plain = next(g for g in groups if g["label"] == "r=2")
    assert dora["trainable"] == plain["trainable"] + 1000 + 2000 + 10  # one magnitude per output unit
    assert "Medians over seeds (min–max)" in (sweep / "summary.md").read_text() and "Medians over seeds" in stdout


def test_report_draws_the_seed_spread(variants_sweep):
    sweep, _ = variants_sweep
    done = script(ROOT / "scripts" / "report.py", sweep)
    assert done.returncode == 0, done.stderr
    assert (sweep / "report" / "seeds.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (sweep / "report" / "report.md").read_text()
    assert "![seeds](seeds.png)" in report and "variant=dora" in report


def test_pissa_records_the_rank_it_trained_and_saves_twice_that(variants_sweep):
    sweep, _ = variants_sweep
    (job,) = [p for p in sweep.iterdir() if "variant=pissa" in p.name and "seed=0" in p.name]
    metrics = json.loads((job / "metrics.json").read_text())
    assert metrics["lora"]["rank"] == 2 and metrics["lora"]["saved_rank"] == 4 and metrics["lora"]["init"] == "pissa"
    assert metrics["base_unchanged"] is True
    assert json.loads((job / "adapter_config.json").read_text())["r"] == 4


@pytest.mark.parametrize("overrides, message", [
    (["stage=finetune", "finetune.method=full", "optim.loraplus_ratio=16"], "a full fine-tune has none"),
    (["stage=finetune", "optim.loraplus_ratio=0"], "optim.loraplus_ratio=0"),
    (["stage=finetune", "lora.init=pissa", "lora.rank=11"], "10 singular vectors"),
])
def test_combinations_that_make_no_sense_are_refused(overrides, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        load(overrides, tmp_path)

"""Sweeps on Hydra's own engines: the joblib launcher (parallel local jobs) and the Optuna sweeper."""

import csv
import json

from conftest import SLICE, train_py


def test_joblib_launcher_runs_jobs_in_parallel_workers(tmp_path, pretrained):
    done = train_py("stage=finetune", "lora.rank=1,2", f"base={pretrained[1]}", *SLICE, "trainer.max_steps=3",
                    "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"output_root={tmp_path}", "-m")
    assert done.returncode == 0, done.stderr[-2000:]
    (sweep,) = (tmp_path / "finetune-sweep").iterdir()
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [r["status"] for r in rows] == ["ok", "ok"] and sorted(r["rank"] for r in rows) == ["1", "2"]
    assert "Joblib" in done.stdout + done.stderr  # Hydra's joblib launcher announced itself


def test_optuna_sweeper_maximises_the_objective(tmp_path, pretrained):
    done = train_py("experiment=optuna", "hydra.sweeper.n_trials=2", f"base={pretrained[1]}", *SLICE,
                    "trainer.max_steps=3", f"output_root={tmp_path}", "-m")
    assert done.returncode == 0, done.stderr[-2000:]
    (sweep,) = (tmp_path / "finetune-sweep").iterdir()
    jobs = sorted(sweep.glob("*/metrics.json"))
    assert len(jobs) == 2
    objectives = [json.loads(p.read_text())["objective"] for p in jobs]
    best = (sweep / "optimization_results.yaml").read_text()
    assert f"best_value: {max(objectives)}" in best

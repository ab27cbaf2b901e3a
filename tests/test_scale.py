"""Sweeps on Hydra's own engines: the joblib launcher (parallel local jobs) and the Optuna sweeper."""

import csv
import json

import pytest

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


def test_submitit_local_launcher_runs_the_sweep_as_submitit_jobs(tmp_path, pretrained):
    done = train_py("stage=finetune", "lora.rank=1,2", f"base={pretrained[1]}", *SLICE, "trainer.max_steps=3",
                    "hydra/launcher=submitit_local", f"output_root={tmp_path}", "-m")
    assert done.returncode == 0, done.stderr[-2000:]
    (sweep,) = (tmp_path / "finetune-sweep").iterdir()
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [r["status"] for r in rows] == ["ok", "ok"]
    # Each job ran in its own submitit process, which left its pickled result and logs behind.
    assert len(list((sweep / ".submitit").glob("*/*_result.pkl"))) == 2


def test_slurm_launcher_config_makes_a_valid_sbatch_script(tmp_path):
    """No cluster here: compose the shipped config, hand its parameters to submitit's own SLURM
    executor (which rejects unknown or ill-typed ones) and render the sbatch script it would submit."""
    import yaml
    from submitit.slurm.slurm import SlurmExecutor

    class SlurmExecutorWithoutSrun(SlurmExecutor):
        # The only thing missing here is a cluster: submitit looks for `srun` before anything else.
        @staticmethod
        def affinity() -> int:
            return 1

    done = train_py("hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=1",
                    "stage=finetune", "accelerator=gpu", f"output_root={tmp_path}", "--cfg", "hydra")
    assert done.returncode == 0, done.stderr
    launcher = yaml.safe_load(done.stdout)["hydra"]["launcher"]
    assert launcher["_target_"].endswith("SlurmLauncher")
    # Interpolations into the run (folder, job name) only resolve inside Hydra; the rest is literal.
    params = {k: v for k, v in launcher.items() if k not in ("_target_", "submitit_folder", "name", "max_num_timeout")}
    executor = SlurmExecutorWithoutSrun(tmp_path / "submitit", max_num_timeout=launcher["max_num_timeout"])
    executor.update_parameters(**executor._convert_parameters(params))
    script = executor._make_submission_file_text("python train.py", "0")
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=1", "#SBATCH --cpus-per-task=4",
                 "#SBATCH --time=60", "#SBATCH --mem=16GB", "#SBATCH --signal=USR2@120"):
        assert line in script, script
    with pytest.raises(ValueError, match="Unavailable parameter"):
        executor.update_parameters(partiton="gpu")  # what a typo in the config would meet

"""Sweeps on Hydra's own engines: the joblib launcher (parallel local jobs) and the Optuna sweeper."""

import csv
import json

import pytest
import torch

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


def adapter_of(run_dir):
    from safetensors.torch import load_file

    return load_file(run_dir / "adapter_model.safetensors")


def test_ddp_on_two_cpu_processes_matches_one_process(tmp_path, pretrained):
    """gloo DDP, 2 ranks: each rank takes half of every batch, so the averaged gradient is the
    one-process gradient and the results agree to float rounding."""
    from safetensors.torch import load_file

    finetune = ["stage=finetune", f"base={pretrained[1]}", *SLICE, "trainer.max_steps=20", "trainer.val_check_interval=10", "data.replay=0.2"]
    pretrain = ["stage=pretrain", *SLICE, "trainer.max_epochs=1", "trainer.limit_val_batches=2"]
    for name, overrides in (("finetune", finetune), ("pretrain", pretrain)):
        for devices in (1, 2):
            extra = ["accelerator=ddp"] if devices == 2 else []
            done = train_py(*overrides, *extra, f"hydra.run.dir={tmp_path / f'{name}-{devices}'}")
            assert done.returncode == 0, done.stderr[-3000:]
        one, two = (json.loads((tmp_path / f"{name}-{d}" / "metrics.json").read_text()) for d in (1, 2))
        assert two["config"]["trainer"]["strategy"] == "ddp_spawn" and two["config"]["trainer"]["devices"] == 2
        assert abs(one["test"]["acc"] - two["test"]["acc"]) <= 0.001
        assert sum(abs(a - b) for a, b in zip(one["test"]["wrong"], two["test"]["wrong"])) <= 10
    a, b = adapter_of(tmp_path / "finetune-1"), adapter_of(tmp_path / "finetune-2")
    assert set(a) == set(b) and all(agree_to_rounding(a[k], b[k]) for k in a)
    assert any(t.abs().sum() > 0 for k, t in b.items() if "lora_B" in k)  # rank 0's trained adapter came back
    two = json.loads((tmp_path / "finetune-2" / "metrics.json").read_text())
    assert two["base_unchanged"] is True and two["optimizer_state_bytes"] == 54376
    a, b = (load_file(tmp_path / f"pretrain-{d}" / "base.safetensors") for d in (1, 2))
    assert all(agree_to_rounding(a[k], b[k]) for k in a)


def agree_to_rounding(one, two) -> bool:
    """Weights trained in one process and over two ranks, equal up to float32 rounding. The ranks
    sum half-batches in another order and the all-reduce adds the halves, so every gradient
    differs by rounding, relative 1e-7 per addition and about 1e-5 over a half-batch sum. Adam
    divides each gradient by its own running size: for the few elements whose gradient is within
    that rounding of zero, one step can move by up to 2 lr either way, which is how one weight
    in millions ends 2e-5 apart on one CPU and 5e-6 on another (BLAS blocks sums by CPU). An
    elementwise tolerance would be a CPU's; the tensor as a whole agrees to well under 1e-4 of
    its norm on any of them, while ranks that train the wrong shares (both the same half of each
    batch) move it by the size of the training updates."""
    return bool(torch.linalg.norm(one - two) <= 1e-4 * torch.linalg.norm(one))


def test_ddp_inside_a_multirun_runs_each_job_once(tmp_path, pretrained):
    done = train_py("stage=finetune", "lora.rank=1,2", "accelerator=ddp", f"base={pretrained[1]}", *SLICE,
                    "trainer.max_steps=4", "trainer.val_check_interval=2", f"output_root={tmp_path}", "-m")
    assert done.returncode == 0, done.stderr[-3000:]
    (sweep,) = (tmp_path / "finetune-sweep").iterdir()  # one sweep: no rank re-ran it (Lightning #11300)
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [r["status"] for r in rows] == ["ok", "ok"] and sorted(r["rank"] for r in rows) == ["1", "2"]
    assert len([p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")]) == 2


def test_bf16_mixed_precision_trains_and_saves_float32_adapters(tmp_path, pretrained):
    # The GPU option (accelerator=gpu trainer.precision=bf16-mixed); autocast runs on CPU too.
    done = train_py("stage=finetune", f"base={pretrained[1]}", *SLICE, "trainer.max_steps=10", "trainer.precision=bf16-mixed",
                    f"hydra.run.dir={tmp_path / 'bf16'}")
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((tmp_path / "bf16" / "metrics.json").read_text())
    assert metrics["config"]["trainer"]["precision"] == "bf16-mixed" and metrics["base_unchanged"]
    adapter = adapter_of(tmp_path / "bf16")
    assert adapter and all(str(t.dtype) == "torch.float32" for t in adapter.values())
    assert metrics["test"]["wrong"][9] < metrics["test_base"]["wrong"][9]

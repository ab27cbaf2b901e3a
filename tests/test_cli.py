"""The CLI as users run it: one line per bad input, non-zero exit, nothing left behind or touched."""

import csv
import json

import pytest
from safetensors.torch import load_file

from conftest import SLICE, assert_one_line_error, train_py, tree_digest


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["stage=finetune", "lora.rank=0"], ["lora.rank=0"]),
        (["data.digits=[1,1]"], ["data.digits", "once"]),
        (["stage=finetune", "base=/nonexistent/run"], ["base=/nonexistent/run does not exist"]),
        (["lora.rank=4"], ["lora.rank=4 is read only by stage=finetune", "stage=pretrain run has no such setting"]),  # not a minute of pretraining
        # Lightning's own rules, as one line: a ValueError at construction, a ZeroDivisionError
        # it would raise mid-fit (after writing events and hparams.yaml), a TypeError.
        (["stage=finetune", "trainer.precision=bogus"], ["trainer.precision='bogus' is invalid"]),
        (["stage=finetune", "trainer.val_check_interval=0"], ["trainer.val_check_interval=0 is invalid"]),
        (["+trainer.no_such_key=1"], ["trainer.no_such_key is not a lightning.Trainer argument"]),
    ],
)
def test_bad_input_exits_with_one_line_and_writes_nothing(args, fragments, tmp_path):
    done = train_py(*args, f"output_root={tmp_path}")
    assert_one_line_error(done, *fragments)
    assert done.returncode == 2
    assert list(tmp_path.iterdir()) == []  # no run dir left behind


def test_trainer_value_wrong_for_the_data_leaves_no_run_dir(tmp_path, pretrained):
    """Validation every 25 batches of a 5-batch epoch: known only once the data is, and still
    caught before the Trainer writes anything."""
    args = [*SLICE, "stage=finetune", f"base={pretrained[1]}", "trainer.check_val_every_n_epoch=1", f"output_root={tmp_path}"]
    done = train_py(*args)
    assert_one_line_error(done, "trainer.val_check_interval=25 is invalid", "number of the training batches (5)")
    assert done.returncode == 2
    assert list(tmp_path.iterdir()) == []


def test_finetune_without_pretrain_says_what_to_run(tmp_path):
    done = train_py("stage=finetune", f"output_root={tmp_path}")
    assert_one_line_error(done, "run `python train.py stage=pretrain` first")


def test_bad_base_files(tmp_path, pretrained):
    text = tmp_path / "notes.txt"
    text.write_text("not weights")
    truncated = tmp_path / "base.safetensors"
    truncated.write_bytes((pretrained[1] / "base.safetensors").read_bytes()[:5000])
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    out = tmp_path / "out"
    for base, fragment in [(text, "not a readable safetensors"), (truncated, "not a readable safetensors"), (empty_dir, "no base.safetensors")]:
        before = tree_digest(tmp_path)
        assert_one_line_error(train_py("stage=finetune", f"base={base}", f"output_root={out}"), fragment)
        assert tree_digest(tmp_path) == before
    small = train_py("stage=finetune", f"base={pretrained[1]}", "model=small_mlp", f"output_root={out}")
    assert_one_line_error(small, "784-1000-2000-10 model but the configured model is 784-128-64-10")


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["model=huge_mlp"], ["model=huge_mlp is not a config in conf/model/", "expensive_mlp, small_mlp"]),
        (["stage=nope"], ["stage=nope", "eval, finetune, pretrain"]),
        (["accelerator=tpu"], ["accelerator=tpu", "auto, cpu, ddp, gpu"]),
        (["digits=ten"], ["digits=ten", "all, auto, nine, weak"]),
        (["lora=qlora", "stage=finetune"], ["lora=qlora", "peft, seeds"]),
        (["experiment=no_forgeting"], ["experiment=no_forgeting", "no_forgetting"]),  # a typo never runs the default
        (["lora.rnk=4"], ["lora.rnk=4 is not a setting"]),
        (["eval.merge=true"], ["eval.merge=true is read only by stage=eval", "add stage=eval"]),  # its section comes with the stage
        (["lora.rank=[1"], ["does not parse"]),
        (["hydra/launcher=slurm", "stage=finetune", "-m"], ["needs a SLURM cluster", "submitit_local"]),
    ],
)
def test_config_that_does_not_compose_gives_one_line(args, fragments, tmp_path):
    done = train_py(f"output_root={tmp_path}", *args)
    assert_one_line_error(done, *fragments)
    assert done.returncode == 2 and list(tmp_path.iterdir()) == []


def test_finished_run_dir_is_never_overwritten(pretrained):
    run_dir = pretrained[1]
    before = tree_digest(run_dir)
    done = train_py("stage=pretrain", f"hydra.run.dir={run_dir}")
    assert_one_line_error(done, "already holds a finished run")
    assert tree_digest(run_dir) == before


def test_rank_sweep_writes_a_summary(tmp_path, pretrained):
    done = train_py("stage=finetune", "lora.rank=1,2", f"base={pretrained[1]}", *SLICE, "trainer.max_steps=5", f"output_root={tmp_path}", "-m")
    assert done.returncode == 0, done.stderr
    (sweep,) = (tmp_path / "finetune-sweep").iterdir()
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 2 and jobs[0].startswith("0_") and "lora.rank=1" in jobs[0] and "lora.rank=2" in jobs[1]
    csv_lines = (sweep / "summary.csv").read_text().splitlines()
    assert len(csv_lines) == 3 and csv_lines[0].startswith("job,status,method,rank")
    assert ",ok,lora,1," in csv_lines[1] and ",ok,lora,2," in csv_lines[2]
    assert f"| {jobs[1]} | ok | lora | 2 |" in (sweep / "summary.md").read_text()
    assert done.stdout.count("Sweep summary") == 1
    # Logged too: in the sweep's own log, not in the last job's train.log (Hydra's file handler by then).
    assert f"| {jobs[1]} | ok | lora | 2 |" in (sweep / "sweep.log").read_text()
    assert "Sweep summary" not in (sweep / jobs[1] / "train.log").read_text()
    assert "target digits [9]: wrong" in (sweep / jobs[1] / "train.log").read_text()


def test_twelve_job_sweep_with_bad_values_finishes_the_rest(tmp_path, pretrained):
    """ranks x alphas x digit sets = 12 jobs; rank 0 is invalid in 4 of them."""
    done = train_py("stage=finetune", "lora.rank=1,2,0", "lora.alpha=1,4", "digits=nine,weak", f"base={pretrained[1]}",
                    *SLICE, "trainer.max_steps=3", f"output_root={tmp_path}", "-m")
    assert done.returncode == 1 and "4 of 12 jobs failed" in done.stderr
    (sweep,) = (tmp_path / "finetune-sweep").iterdir()
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert len(rows) == 12
    ok = [r for r in rows if r["status"] == "ok"]
    failed = [r for r in rows if r["status"] != "ok"]
    assert len(ok) == 8 and all("lora.rank=0" in r["status"] for r in failed)
    for row in ok:  # every finished job's artifacts are whole
        job = sweep / row["job"]
        metrics = json.loads((job / "metrics.json").read_text())
        assert metrics["base_unchanged"] and metrics["lora"]["rank"] == int(row["rank"])
        load_file(job / "adapter_model.safetensors")
        assert not list(job.glob(".*.tmp"))


def test_a_pretrain_sweep_with_a_failed_job_exits_1(tmp_path):
    """The sweep's end (summary, and the frontier report for fine-tunes only) never hides a failed job."""
    done = train_py("-m", *SLICE, "stage=pretrain", "trainer.max_epochs=1", "trainer.val_check_interval=1.0,25", f"output_root={tmp_path}")
    assert done.returncode == 1 and "1 of 2 jobs failed" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "no frontier report" not in done.stderr


def test_digits_auto_without_base_metrics(tmp_path, pretrained):
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "base.safetensors").write_bytes((pretrained[1] / "base.safetensors").read_bytes())
    done = train_py("stage=finetune", "digits=auto", f"base={lone}", f"output_root={tmp_path / 'out'}")
    assert_one_line_error(done, "digits=auto needs the base's metrics.json")
    pre = train_py("stage=pretrain", "digits=auto", f"output_root={tmp_path / 'out'}")
    assert_one_line_error(pre, "needs stage=finetune")


def test_failed_run_with_files_is_marked_failed(tmp_path):
    """A run that fails after writing files keeps them (its log, its checkpoint) beside the
    reason; one that finished is never marked."""
    from loralab.cli import mark_failed
    from loralab.errors import ArtifactError
    from loralab.runs import sweep_jobs

    failed, finished = tmp_path / "sweep" / "0_failed", tmp_path / "finished"
    for run_dir in (failed, finished):
        (run_dir / ".hydra").mkdir(parents=True)
        (run_dir / "events.out.tfevents.1").write_bytes(b"")
    (finished / "metrics.json").write_text("{}")
    mark_failed(failed, ArtifactError("the base changed on disk"))
    mark_failed(finished, RuntimeError("after the fact"))
    assert (failed / "error.txt").read_text() == "the base changed on disk\n"
    assert not (finished / "error.txt").exists()
    assert sweep_jobs(tmp_path / "sweep")[0].error == "the base changed on disk"


def test_help_shows_stages_groups_and_commands(tmp_path):
    done = train_py("--help", f"output_root={tmp_path}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    for text in ("pretrain   train the base", "model: expensive_mlp, small_mlp", "python train.py stage=pretrain\n",
                 "python train.py stage=finetune lora.rank=1,2,4 -m", "tensorboard --logdir outputs"):
        assert text in done.stdout
    assert list(tmp_path.iterdir()) == []

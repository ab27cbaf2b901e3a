"""Reproducible runs, resuming after a SIGKILL, and refusing unsafe checkpoints."""

import json
import pickle
import shlex
import signal
import subprocess
import time

import pytest
import torch

from conftest import SLICE, MakesADirectory, assert_one_line_error, run, start_train_py, train_py

VOLATILE = {"seconds", "artifacts", "config", "base", "git_commit", "peak_rss_bytes"}  # measurements and paths, not results


def stable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in VOLATILE}


def test_same_seed_gives_identical_metrics(pretrained, outputs):
    overrides = [*SLICE, "stage=finetune", "trainer.max_steps=10", f"base={pretrained[1]}", "data.replay=0.3", "lora.dropout=0.1"]
    first, _ = run(overrides, outputs, "repro-a")
    second, _ = run(overrides, outputs, "repro-b")
    assert stable(first) == stable(second)
    pre_a, _ = run([*SLICE, "stage=pretrain", "trainer.max_epochs=1"], outputs, "repro-pre")
    assert stable(pre_a) == stable(pretrained[0])


def test_killed_pretrain_resumes_to_the_same_result(tmp_path):
    overrides = [*SLICE, "trainer.limit_train_batches=40", "trainer.max_epochs=3", "stage=pretrain"]
    uninterrupted, _ = run(overrides, tmp_path, "whole")
    killed_dir = tmp_path / "killed"
    proc = start_train_py(*overrides, f"hydra.run.dir={killed_dir}", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = killed_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # mid-run: after the first epoch's checkpoint, before the end
    proc.wait()
    assert last.exists() and not (killed_dir / "metrics.json").exists()
    done = train_py(*overrides, f"resume={killed_dir}", f"hydra.run.dir={tmp_path / 'resumed'}")
    assert done.returncode == 0, done.stderr
    resumed = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert resumed["test"] == uninterrupted["test"]
    assert resumed["base_sha256"] == uninterrupted["base_sha256"]


def start_and_wait_for_checkpoint(overrides: list[str], run_dir) -> subprocess.Popen:
    proc = start_train_py(*overrides, f"hydra.run.dir={run_dir}", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert last.exists(), proc.communicate()
    return proc


def finetune_overrides(base_dir) -> list[str]:
    # Whole epochs of digit 9 are 540 batches: every checkpoint (each 20 steps) falls mid-epoch.
    return [*SLICE, "trainer.limit_train_batches=null", "stage=finetune", f"base={base_dir}",
            "trainer.max_steps=300", "trainer.val_check_interval=20", "data.replay=0.3"]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_killed_finetune_resumes_mid_epoch_to_the_same_result(pretrained, tmp_path, method):
    """A LoRA checkpoint holds the adapter and its Adam state, not another copy of the base; a full
    fine-tune's holds the whole network and its Adam state, and the frozen copy that distillation
    compares against is left out of it and filled back in from the base."""
    full = ["finetune.method=full", "finetune.distill=1.0"] if method == "full" else []
    overrides = [*finetune_overrides(pretrained[1]), *full]
    uninterrupted, _ = run(overrides, tmp_path, "whole")
    killed_dir = tmp_path / "killed"
    proc = start_and_wait_for_checkpoint(overrides, killed_dir)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert not (killed_dir / "metrics.json").exists()
    assert torch.load(killed_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] < 300
    done = train_py(*overrides, f"resume={killed_dir}", f"hydra.run.dir={tmp_path / 'resumed'}")
    assert done.returncode == 0, done.stderr
    resumed = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert resumed["test"] == uninterrupted["test"] != resumed["test_base"] == uninterrupted["test_base"]
    assert resumed["optimizer_state_bytes"] == uninterrupted["optimizer_state_bytes"]
    if method == "lora":
        assert resumed["base_unchanged"] is True
        assert (killed_dir / "checkpoints" / "last.ckpt").stat().st_size < 1_000_000


def test_sigterm_stops_cleanly_and_prints_the_resume_command(pretrained, tmp_path):
    # Long enough (1,000 steps, seconds) that the signal, sent at the first checkpoint, lands mid-training.
    overrides = [*finetune_overrides(pretrained[1]), "trainer.max_steps=1000", "trainer.val_check_interval=50"]
    run_dir = tmp_path / "terminated"
    proc = start_and_wait_for_checkpoint(overrides, run_dir)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr
    hint = [line for line in stderr.splitlines() if line.startswith("interrupted:")]
    assert len(hint) == 1 and f"resume={run_dir}" in hint[0], stderr
    assert not (run_dir / "metrics.json").exists()
    stopped_at = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 0 < stopped_at < 1000
    args = shlex.split(hint[0].split("resume with: ", 1)[1])
    assert args[:2] == ["python", "train.py"]
    done = train_py(*args[2:], f"hydra.run.dir={tmp_path / 'resumed'}")  # the hint's command, as typed
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "resumed" / "metrics.json").read_text())["status"] == "ok"


def test_resume_with_another_config_is_refused(pretrained, tmp_path):
    run_dir = tmp_path / "run"
    proc = start_and_wait_for_checkpoint(finetune_overrides(pretrained[1]), run_dir)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    changed = [o if o != "data.replay=0.3" else "data.replay=0.5" for o in finetune_overrides(pretrained[1])]
    done = train_py(*changed, f"resume={run_dir}", f"hydra.run.dir={tmp_path / 'resumed'}")
    assert_one_line_error(done, "ran with data.replay=0.3, not 0.5")
    assert ".hydra/overrides.yaml" in done.stderr and not (tmp_path / "resumed").exists()


def test_malicious_checkpoint_is_refused_without_running(tmp_path):
    evidence = tmp_path / "pwned"
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(pickle.dumps({"state_dict": MakesADirectory(str(evidence))}))
    done = train_py("stage=pretrain", f"resume={tmp_path / 'run'}", f"output_root={tmp_path / 'out'}")
    assert_one_line_error(done, "not a loadable checkpoint")
    assert not evidence.exists()
    missing = train_py("stage=pretrain", f"resume={tmp_path / 'nothing'}", f"output_root={tmp_path / 'out'}")
    assert_one_line_error(missing, "has no checkpoints/last.ckpt")

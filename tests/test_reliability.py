"""Reproducible runs, resuming after a SIGKILL, and refusing unsafe checkpoints."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time

from conftest import DATA_DIR, ROOT, SLICE, MakesADirectory, run, train_py
from test_cli import assert_one_line_error

VOLATILE = {"seconds", "artifacts", "config", "base", "git_commit"}


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
    cmd = [sys.executable, str(ROOT / "train.py"), *overrides, f"hydra.run.dir={killed_dir}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "LORALAB_DATA_DIR": str(DATA_DIR)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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

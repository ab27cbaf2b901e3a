"""What a user sees: one line per event, no advertisements, no warnings they cannot act on."""

from collections import Counter

from conftest import SLICE, train_py


def test_a_finetune_prints_each_line_once_and_no_noise(pretrained, tmp_path):
    done = train_py("stage=finetune", f"base={pretrained[1]}", *SLICE, "trainer.max_steps=10", f"hydra.run.dir={tmp_path / 'run'}")
    assert done.returncode == 0, done.stderr
    lines = [line.split("] - ", 1)[-1] for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    repeated = {line: n for line, n in Counter(lines).items() if n > 1}
    assert not repeated, repeated
    text = done.stdout + done.stderr
    for noise in ("Tip", "deprecated", "Traceback", "Warning"):
        assert noise not in text, text
    assert "target digits [9]" in done.stdout  # the per-digit table is the point: it stays
    log = (tmp_path / "run" / "train.log").read_text()
    assert "Tip" in log and "MNIST source" in log  # the run's log keeps every record


def test_verbose_brings_the_detail_back(pretrained, tmp_path):
    done = train_py("stage=finetune", f"base={pretrained[1]}", *SLICE, "trainer.max_steps=2", "verbose=true", f"hydra.run.dir={tmp_path / 'run'}")
    assert done.returncode == 0, done.stderr
    assert "Tip" in done.stdout + done.stderr

"""Hostile input and faults, as a careless user or a hostile file would bring them: each ends in
one line of at most 200 characters naming the thing and the fix, exit 2, and nothing written or
overwritten. Faults (a full disk, a kill mid-save, two sweeps at once) leave every artifact whole."""

import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import DATA_DIR, ROOT, SLICE, assert_one_line_error, script, start_train_py, train_py, tree_digest
from loralab.files import raise_thread_write_failure, watch_writer_threads


def refused(done: subprocess.CompletedProcess, *fragments: str) -> str:
    assert_one_line_error(done, *fragments)  # which bounds the line at conftest.MAX_ERROR_CHARS
    assert done.returncode == 2
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    return line


def empty(path) -> bool:
    """Nothing written under ``path`` (Hydra may have made the output root itself)."""
    return not path.exists() or not any(p.is_file() for p in path.rglob("*"))


def finetune(base, out, *extra) -> subprocess.CompletedProcess:
    return train_py(*SLICE, "stage=finetune", "trainer.max_steps=5", "trainer.val_check_interval=5", f"base={base}", f"output_root={out}", *extra)


@pytest.fixture
def lora_run(tmp_path, pretrained):
    """A finished LoRA fine-tune's run dir (its adapter files to damage)."""
    done = finetune(pretrained[1], tmp_path / "made")
    assert done.returncode == 0, done.stderr
    (run_dir,) = (tmp_path / "made" / "finetune").iterdir()
    return run_dir


# Config values.
@pytest.mark.parametrize("args, fragments", [
    (["data.replay=0.95"], ["data.replay=0.95 is invalid", "replays 10 of each batch"]),
    (["data.replay=0.01"], ["data.replay=0.01 is invalid", "replays 0 of each batch"]),
    (["seed=4294967296"], ["seed=4294967296 is invalid", "from 0 to 4294967295"]),
    (["lora.targets='linear['"], ["lora.targets='linear[' is invalid", "not a regular expression"]),
    (["trainer.limit_test_batches=0"], ["trainer.limit_test_batches=0 is invalid", "none of the 10 test batches"]),
    (["trainer.limit_test_batches=0.05"], ["trainer.limit_test_batches=0.05 is invalid"]),
    (["lora.rank=100000"], ["lora.rank=100000 is invalid", "above both of linear1's sizes (784, 1000)"]),  # would allocate gigabytes
    (["lora.rank_pattern={linear3:3000}"], ["lora.rank_pattern.linear3=3000 is invalid", "B·A has rank ≤ 10"]),
])
def test_values_out_of_their_range(args, fragments, tmp_path):
    refused(train_py("stage=finetune", f"output_root={tmp_path}", *args), *fragments)
    assert empty(tmp_path)


@pytest.mark.parametrize("args, fragments", [
    (["data.val_size=59999", "trainer.limit_train_batches=null"], ["no training images of digits [9]", "lower data.val_size"]),
    (["trainer.limit_train_batches=0"], ["trainer.limit_train_batches=0 leaves none of the", "nothing would train"]),
    (["trainer.limit_train_batches=0.0001"], ["trainer.limit_train_batches=0.0001 leaves none of the 546 training batches"]),
])
def test_a_run_that_would_train_nothing_is_refused(tmp_path, pretrained, args, fragments):
    refused(finetune(pretrained[1], tmp_path, *args), *fragments)
    assert empty(tmp_path)


def test_an_output_dir_that_cannot_be_made_is_refused(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("a file")
    for args in ([f"output_root={notes}"], ["output_root=/dev/null"], [f"hydra.run.dir={notes}"], [f"output_root={notes}", "-m"]):
        refused(train_py("stage=pretrain", *args), "cannot make the run directory", "to a directory you can write")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"] and notes.read_text() == "a file"


def test_a_users_mnist_copy_with_bad_labels_or_headers(tmp_path):
    """Files a user put in data_dir are reported, never rewritten: a label past 9 deep in the file
    (the published first labels and counts do not see it) and a wrong IDX magic number."""
    from loralab.mnist import raw_dir

    for name, offset, value, fragment in [("train-labels-idx1-ubyte", 8 + 1000, 12, "1 train label is outside 0-9 (the first, 12, at index 1000)"),
                                          ("t10k-images-idx3-ubyte", 2, 9, "magic number 0x903, expected 0x803")]:
        copy = tmp_path / name
        shutil.copytree(raw_dir(DATA_DIR), raw_dir(copy))
        damaged = bytearray((raw_dir(copy) / name).read_bytes())
        damaged[offset] = value
        (raw_dir(copy) / name).write_bytes(bytes(damaged))
        before = tree_digest(copy)
        refused(train_py("stage=pretrain", f"data_dir={copy}", f"output_root={tmp_path / 'out'}"), fragment, "to rebuild")
        assert tree_digest(copy) == before
    assert empty(tmp_path / "out")


# Paths: devices, FIFOs, directories where a file belongs and the reverse.
def test_a_device_or_fifo_as_base_is_refused_at_once(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for base in ("/dev/zero", fifo):
        start = time.perf_counter()
        refused(train_py("stage=finetune", f"base={base}", f"output_root={tmp_path / 'out'}"), "not a regular file")
        assert time.perf_counter() - start < 60  # read, it would never end
    assert empty(tmp_path / "out")


def test_a_file_as_data_dir_and_a_file_as_adapter_dir(tmp_path, pretrained, lora_run):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a directory")
    refused(train_py("stage=pretrain", f"data_dir={notes}", f"output_root={tmp_path / 'out'}"), "is a file, not a directory")
    refused(train_py("stage=eval", f"base={pretrained[1]}", f"eval.adapters=[{lora_run / 'adapter_model.safetensors'}]",
                     f"output_root={tmp_path / 'out'}"), "is not a directory")
    assert empty(tmp_path / "out")


# Files: bases, adapters, checkpoints, metrics.json and Hydra's saved config not as loralab wrote them.
def test_bases_that_are_not_loralabs(tmp_path, pretrained, lora_run):
    tensors = load_file(str(pretrained[1] / "base.safetensors"))
    cases = {
        "int8.safetensors": ({k: t.to(torch.int8) for k, t in tensors.items()}, {"format": "pt"}, "holds torch.int8 tensor"),
        "meta.safetensors": (tensors, {"format": "pt", "model": "[not json"}, "'model' metadata is not loralab's"),
        "sizes.safetensors": (tensors, {"format": "pt", "model": json.dumps({"sizes": "big"})}, "'model' metadata is not loralab's"),
    }
    for name, (content, meta, _) in cases.items():
        save_file(content, str(tmp_path / name), metadata=meta)
    before = tree_digest(tmp_path)
    for name, (_, _, fragment) in cases.items():
        refused(finetune(tmp_path / name, tmp_path / "out"), fragment)
    refused(finetune(lora_run / "adapter_model.safetensors", tmp_path / "out"), "is a LoRA adapter, not a base")
    assert tree_digest(tmp_path) == before and empty(tmp_path / "out")


def test_adapter_files_that_are_not_peft_loras(tmp_path, pretrained, lora_run):
    config = json.loads((lora_run / "adapter_config.json").read_text())
    for name, change, fragment in [
        ("regex", {"target_modules": "linear["}, "not a regular expression"),
        ("huge", {"r": 10**9}, "has shape"),
        ("pattern", {"rank_pattern": [1, 2]}, "lora.rank_pattern"),
        ("alpha", {"lora_alpha": "big"}, "its lora_alpha='big' is invalid: expected a number > 0"),
        ("rank", {"r": "1"}, "its r='1' is invalid: expected an integer ≥ 1"),
    ]:
        bad = tmp_path / name
        bad.mkdir()
        (bad / "adapter_model.safetensors").write_bytes((lora_run / "adapter_model.safetensors").read_bytes())
        (bad / "adapter_config.json").write_text(json.dumps(config | change))
        before = tree_digest(tmp_path)
        refused(train_py("stage=eval", f"base={pretrained[1]}", f"eval.adapters=[{bad}]", f"output_root={tmp_path / 'out'}"), fragment)
        start = time.perf_counter()  # r = 10^9 would allocate terabytes before any check
        merged = script(ROOT / "scripts" / "merge_adapter.py", pretrained[1], bad, tmp_path / "merged.safetensors")
        assert time.perf_counter() - start < 60
        refused(merged, fragment)
        assert tree_digest(tmp_path) == before and empty(tmp_path / "out")


def test_merge_into_a_missing_directory_is_refused_first(tmp_path, pretrained, lora_run):
    refused(script(ROOT / "scripts" / "merge_adapter.py", pretrained[1], lora_run, tmp_path / "no" / "merged.safetensors"),
            "does not exist; create it")


def test_a_foreign_metrics_json_and_saved_config(tmp_path, pretrained):
    base = tmp_path / "base"
    base.mkdir()
    (base / "base.safetensors").write_bytes((pretrained[1] / "base.safetensors").read_bytes())
    (base / "metrics.json").write_text(json.dumps({"test": {"acc": 2.0, "wrong": [1] * 10, "count": [1] * 10}}))
    refused(finetune(base, tmp_path / "out", "digits=auto"), "'test' is not a test result loralab wrote")
    interrupted = tmp_path / "interrupted"
    (interrupted / "checkpoints").mkdir(parents=True)
    (interrupted / ".hydra").mkdir()
    torch.save({"state_dict": {}}, interrupted / "checkpoints" / "last.ckpt")
    (interrupted / ".hydra" / "config.yaml").write_text("- a\n- list\n")
    refused(finetune(pretrained[1], tmp_path / "out", f"resume={interrupted}"), "is not the config Hydra saved")
    (interrupted / ".hydra" / "config.yaml").unlink()
    before = tree_digest(interrupted)
    refused(finetune(pretrained[1], tmp_path / "out", f"resume={interrupted}"), "is not a Lightning checkpoint", "optimizer_states")
    assert tree_digest(interrupted) == before


# Existing state: an interrupted run is never trained over.
def test_an_interrupted_run_dir_is_refused_as_output_and_names_resume(tmp_path, pretrained):
    run_dir = tmp_path / "run"
    done = finetune(pretrained[1], tmp_path, f"hydra.run.dir={run_dir}", "trainer.max_steps=10")
    assert done.returncode == 0, done.stderr
    (run_dir / "metrics.json").unlink()  # as a kill before the end leaves it: a checkpoint, no metrics
    before = tree_digest(run_dir)
    refused(finetune(pretrained[1], tmp_path, f"hydra.run.dir={run_dir}"), "holds an interrupted run", "resume=<that dir>")
    assert tree_digest(run_dir) == before
    done = finetune(pretrained[1], tmp_path, f"hydra.run.dir={run_dir}", "trainer.max_steps=10", f"resume={run_dir}")
    assert done.returncode == 0, done.stderr  # what the line says to do works
    assert (run_dir / "metrics.json").exists()


def test_a_finished_run_is_not_resumed(tmp_path, pretrained, lora_run):
    before = tree_digest(lora_run)
    refused(finetune(pretrained[1], tmp_path / "out", f"resume={lora_run}"), "finished", "nothing is left to resume")
    assert tree_digest(lora_run) == before and empty(tmp_path / "out")


# Faults.
def limited_write(target, payload_bytes: int, limit: int) -> subprocess.CompletedProcess:
    code = (f"import resource; resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
            "from loralab.files import atomic_write_bytes\nfrom loralab.errors import ArtifactError\n"
            f"try:\n    atomic_write_bytes({str(target)!r}, b'n' * {payload_bytes})\n"
            "except ArtifactError as err:\n    print(f'error: {err}')\n    raise SystemExit(2)\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})


def test_a_full_disk_mid_save_keeps_the_previous_file_whole(tmp_path):
    target = tmp_path / "adapter_model.safetensors"
    target.write_bytes(b"o" * 1000)
    done = limited_write(target, 1 << 20, 64 << 10)  # the file-size limit stands in for a full disk
    assert done.returncode == 2 and "could not write" in done.stdout and "previous file is kept" in done.stdout
    assert target.read_bytes() == b"o" * 1000 and sorted(p.name for p in tmp_path.iterdir()) == [target.name]


@pytest.mark.parametrize("limit_kb, figures", [
    # Below the LoRA checkpoint (the adapter and its Adam state, 92 KB at rank 1), above every
    # file written before it (Hydra's config, TensorBoard's events without figures).
    (80, "false"),
    # Below TensorBoard's events once the confusion figures are in them: its writer thread fails.
    (40, "true"),
])
def test_a_full_disk_during_a_fine_tune_ends_in_one_line(tmp_path, pretrained, limit_kb, figures):
    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_kb << 10, limit_kb << 10))

    args = [sys.executable, str(ROOT / "train.py"), *SLICE, "stage=finetune", "trainer.max_steps=5", "trainer.val_check_interval=5",
            f"base={pretrained[1]}", f"output_root={tmp_path}", f"confusion_figures={figures}"]
    done = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, preexec_fn=small_files, env={**os.environ}, timeout=600)
    refused(done, "could not write" if figures == "false" else "the disk is full", "free some space")
    assert not list(tmp_path.rglob("metrics.json")) and not list(tmp_path.rglob("*.tmp"))


def test_a_full_disk_in_a_thread_is_quiet_there_and_raised_in_the_main_thread(monkeypatch, capsys):
    monkeypatch.setattr(threading, "excepthook", threading.__excepthook__)
    watch_writer_threads()
    watch_writer_threads()  # as every job of a sweep does: one hook, not a chain

    def write(code):
        raise OSError(code, os.strerror(code))

    for code in (errno.ENOSPC, errno.EACCES):
        worker = threading.Thread(target=write, args=(code,))
        worker.start()
        worker.join()
    printed = capsys.readouterr().err
    assert "Errno 28" not in printed and "Errno 13" in printed  # the other error is printed as Python would
    with pytest.raises(OSError, match="No space left"):
        raise_thread_write_failure()
    raise_thread_write_failure()  # raised once


def test_a_kill_during_a_save_never_leaves_a_torn_file(tmp_path):
    """SIGKILL at random moments of repeated saves: the file is always one whole version."""
    target = tmp_path / "base.safetensors"
    versions = {bytes([v]) * (8 << 20) for v in range(2)}
    target.write_bytes(bytes([0]) * (8 << 20))
    code = (f"from loralab.files import atomic_write_bytes\nv = 1\nwhile True:\n"
            f"    atomic_write_bytes({str(target)!r}, bytes([v]) * (8 << 20)); v = 1 - v\n")
    for delay in (0.2, 0.35, 0.5, 0.8):
        writer = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
        time.sleep(delay)
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        assert target.read_bytes() in versions
    # What a kill can leave is a hidden temporary file beside it, never the file itself half-written.
    assert all(p.name.startswith(".") and p.name.endswith(".tmp") for p in tmp_path.iterdir() if p != target)


def test_two_sweeps_into_one_output_root_keep_their_own_jobs(tmp_path, pretrained):
    args = ["-m", *SLICE, "stage=finetune", "trainer.max_steps=3", "trainer.val_check_interval=3", f"base={pretrained[1]}", f"output_root={tmp_path}"]
    sweeps = [start_train_py(*args, f"lora.rank={r},{r + 1}", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for r in (1, 3)]
    for sweep in sweeps:
        _, err = sweep.communicate(timeout=600)
        assert sweep.returncode == 0, err
    dirs = sorted((tmp_path / "finetune-sweep").iterdir())
    assert len(dirs) == 2
    ranks = sorted(sorted(json.loads(m.read_text())["lora"]["rank"] for m in d.glob("*/metrics.json")) for d in dirs)
    assert ranks == [[1, 2], [3, 4]]

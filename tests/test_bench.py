"""Smoke tests of the benchmarks: they run at tiny size and write valid JSON. No speed is asserted,
only that the figures are there, and in the order one process's phases must come."""

import json
from importlib import metadata

import pytest
from packaging.requirements import Requirement

from conftest import ROOT, script


def test_bench_writes_valid_json(tmp_path, mnist_dir):
    out = tmp_path / "bench.json"
    done = script(ROOT / "benchmarks" / "bench.py", "--reps", "2", "--quick", "--data-dir", mnist_dir, "--out", out)
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())
    assert "train_step_bs64_r1_default_malloc" in results
    step = results["train_step_bs64_r1"]
    assert {"full_ms", "full_default_ms", "loralab_ms", "parametrize_ms", "loralab_vs_full", "loralab_vs_full_default"} <= set(step)
    assert results["switching"]["adapter_bytes"] < 0.003 * results["switching"]["base_bytes"]
    assert results["memory"]["loralab"]["optimizer_state_bytes"] == 2 * 4 * 6794 + 6 * 4  # Adam: two fp32 moments, and a step count per tensor
    assert results["lightning_epoch"]["batches"] == 20
    startup = results["startup"]["dev_venv"]
    assert startup["error_s"]["median"] < startup["first_step_s"]["median"] < startup["run_s"]["median"]


def test_floor_bench_writes_every_ratio(tmp_path, mnist_dir):
    out = tmp_path / "floor.json"
    done = script(ROOT / "benchmarks" / "bench.py", "--reps", "1", "--only-floor", "--out", out)
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())
    for bs in (10, 64, 256):
        for rank in (1, 4, 10):
            row = results[f"floor_bs{bs}_r{rank}"]
            assert {"floor_ms", "loralab_ms", "peft_ms", "loralab_vs_floor", "peft_vs_floor", "loralab_vs_peft", "bound_vs_floor",
                    "loralab_foreach_vs_floor_foreach", "loralab_foreach_vs_peft_foreach"} <= set(row)
        assert {"full_fused_vs_foreach", "loralab_fused_vs_foreach"} <= set(results[f"adam_bs{bs}"])


def test_sweep_bench_times_a_sweep_against_its_floor(tmp_path, pretrained):
    out = tmp_path / "sweep.json"
    done = script(ROOT / "benchmarks" / "sweep.py", "--base", pretrained[1], "--experiments", "variants", "--seeds", "1", "--reps", "1",
                  "--max-steps", "5", "--out", out)
    assert done.returncode == 0, done.stderr
    sweep = json.loads(out.read_text())["sweeps"]["variants"]
    assert sweep["jobs"] == 10 and 0 < sweep["floor_train_s"] < sweep["floor_s"] < sweep["wall_s"]
    assert sweep["ratio_to_floor"] == sweep["wall_s"] / sweep["floor_s"]
    assert sweep["floor_train_s"] < sweep["base_eval_floor_s"] and sweep["floor_eval_s"] > 0
    assert sweep["ratio_to_base_eval_floor"] == sweep["wall_s"] / sweep["base_eval_floor_s"]


def test_gpu_check_without_a_gpu_runs_its_cpu_side(tmp_path):
    """`make gpu-check`'s script on this machine: nothing to install (Hydra is here), the CUDA
    tests collected and each skipped with its reason, no stage run, exit 0."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: `make gpu-check` runs the whole check")
    out = tmp_path / "gpu.json"
    done = script(ROOT / "benchmarks" / "gpu_check.py", "--out", out)
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())
    assert results["installed_from_wheels"] == [] and results["cuda_available"] is False and "stages" not in results
    tests = results["cuda_tests"]
    assert tests["returncode"] == 0 and "skipped" in tests["summary"] and "passed" not in tests["summary"]
    assert "needs a CUDA GPU" in tests["tail"]


def test_startup_timeline_marks_each_stage_in_order(mnist_dir):
    done = script(ROOT / "benchmarks" / "startup.py", "--data-dir", mnist_dir, "--timeline")
    assert done.returncode == 0, done.stderr
    marks = [line.split(" ", 1) for line in done.stdout.splitlines()]
    assert [what for _, what in marks][:3] == ["interpreter started", "hydra imported", "torch imported"]
    assert marks[-1][1].startswith("first training step")
    seconds = [float(t) for t, _ in marks]
    assert seconds == sorted(seconds) and len(marks) == 7


def test_the_runtime_environment_leaves_out_what_torchmetrics_would_import():
    """`make run`'s .venv installs the project's dependencies without extras; torchmetrics imports
    transformers, scipy and torchvision whenever they are installed, about 2 s per command
    (docs/benchmarks.md section 11), so the project's own dependencies name none of them nor what
    pulls them in (peft, optuna)."""
    runtime = [Requirement(r) for r in metadata.requires("loralab") if "extra ==" not in r]
    names = {r.name.lower() for r in runtime}
    assert {"torch", "lightning", "torchmetrics", "hydra-core"} <= names
    assert not names & {"peft", "transformers", "scipy", "optuna", "torchvision", "hydra-optuna-sweeper", "pytest"}

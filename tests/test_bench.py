"""Smoke test of the benchmark: it runs at tiny size and writes valid JSON. No timing is asserted."""

import json

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

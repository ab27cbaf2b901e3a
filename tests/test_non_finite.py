"""NaN and inf are bad input: in a base or adapter file, in a merged model, and in the training loss."""

import csv
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import ROOT, SLICE, assert_one_line_error, script, train_py, tree_digest
from loralab.adapter import WEIGHTS_FILE, AdapterSet, load_adapter
from loralab.errors import ArtifactError
from loralab.files import short
from loralab.weights import load_base

SIZES = [784, 1000, 2000, 10]
LORA_B = "base_model.model.linear2.lora_B.weight"


def rewrite(src, dst, edits: dict) -> None:
    """Copy a safetensors file, with ``edits`` (tensor name -> function of the tensor) applied."""
    with safe_open(str(src), "pt") as handle:
        tensors, meta = {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()
    save_file({k: edits.get(k, lambda t: t)(t) for k, t in tensors.items()}, str(dst), metadata=meta)


def with_value(value: float):
    def edit(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t.view(-1)[0] = value
        return t

    return edit


def adapter_copy(finetuned, directory, edits: dict):
    shutil.copytree(finetuned[1], directory, ignore=lambda d, names: [n for n in names if n != "adapter_config.json"])
    rewrite(finetuned[1] / WEIGHTS_FILE, directory / WEIGHTS_FILE, edits)
    return directory


def test_eval_refuses_an_adapter_holding_nan(finetuned, pretrained, tmp_path):
    bad = adapter_copy(finetuned, tmp_path / "nan-adapter", {LORA_B: with_value(float("nan"))})
    before = tree_digest(tmp_path)
    done = train_py("stage=eval", f"base={pretrained[1]}", f"eval.adapters=['{bad}']", f"output_root={tmp_path / 'out'}")
    assert_one_line_error(done, short(bad / WEIGHTS_FILE), repr(LORA_B), "1 NaN")
    assert done.returncode == 2 and "accuracy" not in done.stdout
    assert tree_digest(tmp_path) == before  # no run dir, the adapter untouched
    model, _ = load_base(pretrained[1] / "base.safetensors", SIZES)
    with pytest.raises(ArtifactError, match="non-finite"):
        load_adapter(model, bad)
    with pytest.raises(ArtifactError, match="non-finite"):
        AdapterSet(model).add("bad", bad)


def test_finetune_refuses_a_base_holding_inf(pretrained, tmp_path):
    bad = tmp_path / "base.safetensors"
    rewrite(pretrained[1] / "base.safetensors", bad, {"linear2.weight": with_value(float("inf"))})
    before = tree_digest(tmp_path)
    done = train_py("stage=finetune", f"base={bad}", *SLICE, "trainer.max_steps=2", f"output_root={tmp_path / 'out'}")
    assert_one_line_error(done, short(bad), "'linear2.weight'", "1 inf")
    assert done.returncode == 2
    assert tree_digest(tmp_path) == before


def test_merge_refuses_non_finite_weights(finetuned, pretrained, tmp_path):
    # Finite, but B·A = 1e40 overflows float32: only the merged weights show it.
    huge = adapter_copy(finetuned, tmp_path / "huge", {k: (lambda t: torch.full_like(t, 1e20)) for k in (LORA_B, LORA_B.replace("lora_B", "lora_A"))})
    nan = adapter_copy(finetuned, tmp_path / "nan", {LORA_B: with_value(float("nan"))})
    out = tmp_path / "merged.safetensors"
    for adapter, fragments in [(huge, ["overflows float32: tensor 'linear2.weight'", "nothing written"]), (nan, [short(nan / WEIGHTS_FILE), repr(LORA_B)])]:
        before = tree_digest(tmp_path)
        done = script(ROOT / "scripts" / "merge_adapter.py", pretrained[1], adapter, out)
        assert_one_line_error(done, *fragments)
        assert done.returncode == 2 and not out.exists() and tree_digest(tmp_path) == before


@pytest.mark.parametrize("extra", [[], ["accelerator=ddp"]], ids=["one process", "ddp_spawn"])
def test_diverging_finetune_stops_at_the_step(pretrained, tmp_path, extra):
    # Adam's first step moves every adapter weight by lr: at 1e30 the next forward overflows.
    run_dir = tmp_path / "run"
    done = train_py("stage=finetune", f"base={pretrained[1]}", *SLICE, *extra, "trainer.max_steps=5", "optim.lr=1e30", f"hydra.run.dir={run_dir}")
    assert_one_line_error(done, "training diverged: the loss is nan at step 2", "optim.lr=1e+29")
    assert done.returncode == 2
    assert not (run_dir / "metrics.json").exists() and not (run_dir / WEIGHTS_FILE).exists()


def test_diverging_job_is_failed_in_the_sweep(pretrained, tmp_path):
    done = train_py("stage=finetune", f"base={pretrained[1]}", *SLICE, "trainer.max_steps=3", "optim.lr=1e-3,1e30", f"output_root={tmp_path}", "-m")
    assert done.returncode == 1 and "1 of 2 jobs failed" in done.stderr
    (sweep,) = (tmp_path / "finetune-sweep").iterdir()
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [r["status"] for r in rows][0] == "ok" and "training diverged" in rows[1]["status"]
    assert not (sweep / rows[1]["job"] / WEIGHTS_FILE).exists() and (sweep / rows[0]["job"] / WEIGHTS_FILE).exists()

"""The real stages, composed from the real Hydra config, on a small real slice of MNIST."""

import hashlib
import json
import os
import struct
import time

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import EXPENSIVE, SLICE, run
from loralab import count_parameters, set_lora_enabled
from loralab.adapter import load_adapter
from loralab.classifier import Classifier
from loralab.data import MNISTDataModule
from loralab.files import FileMemo
from loralab.methods import BaseChangedError
from loralab.weights import fingerprint, load_base


def scalar_tags(run_dir) -> set[str]:
    tags = set()
    for events in run_dir.glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    return tags


def last_scalars(run_dir) -> dict[str, float]:
    """Each scalar tag's value at the last step it was logged at."""
    last = {}
    for events in run_dir.glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            last[tag] = max(acc.Scalars(tag), key=lambda e: e.step).value
    return last


def test_pretrain_writes_the_contract(pretrained):
    metrics, run_dir = pretrained
    assert metrics == json.loads((run_dir / "metrics.json").read_text())
    assert metrics["stage"] == "pretrain"
    assert metrics["model"] == {"name": "expensive_mlp", "sizes": [784, 1000, 2000, 10]}
    assert metrics["params"] == {"total": 2807010, "trainable": 2807010, "lora": 0, "base": 2807010}
    test = metrics["test"]
    assert test["count"] == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]  # the full test set
    assert len(test["wrong"]) == 10 and abs(test["acc"] - (1 - sum(test["wrong"]) / 10000)) < 1e-6
    assert set(metrics["seconds"]) == {"fit", "test", "step"} and 0 < metrics["seconds"]["step"] < metrics["seconds"]["fit"]
    assert metrics["versions"]["torch"] and metrics["config"]["stage"]["name"] == "pretrain"
    weights = load_file(metrics["artifacts"]["base"])
    assert set(weights) == {f"linear{i}.{p}" for i in (1, 2, 3) for p in ("weight", "bias")}
    assert (run_dir / "checkpoints" / "last.ckpt").exists()


def test_pretrain_logs_per_digit_metrics_to_tensorboard(pretrained):
    tags = scalar_tags(pretrained[1])
    assert {"val/acc", "val/loss", "test/acc", "train/loss"} <= tags
    assert {f"test/err_d{d}" for d in range(10)} <= tags and {f"val/err_d{d}" for d in range(10)} <= tags
    assert "hp/test_acc" in tags


def test_base_round_trips_through_safetensors(pretrained):
    metrics, run_dir = pretrained
    model, meta = load_base(run_dir / "base.safetensors", [784, 1000, 2000, 10])
    assert fingerprint(model) == metrics["base_sha256"] == meta["weights_sha256"]


def test_finetune_writes_the_contract(finetuned, pretrained):
    metrics, run_dir = finetuned
    base_metrics, base_dir = pretrained
    assert metrics["stage"] == "finetune" and metrics["digits"] == [9]
    assert metrics["params"] == {"total": 2807010 + 6794, "trainable": 6794, "lora": 6794, "base": 2807010}
    assert {k: metrics["lora"][k] for k in ("rank", "alpha", "scale", "targets")} == {
        "rank": 1, "alpha": 1.0, "scale": 1.0, "targets": ["linear1", "linear2", "linear3"]}
    # Adapters off must reproduce the pretrained model's test exactly.
    assert metrics["test_base"] == base_metrics["test"]
    assert metrics["base_sha256"] == base_metrics["base_sha256"] == metrics["base_sha256_after"] and metrics["base_unchanged"] is True
    assert metrics["base_file_sha256"] == hashlib.sha256((base_dir / "base.safetensors").read_bytes()).hexdigest()
    assert metrics["test"] != metrics["test_base"]  # the adapter did something
    assert (run_dir / "adapter_model.safetensors").stat().st_size < 40_000


def test_a_base_rewritten_in_place_is_hashed_anew(pretrained, outputs, tmp_path):
    """A process keeps a base file's sha256 and its weights' fingerprint while the file is
    unchanged (a sweep's jobs read one base). Rewritten in place, same size and mtime, the next
    run in the same process reports the new file's."""
    base = tmp_path / "base.safetensors"
    base.write_bytes((pretrained[1] / "base.safetensors").read_bytes())
    time.sleep(FileMemo.SETTLED_NS / 1e9 + 0.1)  # kept only once settled
    job = [*SLICE, "stage=finetune", "trainer.max_steps=2", "trainer.val_check_interval=2", f"base={base}"]
    first, _ = run(job, outputs, "rewritten-1")
    again, _ = run(job, outputs, "rewritten-2")
    assert again["base_file_sha256"] == first["base_file_sha256"] == hashlib.sha256(base.read_bytes()).hexdigest()

    before = base.stat()
    with open(base, "r+b") as handle:  # the last bias of linear3, made 0.5: same size, same inode
        handle.seek(-4, 2)
        handle.write(struct.pack("<f", 0.5))
    os.utime(base, ns=(before.st_atime_ns, before.st_mtime_ns))
    rewritten, _ = run(job, outputs, "rewritten-3")
    assert rewritten["base_file_sha256"] == hashlib.sha256(base.read_bytes()).hexdigest() != first["base_file_sha256"]
    assert rewritten["base_sha256"] == fingerprint(load_base(base, EXPENSIVE)[0]) != first["base_sha256"]


def test_a_file_memo_keeps_values_only_for_settled_unchanged_bytes(tmp_path):
    """A value is kept for a file's stamp once the file is a second old, and a value worked out from
    bytes read before the file changed is never kept for the file as it is now."""
    path = tmp_path / "file"
    path.write_bytes(b"one")
    memo, reads = FileMemo(), []

    def read() -> bytes:
        reads.append(path.read_bytes())
        return reads[-1]

    assert memo.get(path, read) == memo.get(path, read) == b"one" and len(reads) == 2  # too fresh to keep
    time.sleep(FileMemo.SETTLED_NS / 1e9 + 0.1)
    assert memo.get(path, read) == memo.get(path, read) == b"one" and len(reads) == 3  # kept
    read_at = FileMemo.stamp(path)
    with open(path, "r+b") as handle:
        handle.write(b"two")
    time.sleep(FileMemo.SETTLED_NS / 1e9 + 0.1)  # settled again: only read_at says the value is the old bytes'
    assert memo.get(path, lambda: b"one, as read before", read_at) == b"one, as read before"
    assert memo.get(path, read) == b"two" and len(reads) == 4


def test_finetune_logs_target_and_other_digit_errors(finetuned):
    tags = scalar_tags(finetuned[1])
    assert {"val/err_target", "val/err_other", "test/err_target", "test/err_other", "test_base/err_target"} <= tags
    assert {"params/lora", "params/trainable"} <= tags


def test_finetune_logs_each_digit_against_the_base(finetuned, pretrained, mnist_dir):
    """At each validation, each digit's wrong count minus the base's on the same images (SLICE's
    one validation batch), and from those the target digit's gain and the other digits' forgetting."""
    _, run_dir = finetuned
    base, _ = load_base(pretrained[1] / "base.safetensors", EXPENSIVE)
    data = MNISTDataModule(str(mnist_dir), [9])
    data.setup()
    x, y = (t[:1000] for t in data.val_set.tensors)
    with torch.no_grad():
        wrong = base(x).argmax(dim=1) != y
    base_wrong = [int((wrong & (y == d)).sum()) for d in range(10)]
    logged = last_scalars(run_dir)
    change = [logged[f"val/wrong_d{d}"] - base_wrong[d] for d in range(10)]
    assert [logged[f"val/wrong_change_d{d}"] for d in range(10)] == change
    assert logged["val/target_gain"] == -change[9] > 0
    assert logged["val/forgetting"] == sum(change[:9])


def test_a_base_changed_during_training_stops_the_run(pretrained, outputs, monkeypatch):
    """A training step that writes into a frozen base weight: the fingerprints before and after
    training differ, and the run stops before writing metrics.json or an adapter."""
    step = Classifier.training_step

    def tampering_step(self, batch, batch_idx):
        with torch.no_grad():
            self.model.linear2.base_layer.weight[0, 0] += 1.0
        return step(self, batch, batch_idx)

    monkeypatch.setattr(Classifier, "training_step", tampering_step)
    with pytest.raises(BaseChangedError) as changed:
        run([*SLICE, "stage=finetune", "trainer.max_steps=3", f"base={pretrained[1]}"], outputs, "tampered")
    assert changed.value.before == pretrained[0]["base_sha256"] != changed.value.after
    assert not (outputs / "tampered" / "metrics.json").exists() and not (outputs / "tampered" / "adapter_model.safetensors").exists()


def test_saved_adapter_reproduces_the_trained_logits(finetuned, pretrained, mnist_dir):
    metrics, run_dir = finetuned
    model, _ = load_base(pretrained[1] / "base.safetensors", [784, 1000, 2000, 10])
    config = load_adapter(model, run_dir)
    assert config["r"] == 1 and count_parameters(model)["lora"] == 6794
    data = MNISTDataModule(str(mnist_dir))
    data.setup()
    # The adapter loaded from disk gives exactly the test result the run recorded.
    assert _wrong_counts(model, data) == metrics["test"]["wrong"]
    set_lora_enabled(model, False)
    assert _wrong_counts(model, data) == metrics["test_base"]["wrong"]


def _wrong_counts(model, data) -> list[int]:
    with torch.no_grad():
        preds = torch.cat([model(data.test_set.tensors[0][i : i + 1000]).argmax(1) for i in range(0, 10000, 1000)])
    y = data.test_set.tensors[1]
    return [int(((preds != y) & (y == d)).sum()) for d in range(10)]


def test_fit_then_test_does_not_double_wrap(finetuned, pretrained, outputs):
    metrics, _ = run([*SLICE, "stage=finetune", "trainer.max_steps=3", f"base={pretrained[1]}", "lora.rank=2"], outputs, "finetune-r2")
    assert metrics["params"]["lora"] == 2 * 6794  # fit + two tests, each with a setup: still one adapter per layer


@pytest.mark.parametrize("targets, expected", [("[linear3]", 2010), ("'linear[12]'", 1784 + 3000)])
def test_targets_select_layers(pretrained, outputs, targets, expected):
    metrics, _ = run([*SLICE, "stage=finetune", "trainer.max_steps=2", f"base={pretrained[1]}", f"lora.targets={targets}"], outputs, f"t-{expected}")
    assert metrics["params"]["lora"] == expected and metrics["base_unchanged"]


def test_digits_auto_picks_the_worst_digits(pretrained, outputs):
    base_metrics, base_dir = pretrained
    test = base_metrics["test"]
    rates = [w / c for w, c in zip(test["wrong"], test["count"])]
    expected = sorted(sorted(range(10), key=lambda d: -rates[d])[:2])
    metrics, _ = run([*SLICE, "stage=finetune", "trainer.max_steps=2", f"base={base_dir}", "digits=auto", "data.auto_k=2"], outputs, "auto")
    assert metrics["digits"] == expected


def test_full_finetune_writes_the_same_schema(finetuned, pretrained, outputs):
    lora_metrics, _ = finetuned
    metrics, run_dir = run([*SLICE, "stage=finetune", "trainer.max_steps=5", f"base={pretrained[1]}", "finetune.method=full"], outputs, "full")
    assert set(lora_metrics) <= set(metrics)
    assert metrics["method"] == "full" and metrics["lora"] is None
    assert metrics["params"]["trainable"] == 2807010 and metrics["test_base"] == pretrained[0]["test"]
    assert (run_dir / "model.safetensors").stat().st_size > 100 * lora_metrics["artifact_bytes"]
    assert metrics["optimizer_state_bytes"] > 100 * lora_metrics["optimizer_state_bytes"]


def test_replay_experiment_replays_and_distills(pretrained, outputs):
    """Each step's batch carries other digits (replay), and on them the loss pulls towards the base
    (train/distill, logged every step by the slice): zero at step 1 up to float rounding (the
    adapter is still the base, whose outputs are recomputed on the replayed images alone), and
    positive once it has moved. A batch without replayed images would log 0 at every step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    metrics, run_dir = run([*SLICE, "experiment=no_forgetting", "trainer.max_steps=3", f"base={pretrained[1]}"], outputs, "replay")
    assert metrics["config"]["data"]["replay"] == 0.15 and metrics["config"]["finetune"]["distill"] == 0.1
    assert metrics["lora"]["rank"] == 8 and metrics["lora"]["alpha"] == 32
    distill = []
    for events in sorted(run_dir.glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        distill += [e.value for e in accumulator.Scalars("train/distill")] if "train/distill" in accumulator.Tags()["scalars"] else []
    assert len(distill) == 3 and abs(distill[0]) < 1e-6 and min(distill[1:]) > 1e-4

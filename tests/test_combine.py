"""Adapters combined (loralab.combine, scripts/combine_adapters.py), checked against PEFT's
add_weighted_adapter method by method, and against the exact weighted sum Σ wᵢ·sᵢ·Bᵢ·Aᵢ."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import ROOT, as_if_trained, assert_one_line_error, script, train_py, tree_digest
from loralab import LoRASpec, inject_lora
from loralab.adapter import apply_adapter, load_adapter, save_adapter
from loralab.combine import METHODS, ON_DELTAS, Recipe, combine, read
from loralab.combine_report import RECIPES
from loralab.errors import ConfigError
from loralab.inject import linear_layers, remove_lora
from loralab.model import MLP
from loralab.weights import save_base

peft = pytest.importorskip("peft")  # a dev dependency: the reference

SIZES = [784, 64, 32, 10]
X = torch.randn(64, 784, generator=torch.Generator().manual_seed(1))
COMBINE = ROOT / "scripts" / "combine_adapters.py"
# Logit gaps relative to the logits' scale (up to ~15 here). An exact combination differs from
# the dense sum by float32 rounding of sums of a few thousand products: 1e-6 is ~16 ulp. PEFT's
# svd runs in float32, whose error grows with the sum's condition number (1.5e-6 measured):
# 1e-5 against PEFT.
# Merging A into the base and subtracting it again rounds W twice (~2e-6 measured): 1e-5.
EXACT, AS_PEFT, ROUNDED_TWICE = 1e-6, 1e-5, 1e-5


def gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b|."""
    return ((a - b).abs().max() / b.abs().max()).item()


def base_model() -> MLP:
    torch.manual_seed(0)
    return MLP(SIZES)


def peft_adapters(tmp_path: Path, configs: list[dict]) -> tuple[object, list[Path]]:
    """A PEFT model holding one trained-looking adapter per config, each also saved to disk."""
    model, dirs = None, []
    for i, settings in enumerate(configs):
        config = peft.LoraConfig(target_modules=["linear1", "linear2", "linear3"], init_lora_weights=False, **settings)
        name = f"a{i}"
        if model is None:
            model = peft.get_peft_model(base_model(), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
        torch.manual_seed(10 + i)
        with torch.no_grad():
            for key, p in model.named_parameters():
                if f".{name}." in key and "lora_" in key:
                    p.copy_(0.2 * torch.randn_like(p))
        model.save_pretrained(str(tmp_path / "peft"), selected_adapters=[name])
        # save_pretrained puts every adapter but "default" in a subdirectory of its name
        dirs.append(tmp_path / "peft" / name)
    return model, dirs


def loralab_logits(spec: LoRASpec, tensors: dict) -> torch.Tensor:
    model = base_model()
    apply_adapter(model, spec, tensors, "combined")
    with torch.no_grad():
        return model(X)


def exact_logits(dirs: list[Path], weights: list[float]) -> torch.Tensor:
    """The base plus Σ wᵢ·ΔWᵢ, built from dense deltas: what an exact combination computes."""
    model = base_model()
    layers = linear_layers(model)
    with torch.no_grad():
        for directory, w in zip(dirs, weights):
            adapter = read(directory)
            for layer in adapter.factors:
                layers[layer].weight += w * adapter.delta(layer)
        return model(X)


def peft_combined(model, names: list[str], weights: list[float], method: str, seed: int = 0, **kwargs) -> torch.Tensor:
    """PEFT's add_weighted_adapter, its DARE masks drawn from a generator seeded as loralab's."""
    generator = torch.Generator().manual_seed(seed)
    bernoulli = torch.bernoulli
    torch.bernoulli = lambda p, *a, **k: bernoulli(p, generator=generator)
    try:
        model.add_weighted_adapter(names, weights, "combined", combination_type=method, **kwargs)
    finally:
        torch.bernoulli = bernoulli
    model.set_adapter("combined")
    model.eval()
    with torch.no_grad():
        return model(X)


def knobs(method: str) -> dict:
    return {"density": 0.5} if method not in ("cat", "svd", "linear") else {}


@pytest.mark.parametrize("method", METHODS)
def test_each_method_matches_peft(tmp_path, method):
    """Two rank-4 adapters, weights 0.7 and -0.4: loralab's combined logits equal PEFT's within
    1e-5 for every combination type PEFT has (DARE's masks drawn from the same seed)."""
    model, dirs = peft_adapters(tmp_path, [{"r": 4, "lora_alpha": 8}, {"r": 4, "lora_alpha": 2}])
    weights = [0.7, -0.4]
    theirs = peft_combined(model, ["a0", "a1"], weights, method, seed=3, **knobs(method))
    spec, tensors = combine([read(d) for d in dirs], Recipe(method, tuple(weights), seed=3, **knobs(method)))
    ours = loralab_logits(spec, tensors)
    assert gap(ours, theirs) < AS_PEFT
    base = base_model()(X)
    assert gap(ours, base) > 1e-2  # the combination really changes the model


@pytest.mark.parametrize("method", ["cat", "svd"])
def test_cat_and_full_rank_svd_are_the_exact_sum(tmp_path, method):
    """Different ranks, alphas and rsLoRA: cat (rank Σ rᵢ) and svd at a rank that holds the sum
    give Σ wᵢ·ΔWᵢ; at a smaller rank svd is only an approximation, and PEFT's cat agrees where
    no input is rsLoRA."""
    configs = [{"r": 2, "lora_alpha": 4}, {"r": 3, "lora_alpha": 1, "use_rslora": True}, {"r": 1, "lora_alpha": 1}]
    _, dirs = peft_adapters(tmp_path, configs)
    weights = [1.0, 0.5, -2.0]
    rank = 6 if method == "svd" else None
    spec, tensors = combine([read(d) for d in dirs], Recipe(method, tuple(weights), rank=rank))
    assert gap(loralab_logits(spec, tensors), exact_logits(dirs, weights)) < EXACT
    assert spec.rank == 6 and spec.scale_of("linear1") == 1.0
    if method == "svd":
        spec, tensors = combine([read(d) for d in dirs], Recipe("svd", tuple(weights), rank=2))
        assert gap(loralab_logits(spec, tensors), exact_logits(dirs, weights)) > 1e-3


def test_linear_holds_cross_terms(tmp_path, record_property):
    """linear merges A and B separately: exact for one adapter, off by the cross terms Bᵢ·Aⱼ for
    two. Recorded: how far PEFT's linear (which loralab's equals) is from the exact sum."""
    _, dirs = peft_adapters(tmp_path, [{"r": 4, "lora_alpha": 4}, {"r": 4, "lora_alpha": 4}])
    adapters = [read(d) for d in dirs]
    one = loralab_logits(*combine(adapters[:1], Recipe("linear", (0.5,))))
    assert gap(one, exact_logits(dirs[:1], [0.5])) < EXACT
    two = loralab_logits(*combine(adapters, Recipe("linear", (0.5, 0.5))))
    cross = gap(two, exact_logits(dirs, [0.5, 0.5]))
    record_property("linear_gap_to_exact_sum", cross)
    assert cross > 1e-3


@pytest.mark.parametrize("settings", [{"use_rslora": True}, {}], ids=["rslora", "plain"])
def test_weight_one_gives_the_adapter_back(tmp_path, settings, record_property):
    """One adapter at weight 1 is the adapter itself, loralab's exactly; PEFT copies use_rslora
    into the combined config (scale √r instead of 1), so for an rsLoRA adapter its result is not
    the adapter. Recorded: the gap the installed PEFT gives."""
    model, dirs = peft_adapters(tmp_path, [{"r": 4, "lora_alpha": 2, **settings}, {"r": 4, "lora_alpha": 2}])
    model.set_adapter("a0")
    model.eval()
    with torch.no_grad():
        adapter = model(X)
    for method in ("cat", "svd"):
        ours = loralab_logits(*combine([read(dirs[0])], Recipe(method, (1.0,))))
        assert gap(ours, adapter) < EXACT
    theirs = peft_combined(model, ["a0"], [1.0], "cat")
    peft_gap = gap(theirs, adapter)
    record_property("peft_weight_one_gap", peft_gap)
    assert (peft_gap > 1e-3) == bool(settings), f"the installed PEFT gives a gap of {peft_gap:.2e}"


def test_negation_returns_the_base(tmp_path):
    """Subtracting an adapter: A at +1 and -1 combined is the base; and an adapter at -1 applied
    to the base with A merged in gives the base back."""
    _, dirs = peft_adapters(tmp_path, [{"r": 4, "lora_alpha": 8}])
    adapter = read(dirs[0])
    base = base_model()(X)
    spec, tensors = combine([adapter, adapter], Recipe("cat", (1.0, -1.0)))
    assert gap(loralab_logits(spec, tensors), base) < EXACT
    merged = base_model()
    load_adapter(merged, dirs[0])
    merged = remove_lora(merged, merge=True)
    spec, tensors = combine([adapter], Recipe("cat", (-1.0,)))
    apply_adapter(merged, spec, tensors, "negated")
    with torch.no_grad():
        assert gap(merged(X), base) < ROUNDED_TWICE


def test_pissa_adapters_combine_exactly(tmp_path):
    """A PiSSA adapter is saved as plain LoRA on the original base ([A; A0], [B, -B0]): it
    combines like any other, exactly."""
    dirs = []
    for i, init in enumerate(("pissa", "kaiming")):
        model = base_model()
        inject_lora(model, LoRASpec(rank=2, alpha=2, init=init))
        as_if_trained(model, seed=i)
        save_adapter(model, tmp_path / init, SIZES)
        dirs.append(tmp_path / init)
    spec, tensors = combine([read(d) for d in dirs], Recipe("cat", (1.0, 1.0)))
    assert spec.rank == 6  # PiSSA's saved rank 4, plus 2
    assert gap(loralab_logits(spec, tensors), exact_logits(dirs, [1.0, 1.0])) < EXACT


@pytest.mark.parametrize("recipe, fragment", [
    (dict(method="cat", weights=()), "no adapters"),
    (dict(method="cat", weights=(1.0, math.nan)), "not finite"),
    (dict(method="ties", weights=(1.0,)), "density"),
    (dict(method="linear", weights=(1.0,), rank=2), "does nothing with linear"),
    (dict(method="svd", weights=(1.0,), rank=0), r"rank=0 is invalid: expected an integer ≥ 1"),
    (dict(method="average", weights=(1.0,)), "unknown"),
])
def test_recipe_refuses_bad_values(recipe, fragment):
    with pytest.raises(ConfigError, match=fragment):
        Recipe(**recipe)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A base file and adapters on it: two of rank 2 and 4, one on other layers, one DoRA, and
    one on another base."""
    root = tmp_path_factory.mktemp("combine")
    base = base_model()
    save_base(base, root / "base.safetensors", "small")
    made = {"base": root / "base.safetensors"}
    for name, spec, model in [
        ("r2", LoRASpec(rank=2, alpha=2), base_model()),
        ("r4", LoRASpec(rank=4, alpha=8, rslora=True), base_model()),
        ("two_layers", LoRASpec(rank=2, alpha=2, targets=("linear1", "linear2")), base_model()),
        ("dora", LoRASpec(rank=2, alpha=2, dora=True), base_model()),
        ("other_base", LoRASpec(rank=2, alpha=2), MLP(SIZES)),
        ("other_sizes", LoRASpec(rank=2, alpha=2), MLP([784, 48, 32, 10])),
    ]:
        inject_lora(model, spec)
        as_if_trained(model, seed=len(made))
        save_adapter(model, root / name, SIZES)
        made[name] = root / name
    return made


def combine_cli(files, out, *args):
    return script(COMBINE, files["base"], out, *args, "--sizes", *map(str, SIZES))


def test_script_writes_a_peft_adapter(files, tmp_path):
    """The script's cat output: loads in PEFT and here with the same logits, is the exact sum,
    and records its recipe."""
    out = tmp_path / "combined"
    done = combine_cli(files, out, files["r2"], files["r4"], "--weights", "1", "0.5")
    assert done.returncode == 0, done.stderr
    assert "cat, rank 6" in done.stdout
    ours = base_model()
    load_adapter(ours, out)
    theirs = peft.PeftModel.from_pretrained(base_model(), str(out)).eval()
    with torch.no_grad():
        assert gap(ours(X), theirs(X)) < EXACT
        assert gap(ours(X), exact_logits([files["r2"], files["r4"]], [1.0, 0.5])) < EXACT
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        recipe = json.loads(f.metadata()["loralab_combination"])
    assert recipe["method"] == "cat" and recipe["weights"] == [1.0, 0.5]
    done = combine_cli(files, tmp_path / "svd", files["r2"], files["r4"], "--method", "svd", "--rank", "3")
    assert done.returncode == 0 and "svd, rank 3" in done.stdout, done.stderr


@pytest.mark.parametrize("inputs, args, fragments", [
    ([], [], ["no adapters"]),
    (["r2", "r4"], ["--weights", "1"], ["1 weights for 2 adapters"]),
    (["r2"], ["--weights", "inf"], ["not finite"]),
    (["r2", "two_layers"], [], ["adapt different layers"]),
    (["r2", "dora"], [], ["is DoRA"]),
    (["r2", "other_base"], [], ["different bases"]),
    (["r2", "r4"], ["--method", "linear"], ["same rank"]),
    (["r2"], ["--method", "ties"], ["density"]),
    (["other_sizes"], [], ["does not fit the base", "linear1.lora_B has shape (48, 2)"]),
], ids=["empty", "weights-count", "non-finite", "layers", "dora", "base", "ranks", "density", "shapes"])
def test_script_refuses_in_one_line(files, tmp_path, inputs, args, fragments):
    out = tmp_path / "combined"
    before = tree_digest(files["base"].parent)
    done = combine_cli(files, out, *[files[name] for name in inputs], *args)
    assert_one_line_error(done, *fragments)
    assert done.returncode == 2
    assert not out.exists() and not list(tmp_path.iterdir())
    assert tree_digest(files["base"].parent) == before


def test_script_never_overwrites(files, tmp_path):
    out = tmp_path / "combined"
    out.mkdir()
    (out / "keep").write_text("x")
    assert_one_line_error(combine_cli(files, out, files["r2"]), "already exists")
    assert [p.name for p in out.iterdir()] == ["keep"]


def test_svd_rank_is_capped_at_the_layer(tmp_path):
    """A requested svd rank above min(in, out) keeps min(in, out) triplets (linear3 has 10
    outputs), which is still exact."""
    _, dirs = peft_adapters(tmp_path, [{"r": 8, "lora_alpha": 8}, {"r": 8, "lora_alpha": 8}])
    spec, tensors = combine([read(d) for d in dirs], Recipe("svd", (1.0, 1.0), rank=16))
    assert spec.rank_of("linear1") == 16 and spec.rank_of("linear3") == 10
    assert gap(loralab_logits(spec, tensors), exact_logits(dirs, [1.0, 1.0])) < EXACT
    assert set(ON_DELTAS) < set(METHODS)


def test_combine_experiment_on_a_slice(pretrained, tmp_path):
    """experiment=combine as users run it, small: three tasks, two lrs, two seeds. Every method's
    arm is reported for each seed, and d8 + d9 - d8 gives d9's per-digit test results exactly."""
    done = train_py("-m", "experiment=combine", "lr_step=-1,0", "seed=0,1", f"base={pretrained[1]}", "trainer.max_steps=10",
                    "data.val_size=1000", "trainer.enable_progress_bar=false", "accelerator=cpu", f"output_root={tmp_path}")
    assert done.returncode == 0, done.stderr
    (sweep,) = (tmp_path / "finetune-sweep").iterdir()
    report = json.loads((sweep / "combine" / "combine.json").read_text())
    assert report["digits"] == [8, 9] and set(report["lrs"]) == {"d8", "d9", "union"}
    per_seed = report["per_seed"]
    expected = {"d8", "d9", "union", "d8 + d9 - d8 cat", *(f"d8 + d9 {m}" for m in RECIPES)}
    assert set(per_seed) == expected and all(set(by_seed) == {"0", "1"} for by_seed in per_seed.values())
    assert per_seed["d8 + d9 - d8 cat"] == per_seed["d9"]
    assert per_seed["d8 + d9 cat"] != per_seed["d9"]
    assert "| d8 + d9 ties |" in (sweep / "combine" / "combine.md").read_text()
    # Printed once each, the sweep summary first and the combinations after it.
    assert done.stdout.count("Sweep summary") == 1 and done.stdout.index("Sweep summary") < done.stdout.index("| d8 + d9 ties |")

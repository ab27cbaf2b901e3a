"""loralab's sweeper (src/hydra_plugins/loralab_sweeper.py): each distinct override composed once
before the first job, so a bad value still fails the sweep before any job runs; and each job
launched from a shared composition, to the same config Hydra composes for it."""

from __future__ import annotations

import itertools

from hydra import compose, initialize_config_dir
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra._internal.utils import create_config_search_path
from hydra.types import RunMode
from omegaconf import OmegaConf

from conftest import CONF, train_py
from hydra_plugins.loralab_sweeper import SharedCompositions, covering


def test_covering_holds_every_override_in_at_most_the_sum_of_the_axes():
    axes = [[f"arm={a}" for a in "abc"], [f"lr_step={s}" for s in range(-2, 3)], [f"seed={s}" for s in range(5)]]
    batch = [list(job) for job in itertools.product(*axes)]
    kept = covering(batch)
    assert {o for job in kept for o in job} == {o for axis in axes for o in axis}
    assert len(kept) <= sum(map(len, axes)) and kept[0] == batch[0]
    assert all(job in batch for job in kept)


def test_the_frontier_and_variants_sweeps_use_it():
    for experiment in ("frontier", "variants"):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("config", overrides=[f"experiment={experiment}"], return_hydra_config=True)
        assert cfg.hydra.sweeper._target_ == "hydra_plugins.loralab_sweeper.LoralabSweeper"


def test_a_bad_value_last_in_an_axis_fails_before_the_first_job(tmp_path, pretrained):
    _, base = pretrained
    done = train_py("-m", "experiment=frontier", f"base={base}", "arm=lora_r1,no_such_arm", "lr_step=0", "seed=0", f"output_root={tmp_path}")
    assert done.returncode != 0
    assert "no_such_arm" in done.stderr
    assert not list(tmp_path.rglob("metrics.json"))  # no job ran


def test_a_shared_composition_gives_each_job_hydras_own_config(tmp_path):
    """Every job of a slice of experiment=frontier and experiment=combine, from the shared
    compositions, against Hydra composing it afresh: the config as written (interpolations and the
    hydra node, overrides and override_dirname included) and the job's config resolved."""
    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(CONF)))
    for experiment, groups in (("frontier", ["arm=lora_r1", "arm=dora", "arm=full"]), ("combine", ["task=d8", "task=union"])):
        command = [f"experiment={experiment}", f"base={tmp_path}"]
        master = loader.load_configuration("config", overrides=command, run_mode=RunMode.MULTIRUN)
        shared = SharedCompositions(loader)
        for job in itertools.product(groups, ["lr_step=-1", "lr_step=1"], ["seed=0", "seed=3"]):
            overrides = [*command, *job]
            ours, hydras = shared.load_sweep_config(master, overrides), loader.load_sweep_config(master, overrides)
            assert OmegaConf.to_container(ours) == OmegaConf.to_container(hydras), job
            task = [key for key in ours if key != "hydra"]
            assert OmegaConf.to_container(OmegaConf.masked_copy(ours, task), resolve=True) == \
                OmegaConf.to_container(OmegaConf.masked_copy(hydras, task), resolve=True), job
        assert len(shared.composed) == len(groups)  # one composition per choice of config groups

"""Entry point: ``python train.py stage=pretrain``, ``python train.py stage=finetune lora.rank=1,2,4 -m``."""

import hydra

from loralab.cli import main as run_cli
from loralab.cli import run_job


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg):
    return run_job(cfg)


if __name__ == "__main__":
    run_cli(main)
